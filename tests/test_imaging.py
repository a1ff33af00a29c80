"""Decoding every input to the one 8-bit grey picture, and clear errors for bad files."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from braintumor.data.imaging import array_to_grey, decode_image, resize_grey
from braintumor.errors import InvalidImageError


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def test_grey_and_rgb_copies_decode_alike() -> None:
    grey = Image.fromarray(np.tile(np.arange(64, dtype=np.uint8) * 4, (64, 1)))
    from_grey = decode_image(_encode(grey, "PNG"))
    from_rgb = decode_image(_encode(grey.convert("RGB"), "PNG"))
    assert from_grey.dtype == np.uint8 and from_grey.shape == (64, 64)
    assert np.array_equal(from_grey, from_rgb)


def test_sixteen_bit_png_is_stretched_to_full_range() -> None:
    values = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 3 + 1000).astype(np.uint16)
    pixels = decode_image(_encode(Image.fromarray(values), "PNG"))
    assert pixels.min() == 0 and pixels.max() == 255


def test_transparent_pixels_become_black() -> None:
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., :3] = 255
    rgba[:4, :, 3] = 255
    pixels = decode_image(_encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert pixels[:4].min() == 255 and pixels[4:].max() == 0


def test_palette_image_decodes() -> None:
    image = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16)).convert("P")
    assert decode_image(_encode(image, "PNG")).shape == (16, 16)


@pytest.mark.parametrize(
    ("content", "reason"),
    [(b"", "empty"), (b"hello, I am text", "not a recognised image"), (b"\x89PNG\r\n\x1a\n\0\0", "upload.png")],
)
def test_bad_bytes_raise_invalid_image(content: bytes, reason: str) -> None:
    with pytest.raises(InvalidImageError, match=reason):
        decode_image(content, name="upload.png")


def test_truncated_jpeg_is_refused(tmp_path: Path) -> None:
    data = _encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (128, 128), dtype=np.uint8)), "JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidImageError, match="cut.jpg"):
        decode_image(path)


def test_decompression_bomb_is_refused(tmp_path: Path) -> None:
    huge = Image.new("1", (20_000, 20_000))
    path = tmp_path / "bomb.png"
    huge.save(path)
    with pytest.raises(InvalidImageError, match="bomb"):
        decode_image(path)


def test_unreadable_path_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidImageError, match="missing.jpg"):
        decode_image(tmp_path / "missing.jpg")


def test_arrays_from_python_callers() -> None:
    assert array_to_grey(np.ones((5, 6), dtype=np.float32) * 0.5).max() == 128
    assert array_to_grey(np.zeros((5, 6, 3), dtype=np.uint8)).shape == (5, 6)
    with pytest.raises(InvalidImageError):
        array_to_grey(np.zeros((2, 3, 4, 5)))


def test_resize_grey_squashes_to_square() -> None:
    assert resize_grey(np.zeros((300, 200), dtype=np.uint8), 224).shape == (224, 224)


def test_colour_share_counts_coloured_pixels_and_ignores_grey_stored_as_rgb() -> None:
    from braintumor.data.imaging import colour_share, decode_image_and_colour

    grey = Image.fromarray(np.tile(np.arange(64, dtype=np.uint8) * 4, (64, 1)))
    assert decode_image_and_colour(_encode(grey.convert("RGB"), "PNG"))[1] == 0.0
    assert decode_image_and_colour(_encode(grey, "PNG"))[1] == 0.0
    half = np.zeros((64, 64, 3), np.uint8)
    half[:32] = (200, 40, 40)  # top half red, bottom half black
    pixels, share = decode_image_and_colour(_encode(Image.fromarray(half), "PNG"))
    assert share == 0.5 and pixels.shape == (64, 64)
    big = np.zeros((3000, 2000, 4), np.uint8)
    big[..., 3] = 255
    big[:, :500, :3] = (0, 0, 255)  # a quarter of a large picture is blue; the share survives subsampling
    assert abs(colour_share(big) - 0.25) < 0.01
    assert colour_share(np.zeros((8, 8))) == 0.0
    hidden = np.zeros((64, 64, 4), np.uint8)
    hidden[..., 0] = 255  # red everywhere, but fully transparent: laid on black, as the grey image is
    assert decode_image_and_colour(_encode(Image.fromarray(hidden, "RGBA"), "PNG"))[1] == 0.0
    hidden[:16, :, 3] = 255  # a visible red quarter
    assert decode_image_and_colour(_encode(Image.fromarray(hidden, "RGBA"), "PNG"))[1] == 0.25
