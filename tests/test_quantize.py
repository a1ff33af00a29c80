"""The int8 path: which convolutions it quantises, a complete model file, and the export command's
rules. How well int8 agrees with fp32 on real data is a benchmark (benchmarks/precision.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from braintumor.cli import app
from braintumor.inference.predict import load_model
from braintumor.models.network import load_torch_network
from braintumor.models.quantize import pointwise_convolutions, quantize_int8, training_slices

runner = CliRunner()
CLASSES = ["glioma", "meningioma", "notumor", "pituitary"]



def test_only_pointwise_convolutions_outside_squeeze_excitation_are_chosen(shipped_onnx: Path) -> None:
    graph = onnx.load(str(shipped_onnx)).graph
    chosen = set(pointwise_convolutions(graph))
    weights = {node.name: node.input[1] for node in graph.node if node.op_type == "Conv"}
    # B0: 15 expansion and 16 projection convolutions in its MBConv blocks, and the 1x1 head
    assert len(chosen) == 32
    assert not any(".fc1." in weights[name] or ".fc2." in weights[name] for name in chosen)
    assert "model.features.8.0.weight" in {weights[name] for name in chosen}
    assert "model.features.0.0.weight" not in {weights[name] for name in chosen}  # the 3x3 stem


@pytest.mark.slow
def test_an_int8_file_is_a_complete_model_that_says_how_it_was_quantised(tiny_weights: Path, tmp_path: Path) -> None:
    network = load_torch_network(tiny_weights, device="cpu")
    calibration = np.random.default_rng(0).integers(0, 256, (32, 32, 32), dtype=np.uint8)
    out = quantize_int8(network, calibration, tmp_path / "int8.onnx", "tiny.safetensors sha256:0")
    model = onnx.load(str(out))
    quantised_weights = [t.name for t in model.graph.initializer if t.name.endswith("weight_quantized")]
    assert len(quantised_weights) == 32  # the weights of the pointwise convolutions, nothing else
    classifier = load_model(out)
    assert classifier.class_names == CLASSES and classifier.image_size == 32
    info = classifier.spec.info["quantization"]
    assert info["format"] == "int8 QDQ" and info["calibration"] == "32 training slices"
    probabilities = classifier.predict_pixels(calibration[:5])
    assert probabilities.shape == (5, 4) and np.allclose(probabilities.sum(1), 1, atol=1e-5)


def test_training_slices_are_a_seeded_draw_of_the_training_split(kaggle_tree: Path) -> None:
    first, again = training_slices(kaggle_tree, 10, 32), training_slices(kaggle_tree, 10, 32)
    assert first.shape == (10, 32, 32) and first.dtype == np.uint8 and np.array_equal(first, again)
    assert not np.array_equal(first, training_slices(kaggle_tree, 10, 32, seed=1))


def test_int8_export_needs_calibration_data_and_says_so(tiny_weights: Path, tmp_path: Path) -> None:
    for arguments in (["--int8"], ["--calibration", str(tmp_path)]):
        result = runner.invoke(app, ["export", "--weights", str(tiny_weights), "--out", str(tmp_path / "m.onnx"),
                                     *arguments])
        assert result.exit_code == 2 and "--int8 and --calibration go together" in result.stderr
    result = runner.invoke(app, ["export", "--weights", str(tiny_weights), "--out", str(tmp_path / "m.onnx"),
                                 "--int8", "--calibration", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1 and "nowhere" in result.stderr
    assert not (tmp_path / "m.onnx").exists()
