"""Model files: safetensors weights with the settings needed to rebuild the model, and nothing executable.

A checkpoint carries its kind (``autoencoder`` or ``classifier``), the model spec, input channels and
size, and for a classifier the class names; loading refuses a file of another kind or shape with one
line that names the layer that differs. Writes go to a temporary file, then a rename, so a failed
write (a full disk) leaves the previous file intact.

Example:
    >>> save_model(classifier, "clf.safetensors", kind="classifier", cfg=cfg, extra={"classes": names})  # doctest: +SKIP
    >>> model, meta = load_classifier("clf.safetensors")  # doctest: +SKIP
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .config import Config, from_dict
from .errors import UserError
from .fileio import atomic_write, first_line
from .models import Autoencoder, Classifier, Encoder, build_encoder
from .training import is_global_zero

FORMAT = "aepretrain-1"


def save_model(model: nn.Module, path: str | Path, kind: str, cfg: Config, in_channels: int,
               extra: dict[str, Any] | None = None) -> Path:
    path = Path(path)
    if not is_global_zero():  # under DDP every process holds the same weights
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT, "kind": kind, "preset": cfg.preset, "config": json.dumps(cfg.to_dict()),
            "in_channels": str(in_channels), "image_size": str(cfg.data.image_size)}
    meta |= {k: json.dumps(v) for k, v in (extra or {}).items()}
    try:
        atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=meta))
    except (OSError, SafetensorError) as exc:  # safetensors reports I/O errors (a full disk) as its own type
        reason = getattr(exc, "strerror", None) or first_line(exc)
        raise UserError(f"could not write {path}: {reason} (the previous file is untouched)") from None
    return path


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a safetensors file, without loading its tensors."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{path} is not an aepretrain checkpoint (safetensors): {exc}") from None


def read_checkpoint(path: str | Path, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    meta = read_metadata(path)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{path} is not an aepretrain checkpoint (safetensors): {exc}") from None
    if meta.get("format") != FORMAT:
        raise UserError(f"{path} is not an aepretrain checkpoint (no '{FORMAT}' metadata)")
    if meta.get("kind") != kind:
        raise UserError(f"{path} holds a {meta.get('kind')} checkpoint; a {kind} is needed here")
    return state, meta


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Load strictly; a missing, extra or differently shaped layer is named in one line."""
    own = model.state_dict()
    for name, tensor in own.items():
        if name not in state:
            raise UserError(f"{path} does not fit this model: layer '{name}' is missing from the checkpoint")
        if state[name].shape != tensor.shape:
            raise UserError(f"{path} does not fit this model: layer '{name}' has shape "
                            f"{tuple(state[name].shape)} in the checkpoint, {tuple(tensor.shape)} here")
    extra = sorted(set(state) - set(own))
    if extra:
        raise UserError(f"{path} does not fit this model: the checkpoint has layer '{extra[0]}', which this model lacks")
    model.load_state_dict(state)


def config_of(meta: dict[str, str]) -> Config:
    return from_dict(json.loads(meta["config"]), "the checkpoint's settings", strict=False)


def load_classifier(path: str | Path) -> tuple[Classifier, dict[str, Any]]:
    """A classifier ready for inference, with its class names, image size and input channels."""
    state, meta = read_checkpoint(path, "classifier")
    cfg = config_of(meta)
    classes = json.loads(meta["classes"])
    in_channels = int(meta["in_channels"])
    model = Classifier(build_encoder(cfg.model, in_channels, True), len(classes), cfg.model.dropout)
    load_weights(model, state, path)
    model.eval()
    return model, {"classes": classes, "in_channels": in_channels, "image_size": int(meta["image_size"]),
                   "preset": meta["preset"], "config": cfg}


def load_stage_encoder(path: str | Path) -> tuple[Encoder, dict[str, str]]:
    """The full-depth encoder with blocks 1..k from greedy stage k's checkpoint (the rest as initialised),
    to fine-tune a classifier from."""
    state, meta = read_checkpoint(path, "autoencoder")
    cfg = config_of(meta)
    encoder = build_encoder(cfg.model, int(meta["in_channels"]), for_classifier=False)
    load_weights(Autoencoder(encoder, int(json.loads(meta["stage"]))), state, path)
    return encoder, meta


def load_autoencoder(path: str | Path) -> tuple[Autoencoder, Encoder, dict[str, str]]:
    """Greedy stage k's autoencoder as it was trained, for inference, and its encoder of blocks 1..k alone."""
    state, meta = read_checkpoint(path, "autoencoder")
    cfg = config_of(meta)
    stage = int(json.loads(meta["stage"]))
    encoder = build_encoder(replace(cfg.model, blocks=cfg.model.blocks[:stage]), int(meta["in_channels"]),
                            for_classifier=False)
    autoencoder = Autoencoder(encoder, stage)
    load_weights(autoencoder, state, path)
    return autoencoder.eval(), encoder, meta
