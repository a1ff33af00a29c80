"""One model boundary: the spec read once from the file, one network interface for torch and ONNX,
the exported graph shipped or cached (never exported at every start), and explanations in one pass."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from braintumor.errors import CheckpointError
from braintumor.inference.predict import default_weights_path, load_model
from braintumor.models import network as network_module
from braintumor.models.checkpoint import load_weights, save_weights
from braintumor.models.network import TorchNetwork, graph_for_weights, load_network, load_torch_network
from braintumor.models.onnx_backend import OnnxNetwork, check_parity, source_of
from braintumor.models.spec import ModelSpec
from conftest import EXAMPLES

SCANS = sorted(EXAMPLES.glob("*/*.jpg"))


def _copy_with_metadata(tmp_path: Path, name: str, **changes: object) -> Path:
    """The shipped weights under another name, with metadata fields changed."""
    tensors, metadata = load_weights(default_weights_path())
    out = tmp_path / name
    save_weights(tensors, out, {**metadata, **changes})
    return out


def _no_export(*args: object, **kwargs: object) -> None:
    raise AssertionError("the graph was exported again")


def test_the_spec_is_read_and_validated_once(tmp_path: Path) -> None:
    spec = load_torch_network(default_weights_path(), device="cpu").spec
    assert spec.architecture == "efficientnet_b0"
    assert spec.class_names == ("glioma", "meningioma", "notumor", "pituitary")
    assert spec.cam_layer == "features.5" and spec.guard is not None and spec.guard.range_threshold is not None
    assert 0 < spec.uncertainty_threshold < 1 and spec.temperature > 1
    assert ModelSpec.from_metadata(spec.to_metadata(), spec.guard) == spec
    for field, value, reason in [
        ("temperature", -1.0, "temperature must be a positive number"),
        ("model", "resnet50", "architecture 'resnet50' is not one of efficientnet_b0"),
        ("class_names", ["glioma", "glioma"], "at least two distinct names"),
        ("standardise", "zscore", "standardise 'zscore'"),
        ("uncertainty_threshold", 1.5, "uncertainty_threshold must be in [0, 1]"),
    ]:
        broken = _copy_with_metadata(tmp_path, f"broken-{field}.safetensors", **{field: value})
        expected = rf"broken-{field}\.safetensors: invalid model metadata \(.*{re.escape(reason)}"
        with pytest.raises(CheckpointError, match=expected):
            load_model(broken, backend="torch")


@pytest.mark.slow
def test_stored_preprocessing_is_what_torch_and_onnx_apply(tmp_path: Path) -> None:
    """Change the stored preprocessing in a copy of the weights (a stronger fixed blur): both
    backends' outputs move with it, and still agree with each other."""
    shifted = _copy_with_metadata(tmp_path, "more-smoothing.safetensors", smoothing=3.0)
    pixels = np.stack([np.asarray(Image.open(p).convert("L").resize((224, 224))) for p in SCANS[:4]])
    for backend in ("torch", "onnx"):
        original = load_model(backend=backend, device="cpu").logits_and_features(pixels)[0]
        changed = load_model(shifted, backend=backend, device="cpu").logits_and_features(pixels)[0]
        assert np.abs(original - changed).max() > 0.05, backend
    torch_changed = load_model(shifted, backend="torch").logits_and_features(pixels)[0]
    onnx_changed = load_model(shifted, backend="onnx").logits_and_features(pixels)[0]
    assert np.abs(torch_changed - onnx_changed).max() < 1e-3


def test_the_default_runs_the_shipped_graph_without_exporting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(network_module, "export_model_proto", _no_export)
    classifier = load_model(device="cpu")
    assert classifier.backend == "onnx"
    assert classifier.network.exported_from == source_of(default_weights_path())  # not a stale graph


@pytest.mark.slow
def test_other_weights_are_exported_once_into_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    copy = tmp_path / "mine.safetensors"
    shutil.copy(default_weights_path(), copy)
    monkeypatch.setenv("BRAINTUMOR_CACHE_DIR", str(tmp_path / "cache"))
    first = graph_for_weights(copy)
    cached = list((tmp_path / "cache" / "onnx").glob("*.onnx"))
    assert len(cached) == 1 and first.exported_from == source_of(copy)
    monkeypatch.setattr(network_module, "export_model_proto", _no_export)
    assert graph_for_weights(copy).exported_from == first.exported_from
    cached[0].write_bytes(b"damaged")  # a damaged cache entry is replaced, not fatal
    monkeypatch.undo()
    monkeypatch.setenv("BRAINTUMOR_CACHE_DIR", str(tmp_path / "cache"))
    assert graph_for_weights(copy).exported_from == first.exported_from


def test_a_graph_that_disagrees_with_torch_is_not_used(tmp_path: Path) -> None:
    tensors, metadata = load_weights(default_weights_path())
    tensors = {**tensors, "classifier.1.bias": tensors["classifier.1.bias"] + torch.tensor([5.0, 0.0, 0.0, 0.0])}
    changed = tmp_path / "changed.safetensors"
    save_weights(tensors, changed, metadata)
    reference = load_torch_network(changed, device="cpu")
    with pytest.raises(CheckpointError, match="differs from PyTorch"):
        check_parity(reference, OnnxNetwork(default_weights_path().with_suffix(".onnx"), "shipped"), "shipped")


def test_both_backends_sit_behind_one_interface() -> None:
    pixels = torch.zeros(2, 224, 224, dtype=torch.uint8)
    torch_network = load_network(default_weights_path(), backend="torch", device="cpu")
    onnx_network = load_network(default_weights_path(), backend="onnx", device="cpu")
    assert isinstance(torch_network, TorchNetwork) and isinstance(onnx_network, OnnxNetwork)
    for network in (torch_network, onnx_network):
        logits, features = network.logits_and_features(pixels, batch_size=1)
        assert logits.shape == (2, 4) and features.shape == (2, 1280) and logits.dtype == torch.float32
    assert torch_network.spec == onnx_network.spec


def test_an_explanation_costs_one_forward_pass() -> None:
    classifier = load_model(device="cpu")
    model = classifier.model
    calls: list[int] = []
    hook = model.register_forward_hook(lambda module, args, output: calls.append(len(output)))
    try:
        explanation = classifier.explain(SCANS[0])[0]
    finally:
        hook.remove()
    assert calls == [1]
    predicted = classifier.predict(SCANS[0])[0]
    assert explanation.prediction.label == predicted.label
    assert explanation.prediction.confidence == pytest.approx(predicted.confidence, abs=1e-4)
    assert explanation.prediction.outside_validated_range == predicted.outside_validated_range


def test_exported_metadata_is_the_spec(shipped_onnx: Path) -> None:
    import onnx

    graph = onnx.load(str(shipped_onnx))
    assert not any(node.metadata_props for node in graph.graph.node)  # no exporter stack traces, no local paths
    props = {p.key: p.value for p in graph.metadata_props}
    stored = json.loads(props["braintumor"])
    assert ModelSpec.from_metadata(stored) == load_torch_network(default_weights_path(), device="cpu").spec
