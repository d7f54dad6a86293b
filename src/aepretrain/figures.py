"""Figures, as PNG files: sample grid, reconstructions by stage, curves, confusion matrices, predictions.

Each function takes plain arrays or the numbers a run wrote to metrics.json, and a path to write.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

if TYPE_CHECKING:
    from .objectives import Objective


def _show(ax: Any, image: np.ndarray) -> None:
    """HWC uint8 or float in [0, 1]; one channel is shown in gray."""
    ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray" if image.shape[-1] == 1 else None,
              vmin=0, vmax=255 if image.dtype == np.uint8 else 1)
    ax.set_xticks([])
    ax.set_yticks([])


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def sample_grid(images: np.ndarray, labels: np.ndarray, classes: list[str], path: Path, per_class: int = 8) -> Path:
    """One row per class (or one row of unlabelled images)."""
    rows = [(name, np.flatnonzero(labels == k)[:per_class]) for k, name in enumerate(classes)] or \
        [("unlabelled", np.arange(min(per_class, len(images))))]
    fig, axes = plt.subplots(len(rows), per_class, figsize=(per_class * 1.2, len(rows) * 1.3), squeeze=False)
    for r, (name, index) in enumerate(rows):
        for c in range(per_class):
            ax = axes[r][c]
            if c < len(index):
                _show(ax, images[index[c]])
            else:
                ax.axis("off")
        axes[r][0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    return _save(fig, path)


def reconstructions(originals: np.ndarray, stages: list[np.ndarray], path: Path) -> Path:
    """The reference's figure: each original beside its reconstruction by stage 1, 2, ... K (NHWC floats)."""
    n, cols = len(originals), len(stages) + 1
    fig, axes = plt.subplots(n, cols, figsize=(cols * 1.6, n * 1.6), squeeze=False)
    for r in range(n):
        _show(axes[r][0], originals[r])
        for s, recon in enumerate(stages):
            _show(axes[r][s + 1], recon[r])
    for c, title in enumerate(["original"] + [f"autoencoder #{s + 1}" for s in range(len(stages))]):
        axes[0][c].set_title(title, fontsize=8)
    return _save(fig, path)


def pretrain_curves(stages: list[dict[str, Any]], objective: Objective, path: Path) -> Path:
    """Each stage's train and validation loss per epoch, titled and labelled by what ``objective`` trains."""
    fig, axes = plt.subplots(1, len(stages), figsize=(4 * len(stages), 3), squeeze=False)
    network = "autoencoder" if objective.reconstructs else objective.name
    for ax, stage in zip(axes[0], stages):
        epochs = [row["epoch"] for row in stage["history"]]
        for key in ("train_loss", "val_loss"):
            ax.plot(epochs, [row.get(key, np.nan) for row in stage["history"]], marker=".", label=key)
        ax.set_title(f"{network} #{stage['stage']}" if objective.greedy else f"{network}, whole encoder")
        ax.set_xlabel("epoch")
        ax.set_ylabel(objective.loss_name)
        ax.legend(fontsize=8)
    return _save(fig, path)


def finetune_curves(arms: dict[str, dict[str, Any]], target: float | None, path: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for name, arm in arms.items():
        epochs = [row["epoch"] for row in arm["history"]]
        for ax, metric in zip(axes, ("acc", "loss")):
            for split, style in (("train", "--"), ("val", "-")):
                ax.plot(epochs, [row.get(f"{split}_{metric}", np.nan) for row in arm["history"]], style,
                        label=f"{name} {split}")
    if target is not None:
        axes[0].axhline(target, color="gray", lw=0.8, label=f"target {target:.3f}")
    for ax, label in zip(axes, ("accuracy", "cross-entropy")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    return _save(fig, path)


def confusion(matrix: list[list[int]], classes: list[str], title: str, path: Path) -> Path:
    m = np.array(matrix)
    size = max(4, 0.35 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=7)
    ax.set_yticks(range(len(classes)), classes, fontsize=7)
    if len(classes) <= 12:
        for i in range(len(classes)):
            for j in range(len(classes)):
                ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if m[i, j] > m.max() / 2 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    return _save(fig, path)


def predictions(images: np.ndarray, rows: list[dict[str, Any]], path: Path) -> Path:
    fig, axes = plt.subplots(1, len(rows), figsize=(2.6 * len(rows), 3.2), squeeze=False)
    for ax, image, row in zip(axes[0], images, rows):
        _show(ax, image)
        lines = [f"{t['class']}: {t['probability']:.3f}" for t in row["top"]]
        if "true" in row:
            lines.insert(0, f"true: {row['true']}")
        ax.set_title("\n".join(lines), fontsize=7)
    return _save(fig, path)


def probe_accuracy(rows: list[dict[str, Any]], path: Path) -> Path:
    """Test accuracy of the linear and kNN probes by encoder depth, pre-trained against random."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for encoder, colour in (("pretrained", "tab:blue"), ("random", "tab:gray")):
        mine = [r for r in rows if r["encoder"] == encoder]
        depths = [r["depth"] for r in mine]
        ax.plot(depths, [r["linear_test"] for r in mine], "-o", color=colour, label=f"{encoder}, linear")
        ax.plot(depths, [r["knn_test"] for r in mine], "--s", color=colour, label=f"{encoder}, kNN")
    ax.set_xlabel("encoder depth (stage)")
    ax.set_ylabel("test accuracy")
    ax.set_xticks(sorted({r["depth"] for r in rows}))
    ax.legend(fontsize=8)
    return _save(fig, path)


def study_accuracy(summary: list[dict[str, Any]], path: Path) -> Path:
    """Test accuracy (mean and standard deviation over seeds) against the labelled fraction, one line per arm."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for arm in dict.fromkeys(r["arm"] for r in summary):
        rows = sorted((r for r in summary if r["arm"] == arm), key=lambda r: r["fraction"])
        ax.errorbar([r["fraction"] for r in rows], [r["mean"] for r in rows], yerr=[r["std"] for r in rows],
                    marker="o", capsize=3, label=arm)
    ax.set_xscale("log")
    ax.set_xlabel("labelled fraction of train")
    ax.set_ylabel("test accuracy")
    ax.legend(fontsize=8)
    return _save(fig, path)


def study_gain(summary: list[dict[str, Any]], path: Path) -> Path:
    """Each objective's gain over scratch (points of test accuracy, mean over seeds) against the labelled images
    per class, with its paired 95 % interval as a band; zero marked."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.axhline(0, color="gray", lw=1)
    for arm in dict.fromkeys(r["arm"] for r in summary if "gain" in r):
        rows = sorted((r for r in summary if r["arm"] == arm and "gain" in r), key=lambda r: r["labelled_per_class"])
        x = [r["labelled_per_class"] for r in rows]
        line = ax.plot(x, [100 * r["gain"] for r in rows], marker="o", label=arm)[0]
        banded = [r for r in rows if r.get("gain_low") is not None]
        if banded:
            ax.fill_between([r["labelled_per_class"] for r in banded], [100 * r["gain_low"] for r in banded],
                            [100 * r["gain_high"] for r in banded], color=line.get_color(), alpha=0.2)
    ax.set_xscale("log")
    ax.set_xlabel("labelled images per class")
    ax.set_ylabel("gain over scratch (points)")
    ax.legend(fontsize=8)
    return _save(fig, path)
