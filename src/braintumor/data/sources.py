"""Training data from several sources: what each image is (class, source, subject, sequence, plane),
a split that keeps every subject and every near-duplicate cluster on one side, and sampling that
lets neither a source nor a sequence dominate a class.

A *source* is one data root (the Kaggle layout, or a folder of class folders) with an optional
manifest: a CSV with one row per image, ``path`` relative to the root and ``subject``, and
optionally ``sequence`` and ``plane`` (``../shared/data/extra-source/manifest.csv`` is one).
Without a manifest an image's subject is unknown, and only near-duplicate clusters group it.
"""

from __future__ import annotations

import csv
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..constants import CLASS_NAMES
from ..errors import DataError
from .datasets import group_split, load_split, normalise_class_name, resolve_split_dir
from .duplicates import connected_groups, near_pairs, perceptual_hashes

UNKNOWN = "unknown"  # the sequence or plane of an image that no manifest describes


@dataclass(frozen=True)
class Source:
    """One training data root: a short ``name`` (logs, metadata, per-source figures), where it is,
    its manifest (relative to ``root`` unless absolute) and the licence its images come under."""

    name: str
    root: Path
    manifest: Path | None = None
    licence: str = ""

    def manifest_path(self) -> Path | None:
        if self.manifest is None:
            return None
        return self.manifest if self.manifest.is_absolute() else self.root / self.manifest


@dataclass(frozen=True)
class SourcedImage:
    """One training image and what is known about it. ``subject`` is '' where no manifest names
    one; ``sequence`` and ``plane`` are ``UNKNOWN`` there."""

    path: Path
    label: int
    source: str
    subject: str = ""
    sequence: str = UNKNOWN
    plane: str = UNKNOWN

    @property
    def stratum(self) -> tuple[int, str, str]:
        """The cell that balanced sampling evens out inside a (class, source): sequence and plane."""
        return self.label, self.sequence, self.plane


def _read_manifest(path: Path) -> dict[str, dict[str, str]]:
    """Manifest rows keyed by their ``path`` column (POSIX, relative to the source root)."""
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read manifest ({exc})") from None
    if not rows:
        raise DataError(f"{path}: manifest has no rows")
    missing = {"path", "subject"} - set(rows[0])
    if missing:
        raise DataError(f"{path}: manifest lacks column(s) {', '.join(sorted(missing))}")
    return {row["path"].strip(): row for row in rows}


def _describe(row: dict[str, str] | None, image: Path, label: int, manifest: Path) -> dict[str, str]:
    """Subject, sequence and plane of ``image`` from its manifest row; refuses a missing row, an
    empty subject or a class that contradicts the image's folder."""
    if row is None:
        raise DataError(f"{image}: not listed in manifest {manifest}")
    subject = (row.get("subject") or "").strip()
    if not subject:
        raise DataError(f"{image}: manifest {manifest} gives no subject")
    listed = normalise_class_name(row.get("cls") or CLASS_NAMES[label])
    if listed != CLASS_NAMES[label]:
        raise DataError(f"{image}: in a {CLASS_NAMES[label]} folder but manifest {manifest} says {row.get('cls')!r}")
    return {
        "subject": subject,
        "sequence": (row.get("sequence") or "").strip().lower() or UNKNOWN,
        "plane": (row.get("plane") or "").strip().lower() or UNKNOWN,
    }


def load_source(source: Source, class_names: tuple[str, ...] = CLASS_NAMES) -> list[SourcedImage]:
    """Every Training image of ``source`` (its ``Training/`` folder on a Kaggle layout, else the
    root's class folders), described by its manifest when it has one.

    Raises:
        DataError: unreadable root or manifest, or an image the manifest does not describe.
    """
    folder = resolve_split_dir(source.root, "Training")
    samples = load_split(source.root, "Training", class_names)
    manifest = source.manifest_path()
    if manifest is None:
        return [SourcedImage(s.path, s.label, source.name) for s in samples]
    rows = _read_manifest(manifest)
    images = []
    for sample in samples:
        key = sample.path.relative_to(folder).as_posix()
        described = _describe(rows.get(key), sample.path, sample.label, manifest)
        images.append(SourcedImage(sample.path, sample.label, source.name, **described))
    return images


def load_sources(sources: tuple[Source, ...], class_names: tuple[str, ...] = CLASS_NAMES) -> list[SourcedImage]:
    """The images of every source, in source order; source names must be unique."""
    names = [source.name for source in sources]
    repeated = sorted(name for name, count in Counter(names).items() if count > 1)
    if repeated:
        raise DataError(f"source name(s) {', '.join(repeated)} given twice; each source needs its own name")
    return [image for source in sources for image in load_source(source, class_names)]


def source_groups(
    images: list[SourcedImage], hashes: np.ndarray, mirrored: np.ndarray, threshold: int
) -> np.ndarray:
    """A group id per image of one source: by subject where the manifest names every image's
    subject, else by near-duplicate cluster (``hashes`` and ``mirrored``: the images' perceptual
    hashes, ``duplicates.perceptual_hashes``; within ``threshold`` bits). Subjects are the truth
    where they are known: between different people, look-alike slices (the midline sagittal slices
    of healthy volunteers) are no leak, and chaining them would merge a third of a source into one
    group."""
    if all(image.subject for image in images):
        ids = {subject: number for number, subject in enumerate(dict.fromkeys(i.subject for i in images))}
        return np.array([ids[image.subject] for image in images])
    return connected_groups(len(images), near_pairs(hashes, mirrored, threshold))


def _cross_source_pairs(
    sources: np.ndarray, hashes: np.ndarray, mirrored: np.ndarray, threshold: int
) -> list[tuple[int, int, int]]:
    """Near-duplicate pairs whose two images come from different sources (global indices)."""
    names = list(dict.fromkeys(sources.tolist()))
    pairs: list[tuple[int, int, int]] = []
    for a, first in enumerate(names):
        mine = np.flatnonzero(sources == first)
        for second in names[a + 1 :]:
            theirs = np.flatnonzero(sources == second)
            found = near_pairs(hashes[mine], mirrored[mine], threshold, other=(hashes[theirs], mirrored[theirs]))
            pairs.extend((int(mine[i]), int(theirs[j]), d) for i, j, d in found)
    return pairs


def split_by_source(
    images: list[SourcedImage], pixels: np.ndarray, val_fraction: float, seed: int, threshold: int
) -> tuple[np.ndarray, np.ndarray]:
    """Train and validation indices: each source split on its own (``datasets.group_split``,
    stratified by class, its ``source_groups`` kept whole), so a source's validation images are the
    same whatever other sources are trained beside it: a model fine-tuned from one that trained on
    the first source alone never validates on images it has seen. A near-duplicate pair across
    sources that lands on both sides takes its groups to training.

    Returns:
        (train_indices, val_indices), each sorted.
    """
    sources = np.array([image.source for image in images])
    labels = np.array([image.label for image in images])
    hashes, mirrored = perceptual_hashes(pixels)
    in_val = np.zeros(len(images), dtype=bool)
    links: list[tuple[int, int, int]] = []
    for name in dict.fromkeys(sources.tolist()):
        mine = np.flatnonzero(sources == name)
        groups = source_groups([images[i] for i in mine], hashes[mine], mirrored[mine], threshold)
        _, val = group_split(labels[mine], groups, val_fraction, seed)
        in_val[mine[val]] = True
        first_of: dict[int, int] = {}
        links.extend((first_of.setdefault(g, int(i)), int(i), 0) for i, g in zip(mine, groups.tolist(), strict=True))
    components = connected_groups(len(images), links + _cross_source_pairs(sources, hashes, mirrored, threshold))
    for component in np.unique(components):
        members = components == component
        if in_val[members].any() and not in_val[members].all():
            in_val[members] = False
    return np.flatnonzero(~in_val), np.flatnonzero(in_val)


def held_out_groups(images: list[SourcedImage], attributes: tuple[str, ...] = ("sequence",)) -> dict[str, np.ndarray]:
    """Name -> boolean mask over ``images``: each source ('extra'), and inside it each value of each
    of ``attributes`` ('extra/flair'), for accuracy per source and per sequence or plane."""
    sources = np.array([image.source for image in images])
    groups: dict[str, np.ndarray] = {}
    for name in sorted(set(sources.tolist())):
        groups[name] = sources == name
        for attribute in attributes:
            values = np.array([getattr(image, attribute) for image in images])
            for value in sorted(set(values[groups[name]].tolist())):
                groups[f"{name}/{value}"] = groups[name] & (values == value)
    return groups


def balanced_weights(images: list[SourcedImage]) -> torch.Tensor:
    """A drawing weight per image: every class present gets the same share of an epoch, split
    evenly between the sources that have the class, and within a source evenly between its
    (sequence, plane) cells. So 1,321 Kaggle gliomas do not drown 600 FLAIR ones, nor 1,600 Kaggle
    normal slices the 1,480 IXI ones, and a class that one source alone has is drawn as often as
    the others."""
    sources_of: dict[int, set[str]] = defaultdict(set)
    cells_of: dict[tuple[int, str], set[tuple[int, str, str]]] = defaultdict(set)
    cell_sizes: Counter = Counter()
    for image in images:
        sources_of[image.label].add(image.source)
        cells_of[(image.label, image.source)].add(image.stratum)
        cell_sizes[(image.source, image.stratum)] += 1
    n_classes = len(sources_of)
    weights = [
        1.0
        / n_classes
        / len(sources_of[image.label])
        / len(cells_of[(image.label, image.source)])
        / cell_sizes[(image.source, image.stratum)]
        for image in images
    ]
    return torch.tensor(weights, dtype=torch.float64)


def draw_epoch(weights: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One epoch's order: as many draws as images, with replacement, by ``weights``."""
    return torch.multinomial(weights, len(weights), replacement=True, generator=generator)


def counts_by_source(images: list[SourcedImage], index: np.ndarray) -> dict[str, dict[str, int]]:
    """Images per source and class name among ``images[index]``, for logs and metadata."""
    counts: dict[str, dict[str, int]] = {}
    for i in index:
        image = images[int(i)]
        per_class = counts.setdefault(image.source, dict.fromkeys(CLASS_NAMES, 0))
        per_class[CLASS_NAMES[image.label]] += 1
    return counts
