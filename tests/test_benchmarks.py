"""The GPU training script runs end to end on the CPU with a tiny data set (its smoke test)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # subprocesses, servers or the real data: minutes of CPU in all

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_script_trains_and_scores_on_a_tiny_set(kaggle_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "gpu"
    command = [sys.executable, str(ROOT / "benchmarks" / "gpu_train.py"), "--data", str(kaggle_tree), "--out", str(out),
               "--device", "cpu", "--epochs", "2", "--image-size", "64"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary == json.loads((out / "gpu_result.json").read_text())
    assert summary["epochs"] == 2 and summary["test_images"] == 16 and 0.0 <= summary["test_accuracy"] <= 1.0
    assert summary["training_images_per_second"] > 0 and summary["fit_seconds"] >= summary["training_loop_seconds"]
    assert (out / "best.safetensors").is_file() and len((out / "metrics.jsonl").read_text().splitlines()) == 2


def test_gpu_script_refuses_a_machine_without_cuda(kaggle_tree: Path, tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        return  # nothing to refuse on a GPU machine
    script = ROOT / "benchmarks" / "gpu_train.py"
    command = [sys.executable, str(script), "--data", str(kaggle_tree), "--out", str(tmp_path / "g")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "no CUDA device" in result.stderr
