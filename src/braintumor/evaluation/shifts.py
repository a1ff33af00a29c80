"""A seeded, label-preserving "shift suite": the same test scans, made to look like another scanner.

Accuracy on the official Testing split says how the model does on scans like its training set.
Each shift here changes how a scan *looks* (contrast, sharpness, noise, resolution, framing,
burnt-in text) the way a different scanner, protocol or export path would, and never what it
shows, so the label stays right and any change in the prediction is the model's fragility.

Every function takes decoded grey images (N, S, S) uint8 and their int labels (N,) and returns a
new (N, S, S) uint8 array. Randomness comes only from a numpy Generator seeded with (seed, shift,
image index), so the same seed gives the same pixels for an image whatever else is in the batch
(pass ``indices`` when transforming a slice of a larger set). ``histogram_swap`` alone looks at
the whole set: it needs the class averages of the set it is given.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from ..errors import ConfigError

# Grey levels above this are "head"; at or below, background (the Kaggle slices are black-framed).
HEAD_THRESHOLD = 20

ShiftFunction = Callable[[np.ndarray, np.ndarray, int, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Shift:
    """One named, documented change of appearance with fixed parameters."""

    name: str
    description: str
    params: dict[str, Any]
    function: ShiftFunction = field(repr=False)
    random: bool = False  # True when the seed matters

    def __call__(
        self, images: np.ndarray, labels: np.ndarray, seed: int = 0, indices: np.ndarray | None = None
    ) -> np.ndarray:
        """Shifted copy of ``images``; ``indices`` (default 0..N-1) name each image for its seed."""
        images = np.asarray(images, dtype=np.uint8)
        if images.ndim != 3:
            raise ConfigError(f"shift {self.name}: expected (N, S, S) images, got shape {images.shape}")
        labels = np.asarray(labels, dtype=int)
        indices = np.arange(len(images)) if indices is None else np.asarray(indices, dtype=np.int64)
        return self.function(images, labels, seed, indices)


def _rng(seed: int, name: str, index: int) -> np.random.Generator:
    """The generator for one image under one shift: independent of batch order and of other shifts."""
    return np.random.default_rng([int(seed), zlib.crc32(name.encode()), int(index)])


def _per_image_pil(images: np.ndarray, operation: Callable[[Image.Image], Image.Image]) -> np.ndarray:
    out = np.empty_like(images)
    for k, pixels in enumerate(images):
        out[k] = np.asarray(operation(Image.fromarray(pixels, mode="L")), dtype=np.uint8)
    return out


def _head_cdf(histogram: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(levels, mid-bin CDF) over the occupied head levels of a 256-bin histogram: strictly rising."""
    levels = np.flatnonzero(histogram[HEAD_THRESHOLD + 1:]) + HEAD_THRESHOLD + 1
    counts = histogram[levels].astype(np.float64)
    cdf = (np.cumsum(counts) - counts / 2) / counts.sum()
    return levels.astype(np.float64), cdf


def histogram_swap(images: np.ndarray, labels: np.ndarray, seed: int, indices: np.ndarray) -> np.ndarray:
    """Give each scan the grey-level distribution of *another* class (the next one present, by label
    index, cyclically), averaged over that class's head pixels in this set. A model that reads the
    tumour class from overall brightness or contrast (one source hospital per class in Kaggle)
    rather than from anatomy falls for this; background (<= 20) stays as it is."""
    histograms = np.stack([np.bincount(image.ravel(), minlength=256) for image in images]).astype(np.float64)
    head = histograms.copy()
    head[:, : HEAD_THRESHOLD + 1] = 0
    shares = head / np.maximum(head.sum(axis=1, keepdims=True), 1)
    present = sorted(set(labels.tolist()))
    average = {c: shares[labels == c].mean(axis=0) for c in present}
    out = images.copy()
    for k, image in enumerate(images):
        if head[k].sum() == 0:
            continue
        target = present[(present.index(int(labels[k])) + 1) % len(present)]
        src_levels, src_cdf = _head_cdf(head[k])
        tgt_levels, tgt_cdf = _head_cdf(average[target] * 1e6)
        lut = np.arange(256, dtype=np.float64)
        lut[src_levels.astype(int)] = np.interp(src_cdf, tgt_cdf, tgt_levels)
        out[k] = np.clip(np.round(lut), 0, 255).astype(np.uint8)[image]
    return out


def gamma(images: np.ndarray, labels: np.ndarray, seed: int, indices: np.ndarray) -> np.ndarray:
    """Contrast curve of another scanner or windowing: x**g on [0, 1], g log-uniform in [0.5, 2.0]
    without the near-identity band 0.8 < g < 1.25."""
    low, high = np.log(1.25), np.log(2.0)
    draws = [_rng(seed, "gamma", i) for i in indices]
    exponents = np.array([np.exp(r.choice([-1.0, 1.0]) * r.uniform(low, high)) for r in draws])
    scaled = (images.astype(np.float32) / 255.0) ** exponents[:, None, None].astype(np.float32)
    return np.clip(np.round(scaled * 255.0), 0, 255).astype(np.uint8)


def gain(images: np.ndarray, labels: np.ndarray, seed: int, indices: np.ndarray) -> np.ndarray:
    """Overall brightness of another export (MRI intensities have no absolute scale): x * U[0.6, 1.5], clipped."""
    factors = np.array([_rng(seed, "gain", i).uniform(0.6, 1.5) for i in indices], dtype=np.float32)
    return np.clip(np.round(images.astype(np.float32) * factors[:, None, None]), 0, 255).astype(np.uint8)


def unsharp(images: np.ndarray, labels: np.ndarray, seed: int, indices: np.ndarray) -> np.ndarray:
    """Vendor edge enhancement; this setting dropped an earlier model to 69% accuracy."""
    return _per_image_pil(images, lambda im: im.filter(ImageFilter.UnsharpMask(radius=2, percent=150, threshold=0)))


def blur(images: np.ndarray, labels: np.ndarray, seed: int, indices: np.ndarray) -> np.ndarray:
    """Softer reconstruction filter or thicker slices: Gaussian blur, radius 1.5 px."""
    return _per_image_pil(images, lambda im: im.filter(ImageFilter.GaussianBlur(1.5)))


def noise(images: np.ndarray, labels: np.ndarray, seed: int, indices: np.ndarray) -> np.ndarray:
    """Lower signal-to-noise (faster sequence, lower field): Rician noise, sigma 8 grey levels, as a
    magnitude MR image has it: |x + n1 + i n2| with n1, n2 ~ N(0, 8), so the background gets a
    positive noise floor (mean about 10) instead of half its noise clipped away."""
    out = np.empty_like(images)
    for k, (image, i) in enumerate(zip(images, indices, strict=True)):
        real, imaginary = _rng(seed, "noise", i).normal(0.0, 8.0, (2, *image.shape)).astype(np.float32)
        magnitude = np.hypot(image.astype(np.float32) + real, imaginary)
        out[k] = np.clip(np.round(magnitude), 0, 255).astype(np.uint8)
    return out


def _jpeg(image: Image.Image, quality: int = 15) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("L")


def jpeg(images: np.ndarray, labels: np.ndarray, seed: int, indices: np.ndarray) -> np.ndarray:
    """Scans that went through a lossy PACS export, an e-mail or a web page: JPEG quality 15."""
    return _per_image_pil(images, _jpeg)


def downup(images: np.ndarray, labels: np.ndarray, seed: int, indices: np.ndarray) -> np.ndarray:
    """Lower acquisition matrix: down to 0.35 of the size (bilinear, antialiased), back up (bilinear)."""
    size = images.shape[-1]
    small = max(2, round(size * 0.35))
    resample = Image.Resampling.BILINEAR  # Pillow's downscaling filter widens with the scale: antialiased
    return _per_image_pil(images, lambda im: im.resize((small, small), resample).resize(im.size, resample))


def zoomout(images: np.ndarray, labels: np.ndarray, seed: int, indices: np.ndarray) -> np.ndarray:
    """Larger field of view: the slice shrunk to 0.7 of its size, centred on a black canvas."""
    height, width = images.shape[1:]
    small = (max(1, round(width * 0.7)), max(1, round(height * 0.7)))
    top, left = (height - small[1]) // 2, (width - small[0]) // 2
    out = np.zeros_like(images)
    for k, pixels in enumerate(images):
        shrunk = Image.fromarray(pixels, mode="L").resize(small, Image.Resampling.BILINEAR)
        out[k, top:top + small[1], left:left + small[0]] = np.asarray(shrunk)
    return out


def bias_field(images: np.ndarray, labels: np.ndarray, seed: int, indices: np.ndarray) -> np.ndarray:
    """Coil inhomogeneity (as TorchIO's RandomBiasField): a smooth multiplicative field, exp of a random
    cubic polynomial in x, y, scaled so the gain runs from 0.7 to 1.4 across the image, clipped."""
    height, width = images.shape[1:]
    y, x = np.meshgrid(np.linspace(-1, 1, height), np.linspace(-1, 1, width), indexing="ij")
    terms = np.stack([x**i * y**j for i in range(4) for j in range(4 - i) if i + j > 0])  # (9, H, W)
    low, high = np.log(0.7), np.log(1.4)
    out = np.empty_like(images)
    for k, (image, i) in enumerate(zip(images, indices, strict=True)):
        poly = np.tensordot(_rng(seed, "bias_field", i).uniform(-1, 1, len(terms)), terms, axes=1)
        span = poly.max() - poly.min()
        log_field = low + (poly - poly.min()) / span * (high - low) if span > 0 else np.zeros_like(poly)
        out[k] = np.clip(np.round(image * np.exp(log_field)), 0, 255).astype(np.uint8)
    return out


def letters(images: np.ndarray, labels: np.ndarray, seed: int, indices: np.ndarray) -> np.ndarray:
    """Burnt-in annotations of a screenshot or film scan: orientation letters R/L/A/P at the four borders
    and a "10 mm" scale bar in a corner, white, in Pillow's default font; the centre stays clear."""
    height, width = images.shape[1:]
    font_size = max(6, round(min(height, width) / 14))
    font = ImageFont.load_default(size=font_size)
    margin = max(1, round(min(height, width) * 0.02))
    marks = {"A": (width / 2, margin, "mt"), "P": (width / 2, height - margin, "mb"),
             "R": (margin, height / 2, "lm"), "L": (width - margin, height / 2, "rm")}

    def draw(image: Image.Image) -> Image.Image:
        canvas = ImageDraw.Draw(image)
        for text, (x, y, anchor) in marks.items():
            canvas.text((x, y), text, fill=255, font=font, anchor=anchor)
        bar_y = height - margin - font_size // 2
        canvas.line([(margin, bar_y), (margin + font_size * 2, bar_y)], fill=255, width=max(1, font_size // 8))
        canvas.text((margin, bar_y - 2), "10 mm", fill=255, font=font, anchor="lb")
        return image

    return _per_image_pil(images, draw)


SHIFTS: dict[str, Shift] = {
    shift.name: shift
    for shift in (
        Shift("histogram_swap", "grey-level histogram of the head matched to the average of the next class in the set",
              {"head_threshold": HEAD_THRESHOLD, "target": "next class present, cyclically, by label index"},
              histogram_swap),
        Shift("gamma", "contrast curve x**g, g log-uniform in [0.5, 2.0] outside (0.8, 1.25)",
              {"low": 0.5, "high": 2.0, "excluded": [0.8, 1.25]}, gamma, random=True),
        Shift("gain", "brightness x * U[0.6, 1.5], clipped", {"low": 0.6, "high": 1.5}, gain, random=True),
        Shift("unsharp", "edge enhancement: PIL UnsharpMask", {"radius": 2, "percent": 150, "threshold": 0}, unsharp),
        Shift("blur", "PIL GaussianBlur", {"radius": 1.5}, blur),
        Shift("noise", "Rician noise |x + n1 + i n2|, n ~ N(0, sigma)", {"sigma": 8.0}, noise, random=True),
        Shift("jpeg", "re-encoded as JPEG", {"quality": 15}, jpeg),
        Shift("downup", "down to a fraction of the size (bilinear, antialiased) and back up",
              {"scale": 0.35}, downup),
        Shift("zoomout", "slice shrunk and centred on a black canvas (larger field of view)", {"scale": 0.7}, zoomout),
        Shift("bias_field", "smooth multiplicative field exp(cubic polynomial in x, y), gain 0.7 to 1.4",
              {"degree": 3, "gain_low": 0.7, "gain_high": 1.4}, bias_field, random=True),
        Shift("letters", "white orientation letters R/L/A/P at the borders and a '10 mm' scale bar",
              {"letters": "A top, P bottom, R left, L right", "font_size": "side / 14"}, letters),
    )
}


def resolve_shifts(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    """Shift names from "all", "a,b,c" or a list, in the order given, without repeats.

    Raises:
        ConfigError: an unknown name (the message names it and lists the valid ones) or none at all.
    """
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [part.strip() for part in parts if part.strip()]
    if names == ["all"]:
        return list(SHIFTS)
    unknown = [name for name in names if name not in SHIFTS]
    if unknown or not names:
        what = f"unknown shift {', '.join(repr(n) for n in unknown)}" if unknown else "no shift named"
        raise ConfigError(f"{what}; valid: all, {', '.join(SHIFTS)}")
    return list(dict.fromkeys(names))


def apply_shift(
    name: str, images: np.ndarray, labels: np.ndarray, seed: int = 0, indices: np.ndarray | None = None
) -> np.ndarray:
    """``SHIFTS[name](images, labels, seed, indices)``; labels are read, never changed.

    Raises:
        ConfigError: an unknown shift name.
    """
    return SHIFTS[resolve_shifts([name])[0]](images, labels, seed, indices)
