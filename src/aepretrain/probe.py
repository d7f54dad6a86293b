"""How good are the features before fine-tuning? Linear and k-nearest-neighbour probes by encoder depth.

The features at depth k are the global-average-pooled output of encoder block k, with the encoder
frozen. A greedy encoder's blocks 1..k never change after stage k, so probing the final encoder at
depth k is probing stage k. A randomly initialised encoder of the same shape is the baseline.

Example:
    >>> from aepretrain.config import resolve
    >>> from aepretrain.data import prepare
    >>> from aepretrain.models import build_encoder
    >>> cfg = resolve("tiny")
    >>> bundle = prepare(cfg.data, cfg.seed)
    >>> rows = probes(bundle, build_encoder(cfg.model, 3, False), train_limit=None, seed=0)
    >>> [(r["encoder"], r["depth"], r["features"]) for r in rows][:3]
    [('pretrained', 1, 16), ('pretrained', 2, 32), ('pretrained', 3, 64)]
    >>> {round(r[key] * len(bundle.test), 4) % 1 for r in rows for key in ("linear_test", "knn_test")}  # counted
    {0.0}
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F

from .data import DataBundle
from .data.base import Images
from .data.splits import stratified_subset
from .evaluate import over_batches
from .models import Encoder, global_avg_pool
from .seeds import derive_seed

KNN_K = 10


def features(encoder: Encoder, images: torch.Tensor | Images, device: torch.device | None = None
             ) -> list[torch.Tensor]:
    """GAP features of uint8 NHWC images after every block, from one forward pass on ``device``, in eval mode
    (BatchNorm statistics fixed): depth k reuses the pass through blocks 1..k-1 instead of recomputing it."""
    def every_depth(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([global_avg_pool(feature_map) for feature_map in encoder.forward_features(x)], 1)

    widths = [block.channels[-1] for block in encoder.spec.blocks]
    return list(over_batches(encoder, images, every_depth, 512, device).split(widths, 1))


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, evals: list[torch.Tensor], classes: int,
                 steps: int = 200, weight_decay: float = 1e-4) -> list[torch.Tensor]:
    """Multinomial logistic regression on standardised features (full-batch L-BFGS); predictions per set."""
    mean, std = train_x.mean(0), train_x.std(0).clamp(min=1e-6)
    x = (train_x - mean) / std
    linear = torch.nn.Linear(x.shape[1], classes)
    optimizer = torch.optim.LBFGS(linear.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(linear(x), train_y) + weight_decay * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        return [linear((e - mean) / std).argmax(1) for e in evals]


def knn_predict(train_x: torch.Tensor, train_y: torch.Tensor, query: torch.Tensor, classes: int,
                k: int = KNN_K) -> torch.Tensor:
    """Cosine-similarity k-nearest-neighbour vote on features centred by the train mean."""
    mean = train_x.mean(0)
    bank = F.normalize(train_x - mean, dim=1)
    predictions = []
    for start in range(0, len(query), 1024):
        q = F.normalize(query[start:start + 1024] - mean, dim=1)
        nearest = (q @ bank.T).topk(min(k, len(bank)), dim=1).indices
        votes = F.one_hot(train_y[nearest], classes).sum(1)
        predictions.append(votes.argmax(1))
    return torch.cat(predictions)


def probe_encoder(encoder: Encoder, bundle: DataBundle, label: str, device: torch.device | None = None
                  ) -> list[dict[str, Any]]:
    """One row per depth: linear and kNN accuracy on validation and test, trained on the labelled train split; the
    features computed on ``device``, the probes on the CPU."""
    classes = len(bundle.classes)
    train_y, val_y, test_y = (torch.from_numpy(s.labels) for s in (bundle.train, bundle.val, bundle.test))
    by_split = [features(encoder, s.images, device) for s in (bundle.train, bundle.val, bundle.test)]
    rows = []
    for depth, (train_x, val_x, test_x) in enumerate(zip(*by_split), 1):
        linear_val, linear_test = linear_probe(train_x, train_y, [val_x, test_x], classes)
        row: dict[str, Any] = {"encoder": label, "depth": depth, "features": int(train_x.shape[1])}
        row["linear_val"] = float((linear_val == val_y).float().mean())
        row["linear_test"] = float((linear_test == test_y).float().mean())
        row["knn_val"] = float((knn_predict(train_x, train_y, val_x, classes) == val_y).float().mean())
        row["knn_test"] = float((knn_predict(train_x, train_y, test_x, classes) == test_y).float().mean())
        rows.append(row)
    return rows


def probes(bundle: DataBundle, encoder: Encoder, train_limit: int | None, seed: int,
           device: torch.device | None = None) -> list[dict[str, Any]]:
    """Linear and kNN probes at every depth, for ``encoder`` and a random one of the same shape, trained on at most
    ``train_limit`` labelled train images (stratified); the features computed on ``device``."""
    if train_limit is not None and train_limit < len(bundle.train):
        index = stratified_subset(bundle.train.labels, train_limit, derive_seed(seed, "probe-subset"))
        bundle = dataclasses.replace(bundle, train=bundle.train.take(index))
    torch.manual_seed(derive_seed(seed, "random-encoder"))
    random_encoder = Encoder(encoder.spec, encoder.in_channels, encoder.stride)
    return probe_encoder(encoder, bundle, "pretrained", device) + \
        probe_encoder(random_encoder, bundle, "random", device)
