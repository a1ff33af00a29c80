"""What inference returns: ``Prediction`` (one 2-D slice), ``Explanation`` (a heat map with its
prediction) and the summary of a volume's slices, as the CLI, the Python API and the service
give them. One ``VolumeCollector`` groups volume slices for the CLI and the service alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

NOT_BRAIN_MRI = "not_brain_mri"  # the label given to inputs the out-of-distribution guard rejects


@dataclass
class Prediction:
    """The result for one 2-D image: its class, the class's probability and all probabilities.

    ``error`` is set (and the rest empty) when the input could not be read.
    """

    path: str
    label: str | None = None
    confidence: float | None = None
    probabilities: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    index: int | None = None  # frame or slice number within the file
    volume: bool = False
    uncertain: bool | None = None  # confidence below the model's refer-to-a-radiologist threshold
    not_brain_mri: bool | None = None  # the out-of-distribution guard rejected the input
    not_brain_mri_reason: str | None = None  # which of the guard's rules refused it, in words
    # A brain MRI slice, classified, but unlike the scans the model was validated on (ood.OODGuard)
    outside_validated_range: bool | None = None
    outside_validated_range_reason: str | None = None
    file: str | None = None  # the file a slice of a volume came from (groups a volume's slices)
    note: str | None = None  # what reading changed that the user should know (NaN voxels left out)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of ``predict --json`` and of the HTTP service."""
        result: dict[str, Any] = {
            "path": self.path, "label": self.label, "confidence": self.confidence,
            "probabilities": self.probabilities, "uncertain": self.uncertain, "not_brain_mri": self.not_brain_mri,
        }
        if self.not_brain_mri_reason is not None:
            result["not_brain_mri_reason"] = self.not_brain_mri_reason
        result["outside_validated_range"] = self.outside_validated_range
        if self.outside_validated_range_reason is not None:
            result["outside_validated_range_reason"] = self.outside_validated_range_reason
        if self.index is not None:
            result["index"] = self.index
        if self.note is not None:
            result["note"] = self.note
        if self.error is not None:
            result["error"] = self.error
        return result


MIN_ADJACENT = 2  # confident slices in a row that a tumour verdict needs


def _is_confident(prediction: Prediction) -> bool:
    """Read, and with none of the flags that say the answer may be wrong."""
    return bool(prediction.label) and not prediction.not_brain_mri and not prediction.error and (
        prediction.uncertain is not True and prediction.outside_validated_range is not True
    )


def _longest_runs(ordered: list[Prediction]) -> dict[str, list[Prediction]]:
    """For each class, its longest run of adjacent confident slices (in slice order)."""
    best: dict[str, list[Prediction]] = {}
    run: list[Prediction] = []
    for prediction in [*ordered, None]:
        if run and (prediction is None or not _is_confident(prediction) or prediction.label != run[0].label):
            if len(run) > len(best.get(run[0].label, [])):
                best[run[0].label] = run
            run = []
        if prediction is not None and _is_confident(prediction):
            run.append(prediction)
    return best


def series_verdict(ordered: list[Prediction]) -> tuple[str, str, list[Prediction]]:
    """(label, reason, key slices) of a series' slices in order, by rules that cannot call a series
    what its slices do not show (README, "Series verdicts"):

    1. most slices refused as not brain MRI -> ``not_brain_mri``;
    2. a tumour class on at least ``MIN_ADJACENT`` adjacent confident slices -> that class (the
       longest such run; the key slices are that run);
    3. a confident tumour slice without a confident neighbour of its class -> ``indeterminate``;
    4. confident ``notumor`` on at least half of the slices read (and at least two) -> ``notumor``;
    5. otherwise ``indeterminate``, with the reason.
    Confident: read, not refused, not uncertain, not outside the validated range."""
    n = len(ordered)
    refused = sum(1 for p in ordered if p.not_brain_mri)
    read = [p for p in ordered if p.label and not p.not_brain_mri and not p.error]
    if refused * 2 > n:
        return NOT_BRAIN_MRI, f"{refused} of {n} slices are not brain MRI", []
    runs = _longest_runs(ordered)
    tumours = {c: r for c, r in runs.items() if c != "notumor"}
    if tumours:
        label, run = max(tumours.items(), key=lambda item: (len(item[1]), max(p.confidence or 0 for p in item[1])))
        if len(run) >= MIN_ADJACENT:
            return label, f"{label} on {len(run)} adjacent confident slices ({_names(run)})", run
        lone = [p for p in ordered if _is_confident(p) and p.label != "notumor"]
        reason = f"confident tumour slice(s) without a confident neighbour ({_names(lone)}): read them"
        return "indeterminate", reason, lone
    normal = sum(1 for p in ordered if p.label == "notumor" and _is_confident(p))
    if normal >= MIN_ADJACENT and normal * 2 >= len(read):
        return "notumor", f"no tumour on {normal} of {len(read)} slices read confidently", []
    confident = sum(1 for p in ordered if _is_confident(p))
    return "indeterminate", f"too few confident slices to say ({confident} of {n})", []


def _names(slices: list[Prediction]) -> str:
    return ", ".join(str(p.index) if p.index is not None else p.path for p in slices)


def summarize_volume(predictions: list[Prediction]) -> dict[str, Any]:
    """Series-level view of one volume's (or multi-frame file's) slice predictions: the verdict
    (``series_verdict``) with its reason and key slices, and which classes on which slices."""
    ordered = sorted(predictions, key=lambda p: p.index if p.index is not None else 0)
    by_class: dict[str, dict[str, Any]] = {}
    for prediction in ordered:
        if prediction.label is None:
            continue
        entry = by_class.setdefault(prediction.label, {"slices": [], "max_confidence": 0.0})
        entry["slices"].append(prediction.index)
        entry["max_confidence"] = max(entry["max_confidence"], float(prediction.confidence or 0.0))
    label, reason, key = series_verdict(ordered) if ordered else ("indeterminate", "no slices", [])
    path = (ordered[0].file or ordered[0].path.split("#")[0]) if ordered else ""
    return {
        "path": path, "n_slices": len(ordered), "label": label, "reason": reason,
        "key_slices": [p.index for p in key],
        "refused": sum(1 for p in ordered if p.not_brain_mri),
        "uncertain": sum(1 for p in ordered if p.uncertain),
        "outside_validated_range": sum(1 for p in ordered if p.outside_validated_range),
        "confident": sum(1 for p in ordered if _is_confident(p)),
        "classes": by_class,
    }


def volume_object(slices: list[Prediction]) -> dict[str, Any]:
    """The ``predict --json`` (and HTTP) object for a whole series (a NIfTI volume, a multi-frame
    DICOM file): its verdict and summary, the highest confidence among its key slices, and the
    mean of its slices' probabilities."""
    summary = summarize_volume(slices)
    readable = [p for p in slices if p.probabilities]
    names = list(readable[0].probabilities) if readable else []
    mean = {n: float(sum(p.probabilities[n] for p in readable) / len(readable)) for n in names}
    key = [p for p in slices if p.index in summary["key_slices"] and p.confidence is not None]
    return {
        "path": summary["path"], "kind": "series", "label": summary["label"], "reason": summary["reason"],
        "confidence": max((p.confidence for p in key), default=None), "probabilities": mean, "summary": summary,
    }


class VolumeCollector:
    """Collects the slices of volumes from a stream of predictions, to summarise each volume
    once all results are out (``predict`` prints slices as they come, volumes at the end)."""

    def __init__(self) -> None:
        self._volumes: dict[str, list[Prediction]] = {}

    def add(self, prediction: Prediction) -> None:
        if prediction.volume:
            key = prediction.file or prediction.path.split("#")[0]
            self._volumes.setdefault(key, []).append(prediction)

    def summaries(self) -> list[dict[str, Any]]:
        """One ``summarize_volume`` per volume, in order of first appearance."""
        return [summarize_volume(slices) for slices in self._volumes.values()]

    def objects(self) -> list[dict[str, Any]]:
        """One ``volume_object`` per volume, in order of first appearance."""
        return [volume_object(slices) for slices in self._volumes.values()]


def prediction_objects(results: list[Prediction]) -> list[dict[str, Any]]:
    """The ``predict --json`` array: one object per slice, then one per volume."""
    volumes = VolumeCollector()
    for result in results:
        volumes.add(result)
    return [r.to_dict() for r in results] + volumes.objects()


@dataclass
class Explanation:
    """A heat map over one image at its own size, with the prediction it explains.

    ``heatmap`` and ``pixels`` are None when the input could not be read (``prediction.error``).
    """

    prediction: Prediction
    heatmap: np.ndarray | None  # (H, W) float32 in [0, 1]
    pixels: np.ndarray | None  # (H, W) uint8, the scan as the model saw it before resizing
    target: str | None  # the explained class
    method: str
    layer: str

    def save_png(self, path: Path | BinaryIO) -> None:
        """The scan beside its heat-map overlay, titled with the prediction (and target)."""
        from .explain import save_figure

        if self.heatmap is None or self.pixels is None:
            raise ValueError(f"{self.prediction.path}: no heat map for an unreadable input")
        title = f"{self.prediction.label} ({self.prediction.confidence:.1%})"
        if self.target != self.prediction.label:
            title += f"; explaining {self.target}"
        name, detail = Path(self.prediction.path).name, f"{self.method}, {self.layer}"
        save_figure(self.pixels, self.heatmap, title, name, detail, path)
