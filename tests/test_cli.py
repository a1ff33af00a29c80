"""The command line: JSON shape, exit codes, and one-line errors without tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from braintumor.cli import app

runner = CliRunner()



@pytest.mark.slow
def test_evaluate_json_is_one_object_with_the_promised_keys(
    kaggle_tree: Path, tiny_weights: Path, tmp_path: Path
) -> None:
    arguments = ["--data", str(kaggle_tree), "--weights", str(tiny_weights), "--json", "--bootstrap", "20"]
    result = runner.invoke(app, ["evaluate", *arguments, "--out", str(tmp_path / "ev")])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    for key in ("accuracy", "weighted_f1", "macro_f1"):
        assert 0.0 <= report[key] <= 1.0
    assert report["n_images"] == 16 and report["split"] == "Testing"
    assert set(report["labels"]) <= {"glioma", "meningioma", "notumor", "pituitary"}
    assert sum(map(sum, report["confusion_matrix"])) == 16
    assert set(report["per_class"]) == {"glioma", "meningioma", "notumor", "pituitary"}
    for name in ("report.json", "predictions.csv", "confusion_matrix.png", "per_class.png"):
        assert (tmp_path / "ev" / name).is_file()


def test_evaluate_counts_and_skips_a_corrupt_image(kaggle_tree: Path, tiny_weights: Path) -> None:
    (kaggle_tree / "Testing" / "notumor" / "zero.jpg").write_bytes(b"")
    result = runner.invoke(
        app, ["evaluate", "--data", str(kaggle_tree), "--weights", str(tiny_weights), "--json", "--bootstrap", "0"]
    )
    report = json.loads(result.stdout)
    assert report["n_images"] == 16 and report["n_skipped"] == 1 and "zero.jpg" in report["skipped"][0]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["evaluate", "--data", "/nonexistent/brains", "--weights", "{weights}"], "does not exist"),
        (["evaluate", "--data", "{tree}", "--weights", "/nonexistent/w.safetensors"], "not found"),
        (["train", "--data", "{tree}", "--out", "{tmp}/r", "--epochs", "0"], "epochs"),
    ],
)
@pytest.mark.slow
def test_errors_are_one_line_with_exit_code_2(
    arguments: list[str], message: str, kaggle_tree: Path, tmp_path: Path, tiny_weights: Path
) -> None:
    filled = [a.format(tree=kaggle_tree, tmp=tmp_path, weights=tiny_weights) for a in arguments]
    completed = subprocess.run(
        [sys.executable, "-m", "braintumor", *filled], capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 2
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in completed.stderr


def test_unknown_class_folder_exits_2(kaggle_tree: Path, tiny_weights: Path) -> None:
    (kaggle_tree / "Testing" / "lymphoma").mkdir()
    result = runner.invoke(app, ["evaluate", "--data", str(kaggle_tree), "--weights", str(tiny_weights)])
    assert result.exit_code == 2 and "lymphoma" in result.output
