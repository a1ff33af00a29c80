"""The only place preprocessing lives: grey uint8 pixels to normalised model input, and augmentation.

Images arrive here already decoded to greyscale and resized (``imaging``, ``cache``). Both the
training augmentation and the evaluation preset work on whole batches of tensors, so they run
on the GPU when there is one and cost little next to the network on a CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .constants import IMAGENET_MEAN, IMAGENET_STD


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation suited to axial, coronal and sagittal MRI slices.

    Left-right mirroring is anatomically plausible (tumours occur on both sides); small rotations,
    shifts and zooms mimic head position and field of view; intensity scaling mimics scanner gain.
    No vertical flips or large rotations: slices are always shown upright.
    """

    hflip: float = 0.5
    degrees: float = 10.0
    translate: float = 0.06
    scale: tuple[float, float] = (0.9, 1.1)
    contrast: tuple[float, float] = (0.85, 1.15)
    brightness: float = 0.08


def normalise(
    pixels: torch.Tensor,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> torch.Tensor:
    """(N, H, W) uint8 or (N, 1, H, W) float in [0, 1] to (N, 3, H, W) float32 ImageNet-normalised.

    The grey channel is repeated into the three channels the ImageNet-shaped network expects.
    """
    if pixels.dtype == torch.uint8:
        pixels = pixels.float().div_(255.0)
    if pixels.dim() == 3:
        pixels = pixels.unsqueeze(1)
    mean_t = torch.tensor(mean, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    return (pixels.expand(-1, 3, -1, -1) - mean_t) / std_t


def augment(pixels: torch.Tensor, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Random flip, rotation, shift, zoom and intensity change of a (N, H, W) uint8 batch.

    Returns:
        (N, 1, H, W) float in [0, 1], ready for ``normalise``.
    """
    n = pixels.shape[0]
    device = pixels.device
    images = pixels.float().div_(255.0).unsqueeze(1)

    def uniform(low: float, high: float) -> torch.Tensor:
        return torch.empty(n).uniform_(low, high, generator=generator).to(device)

    angle = uniform(-config.degrees, config.degrees) * (math.pi / 180.0)
    scale = uniform(*config.scale)
    flip = torch.where(torch.rand(n, generator=generator).to(device) < config.hflip, -1.0, 1.0)
    shift_x, shift_y = uniform(-config.translate, config.translate), uniform(-config.translate, config.translate)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    # Output-to-input sampling matrix: rotate and zoom, then mirror the x axis where flip is -1.
    theta = torch.stack(
        [torch.stack([cos * flip, -sin, shift_x], 1), torch.stack([sin * flip, cos, shift_y], 1)], 1
    )
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    gain = uniform(*config.contrast).view(n, 1, 1, 1)
    offset = uniform(-config.brightness, config.brightness).view(n, 1, 1, 1)
    return (images * gain + offset).clamp_(0.0, 1.0)
