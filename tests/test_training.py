"""One shape for every fit: the schedule, the record, restore-or-fit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from aepretrain.callbacks import History
from aepretrain.config import resolve
from aepretrain.data import prepare
from aepretrain.data.loading import loader
from aepretrain.finetune import classifier_module, new_classifier
from aepretrain.models import Classifier
from aepretrain.training import Fit, Record, _metric_rows, fit_or_restore, scheduler


def test_schedules_span_exactly_the_steps_they_are_given() -> None:
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    sched = scheduler(optimizer, "one-cycle", 0.1, 7)["scheduler"]
    rates = []
    for _ in range(7):
        optimizer.step()
        sched.step()
        rates.append(optimizer.param_groups[0]["lr"])
    assert sched.total_steps == 7
    with pytest.raises(ValueError):  # one step more than planned is an error in OneCycleLR
        optimizer.step()
        sched.step()
    cosine = scheduler(torch.optim.SGD(model.parameters(), lr=1.0), "cosine", 1.0, 10)["scheduler"]
    assert cosine.T_max == 10
    assert scheduler(optimizer, "constant", 0.1, 10) is None


def test_a_record_reads_back_as_it_was_written() -> None:
    record = Record("pretrained", [{"epoch": 1, "val_acc": 0.5}], 3.5, 1, {"best_val_accuracy": 0.5, "best_epoch": 1})
    values = record.as_json()
    assert set(values) == {"history", "seconds", "resumed_from", "best_val_accuracy", "best_epoch"}
    assert Record.from_json("pretrained", json.loads(json.dumps(values))) == record


def test_fit_or_restore_trains_once_then_restores_the_finished_weights_and_record(tmp_path: Path) -> None:
    cfg = resolve("tiny", overrides=["finetune.epochs=1"])
    bundle = prepare(cfg.data, cfg.seed)
    data = (loader(bundle.train, 16, True, cfg.seed, drop_last=True), loader(bundle.val, 16, False, cfg.seed))
    finished = []

    def fit(classifier: Classifier, resume: bool) -> Record:
        def finish(history: History) -> tuple[dict, dict]:
            finished.append(len(history.epochs))
            return {"best_val_accuracy": 0.0, "best_epoch": 1}, {"classes": bundle.classes, "arm": "scratch"}

        spec = Fit(tmp_path / "checkpoints" / "c.safetensors", "classifier", data, 1, ("best_val_accuracy", "best_epoch"))
        return fit_or_restore(classifier_module(classifier, cfg, "scratch"), spec, cfg, tmp_path, 3, resume, finish)

    trained_model = new_classifier(cfg, bundle, None)
    trained = fit(trained_model, resume=False)
    assert finished == [1] and [row["epoch"] for row in trained.history] == [1]
    restored_model = new_classifier(cfg, bundle, None)  # the untrained start again
    restored = fit(restored_model, resume=True)
    assert finished == [1], "a finished fit was trained again"
    assert restored == trained
    assert all(torch.equal(a, b) for a, b in zip(trained_model.state_dict().values(),
                                                 restored_model.state_dict().values()))


@pytest.mark.parametrize("damage", [b"epoch,step\n0," + b"9" * 200_000 + b"\n", b"epoch,step\n\xff\xfe,1\n"])
def test_a_damaged_csv_log_starts_afresh_on_resume_in_one_warning(damage: bytes, tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """A field longer than the csv module reads, bytes that are not UTF-8: before, a traceback on resume."""
    log = tmp_path / "metrics.csv"
    log.write_bytes(damage)
    assert _metric_rows(log, 0) == ([], [])
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and said[0].startswith(f"aepretrain: {log} is damaged (") and \
        said[0].endswith("): the resumed fit's log starts afresh"), said


def test_a_resumed_csv_log_keeps_the_rows_of_the_finished_epochs(tmp_path: Path) -> None:
    log = tmp_path / "metrics.csv"
    log.write_text("epoch,step,val_loss\n0,4,0.5\n1,9,0.4\n2,14,0.3\n3,1")  # the last row cut short by a kill
    assert _metric_rows(log, 1) == (["epoch", "step", "val_loss"], [
        {"epoch": "0", "step": "4", "val_loss": "0.5"}, {"epoch": "1", "step": "9", "val_loss": "0.4"}])
    assert _metric_rows(log, None) == ([], [])  # a fit not resumed starts its log afresh
