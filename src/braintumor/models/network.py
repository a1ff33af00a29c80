"""The network behind one interface, run by PyTorch or by ONNX Runtime, and the one loader of both.

Every inference path calls ``Network.logits_and_features`` on grey ``uint8`` pixels (N, S, S) at
the spec's input size: the network applies the spec's preprocessing itself (the torch network
through ``Preprocessing``, the ONNX graph has the same operations inside), and returns logits
(N, C) and pooled features (N, F) as float32 CPU tensors. Calibration, the guard's verdicts and
the flags are computed from those by the ``Classifier``, identically for both backends.

``load_network(weights, backend="auto")`` picks ONNX Runtime on a CPU, where it is faster than
PyTorch and gives the same predictions (``benchmarks/run.py``), and PyTorch on a GPU. For a
``.safetensors`` file it uses the graph shipped beside the file when that graph was exported from
these exact weights, else one exported once into the user cache (``graph_for_weights``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from tqdm import tqdm

from .. import __version__
from ..data.transforms import Preprocessing
from ..errors import CheckpointError, ConfigError
from ..extras import MissingExtraError, require
from .onnx_backend import OnnxNetwork, check_parity, export_model_proto, save_proto, source_of
from .registry import fold_batch_norm, load_weights_file
from .runtime import Runtime, select_runtime
from .spec import ModelSpec

BACKENDS: tuple[str, ...] = ("auto", "torch", "onnx")


@torch.inference_mode()
def predict_logits_and_features(
    model: nn.Module,
    pixels: torch.Tensor,
    runtime: Runtime,
    batch_size: int = 64,
    progress: bool = False,
    preprocessing: Preprocessing = Preprocessing(),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (N, C) and pooled features (N, 1280) of a torchvision EfficientNet, float32 on the CPU.
    The features cost nothing extra: they are the classifier's input. ``preprocessing`` must be the
    weights' own (``Preprocessing.from_metadata``)."""
    model.eval()
    logits, features = [], []
    starts = range(0, len(pixels), batch_size)
    for start in tqdm(starts, desc="predict", unit="batch", disable=not progress, leave=False):
        batch = runtime.to_input(preprocessing(pixels[start : start + batch_size].to(runtime.device)))
        with runtime.autocast():
            pooled = torch.flatten(model.avgpool(model.features(batch)), 1)
            logits.append(model.classifier(pooled).float().cpu())
        features.append(pooled.float().cpu())
    if not logits:
        return torch.empty(0, 0), torch.empty(0, 0)
    return torch.cat(logits), torch.cat(features)


class Network(Protocol):
    """What inference needs from a network, whichever runtime runs it."""

    backend: str
    spec: ModelSpec

    def logits_and_features(
        self, pixels: torch.Tensor, batch_size: int = 64, progress: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (N, C) and pooled features (N, F), float32 on the CPU, of (N, S, S) uint8 pixels."""
        ...


class TorchNetwork:
    """A PyTorch module with batch norm folded (inference only) and the runtime it runs on."""

    backend = "torch"

    def __init__(self, model: nn.Module, spec: ModelSpec, runtime: Runtime):
        self.model, self.spec, self.runtime = model.eval(), spec, runtime

    def logits_and_features(
        self, pixels: torch.Tensor, batch_size: int = 64, progress: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        preprocessing = self.spec.preprocessing
        return predict_logits_and_features(self.model, pixels, self.runtime, batch_size, progress, preprocessing)


def load_torch_network(weights: Path, device: str = "auto", amp: bool = False) -> TorchNetwork:
    """A ``.safetensors`` file as a ready torch network on ``device`` (batch norm folded)."""
    model, spec = load_weights_file(weights)
    runtime = select_runtime(device, amp)
    model = fold_batch_norm(model).to(runtime.device)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return TorchNetwork(model, spec, runtime)


def resolve_backend(weights: Path, backend: str, device: str) -> str:
    """The backend ``auto`` means for these weights on this device: ONNX Runtime on a CPU when it is
    installed (an ``.onnx`` file always), else PyTorch."""
    if backend not in BACKENDS:
        raise ConfigError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    is_onnx_file = weights.suffix.lower() == ".onnx"
    if is_onnx_file and backend == "torch":
        raise ConfigError(f"{weights}: an ONNX file runs only with the onnx backend")
    if backend != "auto":
        return backend
    if is_onnx_file:
        return "onnx"
    on_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    return "onnx" if on_cpu and importlib.util.find_spec("onnxruntime") is not None else "torch"


def cache_dir() -> Path:
    """Where graphs exported from ``.safetensors`` files are kept: ``$BRAINTUMOR_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/braintumor``, else ``~/.cache/braintumor``."""
    if os.environ.get("BRAINTUMOR_CACHE_DIR"):
        return Path(os.environ["BRAINTUMOR_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "braintumor"


def graph_for_weights(weights: Path) -> OnnxNetwork:
    """The ONNX Runtime network of a ``.safetensors`` file, without exporting at every start: the
    graph beside the file (``name.onnx``, as the shipped model has) or in ``cache_dir()`` when it
    records these exact weights; otherwise exported now (a few seconds, once), checked against
    PyTorch on probe images, and cached.

    Raises:
        CheckpointError: the weights cannot be loaded, or the exported graph disagrees with PyTorch.
        MissingExtraError: an export is needed and the ``export`` extra is not installed (said
            before the torch network is loaded, so a fallback to it loads it once).
    """
    if not weights.is_file():
        raise CheckpointError(f"{weights}: weights file not found")
    source = source_of(weights)
    cached = cache_dir() / "onnx" / f"{source.rsplit(':', 1)[1][:32]}-{__version__}.onnx"
    for candidate in (weights.with_suffix(".onnx"), cached):
        if candidate.is_file():
            try:
                network = OnnxNetwork(candidate, str(weights))
            except CheckpointError:
                continue  # a damaged cache entry is replaced below
            if network.exported_from == source:
                return network
    require("export", "exporting these weights to ONNX")
    reference = load_torch_network(weights, device="cpu")
    proto = export_model_proto(reference, source)
    network = OnnxNetwork(proto.SerializeToString(), str(weights))
    check_parity(reference, network, str(weights))
    with contextlib.suppress(CheckpointError):  # an unwritable cache costs an export at the next start
        save_proto(proto, cached)
    return network


def load_network(weights: Path, backend: str = "auto", device: str = "auto", amp: bool = False) -> Network:
    """The one loader: a ``.safetensors`` or ``.onnx`` file as a ``Network`` of ``backend``.

    ``auto`` falls back to PyTorch for weights without an exported graph when the ``export`` extra
    that would export one is not installed.

    Raises:
        CheckpointError: the file is missing, unreadable or does not fit its architecture.
        ConfigError: an unknown backend, or PyTorch asked to run an ONNX file.
        MissingExtraError: the onnx backend asked for weights that need exporting, without ``export``.
    """
    resolved = resolve_backend(weights, backend, device)
    if weights.suffix.lower() == ".onnx":
        if not weights.is_file():
            raise CheckpointError(f"{weights}: no such file")
        return OnnxNetwork(weights, str(weights))
    if resolved == "onnx":
        try:
            return graph_for_weights(weights)
        except MissingExtraError:
            if backend != "auto":
                raise
    return load_torch_network(weights, device, amp)
