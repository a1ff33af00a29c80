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

import copy
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom

from .. import __version__
from ..data.dicom_series import DicomSeries
from ..data.series import orientation_of
from ..errors import InvalidImageError
from ..inference.predict import Classifier
from ..inference.results import NOT_BRAIN_MRI, Prediction, SeriesResult
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
NO_HEATMAP = ("no Secondary Capture: the series was judged without a heat map (an ONNX weights file cannot give "
              "one; use the .safetensors weights)")
RESULTS_VERSION = "2"  # in every instance UID: results whose content changed for the same slices are new instances


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


def _source_file(prediction: Prediction) -> str:
    return prediction.file or prediction.path  # a slice of a multi-frame file names its file


def _with_type2(header: Any) -> Any:
    """A copy of a source header with the patient and study modules' type 2 elements present
    (empty when unknown: converted files often lack them); the source is left as it was."""
    copied = copy.deepcopy(header)
    for keyword in PATIENT_AND_STUDY:
        if keyword not in copied:
            setattr(copied, keyword, "")
    return copied


@dataclass
class SeriesResults:
    """The DICOM results of one series: build them with ``dicom_results``, save with ``save``."""

    result: SeriesResult
    sr: Any  # highdicom Comprehensive3DSR
    capture: Any | None  # highdicom SCImage; None: no slice classified, no heat map, or it cannot be oriented
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


def dicom_results(
    series: DicomSeries, result: SeriesResult, model: ModelIdentity, previous: list[Any] | None = None
) -> SeriesResults:
    """The SR and Secondary Capture of one series from what is already known: the headers read
    with the series, the verdict and the key slice's heat map (``Classifier.predict_series`` with
    ``explain``). Reads no file and runs no model. ``previous``: SRs this one replaces (an earlier
    verdict on fewer of the series' instances), referenced so that a viewer shows the newest."""
    if series.series_uid is None or not result.slices:
        raise InvalidImageError(f"{series.path}: DICOM results need a DICOM series with a SeriesInstanceUID")
    naming = _Naming(str(series.series_uid), model.sha256, _instances_digest(result.slices))
    referenced = result.key_predictions or [min(result.slices, key=lambda p: p.path)]
    sr = _structured_report(series, result, model, naming, referenced, previous or [])
    if result.key_heatmap is not None:
        capture, note = _capture(series, result, naming)
    else:
        capture, note = None, None if result.shown_slice() is None else NO_HEATMAP
    return SeriesResults(result, sr, capture, note)


@dataclass(frozen=True)
class _Naming:
    """UIDs from the source series and the weights: series UIDs (``stable``) stay the same when the
    series is read again, so each version of the result lands in one series; instance UIDs also
    depend on the instances read, so the same slices give the same instance (a PACS keeps one
    copy) and a series that grew gives a new one."""

    series_uid: str
    sha256: str
    instances: str

    def uid(self, what: str, stable: bool = False) -> str:
        parts = [self.series_uid, self.sha256, what]
        return _uid(*parts) if stable else _uid(*parts, self.instances, RESULTS_VERSION)


def _structured_report(
    series: DicomSeries, result: SeriesResult, model: ModelIdentity, naming: _Naming,
    referenced: list[Prediction], previous: list[Any],
) -> Any:
    headers, sources = _sources(series, referenced)
    finding = _finding(result.verdict.label)
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=naming.uid("tracking"), identifier="braintumor series verdict"
        ),
        algorithm_id=hd.sr.AlgorithmIdentification(
            name=f"braintumor {model.name}", version=model.version,
            parameters=[f"weights {model.weights}", f"sha256 {model.sha256}"],
        ),
        finding_type=finding,
        finding_sites=[hd.sr.FindingSite(_code("SCT", "12738006", "Brain"))],
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(VERDICT, finding)],
        measurements=_measurements(result),
        source_images=sources,
    )
    group[0].ContentSequence.append(
        hd.sr.TextContentItem(_code("DCM", "121106", "Comment"), _comment(result), relationship_type="CONTAINS")
    )
    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(model), procedure_reported=_code("LN", "24590-2", "MR Brain"),
        imaging_measurements=[group],
    )
    return hd.sr.Comprehensive3DSR(
        evidence=headers, content=report[0], series_instance_uid=naming.uid("sr series", stable=True),
        series_number=SR_SERIES_NUMBER, sop_instance_uid=naming.uid("sr"),
        instance_number=len(previous) + 1, manufacturer=MANUFACTURER,
        series_description="braintumor series verdict", is_complete=True, previous_versions=previous or None,
    )


def _measurements(result: SeriesResult) -> list[Any]:
    """The mean probability of each class over the slices read, and the slice counts."""
    measurements = [
        hd.sr.Measurement(name=_code(SCHEME, f"P-{name}", f"Probability of {MEANINGS.get(name, name)}"),
                          value=round(float(value), 6), unit=_code("UCUM", "1", "no units"))
        for name, value in result.mean_probabilities.items()
    ]
    measurements += [
        hd.sr.Measurement(name=_code(SCHEME, f"N-{key}", meaning),
                          value=len(result.slices) if key == "n_slices" else result.count(key),
                          unit=_code("UCUM", "{slices}", "slices"))
        for key, meaning in COUNTS.items()
    ]
    return measurements


def _observation_context(model: ModelIdentity) -> Any:
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=_uid("braintumor device", model.sha256), name="braintumor",
        manufacturer_name=MANUFACTURER, model_name=f"{model.name} {model.sha256[:12]}",
    )
    observer = hd.sr.ObserverContext(observer_type=_code("DCM", "121007", "Device"),
                                     observer_identifying_attributes=device)
    return hd.sr.ObservationContext(observer_device_context=observer)


def _capture(series: DicomSeries, result: SeriesResult, naming: _Naming) -> tuple[Any | None, str | None]:
    """(the Secondary Capture, None), or (None, why there is none): the key slice at its own size
    with the Grad-CAM overlay computed with the verdict, and a caption."""
    from ..inference.explain import overlay

    explanation = result.key_heatmap
    shown = explanation.prediction
    header = _with_type2(series.header_of(_source_file(shown)))
    orientation = _patient_orientation(header)
    if orientation is None:
        return None, "no Secondary Capture: the source gives no ImageOrientationPatient to orient it by"
    picture = _captioned(overlay(explanation.pixels, explanation.heatmap), result, shown, explanation.target)
    capture = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=header, pixel_array=picture, photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="PATIENT", patient_orientation=orientation,
        series_instance_uid=naming.uid("sc series", stable=True),
        series_number=SC_SERIES_NUMBER, sop_instance_uid=naming.uid("sc"), instance_number=1,
        manufacturer=MANUFACTURER, series_description="braintumor Grad-CAM of the key slice",
    )
    return capture, None


def _sources(series: DicomSeries, referenced: list[Prediction]) -> tuple[list[Any], list[Any]]:
    """(one header per source file, the SR's references to the slices): a multi-frame file is
    referenced once, with the numbers (from 1) of its frames."""
    frames: dict[str, list[int]] = {}
    for prediction in referenced:
        frame = prediction.dicom.frame if prediction.dicom is not None else None
        frames.setdefault(_source_file(prediction), []).extend([] if frame is None else [frame + 1])
    headers = [_with_type2(series.header_of(source)) for source in frames]
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


def _finding(label: str) -> Any:
    return _code(SCHEME, label, MEANINGS.get(label, label))


def _comment(result: SeriesResult) -> str:
    from_images = "image estimate" in (result.kind.sequence_from, result.kind.plane_from)
    estimated = " (estimated from the images)" if from_images else ""
    looks = f"{result.kind.plane} {result.kind.sequence}{estimated}"
    verdict = result.verdict
    return f"{verdict.label}: {verdict.reason}. Series read as {looks} ({len(result.slices)} slices)."


def _instances_digest(predictions: list[Prediction]) -> str:
    names = sorted(f"{p.dicom.sop_instance_uid}#{p.dicom.frame}" if p.dicom else p.path for p in predictions)
    return hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]


def _captioned(picture: np.ndarray, result: SeriesResult, shown: Prediction, target: str | None) -> np.ndarray:
    """``picture`` with a black band above it that says what the series was called and why."""
    from PIL import Image, ImageDraw, ImageFont

    width = max(picture.shape[1], 256)
    font = ImageFont.load_default()
    lines = [
        f"Series: {result.verdict.label} ({result.count('confident')} of {len(result.slices)} slices confident)",
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
