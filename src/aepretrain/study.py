"""Does pre-training help, where, and by how much? A label-efficiency study over seeds.

For each seed, each objective pre-trains once on the unlabelled images (label-free, so every labelled
fraction shares it). For each labelled fraction (stratified, nested: a smaller fraction is a subset
of a larger one for the same seed), the classifier is fine-tuned from each objective's encoder and
from scratch, with the same labelled images, validation set, seed and budget. Every finished cell
is written to ``study.json`` at once, so an interrupted study resumes where it stopped.

Example:
    >>> result = study(resolve("quick"), "runs/study")  # doctest: +SKIP
    >>> result["summary"][0]["mean"]  # doctest: +SKIP
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

from .config import Config
from .data import DataBundle, labels_required, prepare, pretrain_images
from .data.splits import stratified_subset
from .errors import UserError
from .evaluate import evaluate
from .finetune import epochs_to_target, finetune
from .models import Encoder
from .pretrain import pretrain
from .runfolder import run_folder
from .training import is_global_zero, set_threads, steps_per_epoch, write_json


def nested_fractions(labels: np.ndarray, fractions: list[float], seed: int) -> dict[float, np.ndarray]:
    """Stratified subsets, nested across fractions: one random order per class, each fraction a prefix of it."""
    rng = np.random.default_rng([seed, 17])
    orders = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    return {f: np.sort(np.concatenate([o[:max(1, round(f * len(o)))] for o in orders])) for f in fractions}


def _seeded(cfg: Config, seed: int, objective: str | None = None) -> Config:
    c = copy.deepcopy(cfg)
    c.seed = seed
    if objective:
        c.pretrain.objective = objective
    return c


def _encoder(cfg: Config, bundle: DataBundle, out: Path) -> Encoder:
    images, _ = pretrain_images(cfg, bundle)
    return pretrain(cfg, bundle, out, resume=True, images=images).encoder


def summarize_cells(cells: list[dict[str, Any]], objectives: list[str]) -> list[dict[str, Any]]:
    """Mean and spread per fraction and arm, and each objective's paired difference from scratch."""
    rows = []
    for fraction in sorted({c["fraction"] for c in cells}):
        here = [c for c in cells if c["fraction"] == fraction]
        scratch = {c["seed"]: c["test_accuracy"] for c in here if c["arm"] == "scratch"}
        for arm in ["scratch", *objectives]:
            acc = {c["seed"]: c["test_accuracy"] for c in here if c["arm"] == arm}
            if not acc:
                continue
            values = np.array(list(acc.values()))
            row = {"fraction": fraction, "arm": arm, "seeds": len(values), "mean": float(values.mean()),
                   "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                   "labelled": here[0]["labelled"]}
            paired = [acc[s] - scratch[s] for s in acc if s in scratch]
            if arm != "scratch" and paired:
                d = np.array(paired)
                se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")
                row |= {"gain": float(d.mean()), "gain_se": se,
                        "verdict": "helped" if d.mean() > 2 * se else "hurt" if d.mean() < -2 * se else
                        "made no clear difference"}
            rows.append(row)
    return rows


def study(cfg: Config, out: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """Run (or resume) the study into ``out``; returns study.json as a dict."""
    with run_folder(out, "study", resume=True, overwrite=overwrite) as folder:
        return _study(cfg, folder, overwrite)


def _study(cfg: Config, out: Path, overwrite: bool) -> dict[str, Any]:
    from .report import write_study_report

    s = cfg.study
    fractions, objectives = sorted(s.label_fractions), list(s.objectives)
    record_path = out / "study.json"
    settings = {"preset": cfg.preset, "label_fractions": fractions, "seeds": s.seeds, "objectives": objectives,
                "epochs": s.epochs, "min_steps": s.min_steps, "val_limit": s.val_limit, "base_seed": cfg.seed,
                "config": {k: v for k, v in cfg.to_dict().items() if k not in ("trainer", "study", "predict")}}
    record: dict[str, Any] = {"settings": settings, "cells": []}
    if record_path.is_file() and not overwrite:
        record = json.loads(record_path.read_text())
        if record["settings"] != settings:
            changed = [k for k in settings if record["settings"].get(k) != settings[k]]
            raise UserError(f"{out} holds a study with other settings ({', '.join(changed)} differ); "
                            "pass --overwrite or another --out")
    done = {(c["fraction"], c["arm"], c["seed"]) for c in record["cells"]}
    set_threads()
    bundle = prepare(cfg.data, cfg.seed)
    labels_required(bundle)
    if s.val_limit is not None and s.val_limit < len(bundle.val):
        bundle = dataclasses.replace(bundle, val=bundle.val.take(stratified_subset(bundle.val.labels, s.val_limit,
                                                                                   cfg.seed)))
    for seed in range(cfg.seed, cfg.seed + s.seeds):
        subsets = nested_fractions(bundle.train.labels, fractions, seed)
        encoders: dict[str, Encoder] = {}
        for fraction in fractions:
            labelled = dataclasses.replace(bundle, train=bundle.train.take(subsets[fraction]))
            per_epoch = steps_per_epoch(len(labelled.train), cfg.finetune.batch_size)
            epochs = max(s.epochs, math.ceil(s.min_steps / per_epoch))  # same budget for every arm of a cell
            for arm in ["scratch", *objectives]:
                if (fraction, arm, seed) in done:
                    continue
                if arm != "scratch" and arm not in encoders:
                    acfg = _seeded(cfg, seed, arm)
                    encoders[arm] = _encoder(acfg, bundle, out / "pretrain" / f"{arm}-seed{seed}")
                c = _seeded(cfg, seed)
                c.finetune.epochs = epochs
                cell = out / "cells" / f"f{fraction:g}-{arm}-seed{seed}"
                result = finetune(c, labelled, cell, "scratch" if arm == "scratch" else "pretrained",
                                  encoders.get(arm), resume=True)
                scores = evaluate(result.classifier, bundle.test, bundle.classes)
                record["cells"].append({
                    "fraction": fraction, "arm": arm, "seed": seed, "labelled": len(labelled.train), "epochs": epochs,
                    "test_accuracy": scores["test_accuracy"], "test_loss": scores["test_loss"],
                    "best_val_accuracy": result.best_val_accuracy, "history": result.history,
                    "seconds": result.seconds})
                write_json(record_path, record)
    for c in record["cells"]:  # epochs to target_fraction x the scratch arm's best, same fraction and seed
        scratch = next(x for x in record["cells"] if (x["fraction"], x["seed"], x["arm"]) ==
                       (c["fraction"], c["seed"], "scratch"))
        c["target"] = cfg.finetune.target_fraction * scratch["best_val_accuracy"]
        c["epochs_to_target"] = epochs_to_target(c["history"], c["target"])
    record["summary"] = summarize_cells(record["cells"], objectives)
    write_json(record_path, record)
    if not is_global_zero():
        return record
    with open(out / "study.csv", "w", newline="") as f:
        keys = ["fraction", "labelled", "arm", "seed", "epochs", "test_accuracy", "test_loss", "best_val_accuracy",
                "epochs_to_target", "seconds"]
        writer = csv.DictWriter(f, keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(record["cells"])
    write_study_report(out)
    return record
