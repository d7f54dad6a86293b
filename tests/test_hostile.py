"""Hostile inputs (issue 14): nothing of the user's is deleted, nothing wrong ends in exit 0, every mistake is one
line, and a resume trusts only what verifies. Real files and, where a process boundary matters, real processes."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import aepretrain
from aepretrain.cli import main
from aepretrain.config import resolve
from aepretrain.errors import UserError
from aepretrain.runfolder import LOCK, MARKER, run_folder

from .conftest import make_oxford, numbers, photo, tiny

TINY = tiny("finetune.epochs=1", "probe.enabled=false")


def one_line_error(capsys: pytest.CaptureFixture[str], *parts: str) -> str:
    err = capsys.readouterr().err
    lines = err.splitlines()  # a data store built on the way says so in a line of its own first
    assert lines and lines[-1].startswith("aepretrain: error: ") and err.endswith("\n"), err
    assert "Traceback" not in err and sum(line.startswith("aepretrain: error") for line in lines) == 1, err
    assert all(line.startswith(("stored ", "aepretrain: ", "[")) for line in lines), err  # "[data] ...": a step
    err = lines[-1] + "\n"
    for part in parts:
        assert part in err, err
    return err


@pytest.fixture
def copy(finished: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


def folder_data(root: Path, classes: tuple[str, ...] = ("cat", "dog"), per_class: int = 8) -> Path:
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            photo(c * 100 + i, size=(20, 20)).save(root / name / f"{i}.png")
    return root


# 1. --overwrite deletes only what aepretrain wrote


def test_overwrite_refuses_a_folder_aepretrain_did_not_make(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    proj = tmp_path / "proj"
    (proj / "src").mkdir(parents=True)
    (proj / "src" / "precious.py").write_text("x")
    (proj / "config.yaml").write_text("name: app\n")
    assert main(["run", "--out", str(proj), "--overwrite", *TINY]) == 2
    one_line_error(capsys, "is not empty", "holds no aepretrain run")
    assert (proj / "src" / "precious.py").read_text() == "x" and sorted(os.listdir(proj)) == ["config.yaml", "src"]
    monkeypatch.chdir(proj)
    assert main(["run", "--out", ".", "--overwrite", *TINY]) == 2
    one_line_error(capsys, "holds no aepretrain run")
    assert sorted(os.listdir(proj)) == ["config.yaml", "src"]


def test_overwrite_removes_only_the_names_aepretrain_writes(copy: Path) -> None:
    (copy / "notes.txt").write_text("mine")
    (copy / "eval").mkdir()
    (copy / ".metrics.json.999.tmp").write_text("left by a killed write")
    with run_folder(copy, "run", overwrite=True) as folder:
        assert sorted(os.listdir(folder)) == sorted([LOCK, MARKER, "eval", "notes.txt"])
    assert (copy / "notes.txt").read_text() == "mine"


def test_a_run_and_a_study_do_not_take_each_others_folders(finished: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["study", "--out", str(finished), *TINY, "--label-fractions", "1", "--seeds", "1",
                 "--set", "study.epochs=1", "--set", "study.min_steps=1"]) == 2
    one_line_error(capsys, "holds an aepretrain run, not a study")


# 2. damaged saved settings: the resume refuses before it writes anything


@pytest.mark.parametrize("damage", ["cut before finetune", "empty", "a value changed"])
def test_resume_refuses_damaged_settings_before_writing(copy: Path, damage: str,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    saved = copy / "config.yaml"
    text = saved.read_text()
    saved.write_text({"cut before finetune": text[:text.index("finetune:")], "empty": "",
                      "a value changed": text.replace("epochs: 1", "epochs: 100", 1)}[damage])
    before = {p: p.stat().st_mtime_ns for p in copy.rglob("*") if p.name != LOCK}
    assert main(["run", "--out", str(copy), "--resume"]) == 2
    one_line_error(capsys, "config.yaml is damaged or was edited", "--overwrite")
    assert main(["run", "--out", str(copy), "--resume", *TINY]) == 2  # settings given: the API checks them
    one_line_error(capsys, "config.yaml is damaged or was edited")
    assert {p: p.stat().st_mtime_ns for p in copy.rglob("*") if p.name != LOCK} == before


def test_the_api_resume_refuses_other_settings_as_the_cli_does(copy: Path) -> None:
    cfg = resolve("tiny", overrides=[a for a in TINY if "=" in a], seed=7)
    with pytest.raises(UserError, match="ran with seed=0, not 7"):
        aepretrain.run(cfg, copy, resume=True)


# 3 and 4. one image, one label, one split


def test_overlapping_official_splits_are_refused_with_the_count(tiny_pets: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    annotations = tiny_pets / "annotations"
    test_lines = (annotations / "test.txt").read_text()
    (annotations / "trainval.txt").write_text((annotations / "trainval.txt").read_text() + test_lines)
    assert main(["data", "--dataset", "oxford-pets", "--root", str(tiny_pets), "--out", str(tiny_pets / "o")]) == 2
    one_line_error(capsys, f"{len(test_lines.split())//4} image(s) are listed more than once", "Abyssinian_5 in "
                   "trainval.txt and Abyssinian_5 in test.txt")


def test_links_never_give_an_image_two_labels(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = folder_data(tmp_path / "root")
    os.symlink(".", root / "allofit")
    os.symlink("../cat/0.png", root / "dog" / "also-cat.png")
    assert main(["data", "--dataset", "folder", "--root", str(root), "--out", str(tmp_path / "o"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["classes"] == ["cat", "dog"]
    assert sum(row["train"] + row["val"] + row["test"] for row in info["per_class"].values()) == 16
    reasons = {Path(s["path"]).name: s["reason"] for s in info["skipped"]}
    assert "back into the data set's folder" in reasons["allofit"] and "the same file as" in reasons["also-cat.png"]


# 6. every setting checked with its range before any work


@pytest.mark.parametrize("extra, message", [
    (["--set", "pretrain.lr=nan"], "pretrain.lr must lie in (0, 1e37], got nan"),
    (["--set", "pretrain.lr=inf"], "pretrain.lr must lie in (0, 1e37], got inf"),
    (["--set", "pretrain.lr=1e39"], "pretrain.lr must lie in (0, 1e37], got 1e+39"),
    (["--set", "finetune.lr=-1"], "finetune.lr must lie in (0, 1e37], got -1.0"),
    (["--set", "finetune.weight_decay=-1"], "finetune.weight_decay must lie in [0, inf), got -1.0"),
    (["--set", "model.dropout=1.5"], "model.dropout must lie in [0, 1), got 1.5"),
    (["--set", "model.classifier_stride=0", "--set", "model.autoencoder_stride=0"],
     "model.classifier_stride must lie in [1, 8], got 0"),
    (["--set", "model.blocks=[{channels: [8], kernel: -1}]"], "model.blocks[0].kernel must lie in [1, 31], got -1"),
    (["--set", "model.blocks=[{channels: [true], kernel: 3}]"], "model.blocks[0].channels[0] must be a whole number"),
    (["--seed", "-1"], "seed must lie in [0, 2147483647], got -1"),
    (["--devices", "abc"], "trainer.devices is auto, -1 (all), a count of at least 1"),
    (["--set", "trainer.num_workers=-1"], "trainer.num_workers must lie in [0, 1024], got -1"),
    (["--set", "data.train_limit=0"], "data.train_limit must lie in [2, inf), got 0"),
    (["--set", "data.synthetic_classes=1"], "data.synthetic_classes must lie in [2, 1000], got 1"),
    (["--image-size", "8192"], "data.image_size must lie in [8, 1024], got 8192"),
    (["--set", "data.root.x=1"], "unknown setting 'data.root.x'"),
    (["--set", "study.label_fractions=[0.5, 2]"], "study.label_fractions[1] must lie in (0, 1], got 2.0"),
])
def test_settings_out_of_range_are_refused_before_any_work(extra: list[str], message: str, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--out", str(tmp_path / "o"), *TINY, *extra]) == 2
    one_line_error(capsys, message)
    assert not (tmp_path / "o").exists()


def test_a_binary_config_file_and_an_impossible_out_are_one_line(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "c.bin").write_bytes(bytes(range(256)) * 4)
    assert main(["run", "--out", str(tmp_path / "o"), *TINY, "--config", str(tmp_path / "c.bin")]) == 2
    one_line_error(capsys, "is not a text file of settings")
    (tmp_path / "file").write_text("x")
    assert main(["run", "--out", str(tmp_path / "file" / "sub"), *TINY]) == 2
    one_line_error(capsys, "cannot make the folder", "Not a directory")


@pytest.mark.parametrize("data, message", [
    ("one class", "has one class (cat): a classifier needs at least two"),
    ("empty test.txt", "the test split of oxford-pets"),
])
def test_data_a_classifier_cannot_use_is_refused_before_pretraining(data: str, message: str, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    if data == "one class":
        source = ["--dataset", "folder", "--root", str(folder_data(tmp_path / "root", ("cat",)))]
    else:
        root = make_oxford(tmp_path / "pets", {"Abyssinian": 1, "Bengal": 6})
        (root / "annotations" / "test.txt").write_text("")
        source = ["--dataset", "oxford-pets", "--root", str(root)]
    assert main(["run", "--out", str(tmp_path / "o"), *TINY, *source]) == 2
    one_line_error(capsys, message)
    assert not (tmp_path / "o" / "checkpoints").exists()


def test_an_update_that_breaks_the_model_in_the_last_step_stops_that_stage(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """One step per epoch: its loss is finite, the weights it leaves make the validation loss infinite."""
    out = tmp_path / "o"
    assert main(["pretrain", "--out", str(out), *TINY, "--set", "pretrain.lr=1e30",
                 "--set", "pretrain.batch_size=64"]) == 2
    one_line_error(capsys, "stage1: val_loss became non-finite in epoch 1, though every step's loss was finite")
    checkpoints = out / "checkpoints"
    for never in ("pretrain-stage1.safetensors", "pretrain-stage1.json", "resume/stage1/last.ckpt"):
        assert not (checkpoints / never).exists(), never


# 6 and 10. flags of predict and bench


@pytest.mark.parametrize("args, message", [
    (["predict", "--top-k", "-2"], "--top-k must lie in [1, 1000], got -2"),
    (["predict", "--top-k", "0"], "--top-k must lie in [1, 1000], got 0"),
    (["bench", "--steps", "0"], "--steps must lie in [1, 10000], got 0"),
    (["bench", "--batch", "-5"], "--batch must lie in [1, 65536], got -5"),
    (["bench", "--batch", "0"], "--batch must lie in [1, 65536], got 0"),
    (["bench", "--size", "7"], "--size must lie in [8, 1024], got 7"),
    (["bench", "--size", "12"], "--size 12 must be a multiple of 8"),
    (["bench", "--models", "classifier,nope"], "unknown model 'nope' for --models"),
    (["bench", "--precisions", "fp8"], "unknown precision 'fp8' for --precisions"),
])
def test_flags_out_of_range_are_one_line(args: list[str], message: str, finished: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    if args[0] == "predict":
        checkpoint = finished / "checkpoints" / "classifier-scratch.safetensors"
        args = [*args, str(Path(__file__)), "--checkpoint", str(checkpoint)]
    assert main(args) == 2
    one_line_error(capsys, message)


# 7. crafted checkpoints


@pytest.mark.parametrize("change, message", [
    ({"config": "{not json"}, "its metadata 'config' must be settings"),
    ({"classes": None}, "its metadata has no 'classes'"),
    ({"in_channels": "abc"}, "its metadata 'in_channels' must be 1 to 4, not 'abc'"),
    ({"classes": "5"}, "its metadata 'classes' must be a list of at least two class names"),
    ({"image_size": "30000"}, "its metadata 'image_size' must lie in [8, 1024], got 30000"),
    ({"config": json.dumps({"model": {"blocks": [{"channels": [8192, 8192], "kernel": 31}]}})},
     "does not fit this model"),  # a model far larger than the file is never allocated
])
def test_a_crafted_checkpoint_ends_in_one_line(change: dict, message: str, finished: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    source = finished / "checkpoints" / "classifier-scratch.safetensors"
    with safe_open(str(source), "pt") as f:
        meta = f.metadata()
    meta = {k: v for k, v in (meta | change).items() if v is not None}
    save_file(load_file(str(source)), str(tmp_path / "c.safetensors"), metadata=meta)
    photo(1).save(tmp_path / "x.png")
    assert main(["predict", str(tmp_path / "x.png"), "--checkpoint", str(tmp_path / "c.safetensors")]) == 2
    one_line_error(capsys, message)


# 8. a resume trusts only what verifies


def test_resume_redoes_what_does_not_verify(finished: Path, copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    metrics = (copy / "metrics.json").read_text()
    (copy / "metrics.json").write_text(metrics[: len(metrics) // 2])
    assert main(["report", str(copy)]) == 2
    one_line_error(capsys, "metrics.json is damaged")
    record = copy / "checkpoints" / "pretrain-stage1.json"
    record.write_text(record.read_text()[:40])
    (copy / "checkpoints" / "pretrain-stage2.safetensors").unlink()
    (copy / "checkpoints" / "classifier-scratch.safetensors").unlink()
    assert main(["run", "--out", str(copy), "--resume"]) == 0
    assert (copy / "checkpoints" / "pretrain-stage2.safetensors").is_file()
    assert (copy / "checkpoints" / "classifier-scratch.safetensors").is_file()
    assert json.loads(record.read_text())["stage"] == 1
    assert numbers(copy) == numbers(finished)


# 9. one process per run folder


def test_a_second_process_on_a_run_folder_is_refused_with_the_holder(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "aepretrain", "pretrain", "--out", str(out), *TINY,
                              "--set", "pretrain.epochs=1000"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while "settings_sha256" not in ((out / MARKER).read_text() if (out / MARKER).is_file() else "") and \
                first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, first.stderr.read().decode()[-2000:]
        assert (out / MARKER).is_file(), "no run folder marker after 120 s"
        assert main(["run", "--out", str(out), "--resume"]) == 2
        one_line_error(capsys, f"is in use by process {first.pid}")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    with run_folder(out, "run", resume=True):  # the kernel let go of the killed holder's lock
        assert (out / LOCK).read_text() == str(os.getpid())


# 11. small things


def test_ctrl_c_during_start_up_is_one_line(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "aepretrain", "run", "--out", str(tmp_path / "o"), *TINY],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)  # importing torch and Lightning takes longer than this
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
    # 130, or death by SIGINT (a shell shows both as 130): CPython ends so when the interrupt escaped an
    # exec() of a string on its way, as in dataclasses, even though main caught it
    assert proc.returncode in (130, -signal.SIGINT) and "Traceback" not in err, err
    assert err.strip().endswith("(--resume continues)"), err


def test_evaluate_says_when_class_names_differ(finished: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    root = folder_data(tmp_path / "root", ("a", "b", "c", "e"))
    checkpoint = finished / "checkpoints" / "classifier-scratch.safetensors"
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--dataset", "folder", "--root", str(root),
                 "--image-size", "16"]) == 2
    one_line_error(capsys, "trained on other classes than the data's", "class 0 is 'pattern0' there and 'a' here")


@pytest.mark.parametrize("args, unused", [(["finetune", "--init", "scratch", "--overwrite", *TINY], "--overwrite"),
                                          (["evaluate", "--checkpoint", "c", "--devices", "2"], "--devices 2"),
                                          (["summary", "--dataset", "synthetic"], "--dataset synthetic")])
def test_a_command_accepts_only_the_flags_it_uses(args: list[str], unused: str, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--out", str(tmp_path / "o")] if args[0] == "finetune" else args)
    assert exit_.value.code == 2 and f"unrecognized arguments: {unused}" in capsys.readouterr().err
