"""Testing a classifier: loss, accuracy, per-class accuracy and the confusion matrix on the test split.

Example:
    >>> import numpy as np
    >>> from aepretrain.config import ModelConfig
    >>> from aepretrain.data.base import Labelled
    >>> from aepretrain.models import Encoder
    >>> classifier = Classifier(Encoder(ModelConfig(), 3), 2, 0.0)
    >>> test = Labelled(np.zeros((4, 32, 32, 3), np.uint8), np.array([0, 1, 0, 1]), list("abcd"))
    >>> scores = evaluate(classifier, test, ["cat", "dog"])
    >>> scores["test_accuracy"], sum(map(sum, scores["confusion"]))  # one class for every blank image
    (0.5, 4)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassConfusionMatrix

from .data.base import Images, Labelled
from .models import Classifier
from .transforms import pixels


@torch.no_grad()
def over_batches(model: nn.Module, images: np.ndarray | torch.Tensor | Images,
                 fn: Callable[[torch.Tensor], torch.Tensor], batch_size: int = 256) -> torch.Tensor:
    """``fn`` of uint8 NHWC images scaled to [0, 1], batch by batch on the model's device, in eval mode. Images
    of a store are gathered a batch at a time."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        out.append(fn(pixels(torch.as_tensor(images[start:start + batch_size]).to(device))).float().cpu())
    model.train(was_training)
    return torch.cat(out)


def logits_of(classifier: Classifier, images: np.ndarray | torch.Tensor | Images) -> torch.Tensor:
    return over_batches(classifier, images, classifier)


def evaluate(classifier: Classifier, test: Labelled, classes: list[str]) -> dict[str, Any]:
    logits = logits_of(classifier, test.images)
    labels = torch.from_numpy(test.labels)
    confusion = MulticlassConfusionMatrix(num_classes=len(classes))(logits.argmax(1), labels)
    support = confusion.sum(1).clamp(min=1)
    return {
        "test_loss": float(F.cross_entropy(logits, labels)),
        "test_accuracy": float((logits.argmax(1) == labels).float().mean()),
        "per_class_accuracy": {c: float(confusion[k, k] / support[k]) for k, c in enumerate(classes)},
        "confusion": confusion.tolist(),
    }
