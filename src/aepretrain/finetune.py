"""Fine-tuning: the classifier from the pre-trained encoder, or from scratch, on equal terms.

Both arms train every layer with Adam, cross-entropy and the reference's augmentation, on the same
splits, seed and budget; the best epoch by validation accuracy is kept. ``epochs_to_target`` counts
the epochs until validation accuracy first reaches a stated level, the same way for both arms.

Example:
    >>> arm = finetune(cfg, bundle, Path("runs/demo"), init="scratch")  # doctest: +SKIP
    >>> epochs_to_target(arm.history, 0.8)  # doctest: +SKIP
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, EarlyStopping

from .checkpoints import load_weights, read_finished, save_model
from .config import Config
from .data import DataBundle
from .models import Classifier, Encoder, build_encoder
from .training import (History, augmenter, check_finite, last_checkpoint, loader, log_samples, scheduler, to_float,
                       trainer, write_json)

ARM_RECORD = ("history", "best_val_accuracy", "best_epoch", "seconds", "resumed_from")


class ClassifierModule(L.LightningModule):
    def __init__(self, classifier: Classifier, cfg: Config, out: Path | None, name: str) -> None:
        super().__init__()
        self.classifier, self.cfg, self.out, self.name = classifier, cfg, out, name
        self.augment = augmenter(cfg.augment)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        x, y = batch
        x = to_float(x, False)
        if self.trainer.training:
            with torch.autocast(x.device.type, enabled=False):
                x = self.augment(x)
        if self.cfg.trainer.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y

    def _step(self, batch: Any, split: str) -> torch.Tensor:
        x, y = batch
        logits = self(x).float()
        loss = F.cross_entropy(logits, y)
        accuracy = (logits.argmax(1) == y).float().mean()
        sync = split != "train"
        self.log(f"{split}_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y), sync_dist=sync)
        self.log(f"{split}_acc", accuracy, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y),
                 sync_dist=sync)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self._step(batch, "train")
        check_finite(loss, self, self.name, self.out, batch_idx)
        log_samples(self, len(batch[1]))
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "val")

    def configure_optimizers(self) -> Any:
        f = self.cfg.finetune
        optimizer = torch.optim.Adam(self.classifier.parameters(), lr=f.lr, eps=f.adam_eps, weight_decay=f.weight_decay)
        sched = scheduler(optimizer, f.schedule, f.lr, self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": sched} if sched else optimizer


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
            self.state = copy.deepcopy({k: v.detach().cpu() for k, v in module.classifier.state_dict().items()})

    def state_dict(self) -> dict[str, Any]:
        return {"best_accuracy": self.best_accuracy, "best_epoch": self.best_epoch, "state": self.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_accuracy, self.best_epoch, self.state = state["best_accuracy"], state["best_epoch"], state["state"]


@dataclass
class ArmResult:
    init: str
    classifier: Classifier
    history: list[dict[str, float]]
    best_val_accuracy: float
    best_epoch: int
    seconds: float
    resumed_from: int | None = None  # the epoch a resumed fit continued after


def epochs_to_target(history: list[dict[str, float]], target: float) -> int | None:
    """The first epoch (1-based) whose validation accuracy reaches ``target``; None if none does."""
    for row in history:
        if row.get("val_acc", -1.0) >= target:
            return int(row["epoch"])
    return None


def classifier_path(out: Path, init: str) -> Path:
    return out / "checkpoints" / f"classifier-{init}.safetensors"


def new_classifier(cfg: Config, bundle: DataBundle, encoder: Encoder | None) -> Classifier:
    """A classifier; with ``encoder``, its convolutional weights are copied from it (the pre-trained arm)."""
    L.seed_everything(cfg.seed, verbose=False)  # the head starts the same in both arms
    classifier = Classifier(build_encoder(cfg.model, bundle.channels, True), len(bundle.classes), cfg.model.dropout)
    if encoder is not None:
        load_weights(classifier.encoder, encoder.state_dict(), "the pre-trained encoder")
    classifier.requires_grad_(True)
    return classifier


def finetune(cfg: Config, bundle: DataBundle, out: Path, init: str, encoder: Encoder | None = None,
             resume: bool = False) -> ArmResult:
    """Train one arm; ``init`` is ``pretrained`` (``encoder`` required) or ``scratch``."""
    if init == "pretrained" and encoder is None:
        raise ValueError("the pretrained arm needs the pre-trained encoder")
    classifier = new_classifier(cfg, bundle, encoder if init == "pretrained" else None)
    path = classifier_path(out, init)
    record = read_finished(classifier, path.with_suffix(".json"), path, "classifier", ARM_RECORD) if resume else None
    if record is not None:  # finished before the interruption
        return ArmResult(init, classifier, record["history"], record["best_val_accuracy"], record["best_epoch"],
                         record["seconds"], record["resumed_from"])
    if cfg.trainer.channels_last:
        classifier.to(memory_format=torch.channels_last)
    f = cfg.finetune
    module = ClassifierModule(classifier, cfg, out, init)
    history, best = History(cfg.seed), KeepBest()
    callbacks: list[Callback] = [best, history]
    if f.early_stopping_patience is not None:
        callbacks.append(EarlyStopping("val_acc", mode="max", patience=f.early_stopping_patience))
    fit = trainer(cfg, out, init, f.epochs, callbacks)
    fit.fit(module, loader(bundle.train, f.batch_size, True, cfg, drop_last=True),
            loader(bundle.val, f.batch_size, False, cfg), ckpt_path=last_checkpoint(out, init, resume),
            weights_only=True)
    if best.state is not None:
        classifier.load_state_dict(best.state)
    save_model(classifier, path, "classifier", cfg, bundle.channels,
               {"classes": bundle.classes, "arm": init, "best_epoch": best.best_epoch})
    result = ArmResult(init, classifier, history.epochs, best.best_accuracy, best.best_epoch, history.seconds(),
                       history.resumed_from)
    write_json(path.with_suffix(".json"), {"history": result.history, "best_val_accuracy": result.best_val_accuracy,
                                           "best_epoch": result.best_epoch, "seconds": result.seconds,
                                           "resumed_from": result.resumed_from})
    return result
