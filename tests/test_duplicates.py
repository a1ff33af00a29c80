"""Near-duplicate hashing finds re-encoded, resized, brightened and mirrored copies."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageEnhance

from braintumor.data.duplicates import group_near_duplicates, near_pairs, perceptual_hashes
from braintumor.data.imaging import decode_image, resize_grey
from conftest import synthetic_scan


def _as_pixels(image: Image.Image, fmt: str = "PNG", quality: int = 90) -> np.ndarray:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return resize_grey(decode_image(buffer.getvalue()), 224)


def test_planted_copies_are_grouped_and_distinct_images_are_not() -> None:
    rng = np.random.default_rng(7)
    originals = [synthetic_scan(rng, i % 4, size=224) for i in range(12)]
    base = originals[0]
    copies = [
        _as_pixels(base),
        _as_pixels(base, "JPEG", quality=60),  # re-encoded
        _as_pixels(base.resize((512, 512)).resize((300, 300))),  # resized
        _as_pixels(ImageEnhance.Brightness(base).enhance(1.3)),  # brightened
        _as_pixels(ImageEnhance.Contrast(base).enhance(0.8)),  # lower contrast
        _as_pixels(base.transpose(Image.Transpose.FLIP_LEFT_RIGHT)),  # mirrored
    ]
    others = [_as_pixels(image) for image in originals[1:]]
    groups = group_near_duplicates(np.stack(copies + others))
    assert len(set(groups[: len(copies)])) == 1
    assert len(set(groups[len(copies) :])) == len(others)
    assert groups[0] not in set(groups[len(copies) :])


def test_mirrored_hash_matches_hash_of_mirrored_image() -> None:
    rng = np.random.default_rng(3)
    pixels = np.stack([_as_pixels(synthetic_scan(rng, 1, size=224)) for _ in range(3)])
    hashes, mirrored = perceptual_hashes(pixels)
    flipped_hashes, _ = perceptual_hashes(pixels[:, :, ::-1].copy())
    assert np.array_equal(mirrored, flipped_hashes)
    assert not np.array_equal(hashes, mirrored)


def test_cross_set_pairs_index_each_side() -> None:
    rng = np.random.default_rng(5)
    left = np.stack([_as_pixels(synthetic_scan(rng, i % 4, size=224)) for i in range(4)])
    right = np.concatenate([left[2:3], np.stack([_as_pixels(synthetic_scan(rng, 0, size=224))])])
    hashes, mirrored = perceptual_hashes(left)
    pairs = near_pairs(hashes, mirrored, 4, other=perceptual_hashes(right))
    assert [(i, j) for i, j, _ in pairs] == [(2, 0)]
