"""Does pre-training help, where, and by how much? A label-efficiency study over seeds.

For each seed, each objective pre-trains once on the unlabelled images (label-free, so every labelled
fraction shares it). For each labelled fraction (stratified, nested: a smaller fraction is a subset
of a larger one for the same seed), the classifier is fine-tuned from each objective's encoder and
from scratch, with the same labelled images, validation set, seed and budget. Every finished cell
is written to ``study.json`` at once, so an interrupted study resumes where it stopped.

Example:
    >>> import tempfile
    >>> from aepretrain.config import resolve
    >>> cfg = resolve("tiny", overrides=["study.seeds=2", "study.label_fractions=[1]", "study.epochs=1",
    ...                                  "study.min_steps=0"])
    >>> result = study(cfg, tempfile.mkdtemp())
    >>> [(row["fraction"], row["arm"], row["seeds"]) for row in result["summary"]]
    [(1.0, 'scratch', 2), (1.0, 'greedy', 2)]
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import Config, TrainerConfig, differences, from_dict
from .data import DataBundle, labels_required, prepare, pretrain_images
from .data.splits import stratified_subset
from .errors import UserError
from .evaluate import evaluate
from .fileio import is_global_zero, write_json
from .finetune import epochs_to_target, finetune
from .models import Encoder
from .pretrain import pretrain
from .runfolder import run_folder
from .seeds import derive_seed, numpy_generator
from .training import set_threads


def nested_fractions(labels: np.ndarray, fractions: list[float], seed: int) -> dict[float, np.ndarray]:
    """Stratified subsets, nested across fractions: one random order per class, each fraction a prefix of it."""
    rng = numpy_generator(seed, "label-fractions")
    orders = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    return {f: np.sort(np.concatenate([o[:max(1, round(f * len(o)))] for o in orders])) for f in fractions}


def _seeded(cfg: Config, seed: int, objective: str | None = None) -> Config:
    c = copy.deepcopy(cfg)
    c.seed = seed
    if objective:
        c.pretrain.objective = objective
    return c


def _encoder(cfg: Config, bundle: DataBundle, out: Path) -> Encoder:
    images, val, _ = pretrain_images(cfg, bundle)
    return pretrain(cfg, bundle, out, resume=True, images=(images, val)).encoder


# Student's t, 0.975 quantile, for 1..30 degrees of freedom (beyond: the Cornish-Fisher expansion below).
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_975(df: int) -> float:
    """The two-sided 95 % quantile of Student's t with ``df`` degrees of freedom.

    >>> t_975(2), t_975(4), round(t_975(1000), 3)
    (4.303, 2.776, 1.962)
    """
    if df < 1:
        raise ValueError("Student's t needs at least one degree of freedom")
    if df <= len(T_975):
        return T_975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def paired_interval(differences: list[float]) -> tuple[float, float | None, float | None]:
    """(mean, low, high): the paired Student-t 95 % confidence interval of the mean difference; no interval
    (None, None) from fewer than two pairs.

    >>> paired_interval([0.01, 0.03])
    (0.02, -0.1070..., 0.1470...)
    """
    d = np.asarray(differences, dtype=float)
    if len(d) < 2:
        return float(d.mean()), None, None
    half = t_975(len(d) - 1) * float(d.std(ddof=1)) / math.sqrt(len(d))
    return float(d.mean()), float(d.mean()) - half, float(d.mean()) + half


def verdict(low: float | None, high: float | None, pairs: int) -> str:
    """'helped' or 'hurt' only when the whole 95 % interval lies on one side of zero.

    >>> verdict(0.001, 0.02, 5), verdict(-0.02, -0.001, 5), verdict(-0.01, 0.02, 5), verdict(None, None, 1)
    ('helped', 'hurt', 'made no clear difference', 'no verdict: 1 seed gives no interval (2 or more needed)')
    """
    if low is None or high is None:
        return f"no verdict: {pairs} seed gives no interval (2 or more needed)"
    return "helped" if low > 0 else "hurt" if high < 0 else "made no clear difference"


def summarize_cells(cells: list[dict[str, Any]], objectives: list[str]) -> list[dict[str, Any]]:
    """Mean and spread per fraction and arm, and each objective's paired difference from scratch with its
    95 % interval over seeds."""
    rows = []
    for fraction in sorted({c["fraction"] for c in cells}):
        here = [c for c in cells if c["fraction"] == fraction]
        scratch = {c["seed"]: c["test_accuracy"] for c in here if c["arm"] == "scratch"}
        for arm in ["scratch", *objectives]:
            acc = {c["seed"]: c["test_accuracy"] for c in here if c["arm"] == arm}
            if not acc:
                continue
            values = np.array(list(acc.values()))
            mine = [c for c in here if c["arm"] == arm]
            row = {"fraction": fraction, "arm": arm, "seeds": len(values), "mean": float(values.mean()),
                   "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                   "labelled": here[0]["labelled"], "epochs": sorted({c["epochs"] for c in mine}),
                   "steps": sorted({c["steps"] for c in mine})}
            paired = [acc[s] - scratch[s] for s in acc if s in scratch]
            if arm != "scratch" and paired:
                gain, low, high = paired_interval(paired)
                row |= {"gain": gain, "gain_low": low, "gain_high": high, "verdict": verdict(low, high, len(paired))}
            rows.append(row)
    return rows


IGNORED_ON_RESUME = {"trainer.progress"}  # changes no number


def _open_study(cfg: Config, out: Path) -> dict[str, Any]:
    """The study record to continue: the saved one when every setting that can change a number is the same
    (``--overwrite`` has already removed an earlier study's files), else a fresh one."""
    record_path = out / "study.json"
    settings = {"preset": cfg.preset, "label_fractions": sorted(cfg.study.label_fractions), "seeds": cfg.study.seeds,
                "objectives": list(cfg.study.objectives), "epochs": cfg.study.epochs,
                "min_steps": cfg.study.min_steps, "val_limit": cfg.study.val_limit, "base_seed": cfg.seed,
                "config": cfg.to_dict()}
    if not record_path.is_file():
        return {"settings": settings, "cells": []}
    try:
        record = json.loads(record_path.read_text())
        saved = from_dict(record["settings"]["config"], str(record_path), strict=False)
    except (ValueError, KeyError, TypeError, UserError):
        raise UserError(f"{record_path} is damaged or from another version: pass --overwrite to start "
                        "the study again") from None
    changed = differences(saved, cfg, ignore=IGNORED_ON_RESUME)
    if changed:
        key, old, new = changed[0]
        raise UserError(f"{out} holds a study run with {key}={old!r}, not {new!r}"
                        f"{f' (and {len(changed) - 1} more)' if len(changed) > 1 else ''}; "
                        "resume with the same settings, or pass --overwrite or another --out")
    return record


def processes(t: TrainerConfig) -> int:
    """The processes a fit runs in: devices per node (``auto`` and ``-1``: every GPU where GPUs are used, else one)
    times nodes.

    >>> processes(TrainerConfig(device="cpu", devices="2", num_nodes=3)), processes(TrainerConfig(devices="0,1"))
    (6, 2)
    """
    if t.devices in ("auto", "-1"):
        gpus = torch.cuda.device_count() if t.device in ("auto", "cuda", "gpu") else 0
        per_node = max(1, gpus)
    elif t.devices.isdigit():
        per_node = int(t.devices)
    else:
        per_node = len([index for index in t.devices.split(",") if index.strip()])
    return per_node * t.num_nodes


def batches_per_process(images: int, batch_size: int, processes: int) -> int:
    """Optimizer steps an epoch of a cell's training loader makes in each process: Lightning's distributed sampler
    gives each process ceil(images / processes) of them, and the loader drops a last partial batch unless all the
    images are one batch.

    >>> batches_per_process(100, 16, 1), batches_per_process(100, 16, 2), batches_per_process(20, 16, 2)
    (6, 3, 0)
    """
    if images <= batch_size:
        return 1
    return math.ceil(images / processes) // batch_size


def cell_epochs(cfg: Config, fraction: float, images: int, processes: int) -> int:
    """A cell's budget: ``study.epochs``, more where the fraction is too small for ``study.min_steps`` optimizer
    steps in each process; one line where a process would get no batch at all.

    >>> from aepretrain.config import resolve
    >>> cfg = resolve("tiny", overrides=["study.epochs=1", "study.min_steps=10"])
    >>> cell_epochs(cfg, 1.0, 86, 1), cell_epochs(cfg, 1.0, 86, 2)  # 5 batches an epoch, or 2 in each process
    (2, 5)
    """
    per_epoch = batches_per_process(images, cfg.finetune.batch_size, processes)
    if per_epoch == 0:
        raise UserError(f"study.label_fractions {fraction:g} gives {images} labelled images, "
                        f"{math.ceil(images / processes)} in each of {processes} processes: not one batch of "
                        f"finetune.batch_size {cfg.finetune.batch_size}; take a larger fraction, a smaller batch or "
                        "fewer devices")
    return max(cfg.study.epochs, math.ceil(cfg.study.min_steps / per_epoch))


def study(cfg: Config, out: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """Run (or resume) the study into ``out``; returns study.json as a dict. A fraction too small to train is
    refused before the folder is written."""
    set_threads()
    bundle = _study_data(cfg)
    labelled = nested_fractions(bundle.train.labels, cfg.study.label_fractions, cfg.seed)  # as large for any seed
    for fraction, subset in labelled.items():
        cell_epochs(cfg, fraction, len(subset), processes(cfg.trainer))
    with run_folder(out, "study", resume=True, overwrite=overwrite) as folder:
        return _study(cfg, folder, bundle)


def _study_data(cfg: Config) -> DataBundle:
    """The study's data, split with its seed (every cell's, whatever the cell's own seed), validation capped."""
    bundle = prepare(cfg.data, cfg.seed)
    labels_required(bundle)
    if cfg.study.val_limit is not None and cfg.study.val_limit < len(bundle.val):
        keep = stratified_subset(bundle.val.labels, cfg.study.val_limit, derive_seed(cfg.seed, "val-limit"))
        bundle = dataclasses.replace(bundle, val=bundle.val.take(keep))
    return bundle


def _study(cfg: Config, out: Path, bundle: DataBundle) -> dict[str, Any]:
    s = cfg.study
    fractions, objectives = sorted(s.label_fractions), list(s.objectives)
    record = _open_study(cfg, out)
    done = {(c["fraction"], c["arm"], c["seed"]) for c in record["cells"]}
    for seed in range(cfg.seed, cfg.seed + s.seeds):
        subsets = nested_fractions(bundle.train.labels, fractions, seed)
        encoders: dict[str, Encoder] = {}
        for fraction in fractions:
            labelled = dataclasses.replace(bundle, train=bundle.train.take(subsets[fraction]))
            for arm in ["scratch", *objectives]:
                if (fraction, arm, seed) in done:
                    continue
                if arm != "scratch" and arm not in encoders:
                    encoders[arm] = _encoder(_seeded(cfg, seed, arm), bundle, out / "pretrain" / f"{arm}-seed{seed}")
                record["cells"].append(_cell(cfg, labelled, out, fraction, arm, seed, encoders.get(arm)))
                write_json(out / "study.json", record)
    return _finish(cfg, out, record, objectives)


def _cell(cfg: Config, labelled: DataBundle, out: Path, fraction: float, arm: str, seed: int,
          encoder: Encoder | None) -> dict[str, Any]:
    """One arm fine-tuned on one labelled fraction with one seed, tested; every arm of a cell has the same budget
    (:func:`cell_epochs`)."""
    c = _seeded(cfg, seed)
    c.finetune.epochs = cell_epochs(cfg, fraction, len(labelled.train), processes(cfg.trainer))
    if cfg.trainer.smoke:  # Lightning runs two batches an epoch, so the budget above is not what runs
        c.finetune.epochs = 1
    c.finetune.early_stopping_patience = None  # every cell trains its whole budget
    folder = out / "cells" / f"f{fraction:g}-{arm}-seed{seed}"
    result = finetune(c, labelled, folder, "scratch" if arm == "scratch" else "pretrained", encoder, resume=True,
                      split_seed=cfg.seed)  # every cell's data is split from the study's seed
    scores, history = evaluate(result.classifier, labelled.test, labelled.classes), result.record.history
    return {"fraction": fraction, "arm": arm, "seed": seed, "labelled": len(labelled.train),
            "epochs": len(history), "steps": int(history[-1]["step"]) if history else 0,
            "test_accuracy": scores["test_accuracy"], "test_loss": scores["test_loss"],
            "best_val_accuracy": result.record.summary["best_val_accuracy"], "history": history,
            "seconds": result.record.seconds}


def _finish(cfg: Config, out: Path, record: dict[str, Any], objectives: list[str]) -> dict[str, Any]:
    """Epochs to target for every cell, the summary with its intervals, study.csv and the report."""
    from .report import write_study_report

    for c in record["cells"]:  # epochs to target_fraction x the scratch arm's best, same fraction and seed
        scratch = next(x for x in record["cells"] if (x["fraction"], x["seed"], x["arm"]) ==
                       (c["fraction"], c["seed"], "scratch"))
        c["target"] = cfg.finetune.target_fraction * scratch["best_val_accuracy"]
        c["epochs_to_target"] = epochs_to_target(c["history"], c["target"])
    record["summary"] = summarize_cells(record["cells"], objectives)
    write_json(out / "study.json", record)
    if not is_global_zero():
        return record
    with open(out / "study.csv", "w", newline="") as f:
        keys = ["fraction", "labelled", "arm", "seed", "epochs", "steps", "test_accuracy", "test_loss", "best_val_accuracy",
                "epochs_to_target", "seconds"]
        writer = csv.DictWriter(f, keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(record["cells"])
    write_study_report(out)
    return record
