"""Turn a file on disk (or bytes, or an array) into the one greyscale picture every path uses.

MRI slices are grey-level; the Kaggle files are stored as RGB or L at random. Converting every
input to 8-bit greyscale first, then resizing, is the single definition of "the image" that
training, evaluation, prediction and serving share, so they cannot drift apart.
"""

from __future__ import annotations

import io
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile

from ..constants import MAX_IMAGE_PIXELS
from ..errors import InvalidImageError

# Truncated files must fail loudly instead of decoding half an image as grey padding. PIL reads that
# from a process-wide flag (False unless a caller set it); a decode that finds it set turns it off
# for its own duration only, under this lock, and puts the caller's value back.
_TRUNCATION_FLAG_LOCK = threading.Lock()

# A pixel whose strongest and weakest RGB channels differ by more than this counts as coloured.
# MRI is grey by physics; JPEG chroma noise on the Kaggle slices stays below it in 95% of pixels
# or more (the largest share of coloured pixels in any of the 7,019 files is 5.2%).
COLOUR_CHROMA = 24
# Colour statistics are taken on a copy at most this many pixels a side: enough for a share.
_COLOUR_SIDE = 1024


def colour_share(array: np.ndarray) -> float:
    """Share (0..1) of strongly coloured pixels in an (H, W, 3|4) array; 0 for a grey (H, W) one.

    Computed before the conversion to grey that every input goes through, so that the
    out-of-distribution guard can tell a colour photo from a scan (see ``ood.COLOUR_LIMIT``).
    Channel by channel in uint8: a tenth of a millisecond for a 224x224 picture. With an alpha
    channel, the picture is first laid on black, as the grey conversion does, so the colour of
    transparent pixels does not count."""
    array = np.asarray(array)
    if array.ndim != 3 or array.shape[2] < 3:
        return 0.0
    step = max(1, -(-max(array.shape[:2]) // _COLOUR_SIDE))
    rgb = _as_uint8(array[::step, ::step, :3])
    if array.shape[2] == 4:
        alpha = _as_uint8(array[::step, ::step, 3]).astype(np.uint16)
        rgb = ((rgb * alpha[..., None] + 127) // 255).astype(np.uint8)
    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    spread = np.maximum(np.maximum(red, green), blue) - np.minimum(np.minimum(red, green), blue)
    return float((spread > COLOUR_CHROMA).mean())


def _image_colour_share(image: Image.Image) -> float:
    if image.mode in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"):
        return 0.0
    transparent = image.mode in ("RGBA", "PA") or (image.mode == "P" and "transparency" in image.info)
    return colour_share(np.asarray(image.convert("RGBA" if transparent else "RGB")))


def _to_uint8_grey(image: Image.Image) -> np.ndarray:
    """Convert any PIL mode to an 8-bit grey array, stretching high bit depths to the full range."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        values = np.asarray(image, dtype=np.float32)
        low, high = float(values.min()), float(values.max())
        scale = 255.0 / (high - low) if high > low else 0.0
        return np.clip((values - low) * scale, 0, 255).round().astype(np.uint8)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent pixels become black, the background of every MRI slice.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, rgba)
    return np.asarray(image.convert("L"), dtype=np.uint8)


def decode_image(source: str | Path | bytes, name: str | None = None) -> np.ndarray:
    """Decode an image file or its bytes into an (H, W) uint8 greyscale array.

    Raises:
        InvalidImageError: empty, truncated, not an image, or larger than the pixel cap.
    """
    return _decode(source, name, colour=False)[0]


def decode_image_and_colour(source: str | Path | bytes, name: str | None = None) -> tuple[np.ndarray, float]:
    """``decode_image``, plus the share of coloured pixels the grey conversion throws away
    (``colour_share``): what prediction needs to refuse colour photos, and what the decoded-image
    cache keeps so that evaluation refuses them too (about a tenth of a millisecond per image,
    benchmarks/micro.py).

    Raises:
        InvalidImageError: as ``decode_image``.
    """
    return _decode(source, name, colour=True)


@contextmanager
def _truncated_files_fail() -> Iterator[None]:
    """PIL's ``LOAD_TRUNCATED_IMAGES`` off for one decode; untouched (no lock) when already off."""
    if not ImageFile.LOAD_TRUNCATED_IMAGES:
        yield
        return
    with _TRUNCATION_FLAG_LOCK:
        previous, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
        try:
            yield
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _decode(source: str | Path | bytes, name: str | None, colour: bool) -> tuple[np.ndarray, float]:
    """Decode to grey; measure the colour share first when ``colour`` is set.

    Args:
        source: a path, or the file's bytes (uploads).
        name: how to call the input in error messages; defaults to the path.

    Raises:
        InvalidImageError: empty, truncated, not an image, or larger than the pixel cap.
    """
    label = name or (str(source) if not isinstance(source, bytes) else "<bytes>")
    try:
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
    except OSError as exc:
        raise InvalidImageError(f"{label}: cannot read file ({exc.strerror or exc})") from None
    if not data:
        raise InvalidImageError(f"{label}: file is empty")
    try:
        with warnings.catch_warnings(), _truncated_files_fail():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise InvalidImageError(
                        f"{label}: {width}x{height} pixels exceeds the cap of {MAX_IMAGE_PIXELS:,} "
                        "(decompression bomb?)"
                    )
                image.load()
                return _to_uint8_grey(image), _image_colour_share(image) if colour else 0.0
    except InvalidImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidImageError(f"{label}: image is too large (decompression bomb)") from None
    except Image.UnidentifiedImageError:
        raise InvalidImageError(f"{label}: not a recognised image format") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise InvalidImageError(f"{label}: cannot decode image ({exc})") from None


def resize_grey(pixels: np.ndarray, size: int) -> np.ndarray:
    """Resize a grey array to size x size with antialiased bilinear filtering (aspect is squashed,
    as in the original recipe; the Kaggle slices are almost all square)."""
    if pixels.shape == (size, size):
        return pixels
    image = Image.fromarray(pixels, mode="L")
    return np.asarray(image.resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)


def array_to_grey(array: np.ndarray) -> np.ndarray:
    """Accept an (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) array from Python callers."""
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[2] in (1, 3, 4):
        if array.shape[2] == 1:
            array = array[:, :, 0]
        else:
            mode = "RGB" if array.shape[2] == 3 else "RGBA"
            return _to_uint8_grey(Image.fromarray(_as_uint8(array), mode=mode))
    if array.ndim != 2:
        raise InvalidImageError(f"array of shape {array.shape}: expected (H, W) or (H, W, 1|3|4)")
    return _as_uint8(array)


def _as_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    values = array.astype(np.float32)
    low, high = float(values.min()), float(values.max())
    if low >= 0.0 and high <= 1.0 and array.dtype.kind == "f":
        return (values * 255.0).round().astype(np.uint8)
    scale = 255.0 / (high - low) if high > low else 0.0
    return np.clip((values - low) * scale, 0, 255).round().astype(np.uint8)
