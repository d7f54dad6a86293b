"""One shape for every fit: the greedy stages and both fine-tuning arms are a :class:`TrainingModule` run by
:func:`fit_or_restore` under the Lightning Trainer that :func:`trainer` sets up, and each leaves one
:class:`Record` beside its weights.

Example:
    >>> record = Record("stage1", [{"epoch": 1, "seconds": 2.0}], 2.0, None, {"stage": 1})
    >>> sorted(record.as_json())
    ['history', 'resumed_from', 'seconds', 'stage']
    >>> Record.from_json("stage1", record.as_json()) == record
    True
    >>> scheduler(torch.optim.Adam([torch.zeros(1, requires_grad=True)]), "one-cycle", 0.01, 100)["interval"]
    'step'
"""

from __future__ import annotations

import csv
import logging
import os
import pickle
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.accelerators import CUDAAccelerator, MPSAccelerator
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, ProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import nn
from torch.utils.data import DataLoader

from .callbacks import FiniteEpoch, FiniteLoss, History, SampleCount, Tracking
from .checkpoints import read_finished, save_model
from .config import Config, TrainerConfig, cut
from .errors import UserError
from .fileio import cpu_cores, first_line, is_global_zero, write_json, write_stream
from .objectives import objective_of
from .trackers import tracker_loggers
from .output import fit_label, header
from .progress import progress_callbacks

LOG = logging.getLogger(__name__)


class TrainingModule(L.LightningModule):
    """A model trained by one fit: Adam over its trainable parameters with a per-step schedule. Subclasses give
    the loss; the plain values a fit needs are its hyperparameters, saved with its checkpoint."""

    def __init__(self, model: nn.Module, name: str, lr: float, adam_eps: float, schedule: str,
                 weight_decay: float = 0.0, channels_last: bool = False) -> None:
        super().__init__()
        self.model, self.name = model, name
        self.save_hyperparameters(ignore=["model", "augment"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def configure_optimizers(self) -> Any:
        h = self.hparams
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=h.lr, eps=h.adam_eps, weight_decay=h.weight_decay)
        sched = scheduler(optimizer, h.schedule, h.lr, self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": sched} if sched else optimizer


def scheduler(optimizer: torch.optim.Optimizer, schedule: str, lr: float, total_steps: int | float
              ) -> dict[str, Any] | None:
    """Per-step schedule over the fit's real number of optimizer steps (Lightning's estimate counts dropped
    batches, limits and the share of each DDP process)."""
    total = max(1, int(total_steps))
    if schedule == "one-cycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total)
    elif schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    else:
        return None
    return {"scheduler": sched, "interval": "step"}


@dataclass
class Record:
    """A finished stage or arm, as saved beside its weights (``<weights>.json``) and in metrics.json: its per-epoch
    history, the seconds it trained, the epoch a resumed fit continued after, and what its kind adds (``summary``:
    a stage's losses and parameter counts, an arm's best epoch)."""

    name: str
    history: list[dict[str, float]]
    seconds: float
    resumed_from: int | None
    summary: dict[str, Any] = field(default_factory=dict)

    KEYS = ("history", "seconds", "resumed_from")

    def as_json(self) -> dict[str, Any]:
        return {**self.summary, "seconds": self.seconds, "resumed_from": self.resumed_from, "history": self.history}

    @classmethod
    def from_json(cls, name: str, values: dict[str, Any]) -> Record:
        summary = {k: v for k, v in values.items() if k not in cls.KEYS}
        return cls(name, values["history"], values["seconds"], values["resumed_from"], summary)


@dataclass
class Fit:
    """What :func:`fit_or_restore` needs of a stage or arm besides its module."""

    weights: Path  # where its weights go; its record goes beside them, as .json
    kind: str  # the checkpoint's kind: autoencoder | classifier
    data: tuple[DataLoader, DataLoader]  # train and validation batches
    epochs: int
    summary_keys: tuple[str, ...]  # what a finished record's summary must hold
    callbacks: Sequence[Callback] = ()
    val_every: int = 1  # validate after every this many epochs (and after the last)


def fit_or_restore(module: TrainingModule, fit: Fit, cfg: Config, out: Path, channels: int, resume: bool,
                   finish: Callable[[History], tuple[dict[str, Any], dict[str, Any]]]) -> Record:
    """The stage or arm finished before an interruption (record and weights verify: loaded, not trained again),
    or a fit of it, continued from its last epoch checkpoint when ``resume``. After a fit, ``finish(history)``
    gives the record's summary and the checkpoint's metadata; the weights are saved, then the record."""
    json_path = fit.weights.with_suffix(".json")
    needs = Record.KEYS + fit.summary_keys
    label, says = fit_words(module, fit, cfg)
    done = read_finished(module.model, json_path, fit.weights, fit.kind, needs) if resume else None
    if done is not None:
        header(f"[{label}] finished in an earlier run: restored from {fit.weights}")
        return Record.from_json(module.name, done)
    history = History(cfg.seed)
    last = last_checkpoint(out, module.name, resume)
    last_epoch = check_resumable(last, module) if last is not None else None  # before Lightning starts
    trackers = tracker_loggers(cfg, out, module.name, resuming=last is not None)
    tracking = [Tracking(trackers, history, cfg, module.name)] if trackers else []
    shown = progress_callbacks(cfg.trainer.progress, label)
    run = trainer(cfg.trainer, out, module.name, fit.epochs, [*fit.callbacks, history, *tracking, *shown],
                  fit.val_every, last_epoch)
    header(f"[{label}] {says}" + (f", continuing from {last}" if last else ""))
    precision = resolved_precision(cfg.trainer.precision, cfg.trainer.device)
    LOG.debug(f"[{label}] device {cfg.trainer.device}, precision {precision}, logs in {out / 'logs' / module.name}, "
              f"epoch checkpoints in {resume_dir(out, module.name)}")
    run.fit(module, *fit.data, ckpt_path=last, weights_only=True)
    summary, meta = finish(history)
    save_model(module.model, fit.weights, fit.kind, cfg, channels, meta)
    record = Record(module.name, history.epochs, history.seconds(), history.resumed_from, summary)
    write_json(json_path, record.as_json())
    return record


def fit_words(module: TrainingModule, fit: Fit, cfg: Config) -> tuple[str, str]:
    """The fit's name as its header, bar and epoch lines show it (``stage 2/3``, ``finetune scratch``, or a study's
    name for it), and what its header says it does."""
    epochs = f"{fit.epochs} epoch{'s' if fit.epochs != 1 else ''} on {len(fit.data[0].dataset)} images"
    if fit.kind == "classifier":
        start = "the pre-trained encoder" if module.name == "pretrained" else "random weights"
        return fit_label(f"finetune {module.name}"), f"training the classifier from {start}: {epochs}"
    objective, stage = objective_of(cfg.pretrain), module.model.stage
    if not objective.greedy:
        how = "as one autoencoder" if objective.reconstructs else f"with {objective.name} ({objective.loss_name})"
        return fit_label(objective.name), f"pre-training the whole encoder {how}: {epochs}"
    return (fit_label(f"stage {stage}/{len(cfg.model.blocks)}"),
            f"pre-training encoder block {stage} as an autoencoder ({objective.name}): {epochs}")


CPU_BF16 = "AEPRETRAIN_CPU_BF16"


def cpu_computes_bf16() -> bool:
    """Whether this CPU computes bf16 natively (oneDNN's test), unless ``$AEPRETRAIN_CPU_BF16`` says so: ``1``
    treats it as one that does, ``0`` as one that does not. The variable reaches every process a run starts, so a
    test (or a user) can take the other path on any CPU."""
    forced = os.environ.get(CPU_BF16, "")
    if forced not in ("", "0", "1"):
        raise UserError(f"${CPU_BF16} must be 1 (bf16 on the CPU) or 0 (fp32), or unset to ask the CPU, not "
                        f"{forced!r}")
    if forced:
        return forced == "1"
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def resolved_precision(requested: str, device: str) -> str:
    """`auto`: bf16 autocast where the hardware computes bf16 natively (on a CPU: :func:`cpu_computes_bf16`), else
    fp32."""
    if requested != "auto":
        return requested
    if device in ("auto", "cuda") and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    if device in ("auto", "cpu") and cpu_computes_bf16():
        return "bf16-mixed"
    return "32"


def fit_device(t: TrainerConfig) -> torch.device:
    """The device a fit with these settings trains this process's model on, chosen as Lightning's Trainer chooses
    it: ``auto`` takes Apple's GPU, else a CUDA GPU, else the CPU; ``gpu`` the first two; the CUDA index is this
    process's (``$LOCAL_RANK``) among ``trainer.devices``. Lightning moves the model back to the CPU after a fit:
    testing, probing and predicting move it here again. A TPU is none of the project's devices.

    >>> from aepretrain.config import TrainerConfig
    >>> fit_device(TrainerConfig(device="cpu")), fit_device(TrainerConfig(device="auto")).type in ("cpu", "cuda", "mps")
    (device(type='cpu'), True)
    """
    kind = t.device
    if kind in ("auto", "gpu"):
        kind = "mps" if MPSAccelerator.is_available() else "cuda" if CUDAAccelerator.is_available() else kind
        kind = "cpu" if kind == "auto" else kind
    if kind == "cpu":
        return torch.device("cpu")
    available = {"cuda": CUDAAccelerator, "mps": MPSAccelerator}.get(kind, CUDAAccelerator).is_available()
    if not available:
        raise UserError(f"trainer.device is {t.device}, but this machine has no {'CUDA' if kind != 'mps' else 'MPS'} "
                        "GPU: choose device auto or cpu")
    if kind == "mps":
        return torch.device("mps")
    requested: Any = t.devices if not t.devices.isdigit() else int(t.devices)
    indices = list(range(CUDAAccelerator.auto_device_count())) if requested == "auto" else \
        CUDAAccelerator.parse_devices(requested) or [0]
    rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    return torch.device("cuda", indices[rank] if rank < len(indices) else indices[0])


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints written to a temporary file, then renamed: a kill or a full disk mid-write
    leaves the previous checkpoint whole."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            write_stream(path, lambda f: torch.save(checkpoint, f))
        except OSError as exc:
            raise UserError(f"could not write checkpoint {path}: {exc.strerror or exc}; "
                            "the previous checkpoint is intact (--resume continues from it)") from None

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        return load_safely(Path(path))


def load_safely(path: Path, remedy: str = "") -> Any:
    """A Lightning checkpoint read without unpickling code; one whole sentence if it cannot be."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)  # never unpickles code
    except pickle.UnpicklingError:
        reason = "it holds objects other than tensors and plain values, which are refused, not run"
    except (RuntimeError, EOFError) as exc:  # the first sentence; the rest is PyTorch's advice on torch.load
        reason = f"it is cut or is no PyTorch checkpoint ({cut(first_line(exc).split('. ')[0], 160)})"
    except OSError as exc:
        reason = exc.strerror or first_line(exc)
    raise UserError(f"cannot load checkpoint {path} safely: {reason}{remedy}")


RESUME_KEYS = ("pytorch-lightning_version", "epoch", "global_step", "state_dict", "loops", "callbacks",
               "optimizer_states", "lr_schedulers")  # what Lightning reads to continue a fit


def check_resumable(path: Path, module: TrainingModule) -> int:
    """Refuse, in one line, an epoch checkpoint this fit cannot continue from: one that does not load safely,
    lacks what Lightning reads, or holds weights or optimizer state of another model; else the epoch it ends
    (Lightning's count, from 0)."""
    remedy = f"; remove it to train {module.name} again from its first epoch"
    checkpoint = load_safely(path, remedy)
    missing = [key for key in RESUME_KEYS if not isinstance(checkpoint, dict) or key not in checkpoint]
    problem = f"it lacks '{missing[0]}'" if missing else _weights_problem(checkpoint["state_dict"], module) or \
        _optimizer_problem(checkpoint["optimizer_states"], module)
    epoch = checkpoint["epoch"] if not missing else None
    if not problem and not (isinstance(epoch, int) and epoch >= 0):
        problem = f"its epoch {cut(repr(epoch))} is not a count"
    if problem:
        raise UserError(f"cannot resume {module.name} from {path}: {problem}{remedy}")
    return epoch


def _weights_problem(state: Any, module: TrainingModule) -> str | None:
    own = module.state_dict()
    if not isinstance(state, dict):
        return "its 'state_dict' holds no weights"
    for name, tensor in own.items():
        theirs = state.get(name)
        if not isinstance(theirs, torch.Tensor):
            return f"its weights lack layer '{name}'"
        if theirs.shape != tensor.shape:
            return f"its layer '{name}' has shape {tuple(theirs.shape)}, {tuple(tensor.shape)} here"
    extra = sorted(set(state) - set(own), key=str)
    return f"its weights hold layer '{cut(str(extra[0]))}', which this model lacks" if extra else None


def _optimizer_problem(states: Any, module: TrainingModule) -> str | None:
    """The Adam state of :meth:`TrainingModule.configure_optimizers`: one optimizer, a moment per parameter."""
    params = [p for p in module.model.parameters() if p.requires_grad]
    groups = states[0].get("param_groups") if isinstance(states, list) and len(states) == 1 and \
        isinstance(states[0], dict) else None
    if not isinstance(groups, list) or not all(isinstance(g, dict) and isinstance(g.get("params"), list)
                                               for g in groups):
        return "its 'optimizer_states' is not the state of one optimizer"
    count = sum(len(g["params"]) for g in groups)
    if count != len(params):
        return f"its optimizer state is for {count} parameters, this model trains {len(params)}"
    moments = states[0].get("state")
    for index, values in (moments.items() if isinstance(moments, dict) else [(None, None)]):
        if not (type(index) is int and 0 <= index < count and isinstance(values, dict)):
            return "its optimizer state is not one set of moments per parameter"
        for key, value in values.items():
            if isinstance(value, torch.Tensor) and value.dim() and value.shape != params[index].shape:
                return f"its optimizer's '{cut(str(key))}' of parameter {index} has shape {tuple(value.shape)}, " \
                       f"{tuple(params[index].shape)} here"
    return None


def trainer(t: TrainerConfig, out: Path, name: str, epochs: int, callbacks: Sequence[Callback],
            val_every: int = 1, resumed_after: int | None = None) -> L.Trainer:
    """A Lightning Trainer with the run's device, precision, log files (those of ``trainer.loggers`` among CSV
    and TensorBoard, in ``out/logs/NAME``; a fit's trackers are callbacks: :class:`Tracking`), the finite-loss and
    sample-count checks and a last-epoch checkpoint; it validates every ``val_every`` epochs. A fit resumed after
    epoch ``resumed_after`` keeps the CSV log's rows up to it."""
    smoke = {"limit_train_batches": 2, "limit_val_batches": 2, "limit_test_batches": 2} if t.smoke else {}
    devices: Any = t.devices if t.devices == "auto" else (int(t.devices) if t.devices.isdigit() else t.devices)
    resume_ckpt = ModelCheckpoint(dirpath=resume_dir(out, name), filename="last", save_top_k=1, every_n_epochs=1,
                                  save_on_train_epoch_end=True, enable_version_counter=False)
    last = resume_dir(out, name) / "last.ckpt"
    checks = [FiniteLoss(name, last), SampleCount(), FiniteEpoch(name, last)]
    files = {"csv": lambda: ResumedCSVLogger(out / "logs", name, resumed_after),
             "tensorboard": lambda: TensorBoardLogger(out / "logs", name=name, version="")}
    logs = [files[kind]() for kind in t.loggers if kind in files]
    try:
        return L.Trainer(
            accelerator=t.device, devices=devices, num_nodes=t.num_nodes, strategy=t.strategy,
            sync_batchnorm=t.sync_batchnorm, precision=resolved_precision(t.precision, t.device),
            max_epochs=epochs, check_val_every_n_epoch=val_every, gradient_clip_val=t.gradient_clip_val,
            deterministic=False,
            logger=logs or False,
            callbacks=[*callbacks, *checks, resume_ckpt],
            enable_progress_bar=any(isinstance(c, ProgressBar) for c in callbacks),  # else Lightning adds its own
            plugins=[AtomicCheckpointIO()],
            enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=10, **smoke,
        )
    except (MisconfigurationException, ValueError, RuntimeError) as exc:  # a device, strategy or precision
        raise UserError(f"cannot set up training with device={t.device}, devices={t.devices}, "
                        f"strategy={t.strategy}, precision={t.precision}: {first_line(exc)}") from None


class ResumedCSVLogger(CSVLogger):
    """Lightning's CSV log in ``save_dir/NAME/metrics.csv``; a fit resumed after epoch ``resumed_after`` keeps the
    rows of the epochs up to it (Lightning's own deletes the file it finds) and drops those of the epoch the
    interruption cut short, which run again."""

    def __init__(self, save_dir: Path, name: str, resumed_after: int | None) -> None:
        super().__init__(save_dir, name=name, version="")
        self.resumed_after = resumed_after

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None and is_global_zero():
            path = Path(self.log_dir) / ExperimentWriter.NAME_METRICS_FILE
            header, rows = _metric_rows(path, self.resumed_after)
            with warnings.catch_warnings():  # that it removes the file it finds, which is put back here
                warnings.filterwarnings("ignore", message="Experiment logs directory")
                self._experiment = super().experiment
            if rows:
                with open(path, "w", newline="") as f:
                    writer = csv.DictWriter(f, header, extrasaction="ignore")  # a damaged row's extra fields
                    writer.writeheader()
                    writer.writerows(rows)
                self._experiment.metrics_keys = header
        return super().experiment


def _metric_rows(path: Path, last_epoch: int | None) -> tuple[list[str], list[dict[str, str]]]:
    """The header of a CSV log and its rows up to epoch ``last_epoch`` (none for a fit not resumed)."""
    if last_epoch is None or not path.is_file():
        return [], []
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            rows = [row for row in reader if _epoch(row) <= last_epoch]
            return list(reader.fieldnames or []), rows
    except (UnicodeDecodeError, csv.Error) as exc:  # not a log we wrote: it starts again, as Lightning's would
        LOG.warning(f"aepretrain: {path} is damaged ({first_line(exc)}): the resumed fit's log starts afresh")
        return [], []


def _epoch(row: dict[str, str]) -> float:
    """A CSV log row's epoch; infinite where a row cut short by a kill has none to read."""
    try:
        return float(row.get("epoch") or "inf")
    except ValueError:
        return float("inf")


def resume_dir(out: Path, name: str) -> Path:
    return out / "checkpoints" / "resume" / name


def last_checkpoint(out: Path, name: str, resume: bool) -> Path | None:
    path = resume_dir(out, name) / "last.ckpt"
    return path if resume and path.is_file() else None


def set_threads() -> None:
    """Use every core for intra-op work (Lightning and PyTorch defaults can leave some idle), unless
    ``OMP_NUM_THREADS`` says how many: a user's choice, or a launcher's that runs several processes a machine."""
    wanted = os.environ.get("OMP_NUM_THREADS", "")
    threads = int(wanted) if wanted.isdigit() and int(wanted) > 0 else cpu_cores()
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
