"""Resume after SIGKILL, determinism, bad inputs refused in one line, safe checkpoint loading, full disks."""

import csv
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from aepretrain.cli import main

from .conftest import numbers, tiny

TINY = [*tiny("pretrain.epochs=4", "finetune.epochs=3", "data.synthetic_per_class=64"), "--image-size", "32"]


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aepretrain", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("unbroken") / "run"
    assert main(["run", "--out", str(out), *TINY]) == 0
    return out


def test_a_short_run_learns_separable_classes(unbroken: Path) -> None:
    """4 classes of distinct stripe patterns: both arms must end far above chance (0.25)."""
    m = json.loads((unbroken / "metrics.json").read_text())
    for arm in ("pretrained", "scratch"):
        assert m["finetune"][arm]["test_accuracy"] >= 0.25 + 0.5, (arm, m["finetune"][arm]["test_accuracy"])


def test_same_seed_same_metrics(unbroken: Path, tmp_path: Path) -> None:
    assert main(["run", "--out", str(tmp_path / "again"), *TINY]) == 0
    assert numbers(tmp_path / "again") == numbers(unbroken)
    assert main(["run", "--out", str(tmp_path / "other"), *TINY, "--seed", "1"]) == 0
    assert numbers(tmp_path / "other") != numbers(unbroken)


def kill_after(out: Path, name: str) -> None:
    """Start a run and SIGKILL it as soon as stage or arm ``name`` has checkpointed its first epoch."""
    proc = subprocess.Popen([sys.executable, "-m", "aepretrain", "run", "--out", str(out), *TINY],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt = out / "checkpoints" / "resume" / name / "last.ckpt"
    deadline = time.time() + 240
    while not ckpt.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_sigkill_in_stage2_then_resume_equals_an_unbroken_run(unbroken: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    kill_after(out, "stage2")
    assert not (out / "checkpoints" / "pretrain-stage2.safetensors").exists(), "killed too late: stage 2 finished"
    stage1 = out / "checkpoints" / "pretrain-stage1.safetensors"
    stage1_written = stage1.stat().st_mtime_ns
    logged = csv_log(out, "stage2")  # what the killed fit's CSV log held

    assert main(["run", "--out", str(out), *TINY]) == 2  # the kill needs a process; the resume does not
    assert "already holds a run" in capsys.readouterr().err
    assert main(["run", "--out", str(out), "--resume"]) == 0
    assert stage1.stat().st_mtime_ns == stage1_written, "stage 1 was trained again"
    m = json.loads((out / "metrics.json").read_text())
    assert m["pretrain"]["stages"][0]["resumed_from"] is None
    assert m["pretrain"]["stages"][1]["resumed_from"] >= 1  # continued after its last finished epoch
    assert numbers(out) == numbers(unbroken)
    # the CSV log keeps the rows of the epochs before the kill (Lightning's own logger deleted them), then the
    # resumed epochs' rows, those of the unbroken run; the kill may have come before the last finished epoch's
    # training row was written (Lightning logs it after the epoch's checkpoint)
    finished = m["pretrain"]["stages"][1]["resumed_from"]
    kept = [row for row in logged if float(row.get("epoch", "inf")) < finished]  # a row the kill cut: none
    resumed, whole = csv_log(out, "stage2"), csv_log(unbroken, "stage2")
    assert kept and resumed[:len(kept)] == kept
    assert resumed[len(kept):] == [row for row in whole if float(row["epoch"]) >= finished]
    assert "Experiment logs directory" not in capsys.readouterr().err


def csv_log(run: Path, fit: str) -> list[dict[str, str]]:
    """A fit's CSV log, a dict of the values a row holds, in the order the rows were written (a column added
    later leaves the earlier rows empty there)."""
    with open(run / "logs" / fit / "metrics.csv", newline="") as f:
        return [{key: value for key, value in row.items() if value not in ("", None)} for row in csv.DictReader(f)]


def test_sigkill_in_a_finetuning_arm_then_resume_equals_an_unbroken_run_epoch_by_epoch(unbroken: Path,
                                                                                      tmp_path: Path) -> None:
    """Augmentation (flips) and dropout draw random numbers in fine-tuning: the first epoch after the resume
    must draw the same ones as the unbroken run, so every epoch's losses match exactly."""
    out = tmp_path / "run"
    kill_after(out, "pretrained")
    assert not (out / "checkpoints" / "classifier-pretrained.safetensors").exists(), "killed too late"
    assert main(["run", "--out", str(out), "--resume"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["finetune"]["pretrained"]["resumed_from"] >= 1
    got, want = numbers(out)["finetune"]["pretrained"], numbers(unbroken)["finetune"]["pretrained"]
    for epoch, (a, b) in enumerate(zip(got["history"], want["history"]), 1):
        assert a == b, f"epoch {epoch} differs after the resume: {a} != {b}"
    assert numbers(out) == numbers(unbroken)


def test_resume_with_other_settings_is_refused(unbroken: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--out", str(unbroken), "--resume", *TINY, "--seed", "7"]) == 2
    assert "ran with seed=0, not 7" in capsys.readouterr().err


def test_a_pickle_payload_in_a_checkpoint_does_not_run(unbroken: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = pickle.dumps({"state_dict": Payload()})
    out = tmp_path / "run"
    subprocess.run(["cp", "-r", str(unbroken), str(out)], check=True)
    for name in ("pretrain-stage1.json", "pretrain-stage2.json", "pretrain-stage3.json"):
        (out / "checkpoints" / name).unlink()
    (out / "checkpoints" / "resume" / "stage1" / "last.ckpt").write_bytes(evil)
    assert main(["run", "--out", str(out), "--resume"]) == 2  # any other exception would fail the test here
    said = capsys.readouterr().err
    assert "cannot load checkpoint" in said and "safely" in said and "Traceback" not in said
    (tmp_path / "evil.safetensors").write_bytes(evil)
    (tmp_path / "evil.png").write_bytes(b"")
    assert main(["predict", str(tmp_path / "evil.png"), "--checkpoint", str(tmp_path / "evil.safetensors")]) == 2
    assert "is not an aepretrain checkpoint" in capsys.readouterr().err
    assert not marker.exists(), "the pickle payload ran"


def test_a_full_disk_during_a_checkpoint_write_keeps_the_previous_one(unbroken: Path, tmp_path: Path) -> None:
    """RLIMIT_FSIZE makes the kernel refuse writes past a size: a real write failure, no mock."""
    ckpt = unbroken / "checkpoints" / "classifier-scratch.safetensors"
    target = tmp_path / "clf.safetensors"
    target.write_bytes(ckpt.read_bytes())
    script = textwrap.dedent(f"""
        import resource, signal
        from aepretrain.checkpoints import load_classifier, save_model
        from aepretrain.errors import UserError
        from aepretrain.training import AtomicCheckpointIO
        model, meta = load_classifier({str(target)!r})
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        for write in (lambda: save_model(model, {str(target)!r}, "classifier", meta["config"], 3,
                                         {{"classes": meta["classes"]}}),
                      lambda: AtomicCheckpointIO().save_checkpoint({{"w": model.state_dict()}}, {str(tmp_path / "last.ckpt")!r})):
            try:
                write()
                print("NO ERROR")
            except UserError as exc:
                print("USERERROR", exc)
    """)
    (tmp_path / "last.ckpt").write_bytes(b"previous")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("USERERROR") for line in lines), result.stdout + result.stderr
    assert "the previous" in lines[0] and "previous checkpoint is intact" in lines[1]
    assert (tmp_path / "last.ckpt").read_bytes() == b"previous"
    assert not list(tmp_path.glob("*.tmp"))
    assert main(["predict", str(Path(__file__)), "--checkpoint", str(target)]) == 2  # loads; refuses the .py


@pytest.mark.parametrize("args, message", [
    (["run", "--preset", "quik"], "unknown preset 'quik' (closest valid: quick)"),
    (["run", "--set", "finetune.epoch=3"], "unknown setting 'finetune.epoch'"),
    (["run", "--dataset", "folder"], "the folder data set needs --root DIR"),
    (["predict", "/nonexistent.jpg", "--checkpoint", "/nonexistent.safetensors"], "checkpoint not found"),
])
def test_bad_inputs_one_line_nonzero_no_traceback(args: list[str], message: str, tmp_path: Path) -> None:
    result = cli(*args, "--out", str(tmp_path / "o")) if args[0] == "run" else cli(*args)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and message in result.stderr and "Traceback" not in result.stderr


def test_empty_data_root_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    assert main(["data", "--dataset", "folder", "--root", str(tmp_path / "empty")]) == 2
    assert "no files in" in capsys.readouterr().err


def test_checkpoint_of_another_shape_names_the_layer(unbroken: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    encoder = unbroken / "checkpoints" / "pretrain-stage3.safetensors"
    args = ["finetune", "--init", "pretrained", "--encoder", str(encoder), "--out", str(tmp_path / "f"),
            "--preset", "pets-sample", "--dataset", "synthetic", "--image-size", "32", "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "does not fit this model: layer 'blocks.0.conv1.weight' has shape (16, 3, 5, 5) in the checkpoint, " \
        "(32, 3, 7, 7) here" in err


def test_nan_loss_stops_with_stage_epoch_step(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["pretrain", "--out", str(tmp_path / "nan"), *TINY, "--set", "pretrain.lr=1e30", "--set",
            "pretrain.epochs=3"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "stage1: the loss became" in err and "at epoch" in err and "step" in err


def test_a_mistake_in_the_settings_is_said_before_torch_loads() -> None:
    """A typo should not wait for torch and Lightning (seconds on a small CPU) to be told it is one."""
    script = ("import sys; from aepretrain.cli import main; rc = main(['run', '--preset', 'quick', '--set', "
              "'finetune.epoch=3']); print(rc, 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["2", "False"], result.stdout + result.stderr
    assert "unknown setting 'finetune.epoch'" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["run", "--image-size", "28"], "data.image_size 28 must be a multiple of 8"),
    (["run", "--device", "gpux"], "unknown device 'gpux'"),
    (["run", "--device", "cuda"], "cannot set up training with device=cuda"),
])
def test_device_and_size_mistakes_get_one_line(args: list[str], message: str, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*args, "--out", str(tmp_path / "o"), "--dataset", "synthetic", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_report_of_an_unfinished_folder_says_what_is_missing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "pre"
    assert main(["pretrain", "--out", str(out), *TINY, "--set", "pretrain.epochs=1"]) == 0
    capsys.readouterr()
    assert main(["report", str(out)]) == 2
    assert "holds no finetune results" in capsys.readouterr().err
