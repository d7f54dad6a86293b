"""Experiment trackers (issue 21, item 6): `--logger csv,tensorboard,mlflow,wandb`. A real MLflow (its local SQLite
store in the run folder) and a real W&B in offline mode; each stage and arm's per-epoch metrics are read back with the
trackers' own readers and compared with metrics.json by value. A tracker that is unknown or not installed is one line
before anything is written."""

import importlib.util
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aepretrain.cli import main
from aepretrain.config import resolve
from aepretrain.errors import UserError
from aepretrain.pipeline import run

from .conftest import tiny
from .test_hostile import one_line_error

TRACKED = [*tiny("pretrain.epochs=2", "finetune.epochs=2", "probe.enabled=false"), "--precision", "32"]
FITS = ["pretrained", "scratch", "stage1", "stage2", "stage3"]
INSTALLED = [name for name in ("mlflow", "wandb") if importlib.util.find_spec(name) is not None]


def absent(name: str) -> str:
    return f"{name} is not installed: pip install 'aepretrain[{name}]'"


class Listener:
    """A local port that counts the connections made to it: W&B's server address points here, so that any
    network use in offline mode shows."""

    def __init__(self) -> None:
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        self.connections = 0
        threading.Thread(target=self._count, daemon=True).start()

    def _count(self) -> None:
        while True:
            try:
                connection, _ = self.socket.accept()
            except OSError:
                return
            self.connections += 1
            connection.close()


@pytest.fixture(scope="module")
def tracked(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess, Listener]:
    """One `run` into CSV and every installed tracker, in a process of its own (W&B's service lives as long as the
    process), with W&B's own folders and server address private to the test."""
    if not INSTALLED:
        pytest.skip(f"{absent('mlflow')}; {absent('wandb')}")
    tmp = tmp_path_factory.mktemp("tracked")
    listener = Listener()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "MLFLOW_"))}
    env |= {"WANDB_BASE_URL": listener.url, **{f"WANDB_{kind}_DIR": str(tmp / kind) for kind in ("CONFIG", "CACHE",
                                                                                                  "DATA")}}
    out = tmp / "run"
    proc = subprocess.run([sys.executable, "-m", "aepretrain", "run", "--out", str(out), *TRACKED, "--logger",
                           ",".join(["csv", *INSTALLED])], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return out, proc, listener


def histories(out: Path) -> dict[str, list[dict[str, float]]]:
    """Every stage's and arm's per-epoch history in metrics.json."""
    metrics = json.loads((out / "metrics.json").read_text())
    return {f"stage{stage['stage']}": stage["history"] for stage in metrics["pretrain"]["stages"]} | \
        {arm: record["history"] for arm, record in metrics["finetune"].items()}


def keys(fit: str) -> list[str]:
    return ["train_loss", "val_loss", *(["val_acc"] if fit in ("pretrained", "scratch") else [])]


def test_mlflow_store_holds_every_epoch_of_every_stage_and_arm(tracked: tuple[Path, Any, Listener]) -> None:
    pytest.importorskip("mlflow", reason=absent("mlflow"))
    from mlflow.tracking import MlflowClient

    out = tracked[0]
    client = MlflowClient(f"sqlite:///{out / 'logs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("run")  # the run folder's name
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert sorted(runs) == FITS
    for fit, history in histories(out).items():
        assert len(history) == 2, fit
        tracker_run = runs[fit]
        assert tracker_run.info.status == "FINISHED"
        assert {k: v for k, v in tracker_run.data.tags.items() if k.startswith("aepretrain.")} == \
            {"aepretrain.folder": str(out.resolve()), "aepretrain.fit": fit, "aepretrain.preset": "tiny"}
        params = tracker_run.data.params
        assert (params["pretrain.epochs"], params["finetune.lr"], params["seed"]) == ("2", "0.003", "0")
        assert params["trainer.loggers"] == str(["csv", *INSTALLED])
        for key in keys(fit):
            logged = sorted(client.get_metric_history(tracker_run.info.run_id, key), key=lambda m: m.step)
            assert [m.value for m in logged] == [row[key] for row in history], (fit, key)
    assert (out / "logs" / "stage1" / "metrics.csv").is_file()
    assert not list(out.rglob("events.out.tfevents.*")), "TensorBoard wrote though --logger left it out"


BLOCK, FULL, LAST = 32768, 1, 4  # LevelDB's log format, which W&B's run files use


def wandb_records(path: Path) -> Iterator[Any]:
    """The records of a W&B run file, as W&B's own protobuf messages: after W&B's 7-byte header, 32 KiB blocks of
    chunks, each with a 7-byte header (checksum, length, whether it starts, continues or ends a record)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    position, pending = 7, b""
    while position + 7 <= len(data):
        left = BLOCK - position % BLOCK
        if left < 7:  # a block's tail too short for a header is padding
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_run(path: Path) -> tuple[str, dict[str, Any], dict[str, list[Any]]]:
    """A W&B run file's run name, config, and every metric's logged values in order."""
    name, config, logged = "", {}, {}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            name = record.run.display_name
            config |= {item.key: json.loads(item.value_json) for item in record.run.config.update}
        elif kind == "config":
            config |= {item.key: json.loads(item.value_json) for item in record.config.update}
        elif kind == "history":
            for item in record.history.item:
                logged.setdefault(item.key or "/".join(item.nested_key), []).append(json.loads(item.value_json))
    return name, config, logged


def test_wandb_offline_runs_hold_every_epoch_of_every_stage_and_arm_without_network(
        tracked: tuple[Path, subprocess.CompletedProcess, Listener]) -> None:
    pytest.importorskip("wandb", reason=absent("wandb"))
    out, proc, listener = tracked
    folders = sorted((out / "logs" / "wandb").glob("offline-run-*"))
    runs = {}
    for folder in folders:
        (path,) = folder.glob("run-*.wandb")
        name, config, logged = wandb_run(path)
        assert (config["aepretrain.folder"], config["aepretrain.fit"], config["pretrain.epochs"]) == \
            (str(out.resolve()), name, 2), path
        runs[name] = logged
    assert sorted(runs) == FITS
    for fit, history in histories(out).items():
        for key in keys(fit):
            assert runs[fit][key] == [row[key] for row in history], (fit, key)
    assert listener.connections == 0, "W&B used the network in offline mode"
    assert "wandb:" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_a_resumed_stage_continues_its_mlflow_run_in_the_store_mlflow_tracking_uri_names(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("mlflow", reason=absent("mlflow"))
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "aepretrain", "pretrain", "--out", str(out),
                             *tiny("pretrain.epochs=3"), "--precision", "32", "--logger", "mlflow"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    checkpoint = out / "checkpoints" / "resume" / "stage2" / "last.ckpt"
    deadline = time.time() + 300
    while not checkpoint.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert checkpoint.is_file(), proc.stderr.read().decode()
    assert not (out / "checkpoints" / "pretrain-stage2.safetensors").exists(), "killed too late: stage 2 finished"

    assert main(["pretrain", "--out", str(out), "--resume"]) == 0
    assert not (out / "logs" / "mlflow.db").exists()
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("run").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["stage1", "stage2", "stage3"]  # stage 2 continued: no second run
    assert {r.info.status for r in runs} == {"FINISHED"}
    stages = json.loads((out / "metrics.json").read_text())["pretrain"]["stages"]
    assert stages[1]["resumed_from"] >= 1
    for stage, tracker_run in zip(stages, sorted(runs, key=lambda r: r.info.run_name)):
        for key in keys("stage"):
            logged = client.get_metric_history(tracker_run.info.run_id, key)
            by_step = dict(sorted((m.step, m.value) for m in logged))  # an epoch the kill cut is logged again
            assert list(by_step.values()) == [row[key] for row in stage["history"]], (tracker_run.info.run_name, key)


def test_an_unknown_or_repeated_logger_or_a_bad_project_is_one_line_before_anything_is_written(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(["run", "--out", str(out), *TRACKED, "--logger", "csv,mlfow"]) == 2
    assert one_line_error(capsys) == "aepretrain: error: unknown logger 'mlfow' for trainer.loggers[1] (closest " \
        "valid: mlflow); choose one of csv, tensorboard, mlflow, wandb\n"
    assert main(["study", "--out", str(out), *TRACKED, "--logger", "csv,csv"]) == 2
    assert one_line_error(capsys) == "aepretrain: error: trainer.loggers lists csv more than once; give each once\n"
    assert main(["pretrain", "--out", str(out), *TRACKED, "--logger", "wandb", "--set", "trainer.experiment=a:b"]) == 2
    assert one_line_error(capsys) == "aepretrain: error: trainer.experiment 'a:b' cannot name a W&B project: at most " \
        "128 characters, none of / \\ # ? % :\n"
    assert not out.exists()


@pytest.mark.parametrize("tracker", ["mlflow", "wandb"])
def test_a_tracker_not_installed_is_one_line_before_anything_is_written(
        tracker: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Python's import system takes a None in sys.modules as "not installed": `import mlflow` fails."""
    monkeypatch.setitem(sys.modules, tracker, None)
    out = tmp_path / "run"
    for command in ("run", "pretrain", "study"):
        assert main([command, "--out", str(out), *TRACKED, "--logger", f"csv,{tracker}"]) == 2
        assert one_line_error(capsys) == f"aepretrain: error: trainer.loggers names {tracker}, which is not " \
            f"installed: pip install 'aepretrain[{tracker}]'\n"
    with pytest.raises(UserError, match=rf"names {tracker}, which is not installed"):
        run(resolve("tiny", overrides=[f"trainer.loggers=[{tracker}]"]), out)
    assert not out.exists()


def test_a_study_is_one_experiment_with_a_tracker_run_per_stage_and_cell(tmp_path: Path) -> None:
    pytest.importorskip("mlflow", reason=absent("mlflow"))
    from mlflow.tracking import MlflowClient

    out = tmp_path / "study"
    assert main(["study", "--out", str(out), *TRACKED, "--smoke", "--seeds", "1", "--label-fractions", "1",
                 "--logger", "mlflow"]) == 0
    assert [p.relative_to(out).as_posix() for p in out.rglob("mlflow.db")] == ["logs/mlflow.db"]
    client = MlflowClient(f"sqlite:///{out / 'logs' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("study").experiment_id])
    assert sorted((r.info.run_name, r.data.tags["aepretrain.fit"]) for r in runs) == [
        ("f1-greedy-seed0/pretrained", "cells/f1-greedy-seed0/pretrained"),
        ("f1-scratch-seed0/scratch", "cells/f1-scratch-seed0/scratch"),
        *((f"greedy-seed0/stage{k}", f"pretrain/greedy-seed0/stage{k}") for k in (1, 2, 3))]
    cells = {f"f1-{c['arm']}-seed0": c["history"] for c in json.loads((out / "study.json").read_text())["cells"]}
    for r in runs:
        folder = r.info.run_name.split("/")[0]
        if folder in cells:
            logged = client.get_metric_history(r.info.run_id, "val_acc")
            assert [m.value for m in logged] == [row["val_acc"] for row in cells[folder]], r.info.run_name
