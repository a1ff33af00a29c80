"""Two distinct flags: 'not a brain MRI slice' (refused) and 'outside the validated range'
(classified, but flagged), through Python, the CLI, the HTTP API and ONNX; silent wrong answers."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from braintumor.cli import app
from braintumor.evaluation.evaluate import answer_summary, evaluate
from braintumor.inference.predict import default_weights_path, load_model
from braintumor.inference.results import Prediction
from braintumor.models.checkpoint import load_weights, save_weights
from braintumor.models.ood import OODGuard, split_guard
from braintumor.serving.app import create_app
from conftest import EXAMPLES, local_client

SCANS = sorted(EXAMPLES.glob("*/*.jpg"))


def test_guard_band_lies_between_the_two_thresholds_and_survives_storage() -> None:
    rng = np.random.default_rng(0)
    train = rng.normal(size=(400, 8)) @ np.diag([5, 4, 3, 2, 0.01, 0.01, 0.01, 0.01]) + 10
    guard = OODGuard(train.mean(0), np.eye(8)[:4], threshold=0.5, range_threshold=0.1)
    scores = np.array([0.05, 0.3, 0.9])
    features = np.zeros((3, 8))
    guard.score = lambda _: scores  # type: ignore[method-assign]
    assert guard.rejects(features).tolist() == [False, False, True]
    assert guard.outside_range(features).tolist() == [False, True, False]  # refused is not "outside": it is refused
    restored = OODGuard.from_tensors(guard.to_tensors())
    assert restored.range_threshold == pytest.approx(0.1) and restored.threshold == pytest.approx(0.5)
    old = {k: v for k, v in guard.to_tensors().items() if not k.endswith("range_threshold")}
    assert OODGuard.from_tensors(old).range_threshold is None


@pytest.fixture(scope="module")
def banded_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped weights with the guard's band widened so the bundled scans fall inside it:
    real scans, accepted, but flagged outside the validated range."""
    tensors, metadata = load_weights(default_weights_path())
    state, guard = split_guard(tensors)
    assert guard is not None
    scores = guard.score(load_model(device="cpu").logits_and_features(_pixels())[1])
    banded = OODGuard(
        guard.mean, guard.components, threshold=float(scores.max()) + 0.05, range_threshold=float(scores.min()) - 0.01
    )
    path = tmp_path_factory.mktemp("banded") / "banded.safetensors"
    save_weights(state | banded.to_tensors(), path, metadata)
    return path


def _pixels() -> np.ndarray:
    from braintumor.data.imaging import decode_image, resize_grey

    return np.stack([resize_grey(decode_image(p), 224) for p in SCANS])


@pytest.mark.slow
def test_a_scan_in_the_band_is_classified_and_flagged_with_the_reason(banded_weights: Path) -> None:
    for backend in ("torch", "onnx"):
        results = load_model(banded_weights, device="cpu", backend=backend).predict(SCANS)
        assert all(r.outside_validated_range is True and r.not_brain_mri is False for r in results), backend
        assert all(r.label in ("glioma", "meningioma", "notumor", "pituitary") for r in results)
        assert "unlike the scans the model was validated on" in results[0].outside_validated_range_reason
        as_json = results[0].to_dict()
        assert as_json["outside_validated_range"] is True and as_json["not_brain_mri"] is False


def test_a_photo_is_refused_not_flagged(banded_weights: Path) -> None:
    from sklearn.datasets import load_sample_images

    photo = load_sample_images().images[0]
    [result] = load_model(banded_weights, device="cpu").predict(photo)
    assert result.not_brain_mri is True and result.outside_validated_range is False
    assert result.slice_kind is None  # no sequence or plane is claimed for what is not a scan


def test_the_flag_reaches_the_cli_table_csv_and_api(banded_weights: Path, tmp_path: Path) -> None:
    csv_file = tmp_path / "out.csv"
    result = CliRunner().invoke(
        app, ["predict", str(SCANS[0]), "--weights", str(banded_weights), "--csv", str(csv_file)]
    )
    assert result.exit_code == 0, result.output
    assert "OUTSIDE THE VALIDATED RANGE" in result.output
    [row] = list(csv.DictReader(csv_file.open()))
    assert row["outside_validated_range"] == "true" and "feature distance" in row["outside_validated_range_reason"]
    client = local_client(create_app(load_model(banded_weights, device="cpu")))
    response = client.post("/v1/predict", files=[("files", (SCANS[0].name, SCANS[0].read_bytes(), "image/jpeg"))])
    [answer] = response.json()
    assert answer["outside_validated_range"] is True and "outside_validated_range_reason" in answer
    explained = client.post(
        "/v1/explain?format=json", files={"file": (SCANS[0].name, SCANS[0].read_bytes(), "image/jpeg")}
    )
    assert explained.json()["prediction"]["outside_validated_range"] is True


def test_the_shipped_json_always_carries_both_flags() -> None:
    [result] = load_model(device="cpu").predict(SCANS[0])
    keys = json.loads(json.dumps(result.to_dict()))
    assert "not_brain_mri" in keys and "outside_validated_range" in keys


def _told(label: str, confidence: float, **flags: object) -> Prediction:
    other = 1 - confidence
    probabilities = {"a": confidence, "b": other} if label == "a" else {"a": other, "b": confidence}
    return Prediction("x.png", label, confidence, probabilities, **flags)


def test_silent_wrong_answers_are_wrong_and_unflagged() -> None:
    predictions = [
        _told("not_brain_mri", 0.9, not_brain_mri=True, uncertain=False),
        _told("a", 0.9, outside_validated_range=True, outside_validated_range_reason="feature distance"),
        _told("a", 0.55, uncertain=True),
        _told("a", 0.9, uncertain=False),
        _told("b", 0.9, uncertain=False),
    ]
    predictions[0].probabilities = {"a": 0.9, "b": 0.1}
    summary = answer_summary(predictions, np.array([1, 1, 1, 1, 1]))
    # 0: refused; 1: flagged outside range; 2: uncertain; 3: wrong and silent; 4: right
    assert summary.refused_not_brain_mri.n == 1
    assert summary.flagged_outside_validated_range.n == 1 and summary.flagged_outside_coverage.n == 0
    assert summary.flagged_uncertain.n == 1
    assert summary.silent_wrong.n == 1 and summary.silent_wrong_ignoring_range.n == 2
    assert summary.accuracy_of_unflagged == pytest.approx(0.5)


def test_evaluation_counts_the_flags_predict_shows(tmp_path: Path) -> None:
    """A colour picture in a labelled folder is refused by the evaluation as predict refuses it:
    the evaluation's answers come from the same code (Classifier.answers)."""
    grey = np.asarray(Image.open(SCANS[0]).convert("L"), dtype=np.float64)
    (tmp_path / "glioma").mkdir()
    tinted = tmp_path / "glioma" / "tinted.png"
    Image.fromarray(np.stack([grey, grey * 0.55, grey * 0.2], axis=2).astype(np.uint8)).save(tinted)
    for scan in SCANS[:3]:
        (tmp_path / "glioma" / scan.name).write_bytes(scan.read_bytes())
    classifier = load_model(device="cpu")
    report = evaluate(tmp_path, classifier, bootstrap=0, progress=False).to_dict()
    told = {p.path: p for p in classifier.predict(sorted((tmp_path / "glioma").iterdir()))}
    assert told[str(tinted)].not_brain_mri
    assert report["answers"]["refused_not_brain_mri"]["n"] == sum(bool(p.not_brain_mri) for p in told.values())
    uncertain = sum(bool(p.uncertain) and not p.not_brain_mri for p in told.values())
    assert report["answers"]["flagged_uncertain"]["n"] == uncertain
