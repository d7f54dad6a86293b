"""Fine-tuning: the classifier from the pre-trained encoder, or from scratch, on equal terms.

Both arms train every layer with Adam, cross-entropy and the reference's augmentation, on the same
splits, seed and budget; the best epoch by validation accuracy is kept. ``epochs_to_target`` counts
the epochs until validation accuracy first reaches a stated level, the same way for both arms.

Example:
    >>> import tempfile
    >>> from aepretrain.config import resolve
    >>> from aepretrain.data import prepare
    >>> cfg = resolve("tiny")
    >>> arm = finetune(cfg, prepare(cfg.data, cfg.seed), Path(tempfile.mkdtemp()), init="scratch")
    >>> [row["epoch"] for row in arm.record.history]
    [1, 2]
    >>> epochs_to_target([{"epoch": 1, "val_acc": 0.5}, {"epoch": 2, "val_acc": 0.9}], 0.8)
    2
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, EarlyStopping
from torch import nn

from .callbacks import History, KeepBest
from .checkpoints import load_weights
from .config import Config
from .data import DataBundle
from .data.loading import loader
from .errors import UserError
from .models import Classifier, Encoder, build_encoder
from .seeds import derive_seed
from .training import Fit, Record, TrainingModule, fit_or_restore
from .transforms import augmenter, to_float

ARM_SUMMARY = ("best_val_accuracy", "best_epoch")


class ClassifierModule(TrainingModule):
    """One arm: cross-entropy with accuracy, the augmentation applied to training batches on their device."""

    def __init__(self, model: Classifier, name: str, lr: float, adam_eps: float, schedule: str, weight_decay: float,
                 channels_last: bool, augment: nn.Module) -> None:
        super().__init__(model, name, lr, adam_eps, schedule, weight_decay, channels_last)
        self.augment = augment

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        x, y = batch
        x = to_float(x)
        if self.trainer.training:
            with torch.autocast(x.device.type, enabled=False):
                x = self.augment(x)
        if self.hparams.channels_last:
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
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "val")


def classifier_module(classifier: Classifier, cfg: Config, name: str) -> ClassifierModule:
    """The arm's module with the run's fine-tuning and augmentation settings."""
    f = cfg.finetune
    return ClassifierModule(classifier, name, f.lr, f.adam_eps, f.schedule, f.weight_decay, cfg.trainer.channels_last,
                            augmenter(cfg.augment))


@dataclass
class ArmResult:
    init: str
    classifier: Classifier
    record: Record


def epochs_to_target(history: list[dict[str, float]], target: float) -> int | None:
    """The first epoch (1-based) whose validation accuracy reaches ``target``; None if none does."""
    for row in history:
        if row.get("val_acc", -1.0) >= target:
            return int(row["epoch"])
    return None


def classifier_path(out: Path, init: str) -> Path:
    return out / "checkpoints" / f"classifier-{init}.safetensors"


def new_classifier(cfg: Config, bundle: DataBundle, encoder: Encoder | None) -> Classifier:
    """A classifier; with ``encoder``, its first blocks are copied from it (the pre-trained arm)."""
    L.seed_everything(derive_seed(cfg.seed, "model-init"), verbose=False)  # the head starts the same in both arms
    classifier = Classifier(build_encoder(cfg.model, bundle.channels, True), len(bundle.classes), cfg.model.dropout)
    if encoder is not None:
        load_pretrained_blocks(classifier, encoder, "the pre-trained encoder")
    classifier.requires_grad_(True)
    return classifier


def load_pretrained_blocks(classifier: Classifier, encoder: Encoder, source: str, assign: bool = False) -> None:
    """The classifier's blocks 1..k from greedy stage k's encoder (every block, after a whole pre-training); deeper
    blocks keep the start they were built with, which is the scratch arm's, so that the arms differ only in what
    was pre-trained. A block that does not fit is named in one line."""
    blocks = nn.ModuleDict({"blocks": classifier.encoder.blocks[: len(encoder.blocks)]})
    load_weights(blocks, encoder.state_dict(), source, assign=assign)


def check_encoder(cfg: Config, bundle: DataBundle, encoder: Encoder, source: str) -> None:
    """Refuse an encoder the classifier of these settings and data cannot start from, allocating nothing."""
    with torch.device("meta"):
        classifier = Classifier(build_encoder(cfg.model, bundle.channels, True), len(bundle.classes), 0.0)
    load_pretrained_blocks(classifier, encoder, source, assign=True)


def finetune(cfg: Config, bundle: DataBundle, out: Path, init: str, encoder: Encoder | None = None,
             resume: bool = False, split_seed: int | None = None, val_every: int = 1) -> ArmResult:
    """Train one arm; ``init`` is ``pretrained`` (``encoder`` required) or ``scratch``; validated every
    ``val_every`` epochs. ``split_seed``: the seed ``bundle`` was split with, where it is not ``cfg.seed`` (a study
    cell); the checkpoint records it, so that `evaluate` tests on the same test images."""
    if init == "pretrained" and encoder is None:
        raise UserError("the pretrained arm needs the pre-trained encoder")
    classifier = new_classifier(cfg, bundle, encoder if init == "pretrained" else None)
    if cfg.trainer.channels_last:
        classifier.to(memory_format=torch.channels_last)
    f, seed, workers = cfg.finetune, cfg.seed, cfg.trainer.num_workers
    best = KeepBest()
    callbacks: list[Callback] = [best]
    if f.early_stopping_patience is not None:
        callbacks.append(EarlyStopping("val_acc", mode="max", patience=f.early_stopping_patience))
    data = (loader(bundle.train, f.batch_size, True, seed, workers, drop_last=True),
            loader(bundle.val, f.batch_size, False, seed, workers))

    def finish(history: History) -> tuple[dict[str, Any], dict[str, Any]]:
        if best.state is not None:
            classifier.load_state_dict(best.state)
        pretrained_blocks = len(encoder.blocks) if init == "pretrained" and encoder is not None else 0
        return ({"best_val_accuracy": best.best_accuracy, "best_epoch": best.best_epoch,
                 "pretrained_blocks": pretrained_blocks},
                {"classes": bundle.classes, "arm": init, "best_epoch": best.best_epoch,
                 "split_seed": cfg.seed if split_seed is None else split_seed})

    fit = Fit(classifier_path(out, init), "classifier", data, f.epochs, ARM_SUMMARY, callbacks, val_every)
    record = fit_or_restore(classifier_module(classifier, cfg, init), fit, cfg, out, bundle.channels, resume, finish)
    return ArmResult(init, classifier, record)
