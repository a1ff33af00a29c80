"""What a radiology user points the tool at: image files, DICOM and NIfTI, folders and globs.

``expand_inputs`` turns command-line paths into a list of files; ``read_scan`` turns one file into
one or more named 2-D grey slices (a multi-frame DICOM gives one per frame, a NIfTI volume one per
axial slice). Every failure is an ``InvalidImageError`` naming the file and the reason.
"""

from __future__ import annotations

import glob
import io
import logging
import os
import stat
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from ..constants import IMAGE_EXTENSIONS, JUNK_NAMES
from ..errors import InvalidImageError, UnsupportedFileType, one_line, printable_name
from .imaging import array_to_grey, colour_share, decode_image_and_colour, resize_grey
from .medical import MAX_FILE_BYTES, DicomImage, nifti_slices, read_dicom
from .series import DicomRef

DICOM_EXTENSIONS = frozenset({".dcm", ".dicom"})
SUPPORTED_TYPES = "send JPEG, PNG, BMP, TIFF, WebP, DICOM or NIfTI"
NIFTI_SUFFIXES = (".nii", ".nii.gz")
# First bytes of JPEG, PNG, BMP and TIFF (both byte orders) files.
T = TypeVar("T")
IMAGE_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM", b"II*\x00", b"MM\x00*")


@dataclass(frozen=True)
class Slice:
    """One 2-D grey picture from a file: ``source`` names it (``scan.dcm#frame=2``, ``vol.nii.gz#slice=40``)."""

    source: str
    pixels: np.ndarray  # (H, W) uint8
    path: str
    index: int | None = None  # frame or slice number, None for single images
    volume: bool = False  # True for the slices of a 3-D NIfTI volume or the frames of a multi-frame DICOM
    colour_share: float = 0.0  # share of coloured pixels before the grey conversion (imaging.colour_share)
    header_refusal: str | None = None  # why the file's own header says it is no brain MRI (dicom_refusal)
    note: str | None = None  # something reading changed that the user should know (NaN voxels left out)
    dicom: DicomRef | None = None  # a DICOM slice's study, series and place in the series


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def _has_dicom_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def special_kind(path: Path) -> str | None:
    """What a path is when it is neither a regular file nor a folder (a FIFO, a device, a socket),
    after links: reading one would block or never end, so it is never opened. None otherwise."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return None
    kinds = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    return next((kind for test, kind in kinds if test(mode)), None)


def _is_scan_file(path: Path) -> bool:
    """Files a folder walk picks up: known extensions, or extensionless DICOM (as PACS exports).
    Special files are skipped with a warning line, never opened."""
    special = special_kind(path)
    if special is not None:
        logging.getLogger(__name__).warning("%s: skipped, it is %s, not a file", printable_name(str(path)), special)
        return False
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
    written to disk), named for reports. The one place where any reading failure, a decoder's own
    exception included, becomes an ``InvalidImageError`` of one line that names the input.

    Raises:
        InvalidImageError: the file is unreadable, empty, of an unknown type, damaged, or over the
            budget per input (``medical.MAX_INPUT_VOXELS``, ``MAX_INFLATED_BYTES``).
    """
    label = (name or "<bytes>") if isinstance(source, bytes) else str(source)
    return read_guarded(label, lambda: _read_scan(source, label))


def read_guarded(label: str, read: Callable[[], T]) -> T:
    """``read()``, with any failure (a decoder's own exception included) turned into an
    ``InvalidImageError`` of one line that names ``label``."""
    try:
        return read()
    except InvalidImageError as exc:
        raise type(exc)(one_line(str(exc))) from None
    except MemoryError:
        raise InvalidImageError(f"{label}: too large to decode in this process's memory") from None
    except Exception as exc:  # noqa: BLE001 - a decoder's own failure on a damaged or hostile file
        raise InvalidImageError(one_line(f"{label}: cannot read ({type(exc).__name__}: {exc})")) from None


def _read_scan(source: str | Path | bytes, label: str) -> list[Slice]:
    origin: Path | bytes
    if isinstance(source, bytes):
        origin = source
        if not source:
            raise InvalidImageError(f"{label}: file is empty")
        kind = scan_kind(source, label)
        if kind is None:
            raise UnsupportedFileType(f"{label}: unsupported file type ({SUPPORTED_TYPES})")
    else:
        origin = Path(source)
        check_readable(origin)
        kind = "nifti" if _is_nifti(origin) else "dicom" if is_dicom_path(origin) else "image"
    if kind == "nifti":
        slices, volume, note = nifti_slices(origin, label)
        if not volume:
            return [Slice(label, slices[0], label, note=note)]
        return [Slice(f"{label}#slice={k}", pixels, label, k, True, note=note) for k, pixels in enumerate(slices)]
    if kind == "dicom":
        return dicom_slices(read_dicom(origin, label), label)
    pixels, colour = decode_image_and_colour(origin, label)
    return [Slice(label, pixels, label, colour_share=colour)]


def dicom_slices(image: DicomImage, label: str) -> list[Slice]:
    """The slices of a DICOM file read by ``medical.read_dicom``: one per frame (a multi-frame
    file's named ``label#frame=K``)."""
    if len(image.frames) == 1:
        return [Slice(label, image.frames[0], label, colour_share=image.colour[0], header_refusal=image.refusal,
                      dicom=image.refs[0])]
    return [
        Slice(f"{label}#frame={k}", pixels, label, k, True, image.colour[k], image.refusal, dicom=image.refs[k])
        for k, pixels in enumerate(image.frames)
    ]


def is_dicom_path(path: Path) -> bool:
    """A DICOM file by its extension or, without one, by the DICM marker at byte 128."""
    return path.suffix.lower() in DICOM_EXTENSIONS or _has_dicom_magic(path)


def check_readable(path: Path) -> None:
    """Refuse, by name and reason, a path that is no regular file, is empty or is over the size limit."""
    if not path.is_file():
        special = special_kind(path)
        reason = ("is a folder" if path.is_dir() else f"is {special}, not a file: not read" if special
                  else "no such file or not readable")
        raise InvalidImageError(f"{path}: {reason}")
    try:
        size = path.stat().st_size
        if size == 0:
            raise InvalidImageError(f"{path}: file is empty")
        if size > MAX_FILE_BYTES:
            raise InvalidImageError(f"{path}: a file of {size / 2**20:,.0f} MiB is over the limit of "
                                    f"{MAX_FILE_BYTES >> 20} MiB per input")
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
