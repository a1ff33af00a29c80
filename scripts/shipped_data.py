"""What the scripts that fit and measure a model's calibration and guard share.

The validation split the model was selected on (``docs/training/split.json``: leak-free, never
trained on), the decoded Kaggle splits and an external class-folder set, the same validation
images under every shift of the shift suite (``braintumor.evaluation.shifts``), and the network's logits and
pooled features.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from braintumor.data.cache import load_cached
from braintumor.data.datasets import Sample, load_split, resolve_split_dir, scan_class_folders
from braintumor.evaluation.shifts import SHIFTS
from braintumor.inference.predict import Classifier, default_weights_path, load_model

SPLIT_FILE = Path("docs/training/split.json")


def weights_argument(parser) -> None:
    """The --weights option every fitting script takes (default: the packaged weights)."""
    parser.add_argument("--weights", type=Path, default=None, help="weights file to fit and rewrite (default: the packaged model)")


def classifier_for(weights: Path | None) -> tuple[Classifier, Path]:
    """The classifier of ``weights`` (the packaged model when None), on the CPU, and its path."""
    path = weights or default_weights_path()
    return load_model(path, device="cpu"), path


def validation_mask(samples: list[Sample]) -> np.ndarray:
    """True for the samples the model validated on (file names are unique across classes)."""
    names = {Path(p).name for p in json.loads(SPLIT_FILE.read_text())["val_paths"]}
    return np.array([s.path.name in names for s in samples])


def decoded_split(data: Path, split: str | None, size: int = 224) -> tuple[list[Sample], np.ndarray]:
    """The samples of ``Training`` or ``Testing`` (or, with ``split`` None, of a plain class-folder
    root such as the external set) and their decoded (N, size, size) pixels."""
    samples = load_split(data, split) if split else scan_class_folders(resolve_split_dir(data, "Testing"))
    decoded = load_cached([s.path for s in samples], size, None, progress=False)
    assert decoded.ok.all(), decoded.errors  # neither set has an unreadable file
    return samples, np.asarray(decoded.pixels)


def labels_of(samples: list[Sample]) -> np.ndarray:
    return np.array([s.label for s in samples])


def shifted_suite(pixels: np.ndarray, labels: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Every shift of the suite applied to ``pixels``, stacked: (len(SHIFTS) * N, S, S) and labels.
    Real scans made to look as if they came from elsewhere: what the flags are fitted on."""
    shifted = [SHIFTS[name](pixels, labels, seed) for name in SHIFTS]
    return np.concatenate(shifted), np.tile(labels, len(shifted))


def split_features(classifier: Classifier, data: Path, split: str) -> tuple[list[Sample], np.ndarray, np.ndarray]:
    """The samples of a split, their decoded pixels and the network's pooled features of them."""
    samples, pixels = decoded_split(data, split)
    return samples, pixels, network_outputs(classifier, pixels)[1]


def network_outputs(classifier: Classifier, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Logits before temperature scaling (float32) and pooled features (float64) of (N, S, S) pixels."""
    return classifier.logits_and_features(pixels)
