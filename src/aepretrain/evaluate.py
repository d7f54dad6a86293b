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
from .models import Classifier, evaluating_on
from .transforms import pixels


@torch.no_grad()
def over_batches(model: nn.Module, images: np.ndarray | torch.Tensor | Images,
                 fn: Callable[[torch.Tensor], torch.Tensor], batch_size: int = 256,
                 device: torch.device | None = None) -> torch.Tensor:
    """``fn`` of uint8 NHWC images scaled to [0, 1], batch by batch in eval mode on ``device`` (the model's own
    where None), the result on the CPU. The model goes back to where it was, in the mode it was in. Images of a
    store are gathered a batch at a time; to a CUDA device they go from pinned memory, without waiting."""
    out = []
    with evaluating_on(model, device) as device:
        for start in range(0, len(images), batch_size):
            batch = torch.as_tensor(images[start:start + batch_size])
            if device.type == "cuda":
                batch = batch.pin_memory()
            out.append(fn(pixels(batch.to(device, non_blocking=True))).float().cpu())
    return torch.cat(out)


def logits_of(classifier: Classifier, images: np.ndarray | torch.Tensor | Images,
              device: torch.device | None = None) -> torch.Tensor:
    return over_batches(classifier, images, classifier, device=device)


def evaluate(classifier: Classifier, test: Labelled, classes: list[str], device: torch.device | None = None
             ) -> dict[str, Any]:
    """Scores of ``classifier`` on ``test``, computed on ``device`` (the classifier's own where None)."""
    logits = logits_of(classifier, test.images, device)
    labels = torch.from_numpy(test.labels)
    confusion = MulticlassConfusionMatrix(num_classes=len(classes))(logits.argmax(1), labels)
    support = confusion.sum(1).clamp(min=1)
    return {
        "test_loss": float(F.cross_entropy(logits, labels)),
        "test_accuracy": float((logits.argmax(1) == labels).float().mean()),
        "per_class_accuracy": {c: float(confusion[k, k] / support[k]) for k, c in enumerate(classes)},
        "confusion": confusion.tolist(),
    }
