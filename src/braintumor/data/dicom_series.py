"""A DICOM series as data: every instance read once (one ``dcmread``), its header and its frames
kept together, so classifying, reporting and drawing the result never open a file again.

``read_dicom_series`` groups files (paths, or bytes as a DICOM node or an upload receives them) by
StudyInstanceUID and SeriesInstanceUID; a ``DicomSeries`` gives its slices in anatomical order
(``series.series_order_key``) and the header each slice came from. The pattern is MONAI Deploy's
``DICOMSeries`` of SOP instances, without its study and selection layers.
"""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InvalidImageError
from .inputs import ReadFailure, Slice, check_readable, dicom_slices, read_guarded
from .medical import read_dicom
from .series import series_location, series_order_key

DicomSource = Path | tuple[str, bytes]  # a file, or an instance's bytes with the name to call it by


@dataclass(frozen=True)
class DicomInstance:
    """One SOP instance (a file), read once: its header without pixel data, and its frames as grey
    slices at their own size."""

    source: str
    header: Any  # pydicom Dataset
    slices: tuple[Slice, ...]


@dataclass(frozen=True)
class DicomSeries:
    """The instances of one series, in the order they came; ``slices`` puts them in place."""

    study_uid: str | None
    series_uid: str | None
    instances: tuple[DicomInstance, ...]

    @property
    def slices(self) -> list[Slice]:
        """Every frame of every instance in anatomical order (by position along the slice normal,
        else InstanceNumber; see ``series.series_order_key``)."""
        slices = [s for instance in self.instances for s in instance.slices]
        keys = series_order_key([s.dicom for s in slices])
        return [s for _, s in sorted(zip(keys, slices, strict=True), key=lambda pair: pair[0])]

    def header_of(self, source: str) -> Any:
        """The header of the instance read from ``source`` (a slice's ``path``)."""
        for instance in self.instances:
            if instance.source == source:
                return instance.header
        raise KeyError(f"{source}: not an instance of series {self.series_uid}")

    @property
    def path(self) -> str:
        """The file of a one-file series, else the folder its files share (the UID without one)."""
        return series_location([i.source for i in self.instances], self.series_uid)


def read_instance(source: DicomSource) -> DicomInstance:
    """One DICOM file or its bytes, read once.

    Raises:
        InvalidImageError: unreadable, not DICOM, damaged or over the budget (one line, named).
    """
    name, origin = (source[0], source[1]) if isinstance(source, tuple) else (str(source), source)

    def read() -> DicomInstance:
        if isinstance(origin, Path):
            check_readable(origin)
        image = read_dicom(origin, name)
        return DicomInstance(name, image.header, tuple(dicom_slices(image, name)))

    return read_guarded(name, read)


def _read_or_fail(source: DicomSource) -> DicomInstance | ReadFailure:
    try:
        return read_instance(source)
    except InvalidImageError as exc:
        name = source[0] if isinstance(source, tuple) else str(source)
        return ReadFailure(name, str(exc))


def read_dicom_series(
    sources: Iterable[DicomSource], workers: int = 2
) -> tuple[list[DicomSeries], list[ReadFailure]]:
    """The series of ``sources`` (in order of first appearance) and the files that could not be
    read, each read once by ``workers`` threads. An instance without a SeriesInstanceUID is a
    series of its own."""
    groups: dict[tuple[str, str, str], list[DicomInstance]] = {}
    failures: list[ReadFailure] = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for result in pool.map(_read_or_fail, list(sources)):
            if isinstance(result, ReadFailure):
                failures.append(result)
                continue
            ref = result.slices[0].dicom
            key = (("series", ref.study_uid or "", ref.series_uid) if ref is not None and ref.series_uid
                   else ("file", "", result.source))
            groups.setdefault(key, []).append(result)
    return [_series_of(found) for found in groups.values()], failures


def _series_of(instances: list[DicomInstance]) -> DicomSeries:
    ref = instances[0].slices[0].dicom
    return DicomSeries(ref.study_uid if ref else None, ref.series_uid if ref else None, tuple(instances))
