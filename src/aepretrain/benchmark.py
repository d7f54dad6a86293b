"""Throughput against the hardware limit: the bare train step, the end-to-end loop and inference.

For the classifier and each greedy stage's autoencoder, in one process: images per second (median
over timed steps after warm-up), FLOPs per image counted from the model (forward and backward of a
train step), the achieved GFLOP/s, and that as a fraction of this machine's matrix-multiply rate,
measured in the same run for fp32 and bf16. Each measurement keeps to a time budget: a slow model
(the reference's autoencoders at 224 px on a CPU) gets fewer steps, down to one timed step. Without
``precisions``, a CPU that computes bf16 adds a bf16 row (``$AEPRETRAIN_CPU_BF16`` forces either way).

Example:
    >>> from aepretrain.config import resolve
    >>> report = bench(resolve("tiny"), size=16, batch=8, precisions=["32"], warmup=1, steps=1, only=["classifier"],
    ...                seconds=5)
    >>> [(row["model"], row["precision"]) for row in report["rows"]], report["rows"][0]["step_img_s"] > 0
    ([('classifier', '32')], True)
"""

from __future__ import annotations

import platform
import statistics
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .config import Config
from .data.base import Labelled
from .data.loading import loader
from .finetune import classifier_module
from .models import Autoencoder, Classifier, build_encoder
from .pretrain import stage_module
from .seeds import numpy_generator
from .training import resolved_precision, set_threads

AUTOCAST = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def _autocast(precision: str, device: torch.device) -> Any:
    dtype = AUTOCAST.get(precision)
    return torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_gflops(device: torch.device, dtype: torch.dtype, repeats: int = 3) -> float:
    """The machine's dense matrix-multiply rate, the best over a few sizes (the library's kernels differ by size).

    It is a reference, not a hard ceiling: oneDNN's convolution kernels can beat the BLAS matmul on a CPU.
    """
    best = 0.0
    for n in (8192,) if device.type == "cuda" else (1024, 2048, 4096):
        a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
        times = []
        for i in range(repeats + 1):
            _sync(device)
            start = time.perf_counter()
            a @ b
            _sync(device)
            if i:  # the first product warms up
                times.append(time.perf_counter() - start)
        best = max(best, 2 * n**3 / statistics.median(times) / 1e9)
    return best


def _models(cfg: Config, channels: int, classes: int) -> list[tuple[str, nn.Module]]:
    spec = cfg.model
    models: list[tuple[str, nn.Module]] = [
        ("classifier", Classifier(build_encoder(spec, channels, True), classes, spec.dropout))]
    for k in range(1, len(spec.blocks) + 1):  # an encoder each: building stage k freezes blocks below k
        models.append((f"stage{k}", Autoencoder(build_encoder(spec, channels, False), k)))
    return models


def _loss(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    out = model(x).float()
    return F.cross_entropy(out, y) if name == "classifier" else F.mse_loss(out, x.float())


def train_flops_per_image(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    counter = FlopCounterMode(display=False)
    with counter:
        _loss(name, model, x, y).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / len(x)


def step_plan(seconds_per_step: float, warmup: int, steps: int, budget: float, least_warmup: int = 1
              ) -> tuple[int, int]:
    """(warm-up steps, timed steps) that fit ``budget`` seconds at ``seconds_per_step``: at least one timed step
    and ``least_warmup`` warm-ups, up to three timed steps before further warm-ups, at most ``warmup`` and ``steps``.
    A budget of 0 or less sets no limit.

    >>> step_plan(0.05, warmup=3, steps=10, budget=10)  # a fast model: every step asked for
    (3, 10)
    >>> step_plan(1.0, warmup=3, steps=10, budget=10)
    (3, 7)
    >>> step_plan(14.0, warmup=3, steps=10, budget=10)  # slower than the budget: the least there is
    (1, 1)
    >>> step_plan(14.0, warmup=3, steps=10, budget=10, least_warmup=0)  # a loop that starts warm
    (0, 1)
    """
    fit = int(budget // seconds_per_step) if budget > 0 and seconds_per_step > 0 else warmup + steps
    timed = max(1, min(fit - least_warmup, 3, steps))
    warm = max(least_warmup, min(fit - timed, warmup))
    return warm, timed + max(0, min(fit - timed - warm, steps - timed))


def _seconds(step: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    step()
    _sync(device)
    return time.perf_counter() - start


def median_rate(batch: int, step: Callable[[], Any], warmup: int, steps: int, budget: float, device: torch.device
                ) -> tuple[float, int]:
    """Images per second over the median timed step, and how many were timed; the first (untimed) step's
    duration sizes the rest to the budget."""
    first = _seconds(step, device)
    warm, timed = step_plan(first, warmup, steps, budget)
    for _ in range(warm - 1):
        _seconds(step, device)
    return batch / statistics.median([_seconds(step, device) for _ in range(timed)]), timed


class BatchClock(Callback):
    """Times whole loop iterations: loading, transfer, augmentation and the step, end to end (the first from the
    epoch's start, so that a slow model needs a single batch)."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_train_epoch_start(self, *args: Any) -> None:
        self.ends.append(time.perf_counter())

    def on_train_batch_end(self, *args: Any) -> None:
        self.ends.append(time.perf_counter())


def loop_rate(name: str, model: nn.Module, cfg: Config, data: Labelled, batch: int, warmup: int, timed: int,
              precision: str) -> float:
    """The real training loop (Lightning, the cached-data loader, on-device augmentation), per batch."""
    clock = BatchClock()
    module = classifier_module(model, cfg, name) if name == "classifier" else stage_module(model, cfg)
    fit = L.Trainer(accelerator=cfg.trainer.device, devices=1, precision=precision, max_epochs=1,
                    limit_train_batches=warmup + timed, limit_val_batches=0, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    callbacks=[clock])
    with warnings.catch_warnings():  # the modules' validation_step is for training runs, not this loop
        warnings.filterwarnings("ignore", message=".*no `val_dataloader`.*")
        fit.fit(module, loader(data, batch, True, cfg.seed, cfg.trainer.num_workers, drop_last=True))
    gaps = np.diff(clock.ends)[warmup:]
    return batch / float(np.median(gaps))


def measure(name: str, model: nn.Module, cfg: Config, data: Labelled, precision: str, device: torch.device,
            size: int, batch: int, warmup: int, steps: int, budget: float, ceiling: float) -> dict[str, Any]:
    """One row: the bare step on synthetic tensors, inference, and the whole Lightning loop on cached data,
    each within ``budget`` seconds where the model allows."""
    channels, classes = cfg.model.in_channels, cfg.model.num_classes
    model.to(device)
    if cfg.trainer.channels_last:
        model.to(memory_format=torch.channels_last)
    x = torch.rand(batch, channels, size, size, device=device)
    x = x.contiguous(memory_format=torch.channels_last) if cfg.trainer.channels_last else x
    y = torch.randint(0, classes, (batch,), device=device)
    flops = train_flops_per_image(name, model, x[:2], y[:2])
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with _autocast(precision, device):
            loss = _loss(name, model, x, y)
        loss.backward()
        optimizer.step()

    def infer() -> None:
        with torch.no_grad(), _autocast(precision, device):
            model(x)

    step_rate, step_count = median_rate(batch, step, warmup, steps, budget, device)
    model.eval()
    infer_rate, infer_count = median_rate(batch, infer, warmup, steps, budget, device)
    model.train()
    # the model is warm from the bare step, so the loop needs no warm-up of its own when time is short
    loop_warm, loop_count = step_plan(batch / step_rate, warmup, steps, budget, least_warmup=0)
    loop = loop_rate(name, model, cfg, data, batch, loop_warm, loop_count, precision)
    achieved = flops * step_rate / 1e9
    return {"model": name, "size": size, "batch": batch, "precision": precision,
            "step_img_s": round(step_rate, 2), "loop_img_s": round(loop, 2), "infer_img_s": round(infer_rate, 2),
            "gflop_per_img": round(flops / 1e9, 3), "achieved_gflops": round(achieved, 1),
            "fraction_of_matmul": round(achieved / ceiling, 3),
            "timed_steps": {"step": step_count, "loop": loop_count, "infer": infer_count}}


def bench(cfg: Config, size: int, batch: int, precisions: list[str] | None = None, warmup: int = 3,
          steps: int = 10, only: list[str] | None = None, seconds: float = 10.0,
          progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Every model (or ``only`` those) at every precision (default: fp32, and bf16 or fp16 where the hardware
    computes it natively: never an emulated one). ``seconds`` is the budget of each measurement (step, loop,
    inference of one model): slow models get fewer timed steps; 0 sets no limit. ``progress`` gets a line per
    measurement."""
    say = progress or (lambda line: None)
    set_threads()
    device = torch.device("cuda" if cfg.trainer.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    default = resolved_precision("auto", device.type)
    precisions = precisions or (["32", default] if default != "32" else ["32"])
    channels, classes = cfg.model.in_channels, cfg.model.num_classes
    rates = {"fp32": matmul_gflops(device, torch.float32)}
    if device.type == "cuda" or default == "bf16-mixed":
        rates["bf16"] = matmul_gflops(device, torch.bfloat16)
    say("bench: matmul " + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in rates.items()))
    rng = numpy_generator(cfg.seed, "bench-images")
    n = batch * (warmup + steps + 2)
    data = Labelled(rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8),
                    rng.integers(0, classes, n).astype(np.int64), [str(i) for i in range(n)])
    jobs = [(precision, name, model) for precision in precisions for name, model in _models(cfg, channels, classes)
            if not only or name in only]
    rows = []
    for k, (precision, name, model) in enumerate(jobs, 1):
        started = time.perf_counter()
        ceiling = rates["bf16" if precision in AUTOCAST and "bf16" in rates else "fp32"]
        row = measure(name, model, cfg, data, precision, device, size, batch, warmup, steps, seconds, ceiling)
        rows.append(row)
        say(f"bench: [{k}/{len(jobs)}] {name} {precision} at {size} px, batch {batch}: step {row['step_img_s']} img/s "
            f"({row['fraction_of_matmul']:.0%} of matmul), loop {row['loop_img_s']}, inference {row['infer_img_s']}; "
            f"{row['timed_steps']['step']} timed steps, {time.perf_counter() - started:.0f} s")
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    return {"device": name, "torch": torch.__version__, "matmul_gflops": {k: round(v, 1) for k, v in rates.items()},
            "rows": rows}


def table(report: dict[str, Any]) -> str:
    head = ["model", "size", "batch", "precision", "step_img_s", "loop_img_s", "infer_img_s", "gflop_per_img",
            "achieved_gflops", "fraction_of_matmul"]
    lines = [f"device: {report['device']}, matmul GFLOP/s: {report['matmul_gflops']}",
             " ".join(f"{h:>14}" for h in head) + "  timed steps (step/loop/infer)"]
    lines += [" ".join(f"{str(row[h]):>14}" for h in head) + "  " + "/".join(map(str, row["timed_steps"].values()))
              for row in report["rows"]]
    return "\n".join(lines)
