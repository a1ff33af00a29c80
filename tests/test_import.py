"""Importing the package is instant and changes nothing of the caller's: no torch, ONNX Runtime or
matplotlib until a name that needs them is used, and PIL's truncated-image flag left as found."""

from __future__ import annotations

import io
import subprocess
import sys
from importlib.metadata import version

import numpy as np
import pytest
from PIL import Image, ImageFile

HEAVY = ("torch", "onnxruntime", "matplotlib", "sklearn", "scipy")


def _modules_after(code: str) -> set[str]:
    """The heavy modules loaded once ``code`` has run in a fresh interpreter."""
    probe = f"{code}\nimport sys\nprint(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    return set(result.stdout.split())


def test_import_and_help_load_nothing_heavy() -> None:
    assert _modules_after("import braintumor; braintumor.CLASS_NAMES; braintumor.__version__") == set()
    help_run = (
        "from typer.testing import CliRunner\nfrom braintumor.cli import app\n"
        "for args in (['--help'], ['train', '--help'], ['predict', '--help']):\n"
        "    assert CliRunner().invoke(app, args).exit_code == 0"
    )
    assert _modules_after(help_run) == set()


@pytest.mark.slow
def test_public_names_load_when_first_used() -> None:
    assert "torch" in _modules_after("from braintumor import load_model")
    import braintumor

    assert braintumor.Classifier.__name__ == "Classifier" and "load_model" in dir(braintumor)
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        braintumor.nothing  # noqa: B018


def test_the_version_has_one_source() -> None:
    import braintumor

    assert version("braintumor") == braintumor.__version__


def _jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.arange(64 * 64, dtype=np.uint8).reshape(64, 64)).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_the_callers_truncated_image_flag_is_kept_and_truncated_files_still_fail(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from braintumor.data.imaging import decode_image
    from braintumor.errors import InvalidImageError

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    data = _jpeg()
    assert decode_image(data, name="whole.jpg").shape == (64, 64)
    with pytest.raises(InvalidImageError, match="truncated.jpg"):
        decode_image(data[: len(data) // 2], name="truncated.jpg")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True


@pytest.mark.slow
def test_reading_a_spec_needs_neither_the_registry_nor_torchvision() -> None:
    """models.spec and models.registry used to import each other; the spec now names the
    architectures itself, so the ONNX Runtime path that reads a spec never builds a network."""
    probe = (
        "import braintumor.models.spec, sys\n"
        "print(' '.join(m for m in ('braintumor.models.registry', 'torchvision') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.split() == []
