"""Shortcut audit: how well trivial, non-anatomical cues predict the label.

The Kaggle set merges older public sets, and each class comes mostly from one of them; the sources
differ in grey levels, sharpness, framing, slice plane and file format. A network can learn those
instead of the anatomy. This module measures cheap per-image cues that know nothing of tumours,
summarises them per class, and fits small classifiers on Training with each cue group alone, scored
on Testing (and on its leak-free subset, and on an external class-folder set): accuracy far above
chance from a cue group means the labels can be told apart by that shortcut.

Cue groups (all computed on the grey image decoded at ``size`` x ``size``, as the model sees it,
except ``file``; "head" is the pixels brighter than ``HEAD_THRESHOLD``):

- grey: head mean, 99th percentile and a 32-bin head histogram. Sources were windowed differently.
- sharpness: Laplacian variance, mean gradient, high-frequency power share, background noise.
  Sources were scanned, resized and compressed differently, which blurs or sharpens them.
- framing: head area, bounding box, centre offset, black border. Sources were cropped differently.
- plane: left-right symmetry and the vertical/horizontal extent ratio of the head. A *proxy* for
  the slice plane (axial slices are near-round and symmetric, sagittal ones are not), not ground
  truth: tumours, tilt and cropping move it too.
- file: stored RGB vs L, bytes per pixel, JPEG quality estimated from the quantisation tables and
  stored side length, read from the file header without decoding.

Cost, measured on 2 busy cores for the 7,019 Kaggle images plus 626 external ones: decoding about
10 s, the cues (vectorised over chunks of images) about 25 s, the 14 classifier fits about a
minute (the forests on the widest groups take the most), so 1-2 minutes in all.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ..constants import CLASS_NAMES
from ..data.cache import load_cached
from ..data.datasets import Sample, is_kaggle_layout, load_split, resolve_split_dir, scan_class_folders

HEAD_THRESHOLD = 20  # grey level above which a pixel counts as head (the background is near 0)
ROW_FILL = 0.02  # a row or column belongs to the head's bounding box when this share of it is head
HIST_BINS = 32
CHUNK = 128  # images per vectorised chunk: about 25 MiB of float32 per array at 224 x 224

# Standard JPEG luminance quantisation table (ITU T.81 Annex K) at quality 50; its sum scales with
# the libjpeg quality factor, which is how the quality of a file is estimated.
_JPEG_LUMA_SUM = sum((
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99,
))

HIST_NAMES = tuple(f"hist_{index:02d}" for index in range(HIST_BINS))
CUE_GROUPS: dict[str, tuple[str, ...]] = {
    "grey": ("head_mean", "head_p99", *HIST_NAMES),
    "sharpness": ("laplacian_var_log10", "gradient_mean", "hf_share", "background_std", "noise_sigma"),
    "framing": ("head_area", "bbox_width", "bbox_height", "bbox_aspect", "border_fraction",
                "centre_dx", "centre_dy", "centre_offset"),
    "plane": ("symmetry", "mask_symmetry", "extent_ratio"),
    "file": ("file_rgb", "file_bytes_per_pixel", "jpeg_quality", "stored_side"),
}
PIXEL_GROUPS = ("grey", "sharpness", "framing", "plane")
# What the classifiers are fitted on: each group alone, all pixel cues, and everything.
FIT_GROUPS: dict[str, tuple[str, ...]] = {
    **CUE_GROUPS,
    "pixels (no file)": tuple(name for group in PIXEL_GROUPS for name in CUE_GROUPS[group]),
    "all": tuple(name for names in CUE_GROUPS.values() for name in names),
}
CUE_NAMES: tuple[str, ...] = FIT_GROUPS["all"]
SCALAR_CUES: tuple[str, ...] = tuple(name for name in CUE_NAMES if name not in HIST_NAMES)
# The cues drawn, one panel each, in shortcut_distributions.png.
PLOT_CUES = ("head_mean", "head_p99", "laplacian_var_log10", "gradient_mean", "hf_share", "noise_sigma",
             "head_area", "border_fraction", "symmetry", "extent_ratio", "file_bytes_per_pixel", "file_rgb")
CUE_DOCS: dict[str, str] = {
    "head_mean": "mean grey of head pixels (> 20): windowing differs between sources",
    "head_p99": "99th percentile of head grey: where the source clipped its window",
    "hist_NN": "share of head pixels in each of 32 grey bins over 21..255: the whole grey-level profile",
    "laplacian_var_log10": "log10(1 + variance of the 5-point Laplacian over the head): fine detail vs blur",
    "gradient_mean": "mean central-difference gradient magnitude over the head: edge strength",
    "hf_share": "share of (non-DC) FFT power above half the Nyquist frequency: sharpening, noise, JPEG blocks",
    "background_std": "std of background pixels (<= 20): noise floor and compression artefacts",
    "noise_sigma": "RMS Laplacian in pure background / sqrt(20): white-noise sigma estimate",
    "head_area": "share of pixels > 20: how tightly the source cropped the head",
    "bbox_width": "width of the head's bounding box / image side",
    "bbox_height": "height of the head's bounding box / image side",
    "bbox_aspect": "bounding box width / height",
    "border_fraction": "share of the image outside the head's bounding box (black border)",
    "centre_dx": "head centroid minus image centre, horizontal, / side",
    "centre_dy": "head centroid minus image centre, vertical, / side",
    "centre_offset": "distance of the head centroid from the image centre / side",
    "symmetry": "correlation of the head box with its left-right mirror (plane proxy: axial ~ symmetric)",
    "mask_symmetry": "IoU of the head mask in its box with its mirror (plane proxy, grey-level free)",
    "extent_ratio": "vertical / horizontal spread (second moments) of the head mask (plane proxy)",
    "file_rgb": "1 if the file is stored as RGB (or another colour mode), 0 if grey L",
    "file_bytes_per_pixel": "file size / stored pixels: compression strength",
    "jpeg_quality": "libjpeg quality estimated from the luminance quantisation table; 0 if not JPEG",
    "stored_side": "sqrt(stored width x height) in pixels: the source's resolution before resizing",
}


# ----------------------------------------------------------------------------- pixel cues


def _grey_cues(pixels: np.ndarray, n_head: np.ndarray) -> dict[str, np.ndarray]:
    """Head mean, p99 and histogram from one 256-bin histogram per image (no per-image loop)."""
    batch = len(pixels)
    flat = pixels.reshape(batch, -1).astype(np.int64) + 256 * np.arange(batch)[:, None]
    counts = np.bincount(flat.ravel(), minlength=256 * batch).reshape(batch, 256)[:, HEAD_THRESHOLD + 1:]
    values = np.arange(HEAD_THRESHOLD + 1, 256)
    total = np.maximum(n_head, 1)[:, None]
    cdf = np.cumsum(counts, axis=1) / total
    bins = (values - values[0]) * HIST_BINS // len(values)
    hist = np.zeros((batch, HIST_BINS))
    np.add.at(hist.T, bins, counts.T)
    cues = {"head_mean": (counts * values).sum(1) / total[:, 0],
            "head_p99": np.where(n_head > 0, values[np.argmax(cdf >= 0.99, axis=1)], 0)}
    cues.update({name: hist[:, index] / total[:, 0] for index, name in enumerate(HIST_NAMES)})
    return cues


def _masked_mean(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return (values * mask).sum((1, 2)) / np.maximum(mask.sum((1, 2)), 1)


def _sharpness_cues(x: np.ndarray, head: np.ndarray) -> dict[str, np.ndarray]:
    """Detail and noise: Laplacian and gradient over the head, FFT power share, background noise."""
    centre = x[:, 1:-1, 1:-1]
    up, down, left, right = x[:, :-2, 1:-1], x[:, 2:, 1:-1], x[:, 1:-1, :-2], x[:, 1:-1, 2:]
    laplacian = 4 * centre - up - down - left - right
    inner_head = head[:, 1:-1, 1:-1]
    lap_mean = _masked_mean(laplacian, inner_head)
    lap_var = np.maximum(_masked_mean(laplacian**2, inner_head) - lap_mean**2, 0)
    gradient = np.sqrt(((down - up) / 2) ** 2 + ((right - left) / 2) ** 2)
    # Pure background: a pixel and its four neighbours all <= threshold, so head edges do not count.
    background = ~head
    pure = background[:, 1:-1, 1:-1] & background[:, :-2, 1:-1] & background[:, 2:, 1:-1]
    pure &= background[:, 1:-1, :-2] & background[:, 1:-1, 2:]
    bg_mean = _masked_mean(x, background)
    bg_std = np.sqrt(np.maximum(_masked_mean(x**2, background) - bg_mean**2, 0))
    return {"laplacian_var_log10": np.log10(1 + lap_var), "gradient_mean": _masked_mean(gradient, inner_head),
            "hf_share": _high_frequency_share(x), "background_std": bg_std,
            "noise_sigma": np.sqrt(_masked_mean(laplacian**2, pure) / 20)}


def _high_frequency_share(x: np.ndarray) -> np.ndarray:
    """Share of the non-DC power spectrum above half the Nyquist frequency (0.25 cycles/pixel)."""
    from scipy import fft

    size = x.shape[-1]
    power = np.abs(fft.rfft2(x - x.mean((1, 2), keepdims=True), workers=1)) ** 2
    radius = np.hypot(*np.meshgrid(np.fft.fftfreq(size), np.fft.rfftfreq(size), indexing="ij"))
    weight = np.full(power.shape[-1], 2.0)  # rfft stores each column but the first (and Nyquist) for two
    weight[0] = 1.0
    if size % 2 == 0:
        weight[-1] = 1.0
    power = power * weight
    return (power * (radius > 0.25)).sum((1, 2)) / np.maximum(power.sum((1, 2)), 1e-12)


def _framing_cues(head: np.ndarray, n_head: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Area, bounding box, border and centroid of the head mask; also returns the boxes (B, 4)."""
    size = head.shape[-1]
    rows, cols = head.mean(2) > ROW_FILL, head.mean(1) > ROW_FILL
    found = rows.any(1) & cols.any(1)
    top, bottom = np.argmax(rows, 1), size - 1 - np.argmax(rows[:, ::-1], 1)
    left, right = np.argmax(cols, 1), size - 1 - np.argmax(cols[:, ::-1], 1)
    height = np.where(found, bottom - top + 1, 0) / size
    width = np.where(found, right - left + 1, 0) / size
    total = np.maximum(n_head, 1)
    centre = (size - 1) / 2
    cy = np.where(n_head > 0, (head.sum(2) * np.arange(size)).sum(1) / total, centre)
    cx = np.where(n_head > 0, (head.sum(1) * np.arange(size)).sum(1) / total, centre)
    cues = {"head_area": n_head / size**2, "bbox_width": width, "bbox_height": height,
            "bbox_aspect": width / np.maximum(height, 1 / size), "border_fraction": 1 - width * height,
            "centre_dx": (cx - centre) / size, "centre_dy": (cy - centre) / size,
            "centre_offset": np.hypot(cx - centre, cy - centre) / size}
    boxes = np.stack([np.where(found, top, 0), np.where(found, bottom, size - 1),
                      np.where(found, left, 0), np.where(found, right, size - 1)], 1)
    return cues, boxes


def _plane_cues(x: np.ndarray, head: np.ndarray, boxes: np.ndarray, n_head: np.ndarray) -> dict[str, np.ndarray]:
    """Plane proxy: mirror symmetry inside the head box, and the head's vertical/horizontal spread."""
    symmetry, mask_symmetry = np.zeros(len(x)), np.zeros(len(x))
    for index, (top, bottom, left, right) in enumerate(boxes):
        crop = x[index, top:bottom + 1, left:right + 1]
        mask = head[index, top:bottom + 1, left:right + 1]
        a, b = crop.ravel() - crop.mean(), crop[:, ::-1].ravel() - crop.mean()
        denominator = np.sqrt((a * a).sum() * (b * b).sum())
        symmetry[index] = (a * b).sum() / denominator if denominator > 0 else 0.0
        union = (mask | mask[:, ::-1]).sum()
        mask_symmetry[index] = (mask & mask[:, ::-1]).sum() / union if union else 0.0
    size = head.shape[-1]
    grid = np.arange(size)
    total = np.maximum(n_head, 1)
    py, px = head.sum(2) / total[:, None], head.sum(1) / total[:, None]
    var_y = (py * grid**2).sum(1) - (py * grid).sum(1) ** 2
    var_x = (px * grid**2).sum(1) - (px * grid).sum(1) ** 2
    return {"symmetry": symmetry, "mask_symmetry": mask_symmetry,
            "extent_ratio": np.sqrt(np.maximum(var_y, 0) / np.maximum(var_x, 1e-6))}


def pixel_cues(pixels: np.ndarray, progress: bool = False) -> dict[str, np.ndarray]:
    """Grey, sharpness, framing and plane cues of (N, S, S) uint8 grey images: name -> (N,) array.

    Chunks of ``CHUNK`` images are processed at once, so memory stays bounded and no Python loop
    runs per pixel (only the mirror symmetry loops per image, over numpy crops).
    """
    pixels = np.asarray(pixels)
    columns: dict[str, list[np.ndarray]] = {}
    starts = range(0, len(pixels), CHUNK)
    for start in tqdm(starts, desc="shortcut cues", unit="chunk", disable=not progress, leave=False):
        chunk = np.ascontiguousarray(pixels[start:start + CHUNK])
        x, head = chunk.astype(np.float32), chunk > HEAD_THRESHOLD
        n_head = head.sum((1, 2))
        framing, boxes = _framing_cues(head, n_head)
        cues = {**_grey_cues(chunk, n_head), **_sharpness_cues(x, head), **framing,
                **_plane_cues(x, head, boxes, n_head)}
        for name, values in cues.items():
            columns.setdefault(name, []).append(np.asarray(values, dtype=np.float64))
    if not columns:
        return {name: np.zeros(0) for group in PIXEL_GROUPS for name in CUE_GROUPS[group]}
    return {name: np.concatenate(parts) for name, parts in columns.items()}


# ----------------------------------------------------------------------------- file cues


def jpeg_quality(quantization: dict[int, Sequence[int]] | None) -> float:
    """libjpeg quality (1..100) that best explains a file's luminance table; 0 when there is none.

    Uses the table's sum, so the order Pillow stores it in (zigzag or natural) does not matter;
    tables clipped at 1 or 255 (quality near 100 or near 1) make it approximate there.
    """
    if not quantization or 0 not in quantization:
        return 0.0
    scale = 100.0 * float(sum(quantization[0])) / _JPEG_LUMA_SUM
    quality = (200.0 - scale) / 2.0 if scale <= 100.0 else 5000.0 / scale
    return float(np.clip(quality, 1.0, 100.0))


def file_cues(paths: Sequence[Path], progress: bool = False) -> dict[str, np.ndarray]:
    """Cues read from each file's header only (mode, size, JPEG tables): no pixel is decoded."""
    from PIL import Image

    rows = []
    for path in tqdm(paths, desc="file headers", unit="file", disable=not progress, leave=False):
        try:
            with Image.open(path) as image:
                width, height = image.size
                rgb = float(image.mode not in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F", "P"))
                quality = jpeg_quality(getattr(image, "quantization", None)) if image.format == "JPEG" else 0.0
            rows.append((rgb, path.stat().st_size / max(width * height, 1), quality, float(np.sqrt(width * height))))
        except OSError:
            rows.append((0.0, 0.0, 0.0, 0.0))
    table = np.asarray(rows, dtype=np.float64).reshape(-1, 4)
    return {name: table[:, index] for index, name in enumerate(CUE_GROUPS["file"])}


# ----------------------------------------------------------------------------- sets and statistics


def _cue_matrix(cues: dict[str, np.ndarray], names: Sequence[str]) -> np.ndarray:
    return np.nan_to_num(np.stack([cues[name] for name in names], 1), nan=0.0, posinf=0.0, neginf=0.0)


@dataclass
class CueTable:
    """Every cue of a set of readable images: ``cues[name][i]`` belongs to ``paths[i]`` of class ``labels[i]``."""

    cues: dict[str, np.ndarray]
    labels: np.ndarray
    paths: list[Path]

    def subset(self, mask: np.ndarray) -> CueTable:
        """The rows where ``mask`` is true."""
        return CueTable({k: v[mask] for k, v in self.cues.items()}, self.labels[mask],
                        [p for p, m in zip(self.paths, mask, strict=True) if m])


def cue_table(
    samples: Sequence[Sample], size: int = 224, progress: bool = False,
    view: Callable[[np.ndarray], np.ndarray] | None = None,
) -> CueTable:
    """Decode ``samples`` (``cache.load_cached`` at ``size``, nothing stored) and compute every cue,
    on the decoded pixels or on ``view`` of them ((N, S, S) uint8 to the same: what a network sees).

    Unreadable files are left out (the duplicate audit reports them).
    """
    paths = [sample.path for sample in samples]
    decoded = load_cached(paths, size, None, progress=progress)
    keep = np.flatnonzero(decoded.ok)
    pixels = np.asarray(decoded.pixels)[keep]
    cues = pixel_cues(pixels if view is None else view(pixels), progress=progress)
    cues.update(file_cues([paths[i] for i in keep], progress=progress))
    return CueTable(cues, np.array([samples[i].label for i in keep], dtype=np.int64), [paths[i] for i in keep])


def per_class_stats(
    cues: dict[str, np.ndarray], labels: np.ndarray, class_names: Sequence[str] = CLASS_NAMES
) -> dict[str, Any]:
    """Mean, std and quartiles of every scalar cue for every class present: cue -> class -> stats."""
    stats: dict[str, Any] = {}
    for name in SCALAR_CUES:
        stats[name] = {}
        for label in np.unique(labels):
            values = cues[name][labels == label]
            q25, median, q75 = np.percentile(values, [25, 50, 75])
            stats[name][class_names[label]] = {
                "n": len(values), "mean": float(values.mean()), "std": float(values.std()),
                "q25": float(q25), "median": float(median), "q75": float(q75),
            }
    return stats


def _models() -> dict[str, Any]:
    """Standardised multinomial logistic regression (linear) and a small random forest (non-linear)."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return {"logreg": make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000)),
            "forest": RandomForestClassifier(n_estimators=100, min_samples_leaf=2, random_state=0, n_jobs=1)}


def _scores(truth: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    import warnings

    from sklearn.metrics import balanced_accuracy_score, f1_score

    with warnings.catch_warnings():  # an external set lacking a class the model predicts is expected
        warnings.simplefilter("ignore", UserWarning)
        return {"accuracy": float((truth == predicted).mean()),
                "weighted_f1": float(f1_score(truth, predicted, average="weighted", zero_division=0)),
                "balanced_accuracy": float(balanced_accuracy_score(truth, predicted))}


def chance(labels: np.ndarray, class_names: Sequence[str] = CLASS_NAMES) -> dict[str, Any]:
    """Majority-class rate (what always answering the commonest class scores) and 1/k for balanced accuracy."""
    counts = np.bincount(labels, minlength=len(class_names))
    return {"n": len(labels), "majority_rate": float(counts.max() / max(len(labels), 1)),
            "majority_class": class_names[int(counts.argmax())], "balanced": 1.0 / max(int((counts > 0).sum()), 1),
            "per_class_n": {class_names[i]: int(c) for i, c in enumerate(counts) if c}}


def predict_from_cues(train: CueTable, evaluations: dict[str, CueTable], progress: bool = False) -> dict[str, Any]:
    """Fit each model on ``train`` with each cue group of ``FIT_GROUPS``; score on each evaluation set.

    Returns set -> group -> model -> scores (empty when the training set has fewer than 2 classes).
    Classes the training set has and an evaluation set lacks simply count as wrong answers when predicted.
    """
    from sklearn.base import clone

    results: dict[str, Any] = {name: {} for name in evaluations}
    if len(np.unique(train.labels)) < 2:
        return results
    jobs = [(group, model_name, model) for group in FIT_GROUPS for model_name, model in _models().items()]
    for group, model_name, model in tqdm(jobs, desc="cue classifiers", unit="fit", disable=not progress, leave=False):
        fitted = clone(model).fit(_cue_matrix(train.cues, FIT_GROUPS[group]), train.labels)
        for set_name, table in evaluations.items():
            if len(table.labels):
                predicted = fitted.predict(_cue_matrix(table.cues, FIT_GROUPS[group]))
                results[set_name].setdefault(group, {})[model_name] = _scores(table.labels, predicted)
    return results


def cross_validated(table: CueTable, progress: bool = False) -> dict[str, Any]:
    """For a plain class-folder set (no Training/Testing): stratified k-fold predictions per group and model.

    Near-duplicate images may fall into different folds, which flatters the cues a little.
    """
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    cues, labels = table.cues, table.labels
    counts = np.bincount(labels)
    folds = min(5, int(counts[counts > 0].min()))
    if folds < 2 or len(np.unique(labels)) < 2:
        return {}
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=0)
    results: dict[str, Any] = {}
    jobs = [(group, model_name, model) for group in FIT_GROUPS for model_name, model in _models().items()]
    bar = tqdm(jobs, desc="cue classifiers (CV)", unit="fit", disable=not progress, leave=False)
    for group, model_name, model in bar:
        predicted = cross_val_predict(model, _cue_matrix(cues, FIT_GROUPS[group]), labels, cv=splitter)
        results.setdefault(group, {})[model_name] = _scores(labels, predicted)
    return results


# ----------------------------------------------------------------------------- the audit


def shortcut_audit(
    data: str | Path,
    external: str | Path | None = None,
    leak_free: set[Path] | None = None,
    size: int = 224,
    progress: bool = True,
) -> dict[str, Any]:
    """How far trivial cues predict the label in ``data`` (see the module doc); returns the report.

    On a Kaggle layout the cue classifiers are fitted on Training and scored on Testing, on the
    Testing images in ``leak_free`` (resolved paths, e.g. from the duplicate audit) and on the
    ``external`` class-folder set; on a plain class-folder root they are cross-validated (and
    the external set is scored by classifiers fitted on all of it). The report holds, under
    ``_tables``, the ``CueTable`` of each set, which ``write_shortcut_report`` draws.

    Raises:
        DataError: a root does not exist, or holds no images in class folders.
    """
    data = Path(data)
    resolve_split_dir(data, "Testing")  # a missing or non-folder root fails here, with one line
    kaggle = is_kaggle_layout(data)
    tables: dict[str, CueTable] = {}
    for split in ("Training", "Testing") if kaggle else ("all",):
        tables[split] = cue_table(load_split(data, "Testing" if split == "all" else split), size, progress)
    if external is not None:
        tables["external"] = cue_table(scan_class_folders(resolve_split_dir(external, "Testing")), size, progress)
    train_name = "Training" if kaggle else "all"
    train = tables[train_name]
    evaluations = {name: table for name, table in tables.items() if name != train_name}
    if kaggle and leak_free is not None:
        testing = tables["Testing"]
        free = testing.subset(np.array([path.resolve() in leak_free for path in testing.paths], dtype=bool))
        evaluations = {"Testing": testing, "Testing (leak-free)": free,
                       **{k: v for k, v in evaluations.items() if k != "Testing"}}
    prediction = {} if kaggle else {"all (cross-validated)": cross_validated(train, progress)}
    if evaluations:
        prediction.update(predict_from_cues(train, evaluations, progress))
    chances = {name: chance(table.labels) for name, table in {train_name: train, **evaluations}.items()}
    chances["all (cross-validated)"] = chances[train_name]
    return {
        "data": str(data), "external": str(external) if external is not None else None, "image_size": size,
        "head_threshold": HEAD_THRESHOLD, "trained_on": "Training" if kaggle else "all (5-fold CV)",
        "n_images": {name: len(table.labels) for name, table in tables.items()},
        "cue_groups": {group: list(names) for group, names in FIT_GROUPS.items()},
        "cues": CUE_DOCS,
        "chance": chances,
        "per_class": {name: per_class_stats(table.cues, table.labels) for name, table in tables.items()},
        "prediction": prediction,
        "_tables": tables,
    }


# ----------------------------------------------------------------------------- outputs


def write_shortcut_report(report: dict[str, Any], out: Path) -> list[Path]:
    """shortcuts.json, shortcut_distributions.png and shortcut_accuracy.png in ``out``; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    public = {key: value for key, value in report.items() if not key.startswith("_")}
    paths = [out / "shortcuts.json", out / "shortcut_distributions.png", out / "shortcut_accuracy.png"]
    paths[0].write_text(json.dumps(public, indent=2))
    plot_cue_distributions(report["_tables"], paths[1])
    plot_cue_accuracy(report["prediction"], report["chance"], paths[2])
    return paths


def plot_cue_distributions(tables: dict[str, CueTable], path: Path) -> None:
    """One panel per cue of ``PLOT_CUES``: a box per class and set (binary cues: the share as a bar)."""
    from .plots import plt

    colours = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]
    fig, axes = plt.subplots(3, 4, figsize=(18, 11))
    set_names = list(tables)
    for axis, cue in zip(axes.ravel(), PLOT_CUES, strict=True):
        positions, ticks, tick_labels = 0.0, [], []
        for label, class_name in enumerate(CLASS_NAMES):
            start = positions
            for set_index, set_name in enumerate(set_names):
                values = tables[set_name].cues[cue][tables[set_name].labels == label]
                if len(values) == 0:
                    continue
                if cue == "file_rgb":
                    axis.bar(positions, values.mean(), 0.8, color=colours[set_index % len(colours)])
                else:
                    box = axis.boxplot(values, positions=[positions], widths=0.7, showfliers=False, patch_artist=True,
                                       medianprops={"color": "black"})
                    box["boxes"][0].set_facecolor(colours[set_index % len(colours)])
                positions += 1
            if positions > start:
                ticks.append((start + positions - 1) / 2)
                tick_labels.append(class_name)
            positions += 0.8
        axis.set_xticks(ticks, tick_labels, fontsize=8)
        axis.set_title(cue + (" (share stored as RGB)" if cue == "file_rgb" else ""), fontsize=10)
        axis.grid(axis="y", alpha=0.3)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[i % len(colours)]) for i in range(len(set_names))]
    fig.legend(handles, set_names, loc="upper right", ncol=len(set_names))
    fig.suptitle("Trivial cues per class (boxes: quartiles, whiskers 1.5 IQR, outliers hidden)")
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_cue_accuracy(prediction: dict[str, Any], chances: dict[str, Any], path: Path) -> None:
    """Accuracy (against majority-class chance) and balanced accuracy (against 1/k) of each cue group
    and model, one column per evaluated set: balanced accuracy is the fair view of an imbalanced set."""
    from .plots import plt

    sets = [name for name in prediction if prediction[name]]
    fig, axes = plt.subplots(2, max(len(sets), 1), figsize=(6 * max(len(sets), 1), 8.6), squeeze=False)
    for column, set_name in enumerate(sets):
        groups = list(prediction[set_name])
        models = list(prediction[set_name][groups[0]])
        base = chances[set_name]
        width = 0.8 / len(models)
        panels = ((axes[0, column], "accuracy", base["majority_rate"], f"always {base['majority_class']}"),
                  (axes[1, column], "balanced_accuracy", base["balanced"], "1 / classes"))
        for axis, metric, line, what in panels:
            for offset, model in enumerate(models):
                values = [prediction[set_name][g][model][metric] for g in groups]
                where = np.arange(len(groups)) + (offset - (len(models) - 1) / 2) * width
                bars = axis.bar(where, values, width, label=model)
                axis.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
            axis.axhline(line, color="black", linestyle="--", label=f"chance ({what}) {line:.2f}")
            axis.set_xticks(range(len(groups)), groups, rotation=30, ha="right", fontsize=8)
            axis.set(ylim=(0, 1.2), yticks=np.linspace(0, 1, 6), ylabel=metric.replace("_", " "))
            axis.grid(axis="y", alpha=0.3)
            axis.legend(fontsize=7, loc="upper center", ncol=3)
        counts = ", ".join(f"{name} {n}" for name, n in base["per_class_n"].items())
        axes[0, column].set_title(f"{set_name} (n={base['n']}: {counts})", fontsize=9)
    fig.suptitle("How well trivial cues alone predict the label (classifiers fitted on the training set's cues only)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def summary_lines(report: dict[str, Any]) -> list[str]:
    """A short terminal table: accuracy and balanced accuracy per cue group, model and set, with chance;
    then the per-class means of the main cues."""
    prediction, chances = report["prediction"], report["chance"]
    sets = [name for name in prediction if prediction[name]]
    if not sets:
        return ["shortcut audit: no cue classifier fitted (fewer than 2 classes, or too few images per class)"]
    models = list(next(iter(prediction[sets[0]].values())))
    width = max(max(len(name) for name in sets), 6 * len(models)) + 3
    title = f"shortcut audit: classifiers that see only trivial cues, fitted on {report['trained_on']}"
    lines = [f"{title}; each cell: {' '.join(models)}"]
    for metric, chance_key in (("accuracy", "majority_rate"), ("balanced_accuracy", "balanced")):
        lines.append(f"{metric.replace('_', ' '):<18}" + "".join(f"{name:>{width}}" for name in sets))
        for group in FIT_GROUPS:
            cells = [" ".join(f"{prediction[s][group][m][metric]:.3f}" for m in models)
                     if group in prediction[s] else "-" for s in sets]
            lines.append(f"  {group:<16}" + "".join(f"{cell:>{width}}" for cell in cells))
        lines.append(f"  {'chance':<16}" + "".join(f"{chances[s][chance_key]:>{width}.3f}" for s in sets))
    reference = "Training" if "Training" in report["per_class"] else next(iter(report["per_class"]))
    shown = ("head_mean", "head_p99", "laplacian_var_log10", "noise_sigma", "head_area", "symmetry", "file_rgb")
    stats = report["per_class"][reference]
    lines.append(f"per-class means ({reference}):")
    lines.append(f"  {'class':<12}" + "".join(f"{name[:12]:>13}" for name in shown))
    for class_name in stats[shown[0]]:
        lines.append(f"  {class_name:<12}" + "".join(f"{stats[name][class_name]['mean']:>13.3f}" for name in shown))
    return lines
