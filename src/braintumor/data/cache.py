"""Decode every image once and keep the resized pixels, so epochs never decode a JPEG again.

Cost: one byte per pixel, greyscale, at the model's input size: 5,708 Training images at 224x224
take 286 MiB in memory and the same on disk (a ``.npy`` file per image list and size, loaded
with memory mapping). Each image's colour share is kept beside it: evaluation refuses colour
pictures by the same rule as prediction (``ood.colour_rejects``). The key covers each file's
path, size and modification time, so an edited data set is decoded again instead of served stale.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..errors import InvalidImageError
from .imaging import decode_image_and_colour, resize_grey

logger = logging.getLogger(__name__)
CACHE_FORMAT = 2  # 2: with each image's colour share


@dataclass
class DecodedImages:
    """Pixels of a list of files: ``pixels[i]`` is file i, valid only where ``ok[i]``."""

    pixels: np.ndarray  # (N, size, size) uint8
    ok: np.ndarray  # (N,) bool
    errors: list[str]  # one "path: reason" line per file that failed
    colour: np.ndarray  # (N,) float, each image's share of coloured pixels (imaging.colour_share)


def _decode_one(path: Path, size: int) -> tuple[np.ndarray, float] | str:
    try:
        grey, colour = decode_image_and_colour(path)
    except InvalidImageError as exc:
        return str(exc)
    return resize_grey(grey, size), colour


def _cache_key(paths: Sequence[Path], size: int) -> str:
    digest = hashlib.sha256(f"v{CACHE_FORMAT}:{size}\n".encode())
    for path in paths:
        stat = path.stat()
        digest.update(f"{path.resolve()}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:24]


def decode_all(paths: Sequence[Path], size: int, workers: int = 2, progress: bool = True) -> DecodedImages:
    """Decode and resize every file in parallel threads (Pillow releases the GIL while decoding)."""
    pixels = np.zeros((len(paths), size, size), dtype=np.uint8)
    ok = np.zeros(len(paths), dtype=bool)
    colour = np.zeros(len(paths), dtype=np.float64)
    errors: list[str] = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(lambda p: _decode_one(p, size), paths)
        for index, result in enumerate(
            tqdm(results, total=len(paths), desc="decoding", unit="img", disable=not progress, leave=False)
        ):
            if isinstance(result, str):
                errors.append(result)
            else:
                pixels[index], colour[index] = result
                ok[index] = True
    return DecodedImages(pixels, ok, errors, colour)


def load_cached(
    paths: Sequence[Path], size: int, cache_dir: Path | None, workers: int = 2, progress: bool = True
) -> DecodedImages:
    """Decoded pixels for ``paths``, read from ``cache_dir`` when present, else decoded and stored.

    With ``cache_dir`` None nothing is written (tests, one-off evaluations).
    """
    if cache_dir is None:
        return decode_all(paths, size, workers, progress)
    key = _cache_key(paths, size)
    pixel_file, meta_file = cache_dir / f"{key}.npy", cache_dir / f"{key}.json"
    if pixel_file.exists() and meta_file.exists():
        meta = json.loads(meta_file.read_text())
        logger.info("decoded-image cache hit: %s", pixel_file)
        return DecodedImages(np.load(pixel_file, mmap_mode="r"), np.array(meta["ok"], dtype=bool), meta["errors"],
                             np.array(meta["colour"], dtype=np.float64))
    decoded = decode_all(paths, size, workers, progress)
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Write under temporary names, then rename: a killed run never leaves a half cache behind.
    tmp_pixels, tmp_meta = pixel_file.with_suffix(".npy.tmp"), meta_file.with_suffix(".json.tmp")
    with open(tmp_pixels, "wb") as handle:
        np.save(handle, decoded.pixels)
    tmp_meta.write_text(json.dumps({"ok": decoded.ok.tolist(), "errors": decoded.errors,
                                    "colour": decoded.colour.tolist()}))
    os.replace(tmp_pixels, pixel_file)
    os.replace(tmp_meta, meta_file)
    return decoded
