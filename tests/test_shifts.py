"""The shift suite: deterministic, label-preserving appearance changes, and the evaluation that uses them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from braintumor.cli import app
from braintumor.errors import ConfigError
from braintumor.evaluation.evaluate import evaluate_shifts
from braintumor.evaluation.shifts import SHIFTS, apply_shift, resolve_shifts
from braintumor.inference.predict import load_model
from conftest import synthetic_scan, write_tree

REQUIRED = {
    "histogram_swap", "gamma", "gain", "unsharp", "blur", "noise", "jpeg", "downup", "zoomout", "bias_field", "letters",
}


@pytest.fixture(scope="module")
def scans() -> tuple[np.ndarray, np.ndarray]:
    """Eight 64x64 synthetic scans, two per class: the head of each class a different brightness."""
    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(4), 2)
    images = np.stack([np.asarray(synthetic_scan(rng, int(label))) for label in labels])
    brighter = np.clip(images.astype(int) + 25 * labels[:, None, None], 21, 255)
    images = np.where(images > 20, brighter, images).astype(np.uint8)
    return images, labels



def test_the_registry_has_every_required_shift_documented() -> None:
    assert set(SHIFTS) >= REQUIRED
    for name, shift in SHIFTS.items():
        assert shift.name == name and shift.description and "\n" not in shift.description
        assert isinstance(shift.params, dict) and shift.params
        assert shift.function.__doc__


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_each_shift_is_deterministic_changes_pixels_and_keeps_shape_and_labels(
    name: str, scans: tuple[np.ndarray, np.ndarray]
) -> None:
    images, labels = scans
    before_images, before_labels = images.copy(), labels.copy()
    first = apply_shift(name, images, labels, seed=0)
    assert first.shape == images.shape and first.dtype == np.uint8
    assert np.array_equal(first, apply_shift(name, images, labels, seed=0))
    assert not np.array_equal(first, images)
    for k in range(len(images)):  # every single image changes, not only some
        assert not np.array_equal(first[k], images[k]), k
    assert np.array_equal(images, before_images) and np.array_equal(labels, before_labels)
    other = apply_shift(name, images, labels, seed=1)
    assert np.array_equal(first, other) != SHIFTS[name].random


@pytest.mark.parametrize("name", sorted(n for n in REQUIRED if SHIFTS[n].random))
def test_random_shifts_do_not_depend_on_the_batch(name: str, scans: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = scans
    whole = apply_shift(name, images, labels, seed=5)
    part = apply_shift(name, images[3:6], labels[3:6], seed=5, indices=np.arange(3, 6))
    assert np.array_equal(whole[3:6], part)


def test_histogram_swap_moves_the_head_toward_the_next_class(scans: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = scans
    swapped = apply_shift("histogram_swap", images, labels)
    head = images > 20

    def class_mean(pixels: np.ndarray, label: int) -> float:
        chosen = labels == label
        return float(pixels[chosen][head[chosen]].mean())

    for k in range(len(images)):
        own, target = int(labels[k]), (int(labels[k]) + 1) % 4
        before, after = images[k][head[k]].mean(), swapped[k][head[k]].mean()
        assert abs(after - class_mean(images, target)) < abs(before - class_mean(images, target)), k
        assert np.array_equal(swapped[k][~head[k]], images[k][~head[k]])  # background untouched
        assert own != target


def test_histogram_swap_uses_only_the_classes_present(scans: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = scans
    subset = np.isin(labels, [0, 2])  # like the external set: some classes missing
    swapped = apply_shift("histogram_swap", images[subset], labels[subset])
    brighter = swapped[labels[subset] == 0]
    head = images[subset][labels[subset] == 0] > 20
    assert brighter[head].mean() > images[subset][labels[subset] == 0][head].mean() + 30  # class 0 took class 2's look


def test_resolve_shifts() -> None:
    assert resolve_shifts("all") == list(SHIFTS)
    assert resolve_shifts("blur, jpeg,blur") == ["blur", "jpeg"]
    with pytest.raises(ConfigError, match="'blurr'.*valid: all, histogram_swap"):
        resolve_shifts("blurr,jpeg")
    with pytest.raises(ConfigError):
        resolve_shifts("")
    with pytest.raises(ConfigError):
        apply_shift("nope", np.zeros((1, 4, 4), np.uint8), np.zeros(1, int))


@pytest.mark.slow
def test_evaluate_shifts_reports_every_shift_and_writes_the_figures(tmp_path: Path, tiny_weights: Path) -> None:
    root = write_tree(tmp_path / "data", {"glioma": 2, "meningioma": 2, "notumor": 2})
    out = tmp_path / "out"
    report = evaluate_shifts(root, load_model(tiny_weights, device="cpu"), "all", seed=0, out_dir=out,
                             progress=False).to_dict()
    assert report["n_images"] == 6 and report["split"] == "all" and report["seed"] == 0
    assert 0.0 <= report["baseline"]["accuracy"] <= 1.0 and report["baseline"]["flip_rate"] == 0.0
    assert list(report["shifts"]) == list(SHIFTS)
    for entry in report["shifts"].values():
        for key in ("accuracy", "weighted_f1", "flip_rate"):
            assert 0.0 <= entry[key] <= 1.0, key
        assert set(entry["per_class_recall"]) == {"glioma", "meningioma", "notumor"}
        assert entry["description"] and entry["params"]
    assert json.loads((out / "shifts.json").read_text())["shifts"].keys() == report["shifts"].keys()
    for name in ("shifts.png", "shift_examples.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_shift_json_and_unknown_shift(tmp_path: Path, tiny_weights: Path) -> None:
    runner = CliRunner()
    root = write_tree(tmp_path / "data", {"glioma": 2, "pituitary": 2})
    base = ["evaluate", "--data", str(root), "--weights", str(tiny_weights)]
    result = runner.invoke(app, [*base, "--shift", "blur,gain", "--json"])
    assert result.exit_code == 0, result.output
    assert list(json.loads(result.stdout)["shifts"]) == ["blur", "gain"]
    table = runner.invoke(app, [*base, "--shift", "jpeg", "--seed", "3"])
    assert table.exit_code == 0 and "jpeg" in table.stdout and "unshifted" in table.stdout
    bad = runner.invoke(app, [*base, "--shift", "blur,wobble"])
    assert bad.exit_code == 2
    assert bad.stderr.strip().count("\n") == 0 and "wobble" in bad.stderr and "Traceback" not in bad.output
