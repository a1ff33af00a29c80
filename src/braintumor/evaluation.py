"""``evaluate(data, classifier)``: every published figure for a labelled folder, plus its PNGs.

On a Kaggle layout the official ``Testing/`` split is evaluated; on a plain class-folder root,
everything in it. Unreadable images are reported and skipped, and their count is part of the report.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from .cache import load_cached
from .data import is_kaggle_layout, resolve_split_dir, scan_class_folders
from .metrics import classification_report
from .plots import plot_confusion_matrix, plot_per_class, plot_reliability
from .predict import Classifier, default_weights_path

logger = logging.getLogger(__name__)


def evaluate(
    data: str | Path,
    classifier: Classifier,
    out_dir: Path | None = None,
    batch_size: int = 64,
    bootstrap: int = 1000,
    cache_dir: Path | None = None,
    progress: bool = True,
    leak_free: bool = True,
) -> dict[str, Any]:
    """Classify every labelled image under ``data`` and report the metrics (see ``metrics``).

    On a Kaggle layout with ``leak_free`` on, the report also holds ``leak_free``: the same figures
    on the Testing images that have no exact or near duplicate in Training (see ``audit``), which
    measure skill on new scans rather than memory of copies.

    Raises:
        DataError: missing root, no images, or an unknown class folder.
    """
    data = Path(data)
    split_dir = resolve_split_dir(data, "Testing")
    samples = scan_class_folders(split_dir, tuple(classifier.class_names))
    decoded = load_cached([s.path for s in samples], classifier.image_size, cache_dir, progress=progress)
    for line in decoded.errors:
        logger.warning("skipped %s", line)
    keep = np.flatnonzero(decoded.ok)
    labels = np.array([samples[i].label for i in keep], dtype=int)
    probabilities, rejected = classifier.infer(decoded.pixels[keep], batch_size=batch_size, progress=progress)
    report = classification_report(labels, probabilities, classifier.class_names, bootstrap=bootstrap)
    if rejected is not None:
        # Metrics above score the tumour class regardless; this counts real scans the guard would refuse.
        report["rejected_as_not_brain_mri"] = {"n": int(rejected.sum()), "rate": float(rejected.mean()) if len(rejected) else 0.0}
    if classifier.uncertainty_threshold is not None:
        report["uncertainty"] = uncertainty_summary(probabilities, labels, classifier.uncertainty_threshold)
    if leak_free and is_kaggle_layout(data):
        from .audit import training_twins

        kept_paths = [samples[i].path for i in keep]
        clean = ~training_twins(data, kept_paths, np.asarray(decoded.pixels)[keep])
        report["leak_free"] = classification_report(labels[clean], probabilities[clean], classifier.class_names, bootstrap=bootstrap)
        report["leak_free"]["definition"] = "Testing images with no byte-identical or perceptual-hash (<= 4 bits) twin in Training"
        if classifier.uncertainty_threshold is not None:
            report["leak_free"]["uncertainty"] = uncertainty_summary(probabilities[clean], labels[clean], classifier.uncertainty_threshold)
    report.update({
        "data": str(split_dir),
        "split": "Testing" if is_kaggle_layout(data) else "all",
        "weights": "shipped model" if classifier.weights_path == default_weights_path() else str(classifier.weights_path),
        "tta": classifier.tta,
        "n_skipped": len(decoded.errors),
        "skipped": decoded.errors,
    })
    if out_dir is not None:
        write_outputs(out_dir, report, [samples[i].path for i in keep], labels, probabilities, classifier.class_names)
    return report


def uncertainty_summary(probabilities: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, Any]:
    """How many scans the refer-to-a-radiologist flag catches, and the accuracy on the rest."""
    confident = probabilities.max(axis=1) >= threshold
    correct = probabilities.argmax(axis=1) == labels
    return {
        "threshold": threshold,
        "n_flagged": int((~confident).sum()),
        "coverage": float(confident.mean()) if len(labels) else 0.0,
        "accuracy_unflagged": float(correct[confident].mean()) if confident.any() else None,
        "errors_flagged": int((~correct & ~confident).sum()),
        "errors_unflagged": int((~correct & confident).sum()),
    }


def write_outputs(
    out_dir: Path,
    report: dict[str, Any],
    paths: list[Path],
    labels: np.ndarray,
    probabilities: np.ndarray,
    class_names: list[str],
) -> None:
    """report.json, predictions.csv, confusion_matrix.png, per_class.png and reliability.png."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    with open(out_dir / "predictions.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "true", "predicted", "confidence", *class_names])
        for path, label, row in zip(paths, labels, probabilities):
            writer.writerow([path, class_names[label], class_names[int(row.argmax())], f"{row.max():.6f}", *(f"{p:.6f}" for p in row)])
    title = f"{report['split']} split: accuracy {report['accuracy']:.4f} (n={report['n_images']})"
    plot_confusion_matrix(report["confusion_matrix"], report["labels"], out_dir / "confusion_matrix.png", title)
    plot_per_class(report["per_class"], out_dir / "per_class.png")
    plot_reliability(probabilities.max(axis=1), probabilities.argmax(axis=1) == labels, out_dir / "reliability.png")
