"""Heat-map helpers: brain mask, coverage share, deletion faithfulness, hook release."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from braintumor.errors import ConfigError
from braintumor.inference.explain import (
    HeatmapRequest,
    brain_mask,
    compute_heatmaps,
    deletion_drop,
    resolve_layer,
    share_inside,
)
from braintumor.models.registry import build_efficientnet_b0


def _head(size: int = 128) -> np.ndarray:
    image = Image.new("L", (size, size))
    draw = ImageDraw.Draw(image)
    m = size // 8
    draw.ellipse([m, m // 2, size - m, size - m // 2], fill=200)  # skull
    inset = m // 3 + 1
    draw.ellipse([m + inset, m // 2 + inset, size - m - inset, size - m // 2 - inset], fill=110)  # brain
    return np.asarray(image)


def test_brain_mask_covers_the_inside_of_the_head_only() -> None:
    grey = _head()
    mask = brain_mask(grey)
    assert mask[64, 64] and not mask[0, 0] and not mask[64, 17]
    assert 0.3 < mask.mean() < 0.7


def test_share_inside() -> None:
    heat = np.zeros((4, 4))
    heat[:2] = 1.0
    mask = np.zeros((4, 4), bool)
    mask[0] = True
    assert share_inside(heat, mask) == 0.5 and share_inside(np.zeros((4, 4)), mask) == 0.0


@pytest.fixture(scope="module")
def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_efficientnet_b0().eval()


def test_deletion_drop_is_zero_when_nothing_changes(tiny_model: torch.nn.Module) -> None:
    flat = np.full((2, 32, 32), 90, dtype=np.uint8)  # blurring a flat image changes nothing
    drops = deletion_drop(tiny_model, flat, np.random.default_rng(0).random((2, 32, 32)), np.array([0, 1]), 0.2)
    assert np.allclose(drops, 0.0, atol=1e-6)


def test_cam_hooks_are_released(tiny_model: torch.nn.Module) -> None:
    layer = resolve_layer(tiny_model, "features.8")
    pixels = np.stack([_head(32), _head(32)])
    for _ in range(3):
        result = compute_heatmaps(tiny_model, pixels, HeatmapRequest("gradcam", "features.8"))
    assert result.heatmaps.shape == (2, 32, 32) and result.probabilities.shape == (2, 4)
    assert result.features.shape == (2, 1280)
    assert not tiny_model.avgpool._forward_hooks
    assert not layer._forward_hooks and not layer._backward_hooks and not layer._forward_pre_hooks


def test_bad_layer_and_method_are_named(tiny_model: torch.nn.Module) -> None:
    with pytest.raises(ConfigError, match="features.0"):
        resolve_layer(tiny_model, "features.99")
    with pytest.raises(ConfigError, match="gradcam"):
        compute_heatmaps(tiny_model, np.zeros((1, 32, 32), np.uint8), HeatmapRequest("shapcam", "features.8"))
