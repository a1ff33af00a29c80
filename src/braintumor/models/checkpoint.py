"""Weights files that carry their own preprocessing, and resumable training checkpoints.

Shipped weights are safetensors (no pickle: loading them runs no code) with metadata: class order,
input size, normalisation, initialisation, recipe, a fingerprint of the training data and metrics.
Everything needed to use the weights correctly travels inside the one file.

Training checkpoints (``last.pt``) also hold optimizer, scheduler and random-generator state so a
killed run resumes exactly; they are written to a temporary name and renamed, so a kill during the
write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from ..constants import CLASS_NAMES, IMAGE_SIZE, IMAGENET_MEAN, IMAGENET_STD
from ..errors import CheckpointError

WEIGHTS_FORMAT = "braintumor-weights/1"


def weights_sha256(path: Path) -> str:
    """The full SHA-256 of a weights file: what names the exact model in exports, the service's
    model information and DICOM results. Hashed once per process for each file as it is on disk
    (path, size and modification time): a rewritten file is hashed again."""
    stat = Path(path).stat()
    return _sha256_of(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def save_weights(state: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, Any]) -> None:
    """Write a model state dict and JSON-encoded metadata to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    encoded = {"format": WEIGHTS_FORMAT}
    encoded.update({key: json.dumps(value) for key, value in metadata.items()})
    tensors = {key: value.detach().to("cpu").contiguous() for key, value in state.items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=encoded)
    os.replace(tmp, path)


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The decoded metadata of a weights file, with defaults for fields an older file lacks."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = handle.metadata() or {}
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    if raw.get("format") != WEIGHTS_FORMAT:
        raise CheckpointError(f"{path}: not a braintumor weights file (format {raw.get('format')!r})")
    metadata: dict[str, Any] = {
        "class_names": list(CLASS_NAMES),
        "image_size": IMAGE_SIZE,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
    }
    try:
        metadata.update({key: json.loads(value) for key, value in raw.items() if key != "format"})
    except ValueError as exc:
        raise CheckpointError(f"{path}: metadata is not JSON ({exc})") from None
    return metadata


def load_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, metadata) of a weights file.

    Raises:
        CheckpointError: missing, unreadable or not a braintumor weights file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    metadata = read_metadata(path)
    try:
        return load_file(str(path)), metadata
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"{path}: cannot read tensors ({exc})") from None


def save_training_state(path: str | Path, state: dict[str, Any]) -> None:
    """Write a resumable checkpoint atomically (temporary file, then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_training_state(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by ``save_training_state`` (tensors and plain values only)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint to resume from")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a damaged file
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(exc).__name__}: {exc})") from None
