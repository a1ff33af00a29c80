"""Sequence and plane of every slice, and the coverage reason of the outside-the-validated-range flag:
the estimator on labelled features, header before image, the coverage table's round trip through
safetensors and ONNX metadata, and a T2 slice's reason in every output."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from braintumor.cli import app
from braintumor.inference.predict import load_model
from braintumor.inference.results import Prediction, series_result
from braintumor.models.checkpoint import save_weights
from braintumor.models.registry import build_efficientnet_b0
from braintumor.models.slice_kind import (
    PLANES,
    SEQUENCES,
    Coverage,
    SliceKind,
    SliceKindEstimator,
    coverage_reason,
    fit_estimator,
)
from conftest import EXAMPLES, local_client

NAMES = ["glioma", "meningioma", "notumor", "pituitary"]
SCAN = EXAMPLES / "notumor" / "Te-no_0105.jpg"


def _labelled(n: int = 40, seed: int = 0) -> tuple[np.ndarray, list[str], list[str]]:
    """Features in which sequence and plane are each one direction, with noise."""
    rng = np.random.default_rng(seed)
    sequences = [SEQUENCES[k % 4] for k in range(n)]  # no 'other' among the labels
    planes = [PLANES[k % 3] for k in range(n)]
    features = rng.normal(0, 0.3, (n, 16))
    for row, (sequence, plane) in enumerate(zip(sequences, planes, strict=True)):
        features[row, SEQUENCES.index(sequence)] += 2.0
        features[row, 8 + PLANES.index(plane)] += 2.0
    return features, sequences, planes


def test_the_estimator_learns_sequence_and_plane_and_survives_storage() -> None:
    features, sequences, planes = _labelled()
    estimator = fit_estimator(features, sequences, planes)
    test, true_sequences, true_planes = _labelled(24, seed=1)
    kinds = estimator.estimate(test)
    assert [k.sequence for k in kinds] == true_sequences and [k.plane for k in kinds] == true_planes
    assert all(k.sequence_origin == k.plane_origin == "image" and 0.25 < k.sequence_confidence <= 1 for k in kinds)
    assert "other" not in {k.sequence for k in estimator.estimate(np.random.default_rng(2).normal(0, 3, (50, 16)))}
    again = SliceKindEstimator.from_tensors(estimator.to_tensors())
    assert np.allclose(again.probabilities(test)[0], estimator.probabilities(test)[0], atol=1e-5)
    assert SliceKindEstimator.from_tensors({}) is None


def test_the_header_beats_the_image() -> None:
    image = SliceKind("t1c", 0.9, "image", "coronal", 0.7, "image")
    assert image.with_header("axial", "T2") == SliceKind("t2", None, "header", "axial", None, "header")
    assert image.with_header("oblique", "unknown") == image  # what the estimator has no word for stays the image's
    assert image.with_header(None, "DWI").sequence == "other"
    assert image.label() == "contrast T1 coronal?"


def _coverage() -> Coverage:
    """Kaggle's shape: every tumour contrast T1 in three planes; normal slices T1, T2, FLAIR, axial."""
    kinds, labels = [], []
    for name in ("glioma", "meningioma", "pituitary"):
        for plane in PLANES:
            kinds += [SliceKind("t1c", 1.0, "image", plane, 1.0, "image")] * 40
            labels += [name] * 40
    for sequence in ("t1", "t2", "flair"):
        kinds += [SliceKind(sequence, 1.0, "image", "axial", 1.0, "image")] * 40
        labels += ["notumor"] * 40
    return Coverage.count(kinds, labels, NAMES)


def test_coverage_reasons_say_what_the_training_data_lacks() -> None:
    coverage = _coverage()
    assert Coverage.from_metadata(json.loads(json.dumps(coverage.to_metadata()))) == coverage
    t2 = SliceKind("t2", 0.95, "image", "axial", 0.99, "image")
    assert coverage_reason(t2, "notumor", coverage) == (
        "T2 slice: no tumour in the training data is T2; a T2 tumour may be read as notumor")
    assert "no glioma in the training data is T2" in coverage_reason(t2, "glioma", coverage)
    assert coverage_reason(SliceKind("t1c", 0.9, "image", "coronal", 0.9, "image"), "glioma", coverage) is None
    coronal = coverage_reason(SliceKind("t1c", 0.9, "image", "coronal", 0.9, "image"), "notumor", coverage)
    assert coronal is None  # tumours are covered in coronal contrast T1: a missed one would be known
    assert coverage.of("sequence", "notumor", "t2") == 40 and coverage.tumours("plane", "axial") == 120
    with pytest.raises(ValueError, match="coverage must be counts"):
        Coverage.from_metadata({"cells": 3})


def test_a_few_slices_read_into_a_cell_by_mistake_do_not_cover_it() -> None:
    """40 of 1,040 gliomas estimated plain T1 (the estimator's confusions) is not plain-T1 coverage."""
    kinds = [SliceKind("t1c", 1.0, "image", "axial", 1.0, "image")] * 1000
    kinds += [SliceKind("t1", 0.6, "image", "axial", 1.0, "image")] * 40
    coverage = Coverage.count(kinds, ["glioma"] * 1040, NAMES)
    reason = coverage_reason(SliceKind("t1", 0.9, "image", "axial", 0.9, "image"), "glioma", coverage)
    assert reason == ("plain T1 slice: only 40 of 1040 glioma slices in the training data are plain T1; "
                      "a glioma answer on a plain T1 slice is not validated")


@pytest.fixture(scope="module")
def t2_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny untrained B0 whose estimator reads every slice as an axial T2, with Kaggle's coverage."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("kind") / "t2.safetensors"
    estimator = fit_estimator(*_labelled())
    estimator.mean, estimator.scale = np.zeros(1280), np.ones(1280)
    for head, value, values in ((estimator.sequence, "t2", SEQUENCES), (estimator.plane, "axial", PLANES)):
        head.weight = np.zeros((len(values), 1280))
        head.bias = np.where(np.array(values) == value, 5.0, 0.0)
    tensors = build_efficientnet_b0().state_dict() | estimator.to_tensors()
    save_weights(tensors, path, {"class_names": NAMES, "image_size": 32, "coverage": _coverage().to_metadata()})
    return path


@pytest.mark.slow
def test_the_coverage_table_and_estimator_travel_in_safetensors_and_onnx(t2_weights: Path) -> None:
    for backend in ("torch", "onnx"):
        classifier = load_model(t2_weights, device="cpu", backend=backend)
        assert classifier.spec.coverage == _coverage(), backend
        [kind] = [p.slice_kind for p in classifier.predict([SCAN])]
        assert (kind.sequence, kind.plane, kind.sequence_origin) == ("t2", "axial", "image"), backend


def test_a_t2_slice_gets_the_coverage_reason_in_every_output(t2_weights: Path, tmp_path: Path) -> None:
    csv_file = tmp_path / "out.csv"
    args = ["predict", str(SCAN), "--weights", str(t2_weights)]
    table = CliRunner().invoke(app, [*args, "--csv", str(csv_file)])
    assert table.exit_code == 0, table.output
    assert "[T2 axial]" in table.output and "T2 slice: no " in table.output
    [row] = list(csv.DictReader(csv_file.open()))
    assert (row["sequence"], row["plane"], row["sequence_origin"]) == ("t2", "axial", "image")
    answered_notumor = row["label"] == "notumor"
    assert row["outside_validated_range"] == "true" and "T2 slice" in row["outside_validated_range_reason"]
    [answer] = json.loads(CliRunner().invoke(app, [*args, "--json"]).stdout)
    assert answer["slice_kind"]["sequence"] == "t2" and "T2 slice" in answer["outside_validated_range_reason"]
    client = local_client(__import__("braintumor.serving.app", fromlist=["create_app"]).create_app(
        load_model(t2_weights, device="cpu")))
    [served] = client.post("/v1/predict", files=[("files", (SCAN.name, SCAN.read_bytes(), "image/jpeg"))]).json()
    assert served["slice_kind"] == answer["slice_kind"] and served["outside_validated_range"] is True
    assert client.get("/v1/model").json()["coverage"]["cells"]["glioma"]["t1c"]["axial"] == 40
    assert ("tumour may be read as notumor" in served["outside_validated_range_reason"]) == answered_notumor


def test_a_series_without_a_header_sequence_is_described_by_its_estimates() -> None:
    kind = SliceKind("t2", 0.9, "image", "coronal", 0.9, "image")
    slices = [Prediction(f"s{k}.png", "notumor", 0.99, slice_kind=kind) for k in range(3)]
    summary = series_result(slices).summary()
    assert (summary["sequence"], summary["sequence_from"]) == ("T2", "image estimate")
    assert (summary["plane"], summary["plane_from"]) == ("coronal", "image estimate")
    assert summary["label"] == "indeterminate"  # notumor on T2: the model has never seen a T2 tumour


@pytest.mark.slow
def test_the_shipped_model_reads_the_bundled_t2_slice_as_t2_and_says_so() -> None:
    """Te-no_0292 is an axial T2 slice (bright CSF; read by eye): its notumor answer comes with the
    coverage reason, and the contrast-T1 gliomas beside it with none."""
    classifier = load_model(device="cpu")
    assert classifier.spec.slice_kind is not None and classifier.spec.coverage is not None
    [t2] = classifier.predict([EXAMPLES / "notumor" / "Te-no_0292.jpg"])
    assert (t2.slice_kind.sequence, t2.slice_kind.plane, t2.label) == ("t2", "axial", "notumor")
    assert t2.outside_validated_range and "a T2 tumour may be read as notumor" in t2.outside_validated_range_reason
    gliomas = [EXAMPLES / "glioma" / "Te-glTr_0006.jpg", EXAMPLES / "glioma" / "Te-gl_0010.jpg"]
    for glioma in classifier.predict(gliomas):
        assert glioma.slice_kind.sequence == "t1c" and not glioma.outside_validated_range


def test_a_plain_t1_guessed_from_tr_and_te_does_not_overrule_the_image() -> None:
    """A header whose T1 comes from TR and TE alone (no contrast tag is common after contrast)
    leaves the image's contrast-T1 reading; a T1 its description names, and its plane, win."""
    from types import SimpleNamespace

    from braintumor.inference.predict import Assessment, Classifier

    image = SliceKind("t1c", 0.9, "image", "axial", 0.9, "image")
    assessment = Assessment(np.zeros((1, 4)), kinds=[image])

    def item(source: str) -> SimpleNamespace:
        ref = SimpleNamespace(plane="coronal", sequence="T1", sequence_source=source)
        return SimpleNamespace(dicom=ref, volume=False)

    guessed = Classifier._slice_kind(item("acquisition tags"), assessment, 0)
    assert (guessed.sequence, guessed.sequence_origin, guessed.plane) == ("t1c", "image", "coronal")
    named = Classifier._slice_kind(item("SeriesDescription"), assessment, 0)
    assert (named.sequence, named.sequence_origin) == ("t1", "header")


@pytest.mark.parametrize(("damage", "message"), [
    ("tensor", "slice_kind tensor plane_bias must be finite with shape (3,)"),
    ("classes", "coverage classes"),
])
def test_a_damaged_estimator_or_coverage_is_one_clear_error(t2_weights: Path, tmp_path: Path,
                                                            damage: str, message: str) -> None:
    from braintumor.errors import CheckpointError
    from braintumor.models.checkpoint import load_weights

    tensors, metadata = load_weights(t2_weights)
    if damage == "tensor":
        tensors["slice_kind.plane_bias"] = torch.zeros(4)
    else:
        metadata["coverage"] = Coverage.count([], [], ["glioma", "notumor"]).to_metadata()
    broken = tmp_path / "broken.safetensors"
    save_weights(tensors, broken, metadata)
    with pytest.raises(CheckpointError, match=re.escape(message)) as caught:
        load_model(broken, device="cpu")
    assert str(broken) in str(caught.value) and "\n" not in str(caught.value)
