"""ONNX export and the ONNX Runtime backend: the same network, without PyTorch at serving time.

The exported graph takes what the classifier's preprocessing produces, grey ``uint8`` pixels of
shape (batch, S, S), and applies the weights' own preprocessing (``data.transforms.Preprocessing``:
smoothing, standardisation) inside the graph, so a deployer needs no Python preprocessing beyond
decoding and resizing. It returns the logits and the 1280-d pooled features
(the out-of-distribution guard's input). The batch dimension is dynamic.

Everything else the classifier needs travels in the ONNX file's ``metadata_props``: the model's
spec (``spec.ModelSpec``: class order, preprocessing, Grad-CAM layer, calibration, metrics) under
``braintumor`` and the guard's subspace under ``braintumor_ood``. An exported file is therefore a
complete model.
"""

from __future__ import annotations

import base64
import copy
import json
import logging
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..data.transforms import Preprocessing
from ..errors import CheckpointError
from ..extras import require
from .checkpoint import weights_sha256
from .ood import OODGuard
from .slice_kind import SliceKindEstimator
from .spec import ModelSpec

if TYPE_CHECKING:
    from .network import TorchNetwork  # for annotations only: this module never imports network

METADATA_KEY = "braintumor"
GUARD_KEY = "braintumor_ood"
SLICE_KIND_KEY = "braintumor_slice_kind"
INPUT_NAME = "pixels"
OUTPUT_NAMES = ("logits", "features")
OPSET = 18


class _ExportedNetwork(nn.Module):
    """uint8 grey pixels (N, S, S) -> (logits, pooled features), the weights' preprocessing inside."""

    def __init__(self, model: nn.Module, preprocessing: Preprocessing):
        super().__init__()
        self.model = model
        self.preprocessing = preprocessing

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = torch.flatten(self.model.avgpool(self.model.features(self.preprocessing(pixels))), 1)
        return self.model.classifier(pooled), pooled


def _encode_array(values: np.ndarray) -> dict[str, Any]:
    array = np.ascontiguousarray(values, dtype=np.float32)
    return {"shape": list(array.shape), "float32_base64": base64.b64encode(array.tobytes()).decode("ascii")}


def _decode_array(encoded: dict[str, Any]) -> np.ndarray:
    raw = base64.b64decode(encoded["float32_base64"])
    return np.frombuffer(raw, dtype=np.float32).reshape(encoded["shape"]).astype(np.float64)


def export_model_proto(network: TorchNetwork, source: str):
    """The ONNX ``ModelProto`` of a loaded torch network (fp32, CPU), its spec and guard attached.
    ``source`` names the weights it came from (kept in the metadata)."""
    require("export", "exporting to ONNX")
    spec = network.spec
    size = spec.image_size
    wrapped = _ExportedNetwork(copy.deepcopy(network.model), spec.preprocessing)
    wrapped = wrapped.to("cpu", memory_format=torch.contiguous_format).float().eval()
    example = torch.zeros(2, size, size, dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter chatter about internals we do not control
        for name in ("torch.onnx", "onnxscript", "onnx_ir"):  # their INFO lines would reach our log
            logging.getLogger(name).setLevel(logging.WARNING)
        program = torch.onnx.export(
            wrapped, (example,), input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
            dynamic_shapes={"pixels": {0: torch.export.Dim("batch")}}, dynamo=True, verbose=False,
            opset_version=OPSET, external_data=False,
        )
    proto = program.model_proto
    _strip_node_metadata(proto)
    props = {METADATA_KEY: json.dumps({**spec.to_metadata(), "exported_from": source})}
    guard = spec.guard
    if guard is not None:
        props[GUARD_KEY] = json.dumps(
            {
                "mean": _encode_array(guard.mean), "components": _encode_array(guard.components),
                "threshold": guard.threshold, "range_threshold": guard.range_threshold,
            }
        )
    if spec.slice_kind is not None:
        tensors = spec.slice_kind.to_tensors()
        props[SLICE_KIND_KEY] = json.dumps({k: _encode_array(v.numpy()) for k, v in tensors.items()})
    del proto.metadata_props[:]
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    return proto


def _strip_node_metadata(proto) -> None:
    """Drop the exporter's per-node notes (Python stack traces with this machine's paths, module
    names): they describe the export, not the model, and would leak local paths into the file."""
    graphs = [proto.graph, *(function for function in proto.functions)]
    for graph in graphs:
        for node in graph.node:
            del node.metadata_props[:]
        if hasattr(graph, "value_info"):
            for value in graph.value_info:
                del value.metadata_props[:]


def export_onnx(network: TorchNetwork, out: str | Path, source: str = "weights") -> Path:
    """Write a loaded torch network (``network.load_torch_network``) as an ONNX file; returns ``out``.
    ``source`` names the weights in the file's metadata (``braintumor export`` gives the file name
    and its SHA-256, which is how a shipped graph is matched to its weights).

    Raises:
        CheckpointError: ``out`` cannot be written.
    """
    return save_proto(export_model_proto(network, source), Path(out))


def save_proto(proto, out: Path) -> Path:
    import onnx

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + f".{os.getpid()}.tmp")
        onnx.save(proto, str(tmp))
        tmp.replace(out)
    except OSError as exc:
        raise CheckpointError(f"{out}: cannot write the ONNX file ({exc.strerror or exc})") from None
    return out


def source_of(weights: Path) -> str:
    """What an exported graph records as its origin: the weights' name and full SHA-256."""
    return f"{weights.name} sha256:{weights_sha256(weights)}"


def probe_pixels(size: int, count: int = 6, seed: int = 0) -> torch.Tensor:
    """Seeded head-like test pictures (an ellipse of textured grey with a brighter blob), uint8."""
    generator = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size - 0.5
    images = []
    for _ in range(count):
        head = (x / generator.uniform(0.3, 0.45)) ** 2 + (y / generator.uniform(0.35, 0.48)) ** 2 < 1
        grey = generator.normal(generator.uniform(60, 140), 25, (size, size))
        cy, cx, radius = generator.uniform(-0.2, 0.2, 2).tolist() + [generator.uniform(0.04, 0.12)]
        grey[(y - cy) ** 2 + (x - cx) ** 2 < radius**2] += 80
        images.append(np.where(head, grey, 0).clip(0, 255).astype(np.uint8))
    return torch.from_numpy(np.stack(images))


PARITY_TOLERANCE = 1e-4  # largest difference in any probability between the two runtimes


def check_parity(reference: TorchNetwork, network: OnnxNetwork, name: str) -> None:
    """Raise ``CheckpointError`` unless the ONNX graph gives the torch network's probabilities
    (within ``PARITY_TOLERANCE``) and classes on the probe pictures."""
    pixels = probe_pixels(reference.spec.image_size)
    expected = torch.softmax(reference.logits_and_features(pixels)[0], 1)
    found = torch.softmax(network.logits_and_features(pixels)[0], 1)
    difference = float((expected - found).abs().max())
    if difference > PARITY_TOLERANCE or not torch.equal(expected.argmax(1), found.argmax(1)):
        raise CheckpointError(
            f"{name}: the exported ONNX graph differs from PyTorch (probability difference {difference:.2e})"
        )


# Images per session run, whatever batch the caller groups: on 2-core x86 CPUs 8 images ran at 97
# images/s and grew the process by 190 MB, 32 images at 80 images/s and 757 MB (ONNX Runtime keeps
# its largest activations per run; smaller ones stay in the CPU's caches): benchmarks/ceilings.py.
RUN_BATCH = 8


class OnnxNetwork:
    """An ONNX Runtime session behind the ``network.Network`` interface."""

    backend = "onnx"

    def __init__(self, model: str | Path | bytes, name: str):
        import onnxruntime as ort

        self.name = name
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: warnings would reach the command line's stderr
        try:
            source = model if isinstance(model, bytes) else str(model)
            self.session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own untyped errors
            raise CheckpointError(f"{name}: not a loadable ONNX model ({str(exc).splitlines()[0]})") from None
        props = self.session.get_modelmeta().custom_metadata_map
        if METADATA_KEY not in props:
            raise CheckpointError(f"{name}: ONNX file has no braintumor metadata; export it with `braintumor export`")
        metadata: dict[str, Any] = json.loads(props[METADATA_KEY])
        guard = None
        if GUARD_KEY in props:
            stored = json.loads(props[GUARD_KEY])
            band = stored.get("range_threshold")
            guard = OODGuard(
                _decode_array(stored["mean"]), _decode_array(stored["components"]), float(stored["threshold"]),
                None if band is None else float(band),
            )
        slice_kind = None
        if SLICE_KIND_KEY in props:
            try:
                stored = json.loads(props[SLICE_KIND_KEY])
                slice_kind = SliceKindEstimator.from_tensors(
                    {k: torch.from_numpy(_decode_array(v)) for k, v in stored.items()})
            except (ValueError, TypeError, KeyError, AttributeError) as exc:
                raise CheckpointError(f"{name}: invalid slice_kind metadata ({exc})") from None
        self.spec = ModelSpec.from_metadata(metadata, guard, name, slice_kind)
        self.exported_from: str | None = metadata.get("exported_from")
        # A long-running process (the service) sets this: ONNX Runtime then gives its activation
        # memory back after each call instead of keeping the largest batch's (~190 MB at 8 images);
        # single-scan and 64-image calls ran within the machine's noise of the default.
        self.release_after_call = False
        self._releasing = ort.RunOptions()
        self._releasing.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")

    def logits_and_features(
        self, pixels: torch.Tensor, batch_size: int = 64, progress: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (N, C) and features (N, F), float32 on the CPU, for (N, S, S) uint8 pixels, run
        ``RUN_BATCH`` images at a time at most (``batch_size`` may only make runs smaller)."""
        array = np.ascontiguousarray(pixels.cpu().numpy(), dtype=np.uint8)
        logits, features = [], []
        run = min(batch_size, RUN_BATCH)
        starts = range(0, len(array), run)
        for start in tqdm(starts, desc="predict", unit="batch", disable=not progress, leave=False):
            feed = {INPUT_NAME: array[start : start + run]}
            last = self.release_after_call and start + run >= len(array)
            batch_logits, batch_features = self.session.run(list(OUTPUT_NAMES), feed, self._releasing if last else None)
            logits.append(batch_logits)
            features.append(batch_features)
        if not logits:
            return torch.empty(0, 0), torch.empty(0, 0)
        return torch.from_numpy(np.concatenate(logits)), torch.from_numpy(np.concatenate(features))
