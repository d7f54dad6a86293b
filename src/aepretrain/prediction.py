"""Top-k classes for any image file, from a classifier checkpoint, as the reference's Bombay table.

Example:
    >>> from aepretrain.config import ModelConfig
    >>> from aepretrain.models import Encoder
    >>> classifier = Classifier(Encoder(ModelConfig(), 3), 2, 0.0)
    >>> rows = top_k(classifier, ["cat", "dog"], np.zeros((1, 32, 32, 3), np.uint8), k=2)
    >>> sorted(r["class"] for r in rows[0]), round(sum(r["probability"] for r in rows[0]), 6)
    (['cat', 'dog'], 1.0)

    ``predict(["cat.jpg"], "runs/demo/checkpoints/classifier-pretrained.safetensors", 3)`` does the same from image
    files and a checkpoint: ``[{'image': 'cat.jpg', 'top': [{'class': 'Bengal', 'probability': 0.91}, ...]}]``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoints import load_classifier
from .data import match_channels
from .data.base import Images
from .data.images import DEFAULT_MAX_PIXELS, load_for_prediction
from .errors import UserError
from .evaluate import logits_of
from .fileio import printable
from .models import Classifier


def prepare_image(path: str | Path, size: int, channels: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """An image file as the model saw its training data: decoded as training decodes, size x size, gray (by the
    same luminance as pre-training data) if it trained on gray."""
    return match_channels(load_for_prediction(path, size, max_pixels)[None], channels)[0]


def top_k(classifier: Classifier, classes: list[str], images: np.ndarray | Images, k: int,
          device: torch.device | None = None) -> list[list[dict[str, Any]]]:
    probabilities = torch.softmax(logits_of(classifier, images, device).double(), dim=1)
    values, indices = probabilities.topk(min(k, len(classes)), dim=1)
    return [[{"class": classes[i], "probability": float(p)} for p, i in zip(row_p, row_i)]
            for row_p, row_i in zip(values.tolist(), indices.tolist())]


def predict(images: list[str | Path], checkpoint: str | Path, top_k_count: int = 3) -> list[dict[str, Any]]:
    folder = next((p for p in images if Path(p).is_dir()), None)
    if folder is not None:
        raise UserError(f"{printable(str(folder))} is a folder, not an image: pass its image files "
                        f"(e.g. {printable(str(Path(folder) / '*.jpg'))})")
    classifier, meta = load_classifier(checkpoint)
    pixels = np.stack([prepare_image(p, meta["image_size"], meta["in_channels"]) for p in images])
    tops = top_k(classifier, meta["classes"], pixels, top_k_count)
    return [{"image": str(p), "top": top} for p, top in zip(images, tops)]
