"""Training on several sources, on tiny synthetic trees: loading with manifests, splits that keep
subjects whole and do not depend on the other sources, balanced sampling, and the record of the
sources in the weights, the run folder and the config."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from braintumor.data.sources import (
    Source,
    balanced_weights,
    draw_epoch,
    load_source,
    load_sources,
    split_by_source,
)
from braintumor.errors import ConfigError, DataError
from braintumor.models.checkpoint import read_metadata
from braintumor.training.config import resolve_config
from braintumor.training.fit import fit, prepare_data
from conftest import CLASSES, kill_after_first_checkpoint, synthetic_scan, write_tree

SEQUENCES = {"glioma": ("flair", "t1pre", "t1c"), "notumor": ("t1",)}
PLANES = {"glioma": ("axial",), "notumor": ("axial", "coronal", "sagittal")}


def write_manifest_source(root: Path, subjects: int = 8, seed: int = 5) -> Path:
    """An extra-source-like root: glioma in three sequences and notumor in three planes, two slices
    per subject and cell, and a manifest.csv giving subject, sequence and plane."""
    rng = np.random.default_rng(seed)
    rows = []
    for name in ("glioma", "notumor"):
        (root / name).mkdir(parents=True, exist_ok=True)
        for subject in range(subjects):
            for sequence in SEQUENCES[name]:
                for plane in PLANES[name]:
                    for slice_number in range(2):
                        relative = f"{name}/{sequence}_{plane}__s{subject:02d}_{slice_number}.png"
                        synthetic_scan(rng, CLASSES.index(name)).save(root / relative)
                        rows.append({"path": relative, "cls": name, "sequence": sequence, "plane": plane,
                                     "subject": f"{name}-s{subject:02d}", "slice": slice_number})
    with open(root / "manifest.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


@pytest.fixture
def extra_tree(tmp_path: Path) -> Path:
    return write_manifest_source(tmp_path / "extra")


def _sources(kaggle: Path, extra: Path) -> tuple[Source, Source]:
    return Source("kaggle", kaggle, licence="CC0-1.0"), Source("extra", extra, Path("manifest.csv"), "CC BY 3.0")


def test_manifest_describes_each_image(kaggle_tree: Path, extra_tree: Path) -> None:
    images = load_sources(_sources(kaggle_tree, extra_tree))
    kaggle = [i for i in images if i.source == "kaggle"]
    extra = [i for i in images if i.source == "extra"]
    assert len(kaggle) == 48 and all(i.subject == "" and i.sequence == "unknown" for i in kaggle)
    assert len(extra) == 8 * 2 * (3 + 3)
    flair = [i for i in extra if i.sequence == "flair"]
    assert len(flair) == 16 and {i.plane for i in flair} == {"axial"} and {i.label for i in flair} == {0}
    assert {i.plane for i in extra if i.label == CLASSES.index("notumor")} == {"axial", "coronal", "sagittal"}


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("drop_row", "not listed in manifest"),
        ("wrong_class", "manifest .* says 'notumor'"),
        ("no_subject_column", "lacks column"),
        ("empty_subject", "gives no subject"),
    ],
)
def test_a_manifest_that_does_not_fit_is_named(extra_tree: Path, damage: str, message: str) -> None:
    manifest = extra_tree / "manifest.csv"
    with open(manifest, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if damage == "drop_row":
        rows = rows[1:]
    elif damage == "wrong_class":
        rows[0]["cls"] = "notumor"
    elif damage == "empty_subject":
        rows[0]["subject"] = ""
    else:
        rows = [{k: v for k, v in row.items() if k != "subject"} for row in rows]
    with open(manifest, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(DataError, match=message):
        load_source(Source("extra", extra_tree, Path("manifest.csv")))


def test_source_names_are_unique(kaggle_tree: Path) -> None:
    with pytest.raises(DataError, match="given twice"):
        load_sources((Source("a", kaggle_tree), Source("a", kaggle_tree)))


def _decoded(images: list) -> np.ndarray:
    from braintumor.data.cache import decode_all

    return decode_all([i.path for i in images], 32, workers=1, progress=False).pixels


def test_split_keeps_subjects_whole_and_each_source_as_it_would_be_alone(kaggle_tree: Path, extra_tree: Path) -> None:
    images = load_sources(_sources(kaggle_tree, extra_tree))
    pixels = _decoded(images)
    train, val = split_by_source(images, pixels, 0.25, seed=0, threshold=4)
    assert len(set(train) & set(val)) == 0 and len(train) + len(val) == len(images)
    train_subjects = {images[i].subject for i in train if images[i].subject}
    val_subjects = {images[i].subject for i in val if images[i].subject}
    assert val_subjects and not train_subjects & val_subjects
    for source in ("kaggle", "extra"):  # every source's classes are represented in validation
        held = Counter(images[i].label for i in val if images[i].source == source)
        present = {i.label for i in images if i.source == source}
        assert set(held) == present, source
    kaggle_alone = load_sources(_sources(kaggle_tree, extra_tree)[:1])
    alone_train, alone_val = split_by_source(kaggle_alone, pixels[: len(kaggle_alone)], 0.25, seed=0, threshold=4)
    assert [images[i].path for i in val if images[i].source == "kaggle"] == [kaggle_alone[i].path for i in alone_val]


def test_a_near_twin_across_sources_never_straddles_the_split(kaggle_tree: Path, extra_tree: Path) -> None:
    """Copy every Kaggle glioma into the extra source as its own subject: wherever the split puts
    either copy, both copies end up on one side."""
    rows = []
    for index, path in enumerate(sorted((kaggle_tree / "Training" / "glioma").glob("*.png"))):
        relative = f"glioma/twin_{index}.png"
        (extra_tree / relative).write_bytes(path.read_bytes())
        rows.append(f"{relative},glioma,t1c,axial,twin-{index},0\n")
    with open(extra_tree / "manifest.csv", "a") as handle:
        handle.writelines(rows)
    images = load_sources(_sources(kaggle_tree, extra_tree))
    train, val = split_by_source(images, _decoded(images), 0.25, seed=0, threshold=4)
    side = {images[i].path.read_bytes(): set() for i in range(len(images))}
    for indices, name in ((train, "train"), (val, "val")):
        for i in indices:
            side[images[i].path.read_bytes()].add(name)
    assert all(len(sides) == 1 for sides in side.values())


def test_balanced_draws_even_out_classes_sources_and_cells(kaggle_tree: Path, extra_tree: Path) -> None:
    images = load_sources(_sources(kaggle_tree, extra_tree))
    weights = balanced_weights(images)
    share: Counter = Counter()
    for image, weight in zip(images, weights.tolist(), strict=True):
        share[(image.label, image.source, image.sequence, image.plane)] += weight
    assert sum(share.values()) == pytest.approx(1.0)
    for label in range(4):  # a quarter of the draws per class
        assert sum(v for k, v in share.items() if k[0] == label) == pytest.approx(0.25)
    assert sum(v for k, v in share.items() if k[:2] == (0, "kaggle")) == pytest.approx(0.125)
    assert {round(v, 9) for k, v in share.items() if k[:2] == (0, "extra")} == {round(0.125 / 3, 9)}
    assert {round(v, 9) for k, v in share.items() if k[:2] == (2, "extra")} == {round(0.125 / 3, 9)}
    # An epoch of draws follows those shares (5,760 draws: within 5 standard deviations).
    draws = torch.cat([draw_epoch(weights, torch.Generator().manual_seed(seed)) for seed in range(40)]).tolist()
    counts = Counter((images[i].label, images[i].source, images[i].sequence, images[i].plane) for i in draws)
    for cell, p in share.items():
        assert abs(counts[cell] - p * len(draws)) < 5 * (p * (1 - p) * len(draws)) ** 0.5, cell


def _two_source_config(kaggle: Path, extra: Path, out: Path, **overrides: object):
    settings = {"epochs": 1, "batch_size": 8, "image_size": 32, "init": "none", "val_fraction": 0.25, "workers": 1,
                "balance": True, "augment": False}
    settings.update(overrides)
    yaml_file = out.parent / "sources.yaml"
    yaml_file.write_text(
        "sources:\n  - name: kaggle\n    licence: CC0-1.0\n"
        "  - name: extra\n    manifest: manifest.csv\n    licence: CC BY 3.0\n"
    )
    return resolve_config(yaml_file, data=[kaggle, extra], out=out, **settings)


@pytest.mark.slow
def test_a_two_source_run_records_its_sources(kaggle_tree: Path, extra_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    config = _two_source_config(kaggle_tree, extra_tree, out)
    result = fit(config, progress=False)
    row = result["history"][0]
    assert {"kaggle", "extra", "extra/flair", "extra/t1"} <= row["val_by_group"].keys()
    assert row["val_score"] == pytest.approx((row["val_by_group"]["kaggle"] + row["val_by_group"]["extra"]) / 2)
    training_data = read_metadata(out / "best.safetensors")["training_data"]
    recorded = {s["name"]: s for s in training_data["sources"]}
    assert recorded["extra"]["licence"] == "CC BY 3.0" and recorded["extra"]["manifest"] == "manifest.csv"
    assert sum(recorded["extra"]["train"].values()) + sum(recorded["extra"]["val"].values()) == 96
    assert recorded["kaggle"]["train"]["meningioma"] + recorded["kaggle"]["val"]["meningioma"] == 12
    assert training_data["sampling"].startswith("balanced")
    split = json.loads((out / "split.json").read_text())
    assert split["val_subjects"]["extra"] and "kaggle" not in split["val_subjects"]
    again = resolve_config(out / "config.yaml", out=tmp_path / "again")  # the saved config runs again as it was
    assert again.sources == config.sources and again.balance


@pytest.mark.slow
def test_a_two_source_run_resumes_on_the_same_draws(
    kaggle_tree: Path, extra_tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fit(_two_source_config(kaggle_tree, extra_tree, tmp_path / "whole", epochs=2), progress=False)
    killed = _two_source_config(kaggle_tree, extra_tree, tmp_path / "killed", epochs=2)
    kill_after_first_checkpoint(monkeypatch, lambda: fit(killed, progress=False))
    fit(_two_source_config(kaggle_tree, extra_tree, tmp_path / "killed", epochs=2, resume=True), progress=False)
    whole = torch.load(tmp_path / "whole" / "last.pt", weights_only=True)["model"]
    resumed = torch.load(tmp_path / "killed" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(tensor, resumed[key]) for key, tensor in whole.items())


def test_prepared_data_matches_the_manifest(kaggle_tree: Path, extra_tree: Path, tmp_path: Path) -> None:
    data = prepare_data(_two_source_config(kaggle_tree, extra_tree, tmp_path / "run"), progress=False)
    assert len(data.images) == len(data.pixels) == 48 + 96
    assert Counter(i.source for i in data.images) == {"kaggle": 48, "extra": 96}


@pytest.mark.parametrize(
    ("sources", "data", "message"),
    [
        ([{"name": "a"}, {"name": "b"}], ["x"], "2 source"),
        ([{"name": "a", "root": "x", "colour": 1}], None, "unknown key"),
        ([{"name": "a"}], None, "has no root"),
        ([{"name": "a", "root": "x"}, {"name": "a", "root": "y"}], None, "unique"),
        ([], None, "non-empty"),
    ],
)
def test_bad_sources_are_named(tmp_path: Path, sources: list, data: list | None, message: str) -> None:
    yaml_file = tmp_path / "c.yaml"
    import yaml

    yaml_file.write_text(yaml.safe_dump({"sources": sources}))
    with pytest.raises(ConfigError, match=message):
        resolve_config(yaml_file, data=data, out=tmp_path / "o")


def test_one_data_root_is_one_source(tmp_path: Path) -> None:
    write_tree(tmp_path / "root", {"glioma": 1})
    config = resolve_config(None, data=tmp_path / "root", out=tmp_path / "o")
    assert config.data == tmp_path / "root" and [s.name for s in config.sources] == ["root"]


@pytest.mark.slow
def test_source_audit_finds_a_planted_source_cue(kaggle_tree: Path, extra_tree: Path) -> None:
    """Blur every extra-source image: inside each class that both sources have, sharpness then
    names the source, while grey-level cues (unchanged on average) do much worse."""
    from PIL import Image, ImageFilter

    from braintumor.evaluation.source_audit import source_audit

    for path in extra_tree.rglob("*.png"):
        Image.open(path).filter(ImageFilter.GaussianBlur(2)).save(path)
    report = source_audit(_sources(kaggle_tree, extra_tree), size=64, progress=False)
    problems = report["problems"]
    expected = {"class", "source | glioma", "source | notumor", "sequence | glioma, extra", "plane | notumor, extra"}
    assert expected <= set(problems)
    assert problems["source | glioma"]["chance"] == 0.5
    assert problems["source | glioma"]["balanced_accuracy"]["sharpness"]["logreg"] > 0.9
    assert problems["source | notumor"]["balanced_accuracy"]["sharpness"]["logreg"] > 0.9


@pytest.mark.slow
def test_audit_command_with_a_second_source(kaggle_tree: Path, extra_tree: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from braintumor.cli import app

    out = tmp_path / "audit"
    args = ["audit", str(kaggle_tree), "--out", str(out), "--no-shortcuts", "--source", f"extra={extra_tree}"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "source | glioma" in result.output
    assert json.loads((out / "sources.json").read_text())["sources"] == ["kaggle", "extra"]
    assert (out / "source_shortcuts.png").is_file()
    bad = CliRunner().invoke(app, ["audit", str(kaggle_tree), "--out", str(out), "--source", "nameless"])
    assert bad.exit_code == 2 and "expected NAME=ROOT" in bad.output


@pytest.mark.slow
def test_the_audit_sees_what_the_preprocessing_takes_away(kaggle_tree: Path, extra_tree: Path) -> None:
    """Give every extra-source head another gain and offset (one pipeline's windowing): the grey
    level names the source in the files, and not in what a head z-scoring network receives, which
    removes exactly that."""
    from PIL import Image

    from braintumor.data.transforms import Preprocessing
    from braintumor.evaluation.source_audit import source_audit

    for path in extra_tree.rglob("*.png"):  # the head's greys moved, the background left black
        grey = np.asarray(Image.open(path).convert("L"), dtype=np.float64)
        Image.fromarray(np.round(np.where(grey > 20, 0.5 * grey + 110, grey)).astype(np.uint8)).save(path)
    sources = _sources(kaggle_tree, extra_tree)
    in_files = source_audit(sources, size=64, progress=False)
    seen = source_audit(sources, size=64, progress=False, preprocessing=Preprocessing(64, standardise="head"))
    assert seen["seen_by"]["standardise"] == "head" and in_files["seen_by"] is None
    for problem in ("source | glioma", "source | notumor"):
        assert in_files["problems"][problem]["balanced_accuracy"]["grey"]["logreg"] > 0.9
        assert seen["problems"][problem]["balanced_accuracy"]["grey"]["logreg"] < 0.75


@pytest.mark.slow
def test_audit_command_sees_through_a_config(kaggle_tree: Path, extra_tree: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from braintumor.cli import app

    config = tmp_path / "ranked.yaml"
    config.write_text("standardise: head_rank\nsmoothing: 1.0\nimage_size: 64\n")
    out = tmp_path / "audit"
    args = ["audit", str(kaggle_tree), "--out", str(out), "--no-shortcuts", "--source", f"extra={extra_tree}"]
    result = CliRunner().invoke(app, [*args, "--seen-by", str(config)])
    assert result.exit_code == 0, result.output
    assert "as seen: head_rank, blur 1.0" in result.output
    assert json.loads((out / "sources.json").read_text())["seen_by"]["standardise"] == "head_rank"
    missing = CliRunner().invoke(app, [*args, "--seen-by", str(tmp_path / "none.safetensors")])
    assert missing.exit_code == 2 and "none.safetensors" in missing.output and "Traceback" not in missing.output
    graph = CliRunner().invoke(app, [*args, "--seen-by", str(tmp_path / "model.onnx")])
    assert graph.exit_code == 2 and "expected a training config (.yaml) or a .safetensors" in graph.output
    alone = CliRunner().invoke(app, ["audit", str(kaggle_tree), "--out", str(out), "--no-shortcuts",
                                     "--seen-by", str(config)])
    assert alone.exit_code == 2 and "--seen-by needs --source" in alone.output
