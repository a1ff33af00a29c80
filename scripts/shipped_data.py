"""What the scripts that fit and measure the shipped model's calibration and guard share.

The validation split the shipped model was selected on (``docs/training/split.json``: leak-free,
never trained on), the decoded Kaggle splits, and the network's logits and pooled features.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from braintumor.cache import load_cached
from braintumor.data import Sample, load_split
from braintumor.engine import predict_logits_and_features
from braintumor.predict import Classifier

SPLIT_FILE = Path("docs/training/split.json")


def validation_mask(samples: list[Sample]) -> np.ndarray:
    """True for the samples the shipped model validated on (file names are unique across classes)."""
    names = {Path(p).name for p in json.loads(SPLIT_FILE.read_text())["val_paths"]}
    return np.array([s.path.name in names for s in samples])


def decoded_split(data: Path, split: str, size: int = 224) -> tuple[list[Sample], np.ndarray]:
    """The samples of ``Training`` or ``Testing`` and their decoded (N, size, size) pixels."""
    samples = load_split(data, split)
    decoded = load_cached([s.path for s in samples], size, None, progress=False)
    assert decoded.ok.all(), decoded.errors  # the Kaggle set has no unreadable file
    return samples, decoded.pixels


def split_features(classifier: Classifier, data: Path, split: str) -> tuple[list[Sample], np.ndarray, np.ndarray]:
    """The samples of a split, their decoded pixels and the network's pooled features of them."""
    samples, pixels = decoded_split(data, split)
    return samples, pixels, network_outputs(classifier, pixels)[1]


def network_outputs(classifier: Classifier, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Logits before temperature scaling (float32) and pooled features (float64) of (N, S, S) pixels."""
    logits, features = predict_logits_and_features(classifier.model, torch.as_tensor(np.asarray(pixels)), classifier.runtime)
    return logits.numpy(), features.double().numpy()
