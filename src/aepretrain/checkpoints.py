"""Model files: safetensors weights with the settings needed to rebuild the model, and nothing executable.

A checkpoint carries its kind (``autoencoder`` or ``classifier``), the model spec, input channels and
size, and for a classifier the class names; loading refuses a file of another kind or shape with one
line that names the layer that differs. Writes go to a temporary file, then a rename, so a failed
write (a full disk) leaves the previous file intact.

Example:
    >>> import tempfile
    >>> from aepretrain.config import resolve
    >>> cfg = resolve("tiny")
    >>> classifier = Classifier(build_encoder(cfg.model, 3, True), 2, 0.0)
    >>> path = save_model(classifier, f"{tempfile.mkdtemp()}/clf.safetensors", "classifier", cfg, 3,
    ...                   {"classes": ["cat", "dog"]})
    >>> model, meta = load_classifier(path)
    >>> meta["classes"], meta["image_size"], meta["in_channels"]
    (['cat', 'dog'], 16, 3)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load, save_file
from torch import nn

from .config import Config, check_image_size, from_dict
from .errors import UserError
from .fileio import atomic_write, first_line, is_global_zero
from .models import Autoencoder, Classifier, Encoder, build_encoder
from .objectives import KINDS, objective_of

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


def read_checkpoint(path: str | Path, kind: str | tuple[str, ...]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a checkpoint of ``kind`` (or of one of several kinds), from one read of the file
    into memory: no map of it stays open, so a file replaced or cut short later cannot crash (a bus error) or
    change a model loaded from it."""
    read_metadata(path)  # a file that is not one is refused from its header, before it is read whole
    try:
        data = Path(path).read_bytes()
        state = {name: tensor.clone() for name, tensor in load(data).items()}  # writable: not views of ``data``
        header_size = int.from_bytes(data[:8], "little")  # the layout safetensors' load just verified
        meta = json.loads(data[8:8 + header_size]).get("__metadata__") or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{path} is not an aepretrain checkpoint (safetensors): {exc}") from None
    if meta.get("format") != FORMAT:
        raise UserError(f"{path} is not an aepretrain checkpoint (no '{FORMAT}' metadata)")
    kinds = (kind,) if isinstance(kind, str) else kind
    if meta.get("kind") not in kinds:
        wanted = _a(kinds[0]) if len(kinds) == 1 else f"a pre-trained encoder ({' or '.join(kinds)})"
        raise UserError(f"{path} holds {_a(str(meta.get('kind')))} checkpoint; {wanted} is needed here")
    return state, meta


def _a(noun: str) -> str:
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], path: str | Path, assign: bool = False) -> None:
    """Load strictly; a missing, extra or differently shaped layer is named in one line. ``assign``: the model's
    tensors become the checkpoint's (for a model built on the meta device)."""
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
    model.load_state_dict(state, assign=assign)


def _meta_value(meta: dict[str, str], key: str, path: str | Path, check: Callable[[Any], bool], wanted: str) -> Any:
    """One metadata field, parsed as JSON and checked; one line naming the field if it is absent or wrong."""
    if key not in meta:
        raise UserError(f"{path} is damaged: its metadata has no '{key}'")
    try:
        value = json.loads(meta[key])
    except ValueError:
        value = meta[key]
    if not check(value):
        raise UserError(f"{path} is damaged: its metadata '{key}' must be {wanted}, not {meta[key][:60]!r}")
    return value


def config_of(meta: dict[str, str], path: str | Path = "the checkpoint") -> Config:
    values = _meta_value(meta, "config", path, lambda v: isinstance(v, dict), "settings (a JSON object)")
    return from_dict(values, f"the settings in {path}", strict=False)


def _model_meta(meta: dict[str, str], path: str | Path) -> tuple[Config, int]:
    """The settings and input channels a checkpoint's model is rebuilt from, each checked."""
    cfg = config_of(meta, path)
    in_channels = _meta_value(meta, "in_channels", path, lambda v: type(v) is int and 1 <= v <= 4, "1 to 4")
    return cfg, in_channels


def load_classifier(path: str | Path) -> tuple[Classifier, dict[str, Any]]:
    """A classifier ready for inference, with its class names, image size and input channels."""
    state, meta = read_checkpoint(path, "classifier")
    cfg, in_channels = _model_meta(meta, path)
    classes = _meta_value(meta, "classes", path, lambda v: isinstance(v, list) and len(v) >= 2 and
                          all(isinstance(c, str) for c in v), "a list of at least two class names")
    image_size = _meta_value(meta, "image_size", path, lambda v: type(v) is int, "a whole number")
    check_image_size(f"{path}: its metadata 'image_size'", image_size, cfg.model)
    with torch.device("meta"):  # no memory until the weights are checked: a model no larger than its file
        model = Classifier(build_encoder(cfg.model, in_channels, True), len(classes), cfg.model.dropout)
    load_weights(model, state, path, assign=True)
    model.eval()
    return model, {"classes": classes, "in_channels": in_channels, "image_size": image_size,
                   "preset": meta.get("preset"), "config": cfg, "split_seed": _split_seed(meta, path, cfg)}


def _split_seed(meta: dict[str, str], path: str | Path, cfg: Config) -> int:
    """The seed the classifier's data was split with: a study cell's own seed differs from its study's, whose
    split every cell shares; a checkpoint without the field (a run's, or an older one) was split with its seed."""
    if "split_seed" not in meta:
        return cfg.seed
    return _meta_value(meta, "split_seed", path, lambda v: type(v) is int and 0 <= v <= 2**31 - 1,
                       "a seed from 0 to 2147483647")

def _stage_of(meta: dict[str, str], path: str | Path, cfg: Config) -> int:
    depth = len(cfg.model.blocks)
    return _meta_value(meta, "stage", path, lambda v: type(v) is int and 1 <= v <= depth, f"a stage from 1 to {depth}")


def load_stage_encoder(path: str | Path) -> tuple[Encoder, dict[str, str]]:
    """Stage k's encoder of any objective, blocks 1..k (the head left out), to fine-tune a classifier from (its
    deeper blocks start fresh)."""
    state, meta = read_checkpoint(path, KINDS)
    cfg, in_channels = _model_meta(meta, path)
    stage = _stage_of(meta, path, cfg)
    with torch.device("meta"):  # as in load_classifier; the stage's network shares the encoder's blocks
        encoder = build_encoder(replace(cfg.model, blocks=cfg.model.blocks[:stage]), in_channels, for_classifier=False)
        network = objective_of(cfg.pretrain).network(encoder, stage)
    load_weights(network, state, path, assign=True)
    return encoder, meta


def load_autoencoder(path: str | Path) -> tuple[Autoencoder, Encoder, dict[str, str]]:
    """Greedy stage k's autoencoder as it was trained, for inference, and its encoder of blocks 1..k alone."""
    state, meta = read_checkpoint(path, "autoencoder")
    cfg, in_channels = _model_meta(meta, path)
    stage = _stage_of(meta, path, cfg)
    with torch.device("meta"):
        encoder = build_encoder(replace(cfg.model, blocks=cfg.model.blocks[:stage]), in_channels, for_classifier=False)
        autoencoder = Autoencoder(encoder, stage)
    load_weights(autoencoder, state, path, assign=True)
    return autoencoder.eval(), encoder, meta


def read_finished(model: nn.Module, record: Path, weights: Path, kind: str, needs: tuple[str, ...]
                  ) -> dict[str, Any] | None:
    """The record of a finished stage or arm, its weights loaded into ``model``, when both verify; None (and a
    note) when either is missing or damaged, so that the stage or arm is trained again."""
    if not record.exists() and not weights.exists():
        return None
    try:
        done = json.loads(record.read_text())
        if not isinstance(done, dict) or not set(needs) <= set(done):
            raise ValueError("incomplete record")
        load_weights(model, read_checkpoint(weights, kind)[0], weights)
    except (OSError, ValueError, UserError) as exc:
        logging.getLogger("aepretrain").warning(f"aepretrain: {record.stem} is not finished after all "
                                                f"({first_line(exc)}): training it again")
        return None
    return done
