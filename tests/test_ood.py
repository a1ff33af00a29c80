"""The out-of-distribution guard: a photo is not a brain MRI; the bundled scans are."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_sample_image
from typer.testing import CliRunner

from braintumor.cli import app
from braintumor.inference.predict import NOT_BRAIN_MRI, load_model
from braintumor.models.ood import OODGuard, fit_guard

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "scans"


def test_guard_rejects_points_off_the_training_subspace() -> None:
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.normal(size=(40, 40)))[0][:5]  # training features live in 5 dimensions
    train = rng.normal(size=(500, 5)) @ basis + 3.0
    val = rng.normal(size=(100, 5)) @ basis + 3.0
    guard = fit_guard(train, val, percentile=99.0)
    outside = rng.normal(size=(20, 40)) * 3.0
    assert guard.rejects(outside).all()
    assert guard.rejects(val).mean() <= 0.02
    restored = OODGuard.from_tensors(guard.to_tensors())
    assert np.allclose(restored.score(outside), guard.score(outside), atol=1e-4)


def test_shipped_guard_rejects_a_photo_and_accepts_the_bundled_scans() -> None:
    classifier = load_model()
    assert classifier.guard is not None
    [photo] = classifier.predict(load_sample_image("china.jpg"))
    assert photo.not_brain_mri is True and photo.label == NOT_BRAIN_MRI
    scans = classifier.predict(EXAMPLES)
    assert len(scans) == 12 and not any(s.not_brain_mri for s in scans)
    assert all(s.label == Path(s.path).parent.name for s in scans)
    [camera] = classifier.predict(EXAMPLES.parent / "not-mri" / "camera.png")  # the demo's refusal
    assert camera.not_brain_mri is True and "out-of-distribution" in camera.not_brain_mri_reason


def test_flag_appears_in_predict_json(tmp_path: Path) -> None:
    from PIL import Image

    Image.fromarray(load_sample_image("flower.jpg")).save(tmp_path / "flower.jpg")
    output = CliRunner().invoke(app, ["predict", str(tmp_path / "flower.jpg"), str(EXAMPLES / "notumor"), "--json"])
    objects = json.loads(output.stdout)
    assert objects[0]["not_brain_mri"] is True and objects[0]["label"] == NOT_BRAIN_MRI
    # The features alone pass this photo since the refusal threshold was fitted on shifted real
    # scans (docs/ood/README.md); the colour rule refuses it, and says so.
    assert "colour picture" in objects[0]["not_brain_mri_reason"]
    assert objects[0]["outside_validated_range"] is False  # refused, so not classified at all
    assert len(objects) == 4 and all(o["not_brain_mri"] is False for o in objects[1:])


def _tinted(scan: Path, tint: tuple[float, float, float] = (1.0, 0.55, 0.2)) -> tuple[np.ndarray, np.ndarray]:
    """A scan painted in colour, and the grey picture the network would see of it."""
    from PIL import Image

    grey = np.asarray(Image.open(scan).convert("L"), dtype=np.float32)
    rgb = np.clip(np.stack([grey * t for t in tint], axis=2), 0, 255).astype(np.uint8)
    return rgb, np.asarray(Image.fromarray(rgb).convert("L"))


def test_colour_pictures_are_refused_though_their_grey_version_passes(tmp_path: Path) -> None:
    """The network only sees grey, so the guard's features cannot tell a coloured picture of a
    scan from the scan; the colour rule can, from files and from arrays alike."""
    from PIL import Image

    classifier = load_model()
    rgb, grey = _tinted(EXAMPLES / "notumor" / "Te-no_0105.jpg")
    Image.fromarray(rgb).save(tmp_path / "tinted.png")
    Image.fromarray(grey).save(tmp_path / "grey.png")
    from_array, grey_array = classifier.predict([rgb, grey])
    from_file, grey_file = classifier.predict([tmp_path / "tinted.png", tmp_path / "grey.png"])
    assert grey_array.not_brain_mri is False and grey_file.not_brain_mri is False
    assert from_array.label == from_file.label == NOT_BRAIN_MRI
    assert from_file.not_brain_mri_reason == "a colour picture (MRI slices are grey)"
    assert grey_file.not_brain_mri_reason is None and "not_brain_mri_reason" not in grey_file.to_dict()
    # the classifier's view is unchanged (to float rounding, which may differ by batch position)
    assert from_array.probabilities == pytest.approx(grey_array.probabilities, abs=1e-6)


def test_colour_rule_spares_every_bundled_scan_and_catches_a_fundus_photo() -> None:
    """scikit-image's retina.jpg (a colour fundus photograph) passes the feature guard alone."""
    from PIL import Image

    from braintumor.data.imaging import colour_share
    from braintumor.models.ood import COLOUR_LIMIT

    skimage = pytest.importorskip("skimage")
    shares = [colour_share(np.asarray(Image.open(p).convert("RGB"))) for p in sorted(EXAMPLES.rglob("*.jpg"))]
    assert len(shares) == 12 and max(shares) < COLOUR_LIMIT / 2
    retina = np.asarray(Image.open(Path(skimage.__file__).parent / "data" / "retina.jpg").convert("RGB"))
    [prediction] = load_model().predict(retina)
    assert colour_share(retina) > COLOUR_LIMIT and prediction.label == NOT_BRAIN_MRI


def test_dicom_header_refusals_say_what_the_header_says() -> None:
    from pydicom.dataset import Dataset

    from braintumor.data.medical import dicom_refusal

    def header(**tags: object) -> Dataset:
        dataset = Dataset()
        dataset.Rows = dataset.Columns = 256
        for key, value in tags.items():
            setattr(dataset, key, value)
        return dataset

    assert dicom_refusal(header()) is None  # a missing tag refuses nothing
    assert dicom_refusal(header(Modality="MR", BodyPartExamined="BRAIN", PixelSpacing=[0.9, 0.9])) is None
    assert dicom_refusal(header(Modality="OT", BodyPartExamined="Head")) is None
    assert dicom_refusal(header(Modality="CT")) == "not MRI: its DICOM header says modality CT"
    assert "body part ABDOMEN" in dicom_refusal(header(Modality="MR", BodyPartExamined="ABDOMEN"))
    assert "20 x 20 mm" in dicom_refusal(header(Modality="MR", PixelSpacing=[0.078125, 0.078125]))
    assert dicom_refusal(header(Modality="MR", PixelSpacing=[0.5])) is None  # malformed: one value, not two


def test_pydicom_sample_files_that_are_not_brain_mri_are_refused_by_their_headers() -> None:
    """A chest CT, a 2 cm crop of a head MR that the features alone would pass as a meningioma,
    and every frame of an ultrasound cine loop, of which the features alone pass a third."""
    from pydicom.data import get_testdata_file

    files = {name: get_testdata_file(name) for name in ("CT_small.dcm", "MR_small.dcm", "examples_ybr_color.dcm")}
    predictions = load_model().predict(list(files.values()))
    by_file: dict[str, list] = {}
    for prediction in predictions:
        by_file.setdefault(Path(prediction.path.split("#")[0]).name, []).append(prediction)
    assert all(p.label == NOT_BRAIN_MRI for ps in by_file.values() for p in ps)
    assert "modality CT" in by_file["CT_small.dcm"][0].not_brain_mri_reason
    assert "field of view" in by_file["MR_small.dcm"][0].not_brain_mri_reason
    assert len(by_file["examples_ybr_color.dcm"]) > 10
    assert all("modality US" in p.not_brain_mri_reason for p in by_file["examples_ybr_color.dcm"])
