"""What every training step shares: batches, on-device augmentation, the Lightning Trainer, history.

Data stays decoded as uint8 in the memory-mapped store; a batch is gathered from it at once, converted to float
and augmented on the device it trains on (kornia), so the loop does no per-image Python work.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kornia.augmentation as K
import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from .config import AugmentConfig, Config
from .data.base import Labelled
from .errors import UserError
from .seeds import derive_seed
from .fileio import atomic_write, first_line, write_stream


class ImageDataset(Dataset):
    """Images as CHW uint8 tensors with their labels, gathered a whole batch at a time from the store.

    ``__getitems__`` takes a batch's indices, reads their rows in file order (sorted: the page cache reads
    forward) in one numpy gather, and returns the batch in that order: one copy per batch, no Python work per
    image. The order within a batch is then a function of the sampler's, so still of (seed, epoch) only.
    """

    def __init__(self, data: Labelled) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.__getitems__([i])
        return x[0], y[0]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = np.sort(np.asarray(indices, np.int64))
        x = torch.from_numpy(self.data.images.gather(index)).permute(0, 3, 1, 2)  # NHWC memory, NCHW shape
        return x, torch.from_numpy(self.data.labels[index])


def whole_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The DataLoader's collate step: ``ImageDataset.__getitems__`` already returns the batch."""
    return batch


class EpochShuffle(Sampler[int]):
    """A random order that depends only on (seed, epoch): a resumed run sees the same order as an unbroken one."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this at the start of every epoch
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        return iter(torch.randperm(self.n, generator=generator).tolist())


def epoch_seed(seed: int, epoch: int, salt: int = 0) -> int:
    return (seed * 1_000_003 + epoch * 7919 + salt) % (2**63)


def loader(data: Labelled, batch_size: int, shuffle: bool, cfg: Config, drop_last: bool = False) -> DataLoader:
    """Batches of ``data``. The loader draws its workers' base seed from a generator of its own, not from the
    global one: Lightning creates the iterator at another moment in a resumed fit than in an unbroken one, and a
    draw from the global generator there would shift the augmentation and dropout of the epoch."""
    return DataLoader(ImageDataset(data), batch_size=min(batch_size, max(1, len(data))), collate_fn=whole_batch,
                      sampler=EpochShuffle(len(data), cfg.seed) if shuffle else None,
                      drop_last=drop_last and len(data) > batch_size,
                      num_workers=cfg.trainer.num_workers, pin_memory=torch.cuda.is_available(),
                      persistent_workers=cfg.trainer.num_workers > 0,
                      generator=torch.Generator().manual_seed(derive_seed(cfg.seed, "loader")))


def batches_per_epoch(n: int, batch_size: int, drop_last: bool) -> int:
    """The optimizer steps one epoch of ``loader(n images, batch_size, drop_last=...)`` really makes."""
    if n <= batch_size:
        return 1 if n else 0
    return n // batch_size if drop_last else math.ceil(n / batch_size)


def augmenter(cfg: AugmentConfig) -> nn.Module:
    """The reference's augmentation, batched: rotation, zoom, multiplicative brightness, horizontal flip."""
    steps: list[nn.Module] = []
    if cfg.rotation or cfg.zoom:
        zoom = (1 - cfg.zoom, 1 + cfg.zoom)
        steps.append(K.RandomAffine(degrees=cfg.rotation, scale=zoom * 2 if cfg.zoom_axes == "independent" else zoom,
                                    padding_mode="border" if cfg.fill == "nearest" else "zeros", p=1.0))
    if cfg.brightness and tuple(cfg.brightness) != (1.0, 1.0):
        steps.append(K.ColorJitter(brightness=tuple(cfg.brightness), p=1.0))
    if cfg.hflip:
        steps.append(K.RandomHorizontalFlip())
    return nn.Sequential(*steps)


def to_float(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    x = x.float().div_(255.0)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


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
    """Per-epoch metrics and seconds, as plain floats, kept in the checkpoint so a resumed run has them all.

    It also reseeds the global random generator at the start of each epoch from (seed, epoch), so
    augmentation and dropout draw the same numbers in a resumed run as in an unbroken one.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.epochs: list[dict[str, float]] = []
        self.resumed_from: int | None = None
        self._started = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        torch.manual_seed(epoch_seed(self.seed, trainer.current_epoch, salt=1) + trainer.global_rank)
        self._started = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        row = {"epoch": trainer.current_epoch + 1, "step": trainer.global_step,
               "seconds": round(time.perf_counter() - self._started, 3)}
        row |= {k: float(v) for k, v in trainer.callback_metrics.items() if not k.endswith("_step")}
        self.epochs.append({k.removesuffix("_epoch"): v for k, v in row.items()})

    def state_dict(self) -> dict[str, Any]:
        return {"epochs": self.epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epochs = state["epochs"]
        self.resumed_from = len(self.epochs)  # only a resumed fit loads a state

    def seconds(self) -> float:
        return round(sum(row["seconds"] for row in self.epochs), 2)


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
        try:
            return torch.load(path, map_location="cpu", weights_only=True)  # never unpickles code
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
            raise UserError(f"cannot load checkpoint {path} safely: {first_line(exc)[:200]}") from None


def trainer(cfg: Config, out: Path, name: str, epochs: int, callbacks: list[Callback]) -> L.Trainer:
    """A Lightning Trainer with the run's device, precision, logs (CSV, TensorBoard) and a last-epoch checkpoint."""
    t = cfg.trainer
    logs = out / "logs"
    smoke = {"limit_train_batches": 2, "limit_val_batches": 2, "limit_test_batches": 2} if t.smoke else {}
    devices: Any = t.devices if t.devices == "auto" else (int(t.devices) if t.devices.isdigit() else t.devices)
    resume_ckpt = ModelCheckpoint(dirpath=resume_dir(out, name), filename="last", save_top_k=1, every_n_epochs=1,
                                  save_on_train_epoch_end=True, enable_version_counter=False)
    bars = [TQDMProgressBar(leave=True)] if t.progress else []
    try:
        return L.Trainer(
            accelerator=t.device, devices=devices, num_nodes=t.num_nodes, strategy=t.strategy,
            sync_batchnorm=t.sync_batchnorm, precision=resolved_precision(t.precision, t.device),
            max_epochs=epochs, gradient_clip_val=t.gradient_clip_val, deterministic=False,
            logger=[CSVLogger(logs, name=name, version=""), TensorBoardLogger(logs, name=name, version="")],
            callbacks=[*callbacks, FiniteEpoch(), resume_ckpt, *bars], enable_progress_bar=t.progress,
            plugins=[AtomicCheckpointIO()],
            enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=10, **smoke,
        )
    except (MisconfigurationException, ValueError, RuntimeError) as exc:  # a device, strategy or precision
        raise UserError(f"cannot set up training with device={t.device}, devices={t.devices}, "
                        f"strategy={t.strategy}, precision={t.precision}: {first_line(exc)}") from None


def resume_dir(out: Path, name: str) -> Path:
    return out / "checkpoints" / "resume" / name


def last_checkpoint(out: Path, name: str, resume: bool) -> Path | None:
    path = resume_dir(out, name) / "last.ckpt"
    return path if resume and path.is_file() else None


def log_samples(module: L.LightningModule, count: int) -> None:
    """Images trained on per epoch, summed over all processes: a check that DDP splits, not repeats, the data."""
    module.log("samples", float(count), on_step=False, on_epoch=True, reduce_fx="sum", sync_dist=True)


def is_global_zero() -> bool:
    """True in the one process that writes files (every process when not distributed)."""
    return getattr(rank_zero_only, "rank", 0) == 0


def write_json(path: Path, value: Any) -> None:
    """Written whole or not at all: a temporary file, then a rename; by the first process only."""
    if not is_global_zero():
        return
    atomic_write(path, json.dumps(value, indent=2))


def check_finite(loss: torch.Tensor, module: L.LightningModule, name: str, out: Path | None, batch_idx: int) -> None:
    """Stop at the first NaN or infinite loss, saying where and which checkpoint is the last good one.

    Under DDP every process learns of a fault in any of them, so that none waits for the others forever.
    """
    bad = not bool(torch.isfinite(loss))
    if module.trainer.world_size > 1:
        bad = module.trainer.strategy.reduce_boolean_decision(bad, all=False)
    if bad:
        raise UserError(f"{name}: the loss became {float(loss.detach())} at epoch {module.current_epoch + 1}, step "
                        f"{batch_idx + 1}; {_last_good(out, name)}. Lower the learning rate or set "
                        "trainer.gradient_clip_val")


def _last_good(out: Path | None, name: str) -> str:
    last = resume_dir(out, name) / "last.ckpt" if out else None
    return f"the last good checkpoint is {last} (--resume continues from it)" if last and last.is_file() else \
        "no epoch finished, so there is no checkpoint yet"


class FiniteEpoch(Callback):
    """The loss of an epoch's last step can be finite while the update it made is not, or makes the validation loss
    infinite. Each epoch's losses and weights are checked at its end, after validation and before its checkpoint is
    written (Lightning calls checkpointing last), so that no stage or arm is saved, or recorded as finished, broken.
    Every DDP process holds the same weights and synced validation losses, so each stops on its own."""

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        values = {k: v for k, v in trainer.callback_metrics.items() if k.endswith("_loss")}
        values |= {f"weight {n}": p for n, p in module.named_parameters()}
        bad = next((k for k, v in values.items() if not bool(torch.isfinite(v).all())), None)
        if bad is not None:
            name = getattr(module, "name", "training")
            raise UserError(f"{name}: {bad} became non-finite in epoch {trainer.current_epoch + 1}, though every "
                            f"step's loss was finite; {_last_good(getattr(module, 'out', None), name)}. Lower the "
                            "learning rate or set trainer.gradient_clip_val")


def set_threads() -> None:
    """Use every core for intra-op work; Lightning and PyTorch defaults can leave some idle."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if torch.get_num_threads() != cores:
        torch.set_num_threads(cores)
