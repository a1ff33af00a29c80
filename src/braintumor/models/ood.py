"""Out-of-distribution guard: is this input a brain MRI slice at all?

The classifier's 1280-d pooled features of real training scans lie close to a low-dimensional
subspace; a photo, a chart, a blank or noise image has features that point elsewhere. The guard
fits PCA with ``N_COMPONENTS`` components to the training features and scores an input by the
share of its feature vector that the subspace cannot explain (relative reconstruction error).
The threshold is a high percentile of held-out validation scans' scores, so a known, small share
of real scans is rejected. (A Mahalanobis distance inside the subspace and the feature norm were
tried and separate worse: see docs/ood/README.md.) The guard's tensors travel inside the weights
file under ``ood.*``.

Between "a brain MRI slice like the training scans" and "not a brain MRI slice" lies a third
case: a real MRI slice from another scanner, sequence or hospital, unlike the scans the model was
validated on. Its features sit farther from the training subspace than validation scans' do, but
nearer than a photo's. The guard's ``range_threshold`` (below ``threshold``) marks that band: such
slices are classified, and flagged ``outside_validated_range``, because the accuracy measured on
the validation split does not vouch for them.

In front of it sits a pixel rule the features cannot see, as every input is turned grey before
the network: a picture with more than ``COLOUR_LIMIT`` of its pixels in colour is not an MRI
slice. No file of the data set comes near it (at most 5.2% coloured pixels, JPEG chroma noise),
while colour photos score 24-95%; it catches a colour fundus photograph whose features the
subspace explains well enough to pass (docs/ood/README.md). A DICOM file is also refused when
its own header says it is not a whole brain MRI slice (``data.medical.dicom_refusal``: another
modality, another body part, or a field of view too small for a head).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

N_COMPONENTS = 64
TENSOR_PREFIX = "ood."
COLOUR_LIMIT = 0.15  # share of coloured pixels (imaging.colour_share) above which an input is not a scan


def colour_rejects(colour_shares: np.ndarray) -> np.ndarray:
    """True where an input is a colour picture: MRI is grey."""
    return np.asarray(colour_shares, dtype=float) > COLOUR_LIMIT


def refusal_reason(by_features: bool, by_colour: bool, by_header: str | None = None) -> str | None:
    """The words shown with ``not_brain_mri`` (None when no rule refused the input).
    ``by_header``: what a DICOM header says against the input (``data.medical.dicom_refusal``)."""
    reasons = [by_header] if by_header else []
    if by_colour:
        reasons.append("a colour picture (MRI slices are grey)")
    if by_features:
        reasons.append("unlike every training scan (out-of-distribution features)")
    return "; ".join(reasons) or None


@dataclass
class OODGuard:
    """PCA subspace of training features and the rejection threshold on the residual share."""

    mean: np.ndarray  # (1280,)
    components: np.ndarray  # (k, 1280), orthonormal rows
    threshold: float  # above: not a brain MRI slice (refused)
    range_threshold: float | None = None  # above (and not refused): outside the validated range; None: no such band

    def score(self, features: np.ndarray) -> np.ndarray:
        """Share (0..1) of each (N, 1280) feature vector's norm outside the training subspace."""
        centred = features - self.mean
        residual = centred - (centred @ self.components.T) @ self.components
        return np.linalg.norm(residual, axis=1) / np.maximum(np.linalg.norm(features, axis=1), 1e-12)

    def rejects(self, features: np.ndarray) -> np.ndarray:
        """True where the input is unlike every training scan: not a brain MRI slice."""
        return self.verdicts(features)[1]

    def outside_range(self, features: np.ndarray) -> np.ndarray:
        """True where a slice is accepted but unlike the validated scans (``range_threshold``)."""
        return self.verdicts(features)[2]

    def verdicts(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(scores, refused, outside the validated range) of (N, 1280) features, scored once."""
        scores = self.score(features)
        refused = scores > self.threshold
        if self.range_threshold is None:
            return scores, refused, np.zeros(len(scores), dtype=bool)
        return scores, refused, (scores > self.range_threshold) & ~refused

    def to_tensors(self) -> dict[str, torch.Tensor]:
        values = {"mean": self.mean, "components": self.components, "threshold": np.array([self.threshold])}
        if self.range_threshold is not None:
            values["range_threshold"] = np.array([self.range_threshold])
        return {TENSOR_PREFIX + k: torch.as_tensor(np.asarray(v, dtype=np.float32)) for k, v in values.items()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> OODGuard | None:
        """The guard stored in a weights file, or None when the file has none."""
        if TENSOR_PREFIX + "mean" not in tensors:
            return None
        get = {k[len(TENSOR_PREFIX):]: v.double().numpy() for k, v in tensors.items() if k.startswith(TENSOR_PREFIX)}
        band = get.get("range_threshold")
        return cls(get["mean"], get["components"], float(get["threshold"][0]), None if band is None else float(band[0]))


def outside_range_reason(score: float, range_threshold: float) -> str:
    """The words shown with ``outside_validated_range``."""
    return (
        "an MRI slice unlike the scans the model was validated on "
        f"(feature distance {score:.3f} > {range_threshold:.3f}): "
        "another scanner, sequence, plane or hospital? Its accuracy is not known"
    )


def fit_guard(train_features: np.ndarray, val_features: np.ndarray, percentile: float = 99.5) -> OODGuard:
    """PCA on training features; threshold at ``percentile`` of the validation scans' scores
    (``range_threshold`` is left unset: ``scripts/fit_ood.py`` chooses both on measured data)."""
    from sklearn.decomposition import PCA

    pca = PCA(n_components=min(N_COMPONENTS, len(train_features) - 1, train_features.shape[1]), random_state=0)
    pca.fit(train_features)
    guard = OODGuard(pca.mean_, pca.components_, threshold=np.inf)
    guard.threshold = float(np.percentile(guard.score(val_features), percentile))
    return guard


def split_guard(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], OODGuard | None]:
    """Separate a weights file's tensors into the model's state dict and its guard (if any)."""
    state = {k: v for k, v in tensors.items() if not k.startswith(TENSOR_PREFIX)}
    return state, OODGuard.from_tensors(tensors)
