"""What every fit watches, as Lightning callbacks: per-epoch history and random streams, finite losses and
weights, images seen, the best epoch's weights, and its experiment trackers.

Example:
    >>> history = History(seed=0)
    >>> history.load_state_dict({"epochs": [{"epoch": 1, "seconds": 2.5}]})
    >>> history.resumed_from, history.seconds()
    (1, 2.5)
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from .config import Config
from .errors import UserError
from .seeds import derive_seed
from .trackers import end, log_epoch, start


class History(Callback):
    """Per-epoch metrics and seconds, as plain floats, kept in the checkpoint so a resumed run has them all.
    An epoch without validation (a fit that validates every few epochs) has no ``val_`` values of its own: the
    last validation's are not repeated. ``val_seconds`` is the part of an epoch's seconds spent validating.

    It also reseeds the global random generator at the start of each epoch from (seed, epoch), so
    augmentation and dropout draw the same numbers in a resumed run as in an unbroken one.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.epochs: list[dict[str, float]] = []
        self.resumed_from: int | None = None
        self._started = self._validating = 0.0
        self._val_seconds: float | None = None

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        torch.manual_seed(derive_seed(self.seed, "epoch-draws", trainer.current_epoch) + trainer.global_rank)
        self._started, self._val_seconds = time.perf_counter(), None

    def on_validation_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._validating = time.perf_counter()

    def on_validation_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._val_seconds = time.perf_counter() - self._validating

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        validated = self._val_seconds is not None
        row = {"epoch": trainer.current_epoch + 1, "step": trainer.global_step,
               "seconds": round(time.perf_counter() - self._started, 3)}
        if validated:
            row["val_seconds"] = round(self._val_seconds, 3)
        row |= {k: float(v) for k, v in trainer.callback_metrics.items()
                if not k.endswith("_step") and (validated or not k.startswith("val_"))}
        self.epochs.append({k.removesuffix("_epoch"): v for k, v in row.items()})

    def state_dict(self) -> dict[str, Any]:
        return {"epochs": self.epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epochs = state["epochs"]
        self.resumed_from = len(self.epochs)  # only a resumed fit loads a state

    def seconds(self) -> float:
        return round(sum(row["seconds"] for row in self.epochs), 2)


def _last_good(last: Path | None) -> str:
    return f"the last good checkpoint is {last} (--resume continues from it)" if last and last.is_file() else \
        "no epoch finished, so there is no checkpoint yet"


class FiniteLoss(Callback):
    """Stop at the first NaN or infinite loss, before its update, saying where and which checkpoint is the last
    good one. Under DDP every process learns of a fault in any of them, so that none waits for the others forever.
    """

    def __init__(self, name: str, last: Path | None) -> None:
        self.name, self.last, self.batch = name, last, 0

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self.batch = batch_idx

    def on_before_backward(self, trainer: L.Trainer, module: L.LightningModule, loss: torch.Tensor) -> None:
        bad = not bool(torch.isfinite(loss))
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            where = f"epoch {trainer.current_epoch + 1}, step {self.batch + 1}"
            raise UserError(f"{self.name}: the loss became {float(loss.detach())} at {where}; {_last_good(self.last)}. "
                            "Lower the learning rate or set trainer.gradient_clip_val")


class FiniteEpoch(Callback):
    """The loss of an epoch's last step can be finite while the update it made is not, or makes the validation loss
    infinite. Each epoch's losses and weights are checked at its end, after validation and before its checkpoint is
    written (Lightning calls checkpointing last), so that no stage or arm is saved, or recorded as finished, broken.
    Every DDP process holds the same weights and synced validation losses, so each stops on its own."""

    def __init__(self, name: str, last: Path | None) -> None:
        self.name, self.last = name, last

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        values = {k: v for k, v in trainer.callback_metrics.items() if k.endswith("_loss")}
        values |= {f"weight {n}": p for n, p in module.named_parameters()}
        bad = next((k for k, v in values.items() if not bool(torch.isfinite(v).all())), None)
        if bad is not None:
            raise UserError(f"{self.name}: {bad} became non-finite in epoch {trainer.current_epoch + 1}, though every "
                            f"step's loss was finite; {_last_good(self.last)}. Lower the learning rate or set "
                            "trainer.gradient_clip_val")


class SampleCount(Callback):
    """Images trained on per epoch, summed over all processes: a check that DDP splits, not repeats, the data."""

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        module.log("samples", float(len(batch[0])), on_step=False, on_epoch=True, reduce_fx="sum", sync_dist=True)


class KeepBest(Callback):
    """Keeps the weights of the epoch with the best validation accuracy (first one on ties)."""

    def __init__(self) -> None:
        self.best_accuracy, self.best_epoch, self.state = -1.0, 0, None

    def on_validation_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        accuracy = trainer.callback_metrics.get("val_acc")
        if trainer.sanity_checking or accuracy is None:
            return
        if float(accuracy) > self.best_accuracy:
            self.best_accuracy, self.best_epoch = float(accuracy), trainer.current_epoch + 1
            self.state = copy.deepcopy({k: v.detach().cpu() for k, v in module.model.state_dict().items()})

    def state_dict(self) -> dict[str, Any]:
        return {"best_accuracy": self.best_accuracy, "best_epoch": self.best_epoch, "state": self.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_accuracy, self.best_epoch, self.state = state["best_accuracy"], state["best_epoch"], state["state"]


class Tracking(Callback):
    """The fit's tracker runs (trackers.py), started as the fit sets up and ended with it, as finished or failed.
    Each epoch's row of its :class:`History` (given before this callback, so the row is there) goes to them when the
    epoch ends, before its checkpoint is written; a resumed fit first gives them the restored epochs they lack."""

    def __init__(self, loggers: list[Any], history: History, settings: Config, name: str) -> None:
        self.loggers, self.history, self.settings, self.name = loggers, history, settings, name
        self.held: list[int] = []  # the last epoch each tracker run holds
        self.ended = False

    def setup(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        self.held = start(self.loggers, self.settings, self.name)

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._log()  # the history a checkpoint restored

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._log()

    def _log(self) -> None:
        for i, logger in enumerate(self.loggers):
            for row in self.history.epochs:
                if row["epoch"] > self.held[i]:
                    log_epoch(logger, row)
                    self.held[i] = row["epoch"]

    def teardown(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        self._end(ok=True)

    def on_exception(self, trainer: L.Trainer, module: L.LightningModule, exception: BaseException) -> None:
        self._end(ok=False)

    def _end(self, ok: bool) -> None:
        if not self.ended:
            self.ended = True
            end(self.loggers, ok)
