"""Training throughput from the memory-mapped store against the same images as arrays in memory, side by side.

One process, the `quick` preset's fine-tuning step (its classifier, batch, augmentation and precision), three
ways of feeding it, taken in turn for several rounds so that whatever else the machine does hits them alike:

- ``store``: ``loader()`` over the store (batches gathered from the memory map: the new path),
- ``memory``: ``loader()`` over the same images copied into a numpy array,
- ``memory, per image``: main's old loader: one ``__getitem__`` per image and the default collate, in memory.

Rates are images per second of whole loop iterations (loader, transfer, augmentation, step), the median gap
between batch ends after warm-up, as `aepretrain bench` measures its loop; and, apart, of the loader alone
(batches drawn and nothing done with them), which shows the data path's own cost.

    python benchmarks/store_speed.py --rounds 5 --steps 30
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from aepretrain.bench import BatchClock
from aepretrain.config import resolve
from aepretrain.data import prepare
from aepretrain.data.base import Labelled
from aepretrain.finetune import ClassifierModule, new_classifier
from aepretrain.training import EpochShuffle, loader, resolved_precision, set_threads

import lightning as L


class PerImage(Dataset):
    """Main's ImageDataset before the store: a view per item, stacked by the default collate."""

    def __init__(self, data: Labelled) -> None:
        self.images = torch.from_numpy(np.asarray(data.images)).permute(0, 3, 1, 2)
        self.labels = torch.from_numpy(data.labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], self.labels[i]


def loop_rate(cfg, bundle, feed: DataLoader, batch: int, warmup: int, steps: int) -> float:
    clock = BatchClock()
    classifier = new_classifier(cfg, bundle, None).to(memory_format=torch.channels_last)
    fit = L.Trainer(accelerator="cpu", devices=1, precision=resolved_precision(cfg.trainer.precision, "cpu"),
                    max_epochs=1, limit_train_batches=warmup + steps + 1, limit_val_batches=0, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    callbacks=[clock])
    fit.fit(ClassifierModule(classifier, cfg, None, "scratch"), feed)
    return batch / statistics.median(np.diff(clock.ends)[warmup:])


def feed_rate(feed: DataLoader, batches: int) -> float:
    """Images per second the loader alone delivers."""
    started, seen = time.perf_counter(), 0
    for (x, _), _ in zip(feed, range(batches)):
        seen += len(x)
    return seen / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    set_threads()
    cfg = resolve("quick", **{"trainer.progress": False})
    bundle = prepare(cfg.data, cfg.seed, progress=False)
    batch = cfg.finetune.batch_size
    stored = bundle.train
    in_memory = Labelled(np.asarray(stored.images), stored.labels, stored.names)
    feeds = {
        "store": lambda: loader(stored, batch, True, cfg, drop_last=True),
        "memory": lambda: loader(in_memory, batch, True, cfg, drop_last=True),
        "memory, per image": lambda: DataLoader(PerImage(in_memory), batch_size=batch, drop_last=True,
                                                sampler=EpochShuffle(len(in_memory), cfg.seed)),
    }
    rates: dict[str, list[float]] = {name: [] for name in feeds}
    alone: dict[str, list[float]] = {name: [] for name in feeds}
    for _ in range(args.rounds):
        for name, feed in feeds.items():
            rates[name].append(loop_rate(cfg, bundle, feed(), batch, args.warmup, args.steps))
            alone[name].append(feed_rate(feed(), len(stored) // batch))
    medians = {name: statistics.median(r) for name, r in rates.items()}
    print(json.dumps({"images": len(stored), "batch": batch, "precision": resolved_precision(cfg.trainer.precision, "cpu"),
                      "threads": torch.get_num_threads(), "rates": rates, "median_img_s": medians,
                      "store_over_memory": medians["store"] / medians["memory"],
                      "store_over_per_image": medians["store"] / medians["memory, per image"],
                      "paired_ratios_store_over_memory": [s / m for s, m in zip(rates["store"], rates["memory"])],
                      "loader_alone_img_s": alone,
                      "loader_alone_median_img_s": {name: statistics.median(r) for name, r in alone.items()}},
                     indent=2))


if __name__ == "__main__":
    main()
