"""What a radiology user points the tool at: image files, DICOM and NIfTI, folders and globs.

``expand_inputs`` turns command-line paths into a list of files; ``read_scan`` turns one file into
one or more named 2-D grey slices (a multi-frame DICOM gives one per frame, a NIfTI volume one per
axial slice). Every failure is an ``InvalidImageError`` naming the file and the reason.
"""

from __future__ import annotations

import glob
import io
import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..constants import IMAGE_EXTENSIONS, JUNK_NAMES, MAX_IMAGE_PIXELS
from ..errors import InvalidImageError, UnsupportedFileType
from .imaging import array_to_grey, colour_share, decode_image_and_colour, resize_grey

DICOM_EXTENSIONS = frozenset({".dcm", ".dicom"})
SUPPORTED_TYPES = "send JPEG, PNG, BMP, TIFF, WebP, DICOM or NIfTI"
NIFTI_SUFFIXES = (".nii", ".nii.gz")
# First bytes of JPEG, PNG, BMP and TIFF (both byte orders) files.
IMAGE_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM", b"II*\x00", b"MM\x00*")


@dataclass(frozen=True)
class Slice:
    """One 2-D grey picture from a file: ``source`` names it (``scan.dcm#frame=2``, ``vol.nii.gz#slice=40``)."""

    source: str
    pixels: np.ndarray  # (H, W) uint8
    path: str
    index: int | None = None  # frame or slice number, None for single images
    volume: bool = False  # True for the slices of a 3-D NIfTI volume
    colour_share: float = 0.0  # share of coloured pixels before the grey conversion (imaging.colour_share)
    header_refusal: str | None = None  # why the file's own header says it is no brain MRI (dicom_refusal)


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def _has_dicom_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def _is_scan_file(path: Path) -> bool:
    """Files a folder walk picks up: known extensions, or extensionless DICOM (as PACS exports)."""
    suffix = path.suffix.lower()
    if suffix in IMAGE_EXTENSIONS or suffix in DICOM_EXTENSIONS or _is_nifti(path):
        return True
    return suffix == "" and _has_dicom_magic(path)


def expand_inputs(arguments: list[str | Path]) -> list[Path]:
    """Files named directly, files under folders (recursively, sorted) and glob matches, in order.

    Files named directly are always kept, even when missing: reading them then fails with the
    reason, and the other inputs go on. A pattern that matches nothing is kept the same way.
    Folder walks skip hidden files and files of other types.
    """
    files: list[Path] = []
    for argument in arguments:
        text = str(argument)
        path = Path(text).expanduser()
        if path.is_dir():
            walked = []
            for directory, subdirectories, names in os.walk(path):
                subdirectories[:] = sorted(d for d in subdirectories if not d.startswith(".") and d not in JUNK_NAMES)
                walked.extend(Path(directory) / n for n in names if not n.startswith(".") and n not in JUNK_NAMES)
            files.extend(p for p in sorted(walked) if _is_scan_file(p))
        elif any(char in text for char in "*?[") and not path.exists():
            matches = sorted(Path(m) for m in glob.glob(os.path.expanduser(text), recursive=True))
            files.extend(m for m in matches if m.is_file())
            if not matches:
                files.append(path)  # reported by read_scan as "no such file", like any missing path
        else:
            files.append(path)  # a missing or unreadable file is reported when it is read
    return files


def _window_to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.clip((values - low) * (255.0 / (high - low)), 0, 255).round().astype(np.uint8)


# DICOM modalities that may hold an MRI slice: MR itself, and the catch-alls for other and secondary
# capture (screenshots, converted files). Any other (CT, CR, DX, US, NM, PT, SEG, RTDOSE...) is not MRI.
MRI_MODALITIES = frozenset({"MR", "OT", "SC"})
HEAD_WORDS = ("HEAD", "BRAIN", "SKULL", "CRAN", "NEURO", "CEREB")
MIN_FIELD_OF_VIEW_MM = 100.0  # a whole adult brain slice needs about 150-250 mm


def dicom_refusal(dataset: Any) -> str | None:
    """Why a DICOM file's header says it is not a whole brain MRI slice (None: it does not say
    so). Only what the header states is used; a missing tag refuses nothing."""
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


def _dicom_frames(source: Path | bytes, label: str) -> tuple[list[np.ndarray], list[float], str | None]:
    """Grey frames, each frame's colour share, and the header's refusal (``dicom_refusal``) of a
    DICOM file or its bytes (``label`` names it in errors)."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        dataset = pydicom.dcmread(io.BytesIO(source) if isinstance(source, bytes) else source)
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise InvalidImageError(f"{label}: not a readable DICOM file ({exc})") from None
    if "PixelData" not in dataset and "FloatPixelData" not in dataset and "DoubleFloatPixelData" not in dataset:
        raise InvalidImageError(f"{label}: DICOM file has no pixel data")
    rows, columns = int(dataset.get("Rows", 0)), int(dataset.get("Columns", 0))
    if rows * columns > MAX_IMAGE_PIXELS:
        raise InvalidImageError(f"{label}: {columns}x{rows} pixels exceeds the cap of {MAX_IMAGE_PIXELS:,}")
    try:
        array = dataset.pixel_array
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for codecs it lacks
        syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
        detail = f"transfer syntax {syntax.name if syntax else 'unknown'} is not supported" if syntax else str(exc)
        raise InvalidImageError(f"{label}: cannot decode DICOM pixels ({detail}: {type(exc).__name__})") from None
    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2"))
    frames_count = int(dataset.get("NumberOfFrames", 1) or 1)
    frames = array if frames_count > 1 else array[None]
    results, colour = [], []
    for frame in frames:
        if photometric in ("RGB", "YBR_FULL", "YBR_FULL_422") or frame.ndim == 3:
            rgb = frame.astype(np.uint8) if frame.dtype != np.uint8 else frame  # pydicom gives YBR as RGB
            results.append(array_to_grey(rgb))
            colour.append(colour_share(rgb))
            continue
        values = apply_modality_lut(frame, dataset).astype(np.float64)
        if "WindowCenter" in dataset and "WindowWidth" in dataset:
            values = apply_voi_lut(values, dataset, index=0).astype(np.float64)
        grey = _window_to_uint8(values, float(values.min()), float(values.max()))
        results.append(255 - grey if photometric == "MONOCHROME1" else grey)
        colour.append(0.0)
    return results, colour, dicom_refusal(dataset)


def _nifti_slices(source: Path | bytes, label: str) -> tuple[list[np.ndarray], bool]:
    """Grey slices of a NIfTI file or its bytes (gzip-compressed or not), and whether it is a volume."""
    import gzip

    import nibabel as nib

    try:
        if isinstance(source, bytes):
            raw = gzip.decompress(source) if source[:2] == b"\x1f\x8b" else source
            image = nib.Nifti1Image.from_bytes(raw)
        else:
            image = nib.load(str(source))
        image = nib.as_closest_canonical(image) if len(image.shape) >= 3 else image
        data = np.asarray(image.dataobj, dtype=np.float32)
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for damaged files
        raise InvalidImageError(f"{label}: not a readable NIfTI file ({type(exc).__name__}: {exc})") from None
    data = np.squeeze(data)
    if data.ndim == 2:
        low, high = np.percentile(data, [0.5, 99.5])
        return [np.flipud(_window_to_uint8(data, float(low), float(high)).T)], False
    if data.ndim != 3:
        raise InvalidImageError(f"{label}: NIfTI image has {data.ndim} dimensions; expected a 2-D slice or 3-D volume")
    if data.shape[0] * data.shape[1] > MAX_IMAGE_PIXELS:
        raise InvalidImageError(f"{label}: slices of {data.shape[0]}x{data.shape[1]} exceed the pixel cap")
    # One intensity window for the whole volume keeps slices comparable; the canonical (RAS+)
    # orientation puts the axial axis last, and the transpose shows anterior at the top.
    low, high = np.percentile(data, [0.5, 99.5])
    return [np.flipud(_window_to_uint8(data[:, :, k], float(low), float(high)).T) for k in range(data.shape[2])], True


def _looks_like_nifti(name: str, head: bytes) -> bool:
    """A NIfTI name, or the NIfTI-1/2 magic in an uncompressed header."""
    return name.lower().endswith(NIFTI_SUFFIXES) or head[344:348] in (b"n+1\x00", b"ni1\x00") or head[4:8] == b"n+2\x00"


def _gunzipped_head(head: bytes, source: str | Path | bytes) -> bytes:
    """The first 352 bytes inside a gzip stream (a NIfTI header), inflating no more than that."""
    import zlib

    if not isinstance(source, bytes):
        with open(source, "rb") as handle:
            source = handle.read(1 << 16)
    try:
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(source[: 1 << 16], 352)
    except zlib.error:
        return head


def scan_kind(source: str | Path | bytes, name: str | None = None) -> str | None:
    """'dicom', 'nifti' or 'image' when a file (or its bytes, called ``name``) looks like a type
    ``read_scan`` reads, else None.

    Decided from content (DICOM preamble, the image header Pillow recognises) and, for NIfTI, the
    name or the header's magic; it reads only headers, so a file of a known type can still turn
    out to be damaged when ``read_scan`` decodes it. Lets a service tell "unsupported type" from
    "corrupt file".
    """
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, bytes):
        name, head = name or "", source[:352]
    else:
        name = str(source)
        try:
            with open(source, "rb") as handle:
                head = handle.read(352)
        except OSError:
            return None
    if _looks_like_nifti(name, head if head[:2] != b"\x1f\x8b" else _gunzipped_head(head, source)):
        return "nifti"
    if Path(name).suffix.lower() in DICOM_EXTENSIONS or head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(IMAGE_SIGNATURES) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return "image"  # a known image header, even if the rest turns out truncated
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source):
            return "image"
    except Image.DecompressionBombError:
        return "image"  # an image, refused by read_scan with the reason
    except (UnidentifiedImageError, OSError, ValueError):
        return None


def read_scan(source: str | Path | bytes, name: str | None = None) -> list[Slice]:
    """Every 2-D slice of one file, or of a file's bytes called ``name`` (an upload: nothing is
    written to disk), named for reports.

    Raises:
        InvalidImageError: the file is unreadable, empty, of an unknown type or damaged.
    """
    origin: Path | bytes
    if isinstance(source, bytes):
        origin, label = source, name or "<bytes>"
        if not source:
            raise InvalidImageError(f"{label}: file is empty")
        kind = scan_kind(source, label)
        if kind is None:
            raise UnsupportedFileType(f"{label}: unsupported file type ({SUPPORTED_TYPES})")
    else:
        origin = Path(source)
        label = str(origin)
        _check_readable(origin)
        kind = "nifti" if _is_nifti(origin) else "dicom" if _is_dicom_path(origin) else "image"
    if kind == "nifti":
        slices, volume = _nifti_slices(origin, label)
        if not volume:
            return [Slice(label, slices[0], label)]
        return [Slice(f"{label}#slice={k}", pixels, label, k, True) for k, pixels in enumerate(slices)]
    if kind == "dicom":
        frames, colour, refusal = _dicom_frames(origin, label)
        if len(frames) == 1:
            return [Slice(label, frames[0], label, colour_share=colour[0], header_refusal=refusal)]
        return [
            Slice(f"{label}#frame={k}", pixels, label, k, colour_share=colour[k], header_refusal=refusal)
            for k, pixels in enumerate(frames)
        ]
    pixels, colour = decode_image_and_colour(origin, label)
    return [Slice(label, pixels, label, colour_share=colour)]


def _is_dicom_path(path: Path) -> bool:
    return path.suffix.lower() in DICOM_EXTENSIONS or _has_dicom_magic(path)


def _check_readable(path: Path) -> None:
    if not path.is_file():
        reason = "is a folder" if path.is_dir() else "no such file or not readable"
        raise InvalidImageError(f"{path}: {reason}")
    try:
        if path.stat().st_size == 0:
            raise InvalidImageError(f"{path}: file is empty")
    except OSError as exc:
        raise InvalidImageError(f"{path}: cannot read file ({exc.strerror})") from None


@dataclass(frozen=True)
class ReadFailure:
    """An input that could not be read: its name and the one-line reason (names the input)."""

    source: str
    message: str


InputItem = str | Path | Slice | Any  # a path (file, folder, glob), a Slice already read, a PIL image or an array


def _read_path(path: Path, size: int | None) -> list[Slice] | ReadFailure:
    try:
        slices = read_scan(path)
    except InvalidImageError as exc:
        return ReadFailure(str(path), str(exc))
    return slices if size is None else [replace(s, pixels=resize_grey(s.pixels, size)) for s in slices]


def _read_memory(item: Any, number: int, size: int | None) -> list[Slice] | ReadFailure:
    """A PIL image or an array given in memory, named ``<image N>`` by its position."""
    from PIL import Image

    name = f"<image {number}>"
    try:
        array = np.asarray(item.convert("RGBA") if isinstance(item, Image.Image) and item.mode == "P" else item)
        grey = array_to_grey(array)
    except InvalidImageError as exc:
        return ReadFailure(name, f"{name}: {exc}")
    return [Slice(name, grey if size is None else resize_grey(grey, size), name, colour_share=colour_share(array))]


def _read_given(item: Slice, size: int | None) -> list[Slice]:
    return [item if size is None else replace(item, pixels=resize_grey(item.pixels, size))]


def read_inputs(items: Iterable[InputItem], workers: int = 2, size: int | None = None) -> Iterator[Slice | ReadFailure]:
    """Every slice of every input in input order (a failed input as a ``ReadFailure``), decoded by
    ``workers`` threads at most a few batches ahead, so memory stays flat however many files
    there are. ``size``: resize each slice to ``size`` x ``size`` while reading (None: keep)."""
    lookahead = 4 * workers + 8
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque[Future] = deque()

        def ready(limit: int) -> Iterator[Slice | ReadFailure]:
            while len(pending) > limit:
                result = pending.popleft().result()
                yield from ([result] if isinstance(result, ReadFailure) else result)

        for number, item in enumerate(items):
            if isinstance(item, (str, Path)):
                for path in expand_inputs([item]):
                    pending.append(pool.submit(_read_path, path, size))
                    yield from ready(lookahead)
            elif isinstance(item, Slice):  # keeps what reading found out: colour share, header
                pending.append(pool.submit(_read_given, item, size))
                yield from ready(lookahead)
            else:
                pending.append(pool.submit(_read_memory, item, number, size))
                yield from ready(lookahead)
        yield from ready(0)


def iter_slices(files: list[Path]) -> Iterator[Slice | InvalidImageError]:
    """Slices of each file in order; a file that fails yields its error instead, and the walk goes on."""
    for path in files:
        try:
            yield from read_scan(path)
        except InvalidImageError as exc:
            yield exc
