"""Metrics agree with scikit-learn on hand-made cases; intervals and calibration behave."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import f1_score

from braintumor.evaluation.metrics import bootstrap_interval, classification_report, expected_calibration_error

NAMES = ["glioma", "meningioma", "notumor", "pituitary"]


def _one_hot(predicted: list[int], confidence: float = 0.9) -> np.ndarray:
    probabilities = np.full((len(predicted), 4), (1 - confidence) / 3)
    probabilities[np.arange(len(predicted)), predicted] = confidence
    return probabilities


def test_hand_made_case() -> None:
    truth = np.array([0, 0, 0, 1, 1, 2, 2, 2, 3, 3])
    predicted = [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    report = classification_report(truth, _one_hot(predicted), NAMES, bootstrap=0)
    assert report.accuracy == 0.8 and report.n_errors == 2 and report.n_images == 10
    assert report.confusion_matrix == [[2, 1, 0, 0], [0, 2, 0, 0], [0, 0, 2, 1], [0, 0, 0, 2]]
    assert np.isclose(report.weighted_f1, f1_score(truth, predicted, average="weighted"))
    assert np.isclose(report.macro_f1, f1_score(truth, predicted, average="macro"))
    glioma = report.per_class["glioma"]
    assert (glioma.precision, glioma.support) == (1.0, 3) and np.isclose(glioma.recall, 2 / 3)
    assert np.isclose(report.per_class["meningioma"].precision, 2 / 3)


def test_subset_of_classes_keeps_errors_visible() -> None:
    truth = np.array([0, 0, 0, 0])
    report = classification_report(truth, _one_hot([0, 0, 0, 2]), NAMES, bootstrap=0)
    assert report.labels == ["glioma", "notumor"]
    assert report.confusion_matrix == [[3, 1], [0, 0]]
    assert list(report.per_class) == ["glioma"]
    assert report.accuracy == 0.75


def test_roc_auc_is_one_for_a_perfect_ranking() -> None:
    truth = np.array([0, 1, 2, 3] * 5)
    report = classification_report(truth, _one_hot(truth.tolist()), NAMES, bootstrap=0)
    assert report.macro_roc_auc == 1.0 and report.accuracy == 1.0


def test_bootstrap_interval_brackets_the_estimate() -> None:
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 4, 400)
    predicted = np.where(rng.random(400) < 0.9, truth, (truth + 1) % 4)
    low, high = bootstrap_interval(truth, predicted, "accuracy", 500, seed=1)
    accuracy = (truth == predicted).mean()
    assert low < accuracy < high and 0.02 < high - low < 0.1
    assert bootstrap_interval(truth, predicted, "accuracy", 500, seed=1) == (low, high)


def test_ece_is_zero_when_confidence_equals_accuracy_and_large_when_overconfident() -> None:
    truth = np.zeros(10, dtype=int)
    calibrated = _one_hot([0] * 8 + [1] * 2, confidence=0.8)
    assert np.isclose(expected_calibration_error(truth, calibrated), 0.0)
    overconfident = _one_hot([0] * 5 + [1] * 5, confidence=0.99)
    assert np.isclose(expected_calibration_error(truth, overconfident), 0.49)
