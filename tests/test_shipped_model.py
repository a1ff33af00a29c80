"""The model that ships in the package: its metadata always, its accuracy when the data is at hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from braintumor.evaluation.evaluate import evaluate
from braintumor.inference.predict import default_weights_path, load_model
from braintumor.models.checkpoint import read_metadata

pytestmark = pytest.mark.slow  # subprocesses, servers or the real data: minutes of CPU in all

COMMITTED_REPORT = Path(__file__).resolve().parents[1] / "docs" / "evaluation" / "testing" / "report.json"


def test_shipped_weights_carry_their_metadata() -> None:
    metadata = read_metadata(default_weights_path())
    assert metadata["class_names"] == ["glioma", "meningioma", "notumor", "pituitary"]
    assert metadata["image_size"] == 224 and metadata["model"] == "efficientnet_b0"
    assert metadata["training_data"]["fingerprint"] and metadata["recipe"]["augment_policy"] == "robust_light"
    assert metadata["standardise"] == "head" and metadata["smoothing"] == 1.0
    assert metadata["test_metrics"]["accuracy"] == json.loads(COMMITTED_REPORT.read_text())["accuracy"]


def test_shipped_model_reproduces_its_published_figures_on_the_testing_split(real_data: Path) -> None:
    """The numbers in MODEL_CARD.md come from docs/evaluation/testing/report.json; the shipped model
    must reproduce them (within one image) on the official split and on the leak-free subset.
    The project's bar is 0.99 on the official split; the shipped model, chosen for other hospitals'
    scans, does not reach it (0.9786, see MODEL_CARD.md), so this guards against regressions."""
    published = json.loads(COMMITTED_REPORT.read_text())
    report = evaluate(real_data, load_model(), bootstrap=0, progress=False).to_dict()
    assert report["split"] == "Testing" and report["n_images"] == 1311 and report["n_skipped"] == 0
    assert abs(report["accuracy"] - published["accuracy"]) <= 1 / 1311
    assert abs(report["leak_free"]["accuracy"] - published["leak_free"]["accuracy"]) <= 1 / 230
    assert report["leak_free"]["n_images"] == published["leak_free"]["n_images"] == 230
    assert report["accuracy"] >= 0.975 and report["leak_free"]["accuracy"] >= 0.95


PMRAM_REPORT = Path(__file__).resolve().parents[1] / "docs" / "generalisation" / "shipped" / "pmram" / "report.json"


def test_shipped_model_reproduces_its_external_figures(real_data: Path) -> None:
    """The external set beside the Kaggle set (../shared/data/pmram-external in CI): the published
    accuracy, refusals and silent wrong answers (docs/generalisation/README.md) within one image."""
    external = real_data.parent / "pmram-external"
    if not external.is_dir():
        pytest.skip(f"{external} is not here")
    published = json.loads(PMRAM_REPORT.read_text())
    report = evaluate(external, load_model(), bootstrap=0, progress=False).to_dict()
    assert report["n_images"] == published["n_images"] == 626
    assert abs(report["accuracy"] - published["accuracy"]) <= 1 / 626
    answers, expected = report["answers"], published["answers"]
    for key in ("refused_not_brain_mri", "flagged_outside_validated_range", "silent_wrong"):
        assert abs(answers[key]["n"] - expected[key]["n"]) <= 1, key
    assert answers["silent_wrong"]["rate"] <= 0.005 and answers["refused_not_brain_mri"]["rate"] <= 0.01
