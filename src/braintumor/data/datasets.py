"""Find labelled scans on disk and split them without leakage.

A data root is either the Kaggle layout (``Training/`` and ``Testing/``, one folder per class)
or a plain folder of class subfolders. Folder names are normalised through ``CLASS_ALIASES`` so
the older ``glioma_tumor`` / ``no_tumor`` spellings of the same data work unchanged.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from ..constants import CLASS_ALIASES, CLASS_NAMES, IMAGE_EXTENSIONS, JUNK_NAMES
from ..errors import ConfigError, DataError

SPLIT_NAMES: tuple[str, ...] = ("Training", "Testing")


@dataclass(frozen=True)
class Sample:
    """One labelled image: where it is and the index of its class in ``CLASS_NAMES``."""

    path: Path
    label: int


def normalise_class_name(folder_name: str) -> str | None:
    """Map a folder name such as ``Glioma_Tumor`` to ``glioma``; None if it is no known class."""
    return CLASS_ALIASES.get(folder_name.strip().lower())


def _is_junk(path: Path) -> bool:
    """Hidden files and tool debris (``.DS_Store``, ``.ipynb_checkpoints``) are never data."""
    return path.name in JUNK_NAMES or path.name.startswith(".")


def _find_child(root: Path, name: str) -> Path | None:
    for child in root.iterdir():
        if child.is_dir() and child.name.lower() == name.lower():
            return child
    return None


def is_kaggle_layout(root: Path) -> bool:
    """True when root holds both Training/ and Testing/ folders (any letter case)."""
    return all(_find_child(root, name) is not None for name in SPLIT_NAMES)


def resolve_split_dir(root: str | Path, split: str) -> Path:
    """The folder of class subfolders to read for ``split`` ('Training' or 'Testing').

    On a Kaggle layout this is the named split; on a plain class-folder root it is the root itself.

    Raises:
        DataError: the root does not exist or is not a folder.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"data root {root} does not exist")
    if not root.is_dir():
        raise DataError(f"data root {root} is not a folder")
    if split not in SPLIT_NAMES:
        raise ConfigError(f"split {split!r} is not one of {', '.join(SPLIT_NAMES)}")
    found = _find_child(root, split)
    if found is not None:
        return found
    if _find_child(root, SPLIT_NAMES[0]) or _find_child(root, SPLIT_NAMES[1]):
        raise DataError(f"data root {root} has a Kaggle layout but no {split}/ folder")
    return root


def scan_class_folders(folder: str | Path, class_names: tuple[str, ...] = CLASS_NAMES) -> list[Sample]:
    """List every image under each class subfolder of ``folder`` (recursively), sorted by path.

    A subset of the classes is fine (evaluation of one class); labels always index ``class_names``.

    Raises:
        DataError: a subfolder is not a known class, two folders name the same class, or no image
            is found at all.
    """
    folder = Path(folder)
    samples: list[Sample] = []
    seen: dict[str, Path] = {}
    for child in sorted(folder.iterdir()):
        if _is_junk(child) or not child.is_dir():
            continue
        name = normalise_class_name(child.name)
        if name is None or name not in class_names:
            raise DataError(
                f"{child}: unknown class folder {child.name!r}; expected one of {', '.join(class_names)}"
            )
        if name in seen:
            raise DataError(f"{child}: class {name!r} is already given by {seen[name]}")
        seen[name] = child
        label = class_names.index(name)
        for path in sorted(child.rglob("*")):
            hidden = any(part in JUNK_NAMES or part.startswith(".") for part in path.relative_to(child).parts)
            if not hidden and path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
                samples.append(Sample(path, label))
    if not samples:
        raise DataError(f"{folder}: no images found in class folders ({', '.join(class_names)})")
    return samples


def load_split(root: str | Path, split: str, class_names: tuple[str, ...] = CLASS_NAMES) -> list[Sample]:
    """Samples of one split of a data root (see ``resolve_split_dir``)."""
    return scan_class_folders(resolve_split_dir(root, split), class_names)


def class_counts(samples: list[Sample], class_names: tuple[str, ...] = CLASS_NAMES) -> dict[str, int]:
    """Images per class name, in class order, for logs and reports."""
    counts = Counter(sample.label for sample in samples)
    return {name: counts.get(index, 0) for index, name in enumerate(class_names)}


def fingerprint(samples: list[Sample], root: Path | None = None) -> str:
    """A short hash of the file list (relative paths, labels, sizes) identifying a training set."""
    digest = hashlib.sha256()
    for sample in samples:
        relative = sample.path.relative_to(root) if root else sample.path
        digest.update(f"{relative.as_posix()}\t{sample.label}\t{sample.path.stat().st_size}\n".encode())
    return digest.hexdigest()[:16]


def group_split(
    labels: np.ndarray, groups: np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded train/validation split that keeps every group on one side.

    Groups are clusters of duplicate and near-duplicate images (``duplicates.group_near_duplicates``);
    splitting by group is what makes validation accuracy mean skill rather than memory.

    Returns:
        (train_indices, val_indices), each sorted.
    """
    if not 0.0 < val_fraction < 0.5:
        raise ConfigError(f"val_fraction {val_fraction} must be between 0 and 0.5")
    n_splits = max(2, round(1.0 / val_fraction))
    n_groups = len(np.unique(groups))
    if n_groups < n_splits:
        raise DataError(
            f"only {n_groups} groups of distinct (non-near-duplicate) images; need at least {n_splits} "
            f"to hold out {val_fraction:.0%} for validation"
        )
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    train_index, val_index = next(splitter.split(np.zeros(len(labels)), labels, groups))
    return np.sort(train_index), np.sort(val_index)
