"""braintumor: EfficientNet-B0 brain MRI classification with Grad-CAM, honest evaluation and serving."""

from __future__ import annotations

__version__ = "0.1.0"

from .constants import CLASS_NAMES  # noqa: E402
from .models import create_model  # noqa: E402

__all__ = ["CLASS_NAMES", "__version__", "create_model"]
