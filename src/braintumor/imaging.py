"""Turn a file on disk (or bytes, or an array) into the one greyscale picture every path uses.

MRI slices are grey-level; the Kaggle files are stored as RGB or L at random. Converting every
input to 8-bit greyscale first, then resizing, is the single definition of "the image" that
training, evaluation, prediction and serving share, so they cannot drift apart.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile

from .constants import MAX_IMAGE_PIXELS
from .errors import InvalidImageError

# Truncated files must fail loudly instead of decoding half an image as grey padding.
ImageFile.LOAD_TRUNCATED_IMAGES = False


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
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise InvalidImageError(
                        f"{label}: {width}x{height} pixels exceeds the cap of {MAX_IMAGE_PIXELS:,} (decompression bomb?)"
                    )
                image.load()
                return _to_uint8_grey(image)
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
