"""Taking a model out of aepretrain: the classifier as ONNX or TorchScript, or the encoder alone as a backbone.

ONNX and TorchScript files hold the classifier with one input, ``image``: float32, (N, C, S, S), pixels in
[0, 1] at the trained size S, any batch size N; and two outputs, ``logits`` and ``probabilities`` (their
softmax), (N, classes). Both carry the class names, size, channels and preprocessing: ONNX as metadata
properties, TorchScript as the extra file ``aepretrain.json`` (``torch.jit.load(path, _extra_files=...)``).
Each file is run once more before it is kept (ONNX through ``onnx.checker`` and onnxruntime, TorchScript as
``torch.jit.load`` gives it back) on a check batch, and refused if it differs from PyTorch by over 1e-4. Both
refuse an image of another size, channel count or type than the trained one, with a message that says so.

Nothing is written over the checkpoint or its record, under any spelling (a link, a relative path), and a file
that exists is replaced only with ``overwrite``; both are checked before any work, for every file written.

A backbone is a safetensors file of the encoder's tensors under plain names (B counts blocks from 0, I the
convolutions of a block from 1)::

    blocks.B.convI.weight, blocks.B.convI.bias      Conv2d, (out, in, k, k), padding k // 2
    blocks.B.bnI.weight, blocks.B.bnI.bias          BatchNorm2d scale and shift
    blocks.B.bnI.running_mean, .running_var, .num_batches_tracked

Block B runs (convI, bnI, ReLU) for each I, then MaxPool 2; the first convolution of block 0 has stride
``first_stride``. The spec (blocks, strides, BatchNorm settings, input, preprocessing) is in the file's
metadata under ``spec`` and, for reading, beside it as ``FILE.json``. :func:`load_encoder` rebuilds it.

Example:
    >>> import tempfile
    >>> from aepretrain.config import resolve
    >>> from aepretrain.pipeline import run_finetune
    >>> out = tempfile.mkdtemp()
    >>> arm = run_finetune(resolve("tiny", overrides=["trainer.smoke=true"]), out, "scratch")
    >>> done = export(f"{out}/checkpoints/classifier-scratch.safetensors", "torchscript", f"{out}/model.pt")
    >>> done["format"], done["max_abs_diff"] < 1e-4
    ('torchscript', True)
    >>> done = export(f"{out}/checkpoints/classifier-scratch.safetensors", "backbone", f"{out}/encoder.safetensors")
    >>> encoder = load_encoder(f"{out}/encoder.safetensors")
    >>> images = torch.rand(2, 3, 16, 16)
    >>> encoder(images).shape, encoder.features(images).shape
    (torch.Size([2, 64, 2, 2]), torch.Size([2, 64]))
"""

from __future__ import annotations

import io
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from .checkpoints import FORMAT, load_autoencoder, load_classifier, load_stage_encoder, load_weights, read_metadata
from .config import BlockSpec, ModelConfig
from .errors import UserError, shown
from .fileio import atomic_write, first_line
from .models import Classifier, Encoder
from .seeds import derive_seed

FORMATS = ("onnx", "torchscript", "backbone")
BACKBONE_FORMAT = "aepretrain-backbone-1"
TOLERANCE = 1e-4  # fp32: the largest absolute difference from PyTorch an export may show
PREPROCESSING = ("decode to RGB (a JPEG at reduced scale first: Pillow's draft to at least SxS); resize to SxS "
                 "(Pillow, bilinear); uint8; gray as round(0.299 R + 0.587 G + 0.114 B) if the model takes 1 channel; "
                 "float32 = uint8 / 255, in [0, 1]; NCHW; no mean or std normalisation")
TENSOR_NAMES = ("blocks.B.convI.{weight,bias}: Conv2d (padding k // 2); blocks.B.bnI.{weight,bias,running_mean,"
                "running_var,num_batches_tracked}: BatchNorm2d; block B (from 0) = (convI, bnI, ReLU) for I = 1.., "
                "then MaxPool 2; the first conv of block 0 has stride first_stride")


class Deployable(nn.Module):
    """The classifier as exported: its logits and their softmax."""

    def __init__(self, classifier: Classifier) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.classifier(image)
        return logits, torch.softmax(logits, dim=1)


class InputChecked(nn.Module):
    """A traced model behind a scripted check of its input, which a trace alone would drop: ONNX holds the shape
    in its graph, TorchScript would run a model of global pooling on any size."""

    def __init__(self, traced: nn.Module, channels: int, size: int) -> None:
        super().__init__()
        self.model, self.channels, self.size = traced, channels, size

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = image.shape
        if len(shape) != 4 or shape[1] != self.channels or shape[2] != self.size or shape[3] != self.size:
            raise ValueError(f"image must be (N, {self.channels}, {self.size}, {self.size}), the channels and size "
                             f"this model was trained on, got {list(shape)}")
        if image.dtype != torch.float32:
            raise ValueError("image must be float32, pixels in [0, 1]")
        return self.model(image)


def export(checkpoint: str | Path, fmt: str, out: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """Write a checkpoint as ``fmt`` (onnx, torchscript: a classifier; backbone: a classifier or a stage).

    ``out`` (and for a backbone its spec, ``out`` with ``.json``) must not exist unless ``overwrite``, and is
    never the checkpoint or its record."""
    if fmt not in FORMATS:
        raise UserError(f"--format is one of {', '.join(FORMATS)}, not '{fmt}'")
    out = _output_file(out)
    if fmt == "backbone" and spec_path(out) == out:
        raise UserError(f"--out {shown(out)}: the backbone's spec goes to FILE.json beside it; name the backbone "
                        "FILE.safetensors")
    _check_outputs(Path(checkpoint), [out, spec_path(out)] if fmt == "backbone" else [out], overwrite)
    if fmt == "onnx":
        _require_onnx()  # before any work: a missing extra is the first thing to say
    if fmt == "backbone":
        encoder, spec = encoder_of_checkpoint(checkpoint)
        _make_folder(out)
        state = {name: tensor.detach().contiguous() for name, tensor in encoder.state_dict().items()}
        metadata = {"format": BACKBONE_FORMAT, "spec": json.dumps(spec)}
        _write(out, lambda tmp: save_file(state, str(tmp), metadata=metadata))
        _write(spec_path(out), json.dumps(spec, indent=2) + "\n")
        return {"format": fmt, "path": str(out), "bytes": out.stat().st_size, "spec": str(spec_path(out))}
    classifier, meta = load_classifier(checkpoint)
    _make_folder(out)  # before the conversion, which takes a while: a folder that cannot be made is said first
    model = Deployable(classifier).eval()
    info = {"classes": meta["classes"], "image_size": meta["image_size"], "in_channels": meta["in_channels"],
            "input": "image", "outputs": ["logits", "probabilities"], "preprocessing": PREPROCESSING,
            "source": Path(checkpoint).name, "aepretrain": __version__}
    draw = torch.Generator().manual_seed(derive_seed(0, "export-check"))  # random pixels, the same every time
    shape = (meta["in_channels"], meta["image_size"], meta["image_size"])
    example, check = torch.rand((2, *shape), generator=draw), torch.rand((3, *shape), generator=draw)
    with torch.no_grad():
        expected = model(check)
    data, got = (_onnx if fmt == "onnx" else _torchscript)(model, info, example, check)
    difference = max(float((torch.as_tensor(g) - e).abs().max()) for g, e in zip(got, expected))
    if not difference <= TOLERANCE:
        raise UserError(f"the {fmt} model differs from PyTorch by {difference:.3g} (over {TOLERANCE}); {out} not written")
    _write(out, data)
    return {"format": fmt, "path": str(out), "bytes": out.stat().st_size, "max_abs_diff": difference}


def _require_onnx() -> tuple[Any, Any]:
    try:
        import onnx
        import onnxruntime
        import onnxscript  # noqa: F401  (torch.onnx's exporter translates with it)
    except ImportError as exc:
        raise UserError(f"ONNX export needs {exc.name}, which is not installed: pip install 'aepretrain[export]'") from None
    return onnx, onnxruntime


def _onnx(model: Deployable, info: dict[str, Any], example: torch.Tensor,
          check: torch.Tensor) -> tuple[bytes, list[Any]]:
    onnx, onnxruntime = _require_onnx()
    # the exporter warns once per torchvision operator it cannot register; this model uses none
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.export's own use of a deprecated pytree name
        program = torch.onnx.export(model, (example,), dynamo=True, verbose=False, external_data=False,
                                    input_names=["image"], output_names=["logits", "probabilities"],
                                    dynamic_shapes={"image": {0: torch.export.Dim("batch")}})
    proto = program.model_proto
    proto.doc_string = (f"aepretrain classifier, {len(info['classes'])} classes: image float32 (N, {info['in_channels']}, "
                        f"{info['image_size']}, {info['image_size']}) in [0, 1] -> logits, probabilities (N, classes)")
    for key, value in info.items():
        prop = proto.metadata_props.add()
        prop.key, prop.value = key, value if isinstance(value, str) else json.dumps(value)
    onnx.checker.check_model(proto, full_check=True)
    data = proto.SerializeToString()
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    return data, session.run(["logits", "probabilities"], {"image": check.numpy()})


def _torchscript(model: Deployable, info: dict[str, Any], example: torch.Tensor,
                 check: torch.Tensor) -> tuple[bytes, list[Any]]:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # PyTorch now points to torch.export; TorchScript still loads everywhere
        traced = torch.jit.trace(model, example)
        checked = torch.jit.script(InputChecked(traced, info["in_channels"], info["image_size"]).eval())
        frozen = torch.jit.freeze(checked)  # weights as constants: outputs need no grad
        torch.jit.save(frozen, buffer, _extra_files={"aepretrain.json": json.dumps(info)})
        loaded = torch.jit.load(io.BytesIO(buffer.getvalue()))
    with torch.no_grad():
        return buffer.getvalue(), list(loaded(check))


def _output_file(out: str | Path) -> Path:
    """``--out`` as the path of a file: not empty, not a folder."""
    text = os.fspath(out)
    if not text.strip():
        raise UserError("--out is empty: name the file to write, e.g. model.pt")
    path = Path(text)
    if text.endswith(("/", os.sep)) or path.name in ("", ".", "..") or path.is_dir():
        raise UserError(f"--out {shown(text)} names a folder: name the file to write, e.g. {shown(path / 'model.pt')}")
    return path


def _check_outputs(checkpoint: Path, outputs: list[Path], overwrite: bool) -> None:
    """Refuse, before any work, to write over the checkpoint or its record, or over any file without ``overwrite``."""
    records = [checkpoint.with_suffix(".json"), Path(os.path.realpath(checkpoint)).with_suffix(".json")]  # a link's too
    inputs = [(checkpoint, "the checkpoint it exports"), *((record, "the checkpoint's record") for record in records)]
    for path in outputs:
        if not os.path.lexists(path):
            continue
        name = f"--out {shown(path)}" if path == outputs[0] else f"{shown(path)} (the backbone's spec, beside --out)"
        for source, what in inputs:
            if _same_file(path, source):
                raise UserError(f"{name} is {what} ({shown(source)}): choose another --out; the checkpoint and its "
                                "record are never written over")
        if path.is_dir():
            raise UserError(f"{name} is a folder: choose another --out")
        if not overwrite:
            raise UserError(f"{name} exists: pass --overwrite to replace it, or choose another --out")


def _same_file(path: Path, other: Path) -> bool:
    """Whether two paths name one file, whatever the spelling: a link, a hard link, ``..``."""
    try:
        return os.path.samefile(path, other)
    except (FileNotFoundError, NotADirectoryError):  # one of them is not there (a dangling link): not the other
        return False


def _make_folder(out: Path) -> None:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"could not write {shown(out)}: {exc.strerror}") from None


def _write(path: Path, content: Any) -> None:
    try:
        atomic_write(path, content)
    except (OSError, SafetensorError) as exc:
        reason = getattr(exc, "strerror", None) or first_line(exc)
        raise UserError(f"could not write {shown(path)}: {reason}") from None


def spec_path(backbone: Path) -> Path:
    """The readable copy of a backbone's spec: ``encoder.safetensors`` -> ``encoder.json``."""
    return backbone.with_suffix(".json")


def encoder_of_checkpoint(path: str | Path) -> tuple[Encoder, dict[str, Any]]:
    """The encoder of a classifier, of greedy stage k's autoencoder (blocks 1..k) or of a contrastive objective, and
    its backbone spec."""
    kind = read_metadata(path).get("kind")
    if kind == "autoencoder":
        _autoencoder, encoder, meta = load_autoencoder(path)
        source, size = f"autoencoder stage {json.loads(meta['stage'])}", int(meta["image_size"])
    elif kind == "contrastive":  # SimCLR and BYOL train every block: the stage is the whole encoder
        encoder, meta = load_stage_encoder(path)
        source, size = f"contrastive stage {json.loads(meta['stage'])}", int(meta["image_size"])
    else:  # load_classifier refuses anything else with one line
        classifier, info = load_classifier(path)
        encoder, source, size = classifier.encoder, "classifier", info["image_size"]
    spec = {"format": BACKBONE_FORMAT, "source": f"{Path(path).name} ({source})", "in_channels": encoder.in_channels,
            "image_size": size, "first_stride": encoder.stride,
            "blocks": [{"channels": list(b.channels), "kernel": b.kernel} for b in encoder.spec.blocks],
            "batchnorm": {"eps": encoder.spec.bn_eps, "momentum": encoder.spec.bn_momentum},
            "out_channels": encoder.out_channels, "downsampling": encoder.stride * 2 ** len(encoder.blocks),
            "preprocessing": PREPROCESSING, "tensors": TENSOR_NAMES, "aepretrain": __version__}
    return encoder, spec


def load_encoder(path: str | Path) -> Encoder:
    """A backbone file (or any aepretrain checkpoint) as an ``nn.Module``, in eval mode, every weight trainable.

    ``encoder(x)`` gives the feature map (N, out_channels, S / downsampling, S / downsampling) and
    ``encoder.features(x)`` its spatial mean (N, out_channels), for ``x`` as the spec's preprocessing makes it.
    """
    meta = read_metadata(path)
    if meta.get("format") == FORMAT:
        encoder = encoder_of_checkpoint(path)[0]
    elif meta.get("format") == BACKBONE_FORMAT:
        spec = json.loads(meta["spec"])
        model = ModelConfig(blocks=[BlockSpec(b["channels"], b["kernel"]) for b in spec["blocks"]],
                            bn_eps=spec["batchnorm"]["eps"], bn_momentum=spec["batchnorm"]["momentum"])
        encoder = Encoder(model, spec["in_channels"], spec["first_stride"])
        load_weights(encoder, load_file(str(path)), path)
    else:
        raise UserError(f"{path} is neither an aepretrain backbone nor an aepretrain checkpoint")
    return encoder.requires_grad_(True).eval()
