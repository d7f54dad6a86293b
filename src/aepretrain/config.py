"""Settings: plain typed dataclasses with defaults, named presets (YAML files), and overrides.

A run's settings are resolved in this order, each layer overriding the one before:
the defaults below, the preset (``presets/NAME.yaml``), a ``--config FILE`` and ``--set key=value``.

Each dataclass field is the one source of its setting's schema: its type (``Literal[...]`` for choices), default,
help and range (:func:`setting`). Validation, the command line's help, ``aepretrain config keys`` and the docs'
settings page all read it through :func:`schema`.

Example:
    >>> cfg = resolve("quick", overrides=["finetune.epochs=3"])
    >>> cfg.finetune.epochs
    3
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import yaml

from .errors import UserError
from .fileio import atomic_write, first_line


Schedule = Literal["constant", "one-cycle", "cosine"]
Objective = Literal["greedy", "greedy-denoising", "greedy-masked", "end-to-end", "simclr", "byol"]
Precision = Literal["auto", "32", "bf16-mixed", "16-mixed"]
Device = Literal["auto", "cpu", "cuda", "gpu", "mps"]
Init = Literal["pytorch", "keras"]
Fill = Literal["zeros", "nearest"]
ZoomAxes = Literal["same", "independent"]
Engine = Literal["auto", "serial", "ray"]
Logger = Literal["csv", "tensorboard", "mlflow", "wandb"]
Arm = Literal["pretrained", "scratch"]
Allocator = Literal["auto", "tcmalloc", "default"]
# the choices as tuples, for the modules that check or list them
SCHEDULES, OBJECTIVES, PRECISIONS, DEVICES, LOGGERS = map(typing.get_args, (Schedule, Objective, Precision, Device,
                                                                             Logger))


def setting(default: Any, help: str, range: str | None = None) -> Any:
    """A dataclass field that carries its own documentation, the one source of the settings' schema (validation,
    the command line's help, ``aepretrain config keys`` and the docs read it): ``help`` says what the setting is;
    ``range`` is the interval its number, or each number of its list, must lie in ("[" and "]" include the end,
    "(" and ")" leave it out). Choices are the field's type, ``Literal[...]``. A list or a section (a class) is made
    afresh for every instance; ``dataclasses.MISSING``: no default.

    >>> dataclasses.fields(BlockSpec)[1].metadata["range"]
    '[1, 31]'
    """
    metadata = {"help": help, **({"range": range} if range else {})}
    if isinstance(default, type):
        return field(default_factory=default, metadata=metadata)
    if isinstance(default, list):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class BlockSpec:
    """One encoder block: ``len(channels)`` x (Conv kxk + BatchNorm + ReLU), then MaxPool 2."""

    channels: list[int] = setting(dataclasses.MISSING, "output channels of the block's convolutions, one number "
                                  "per convolution", "[1, 8192]")
    kernel: int = setting(3, "side of the block's square kernels; odd, so that padding keeps the size", "[1, 31]")


@dataclass
class ModelConfig:
    blocks: list[BlockSpec] = setting(
        [BlockSpec([64], 7), BlockSpec([128, 128], 3), BlockSpec([256, 256], 3)],
        "the encoder, block by block: each is len(channels) x (Conv kxk + BatchNorm + ReLU), then MaxPool 2")
    classifier_stride: int = setting(2, "stride of the classifier's first convolution; the reference's classifier "
                                     "table implies 2", "[1, 8]")
    autoencoder_stride: int = setting(1, "stride of the autoencoders' first convolution; the reference's autoencoder "
                                      "tables imply 1", "[1, 8]")
    dropout: float = setting(0.5, "dropout between the pooled features and the classifier's dense layer", "[0, 1)")
    bn_momentum: float = setting(0.1, "BatchNorm's momentum in PyTorch's convention: Keras' momentum 0.99 is 0.01 "
                                 "here", "[0, 1]")
    bn_eps: float = setting(1e-5, "BatchNorm's epsilon", "(0, 1)")
    init: Init = setting("pytorch", "initial weights: pytorch (its defaults) or keras (Glorot-uniform kernels, zero "
                         "biases, as the reference)")
    in_channels: int = setting(3, "input channels, for `summary` only; a run takes them from the data", "[1, 4]")
    num_classes: int = setting(37, "classes, for `summary` only; a run takes them from the data", "[2, 100000]")


@dataclass
class DataConfig:
    dataset: str = setting("fashion-mnist", "the labelled data set: fashion-mnist, oxford-pets, folder (a folder "
                           "per class) or synthetic")
    root: str | None = setting(None, "the data set's folder; null: its built-in location, where it has one")
    image_size: int = setting(32, "side of the square the images are resized to", "[8, 1024]")
    val_fraction: float = setting(0.1, "share of the train images held out for validation (stratified)", "(0, 1)")
    test_fraction: float = setting(0.2, "share held out for testing, only for data sets without an official test "
                                   "split", "(0, 1)")
    ae_fraction: float = setting(1 / 3, "the autoencoders' subset: this share of train + val, stratified", "(0, 1]")
    train_limit: int | None = setting(None, "cap on the train images (stratified), for fast presets; null: all",
                                      "[2, inf)")
    test_limit: int | None = setting(None, "cap on the test images; null: all", "[1, inf)")
    max_pixels: int = setting(89_478_485, "larger images are refused as possible decompression bombs", "[1, inf)")
    cache_dir: str | None = setting(None, "where decoded data is cached; null: $AEPRETRAIN_CACHE, else "
                                    "$XDG_CACHE_HOME/aepretrain or ~/.cache/aepretrain")
    synthetic_per_class: int = setting(40, "images per class and split of the `synthetic` data set", "[1, 100000]")
    synthetic_classes: int = setting(4, "classes of the `synthetic` data set", "[2, 1000]")


@dataclass
class AugmentConfig:
    rotation: float = setting(10.0, "random rotation, in degrees either way", "[0, 180]")
    zoom: float = setting(0.1, "random zoom: the scale is drawn from [1 - zoom, 1 + zoom]", "[0, 1)")
    brightness: list[float] = setting([0.7, 1.3], "random brightness: a multiplicative factor drawn between these "
                                      "two numbers, low to high", "[0, inf)")
    hflip: bool = setting(True, "random horizontal flips")
    fill: Fill = setting("zeros", "what rotation and zoom fill in: zeros, or nearest (the edge pixel, as Keras' "
                         "ImageDataGenerator)")
    zoom_axes: ZoomAxes = setting("same", "same: one zoom for both axes; independent: one per axis (as Keras' "
                                  "ImageDataGenerator)")


@dataclass
class PretrainConfig:
    epochs: int = setting(30, "pre-training epochs (of each stage, where the objective trains stage by stage)",
                          "[1, 100000]")
    lr: float = setting(1e-3, "Adam's learning rate (its peak under a schedule)", "(0, 1e37]")
    adam_eps: float = setting(1e-8, "Adam's epsilon: PyTorch's default; Keras' is 1e-7", "(0, 1]")
    batch_size: int = setting(32, "images per batch", "[1, 65536]")
    schedule: Schedule = setting("constant", "the learning rate over the steps: constant, one-cycle or cosine")
    objective: Objective = setting("greedy", "what pre-training learns from: greedy* train autoencoders layer by "
                                   "layer, end-to-end one of the whole encoder, simclr and byol compare two views "
                                   "of each image")
    noise_std: float = setting(0.2, "greedy-denoising: Gaussian noise on the input, clean target", "[0, inf)")
    mask_patch: int = setting(0, "greedy-masked: square patch side in pixels; 0: image_size // 8", "[0, 1024]")
    mask_ratio: float = setting(0.5, "greedy-masked: share of patches masked; the loss counts masked pixels only",
                                "(0, 1]")
    temperature: float = setting(0.5, "simclr: NT-Xent's temperature; SimCLR's choice for small batches (0.1 "
                                 "needs large)", "(0, 100]")
    projection_dim: int = setting(128, "simclr, byol: output width of the projection head (and of BYOL's "
                                  "predictor)", "[1, 65536]")
    hidden_dim: int = setting(512, "simclr, byol: hidden width of the projection head (and of BYOL's predictor)",
                              "[1, 65536]")
    momentum: float = setting(0.99, "byol: the target's moving-average momentum at the first step, rising to 1 "
                              "(cosine)", "[0, 1]")
    byol_lr: float | None = setting(5e-4, "byol: its own learning rate; null: pretrain.lr. Its online network "
                                    "collapsed at the 2e-3 the autoencoders and SimCLR train well at (probes below "
                                    "the random encoder's) and learned at 5e-4", "(0, 1e37]")
    dataset: str | None = setting(None, "pre-training data of its own (labelled or not), a data set like "
                                  "data.dataset; null: the labelled data set")
    root: str | None = setting(None, "pretrain.dataset's folder")
    fraction: float = setting(1.0, "share of pretrain.dataset used (stratified); data.ae_fraction is for the "
                              "labelled data", "(0, 1]")
    include_test: bool = setting(False, "let the labelled test images into pre-training (transductive)")


@dataclass
class ProbeConfig:
    enabled: bool = setting(True, "linear and kNN probes of the frozen features at every depth")
    train_limit: int | None = setting(None, "cap on the labelled train images the probes fit (stratified); null: "
                                      "all", "[2, inf)")


@dataclass
class FinetuneConfig:
    epochs: int = setting(100, "fine-tuning epochs of each arm", "[1, 100000]")
    lr: float = setting(1e-3, "Adam's learning rate (its peak under a schedule)", "(0, 1e37]")
    adam_eps: float = setting(1e-8, "Adam's epsilon: PyTorch's default; Keras' is 1e-7", "(0, 1]")
    batch_size: int = setting(32, "images per batch", "[1, 65536]")
    schedule: Schedule = setting("constant", "the learning rate over the steps: constant, one-cycle or cosine")
    weight_decay: float = setting(0.0, "Adam's weight decay (L2 penalty)", "[0, inf)")
    early_stopping_patience: int | None = setting(10, "epochs without a better val accuracy before an arm stops; "
                                                  "null: off", "[0, 100000]")
    target_accuracy: float | None = setting(None, "the val accuracy epochs_to_target counts to; null: "
                                            "target_fraction x the scratch arm's best", "[0, 1]")
    target_fraction: float = setting(0.95, "the target as a share of the scratch arm's best val accuracy, where "
                                     "target_accuracy is null", "(0, 1]")
    arms: list[Arm] = setting(["pretrained", "scratch"], "the arms a run fine-tunes: pretrained (from the "
                              "pre-trained encoder) and scratch (from initial weights)")


@dataclass
class TrainerConfig:
    precision: Precision = setting("auto", "numeric precision: auto is bf16 autocast where the CPU or GPU computes "
                                   "it natively, else 32")
    device: Device = setting("auto", "Lightning's accelerator: auto takes a GPU where there is one, else the CPU; "
                             "gpu is Lightning's name for cuda or mps")
    devices: str = setting("1", "Lightning devices: a count, a list of indices like 0,1, -1 (all) or auto")
    num_nodes: int = setting(1, "nodes for multi-node training (torchrun, SLURM)", "[1, 100000]")
    strategy: str = setting("auto", "Lightning strategy: auto, ddp, ddp_spawn, ...")
    sync_batchnorm: bool = setting(False, "BatchNorm statistics over all devices (DDP), not each device's own")
    gradient_clip_val: float | None = setting(None, "clip the gradients' norm to this; null: no clipping",
                                              "(0, inf)")
    channels_last: bool = setting(True, "the channels-last memory format, which most hardware convolves faster")
    num_workers: int = setting(0, "data loader worker processes; data is decoded in memory, so workers rarely "
                               "pay off", "[0, 1024]")
    allocator: Allocator = setting("auto", "auto (tcmalloc from 128 px up, where it was measured to pay), tcmalloc "
                                   "or default")
    progress: bool = setting(True, "progress bars on a terminal, one line per epoch elsewhere; false (--quiet): "
                             "neither")
    smoke: bool = setting(False, "a few batches, one epoch: proves a preset runs end to end")
    loggers: list[Logger] = setting(["csv", "tensorboard"], "where each fit's metrics go: csv and tensorboard "
                                    "write files in logs/, mlflow and wandb are trackers (W&B offline)")
    experiment: str | None = setting(None, "the MLflow experiment and W&B project; null: the run (or study) "
                                     "folder's name")


@dataclass
class PredictConfig:
    top_k: int = setting(3, "classes shown for each predicted image", "[1, 1000]")
    images: int = setting(4, "test images that `run` predicts and shows in the report", "[1, 1000]")


@dataclass
class StudyConfig:
    label_fractions: list[float] = setting([0.01, 0.1, 1.0], "shares of the labelled train images a study's cells "
                                           "fine-tune on", "(0, 1]")
    seeds: int = setting(5, "seeds per cell, from `seed` on; a verdict needs at least 2 (a paired t interval), 5 "
                         "give it 4 degrees of freedom", "[1, 1000]")
    objectives: list[Objective] = setting(["greedy"], "pre-training objectives each compared with scratch")
    epochs: int = setting(10, "fine-tuning epochs per cell (early stopping is off in a study), at least enough for "
                          "study.min_steps", "[1, 100000]")
    min_steps: int = setting(200, "optimizer steps a cell trains at least, so that small fractions train too",
                             "[0, 100000000]")
    val_limit: int | None = setting(1000, "validation images (stratified) used for model selection in every cell; "
                                    "null: all", "[2, inf)")
    engine: Engine = setting("auto", "auto: ray where this machine's CPUs run two or more tasks at once (Ray "
                             "installed, fits on the CPU in one process) or study.address or study.task_gpus asks "
                             "for it, else serial; serial: every task in this process; ray: tasks on a Ray cluster")
    address: str | None = setting(None, "ray: a running cluster (auto, HOST:PORT); null starts one on this machine")
    task_cpus: float = setting(1.0, "ray: CPUs per task (its threads)", "(0, 1024]")
    task_gpus: float = setting(0.0, "ray: GPUs per task (a share of one, e.g. 0.25, puts four tasks on a GPU)",
                               "[0, 64]")


@dataclass
class Config:
    preset: str = setting("quick", "the named settings these start from (presets/NAME.yaml); set by --preset, not "
                          "by a file")
    seed: int = setting(0, "fixes splits, initialisation, augmentation and data order", "[0, 2147483647]")
    model: ModelConfig = setting(ModelConfig, "the network: encoder blocks, strides, dropout, BatchNorm, "
                                 "initial weights")
    data: DataConfig = setting(DataConfig, "the labelled data set, its splits and limits")
    augment: AugmentConfig = setting(AugmentConfig, "random changes to the training images")
    pretrain: PretrainConfig = setting(PretrainConfig, "pre-training the encoder: objective, optimizer, data")
    finetune: FinetuneConfig = setting(FinetuneConfig, "fine-tuning the classifier, from the pre-trained encoder "
                                       "and from scratch")
    trainer: TrainerConfig = setting(TrainerConfig, "where and how fits run: device, precision, loggers")
    predict: PredictConfig = setting(PredictConfig, "the predictions a run shows in its report")
    probe: ProbeConfig = setting(ProbeConfig, "linear and kNN probes of the frozen features")
    study: StudyConfig = setting(StudyConfig, "the label-efficiency study: fractions, seeds, objectives, engine")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def preset_names() -> list[str]:
    folder = resources.files("aepretrain") / "presets"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


MAX_SETTINGS_BYTES = 65_536  # a full config.yaml is 3 kB; pure-Python YAML reads this much in about a second
MAX_NESTING = 16  # the deepest setting, model.blocks[i].channels[j], lies 4 levels down
QUOTE_LIMIT = 80  # characters of a user's value an error message quotes


def cut(text: str, limit: int = QUOTE_LIMIT) -> str:
    """``text`` as an error message quotes it: at most ``limit`` characters, then '...'.

    >>> cut("short"), len(cut("x" * 10_000))
    ('short', 83)
    """
    return text if len(text) <= limit else text[:limit] + "..."


class _SettingsLoader(yaml.SafeLoader):
    """Safe YAML without what no settings file needs and a crafted one uses to take all memory and time: aliases
    (a few hundred bytes of nested ``*name`` expand to billions of items) and deep nesting."""

    def __init__(self, text: str, where: str) -> None:
        super().__init__(text)
        self.where, self.depth = where, 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        line = f"line {event.start_mark.line + 1}"
        if isinstance(event, yaml.AliasEvent):
            raise UserError(f"{self.where}, {line}: an alias (*{cut(event.anchor)}) is not accepted in settings; "
                            "write the value out")
        self.depth += 1
        if self.depth > MAX_NESTING:
            raise UserError(f"{self.where}, {line}: lists or mappings nested more than {MAX_NESTING} deep are not "
                            "settings")
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def _load_yaml(text: str, where: str) -> dict[str, Any]:
    """The settings in ``text``: one line on a mistake, however the text was crafted."""
    loader = _SettingsLoader(text, where)
    try:
        loaded = loader.get_single_data()
    except yaml.YAMLError as exc:
        raise UserError(f"{where} is not valid YAML: {cut(first_line(exc), 2 * QUOTE_LIMIT)}") from None
    except ValueError as exc:  # a number of more than 4300 digits, a date like 2024-13-01
        reason = first_line(exc).split(";")[0]
        raise UserError(f"{where} holds a value YAML cannot read: {cut(reason, 2 * QUOTE_LIMIT)}") from None
    finally:
        loader.dispose()
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise UserError(f"{where} must hold a mapping of settings, found {type(loaded).__name__}")
    return loaded


def closest(key: str, choices: list[str]) -> str:
    match = difflib.get_close_matches(key, choices, n=1, cutoff=0.0)
    return f" (closest valid: {match[0]})" if match else ""


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _plain(kind: Any) -> Any:
    """A type hint without its ``| None``."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(kind) if a is not type(None))
    return kind


def _coerce(value: Any, kind: Any, key: str, where: str) -> Any:
    """Check a YAML value against the field's type hint and convert what is safe to convert."""
    if value is None and type(None) in typing.get_args(kind):
        return None
    kind = _plain(kind)
    if typing.get_origin(kind) is Literal:  # its choices are checked with the ranges, once every layer is in
        kind = str
    if value is None:
        raise UserError(f"{where}: {key} cannot be null")
    if typing.get_origin(kind) is list:
        (item,) = typing.get_args(kind)
        if item is BlockSpec:
            if not isinstance(value, list):
                raise UserError(f"{where}: {key} must be a list of blocks like {{channels: [64], kernel: 7}}")
            bad = next((i for i, block in enumerate(value) if not isinstance(block, dict)), None)
            if bad is not None:
                raise UserError(f"{where}: {key}[{bad}] must be a mapping with channels and kernel")
            return [_merge(BlockSpec([1]), block, f"{key}[{i}]", where) for i, block in enumerate(value)]
        if not isinstance(value, list):
            raise UserError(f"{where}: {key} must be a list, got {cut(repr(value))}")
        return [_coerce(v, item, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if kind is bool and not isinstance(value, bool):
        raise UserError(f"{where}: {key} must be true or false, got {cut(repr(value))}")
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise UserError(f"{where}: {key} must be a whole number, got {cut(repr(value))}")
    if kind is float:
        if isinstance(value, str):  # YAML reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{where}: {key} must be a number, got {cut(repr(value))}")
        return float(value)
    if kind is str:
        if isinstance(value, (dict, list)):
            raise UserError(f"{where}: {key} takes one value, not {cut(repr(value))}")
        return str(value)
    return value


def _merge(target: Any, updates: dict[str, Any], prefix: str, where: str) -> Any:
    """Apply a nested mapping to a dataclass, refusing unknown keys by name."""
    fields = {f.name: f for f in dataclasses.fields(target)}
    for key, value in updates.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            valid = [f"{prefix}.{name}" if prefix else name for name in fields]
            raise UserError(f"unknown setting '{cut(dotted)}' in {where}{closest(dotted[:QUOTE_LIMIT], valid)}")
        current = getattr(target, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise UserError(f"{where}: {dotted} is a section; give it a mapping, not {cut(repr(value))}")
            _merge(current, value, dotted, where)
        elif isinstance(value, dict) and value:  # `--set data.root.x=1`: no setting lies under a value
            inner = f"{dotted}.{next(iter(value))}"
            raise UserError(f"unknown setting '{cut(inner)}' in {where}: {dotted} is a value, "
                            "not a section")
        else:
            setattr(target, key, _coerce(value, _hints(type(target))[key], dotted, where))
    return target


def _dotted_to_nested(assignment: str) -> dict[str, Any]:
    if "=" not in assignment:
        raise UserError(f"--set takes key=value, got '{cut(assignment)}'")
    key, raw = assignment.split("=", 1)
    if len(raw) > MAX_SETTINGS_BYTES:
        raise UserError(f"--set {cut(assignment)}: the value is longer than {MAX_SETTINGS_BYTES:,} characters")
    value = _load_yaml(f"v: {raw}", f"--set {cut(assignment)}")["v"] if raw.strip() else None
    return _nest(key.strip(), value)


class Setting(NamedTuple):
    """One setting as the schema gives it: read from its dataclass field (type, ``setting``'s metadata, default)."""

    key: str  # dotted; the fields of a list of blocks as model.blocks[].kernel
    kind: Any  # the type hint
    help: str
    range: str | None  # where the setting is a list: of each item
    choices: tuple[str, ...]  # the Literal's; where the setting is a list: of each item
    default: Any  # the dataclass's; dataclasses.MISSING where it has none

    @property
    def rule(self) -> str:
        """The key ``_flat`` gives the values that ``range`` and ``choices`` apply to: ``study.objectives[]``."""
        return self.key + "[]" * (typing.get_origin(_plain(self.kind)) is list)


def schema(cls: type = Config, prefix: str = "") -> list[Setting]:
    """Every setting under ``cls``, in the dataclasses' order; a section's settings stand in for it, and the fields of
    a list of blocks follow the list.

    >>> [s.key for s in schema()][:4]
    ['preset', 'seed', 'model.blocks', 'model.blocks[].channels']
    >>> next(s for s in schema() if s.key == "study.objectives").choices
    ('greedy', 'greedy-denoising', 'greedy-masked', 'end-to-end', 'simclr', 'byol')
    """
    rows = []
    for f in dataclasses.fields(cls):
        kind, key = _hints(cls)[f.name], prefix + f.name
        if dataclasses.is_dataclass(kind):
            rows += schema(kind, f"{key}.")
            continue
        plain = _plain(kind)
        item = typing.get_args(plain)[0] if typing.get_origin(plain) is list else plain
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        choices = typing.get_args(item) if typing.get_origin(item) is Literal else ()
        rows.append(Setting(key, kind, f.metadata.get("help", ""), f.metadata.get("range"), choices, default))
        if item is BlockSpec:
            rows += schema(BlockSpec, f"{key}[].")
    return rows


@functools.cache
def _rules() -> dict[str, Setting]:
    """The settings that have a range or choices, by the key ``_flat`` gives their values."""
    return {s.rule: s for s in schema() if s.range or s.choices}


def choices_of(s: Setting) -> tuple[str, ...]:
    """What a setting may be, where it is one of a few: its Literal's values; a preset's are the preset files."""
    return tuple(preset_names()) if s.key == "preset" else s.choices


def flow(value: Any) -> str:
    """A setting's value as YAML on one line.

    >>> flow([BlockSpec([16], 5)]), flow("32"), flow(None), flow(1e-5)
    ('[{channels: [16], kernel: 5}]', "'32'", 'null', '1.0e-05')
    """
    if isinstance(value, list):
        value = [dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for v in value]
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


def allowed_text(s: Setting, quote: Callable[[str], str] = str) -> str:
    """What a setting may be, in words: its range or choices (of each item, for a list), else what its type takes;
    ``quote`` marks up each value.

    >>> allowed_text(next(s for s in schema() if s.key == "finetune.early_stopping_patience"))
    '[0, 100000], or null'
    """
    choices = choices_of(s)
    text = quote(s.range) if s.range else "one of " + ", ".join(map(quote, choices)) if choices else ""
    text = f"each item {text}" if text and s.rule != s.key else text or \
        {"str": "text", "bool": f"{quote('true')} or {quote('false')}"}.get(type_name(_plain(s.kind)), "")
    return f"{text}, or {quote('null')}" if type(None) in typing.get_args(s.kind) else text


def keys_table(preset: str = "quick") -> str:
    """Every setting, one a line: dotted key, type, its value in ``preset`` (a block's fields: their default),
    what it may be and what it is.

    >>> print(keys_table().splitlines()[4])  # doctest: +ELLIPSIS
    seed ... int ... 0 ... [0, 2147483647] ... fixes splits, initialisation, augmentation and data order
    """
    cfg = resolve(preset)
    rows = [("key", "type", f"{preset}", "allowed", "help")]
    for s in schema():
        value = s.default if "[]" in s.key else value_at(cfg, s.key)
        shown = "-" if value is dataclasses.MISSING else flow(value)
        rows.append((s.key, type_name(s.kind), shown, allowed_text(s), s.help))
    widths = [min(max(len(row[i]) for row in rows), limit) for i, limit in enumerate((40, 16, 20, 40))]
    head = (f"# every setting, with its value in the {preset} preset (--preset NAME: another's); ranges: [ and ] "
            "include the end, ( and ) leave it out\n# --set KEY=VALUE or a --config file sets them\n")
    return head + "".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1] + "\n"
                          for row in rows)


def type_name(kind: Any) -> str:
    """A type hint as the settings' docs show it: a Literal by its values' type.

    >>> type_name(_hints(StudyConfig)["objectives"]), type_name(_hints(DataConfig)["train_limit"])
    ('list[str]', 'int | None')
    """
    if typing.get_origin(kind) is Literal:
        return type(typing.get_args(kind)[0]).__name__
    if typing.get_origin(kind) is list:
        return f"list[{type_name(typing.get_args(kind)[0])}]"
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return " | ".join(map(type_name, typing.get_args(kind)))
    return "None" if kind is type(None) else kind.__name__


def check_range(key: str, value: Any, interval: str) -> None:
    """Refuse a number outside ``interval`` (NaN is outside every one), naming the key and the range.

    >>> check_range("model.dropout", 0.5, "[0, 1)")
    >>> check_range("model.dropout", 1.5, "[0, 1)")
    Traceback (most recent call last):
    aepretrain.errors.UserError: model.dropout must lie in [0, 1), got 1.5
    """
    low, high = (float(end) for end in interval[1:-1].split(", "))
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not ((low <= value) if interval[0] == "[" else (low < value)) or \
            not ((value <= high) if interval[-1] == "]" else (value < high)):
        raise UserError(f"{key} must lie in {interval}, got {cut(repr(value))}")


def check_choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    """Refuse a value that is not one of ``choices``, naming the key, the closest choice and all of them.

    >>> check_choice("trainer.device", "gpux", DEVICES)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    aepretrain.errors.UserError: unknown device 'gpux' for trainer.device (closest valid: gpu); choose one of auto, ...
    """
    if value not in choices:
        noun = re.sub(r"\[\d+\]$", "", key.split(".")[-1]).lstrip("-").removesuffix("s")
        hint = closest(str(value)[:QUOTE_LIMIT], list(choices))
        raise UserError(f"unknown {noun} {cut(repr(value))} for {key}{hint}; "
                        f"choose one of {', '.join(choices)}")


def check_image_size(key: str, size: int, model: ModelConfig) -> None:
    """In range, and halved whole by every block and the first stride."""
    check_range(key, size, _rules()["data.image_size"].range)
    factor = 2 ** len(model.blocks) * max(model.autoencoder_stride, model.classifier_stride)
    if size % factor:
        raise UserError(f"{key} {size} must be a multiple of {factor} (one halving per block and the first "
                        f"stride), e.g. {max(factor, round(size / factor) * factor)}")


def _flat(value: Any, key: str = "") -> list[tuple[str, str, Any]]:
    """(key, its rule's key, value) for every setting and list item: ``model.blocks[1].kernel`` follows the rule
    ``model.blocks[].kernel``."""
    if dataclasses.is_dataclass(value):
        return [row for f in dataclasses.fields(value)
                for row in _flat(getattr(value, f.name), f"{key}.{f.name}" if key else f.name)]
    if isinstance(value, list):
        return [(shown.replace(f"{key}[]", f"{key}[{i}]", 1), rule, v)
                for i, item in enumerate(value) for shown, rule, v in _flat(item, f"{key}[]")]
    return [(key, key, value)]


def _validate(cfg: Config) -> None:
    """Every setting against its range or choices, then what a range cannot say; before any work starts."""
    rules = _rules()
    for key, rule, value in _flat(cfg):
        if rule not in rules:
            continue
        if rules[rule].range and value is not None:
            check_range(key, value, rules[rule].range)
        elif rules[rule].choices:
            check_choice(key, value, rules[rule].choices)
    for key, value in (("model.blocks", cfg.model.blocks), ("finetune.arms", cfg.finetune.arms),
                       ("study.label_fractions", cfg.study.label_fractions),
                       ("study.objectives", cfg.study.objectives)):
        if not value:
            raise UserError(f"{key} is empty; it needs at least one item")
    # A study would run, and count, a cell twice; its folder is named after the fraction to 6 digits (f"{f:g}")
    fractions = [f"{f:g}" for f in cfg.study.label_fractions]
    for key, names, told in (("study.label_fractions", fractions, " (to 6 significant digits)"),
                             ("study.objectives", cfg.study.objectives, ""),
                             ("trainer.loggers", cfg.trainer.loggers, "")):
        twice = next((name for i, name in enumerate(names) if name in names[:i]), None)
        if twice is not None:
            raise UserError(f"{key} lists {cut(twice)} more than once{told}; give each once")
    for b, block in enumerate(cfg.model.blocks):
        if not block.channels:
            raise UserError(f"model.blocks[{b}].channels is empty; a block needs at least one convolution")
        if block.kernel % 2 == 0:
            raise UserError(f"model.blocks[{b}].kernel must be odd (so that padding keeps the size), got "
                            f"{block.kernel}")
    brightness = cfg.augment.brightness
    if len(brightness) != 2 or brightness[0] > brightness[1]:
        raise UserError(f"augment.brightness is a range of two numbers, low to high, like [0.7, 1.3]; got "
                        f"{cut(str(brightness))}")
    check_image_size("data.image_size", cfg.data.image_size, cfg.model)
    devices = cfg.trainer.devices
    count = devices.isdigit() and int(devices) > 0
    indices = "," in devices and all(part.isdigit() for part in devices.rstrip(",").split(","))
    if not (count or indices or devices in ("auto", "-1")):
        raise UserError(f"trainer.devices is auto, -1 (all), a count of at least 1 or a list of device indices "
                        f"like 0,1; got {cut(repr(devices))}")


def resolve(
    preset: str = "quick",
    config_file: str | Path | None = None,
    overrides: list[str] | None = None,
    **flags: Any,
) -> Config:
    """Build the settings of a run: defaults, then the preset, the YAML file, --set, then flags.

    ``flags`` are dotted keys with values that are already typed (``{"data.dataset": "synthetic"}``);
    None values are ignored, so CLI flags that were not given change nothing.
    """
    names = preset_names()
    if preset not in names:
        raise UserError(f"unknown preset '{cut(preset)}'{closest(preset[:QUOTE_LIMIT], names)}; "
                        f"presets: {', '.join(names)}")
    cfg = Config(preset=preset)
    text = (resources.files("aepretrain") / "presets" / f"{preset}.yaml").read_text()
    _merge(cfg, _load_yaml(text, f"preset {preset}"), "", f"preset {preset}")
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise UserError(f"config file not found: {path}")
        _merge(cfg, _load_yaml(_read_text(path), str(path)), "", str(path))
    for assignment in overrides or []:
        _merge(cfg, _dotted_to_nested(assignment), "", f"--set {cut(assignment)}")
    for key, value in flags.items():
        if value is not None:
            _merge(cfg, _nest(key, value), "", f"--{key.split('.')[-1]}")
    cfg.preset = preset
    if cfg.trainer.smoke:
        shrink_for_smoke(cfg)
    _validate(cfg)
    return cfg


def shrink_for_smoke(cfg: Config) -> None:
    """One epoch of a few small batches on a small slice of the data: proves a preset runs end to end."""
    cfg.pretrain.epochs = cfg.finetune.epochs = 1
    cfg.pretrain.batch_size = min(cfg.pretrain.batch_size, 4)  # small, but more than BatchNorm's one
    cfg.finetune.batch_size = min(cfg.finetune.batch_size, 4)
    cfg.data.train_limit = min(cfg.data.train_limit or 96, 96)
    cfg.data.test_limit = min(cfg.data.test_limit or 16, 16)
    cfg.data.synthetic_per_class = min(cfg.data.synthetic_per_class, 16)
    cfg.predict.images = min(cfg.predict.images, 2)
    cfg.probe.train_limit = min(cfg.probe.train_limit or 16, 16)


def _nest(key: str, value: Any) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    node = nested
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return nested


def from_dict(values: dict[str, Any], where: str = "saved settings", strict: bool = True) -> Config:
    """Rebuild settings saved by a run (``config.yaml``). Strict by default: an unknown key is an error. With
    ``strict=False`` keys this version lacks are dropped, so a checkpoint written by another version still loads.

    >>> from_dict({"seed": 3, "data": {"image_size": 64}}).data.image_size
    64
    >>> from_dict({"seed": 3, "gone": 1}, strict=False).seed
    3
    """
    cfg = Config()
    _merge(cfg, values if strict else _known(values, cfg), "", where)
    _validate(cfg)
    return cfg


def _known(values: dict[str, Any], target: Any) -> dict[str, Any]:
    fields = {f.name for f in dataclasses.fields(target)}
    kept = {}
    for key, value in values.items():
        if key in fields:
            current = getattr(target, key)
            kept[key] = _known(value, current) if dataclasses.is_dataclass(current) and isinstance(value, dict) \
                else value
    return kept


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted key -> value for nested mappings of settings; lists (model.blocks too) are kept whole.

    >>> flatten({"seed": 0, "data": {"image_size": 32, "root": None}})
    {'seed': 0, 'data.image_size': 32, 'data.root': None}
    """
    out: dict[str, Any] = {}
    for k, v in values.items():
        out |= flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
    return out


def value_at(cfg: Any, key: str) -> Any:
    """The setting at a dotted key, e.g. ``value_at(cfg, "finetune.epochs")``."""
    return functools.reduce(getattr, key.split("."), cfg)


def differences(a: Config, b: Config, ignore: set[str] = frozenset()) -> list[tuple[str, Any, Any]]:
    """(dotted key, value in a, value in b) for every setting that differs."""
    fa, fb = flatten(a.to_dict()), flatten(b.to_dict())
    return [(k, fa[k], fb.get(k)) for k in fa if k not in ignore and fa[k] != fb.get(k)]


def dump(cfg: Config) -> str:
    """Every setting as YAML, in the dataclasses' order: a file that ``--config`` reads back to ``cfg``."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def save(cfg: Config, path: Path) -> None:
    """Written whole or not at all (a temporary file, then a rename): config.yaml marks a run folder."""
    atomic_write(path, dump(cfg))


def load(path: Path) -> Config:
    """Settings saved by a run, with one clear line if the file is damaged."""
    return from_dict(_load_yaml(_read_text(path), str(path)), str(path))


def _read_text(path: Path) -> str:
    """A settings file's text; one that is larger than MAX_SETTINGS_BYTES is refused before it is read whole."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SETTINGS_BYTES + 1)
        if len(data) > MAX_SETTINGS_BYTES:
            raise UserError(f"{path} is larger than {MAX_SETTINGS_BYTES:,} bytes, more than any settings file "
                            "holds (a full one is 3 kB)")
        return data.decode()
    except UnicodeDecodeError:
        raise UserError(f"{path} is not a text file of settings (YAML): it does not decode as UTF-8") from None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
