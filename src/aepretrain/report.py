"""The report: every table of the reference with our numbers beside it, and every figure.

It reads only what a run wrote (config.yaml, data.json, metrics.json, figures/), so
``aepretrain report DIR`` rebuilds it from a run folder. One list of blocks renders to both
``report.md`` and a self-contained ``report.html`` (figures embedded).
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any


from . import figures
from .errors import UserError
from .fileio import first_line
from .models import summary
from .probe import KNN_K
from .reference import REFERENCE
from .runfolder import MARKER, SETTINGS, saved_settings

Block = tuple[str, Any]


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e-3 and value != 0 else f"{value:.{digits}f}"
    return str(value)


def _seen(history: list[dict[str, Any]]) -> int | None:
    """Images trained on in an epoch, summed over DDP processes (the most of any epoch)."""
    counts = [int(row["samples"]) for row in history if "samples" in row]
    return max(counts) if counts else None


def _table(header: list[str], rows: list[list[Any]]) -> Block:
    return ("table", (header, [[_fmt(v) for v in row] for row in rows]))


def _load(out: Path, name: str) -> Any:
    path = out / name
    if not path.is_file():
        raise UserError(f"{out} holds no {name}: is it a finished aepretrain run folder?")
    if name == SETTINGS:
        cfg = saved_settings(out)  # verified against the checksum the run saved
        if cfg is None:
            raise UserError(f"{out} holds no aepretrain run marker ({MARKER}): is it a run folder?")
        return cfg
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise UserError(f"{path} is damaged ({first_line(exc)}): resuming the run or study in {out} writes it "
                        "again") from None


def finished_metrics(out: Path) -> dict[str, Any]:
    """metrics.json of a run that `aepretrain run` finished; one line saying what is missing otherwise."""
    m = _load(out, "metrics.json")
    for step in ("pretrain", "finetune", "target_accuracy"):
        if step not in m:
            raise UserError(f"{out} holds no {step} results: a report needs a folder that `aepretrain run` "
                            "finished (pretrain or finetune alone are not enough)")
    return m


def blocks(out: Path) -> list[Block]:
    """The report, section by section, from the files of a finished run folder."""
    cfg = _load(out, "config.yaml")
    data, m = _load(out, "data.json"), finished_metrics(out)
    fig = out / "figures"
    return [*_settings(cfg, m), *_data(m, data, fig), *_models(cfg, m), *_pretraining(m, fig), *_probes(m, fig),
            *_finetuning(m, fig), *_prediction(m, fig)]


def _settings(cfg: Any, m: dict[str, Any]) -> list[Block]:
    d, f, p = m["dataset"], cfg.finetune, cfg.pretrain
    return [("h1", f"aepretrain report: preset {m['preset']}"),
            ("p", f"Data set **{d['name']}** ({len(d['classes'])} classes, {d['image_size']}x{d['image_size']}x"
                  f"{d['channels']}), seed {m['seed']}, precision **{m['precision']}**"
                  f"{', SMOKE RUN (a few batches: numbers mean nothing)' if m['smoke'] else ''}. "
                  f"Pre-training: Adam lr {p.lr:g}, {p.epochs} epochs per stage, batch {p.batch_size}, schedule "
                  f"{p.schedule}. Fine-tuning: Adam lr {f.lr:g}, up to {f.epochs} epochs, batch {f.batch_size}, "
                  f"schedule {f.schedule}, early stopping patience {f.early_stopping_patience}. Augmentation: "
                  f"rotation ±{cfg.augment.rotation:g}°, zoom {cfg.augment.zoom:.0%}, brightness "
                  f"{cfg.augment.brightness}, horizontal flip {cfg.augment.hflip}. First-convolution stride: "
                  f"classifier {cfg.model.classifier_stride}, autoencoders {cfg.model.autoencoder_stride}.")]


def _data(m: dict[str, Any], data: dict[str, Any], fig: Path) -> list[Block]:
    d = m["dataset"]
    b: list[Block] = [("h2", "1. Data"), _table(["split", "images"], [[k, d[k]] for k in ("train", "val", "test", "ae")])]
    notes = data.get("notes", []) + [f"{len(data['skipped'])} file(s) skipped, {len(data['missing'])} listed "
                                     "file(s) missing"]
    b.append(("p", "; ".join(notes) + "."))
    if data["skipped"]:
        b.append(_table(["skipped file", "reason"], [[s["path"], s["reason"]] for s in data["skipped"][:50]]))
    b.append(("img", (fig / "samples.png", "Sample images, one row per class")))
    return b


def _models(cfg: Any, m: dict[str, Any]) -> list[Block]:
    d = m["dataset"]
    clf = summary(cfg.model, d["image_size"], d["channels"], len(d["classes"]))["classifier"]
    ref_layers = REFERENCE["classifier_layers"]
    rows = [[layer["name"], layer["type"], str(tuple(layer["output_shape"] or ())), layer["params"],
             ref_layers[i] if len(clf["layers"]) == len(ref_layers) else None] for i, layer in enumerate(clf["layers"])]
    rows.append(["total", "", "", clf["total"], REFERENCE["classifier_total"]])
    return [("h2", "2. Models"),
            ("p", "The classifier (the reference counts BatchNorm as 4 x C, its moving statistics non-trainable):"),
            _table(["layer", "type", "output (H, W, C)", "params (ours)", "params (reference)"], rows)]


def _pretraining(m: dict[str, Any], fig: Path) -> list[Block]:
    rows = []
    for stage in m["pretrain"]["stages"]:
        ref = REFERENCE["stages"][stage["stage"] - 1] if stage["stage"] <= 3 else None
        prm = stage["params"]
        rows.append([f"#{stage['stage']}", f"{prm['total']:,} / {prm['trainable']:,} / {prm['non_trainable']:,}",
                     "{:,} / {:,} / {:,}".format(*ref["params"]) if ref else None, stage["epochs"], stage["seconds"],
                     ref["seconds"] if ref else None, stage["train_loss"], ref["train_loss"] if ref else None,
                     stage["val_loss"], _seen(stage["history"])])
    pre = m["pretrain"]
    reconstructs = pre["test_mse"] is not None  # a contrastive objective has its own loss and no reconstructions
    loss = "MSE" if reconstructs else "loss"
    return [("h2", "3. Greedy layer-wise pre-training"),
            ("p", f"Objective **{pre.get('objective', 'greedy')}**; pre-training data: {pre.get('data', 'n/a')} "
                  f"({_fmt(pre.get('images'))} images)."),
            _table(["stage", "params total / trainable / non-trainable", "reference", "epochs", "seconds",
                    "reference s (30 epochs)", f"train {loss}", "reference train MSE", f"val {loss}",
                    "images trained on per epoch"], rows),
            *([_table(["", "ours", "reference"], [["test reconstruction MSE (last stage)", pre["test_mse"],
                                                   REFERENCE["test_mse"]]]),
               ("img", (fig / "reconstructions.png", "Test images and their reconstructions by each stage"))]
              if reconstructs else []),
            ("img", (fig / "pretrain-curves.png", "Pre-training losses per epoch"))]


def _probes(m: dict[str, Any], fig: Path) -> list[Block]:
    if not m.get("probes"):
        return []
    return [("h2", "3b. Probes: the frozen features at each depth, before fine-tuning"),
            ("p", f"A linear classifier (logistic regression, L-BFGS) and a {KNN_K}-nearest-neighbour vote "
                  "(cosine) on the global-average-pooled output of block k, fitted on the labelled train split; "
                  "the random encoder has the same shape and no training."),
            _table(["encoder", "depth", "features", "linear val", "linear test", "kNN val", "kNN test"],
                   [[r["encoder"], r["depth"], r["features"], r["linear_val"], r["linear_test"], r["knn_val"],
                     r["knn_test"]] for r in m["probes"]]),
            ("img", (fig / "probes.png", "Probe test accuracy by depth, pre-trained against random"))]


def _finetuning(m: dict[str, Any], fig: Path) -> list[Block]:
    rows = []
    for arm, r in m["finetune"].items():
        ref = REFERENCE.get(arm, {})
        rows.append([arm, r["test_loss"], ref.get("test_loss"), r["test_accuracy"], ref.get("test_accuracy"),
                     r["best_val_accuracy"], r["best_epoch"], r["epochs"], r["epochs_to_target"], ref.get("epochs"),
                     r["seconds"], _seen(r["history"])])
    arms = list(m["finetune"])
    return [("h2", "4. Fine-tuning: pre-trained against from scratch"),
            ("p", f"Target validation accuracy for epochs_to_target: {_fmt(m.get('target_accuracy'))} "
                  f"({m.get('target_rule')}); both arms are measured the same way: the first epoch whose validation "
                  "accuracy reaches it. The reference's 66 and 34 are its epochs trained."),
            _table(["arm", "test loss", "reference", "test accuracy", "reference", "best val acc", "best epoch",
                    "epochs run", "epochs to target", "reference epochs", "seconds", "images trained on per epoch"],
                   rows),
            ("img", (fig / "finetune-curves.png", "Accuracy and loss per epoch, both arms")),
            _table(["class", *[f"{a} accuracy" for a in arms]],
                   [[c, *[m["finetune"][a]["per_class_accuracy"][c] for a in arms]] for c in m["dataset"]["classes"]]),
            *[("img", (fig / f"confusion-{arm}.png", f"Confusion matrix on the test split, {arm} arm")) for arm in arms]]


def _prediction(m: dict[str, Any], fig: Path) -> list[Block]:
    predictions = m.get("predictions", [])
    rows = [[Path(r["image"]).name, r["true"], *[f"{t['class']} {t['probability']:.6g}" for t in r["top"]]]
            for r in predictions]
    k = max((len(r["top"]) for r in predictions), default=3)
    rows.append(["reference: a Bombay cat", "Bombay", *[f"{c} {p:.6g}" for c, p in REFERENCE["prediction"]][:k]])
    return [("h2", "5. Prediction"), _table(["image", "true", *[f"top {i + 1}" for i in range(k)]], rows),
            ("img", (fig / "predictions.png", "Test images with their top classes"))]


def gain_text(value: float | None) -> str:
    return "" if value is None else f"{value * 100:+.2f}"


def interval_text(row: dict[str, Any]) -> str:
    low, high = row.get("gain_low"), row.get("gain_high")
    return "" if low is None or high is None else f"[{low * 100:+.2f}, {high * 100:+.2f}]"


def budget_text(row: dict[str, Any]) -> str:
    epochs, steps = row.get("epochs", []), row.get("steps", [])
    return "/".join(map(str, epochs)) + " (" + "/".join(map(str, steps)) + ")"


def study_blocks(out: Path) -> list[Block]:
    """The label-efficiency study: a table of means over seeds, the paired gains, and what they say."""
    record = _load(out, "study.json")
    st, summary = record["settings"], record["summary"]
    figure = figures.study_accuracy(summary, out / "figures" / "study.png")
    b: list[Block] = [("h2", "Label efficiency: pre-trained against from scratch, over seeds")]
    b.append(("p", f"Preset {st['preset']}; {st['seeds']} seeds from {st['base_seed']}; labelled fractions "
                   f"{st['label_fractions']} (stratified, nested); objectives {', '.join(st['objectives'])}. Every "
                   f"cell fine-tunes at least {st['epochs']} epochs and {st['min_steps']} optimizer steps, the same "
                   "for both arms, without early stopping (the epochs and steps each cell ran are in the table); "
                   f"model selection on {st['val_limit'] or 'all'} validation images. Pre-training sees the "
                   "unlabelled train + validation images, never the test split. A gain is called help or harm "
                   "only when its paired Student-t 95 % confidence interval over seeds lies wholly on one side "
                   "of zero; with one seed there is no interval and no verdict."))
    b.append(_table(["labelled fraction", "labelled images", "arm", "seeds", "epochs (steps) run",
                     "test accuracy mean", "std", "gain over scratch (points)", "95 % interval (points)", "verdict"],
                    [[f"{r['fraction']:g}", r["labelled"], r["arm"], r["seeds"], budget_text(r), r["mean"], r["std"],
                      gain_text(r.get("gain")), interval_text(r), r.get("verdict", "")] for r in summary]))
    sentences = []
    for r in summary:
        if "gain" in r:
            sentences.append(f"at {r['fraction']:g} of the labels ({r['labelled']} images) {r['arm']} pre-training "
                             f"{r['verdict']}: {gain_text(r['gain'])} points of test accuracy"
                             + (f" (95 % interval {interval_text(r)})" if r.get("gain_low") is not None else ""))
    if sentences:
        b.append(("p", "In words: " + "; ".join(sentences) + "."))
    b.append(("img", (figure, "Test accuracy against the labelled fraction, mean ± std over seeds")))
    return b


def write_study_report(out: str | Path) -> tuple[Path, Path]:
    out = Path(out)
    content = [("h1", "aepretrain study"), *study_blocks(out)]
    return _write(out, "study", content)


def _write(out: Path, stem: str, content: list[Block]) -> tuple[Path, Path]:
    md, page = out / f"{stem}.md", out / f"{stem}.html"
    md.write_text("\n".join(_md(b, out) for b in content))
    page.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(content[0][1])}</title>"
                    f"<style>{STYLE}</style></head><body>" + "\n".join(_html(b) for b in content) + "</body></html>")
    return md, page


def _md(block: Block, out: Path) -> str:
    kind, value = block
    if kind == "h1":
        return f"# {value}\n"
    if kind == "h2":
        return f"## {value}\n"
    if kind == "p":
        return f"{value}\n"
    if kind == "img":
        path, caption = value
        return f"![{caption}]({path.relative_to(out)})\n\n*{caption}*\n"
    header, rows = value
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


def _html(block: Block) -> str:
    kind, value = block
    if kind in ("h1", "h2"):
        return f"<{kind}>{html.escape(value)}</{kind}>"
    if kind == "p":
        parts = html.escape(value).split("**")
        return "<p>" + "".join(f"<b>{s}</b>" if i % 2 else s for i, s in enumerate(parts)) + "</p>"
    if kind == "img":
        path, caption = value
        data = base64.b64encode(path.read_bytes()).decode() if path.is_file() else ""
        return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'
                f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    header, rows = value
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
         "table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;"
         "text-align:right}th{background:#f3f3f3}img{max-width:100%}figcaption{font-size:12px;color:#666}")


def write_report(out: str | Path) -> tuple[Path, Path]:
    """Figures from metrics.json, then report.md and report.html in ``out``."""
    out = Path(out)
    m, data = finished_metrics(out), _load(out, "data.json")
    fig = out / "figures"
    figures.pretrain_curves(m["pretrain"]["stages"], fig / "pretrain-curves.png")
    figures.finetune_curves(m["finetune"], m.get("target_accuracy"), fig / "finetune-curves.png")
    if m.get("probes"):
        figures.probe_accuracy(m["probes"], fig / "probes.png")
    for arm, r in m["finetune"].items():
        figures.confusion(r["confusion"], data["classes"], f"{arm}: test accuracy {r['test_accuracy']:.4f}",
                          fig / f"confusion-{arm}.png")
    content = blocks(out)
    if (out / "study.json").is_file():
        content += study_blocks(out)
    return _write(out, "report", content)
