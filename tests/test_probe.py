"""Probes: linear and kNN classifiers on frozen features."""

from __future__ import annotations

import numpy as np
import torch

from aepretrain.config import resolve
from aepretrain.models import build_encoder
from aepretrain.probe import features, knn_predict, linear_probe


def test_probes_find_separable_features() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 5, (3, 8))
    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = rng.integers(0, 3, n)
        return torch.tensor(centres[y] + rng.normal(0, 1, (n, 8)), dtype=torch.float32), torch.tensor(y)
    (train_x, train_y), (test_x, test_y) = sample(150), sample(100)
    linear = linear_probe(train_x, train_y, [test_x], 3)[0]
    assert float((linear == test_y).float().mean()) >= 0.95
    knn = knn_predict(train_x, train_y, test_x, 3)
    assert float((knn == test_y).float().mean()) >= 0.95
    shuffled = knn_predict(train_x, train_y[torch.randperm(150)], test_x, 3)  # labels that carry nothing
    assert float((shuffled == test_y).float().mean()) < 0.7


def test_probe_features_of_every_depth_from_one_pass_match_a_pass_per_depth() -> None:
    torch.manual_seed(0)
    encoder = build_encoder(resolve("quick").model, 1, for_classifier=False)
    images = torch.randint(0, 256, (6, 16, 16, 1), dtype=torch.uint8)
    by_depth = features(encoder, images)
    x = images.permute(0, 3, 1, 2).float() / 255
    assert [tuple(f.shape) for f in by_depth] == [(6, 16), (6, 32), (6, 64)]
    with torch.no_grad():
        for depth, f in enumerate(by_depth, 1):
            assert torch.allclose(f, encoder.eval()(x, depth).mean(dim=(2, 3)), atol=1e-6)
