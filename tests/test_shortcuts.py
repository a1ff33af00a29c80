"""The shortcut audit: cues move the right way, a planted brightness shortcut is found, none is invented."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter
from typer.testing import CliRunner

from braintumor.cli import app
from braintumor.data.datasets import load_split
from braintumor.evaluation.shortcuts import (
    jpeg_quality,
    pixel_cues,
    shortcut_audit,
    summary_lines,
    write_shortcut_report,
)

SIZE = 64


def _head(rng: np.random.Generator, brightness: float = 1.0, size: int = SIZE) -> np.ndarray:
    """A grey ellipse 'head' with random blobs on a black, slightly noisy background."""
    yy, xx = np.mgrid[:size, :size]
    centre = size / 2 + rng.normal(0, 1, 2)
    inside = ((yy - centre[0]) / (0.40 * size)) ** 2 + ((xx - centre[1]) / (0.33 * size)) ** 2 < 1
    image = np.where(inside, 90 + rng.normal(0, 12, (size, size)), rng.integers(0, 6, (size, size)))
    for _ in range(4):
        y, x = rng.integers(size // 4, 3 * size // 4, 2)
        blob = (yy - y) ** 2 + (xx - x) ** 2 < rng.integers(9, 36)
        image = np.where(blob & inside, rng.uniform(50, 160), image)
    image = np.where(inside, image * brightness, image)
    return np.clip(image, 0, 255).astype(np.uint8)


def _write(folder: Path, images: list[np.ndarray]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{index:03d}.png")


def _tree(root: Path, bright: bool, seed: int = 0) -> Path:
    """Kaggle layout with glioma and notumor; notumor 1.6x brighter when ``bright``, else identical in law."""
    rng = np.random.default_rng(seed)
    for split, count in (("Training", 24), ("Testing", 16)):
        for name, factor in (("glioma", 1.0), ("notumor", 1.6 if bright else 1.0)):
            _write(root / split / name, [_head(rng, factor) for _ in range(count)])
    return root


def test_cues_move_the_expected_way() -> None:
    rng = np.random.default_rng(3)
    base = _head(rng, size=96)
    brighter = np.clip(base.astype(int) * 3 // 2, 0, 255).astype(np.uint8)
    blurred = np.asarray(Image.fromarray(base).filter(ImageFilter.GaussianBlur(2)))
    symmetric = base.copy()
    symmetric[:, 48:] = base[:, :48][:, ::-1]
    lopsided = base.copy()
    lopsided[20:70, 20:45] = 250  # a bright block on one side only
    cues = pixel_cues(np.stack([base, brighter, blurred, symmetric, lopsided]))
    assert cues["head_mean"][1] > cues["head_mean"][0] + 20 and cues["head_p99"][1] > cues["head_p99"][0]
    assert cues["laplacian_var_log10"][2] < cues["laplacian_var_log10"][0] - 0.5
    assert cues["hf_share"][2] < cues["hf_share"][0] and cues["gradient_mean"][2] < cues["gradient_mean"][0]
    assert cues["symmetry"][3] > 0.99 and cues["symmetry"][4] < cues["symmetry"][0] < 0.99
    assert 0.2 < cues["head_area"][0] < 0.6 and cues["extent_ratio"][0] > 1.0  # taller than wide
    hist = np.stack([cues[f"hist_{i:02d}"] for i in range(32)], 1)
    assert np.allclose(hist.sum(1), 1.0)


def test_jpeg_quality_is_read_from_the_header(tmp_path: Path) -> None:
    for quality in (40, 75, 95):
        Image.fromarray(_head(np.random.default_rng(0))).save(tmp_path / "x.jpg", quality=quality)
        with Image.open(tmp_path / "x.jpg") as image:
            assert abs(jpeg_quality(image.quantization) - quality) <= 3
    assert jpeg_quality(None) == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("bright", [True, False])
def test_planted_brightness_shortcut_is_found_and_none_is_invented(tmp_path: Path, bright: bool) -> None:
    root = _tree(tmp_path / "data", bright)
    report = shortcut_audit(root, size=SIZE, progress=False)
    chance = report["chance"]["Testing"]["majority_rate"]
    grey = report["prediction"]["Testing"]["grey"]["logreg"]["accuracy"]
    assert chance == 0.5
    if bright:
        assert grey >= 0.9
        means = report["per_class"]["Training"]["head_mean"]
        assert means["notumor"]["mean"] > 1.4 * means["glioma"]["mean"]
    else:
        for group, models in report["prediction"]["Testing"].items():
            assert models["logreg"]["accuracy"] <= 0.75, group


@pytest.mark.slow
def test_report_files_and_external_set(tmp_path: Path) -> None:
    root = _tree(tmp_path / "data", bright=True)
    external = tmp_path / "external"
    rng = np.random.default_rng(9)
    _write(external / "glioma", [_head(rng) for _ in range(6)])
    _write(external / "notumor", [_head(rng, 1.6) for _ in range(4)])
    leak_free = {path.resolve() for path in (root / "Testing" / "glioma").glob("*.png")}
    report = shortcut_audit(root, external=external, leak_free=leak_free, size=SIZE, progress=False)
    assert list(report["prediction"]) == ["Testing", "Testing (leak-free)", "external"]
    assert report["chance"]["Testing (leak-free)"]["n"] == 16 and report["chance"]["external"]["majority_rate"] == 0.6
    paths = write_shortcut_report(report, tmp_path / "out")
    assert all(path.stat().st_size > 0 for path in paths)
    saved = json.loads(paths[0].read_text())
    assert saved["per_class"]["external"]["head_mean"]["notumor"]["n"] == 4 and "_tables" not in saved
    assert any("grey" in line for line in summary_lines(report))


@pytest.mark.slow
def test_plain_class_folder_is_cross_validated(tmp_path: Path) -> None:
    root = _tree(tmp_path / "data", bright=True) / "Training"
    report = shortcut_audit(root, size=SIZE, progress=False)
    assert report["prediction"]["all (cross-validated)"]["grey"]["logreg"]["accuracy"] >= 0.9
    assert len(load_split(root, "Testing")) == report["chance"]["all"]["n"]


@pytest.mark.slow
def test_audit_command_writes_the_shortcut_report(tmp_path: Path) -> None:
    root = _tree(tmp_path / "data", bright=True)
    external = tmp_path / "external"
    _write(external / "notumor", [_head(np.random.default_rng(5), 1.6) for _ in range(3)])
    out = tmp_path / "audit"
    result = CliRunner().invoke(app, ["audit", str(root), "--out", str(out), "--external", str(external)])
    assert result.exit_code == 0, result.output
    assert "balanced accuracy" in result.output and "  chance" in result.output
    for name in ("audit.json", "shortcuts.json", "shortcut_distributions.png", "shortcut_accuracy.png"):
        assert (out / name).is_file(), name
    result = CliRunner().invoke(app, ["audit", str(root), "--out", str(tmp_path / "plain"), "--no-shortcuts"])
    assert result.exit_code == 0 and not (tmp_path / "plain" / "shortcuts.json").exists()


@pytest.mark.slow
def test_one_class_data_still_writes_the_report(tmp_path: Path) -> None:
    root = tmp_path / "data"
    rng = np.random.default_rng(4)
    for split in ("Training", "Testing"):
        _write(root / split / "glioma", [_head(rng) for _ in range(4)])
    result = CliRunner().invoke(app, ["audit", str(root), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "no cue classifier fitted" in result.output and (tmp_path / "out" / "shortcut_accuracy.png").is_file()


@pytest.mark.parametrize("which", ["data", "external"])
def test_missing_folder_is_one_line_and_exit_2(tmp_path: Path, which: str) -> None:
    root = _tree(tmp_path / "data", bright=True) if which == "external" else tmp_path / "nowhere"
    args = ["audit", str(root), "--out", str(tmp_path / "out")]
    if which == "external":
        args += ["--external", str(tmp_path / "nowhere")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0 and "nowhere" in result.output and "does not exist" in result.output
