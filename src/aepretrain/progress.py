"""What a fit shows while it trains: on a terminal, Lightning's progress bars on stderr; anywhere else (a file, a
pipe, a cluster's log) one logged line per epoch, ``[stage 2/3] epoch 1/2  train_loss 0.0123  val_loss 0.013
3.1 s``. Both name the fit (see output.fitting) and count epochs from 1, as the report does.

Example:
    >>> epoch_line("stage 2/3", 1, 2, {"val_loss": 0.013, "train_loss": 0.01234}, 3.14)
    '[stage 2/3] epoch 1/2  train_loss 0.01234  val_loss 0.013  3.1 s'
    >>> epoch_line("finetune scratch", 3, 4, {"val_acc": 0.5, "train_acc": 1.0, "train_loss": 0.1514}, 2.04)
    '[finetune scratch] epoch 3/4  train_loss 0.1514  train_acc 1.0000  val_acc 0.5000  2.0 s'
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm, convert_inf

LOG = logging.getLogger(__name__)


def progress_callbacks(bars: bool, label: str) -> list[Callback]:
    """Bars when ``bars`` (``trainer.progress``) and stderr is a terminal; else one line per epoch."""
    return [Bars(label)] if bars and sys.stderr.isatty() else [EpochLines(label)]


def epoch_line(label: str, epoch: int, epochs: int, values: dict[str, float], seconds: float) -> str:
    """Training values first, then validation; each loss (4 significant digits) before its accuracy."""
    shown = "".join(f"  {k} {values[k]:.4g}" if k.endswith("_loss") else f"  {k} {values[k]:.4f}"
                    for k in sorted(values, key=_order))
    return f"[{label}] epoch {epoch}/{epochs}{shown}  {seconds:.1f} s"


def _order(key: str) -> tuple[bool, bool, str]:
    return key.startswith("val_"), not key.endswith("_loss"), key


class EpochLines(Callback):
    """One info line per epoch from the first process, with the progress bar's values; the validation values
    only when the epoch validated (a study's cell validates every few epochs)."""

    def __init__(self, label: str) -> None:
        self.label, self.started, self.validated = label, 0.0, False

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.started, self.validated = time.perf_counter(), False

    def on_validation_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.validated = self.validated or not trainer.sanity_checking

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        values = {k: float(v) for k, v in trainer.progress_bar_metrics.items()
                  if self.validated or not k.startswith("val_")}
        LOG.info(epoch_line(self.label, trainer.current_epoch + 1, trainer.max_epochs, values,
                            time.perf_counter() - self.started))


class Bars(TQDMProgressBar):
    """Lightning's training and validation bars, on stderr (its own go to stdout, among the results), each epoch's
    named and left on the screen: ``[stage 2/3] epoch 1/2: 100%|████| ...``. A fit of aepretrain draws no
    others: it runs no sanity check, and tests and predicts outside fits."""

    def __init__(self, label: str) -> None:
        super().__init__(leave=True)
        self.label = label

    def _bar(self, description: str, leave: bool, below: int = 0) -> Tqdm:
        return Tqdm(desc=description, position=2 * self.process_position + below, disable=self.is_disabled,
                    leave=leave, dynamic_ncols=True, file=sys.stderr, smoothing=0, bar_format=self.BAR_FORMAT)

    def init_validation_tqdm(self) -> Tqdm:
        return self._bar(self.validation_description, leave=False, below=1)

    def on_train_start(self, *_: object) -> None:
        self.train_progress_bar = Tqdm(disable=True)  # each epoch draws its own, from its start

    def on_train_epoch_start(self, trainer: L.Trainer, *_: object) -> None:
        self.train_progress_bar = self._bar(f"[{self.label}] epoch {trainer.current_epoch + 1}/{trainer.max_epochs}",
                                            leave=True)
        self.train_progress_bar.reset(convert_inf(self.total_train_batches))

    def get_metrics(self, trainer: L.Trainer, module: L.LightningModule) -> dict[str, Any]:
        values = super().get_metrics(trainer, module)
        return {k: values[k] for k in sorted(values, key=_order)}
