"""Pieces that a whole run only reaches indirectly: schedules, data order, the best-epoch keeper, the objectives'
losses, probes, and bench's arithmetic."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from aepretrain.config import resolve
from aepretrain.finetune import KeepBest
from aepretrain.models import Autoencoder, build_encoder
from aepretrain.pretrain import StageModule
from aepretrain.probe import knn_predict, linear_probe
from aepretrain.training import EpochShuffle, batches_per_epoch, scheduler


def test_schedules_span_exactly_the_steps_they_are_given() -> None:
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    sched = scheduler(optimizer, "one-cycle", 0.1, 7)["scheduler"]
    rates = []
    for _ in range(7):
        optimizer.step()
        sched.step()
        rates.append(optimizer.param_groups[0]["lr"])
    assert sched.total_steps == 7
    with pytest.raises(ValueError):  # one step more than planned is an error in OneCycleLR
        optimizer.step()
        sched.step()
    cosine = scheduler(torch.optim.SGD(model.parameters(), lr=1.0), "cosine", 1.0, 10)["scheduler"]
    assert cosine.T_max == 10
    assert scheduler(optimizer, "constant", 0.1, 10) is None


@pytest.mark.parametrize("n,batch,drop_last,expected", [(270, 128, True, 2), (270, 128, False, 3), (256, 128, True, 2),
                                                        (100, 128, True, 1), (0, 16, True, 0)])
def test_batches_per_epoch_matches_the_loader(n: int, batch: int, drop_last: bool, expected: int) -> None:
    from aepretrain.data.base import Labelled
    from aepretrain.training import loader

    assert batches_per_epoch(n, batch, drop_last) == expected
    if n:
        data = Labelled(np.zeros((n, 4, 4, 1), np.uint8), np.zeros(n, np.int64), [str(i) for i in range(n)])
        cfg = resolve("quick")
        assert len(list(loader(data, batch, True, cfg, drop_last=drop_last))) == expected


def test_epoch_shuffle_depends_on_seed_and_epoch_only() -> None:
    a, b = EpochShuffle(50, seed=3), EpochShuffle(50, seed=3)
    first = list(a)
    assert sorted(first) == list(range(50)) and first != list(range(50))
    torch.manual_seed(123)  # the global generator plays no part
    assert list(b) == first
    a.set_epoch(1)
    assert list(a) != first and sorted(a) == list(range(50))
    assert list(EpochShuffle(50, seed=4)) != first


def test_keep_best_keeps_the_first_best_epoch_and_its_weights() -> None:
    module = SimpleNamespace(classifier=torch.nn.Linear(2, 2))
    keeper = KeepBest()
    for epoch, accuracy in enumerate([0.5, 0.7, 0.7, 0.6]):
        with torch.no_grad():
            module.classifier.weight.fill_(epoch)
        trainer = SimpleNamespace(callback_metrics={"val_acc": torch.tensor(accuracy)}, sanity_checking=False,
                                  current_epoch=epoch)
        keeper.on_validation_epoch_end(trainer, module)
    assert keeper.best_epoch == 2 and keeper.best_accuracy == pytest.approx(0.7)
    assert torch.all(keeper.state["weight"] == 1)  # epoch 2's weights (filled with 1), not a later tie's
    restored = KeepBest()
    restored.load_state_dict(keeper.state_dict())
    assert restored.best_epoch == 2 and torch.equal(restored.state["weight"], keeper.state["weight"])


def _stage_module(objective: str) -> StageModule:
    cfg = resolve("quick", overrides=[f"pretrain.objective={objective}", "pretrain.noise_std=0.3",
                                      "pretrain.mask_patch=4", "pretrain.mask_ratio=0.5"],
                  **{"data.image_size": 16, "trainer.precision": "32"})
    torch.manual_seed(0)
    module = StageModule(Autoencoder(build_encoder(cfg.model, 1, for_classifier=False), 1), cfg, None)
    return module.eval()


def test_denoising_loss_is_mse_of_the_noisy_input_s_reconstruction_against_the_clean_one() -> None:
    module = _stage_module("greedy-denoising")
    x = torch.rand(3, 1, 16, 16)
    torch.manual_seed(5)
    with torch.no_grad():
        loss = module._loss(x)
    torch.manual_seed(5)
    noisy = (x + 0.3 * torch.randn_like(x)).clamp(0, 1)
    with torch.no_grad():
        expected = ((module(noisy) - x) ** 2).mean()
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)
    with torch.no_grad():
        plain = F.mse_loss(module(x), x)
    assert abs(float(loss) - float(plain)) > 1e-6  # the noise reached the input


def test_masked_loss_is_mse_over_masked_pixels_of_the_masked_input_s_reconstruction() -> None:
    module = _stage_module("greedy-masked")
    x = torch.rand(2, 1, 16, 16)
    torch.manual_seed(9)
    with torch.no_grad():
        loss = module._loss(x)
    torch.manual_seed(9)
    grid = torch.rand(2, 1, 4, 4) < 0.5  # 16 px / 4 px patches: a 4 x 4 grid of patches per image
    mask = grid.repeat_interleave(4, 2).repeat_interleave(4, 3).float()
    with torch.no_grad():
        squared = (module(x * (1 - mask)) - x) ** 2
    expected = (squared * mask).sum() / mask.sum()
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)


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
