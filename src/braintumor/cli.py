"""The ``braintumor`` command: a thin layer that turns arguments into calls of the Python API.

Every ``BraintumorError`` becomes one line on stderr and exit code 2; no traceback reaches the user.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

import typer

from .errors import BraintumorError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False, help="Brain MRI tumour classification with EfficientNet-B0.")


@app.callback()
def _commands() -> None:
    """Brain MRI tumour classification with EfficientNet-B0."""


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@app.command()
def train(
    data: Path = typer.Option(..., help="Data root: Kaggle layout (Training/, Testing/) or class folders."),
    out: Path = typer.Option(..., help="Run folder to create (or to resume with --resume)."),
    config: Optional[Path] = typer.Option(None, help="YAML file of settings; command-line options win."),
    epochs: Optional[int] = typer.Option(None, help="Epochs (default 20)."),
    batch_size: Optional[int] = typer.Option(None, help="Batch size (default 32)."),
    lr: Optional[float] = typer.Option(None, help="Adam learning rate (default 1e-4)."),
    lr_schedule: Optional[str] = typer.Option(None, help="constant (default) or cosine."),
    init: Optional[str] = typer.Option(None, help="lite0 (default, offline ImageNet), imagenet (download), none, or a weights file."),
    augment: Optional[bool] = typer.Option(None, "--augment/--no-augment", help="Training augmentation (default on)."),
    seed: Optional[int] = typer.Option(None, help="Random seed (default 0)."),
    device: Optional[str] = typer.Option(None, help="auto (default), cpu or cuda."),
    amp: Optional[bool] = typer.Option(None, "--amp/--no-amp", help="Mixed precision where supported (default on)."),
    cache_dir: Optional[Path] = typer.Option(None, help="Folder for the decoded-image cache (default: none)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """Train EfficientNet-B0 and write a run folder (config, metrics, curves, best weights)."""
    from .config import resolve_config
    from .training import fit

    _setup_logging()
    try:
        resolved = resolve_config(
            config, data=data, out=out, epochs=epochs, batch_size=batch_size, lr=lr, lr_schedule=lr_schedule,
            init=init, augment=augment, seed=seed, device=device, amp=amp, cache_dir=cache_dir, resume=resume,
        )
        result = fit(resolved, progress=not quiet)
    except BraintumorError as exc:
        _fail(str(exc))
    best = result["best"]
    typer.echo(f"best epoch {best['epoch']}: val accuracy {best['val_accuracy']:.4f}; weights in {out / 'best.safetensors'}")


def _print_report(report: dict) -> None:
    """Human-readable summary of an evaluation report."""
    low, high = report.get("accuracy_ci95", (float("nan"), float("nan")))
    wlow, whigh = report.get("weighted_f1_ci95", (float("nan"), float("nan")))
    typer.echo(f"{report['data']} ({report['split']}): {report['n_images']} images, {report['n_skipped']} skipped")
    typer.echo(f"accuracy     {report['accuracy']:.4f}  95% CI [{low:.4f}, {high:.4f}]  ({report['n_errors']} errors)")
    typer.echo(f"weighted F1  {report['weighted_f1']:.4f}  95% CI [{wlow:.4f}, {whigh:.4f}]")
    typer.echo(f"macro F1     {report['macro_f1']:.4f}   macro ROC-AUC {report['macro_roc_auc'] or float('nan'):.4f}   ECE {report['ece']:.4f}")
    typer.echo(f"{'class':<12}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>9}")
    for name, row in report["per_class"].items():
        typer.echo(f"{name:<12}{row['precision']:>10.4f}{row['recall']:>10.4f}{row['f1']:>10.4f}{row['support']:>9}")
    typer.echo("confusion matrix (rows true, columns predicted): " + ", ".join(report["labels"]))
    for name, row in zip(report["labels"], report["confusion_matrix"]):
        typer.echo(f"  {name:<12}" + "".join(f"{v:>6}" for v in row))


@app.command()
def evaluate(
    data: Path = typer.Option(..., help="Kaggle layout (evaluates Testing/) or a folder of class folders."),
    weights: Optional[Path] = typer.Option(None, help="Weights file (default: the shipped model)."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object on stdout, nothing else."),
    out: Optional[Path] = typer.Option(None, help="Folder for report.json, predictions.csv and PNG figures."),
    batch_size: int = typer.Option(64, min=1, help="Images per forward pass."),
    bootstrap: int = typer.Option(1000, min=0, help="Bootstrap resamples for the 95% intervals (0: none)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
) -> None:
    """Accuracy, F1, per-class figures, confusion matrix, ROC-AUC and bootstrap intervals."""
    import json

    from .evaluation import evaluate as run_evaluation
    from .predict import load_model

    _setup_logging()
    try:
        classifier = load_model(weights, device=device)
        report = run_evaluation(data, classifier, out, batch_size=batch_size, bootstrap=bootstrap, progress=not json_output)
    except BraintumorError as exc:
        _fail(str(exc))
    if json_output:
        typer.echo(json.dumps(report))
    else:
        _print_report(report)
        if out is not None:
            typer.echo(f"report, predictions and figures in {out}")


def main() -> None:
    """Entry point of the ``braintumor`` console script."""
    app()
