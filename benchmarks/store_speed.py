"""Training throughput from the memory-mapped store against the same images as arrays in memory, side by side.

One process, the `quick` preset's fine-tuning step (its classifier, batch, optimizer, augmentation and precision),
fed three ways, one step each in turn, so that whatever else the machine does hits them alike:

- ``store``: ``loader()`` over the store (batches gathered from the memory map: the new path),
- ``memory``: ``loader()`` over the same images copied into a numpy array,
- ``memory, per image``: main's old loader: one ``__getitem__`` per image and the default collate, in memory.

A step is timed from asking the loader for the batch to the optimizer's update; each feed trains its own copy
of the classifier (same start). Images per second = batch / median step time. Apart, the loaders alone
(batches drawn, nothing done with them) show the data path's own cost.

    python benchmarks/store_speed.py --steps 60
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from aepretrain.config import resolve
from aepretrain.data import prepare
from aepretrain.data.base import Labelled
from aepretrain.finetune import new_classifier
from aepretrain.data.loading import EpochShuffle, loader
from aepretrain.training import resolved_precision, set_threads
from aepretrain.transforms import augmenter, to_float


class PerImage(Dataset):
    """Main's ImageDataset before the store: a view per item, stacked by the default collate."""

    def __init__(self, data: Labelled) -> None:
        self.images = torch.from_numpy(np.asarray(data.images)).permute(0, 3, 1, 2)
        self.labels = torch.from_numpy(data.labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], self.labels[i]


def forever(feed: DataLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    while True:
        yield from feed


def loader_alone(feed: DataLoader, batches: int) -> float:
    """Images per second the loader alone delivers."""
    started, seen = time.perf_counter(), 0
    for (x, _), _ in zip(feed, range(batches)):
        seen += len(x)
    return seen / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="timed steps per feed")
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    set_threads()
    cfg = resolve("quick", **{"trainer.progress": False})
    precision = resolved_precision(cfg.trainer.precision, "cpu")
    bundle = prepare(cfg.data, cfg.seed, progress=False)
    batch = cfg.finetune.batch_size
    stored = bundle.train
    in_memory = Labelled(np.asarray(stored.images), stored.labels, stored.names)
    feeds = {
        "store": loader(stored, batch, True, cfg.seed, drop_last=True),
        "memory": loader(in_memory, batch, True, cfg.seed, drop_last=True),
        "memory, per image": DataLoader(PerImage(in_memory), batch_size=batch, drop_last=True,
                                        sampler=EpochShuffle(len(in_memory), cfg.seed)),
    }
    first = new_classifier(cfg, bundle, None).to(memory_format=torch.channels_last)
    models = {name: copy.deepcopy(first) for name in feeds}
    optimizers = {name: torch.optim.Adam(m.parameters(), lr=cfg.finetune.lr) for name, m in models.items()}
    batches = {name: forever(feed) for name, feed in feeds.items()}
    augment = augmenter(cfg.augment)
    times: dict[str, list[float]] = {name: [] for name in feeds}
    for step in range(args.warmup + args.steps):
        for name in feeds:
            started = time.perf_counter()
            x, y = next(batches[name])
            x = augment(to_float(x, False)).contiguous(memory_format=torch.channels_last)
            with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16-mixed"):
                loss = F.cross_entropy(models[name](x).float(), y)
            optimizers[name].zero_grad(set_to_none=True)
            loss.backward()
            optimizers[name].step()
            if step >= args.warmup:
                times[name].append(time.perf_counter() - started)
    rates = {name: batch / statistics.median(t) for name, t in times.items()}
    alone = {name: loader_alone(feed, len(stored) // batch) for name, feed in feeds.items()}
    print(json.dumps({"images": len(stored), "batch": batch, "precision": precision, "threads": torch.get_num_threads(),
                      "timed_steps": args.steps, "step_img_s": rates,
                      "store_over_memory": rates["store"] / rates["memory"],
                      "store_over_per_image": rates["store"] / rates["memory, per image"],
                      "loader_alone_img_s": alone}, indent=2))


if __name__ == "__main__":
    main()
