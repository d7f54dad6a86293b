"""Fine-tuning: the arms and how they are compared."""

from __future__ import annotations

from aepretrain.finetune import epochs_to_target


def test_epochs_to_target_is_the_first_epoch_reaching_it() -> None:
    history = [{"epoch": 1, "val_acc": 0.5}, {"epoch": 2, "val_acc": 0.8}, {"epoch": 3, "val_acc": 0.7},
               {"epoch": 4, "val_acc": 0.9}]
    assert epochs_to_target(history, 0.8) == 2
    assert epochs_to_target(history, 0.85) == 4
    assert epochs_to_target(history, 0.95) is None
