"""The duplicate audit finds planted copies across splits and leaves distinct images alone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance
from typer.testing import CliRunner

from braintumor.cli import app
from braintumor.evaluation.audit import audit, write_report
from conftest import synthetic_scan


def _planted_tree(root: Path) -> Path:
    rng = np.random.default_rng(11)
    train = root / "Training" / "glioma"
    test = root / "Testing" / "glioma"
    train.mkdir(parents=True)
    test.mkdir(parents=True)
    originals = [synthetic_scan(rng, 0, size=224) for _ in range(8)]
    for index, image in enumerate(originals):
        image.save(train / f"tr{index}.png")
    shutil.copy(train / "tr0.png", test / "exact.png")
    originals[1].save(test / "reencoded.jpg", quality=70)
    originals[2].resize((400, 400)).save(test / "resized.png")
    ImageEnhance.Brightness(originals[3]).enhance(1.25).save(test / "brighter.png")
    originals[4].transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(test / "mirrored.png")
    for index in range(3):
        synthetic_scan(rng, 0, size=224).save(test / f"distinct{index}.png")
    return root


def test_audit_finds_every_planted_copy_and_no_distinct_image(tmp_path: Path) -> None:
    root = _planted_tree(tmp_path / "data")
    report = audit(root, progress=False)
    assert report["exact"]["groups"] == 1 and report["exact"]["testing_files_with_training_twin"] == 1
    assert report["near"]["testing_files_with_training_near_twin"] == 5
    leak_free = sorted(Path(p).name for p in report["leak_free_testing"]["paths"])
    assert leak_free == ["distinct0.png", "distinct1.png", "distinct2.png"]
    assert report["near"]["label_conflict_pairs"] == []


@pytest.mark.slow
def test_audit_command_writes_the_report(tmp_path: Path) -> None:
    root = _planted_tree(tmp_path / "data")
    result = CliRunner().invoke(app, ["audit", str(root), "--out", str(tmp_path / "audit")])
    assert result.exit_code == 0, result.output
    out = tmp_path / "audit"
    assert json.loads((out / "audit.json").read_text())["leak_free_testing"]["n_images"] == 3
    leak_free = (out / "leak_free_testing.txt").read_text().splitlines()
    assert leak_free == [f"Testing/glioma/distinct{i}.png" for i in range(3)]
    assert (out / "pairs_exact.png").is_file() and "Leak-free" in (out / "audit.md").read_text()


@pytest.mark.slow
def test_label_conflicts_are_reported(tmp_path: Path) -> None:
    root = _planted_tree(tmp_path / "data")
    (root / "Training" / "meningioma").mkdir()
    shutil.copy(root / "Training" / "glioma" / "tr5.png", root / "Training" / "meningioma" / "same.png")
    report = audit(root, progress=False)
    assert len(report["exact"]["label_conflict_groups"]) == 1
    write_report(report, tmp_path / "out", root)


@pytest.mark.slow
def test_evaluate_leak_free_subset_matches_the_audit(tmp_path: Path) -> None:
    import torch

    from braintumor.evaluation.evaluate import evaluate
    from braintumor.inference.predict import load_model
    from braintumor.models.checkpoint import save_weights
    from braintumor.models.registry import build_efficientnet_b0

    root = _planted_tree(tmp_path / "data")
    weights = tmp_path / "w.safetensors"
    torch.manual_seed(0)
    save_weights(
        build_efficientnet_b0().state_dict(),
        weights,
        {"class_names": ["glioma", "meningioma", "notumor", "pituitary"], "image_size": 32},
    )
    report = evaluate(root, load_model(weights), bootstrap=0, progress=False).to_dict()
    assert report["n_images"] == 8 and report["leak_free"]["n_images"] == 3
