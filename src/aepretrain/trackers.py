"""Experiment trackers, chosen in ``trainer.loggers`` beside the CSV and TensorBoard files in ``logs/``: MLflow and
Weights & Biases, through Lightning's loggers, driven by :class:`aepretrain.callbacks.Tracking`.

Each fit (a greedy stage, a fine-tuning arm, a study's pre-training stage or cell) is a tracker run of its own, named
after it (``stage1``, ``scratch``; below a study, ``f0.1-scratch-seed0/scratch``), tagged with the run folder, the
fit and the preset, its parameters the run's resolved settings (dotted keys, as ``--set`` takes them), logged once
when the tracker run starts. Each epoch's row of the fit's history, what metrics.json keeps (losses, accuracy,
seconds, images), goes to it as the epoch ends, at the fit's global step. Where they go, unless the user said
otherwise:

- MLflow: MLflow's local store in the run folder, ``logs/mlflow.db`` (SQLite, no server; MLflow 3 no longer takes a
  plain folder), or the server ``MLFLOW_TRACKING_URI`` names; the experiment is ``trainer.experiment`` or the run
  folder's name. A fit resumed from its checkpoint continues its tracker run, first logging the epochs it lacks.
- W&B: offline, unless ``WANDB_MODE`` says otherwise, into ``logs/wandb/`` (``wandb sync`` uploads it later); the
  project is ``trainer.experiment`` or the run folder's name. A resumed fit is a new W&B run of the same name that
  holds every epoch.

Only the process that writes files tracks. The tracker stores outlive ``--overwrite``: they hold every attempt.

Example:
    >>> check(TrainerConfig(loggers=["wandb"], experiment="a/b"))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    aepretrain.errors.UserError: trainer.experiment 'a/b' cannot name a W&B project: at most 128 characters, none of ...
    >>> fit_names(Path("/runs/study/cells/f0.1-scratch-seed0"), "scratch", Path("/runs/study"))
    ('f0.1-scratch-seed0/scratch', 'cells/f0.1-scratch-seed0/scratch')
    >>> flat_settings({"seed": 0, "finetune": {"lr": 0.001, "arms": ["scratch"]}})
    {'seed': 0, 'finetune.lr': 0.001, 'finetune.arms': ['scratch']}
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import Config, TrainerConfig
from .errors import UserError
from .fileio import first_line, is_global_zero
from .runfolder import MARKER

TRACKERS = ("mlflow", "wandb")  # the loggers that need a package of their own (an extra of aepretrain's)
NOT_IN_PROJECTS = "/\\#?%:"  # characters W&B refuses in a project's name


def check(t: TrainerConfig) -> None:
    """Refuse, before any work starts, a W&B project name W&B refuses, and a tracker whose package is not installed
    (cheap: nothing is imported)."""
    if "wandb" in t.loggers and t.experiment and (set(t.experiment) & set(NOT_IN_PROJECTS) or len(t.experiment) > 128):
        raise UserError(f"trainer.experiment {t.experiment!r} cannot name a W&B project: at most 128 characters, "
                        f"none of {' '.join(NOT_IN_PROJECTS)}")
    for name in t.loggers:
        if name in TRACKERS and importlib.util.find_spec(name) is None:
            raise UserError(f"trainer.loggers names {name}, which is not installed: pip install 'aepretrain[{name}]'")


def folder_of(out: Path) -> Path:
    """The run or study folder a fit in ``out`` belongs to: the nearest that holds a marker (a study's cells and
    pre-trainings train in folders of their own inside it); ``out`` itself where none does."""
    out = out.resolve()
    return next((folder for folder in (out, *out.parents) if (folder / MARKER).is_file()), out)


def fit_names(out: Path, name: str, root: Path) -> tuple[str, str]:
    """The tracker run's name, and the fit's path in its run folder (its tag, unique there)."""
    return (name if out == root else f"{out.name}/{name}"), (out.relative_to(root) / name).as_posix()


def flat_settings(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        flat |= flat_settings(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value}
    return flat


def tracker_loggers(settings: Config, out: Path, name: str, resuming: bool) -> list[Any]:
    """The Lightning loggers of the trackers ``settings`` choose, for the fit ``name`` training in ``out``; none
    outside the first process. Nothing is started yet (:func:`start`). ``resuming``: the fit continues from its
    checkpoint, so its MLflow run continues too."""
    if not is_global_zero():
        return []
    root = folder_of(Path(out))
    run_name, fit = fit_names(Path(out).resolve(), name, root)
    project = settings.trainer.experiment or re.sub(f"[{re.escape(NOT_IN_PROJECTS)}]", "-", root.name)[:128]
    tags = {"aepretrain.folder": str(root), "aepretrain.fit": fit, "aepretrain.preset": settings.preset}
    made = []
    for tracker in settings.trainer.loggers:
        try:
            if tracker == "mlflow":
                made.append(_mlflow(root, project, run_name, tags, resuming))
            elif tracker == "wandb":
                made.append(_wandb(root, project, run_name, tags, tags | flat_settings(settings.to_dict())))
        except ImportError as exc:
            check(TrainerConfig(loggers=[tracker]))
            raise UserError(f"{tracker} is installed but does not import ({first_line(exc)}): pip install "
                            f"'aepretrain[{tracker}]'") from None
        except Exception as exc:  # a store or server the tracker cannot use: one line, before the fit
            raise UserError(f"cannot set up {tracker} for {run_name}: {first_line(exc)[:300]}") from None
    return made


def start(loggers: Sequence[Any], settings: Config, name: str) -> list[int]:
    """Start the fit's tracker runs; a new MLflow run gets the settings as its parameters (W&B got them as its
    config when it started). Returns the last epoch each one already holds (a continued MLflow run's; else 0)."""
    from lightning.pytorch.loggers import MLFlowLogger

    held = []
    for logger in loggers:
        try:
            experiment = logger.experiment
            if isinstance(logger, MLFlowLogger):
                run = experiment.get_run(logger.run_id)
                if not run.data.params:
                    logger.log_hyperparams(flat_settings(settings.to_dict()))
                held.append(int(run.data.metrics.get("epoch", 0)))  # its latest: epochs only grow
            else:
                held.append(0)
        except Exception as exc:  # Lightning ends the fit, and with it the runs started (callbacks.Tracking)
            kind = "MLflow" if isinstance(logger, MLFlowLogger) else "W&B"
            raise UserError(f"cannot start the {kind} run of {name}: {first_line(exc)[:300]}") from None
    return held


def log_epoch(logger: Any, row: dict[str, float]) -> None:
    """One epoch's row of a fit's history, as metrics.json keeps it, at the fit's global step."""
    logger.log_metrics({key: value for key, value in row.items() if key != "step"}, step=int(row["step"]))


def end(loggers: Sequence[Any], ok: bool) -> None:
    """End the fit's tracker runs, as finished or failed (W&B's must end: the next fit would log into it)."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in loggers:
        logger.finalize("success" if ok else "failed")
    if any(isinstance(logger, WandbLogger) for logger in loggers):
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=0 if ok else 1)


def _mlflow(root: Path, experiment: str, run_name: str, tags: dict[str, str], resuming: bool) -> Any:
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow.tracking import MlflowClient

    uri = os.environ.get("MLFLOW_TRACKING_URI")
    artifacts = None
    if not uri:  # the run folder's own store
        (root / "logs").mkdir(parents=True, exist_ok=True)
        uri, artifacts = f"sqlite:///{root / 'logs' / 'mlflow.db'}", (root / "logs" / "mlflow-artifacts").as_uri()
    _quiet_mlflow()
    client = MlflowClient(uri)
    experiment_id = _experiment_id(client, experiment, artifacts)
    run_id = _continued_run(client, experiment_id, tags) if resuming else None
    return MLFlowLogger(experiment, run_name, uri, tags, run_id=run_id)


def _quiet_mlflow() -> None:
    """MLflow says at INFO that it creates its store's tables: not news for a run's terminal."""
    import logging

    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)


def _experiment_id(client: Any, name: str, artifacts: str | None) -> str:
    """The experiment's id; made (with its artifacts in the run folder, where the store is ours) if it is new."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifacts)
    except MlflowException:  # another process (a study's task) made it a moment ago
        return client.get_experiment_by_name(name).experiment_id


def _continued_run(client: Any, experiment_id: str, tags: dict[str, str]) -> str | None:
    """The latest MLflow run of this fit in this run folder, which a resumed fit continues."""
    fit = tags["aepretrain.fit"]
    if "'" in fit:  # no quoting in MLflow's filter language: a new run instead
        return None
    runs = client.search_runs([experiment_id], f"tags.`aepretrain.fit` = '{fit}'",
                              order_by=["attributes.start_time DESC"])
    return next((run.info.run_id for run in runs if run.data.tags.get("aepretrain.folder") == tags["aepretrain.folder"]),
                None)


def _wandb(root: Path, project: str, run_name: str, tags: dict[str, str], config: dict[str, Any]) -> Any:
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    (root / "logs").mkdir(parents=True, exist_ok=True)
    offline = not os.environ.get("WANDB_MODE")
    if offline:  # for the process too, not only the run: else W&B 0.31 still posts its own telemetry to its server
        wandb.setup(settings=wandb.Settings(mode="offline"))
    mode = {"mode": "offline"} if offline else {}
    logger = WandbLogger(name=run_name, project=project, save_dir=str(root / "logs"), tags=[tags["aepretrain.preset"]],
                         group=root.name, config=config, settings=wandb.Settings(silent=True, console="off"), **mode)
    logger._wandb_init.pop("anonymous", None)  # Lightning passes None, which wandb 0.22 on warns about on the terminal
    return logger
