"""Greedy layer-wise pre-training: one autoencoder per encoder block, the earlier blocks frozen.

Stage k trains encoder block k and a new decoder (mirroring blocks k..1) to reconstruct the input
pixels (MSE), with blocks 1..k-1 frozen, BatchNorm statistics included. No labels are used. After
the last stage the encoder's weights initialise the classifier.

Example:
    >>> result = pretrain(cfg, bundle, Path("runs/demo"))  # doctest: +SKIP
    >>> [s["train_loss"] for s in result.stages]  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from .checkpoints import read_finished, save_model
from .config import Config
from .data import DataBundle, Labelled
from .models import Autoencoder, Encoder, build_encoder, summarize
from .training import (History, check_finite, epoch_seed, last_checkpoint, loader, log_samples, scheduler, to_float,
                       trainer, write_json)

STAGE_RECORD = ("stage", "epochs", "train_loss", "val_loss", "seconds", "resumed_from", "history", "params")


class StageModule(L.LightningModule):
    """One greedy stage: pixel MSE, Adam over the trainable (unfrozen) parameters only."""

    def __init__(self, autoencoder: Autoencoder, cfg: Config, out: Path | None) -> None:
        super().__init__()
        self.autoencoder, self.cfg, self.out = autoencoder, cfg, out
        self.name = f"stage{autoencoder.stage}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.autoencoder(x)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        x, y = batch
        return to_float(x, self.cfg.trainer.channels_last), y

    def _loss(self, x: torch.Tensor) -> torch.Tensor:
        """The objective's loss: plain, denoising (noisy input, clean target) or masked (masked pixels only)."""
        p = self.cfg.pretrain
        if p.objective == "greedy-denoising":
            noisy = (x + p.noise_std * torch.randn_like(x)).clamp(0, 1)
            return F.mse_loss(self(noisy).float(), x.float())
        if p.objective == "greedy-masked":
            mask = patch_mask(x, p.mask_patch or max(1, x.shape[-1] // 8), p.mask_ratio)
            return masked_mse(self(x * (1 - mask)).float(), x.float(), mask)
        return F.mse_loss(self(x).float(), x.float())

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch[0])
        check_finite(loss, self, self.name, self.out, batch_idx)
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(batch[0]))
        log_samples(self, len(batch[0]))
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch[0]), prog_bar=True, batch_size=len(batch[0]), sync_dist=True)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x = batch[0]  # plain reconstruction error, whatever the objective, to compare with the reference
        self.log("test_mse", F.mse_loss(self(x).float(), x.float()), batch_size=len(x), sync_dist=True)

    def configure_optimizers(self) -> Any:
        p = self.cfg.pretrain
        params = [q for q in self.autoencoder.parameters() if q.requires_grad]
        optimizer = torch.optim.Adam(params, lr=p.lr, eps=p.adam_eps)
        sched = scheduler(optimizer, p.schedule, p.lr, self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": sched} if sched else optimizer


def patch_mask(x: torch.Tensor, patch: int, ratio: float) -> torch.Tensor:
    """1 on randomly chosen square patches (``ratio`` of them), 0 elsewhere; one mask per image, shape N1HW."""
    n, _, h, w = x.shape
    grid = torch.rand(n, 1, -(-h // patch), -(-w // patch), device=x.device) < ratio
    return grid.repeat_interleave(patch, 2).repeat_interleave(patch, 3)[:, :, :h, :w].to(x.dtype)


def masked_mse(reconstruction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over masked pixels only (mask N1HW broadcast over channels)."""
    mask = mask.expand_as(target)
    return ((reconstruction - target) ** 2 * mask).sum() / mask.sum().clamp(min=1)


@dataclass
class PretrainResult:
    encoder: Encoder
    autoencoders: list[Autoencoder] = field(default_factory=list)
    stages: list[dict[str, Any]] = field(default_factory=list)
    test_mse: float | None = None


def stage_path(out: Path, stage: int) -> Path:
    return out / "checkpoints" / f"pretrain-stage{stage}.safetensors"


def pretrain(cfg: Config, bundle: DataBundle, out: Path, resume: bool = False,
             images: tuple[Labelled, Labelled] | None = None) -> PretrainResult:
    """Train every greedy stage in turn on the autoencoder subset, validated on ``bundle.ae_val`` (or on
    ``images``: train and validation images); save each stage's weights."""
    L.seed_everything(cfg.seed, verbose=False)
    encoder = build_encoder(cfg.model, bundle.channels, for_classifier=False)
    ae_train, ae_val = (bundle.ae, bundle.ae_val) if images is None else images
    batch = cfg.pretrain.batch_size
    result = PretrainResult(encoder)
    shape = (bundle.channels, bundle.image_size, bundle.image_size)
    depth = len(cfg.model.blocks)
    end_to_end = cfg.pretrain.objective == "end-to-end"  # one stage: every block and the full decoder at once
    for stage in [depth] if end_to_end else range(1, depth + 1):
        torch.manual_seed(epoch_seed(cfg.seed, stage, salt=2))  # the decoder's start needs no earlier stage's draws
        autoencoder = Autoencoder(encoder, stage, frozen=0 if end_to_end else None)
        if cfg.trainer.channels_last:
            autoencoder.to(memory_format=torch.channels_last)
        module = StageModule(autoencoder, cfg, out)
        weights = stage_path(out, stage)
        record = read_finished(autoencoder, weights.with_suffix(".json"), weights, "autoencoder", STAGE_RECORD) \
            if resume else None  # finished before the interruption: its weights, not a second training
        if record is None:
            history = History(cfg.seed)
            fit = trainer(cfg, out, module.name, cfg.pretrain.epochs, [history])
            fit.fit(module, loader(ae_train, batch, True, cfg, drop_last=True), loader(ae_val, batch, False, cfg),
                    ckpt_path=last_checkpoint(out, module.name, resume), weights_only=True)
            save_model(autoencoder, weights, "autoencoder", cfg, bundle.channels, {"stage": stage})
            final = history.epochs[-1] if history.epochs else {}
            record = {
                "stage": stage, "epochs": len(history.epochs), "train_loss": final.get("train_loss"),
                "val_loss": final.get("val_loss"), "seconds": history.seconds(), "resumed_from": history.resumed_from,
                "history": history.epochs,
                "params": {k: v for k, v in summarize(autoencoder, shape).items() if k != "layers"},
            }
            write_json(weights.with_suffix(".json"), record)
        result.autoencoders.append(autoencoder)
        result.stages.append(record)
    last = result.autoencoders[-1]
    tester = trainer(cfg, out, "test", 1, [])
    tested = tester.test(StageModule(last, cfg, out), loader(bundle.test, batch, False, cfg), verbose=False)
    result.test_mse = float(tested[0]["test_mse"])
    return result


@torch.no_grad()
def reconstruct(autoencoders: list[Autoencoder], images: torch.Tensor) -> list[torch.Tensor]:
    """Each stage's reconstruction of ``images`` (float in [0, 1], NCHW), clipped to [0, 1]."""
    outputs = []
    for autoencoder in autoencoders:
        was_training = autoencoder.training
        autoencoder.eval()
        outputs.append(autoencoder(images).float().clamp(0, 1))
        autoencoder.train(was_training)
    return outputs
