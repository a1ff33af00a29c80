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


def summarize_volume(predictions: list[Prediction]) -> dict[str, Any]:
    """Volume-level view of one NIfTI volume's slice predictions: which classes, on which slices,
    with what confidence. The volume is called a tumour class when any slice is, choosing the
    tumour class with the most confident slice; otherwise ``notumor``."""
    by_class: dict[str, dict[str, Any]] = {}
    for prediction in predictions:
        if prediction.label is None:
            continue
        entry = by_class.setdefault(prediction.label, {"slices": [], "max_confidence": 0.0})
        entry["slices"].append(prediction.index)
        entry["max_confidence"] = max(entry["max_confidence"], float(prediction.confidence or 0.0))
    tumours = {k: v for k, v in by_class.items() if k not in ("notumor", NOT_BRAIN_MRI)}
    if tumours:
        label: str | None = max(tumours, key=lambda k: tumours[k]["max_confidence"])
    else:
        label = "notumor" if by_class else None
    path = (predictions[0].file or predictions[0].path.split("#")[0]) if predictions else ""
    return {"path": path, "n_slices": len(predictions), "label": label, "classes": by_class}


def volume_object(slices: list[Prediction]) -> dict[str, Any]:
    """The ``predict --json`` (and HTTP) object for a whole NIfTI volume: its summary plus the mean
    of its slices' probabilities."""
    summary = summarize_volume(slices)
    label = summary["label"]
    readable = [p for p in slices if p.probabilities]
    names = list(readable[0].probabilities) if readable else []
    mean = {n: float(sum(p.probabilities[n] for p in readable) / len(readable)) for n in names}
    confidence = summary["classes"][label]["max_confidence"] if label in summary["classes"] else None
    return {
        "path": summary["path"], "kind": "volume", "label": label, "confidence": confidence,
        "probabilities": mean, "summary": summary,
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
