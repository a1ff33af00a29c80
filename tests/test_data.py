"""Data discovery, its errors, and the leak-free split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from braintumor.data.datasets import class_counts, group_split, load_split, resolve_split_dir, scan_class_folders
from braintumor.errors import DataError
from conftest import CLASSES, write_tree


def test_kaggle_layout_reads_each_split(kaggle_tree: Path) -> None:
    training = load_split(kaggle_tree, "Training")
    testing = load_split(kaggle_tree, "Testing")
    assert len(training) == 48 and len(testing) == 16
    assert class_counts(testing) == {name: 4 for name in CLASSES}
    assert all(sample.path.parent.parent.name == "Testing" for sample in testing)


def test_plain_root_is_its_own_split(tmp_path: Path) -> None:
    root = write_tree(tmp_path / "plain", {"glioma": 2, "pituitary": 3})
    assert resolve_split_dir(root, "Testing") == root
    samples = load_split(root, "Testing")
    assert [s.label for s in samples] == [0, 0, 3, 3, 3]


def test_aliases_and_letter_case_are_normalised(tmp_path: Path) -> None:
    names = {
        "glioma": "Glioma_Tumor",
        "meningioma": "meningioma_tumor",
        "notumor": "No Tumor",
        "pituitary": "PITUITARY_TUMOR",
    }
    root = write_tree(tmp_path / "old", {name: 1 for name in CLASSES}, folder_names=names)
    assert sorted(s.label for s in scan_class_folders(root)) == [0, 1, 2, 3]
    names["notumor"] = "no_tumor"
    root2 = write_tree(tmp_path / "old2", {"notumor": 2}, folder_names=names)
    assert [s.label for s in scan_class_folders(root2)] == [2, 2]


def test_junk_entries_are_ignored(tmp_path: Path) -> None:
    root = write_tree(tmp_path / "junk", {"glioma": 2})
    (root / ".DS_Store").write_bytes(b"\0\1")
    (root / "glioma" / ".DS_Store").write_bytes(b"\0\1")
    checkpoints = root / ".ipynb_checkpoints"
    checkpoints.mkdir()
    (checkpoints / "x.png").write_bytes(b"junk")
    hidden = root / "glioma" / ".ipynb_checkpoints"
    hidden.mkdir()
    (hidden / "copy.png").write_bytes(b"junk")
    (root / "glioma" / "notes.txt").write_text("not an image")
    assert len(scan_class_folders(root)) == 2


def test_missing_root_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_split(tmp_path / "nowhere", "Testing")


def test_empty_root_is_a_data_error(tmp_path: Path) -> None:
    (tmp_path / "empty" / "glioma").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        load_split(tmp_path / "empty", "Testing")


def test_unknown_class_folder_is_named(tmp_path: Path) -> None:
    root = write_tree(tmp_path / "odd", {"glioma": 1})
    (root / "astrocytoma").mkdir()
    with pytest.raises(DataError, match="astrocytoma"):
        scan_class_folders(root)


def test_group_split_is_stratified_seeded_and_keeps_groups_together() -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 100)
    groups = np.arange(400) // 3  # groups of three duplicates
    rng.shuffle(groups)
    labels_by_group = labels.copy()
    train, val = group_split(labels_by_group, groups, 0.1, seed=3)
    again_train, again_val = group_split(labels_by_group, groups, 0.1, seed=3)
    assert np.array_equal(val, again_val) and np.array_equal(train, again_train)
    assert set(groups[train]).isdisjoint(groups[val])
    assert len(set(train) | set(val)) == 400
    assert 25 <= len(val) <= 60
    assert len(set(labels_by_group[val])) == 4


def test_group_split_refuses_too_few_groups() -> None:
    with pytest.raises(DataError, match="groups"):
        group_split(np.arange(8) % 4, np.zeros(8, dtype=int), 0.1, seed=0)
