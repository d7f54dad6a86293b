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
import importlib.util
import json
import logging
import math
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import Config, TrainerConfig, differences, from_dict
from .data import DataBundle, labels_required, prepare, pretrain_images
from .data.splits import stratified_subset
from .checkpoints import load_stage_encoder
from .errors import UserError, shown
from .evaluate import evaluate
from .fileio import cpu_cores, first_line, is_global_zero, write_json
from .finetune import epochs_to_target, finetune
from .models import Encoder
from .objectives import objective_of
from .output import duration, fitting, header
from .pretrain import pretrain, stage_path
from .runfolder import run_folder
from .seeds import derive_seed, numpy_generator
from .training import fit_device, set_threads

LOG = logging.getLogger(__name__)


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


def _budgeted(cfg: Config) -> Config:
    """Every objective gets the same image-passes: a greedy objective trains each of its stages
    ``pretrain.epochs`` epochs, one that trains the whole encoder at once as many epochs as all stages together."""
    c = copy.deepcopy(cfg)
    c.pretrain.epochs *= len(cfg.model.blocks) // len(objective_of(c.pretrain).stages(len(cfg.model.blocks)))
    return c


def study_seeds(cfg: Config) -> range:
    """The seeds of the study's grid: ``study.seeds`` of them from ``seed`` on."""
    return range(cfg.seed, cfg.seed + cfg.study.seeds)


def pretrain_folder(out: Path, objective: str, seed: int) -> Path:
    return out / "pretrain" / f"{objective}-seed{seed}"


def run_pretraining(cfg: Config, out: Path, objective: str, seed: int) -> dict[str, Any]:
    """Pre-train ``objective`` for ``seed`` into the study folder (restored, not trained again, when it finished
    before); what it cost. A task of its own: any engine may run it, in any process."""
    c = _budgeted(_seeded(cfg, seed, objective))
    bundle = study_data(cfg)
    images, val, _ = pretrain_images(c, bundle)
    with fitting(f"study {objective} seed {seed} {{fit}}"):
        result = pretrain(c, bundle, pretrain_folder(out, objective, seed), resume=True, images=(images, val))
    passes = sum(int(row.get("samples", 0)) for stage in result.stages for row in stage.history)
    return {"seed": seed, "objective": objective, "images": len(images),
            "epochs": sum(len(stage.history) for stage in result.stages), "image_passes": passes,
            "seconds": round(sum(stage.seconds for stage in result.stages), 2), "threads": torch.get_num_threads()}


_DATA: dict[str, DataBundle] = {}  # a process's prepared study data, by its settings: cells of one study share it


def study_data(cfg: Config) -> DataBundle:
    """The labelled data every cell shares: splits from the base seed, validation cut to ``study.val_limit``."""
    key = json.dumps([dataclasses.asdict(cfg.data), cfg.seed, cfg.study.val_limit])
    if key not in _DATA:
        bundle = prepare(cfg.data, cfg.seed)
        labels_required(bundle)
        limit = cfg.study.val_limit
        if limit is not None and limit < len(bundle.val):
            keep = stratified_subset(bundle.val.labels, limit, derive_seed(cfg.seed, "val-limit"))
            bundle = dataclasses.replace(bundle, val=bundle.val.take(keep))
        _DATA.clear()  # one study at a time in a process: the mapped stores of an earlier one go
        _DATA[key] = bundle
    return _DATA[key]


VAL_SHARE = 0.2  # validation takes at most about this share of a cell's time ...
PASS_COST = 3  # ... counting a training image as about three inference passes (forward, backward, augmentation)


def val_every(train_images: int, val_images: int) -> int:
    """Validate every this many epochs (``train_images`` an epoch) so that validation takes at most about
    ``VAL_SHARE`` of a cell's time: a 1 % cell that trains 2 batches an epoch validates every few epochs.

    >>> val_every(256, 1000), val_every(2688, 1000), val_every(27000, 1000)
    (6, 1, 1)
    """
    return max(1, math.ceil(val_images * (1 - VAL_SHARE) / (VAL_SHARE * PASS_COST * max(train_images, 1))))


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


def summarize_cells(cells: list[dict[str, Any]], objectives: list[str],
                    pretraining: list[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """Mean and spread per fraction and arm; each objective's paired difference from scratch in test accuracy
    and in optimizer steps to the target, each with its 95 % interval over seeds; what pre-training cost."""
    rows = []
    for fraction in sorted({c["fraction"] for c in cells}):
        here = [c for c in cells if c["fraction"] == fraction]
        scratch = {c["seed"]: c for c in here if c["arm"] == "scratch"}
        for arm in ["scratch", *objectives]:
            mine = {c["seed"]: c for c in here if c["arm"] == arm}
            if not mine:
                continue
            values = np.array([c["test_accuracy"] for c in mine.values()])
            first = next(iter(mine.values()))
            row = {"fraction": fraction, "arm": arm, "seeds": len(values), "mean": float(values.mean()),
                   "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                   "labelled": first["labelled"], "labelled_per_class": first.get("labelled_per_class"),
                   "ratio": first.get("ratio"), "epochs": sorted({c["epochs"] for c in mine.values()}),
                   "steps": sorted({c["steps"] for c in mine.values()})}
            paired = [mine[s]["test_accuracy"] - scratch[s]["test_accuracy"] for s in mine if s in scratch]
            if arm != "scratch" and paired:
                gain, low, high = paired_interval(paired)
                row |= {"gain": gain, "gain_low": low, "gain_high": high, "verdict": verdict(low, high, len(paired))}
                row |= _steps_to_target(mine, scratch)
                cost = [p["seconds"] for p in pretraining if p["objective"] == arm and p["seed"] in mine]
                row["pretrain_seconds"] = float(np.mean(cost)) if cost else None
            rows.append(row)
    return rows


def _steps_to_target(mine: dict[int, dict[str, Any]], scratch: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Optimizer steps (and epochs) to the target: the objective's minus scratch's, paired over the seeds where
    both reached it, with its 95 % interval (negative: pre-training got there sooner)."""
    both = [s for s in mine if s in scratch and mine[s].get("steps_to_target") is not None
            and scratch[s].get("steps_to_target") is not None]
    steps = [mine[s]["steps_to_target"] - scratch[s]["steps_to_target"] for s in both]
    epochs = [mine[s]["epochs_to_target"] - scratch[s]["epochs_to_target"] for s in both]
    if not both:
        return {"reached": 0}
    mean, low, high = paired_interval(steps)
    return {"reached": len(both), "steps_difference": mean, "steps_low": low, "steps_high": high,
            "epochs_difference": float(np.mean(epochs))}


# change no result in kind (the engine and its resources change a task's thread count, and with it its numbers
# about as much as another seed would: benchmarks/RESULTS.md)
IGNORED_ON_RESUME = {"trainer.progress", "study.engine", "study.address", "study.task_cpus", "study.task_gpus"}
# the grid's axes: a cell is known by (fraction, arm, seed), so a study grows (more seeds, objectives or fractions)
# without running a finished cell again, and a smaller grid reports only its own cells
GRID = {"study.seeds", "study.objectives", "study.label_fractions"}


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
    changed = differences(saved, cfg, ignore=IGNORED_ON_RESUME | GRID)
    if changed:
        key, old, new = changed[0]
        raise UserError(f"{out} holds a study run with {key}={old!r}, not {new!r}"
                        f"{f' (and {len(changed) - 1} more)' if len(changed) > 1 else ''}; "
                        "resume with the same settings, or pass --overwrite or another --out")
    record["settings"] = settings  # the grid asked for now; the cells of a larger one are kept
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
    bundle = study_data(cfg)  # a mistake in the data is said before any task starts
    labelled = nested_fractions(bundle.train.labels, cfg.study.label_fractions, cfg.seed)  # as large for any seed
    for fraction, subset in labelled.items():
        cell_epochs(cfg, fraction, len(subset), processes(cfg.trainer))
    if chosen_engine(cfg, tasks=2)[0] == "ray":  # the engine a grid of tasks would run on
        check_answers(cfg.study.address)
    with run_folder(out, "study", resume=True, overwrite=overwrite) as folder:
        return _study(cfg, folder)


def check_answers(address: str | None) -> None:
    """One line where the cluster's address (``study.address``, else Ray's own ``RAY_ADDRESS``) is not HOST:PORT
    or nothing answers there: Ray would wait without end for a cluster at an address that does not answer."""
    named = "study.address" if address else "RAY_ADDRESS"
    address = address or os.environ.get("RAY_ADDRESS")
    if address in (None, "", "auto", "local"):
        return
    named += f" {shown(address)}"
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise UserError(f"{named} is not auto or HOST:PORT")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except (OSError, UnicodeError) as exc:  # UnicodeError: a host name no resolver takes (a label too long)
        reason = getattr(exc, "strerror", None) or exc
        raise UserError(f"nothing answers at {named} ({reason}): start the cluster there (ray start --head) or give "
                        "the address it printed") from None


def _study(cfg: Config, out: Path) -> dict[str, Any]:
    s = cfg.study
    objectives = list(s.objectives)
    record = _open_study(cfg, out)
    record.setdefault("pretraining", [])
    done = {(c["fraction"], c["arm"], c["seed"]) for c in record["cells"]}
    pretrained = {(p["objective"], p["seed"]) for p in record["pretraining"]}
    seeds = study_seeds(cfg)
    pretrainings = [(objective, seed) for seed in seeds for objective in objectives if (objective, seed) not in pretrained]
    cells = [(fraction, arm, seed) for seed in seeds for fraction in sorted(s.label_fractions)
             for arm in ["scratch", *objectives] if (fraction, arm, seed) not in done]
    tasks = len(seeds) * (len(objectives) + len(s.label_fractions) * (1 + len(objectives)))
    left = len(pretrainings) + len(cells)
    if left < tasks:  # on Ray the tasks' own lines stay in Ray's logs: this is what says the study resumes
        header(f"[study] resuming {out}: {tasks - left} of {tasks} pre-trainings and cells finished before "
               f"(study.json), {left} left")

    if not left:
        return _finish(cfg, out, record, objectives)
    finished = tasks - left  # of this grid (the record may also hold a larger grid's cells)

    def keep(kind: str, result: dict[str, Any]) -> None:
        nonlocal finished
        record["pretraining" if kind == "pretraining" else "cells"].append(result)
        write_json(out / "study.json", record)
        finished += 1
        header(f"[study] {finished} of {tasks} done: {task_text(kind, result)}")

    engine, why = chosen_engine(cfg, left)
    header(f"[study] engine {engine}: {why}")
    try:
        (serial_engine if engine == "serial" else ray_engine)(cfg, out, pretrainings, cells, keep)
    except RayDidNotStart as exc:
        if s.engine != "auto" or s.address is not None or s.task_gpus > 0:  # Ray was asked for, not chosen here
            raise
        LOG.warning(f"aepretrain: Ray did not start ({exc.reason}): the serial engine runs the study")
        serial_engine(cfg, out, pretrainings, cells, keep)  # no task had started
    return _finish(cfg, out, record, objectives)


def task_text(kind: str, result: dict[str, Any]) -> str:
    """A finished task in a line: what it was, its test accuracy where it has one, how long it took.

    >>> task_text("cell", {"fraction": 0.1, "arm": "greedy", "seed": 2, "test_accuracy": 0.8125, "seconds": 75})
    'cell f0.1 greedy seed 2, test accuracy 0.8125, 1 min 15 s'
    """
    if kind == "pretraining":
        return f"pre-training {result['objective']} seed {result['seed']}, {duration(result['seconds'])}"
    return (f"cell f{result['fraction']:g} {result['arm']} seed {result['seed']}, test accuracy "
            f"{result['test_accuracy']:.4f}, {duration(result['seconds'])}")


def chosen_engine(cfg: Config, tasks: int) -> tuple[str, str]:
    """The engine that runs ``tasks`` tasks, and why, in words. ``auto`` takes Ray, ``study.task_cpus`` threads
    a task, where this machine's CPUs run two or more tasks at once: on 2 cores, two 1-thread tasks got through
    a study faster than one task on both (benchmarks/RESULTS.md)."""
    s = cfg.study
    if s.engine != "auto":
        return s.engine, f"study.engine={s.engine}"
    if s.address is not None or s.task_gpus > 0:
        return "ray", "study.engine=auto; study.address or study.task_gpus asks for Ray"
    serial_because = _serial_because(cfg, tasks)
    if serial_because:
        return "serial", f"study.engine=auto; one task at a time on {torch.get_num_threads()} threads, as " \
                         f"{serial_because}"
    at_once = min(side_by_side(cfg), tasks)
    return "ray", (f"study.engine=auto; {at_once} tasks at a time, study.task_cpus={s.task_cpus:g} each, on this "
                   f"machine's {cpu_cores()} cores")


def side_by_side(cfg: Config) -> int:
    """The tasks this machine's cores run at once, ``study.task_cpus`` each; a task has one thread at least,
    whatever its share."""
    return int(cpu_cores() // max(1.0, cfg.study.task_cpus))


def _serial_because(cfg: Config, tasks: int) -> str | None:
    """Why ``auto`` keeps the serial engine here, or None where Ray would run two or more tasks at once."""
    cores, fits = cpu_cores(), processes(cfg.trainer)
    if fit_device(cfg.trainer).type != "cpu":
        return "the fits run on a GPU"
    if fits > 1:
        return f"a fit runs in {fits} processes"
    if side_by_side(cfg) < 2:
        return f"{cores} core{'' if cores == 1 else 's'} hold one task of study.task_cpus={cfg.study.task_cpus:g}"
    if tasks < 2:
        return "one task is left"
    if importlib.util.find_spec("ray") is None:
        return "Ray is not installed (pip install 'aepretrain[ray]' runs two or more tasks at once here)"
    return None


def serial_engine(cfg: Config, out: Path, pretrainings: list[tuple[str, int]], cells: list[tuple[float, str, int]],
                  keep: Callable[[str, dict[str, Any]], None]) -> None:
    """Every task in this process, one after another: a seed's pre-trainings, then its cells."""
    for seed in dict.fromkeys(seed for *_, seed in [*pretrainings, *cells]):
        for objective, _ in (p for p in pretrainings if p[1] == seed):
            keep("pretraining", run_pretraining(cfg, out, objective, seed))
        for fraction, arm, _ in (c for c in cells if c[2] == seed):
            keep("cell", run_cell(cfg, out, fraction, arm, seed))


def ray_engine(cfg: Config, out: Path, pretrainings: list[tuple[str, int]], cells: list[tuple[float, str, int]],
               keep: Callable[[str, dict[str, Any]], None]) -> None:
    """The tasks on Ray (``study.address``: a running cluster, or none to start one on this machine), each with
    ``study.task_cpus`` CPUs and ``study.task_gpus`` GPUs; a cell waits for its objective's pre-training. The
    tasks write their checkpoints into the study folder (a folder every node shares); their results come back
    here, where study.json is written as each one ends."""
    try:
        import ray
    except ImportError:
        raise UserError("the study on Ray needs Ray: pip install 'aepretrain[ray]', or pass --engine serial") from None
    s = cfg.study
    ours = not ray.is_initialized()
    # Ray says on every start of a local cluster that it authenticates by token, its default: a line a user
    # cannot act on, and none where the cluster was asked to run otherwise
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    if ours:
        try:
            # a cluster of our own has the cores this process may use (Ray would count the machine's)
            cores = {"num_cpus": cpu_cores()} if s.address is None and "RAY_ADDRESS" not in os.environ else {}
            ray.init(address=s.address, include_dashboard=False, log_to_driver=False, configure_logging=False,
                     **cores)
        except Exception as exc:  # Ray's own, of many kinds: no cluster at the address, no port, no disk
            ray.shutdown()  # what it had started
            raise RayDidNotStart(first_line(exc)) from None
    threads = {"OMP_NUM_THREADS": str(max(1, int(s.task_cpus)))}  # a task's threads: its share of the cores
    options = {"num_cpus": s.task_cpus, "num_gpus": s.task_gpus, "max_retries": 0,
               "runtime_env": {"env_vars": threads}}
    pretrain_task = ray.remote(run_pretraining).options(**options)
    cell_task = ray.remote(_cell_after).options(**options)
    needed = {(objective, seed) for _, objective, seed in cells if objective != "scratch"}
    waiting = {pretrain_task.remote(cfg, out, objective, seed): "pretraining" for objective, seed in pretrainings}
    started = {key: ref for ref, key in zip(waiting, pretrainings)}
    for objective, seed in needed - set(started):  # finished before: restored inside the cell's task
        started[(objective, seed)] = None
    for fraction, arm, seed in cells:
        after = started.get((arm, seed))
        waiting[cell_task.remote(cfg, out, fraction, arm, seed, after)] = "cell"
    try:
        while waiting:
            ready, _ = ray.wait(list(waiting), num_returns=1)
            kind = waiting.pop(ready[0])
            keep(kind, ray.get(ready[0]))
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause if isinstance(getattr(exc, "cause", None), BaseException) else exc
        raise UserError(f"a study task failed on Ray: {first_line(cause)}") from None
    finally:
        if ours:
            ray.shutdown()


class RayDidNotStart(UserError):
    """Ray could not start a cluster or join the one asked for: no task has run."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"Ray did not start ({reason}); --engine serial runs the study without it")


def _cell_after(cfg: Config, out: Path, fraction: float, arm: str, seed: int, pretraining: Any) -> dict[str, Any]:
    """A cell, once Ray has finished the pre-training it depends on (passed in only to say so)."""
    return run_cell(cfg, out, fraction, arm, seed)


def run_cell(cfg: Config, out: Path, fraction: float, arm: str, seed: int) -> dict[str, Any]:
    """One arm fine-tuned on one labelled fraction with one seed, from its objective's pre-trained encoder; a
    task of its own, as :func:`run_pretraining`."""
    bundle = study_data(cfg)
    subset = nested_fractions(bundle.train.labels, sorted(cfg.study.label_fractions), seed)[fraction]
    labelled = dataclasses.replace(bundle, train=bundle.train.take(subset))
    encoder = None
    if arm != "scratch":
        encoder = load_stage_encoder(stage_path(pretrain_folder(out, arm, seed), len(cfg.model.blocks)))[0]
    with fitting(f"study f{fraction:g} {arm} seed {seed}"):
        cell = _cell(cfg, labelled, out, fraction, arm, seed, encoder)
    unlabelled = len(pretrain_images(_seeded(cfg, seed), bundle)[0])  # the same images for every objective
    return cell | {"pretrain_images": unlabelled, "ratio": unlabelled / max(cell["labelled"], 1)}


def _cell(cfg: Config, labelled: DataBundle, out: Path, fraction: float, arm: str, seed: int,
          encoder: Encoder | None) -> dict[str, Any]:
    """One arm fine-tuned on one labelled fraction with one seed, tested; every arm of a cell has the same budget
    (:func:`cell_epochs`)."""
    c = _seeded(cfg, seed)
    batch, workers = cfg.finetune.batch_size, processes(cfg.trainer)
    every = val_every(batches_per_process(len(labelled.train), batch, workers) * batch, len(labelled.val))
    epochs = cell_epochs(cfg, fraction, len(labelled.train), workers)
    c.finetune.epochs = math.ceil(epochs / every) * every  # the last epoch is validated too
    if cfg.trainer.smoke:  # Lightning runs two batches an epoch, so the budget above is not what runs
        c.finetune.epochs, every = 1, 1
    c.finetune.early_stopping_patience = None  # every cell trains its whole budget
    folder = out / "cells" / f"f{fraction:g}-{arm}-seed{seed}"
    result = finetune(c, labelled, folder, "scratch" if arm == "scratch" else "pretrained", encoder, resume=True,
                      split_seed=cfg.seed, val_every=every)  # every cell's data is split from the study's seed
    scores = evaluate(result.classifier, labelled.test, labelled.classes, device=fit_device(cfg.trainer))
    history = result.record.history
    validating = sum(row.get("val_seconds", 0.0) for row in history)
    return {"fraction": fraction, "arm": arm, "seed": seed, "labelled": len(labelled.train),
            "labelled_per_class": len(labelled.train) / max(len(labelled.classes), 1),
            "epochs": len(history), "steps": int(history[-1]["step"]) if history else 0, "val_every": every,
            "test_accuracy": scores["test_accuracy"], "test_loss": scores["test_loss"],
            "best_val_accuracy": result.record.summary["best_val_accuracy"], "history": history,
            "seconds": result.record.seconds, "val_share": validating / max(result.record.seconds, 1e-9),
            "threads": torch.get_num_threads()}  # a task's numbers depend on its thread count


def _finish(cfg: Config, out: Path, record: dict[str, Any], objectives: list[str]) -> dict[str, Any]:
    """Epochs to target for every cell, the summary with its intervals, study.csv and the report."""
    from .report import write_study_report

    for c in record["cells"]:  # epochs to target_fraction x the scratch arm's best, same fraction and seed
        scratch = next(x for x in record["cells"] if (x["fraction"], x["seed"], x["arm"]) ==
                       (c["fraction"], c["seed"], "scratch"))
        c["target"] = cfg.finetune.target_fraction * scratch["best_val_accuracy"]
        c["epochs_to_target"] = epochs_to_target(c["history"], c["target"])
        c["steps_to_target"] = next((int(row["step"]) for row in c["history"]
                                     if row["epoch"] == c["epochs_to_target"]), None)
    seeds = study_seeds(cfg)
    grid = [c for c in record["cells"] if c["seed"] in seeds and c["fraction"] in cfg.study.label_fractions
            and c["arm"] in ["scratch", *objectives]]
    record["summary"] = summarize_cells(grid, objectives, record.get("pretraining", []))
    write_json(out / "study.json", record)
    if not is_global_zero():
        return record
    header(f"[report] writing study.csv, study.md and study.html in {out}")
    with open(out / "study.csv", "w", newline="") as f:
        keys = ["fraction", "labelled", "labelled_per_class", "pretrain_images", "ratio", "arm", "seed", "epochs",
                "steps", "val_every", "test_accuracy", "test_loss", "best_val_accuracy", "epochs_to_target",
                "steps_to_target", "seconds", "threads", "val_share"]
        writer = csv.DictWriter(f, keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(grid)
    write_study_report(out)
    return record
