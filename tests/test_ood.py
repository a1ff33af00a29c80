"""The out-of-distribution guard: a photo is not a brain MRI; the bundled scans are."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from sklearn.datasets import load_sample_image
from typer.testing import CliRunner

from braintumor.cli import app
from braintumor.ood import OODGuard, fit_guard
from braintumor.predict import NOT_BRAIN_MRI, load_model

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
    rejected = [Path(s.path).name for s in scans if s.not_brain_mri]
    # A known false rejection (docs/ood/README.md): a published figure with arrows drawn on the scan.
    assert len(scans) == 12 and rejected == ["Te-meTr_0002.jpg"]


def test_flag_appears_in_predict_json(tmp_path: Path) -> None:
    from PIL import Image

    Image.fromarray(load_sample_image("flower.jpg")).save(tmp_path / "flower.jpg")
    output = CliRunner().invoke(app, ["predict", str(tmp_path / "flower.jpg"), str(EXAMPLES / "notumor"), "--json"])
    objects = json.loads(output.stdout)
    assert objects[0]["not_brain_mri"] is True and objects[0]["label"] == NOT_BRAIN_MRI
    assert len(objects) == 4 and all(o["not_brain_mri"] is False for o in objects[1:])
