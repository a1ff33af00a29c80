"""ONNX export and the ONNX Runtime backend: the same network, without PyTorch at serving time.

The exported graph takes what the classifier's preprocessing produces, grey ``uint8`` pixels of
shape (batch, S, S), and does the ImageNet normalisation itself, so a deployer needs no Python
preprocessing beyond decoding and resizing. It returns the logits and the 1280-d pooled features
(the out-of-distribution guard's input). The batch dimension is dynamic.

Everything else the classifier needs travels in the ONNX file's ``metadata_props``: the weights
file's metadata (class order, size, temperature, threshold, metrics) under ``braintumor`` and the
guard's subspace under ``braintumor_ood``. An exported file is therefore a complete model.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import CheckpointError
from .ood import OODGuard
from .transforms import Preprocessing

METADATA_KEY = "braintumor"
GUARD_KEY = "braintumor_ood"
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


def export_model_proto(model: nn.Module, metadata: dict[str, Any], guard: OODGuard | None, source: str):
    """The ONNX ``ModelProto`` of ``model`` (fp32, CPU) with the metadata and guard attached."""
    preprocessing = Preprocessing.from_metadata(metadata)
    size = preprocessing.image_size
    network = _ExportedNetwork(model, preprocessing)
    network = network.to("cpu", memory_format=torch.contiguous_format).float().eval()
    example = torch.zeros(2, size, size, dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter chatter about internals we do not control
        for name in ("torch.onnx", "onnxscript", "onnx_ir"):  # their INFO lines would reach our log
            logging.getLogger(name).setLevel(logging.WARNING)
        program = torch.onnx.export(
            network, (example,), input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
            dynamic_shapes={"pixels": {0: torch.export.Dim("batch")}}, dynamo=True, verbose=False,
            opset_version=OPSET, external_data=False,
        )
    proto = program.model_proto
    props = {METADATA_KEY: json.dumps({**metadata, "exported_from": source})}
    if guard is not None:
        props[GUARD_KEY] = json.dumps(
            {"mean": _encode_array(guard.mean), "components": _encode_array(guard.components), "threshold": guard.threshold,
             "range_threshold": guard.range_threshold}
        )
    del proto.metadata_props[:]
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    return proto


def export_onnx(weights: str | Path | None, out: str | Path) -> Path:
    """Export a braintumor weights file (default: the shipped model) to ``out``; returns ``out``.

    Raises:
        CheckpointError: the weights cannot be loaded, or ``out`` cannot be written.
    """
    import onnx

    from .predict import load_model

    classifier = load_model(weights, device="cpu")
    assert classifier.model is not None and classifier.weights_path is not None
    digest = hashlib.sha256(classifier.weights_path.read_bytes()).hexdigest()[:16]
    proto = export_model_proto(
        classifier.model, classifier.metadata, classifier.guard, f"{classifier.weights_path.name} sha256:{digest}"
    )
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        onnx.save(proto, str(tmp))
        tmp.replace(out)
    except OSError as exc:
        raise CheckpointError(f"{out}: cannot write the ONNX file ({exc.strerror or exc})") from None
    return out


class OnnxNetwork:
    """An ONNX Runtime session with the classifier's calling convention (see ``engine``)."""

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
        self.metadata: dict[str, Any] = json.loads(props[METADATA_KEY])
        self.guard: OODGuard | None = None
        if GUARD_KEY in props:
            stored = json.loads(props[GUARD_KEY])
            band = stored.get("range_threshold")
            self.guard = OODGuard(
                _decode_array(stored["mean"]), _decode_array(stored["components"]), float(stored["threshold"]),
                None if band is None else float(band),
            )

    def logits_and_features(self, pixels: torch.Tensor, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (N, C) and features (N, 1280), float32 on the CPU, for (N, S, S) uint8 pixels."""
        array = np.ascontiguousarray(pixels.cpu().numpy(), dtype=np.uint8)
        logits, features = [], []
        for start in range(0, len(array), batch_size):
            batch_logits, batch_features = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: array[start : start + batch_size]})
            logits.append(batch_logits)
            features.append(batch_features)
        if not logits:
            return torch.empty(0, 0), torch.empty(0, 0)
        return torch.from_numpy(np.concatenate(logits)), torch.from_numpy(np.concatenate(features))
