"""braintumor: EfficientNet-B0 brain MRI classification with Grad-CAM and honest evaluation.

Importing the package loads no torch, ONNX Runtime or matplotlib and changes no global state: the
public names below are imported when first used (PEP 562), so ``import braintumor`` and
``braintumor --help`` start at once.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .constants import CLASS_NAMES

__version__ = "0.1.0"  # the one source of the version: pyproject.toml reads it from here

if TYPE_CHECKING:
    from .data.dicom_series import DicomSeries, read_dicom_series
    from .inference.predict import Classifier, Explanation, Prediction, load_model
    from .inference.results import SeriesResult, SeriesVerdict, SlicePrediction, flags_of
    from .models.registry import create_model

# public name -> the module (relative to this package) that defines it
_LAZY: dict[str, str] = {
    "Classifier": "inference.predict",
    "Explanation": "inference.predict",
    "Prediction": "inference.predict",
    "load_model": "inference.predict",
    "create_model": "models.registry",
    "SlicePrediction": "inference.results",
    "SeriesResult": "inference.results",
    "SeriesVerdict": "inference.results",
    "flags_of": "inference.results",
    "DicomSeries": "data.dicom_series",
    "read_dicom_series": "data.dicom_series",
}

__all__ = [
    "CLASS_NAMES", "Classifier", "DicomSeries", "Explanation", "Prediction", "SeriesResult", "SeriesVerdict",
    "SlicePrediction", "__version__", "create_model", "flags_of", "load_model", "read_dicom_series",
]


def __getattr__(name: str) -> Any:
    """Import a public name's module the first time the name is used, then keep the name here."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
