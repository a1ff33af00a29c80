"""The only place preprocessing lives: grey uint8 pixels to model input, and augmentation.

Images arrive here already decoded to greyscale and resized (``imaging``, ``cache``). Both the
training augmentation and the evaluation preset work on whole batches of tensors, so they run
on the GPU when there is one and cost little next to the network on a CPU.

``Preprocessing`` is what travels with the weights (their metadata): every path that feeds the
network (training, evaluation, prediction, ONNX export, Grad-CAM) builds its input through it.
"""

from __future__ import annotations

import dataclasses
import io
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..constants import IMAGE_SIZE, IMAGENET_MEAN, IMAGENET_STD
from ..errors import ConfigError

# How input intensities are put on a common scale before the network sees them.
# - "imagenet": grey / 255, then ImageNet mean/std (the original recipe);
# - "head": each image's own head pixels (grey > HEAD_LEVEL) are z-scored, so that a scanner's or
#   a data set's overall brightness and contrast, which differ by source (and so by class in the
#   Kaggle set), carry no information;
# - "head_rank": each head pixel is replaced by its rank among the image's head pixels (histogram
#   equalisation of the head), so the shape of the grey-level histogram, which names the source
#   even after z-scoring (docs/audit/sources: LGG's one pipeline, 0.999 inside glioma), is the
#   same for every image; only the order of the greys, which carries the anatomy, is left.
STANDARDISATIONS: tuple[str, ...] = ("imagenet", "head", "head_rank")
HEAD_LEVEL = 20 / 255  # the same head threshold as the data set's README statistics
_MIN_HEAD_STD = 0.02  # a flat picture (all one grey) is not blown up into noise
_Z_LIMIT = 8.0  # z-scores beyond this are clipped: a few saturated pixels never dominate
RANK_LEVELS = 64  # grey levels at which the head's cumulative histogram is taken (linear in between)
_UNIFORM_STD = math.sqrt(1.0 / 12.0)  # ranks are uniform on [0, 1]: centred and scaled to unit spread


@dataclass(frozen=True)
class Preprocessing:
    """How grey pixels become network input; stored in every weights file's metadata.

    ``smoothing`` > 0 blurs every input with a fixed Gaussian of that sigma (pixels at
    ``image_size``) before standardisation: a lower effective resolution for every input, so that
    the fine texture (noise, sharpening, JPEG blocks) by which the sources of the Kaggle classes
    differ is gone before the network looks, whatever the scanner."""

    image_size: int = IMAGE_SIZE
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    standardise: str = "imagenet"
    smoothing: float = 0.0

    def __post_init__(self) -> None:
        if self.standardise not in STANDARDISATIONS:
            raise ConfigError(f"standardise {self.standardise!r} is not one of {', '.join(STANDARDISATIONS)}")
        if not 0.0 <= self.smoothing <= 4.0:
            raise ConfigError(f"smoothing must be a Gaussian sigma in [0, 4] pixels, got {self.smoothing}")

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any]) -> Preprocessing:
        """The preprocessing of a weights file (older files, without ``standardise``, used ImageNet's)."""
        return cls(
            int(metadata.get("image_size", IMAGE_SIZE)),
            tuple(metadata.get("mean", IMAGENET_MEAN)),
            tuple(metadata.get("std", IMAGENET_STD)),
            str(metadata.get("standardise", "imagenet")),
            float(metadata.get("smoothing", 0.0)),
        )

    def to_metadata(self) -> dict[str, Any]:
        """The metadata fields ``from_metadata`` reads back."""
        return {"image_size": self.image_size, "mean": list(self.mean), "std": list(self.std),
                "standardise": self.standardise, "smoothing": self.smoothing}

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, H, W) uint8 or (N, 1, H, W) float in [0, 1] to the (N, 3, H, W) float32 network input."""
        if self.smoothing > 0:
            pixels = fixed_blur(_as_unit_float(pixels), self.smoothing)
        if self.standardise == "head":
            return standardise_head(pixels)
        if self.standardise == "head_rank":
            return standardise_head_rank(pixels)
        return normalise(pixels, self.mean, self.std)


def fixed_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """A Gaussian blur of (N, 1, H, W) with one constant kernel: a plain convolution, so the ONNX
    export computes the same (edges replicate, as the background of a slice is flat)."""
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    padded = F.pad(images, (radius, radius, radius, radius), mode="replicate")
    rows = F.conv2d(padded, kernel.view(1, 1, 1, -1))
    return F.conv2d(rows, kernel.view(1, 1, -1, 1))


def _as_unit_float(pixels: torch.Tensor) -> torch.Tensor:
    if pixels.dtype == torch.uint8:
        pixels = pixels.float().div_(255.0)
    return pixels.unsqueeze(1) if pixels.dim() == 3 else pixels


def normalise(
    pixels: torch.Tensor,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> torch.Tensor:
    """(N, H, W) uint8 or (N, 1, H, W) float in [0, 1] to (N, 3, H, W) float32 ImageNet-normalised.

    The grey channel is repeated into the three channels the ImageNet-shaped network expects.
    """
    pixels = _as_unit_float(pixels)
    mean_t = torch.tensor(mean, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    return (pixels.expand(-1, 3, -1, -1) - mean_t) / std_t


def standardise_head(pixels: torch.Tensor) -> torch.Tensor:
    """Per-image z-score over the head: (N, H, W) uint8 or (N, 1, H, W) [0, 1] to (N, 3, H, W).

    Mean and standard deviation come from the pixels above ``HEAD_LEVEL`` (the background would
    otherwise weigh in with the field of view); every pixel, background included, is then shifted
    and scaled by them. Written with sums and masks only, so the ONNX export computes the same.
    """
    x = _as_unit_float(pixels)
    mask = (x > HEAD_LEVEL).to(x.dtype)
    count = mask.sum(dim=(1, 2, 3), keepdim=True).clamp_min(1.0)
    mean = (x * mask).sum(dim=(1, 2, 3), keepdim=True) / count
    var = (((x - mean) * mask) ** 2).sum(dim=(1, 2, 3), keepdim=True) / count
    z = (x - mean) / var.sqrt().clamp_min(_MIN_HEAD_STD)
    return z.clamp(-_Z_LIMIT, _Z_LIMIT).expand(-1, 3, -1, -1)


def standardise_head_rank(pixels: torch.Tensor) -> torch.Tensor:
    """Per-image histogram equalisation of the head: (N, H, W) uint8 or (N, 1, H, W) [0, 1] to (N, 3, H, W).

    A head pixel (grey > ``HEAD_LEVEL``) becomes the share of the image's head pixels that are at most
    as bright (its rank, in (0, 1]), centred and scaled so that the head has mean 0 and spread 1
    whatever the image; the background becomes the lowest value. The head's histogram is counted in
    ``RANK_LEVELS`` even bins and the rank interpolated linearly inside a bin: a scatter-add, a
    cumulative sum and two gathers, which the ONNX export computes the same, at the cost of one
    pass over the pixels (no sort).
    """
    x = _as_unit_float(pixels)
    n = x.shape[0]
    head = (x > HEAD_LEVEL).to(x.dtype).reshape(n, -1)
    level = ((x.reshape(n, -1) - HEAD_LEVEL) * (RANK_LEVELS / (1.0 - HEAD_LEVEL))).clamp(0.0, RANK_LEVELS - 1e-3)
    bin_index = level.floor()
    within = level - bin_index
    bin_index = bin_index.long()
    counts = torch.zeros(n, RANK_LEVELS, dtype=x.dtype, device=x.device).scatter_add(1, bin_index, head)
    share = counts / counts.sum(dim=1, keepdim=True).clamp_min(1.0)
    under = torch.cumsum(share, dim=1) - share  # share of head pixels in the bins below each bin
    rank = (torch.gather(under, 1, bin_index) + within * torch.gather(share, 1, bin_index)) * head
    return ((rank - 0.5) / _UNIFORM_STD).reshape_as(x).expand(-1, 3, -1, -1)


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation suited to axial, coronal and sagittal MRI slices.

    Geometry: left-right mirroring is anatomically plausible (tumours occur on both sides); small
    rotations, shifts and zooms mimic head position and field of view; no vertical flips or large
    rotations: slices are always shown upright. Intensity scaling mimics scanner gain.

    The remaining settings (probabilities, all 0 in the ``basic`` policy) take away the cues by
    which the Kaggle classes can be told apart without looking at the anatomy, because each class
    comes mostly from one source (see docs/generalisation): grey-level curve and histogram
    (``curve``, ``gamma``, ``histogram_match`` to an image of another class), sharpness
    (``blur_sharpen``), effective resolution (``downsample``), noise, intensity inhomogeneity
    (``bias_field``) and compression (``jpeg``).
    """

    hflip: float = 0.5
    degrees: float = 10.0
    translate: float = 0.06
    scale: tuple[float, float] = (0.9, 1.1)
    contrast: tuple[float, float] = (0.85, 1.15)
    brightness: float = 0.08
    bias_field: float = 0.0
    curve: float = 0.0
    gamma: float = 0.0
    histogram_match: float = 0.0
    blur_sharpen: float = 0.0
    downsample: float = 0.0
    noise: float = 0.0
    jpeg: float = 0.0


AUGMENT_POLICIES: dict[str, AugmentConfig] = {
    "basic": AugmentConfig(),
    "robust": AugmentConfig(
        degrees=12.0, translate=0.08, scale=(0.7, 1.15), bias_field=0.4, curve=0.3, gamma=0.5,
        histogram_match=0.3, blur_sharpen=0.5, downsample=0.35, noise=0.3, jpeg=0.2,
    ),
    # For continuing a ``robust`` run: half as many images changed in look, so the anatomy is
    # fitted on more clean slices, and zoom in to 1.35 as well as out, because framing is a cue
    # (Kaggle notumor heads fill 0.56 of the frame, its tumours 0.45-0.50, PMRAM's 0.62).
    "robust_light": AugmentConfig(
        degrees=12.0, translate=0.08, scale=(0.75, 1.35), bias_field=0.2, curve=0.15, gamma=0.25,
        histogram_match=0.15, blur_sharpen=0.25, downsample=0.18, noise=0.15, jpeg=0.1,
    ),
}
# For training on several sources: robust_light with half of every class resampled down and up, so
# that a low effective resolution (IXI's 2 mm slices, 90-120 px) is common to all classes and
# sources and no longer marks the one source that has it.
AUGMENT_POLICIES["robust_even"] = dataclasses.replace(AUGMENT_POLICIES["robust_light"], downsample=0.5)


class _Draw:
    """Seeded random draws for one batch of ``n`` images on ``device``."""

    def __init__(self, n: int, generator: torch.Generator, device: torch.device):
        self.n, self.generator, self.device = n, generator, device

    def uniform(self, low: float, high: float, *shape: int) -> torch.Tensor:
        return torch.empty(self.n, *shape).uniform_(low, high, generator=self.generator).to(self.device)

    def chosen(self, probability: float) -> torch.Tensor:
        """(n, 1, 1, 1) bool: which images get an augmentation applied with ``probability``."""
        return (torch.rand(self.n, generator=self.generator) < probability).view(-1, 1, 1, 1).to(self.device)


def augment(
    pixels: torch.Tensor, config: AugmentConfig, generator: torch.Generator, labels: torch.Tensor | None = None
) -> torch.Tensor:
    """Random geometry and appearance changes of a (N, H, W) uint8 batch (``labels`` lets the
    histogram be matched to an image of another class).

    Returns:
        (N, 1, H, W) float in [0, 1], ready for ``Preprocessing``.
    """
    draw = _Draw(pixels.shape[0], generator, pixels.device)
    images = _geometry(_as_unit_float(pixels), config, draw)
    intensity = ((config.bias_field, _bias_field), (config.curve, _random_curve), (config.gamma, _gamma))
    images = _maybe(images, draw, intensity)
    if config.histogram_match > 0 and labels is not None:
        images = _match_other_class(images, labels.to(images.device), config.histogram_match, draw)
    gain = draw.uniform(*config.contrast).view(-1, 1, 1, 1)
    offset = draw.uniform(-config.brightness, config.brightness).view(-1, 1, 1, 1)
    images = (images * gain + offset).clamp_(0.0, 1.0)
    steps = ((config.blur_sharpen, _blur_or_sharpen), (config.downsample, _down_up), (config.noise, _rician_noise))
    images = _maybe(images, draw, steps)
    if config.jpeg > 0:
        images = _jpeg(images, config.jpeg, draw)
    return images


def _maybe(images: torch.Tensor, draw: _Draw, steps: tuple) -> torch.Tensor:
    """Apply each (probability, step) to a random share of the images, in order."""
    for probability, step in steps:
        if probability > 0:
            images = torch.where(draw.chosen(probability), step(images, draw), images).clamp_(0.0, 1.0)
    return images


def _geometry(images: torch.Tensor, config: AugmentConfig, draw: _Draw) -> torch.Tensor:
    angle = draw.uniform(-config.degrees, config.degrees) * (math.pi / 180.0)
    scale = draw.uniform(*config.scale)
    flip = torch.where(torch.rand(draw.n, generator=draw.generator).to(draw.device) < config.hflip, -1.0, 1.0)
    shift_x = draw.uniform(-config.translate, config.translate)
    shift_y = draw.uniform(-config.translate, config.translate)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    # Output-to-input sampling matrix: rotate and zoom, then mirror the x axis where flip is -1.
    theta = torch.stack(
        [torch.stack([cos * flip, -sin, shift_x], 1), torch.stack([sin * flip, cos, shift_y], 1)], 1
    )
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _bias_field(images: torch.Tensor, draw: _Draw) -> torch.Tensor:
    """A smooth multiplicative field, exp of a random quadratic in x and y (gain about 0.6-1.6),
    as receive-coil inhomogeneity gives (TorchIO's RandomBiasField, order 2)."""
    size = images.shape[-1]
    axis = torch.linspace(-1.0, 1.0, size, device=images.device)
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    basis = torch.stack([x, y, x * x, y * y, x * y])  # (5, H, W)
    coefficients = draw.uniform(-0.25, 0.25, 5)
    return images * torch.exp(torch.einsum("nk,khw->nhw", coefficients, basis)).unsqueeze(1)


def _random_curve(images: torch.Tensor, draw: _Draw) -> torch.Tensor:
    """A random intensity mapping through 6 control points, monotonic or not (black stays black).

    Different MRI sequences map the same tissue to different greys (CSF dark on T1, bright on T2);
    a random, sometimes non-monotonic curve makes the grey value of a tissue uninformative, so the
    network has to use shapes, as a reader comparing sequences does."""
    knots = draw.uniform(0.0, 1.0, 6)
    monotonic = draw.uniform(0.0, 1.0) < 0.5
    knots = torch.where(monotonic.unsqueeze(1), knots.sort(dim=1).values, knots)
    knots[:, 0] = 0.0
    position = images.clamp(0, 1) * 5.0
    low = position.floor().clamp(max=4).long()
    fraction = position - low
    table = knots.view(-1, 1, 1, 6).expand(-1, images.shape[-2], images.shape[-1], -1)
    left = torch.gather(table, 3, low.squeeze(1).unsqueeze(-1)).squeeze(-1).unsqueeze(1)
    right = torch.gather(table, 3, (low + 1).squeeze(1).unsqueeze(-1)).squeeze(-1).unsqueeze(1)
    return left + (right - left) * fraction


def _gamma(images: torch.Tensor, draw: _Draw) -> torch.Tensor:
    """Gamma drawn log-uniformly in [0.4, 2.5]: the grey-level curve differs between scanners."""
    gamma = torch.exp(draw.uniform(math.log(0.4), math.log(2.5))).view(-1, 1, 1, 1)
    return images.clamp_min(1e-6) ** gamma


def _gaussian_blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image Gaussian blur (separable, one sigma per image) of (N, 1, H, W)."""
    radius = 4
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    kernel = torch.exp(-(offsets.view(1, -1) ** 2) / (2 * sigma.view(-1, 1) ** 2))
    kernel = kernel / kernel.sum(1, keepdim=True)  # (N, 9)
    n = images.shape[0]
    flat = images.view(1, n, *images.shape[-2:])
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="replicate"), kernel.view(n, 1, 1, -1), groups=n)
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="replicate"), kernel.view(n, 1, -1, 1), groups=n)
    return flat.view_as(images)


def _blur_or_sharpen(images: torch.Tensor, draw: _Draw) -> torch.Tensor:
    """Half blurred (sigma 0.5-1.5 pixels), half sharpened by an unsharp mask (amount 0.5-2):
    reconstruction filters differ between scanners, and sharpness differs between the sources."""
    sigma = draw.uniform(0.5, 1.5)
    blurred = _gaussian_blur(images, sigma)
    amount = draw.uniform(0.5, 2.0).view(-1, 1, 1, 1)
    sharpen = (draw.uniform(0.0, 1.0) < 0.5).view(-1, 1, 1, 1)
    return torch.where(sharpen, images + amount * (images - blurred), blurred)


def _down_up(images: torch.Tensor, draw: _Draw) -> torch.Tensor:
    """Down to 30-80% of the size and back up: scans come at 256, 512 or less than 224 pixels."""
    size = images.shape[-1]
    factors = draw.uniform(0.3, 0.8).tolist()
    out = []
    for image, factor in zip(images, factors, strict=True):
        small = F.interpolate(image.unsqueeze(0), size=max(8, round(size * factor)), mode="bilinear", antialias=True)
        out.append(F.interpolate(small, size=size, mode="bilinear", align_corners=False))
    return torch.cat(out)


def _rician_noise(images: torch.Tensor, draw: _Draw) -> torch.Tensor:
    """Rician noise (magnitude of a complex signal with Gaussian noise), as MRI magnitude images have."""
    sigma = draw.uniform(0.0, 0.04).view(-1, 1, 1, 1)
    real = images + sigma * torch.randn(images.shape, generator=draw.generator).to(images.device)
    imaginary = sigma * torch.randn(images.shape, generator=draw.generator).to(images.device)
    return torch.sqrt(real**2 + imaginary**2)


def _match_other_class(images: torch.Tensor, labels: torch.Tensor, probability: float, draw: _Draw) -> torch.Tensor:
    """Give some images the grey-level histogram of another image in the batch of another class,
    so that the histogram (which differs between the Kaggle classes' sources) says nothing."""
    n = images.shape[0]
    partner = torch.randperm(n, generator=draw.generator).to(images.device)
    chosen = draw.chosen(probability).view(-1) & (labels[partner] != labels)
    if not bool(chosen.any()):
        return images
    index = chosen.nonzero().view(-1)
    flat = images.view(n, -1)
    order = flat[index].argsort(dim=1)
    reference = flat[partner[index]].sort(dim=1).values  # k-th darkest pixel takes the partner's k-th
    out = flat.clone()
    out[index] = torch.empty_like(reference).scatter_(1, order, reference)
    return out.view_as(images)


def _jpeg(images: torch.Tensor, probability: float, draw: _Draw) -> torch.Tensor:
    """JPEG re-encoding at quality 15-60 (published data sets are often re-compressed JPEG)."""
    chosen = draw.chosen(probability).view(-1).tolist()
    qualities = draw.uniform(15, 60).round().int().tolist()
    out = images.clone()
    for k in (k for k, yes in enumerate(chosen) if yes):
        grey = (images[k, 0].cpu() * 255).round().to(torch.uint8).numpy()
        buffer = io.BytesIO()
        Image.fromarray(grey).save(buffer, format="JPEG", quality=qualities[k])
        decoded = np.asarray(Image.open(buffer), dtype=np.float32) / 255.0
        out[k, 0] = torch.from_numpy(decoded).to(images.device)
    return out
