"""What every training step shares: batches, on-device augmentation, the Lightning Trainer, history.

Data stays decoded as uint8 in memory; a batch is converted to float and augmented on the device
it trains on (kornia), so the loop does no per-image Python work beyond indexing.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import kornia.augmentation as K
import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .config import AugmentConfig, Config
from .data.base import Labelled


class ImageDataset(Dataset):
    """uint8 images (N, H, W, C) as CHW tensors with their labels; no copies per item."""

    def __init__(self, data: Labelled) -> None:
        self.images = torch.from_numpy(data.images).permute(0, 3, 1, 2)  # a view: NHWC memory, CHW shape
        self.labels = torch.from_numpy(data.labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], self.labels[i]


def loader(data: Labelled, batch_size: int, shuffle: bool, cfg: Config, drop_last: bool = False) -> DataLoader:
    generator = torch.Generator().manual_seed(cfg.seed)  # data order fixed by the seed
    return DataLoader(ImageDataset(data), batch_size=min(batch_size, max(1, len(data))), shuffle=shuffle,
                      drop_last=drop_last and len(data) > batch_size, generator=generator,
                      num_workers=cfg.trainer.num_workers, pin_memory=torch.cuda.is_available(),
                      persistent_workers=cfg.trainer.num_workers > 0)


def augmenter(cfg: AugmentConfig) -> nn.Module:
    """The reference's augmentation, batched: rotation, zoom, multiplicative brightness, horizontal flip."""
    steps: list[nn.Module] = []
    if cfg.rotation or cfg.zoom:
        steps.append(K.RandomAffine(degrees=cfg.rotation, scale=(1 - cfg.zoom, 1 + cfg.zoom), p=1.0))
    if cfg.brightness and tuple(cfg.brightness) != (1.0, 1.0):
        steps.append(K.ColorJitter(brightness=tuple(cfg.brightness), p=1.0))
    if cfg.hflip:
        steps.append(K.RandomHorizontalFlip())
    return nn.Sequential(*steps)


def to_float(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    x = x.float().div_(255.0)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def scheduler(optimizer: torch.optim.Optimizer, schedule: str, lr: float, epochs: int, steps_per_epoch: int
              ) -> dict[str, Any] | None:
    total = max(1, epochs * steps_per_epoch)
    if schedule == "one-cycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total)
    elif schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    else:
        return None
    return {"scheduler": sched, "interval": "step"}


def resolved_precision(requested: str, device: str) -> str:
    """`auto`: bf16 autocast where the hardware computes bf16 natively, else fp32."""
    if requested != "auto":
        return requested
    if device in ("auto", "cuda") and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    if device in ("auto", "cpu") and torch.backends.mkldnn.is_available() and \
            torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "bf16-mixed"
    return "32"


class History(Callback):
    """Per-epoch metrics, as plain floats, kept in the checkpoint so a resumed run has them all."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        row = {"epoch": trainer.current_epoch + 1}
        row |= {k: float(v) for k, v in trainer.callback_metrics.items() if not k.endswith("_step")}
        self.epochs.append({k.removesuffix("_epoch"): v for k, v in row.items()})

    def state_dict(self) -> dict[str, Any]:
        return {"epochs": self.epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epochs = state["epochs"]


def trainer(cfg: Config, out: Path, name: str, epochs: int, callbacks: list[Callback]) -> L.Trainer:
    """A Lightning Trainer with the run's device, precision, logs (CSV, TensorBoard) and a last-epoch checkpoint."""
    t = cfg.trainer
    logs = out / "logs"
    smoke = {"limit_train_batches": 2, "limit_val_batches": 2, "limit_test_batches": 2} if t.smoke else {}
    devices: Any = t.devices if t.devices == "auto" else (int(t.devices) if t.devices.isdigit() else t.devices)
    resume_ckpt = ModelCheckpoint(dirpath=out / "checkpoints" / "resume" / name, filename="last",
                                  save_last=False, save_top_k=1, every_n_epochs=1, enable_version_counter=False)
    bars = [TQDMProgressBar(leave=True)] if t.progress else []
    return L.Trainer(
        accelerator=t.device, devices=devices, num_nodes=t.num_nodes, strategy=t.strategy,
        sync_batchnorm=t.sync_batchnorm, precision=resolved_precision(t.precision, t.device),
        max_epochs=epochs, gradient_clip_val=t.gradient_clip_val, deterministic=False,
        logger=[CSVLogger(logs, name=name, version=""), TensorBoardLogger(logs, name=name, version="")],
        callbacks=[*callbacks, resume_ckpt, *bars], enable_progress_bar=t.progress,
        enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=10, **smoke,
    )


def set_threads() -> None:
    """Use every core for intra-op work; Lightning and PyTorch defaults can leave some idle."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if torch.get_num_threads() != cores:
        torch.set_num_threads(cores)


def steps_per_epoch(n: int, batch_size: int) -> int:
    return max(1, math.ceil(n / batch_size))

