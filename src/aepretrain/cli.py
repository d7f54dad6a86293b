"""The command line: thin. It parses, calls the Python API, and turns a user's mistake into one line."""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import signal
import sys
import warnings
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from . import __version__
from .errors import UserError, require_posix, shown
from .output import cli_level, cli_logging, results_from_first_process

TRAINING_COMMANDS = ("run", "pretrain", "finetune", "evaluate", "bench", "study")
TRACKED_COMMANDS = ("run", "pretrain", "finetune", "study")  # their fits go to trainer.loggers
COMMON = {  # flag -> dotted setting
    "dataset": "data.dataset", "root": "data.root", "seed": "seed", "precision": "trainer.precision",
    "device": "trainer.device", "devices": "trainer.devices", "num_nodes": "trainer.num_nodes",
    "strategy": "trainer.strategy", "image_size": "data.image_size", "objective": "pretrain.objective",
    "seeds": "study.seeds", "engine": "study.engine", "address": "study.address",
}


FLAG_SETTINGS = {**COMMON, "preset": "preset", "smoke": "trainer.smoke", "logger": "trainer.loggers",
                 "label_fractions": "study.label_fractions", "objectives": "study.objectives"}  # help from the schema
SETTING_FLAGS: dict[str, dict[str, Any]] = {  # every flag that sets a setting; COMMAND_FLAGS says who takes which
    "preset": {},
    "config": {"metavar": "FILE", "help": "a YAML file of settings that override the preset"},
    "set": {"action": "append", "default": [], "metavar": "KEY=VALUE",
            "help": "override one setting by its dotted key, e.g. finetune.epochs=3 (repeatable)"},
    "dataset": {},
    "root": {},
    "image-size": {"type": int},
    "seed": {"type": int},
    "precision": {},
    "device": {},
    "devices": {},
    "num-nodes": {"type": int},
    "strategy": {},
    "objective": {},
    "pretrain-data": {"metavar": "[DATASET:]ROOT",
                      "help": "pre-train on other images, e.g. an unlabelled folder (a path) or oxford-pets:DIR"},
    "smoke": {"action": "store_true", "default": None},
    "quiet": {"action": "store_true", "help": "no progress bars or lines: warnings and errors only"},
    "verbose": {"action": "store_true", "help": "debug lines too, and Lightning's own"},
    "logger": {"metavar": "NAMES"},
    "engine": {},
    "address": {"metavar": "auto|HOST:PORT"},
}
_FILES, _DATA = "preset config set", "dataset root image-size"
_TRAINING = "seed precision device devices num-nodes strategy smoke quiet verbose logger"
COMMAND_FLAGS = {  # a command accepts only the flags it uses
    "run": f"{_FILES} {_DATA} {_TRAINING} objective pretrain-data",
    "pretrain": f"{_FILES} {_DATA} {_TRAINING} objective pretrain-data",
    "finetune": f"{_FILES} {_DATA} {_TRAINING}",
    "study": f"{_FILES} {_DATA} {_TRAINING} pretrain-data engine address",
    "evaluate": f"{_FILES} {_DATA}",  # the split and seed come from the checkpoint
    "data": f"{_FILES} {_DATA} seed",
    "summary": f"{_FILES} image-size",
    "bench": f"{_FILES} image-size device",
    "config show": _FILES,
    "config keys": "preset",
}
FLAG_RANGES = {"steps": "[1, 10000]", "warmup": "[0, 10000]", "seconds": "[0, 86400]"}  # flags that are no setting
RANGE_FROM = {"top_k": "predict.top_k", "batch": "finetune.batch_size"}  # ... but take one's range
DEFAULTS_SAID = "Defaults are the quick preset's; aepretrain config show --preset NAME prints another's."


@functools.cache
def _schema_and_quick() -> tuple[dict[str, Any], Any]:
    """Every setting by its dotted key, and the quick preset's values: what flags' help says."""
    from .config import resolve, schema

    return {s.key: s for s in schema()}, resolve("quick")


@functools.cache
def setting_help(key: str) -> str:
    """A flag's help from its setting's schema: what it is, what it takes and its value in the quick preset."""
    from .config import choices_of, value_at

    settings, quick = _schema_and_quick()
    found = settings[key]
    choices = choices_of(found)
    allowed = f"one of {', '.join(choices)}" if choices else f"in {found.range}" if found.range else ""
    if found.rule != key:
        allowed = ", each ".join(filter(None, ["comma-separated", allowed]))
    value = value_at(quick, key)
    shown = ",".join(map(str, value)) if isinstance(value, list) else \
        json.dumps(value) if value is None or isinstance(value, bool) else value
    return ("; ".join(filter(None, [found.help, allowed])) + f" (default: {shown})").replace("%", "%%")


class _DefaultsShown(argparse.HelpFormatter):
    """Help that gives each flag's range and default where its own text does not."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        interval = flag_ranges().get(action.dest) if action.option_strings else None
        text += f"; in {interval}" if interval else ""
        default = action.default
        if "default" not in text and not (default is argparse.SUPPRESS or isinstance(default, bool)
                                          or default in (None, "", [])):
            text += " (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **{"formatter_class": _DefaultsShown, **kwargs})


def _settings(p: argparse.ArgumentParser, command: str) -> None:
    p.epilog = DEFAULTS_SAID
    for flag in COMMAND_FLAGS[command].split():
        key = FLAG_SETTINGS.get(flag.replace("-", "_"))
        p.add_argument(*(["-q"] if flag == "quiet" else ["-v"] if flag == "verbose" else []), f"--{flag}",
                       **SETTING_FLAGS[flag], **({"help": setting_help(key)} if key else {}))


def flag_ranges() -> dict[str, str]:
    """The range of every number flag that is no setting, by its name in argparse's namespace."""
    settings, _ = _schema_and_quick()
    return FLAG_RANGES | {flag: settings[key].range for flag, key in RANGE_FROM.items()}


def check_flags(args: argparse.Namespace) -> None:
    """The numbers of flags that are no setting, each in its range; --quiet or --verbose, not both."""
    from .config import check_range

    if getattr(args, "quiet", False) and getattr(args, "verbose", False):
        raise UserError("--quiet and --verbose contradict each other: pass one of them")

    for flag, interval in flag_ranges().items():
        if getattr(args, flag, None) is not None:
            check_range(f"--{flag.replace('_', '-')}", getattr(args, flag), interval)


def _out(p: argparse.ArgumentParser, default: str | None = None, overwrite: bool = True) -> None:
    p.add_argument("--out", default=default, required=default is None, metavar="DIR",
                   help="the run folder" + (" (default: runs/PRESET)" if default == "" else ""))
    p.add_argument("--resume", action="store_true", help="continue the run in DIR where it stopped")
    if overwrite:
        p.add_argument("--overwrite", action="store_true", help="replace the run in DIR (only what aepretrain wrote)")


def pretrain_source(value: str) -> tuple[str, str | None]:
    """`--pretrain-data`: a data set name, NAME:ROOT, or a folder path (read as the `folder` data set)."""
    from .data import READERS

    name, _, root = value.partition(":")
    if name in READERS:
        return name, root or None
    return "folder", value


def resolve_args(args: argparse.Namespace) -> Any:
    """The settings: preset, --config, --set, then flags; a resumed run takes the ones it was started with.
    Resolved once per process (the allocator's check and the command share them)."""
    if getattr(args, "settings", None) is None:
        args.settings = _resolve_args(args)
    return args.settings


def _resolve_args(args: argparse.Namespace) -> Any:
    from .config import cut, resolve
    from .runfolder import saved_settings

    flags = {key: getattr(args, flag, None) for flag, key in COMMON.items()}
    flags["trainer.smoke"] = getattr(args, "smoke", None)
    for flag, key, kind in (("label_fractions", "study.label_fractions", float), ("objectives", "study.objectives", str),
                            ("logger", "trainer.loggers", str)):
        if getattr(args, flag, None):
            try:
                flags[key] = [kind(v.strip()) for v in getattr(args, flag).split(",")]
            except ValueError:
                raise UserError(f"--{flag.replace('_', '-')} takes comma-separated numbers, got "
                                f"'{cut(getattr(args, flag))}'") from None
    if getattr(args, "pretrain_data", None):
        flags["pretrain.dataset"], flags["pretrain.root"] = pretrain_source(args.pretrain_data)
    cfg = resolve(args.preset or "quick", args.config, args.set, **flags)
    continuing = getattr(args, "resume", False) or args.command == "finetune"  # an arm joins the run in --out
    given = args.preset or args.config or args.set or any(v is not None for v in flags.values())
    if continuing and not given and getattr(args, "out", None):
        saved = saved_settings(args.out)  # verified; the API refuses given settings that contradict them
        if saved is None and getattr(args, "resume", False):
            raise UserError(f"--resume: {args.out} holds no saved settings (a run there never got past its start): "
                            "give the run's settings again (--preset, --config, --set, ...)")
        cfg = saved or cfg
    if getattr(args, "quiet", False):
        cfg.trainer.progress = False
    return cfg


def cmd_data(args: argparse.Namespace) -> None:
    from .data import prepare
    from .fileio import check_folder

    cfg = resolve_args(args)
    check_folder(args.out)  # before the data is read, not when the grid is drawn
    info = prepare(cfg.data, cfg.seed).describe(Path(args.out) / f"samples-{cfg.data.dataset}.png")
    grid = info["sample_grid"]
    if args.json:
        print(json.dumps(info, indent=2))
        return
    where = f"from {info['root']}" if info["root"] else "(generated)"
    print(f"{info['dataset']} {where}: {len(info['classes'])} classes, "
          f"images {info['image_size'][0]}x{info['image_size'][1]}x{info['image_size'][2]}")
    print("counts: " + ", ".join(f"{k} {v}" for k, v in info["counts"].items()))
    width = max([len(c) for c in info["classes"]] + [5])
    print(f"{'class':<{width}}  train    val   test")
    for name, row in info["per_class"].items():
        print(f"{name:<{width}}  {row['train']:5d}  {row['val']:5d}  {row['test']:5d}")
    for note in info["notes"]:
        print(f"note: {note}")
    print(f"skipped {len(info['skipped'])} file(s)" + (":" if info["skipped"] else ""))
    for item in info["skipped"]:
        print(f"  {item['path']}: {item['reason']}")
    if info["missing"]:
        print(f"missing {len(info['missing'])} listed file(s), e.g. {info['missing'][0]}")
    print(f"sample grid: {grid}")


def cmd_summary(args: argparse.Namespace) -> None:
    from .models import summary

    cfg = resolve_args(args)
    info = summary(cfg.model, cfg.data.image_size, cfg.model.in_channels, cfg.model.num_classes)
    if args.json:
        print(json.dumps(info, indent=2))
        return
    parts = [("classifier", info["classifier"])] + [(f"autoencoder, stage {s['stage']}", s) for s in info["stages"]]
    for title, part in parts:
        print(f"\n{title} (input {tuple(info['input_shape'])})")
        print(f"  {'layer':<26}{'type':<14}{'output (H, W, C)':<20}{'params':>10}")
        for layer in part["layers"]:
            print(f"  {layer['name']:<26}{layer['type']:<14}{str(tuple(layer['output_shape'])):<20}{layer['params']:>10,}")
        print(f"  total {part['total']:,}  trainable {part['trainable']:,}  non-trainable {part['non_trainable']:,}")


def cmd_run(args: argparse.Namespace) -> None:
    from .pipeline import run

    from .report import NO_VERDICT, percent, reached_text

    metrics = run(resolve_args(args), args.out, resume=args.resume, overwrite=args.overwrite)
    print(f"\nrun folder: {args.out}  (report.html, report.md, metrics.json, figures/, checkpoints/)")
    for arm, r in metrics["finetune"].items():
        print(f"{arm:>10}: test accuracy {percent(r['test_accuracy'])}, {reached_text(r, metrics)}")
    print(NO_VERDICT)


def cmd_pretrain(args: argparse.Namespace) -> None:
    from .pipeline import run_pretrain

    stages = run_pretrain(resolve_args(args), args.out, resume=args.resume, overwrite=args.overwrite)
    loss = "MSE" if stages["test_mse"] is not None else "loss"  # a contrastive objective reconstructs nothing
    for s in stages["stages"]:
        print(f"stage {s['stage']}: train {loss} {s['train_loss']:.5f}, val {loss} {s['val_loss']:.5f}, {s['seconds']} s")
    if stages["test_mse"] is not None:
        print(f"test reconstruction MSE of the last stage: {stages['test_mse']:.5f}")


def cmd_finetune(args: argparse.Namespace) -> None:
    from .pipeline import run_finetune

    r = run_finetune(resolve_args(args), args.out, args.init, args.encoder, resume=args.resume)
    blocks = r.get("pretrained_blocks")
    arm = f"{args.init} (blocks 1 to {blocks} pre-trained)" if blocks else args.init
    print(f"{arm}: best val accuracy {r['best_val_accuracy']:.4f} at epoch {r['best_epoch']}, "
          f"test accuracy {r['test_accuracy']:.4f}, checkpoint {r['checkpoint']}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from .pipeline import run_evaluate

    scores = run_evaluate(resolve_args(args), args.checkpoint, Path(args.out) if args.out else None)
    if args.json:
        print(json.dumps(scores, indent=2))
        return
    print(f"test loss {scores['test_loss']:.4f}, test accuracy {scores['test_accuracy']:.4f}")
    for name, acc in scores["per_class_accuracy"].items():
        print(f"  {name}: {acc:.4f}")
    if scores.get("figure"):
        print(f"confusion matrix: {scores['figure']}")


def cmd_predict(args: argparse.Namespace) -> None:
    from .fileio import printable
    from .prediction import predict

    rows = predict(args.images, args.checkpoint, args.top_k)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    for row in rows:  # a newline or escape code in a file or class name is shown escaped, on its line
        print(printable(row["image"]))
        for rank, top in enumerate(row["top"], 1):
            print(f"  {rank}. {printable(top['class']):<24} {top['probability']:.8g}")


def cmd_export(args: argparse.Namespace) -> None:
    from .export import export

    info = export(args.checkpoint, args.format, args.out, args.overwrite)
    size = f"{info['bytes'] / 1e6:.2f} MB"
    if args.format == "backbone":
        print(f"backbone: {info['path']} ({size}), its spec in {info['spec']}; "
              f"aepretrain.load_encoder('{info['path']}') loads it")
    else:
        print(f"{args.format}: {info['path']} ({size}); on a check batch it differs from PyTorch by at most "
              f"{info['max_abs_diff']:.2g}")


def cmd_serve(args: argparse.Namespace) -> None:
    from .serve import serve

    serve(args.checkpoint, args.host, args.port, args.top_k, args.max_upload_mb, args.max_pixels)


def cmd_study(args: argparse.Namespace) -> None:
    from .label_study import study

    record = study(resolve_args(args), args.out, overwrite=args.overwrite)
    from .report import budget_text, interval_text, gain_text

    print(f"{'fraction':>9} {'labelled':>9} {'arm':>18} {'epochs (steps)':>15} {'mean':>7} {'std':>7} {'gain':>7} "
          f"{'95 % interval':>17}  verdict")
    for r in record["summary"]:
        print(f"{r['fraction']:>9g} {r['labelled']:>9} {r['arm']:>18} {budget_text(r):>15} {r['mean']:.4f} "
              f"{r['std']:.4f} {gain_text(r.get('gain')):>7} {interval_text(r):>17}  {r.get('verdict', '')}")
    print(f"study folder: {args.out} (study.json, study.csv, study.md, study.html, figures/study.png)")


def cmd_report(args: argparse.Namespace) -> None:
    from .report import write_report

    md, page = write_report(args.dir)
    print(f"{md}\n{page}")


def cmd_download(args: argparse.Namespace) -> None:
    from .config import cut
    from .data.download import DATASETS, download, downloaded_root

    if args.dataset not in DATASETS:
        raise UserError(f"download --dataset {cut(repr(args.dataset))}: there is none to download; choose "
                        f"{' or '.join(DATASETS)}")
    if args.dataset == "oxford-pets" and not args.root:
        raise UserError("download --dataset oxford-pets needs --root DIR: where to unpack its 800 MB")
    root = download(args.dataset, args.root or downloaded_root(args.dataset), base_url=args.url)
    if args.dataset == "oxford-pets":
        print(f"Oxford-IIIT Pet is in {root}: use --dataset oxford-pets --root {root}")
    else:
        print(f"Fashion-MNIST is in {root}: " + (f"use --root {root}" if args.root else "runs find it without --root"))


def cmd_cache(args: argparse.Namespace) -> None:
    from .data.cache import cache_root, clear, entries, verify
    from .data.store import in_units

    def count(rows: list) -> str:
        return f"{len(rows)} entr{'y' if len(rows) == 1 else 'ies'}"

    folder = cache_root(args.dir)
    if args.action == "clear":
        removed, busy = clear(folder)
        print(f"removed {count(removed)} from {folder}, {in_units(sum(r['bytes'] for r in removed))} freed")
        for name in busy:
            print(f"  kept {name}: another process is building it")
        return
    rows = verify(folder) if args.action == "verify" else entries(folder)
    if args.json:
        print(json.dumps({"folder": str(folder), "entries": rows}, indent=2))
    elif args.action == "verify":
        outcomes = [r["outcome"] for r in rows]
        print(f"{folder}: checked {count(rows)}: {outcomes.count('ok')} ok, {outcomes.count('removed')} removed, "
              f"{outcomes.count('kept')} kept")
        for r in rows:
            said = {"ok": f", {r['images']} images", "kept": f": {r['reason']}",
                    "removed": f": {r['reason']}; the next run that uses it builds it again"}[r["outcome"]]
            print(f"  {r['outcome']:<8} {r['entry']}{said}")
    else:
        print(f"{folder}: {count(rows)}, {in_units(sum(r['bytes'] for r in rows))}")
        for r in rows:
            images = "" if r["images"] is None else f"{r['images']} images"
            print(f"  {r['entry']:<48} {in_units(r['bytes']):>10} {images:>15}  {r['state']:<10} {r['source'] or ''}")


def cmd_bench(args: argparse.Namespace) -> None:
    from .benchmark import bench, table
    from .config import check_choice, check_image_size

    cfg = resolve_args(args)
    size = cfg.data.image_size if args.size is None else args.size
    check_image_size("--size", size, cfg.model)
    precisions = args.precisions.split(",") if args.precisions else None
    models = args.models.split(",") if args.models else None
    stages = [f"stage{k}" for k in range(1, len(cfg.model.blocks) + 1)]
    for key, values, choices in (("--precisions", precisions, ("32", "bf16-mixed", "16-mixed")),
                                 ("--models", models, ("classifier", *stages))):
        for value in values or []:
            check_choice(key, value, choices)
    report = bench(cfg, size, cfg.finetune.batch_size if args.batch is None else args.batch, precisions,
                   args.warmup, args.steps, models, args.seconds,
                   progress=lambda line: print(line, file=sys.stderr, flush=True))
    print(json.dumps(report, indent=2) if args.json else table(report))


def cmd_config(args: argparse.Namespace) -> None:
    from .config import dump, keys_table

    print(dump(resolve_args(args)) if args.action == "show" else keys_table(args.preset or "quick"), end="")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aepretrain", description="Greedy layer-wise convolutional autoencoder pre-training for CNN "
        "classifiers, fine-tuning, and an honest comparison with training from scratch.")
    parser.add_argument("--version", action="version", version=f"aepretrain {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("run", help="the whole job: pretrain, fine-tune both arms, evaluate, predict, report")
    _settings(p, "run")
    _out(p, default="")
    p.set_defaults(handler=cmd_run)

    p = sub.add_parser("data", help="prepare a data set and show counts, skipped files and a sample grid")
    _settings(p, "data")
    p.add_argument("--out", default="runs/data", metavar="DIR", help="where the sample grid PNG goes")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=cmd_data)

    p = sub.add_parser("summary", help="layers, output shapes and Keras-style parameter counts of every model")
    _settings(p, "summary")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=cmd_summary)

    p = sub.add_parser("pretrain", help="greedy layer-wise pre-training, one autoencoder per stage")
    _settings(p, "pretrain")
    _out(p)
    p.set_defaults(handler=cmd_pretrain)

    p = sub.add_parser("finetune", help="train the classifier from the pre-trained encoder or from scratch")
    _settings(p, "finetune")
    _out(p, overwrite=False)
    p.add_argument("--init", choices=["pretrained", "scratch"], required=True,
                   help="the arm: from the pre-trained encoder, or from initial weights")
    p.add_argument("--encoder", metavar="PATH",
                   help="a pretrain-stageK.safetensors (default: the last stage in the run folder)")
    p.set_defaults(handler=cmd_finetune)

    p = sub.add_parser("evaluate", help="test loss, accuracy, per-class accuracy and confusion matrix")
    _settings(p, "evaluate")
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="a classifier-*.safetensors")
    p.add_argument("--out", metavar="DIR", help="where the confusion matrix PNG goes")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=cmd_evaluate)

    p = sub.add_parser("predict", help="top-k classes of any image files")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files to classify")
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="a classifier-*.safetensors")
    p.add_argument("--top-k", type=int, default=3, help="classes shown for each image")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=cmd_predict)

    p = sub.add_parser("export", help="the classifier as ONNX or TorchScript, or the encoder alone as a backbone")
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="a classifier-*.safetensors (backbone: a pretrain-stageK.safetensors too)")
    p.add_argument("--format", required=True, choices=["onnx", "torchscript", "backbone"],
                   help="onnx or torchscript: the classifier; backbone: the encoder's weights alone")
    p.add_argument("--out", required=True, metavar="FILE",
                   help="the file to write; backbone: also FILE.json beside it (the spec), e.g. encoder.safetensors "
                   "and encoder.json. Missing folders are made. A file that exists is refused, unless --overwrite; "
                   "the checkpoint and its record (PATH.json) always")
    p.add_argument("--overwrite", action="store_true", help="replace FILE (and FILE.json) if they exist")
    p.set_defaults(handler=cmd_export)

    p = sub.add_parser("serve", help="a local web page and a JSON endpoint (POST /predict) over a classifier")
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="a classifier-*.safetensors")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="default 8000; 0 takes a free one")
    p.add_argument("--top-k", type=int, default=5, help="classes each answer gives")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="larger uploads are refused (default 20)")
    p.add_argument("--max-pixels", type=int, help="larger images are refused as possible decompression bombs "
                   "(default: Pillow's limit, 89,478,485)")
    p.set_defaults(handler=cmd_serve)

    p = sub.add_parser("bench", help="images per second of the train step, the whole loop and inference, "
                       "against the machine's matmul rate")
    _settings(p, "bench")
    p.add_argument("--size", type=int, help="image size (default: the preset's)")
    p.add_argument("--batch", type=int, help="batch size (default: the preset's fine-tuning batch)")
    p.add_argument("--precisions", help="comma-separated, e.g. 32,bf16-mixed (default: 32, and bf16 or fp16 where "
                   "the hardware computes it natively)")
    p.add_argument("--models", help="comma-separated subset of classifier,stage1,stage2,... (default: all)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first, at most")
    p.add_argument("--steps", type=int, default=10, help="timed steps at most; the median counts")
    p.add_argument("--seconds", type=float, default=10.0,
                   help="time budget of each measurement (step, loop, inference of one model): slow models get "
                   "fewer steps, down to one; 0: no limit (default: 10)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=cmd_bench)

    p = sub.add_parser("study", help="label efficiency: pre-trained against scratch over labelled fractions and seeds")
    _settings(p, "study")
    p.add_argument("--out", default="runs/study", metavar="DIR", help="the study folder (resumed if it exists)")
    p.add_argument("--overwrite", action="store_true", help="start the study in DIR again")
    p.add_argument("--label-fractions", metavar="FRACTIONS", help=setting_help("study.label_fractions"))
    p.add_argument("--seeds", type=int, help=setting_help("study.seeds"))
    p.add_argument("--objectives", metavar="NAMES", help=setting_help("study.objectives"))
    p.set_defaults(handler=cmd_study)

    p = sub.add_parser("cache", help="list the decoded data stores in the cache with their sizes, check every image "
                       "of them against its checksum (removing those that fail), or clear them")
    p.add_argument("action", choices=["list", "verify", "clear"], help="list, verify or clear the stores")
    p.add_argument("--dir", metavar="DIR", help="the cache folder (default: $AEPRETRAIN_CACHE, else "
                   "$XDG_CACHE_HOME/aepretrain or ~/.cache/aepretrain)")
    p.add_argument("--json", action="store_true", help="print JSON (list, verify)")
    p.set_defaults(handler=cmd_cache)

    p = sub.add_parser("report", help="rebuild report.md and report.html from a run folder")
    p.add_argument("dir", metavar="DIR", help="the run folder")
    p.set_defaults(handler=cmd_report)

    p = sub.add_parser("download", help="fetch a data set's official files, check their size and md5, unpack them")
    p.add_argument("--dataset", default="oxford-pets", help="oxford-pets (default) or fashion-mnist")
    p.add_argument("--root", metavar="DIR", help="where the files go (needed for oxford-pets; fashion-mnist: default "
                   "datasets/fashion-mnist in the cache folder, where runs look for it)")
    p.add_argument("--url", help="another base URL (a mirror)")
    p.set_defaults(handler=cmd_download)

    p = sub.add_parser("config", help="the settings: a preset's as a YAML file, or every key with its type, "
                       "default, allowed values and help")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = actions.add_parser("show", help="print the resolved settings as YAML, a file that --config reads back")
    _settings(q, "config show")
    q = actions.add_parser("keys", help="every setting: dotted key, type, default, allowed values and help")
    _settings(q, "config keys")
    p.set_defaults(handler=cmd_config)
    return parser


def quiet_libraries(verbose: bool = False) -> None:
    """Keep the terminal for progress and results: no device banners (unless ``verbose``), no advice we already
    follow."""
    import lightning.pytorch  # noqa: F401  (it sets its loggers' levels on import: set ours after)

    for name in ("lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
    for message in (".*does not have many workers.*", ".*number of training batches.*", ".*LitLogger.*", ".*LeafSpec.*",
                    r".*module\(s\) in eval mode.*", "Checkpoint directory .* exists and is not empty"):
        warnings.filterwarnings("ignore", message=message)


TCMALLOC = ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4",
            "/usr/lib64/libtcmalloc_minimal.so.4", "/usr/lib/libtcmalloc_minimal.so.4")


def use_fast_allocator(args: argparse.Namespace) -> None:
    """Restart once under tcmalloc, as PyTorch's CPU launcher (torch.backends.xeon.run_cpu) does, where it pays:
    measured on 2 Zen 4 cores, +19 % train step at 224 px, +11 % for an autoencoder at 128 px, but -8 % wall
    time for the 32 px quick preset. So `trainer.allocator: auto` takes it from 128 px up, and always for `bench`:
    in its fresh process glibc hands the step's buffers back to the system and faults them in again every step
    (15,000 page faults, +40 % time at 32 px on a Zen 3), which a long run's glibc has stopped doing."""
    if "tcmalloc" in os.environ.get("LD_PRELOAD", ""):
        return
    cfg = resolve_args(args)
    choice = os.environ.get("AEPRETRAIN_ALLOCATOR") or cfg.trainer.allocator
    small = cfg.data.image_size < 128 and args.command != "bench"
    if choice == "default" or (choice == "auto" and (small or cfg.trainer.device == "cuda")):
        return
    library = next((path for path in TCMALLOC if os.path.exists(path)), None)
    if library is None:
        return
    env = dict(os.environ, LD_PRELOAD=" ".join(filter(None, [os.environ.get("LD_PRELOAD"), library])))
    os.execve(sys.executable, [sys.executable, "-m", "aepretrain", *sys.argv[1:]], env)


CTRL_C = {"seen": False, "signal": signal.SIGINT}


def _on_ctrl_c(signum: int, frame: Any) -> None:
    """Ctrl-C is remembered as well as raised: a library that swallows the KeyboardInterrupt while it imports
    leaves a half-loaded module behind, which fails later with another error; Lightning turns one in a fit into
    exit status 1. SIGTERM is taken the same way, so that a killed command too runs its cleanup on the way out:
    it ends its decoding workers, lets go of its locks and removes a partial download."""
    CTRL_C.update(seen=True, signal=signum)
    raise KeyboardInterrupt


def interrupted() -> int:
    resumable = CTRL_C.get("command") in ("run", "pretrain", "finetune", "study")
    print("aepretrain: interrupted" + ("; what finished is kept in the run folder (--resume continues)"
                                       if resumable else ""), file=sys.stderr)
    return 128 + CTRL_C["signal"]  # as a shell shows a process ended by that signal: 130, 143


def main(argv: list[str] | None = None) -> int:
    CTRL_C.update(seen=False, signal=signal.SIGINT, command=None)
    previous = {signum: signal.signal(signum, _on_ctrl_c) for signum in (signal.SIGINT, signal.SIGTERM)}
    said = ExitStack()  # progress, headers and warnings on stderr; results on stdout
    try:  # all of it: Ctrl-C while torch and Lightning load is an interruption too
        require_posix()
        args = build_parser().parse_args(argv)
        CTRL_C["command"] = args.command
        said.enter_context(cli_logging(cli_level(getattr(args, "quiet", False), getattr(args, "verbose", False))))
        if args.command == "run" and not args.out:
            args.out = f"runs/{args.preset or 'quick'}"
        check_flags(args)
        if args.command in COMMAND_FLAGS:
            resolve_args(args)  # a mistake in the settings is said at once, before torch and Lightning load
        if args.command in TRAINING_COMMANDS and os.environ.get("AEPRETRAIN_CPU_BF16"):
            from .training import cpu_computes_bf16

            cpu_computes_bf16()  # a wrong value is said before anything is written
        if args.command in TRACKED_COMMANDS:
            from .trackers import check as check_trackers

            check_trackers(args.settings.trainer)
        if argv is None and args.command in TRAINING_COMMANDS:
            use_fast_allocator(args)
        if args.command in TRAINING_COMMANDS:
            quiet_libraries(getattr(args, "verbose", False))
            said.enter_context(results_from_first_process())
        args.handler(args)
    except UserError as exc:
        print(f"aepretrain: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return interrupted()
    except SystemExit:
        if CTRL_C["seen"]:
            return interrupted()
        raise
    except BrokenPipeError:  # output piped into `head`: not an error
        sys.stderr.close()
    except OSError as exc:  # the system refused a path the user gave (too long, not a folder, no permission, ...)
        if CTRL_C["seen"]:
            return interrupted()
        if exc.filename is None:
            raise
        reason = exc.strerror or type(exc).__name__
        print(f"aepretrain: error: cannot use {shown(exc.filename)}: {reason}", file=sys.stderr)
        return 2
    except Exception:
        if CTRL_C["seen"]:
            return interrupted()
        raise
    finally:
        said.close()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return interrupted() if CTRL_C["seen"] else 0


if __name__ == "__main__":
    sys.exit(main())
