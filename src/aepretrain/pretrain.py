"""Greedy layer-wise pre-training: one autoencoder per encoder block, the earlier blocks frozen.

Stage k trains encoder block k and a new decoder (mirroring blocks k..1) to reconstruct the input
pixels (MSE), with blocks 1..k-1 frozen, BatchNorm statistics included. No labels are used. After
the last stage the encoder's weights initialise the classifier.

Example:
    >>> import tempfile
    >>> from aepretrain.config import resolve
    >>> from aepretrain.data import prepare
    >>> cfg = resolve("tiny")
    >>> result = pretrain(cfg, prepare(cfg.data, cfg.seed), Path(tempfile.mkdtemp()))
    >>> [stage.summary["stage"] for stage in result.stages], result.test_mse > 0
    ([1, 2, 3], True)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from .callbacks import History
from .config import Config
from .data import DataBundle, Labelled
from .data.loading import loader
from .models import Autoencoder, Encoder, build_encoder, summarize
from .seeds import derive_seed
from .training import Fit, Record, TrainingModule, fit_or_restore, trainer
from .transforms import to_float

STAGE_SUMMARY = ("stage", "epochs", "train_loss", "val_loss", "params")


class StageModule(TrainingModule):
    """One greedy stage: the pretext objective's pixel loss, Adam over the trainable (unfrozen) parameters only."""

    def __init__(self, model: Autoencoder, name: str, lr: float, adam_eps: float, schedule: str,
                 channels_last: bool = False, objective: str = "greedy", noise_std: float = 0.0,
                 mask_patch: int = 0, mask_ratio: float = 0.0) -> None:
        super().__init__(model, name, lr, adam_eps, schedule, channels_last=channels_last)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        x, y = batch
        return to_float(x, self.hparams.channels_last), y

    def _loss(self, x: torch.Tensor) -> torch.Tensor:
        """The objective's loss: plain, denoising (noisy input, clean target) or masked (masked pixels only)."""
        h = self.hparams
        if h.objective == "greedy-denoising":
            noisy = (x + h.noise_std * torch.randn_like(x)).clamp(0, 1)
            return F.mse_loss(self(noisy).float(), x.float())
        if h.objective == "greedy-masked":
            mask = patch_mask(x, h.mask_patch or max(1, x.shape[-1] // 8), h.mask_ratio)
            return masked_mse(self(x * (1 - mask)).float(), x.float(), mask)
        return F.mse_loss(self(x).float(), x.float())

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch[0])
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(batch[0]))
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch[0]), prog_bar=True, batch_size=len(batch[0]), sync_dist=True)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x = batch[0]  # plain reconstruction error, whatever the objective, to compare with the reference
        self.log("test_mse", F.mse_loss(self(x).float(), x.float()), batch_size=len(x), sync_dist=True)


def stage_module(autoencoder: Autoencoder, cfg: Config) -> StageModule:
    """The stage's module with the run's pre-training settings."""
    p = cfg.pretrain
    return StageModule(autoencoder, f"stage{autoencoder.stage}", p.lr, p.adam_eps, p.schedule,
                       cfg.trainer.channels_last, p.objective, p.noise_std, p.mask_patch, p.mask_ratio)


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
    stages: list[Record] = field(default_factory=list)
    test_mse: float | None = None


def stage_path(out: Path, stage: int) -> Path:
    return out / "checkpoints" / f"pretrain-stage{stage}.safetensors"


def pretrain(cfg: Config, bundle: DataBundle, out: Path, resume: bool = False,
             images: tuple[Labelled, Labelled] | None = None) -> PretrainResult:
    """Train every greedy stage in turn on the autoencoder subset, validated on ``bundle.ae_val`` (or on
    ``images``: train and validation images); save each stage's weights."""
    L.seed_everything(derive_seed(cfg.seed, "model-init"), verbose=False)
    encoder = build_encoder(cfg.model, bundle.channels, for_classifier=False)
    ae_train, ae_val = (bundle.ae, bundle.ae_val) if images is None else images
    batch, seed, workers = cfg.pretrain.batch_size, cfg.seed, cfg.trainer.num_workers
    result = PretrainResult(encoder)
    shape = (bundle.channels, bundle.image_size, bundle.image_size)
    depth = len(cfg.model.blocks)
    end_to_end = cfg.pretrain.objective == "end-to-end"  # one stage: every block and the full decoder at once
    for stage in [depth] if end_to_end else range(1, depth + 1):
        torch.manual_seed(derive_seed(cfg.seed, "decoder-init", stage))  # needs no earlier stage's draws
        autoencoder = Autoencoder(encoder, stage, frozen=0 if end_to_end else None)
        if cfg.trainer.channels_last:
            autoencoder.to(memory_format=torch.channels_last)

        def finish(history: History, stage: int = stage, autoencoder: Autoencoder = autoencoder
                   ) -> tuple[dict[str, Any], dict[str, Any]]:
            final = history.epochs[-1] if history.epochs else {}
            params = {k: v for k, v in summarize(autoencoder, shape).items() if k != "layers"}
            return {"stage": stage, "epochs": len(history.epochs), "train_loss": final.get("train_loss"),
                    "val_loss": final.get("val_loss"), "params": params}, {"stage": stage}

        data = (loader(ae_train, batch, True, seed, workers, drop_last=True), loader(ae_val, batch, False, seed, workers))
        fit = Fit(stage_path(out, stage), "autoencoder", data, cfg.pretrain.epochs, STAGE_SUMMARY)
        result.stages.append(fit_or_restore(stage_module(autoencoder, cfg), fit, cfg, out, bundle.channels, resume,
                                            finish))
        result.autoencoders.append(autoencoder)
    tester = trainer(cfg.trainer, out, "test", 1, [])
    tested = tester.test(stage_module(result.autoencoders[-1], cfg), loader(bundle.test, batch, False, seed, workers),
                         verbose=False)
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
