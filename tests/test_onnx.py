"""ONNX export and the onnxruntime backend: a dynamic batch, metadata inside, parity with PyTorch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from typer.testing import CliRunner

from braintumor.cli import app
from braintumor.errors import CheckpointError, ConfigError
from braintumor.inference.predict import load_model
from conftest import EXAMPLES

runner = CliRunner()


@pytest.mark.slow
def test_export_command_writes_a_complete_model_with_a_dynamic_batch(tmp_path: Path) -> None:
    out = tmp_path / "model.onnx"
    result = runner.invoke(app, ["export", "--format", "onnx", "--out", str(out)])
    assert result.exit_code == 0, result.output
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    [pixels] = session.get_inputs()
    assert pixels.name == "pixels" and isinstance(pixels.shape[0], str) and pixels.shape[1:] == [224, 224]
    for batch in (1, 3):
        logits, features = session.run(None, {"pixels": np.zeros((batch, 224, 224), dtype=np.uint8)})
        assert logits.shape == (batch, 4) and features.shape == (batch, 1280)
    metadata = json.loads(session.get_modelmeta().custom_metadata_map["braintumor"])
    assert metadata["class_names"] == ["glioma", "meningioma", "notumor", "pituitary"]
    assert "temperature" in metadata and "sha256:" in metadata["exported_from"]


def test_backends_agree_on_the_bundled_scans(shipped_onnx: Path) -> None:
    torch_results = load_model(device="cpu", backend="torch").predict(EXAMPLES)
    onnx_results = load_model(shipped_onnx).predict(EXAMPLES)
    in_memory = load_model(device="cpu").predict(EXAMPLES)  # the default: the graph beside the weights
    assert len(torch_results) == len(onnx_results) == 12
    for a, b, c in zip(torch_results, onnx_results, in_memory, strict=True):
        assert a.path == b.path and (a.label, a.uncertain, a.not_brain_mri) == (b.label, b.uncertain, b.not_brain_mri)
        assert max(abs(a.probabilities[k] - b.probabilities[k]) for k in a.probabilities) <= 1e-4
        assert max(abs(a.probabilities[k] - c.probabilities[k]) for k in a.probabilities) <= 1e-4


def test_predict_command_runs_the_onnx_backend(shipped_onnx: Path) -> None:
    torch_run = runner.invoke(app, ["predict", str(EXAMPLES), "--json", "--backend", "torch"])
    onnx_run = runner.invoke(app, ["predict", str(EXAMPLES), "--json", "--weights", str(shipped_onnx)])
    assert torch_run.exit_code == onnx_run.exit_code == 0, onnx_run.output
    assert [o["label"] for o in json.loads(onnx_run.stdout)] == [o["label"] for o in json.loads(torch_run.stdout)]


def test_bad_backend_requests_are_clear_errors(shipped_onnx: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="torch, onnx"):
        load_model(backend="tensorflow")
    with pytest.raises(ConfigError, match="only with the onnx backend"):
        load_model(shipped_onnx, backend="torch")
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a protobuf")
    with pytest.raises(CheckpointError, match="broken.onnx: not a loadable ONNX model"):
        load_model(broken)
    with pytest.raises(CheckpointError, match="no such file"):
        load_model(tmp_path / "absent.onnx")
    with pytest.raises(ConfigError, match="Grad-CAM needs gradients"):
        load_model(shipped_onnx).explain(EXAMPLES)
    result = runner.invoke(app, ["export", "--format", "tflite", "--out", str(tmp_path / "m.tflite")])
    assert result.exit_code == 2 and "only format is onnx" in result.output
    result = runner.invoke(app, ["predict", str(EXAMPLES), "--backend", "tensorflow"])
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_a_plain_onnx_file_without_our_metadata_is_refused(shipped_onnx: Path, tmp_path: Path) -> None:
    import onnx

    model = onnx.load(str(shipped_onnx))
    del model.metadata_props[:]
    stripped = tmp_path / "stripped.onnx"
    onnx.save(model, str(stripped))
    with pytest.raises(CheckpointError, match="no braintumor metadata"):
        load_model(stripped)
