"""What inference returns, as typed objects: ``SlicePrediction`` (one 2-D slice; ``Prediction``
is the same class), ``Explanation`` (a heat map with its prediction) and ``SeriesResult`` (a
series' slices in order, what it is, its ``SeriesVerdict`` and the key slice's heat map), as the
CLI, the Python API, the service and the DICOM node give them. ``flags_of`` reads the flags the
user is shown; dicts are made only at the edge (``to_dict``, ``summary``).

Slices group into series (``series_result``, ``SeriesCollector``): the slices of a NIfTI volume or
a multi-frame DICOM file, and DICOM files of one StudyInstanceUID and SeriesInstanceUID, put in
anatomical order (``data.series.series_order_key``) whatever order they came in.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from ..data.series import DicomRef, most_common, series_location, series_order_key
from ..models.slice_kind import HEADER_SEQUENCES, SliceKind

NOT_BRAIN_MRI = "not_brain_mri"  # the label given to inputs the out-of-distribution guard rejects


@dataclass
class SlicePrediction:
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
    # A brain MRI slice, classified, but of a kind the training data has no counterpart of for this
    # answer (slice_kind.coverage_reason), or unlike the scans the model was validated on (ood.OODGuard)
    outside_validated_range: bool | None = None
    outside_validated_range_reason: str | None = None
    file: str | None = None  # the file a slice of a volume came from (groups a volume's slices)
    note: str | None = None  # what reading changed that the user should know (NaN voxels left out)
    dicom: DicomRef | None = None  # a DICOM slice's study, series and place in it (groups series)
    slice_kind: SliceKind | None = None  # sequence and plane, from the header or the image

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
        if self.slice_kind is not None:
            result["slice_kind"] = self.slice_kind.as_dict()
        if self.index is not None:
            result["index"] = self.index
        if self.note is not None:
            result["note"] = self.note
        if self.dicom is not None and self.dicom.series_uid:
            result["series_instance_uid"] = self.dicom.series_uid
        if self.error is not None:
            result["error"] = self.error
        return result


Prediction = SlicePrediction  # the name the Python API has always used


MIN_ADJACENT = 2  # confident slices in a row that a tumour verdict needs
# Sequences absent from the training data (MODEL_CARD, "What the training data covers"): a series
# of one gets no verdict. T2 and FLAIR appear there only as normal slices, so the model has never
# seen a T2 or FLAIR tumour: such a series may be called a tumour class, never notumor.
UNTRAINED_SEQUENCES = frozenset({"DWI", "ADC", "SWI", "perfusion", "T2*", "PD", "localizer"})
NORMAL_ONLY_SEQUENCES = frozenset({"T2", "FLAIR"})
# The estimator's sequence families in the headers' words (data.series.SEQUENCE_WORDS).
SERIES_SEQUENCE_NAMES = {family: word for word, family in HEADER_SEQUENCES.items()}


FLAGS = ("unreadable", "refused", "uncertain", "outside_validated_range")


def flags_of(prediction: Prediction) -> frozenset[str]:
    """The flags a user was shown with one slice's answer, as ``Classifier`` set them (the one
    place that decides them): ``unreadable``; ``refused`` (not brain MRI: nothing else applies);
    else ``uncertain`` (refer to a radiologist) and ``outside_validated_range``, either or both.
    No flag: a confident answer. The evaluation's counts and the series verdicts read this."""
    if prediction.error or not prediction.label:
        return frozenset({"unreadable"})
    if prediction.not_brain_mri:
        return frozenset({"refused"})
    return frozenset(name for name, on in (("uncertain", prediction.uncertain),
                                           ("outside_validated_range", prediction.outside_validated_range)) if on)


def _is_confident(prediction: Prediction) -> bool:
    """Read, and with none of the flags that say the answer may be wrong."""
    return not flags_of(prediction)


SAME_POSITION_MM = 0.01  # slices closer than this along the normal are one location (echoes, repeats)
GAP_FACTOR = 1.5  # a step this many times the series' median step means slices are missing there


@dataclass
class _Location:
    """One place along the slice normal: the slices there, the class they all confidently agree
    on (None: they do not), and whether slices are missing between it and the previous place."""

    slices: list[Prediction]
    label: str | None
    gap_before: bool = False


def _locations(ordered: list[Prediction]) -> list[_Location]:
    """A series' slices grouped by place: slices at one position along the normal (repeats,
    echoes, dynamic phases) are one location, so one place seen twice never passes for two
    adjacent slices; a step far above the median step marks missing slices. Without positions
    every slice is its own place, with no gaps known."""
    positions = [p.dicom.position if p.dicom is not None else None for p in ordered]
    if not ordered or any(v is None for v in positions):
        return [_Location([p], p.label if _is_confident(p) else None) for p in ordered]
    groups: list[list[Prediction]] = [[ordered[0]]]
    for previous, current, prediction in zip(positions, positions[1:], ordered[1:], strict=False):
        if abs(current - previous) < SAME_POSITION_MM:
            groups[-1].append(prediction)
        else:
            groups.append([prediction])
    places = [g[0].dicom.position for g in groups]
    steps = np.abs(np.diff(places))
    median = float(np.median(steps)) if len(steps) else 0.0
    gaps = [False] + [bool(step > GAP_FACTOR * median) for step in steps]
    return [_Location(g, _agreed_label(g), gap) for g, gap in zip(groups, gaps, strict=True)]


def _agreed_label(slices: list[Prediction]) -> str | None:
    labels = {p.label if _is_confident(p) else None for p in slices}
    return labels.pop() if len(labels) == 1 else None


def _longest_runs(locations: list[_Location]) -> dict[str, list[_Location]]:
    """For each class, its longest run of adjacent confident locations (no gap inside)."""
    best: dict[str, list[_Location]] = {}
    run: list[_Location] = []
    for location in [*locations, None]:
        ends = location is None or location.label != (run[0].label if run else None) or location.gap_before
        if run and ends:
            if len(run) > len(best.get(run[0].label, [])):
                best[run[0].label] = run
            run = []
        if location is not None and location.label is not None:
            run.append(location)
    return best


def series_verdict(ordered: list[Prediction], sequence: str = "unknown") -> tuple[str, str, list[Prediction]]:
    """(label, reason, key slices) of a series' slices in anatomical order, by rules that cannot
    call a series what its slices do not show (docs/predicting.md, "Series verdicts"):

    1. most slices refused as not brain MRI -> ``not_brain_mri``;
    2. a sequence the model was never trained on (``UNTRAINED_SEQUENCES``) -> ``indeterminate``;
    3. a tumour class on at least ``MIN_ADJACENT`` adjacent confident locations -> that class (the
       longest such run; the key slices are its slices);
    4. a confident tumour location without a confident neighbour of its class -> ``indeterminate``;
    5. confident ``notumor`` on at least half of the locations read (and at least two) ->
       ``notumor``, unless the sequence is one the training data has no tumour slices of (T2, FLAIR);
    6. otherwise ``indeterminate``, with the reason.
    Confident: read, not refused, not uncertain, not outside the validated range. A location is
    a place along the normal (``_locations``): all its slices must agree, and slices missing
    between two places (a gap in the positions) make them not adjacent."""
    n = len(ordered)
    refused = sum(1 for p in ordered if p.not_brain_mri)
    if refused * 2 > n:
        return NOT_BRAIN_MRI, f"{refused} of {n} slices are not brain MRI", []
    if sequence in UNTRAINED_SEQUENCES:
        return "indeterminate", f"the series is {sequence}, a sequence the model was never trained on", []
    locations = _locations(ordered)
    tumours = {c: r for c, r in _longest_runs(locations).items() if c != "notumor"}
    if tumours:
        label, run = max(tumours.items(), key=lambda item: (len(item[1]), _top_confidence(item[1])))
        key = [p for location in run for p in location.slices]
        if len(run) >= MIN_ADJACENT:
            return label, f"{label} on {len(run)} adjacent confident slices ({_names(key, ordered)})", key
        lone = [p for loc in locations if loc.label not in (None, "notumor") for p in loc.slices]
        reason = f"confident tumour slice(s) without a confident neighbour ({_names(lone, ordered)}): read them"
        return "indeterminate", reason, lone
    return _normal_or_indeterminate(ordered, locations, sequence)


def _top_confidence(run: list[_Location]) -> float:
    return max(p.confidence or 0.0 for location in run for p in location.slices)


def _normal_or_indeterminate(
    ordered: list[Prediction], locations: list[_Location], sequence: str
) -> tuple[str, str, list[Prediction]]:
    """Rules 5 and 6 of ``series_verdict``: a series with no confident tumour location."""
    read = sum(1 for loc in locations if any(p.label and not p.not_brain_mri and not p.error for p in loc.slices))
    normal = sum(1 for loc in locations if loc.label == "notumor")
    if normal >= MIN_ADJACENT and normal * 2 >= read:
        if sequence in NORMAL_ONLY_SEQUENCES:
            reason = (f"no tumour on {normal} of {read} slices, but the series is {sequence}: the training "
                      f"data has no {sequence} tumour slices, so the model cannot rule one out")
            return "indeterminate", reason, []
        return "notumor", f"no tumour on {normal} of {read} slices read confidently", []
    confident = sum(1 for p in ordered if _is_confident(p))
    return "indeterminate", f"too few confident slices to say ({confident} of {len(ordered)})", []


def _names(slices: list[Prediction], ordered: list[Prediction]) -> str:
    """Slices named by their number in the series' order."""
    place = {id(p): k for k, p in enumerate(ordered)}
    return ", ".join(str(place[id(p)]) for p in slices)


def _identity(prediction: Prediction) -> tuple[str, int | None]:
    ref = prediction.dicom
    return (ref.sop_instance_uid, ref.frame) if ref is not None and ref.sop_instance_uid else (prediction.path, None)


def series_order(predictions: list[Prediction]) -> list[Prediction]:
    """A series' slices in anatomical order: DICOM by position or InstanceNumber, others by index.
    A slice given twice (the same SOP instance and frame, or the same path) counts once: two copies
    of one confident slice must not pass for two adjacent slices."""
    unique: dict[tuple[str, int | None], Prediction] = {}
    for prediction in predictions:
        unique.setdefault(_identity(prediction), prediction)
    predictions = list(unique.values())
    if any(p.dicom is not None for p in predictions):
        keys = series_order_key([p.dicom for p in predictions])
        return [p for _, p in sorted(zip(keys, predictions, strict=True), key=lambda pair: pair[0])]
    return sorted(predictions, key=lambda p: p.index if p.index is not None else 0)


def _series_path(ordered: list[Prediction]) -> str:
    """The file of a volume, else the folder the series' files share (the series UID without one)."""
    uid = ordered[0].dicom.series_uid if ordered[0].dicom else None
    return series_location([p.file or p.path for p in ordered], uid)


@dataclass(frozen=True)
class SeriesKind:
    """What a series is: UIDs and description from its headers; plane and sequence from the headers
    where they say, else estimated from the images (``*_from`` says which)."""

    plane: str = "unknown"
    sequence: str = "unknown"
    sequence_from: str = ""
    plane_from: str = ""
    study_uid: str | None = None
    series_uid: str | None = None
    description: str = ""


@dataclass(frozen=True)
class SeriesVerdict:
    """What a series is called (a class, ``indeterminate`` or ``not_brain_mri``), why, and its key
    slices (numbers in the series' anatomical order)."""

    label: str
    reason: str
    key_slices: tuple[int, ...] = ()


@dataclass(frozen=True)
class ClassSlices:
    """The slices (numbers in anatomical order) given one class, and its highest confidence there."""

    slices: tuple[int, ...]
    max_confidence: float


@dataclass
class SeriesResult:
    """One series judged: its slices in anatomical order (each once), what it is, the verdict, and
    (from ``Classifier.predict_series`` with ``explain``) the Grad-CAM of the slice a person
    should look at first. Dicts are made only at the edge (``summary``, ``to_dict``)."""

    path: str
    slices: list[Prediction]
    kind: SeriesKind
    verdict: SeriesVerdict
    key_heatmap: Explanation | None = None

    @property
    def key_predictions(self) -> list[Prediction]:
        return [self.slices[k] for k in self.verdict.key_slices]

    def count(self, flag: str) -> int:
        """Slices shown with ``flag`` (``flags_of``); ``confident``: with no flag."""
        if flag == "confident":
            return sum(1 for p in self.slices if not flags_of(p))
        return sum(1 for p in self.slices if flag in flags_of(p))

    @property
    def mean_probabilities(self) -> dict[str, float]:
        """Each class's probability averaged over the slices that have one."""
        readable = [p for p in self.slices if p.probabilities]
        names = list(readable[0].probabilities) if readable else []
        return {n: float(sum(p.probabilities[n] for p in readable) / len(readable)) for n in names}

    @property
    def confidence(self) -> float | None:
        """The highest confidence among the key slices (None without key slices)."""
        return max((p.confidence for p in self.key_predictions if p.confidence is not None), default=None)

    def classes(self) -> dict[str, ClassSlices]:
        """Which slices each class was given (refusals included, as ``not_brain_mri``)."""
        found: dict[str, list[int]] = {}
        for number, prediction in enumerate(self.slices):
            if prediction.label is not None:
                found.setdefault(prediction.label, []).append(number)
        return {label: ClassSlices(tuple(numbers), max(float(self.slices[k].confidence or 0.0) for k in numbers))
                for label, numbers in found.items()}

    def shown_slice(self) -> Prediction | None:
        """The slice a picture of the verdict shows: the most confident key slice; without key
        slices, the most confident slice classified (none for a series refused as not brain MRI)."""
        candidates = self.key_predictions or (
            [] if self.verdict.label == NOT_BRAIN_MRI else [p for p in self.slices if p.label and not p.not_brain_mri]
        )
        return max(candidates, key=lambda p: p.confidence or 0.0) if candidates else None

    def summary(self) -> dict[str, Any]:
        """The series summary as JSON (``predict --json``, the service, the node's results.jsonl)."""
        kind = self.kind
        described: dict[str, Any] = {"plane": kind.plane, "sequence": kind.sequence,
                                     "sequence_from": kind.sequence_from}
        if kind.plane_from:
            described["plane_from"] = kind.plane_from
        if any(p.dicom is not None for p in self.slices):
            described.update(study_instance_uid=kind.study_uid, series_instance_uid=kind.series_uid,
                             description=kind.description)
        return {
            "path": self.path, "n_slices": len(self.slices), "label": self.verdict.label, "reason": self.verdict.reason,
            **described, "key_slices": list(self.verdict.key_slices),
            "key_paths": [p.path for p in self.key_predictions], "slice_paths": [p.path for p in self.slices],
            **{flag: self.count(flag) for flag in ("refused", "uncertain", "outside_validated_range", "confident")},
            "classes": {label: {"slices": list(c.slices), "max_confidence": c.max_confidence}
                        for label, c in self.classes().items()},
        }

    def to_dict(self) -> dict[str, Any]:
        """The ``predict --json`` (and HTTP) object for the series: verdict first, then its summary."""
        return {
            "path": self.path, "kind": "series", "label": self.verdict.label, "reason": self.verdict.reason,
            "confidence": self.confidence, "probabilities": self.mean_probabilities, "plane": self.kind.plane,
            "sequence": self.kind.sequence, "summary": self.summary(),
        }


def describe_series(ordered: list[Prediction]) -> SeriesKind:
    """What a series is: its UIDs and description from the headers; its plane and sequence from the
    headers where they say, else the slices' estimates (``slice_kind``: the most common one)."""
    refs = [p.dicom for p in ordered if p.dicom is not None]
    if not refs:
        described = SeriesKind(plane="axial" if any(p.volume for p in ordered) else "unknown")
    else:
        sequence = most_common([r.sequence for r in refs])
        described = SeriesKind(
            plane=most_common([r.plane for r in refs]), sequence=sequence,
            sequence_from=next((r.sequence_source for r in refs if r.sequence == sequence), ""),
            study_uid=refs[0].study_uid, series_uid=refs[0].series_uid, description=refs[0].description,
        )
    return _estimated_kind(ordered, described)


def _estimated_kind(ordered: list[Prediction], described: SeriesKind) -> SeriesKind:
    """The plane and sequence the slices' images suggest, where the headers leave them unknown."""
    kinds = [p.slice_kind for p in ordered if p.slice_kind is not None]
    if not kinds:
        return described
    family = most_common([k.sequence for k in kinds])
    if described.sequence == "unknown" and family in SERIES_SEQUENCE_NAMES:
        described = replace(described, sequence=SERIES_SEQUENCE_NAMES[family], sequence_from="image estimate")
    if described.plane == "unknown":
        described = replace(described, plane=most_common([k.plane for k in kinds]), plane_from="image estimate")
    return described


def series_result(predictions: list[Prediction]) -> SeriesResult:
    """One series' slice predictions (any order) judged: put in order, described, and given the
    verdict of ``series_verdict``."""
    ordered = series_order(predictions)
    kind = describe_series(ordered)
    if not ordered:
        return SeriesResult("", [], kind, SeriesVerdict("indeterminate", "no slices"))
    label, reason, key = series_verdict(ordered, kind.sequence)
    place = {id(p): k for k, p in enumerate(ordered)}
    verdict = SeriesVerdict(label, reason, tuple(place[id(p)] for p in key))
    return SeriesResult(_series_path(ordered), ordered, kind, verdict)


def series_key(prediction: Prediction) -> tuple[str, ...] | None:
    """Which series a slice belongs to: its DICOM study and series UIDs, else its volume file
    (None: a single image, no series)."""
    if prediction.dicom is not None and prediction.dicom.series_uid:
        return ("dicom", prediction.dicom.study_uid or "", prediction.dicom.series_uid)
    if prediction.volume:
        return ("file", prediction.file or prediction.path)
    return None


class SeriesCollector:
    """Collects the slices of series from a stream of predictions, to judge each series once all
    results are out (``predict`` prints slices as they come, series at the end). A series of one
    single-frame file is left as that file's own result."""

    def __init__(self) -> None:
        self._series: dict[tuple[str, ...], list[Prediction]] = {}

    def add(self, prediction: Prediction) -> None:
        key = series_key(prediction)
        if key is not None:
            self._series.setdefault(key, []).append(prediction)

    def results(self) -> list[SeriesResult]:
        """One ``series_result`` per series of more than one slice, in order of first appearance."""
        return [series_result(s) for s in self._series.values() if len(s) > 1 or s[0].volume]


def prediction_objects(results: list[Prediction]) -> list[dict[str, Any]]:
    """The service's answer to ``/v1/predict``: one object per series first (its verdict, as
    ``SeriesResult.to_dict``), then one per slice in the order sent. (``predict --json`` streams
    its slices as they come and gives the series objects after them.)"""
    collector = SeriesCollector()
    for result in results:
        collector.add(result)
    return [s.to_dict() for s in collector.results()] + [r.to_dict() for r in results]


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
