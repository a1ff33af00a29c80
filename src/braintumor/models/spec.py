"""``ModelSpec``: everything needed to use a set of weights correctly, read once from the file.

A weights file (``.safetensors``) or an exported graph (``.onnx``) carries its metadata: the
architecture, the class order, the preprocessing, the Grad-CAM layer, the calibration, the
out-of-distribution guard, the sequence and plane estimator and what the training data covers.
``ModelSpec.from_metadata`` validates all of it in one place, so a damaged or foreign file fails
at load time with one clear message, and every path (training's output, torch and ONNX
inference, Grad-CAM, the service, export) reads the same typed values instead of looking up
string keys in a dict.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from ..constants import CLASS_NAMES
from ..data.transforms import Preprocessing
from ..errors import CheckpointError, ConfigError
from .ood import OODGuard
from .slice_kind import Coverage, SliceKindEstimator

DEFAULT_ARCHITECTURE = "efficientnet_b0"
# The architectures a spec may name: the keys of ``registry.ARCHITECTURES`` (the registry checks
# that they agree), kept here so that reading a spec, as the ONNX Runtime path does, needs neither
# torchvision nor the registry, and the two modules do not import each other.
ARCHITECTURE_NAMES: tuple[str, ...] = ("efficientnet_b0",)
# Grad-CAM's default layer, chosen by the faithfulness comparison in docs/explanations.md: the
# last 14x14 stage of B0, four times finer than the 7x7 head.
DEFAULT_CAM_LAYER = "features.5"
# Metadata keys the spec owns; everything else (metrics, recipe, training data) is kept in ``info``.
_SPEC_KEYS = frozenset(
    {"model", "class_names", "cam_layer", "temperature", "uncertainty_threshold", "coverage",
     *Preprocessing().to_metadata()}
)


@dataclass(frozen=True)
class ModelSpec:
    """How to feed a network and read its outputs; travels inside every weights and ONNX file.

    ``info`` holds what describes the weights without changing how they are used (validation and
    test metrics, the training recipe, the data fingerprint); it is read-only.
    """

    architecture: str = DEFAULT_ARCHITECTURE
    class_names: tuple[str, ...] = CLASS_NAMES
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    cam_layer: str = DEFAULT_CAM_LAYER
    temperature: float = 1.0  # logits are divided by it before the softmax (scripts/calibrate.py)
    uncertainty_threshold: float | None = None  # below this confidence an answer is flagged uncertain
    guard: OODGuard | None = field(default=None, compare=False)
    slice_kind: SliceKindEstimator | None = field(default=None, compare=False)
    coverage: Coverage | None = field(default=None, compare=False)  # training slices per class, sequence, plane
    info: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}), compare=False)

    @property
    def image_size(self) -> int:
        return self.preprocessing.image_size

    @classmethod
    def from_metadata(
        cls, metadata: Mapping[str, Any], guard: OODGuard | None = None, source: str = "",
        slice_kind: SliceKindEstimator | None = None,
    ) -> ModelSpec:
        """The spec of a file's decoded metadata, validated (older files lack some keys: defaults);
        the guard and the slice-kind estimator travel as tensors and come in beside it.

        Raises:
            CheckpointError: a value is missing its type or range; the message names ``source``.
        """
        try:
            spec = cls(
                architecture=str(metadata.get("model", DEFAULT_ARCHITECTURE)),
                class_names=tuple(str(name) for name in metadata.get("class_names", CLASS_NAMES)),
                preprocessing=Preprocessing.from_metadata(dict(metadata)),
                cam_layer=str(metadata.get("cam_layer", DEFAULT_CAM_LAYER)),
                temperature=float(metadata.get("temperature", 1.0)),
                uncertainty_threshold=_optional_float(metadata.get("uncertainty_threshold")),
                guard=guard,
                slice_kind=slice_kind,
                coverage=Coverage.from_metadata(metadata.get("coverage")),
                info=MappingProxyType({k: v for k, v in metadata.items() if k not in _SPEC_KEYS}),
            )
            spec.validate()
        except (TypeError, ValueError, ConfigError) as exc:
            raise CheckpointError(f"{source or 'weights'}: invalid model metadata ({exc})") from None
        return spec

    def validate(self) -> None:
        """Raise ``ValueError`` unless every field is usable."""
        if self.architecture not in ARCHITECTURE_NAMES:
            raise ValueError(f"architecture {self.architecture!r} is not one of {', '.join(ARCHITECTURE_NAMES)}")
        if len(self.class_names) < 2 or len(set(self.class_names)) != len(self.class_names):
            raise ValueError(f"class_names must be at least two distinct names, got {list(self.class_names)}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be a positive number, got {self.temperature}")
        threshold = self.uncertainty_threshold
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise ValueError(f"uncertainty_threshold must be in [0, 1], got {threshold}")
        if self.coverage is not None and set(self.coverage.cells) != set(self.class_names):
            raise ValueError(f"coverage classes {sorted(self.coverage.cells)} are not the class names")
        if self.image_size < 32 or self.image_size % 32:
            raise ValueError(f"image_size must be a multiple of 32 >= 32, got {self.image_size}")

    def to_metadata(self) -> dict[str, Any]:
        """JSON-able metadata that ``from_metadata`` reads back (the guard travels as tensors)."""
        metadata = {**self.info, "model": self.architecture, "class_names": list(self.class_names)}
        metadata.update(self.preprocessing.to_metadata())
        metadata.update({"cam_layer": self.cam_layer, "temperature": self.temperature})
        if self.uncertainty_threshold is not None:
            metadata["uncertainty_threshold"] = self.uncertainty_threshold
        if self.coverage is not None:
            metadata["coverage"] = self.coverage.to_metadata()
        return metadata

    def with_guard(self, guard: OODGuard | None) -> ModelSpec:
        return replace(self, guard=guard)


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)
