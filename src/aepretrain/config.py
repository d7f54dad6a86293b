"""Settings: plain typed dataclasses with defaults, named presets (YAML files), and overrides.

A run's settings are resolved in this order, each layer overriding the one before:
the defaults below, the preset (``presets/NAME.yaml``), a ``--config FILE`` and ``--set key=value``.

Example:
    >>> cfg = resolve("quick", overrides=["finetune.epochs=3"])
    >>> cfg.finetune.epochs
    3
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError
from .fileio import atomic_write, first_line


@dataclass
class BlockSpec:
    """One encoder block: ``len(channels)`` x (Conv kxk + BatchNorm + ReLU), then MaxPool 2."""

    channels: list[int]
    kernel: int = 3


@dataclass
class ModelConfig:
    blocks: list[BlockSpec] = field(
        default_factory=lambda: [BlockSpec([64], 7), BlockSpec([128, 128], 3), BlockSpec([256, 256], 3)]
    )
    classifier_stride: int = 2  # first convolution; the reference's classifier table implies 2
    autoencoder_stride: int = 1  # the reference's autoencoder tables imply 1
    dropout: float = 0.5
    bn_momentum: float = 0.1  # PyTorch convention; Keras' momentum 0.99 is 0.01 here
    bn_eps: float = 1e-5
    init: str = "pytorch"  # pytorch (its defaults) | keras (Glorot-uniform kernels, zero biases, as the reference)
    in_channels: int = 3  # for `summary` only; a run takes it from the data
    num_classes: int = 37  # for `summary` only; a run takes it from the data


@dataclass
class DataConfig:
    dataset: str = "fashion-mnist"
    root: str | None = None
    image_size: int = 32
    val_fraction: float = 0.1  # carved from train, stratified
    test_fraction: float = 0.2  # only for data sets without an official test split
    ae_fraction: float = 1 / 3  # autoencoder subset: this share of train + val, stratified
    train_limit: int | None = None  # cap on train images (stratified), for fast presets
    test_limit: int | None = None
    max_pixels: int = 89_478_485  # larger images are refused as possible decompression bombs
    cache_dir: str | None = None  # default: $XDG_CACHE_HOME/aepretrain
    synthetic_per_class: int = 40  # images per class and split of the `synthetic` data set
    synthetic_classes: int = 4


@dataclass
class AugmentConfig:
    rotation: float = 10.0  # degrees, either way
    zoom: float = 0.1  # scale drawn from [1 - zoom, 1 + zoom]
    brightness: list[float] = field(default_factory=lambda: [0.7, 1.3])  # multiplicative factor
    hflip: bool = True
    fill: str = "zeros"  # what rotation and zoom fill in: zeros | nearest (the edge pixel, as Keras' ImageDataGenerator)
    zoom_axes: str = "same"  # same: one zoom for both axes | independent: one per axis (as Keras' ImageDataGenerator)


@dataclass
class PretrainConfig:
    epochs: int = 30
    lr: float = 1e-3
    adam_eps: float = 1e-8  # PyTorch's default; Keras' is 1e-7
    batch_size: int = 32
    schedule: str = "constant"  # constant | one-cycle | cosine
    objective: str = "greedy"  # greedy | greedy-denoising | greedy-masked | end-to-end | simclr | byol
    noise_std: float = 0.2  # greedy-denoising: Gaussian noise on the input, clean target
    mask_patch: int = 0  # greedy-masked: square patch side in pixels; 0: image_size // 8
    mask_ratio: float = 0.5  # greedy-masked: share of patches masked; the loss counts masked pixels only
    temperature: float = 0.5  # simclr: NT-Xent's temperature; SimCLR's choice for small batches (0.1 needs large)
    projection_dim: int = 128  # simclr, byol: output width of the projection head (and of BYOL's predictor)
    hidden_dim: int = 512  # simclr, byol: hidden width of the projection head (and of BYOL's predictor)
    momentum: float = 0.99  # byol: the target's moving-average momentum at the first step, rising to 1 (cosine)
    dataset: str | None = None  # pre-training data of its own (labelled or not); null: the labelled data set
    root: str | None = None
    fraction: float = 1.0  # share of pretrain.dataset used (stratified); data.ae_fraction is for the labelled data
    include_test: bool = False  # let the labelled test images into pre-training (transductive)


@dataclass
class ProbeConfig:
    enabled: bool = True  # linear and kNN probes of the frozen features at every depth
    train_limit: int | None = None  # cap on the labelled train images the probes fit (stratified)


@dataclass
class FinetuneConfig:
    epochs: int = 100
    lr: float = 1e-3
    adam_eps: float = 1e-8  # PyTorch's default; Keras' is 1e-7
    batch_size: int = 32
    schedule: str = "constant"  # constant | one-cycle | cosine
    weight_decay: float = 0.0
    early_stopping_patience: int | None = 10  # epochs without a better val accuracy; null: off
    target_accuracy: float | None = None  # for epochs_to_target; null: target_fraction x scratch best
    target_fraction: float = 0.95
    arms: list[str] = field(default_factory=lambda: ["pretrained", "scratch"])


@dataclass
class TrainerConfig:
    precision: str = "auto"  # auto | 32 | bf16-mixed | 16-mixed
    device: str = "auto"  # auto | cpu | cuda | mps
    devices: str = "1"  # Lightning devices: a count, a list like "0,1", or "auto"
    num_nodes: int = 1
    strategy: str = "auto"  # auto | ddp | ddp_spawn | ...
    sync_batchnorm: bool = False
    gradient_clip_val: float | None = None
    channels_last: bool = True
    num_workers: int = 0  # data is decoded in memory; workers rarely pay off
    allocator: str = "auto"  # auto (tcmalloc from 128 px up, where it was measured to pay) | tcmalloc | default
    progress: bool = True
    smoke: bool = False  # a few batches, one epoch: proves a preset runs end to end
    loggers: list[str] = field(default_factory=lambda: ["csv", "tensorboard"])  # where each fit's metrics go, of LOGGERS
    experiment: str | None = None  # the MLflow experiment and W&B project; null: the run (or study) folder's name


@dataclass
class PredictConfig:
    top_k: int = 3
    images: int = 4  # test images that `run` predicts and shows in the report


@dataclass
class StudyConfig:
    label_fractions: list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0])
    seeds: int = 5  # a verdict needs at least 2 (a paired t interval); 5 give it 4 degrees of freedom
    objectives: list[str] = field(default_factory=lambda: ["greedy"])
    epochs: int = 10  # fine-tuning epochs per cell (early stopping is off in a study), at least ...
    min_steps: int = 200  # ... enough epochs for this many optimizer steps, so small fractions train too
    val_limit: int | None = 1000  # validation images (stratified) used for model selection in every cell
    engine: str = "serial"  # serial: every task in this process; ray: tasks on a Ray cluster
    address: str | None = None  # ray: a running cluster ("auto", HOST:PORT); none starts one on this machine
    task_cpus: float = 1.0  # ray: CPUs per task (its threads)
    task_gpus: float = 0.0  # ray: GPUs per task (a share of one, e.g. 0.25, puts four tasks on a GPU)


@dataclass
class Config:
    preset: str = "quick"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    study: StudyConfig = field(default_factory=StudyConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SCHEDULES = ("constant", "one-cycle", "cosine")
OBJECTIVES = ("greedy", "greedy-denoising", "greedy-masked", "end-to-end", "simclr", "byol")
PRECISIONS = ("auto", "32", "bf16-mixed", "16-mixed")
DEVICES = ("auto", "cpu", "cuda", "gpu", "mps")
INITS = ("pytorch", "keras")
FILLS = ("zeros", "nearest")
ZOOM_AXES = ("same", "independent")
ENGINES = ("serial", "ray")
LOGGERS = ("csv", "tensorboard", "mlflow", "wandb")  # csv, tensorboard: files in logs/; mlflow, wandb: trackers


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


def _coerce(value: Any, kind: Any, key: str, where: str) -> Any:
    """Check a YAML value against the field's type hint and convert what is safe to convert."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(kind) if a is not type(None)]
        if value is None and len(options) < len(typing.get_args(kind)):
            return None
        kind = options[0]
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


# The allowed range of every number a run reads: "[" and "]" include the end, "(" and ")" leave it out.
# None is allowed where the setting's type allows it (a limit that is off, a default taken elsewhere). A learning
# rate above 1e37 overflows float32 in Adam's first step (lr / 0.1).
RANGES = {
    "seed": "[0, 2147483647]",
    "model.classifier_stride": "[1, 8]", "model.autoencoder_stride": "[1, 8]", "model.dropout": "[0, 1)",
    "model.bn_momentum": "[0, 1]", "model.bn_eps": "(0, 1)", "model.in_channels": "[1, 4]",
    "model.num_classes": "[2, 100000]",
    "data.image_size": "[8, 1024]", "data.val_fraction": "(0, 1)", "data.test_fraction": "(0, 1)",
    "data.ae_fraction": "(0, 1]", "data.train_limit": "[2, inf)", "data.test_limit": "[1, inf)",
    "data.max_pixels": "[1, inf)", "data.synthetic_per_class": "[1, 100000]", "data.synthetic_classes": "[2, 1000]",
    "augment.rotation": "[0, 180]", "augment.zoom": "[0, 1)",
    "pretrain.epochs": "[1, 100000]", "pretrain.lr": "(0, 1e37]", "pretrain.adam_eps": "(0, 1]",
    "pretrain.fraction": "(0, 1]", "pretrain.batch_size": "[1, 65536]",
    "pretrain.noise_std": "[0, inf)", "pretrain.mask_patch": "[0, 1024]", "pretrain.mask_ratio": "(0, 1]",
    "pretrain.temperature": "(0, 100]", "pretrain.projection_dim": "[1, 65536]", "pretrain.hidden_dim": "[1, 65536]",
    "pretrain.momentum": "[0, 1]",
    "probe.train_limit": "[2, inf)",
    "finetune.epochs": "[1, 100000]", "finetune.lr": "(0, 1e37]", "finetune.adam_eps": "(0, 1]",
    "finetune.batch_size": "[1, 65536]",
    "finetune.weight_decay": "[0, inf)", "finetune.early_stopping_patience": "[0, 100000]",
    "finetune.target_accuracy": "[0, 1]", "finetune.target_fraction": "(0, 1]",
    "trainer.num_nodes": "[1, 100000]", "trainer.gradient_clip_val": "(0, inf)", "trainer.num_workers": "[0, 1024]",
    "predict.top_k": "[1, 1000]", "predict.images": "[1, 1000]",
    "study.seeds": "[1, 1000]", "study.epochs": "[1, 100000]", "study.min_steps": "[0, 100000000]",
    "study.val_limit": "[2, inf)", "study.task_cpus": "(0, 1024]", "study.task_gpus": "[0, 64]",
    # items of lists
    "model.blocks[].channels[]": "[1, 8192]", "model.blocks[].kernel": "[1, 31]",
    "augment.brightness[]": "[0, inf)", "study.label_fractions[]": "(0, 1]",
}
CHOICES = {
    "pretrain.schedule": SCHEDULES, "finetune.schedule": SCHEDULES, "pretrain.objective": OBJECTIVES,
    "study.objectives[]": OBJECTIVES, "study.engine": ENGINES, "finetune.arms[]": ("pretrained", "scratch"),
    "trainer.device": DEVICES, "trainer.loggers[]": LOGGERS,
    "trainer.precision": PRECISIONS, "trainer.allocator": ("auto", "tcmalloc", "default"),
    "model.init": INITS, "augment.fill": FILLS, "augment.zoom_axes": ZOOM_AXES,
}


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
    check_range(key, size, RANGES["data.image_size"])
    factor = 2 ** len(model.blocks) * max(model.autoencoder_stride, model.classifier_stride)
    if size % factor:
        raise UserError(f"{key} {size} must be a multiple of {factor} (one halving per block and the first "
                        f"stride), e.g. {max(factor, round(size / factor) * factor)}")


def _flat(value: Any, key: str = "") -> list[tuple[str, str, Any]]:
    """(key, its rule's key in RANGES or CHOICES, value) for every setting and list item: ``model.blocks[1].kernel``
    follows the rule ``model.blocks[].kernel``."""
    if dataclasses.is_dataclass(value):
        return [row for f in dataclasses.fields(value)
                for row in _flat(getattr(value, f.name), f"{key}.{f.name}" if key else f.name)]
    if isinstance(value, list):
        return [(shown.replace(f"{key}[]", f"{key}[{i}]", 1), rule, v)
                for i, item in enumerate(value) for shown, rule, v in _flat(item, f"{key}[]")]
    return [(key, key, value)]


def _validate(cfg: Config) -> None:
    """Every setting against its range or choices, then what a range cannot say; before any work starts."""
    for key, rule, value in _flat(cfg):
        if rule in RANGES and value is not None:
            check_range(key, value, RANGES[rule])
        elif rule in CHOICES:
            check_choice(key, value, CHOICES[rule])
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


def differences(a: Config, b: Config, ignore: set[str] = frozenset()) -> list[tuple[str, Any, Any]]:
    """(dotted key, value in a, value in b) for every setting that differs."""
    def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out |= flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
        return out

    fa, fb = flat(a.to_dict()), flat(b.to_dict())
    return [(k, fa[k], fb.get(k)) for k in fa if k not in ignore and fa[k] != fb.get(k)]


def save(cfg: Config, path: Path) -> None:
    """Written whole or not at all (a temporary file, then a rename): config.yaml marks a run folder."""
    atomic_write(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


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
