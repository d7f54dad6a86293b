"""The study as an experiment (issue 20): every cell states its unlabelled:labelled ratio; objectives pre-train on
the same images for the same image-passes; steps to the target are compared with a paired interval; a cell that
trains a few batches an epoch validates on a schedule."""

import json
from pathlib import Path

import pytest

from aepretrain.cli import main
from aepretrain.config import resolve
from aepretrain.data import prepare
from aepretrain.label_study import paired_interval, summarize_cells, val_every

from .conftest import tiny


def test_objectives_share_images_and_image_passes_and_cells_state_their_ratio(tmp_path: Path) -> None:
    out = tmp_path / "study"
    assert main(["study", "--out", str(out), *tiny(), "--label-fractions", "0.25,1", "--seeds", "1",
                 "--objectives", "greedy,end-to-end,simclr", "--set", "study.epochs=1", "--set", "study.min_steps=1",
                 "--set", "study.val_limit=null", "--set", "pretrain.epochs=2"]) == 0
    record = json.loads((out / "study.json").read_text())
    costs = {p["objective"]: p for p in record["pretraining"]}
    assert set(costs) == {"greedy", "end-to-end", "simclr"}
    greedy = costs["greedy"]
    for whole in (costs["end-to-end"], costs["simclr"]):
        assert greedy["images"] == whole["images"] > 0
        assert greedy["epochs"] == 3 * 2 and whole["epochs"] == 3 * 2  # 3 stages x 2 epochs; one stage x 6 epochs
        assert greedy["image_passes"] == whole["image_passes"] > 0
        assert greedy["seconds"] > 0 and whole["seconds"] > 0
    for cell in record["cells"]:
        assert cell["pretrain_images"] == greedy["images"]
        assert cell["ratio"] == pytest.approx(greedy["images"] / cell["labelled"])
        assert cell["labelled_per_class"] == pytest.approx(cell["labelled"] / 4)
    rows = [r for r in record["summary"] if r["arm"] != "scratch"]
    assert {r["pretrain_seconds"] for r in rows if r["arm"] == "greedy"} == {greedy["seconds"]}
    assert all(r["ratio"] == pytest.approx(greedy["images"] / r["labelled"]) for r in rows)
    md = (out / "study.md").read_text()
    assert "### Verdicts" in md and "unlabelled : labelled" in md and (out / "figures" / "study-gain.png").is_file()
    header = next(line for line in md.splitlines() if line.startswith("| labelled per class"))
    verdict_rows = [line for line in md.splitlines() if line.count("|") == header.count("|") and " : 1 |" in line]
    assert len(verdict_rows) == 2 * 3  # fractions x objectives
    with open(out / "study.csv") as f:
        assert "ratio" in f.readline().split(",")


def test_a_cell_of_few_batches_validates_on_a_schedule_and_records_only_real_validations(tmp_path: Path) -> None:
    """A quarter of the training images at batch 16 is two steps an epoch, against about three times as many
    validation images: validation every k epochs (k from val_every), the budget (12 steps) rounded up to a multiple
    of k so that the last epoch is validated too."""
    out = tmp_path / "study"
    settings = tiny("data.synthetic_per_class=60", "data.val_fraction=0.5")
    assert main(["study", "--out", str(out), *settings, "--label-fractions", "0.25", "--seeds", "1",
                 "--set", "study.epochs=1", "--set", "study.min_steps=12", "--set", "study.val_limit=null"]) == 0
    record = json.loads((out / "study.json").read_text())
    val_images = len(prepare(resolve("tiny", overrides=settings[4::2]).data, 0).val)
    for cell in record["cells"]:
        every = cell["val_every"]
        per_epoch = cell["steps"] // cell["epochs"]
        assert every == val_every(per_epoch * 16, val_images) > 1
        assert cell["epochs"] == -(-(-(-12 // per_epoch)) // every) * every
        validated = [row["epoch"] for row in cell["history"] if "val_acc" in row]
        assert validated == list(range(every, cell["epochs"] + 1, every)) and validated[-1] == cell["epochs"]
        assert all("val_seconds" in row for row in cell["history"] if "val_acc" in row)
        assert not any("val_seconds" in row or "val_loss" in row for row in cell["history"] if "val_acc" not in row)
        assert 0 < cell["val_share"] < 1
        assert cell["epochs_to_target"] in validated


def test_val_every_keeps_validation_near_a_fifth_of_the_time() -> None:
    assert val_every(27000, 1000) == 1 and val_every(128 * 2, 1000) == 6
    for train, val in ((256, 1000), (512, 5000), (64, 100)):
        k = val_every(train, val)
        share = val / (3 * train * k + val)  # the cost model: a training image costs 3 inference passes
        assert share <= 0.2 + 1e-9 and (k == 1 or val / (3 * train * (k - 1) + val) > 0.2)


def test_steps_to_target_are_paired_over_the_seeds_where_both_arms_reached_it() -> None:
    def cell(arm: str, seed: int, acc: float, steps: int | None) -> dict:
        return {"fraction": 0.1, "arm": arm, "seed": seed, "labelled": 40, "labelled_per_class": 10.0, "ratio": 5.0,
                "epochs": 10, "steps": 20, "test_accuracy": acc, "steps_to_target": steps,
                "epochs_to_target": None if steps is None else steps // 2}
    cells = [cell("scratch", 0, 0.5, 10), cell("greedy", 0, 0.6, 6), cell("scratch", 1, 0.5, 12),
             cell("greedy", 1, 0.55, 10), cell("scratch", 2, 0.4, 8), cell("greedy", 2, 0.45, None)]
    pretraining = [{"seed": s, "objective": "greedy", "seconds": 10.0 + s} for s in range(3)]
    row = next(r for r in summarize_cells(cells, ["greedy"], pretraining) if r["arm"] == "greedy")
    mean, low, high = paired_interval([6 - 10, 10 - 12])  # seed 2 never reached the target: left out
    assert row["reached"] == 2 and row["steps_difference"] == mean == -3
    assert (row["steps_low"], row["steps_high"]) == (low, high) and low < -3 < high
    assert row["epochs_difference"] == pytest.approx(((3 - 5) + (5 - 6)) / 2)
    assert row["pretrain_seconds"] == pytest.approx(11.0)
    assert row["ratio"] == 5.0 and row["labelled_per_class"] == 10.0


def test_a_study_grows_by_seeds_and_objectives_without_training_a_finished_cell_again(tmp_path: Path) -> None:
    """The grid's axes may change on resume: new cells run, finished ones are kept as they are, and the summary
    and study.csv hold the cells of the grid asked for now."""
    out = tmp_path / "study"
    base = ["study", "--out", str(out), *tiny(), "--label-fractions", "1", "--set", "study.epochs=1",
            "--set", "study.min_steps=1", "--set", "study.val_limit=null"]
    assert main([*base, "--seeds", "1"]) == 0
    first = json.loads((out / "study.json").read_text())
    kept = {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}
    assert main([*base, "--seeds", "2", "--objectives", "greedy,end-to-end"]) == 0
    grown = json.loads((out / "study.json").read_text())
    assert {(c["arm"], c["seed"]) for c in grown["cells"]} == {
        (arm, seed) for arm in ("scratch", "greedy", "end-to-end") for seed in (0, 1)}
    assert grown["cells"][:2] == first["cells"][:2]
    assert all(path.stat().st_mtime_ns == mtime for path, mtime in kept.items())
    assert {r["arm"]: r["seeds"] for r in grown["summary"]} == {"scratch": 2, "greedy": 2, "end-to-end": 2}
    assert main([*base, "--seeds", "1"]) == 0  # the smaller grid again: nothing trains, its own cells reported
    again = json.loads((out / "study.json").read_text())
    assert len(again["cells"]) == 6 and again["settings"]["seeds"] == 1
    assert {r["arm"]: r["seeds"] for r in again["summary"]} == {"scratch": 1, "greedy": 1}
    with open(out / "study.csv") as f:
        assert len(f.readlines()) == 1 + 2
