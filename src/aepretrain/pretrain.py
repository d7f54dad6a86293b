"""Pre-training: an objective trains the encoder, stage by stage with the earlier blocks frozen, or all at once.

Greedy stage k trains encoder block k and a new head (a decoder mirroring blocks k..1, for the reference's
pixel MSE), with blocks 1..k-1 frozen, BatchNorm statistics included; an end-to-end objective (the full
autoencoder, SimCLR, BYOL) trains every block at once as one stage. No labels are used. The objectives
themselves are small pieces (objectives.py); this module runs any of them the same way. After the last stage
the encoder's weights initialise the classifier.

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

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from .callbacks import History
from .config import Config, PretrainConfig
from .data import DataBundle, Labelled
from .data.loading import loader
from .models import Autoencoder, Encoder, build_encoder, evaluating_on, summarize
from .objectives import objective_of
from .seeds import derive_seed
from .training import Fit, Record, TrainingModule, fit_or_restore, trainer
from .transforms import to_float

STAGE_SUMMARY = ("stage", "epochs", "train_loss", "val_loss", "params")


class StageModule(TrainingModule):
    """One stage of an objective: its loss, Adam over the trainable parameters only (neither the frozen blocks nor a
    momentum target). ``settings`` are the run's pre-training settings, as plain values."""

    def __init__(self, model: nn.Module, name: str, lr: float, adam_eps: float, schedule: str,
                 channels_last: bool, settings: dict[str, Any]) -> None:
        super().__init__(model, name, lr, adam_eps, schedule, channels_last=channels_last)
        self.objective = objective_of(PretrainConfig(**settings))

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        x, y = batch
        return to_float(x, self.hparams.channels_last), y

    def _loss(self, x: torch.Tensor) -> torch.Tensor:
        return self.objective.loss(self.model, x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch[0])
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(batch[0]))
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """After the optimizer's step: BYOL's target follows the online network here."""
        self.objective.after_step(self.model, self.trainer.global_step, int(self.trainer.estimated_stepping_batches))

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch[0]), prog_bar=True, batch_size=len(batch[0]), sync_dist=True)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x = batch[0]  # plain reconstruction error, whatever the objective, to compare with the reference
        self.log("test_mse", F.mse_loss(self(x).float(), x.float()), batch_size=len(x), sync_dist=True)


def stage_module(network: nn.Module, cfg: Config) -> StageModule:
    """The stage's module with the run's pre-training settings."""
    p = cfg.pretrain
    return StageModule(network, f"stage{network.stage}", objective_of(p).learning_rate, p.adam_eps, p.schedule,
                       cfg.trainer.channels_last, dataclasses.asdict(p))


@dataclass
class PretrainResult:
    encoder: Encoder
    networks: list[nn.Module] = field(default_factory=list)  # each stage's network: the encoder's blocks and a head
    stages: list[Record] = field(default_factory=list)
    test_mse: float | None = None  # the last stage's reconstruction error, for an objective that reconstructs

    @property
    def autoencoders(self) -> list[Autoencoder]:
        return [network for network in self.networks if isinstance(network, Autoencoder)]


def stage_path(out: Path, stage: int) -> Path:
    return out / "checkpoints" / f"pretrain-stage{stage}.safetensors"


def pretrain(cfg: Config, bundle: DataBundle, out: Path, resume: bool = False,
             images: tuple[Labelled, Labelled] | None = None) -> PretrainResult:
    """Train every stage of the objective in turn on the autoencoder subset, validated on ``bundle.ae_val`` (or on
    ``images``: train and validation images); save each stage's network."""
    L.seed_everything(derive_seed(cfg.seed, "model-init"), verbose=False)
    encoder = build_encoder(cfg.model, bundle.channels, for_classifier=False)
    objective = objective_of(cfg.pretrain)
    ae_train, ae_val = (bundle.ae, bundle.ae_val) if images is None else images
    batch, seed, workers = cfg.pretrain.batch_size, cfg.seed, cfg.trainer.num_workers
    result = PretrainResult(encoder)
    shape = (bundle.channels, bundle.image_size, bundle.image_size)
    for stage in objective.stages(len(cfg.model.blocks)):
        torch.manual_seed(derive_seed(cfg.seed, "decoder-init", stage))  # the head; needs no earlier stage's draws
        network = objective.network(encoder, stage)
        if cfg.trainer.channels_last:
            network.to(memory_format=torch.channels_last)

        def finish(history: History, stage: int = stage, network: nn.Module = network
                   ) -> tuple[dict[str, Any], dict[str, Any]]:
            final = history.epochs[-1] if history.epochs else {}
            params = {k: v for k, v in summarize(network, shape).items() if k != "layers"}
            return {"stage": stage, "epochs": len(history.epochs), "train_loss": final.get("train_loss"),
                    "val_loss": final.get("val_loss"), "params": params}, {"stage": stage}

        data = (loader(ae_train, batch, True, seed, workers, drop_last=True), loader(ae_val, batch, False, seed, workers))
        fit = Fit(stage_path(out, stage), objective.kind, data, cfg.pretrain.epochs, STAGE_SUMMARY)
        result.stages.append(fit_or_restore(stage_module(network, cfg), fit, cfg, out, bundle.channels, resume, finish))
        result.networks.append(network)
    if objective.reconstructs:
        tester = trainer(cfg.trainer, out, "test", 1, [])
        tested = tester.test(stage_module(result.networks[-1], cfg), loader(bundle.test, batch, False, seed, workers),
                             verbose=False)
        result.test_mse = float(tested[0]["test_mse"])
    return result


@torch.no_grad()
def reconstruct(autoencoders: list[Autoencoder], images: torch.Tensor, device: torch.device | None = None
                ) -> list[torch.Tensor]:
    """Each stage's reconstruction of ``images`` (float in [0, 1], NCHW), clipped to [0, 1], computed on ``device``
    (where the images are, if None) and returned on the CPU; each autoencoder goes back where it was."""
    device = images.device if device is None else device
    images = images.to(device)
    outputs = []
    for autoencoder in autoencoders:
        with evaluating_on(autoencoder, device):
            outputs.append(autoencoder(images).float().clamp(0, 1).cpu())
    return outputs
