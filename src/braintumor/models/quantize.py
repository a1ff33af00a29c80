"""An int8 ONNX graph: ONNX Runtime's static quantisation of the exported network, calibrated on
training slices. An option, not the default, because on EfficientNet-B0 it is neither faster nor
faithful enough on the CPUs we measured (``python benchmarks/precision.py``, docs/performance.md).

What is quantised, and why: the pointwise (1x1) convolutions, weights per output channel, their
inputs at the 99.999th percentile of the calibration activations. B0's depthwise and
squeeze-and-excitation convolutions and its SiLU gates stay fp32: quantising them too cost far more
agreement with fp32 than it saved time (two labels in three changed with every convolution in int8),
and the weights' preprocessing inside the graph (smoothing, standardisation) stays fp32 as well.
The file is a complete model like any exported graph (spec, guard and slice-kind metadata), its
metadata saying how it was quantised (``spec.info["quantization"]``).
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
from pathlib import Path

import numpy as np

from ..data.datasets import load_split
from ..data.imaging import decode_image_and_colour, resize_grey
from ..extras import require
from .network import TorchNetwork
from .onnx_backend import INPUT_NAME, METADATA_KEY, export_model_proto, save_proto

CALIBRATION_BATCH = 16
PERCENTILE = 99.999


def pointwise_convolutions(graph) -> list[str]:
    """Names of the graph's 1x1, ungrouped, multi-channel convolutions outside squeeze-and-excitation
    blocks (whose 1x1 convolutions act on one pooled value per channel: ``.fc1.``/``.fc2.`` weights)."""
    shapes = {tensor.name: list(tensor.dims) for tensor in graph.initializer}
    names = []
    for node in graph.node:
        if node.op_type != "Conv" or len(node.input) < 2:
            continue
        weight = node.input[1]
        shape = shapes.get(weight, [])
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        is_se = ".fc1." in weight or ".fc2." in weight
        if len(shape) == 4 and shape[2:] == [1, 1] and shape[1] > 1 and group == 1 and not is_se:
            names.append(node.name)
    return names


def training_slices(root: Path, count: int, size: int, seed: int = 0) -> np.ndarray:
    """``count`` slices of the Training split of ``root`` (a seeded random draw over all classes),
    decoded and resized to ``size`` as predict does: (count, size, size) uint8.

    Raises:
        DataError: ``root`` has no Training split with images.
    """
    samples = load_split(root, "Training")
    chosen = np.random.default_rng(seed).permutation(len(samples))[:count]
    return np.stack([resize_grey(decode_image_and_colour(samples[i].path)[0], size) for i in chosen])


class _Calibration:
    """ONNX Runtime's ``CalibrationDataReader`` protocol over an (N, S, S) uint8 array."""

    def __init__(self, pixels: np.ndarray):
        self.pixels, self.start = pixels, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.start >= len(self.pixels):
            return None
        batch = self.pixels[self.start : self.start + CALIBRATION_BATCH]
        self.start += CALIBRATION_BATCH
        return {INPUT_NAME: np.ascontiguousarray(batch, dtype=np.uint8)}


def quantize_int8(network: TorchNetwork, calibration: np.ndarray, out: Path, source: str) -> Path:
    """Write ``network`` as an int8 ONNX file at ``out``, calibrated on ``calibration`` (N, S, S)
    uint8 training slices, decoded and resized as predict does; returns ``out``.

    Raises:
        MissingExtraError: the ``export`` extra is not installed.
        CheckpointError: ``out`` cannot be written.
    """
    require("export", "int8 quantisation")
    import onnx
    import onnxruntime
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    proto = export_model_proto(network, source)
    with tempfile.TemporaryDirectory(prefix="braintumor-int8-") as tmp:
        fp32, prepared, quantised = (Path(tmp) / name for name in ("fp32.onnx", "prepared.onnx", "int8.onnx"))
        onnx.save(proto, str(fp32))
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        graph = onnx.load(str(prepared)).graph
        pointwise = pointwise_convolutions(graph)
        with contextlib.redirect_stdout(io.StringIO()):  # the calibrator prints its histogram settings
            quantize_static(
                str(prepared), str(quantised), _Calibration(calibration), quant_format=QuantFormat.QDQ,
                per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                op_types_to_quantize=["Conv"], nodes_to_exclude=[n.name for n in graph.node if n.name not in pointwise],
                calibrate_method=CalibrationMethod.Percentile, extra_options={"CalibPercentile": PERCENTILE},
            )
        result = onnx.load(str(quantised))
    description = {
        "format": "int8 QDQ", "quantised": f"{len(pointwise)} pointwise convolutions",
        "weights": "per output channel", "activations": f"uint8, {PERCENTILE}th percentile",
        "calibration": f"{len(calibration)} training slices", "tool": f"onnxruntime {onnxruntime.__version__}",
    }
    del result.metadata_props[:]
    for entry in proto.metadata_props:
        value = entry.value
        if entry.key == METADATA_KEY:
            value = json.dumps({**json.loads(value), "quantization": description})
        added = result.metadata_props.add()
        added.key, added.value = entry.key, value
    return save_proto(result, out)
