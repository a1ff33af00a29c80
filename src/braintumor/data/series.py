"""Where a DICOM slice belongs: its study, its series, its place in the series, and what the series
says it is (plane and sequence).

A PACS sends a series as many single-frame files, or as one multi-frame file. ``dicom_refs`` keeps
from a header what grouping, ordering and reporting need, so that the slices of one series can be
put back in order whatever order the files came in: by position along the slice normal
(ImagePositionPatient projected on the normal of ImageOrientationPatient), else by InstanceNumber.

The plane comes from ImageOrientationPatient (else from the description's words); the sequence from
the SeriesDescription's words (else from the acquisition tags: scanning sequence, TR, TE, TI and a
contrast agent). Both are guesses from what the header says, and each says where it came from.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

PLANES = ("axial", "coronal", "sagittal")
# The plane a slice is in is the patient axis its normal points along: x (left-right) sagittal,
# y (front-back) coronal, z (feet-head) axial. A normal further than this from every axis: oblique.
MIN_AXIS_COSINE = 0.8
# Words of a SeriesDescription, first match wins: FLAIR and contrast before T1 and T2.
SEQUENCE_WORDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("localizer", ("LOC", "LOCALIZER", "LOCALISER", "SCOUT", "SURVEY", "3PLANE", "TRIPLANE")),
    ("DWI", ("DWI", "DIFFUSION", "DIFF", "TRACE", "TRACEW", "DTI", "EPI_DIFF", "EP2D_DIFF", "MDDW", "RESOLVE")),
    ("ADC", ("ADC",)),
    ("SWI", ("SWI", "SWAN", "SWIP", "SUSCEPTIBILITY")),
    ("perfusion", ("PERFUSION", "DSC", "DCE", "ASL", "PWI")),
    ("FLAIR", ("FLAIR", "DARKFLUID", "DARK_FLUID")),
    ("T1C", ("+C", "C+", "POST", "GAD", "GD", "CONTRAST", "CE", "T1C", "T1CE", "T1GD", "T1POST")),
    ("T2*", ("T2*", "T2STAR", "HEMO")),
    ("T2", ("T2", "T2W", "T2WI", "TSE_T2", "T2_TSE")),
    ("T1", ("T1", "T1W", "T1WI", "MPRAGE", "SPGR", "BRAVO", "TFE", "FSPGR")),
    ("PD", ("PD", "PDW", "PROTON")),
)
PLANE_WORDS = {"axial": ("AX", "AXIAL", "TRA", "TRANS", "TRANSVERSE"), "coronal": ("COR", "CORONAL"),
               "sagittal": ("SAG", "SAGITTAL")}


@dataclass(frozen=True)
class DicomRef:
    """One DICOM slice's identity and place: what grouping, ordering and DICOM output need."""

    study_uid: str | None
    series_uid: str | None
    sop_instance_uid: str | None
    sop_class_uid: str | None
    instance_number: int | None
    frame: int | None  # frame number in a multi-frame file, None for a single-frame file
    position: float | None  # mm along the slice normal, from ImagePositionPatient
    description: str  # SeriesDescription, as sent
    plane: str  # axial, coronal, sagittal, oblique or unknown
    sequence: str  # T1, T1C, T2, FLAIR, DWI, ... or unknown (SEQUENCE_WORDS)
    sequence_source: str  # where the sequence was read: 'SeriesDescription', 'acquisition tags' or ''


def _floats(value: Any, count: int) -> np.ndarray | None:
    try:
        numbers = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return numbers if numbers.shape == (count,) and np.isfinite(numbers).all() else None


def slice_normal(orientation: Any) -> np.ndarray | None:
    """The unit normal of a slice from ImageOrientationPatient (row and column cosines)."""
    cosines = _floats(orientation, 6)
    if cosines is None:
        return None
    normal = np.cross(cosines[:3], cosines[3:])
    length = float(np.linalg.norm(normal))
    return normal / length if length > 1e-6 else None


def plane_of(normal: np.ndarray | None, description: str = "") -> str:
    """axial, coronal, sagittal or oblique from the normal; from the description's words without one."""
    if normal is None:
        words = _words(description)
        return next((plane for plane, names in PLANE_WORDS.items() if words & set(names)), "unknown")
    axis = int(np.argmax(np.abs(normal)))
    return ("sagittal", "coronal", "axial")[axis] if abs(normal[axis]) >= MIN_AXIS_COSINE else "oblique"


def _words(text: str) -> set[str]:
    upper = text.upper()
    words = set(re.split(r"[^A-Z0-9+*]+", upper)) | set(re.split(r"[^A-Z0-9+*_]+", upper))
    return {w for w in words if w} | {w.strip("+") for w in words if w.strip("+")} | _contrast_marks(upper)


def _contrast_marks(upper: str) -> set[str]:
    """'+C' and 'C+' written inside a word, as in 'T1+C' or 'AX T1 C+'."""
    return {mark for mark in ("+C", "C+") if mark in upper.replace(" ", "")}


def sequence_of(dataset: Any) -> tuple[str, str]:
    """(sequence, where it was read): diffusion from the tags that only diffusion images carry,
    else from the SeriesDescription's words, else from the acquisition tags (TR, TE, TI, contrast);
    ('unknown', '') when none says."""
    diffusion = _diffusion_from_tags(dataset)
    if diffusion:
        return diffusion, "diffusion tags"
    description = " ".join(str(dataset.get(k, "") or "") for k in ("SeriesDescription", "ProtocolName"))
    words = _words(description)
    for sequence, names in SEQUENCE_WORDS:
        if words & set(names):
            if sequence == "T1C" and words & {"T2", "FLAIR"}:
                continue  # a post-contrast FLAIR or T2: the later words decide
            return sequence, "SeriesDescription"
    from_tags = _sequence_from_tags(dataset)
    return (from_tags, "acquisition tags") if from_tags else ("unknown", "")


def _number(dataset: Any, keyword: str) -> float | None:
    try:
        value = dataset.get(keyword)
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _diffusion_from_tags(dataset: Any) -> str | None:
    """DWI or ADC from ImageType's values or a non-zero DiffusionBValue (vendors' series names
    for diffusion vary too much to rely on)."""
    image_type = {str(v).upper() for v in (dataset.get("ImageType") or [])}
    if image_type & {"ADC", "EADC", "FA"}:
        return "ADC"
    b_value = _number(dataset, "DiffusionBValue")
    if image_type & {"DIFFUSION", "TRACEW"} or (b_value is not None and b_value > 0):
        return "DWI"
    return None


def _sequence_from_tags(dataset: Any) -> str | None:
    """Textbook contrast weighting from TR, TE and TI (ms); a contrast agent makes T1 into T1C."""
    tr, te, ti = (_number(dataset, k) for k in ("RepetitionTime", "EchoTime", "InversionTime"))
    scanning = str(dataset.get("ScanningSequence", "") or "").upper()
    if "IR" in scanning and ti is not None and ti >= 1500:
        return "FLAIR"
    if tr is None or te is None:
        return None
    contrast = bool(str(dataset.get("ContrastBolusAgent", "") or "").strip())
    if tr < 1000 and te < 30:
        return "T1C" if contrast else "T1"
    if tr >= 2000 and te >= 80:
        return "T2"
    if tr >= 2000 and te < 40:
        return "PD"
    return None


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _frame_geometry(dataset: Any, frames: int) -> tuple[list[Any], Any]:
    """Each frame's ImagePositionPatient and the orientation, from an enhanced multi-frame header's
    functional groups (per frame, else shared) or from the plain header."""
    per_frame = dataset.get("PerFrameFunctionalGroupsSequence") or []
    shared = (dataset.get("SharedFunctionalGroupsSequence") or [None])[0]
    orientation = dataset.get("ImageOrientationPatient")
    if orientation is None:
        for group in (shared, *(per_frame[:1])):
            planes = group.get("PlaneOrientationSequence") if group is not None else None
            if planes:
                orientation = planes[0].get("ImageOrientationPatient")
                break
    positions = [dataset.get("ImagePositionPatient")] * frames
    if len(per_frame) == frames:
        positions = [(g.get("PlanePositionSequence") or [{}])[0].get("ImagePositionPatient") for g in per_frame]
    return positions, orientation


def orientation_of(dataset: Any) -> Any:
    """ImageOrientationPatient of a plain or an enhanced multi-frame header (None: not given)."""
    return _frame_geometry(dataset, 1)[1]


def dicom_refs(dataset: Any, frames: int) -> list[DicomRef]:
    """One ``DicomRef`` per frame of a DICOM header (a single-frame file: one, with frame None)."""
    positions, orientation = _frame_geometry(dataset, frames)
    normal = slice_normal(orientation)
    description = str(dataset.get("SeriesDescription", "") or "").strip()
    sequence, source = sequence_of(dataset)
    common = {
        "study_uid": _uid(dataset, "StudyInstanceUID"), "series_uid": _uid(dataset, "SeriesInstanceUID"),
        "sop_instance_uid": _uid(dataset, "SOPInstanceUID"), "sop_class_uid": _uid(dataset, "SOPClassUID"),
        "instance_number": _int_or_none(dataset.get("InstanceNumber")), "description": description,
        "plane": plane_of(normal, description), "sequence": sequence, "sequence_source": source,
    }
    refs = []
    for k, position in enumerate(positions):
        point = _floats(position, 3) if position is not None else None
        along = float(point @ normal) if point is not None and normal is not None else None
        refs.append(DicomRef(frame=k if frames > 1 else None, position=along, **common))
    return refs


def _uid(dataset: Any, keyword: str) -> str | None:
    value = str(dataset.get(keyword, "") or "").strip()
    return value or None


def series_order_key(refs: list[DicomRef | None]) -> list[tuple]:
    """Sort keys that put a series' slices in anatomical order: by position along the normal when
    every slice has one, else by InstanceNumber, then frame (a missing ref sorts by arrival)."""
    by_position = all(r is not None and r.position is not None for r in refs)
    keys = []
    for arrival, ref in enumerate(refs):
        if ref is None:
            keys.append((0.0, arrival))
        elif by_position:
            keys.append((ref.position, ref.frame or 0, arrival))
        else:
            keys.append((float(ref.instance_number or 0), ref.frame or 0, arrival))
    return keys


def most_common(values: list[str], default: str = "unknown") -> str:
    """The value most slices of a series agree on (the first seen among equals)."""
    counted = Counter(v for v in values if v and v != default)
    return counted.most_common(1)[0][0] if counted else default


def series_location(files: list[str], series_uid: str | None) -> str:
    """How a series is named to a person: its file when it has one (a volume, a multi-frame file),
    else the folder its files share, else its UID (files from nowhere in common, or uploads)."""
    names = sorted(set(files))
    if len(names) == 1:
        return names[0]
    try:
        shared = os.path.commonpath(names)
    except ValueError:  # absolute and relative names together
        shared = ""
    return shared or f"series {series_uid}"
