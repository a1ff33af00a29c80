"""Preprocessing that travels with the weights, the robust augmentation policy, and the linear probe."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from braintumor.data.transforms import (
    AUGMENT_POLICIES,
    AugmentConfig,
    Preprocessing,
    augment,
    standardise_head,
    standardise_head_rank,
)
from braintumor.errors import ConfigError
from braintumor.inference.predict import load_model
from braintumor.models.checkpoint import save_weights
from braintumor.models.registry import build_efficientnet_b0
from braintumor.training.config import resolve_config
from conftest import local_client


def _heads(n: int = 6, size: int = 64, seed: int = 0) -> torch.Tensor:
    """Dark background with a bright, textured disc: the shape of a head slice."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size]
    disc = (x - size / 2) ** 2 + (y - size / 2) ** 2 < (size * 0.4) ** 2
    images = np.where(disc, rng.integers(60, 200, (n, size, size)), rng.integers(0, 8, (n, size, size)))
    return torch.from_numpy(images.astype(np.uint8))


def test_metadata_round_trip_and_old_files_read_as_imagenet() -> None:
    head = Preprocessing(image_size=96, standardise="head")
    assert Preprocessing.from_metadata(head.to_metadata()) == head
    assert Preprocessing.from_metadata({"image_size": 224}).standardise == "imagenet"
    with pytest.raises(ConfigError, match="standardise 'zscore' is not one of imagenet, head, head_rank"):
        Preprocessing(standardise="zscore")


def test_head_standardisation_removes_gain_and_offset_of_the_head() -> None:
    pixels = _heads()
    floats = pixels.float().unsqueeze(1) / 255
    head = floats > 0.2
    brighter = torch.where(head, floats * 1.3 + 0.05, floats)  # a brighter scanner, same background
    a, b = standardise_head(floats), standardise_head(brighter)
    assert a.shape == (6, 3, 64, 64)
    mask = head.expand(-1, 3, -1, -1)
    assert torch.allclose(a[mask], b[mask], atol=1e-4)
    assert abs(float(a[mask].mean())) < 0.05 and abs(float(a[mask].std()) - 1) < 0.05


def test_head_standardisation_survives_a_blank_image() -> None:
    blank = torch.zeros(2, 32, 32, dtype=torch.uint8)
    out = Preprocessing(standardise="head")(blank)
    assert torch.isfinite(out).all() and float(out.abs().max()) == 0.0
    ranked = Preprocessing(standardise="head_rank")(blank)
    assert torch.isfinite(ranked).all() and torch.allclose(ranked, torch.full_like(ranked, -3**0.5))


def test_rank_standardisation_gives_every_head_the_same_histogram() -> None:
    """Any increasing grey curve (a scanner's gain, gamma, a pipeline's windowing) leaves the input
    unchanged up to the interpolation inside a bin, and every head comes out with mean 0, spread 1."""
    pixels = _heads()
    floats = pixels.float().unsqueeze(1) / 255
    head = floats > 0.2
    curved = torch.where(head, 0.15 + 0.85 * ((floats - 0.1) / 0.9).clamp(0, 1) ** 2.2, floats)
    a, b = standardise_head_rank(floats), standardise_head_rank(curved)
    mask = head.expand(-1, 3, -1, -1)
    assert a.shape == (6, 3, 64, 64)
    assert float((a[mask] - b[mask]).abs().mean()) < 0.05
    for image in a[:, 0]:
        inside = image[head[0, 0]]
        assert abs(float(inside.mean())) < 0.05 and abs(float(inside.std()) - 1) < 0.05
    assert torch.allclose(a[~mask], torch.full_like(a[~mask], -3**0.5))
    order = torch.argsort(floats[0, 0][head[0, 0]])
    assert bool((a[0, 0][head[0, 0]][order].diff() >= -1e-6).all())  # the order of the greys is kept


def test_robust_augmentation_is_seeded_and_stays_in_range() -> None:
    pixels, labels = _heads(8), torch.arange(8) % 4
    policy = AUGMENT_POLICIES["robust"]
    first = augment(pixels, policy, torch.Generator().manual_seed(3), labels)
    again = augment(pixels, policy, torch.Generator().manual_seed(3), labels)
    other = augment(pixels, policy, torch.Generator().manual_seed(4), labels)
    assert first.shape == (8, 1, 64, 64) and torch.equal(first, again) and not torch.equal(first, other)
    assert float(first.min()) >= 0 and float(first.max()) <= 1 and torch.isfinite(first).all()


def test_histogram_matching_gives_an_image_the_greys_of_another_class() -> None:
    pixels = torch.cat([_heads(4, seed=1) // 3, _heads(4, seed=2)])  # a dark class and a bright class
    labels = torch.tensor([0] * 4 + [1] * 4)
    only_matching = AugmentConfig(
        hflip=0, degrees=0, translate=0, scale=(1, 1), contrast=(1, 1), brightness=0, histogram_match=1.0
    )
    out = augment(pixels, only_matching, torch.Generator().manual_seed(0), labels)
    before = pixels.float().mean(dim=(1, 2)) / 255
    after = out.mean(dim=(1, 2, 3))
    changed = (after - before).abs() > 0.05
    assert changed.any()
    # Every changed image now has the mean grey of an image of the other class (to rounding).
    for k in torch.nonzero(changed).flatten().tolist():
        other = before[labels != labels[k]]
        assert float((other - after[k]).abs().min()) < 0.01


def test_config_names_the_valid_policies_and_limits_the_probe(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="augment_policy 'wild' is not one of basic, robust, robust_light"):
        resolve_config(None, data=tmp_path, out=tmp_path / "run", augment_policy="wild")
    with pytest.raises(ConfigError, match="probe_epochs must be in"):
        resolve_config(None, data=tmp_path, out=tmp_path / "run", epochs=2, probe_epochs=2)


def test_a_probe_epoch_trains_only_the_head(kaggle_tree: Path, tmp_path: Path) -> None:
    from braintumor.models.checkpoint import load_weights
    from braintumor.training.fit import fit

    torch.manual_seed(0)
    start = build_efficientnet_b0().state_dict()
    init = tmp_path / "init.safetensors"
    save_weights(start, init, {"class_names": ["glioma", "meningioma", "notumor", "pituitary"]})
    out = tmp_path / "run"
    config = resolve_config(
        None, data=kaggle_tree, out=out, epochs=2, probe_epochs=1, batch_size=8, image_size=32, init=str(init),
        val_fraction=0.25, workers=1, standardise="head", augment_policy="robust", save_every_epoch=True,
    )
    fit(config, progress=False)
    probe, metadata = load_weights(out / "epoch_01.safetensors")
    tuned, _ = load_weights(out / "epoch_02.safetensors")
    assert metadata["standardise"] == "head" and metadata["image_size"] == 32
    conv, statistics = "features.3.0.block.0.0.weight", "features.1.0.block.0.1.running_mean"
    assert torch.equal(probe[conv], start[conv]) and torch.equal(probe[statistics], start[statistics])
    assert not torch.equal(probe["classifier.1.weight"], start["classifier.1.weight"])
    assert not torch.equal(tuned[conv], start[conv])


@pytest.mark.slow
@pytest.mark.parametrize("standardise", ["head", "head_rank"])
def test_torch_onnx_and_service_agree_with_smoothing_and_head_standardisation(tmp_path: Path, standardise: str) -> None:
    from braintumor.inference.predict import default_weights_path
    from braintumor.models.checkpoint import load_weights
    from braintumor.models.ood import split_guard

    state = split_guard(load_weights(default_weights_path())[0])[0]  # trained weights: outputs follow the input
    weights = tmp_path / "head.safetensors"
    save_weights(state, weights, {"class_names": ["glioma", "meningioma", "notumor", "pituitary"],
                                  **Preprocessing(image_size=64, standardise=standardise, smoothing=1.0).to_metadata()})
    pixels = _heads(5).numpy()
    in_torch = load_model(weights, device="cpu").predict_pixels(pixels)
    in_onnx = load_model(weights, backend="onnx").predict_pixels(pixels)
    assert np.abs(in_torch - in_onnx).max() <= 1e-4
    # The service reads the same metadata: uploaded PNGs of the same pixels give the same answer.
    from PIL import Image

    from braintumor.serving.app import create_app

    uploads = []
    for k, image in enumerate(pixels):
        Image.fromarray(image).save(tmp_path / f"{k}.png")
        uploads.append(("files", (f"{k}.png", (tmp_path / f"{k}.png").read_bytes(), "image/png")))
    answers = local_client(create_app(load_model(weights, device="cpu"))).post("/v1/predict", files=uploads).json()
    names = ("glioma", "meningioma", "notumor", "pituitary")
    served = np.array([[a["probabilities"][name] for name in names] for a in answers])
    assert np.abs(served - in_torch).max() <= 1e-4
    # ImageNet normalisation would give other probabilities: the setting is really read.
    imagenet = tmp_path / "imagenet.safetensors"
    save_weights(state, imagenet, {"class_names": ["glioma", "meningioma", "notumor", "pituitary"],
                                                **Preprocessing(image_size=64).to_metadata()})
    assert np.abs(load_model(imagenet, device="cpu").predict_pixels(pixels) - in_torch).max() > 1e-3


def test_bf16_only_where_the_cpu_computes_it_natively(monkeypatch: pytest.MonkeyPatch) -> None:
    """oneDNN emulates bf16 on any AVX-512 CPU, slower than fp32; the CPU's flags decide."""
    from braintumor.models import runtime

    def cpuinfo(flags: str):
        return lambda self, *args, **kwargs: f"processor : 0\nflags : fpu sse avx2 avx512f {flags}\n"

    monkeypatch.setattr(Path, "read_text", cpuinfo(""))
    assert runtime.cpu_supports_bf16() is False and runtime.select_runtime("cpu").amp_dtype is None
    monkeypatch.setattr(Path, "read_text", cpuinfo("avx512_bf16"))
    assert runtime.cpu_supports_bf16() is True and runtime.select_runtime("cpu").amp_dtype == torch.bfloat16
