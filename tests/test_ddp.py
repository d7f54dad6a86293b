"""DDP on 2 CPU processes (gloo): the greedy stages and fine-tuning complete and split the data, and the
pre-training images' store is built once and mapped by both processes."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from aepretrain.cli import main

from .conftest import photo, tiny

# 4 classes x 40: train 144 images, divisible by 2 processes x batch 8, so a split epoch sees exactly the images a
# single process does; and a folder of 53 unlabelled photos for pre-training, all trained on: 6 full batches of 8 in
# one process, 3 in each of two (27 images each, one padded), 48 images an epoch either way.
TINY = [*tiny("pretrain.epochs=2", "pretrain.batch_size=8", "finetune.batch_size=8", "data.synthetic_per_class=40"),
        "--device", "cpu"]
TINY.remove("--quiet")  # the store's one "stored ..." line is counted: --quiet keeps warnings and errors only


def samples_per_epoch(out: Path) -> dict[str, list[float]]:
    m = json.loads((out / "metrics.json").read_text())
    seen = {f"stage{s['stage']}": [row["samples"] for row in s["history"]] for s in m["pretrain"]["stages"]}
    return seen | {arm: [row["samples"] for row in r["history"]] for arm, r in m["finetune"].items()}


def test_ddp_on_two_cpu_processes_matches_one_process_in_samples_per_epoch(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(53):
        photo(i).save(photos / f"{i}.png")
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    run = ["run", *TINY, "--pretrain-data", str(photos)]
    monkeypatch.setenv("AEPRETRAIN_CACHE", str(tmp_path / "cache-single"))  # each run builds its own store
    assert main([*run, "--out", str(single)]) == 0  # one process: this one
    said = capsys.readouterr().err
    env = dict(os.environ, AEPRETRAIN_CACHE=str(tmp_path / "cache-ddp"))
    result = subprocess.run([sys.executable, "-m", "aepretrain", *run, "--out", str(ddp), "--devices", "2",
                             "--strategy", "ddp"], capture_output=True, text=True, timeout=400, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("run folder: ") == 1, result.stdout  # each process ends the command; one says so
    for stderr in (said, result.stderr):
        assert len(re.findall(r"^stored 53 images of folder-all-16 ", stderr, re.M)) == 1, stderr[-3000:]
        assert "waiting" not in stderr and "damaged" not in stderr
    assert len(list((tmp_path / "cache-ddp").glob("folder-all-16-*.npy"))) == 1
    seen = samples_per_epoch(single)
    assert seen == {"stage1": [48, 48], "stage2": [48, 48], "stage3": [48, 48], "pretrained": [144, 144],
                    "scratch": [144, 144]}
    assert samples_per_epoch(ddp) == seen
    m = json.loads((ddp / "metrics.json").read_text())
    assert m["pretrain"]["images"] == 53 and "folder at" in m["pretrain"]["data"]
    assert m["pretrain"]["stages"][2]["epochs"] == 2 and (ddp / "report.html").is_file()
    assert (ddp / "checkpoints" / "classifier-pretrained.safetensors").is_file()
