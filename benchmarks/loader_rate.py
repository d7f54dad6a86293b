"""What the CPU side of the data path delivers at 224 px, stage by stage, in images per second.

For the `seed` preset (the reference's 224 px pipeline), on real photos from the data store (the shared
Oxford-IIIT Pet sample by default, or ``--dataset synthetic``), at each batch size, each stage timed on its own
(median over repeats, after one warm-up; a fast stage is repeated for half a second):

- ``gather``: the loader's batch gather from the memory-mapped store (``ImageDataset.__getitems__``: sorted rows
  in one numpy gather, NCHW uint8), random batches as an epoch draws them;
- ``to_float``: uint8 to float in [0, 1] (``transforms.to_float``, channels-last when the preset asks);
- ``augment``: the reference's augmentation (kornia: rotation, zoom, brightness, flip) on the CPU;
- ``transfer`` (with a CUDA GPU only): pin the uint8 batch, copy it to the GPU without blocking, synchronise;
- ``loader``: the real ``DataLoader`` in this process (no workers): gather, hand-over, pinning on CUDA;

then ``cpu_augment_total`` (one core doing gather + to_float + augment per batch, as if augmentation ran on the
CPU) and ``device_augment_total`` (gather + transfer: the project's design, where to_float and the augmentation
run on the GPU). The rates are of one process; ``trainer.num_workers`` worker processes multiply the gather.
The CLI runs under tcmalloc at 128 px and more (README, "Speed"): run this the same way to see what a run gets,
``LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4``; the C library's malloc returns each batch's
memory to the system and faults it in again, which slows the gather several times.

    python benchmarks/loader_rate.py                     # the pets sample at 224 px, batches 32 and 128
    python benchmarks/loader_rate.py --dataset synthetic --json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from aepretrain.config import resolve
from aepretrain.data import prepare
from aepretrain.data.base import Labelled
from aepretrain.data.loading import ImageDataset, loader
from aepretrain.training import set_threads
from aepretrain.transforms import augmenter, to_float

SHARED = Path(os.environ.get("AEPRETRAIN_SHARED", Path(__file__).resolve().parents[2] / "shared"))


def cpu_name() -> str:
    """The CPU's model name (lscpu), its core count here, and whether it computes bf16 (avx512_bf16, amx_bf16)."""
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines()
        model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name")), "unknown")
    except OSError:
        model = "unknown"
    flags = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").is_file() else set()
    bf16 = [flag for flag in ("avx512_bf16", "amx_bf16") if flag in flags]
    return f"{model}, {len(os.sched_getaffinity(0))} cores, {', '.join(bf16) if bf16 else 'no avx512_bf16'}"


def rate(batch: int, work: Callable[[], Any], repeats: int, sync: Callable[[], None], least: float = 0.5) -> float:
    """Images per second over the median of timed calls, after one untimed one: ``repeats`` calls, or more of a
    fast stage until ``least`` seconds have passed (at most 200), so that its median is steady."""
    work()
    sync()
    times: list[float] = []
    while len(times) < repeats or (sum(times) < least and len(times) < 200):
        start = time.perf_counter()
        work()
        sync()
        times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def combined(*rates: float) -> float:
    """The rate of stages run one after the other by one process."""
    return 1 / sum(1 / r for r in rates)


def forever(feed: DataLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    while True:
        yield from feed


def stages(data: Labelled, batch: int, channels_last: bool, augment: torch.nn.Module, repeats: int,
           seed: int) -> dict[str, float]:
    dataset, rng = ImageDataset(data), np.random.default_rng(seed)
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    x = dataset.__getitems__(rng.permutation(len(data))[:batch].tolist())[0]
    floats = to_float(x, channels_last)
    out = {
        "gather": rate(batch, lambda: dataset.__getitems__(rng.permutation(len(data))[:batch].tolist()), repeats,
                       sync),
        "to_float": rate(batch, lambda: to_float(x, channels_last), repeats, sync),
        "augment": rate(batch, lambda: augment(floats), repeats, sync),
    }
    if cuda:
        out["transfer"] = rate(batch, lambda: x.pin_memory().to("cuda", non_blocking=True), repeats, sync)
    batches = forever(loader(data, batch, True, seed, workers=0, drop_last=True))
    out["loader"] = rate(batch, lambda: next(batches), repeats, sync)
    out["cpu_augment_total"] = combined(out["gather"], out["to_float"], out["augment"], *(
        [out["transfer"]] if cuda else []))
    out["device_augment_total"] = combined(out["gather"], out.get("transfer", float("inf")))
    return {k: round(v, 1) for k, v in out.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="oxford-pets", help="oxford-pets (the shared sample) or synthetic")
    p.add_argument("--root", default=str(SHARED / "data" / "oxford-pets-sample"))
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batches", default="32,128")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per stage (median)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    set_threads()
    overrides = [f"data.dataset={args.dataset}", f"data.image_size={args.size}"]
    overrides += [f"data.root={args.root}"] if args.dataset != "synthetic" else \
        ["data.synthetic_classes=37", "data.synthetic_per_class=8"]
    cfg = resolve("seed", overrides=overrides)
    bundle = prepare(cfg.data, cfg.seed, progress=False)
    data = bundle.train
    augment = augmenter(cfg.augment)
    report: dict[str, Any] = {
        "cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "allocator": "tcmalloc" if "tcmalloc" in os.environ.get("LD_PRELOAD", "") else "the C library's malloc",
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "data": f"{bundle.dataset} train split, {len(data)} images at {args.size} px", "rows": []}
    for batch in (int(b) for b in args.batches.split(",")):
        started = time.perf_counter()
        row = {"batch": batch, **stages(data, batch, cfg.trainer.channels_last, augment, args.repeats, cfg.seed)}
        row["seconds"] = round(time.perf_counter() - started, 1)
        report["rows"].append(row)
    if args.json:
        print(json.dumps(report, indent=1))
        return
    print(f"cpu: {report['cpu']}; {report['threads']} threads; torch {report['torch']}; {report['allocator']}; "
          f"gpu: {report['gpu']}")
    print(f"data: {report['data']}; images per second, one process:")
    keys = [k for k in report["rows"][0] if k != "batch"]
    print(f"{'batch':>6} " + " ".join(f"{k:>20}" for k in keys))
    for row in report["rows"]:
        print(f"{row['batch']:>6} " + " ".join(f"{row[k]:>20}" for k in keys))


if __name__ == "__main__":
    main()
