"""``load_model()``: the classifier users import. Load once, then predict many times.

The classifier rebuilds its preprocessing from the weights file's metadata (class order, input
size, normalisation), so a model trained with other settings is used correctly without flags.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .checkpoint import load_weights
from .engine import Runtime, predict_logits, select_runtime
from .errors import CheckpointError
from .models import build_efficientnet_b0

SHIPPED_WEIGHTS_NAME = "braintumor-b0.safetensors"


def default_weights_path() -> Path:
    """The model that ships inside the package."""
    return Path(str(resources.files("braintumor") / "weights" / SHIPPED_WEIGHTS_NAME))


class Classifier:
    """An EfficientNet-B0 with the metadata that says how to feed it and name its outputs."""

    def __init__(self, model: nn.Module, metadata: dict[str, Any], runtime: Runtime, weights_path: Path | None = None):
        self.model = model.eval()
        self.metadata = metadata
        self.runtime = runtime
        self.weights_path = weights_path
        self.class_names: list[str] = list(metadata["class_names"])
        self.image_size: int = int(metadata["image_size"])

    def predict_pixels(self, pixels: np.ndarray | torch.Tensor, batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """Class probabilities (N, C) for decoded, resized grey pixels (N, S, S) uint8."""
        tensor = torch.as_tensor(np.asarray(pixels)) if not isinstance(pixels, torch.Tensor) else pixels
        logits = predict_logits(self.model, tensor, self.runtime, batch_size=batch_size, progress=progress)
        return torch.softmax(logits, dim=1).numpy()


def load_model(weights: str | Path | None = None, device: str = "auto", amp: bool = False) -> Classifier:
    """Load a braintumor weights file (default: the shipped model) into a ready classifier.

    Args:
        weights: a ``.safetensors`` file written by ``braintumor train``; None for the shipped model.
        device: 'auto', 'cpu' or 'cuda'.
        amp: bf16/fp16 autocast for speed; off by default so results match fp32 exactly.

    Raises:
        CheckpointError: the file is missing, unreadable, or does not fit the model.
    """
    path = Path(weights) if weights is not None else default_weights_path()
    state, metadata = load_weights(path)
    model = build_efficientnet_b0(len(metadata["class_names"]))
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit EfficientNet-B0 ({str(exc).splitlines()[0]})") from None
    runtime = select_runtime(device, amp)
    model = model.to(runtime.device)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return Classifier(model, metadata, runtime, path)
