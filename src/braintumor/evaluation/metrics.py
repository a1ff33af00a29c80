"""Classification metrics, computed with scikit-learn so the numbers match what others report.

``classification_report`` is the one function that turns labels and probabilities into every
figure we publish: accuracy and weighted F1 (the original work's two), macro F1, per-class
precision/recall/F1/support, the confusion matrix, one-vs-rest ROC-AUC, expected calibration
error, and percentile-bootstrap 95% intervals for accuracy and weighted F1.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support, roc_auc_score


def expected_calibration_error(y_true: np.ndarray, probabilities: np.ndarray, bins: int = 15) -> float:
    """Top-label ECE: the support-weighted gap between confidence and accuracy over equal-width bins."""
    if len(y_true) == 0:
        return 0.0
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == y_true
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    error = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            error += mask.mean() * abs(correct[mask].mean() - confidence[mask].mean())
    return float(error)


def bootstrap_interval(
    y_true: np.ndarray, y_pred: np.ndarray, metric: str, n_resamples: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """95% percentile-bootstrap interval of ``metric`` ('accuracy' or 'weighted_f1') over images."""
    rng = np.random.default_rng(seed)
    n = len(y_true)
    if n == 0:
        return (0.0, 0.0)
    values = np.empty(n_resamples)
    for i in range(n_resamples):
        sample = rng.integers(0, n, n)
        t, p = y_true[sample], y_pred[sample]
        values[i] = (t == p).mean() if metric == "accuracy" else f1_score(t, p, average="weighted", zero_division=0)
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def _roc_auc(y_true: np.ndarray, probabilities: np.ndarray, labels: list[int]) -> dict[int, float | None]:
    aucs: dict[int, float | None] = {}
    for label in labels:
        positive = y_true == label
        both_present = 0 < positive.sum() < len(y_true)
        aucs[label] = float(roc_auc_score(positive, probabilities[:, label])) if both_present else None
    return aucs


@dataclass(frozen=True)
class ClassFigures:
    """One class's precision, recall, F1, support and one-vs-rest ROC-AUC (None: not computable)."""

    precision: float
    recall: float
    f1: float
    support: int
    roc_auc: float | None


@dataclass(frozen=True)
class Metrics:
    """Every published figure of labels against probabilities (``classification_report``); the
    bootstrap intervals are None when not computed. ``to_dict`` is the JSON of report.json."""

    n_images: int
    labels: list[str]  # the confusion matrix's rows and columns
    accuracy: float
    weighted_f1: float
    macro_f1: float
    per_class: dict[str, ClassFigures]
    confusion_matrix: list[list[int]]
    n_errors: int
    ece: float
    macro_roc_auc: float | None
    accuracy_ci95: tuple[float, float] | None = None
    weighted_f1_ci95: tuple[float, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        figures = asdict(self)
        for key in ("accuracy_ci95", "weighted_f1_ci95"):
            if figures[key] is None:
                del figures[key]
            else:
                figures[key] = list(figures[key])
        return figures


def classification_report(
    y_true: np.ndarray,
    probabilities: np.ndarray,
    class_names: list[str],
    bootstrap: int = 1000,
    seed: int = 0,
) -> Metrics:
    """Every published figure for true labels (N,) and class probabilities (N, C).

    Classes absent from ``y_true`` (a subset evaluation) are left out of the averages and of
    ``per_class``; they appear in ``labels`` and the confusion matrix only if something was
    predicted as them, so such errors stay visible.
    """
    y_true = np.asarray(y_true, dtype=int)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    y_pred = probabilities.argmax(axis=1) if len(probabilities) else np.zeros(0, dtype=int)
    present = sorted(set(y_true.tolist()))
    # The matrix also has a column (and an empty row) for any class predicted but absent from the truth.
    shown = sorted(set(present) | set(y_pred.tolist()))
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=present, zero_division=0)
    aucs = _roc_auc(y_true, probabilities, present)
    per_class = {
        class_names[label]: ClassFigures(float(precision[i]), float(recall[i]), float(f1[i]), int(support[i]),
                                         aucs[label])
        for i, label in enumerate(present)
    }
    valid_aucs = [a for a in aucs.values() if a is not None]
    intervals = (bootstrap_interval(y_true, y_pred, "accuracy", bootstrap, seed),
                 bootstrap_interval(y_true, y_pred, "weighted_f1", bootstrap, seed)) if bootstrap > 0 else (None, None)
    return Metrics(
        n_images=int(len(y_true)),
        labels=[class_names[label] for label in shown],
        accuracy=float(accuracy_score(y_true, y_pred)) if len(y_true) else 0.0,
        weighted_f1=float(f1_score(y_true, y_pred, labels=present, average="weighted", zero_division=0)),
        macro_f1=float(f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)),
        per_class=per_class,
        confusion_matrix=confusion_matrix(y_true, y_pred, labels=shown).tolist(),
        n_errors=int((y_true != y_pred).sum()),
        ece=expected_calibration_error(y_true, probabilities),
        macro_roc_auc=float(np.mean(valid_aucs)) if valid_aucs else None,
        accuracy_ci95=intervals[0],
        weighted_f1_ci95=intervals[1],
    )
