"""braintumor: EfficientNet-B0 brain MRI classification with Grad-CAM and honest evaluation."""

from __future__ import annotations

__version__ = "0.1.0"

from .constants import CLASS_NAMES  # noqa: E402
from .inference.predict import Classifier, Explanation, Prediction, load_model  # noqa: E402
from .models.registry import create_model  # noqa: E402

__all__ = ["CLASS_NAMES", "Classifier", "Explanation", "Prediction", "__version__", "create_model", "load_model"]
