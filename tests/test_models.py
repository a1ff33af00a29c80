"""The B0 head, the Lite0 warm start mapping, and the offline behaviour of the ImageNet init."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.ops.misc import SqueezeExcitation

from braintumor.errors import ConfigError
from braintumor.models.registry import (
    SE_GATE_BIAS,
    _lite0_state_dict,
    build_efficientnet_b0,
    create_model,
    fold_batch_norm,
    load_lite0_into_b0,
)


@pytest.fixture(scope="module")
def lite0_state() -> dict[str, torch.Tensor]:
    return _lite0_state_dict()


def test_head_is_four_way_linear() -> None:
    model = build_efficientnet_b0()
    assert isinstance(model.classifier[1], nn.Linear)
    assert (model.classifier[1].in_features, model.classifier[1].out_features) == (1280, 4)
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 4)


def test_every_non_se_tensor_is_loaded_with_equal_shapes(lite0_state: dict[str, torch.Tensor]) -> None:
    model = build_efficientnet_b0()
    loaded = load_lite0_into_b0(model, lite0_state)
    state = model.state_dict()
    non_se = [k for k in state if ".fc1." not in k and ".fc2." not in k and not k.startswith("classifier.")]
    assert loaded == non_se and len(loaded) == 294
    source = [v for k, v in lite0_state.items() if not k.startswith("_fc.")]
    # The projection right after each SE block is divided by the SE gate (see the identity test).
    projections = {
        f"{name}.block.{index + 1}.0.weight"
        for name, module in model.named_modules()
        if isinstance(getattr(module, "block", None), nn.Sequential)
        for index, layer in enumerate(module.block)
        if isinstance(layer, SqueezeExcitation)
    }
    assert len(projections) == 16
    gate = torch.sigmoid(torch.tensor(SE_GATE_BIAS))
    for key, tensor in zip(loaded, source, strict=True):
        assert state[key].shape == tensor.shape
        if key in projections:
            assert torch.allclose(state[key] * gate, tensor, atol=1e-6), key
        else:
            assert torch.equal(state[key], tensor.to(state[key].dtype)), key


def test_se_blocks_start_as_identity(lite0_state: dict[str, torch.Tensor]) -> None:
    """SE gate times the rescaled projection equals Lite0's projection exactly."""
    model = build_efficientnet_b0()
    load_lite0_into_b0(model, lite0_state)
    block = model.features[2][0].block  # expand, depthwise, SE, project
    se, projection = block[2], block[3][0]
    features = torch.randn(2, se.fc1.in_channels, 8, 8)
    gated = se(features)
    lite0_projection = lite0_state["_blocks.1._project_conv.weight"]
    expected = nn.functional.conv2d(features, lite0_projection)
    assert torch.allclose(nn.functional.conv2d(gated, projection.weight), expected, atol=1e-5)


def test_mapped_network_with_relu6_is_imagenet_lite0(lite0_state: dict[str, torch.Tensor]) -> None:
    """With Lite0's ReLU6 swapped back in and its 1000-way head, the mapped B0 recognises a photo of
    a temple as a church-like building (ImageNet: bell cote, church, palace, monastery, stupa)."""
    from sklearn.datasets import load_sample_image

    model = build_efficientnet_b0(1000)
    load_lite0_into_b0(model, lite0_state)
    model.classifier[1].load_state_dict({"weight": lite0_state["_fc.weight"], "bias": lite0_state["_fc.bias"]})
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.SiLU):
                setattr(parent, name, nn.ReLU6())
    photo = torch.from_numpy(load_sample_image("china.jpg").copy()).permute(2, 0, 1).float() / 255
    photo = nn.functional.interpolate(photo[None], size=(224, 224), mode="bilinear", antialias=True)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        top5 = model.eval()((photo - mean) / std).topk(5).indices[0].tolist()
    buildings = {442, 497, 698, 663, 832, 449}  # bell cote, church, palace, monastery, stupa, boathouse
    assert buildings & set(top5[:2]), top5


def test_imagenet_init_offline_names_the_alternatives(monkeypatch: pytest.MonkeyPatch) -> None:
    from torchvision.models import EfficientNet_B0_Weights

    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("network is unreachable")

    monkeypatch.setattr(type(EfficientNet_B0_Weights.IMAGENET1K_V1), "get_state_dict", offline)
    with pytest.raises(ConfigError, match="lite0"):
        create_model("imagenet")


def test_unknown_init_is_refused() -> None:
    with pytest.raises(ConfigError, match="lite0"):
        create_model("resnet")


def test_lite0_init_is_deterministic_under_a_seed() -> None:
    torch.manual_seed(0)
    first = create_model("lite0").state_dict()
    torch.manual_seed(0)
    second = create_model("lite0").state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert np.isfinite(first["classifier.1.weight"].numpy()).all()


def test_folding_batch_norm_keeps_the_outputs_and_the_layer_names() -> None:
    torch.manual_seed(0)
    model = build_efficientnet_b0().eval()
    for module in model.modules():  # non-trivial statistics, as after training
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    inputs = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        expected = model(inputs)
        folded = fold_batch_norm(copy.deepcopy(model))
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
        assert torch.allclose(folded(inputs), expected, atol=1e-4)
    assert {name for name, _ in folded.named_modules()} >= {"features.5", "features.8", "classifier.1"}
