"""The whole job, top to bottom: data -> pretrain -> finetune (both arms) -> evaluate -> predict -> report.

Every step writes what it finished into the run folder at once (``metrics.json`` grows step by
step), so nothing finished is lost if a later step fails.

Example:
    >>> from aepretrain.config import resolve
    >>> metrics = run(resolve("quick"), "runs/quick")  # doctest: +SKIP
    >>> metrics["finetune"]["pretrained"]["test_accuracy"]  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import config as config_module
from . import figures
from .config import Config
from .data import DataBundle, labels_required, prepare, pretrain_images
from .data.splits import stratified_subset
from .errors import UserError
from .checkpoints import load_classifier, load_encoder
from .evaluate import evaluate
from .finetune import ArmResult, classifier_path, epochs_to_target, finetune
from .models import Encoder, build_encoder
from .predict import top_k
from .probe import probe_encoder
from .pretrain import PretrainResult, pretrain, reconstruct, stage_path
from .training import is_global_zero, resolved_precision, set_threads, write_json

RUN_MARKER = "config.yaml"


def describe(bundle: DataBundle, grid: Path | None) -> dict[str, Any]:
    """What `aepretrain data` prints: counts per split and class, image size, what was skipped and why."""
    if grid is not None:
        figures.sample_grid(bundle.train.images, bundle.train.labels, bundle.classes, grid)
    return {
        "dataset": bundle.dataset, "root": bundle.root, "classes": bundle.classes, "class_ids": bundle.class_ids,
        "counts": bundle.counts(), "per_class": bundle.per_class(),
        "image_size": [bundle.image_size, bundle.image_size, bundle.channels],
        "skipped": bundle.skipped, "missing": bundle.missing, "notes": bundle.notes,
        "sample_grid": str(grid) if grid else None,
    }


def run_folder(out: str | Path, resume: bool, overwrite: bool) -> Path:
    """The run folder; one that holds another run is refused unless resume or overwrite says so."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    holds_run = (out / RUN_MARKER).is_file()
    if holds_run and overwrite:
        shutil.rmtree(out)
    elif holds_run and not resume:
        raise UserError(f"{out} already holds a run: pass --resume to continue it or --overwrite to replace it")
    elif out.is_dir() and any(out.iterdir()) and not holds_run:
        raise UserError(f"{out} is not empty and holds no aepretrain run: choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _nhwc(x: torch.Tensor) -> np.ndarray:
    return x.permute(0, 2, 3, 1).cpu().numpy()


def _metrics(out: Path) -> dict[str, Any]:
    path = out / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _start(cfg: Config, out: Path, resume: bool, overwrite: bool) -> tuple[Path, DataBundle, dict[str, Any]]:
    """Open the run folder, save the settings, prepare and describe the data."""
    set_threads()
    main = is_global_zero()
    if main:  # other DDP processes start once the first has set the folder up
        started = (out / RUN_MARKER).is_file() and resume
        out = run_folder(out, resume, overwrite)
        if not started:  # a resumed run, or an arm added to one, keeps the settings it was started with
            config_module.save(cfg, out / RUN_MARKER)
    bundle = prepare(cfg.data, cfg.seed, progress=cfg.trainer.progress)
    labels_required(bundle)
    write_json(out / "data.json", describe(bundle, out / "figures" / "samples.png" if main else None))
    metrics = _metrics(out) | {
        "preset": cfg.preset, "seed": cfg.seed, "smoke": cfg.trainer.smoke,
        "precision": resolved_precision(cfg.trainer.precision, cfg.trainer.device),
        "dataset": {"name": bundle.dataset, **bundle.counts(), "classes": bundle.classes,
                    "image_size": bundle.image_size, "channels": bundle.channels, "skipped": len(bundle.skipped)},
    }
    return out, bundle, metrics


def _pretrain(cfg: Config, bundle: DataBundle, out: Path, metrics: dict[str, Any], resume: bool) -> PretrainResult:
    images, described = pretrain_images(cfg, bundle)
    pre = pretrain(cfg, bundle, out, resume, images)
    metrics["pretrain"] = {"objective": cfg.pretrain.objective, "data": described, "images": len(images),
                           "stages": pre.stages, "test_mse": pre.test_mse}
    if cfg.probe.enabled:
        metrics["probes"] = probes(cfg, bundle, pre.encoder)
    write_json(out / "metrics.json", metrics)
    shown = bundle.test.take(np.arange(min(6, len(bundle.test))))
    originals = torch.from_numpy(np.asarray(shown.images)).permute(0, 3, 1, 2).float() / 255
    recon = reconstruct(pre.autoencoders, originals)
    if is_global_zero():
        figures.reconstructions(_nhwc(originals), [_nhwc(r) for r in recon], out / "figures" / "reconstructions.png")
    return pre


def _finetune(cfg: Config, bundle: DataBundle, out: Path, metrics: dict[str, Any], init: str,
              encoder: Encoder | None, resume: bool) -> ArmResult:
    arm = finetune(cfg, bundle, out, init, encoder, resume)
    scores = evaluate(arm.classifier, bundle.test, bundle.classes)
    metrics.setdefault("finetune", {})[init] = {
        "test_loss": scores["test_loss"], "test_accuracy": scores["test_accuracy"],
        "best_val_accuracy": arm.best_val_accuracy, "best_epoch": arm.best_epoch, "epochs": len(arm.history),
        "epochs_to_target": None, "seconds": arm.seconds, "per_class_accuracy": scores["per_class_accuracy"],
        "confusion": scores["confusion"], "history": arm.history, "checkpoint": str(classifier_path(out, init)),
        "resumed_from": arm.resumed_from,
    }
    write_json(out / "metrics.json", metrics)
    return arm


def probes(cfg: Config, bundle: DataBundle, encoder: Encoder) -> list[dict[str, Any]]:
    """Linear and kNN probes at every depth, for the pre-trained encoder and a random one of the same shape."""
    if cfg.probe.train_limit is not None and cfg.probe.train_limit < len(bundle.train):
        index = stratified_subset(bundle.train.labels, cfg.probe.train_limit, cfg.seed)
        bundle = dataclasses.replace(bundle, train=bundle.train.take(index))
    torch.manual_seed(cfg.seed + 99)
    random_encoder = build_encoder(cfg.model, bundle.channels, for_classifier=False)
    return probe_encoder(encoder, bundle, "pretrained") + probe_encoder(random_encoder, bundle, "random")


def run_pretrain(cfg: Config, out: str | Path, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Only the greedy stages; their weights land in ``out/checkpoints/pretrain-stageK.safetensors``."""
    folder, bundle, metrics = _start(cfg, Path(out), resume, overwrite)
    _pretrain(cfg, bundle, folder, metrics, resume)
    return metrics["pretrain"]


def run_finetune(cfg: Config, out: str | Path, init: str, encoder_path: str | None = None,
                 resume: bool = False) -> dict[str, Any]:
    """One arm; the pretrained arm takes the last stage's encoder from the run folder or ``encoder_path``."""
    out = Path(out)
    encoder = None
    if init == "pretrained":
        path = Path(encoder_path) if encoder_path else stage_path(out, len(cfg.model.blocks))
        if not path.is_file():
            raise UserError(f"no pre-trained encoder at {path}: run `aepretrain pretrain --out {out}` first "
                            "or pass --encoder PATH")
        encoder, _meta = load_encoder(path)
    folder, bundle, metrics = _start(cfg, out, resume=True, overwrite=False)
    _finetune(cfg, bundle, folder, metrics, init, encoder, resume)
    return metrics["finetune"][init]


def run_evaluate(cfg: Config, checkpoint: str | Path, out: Path | None) -> dict[str, Any]:
    """Test a classifier checkpoint on the test split of the configured data."""
    classifier, meta = load_classifier(checkpoint)
    trained = meta["config"]  # the split the model was trained with, so its training images stay out of the test
    split = {k: getattr(trained.data, k) for k in ("val_fraction", "test_fraction", "train_limit", "test_limit")}
    bundle = prepare(dataclasses.replace(cfg.data, **split), trained.seed, progress=cfg.trainer.progress)
    labels_required(bundle)
    if meta["classes"] != bundle.classes or meta["in_channels"] != bundle.channels:
        raise UserError(f"{checkpoint} was trained on {len(meta['classes'])} classes of {meta['in_channels']} "
                        f"channel(s), the data has {len(bundle.classes)} of {bundle.channels}")
    if meta["image_size"] != bundle.image_size:
        raise UserError(f"{checkpoint} expects {meta['image_size']}px images; pass --image-size {meta['image_size']}")
    scores = evaluate(classifier, bundle.test, bundle.classes)
    if out is not None:
        scores["figure"] = str(figures.confusion(scores["confusion"], bundle.classes, Path(checkpoint).stem,
                                                 out / f"confusion-{Path(checkpoint).stem}.png"))
    return scores


def run(cfg: Config, out: str | Path, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Run the whole pipeline into ``out`` and return metrics.json as a dict."""
    from .report import write_report

    out, bundle, metrics = _start(cfg, Path(out), resume, overwrite)
    pre = _pretrain(cfg, bundle, out, metrics, resume)
    arms = {init: _finetune(cfg, bundle, out, metrics, init, pre.encoder, resume) for init in cfg.finetune.arms}

    f = cfg.finetune
    reference_arm = "scratch" if "scratch" in arms else next(iter(arms))
    target = f.target_accuracy if f.target_accuracy is not None else \
        f.target_fraction * arms[reference_arm].best_val_accuracy
    metrics["target_accuracy"] = target
    metrics["target_rule"] = ("set by finetune.target_accuracy" if f.target_accuracy is not None else
                              f"{f.target_fraction:g} x the {reference_arm} arm's best validation accuracy")
    for init, arm in arms.items():
        metrics["finetune"][init]["epochs_to_target"] = epochs_to_target(arm.history, target)

    shown = bundle.test.take(np.arange(min(cfg.predict.images, len(bundle.test))))
    arm = arms.get("pretrained") or next(iter(arms.values()))
    rows = top_k(arm.classifier, bundle.classes, np.asarray(shown.images), cfg.predict.top_k)
    metrics["predictions"] = [{"image": name, "true": bundle.classes[label], "arm": arm.init, "top": top}
                              for name, label, top in zip(shown.names, shown.labels, rows)]
    write_json(out / "metrics.json", metrics)
    if is_global_zero():
        figures.predictions(shown.images, metrics["predictions"], out / "figures" / "predictions.png")
        write_report(out)
    return metrics
