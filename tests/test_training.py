"""Training on tiny synthetic data: the loss falls, resume is exact, and runs are never clobbered."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from braintumor.errors import ConfigError
from braintumor.models.checkpoint import read_metadata
from braintumor.models.runtime import cpu_supports_bf16
from braintumor.training import engine
from braintumor.training.config import resolve_config
from braintumor.training.engine import training_loss
from braintumor.training.fit import fit
from conftest import kill_after_first_checkpoint


def _config(data: Path, out: Path, **overrides: object):
    settings = {"epochs": 2, "batch_size": 8, "image_size": 32, "init": "none", "val_fraction": 0.25, "workers": 1}
    settings.update(overrides)
    return resolve_config(None, data=data, out=out, **settings)


@pytest.fixture(params=["fp32", "bf16"])
def amp(request: pytest.FixtureRequest) -> bool:
    """Both numeric paths of a CPU training step: fp32, and bf16 autocast, which ``select_runtime``
    turns on only where the CPU computes bf16 natively (elsewhere it would be slower, not another
    path to test), so the bf16 case is skipped there, with the reason."""
    if request.param == "bf16" and not cpu_supports_bf16():
        pytest.skip("this CPU does not compute bf16 natively (no AVX-512 BF16 or AMX): training runs in fp32 here")
    return request.param == "bf16"


@pytest.mark.slow
def test_short_run_lowers_the_loss_and_fills_the_run_folder(kaggle_tree: Path, tmp_path: Path, amp: bool) -> None:
    out = tmp_path / "run"
    # Without augmentation the 36 training images are the same every epoch, so the fall in loss is
    # the optimiser's doing and not the luck of the draws (augmentation is tested on its own).
    result = fit(_config(kaggle_tree, out, epochs=4, lr=1e-3, init="lite0", augment=False, amp=amp), progress=False)
    history = result["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    for name in ("config.yaml", "split.json", "metrics.jsonl", "learning_curves.png", "best.safetensors", "last.pt"):
        assert (out / name).is_file(), name
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 4
    metadata = read_metadata(out / "best.safetensors")
    assert metadata["class_names"] == ["glioma", "meningioma", "notumor", "pituitary"]
    assert metadata["image_size"] == 32 and metadata["init"] == "lite0"
    assert metadata["epoch"] == result["best"]["epoch"]
    split = json.loads((out / "split.json").read_text())
    assert len(split["val_paths"]) + split["n_train"] == 48


@pytest.mark.slow
def test_resume_after_a_kill_matches_an_uninterrupted_run(
    kaggle_tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, amp: bool
) -> None:
    """Exact on either numeric path: the resumed run does the same arithmetic as the whole one."""
    fit(_config(kaggle_tree, tmp_path / "whole", epochs=2, lr_schedule="cosine", amp=amp), progress=False)

    killed = _config(kaggle_tree, tmp_path / "killed", epochs=2, lr_schedule="cosine", amp=amp)
    kill_after_first_checkpoint(monkeypatch, lambda: fit(killed, progress=False))
    result = fit(
        _config(kaggle_tree, tmp_path / "killed", epochs=2, lr_schedule="cosine", resume=True, amp=amp), progress=False
    )

    assert len(result["history"]) == 2
    whole = torch.load(tmp_path / "whole" / "last.pt", weights_only=True)
    resumed = torch.load(tmp_path / "killed" / "last.pt", weights_only=True)
    for key, tensor in whole["model"].items():
        assert torch.equal(tensor, resumed["model"][key]), key
    whole_best = load_file(tmp_path / "whole" / "best.safetensors")
    resumed_best = load_file(tmp_path / "killed" / "best.safetensors")
    assert all(torch.equal(whole_best[k], resumed_best[k]) for k in whole_best)


def test_existing_run_is_not_overwritten(kaggle_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    fit(_config(kaggle_tree, out, epochs=1), progress=False)
    before = (out / "last.pt").read_bytes()
    with pytest.raises(ConfigError, match="--resume"):
        fit(_config(kaggle_tree, out, epochs=1), progress=False)
    assert (out / "last.pt").read_bytes() == before


def test_resume_without_checkpoint_is_a_clear_error(kaggle_tree: Path, tmp_path: Path) -> None:
    from braintumor.errors import CheckpointError

    with pytest.raises(CheckpointError, match="no checkpoint"):
        fit(_config(kaggle_tree, tmp_path / "fresh", resume=True), progress=False)


@pytest.mark.slow
def test_corrupt_training_image_is_skipped_and_counted(kaggle_tree: Path, tmp_path: Path) -> None:
    (kaggle_tree / "Training" / "glioma" / "broken.png").write_bytes(b"not a png at all")
    out = tmp_path / "run"
    fit(_config(kaggle_tree, out, epochs=1), progress=False)
    split = json.loads((out / "split.json").read_text())
    assert len(split["skipped"]) == 1 and "broken.png" in split["skipped"][0]
    assert read_metadata(out / "best.safetensors")["training_data"]["n_skipped"] == 1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [({"epochs": 0}, "epochs"), ({"lr_schedule": "step"}, "constant, cosine"), ({"init": "vgg"}, "lite0"),
     ({"colour": 1}, "unknown"), ({"label_smoothing": 1.0}, "label_smoothing"), ({"ema_decay": 1.0}, "ema_decay")],
)
def test_bad_settings_are_named(tmp_path: Path, overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve_config(None, data=tmp_path, out=tmp_path / "o", **overrides)


@pytest.mark.slow
def test_refit_without_validation_keeps_the_last_epoch(kaggle_tree: Path, tmp_path: Path) -> None:
    first = fit(_config(kaggle_tree, tmp_path / "first", epochs=1), progress=False)
    init = str(tmp_path / "first" / "best.safetensors")
    refit = fit(_config(kaggle_tree, tmp_path / "refit", epochs=2, val_fraction=0.0, init=init), progress=False)
    assert first["best"]["epoch"] == 1 and refit["best"]["epoch"] == 2
    assert json.loads((tmp_path / "refit" / "split.json").read_text())["n_train"] == 48
    assert read_metadata(tmp_path / "refit" / "best.safetensors")["training_data"]["n_val"] == 0


def test_smoothed_loss_is_the_smoothed_cross_entropy() -> None:
    """On fixed logits: smoothing 0 is plain cross-entropy; smoothing e mixes it with the mean
    negative log-probability over all classes, (1 - e) * CE + e * mean(-log p)."""
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.0], [0.1, 0.2, 3.0, -2.0]])
    targets = torch.tensor([0, 2])
    log_p = torch.log_softmax(logits, 1)
    hard = -log_p[torch.arange(2), targets].mean()
    uniform = -log_p.mean(1).mean()
    assert torch.allclose(training_loss(logits, targets), hard)
    assert torch.allclose(training_loss(logits, targets, 0.3), 0.7 * hard + 0.3 * uniform)
    # confident and right: smoothing costs loss; confident and wrong it would not help
    assert training_loss(logits, targets, 0.3) > training_loss(logits, targets)


@pytest.mark.slow
def test_label_smoothing_reaches_every_training_step(
    kaggle_tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The configured smoothing is what each optimisation step's loss is computed with. Checked
    with a spy, not by comparing two runs' losses: which of two trajectories ends higher depends on
    the CPU's arithmetic (bf16 autocast or fp32), not on smoothing."""
    seen: list[float] = []
    real_loss = engine.training_loss

    def spy(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        seen.append(label_smoothing)
        return real_loss(logits, targets, label_smoothing)

    monkeypatch.setattr(engine, "training_loss", spy)
    fit(_config(kaggle_tree, tmp_path / "smooth", epochs=1, label_smoothing=0.3), progress=False)
    assert seen and set(seen) == {0.3}


@pytest.mark.slow
def test_weight_average_is_what_gets_validated_kept_and_resumed(
    kaggle_tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ema_decay the best weights are the moving average (not the raw weights), the log shows
    both, and a killed run resumes to exactly the uninterrupted run's average."""
    settings = {"epochs": 2, "lr": 1e-3, "ema_decay": 0.9}
    whole = fit(_config(kaggle_tree, tmp_path / "whole", **settings), progress=False)
    row = whole["history"][-1]
    assert {"raw_val_accuracy", "raw_val_loss", "val_accuracy"} <= row.keys()
    last = torch.load(tmp_path / "whole" / "last.pt", weights_only=True)
    weight = "classifier.1.weight"
    assert not torch.allclose(last["ema"]["module." + weight], last["model"][weight])

    killed = _config(kaggle_tree, tmp_path / "killed", **settings)
    kill_after_first_checkpoint(monkeypatch, lambda: fit(killed, progress=False))
    after_one = torch.load(tmp_path / "killed" / "last.pt", weights_only=True)
    best = load_file(tmp_path / "killed" / "best.safetensors")  # epoch 1 is always the best so far
    assert all(torch.equal(best[k], after_one["ema"]["module." + k]) for k in best)
    assert not torch.equal(best[weight], after_one["model"][weight])
    fit(_config(kaggle_tree, tmp_path / "killed", resume=True, **settings), progress=False)
    resumed = torch.load(tmp_path / "killed" / "last.pt", weights_only=True)
    for key, tensor in last["ema"].items():
        assert torch.equal(tensor, resumed["ema"][key]), key


@pytest.mark.slow
def test_resuming_a_plain_run_with_averaging_is_refused(kaggle_tree: Path, tmp_path: Path) -> None:
    fit(_config(kaggle_tree, tmp_path / "run", epochs=1), progress=False)
    with pytest.raises(ConfigError, match="ema_decay"):
        fit(_config(kaggle_tree, tmp_path / "run", epochs=2, ema_decay=0.9, resume=True), progress=False)
