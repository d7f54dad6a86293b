"""The report: what the run shows first, then every table and figure; the lab report's numbers beside ours
where the run did its task (:func:`reference.same_task`), in a section of their own where it did another.

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
from .fileio import first_line, printable
from .config import PretrainConfig
from .models import summary
from .objectives import objective_of
from .output import duration
from .probe import KNN_K
from .reference import REFERENCE, SETUP, same_task
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


def percent(value: float | None) -> str:
    """An accuracy for people.

    >>> percent(0.89562), percent(None)
    ('89.56 %', 'n/a')
    """
    return "n/a" if value is None else f"{value * 100:.2f} %"


def epochs_text(count: int) -> str:
    return f"{count} epoch{'' if count == 1 else 's'}"


def target_text(m: dict[str, Any]) -> str:
    """The target validation accuracy of epochs to target, said in full:
    "95 % of the scratch arm's best validation accuracy (23.75 %)"."""
    return f"{m['target_rule']} ({percent(m['target_accuracy'])})"


def reached_text(arm: dict[str, Any], m: dict[str, Any]) -> str:
    """Whether and when an arm reached the target, e.g. "reached 95 % of ... (23.75 %) in 3 epochs"."""
    if arm["epochs_to_target"] is None:
        return f"did not reach {target_text(m)} in its {epochs_text(arm['epochs'])}"
    return f"reached {target_text(m)} in {epochs_text(arm['epochs_to_target'])}"


NO_VERDICT = "one seed gives no verdict: `aepretrain study` measures the gain over seeds with a 95 % interval"


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
    """The report, section by section, from the files of a finished run folder. The lab report's numbers stand
    beside ours only where the run did its task; otherwise in a section of their own at the end."""
    cfg = _load(out, "config.yaml")
    data, m = _load(out, "data.json"), finished_metrics(out)
    fig = out / "figures"
    d = m["dataset"]
    classifier = summary(cfg.model, d["image_size"], d["channels"], len(d["classes"]))["classifier"]
    beside = same_task(cfg.model, d)
    return [("h1", f"aepretrain report: preset {m['preset']}"), *_conclusions(m, beside), *_settings(cfg, m),
            *_data(m, data, fig), *_models(classifier, beside), *_pretraining(m, fig, beside), *_probes(m, fig),
            *_finetuning(m, fig, beside), *_prediction(m, fig, beside), *([] if beside else _lab(classifier, d))]


def _conclusions(m: dict[str, Any], beside: bool) -> list[Block]:
    """The first paragraph: what this run shows, and what one run cannot."""
    arms, said = m["finetune"], []
    if m["smoke"]:
        said.append("**A smoke run** (a few batches): its numbers mean nothing")
    said.append("Test accuracy: " + ", ".join(f"{arm} **{percent(r['test_accuracy'])}**" for arm, r in arms.items())
                + (f", a gap of {(arms['pretrained']['test_accuracy'] - arms['scratch']['test_accuracy']) * 100:+.2f} "
                   "points (pre-trained minus scratch)" if {"pretrained", "scratch"} <= arms.keys() else ""))
    said.append(f"Epochs to the target, {target_text(m)}: "
                + ", ".join(f"{arm} {_to_target(r)}" for arm, r in arms.items()))
    if m.get("probes"):
        best = {e: max((r for r in m["probes"] if r["encoder"] == e), key=lambda r: r["linear_test"])
                for e in ("pretrained", "random")}
        said.append(f"A linear probe of the frozen features does best at depth {best['pretrained']['depth']} of the "
                    f"pre-trained encoder ({percent(best['pretrained']['linear_test'])} test accuracy), against "
                    f"{percent(best['random']['linear_test'])} at depth {best['random']['depth']} of the random one")
    said.append(NO_VERDICT[0].upper() + NO_VERDICT[1:])
    said.append("This run did the lab report's task (Oxford-IIIT Pet, 37 breeds, 224x224, its network): the lab's "
                "numbers stand beside ours in the tables" if beside else
                "The lab report that this project reproduces did another task: its numbers are in the last section, "
                "for orientation, not comparable with ours")
    return [("h2", "What this run shows"), ("p", ". ".join(said) + ".")]


def _to_target(arm: dict[str, Any]) -> str:
    n = arm["epochs_to_target"]
    return f"not reached in {epochs_text(arm['epochs'])}" if n is None else epochs_text(n)


def _augmentation(a: Any) -> str:
    done = [f"rotation up to ±{a.rotation:g}°"] if a.rotation else []
    done += [f"zoom ±{a.zoom:.0%}"] if a.zoom else []
    done += [f"brightness x{a.brightness[0]:g} to x{a.brightness[1]:g}"] if list(a.brightness) != [1, 1] else []
    done += ["horizontal flip"] if a.hflip else []
    return ", ".join(done) or "none"


def _settings(cfg: Any, m: dict[str, Any]) -> list[Block]:
    d, f, p = m["dataset"], cfg.finetune, cfg.pretrain
    precision = "fp32" if m["precision"] == "32" else m["precision"]
    stopping = ("off" if f.early_stopping_patience is None else
                f"after {epochs_text(f.early_stopping_patience)} without a better validation accuracy")
    return [("h2", "Settings"),
            ("p", f"Data set **{d['name']}** ({len(d['classes']):,} classes, {d['image_size']}x{d['image_size']}x"
                  f"{d['channels']}), seed {m['seed']}, precision {precision}. Pre-training ({p.objective}): Adam lr "
                  f"{objective_of(p).learning_rate:g}, {epochs_text(p.epochs)} per stage, batch {p.batch_size}, "
                  f"schedule {p.schedule}. Fine-tuning: "
                  f"Adam lr {f.lr:g}, up to {epochs_text(f.epochs)}, batch {f.batch_size}, schedule {f.schedule}, "
                  f"early stopping {stopping}. Augmentation: {_augmentation(cfg.augment)}. First-convolution "
                  f"stride: classifier {cfg.model.classifier_stride}, autoencoders {cfg.model.autoencoder_stride}.")]


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


def _models(clf: dict[str, Any], beside: bool) -> list[Block]:
    lab = REFERENCE["classifier_layers"] if beside else []
    rows = [[layer["name"], layer["type"], str(tuple(layer["output_shape"] or ())), layer["params"], *lab[i:i + 1]]
            for i, layer in enumerate(clf["layers"])]
    rows.append(["total", "", "", clf["total"], *([REFERENCE["classifier_total"]] if beside else [])])
    return [("h2", "2. Models"),
            ("p", "The classifier (BatchNorm counted as 4 x C parameters, its moving statistics non-trainable, as "
                  "the lab report counts them):"),
            _table(["layer", "type", "output (H, W, C)", "params", *(["params (lab report)"] if beside else [])],
                   rows)]


def _params(counts: Any) -> str:
    return "{:,} / {:,} / {:,}".format(*counts)


def _pretraining(m: dict[str, Any], fig: Path, beside: bool) -> list[Block]:
    rows = []
    for stage in m["pretrain"]["stages"]:
        prm = stage["params"]
        ours = [f"#{stage['stage']}", _params((prm["total"], prm["trainable"], prm["non_trainable"])),
                stage["epochs"], duration(stage["seconds"]), stage["train_loss"], stage["val_loss"],
                _seen(stage["history"])]
        lab = REFERENCE["stages"][stage["stage"] - 1] if stage["stage"] <= len(REFERENCE["stages"]) else None
        if beside:
            ours += [_params(lab["params"]), duration(lab["seconds"]), lab["train_loss"]] if lab else ["", "", ""]
        rows.append(ours)
    pre = m["pretrain"]
    reconstructs = pre["test_mse"] is not None  # a contrastive objective has its own loss and no reconstructions
    loss = "MSE" if reconstructs else "loss"
    header = ["stage", "params total / trainable / non-trainable", "epochs", "time", f"train {loss}", f"val {loss}",
              "images trained on per epoch"]
    lab_header = ["params (lab report)", "time (lab report, 30 epochs)", "train MSE (lab report)"]
    mse = (f" Test reconstruction MSE of the last stage: {_fmt(pre['test_mse'])}" + (
        f" (lab report: {_fmt(REFERENCE['test_mse'])})" if beside else "") + ".") if reconstructs else ""
    return [("h2", "3. Greedy layer-wise pre-training"),
            ("p", f"Objective **{pre.get('objective', 'greedy')}**; pre-training data: {pre.get('data', 'n/a')} "
                  f"({_fmt(pre.get('images'))} images).{mse}"),
            _table(header + (lab_header if beside else []), rows),
            *([("img", (fig / "reconstructions.png", "Test images and their reconstructions by each stage"))]
              if reconstructs else []),
            ("img", (fig / "pretrain-curves.png", "Pre-training losses per epoch"))]


def _probes(m: dict[str, Any], fig: Path) -> list[Block]:
    if not m.get("probes"):
        return []
    return [("h2", "3b. Probes: the frozen features at each depth, before fine-tuning"),
            ("p", f"A linear classifier (logistic regression, L-BFGS) and a {KNN_K}-nearest-neighbour vote "
                  "(cosine) on the global-average-pooled output of block k, fitted on the labelled train split; "
                  "the random encoder has the same shape and no training. Accuracies:"),
            _table(["encoder", "depth", "features", "linear val", "linear test", "kNN val", "kNN test"],
                   [[r["encoder"], r["depth"], r["features"], *map(percent, (r["linear_val"], r["linear_test"],
                                                                             r["knn_val"], r["knn_test"]))]
                    for r in m["probes"]]),
            ("img", (fig / "probes.png", "Probe test accuracy by depth, pre-trained against random"))]


def _finetuning(m: dict[str, Any], fig: Path, beside: bool) -> list[Block]:
    rows = []
    for arm, r in m["finetune"].items():
        ours = [arm, r["test_loss"], percent(r["test_accuracy"]), percent(r["best_val_accuracy"]), r["best_epoch"],
                r["epochs"], r["epochs_to_target"] or "not reached", duration(r["seconds"]), _seen(r["history"])]
        lab = REFERENCE.get(arm)
        if beside:
            ours += [lab["test_loss"], percent(lab["test_accuracy"]), lab["epochs"]] if lab else ["", "", ""]
        rows.append(ours)
    arms = list(m["finetune"])
    lab_note = (" The lab report's epochs (66 from scratch, 34 pre-trained) are the epochs it trained, not epochs to "
                "a target." if beside else "")
    return [("h2", "4. Fine-tuning: pre-trained against from scratch"),
            ("p", f"The target for epochs to target: {target_text(m)}; both arms are measured the same way: the "
                  f"first epoch whose validation accuracy reaches it.{lab_note}"),
            _table(["arm", "test loss", "test accuracy", "best val accuracy", "best epoch", "epochs run",
                    "epochs to target", "time", "images trained on per epoch",
                    *(["test loss (lab report)", "test accuracy (lab report)", "epochs trained (lab report)"]
                      if beside else [])], rows),
            ("img", (fig / "finetune-curves.png", "Accuracy and loss per epoch, both arms")),
            _table(["class", *[f"{a} accuracy" for a in arms]],
                   [[c, *[percent(m["finetune"][a]["per_class_accuracy"][c]) for a in arms]]
                    for c in m["dataset"]["classes"]]),
            *[("img", (fig / f"confusion-{arm}.png", f"Confusion matrix on the test split, {arm} arm")) for arm in arms]]


def _lab_prediction(k: int) -> list[str]:
    return [f"{c} {p:.6g}" for c, p in REFERENCE["prediction"]][:k]


def _prediction(m: dict[str, Any], fig: Path, beside: bool) -> list[Block]:
    predictions = m.get("predictions", [])
    rows = [[Path(r["image"]).name, r["true"], *[f"{t['class']} {t['probability']:.6g}" for t in r["top"]]]
            for r in predictions]
    k = max((len(r["top"]) for r in predictions), default=3)
    if beside:
        rows.append(["lab report: a Bombay cat", "Bombay", *_lab_prediction(k)])
    return [("h2", "5. Prediction"), _table(["image", "true", *[f"top {i + 1}" for i in range(k)]], rows),
            ("img", (fig / "predictions.png", "Test images with their top classes"))]


def _lab(clf: dict[str, Any], d: dict[str, Any]) -> list[Block]:
    """The lab report's numbers on their own, labelled with its task, where this run did another."""
    stages = [[f"#{k}", _params(s["params"]), duration(s["seconds"]), s["train_loss"]]
              for k, s in enumerate(REFERENCE["stages"], 1)]
    arms = [[arm, REFERENCE[arm]["test_loss"], percent(REFERENCE[arm]["test_accuracy"]), REFERENCE[arm]["epochs"]]
            for arm in ("pretrained", "scratch")]
    return [("h2", "The lab report (for orientation, not comparable)"),
            ("p", f"The reference this project reproduces is a lab report: {SETUP}. This run did another task ({d['name']}, "
                  f"{len(d['classes']):,} classes, {d['image_size']}x{d['image_size']}, a classifier of "
                  f"{clf['total']:,} parameters), so the lab's numbers show what the method gave there, not what "
                  f"this run should give. Its test reconstruction MSE: {_fmt(REFERENCE['test_mse'])}; its prediction "
                  f"for a Bombay cat: {', '.join(_lab_prediction(3))}."),
            _table(["lab report stage", "params total / trainable / non-trainable", "time (30 epochs)", "train MSE"],
                   stages),
            _table(["lab report arm", "test loss", "test accuracy", "epochs trained"], arms)]


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
    b += _verdicts(summary, out / "figures" / "study-gain.png")
    b.append(("h3", "Every arm"))
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


def per_class_text(count: float | None) -> str:
    """Labelled images per class for people: whole numbers with separators, a fraction only below 10.

    >>> per_class_text(5400.0), per_class_text(1080.0), per_class_text(10.8), per_class_text(2.5), per_class_text(None)
    ('5,400', '1,080', '11', '2.5', '')
    """
    if not count:
        return ""
    return f"{count:,.0f}" if count >= 10 else f"{count:.2g}"


def steps_text(row: dict[str, Any]) -> str:
    if not row.get("reached"):
        return "not reached" if "reached" in row else ""
    interval = "" if row.get("steps_low") is None else f" [{row['steps_low']:+.0f}, {row['steps_high']:+.0f}]"
    return f"{row['steps_difference']:+.0f}{interval} ({row['reached']} of {row['seeds']} seeds)"


def _verdicts(summary: list[dict[str, Any]], figure_path: Path) -> list[Block]:
    """The answer first: one row per labelled fraction and objective, and the gain against labels per class."""
    rows = [r for r in summary if "gain" in r]
    if not rows:
        return []
    figure = figures.study_gain(summary, figure_path)
    return [("h3", "Verdicts"),
            _table(["labelled per class", "unlabelled : labelled", "objective", "gain (points)",
                    "95 % interval (points)", "verdict", "pre-training time", "steps to target vs scratch [95 %]"],
                   [[per_class_text(r.get("labelled_per_class")),
                     f"{r['ratio']:.3g} : 1" if r.get("ratio") else "", r["arm"], gain_text(r["gain"]),
                     interval_text(r), r["verdict"], duration(r.get("pretrain_seconds")), steps_text(r)]
                    for r in rows]),
            ("img", (figure, "Gain over scratch against labelled images per class (log scale): mean over seeds, "
                             "band: paired 95 % interval"))]


def write_study_report(out: str | Path) -> tuple[Path, Path]:
    out = Path(out)
    content = [("h1", "aepretrain study"), *study_blocks(out)]
    return _write(out, "study", content)


def _write(out: Path, stem: str, content: list[Block]) -> tuple[Path, Path]:
    md, page = out / f"{stem}.md", out / f"{stem}.html"
    md.write_text("\n".join(_md(b, out) for b in content))
    page.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>{_html_text(content[0][1])}</title>"
                    f"<style>{STYLE}</style></head><body>" + "\n".join(_html(b) for b in content) + "</body></html>")
    return md, page


MARKDOWN_MARKS = str.maketrans({c: "\\" + c for c in "\\|*_`[]"})


def _md_text(text: str) -> str:
    """Text that Markdown shows as it is: on one line, with no HTML, table cell, link or emphasis of its own (class
    and file names are the user's)."""
    return html.escape(printable(text), quote=False).translate(MARKDOWN_MARKS)


def _html_text(text: str) -> str:
    return html.escape(printable(text))


def _md(block: Block, out: Path) -> str:
    kind, value = block
    if kind == "h1":
        return f"# {_md_text(value)}\n"
    if kind in ("h2", "h3"):
        return f"{'#' * int(kind[1])} {_md_text(value)}\n"
    if kind == "p":  # ** marks bold, ` marks code; the text between is shown as it is
        return "**".join("`".join(_md_text(text) if i % 2 == 0 else printable(text)
                                  for i, text in enumerate(part.split("`")))
                         for part in value.split("**")) + "\n"
    if kind == "img":
        path, caption = value
        return f"![{_md_text(caption)}]({path.relative_to(out)})\n\n*{_md_text(caption)}*\n"
    header, rows = value
    lines = ["| " + " | ".join(map(_md_text, header)) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(_md_text, row)) + " |" for row in rows]) + "\n"


def _html(block: Block) -> str:
    kind, value = block
    if kind in ("h1", "h2", "h3"):
        return f"<{kind}>{_html_text(value)}</{kind}>"
    if kind == "p":
        parts = _html_text(value).split("**")
        text = "".join(f"<b>{s}</b>" if i % 2 else s for i, s in enumerate(parts))
        return "<p>" + "".join(f"<code>{s}</code>" if i % 2 else s for i, s in enumerate(text.split("`"))) + "</p>"
    if kind == "img":
        path, caption = value
        data = base64.b64encode(path.read_bytes()).decode() if path.is_file() else ""
        return (f'<figure><img src="data:image/png;base64,{data}" alt="{_html_text(caption)}">'
                f"<figcaption>{_html_text(caption)}</figcaption></figure>")
    header, rows = value
    head = "".join(f"<th>{_html_text(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_html_text(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
         "table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;"
         "text-align:right}th{background:#f3f3f3}img{max-width:100%}figcaption{font-size:12px;color:#666}")


def write_report(out: str | Path) -> tuple[Path, Path]:
    """Figures from metrics.json, then report.md and report.html in ``out``."""
    out = Path(out)
    m, data = finished_metrics(out), _load(out, "data.json")
    fig = out / "figures"
    objective = objective_of(PretrainConfig(objective=m["pretrain"].get("objective", "greedy")))
    figures.pretrain_curves(m["pretrain"]["stages"], objective, fig / "pretrain-curves.png")
    figures.finetune_curves(m["finetune"], m.get("target_accuracy"), fig / "finetune-curves.png")
    if m.get("probes"):
        figures.probe_accuracy(m["probes"], fig / "probes.png")
    for arm, r in m["finetune"].items():
        figures.confusion(r["confusion"], data["classes"], f"{arm}: test accuracy {percent(r['test_accuracy'])}",
                          fig / f"confusion-{arm}.png")
    content = blocks(out)
    if (out / "study.json").is_file():
        content += study_blocks(out)
    return _write(out, "report", content)
