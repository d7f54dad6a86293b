"""Hostile settings, study grids and study checkpoints (issue 19): a crafted settings file ends in one short line at
once; a study refuses a grid that lists a cell twice, counts its step budget per DDP process and records the seed of
its split; `finetune --encoder` takes any greedy stage and checks it before writing; a damaged resume checkpoint is
one whole sentence."""

import json
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from aepretrain.cli import main

from .conftest import tiny
from .test_hostile import folder_data, one_line_error


ONE_BLOCK = "model.blocks=[{channels: [8], kernel: 3}]"  # one greedy stage: a study in seconds


def aepretrain(*args: str, timeout: float = 60) -> tuple[subprocess.CompletedProcess[str], float]:
    """The CLI in a process of its own: its exit code, output and seconds, as a user sees them."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "aepretrain", *args], capture_output=True, text=True, timeout=timeout)
    return done, time.perf_counter() - started


def last_line(done: subprocess.CompletedProcess[str]) -> str:
    lines = done.stderr.splitlines()
    assert lines and "Traceback" not in done.stderr and len(lines) == 1, done.stderr[-2000:]
    return lines[-1]


# 8. a settings file or --set value crafted to take all memory and time


def laughs(depth: int) -> str:
    """A 'billion laughs' settings file: each list holds nine aliases of the one before; a few hundred bytes that
    expand to 9 ** depth items."""
    lists = ["&a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for name, previous in zip("bcdefghijk"[:depth - 1], "abcdefghij"):
        lists.append(f"&{name} [{', '.join([f'*{previous}'] * 9)}]")
    return f"seed: [{', '.join(lists)}]\n"


def test_a_file_of_nested_aliases_ends_in_one_line_at_once(tmp_path: Path) -> None:
    path = tmp_path / "laughs.yaml"
    path.write_text(laughs(9))
    assert len(path.read_bytes()) < 400
    done, seconds = aepretrain("summary", "--config", str(path), timeout=30)  # before: a MemoryError after 47 s
    assert done.returncode == 2 and seconds < 5, (done.returncode, seconds)
    assert last_line(done) == f"aepretrain: error: {path}, line 1: an alias (*a) is not accepted in settings; " \
                              "write the value out"
    done, seconds = aepretrain("summary", "--set", laughs(9).replace(": ", "=", 1).strip(), timeout=30)
    assert done.returncode == 2 and seconds < 5 and "an alias (*a) is not accepted" in last_line(done)


def test_an_oversized_settings_file_is_refused_before_it_is_read(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_text("seed: 1\n# " + "x" * 5_000_000 + "\n")  # before: read and parsed whole, exit 0
    done, seconds = aepretrain("summary", "--config", str(path), timeout=60)
    assert done.returncode == 2 and seconds < 5, (done.returncode, seconds)
    assert last_line(done) == f"aepretrain: error: {path} is larger than 65,536 bytes, more than any settings " \
                              "file holds (a full one is 3 kB)"


@pytest.mark.parametrize("text, message", [
    ("seed: " + "[" * 3000 + "]" * 3000, "line 1: lists or mappings nested more than 16 deep are not settings"),
    ("seed: " + "1" * 5000, "holds a value YAML cannot read: Exceeds the limit (4300 digits) for integer string "
                            "conversion: value has 5000 digits"),
    ("data:\n  root: 2024-13-01\n", "holds a value YAML cannot read: month must be in 1..12"),
])
def test_a_file_python_cannot_read_as_settings_is_one_line(text: str, message: str, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "odd.yaml"
    path.write_text(text)
    assert main(["summary", "--config", str(path)]) == 2  # before: RecursionError, ValueError tracebacks
    assert one_line_error(capsys, message).startswith(f"aepretrain: error: {path}")


@pytest.mark.parametrize("args, start", [
    (["--set", "seed=" + "x" * 10_000], "aepretrain: error: --set seed=" + "x" * 75 + "...: seed must be a whole "
                                        "number, got '" + "x" * 79 + "..."),
    (["--set", "model.init=" + "keras" * 2000], "aepretrain: error: unknown init '" + "keras" * 15 + "kera... for "
                                                "model.init (closest valid: keras)"),
    (["--set", "y" * 5000 + "=1"], "aepretrain: error: unknown setting '" + "y" * 80 + "...' in --set "),
    (["--preset", "p" * 5000], "aepretrain: error: unknown preset '" + "p" * 80 + "...' (closest valid: "),
    (["--set", "seed=" + "1" * 200_000], "aepretrain: error: --set seed=" + "1" * 75 + "...: the value is longer "
                                         "than 65,536 characters"),
])
def test_a_long_bad_value_is_quoted_cut(args: list[str], start: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["summary", *args]) == 2
    line = one_line_error(capsys)
    assert line.startswith(start) and len(line) < 300, line[:400]


def test_a_long_bad_value_in_a_file_is_quoted_cut(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "long.yaml"
    path.write_text("study:\n  label_fractions: [" + ", ".join(["0.5"] * 5000) + ", 2]\nfinetune:\n  arms: "
                    + "x" * 20_000 + "\n")
    assert main(["summary", "--config", str(path)]) == 2
    line = one_line_error(capsys, f"{path}: finetune.arms must be a list, got '" + "x" * 79 + "...")
    assert len(line) < 300


# 10. a study grid that lists a cell twice


@pytest.mark.parametrize("args, message", [
    (["--label-fractions", "0.5,0.5"], "study.label_fractions lists 0.5 more than once (to 6 significant digits); "
                                       "give each once"),
    (["--label-fractions", "0.5,.5,1"], "study.label_fractions lists 0.5 more than once"),
    (["--set", "study.label_fractions=[0.1234567, 0.1234568]"], "lists 0.123457 more than once (to 6 significant "
                                                                "digits)"),
    (["--label-fractions", "1", "--objectives", "greedy,end-to-end,greedy"],
     "study.objectives lists greedy more than once; give each once"),
])
def test_a_study_refuses_a_cell_listed_twice_before_writing(args: list[str], message: str, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    out, absent = tmp_path / "study", tmp_path / "no-data"  # refused before the data is looked for
    assert main(["study", "--out", str(out), "--preset", "tiny", "--quiet", "--dataset", "folder", "--root",
                 str(absent), *args]) == 2  # before: with data, exit 0 and every cell twice in study.csv
    one_line_error(capsys, message)
    assert not out.exists()


# 13. `evaluate` on a study cell's checkpoint tests on the study's test images


def test_evaluate_tests_a_study_cell_on_the_studys_test_images(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    from aepretrain.checkpoints import load_classifier
    from aepretrain.config import resolve
    from aepretrain.data import prepare
    from aepretrain.label_study import nested_fractions

    data = folder_data(tmp_path / "data", ("cat", "dog", "owl"), per_class=20)  # no official test split
    data_flags = ["--dataset", "folder", "--root", str(data), "--image-size", "16"]
    out = tmp_path / "study"
    assert main(["study", "--out", str(out), *tiny("study.epochs=1", "study.min_steps=0", "pretrain.epochs=1",
                                                   ONE_BLOCK), *data_flags, "--label-fractions", "0.5", "--seeds", "2",
                 "--seed", "0"]) == 0
    cell = next(c for c in json.loads((out / "study.json").read_text())["cells"]
                if (c["seed"], c["arm"]) == (1, "scratch"))
    checkpoint = out / "cells" / "f0.5-scratch-seed1" / "checkpoints" / "classifier-scratch.safetensors"
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(checkpoint), *data_flags, "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["test_loss"] == pytest.approx(cell["test_loss"], rel=1e-5)  # before: 1.09936 against 1.09914
    assert scores["test_accuracy"] == pytest.approx(cell["test_accuracy"])

    from aepretrain.pipeline import evaluation_data  # the test images `evaluate` took, by name

    cfg = resolve("tiny", overrides=[ONE_BLOCK], **{"data.dataset": "folder", "data.root": str(data)})
    studied = prepare(cfg.data, 0)  # the split of the study's seed, which every cell shares
    cell_train = studied.train.take(nested_fractions(studied.train.labels, [0.5], 1)[0.5]).names
    tested = evaluation_data(cfg, load_classifier(checkpoint)[1], checkpoint).test.names
    assert sorted(tested) == sorted(studied.test.names) and len(tested) == 12
    assert not set(tested) & set(cell_train) and len(cell_train) == cell["labelled"] == 21


# 14. the study's step budget under DDP counts the batches of one process


def test_a_cells_epochs_count_the_batches_of_each_process() -> None:
    from aepretrain.config import resolve
    from aepretrain.errors import UserError
    from aepretrain.label_study import cell_epochs

    cfg = resolve("tiny", overrides=["study.epochs=1", "study.min_steps=10", "finetune.batch_size=16"])
    # 86 images: 5 batches of 16 in one process; 43 in each of two, 2 batches each, so 5 epochs make 10 steps
    assert [cell_epochs(cfg, 1.0, 86, processes) for processes in (1, 2)] == [2, 5]
    assert [cell_epochs(cfg, 1.0, 16, processes) for processes in (1, 2)] == [10, 10]  # one batch, all images
    assert cell_epochs(cfg, 0.5, 24, 1) == 10
    with pytest.raises(UserError) as refused:  # 12 images in each process, fewer than a batch: no step at all
        cell_epochs(cfg, 0.25, 24, 2)
    assert str(refused.value) == "study.label_fractions 0.25 gives 24 labelled images, 12 in each of 2 processes: " \
                                 "not one batch of finetune.batch_size 16; take a larger fraction, a smaller batch " \
                                 "or fewer devices"


def test_a_fraction_no_process_can_train_on_is_refused_before_writing(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "study"  # ddp_spawn: were it not refused, a launch from here would not start pytest again
    assert main(["study", "--out", str(out), *tiny("study.epochs=1", "study.min_steps=0", "pretrain.epochs=1"),
                 "--label-fractions", "0.25,1", "--seeds", "1", "--devices", "2", "--strategy", "ddp_spawn",
                 "--device", "cpu"]) == 2  # before: exit 0, the 0.25 cells trained no step
    one_line_error(capsys, "study.label_fractions 0.25 gives 24 labelled images, 12 in each of 2 processes: ")
    assert not out.exists()


def test_a_study_under_ddp_makes_min_steps_in_each_process(tmp_path: Path) -> None:
    out = tmp_path / "study"
    done, _ = aepretrain("study", "--out", str(out), *tiny("study.epochs=1", "study.min_steps=10", "pretrain.epochs=1",
                                                          ONE_BLOCK), "--label-fractions", "1", "--seeds", "1",
                         "--devices", "2", "--strategy", "ddp", "--device", "cpu", timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    cells = json.loads((out / "study.json").read_text())["cells"]
    # 88 labelled images: 44 in each process, 2 batches of 16; before: 2 epochs, 4 steps in each process
    assert [(c["arm"], c["labelled"], c["epochs"], c["steps"]) for c in cells] == [("scratch", 88, 5, 10),
                                                                                   ("greedy", 88, 5, 10)]


# 15 and 16. `finetune --encoder` takes any greedy stage and checks it before writing; outputs that are files


def stage_file(path: Path, stage: int, channels: int = 3) -> Path:
    """A greedy stage's checkpoint as `pretrain` writes it (untrained weights: only their place matters here)."""
    from aepretrain.checkpoints import save_model
    from aepretrain.config import resolve
    from aepretrain.models import Autoencoder, build_encoder

    cfg = resolve("tiny")
    torch.manual_seed(100 + stage)
    autoencoder = Autoencoder(build_encoder(cfg.model, channels, for_classifier=False), stage)
    return save_model(autoencoder, path, "autoencoder", cfg, channels, {"stage": stage})


def classifier_file(path: Path) -> Path:
    from aepretrain.checkpoints import save_model
    from aepretrain.config import resolve
    from aepretrain.models import Classifier, build_encoder

    cfg = resolve("tiny")
    classifier = Classifier(build_encoder(cfg.model, 3, True), 4, 0.0)
    return save_model(classifier, path, "classifier", cfg, 3, {"classes": [f"pattern{k}" for k in range(4)]})


def test_finetune_starts_from_any_greedy_stage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from aepretrain.checkpoints import load_stage_encoder
    from aepretrain.config import resolve
    from aepretrain.data import prepare
    from aepretrain.finetune import new_classifier

    cfg = resolve("tiny")
    bundle = prepare(cfg.data, cfg.seed)
    scratch = new_classifier(cfg, bundle, None).state_dict()
    for stage in (1, 2):
        encoder = load_stage_encoder(stage_file(tmp_path / f"stage{stage}.safetensors", stage))[0]
        assert len(encoder.blocks) == stage  # before: all 3 blocks, the deeper ones on the meta device
        started = new_classifier(cfg, bundle, encoder).state_dict()
        pretrained = {f"encoder.{name}": tensor for name, tensor in encoder.state_dict().items()}
        for name, tensor in started.items():  # blocks 1..k pre-trained, the rest and the head as the scratch arm's
            assert torch.equal(tensor, pretrained[name] if name in pretrained else scratch[name]), name
        assert not torch.equal(started["encoder.blocks.0.conv1.weight"], scratch["encoder.blocks.0.conv1.weight"])
    out = tmp_path / "run"
    assert main(["finetune", "--init", "pretrained", "--encoder", str(tmp_path / "stage1.safetensors"), "--out",
                 str(out), *tiny(), "--smoke"]) == 0  # before: a meta-tensor copy error, exit 1
    assert "pretrained (blocks 1 to 1 pre-trained): best val accuracy" in capsys.readouterr().out
    assert json.loads((out / "metrics.json").read_text())["finetune"]["pretrained"]["pretrained_blocks"] == 1


@pytest.mark.parametrize("encoder, message", [
    ("notes.txt", "notes.txt is not an aepretrain checkpoint (safetensors): "),
    ("classifier.safetensors", "classifier.safetensors holds a classifier checkpoint; a pre-trained encoder "
                               "(autoencoder or contrastive) is needed here"),
    ("gray.safetensors", "gray.safetensors does not fit this model: layer 'blocks.0.conv1.weight' has shape "
                         "(16, 1, 5, 5) in the checkpoint, (16, 3, 5, 5) here"),
])
def test_finetune_refuses_a_wrong_encoder_before_writing(encoder: str, message: str, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes.txt").write_text("not weights")
    classifier_file(tmp_path / "classifier.safetensors")
    stage_file(tmp_path / "gray.safetensors", 2, channels=1)
    out = tmp_path / "run"
    assert main(["finetune", "--init", "pretrained", "--encoder", str(tmp_path / encoder), "--out", str(out),
                 *tiny("finetune.epochs=1")]) == 2
    one_line_error(capsys, message)
    # before: config.yaml, data.json and figures/ written first. The channels are known from the data only: that
    # check runs as the folder is settled, and a start that fails there removes the folder it made
    assert not out.exists()


def test_evaluate_and_data_refuse_an_out_that_is_a_file_before_the_work(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint = classifier_file(tmp_path / "classifier.safetensors")
    mine = tmp_path / "mine.txt"
    mine.write_text("mine")
    for out, message in ((mine, f"--out {mine} is a file, not a folder"),
                         (mine / "figures", f"--out {mine / 'figures'} cannot be a folder: {mine} is a file")):
        assert main(["evaluate", "--checkpoint", str(checkpoint), "--preset", "tiny", "--out", str(out)]) == 2
        one_line_error(capsys, message)  # before: a FileExistsError traceback once the test set was scored
        assert main(["data", "--preset", "tiny", "--out", str(out)]) == 2
        one_line_error(capsys, message)  # before: the same, once the data was prepared
    assert mine.read_text() == "mine"


# 16. a damaged resume checkpoint: one whole sentence, no Lightning warnings first


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder whose scratch arm has an epoch checkpoint but did not finish."""
    out = tmp_path_factory.mktemp("interrupted") / "run"
    assert main(["finetune", "--init", "scratch", "--out", str(out), *tiny(), "--smoke"]) == 0
    for finished in ("classifier-scratch.safetensors", "classifier-scratch.json"):
        (out / "checkpoints" / finished).unlink()
    return out


def damage(checkpoint: dict, how: str) -> object:
    if how == "lacking":
        return {"epoch": 0, "state_dict": checkpoint["state_dict"]}
    if how == "weights":
        return checkpoint | {"state_dict": checkpoint["state_dict"] | {"model.dense.weight": torch.zeros(3, 3)}}
    if how == "epoch":
        return checkpoint | {"epoch": "x"}
    if how == "optimizer":
        optimizer = checkpoint["optimizer_states"][0]
        optimizer["state"][0]["exp_avg"] = torch.zeros(2, 2)
        return checkpoint
    return [1, 2, 3]


def resume_interrupted(out: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Continue the scratch arm in ``out``: the exit code and the error line, with no warning of Lightning's."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main(["finetune", "--init", "scratch", "--out", str(out), "--resume"])
    assert not [w for w in caught if "lightning" in w.filename], [str(w.message) for w in caught]
    return code, one_line_error(capsys) if code else ""


@pytest.mark.parametrize("how, problem", [
    ("lacking", "it lacks 'pytorch-lightning_version'"),
    ("weights", "its layer 'model.dense.weight' has shape (3, 3), (4, 64) here"),
    ("optimizer", "its optimizer's 'exp_avg' of parameter 0 has shape (2, 2), (16, 3, 5, 5) here"),
    ("a list", "it lacks 'pytorch-lightning_version'"),
    ("epoch", "its epoch 'x' is not a count"),  # before: a ValueError traceback
])
def test_a_damaged_resume_checkpoint_is_one_whole_sentence(how: str, problem: str, interrupted: Path,
                                                           tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    shutil.copytree(interrupted, out)
    last = out / "checkpoints" / "resume" / "scratch" / "last.ckpt"
    torch.save(damage(torch.load(last, weights_only=True), how), last)
    assert resume_interrupted(out, capsys) == (2, f"aepretrain: error: cannot resume scratch from {last}: {problem}; "
                                                  "remove it to train scratch again from its first epoch\n")
    # before: KeyError and RuntimeError tracebacks after two of Lightning's warnings


def test_an_unreadable_resume_checkpoint_is_one_whole_sentence(interrupted: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    shutil.copytree(interrupted, out)
    last = out / "checkpoints" / "resume" / "scratch" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])
    assert resume_interrupted(out, capsys) == (
        2, f"aepretrain: error: cannot load checkpoint {last} safely: it is cut or is no PyTorch checkpoint "
           "(PytorchStreamReader failed reading zip archive: failed finding central directory); remove it to train "
           "scratch again from its first epoch\n")  # before: two warnings, then the message cut at 200 characters
    last.unlink()  # as the line says: the arm is trained again from its first epoch
    assert main(["finetune", "--init", "scratch", "--out", str(out), "--resume"]) == 0
    assert (out / "checkpoints" / "classifier-scratch.safetensors").is_file()
