"""torchrun with 2 CPU processes (gloo) trains what 1 process trains with the same global batch.

Tolerance: per-epoch training and validation losses within 5e-3 and 2e-3. The two runs add the
same numbers in a different order (gradients are averaged over processes, batch-norm statistics
summed over them), and Adam's normalised step turns that float noise in near-zero gradients into
full-size steps, so bit-for-bit equality is not expected; measured here: 8e-4 and 2e-5 after two
epochs. A real difference, such as each process normalising with its own half batch, shows up as
0.09 and 0.04. Dropout and stochastic depth are off: their masks are drawn per process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import CLASSES, write_tree

pytestmark = pytest.mark.slow  # subprocesses, servers or the real data: minutes of CPU in all

SETTINGS = {
    "epochs": 2, "batch_size": 16, "image_size": 64, "init": "none", "val_fraction": 0.25, "workers": 1,
    "device": "cpu", "amp": False, "lr": 1e-3, "dropout": 0.0, "stochastic_depth": 0.0,
}
TRAIN_TOLERANCE, VAL_TOLERANCE = 5e-3, 2e-3


def _train(data: Path, out: Path, config: Path, processes: int, *extra: str) -> list[dict]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    command = [*(launcher if processes > 1 else [sys.executable]), "-m", "braintumor", "train",
               "--config", str(config), "--data", str(data), "--out", str(out), "--quiet", *extra]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _close(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        abs(x["train_loss"] - y["train_loss"]) <= TRAIN_TOLERANCE
        and abs(x["val_loss"] - y["val_loss"]) <= VAL_TOLERANCE
        for x, y in zip(a, b, strict=True)
    )


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the data and the config that every run of this module trains on."""
    folder = tmp_path_factory.mktemp("ddp")
    write_tree(folder / "kaggle" / "Training", {name: 12 for name in CLASSES}, seed=1)
    write_tree(folder / "kaggle" / "Testing", {name: 4 for name in CLASSES}, seed=2)
    (folder / "ddp.yaml").write_text(yaml.safe_dump(SETTINGS))
    return folder


@pytest.fixture
def kaggle_tree(shared: Path) -> Path:
    return shared / "kaggle"


@pytest.fixture
def config(shared: Path) -> Path:
    return shared / "ddp.yaml"


@pytest.fixture(scope="module")
def two_processes(shared: Path) -> tuple[Path, list[dict]]:
    """One uninterrupted two-process run (its folder and metrics), which two tests compare against."""
    out = shared / "ddp"
    return out, _train(shared / "kaggle", out, shared / "ddp.yaml", 2)


def test_two_processes_match_one_with_the_same_global_batch(
    kaggle_tree: Path, tmp_path: Path, config: Path, two_processes: tuple[Path, list[dict]]
) -> None:
    single = _train(kaggle_tree, tmp_path / "single", config, 1)
    ddp_folder, distributed = two_processes
    assert _close(single, distributed), (single, distributed)
    assert distributed[0]["train_loss"] != distributed[1]["train_loss"]  # it trained
    # The tolerance is tight enough to catch a different recipe: half the batch per step.
    assert not _close(single, _train(kaggle_tree, tmp_path / "half", config, 1, "--batch-size", "8"))
    # Rank 0 alone wrote the run folder.
    written = sorted(p.name for p in ddp_folder.iterdir())
    assert written == sorted(p.name for p in (tmp_path / "single").iterdir())


def test_a_distributed_run_resumes_like_an_uninterrupted_one(
    kaggle_tree: Path, tmp_path: Path, config: Path, two_processes: tuple[Path, list[dict]]
) -> None:
    whole = two_processes[1]
    _train(kaggle_tree, tmp_path / "resumed", config, 2, "--epochs", "1")
    resumed = _train(kaggle_tree, tmp_path / "resumed", config, 2, "--resume")
    assert _close(whole, resumed), (whole, resumed)


def test_a_global_batch_that_does_not_split_evenly_is_refused(kaggle_tree: Path, tmp_path: Path, config: Path) -> None:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command = [*launcher, "-m", "braintumor", "train", "--config", str(config), "--data", str(kaggle_tree),
               "--out", str(tmp_path / "odd"), "--batch-size", "15", "--quiet"]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode != 0
    assert "batch_size 15 must be divisible by the 2 processes" in result.stderr
