"""The label-efficiency study: nested fractions, budgets, paired intervals, resume and overwrite."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from aepretrain.cli import main
from aepretrain.config import resolve
from aepretrain.data import prepare
from aepretrain.label_study import nested_fractions

from .conftest import tiny

TINY = tiny()


def test_label_fractions_are_stratified_and_nested() -> None:
    labels = np.repeat(np.arange(4), 100)
    subsets = nested_fractions(labels, [0.01, 0.1, 0.5, 1.0], seed=3)
    assert np.bincount(labels[subsets[0.1]]).tolist() == [10, 10, 10, 10]
    assert np.bincount(labels[subsets[0.01]]).tolist() == [1, 1, 1, 1]
    assert len(subsets[1.0]) == 400
    for small, large in ((0.01, 0.1), (0.1, 0.5), (0.5, 1.0)):
        assert set(subsets[small]) <= set(subsets[large])
    other = nested_fractions(labels, [0.1], seed=4)
    assert not np.array_equal(other[0.1], subsets[0.1])


def test_study_resumes_without_redoing_finished_cells(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "study"
    args = ["study", "--out", str(out), *TINY, "--label-fractions", "0.25,1", "--seeds", "2",
            "--set", "study.epochs=1", "--set", "study.min_steps=2", "--set", "study.val_limit=null"]
    assert main(args) == 0
    record = json.loads((out / "study.json").read_text())
    assert len(record["cells"]) == 2 * 2 * 2  # fractions x arms x seeds
    train = prepare(resolve("quick", **{"data.dataset": "synthetic", "data.image_size": 16,
                                        "data.synthetic_per_class": 24}).data, 0).train
    expected = {f: len(idx) for f, idx in nested_fractions(train.labels, [0.25, 1.0], 0).items()}
    assert {(c["fraction"], c["labelled"]) for c in record["cells"]} == set(expected.items())
    assert expected[1.0] == len(train)
    assert {r["arm"] for r in record["summary"]} == {"scratch", "greedy"}
    assert all("verdict" in r for r in record["summary"] if r["arm"] == "greedy")
    for name in ("study.csv", "study.md", "study.html", "figures/study.png"):
        assert (out / name).is_file()
    finished = {p: p.stat().st_mtime_ns for p in (out / "cells").rglob("*.safetensors")}
    dropped = record["cells"].pop()  # as if the study had been killed before its last cell
    (out / "study.json").write_text(json.dumps(record))
    dropped_folder = out / "cells" / f"f{dropped['fraction']:g}-{dropped['arm']}-seed{dropped['seed']}"
    shutil.rmtree(dropped_folder)
    assert main(args) == 0
    again = json.loads((out / "study.json").read_text())
    assert len(again["cells"]) == 8
    redone = [c for c in again["cells"] if (c["fraction"], c["arm"], c["seed"]) ==
              (dropped["fraction"], dropped["arm"], dropped["seed"])]
    assert len(redone) == 1 and redone[0]["test_accuracy"] == pytest.approx(dropped["test_accuracy"])
    for path, mtime in finished.items():
        if dropped_folder not in path.parents:
            assert path.stat().st_mtime_ns == mtime, f"{path} was trained again"


def test_verdicts_follow_the_paired_t_interval() -> None:
    from aepretrain.label_study import paired_interval, summarize_cells, t_975, verdict

    assert t_975(1) == 12.706 and t_975(4) == 2.776 and abs(t_975(60) - 2.000) < 0.002
    mean, low, high = paired_interval([0.010, 0.012, 0.008, 0.011, 0.009])
    half = 2.776 * np.std([0.010, 0.012, 0.008, 0.011, 0.009], ddof=1) / np.sqrt(5)
    assert mean == pytest.approx(0.010) and low == pytest.approx(0.010 - half) and high == pytest.approx(0.010 + half)
    assert verdict(low, high, 5) == "helped"
    # three seeds whose mean gain is twice its standard error: the old 2-s.e. rule said "helped"; t(2) says no
    d = [0.002, 0.02, 0.025]
    m, lo, hi = paired_interval(d)
    assert m > 2 * np.std(d, ddof=1) / np.sqrt(3) - 1e-12 and lo < 0 < hi
    assert verdict(lo, hi, 3) == "made no clear difference"
    cells = [{"fraction": 1.0, "arm": arm, "seed": 0, "labelled": 10, "epochs": 3, "steps": 6, "test_accuracy": acc}
             for arm, acc in (("scratch", 0.5), ("greedy", 0.6))]
    row = [r for r in summarize_cells(cells, ["greedy"]) if r["arm"] == "greedy"][0]
    assert row["gain"] == pytest.approx(0.1) and row["gain_low"] is None and row["verdict"].startswith("no verdict")
    assert not any(isinstance(v, float) and np.isnan(v) for v in row.values())


def test_study_budget_counts_the_batches_that_run_and_never_stops_early(tmp_path: Path) -> None:
    """synthetic 4 classes x 24 -> train 87 images; at batch 16 the loader drops the last partial batch: 5 steps
    an epoch, so at least 12 steps takes 3 epochs (ceil planning said 6 an epoch and 2 epochs: 10 steps)."""
    out = tmp_path / "study"
    assert main(["study", "--out", str(out), *TINY, "--label-fractions", "1", "--seeds", "1",
                 "--set", "study.epochs=1", "--set", "study.min_steps=12", "--set", "study.val_limit=null",
                 "--set", "finetune.early_stopping_patience=1"]) == 0
    record = json.loads((out / "study.json").read_text())
    train = prepare(resolve("quick", **{"data.dataset": "synthetic", "data.image_size": 16,
                                        "data.synthetic_per_class": 24}).data, 0).train
    per_epoch = len(train) // 16
    for cell in record["cells"]:
        assert cell["steps"] >= 12 and cell["steps"] == cell["epochs"] * per_epoch, cell
        assert cell["epochs"] == -(-12 // per_epoch)  # the whole budget, early stopping off
    assert "(" + str(record["cells"][0]["steps"]) + ")" in (out / "study.md").read_text()


def test_study_overwrite_starts_clean_and_resume_refuses_other_settings(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "study"
    base = ["study", "--out", str(out), *TINY, "--label-fractions", "1", "--seeds", "1", "--set", "study.epochs=1",
            "--set", "study.min_steps=1", "--set", "study.val_limit=null"]
    assert main(base) == 0
    first = json.loads((out / "study.json").read_text())
    assert main([*base, "--set", "finetune.lr=0.01"]) == 2
    assert "finetune.lr=0.003, not 0.01" in capsys.readouterr().err
    mine = out / "cells" / "notes.txt"  # a file the user put there is no business of --overwrite's; ours go
    mine.write_text("the user's")
    assert main([*base, "--set", "finetune.lr=0.01", "--overwrite"]) == 0
    second = json.loads((out / "study.json").read_text())
    assert second["settings"]["config"]["finetune"]["lr"] == 0.01
    for a, b in zip(first["cells"], second["cells"]):
        assert a["history"] != b["history"], "the overwritten study reused the old cells"
    assert mine.read_text() == "the user's"
