"""Temperature scaling, the uncertainty threshold, and the flag in the API and JSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from braintumor.cli import app
from braintumor.evaluation.calibration import choose_threshold, coverage_curve, fit_temperature
from braintumor.evaluation.metrics import expected_calibration_error
from braintumor.inference.predict import default_weights_path, load_model
from braintumor.models.checkpoint import read_metadata

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "scans"


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(1, keepdims=True))
    return shifted / shifted.sum(1, keepdims=True)


def test_temperature_scaling_lowers_ece_of_an_overconfident_model() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 1.5, (4000, 4))
    # Labels drawn from softmax(logits): those logits are calibrated by construction.
    labels = np.array([rng.choice(4, p=p) for p in _softmax(logits)])
    overconfident = logits * 4.0  # the same ranking, four times too sure
    temperature = fit_temperature(overconfident, labels)
    assert 3.0 < temperature < 5.0
    before = expected_calibration_error(labels, _softmax(overconfident))
    after = expected_calibration_error(labels, _softmax(overconfident / temperature))
    assert after < before / 3 and after < 0.03
    assert (_softmax(overconfident / temperature).argmax(1) == overconfident.argmax(1)).all()


def test_coverage_curve_and_threshold_on_a_hand_made_case() -> None:
    confidence = np.array([0.3, 0.5, 0.6, 0.9, 0.95])
    correct = np.array([False, False, True, True, True])
    curve = coverage_curve(confidence, correct)
    assert np.allclose(curve["coverage"], [1.0, 0.8, 0.6, 0.4, 0.2])
    assert np.allclose(curve["accuracy"], [0.6, 0.75, 1.0, 1.0, 1.0])
    assert choose_threshold(confidence, correct, 0.99) == 0.6
    assert choose_threshold(confidence[:2], correct[:2], 0.99) == 1.0


def test_shipped_model_carries_calibration_and_flags_predictions() -> None:
    metadata = read_metadata(default_weights_path())
    assert metadata["temperature"] > 0 and 0.25 < metadata["uncertainty_threshold"] < 1.0
    classifier = load_model()
    results = classifier.predict(EXAMPLES)
    assert all(isinstance(r.uncertain, bool) for r in results)
    assert all(r.uncertain == (r.confidence < metadata["uncertainty_threshold"]) for r in results)
    output = CliRunner().invoke(app, ["predict", str(EXAMPLES / "glioma"), "--json"])
    assert all(isinstance(o["uncertain"], bool) for o in json.loads(output.stdout))
