"""What the scripts that fit and measure a model's calibration and guard share.

The training images and the validation split the model was selected on: by default the Kaggle
Training split and ``docs/training/split.json`` (leak-free, never trained on); with ``--run RUN``,
every source of that training run and its own split, recomputed from the run's ``config.yaml``
(the same subjects and images as in training). Also the decoded Kaggle splits and an external
class-folder set, the same validation images under every shift of the shift suite
(``braintumor.evaluation.shifts``), and the network's logits and pooled features.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from braintumor.data.cache import load_cached
from braintumor.data.datasets import Sample, load_split, resolve_split_dir, scan_class_folders
from braintumor.evaluation.shifts import SHIFTS
from braintumor.inference.predict import Classifier, default_weights_path, load_model

if TYPE_CHECKING:
    from braintumor.training.fit import TrainingData

SPLIT_FILE = Path("docs/training/split.json")


def weights_argument(parser) -> None:
    """The --weights and --run options every fitting script takes (default: the packaged weights,
    trained on Kaggle Training alone)."""
    parser.add_argument("--weights", type=Path, default=None, help="weights file to fit and rewrite (default: the packaged model)")
    parser.add_argument("--run", type=Path, default=None,
                        help="training run folder whose sources and split the weights were trained and selected on "
                             "(default: Kaggle Training and docs/training/split.json)")


def training_set(data: Path, run: Path | None) -> tuple[list, np.ndarray, np.ndarray, np.ndarray]:
    """The images the model trained and validated on: (samples, decoded pixels, labels, is-validation
    mask); from ``run``'s sources and split when given, else Kaggle Training and ``SPLIT_FILE``."""
    if run is None:
        samples, pixels = decoded_split(data, "Training")
        return samples, pixels, labels_of(samples), validation_mask(samples)
    prepared = run_data(run)
    is_val = np.zeros(len(prepared.images), dtype=bool)
    is_val[prepared.val_index] = True
    return prepared.images, prepared.pixels.numpy(), prepared.labels.numpy(), is_val


def run_data(run: Path) -> TrainingData:
    """The decoded images and split of a training run, recomputed from its ``config.yaml``
    (deterministic: the same sources, subjects and images as in training)."""
    import tempfile

    from braintumor.training.config import resolve_config
    from braintumor.training.fit import prepare_data

    with tempfile.TemporaryDirectory() as scratch:
        return prepare_data(resolve_config(run / "config.yaml", out=Path(scratch) / "unused"), progress=False)


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
