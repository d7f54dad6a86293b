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
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError
from .fileio import atomic_write


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


@dataclass
class PretrainConfig:
    epochs: int = 30
    lr: float = 1e-3
    batch_size: int = 32
    schedule: str = "constant"  # constant | one-cycle | cosine
    objective: str = "greedy"  # greedy | greedy-denoising | greedy-masked | end-to-end
    noise_std: float = 0.2  # greedy-denoising: Gaussian noise on the input, clean target
    mask_patch: int = 0  # greedy-masked: square patch side in pixels; 0: image_size // 8
    mask_ratio: float = 0.5  # greedy-masked: share of patches masked; the loss counts masked pixels only
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


@dataclass
class PredictConfig:
    top_k: int = 3
    images: int = 4  # test images that `run` predicts and shows in the report


@dataclass
class StudyConfig:
    label_fractions: list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0])
    seeds: int = 3
    objectives: list[str] = field(default_factory=lambda: ["greedy"])
    epochs: int = 10  # fine-tuning epochs per cell, at least ...
    min_steps: int = 200  # ... enough epochs for this many optimizer steps, so small fractions train too
    val_limit: int | None = 1000  # validation images (stratified) used for model selection in every cell


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
OBJECTIVES = ("greedy", "greedy-denoising", "greedy-masked", "end-to-end")
PRECISIONS = ("auto", "32", "bf16-mixed", "16-mixed")
DEVICES = ("auto", "cpu", "cuda", "gpu", "mps")


def preset_names() -> list[str]:
    folder = resources.files("aepretrain") / "presets"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _load_yaml(text: str, where: str) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UserError(f"{where} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise UserError(f"{where} must hold a mapping of settings, found {type(loaded).__name__}")
    return loaded


def closest(key: str, choices: list[str]) -> str:
    match = difflib.get_close_matches(key, choices, n=1, cutoff=0.0)
    return f" (closest valid: {match[0]})" if match else ""


def _coerce(value: Any, annotation: Any, key: str, where: str) -> Any:
    """Check a YAML value against the field's type and convert what is safe to convert."""
    text = str(annotation)
    if value is None:
        if "None" in text:
            return None
        raise UserError(f"{where}: {key} cannot be null")
    if "list[BlockSpec]" in text:
        if not isinstance(value, list):
            raise UserError(f"{where}: {key} must be a list of blocks like {{channels: [64], kernel: 7}}")
        blocks = []
        for i, item in enumerate(value):
            if not isinstance(item, dict):
                raise UserError(f"{where}: {key}[{i}] must be a mapping with channels and kernel")
            blocks.append(_merge(BlockSpec([1]), item, f"{key}[{i}]", where))
        return blocks
    if text.startswith("list"):
        if not isinstance(value, list):
            raise UserError(f"{where}: {key} must be a list, got {value!r}")
        return value
    for name, kind in (("bool", bool), ("int", int), ("float", float), ("str", str)):
        if text == name or text.startswith(name + " ") or f"{name} |" in text:
            if kind is bool and not isinstance(value, bool):
                raise UserError(f"{where}: {key} must be true or false, got {value!r}")
            if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
                raise UserError(f"{where}: {key} must be a whole number, got {value!r}")
            if kind is float:
                if isinstance(value, str):  # YAML reads 1e-3 (no dot) as a string
                    try:
                        return float(value)
                    except ValueError:
                        pass
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise UserError(f"{where}: {key} must be a number, got {value!r}")
                return float(value)
            if kind is str:
                return str(value)
            return value
    return value


def _merge(target: Any, updates: dict[str, Any], prefix: str, where: str) -> Any:
    """Apply a nested mapping to a dataclass, refusing unknown keys by name."""
    fields = {f.name: f for f in dataclasses.fields(target)}
    for key, value in updates.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            valid = [f"{prefix}.{name}" if prefix else name for name in fields]
            raise UserError(f"unknown setting '{dotted}' in {where}{closest(dotted, valid)}")
        current = getattr(target, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise UserError(f"{where}: {dotted} is a section; give it a mapping, not {value!r}")
            _merge(current, value, dotted, where)
        else:
            setattr(target, key, _coerce(value, fields[key].type, dotted, where))
    return target


def _dotted_to_nested(assignment: str) -> dict[str, Any]:
    if "=" not in assignment:
        raise UserError(f"--set takes key=value, got '{assignment}'")
    key, raw = assignment.split("=", 1)
    value = _load_yaml(f"v: {raw}", f"--set {assignment}")["v"] if raw.strip() else None
    return _nest(key.strip(), value)


def _validate(cfg: Config) -> None:
    for section in (cfg.pretrain, cfg.finetune):
        if section.schedule not in SCHEDULES:
            raise UserError(f"unknown schedule '{section.schedule}'{closest(section.schedule, list(SCHEDULES))}")
    if cfg.pretrain.objective not in OBJECTIVES:
        raise UserError(f"unknown objective '{cfg.pretrain.objective}'{closest(cfg.pretrain.objective, list(OBJECTIVES))}"
                        f"; objectives: {', '.join(OBJECTIVES)}")
    for objective in cfg.study.objectives:
        if objective not in OBJECTIVES:
            raise UserError(f"unknown objective '{objective}' in study.objectives{closest(objective, list(OBJECTIVES))}")
    if cfg.trainer.device not in DEVICES:
        raise UserError(f"unknown device '{cfg.trainer.device}'{closest(cfg.trainer.device, list(DEVICES))}; "
                        f"devices: {', '.join(DEVICES)}")
    if not cfg.finetune.arms:
        raise UserError("finetune.arms is empty: name pretrained, scratch or both")
    for key, value in (("pretrain.epochs", cfg.pretrain.epochs), ("finetune.epochs", cfg.finetune.epochs),
                       ("pretrain.batch_size", cfg.pretrain.batch_size), ("finetune.batch_size", cfg.finetune.batch_size),
                       ("data.image_size", cfg.data.image_size), ("study.seeds", cfg.study.seeds)):
        if value < 1:
            raise UserError(f"{key} must be at least 1, got {value}")
    if len(cfg.augment.brightness) != 2 or not all(isinstance(v, (int, float)) for v in cfg.augment.brightness):
        raise UserError(f"augment.brightness is a range of two numbers like [0.7, 1.3], got {cfg.augment.brightness}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in cfg.study.label_fractions):
        raise UserError(f"study.label_fractions takes numbers, got {cfg.study.label_fractions}")
    for b, block in enumerate(cfg.model.blocks):
        if not block.channels or not all(isinstance(c, int) and c > 0 for c in block.channels) or block.kernel % 2 == 0:
            raise UserError(f"model.blocks[{b}] needs positive whole channels and an odd kernel, got "
                            f"channels {block.channels}, kernel {block.kernel}")
    factor = 2 ** len(cfg.model.blocks) * max(cfg.model.autoencoder_stride, cfg.model.classifier_stride)
    if cfg.data.image_size % factor:
        raise UserError(f"data.image_size {cfg.data.image_size} must be a multiple of {factor} (one halving per "
                        f"block and the first stride), e.g. {max(factor, round(cfg.data.image_size / factor) * factor)}")
    if cfg.trainer.allocator not in ("auto", "tcmalloc", "default"):
        raise UserError(f"trainer.allocator is auto, tcmalloc or default, not '{cfg.trainer.allocator}'")
    if cfg.trainer.precision not in PRECISIONS:
        raise UserError(f"unknown precision '{cfg.trainer.precision}'; choose one of {', '.join(PRECISIONS)}")
    for arm in cfg.finetune.arms:
        if arm not in ("pretrained", "scratch"):
            raise UserError(f"finetune.arms holds '{arm}'; valid arms are pretrained and scratch")
    if not cfg.model.blocks:
        raise UserError("model.blocks is empty: the encoder needs at least one block")
    for name in ("val_fraction", "test_fraction", "ae_fraction"):
        value = getattr(cfg.data, name)
        if not 0.0 < value < 1.0 and not (name == "ae_fraction" and value == 1.0):
            raise UserError(f"data.{name} must lie between 0 and 1 (exclusive), got {value}")
    if not 0.0 < cfg.pretrain.fraction <= 1.0:
        raise UserError(f"pretrain.fraction must lie in (0, 1], got {cfg.pretrain.fraction}")


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
        raise UserError(f"unknown preset '{preset}'{closest(preset, names)}; presets: {', '.join(names)}")
    cfg = Config(preset=preset)
    text = (resources.files("aepretrain") / "presets" / f"{preset}.yaml").read_text()
    _merge(cfg, _load_yaml(text, f"preset {preset}"), "", f"preset {preset}")
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise UserError(f"config file not found: {path}")
        _merge(cfg, _load_yaml(path.read_text(), str(path)), "", str(path))
    for assignment in overrides or []:
        _merge(cfg, _dotted_to_nested(assignment), "", f"--set {assignment}")
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
    cfg.pretrain.batch_size = min(cfg.pretrain.batch_size, 8)
    cfg.finetune.batch_size = min(cfg.finetune.batch_size, 8)
    cfg.data.train_limit = min(cfg.data.train_limit or 96, 96)
    cfg.data.test_limit = min(cfg.data.test_limit or 32, 32)
    cfg.data.synthetic_per_class = min(cfg.data.synthetic_per_class, 16)
    cfg.predict.images = min(cfg.predict.images, 2)


def _nest(key: str, value: Any) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    node = nested
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return nested


def from_dict(values: dict[str, Any], where: str = "saved settings", strict: bool = True) -> Config:
    """Rebuild settings saved by a run (``config.yaml``). Not strict: keys this version lacks are dropped,
    so a checkpoint written by another version still loads."""
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
    return from_dict(_load_yaml(path.read_text(), str(path)), str(path))
