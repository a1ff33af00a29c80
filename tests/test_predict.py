"""The Python API and the predict/explain commands: shapes, order, exit codes, agreement."""

from __future__ import annotations

import csv
import json
import shutil
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from braintumor.cli import app
from braintumor.inference.predict import load_model
from braintumor.inference.results import series_result
from conftest import write_dicom

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "scans"
NAMES = ["glioma", "meningioma", "notumor", "pituitary"]
runner = CliRunner()



@pytest.fixture
def mixed_folder(tmp_path: Path) -> Path:
    """Two good images, a DICOM with two frames, an empty file and a text file posing as PNG."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    for index, name in enumerate(("a.jpg", "b.png")):
        Image.fromarray(np.full((40, 40), 60 * (index + 1), dtype=np.uint8)).save(folder / name)
    write_dicom(folder / "c.dcm", np.stack([np.eye(16) * 900, np.ones((16, 16)) * 300]))
    (folder / "d.jpg").write_bytes(b"")
    (folder / "e.png").write_text("I am not a PNG")
    return folder


@pytest.mark.slow
def test_api_accepts_paths_images_and_arrays(tiny_weights: Path, mixed_folder: Path) -> None:
    classifier = load_model(tiny_weights)
    results = classifier.predict(
        [mixed_folder / "a.jpg", Image.open(mixed_folder / "b.png"), np.zeros((20, 30, 3), np.uint8)]
    )
    assert [r.path for r in results] == [str(mixed_folder / "a.jpg"), "<image 1>", "<image 2>"]
    for result in results:
        assert result.label in NAMES and result.error is None
        assert set(result.probabilities) == set(NAMES)
        assert np.isclose(sum(result.probabilities.values()), 1.0, atol=1e-5)
        assert result.confidence == max(result.probabilities.values())


def test_failures_are_reported_in_order_and_the_rest_classified(tiny_weights: Path, mixed_folder: Path) -> None:
    results = load_model(tiny_weights).predict(mixed_folder, batch_size=2)
    names = [Path(r.path).name for r in results]
    assert names == ["a.jpg", "b.png", "c.dcm#frame=0", "c.dcm#frame=1", "d.jpg", "e.png"]
    errors = {Path(r.path).name: r.error for r in results if r.error}
    assert set(errors) == {"d.jpg", "e.png"} and "empty" in errors["d.jpg"]


def test_predict_json_csv_and_exit_code_1(tiny_weights: Path, mixed_folder: Path, tmp_path: Path) -> None:
    csv_path = tmp_path / "out.csv"
    result = runner.invoke(
        app, ["predict", str(mixed_folder), "--weights", str(tiny_weights), "--json", "--csv", str(csv_path)]
    )
    assert result.exit_code == 1
    everything = json.loads(result.stdout)
    objects = [o for o in everything if o.get("kind") != "series"]  # one per slice, then the series
    assert len(objects) == 6 and [o["path"] for o in everything[6:]] == [str(mixed_folder / "c.dcm")]
    good = [o for o in objects if "error" not in o]
    assert len(good) == 4 and all({"path", "label", "confidence", "probabilities"} <= set(o) for o in good)
    rows = list(csv.DictReader(csv_path.open()))
    assert [r["path"] for r in rows] == [o["path"] for o in objects]
    assert rows[4]["error"] and not rows[0]["error"]


def test_api_and_command_line_agree(tiny_weights: Path) -> None:
    result = runner.invoke(app, ["predict", str(EXAMPLES), "--weights", str(tiny_weights), "--json"])
    assert result.exit_code == 0
    from_cli = {o["path"]: o for o in json.loads(result.stdout)}
    from_api = load_model(tiny_weights).predict(EXAMPLES)
    assert len(from_api) == len(from_cli) == 12
    for prediction in from_api:
        other = from_cli[prediction.path]
        assert other["label"] == prediction.label
        assert np.allclose(list(other["probabilities"].values()), list(prediction.probabilities.values()), atol=1e-6)


def test_usage_errors_exit_2(tiny_weights: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert runner.invoke(app, ["predict", str(tmp_path / "empty"), "--weights", str(tiny_weights)]).exit_code == 2
    missing_weights = ["predict", str(EXAMPLES), "--weights", str(tmp_path / "none.safetensors")]
    assert runner.invoke(app, missing_weights).exit_code == 2
    bad_method = ["explain", str(EXAMPLES), "--out", str(tmp_path / "o"), "--method", "magic"]
    assert runner.invoke(app, bad_method).exit_code == 2


def test_nifti_volume_has_slice_results_and_a_summary(tiny_weights: Path, tmp_path: Path) -> None:
    volume = np.random.default_rng(0).random((24, 24, 6)).astype(np.float32)
    path = tmp_path / "head.nii.gz"
    nib.save(nib.Nifti1Image(volume, np.eye(4)), path)
    result = runner.invoke(app, ["predict", str(path), "--weights", str(tiny_weights), "--json"])
    objects = json.loads(result.stdout)
    slices = [o for o in objects if o.get("kind") != "series"]
    [summary] = [o for o in objects if o.get("kind") == "series"]
    assert [o["index"] for o in slices] == list(range(6))
    assert summary["summary"]["n_slices"] == 6 and summary["reason"]
    assert summary["label"] in (*NAMES, "not_brain_mri", "indeterminate")
    assert sum(len(v["slices"]) for v in summary["summary"]["classes"].values()) == 6


def _series(*labels: str, uncertain: tuple[int, ...] = (), refused: tuple[int, ...] = ()) -> list:
    from braintumor.inference.predict import Prediction

    return [
        Prediction(f"v.nii#slice={k}", "not_brain_mri" if k in refused else label, 0.99, index=k, volume=True,
                   uncertain=k in uncertain, not_brain_mri=k in refused, outside_validated_range=False)
        for k, label in enumerate(labels)
    ]


@pytest.mark.parametrize(
    ("slices", "label", "reason"),
    [
        (_series("notumor", "glioma", "glioma", "notumor"), "glioma", "glioma on 2 adjacent confident slices (1, 2)"),
        (_series("notumor", "glioma", "notumor", "glioma"), "indeterminate", "without a confident neighbour (1, 3)"),
        (_series("notumor", "glioma", "glioma", uncertain=(2,)), "indeterminate", "without a confident neighbour (1)"),
        (_series("notumor", "notumor", "notumor"), "notumor", "no tumour on 3 of 3 slices"),
        (_series("notumor", "notumor", "notumor", refused=(0, 1)), "not_brain_mri", "2 of 3 slices are not brain MRI"),
        (_series("notumor", "notumor", "glioma", uncertain=(0, 1, 2)), "indeterminate", "too few confident slices"),
        (_series("meningioma", "meningioma", "glioma", "glioma", "glioma"), "glioma", "glioma on 3 adjacent"),
    ],
)
def test_a_series_verdict_never_says_more_than_its_slices(slices: list, label: str, reason: str) -> None:
    summary = series_result(slices).summary()
    assert summary["label"] == label and reason in summary["reason"]


def test_an_all_refused_volume_is_not_called_notumor() -> None:
    summary = series_result(_series(*["notumor"] * 25, refused=tuple(range(25)))).summary()
    assert summary["label"] == "not_brain_mri" and summary["refused"] == 25


@pytest.mark.slow
def test_memory_stays_flat_as_the_number_of_files_grows(tiny_weights: Path, tmp_path: Path) -> None:
    source = EXAMPLES / "glioma" / "Te-gl_0010.jpg"
    folder = tmp_path / "many"
    folder.mkdir()
    for index in range(600):
        shutil.copy(source, folder / f"{index:04d}.jpg")
    classifier = load_model(tiny_weights)

    def peak(count: int) -> int:
        tracemalloc.start()
        seen = sum(1 for _ in classifier.predict_iter(sorted(folder.iterdir())[:count], batch_size=16))
        assert seen == count
        _, high = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return high

    small, large = peak(60), peak(600)
    assert large < 2 * small + 1_000_000, (small, large)


def test_explain_writes_pngs_with_image_sized_non_constant_maps(tmp_path: Path) -> None:
    classifier = load_model()
    explanations = classifier.explain(
        sorted((EXAMPLES / "meningioma").iterdir())[:2] + [np.zeros((300, 200), np.uint8) + 5]
    )
    for explanation in explanations:
        assert explanation.heatmap.shape == explanation.pixels.shape
        assert explanation.heatmap.min() >= 0.0 and explanation.heatmap.max() <= 1.0
    assert explanations[2].heatmap.shape == (300, 200)
    assert all(e.heatmap.std() > 0.05 for e in explanations[:2])
    result = runner.invoke(
        app, ["explain", str(EXAMPLES / "pituitary"), "--out", str(tmp_path / "maps"), "--target", "glioma"]
    )
    assert result.exit_code == 0, result.output
    pngs = sorted((tmp_path / "maps").glob("*.png"))
    assert len(pngs) == 3 and all(Image.open(p).size[0] > 400 for p in pngs)


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "eigencam"])
def test_every_method_gives_a_map(method: str) -> None:
    [explanation] = load_model().explain(EXAMPLES / "glioma" / "Te-gl_0010.jpg", method=method)
    assert explanation.heatmap.shape == (224, 224) and explanation.heatmap.std() > 0.01


def test_tta_averages_a_scan_with_its_mirror(tiny_weights: Path) -> None:
    rng = np.random.default_rng(4)
    scan = (rng.random((32, 32)) * 255).astype(np.uint8)
    plain, tta = load_model(tiny_weights), load_model(tiny_weights, tta=True)
    expected = (plain.predict_pixels(scan[None]) + plain.predict_pixels(scan[None, :, ::-1].copy())) / 2
    assert np.allclose(tta.predict_pixels(scan[None]), expected, atol=1e-6)
    assert np.allclose(tta.predict_pixels(scan[None]), tta.predict_pixels(scan[None, :, ::-1].copy()), atol=1e-6)
