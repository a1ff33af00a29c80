"""A series' verdict as DICOM that any viewer shows beside the images: a Structured Report and a
Secondary Capture of the key slice with its Grad-CAM overlay, both in the source study.

The SR (Comprehensive 3D SR, TID 1500 Measurement Report, written with highdicom) holds one
measurement group: the finding (the series verdict, coded in the private scheme ``99BRTMR``), the
reason in words, the mean probability of each class, the counts of refused, uncertain and
outside-the-validated-range slices, the algorithm (name, braintumor version, weights file and
SHA-256), and references to the key slices (or, without key slices, to the series' first slice).

UIDs are derived from the source series UID, its instances and the weights' SHA-256, so writing
the results of one series with one model twice gives the same instances: a PACS keeps one copy.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom

from .. import __version__
from ..data.inputs import read_scan
from ..data.series import orientation_of
from ..errors import InvalidImageError
from ..inference.predict import Classifier
from ..inference.results import NOT_BRAIN_MRI, Prediction, mean_probabilities, summarize_series
from ..models.checkpoint import weights_sha256
from .queue import check_uid

SCHEME = "99BRTMR"  # a private coding scheme (DICOM PS3.16: designators starting 99 are local)
MEANINGS = {
    "glioma": "Glioma", "meningioma": "Meningioma", "pituitary": "Pituitary tumour", "notumor": "No tumour",
    NOT_BRAIN_MRI: "Not a brain MRI series", "indeterminate": "Indeterminate: read the series",
}
COUNTS = {"refused": "Slices refused as not brain MRI", "uncertain": "Slices flagged uncertain",
          "outside_validated_range": "Slices outside the validated range", "n_slices": "Slices in the series"}
VERDICT_NAME = ("VERDICT", "Series verdict")  # the qualitative evaluation that holds the verdict, in SCHEME
SR_SERIES_NUMBER, SC_SERIES_NUMBER = 9901, 9902
MANUFACTURER = "braintumor"
# What the results copy from the source into the patient and study modules (PS3.3 type 2).
PATIENT_AND_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyID", "AccessionNumber",
                     "StudyDate", "StudyTime", "ReferringPhysicianName")
CAPTION_NOTE = "braintumor: research use, not a diagnosis"


@dataclass(frozen=True)
class ModelIdentity:
    """What names the model in the results: architecture, version, weights file and its SHA-256."""

    name: str
    version: str
    weights: str
    sha256: str

    @classmethod
    def of(cls, classifier: Classifier) -> ModelIdentity:
        path = classifier.weights_path
        digest = weights_sha256(path) if path is not None and path.is_file() else "unknown"
        return cls(classifier.spec.architecture, __version__, path.name if path else "in memory", digest)


def _uid(*parts: str) -> str:
    return pydicom.uid.generate_uid(entropy_srcs=list(parts))


def _source_file(prediction: Prediction) -> Path:
    return Path(prediction.file or prediction.path.split("#")[0])


def _header(prediction: Prediction) -> Any:
    return _header_of(_source_file(prediction))


def _header_of(path: Path) -> Any:
    """A source file's header without pixel data: what the SR's evidence and references need."""
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as exc:  # noqa: BLE001 - the file changed or vanished since it was read
        raise InvalidImageError(f"{path}: cannot read its DICOM header again ({exc})") from None
    for keyword in PATIENT_AND_STUDY:  # type 2: present, empty when unknown (converted files often lack them)
        if keyword not in header:
            setattr(header, keyword, "")
    return header


@dataclass
class SeriesResults:
    """The DICOM results of one series: build them with ``dicom_results``, save with ``save``."""

    summary: dict[str, Any]
    sr: Any  # highdicom Comprehensive3DSR
    capture: Any | None  # highdicom SCImage, None when no slice was classified or it cannot be oriented
    note: str | None = None  # why there is no Secondary Capture, when that is not obvious

    def datasets(self) -> list[Any]:
        return [self.sr] + ([self.capture] if self.capture is not None else [])

    def save(self, folder: Path) -> list[Path]:
        """Write each instance as ``<SOPInstanceUID>.dcm`` under ``folder/<StudyInstanceUID>`` (a
        UID that could not name a folder safely is refused)."""
        target = folder / check_uid(self.sr.StudyInstanceUID, "StudyInstanceUID")
        target.mkdir(parents=True, exist_ok=True)
        paths = []
        for dataset in self.datasets():
            path = target / f"{dataset.SOPInstanceUID}.dcm"
            dataset.save_as(path, enforce_file_format=True)
            paths.append(path)
        return paths


class SeriesReporter:
    """Builds the SR and Secondary Capture of DICOM series with one classifier."""

    def __init__(self, classifier: Classifier):
        self.classifier = classifier

    @cached_property
    def identity(self) -> ModelIdentity:
        return ModelIdentity.of(self.classifier)

    def results(self, predictions: list[Prediction], previous: list[Any] | None = None) -> SeriesResults:
        """The results of one DICOM series' slice predictions (any order). ``previous``: SRs this
        one replaces (an earlier verdict on fewer of the series' instances), referenced as its
        predecessors so that a viewer shows the newest."""
        if not predictions or any(p.dicom is None or not p.dicom.series_uid for p in predictions):
            raise InvalidImageError(
                f"{predictions[0].path if predictions else 'series'}: DICOM results need DICOM source slices"
            )
        summary = {**summarize_series(predictions), "mean_probabilities": mean_probabilities(predictions),
                   "instances": _instances_digest(predictions)}
        by_path = {p.path: p for p in predictions}
        key = [by_path[path] for path in summary["key_paths"]]
        shown = _shown_slice(key, predictions, summary["label"])
        sr = self._structured_report(summary, key or [_first(predictions)], previous or [])
        capture, note = self._capture(shown, summary) if shown is not None else (None, None)
        return SeriesResults(summary, sr, capture, note)

    def _structured_report(self, summary: dict[str, Any], referenced: list[Prediction], previous: list[Any]) -> Any:
        headers, sources = _sources(referenced)
        group = hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=self._uid(summary, "tracking"), identifier="braintumor series verdict"
            ),
            algorithm_id=hd.sr.AlgorithmIdentification(
                name=f"braintumor {self.identity.name}", version=self.identity.version,
                parameters=[f"weights {self.identity.weights}", f"sha256 {self.identity.sha256}"],
            ),
            finding_type=_finding(summary),
            finding_sites=[hd.sr.FindingSite(_code("SCT", "12738006", "Brain"))],
            qualitative_evaluations=[hd.sr.QualitativeEvaluation(VERDICT, _finding(summary))],
            measurements=self._measurements(summary),
            source_images=sources,
        )
        group[0].ContentSequence.append(
            hd.sr.TextContentItem(_code("DCM", "121106", "Comment"), _comment(summary), relationship_type="CONTAINS")
        )
        report = hd.sr.MeasurementReport(
            observation_context=self._observation_context(), procedure_reported=_code("LN", "24590-2", "MR Brain"),
            imaging_measurements=[group],
        )
        return hd.sr.Comprehensive3DSR(
            evidence=headers, content=report[0], series_instance_uid=self._uid(summary, "sr series", stable=True),
            series_number=SR_SERIES_NUMBER, sop_instance_uid=self._uid(summary, "sr"),
            instance_number=len(previous) + 1, manufacturer=MANUFACTURER,
            series_description="braintumor series verdict", is_complete=True, previous_versions=previous or None,
        )

    def _measurements(self, summary: dict[str, Any]) -> list[Any]:
        """The mean probability of each class over the slices read, and the slice counts."""
        measurements = [
            hd.sr.Measurement(name=_code(SCHEME, f"P-{name}", f"Probability of {MEANINGS.get(name, name)}"),
                              value=round(float(value), 6), unit=_code("UCUM", "1", "no units"))
            for name, value in summary["mean_probabilities"].items()
        ]
        measurements += [
            hd.sr.Measurement(name=_code(SCHEME, f"N-{key}", meaning), value=int(summary[key]),
                              unit=_code("UCUM", "{slices}", "slices"))
            for key, meaning in COUNTS.items()
        ]
        return measurements

    def _observation_context(self) -> Any:
        device = hd.sr.DeviceObserverIdentifyingAttributes(
            uid=_uid("braintumor device", self.identity.sha256), name="braintumor",
            manufacturer_name=MANUFACTURER, model_name=f"{self.identity.name} {self.identity.sha256[:12]}",
        )
        observer = hd.sr.ObserverContext(observer_type=_code("DCM", "121007", "Device"),
                                         observer_identifying_attributes=device)
        return hd.sr.ObservationContext(observer_device_context=observer)

    def _capture(self, shown: Prediction, summary: dict[str, Any]) -> tuple[Any | None, str | None]:
        """(the Secondary Capture, None), or (None, why there is none): the shown slice at its own
        size with the Grad-CAM overlay of its class and a caption."""
        from ..inference.explain import overlay

        header = _header(shown)
        orientation = _patient_orientation(header)
        if orientation is None:
            return None, "no Secondary Capture: the source gives no ImageOrientationPatient to orient it by"
        [explanation] = self.classifier.explain(_reread(shown))
        picture = _captioned(overlay(explanation.pixels, explanation.heatmap), summary, shown, explanation.target)
        capture = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=header, pixel_array=picture, photometric_interpretation="RGB", bits_allocated=8,
            coordinate_system="PATIENT", patient_orientation=orientation,
            series_instance_uid=self._uid(summary, "sc series", stable=True),
            series_number=SC_SERIES_NUMBER, sop_instance_uid=self._uid(summary, "sc"), instance_number=1,
            manufacturer=MANUFACTURER, series_description="braintumor Grad-CAM of the key slice",
        )
        return capture, None

    def _uid(self, summary: dict[str, Any], what: str, stable: bool = False) -> str:
        """UIDs from the source series and the weights: series UIDs (``stable``) stay the same when
        the series is read again, so each version of the result lands in one series; instance
        UIDs also depend on the instances read, so the same slices give the same instance (a PACS
        keeps one copy) and a series that grew gives a new one."""
        parts = [str(summary["series_instance_uid"]), self.identity.sha256, what]
        return _uid(*parts) if stable else _uid(*parts, summary["instances"])


def _sources(referenced: list[Prediction]) -> tuple[list[Any], list[Any]]:
    """(one header per source file, the SR's references to the slices): a multi-frame file is
    referenced once, with the numbers (from 1) of its frames."""
    frames: dict[Path, list[int]] = {}
    for prediction in referenced:
        frame = prediction.dicom.frame if prediction.dicom is not None else None
        frames.setdefault(_source_file(prediction), []).extend([] if frame is None else [frame + 1])
    headers = [_header_of(path) for path in frames]
    return headers, [_reference(h, numbers) for h, numbers in zip(headers, frames.values(), strict=True)]


def _reference(header: Any, frames: list[int]) -> Any:
    """A reference to an image, to its ``frames`` when its IOD has frames (Enhanced MR); a
    multi-frame file of a single-frame IOD (legacy MR with NumberOfFrames) is referenced whole."""
    try:
        return hd.sr.SourceImageForMeasurementGroup.from_source_image(header, referenced_frame_numbers=frames or None)
    except TypeError:  # highdicom: "does not represent a multi-frame dataset"
        return hd.sr.SourceImageForMeasurementGroup.from_source_image(header)


def _patient_orientation(header: Any) -> tuple[str, str] | None:
    """The patient directions of the rows and columns (PS3.3 C.7.6.1.1.1: L/R, P/A, H/F), from
    ImageOrientationPatient (of the header, or of an enhanced header's functional groups); each
    cosine's strongest axis decides. None without one."""
    try:
        cosines = [float(v) for v in orientation_of(header)]
    except (TypeError, ValueError):
        return None
    if len(cosines) != 6:
        return None
    letters = (("R", "L"), ("A", "P"), ("F", "H"))

    def direction(vector: list[float]) -> str:
        axis = max(range(3), key=lambda k: abs(vector[k]))
        return letters[axis][vector[axis] > 0]

    return direction(cosines[:3]), direction(cosines[3:])


def _code(scheme: str, value: str, meaning: str) -> Any:
    return hd.sr.CodedConcept(value=value, scheme_designator=scheme, meaning=meaning)


VERDICT = _code(SCHEME, *VERDICT_NAME)


def _finding(summary: dict[str, Any]) -> Any:
    label = summary["label"]
    return _code(SCHEME, label, MEANINGS.get(label, label))


def _comment(summary: dict[str, Any]) -> str:
    from_images = "image estimate" in (summary.get("sequence_from"), summary.get("plane_from"))
    estimated = " (estimated from the images)" if from_images else ""
    looks = f"{summary['plane']} {summary['sequence']}{estimated}"
    return f"{summary['label']}: {summary['reason']}. Series read as {looks} ({summary['n_slices']} slices)."


def _instances_digest(predictions: list[Prediction]) -> str:
    names = sorted(f"{p.dicom.sop_instance_uid}#{p.dicom.frame}" if p.dicom else p.path for p in predictions)
    return hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]


def _first(predictions: list[Prediction]) -> Prediction:
    return min(predictions, key=lambda p: p.path)


def _shown_slice(key: list[Prediction], predictions: list[Prediction], label: str) -> Prediction | None:
    """The slice the Secondary Capture shows: the most confident key slice; without key slices,
    the most confident slice classified (none for a series refused as not brain MRI)."""
    candidates = key or ([] if label == NOT_BRAIN_MRI else [p for p in predictions if p.label and not p.not_brain_mri])
    return max(candidates, key=lambda p: p.confidence or 0.0) if candidates else None


def _reread(prediction: Prediction) -> Any:
    """The slice of ``prediction`` read again from its file (the frame, for a multi-frame file)."""
    slices = read_scan(_source_file(prediction))
    found = next((s for s in slices if s.source == prediction.path), None)
    if found is None:
        raise InvalidImageError(f"{prediction.path}: no longer in its file")
    return found


def _captioned(picture: np.ndarray, summary: dict[str, Any], shown: Prediction, target: str | None) -> np.ndarray:
    """``picture`` with a black band above it that says what the series was called and why."""
    from PIL import Image, ImageDraw, ImageFont

    width = max(picture.shape[1], 256)
    font = ImageFont.load_default()
    lines = [
        f"Series: {summary['label']} ({summary['confident']} of {summary['n_slices']} slices confident)",
        f"This slice: {shown.label} {shown.confidence or 0:.1%}; heat map of {target}",
        CAPTION_NOTE,
    ]
    band = 14 * len(lines) + 8
    canvas = Image.new("RGB", (width, picture.shape[0] + band))
    canvas.paste(Image.fromarray(picture), (0, band))
    draw = ImageDraw.Draw(canvas)
    for row, line in enumerate(lines):
        draw.text((4, 4 + 14 * row), line, fill=(255, 255, 255), font=font)
    return np.asarray(canvas)
