"""The whole job, top to bottom: data -> pretrain -> finetune (both arms) -> evaluate -> predict -> report.

Every step writes what it finished into the run folder at once (``metrics.json`` grows step by
step), so nothing finished is lost if a later step fails.

Example:
    >>> import tempfile
    >>> from aepretrain.config import resolve
    >>> metrics = run(resolve("tiny", overrides=["trainer.smoke=true"]), tempfile.mkdtemp())
    >>> arm = metrics["finetune"]["pretrained"]  # test accuracy: the share of test images on the confusion's diagonal
    >>> round(arm["test_accuracy"] * metrics["dataset"]["test"], 4) == sum(arm["confusion"][k][k] for k in range(4))
    True
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import figures
from .checkpoints import load_classifier, load_stage_encoder
from .config import Config, differences
from .data import DataBundle, labels_required, prepare, pretrain_images
from .errors import UserError
from .evaluate import evaluate
from .fileio import check_folder, is_global_zero, write_json
from .finetune import ArmResult, check_encoder, classifier_path, epochs_to_target, finetune
from .models import Encoder
from .output import header
from .prediction import top_k
from .pretrain import PretrainResult, pretrain, reconstruct, stage_path
from .probe import probes
from .runfolder import run_folder, save_settings, saved_settings
from .trackers import check as check_trackers
from .training import fit_device, resolved_precision, set_threads
from .transforms import pixels


def _nhwc(x: torch.Tensor) -> np.ndarray:
    return x.permute(0, 2, 3, 1).cpu().numpy()


def _metrics(out: Path) -> dict[str, Any]:
    """What metrics.json holds so far; a damaged one is rebuilt from the finished stages' and arms' records."""
    path = out / "metrics.json"
    try:
        metrics = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        metrics = None
    if not isinstance(metrics, dict):
        logging.getLogger("aepretrain").warning(f"aepretrain: {path} is damaged: it is written again from the "
                                                "finished stages and arms")
        return {}
    return metrics


def reconcile(cfg: Config, saved: Config, out: Path) -> Config:
    """The settings a continued run keeps: those it saved, which ``cfg`` must not contradict."""
    changed = differences(saved, cfg, ignore={"trainer.progress"})
    if changed:
        key, old, new = changed[0]
        raise UserError(f"--resume: {out} ran with {key}={old!r}, not {new!r}; resume with the same settings, or "
                        "with none to take the saved ones")
    saved.trainer.progress = cfg.trainer.progress
    return saved


def _labelled_data(cfg: Config) -> DataBundle:
    bundle = prepare(cfg.data, cfg.seed, progress=cfg.trainer.progress)
    labels_required(bundle)
    return bundle


@contextmanager
def _start(cfg: Config, out: Path, resume: bool, overwrite: bool, adding_arm: bool = False,
           check: Callable[[Config, DataBundle], None] | None = None
           ) -> Iterator[tuple[Config, Path, DataBundle, dict[str, Any]]]:
    """Open and lock the run folder, settle the settings, prepare and describe the data.

    A resumed run, or an arm added to one, keeps the settings it was started with (verified before
    anything is written). The data is prepared and checked before the folder is written, so a wrong root or
    data set leaves nothing in the way of the corrected command; so does ``check``, which refuses what does not
    fit the data (an encoder of another shape).
    """
    check_trackers(cfg.trainer)
    set_threads()
    main = is_global_zero()
    bundle: DataBundle | None = None

    def settle(replacing: bool) -> None:  # under the folder's lock, before anything is written in it
        nonlocal cfg, bundle
        saved = None if replacing else saved_settings(out)
        if saved is not None:
            cfg = reconcile(cfg, saved, out)
        bundle = _labelled_data(cfg)
        if check is not None:
            check(cfg, bundle)

    with run_folder(out, "run", resume or adding_arm, overwrite, before_writing=settle) as out:
        if bundle is None:  # another DDP process: the first one settled the folder
            bundle = _labelled_data(cfg)
        header(f"[data] {bundle.dataset}: {len(bundle.classes)} classes, train {len(bundle.train)}, val "
               f"{len(bundle.val)}, test {len(bundle.test)} images at {bundle.image_size} px")
        if main and saved_settings(out) is None:
            save_settings(cfg, out)
        write_json(out / "data.json", bundle.describe(out / "figures" / "samples.png" if main else None))
        metrics = _metrics(out) | {
            "preset": cfg.preset, "seed": cfg.seed, "smoke": cfg.trainer.smoke,
            "precision": resolved_precision(cfg.trainer.precision, cfg.trainer.device),
            "dataset": {"name": bundle.dataset, **bundle.counts(), "classes": bundle.classes,
                        "image_size": bundle.image_size, "channels": bundle.channels, "skipped": len(bundle.skipped)},
        }
        yield cfg, out, bundle, metrics


def _pretrain(cfg: Config, bundle: DataBundle, out: Path, metrics: dict[str, Any], resume: bool) -> PretrainResult:
    images, val, described = pretrain_images(cfg, bundle)
    pre = pretrain(cfg, bundle, out, resume, (images, val))
    metrics["pretrain"] = {"objective": cfg.pretrain.objective, "data": described, "images": len(images),
                           "val_images": len(val),
                           "stages": [stage.as_json() for stage in pre.stages], "test_mse": pre.test_mse}
    if cfg.probe.enabled:
        header("[probes] linear and kNN probes of the encoder's features at every depth, and of a random encoder's")
        metrics["probes"] = probes(bundle, pre.encoder, cfg.probe.train_limit, cfg.seed, fit_device(cfg.trainer))
        header("[probes] linear test accuracy by depth: " + ", ".join(
            f"{encoder} " + " ".join(f"{r['linear_test']:.3f}" for r in metrics["probes"] if r["encoder"] == encoder)
            for encoder in ("pretrained", "random")))
    write_json(out / "metrics.json", metrics)
    if pre.autoencoders:  # an objective that reconstructs; a contrastive one has no images to show
        shown = bundle.test.take(np.arange(min(6, len(bundle.test))))
        originals = pixels(np.asarray(shown.images))
        recon = reconstruct(pre.autoencoders, originals, fit_device(cfg.trainer))
        if is_global_zero():
            figures.reconstructions(_nhwc(originals), [_nhwc(r) for r in recon], out / "figures" / "reconstructions.png")
    return pre


def _finetune(cfg: Config, bundle: DataBundle, out: Path, metrics: dict[str, Any], init: str,
              encoder: Encoder | None, resume: bool) -> ArmResult:
    arm = finetune(cfg, bundle, out, init, encoder, resume)
    scores = evaluate(arm.classifier, bundle.test, bundle.classes, fit_device(cfg.trainer))
    record = arm.record
    metrics.setdefault("finetune", {})[init] = {
        "test_loss": scores["test_loss"], "test_accuracy": scores["test_accuracy"], **record.summary,
        "epochs": len(record.history), "epochs_to_target": None, "seconds": record.seconds,
        "per_class_accuracy": scores["per_class_accuracy"], "confusion": scores["confusion"],
        "history": record.history, "checkpoint": str(classifier_path(out, init)), "resumed_from": record.resumed_from,
    }
    write_json(out / "metrics.json", metrics)
    return arm


def run_pretrain(cfg: Config, out: str | Path, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Only the pre-training stages; their weights land in ``out/checkpoints/pretrain-stageK.safetensors``."""
    with _start(cfg, Path(out), resume, overwrite) as (cfg, folder, bundle, metrics):
        _pretrain(cfg, bundle, folder, metrics, resume)
    return metrics["pretrain"]


def run_finetune(cfg: Config, out: str | Path, init: str, encoder_path: str | None = None,
                 resume: bool = False) -> dict[str, Any]:
    """One arm; the pretrained arm takes the last stage's encoder from the run folder or ``encoder_path``, any
    greedy stage's: blocks 1..k pre-trained, the deeper ones starting as the scratch arm's. The encoder is checked
    before anything is written."""
    out = Path(out)
    encoder, check = None, None
    if init == "pretrained":
        path = Path(encoder_path) if encoder_path else stage_path(out, len(cfg.model.blocks))
        if not path.is_file():
            raise UserError(f"no pre-trained encoder at {path}: run `aepretrain pretrain --out {out}` first "
                            "or pass --encoder PATH")
        encoder = load_stage_encoder(path)[0]
        check = functools.partial(check_encoder, encoder=encoder, source=str(path))
    with _start(cfg, out, resume, overwrite=False, adding_arm=True, check=check) as (cfg, folder, bundle, metrics):
        _finetune(cfg, bundle, folder, metrics, init, encoder, resume)
    return metrics["finetune"][init]


def run_evaluate(cfg: Config, checkpoint: str | Path, out: Path | None) -> dict[str, Any]:
    """Test a classifier checkpoint on the test split of the configured data."""
    if out is not None:
        check_folder(out)  # before the work, not after it
    device = fit_device(cfg.trainer)
    classifier, meta = load_classifier(checkpoint)
    bundle = evaluation_data(cfg, meta, checkpoint)
    scores = evaluate(classifier, bundle.test, bundle.classes, device)
    if out is not None:
        scores["figure"] = str(figures.confusion(scores["confusion"], bundle.classes, Path(checkpoint).stem,
                                                 out / f"confusion-{Path(checkpoint).stem}.png"))
    return scores


def evaluation_data(cfg: Config, meta: dict[str, Any], checkpoint: str | Path) -> DataBundle:
    """The configured data split as the classifier's training data was (its split settings and the seed of its
    split, which a study cell records), so that none of its training images is tested on; refused where its
    classes, channels or image size differ from the checkpoint's."""
    if meta["image_size"] != cfg.data.image_size:
        raise UserError(f"{checkpoint} expects {meta['image_size']}px images; pass --image-size {meta['image_size']}")
    trained = meta["config"]
    split = {k: getattr(trained.data, k) for k in ("val_fraction", "test_fraction", "train_limit", "test_limit")}
    bundle = prepare(dataclasses.replace(cfg.data, **split), meta["split_seed"], progress=cfg.trainer.progress)
    labels_required(bundle)
    if len(meta["classes"]) != len(bundle.classes) or meta["in_channels"] != bundle.channels:
        raise UserError(f"{checkpoint} was trained on {len(meta['classes'])} classes of {meta['in_channels']} "
                        f"channel(s), the data has {len(bundle.classes)} of {bundle.channels}")
    if meta["classes"] != bundle.classes:
        trained_on, here = next((a, b) for a, b in zip(meta["classes"], bundle.classes) if a != b)
        raise UserError(f"{checkpoint} was trained on other classes than the data's, though as many: class "
                        f"{meta['classes'].index(trained_on)} is '{trained_on}' there and '{here}' here")
    return bundle


def run(cfg: Config, out: str | Path, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Run the whole pipeline into ``out`` and return metrics.json as a dict."""
    with _start(cfg, Path(out), resume, overwrite) as (cfg, folder, bundle, metrics):
        return _run(cfg, folder, bundle, metrics, resume)


def _run(cfg: Config, out: Path, bundle: DataBundle, metrics: dict[str, Any], resume: bool) -> dict[str, Any]:
    from .report import write_report

    pre = _pretrain(cfg, bundle, out, metrics, resume)
    arms = {init: _finetune(cfg, bundle, out, metrics, init, pre.encoder, resume) for init in cfg.finetune.arms}

    f = cfg.finetune
    reference_arm = "scratch" if "scratch" in arms else next(iter(arms))
    target = f.target_accuracy if f.target_accuracy is not None else \
        f.target_fraction * arms[reference_arm].record.summary["best_val_accuracy"]
    metrics["target_accuracy"] = target
    metrics["target_rule"] = (
        "the validation accuracy set by finetune.target_accuracy" if f.target_accuracy is not None
        else f"{f.target_fraction * 100:g} % of the {reference_arm} arm's best validation accuracy")
    for init, arm in arms.items():
        metrics["finetune"][init]["epochs_to_target"] = epochs_to_target(arm.record.history, target)

    shown = bundle.test.take(np.arange(min(cfg.predict.images, len(bundle.test))))
    arm = arms.get("pretrained") or next(iter(arms.values()))
    rows = top_k(arm.classifier, bundle.classes, shown.images, cfg.predict.top_k, fit_device(cfg.trainer))
    metrics["predictions"] = [{"image": name, "true": bundle.classes[label], "arm": arm.init, "top": top}
                              for name, label, top in zip(shown.names, shown.labels, rows)]
    write_json(out / "metrics.json", metrics)
    if is_global_zero():
        figures.predictions(shown.images, metrics["predictions"], out / "figures" / "predictions.png")
        header(f"[report] writing report.md and report.html in {out}")
        write_report(out)
    return metrics
