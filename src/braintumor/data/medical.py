"""DICOM and NIfTI files to grey slices, within one budget per input checked before decoding.

A hostile or damaged file must cost at most a bounded amount of memory and time and end in a
one-line reason, never a traceback: every size a header claims (rows, columns, frames, voxels) is
checked against ``MAX_SLICE_PIXELS`` and ``MAX_INPUT_VOXELS`` before pixel data is decoded, and
every compressed stream we inflate ourselves (gzip NIfTI uploads, deflated DICOM) is inflated no
further than ``MAX_INFLATED_BYTES``. Header values that only affect display (a window of width 0,
text where a number belongs) fall back to the slice's own range; values that change what the
pixels mean (rescale slope and intercept) fail the file with the tag named.
"""

from __future__ import annotations

import io
import logging
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..constants import MAX_IMAGE_PIXELS
from ..errors import InvalidImageError
from .imaging import array_to_grey, colour_share
from .series import DicomRef, dicom_refs

MAX_SLICE_PIXELS = MAX_IMAGE_PIXELS  # one slice or frame
MAX_INPUT_VOXELS = 128 * 2**20  # all slices and frames of one input (512 x 512 x 512)
MAX_INPUT_SLICES = 1024  # slices and frames of one input: each becomes a 224 x 224 slice to classify
MAX_STORED_BYTES = 512 * 2**20  # all pixel data of one input at its stored precision (64-bit floats count 8)
MAX_INFLATED_BYTES = 1 << 30  # what one compressed input may inflate to
MAX_FILE_BYTES = 1 << 30  # one file on disk, checked before it is read
DEFLATED_SYNTAX = "1.2.840.10008.1.2.1.99"
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")

# pydicom logs a full traceback for every codec it lacks, and warns about every invalid header value
# it meets; the reason that matters reaches the user in one line, with the file named.
warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\.|$)")


def _quiet_pydicom() -> Any:
    """pydicom, with its logger silenced (importing pydicom sets that logger's level, so this runs
    after the import)."""
    import pydicom

    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    return pydicom

# DICOM modalities that may hold an MRI slice: MR itself, and the catch-alls for other and secondary
# capture (screenshots, converted files). Any other (CT, CR, DX, US, NM, PT, SEG, RTDOSE...) is not MRI.
MRI_MODALITIES = frozenset({"MR", "OT", "SC"})
HEAD_WORDS = ("HEAD", "BRAIN", "SKULL", "CRAN", "NEURO", "CEREB")
MIN_FIELD_OF_VIEW_MM = 100.0  # a whole adult brain slice needs about 150-250 mm


def check_budget(label: str, slice_pixels: int, total: int, slices: int = 1, bytes_per_voxel: int = 1) -> None:
    """Refuse an input whose claimed size is over the budget, naming the limit: ``slices`` slices or
    frames of ``slice_pixels`` pixels, ``total`` pixels in all (samples included), each stored in
    ``bytes_per_voxel`` bytes. Called with the header's figures, before any pixel is decoded."""
    if slices > MAX_INPUT_SLICES:
        raise InvalidImageError(
            f"{label}: {slices:,} slices or frames is over the limit of {MAX_INPUT_SLICES:,} per input"
        )
    if slice_pixels > MAX_SLICE_PIXELS:
        raise InvalidImageError(
            f"{label}: a slice of {slice_pixels:,} pixels is over the limit of {MAX_SLICE_PIXELS:,}"
        )
    if total > MAX_INPUT_VOXELS:
        raise InvalidImageError(
            f"{label}: {total:,} pixels in all slices and frames is over the limit of {MAX_INPUT_VOXELS:,} per input"
        )
    if total * bytes_per_voxel > MAX_STORED_BYTES:
        raise InvalidImageError(
            f"{label}: {total * bytes_per_voxel / 2**20:,.0f} MiB of {8 * bytes_per_voxel}-bit pixel data is over "
            f"the limit of {MAX_STORED_BYTES >> 20} MiB per input"
        )


def inflate(data: bytes, label: str, wbits: int) -> bytes:
    """``data`` decompressed (``wbits`` as zlib takes it: 31 gzip, -15 raw deflate), refusing it as
    soon as the output passes ``MAX_INFLATED_BYTES``: nothing larger is ever held in memory."""
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(data, MAX_INFLATED_BYTES + 1)
    except zlib.error as exc:
        raise InvalidImageError(f"{label}: damaged compressed data ({exc})") from None
    if len(out) > MAX_INFLATED_BYTES or inflater.unconsumed_tail:
        raise _over_inflation_limit(label)
    return out


def _over_inflation_limit(label: str) -> InvalidImageError:
    limit = f"{MAX_INFLATED_BYTES >> 20} MiB" if MAX_INFLATED_BYTES >= 1 << 20 else f"{MAX_INFLATED_BYTES} bytes"
    return InvalidImageError(f"{label}: decompresses to more than the limit of {limit} per input")


def check_inflated_size(data: bytes, label: str, wbits: int, chunk: int = 16 << 20) -> None:
    """Refuse compressed ``data`` that inflates past ``MAX_INFLATED_BYTES``, counting the output a
    chunk at a time and keeping none of it: checking costs ``chunk`` bytes of memory, not the
    inflated size."""
    inflater, produced, pending = zlib.decompressobj(wbits), 0, data
    try:
        while pending and produced <= MAX_INFLATED_BYTES:
            produced += len(inflater.decompress(pending, chunk))
            pending = inflater.unconsumed_tail
    except zlib.error as exc:
        raise InvalidImageError(f"{label}: damaged compressed data ({exc})") from None
    if produced > MAX_INFLATED_BYTES:
        raise _over_inflation_limit(label)


def window_to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    if not high > low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.clip((values - low) * (255.0 / (high - low)), 0, 255).round().astype(np.uint8)


# ---------------------------------------------------------------- DICOM


def dicom_refusal(dataset: Any) -> str | None:
    """Why a DICOM file's header says it is not a whole brain MRI slice (None: it does not say
    so). Only what the header states is used; a missing or unreadable tag refuses nothing."""
    modality = str(dataset.get("Modality", "") or "").strip().upper()
    if modality and modality not in MRI_MODALITIES:
        return f"not MRI: its DICOM header says modality {modality}"
    body_part = str(dataset.get("BodyPartExamined", "") or "").strip().upper()
    if body_part and not any(word in body_part for word in HEAD_WORDS):
        return f"not the head: its DICOM header says body part {body_part}"
    try:
        row_mm, column_mm = (float(v) for v in dataset.get("PixelSpacing") or ())
        height, width = int(dataset.Rows) * row_mm, int(dataset.Columns) * column_mm
    except (TypeError, ValueError, AttributeError):
        return None
    if 0 < max(height, width) < MIN_FIELD_OF_VIEW_MM:
        return (
            f"too small for a whole brain slice: its DICOM header gives a {width:.0f} x {height:.0f} mm field of view"
        )
    return None


def _deflated_body(data: bytes) -> bytes | None:
    """The compressed body of a Deflated Explicit VR Little Endian file (None for any other): the
    file meta group, whose length its first element gives, names the transfer syntax."""
    if data[128:132] != b"DICM" or data[132:138] != b"\x02\x00\x00\x00UL":
        return None
    body_start = 144 + int.from_bytes(data[140:144], "little")
    return data[body_start:] if DEFLATED_SYNTAX.encode() in data[132:body_start] else None


def _read_dataset(source: Path | bytes, label: str, header_only: bool = False) -> Any:
    pydicom = _quiet_pydicom()
    from pydicom.errors import InvalidDicomError

    data = source if isinstance(source, bytes) else source.read_bytes()
    body = _deflated_body(data)
    if body is not None:
        check_inflated_size(body, label, -15)  # refuses a deflate bomb before pydicom inflates it all
    try:
        return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=header_only)
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, AttributeError, TypeError) as exc:
        raise InvalidImageError(f"{label}: not a readable DICOM file ({exc})") from None


def _header_int(dataset: Any, keyword: str, default: int, label: str) -> int:
    try:
        return int(dataset.get(keyword, default) or default)
    except (TypeError, ValueError):
        raise InvalidImageError(f"{label}: DICOM header has an invalid {keyword} ({dataset.get(keyword)!r})") from None


def dicom_header(data: bytes, label: str) -> Any:
    """The header of a DICOM instance (file-format bytes, as a DICOM node receives it), read within
    the budget without decoding a pixel: a deflated body is inflated no further than
    ``MAX_INFLATED_BYTES``, and a claimed image size (rows, columns, frames, bits) is checked as
    for decoding.

    Raises:
        InvalidImageError: unreadable, a deflate bomb, or an image over the budget.
    """
    dataset = _read_dataset(data, label, header_only=True)
    if "Rows" in dataset or "NumberOfFrames" in dataset:
        _check_image_size(dataset, label)
    return dataset


def _check_pixel_header(dataset: Any, label: str) -> int:
    """The frame count, once the header's image size is sane and within the budget."""
    if not any(keyword in dataset for keyword in PIXEL_KEYWORDS):
        syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
        if syntax is not None and getattr(syntax, "is_little_endian", True) is False:
            # Read as big endian, little-endian data parses as elements that never reach the pixels.
            raise InvalidImageError(f"{label}: no pixel data found when read as its declared transfer syntax "
                                    f"{syntax.name}; the file meta may name the wrong syntax")
        raise InvalidImageError(f"{label}: DICOM file has no pixel data")
    return _check_image_size(dataset, label)


def _check_image_size(dataset: Any, label: str) -> int:
    """The frame count, once the header's rows, columns, frames and bits are sane and the image
    they claim is within the budget (``check_budget``)."""
    rows, columns = _header_int(dataset, "Rows", 0, label), _header_int(dataset, "Columns", 0, label)
    frames = _header_int(dataset, "NumberOfFrames", 1, label)
    samples = _header_int(dataset, "SamplesPerPixel", 1, label)
    bits = _header_int(dataset, "BitsAllocated", 0, label)
    for name, value in (("Rows", rows), ("Columns", columns), ("NumberOfFrames", frames)):
        if value < 1:
            raise InvalidImageError(f"{label}: DICOM header gives {name} = {value}")
    if bits not in (1, 8, 16, 32, 64):
        raise InvalidImageError(f"{label}: DICOM header gives BitsAllocated = {bits}")
    check_budget(label, rows * columns, rows * columns * frames * max(samples, 1), frames, max(bits // 8, 1))
    return frames


def _pixel_array(dataset: Any, label: str) -> np.ndarray:
    try:
        return dataset.pixel_array
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for codecs it lacks and damage
        syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
        if syntax is not None and syntax.is_compressed:
            reason = f"transfer syntax {syntax.name} cannot be decoded here ({type(exc).__name__})"
        else:
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'damaged pixel data'}"
        raise InvalidImageError(f"{label}: cannot decode DICOM pixels ({reason})") from None


def _grey_frame(frame: np.ndarray, dataset: Any, label: str) -> np.ndarray:
    """One monochrome frame through the modality LUT (its failure fails the file: it changes what
    the values mean) and the VOI window (its failure falls back to the frame's own range)."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        values = np.asarray(apply_modality_lut(frame, dataset), dtype=np.float64)
    except Exception:  # noqa: BLE001 - bad RescaleSlope/Intercept or LUT values
        slope, intercept = dataset.get("RescaleSlope"), dataset.get("RescaleIntercept")
        raise InvalidImageError(
            f"{label}: DICOM header has an invalid rescale (RescaleSlope {slope!r}, RescaleIntercept {intercept!r})"
        ) from None
    if "WindowCenter" in dataset and "WindowWidth" in dataset:
        try:
            windowed = np.asarray(apply_voi_lut(values, dataset, index=0), dtype=np.float64)
            if np.isfinite(windowed).all() and windowed.max() > windowed.min():
                values = windowed
        except Exception:  # noqa: BLE001 - a display setting we cannot apply; the values themselves are fine
            pass
    finite = values[np.isfinite(values)]
    if not finite.size:
        raise InvalidImageError(f"{label}: DICOM pixels hold no finite value")
    grey = window_to_uint8(np.nan_to_num(values, nan=finite.min()), float(finite.min()), float(finite.max()))
    return 255 - grey if str(dataset.get("PhotometricInterpretation", "")) == "MONOCHROME1" else grey


@dataclass(frozen=True)
class DicomImage:
    """A DICOM file read once: its header (pixel data dropped once decoded: what results reference
    and copy), its frames as grey slices at their own size with each one's colour share, the
    header's own refusal (``dicom_refusal``) and each frame's place in its series."""

    header: Any
    frames: list[np.ndarray]
    colour: list[float]
    refusal: str | None
    refs: list[DicomRef]


def read_dicom(source: Path | bytes, label: str) -> DicomImage:
    """A DICOM file or its bytes (``label`` names it in errors), parsed once and decoded within
    the budget."""
    dataset = _read_dataset(source, label)
    frames_count = _check_pixel_header(dataset, label)
    array = _pixel_array(dataset, label)
    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2"))
    frames, colour = [], []
    for frame in array if frames_count > 1 else array[None]:
        if photometric in ("RGB", "YBR_FULL", "YBR_FULL_422") or frame.ndim == 3:
            rgb = frame.astype(np.uint8) if frame.dtype != np.uint8 else frame  # pydicom gives YBR as RGB
            frames.append(array_to_grey(rgb))
            colour.append(colour_share(rgb))
        else:
            frames.append(_grey_frame(frame, dataset, label))
            colour.append(0.0)
    for keyword in PIXEL_KEYWORDS:  # the grey frames are kept; the stored pixels (and pydicom's array) go
        if keyword in dataset:
            del dataset[keyword]
    return DicomImage(dataset, frames, colour, dicom_refusal(dataset), dicom_refs(dataset, frames_count))


# ---------------------------------------------------------------- NIfTI


NIFTI2_MAGICS = (b"n+2\x00", b"ni2\x00")  # at byte 4 of a NIfTI-2 header (NIfTI-1 keeps its magic at 344)


def _nifti_budget(shape: tuple[int, ...], bytes_per_voxel: int, label: str) -> None:
    """Refuse an image that is not 2-D or 3-D (unit axes aside) or is over the budget. Slices are
    cut along the canonical axial axis, which may be any stored one: the longest is counted."""
    shape = tuple(int(n) for n in shape if int(n) != 1)
    if len(shape) not in (2, 3):
        raise InvalidImageError(f"{label}: NIfTI image has {len(shape)} dimensions; expected a 2-D slice or 3-D volume")
    slices = max(shape) if len(shape) == 3 else 1
    check_budget(label, shape[0] * shape[1], int(np.prod(shape)), slices, max(bytes_per_voxel, 1))


def _check_nifti_bytes(head: bytes, label: str) -> type:
    """The nibabel image class for NIfTI bytes whose first (inflated) bytes are ``head``, once
    their header is within the budget: nothing past the header is inflated or read before."""
    import nibabel as nib

    nifti2 = head[4:8] in NIFTI2_MAGICS
    header = (nib.Nifti2Header if nifti2 else nib.Nifti1Header).from_fileobj(io.BytesIO(head))
    _nifti_budget(header.get_data_shape(), header.get_data_dtype().itemsize, label)
    return nib.Nifti2Image if nifti2 else nib.Nifti1Image


def _nifti_image(source: Path | bytes, label: str) -> Any:
    import nibabel as nib

    try:
        if isinstance(source, bytes):
            packed = source[:2] == b"\x1f\x8b"
            head = zlib.decompressobj(31).decompress(source[: 1 << 16], 544) if packed else source[:544]
            image_class = _check_nifti_bytes(head, label)
            return image_class.from_bytes(inflate(source, label, 31) if packed else source)
        return nib.load(str(source))
    except InvalidImageError:
        raise
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for damaged files
        raise InvalidImageError(f"{label}: not a readable NIfTI file ({type(exc).__name__}: {exc})") from None


def nifti_slices(source: Path | bytes, label: str) -> tuple[list[np.ndarray], bool, str | None]:
    """Grey slices of a NIfTI file or its bytes (gzip-compressed or not), whether it is a volume,
    and a note when non-finite voxels were left out of the intensity window."""
    import nibabel as nib

    image = _nifti_image(source, label)
    try:
        stored = image.get_data_dtype().itemsize
    except (TypeError, ValueError, AttributeError):
        stored = 8
    _nifti_budget(image.shape, stored, label)  # from the header: no voxel read yet
    try:
        image = nib.as_closest_canonical(image) if len(image.shape) >= 3 else image
        data = np.squeeze(np.asarray(image.dataobj, dtype=np.float32))
    except Exception as exc:  # noqa: BLE001 - truncated or damaged data
        raise InvalidImageError(f"{label}: not a readable NIfTI file ({type(exc).__name__}: {exc})") from None
    finite = np.isfinite(data)
    if not finite.any():
        raise InvalidImageError(f"{label}: NIfTI image holds no finite voxel")
    bad = int(data.size - finite.sum())
    note = f"{bad:,} NaN or infinite voxels left out of the intensity window (shown as background)" if bad else None
    # One intensity window for the whole volume keeps slices comparable; non-finite voxels are left out.
    low, high = (float(v) for v in np.percentile(data[finite] if bad else data, [0.5, 99.5]))
    if bad:
        data = data if data.flags.writeable else data.copy()
        data[~finite] = low  # in place: a large volume is not copied once more
    if data.ndim == 2:
        return [np.flipud(window_to_uint8(data, low, high).T)], False, note
    # The canonical (RAS+) orientation puts the axial axis last; the transpose shows anterior at the top.
    return [np.flipud(window_to_uint8(data[:, :, k], low, high).T) for k in range(data.shape[2])], True, note
