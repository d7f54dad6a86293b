"""The output layer (issue 21, item 1): results on stdout; on stderr a header before each step and one line per epoch
that names its stage or arm, counted from 1 (bars instead on a terminal), warnings and errors; -q and -v.
Real runs of the command line, with their output in real files, pipes and a real pseudo-terminal."""

import fcntl
import logging
import os
import re
import select
import shutil
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from aepretrain.cli import main
from aepretrain.config import resolve
from aepretrain.data import prepare
from aepretrain.finetune import finetune
from aepretrain.output import fitting

SETTINGS = ["--preset", "tiny", "--dataset", "synthetic", "--precision", "32", "--device", "cpu",
            "--set", "finetune.epochs=3"]
EPOCH = re.compile(r"^\[(?P<label>[^\]]+)\] epoch (?P<epoch>\d+)/(?P<epochs>\d+)  train_loss \S+  (?P<rest>.*) s$")


def cli(*args: str, **kwargs: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aepretrain", *args], timeout=600, **kwargs)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """A whole tiny run, its stdout and stderr captured to files as under nohup or a cluster's scheduler."""
    folder = tmp_path_factory.mktemp("output")
    with open(folder / "out.txt", "w") as out, open(folder / "err.txt", "w") as err:
        assert cli("run", *SETTINGS, "--out", str(folder / "run"), stdout=out, stderr=err).returncode == 0
    return folder / "run", (folder / "out.txt").read_text(), (folder / "err.txt").read_text()


def test_a_run_to_files_is_a_few_lines_naming_every_stage_and_arm(demo: tuple[Path, str, str]) -> None:
    run, out, err = demo
    assert len(out.encode()) + len(err.encode()) < 3000, (out, err)
    assert "\r" not in out + err and not set("█▏▎▍▌▋▊▉") & set(out + err) and "it/s" not in err
    assert out.splitlines()[:2] == ["", f"run folder: {run}  (report.html, report.md, metrics.json, figures/, "
                                        "checkpoints/)"]
    assert [line.split(":")[0].strip() for line in out.splitlines()[2:]] == \
        ["pretrained", "scratch", "one seed gives no verdict"]  # results only, and what they cannot say
    lines = err.splitlines()
    epochs: dict[str, list[int]] = {}
    for line in lines:
        if found := EPOCH.match(line):
            epochs.setdefault(found["label"], []).append(int(found["epoch"]))
            assert "val_loss" in found["rest"]  # every epoch of a run validates
            assert found["epochs"] == ("1" if found["label"].startswith("stage") else "3")
    assert epochs == {"stage 1/3": [1], "stage 2/3": [1], "stage 3/3": [1], "finetune pretrained": [1, 2, 3],
                      "finetune scratch": [1, 2, 3]}
    headers = [line for line in lines if not EPOCH.match(line)]
    assert [line.split("]")[0] + "]" for line in headers] == [
        "[data]", "[stage 1/3]", "[stage 2/3]", "[stage 3/3]", "[probes]", "[probes]", "[finetune pretrained]",
        "[finetune scratch]", "[report]"], headers
    assert headers[1] == "[stage 1/3] pre-training encoder block 1 as an autoencoder (greedy): 1 epoch on 32 images"
    assert headers[7] == "[finetune scratch] training the classifier from random weights: 3 epochs on 88 images"
    assert not [line for line in lines if "GPU available" in line or "LOCAL_RANK" in line or "Tip" in line]


def copy_of(run: Path, tmp_path: Path) -> Path:
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def read_all(fd: int, proc: subprocess.Popen) -> bytes:
    """What the child writes to the terminal, read as it comes (a full terminal buffer would block the child)."""
    said = b""
    while True:
        ready, _, _ = select.select([fd], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # EIO: the child closed the terminal
                chunk = b""
            if not chunk:
                return said
            said += chunk
        elif proc.poll() is not None:
            return said


def test_on_a_terminal_the_bars_are_drawn_and_named(demo: tuple[Path, str, str], tmp_path: Path) -> None:
    run = copy_of(demo[0], tmp_path)
    terminal, child_end = os.openpty()
    fcntl.ioctl(child_end, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "aepretrain", "finetune", "--init", "scratch", "--out", str(run),
                             *SETTINGS, "--set", "trainer.progress=true"], stdout=subprocess.PIPE, stderr=child_end)
    os.close(child_end)
    screen = read_all(terminal, proc).decode()
    os.close(terminal)
    out = proc.stdout.read().decode()
    assert proc.wait(60) == 0, screen
    for epoch in (1, 2, 3):  # tqdm redraws each bar after a \r, the fit's name and its epoch counted from 1
        assert re.search(rf"\r\[finetune scratch\] epoch {epoch}/3: +100%\|█+\| 5/5 ", screen), screen
    assert "epoch 0" not in screen and "epoch 1/3  train_loss" not in screen  # no lines besides the bars
    assert out.startswith("scratch: best val accuracy ") and "█" not in out  # the result alone on stdout


def test_quiet_says_nothing_but_results_and_errors(demo: tuple[Path, str, str], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    run = copy_of(demo[0], tmp_path)
    done = cli("finetune", "--init", "scratch", "--out", str(run), *SETTINGS, "-q", capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("scratch: best val accuracy ")
    # training the arm again replaces its logs, as asked: Lightning's warning that it does is not said (before: a
    # line "Experiment logs directory ... exists and is not empty")
    assert done.stderr == ""
    assert main(["run", *SETTINGS, "--quiet", "--out", str(run)]) == 2
    assert capsys.readouterr().err == f"aepretrain: error: {run} already holds a run: pass --resume to continue it " \
                                      "or --overwrite to replace it\n"  # the one line, and nothing else
    assert main(["run", *SETTINGS, "-q", "-v", "--out", str(tmp_path / "new")]) == 2
    assert capsys.readouterr().err == "aepretrain: error: --quiet and --verbose contradict each other: pass one of them\n"
    assert not (tmp_path / "new").exists()


def test_verbose_adds_debug_lines_and_lightnings_own(demo: tuple[Path, str, str], tmp_path: Path) -> None:
    run = copy_of(demo[0], tmp_path)
    err = cli("finetune", "--init", "scratch", "--out", str(run), *SETTINGS, "-v", capture_output=True, text=True,
              check=True).stderr.splitlines()
    assert f"[finetune scratch] device cpu, precision 32, logs in {run / 'logs' / 'scratch'}, epoch checkpoints in " \
           f"{run / 'checkpoints' / 'resume' / 'scratch'}" in err, err
    assert "GPU available: False, used: False" in err, err
    assert [int(m["epoch"]) for m in map(EPOCH.match, err) if m] == [1, 2, 3]
    assert "] device " not in demo[2] and "GPU available" not in demo[2]  # the default shows neither


def test_an_epoch_without_validation_shows_no_validation_values(tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """A study's cell validates every few epochs; its name is the study's (see label_study.run_cell)."""
    cfg = resolve("tiny", overrides=["finetune.epochs=2", "trainer.device=cpu"])
    caplog.set_level(logging.INFO, logger="aepretrain")
    with fitting("study f1 scratch seed 0"):
        finetune(cfg, prepare(cfg.data, cfg.seed), tmp_path, "scratch", val_every=2)
    said = [r.getMessage() for r in caplog.records if r.name.startswith("aepretrain")]  # a notebook's logging
    lines = [m for m in map(EPOCH.match, said) if m]
    assert [(m["label"], m["epoch"]) for m in lines] == [("study f1 scratch seed 0", "1"),
                                                         ("study f1 scratch seed 0", "2")]
    assert "val_" not in lines[0]["rest"] and "val_loss" in lines[1]["rest"] and "val_acc" in lines[1]["rest"]
    assert said[0] == "[study f1 scratch seed 0] training the classifier from random weights: 2 epochs on " \
                                 "88 images"


def test_a_resume_says_what_it_restored_and_warnings_keep_their_one_prefix(demo: tuple[Path, str, str],
                                                                          tmp_path: Path) -> None:
    run = copy_of(demo[0], tmp_path)
    (run / "metrics.json").write_text("{damaged")
    done = cli("run", *SETTINGS, "--resume", "--out", str(run), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert f"aepretrain: {run / 'metrics.json'} is damaged: it is written again from the finished stages and arms" \
        in lines, lines
    for stage in (1, 2, 3):
        assert f"[stage {stage}/3] finished in an earlier run: restored from " \
               f"{run / 'checkpoints' / f'pretrain-stage{stage}.safetensors'}" in lines
    assert f"[finetune scratch] finished in an earlier run: restored from " \
           f"{run / 'checkpoints' / 'classifier-scratch.safetensors'}" in lines
    assert not [line for line in lines if EPOCH.match(line)]  # nothing trained again
