"""``audit(data)``: how much of a data set is duplicated, within and across its splits.

Tiers:
- exact: byte-identical files (SHA-256 of the bytes);
- near: perceptual-hash distance at most ``threshold`` bits (mirror allowed, see ``duplicates``),
  which catches re-encoded, resized, re-windowed and mirrored copies and neighbouring slices.

The report counts groups and files per tier within Training, within Testing and between them,
lists duplicates whose labels disagree, draws a contact sheet of example pairs per tier and per
hash distance (the evidence for the threshold), and writes a leak-free manifest: the Testing
images with no near duplicate in Training.

Scaling: decoding and hashing are linear in the number of images (the 7,019 Kaggle images take
seconds); pair finding compares 64-bit hashes in vectorised numpy chunks, no Python loop over
pairs: N^2/2 popcounts, measured at 0.5 s for 10^4 and 2.0 s for 2x10^4 hashes on this 2-core
machine, so about 50 s for 10^5 by the quadratic law, with memory bounded by the chunk size.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..constants import CLASS_NAMES
from ..data.cache import load_cached
from ..data.datasets import SPLIT_NAMES, Sample, is_kaggle_layout, load_split, resolve_split_dir
from ..data.duplicates import DEFAULT_NEAR_THRESHOLD, connected_groups, near_pairs, perceptual_hashes

HASH_IMAGE_SIZE = 224


@dataclass
class AuditedImage:
    """One image of the data set with its split, label and hashes."""

    path: Path
    split: str
    label: int
    sha256: str


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _collect(data: Path) -> list[tuple[str, Sample]]:
    if is_kaggle_layout(data):
        return [(split, sample) for split in SPLIT_NAMES for sample in load_split(data, split)]
    return [("all", sample) for sample in load_split(resolve_split_dir(data, "Testing"), "Testing")]


def _pair_scope(split_a: str, split_b: str) -> str:
    if split_a == split_b:
        return f"within {split_a}"
    return "between Training and Testing" if {split_a, split_b} == {"Training", "Testing"} else f"{split_a}-{split_b}"


def audit(data: str | Path, threshold: int = DEFAULT_NEAR_THRESHOLD, progress: bool = True) -> dict[str, Any]:
    """Find exact and near duplicates in a data root; returns the report (see module doc).

    The returned dict also holds, under ``_pairs`` and ``_images``, what the contact sheets need.
    """
    data = Path(data)
    collected = _collect(data)
    decoded = load_cached([s.path for _, s in collected], HASH_IMAGE_SIZE, None, progress=progress)
    keep = np.flatnonzero(decoded.ok)
    images = [
        AuditedImage(collected[i][1].path, collected[i][0], collected[i][1].label, _sha256(collected[i][1].path))
        for i in keep
    ]
    pixels = np.asarray(decoded.pixels)[keep]

    by_hash: dict[str, list[int]] = defaultdict(list)
    for index, image in enumerate(images):
        by_hash[image.sha256].append(index)
    exact_groups = [members for members in by_hash.values() if len(members) > 1]

    hashes, mirrored = perceptual_hashes(pixels)
    pairs = near_pairs(hashes, mirrored, threshold)
    near_group_ids = connected_groups(len(images), pairs)
    report = _summarise(images, exact_groups, pairs, near_group_ids, threshold)
    report["data"] = str(data)
    report["n_unreadable"] = len(decoded.errors)
    report["unreadable"] = decoded.errors
    # Evidence for the threshold: pairs up to twice the threshold, for the contact sheets.
    report["_pairs"] = near_pairs(hashes, mirrored, min(2 * threshold + 4, 20))
    report["_images"] = images
    return report


def training_twins(
    data: Path, testing_paths: list[Path], testing_pixels: np.ndarray, threshold: int = DEFAULT_NEAR_THRESHOLD
) -> np.ndarray:
    """For each Testing image, whether Training holds an exact or near (<= threshold bits) copy.

    ``testing_pixels`` are the images decoded at any square size; Training is decoded at the same.
    """
    training = load_split(data, "Training")
    decoded = load_cached([s.path for s in training], testing_pixels.shape[-1], None, progress=False)
    train_pixels = np.asarray(decoded.pixels)[decoded.ok]
    train_paths = [s.path for s, ok in zip(training, decoded.ok, strict=True) if ok]
    test_hashes, test_mirrored = perceptual_hashes(np.asarray(testing_pixels))
    twin = np.zeros(len(testing_paths), dtype=bool)
    for test_index, _, _ in near_pairs(test_hashes, test_mirrored, threshold, other=perceptual_hashes(train_pixels)):
        twin[test_index] = True
    train_sha = {_sha256(path) for path in train_paths}
    twin |= np.array([_sha256(path) in train_sha for path in testing_paths], dtype=bool)
    return twin


def _summarise(
    images: list[AuditedImage],
    exact_groups: list[list[int]],
    pairs: list[tuple[int, int, int]],
    near_groups: np.ndarray,
    threshold: int,
) -> dict[str, Any]:
    splits = sorted({image.split for image in images})
    exact_cross = [g for g in exact_groups if len({images[i].split for i in g}) > 1]
    test_with_exact_twin = {i for g in exact_cross for i in g if images[i].split == "Testing"}
    near_scope_counts: dict[str, int] = defaultdict(int)
    test_with_near_twin: set[int] = set()
    for left, right, _ in pairs:
        near_scope_counts[_pair_scope(images[left].split, images[right].split)] += 1
        if {images[left].split, images[right].split} == {"Training", "Testing"}:
            test_with_near_twin.add(left if images[left].split == "Testing" else right)
    test_with_near_twin |= test_with_exact_twin
    exact_conflicts = [g for g in exact_groups if len({images[i].label for i in g}) > 1]
    near_conflicts = [(a, b, d) for a, b, d in pairs if images[a].label != images[b].label]
    n_test = sum(image.split == "Testing" for image in images)
    group_sizes = np.bincount(np.unique(near_groups, return_inverse=True)[1])
    return {
        "n_images": len(images),
        "per_split": {split: sum(image.split == split for image in images) for split in splits},
        "threshold_bits": threshold,
        "exact": {
            "groups": len(exact_groups),
            "files_in_groups": int(sum(len(g) for g in exact_groups)),
            "groups_within": {
                split: sum(1 for g in exact_groups if {images[i].split for i in g} == {split}) for split in splits
            },
            "groups_across_splits": len(exact_cross),
            "testing_files_with_training_twin": len(test_with_exact_twin),
            "label_conflict_groups": [[str(images[i].path) for i in g] for g in exact_conflicts],
        },
        "near": {
            "pairs": len(pairs),
            "pairs_by_scope": dict(near_scope_counts),
            "groups_with_2_or_more": int((group_sizes > 1).sum()),
            "files_in_groups": int(group_sizes[group_sizes > 1].sum()),
            "largest_group": int(group_sizes.max()) if len(group_sizes) else 0,
            "testing_files_with_training_near_twin": len(test_with_near_twin),
            "label_conflict_pairs": [
                {"a": str(images[a].path), "b": str(images[b].path), "distance": d,
                 "labels": [CLASS_NAMES[images[a].label], CLASS_NAMES[images[b].label]]}
                for a, b, d in near_conflicts
            ],
        },
        "leak_free_testing": {
            "n_images": n_test - len(test_with_near_twin),
            "paths": [
                str(image.path)
                for i, image in enumerate(images)
                if image.split == "Testing" and i not in test_with_near_twin
            ],
        },
    }


def audit_lines(report: dict[str, Any], threshold: int) -> list[str]:
    """An audit report as lines for a terminal: exact and near groups, twins across the split, the
    leak-free Testing subset."""
    exact, near = report["exact"], report["near"]
    return [
        f"{report['n_images']} images: {exact['groups']} exact groups ({exact['files_in_groups']} files), "
        f"{exact['testing_files_with_training_twin']} Testing files with a byte-identical Training twin",
        f"near (<= {threshold} bits): {near['groups_with_2_or_more']} groups ({near['files_in_groups']} files), "
        f"{near['testing_files_with_training_near_twin']} Testing files with a Training near twin; "
        f"{len(near['label_conflict_pairs'])} near pairs with conflicting labels",
        f"leak-free Testing subset: {report['leak_free_testing']['n_images']} images",
    ]


def leak_free_paths(report: dict[str, Any]) -> list[str]:
    """The Testing files of an audit report with no exact or near twin in Training."""
    return list(report["leak_free_testing"]["paths"])


def write_report(report: dict[str, Any], out: Path, data_root: Path) -> None:
    """audit.json, audit.md, leak_free_testing.txt and contact-sheet PNGs in ``out``."""
    from .plots import contact_sheet

    out.mkdir(parents=True, exist_ok=True)
    images: list[AuditedImage] = report["_images"]
    public = {k: v for k, v in report.items() if not k.startswith("_")}
    (out / "audit.json").write_text(json.dumps(public, indent=2))
    root = data_root.resolve()
    (out / "leak_free_testing.txt").write_text(
        "".join(str(Path(p).resolve().relative_to(root)) + "\n" for p in report["leak_free_testing"]["paths"])
    )
    rng = np.random.default_rng(0)
    sheets: dict[str, str] = {}
    exact = [(g[0], g[1], 0) for g in _exact_pairs(images)]
    buckets = {"exact": exact}
    for distance in range(0, min(2 * report["threshold_bits"] + 4, 20) + 1, 2):
        buckets[f"distance_{distance:02d}"] = [p for p in report["_pairs"] if p[2] == distance]
    for name, candidates in buckets.items():
        if not candidates:
            continue
        picked = rng.choice(len(candidates), size=min(6, len(candidates)), replace=False)
        chosen = [candidates[i] for i in sorted(picked)]
        path = out / f"pairs_{name}.png"
        contact_sheet([(images[a].path, images[b].path, _caption(images, a, b, d, name)) for a, b, d in chosen], path)
        sheets[name] = path.name
    (out / "audit.md").write_text(_markdown(public, sheets))


def _exact_pairs(images: list[AuditedImage]) -> list[tuple[int, int]]:
    by_hash: dict[str, list[int]] = defaultdict(list)
    for index, image in enumerate(images):
        by_hash[image.sha256].append(index)
    return [(g[0], g[1]) for g in by_hash.values() if len(g) > 1]


def _caption(images: list[AuditedImage], a: int, b: int, distance: int, tier: str) -> str:
    left, right = images[a], images[b]
    how = "identical bytes" if tier == "exact" else f"{distance} bits"
    return (
        f"{left.split[:2]}/{CLASS_NAMES[left.label][:4]} {left.path.name}  |  "
        f"{right.split[:2]}/{CLASS_NAMES[right.label][:4]} {right.path.name}  ({how})"
    )


def _markdown(report: dict[str, Any], sheets: dict[str, str]) -> str:
    exact, near, leak_free = report["exact"], report["near"], report["leak_free_testing"]
    lines = [
        "# Duplicate audit",
        "",
        f"Data: `{report['data']}`: {report['n_images']} readable images "
        + ", ".join(f"{k} {v}" for k, v in report["per_split"].items())
        + f"; {report['n_unreadable']} unreadable.",
        "",
        "| tier | groups (2+ files) | files in them | Testing files with a Training twin | label conflicts |",
        "|---|---|---|---|---|",
        f"| exact (identical bytes) | {exact['groups']} | {exact['files_in_groups']} "
        f"| {exact['testing_files_with_training_twin']} | {len(exact['label_conflict_groups'])} groups |",
        f"| near (<= {report['threshold_bits']} bits, includes exact) | {near['groups_with_2_or_more']} "
        f"| {near['files_in_groups']} | {near['testing_files_with_training_near_twin']} "
        f"| {len(near['label_conflict_pairs'])} pairs |",
        "",
        f"Exact groups within a split: {exact['groups_within']}; across splits: {exact['groups_across_splits']}.",
        f"Near pairs by scope: {near['pairs_by_scope']}; largest near group: {near['largest_group']} files.",
        "",
        f"**Leak-free Testing subset: {leak_free['n_images']} images** with no exact or near duplicate in Training "
        "(listed in `leak_free_testing.txt`, relative to the data root).",
        "",
        "## Evidence for the threshold",
        "",
        "Random example pairs for each tier and each hash distance (left and right of each row are the pair). "
        "Distances are even because every hash has the same number of set bits.",
        "",
    ]
    lines += [f"- {name}: ![{name}]({file})" for name, file in sheets.items()]
    return "\n".join(lines) + "\n"
