"""Nothing lost (issue 19): export never writes over its checkpoint and replaces a file only when told, the
TorchScript model refuses the wrong input as ONNX does, --overwrite removes only the files aepretrain wrote, and a
path the system refuses ends in one line. Real files, real runs, real exported models."""

import os
import shutil
from pathlib import Path

import pytest
import torch

from aepretrain.cli import main
from aepretrain.runfolder import LOCK, MARKER, run_folder

from .conftest import tiny
from .test_hostile import one_line_error

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
CLASSIFIER = "classifier-scratch"
LONG = "a" * 300  # longer than a file name may be (255 bytes on Linux)


@pytest.fixture
def model(finished: Path, tmp_path: Path) -> Path:
    """A copy of a trained classifier and its record in ``tmp_path/checkpoints``: exports may try to harm it."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for suffix in (".safetensors", ".json"):
        shutil.copy2(finished / "checkpoints" / f"{CLASSIFIER}{suffix}", folder)
    return folder / f"{CLASSIFIER}.safetensors"


def contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def tree(folder: Path) -> list[str]:
    """Every name under ``folder``, links not followed: folders end in /, links in @."""
    names = []
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root) / name
            mark = "@" if path.is_symlink() else "/" if path.is_dir() else ""
            names.append(str(path.relative_to(folder)) + mark)
    return sorted(names)


# 1. export: never over its checkpoint or its record, an existing file only with --overwrite, every file named


@pytest.mark.parametrize("spelling", ["the same path", "a symbolic link", "a hard link", "a relative path",
                                      "the record, as the backbone's spec", "the record, through a link"])
@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_export_never_writes_over_its_checkpoint_or_its_record(spelling: str, overwrite: list[str], model: Path,
                                                               tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    fmt, out, what, checkpoint = "torchscript", model, "is the checkpoint it exports", model
    if spelling == "a symbolic link":
        os.symlink(model, tmp_path / "link.safetensors")
        out = tmp_path / "link.safetensors"
    elif spelling == "a hard link":
        os.link(model, tmp_path / "hard.safetensors")
        fmt, out = "backbone", tmp_path / "hard.safetensors"
    elif spelling == "a relative path":
        monkeypatch.chdir(tmp_path)
        out = Path("checkpoints/../checkpoints") / model.name
    elif spelling == "the record, as the backbone's spec":
        fmt, out = "backbone", model.with_suffix(".bak")
        what = f"{model.with_suffix('.json')} (the backbone's spec, beside --out) is the checkpoint's record"
    elif spelling == "the record, through a link":  # the record beside what the link points to
        checkpoint, fmt, out = tmp_path / "link.safetensors", "backbone", model.with_suffix(".bak")
        os.symlink(model, checkpoint)
        what = f"{model.with_suffix('.json')} (the backbone's spec, beside --out) is the checkpoint's record"
    before, names = contents(tmp_path), tree(tmp_path)
    assert main(["export", "--checkpoint", str(checkpoint), "--format", fmt, "--out", str(out), *overwrite]) == 2
    one_line_error(capsys, what, "the checkpoint and its record are never written over")
    assert contents(tmp_path) == before and tree(tmp_path) == names


def test_export_replaces_an_existing_file_only_with_overwrite(model: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "model.pt").write_text("mine")
    (tmp_path / "encoder.json").write_text('{"mine": 1}')
    args = ["export", "--checkpoint", str(model), "--out"]
    assert main([*args, str(tmp_path / "model.pt"), "--format", "torchscript"]) == 2
    one_line_error(capsys, f"--out {tmp_path / 'model.pt'} exists: pass --overwrite to replace it")
    assert main([*args, str(tmp_path / "encoder.safetensors"), "--format", "backbone"]) == 2
    one_line_error(capsys, f"{tmp_path / 'encoder.json'} (the backbone's spec, beside --out) exists: pass --overwrite")
    assert (tmp_path / "model.pt").read_text() == "mine" and (tmp_path / "encoder.json").read_text() == '{"mine": 1}'
    assert not (tmp_path / "encoder.safetensors").exists()  # refused before anything was written
    assert main([*args, str(tmp_path / "model.pt"), "--format", "torchscript", "--overwrite"]) == 0
    assert main([*args, str(tmp_path / "encoder.safetensors"), "--format", "backbone", "--overwrite"]) == 0
    assert torch.jit.load(str(tmp_path / "model.pt")) is not None
    assert '"format": "aepretrain-backbone-1"' in (tmp_path / "encoder.json").read_text()


def test_export_help_names_every_file_it_writes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "backbone: also FILE.json beside it (the spec)" in text and "--overwrite" in text
    assert "A file that exists is refused, unless --overwrite; the checkpoint and its record (PATH.json) always" in text


# 12. the TorchScript model refuses an input it was not trained for, as the ONNX model does


def test_torchscript_refuses_another_size_or_channel_count(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "model.pt"
    assert main(["export", "--checkpoint", str(model), "--format", "torchscript", "--out", str(out)]) == 0
    scripted = torch.jit.load(str(out))
    assert scripted(torch.rand(2, 3, 16, 16))[1].sum(dim=1).allclose(torch.ones(2))  # the trained size: accepted
    for shape in [(2, 3, 32, 32), (2, 3, 17, 17), (2, 1, 16, 16), (3, 16, 16)]:
        got = ", ".join(map(str, shape))
        message = rf"image must be \(N, 3, 16, 16\), the channels and size this model was trained on, got \[{got}\]"
        with pytest.raises(torch.jit.Error, match=message):
            scripted(torch.rand(shape))
    with pytest.raises(torch.jit.Error, match=r"image must be float32"):
        scripted(torch.rand(2, 3, 16, 16, dtype=torch.float64))


# 15. a path the system refuses is one line that names it, shortened when it is long


def read_only_folder(tmp_path: Path) -> Path:
    """A folder this process cannot write in: chmod where that stops it; for root (which chmod does not stop),
    /sys, where not even root may make a file or folder."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):
        folder.rmdir()
        folder = Path("/sys/aepretrain-test")
        try:
            folder.mkdir()
        except OSError:
            return folder
        folder.rmdir()
        pytest.skip("root, and /sys takes new folders: nothing here is read-only for this process")
    return folder


@pytest.mark.parametrize("out, message", [
    ("/", "--out / names a folder: name the file to write, e.g. /model.pt"),
    (".", "--out . names a folder: name the file to write, e.g. model.pt"),
    ("", "--out is empty: name the file to write, e.g. model.pt"),
    ("folder/", "--out folder/ names a folder: name the file to write, e.g. folder/model.pt"),
    ("file/sub/model.pt", "could not write file/sub/model.pt: Not a directory"),
    ("read-only", "could not write READ-ONLY/model.pt: "),
    (f"{LONG}.pt", f"cannot use {'a' * 60}... (303 characters): File name too long"),
])
def test_export_to_an_impossible_out_is_one_line(out: str, message: str, model: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("file").write_text("mine")
    if out == "read-only":
        folder = read_only_folder(tmp_path)
        out, message = f"{folder}/model.pt", message.replace("READ-ONLY", str(folder))
    made = sorted(os.listdir(tmp_path))
    assert main(["export", "--checkpoint", str(model), "--format", "torchscript", "--out", out]) == 2
    one_line_error(capsys, message)
    assert sorted(os.listdir(tmp_path)) == made


def test_export_makes_a_missing_folder(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "missing" / "deeper" / "model.pt"
    assert main(["export", "--checkpoint", str(model), "--format", "torchscript", "--out", str(out)]) == 0
    assert torch.jit.load(str(out)) is not None


@pytest.mark.parametrize("command", ["run", "export", "predict", "evaluate"])
def test_a_name_too_long_is_one_line_with_the_path_shortened(command: str, tmp_path: Path, finished: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    long = tmp_path / LONG
    args = {"run": ["run", "--out", str(long), *tiny()],
            "export": ["export", "--checkpoint", f"{long}.safetensors", "--format", "backbone",
                       "--out", str(tmp_path / "b.safetensors")],
            "predict": ["predict", str(finished / "figures" / "samples.png"), "--checkpoint", f"{long}.safetensors"],
            "evaluate": ["evaluate", "--checkpoint", f"{long}.safetensors", "--preset", "tiny"]}[command]
    given = str(long) if command == "run" else f"{long}.safetensors"
    assert main(args) == 2
    line = one_line_error(capsys, f"cannot use {given[:60]}... ({len(given)} characters): File name too long")
    assert len(line) < 160, line
    assert os.listdir(tmp_path) == []


# 3. --overwrite removes only the files aepretrain wrote, then the folders left empty; never follows a link


def plant(folder: Path, names: list[str]) -> None:
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(f"the user's {name}")


def test_run_overwrite_keeps_the_users_files_in_aepretrains_folders(finished: Path,
                                                                     tmp_path: Path) -> None:
    out, outside = tmp_path / "run", tmp_path / "outside"
    shutil.copytree(finished, out)
    plant(outside, ["samples.png", "metrics.csv"])
    mine = ["notes.txt", "figures/my-plot.png", "checkpoints/my-best.safetensors", "checkpoints/resume/stage1/notes",
            "logs/notes.txt", "logs/stage1/my.txt", "logs/mine/metrics.csv", "logs/mine/events.out.tfevents.1"]
    plant(out, mine)
    os.symlink(outside, out / "logs" / "shared")  # the user's link, not a name aepretrain writes: stays
    plant(out, ["checkpoints/.classifier-scratch.safetensors.123.tmp", "figures/.samples.png.9.tmp"])  # killed writes'
    with run_folder(out, "run", overwrite=True):
        pass
    assert tree(out) == sorted([LOCK, MARKER, "notes.txt", "figures/", "figures/my-plot.png", "checkpoints/",
                                "checkpoints/my-best.safetensors", "checkpoints/resume/", "checkpoints/resume/stage1/",
                                "checkpoints/resume/stage1/notes", "logs/", "logs/notes.txt", "logs/stage1/",
                                "logs/stage1/my.txt", "logs/mine/", "logs/mine/metrics.csv",
                                "logs/mine/events.out.tfevents.1", "logs/shared@"])
    assert all((out / name).read_text() == f"the user's {name}" for name in mine)
    assert sorted(os.listdir(outside)) == ["metrics.csv", "samples.png"]


@pytest.mark.parametrize("link", ["figures", "logs/stage1", "checkpoints/resume"])
def test_run_overwrite_never_follows_a_link(link: str, finished: Path, tmp_path: Path) -> None:
    out, outside = tmp_path / "run", tmp_path / "outside"
    shutil.copytree(finished, out)
    plant(outside, ["samples.png", "metrics.csv", "hparams.yaml", "stage1/last.ckpt", "mine.txt"])
    before = contents(outside)
    shutil.rmtree(out / link)
    os.symlink(outside, out / link)  # a link at a name aepretrain writes: removed as a link, never followed
    with run_folder(out, "run", overwrite=True):
        pass
    assert contents(outside) == before
    assert tree(out) == [LOCK, MARKER]


def test_study_overwrite_keeps_the_users_files_in_cells_and_pretrain(tmp_path: Path) -> None:
    out = tmp_path / "study"
    assert main(["study", "--out", str(out), *tiny("probe.enabled=false", "study.epochs=1", "study.min_steps=1"),
                 "--label-fractions", "1", "--seeds", "1", "--smoke", "--precision", "32"]) == 0
    cells = sorted(p.name for p in (out / "cells").iterdir())
    assert cells == ["f1-greedy-seed0", "f1-scratch-seed0"] and os.listdir(out / "pretrain") == ["greedy-seed0"]
    mine = ["cells/notes.txt", "cells/f1-scratch-seed0/notes.txt", "pretrain/greedy-seed0/logs/stage2/my.txt",
            "figures/mine.png", "mine.csv"]
    plant(out, mine)
    with run_folder(out, "study", resume=True, overwrite=True):
        pass
    assert tree(out) == sorted([LOCK, MARKER, "mine.csv", "figures/", "figures/mine.png", "cells/", "cells/notes.txt",
                                "cells/f1-scratch-seed0/", "cells/f1-scratch-seed0/notes.txt", "pretrain/",
                                "pretrain/greedy-seed0/", "pretrain/greedy-seed0/logs/",
                                "pretrain/greedy-seed0/logs/stage2/", "pretrain/greedy-seed0/logs/stage2/my.txt"])
    assert all((out / name).read_text() == f"the user's {name}" for name in mine)
