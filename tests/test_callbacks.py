"""What every fit watches: the best epoch, finite losses, the per-epoch random streams."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from aepretrain.callbacks import FiniteLoss, History, KeepBest
from aepretrain.errors import UserError


def test_keep_best_keeps_the_first_best_epoch_and_its_weights() -> None:
    module = SimpleNamespace(model=torch.nn.Linear(2, 2))
    keeper = KeepBest()
    for epoch, accuracy in enumerate([0.5, 0.7, 0.7, 0.6]):
        with torch.no_grad():
            module.model.weight.fill_(epoch)
        trainer = SimpleNamespace(callback_metrics={"val_acc": torch.tensor(accuracy)}, sanity_checking=False,
                                  current_epoch=epoch)
        keeper.on_validation_epoch_end(trainer, module)
    assert keeper.best_epoch == 2 and keeper.best_accuracy == pytest.approx(0.7)
    assert torch.all(keeper.state["weight"] == 1)  # epoch 2's weights (filled with 1), not a later tie's
    restored = KeepBest()
    restored.load_state_dict(keeper.state_dict())
    assert restored.best_epoch == 2 and torch.equal(restored.state["weight"], keeper.state["weight"])


def test_finite_loss_stops_before_the_update_naming_the_epoch_step_and_last_good_checkpoint(tmp_path) -> None:
    last = tmp_path / "last.ckpt"
    last.write_bytes(b"x")
    check = FiniteLoss("stage2", last)
    trainer = SimpleNamespace(world_size=1, current_epoch=2)
    check.on_train_batch_start(trainer, None, None, batch_idx=4)
    check.on_before_backward(trainer, None, torch.tensor(0.5))  # finite: nothing happens
    with pytest.raises(UserError, match=r"^stage2: the loss became nan at epoch 3, step 5; the last good checkpoint "
                                        rf"is {last} \(--resume continues from it\)"):
        check.on_before_backward(trainer, None, torch.tensor(float("nan")))
    with pytest.raises(UserError, match="no epoch finished, so there is no checkpoint yet"):
        FiniteLoss("scratch", tmp_path / "none.ckpt").on_before_backward(trainer, None, torch.tensor(float("inf")))


def test_history_reseeds_the_global_generator_from_seed_and_epoch_only() -> None:
    def draws(seed: int, epoch: int) -> torch.Tensor:
        torch.manual_seed(1234)  # whatever came before does not matter
        History(seed).on_train_epoch_start(SimpleNamespace(current_epoch=epoch, global_rank=0), None)
        return torch.rand(4)

    assert torch.equal(draws(3, 2), draws(3, 2))
    assert not torch.equal(draws(3, 2), draws(3, 1)) and not torch.equal(draws(3, 2), draws(4, 2))
