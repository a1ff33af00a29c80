"""Grad-CAM heat maps through jacobgil's ``grad-cam`` package, and the PNGs people look at.

The CAM object is used as a context manager, so its hooks are removed after every call and a
long loop neither leaks memory nor slows down.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..data.transforms import Preprocessing
from ..errors import ConfigError, printable_name

METHODS: tuple[str, ...] = ("gradcam", "gradcam++", "eigencam", "layercam")


def _cam_class(method: str) -> type:
    from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, LayerCAM

    classes = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "eigencam": EigenCAM, "layercam": LayerCAM}
    if method not in classes:
        raise ConfigError(f"method {method!r} is not one of {', '.join(METHODS)}")
    return classes[method]


def resolve_layer(model: nn.Module, name: str) -> nn.Module:
    """A submodule by dotted name (``features.5``), with the valid names in the error."""
    modules = dict(model.named_modules())
    if name not in modules:
        choices = ", ".join(f"features.{i}" for i in range(len(model.features)))
        raise ConfigError(f"layer {name!r} is not a module of the model; try one of {choices}")
    return modules[name]


@dataclass
class HeatmapRequest:
    """Which explanation: method, layer (dotted name) and target class index (None: predicted)."""

    method: str
    layer: str
    target: int | None = None


@dataclass
class CamResult:
    """Heat maps (N, S, S) float32 in [0, 1], with the logits (N, C) and pooled features (N, F) of
    the same forward pass (float32, CPU), so an explanation needs no second pass to be scored."""

    heatmaps: np.ndarray
    logits: torch.Tensor
    features: torch.Tensor

    @property
    def probabilities(self) -> np.ndarray:
        """Softmax of the logits (no temperature): (N, C)."""
        return torch.softmax(self.logits, 1).numpy()


def compute_heatmaps(
    model: nn.Module, pixels: np.ndarray, request: HeatmapRequest, preprocessing: Preprocessing = Preprocessing()
) -> CamResult:
    """CAMs for (N, S, S) uint8 model-size pixels, fed through the weights' ``preprocessing``, in
    one forward and one backward pass (fp32, on the model's device). The explained class is
    ``request.target``, else each image's predicted class."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    device = next(model.parameters()).device
    inputs = preprocessing(torch.as_tensor(pixels).to(device)).contiguous(memory_format=torch.channels_last)
    model.eval()
    targets = None if request.target is None else [ClassifierOutputTarget(request.target)] * len(pixels)
    pooled: list[torch.Tensor] = []
    hook = model.avgpool.register_forward_hook(lambda module, args, output: pooled.append(output.detach()))
    try:
        with _cam_class(request.method)(model=model, target_layers=[resolve_layer(model, request.layer)]) as cam:
            heatmaps = cam(input_tensor=inputs, targets=targets)
            logits = cam.outputs.detach().float().cpu()
    finally:
        hook.remove()
    return CamResult(heatmaps.astype(np.float32), logits, torch.flatten(pooled[0], 1).float().cpu())


def resize_heatmap(heatmap: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A heat map resized (bilinear) to an image's (H, W)."""
    image = Image.fromarray(heatmap.astype(np.float32), mode="F")
    return np.asarray(image.resize((shape[1], shape[0]), Image.Resampling.BILINEAR), dtype=np.float32).clip(0, 1)


def overlay(grey: np.ndarray, heatmap: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """RGB uint8: the scan in grey with the heat map (jet colours) blended over it."""
    from matplotlib import colormaps

    colours = colormaps["jet"](heatmap)[..., :3]
    scan = np.repeat(grey[..., None] / 255.0, 3, axis=2)
    return ((1 - alpha) * scan + alpha * colours).clip(0, 1).__mul__(255).round().astype(np.uint8)


def _shortened(text: str, limit: int = 56) -> str:
    """``text`` cut in the middle with an ellipsis when longer than ``limit`` characters, so a long
    file name still shows its start and its end in a figure title."""
    if len(text) <= limit:
        return text
    keep = (limit - 1) // 2
    return text[:keep] + "\u2026" + text[-(limit - 1 - keep):]


def save_figure(
    grey: np.ndarray, heatmap: np.ndarray, title: str, name: str, detail: str, path: Path | BinaryIO
) -> None:
    """PNG: the scan beside the heat-map overlay, titled with the prediction, the file ``name``
    (shortened to fit) and the ``detail`` (method, layer), to a file or a binary stream."""
    import matplotlib

    matplotlib.use("Agg")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # its font-cache notice is no result
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 4.4))
    left.imshow(grey, cmap="gray", vmin=0, vmax=255)
    left.set_title("scan")
    right.imshow(overlay(grey, heatmap))
    right.set_title("heat map")
    for axis in (left, right):
        axis.axis("off")
    fig.suptitle(f"{title}\n{_shortened(printable_name(name))}  [{detail}]", fontsize=11)
    fig.tight_layout()
    if isinstance(path, Path):
        path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)


def brain_mask(grey: np.ndarray, skull_fraction: float = 0.04) -> np.ndarray:
    """A rough brain mask: the head (Otsu foreground, largest component, holes filled), shrunk by
    ``skull_fraction`` of the image size to drop the skull and scalp ring. Good enough to ask
    whether a heat map looks at the brain or at the background and skull; not a segmentation."""
    from scipy import ndimage

    values = grey.astype(np.float64)
    histogram, edges = np.histogram(values, bins=256, range=(0, 256))
    weights = np.cumsum(histogram)
    means = np.cumsum(histogram * edges[:-1])
    total, total_mean = weights[-1], means[-1]
    between = (total_mean * weights - means * total) ** 2 / np.maximum(weights * (total - weights), 1)
    head = values > edges[int(np.argmax(between))]
    labels, count = ndimage.label(head)
    if count == 0:
        return np.zeros(grey.shape, dtype=bool)
    largest = labels == (np.argmax(np.bincount(labels.ravel())[1:]) + 1)
    filled = ndimage.binary_fill_holes(largest)
    radius = max(1, int(round(skull_fraction * max(grey.shape))))
    return ndimage.binary_erosion(filled, iterations=radius)


def share_inside(heatmap: np.ndarray, mask: np.ndarray) -> float:
    """Fraction of the heat map's mass that falls inside ``mask``."""
    total = float(heatmap.sum())
    return float((heatmap * mask).sum() / total) if total > 0 else 0.0


def deletion_drop(
    model: nn.Module,
    pixels: np.ndarray,
    heatmaps: np.ndarray,
    targets: np.ndarray,
    fraction: float,
    preprocessing: Preprocessing = Preprocessing(),
) -> np.ndarray:
    """Faithfulness: how much the target class's probability falls when the ``fraction`` most
    highlighted pixels are replaced by a heavily blurred copy of the image (blurring, rather than
    blacking out, keeps the perturbed scan close to real scans, as the ROAD paper recommends).

    Returns:
        (N,) drops in probability; larger means the map found what the model relies on.
    """
    from scipy import ndimage

    blurred = np.stack([ndimage.gaussian_filter(p.astype(np.float32), sigma=8) for p in pixels])
    cut = np.quantile(heatmaps.reshape(len(heatmaps), -1), 1 - fraction, axis=1)[:, None, None]
    perturbed = np.where(heatmaps >= cut, blurred, pixels).round().clip(0, 255).astype(np.uint8)
    device = next(model.parameters()).device
    with torch.no_grad():
        before = torch.softmax(model(preprocessing(torch.as_tensor(pixels).to(device))).float(), 1).cpu().numpy()
        after = torch.softmax(model(preprocessing(torch.as_tensor(perturbed).to(device))).float(), 1).cpu().numpy()
    rows = np.arange(len(pixels))
    return before[rows, targets] - after[rows, targets]
