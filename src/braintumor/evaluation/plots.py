"""PNG figures people would rather look at than read: learning curves and confusion matrices."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot loads)
import numpy as np  # noqa: E402

if TYPE_CHECKING:
    from .metrics import ClassFigures


def plot_learning_curves(history: list[dict[str, Any]], path: Path) -> None:
    """Loss and accuracy per epoch, training and validation, side by side."""
    epochs = [row["epoch"] for row in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    loss_ax.plot(epochs, [r["train_loss"] for r in history], "o-", label="train")
    acc_ax.plot(epochs, [r["train_accuracy"] for r in history], "o-", label="train")
    if any(r["val_loss"] is not None for r in history):
        loss_ax.plot(epochs, [r["val_loss"] for r in history], "o-", label="validation")
        acc_ax.plot(epochs, [r["val_accuracy"] for r in history], "o-", label="validation")
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy", title="Loss")
    acc_ax.set(xlabel="epoch", ylabel="accuracy", title="Accuracy")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_confusion_matrix(matrix: list[list[int]], labels: list[str], path: Path, title: str) -> None:
    """Counts per (true, predicted) cell, with row-normalised shading so rare errors still show."""
    counts = np.asarray(matrix)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(5.5, 4.8))
    ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for (row, col), value in np.ndenumerate(counts):
        ax.text(col, row, str(value), ha="center", va="center", color="white" if shares[row, col] > 0.5 else "black")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_per_class(per_class: dict[str, ClassFigures], path: Path) -> None:
    """Precision, recall and F1 for each class as grouped bars, zoomed to where the bars differ."""
    names = list(per_class)
    metrics = ("precision", "recall", "f1")
    values = np.array([[getattr(per_class[name], m) for m in metrics] for name in names])
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.25
    for offset, metric in enumerate(metrics):
        bars = ax.bar(np.arange(len(names)) + (offset - 1) * width, values[:, offset], width, label=metric)
        ax.bar_label(bars, fmt="%.3f", fontsize=7, rotation=90, padding=2)
    ax.set_xticks(range(len(names)), [f"{n}\n(n={per_class[n].support})" for n in names])
    ax.set_ylim(max(0.0, float(values.min()) - 0.05), 1.01)
    ax.set(ylabel="score", title="Per-class precision, recall and F1")
    ax.legend(loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def contact_sheet(pairs: list[tuple[Path, Path, str]], path: Path, thumb: int = 112) -> None:
    """Rows of image pairs side by side, each captioned, for eyeballing duplicate candidates."""
    from PIL import Image

    fig, axes = plt.subplots(len(pairs), 1, figsize=(4.6, 2.4 * len(pairs)), squeeze=False)
    for axis, (left, right, caption) in zip(axes[:, 0], pairs, strict=True):
        tiles = [np.asarray(Image.open(p).convert("L").resize((thumb, thumb))) for p in (left, right)]
        axis.imshow(np.hstack([tiles[0], np.full((thumb, 6), 255, np.uint8), tiles[1]]), cmap="gray", vmin=0, vmax=255)
        axis.set_title(caption, fontsize=7)
        axis.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)


def plot_reliability(confidence: np.ndarray, correct: np.ndarray, path: Path, bins: int = 15) -> None:
    """Reliability diagram: accuracy against mean confidence per confidence bin, with counts."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    centres, accuracies, counts = [], [], []
    for b in range(bins):
        mask = which == b
        if mask.any():
            centres.append(confidence[mask].mean())
            accuracies.append(correct[mask].mean())
            counts.append(int(mask.sum()))
    fig, ax = plt.subplots(figsize=(5, 4.6))
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.plot(centres, accuracies, "o-", label="model")
    for x, y, n in zip(centres, accuracies, counts, strict=True):
        ax.annotate(str(n), (x, y), textcoords="offset points", xytext=(0, -12), fontsize=7, ha="center")
    ax.set(
        xlabel="confidence",
        ylabel="accuracy",
        title="Reliability (numbers: images per bin)",
        xlim=(0, 1.02),
        ylim=(0, 1.02),
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_shifts(baseline: float, shifts: dict[str, tuple[float, float]], path: Path, title: str) -> None:
    """Accuracy under each appearance shift (``shifts``: name -> (accuracy, flip rate)) as bars,
    the unshifted accuracy as a line, flip rates on top."""
    names = list(shifts)
    accuracies = [shifts[n][0] for n in names]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.75 * len(names) + 2), 4.4))
    colours = ["tab:red" if a < baseline - 0.05 else "tab:blue" for a in accuracies]
    bars = ax.bar(range(len(names)), accuracies, color=colours)
    ax.axhline(baseline, color="black", linestyle="--", linewidth=1)
    for bar, name in zip(bars, names, strict=True):
        accuracy, flip_rate = shifts[name]
        text = f"{accuracy:.3f}\nflip {flip_rate:.1%}"
        ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), textcoords="offset points",
                    xytext=(0, 2), ha="center", va="bottom", fontsize=7,
                    bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 0.5})
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylim(0, 1.12)
    ax.set(ylabel="accuracy")
    ax.set_title(f"{title}\ndashed: unshifted accuracy {baseline:.3f}; red: more than 5 points below it", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_shift_examples(images: dict[str, np.ndarray], path: Path, title: str = "") -> None:
    """One scan under every shift, captioned, four to a row: what each shift does, at a glance."""
    columns = min(4, len(images))
    rows = -(-len(images) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.4 * columns, 2.55 * rows + 0.3), squeeze=False)
    for axis in axes.ravel():
        axis.axis("off")
    for axis, (caption, pixels) in zip(axes.ravel(), images.items(), strict=False):
        axis.imshow(pixels, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        axis.set_title(caption, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
