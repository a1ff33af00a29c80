"""The ``braintumor`` command: a thin layer that turns arguments into calls of the Python API.

Every ``BraintumorError`` becomes one line on stderr and exit code 2; no traceback reaches the user.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, List, Optional, TextIO

import typer

from .errors import BraintumorError, one_line, printable_name

if TYPE_CHECKING:
    from .data.dicom_series import DicomSeries
    from .inference.predict import Classifier
    from .inference.results import Prediction, SeriesCollector, SeriesResult

# predict's CSV columns after the error: the slice's kind (slice_kind.SliceKind) and the flag's words.
KIND_COLUMNS = ("sequence", "sequence_confidence", "sequence_origin", "plane", "plane_confidence", "plane_origin",
                "outside_validated_range_reason")

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    help="Brain MRI tumour classification with EfficientNet-B0.",
)


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
    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # "generated new fontManager" is no result
    logging.getLogger("highdicom").setLevel(logging.WARNING)  # one line per module it copies


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _require(extra: str, purpose: str, needed: bool = True) -> None:
    """Stop with one line naming the extra to install when ``extra`` is ``needed`` and missing."""
    from .extras import MissingExtraError, require

    if not needed:
        return
    try:
        require(extra, purpose)
    except MissingExtraError as exc:
        _fail(str(exc))


@app.command()
def train(
    data: List[Path] = typer.Option(
        [], help="Data root: Kaggle layout (Training/, Testing/) or class folders. Give it once per source "
        "(in the order of the config's sources:, whose roots it replaces), or leave it to the config.",
    ),
    out: Path = typer.Option(..., help="Run folder to create (or to resume with --resume)."),
    config: Optional[Path] = typer.Option(None, help="YAML file of settings; command-line options win."),
    epochs: Optional[int] = typer.Option(None, help="Epochs (default 20)."),
    batch_size: Optional[int] = typer.Option(None, help="Batch size (default 32)."),
    lr: Optional[float] = typer.Option(None, help="Adam learning rate (default 1e-4)."),
    lr_schedule: Optional[str] = typer.Option(None, help="constant (default) or cosine."),
    init: Optional[str] = typer.Option(
        None, help="lite0 (default, offline ImageNet), imagenet (download), none, or a weights file."
    ),
    augment: Optional[bool] = typer.Option(None, "--augment/--no-augment", help="Training augmentation (default on)."),
    seed: Optional[int] = typer.Option(None, help="Random seed (default 0)."),
    device: Optional[str] = typer.Option(None, help="auto (default), cpu or cuda."),
    amp: Optional[bool] = typer.Option(None, "--amp/--no-amp", help="Mixed precision where supported (default on)."),
    cache_dir: Optional[Path] = typer.Option(None, help="Folder for the decoded-image cache (default: none)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """Train EfficientNet-B0 and write a run folder (config, metrics, curves, best weights)."""
    from .training.config import resolve_config
    from .training.fit import fit

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
    if best is None:  # not rank 0 of a torchrun job: rank 0 reports
        return
    score = "no validation" if best["val_accuracy"] is None else f"val accuracy {best['val_accuracy']:.4f}"
    typer.echo(f"kept epoch {best['epoch']} ({score}); weights in {out / 'best.safetensors'}")


def _echo_lines(lines: list[str]) -> None:
    for line in lines:
        typer.echo(line)


def _shift_names() -> list[str]:
    from .evaluation.shifts import SHIFTS

    return list(SHIFTS)


@app.command()
def evaluate(
    data: Path = typer.Option(..., help="Kaggle layout (evaluates Testing/) or a folder of class folders."),
    weights: Optional[Path] = typer.Option(None, help="Weights file (default: the shipped model)."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object on stdout, nothing else."),
    out: Optional[Path] = typer.Option(None, help="Folder for report.json, predictions.csv and PNG figures."),
    batch_size: int = typer.Option(64, min=1, help="Images per forward pass."),
    bootstrap: int = typer.Option(1000, min=0, help="Bootstrap resamples for the 95% intervals (0: none)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    leak_free: bool = typer.Option(
        True, "--leak-free/--no-leak-free", help="Also report the Testing images with no near duplicate in Training."
    ),
    tta: bool = typer.Option(False, "--tta", help="Test-time augmentation: average with the mirrored scan."),
    shift: Optional[str] = typer.Option(
        None, "--shift", metavar="NAME[,NAME...]|all",
        help="Instead of the normal report (--bootstrap, --leak-free unused), run the robustness suite: the same "
             "images unshifted and under each named appearance shift (labels unchanged): accuracy, weighted F1, flip "
             "rate, rejections; with --out, shifts.json, shifts.png and shift_examples.png. Shifts: all, "
             + ", ".join(_shift_names()) + "."),
    seed: int = typer.Option(0, min=0, help="Seed of the random shifts (--shift): same seed, same pixels."),
) -> None:
    """Accuracy, F1, per-class figures, confusion matrix, ROC-AUC and bootstrap intervals; or, with --shift,
    accuracy under seeded appearance shifts."""
    import json

    from .evaluation.evaluate import evaluate as run_evaluation
    from .evaluation.evaluate import evaluate_shifts
    from .evaluation.shifts import resolve_shifts
    from .inference.predict import load_model

    _setup_logging()
    try:
        names = resolve_shifts(shift) if shift is not None else None  # a typo fails before the model loads
        classifier = load_model(weights, device=device, tta=tta)
        if names is not None:
            report = evaluate_shifts(
                data, classifier, names, seed=seed, batch_size=batch_size, out_dir=out, progress=not json_output
            )
        else:
            report = run_evaluation(
                data, classifier, out, batch_size=batch_size, bootstrap=bootstrap, progress=not json_output,
                leak_free=leak_free,
            )
    except BraintumorError as exc:
        _fail(str(exc))
    if json_output:
        typer.echo(json.dumps(report.to_dict()))
    elif names is not None:
        _echo_lines(report.lines())
        if out is not None:
            typer.echo(f"shifts.json, shifts.png and shift_examples.png in {out}")
    else:
        _echo_lines(report.lines())
        if out is not None:
            typer.echo(f"report, predictions and figures in {out}")


@app.command()
def predict(
    paths: list[str] = typer.Argument(..., help="Files, folders (walked recursively) or globs: images, DICOM, NIfTI."),
    weights: Optional[Path] = typer.Option(None, help="Weights file (default: the shipped model)."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON array on stdout, nothing else."),
    csv_file: Optional[Path] = typer.Option(None, "--csv", help="Also write the results as CSV rows to this file."),
    batch_size: int = typer.Option(32, min=1, help="Images per forward pass."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    tta: bool = typer.Option(False, "--tta", help="Test-time augmentation: average with the mirrored scan."),
    backend: Optional[str] = typer.Option(
        None, help="auto (default: ONNX Runtime on a CPU, PyTorch on a GPU), torch or onnx."
    ),
    amp: bool = typer.Option(
        False,
        "--amp",
        help="bf16/fp16 autocast: faster where the hardware has it; "
        "changes a few borderline predictions (benchmarks/RESULTS.md).",
    ),
    dicom_out: Optional[Path] = typer.Option(
        None, "--dicom-out", help="Write each DICOM series' SR and Grad-CAM Secondary Capture here (DIR/<study UID>/)."
    ),
) -> None:
    """Classify scans: class, its probability and all four probabilities for each image; one
    verdict per series (DICOM files grouped by study and series, NIfTI volumes, multi-frame DICOM).

    Exit code 0 when every input was classified, 1 when some failed, 2 for usage errors.
    """
    import csv

    from tqdm import tqdm

    from .data.inputs import expand_inputs
    from .inference.predict import load_model
    from .inference.results import SeriesCollector

    _setup_logging()
    _require("pacs", "--dicom-out", needed=dicom_out is not None)
    try:
        files = expand_inputs(paths)
        classifier = load_model(weights, device=device, tta=tta, backend=backend, amp=amp)
    except BraintumorError as exc:
        _fail(str(exc))
    if not files:
        _fail("no scan files found in " + ", ".join(paths))
    judged: list[tuple[DicomSeries, SeriesResult]] = []
    with contextlib.ExitStack() as stack:
        writer = None
        if csv_file is not None:
            writer = csv.writer(stack.enter_context(_open_csv(csv_file)))
            flag_names = ["uncertain", "not_brain_mri", "outside_validated_range"]
            columns = ["path", "label", "confidence", *classifier.class_names, *flag_names, "error", *KIND_COLUMNS]
            writer.writerow(columns)
        failures, first = 0, True
        series = SeriesCollector()
        # A progress bar only where a person watches both streams; results are written through
        # tqdm.write, which clears the bar first, so the two never share a line.
        progress = len(files) > 5 and not json_output and sys.stdout.isatty() and sys.stderr.isatty()
        echo = (lambda line: tqdm.write(line, file=sys.stdout)) if progress else typer.echo
        if json_output:
            typer.echo("[", nl=False)
        else:
            columns = "".join(f"{n[:10]:>11}" for n in classifier.class_names)
            typer.echo(f"{'label':<14}{'conf':>7}  {columns}  path")
        for result in _predictions(classifier, files, batch_size, progress, judged if dicom_out else None):
            failures += result.error is not None
            series.add(result)
            if writer is not None:
                writer.writerow(_csv_row(result, classifier.class_names))
            first = _echo_prediction(result, classifier.class_names, echo, json_output, first)
        _echo_series(series.results(), json_output, first)
        if json_output:
            typer.echo("\n]")
    unwritten = _write_dicom_results(judged, series, classifier, dicom_out) if dicom_out is not None else 0
    if failures:
        typer.echo(f"{failures} input(s) could not be classified", err=True)
    if unwritten:
        typer.echo(f"the DICOM results of {unwritten} series could not be written", err=True)
    if failures or unwritten:
        raise typer.Exit(1)


def _echo_prediction(
    result: Prediction, class_names: list[str], echo: Callable[[str], None], json_output: bool, first: bool
) -> bool:
    """One slice's result: an object of the JSON array (``first``: none before it), a table row, or
    its error on stderr. Returns ``first`` for the next one."""
    import json

    if json_output:
        typer.echo(("" if first else ",") + "\n" + json.dumps(result.to_dict()), nl=False)
        return False
    if result.error is not None:
        typer.echo(f"error: {result.error}", err=True)
    else:
        echo(_prediction_line(result, class_names))
    return first


def _predictions(
    classifier: Classifier, files: list[Path], batch_size: int, progress: bool,
    judged: list[tuple[DicomSeries, SeriesResult]] | None,
) -> Iterator[Prediction]:
    """Every input's predictions. With ``judged`` (``--dicom-out``), DICOM files are read once as
    series and each series is judged with its key slice's heat map in one pass
    (``Classifier.predict_series``); each (series, result) is added to ``judged``."""
    from .data.dicom_series import read_dicom_series
    from .data.inputs import is_dicom_path
    from .inference.results import Prediction

    if judged is None:
        yield from classifier.predict_iter(files, batch_size=batch_size, progress=progress)
        return
    dicom = [f for f in files if is_dicom_path(f)]
    found, failures = read_dicom_series(dicom)  # each file read once; every series held until judged
    for failure in failures:
        yield Prediction(path=failure.source, error=failure.message)
    explain = classifier.model is not None  # an ONNX file gives no heat map: SRs without a Secondary Capture
    for one in found:
        result = classifier.predict_series(one, explain=explain, batch_size=batch_size)
        judged.append((one, result))
        yield from result.slices
    read = set(dicom)
    others = [f for f in files if f not in read]
    if others:
        yield from classifier.predict_iter(others, batch_size=batch_size, progress=progress)


def _open_csv(csv_file: Path) -> TextIO:
    """``csv_file`` opened for ``predict``'s CSV rows; a usage error when it cannot be."""
    try:
        return open(csv_file, "w", newline="")
    except OSError as exc:
        _fail(f"{csv_file}: cannot write CSV ({exc.strerror})")


def _csv_row(result: Prediction, class_names: list[str]) -> list[str]:
    """One prediction as a row of ``predict``'s CSV columns."""
    probabilities = [f"{result.probabilities[n]:.6f}" if result.probabilities else "" for n in class_names]
    confidence = f"{result.confidence:.6f}" if result.confidence is not None else ""
    flags = [_csv_flag(result.uncertain), _csv_flag(result.not_brain_mri), _csv_flag(result.outside_validated_range)]
    kind = result.slice_kind.as_dict() if result.slice_kind is not None else {}
    kind_cells = ["" if kind.get(name) is None else str(kind[name]) for name in KIND_COLUMNS[:-1]]
    reason = result.outside_validated_range_reason or ""
    return [printable_name(result.path), result.label or "", confidence, *probabilities, *flags,
            printable_name(result.error or ""), *kind_cells, reason]


def _prediction_line(result: Prediction, class_names: list[str]) -> str:
    """One classified input as a line of ``predict``'s table, with its kind of slice and any flags after the path."""
    row = "".join(f"{result.probabilities[n]:>11.4f}" for n in class_names)
    kind = f"  [{result.slice_kind.label()}]" if result.slice_kind is not None else ""
    flag = kind + ("  UNCERTAIN: refer to a radiologist" if result.uncertain else "")
    if result.not_brain_mri_reason:
        flag += f"  NOT A BRAIN MRI SLICE: {result.not_brain_mri_reason}"
    if result.outside_validated_range_reason:
        flag += f"  OUTSIDE THE VALIDATED RANGE: {result.outside_validated_range_reason}"
    return f"{result.label:<14}{result.confidence:>7.3f}  {row}  {printable_name(result.path)}{flag}"


def _echo_series(results: list[SeriesResult], json_output: bool, first: bool) -> None:
    """Each series' verdict after all slices: an object of ``predict``'s JSON array (``first``: no
    object before it) or a line of text."""
    import json

    if json_output:
        for result in results:
            typer.echo(("" if first else ",") + "\n" + json.dumps(result.to_dict()), nl=False)
            first = False
        return
    for result in results:
        parts = [f"{k} on {len(c.slices)} slices (max {c.max_confidence:.3f})" for k, c in result.classes().items()]
        looks = f"{len(result.slices)} slices, {result.kind.plane} {result.kind.sequence}"
        verdict = f"{result.verdict.label} ({result.verdict.reason})"
        typer.echo(f"series {result.path} ({looks}): {verdict} - " + "; ".join(parts))


def _write_dicom_results(
    judged: list[tuple[DicomSeries, SeriesResult]], collected: SeriesCollector, classifier: Classifier, out: Path
) -> int:
    """Each DICOM series' SR and Secondary Capture under ``out``, reported on stderr; returns how
    many series failed (a failed series is named with its reason, the others are still written)."""
    from .pacs.report import ModelIdentity, dicom_results

    for result in collected.results():
        if all(p.dicom is None for p in result.slices):
            typer.echo(f"{result.path}: not DICOM, so no DICOM results", err=True)
    model, failed = ModelIdentity.of(classifier), 0
    for series, result in judged:
        try:
            results = dicom_results(series, result, model)
            written = results.save(out)
        except Exception as exc:  # noqa: BLE001 - one series' failure is that series' one-line error
            reason = str(exc) if isinstance(exc, (BraintumorError, OSError)) else f"{type(exc).__name__}: {exc}"
            typer.echo(f"error: DICOM results of {series.path}: {one_line(reason)}", err=True)
            failed += 1
            continue
        verdict = f"{result.verdict.label} ({len(result.slices)} slices)"
        typer.echo(f"DICOM results of {result.path}: {verdict}; {len(written)} files in {written[0].parent}", err=True)
        if results.note:
            typer.echo(f"{result.path}: {results.note}", err=True)
    return failed


@app.command()
def explain(
    paths: list[str] = typer.Argument(..., help="Files, folders or globs to explain."),
    out: Path = typer.Option(..., help="Folder for one PNG per scan (scan, heat map, prediction)."),
    method: Optional[str] = typer.Option(
        None, help="gradcam, gradcam++, eigencam or layercam (default: layercam, see docs/explanations.md)."
    ),
    target: Optional[str] = typer.Option(None, help="Class to explain (default: the predicted class)."),
    layer: Optional[str] = typer.Option(
        None, help="Layer to read (default: the documented best, see docs/explanations.md)."
    ),
    weights: Optional[Path] = typer.Option(None, help="Weights file (default: the shipped model)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
) -> None:
    """Grad-CAM heat maps: one PNG per scan with the heat map over it and the predicted class."""
    from .data.inputs import expand_inputs
    from .inference.explain import METHODS
    from .inference.predict import DEFAULT_CAM_METHOD, load_model

    _setup_logging()
    method = method or DEFAULT_CAM_METHOD
    if method not in METHODS:
        _fail(f"method {method!r} is not one of {', '.join(METHODS)}")
    try:
        files = expand_inputs(paths)
        classifier = load_model(weights, device=device)
        out.mkdir(parents=True, exist_ok=True)
        explanations = classifier.explain_iter(files, method=method, target=target, layer=layer)
        failures, used = 0, set()
        for explanation in explanations:
            prediction = explanation.prediction
            if explanation.heatmap is None:
                failures += 1
                typer.echo(f"error: {prediction.error}", err=True)
                continue
            name = _png_name(prediction.path, used)
            try:
                explanation.save_png(out / name)
            except OSError as exc:  # this file's figure is lost, not the batch's
                failures += 1
                typer.echo(f"error: {printable_name(str(out / name))}: cannot write ({exc.strerror or exc})", err=True)
                continue
            typer.echo(f"{prediction.label:<14}{prediction.confidence:>7.3f}  {printable_name(str(out / name))}")
    except BraintumorError as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"{out}: cannot write ({exc.strerror})")
    if failures:
        typer.echo(f"{failures} input(s) could not be explained", err=True)
        raise typer.Exit(1)


@app.command()
def audit(
    data: Path = typer.Argument(..., help="Data root: Kaggle layout or a folder of class folders."),
    out: Path = typer.Option(..., help="Folder for audit.md, audit.json, contact sheets and the leak-free manifest."),
    threshold: int = typer.Option(4, min=0, max=32, help="Near-duplicate threshold in hash bits."),
    shortcuts: bool = typer.Option(
        True, "--shortcuts/--no-shortcuts", help="Also audit how well trivial cues (grey level, sharpness, framing, "
        "plane, file format) predict the label: shortcuts.json and shortcut_*.png (1-2 minutes for the 7,000 "
        "Kaggle images on 2 cores)."),
    external: Path | None = typer.Option(
        None, help="A class-folder set (or Kaggle layout: its Testing/) to also score the cue classifiers on."),
    source: List[str] = typer.Option(
        [], metavar="NAME=ROOT", help="Another training source (repeatable; its manifest.csv, if any, gives "
        "subject, sequence and plane): then also audit how well trivial cues tell the sources, sequences and "
        "planes apart inside each class, and the class across all sources (sources.json, source_shortcuts.png)."),
    seen_by: Path | None = typer.Option(
        None, metavar="CONFIG_OR_WEIGHTS", help="With --source: compute the pixel cues on what a network "
        "receives after this training config's (.yaml) or weights file's preprocessing (blur, standardisation), "
        "not on the decoded files: does the preprocessing close the shortcuts?"),
    weights: Path | None = typer.Option(
        None, help="The model whose training coverage (slices per class, sequence and plane, as its estimator "
        "reads them) to print last (default: the packaged model)."),
) -> None:
    """Exact and near duplicates within and between splits, label conflicts, and a leak-free Testing list;
    then the shortcut audit: how far trivial, non-anatomical cues predict the label; with --source, the
    same across several training sources."""
    from .data.datasets import resolve_split_dir
    from .evaluation.audit import audit as run_audit
    from .evaluation.audit import audit_lines, leak_free_paths, write_report

    _setup_logging()
    try:
        resolve_split_dir(data, "Testing")  # a missing root: one line and exit 2, before any work
        if external is not None and shortcuts:
            resolve_split_dir(external, "Testing")
        sources = _audit_sources(data, source)
        if seen_by is not None and len(sources) < 2:
            raise BraintumorError("--seen-by needs --source: it changes what the source audit measures")
        preprocessing = None if seen_by is None else _preprocessing_of(seen_by)
        coverage = _coverage_of(weights)  # read before the long audit: a bad file fails first
        report = run_audit(data, threshold=threshold)
        write_report(report, out, data)
    except BraintumorError as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"{out}: cannot write ({exc.strerror})")
    _echo_lines(audit_lines(report, threshold))
    typer.echo(f"report in {out / 'audit.md'}")
    if shortcuts:
        _shortcut_audit(data, out, external, {Path(p).resolve() for p in leak_free_paths(report)})
    if len(sources) > 1:
        _source_audit(sources, out, preprocessing)
    _print_coverage(*coverage)


def _spec_of(path: Path):
    """The validated spec of a weights file, from its metadata alone (no network is built)."""
    from .models.checkpoint import read_metadata
    from .models.spec import ModelSpec

    return ModelSpec.from_metadata(read_metadata(path), source=str(path))


def _coverage_of(weights: Path | None) -> tuple:
    """(name of the weights file, the training coverage stored with it or None)."""
    from .inference.predict import default_weights_path

    path = weights or default_weights_path()
    return path.name, _spec_of(path).coverage


def _print_coverage(name: str, coverage) -> None:
    """The training coverage as a table (a note when the weights have none)."""
    if coverage is None:
        typer.echo(f"{name}: no training coverage stored (scripts/fit_slice_kind.py writes it)")
        return
    typer.echo(f"training slices of {name} per class and sequence, then plane (as its estimator reads them):")
    for line in coverage.lines():
        typer.echo(line)


def _audit_sources(data: Path, specs: list[str]) -> tuple:
    """The sources named by ``--source NAME=ROOT`` after ``data`` (named after its folder); a source's
    ``manifest.csv`` is read when it has one."""
    from .data.datasets import resolve_split_dir
    from .data.sources import Source

    sources = [Source(data.resolve().name, data)]
    for spec in specs:
        name, _, root = spec.partition("=")
        if not name or not root:
            raise BraintumorError(f"--source {spec!r}: expected NAME=ROOT")
        root_path = Path(root)
        resolve_split_dir(root_path, "Training")
        manifest = Path("manifest.csv") if (root_path / "manifest.csv").is_file() else None
        sources.append(Source(name, root_path, manifest))
    return tuple(sources)


def _preprocessing_of(path: Path):
    """The preprocessing a training config (.yaml/.yml) or a weights file sets; one-line errors."""
    if path.suffix.lower() in (".yaml", ".yml"):
        from .training.config import read_preprocessing

        return read_preprocessing(path)
    if path.suffix.lower() != ".safetensors":
        raise BraintumorError(f"--seen-by {path}: expected a training config (.yaml) or a .safetensors weights file")
    return _spec_of(path).preprocessing


def _source_audit(sources: tuple, out: Path, preprocessing=None) -> None:
    from .evaluation.source_audit import source_audit, source_summary_lines, write_source_report

    def compute() -> dict:
        return source_audit(sources, preprocessing=preprocessing)

    _report_to(out, "source report", compute, write_source_report, source_summary_lines)


def _shortcut_audit(data: Path, out: Path, external: Path | None, leak_free: set[Path]) -> None:
    from .evaluation.shortcuts import shortcut_audit, summary_lines, write_shortcut_report

    def compute() -> dict:
        return shortcut_audit(data, external=external, leak_free=leak_free)

    _report_to(out, "shortcut report", compute, write_shortcut_report, summary_lines)


def _report_to(out: Path, what: str, compute: Callable, write: Callable, summarise: Callable) -> None:
    """Compute a report, write its files to ``out`` and print its summary; one line on failure."""
    try:
        report = compute()
        paths = write(report, out)
    except BraintumorError as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"{out}: cannot write ({exc.strerror})")
    for line in summarise(report):
        typer.echo(line)
    typer.echo(f"{what}: " + ", ".join(str(path) for path in paths))


def _check_can_listen(host: str, port: int) -> None:
    import socket

    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as exc:
        _fail(f"cannot listen on {host}:{port} ({exc.strerror or exc})")


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0 for every interface)."),
    port: int = typer.Option(8000, min=1, max=65535, help="TCP port."),
    weights: Optional[Path] = typer.Option(
        None, help="Weights file: .safetensors (default: the shipped model) or .onnx."
    ),
    backend: Optional[str] = typer.Option(
        None, help="auto (default: ONNX Runtime on a CPU, PyTorch on a GPU), torch or onnx."
    ),
    device: str = typer.Option("auto", help="auto, cpu or cuda (torch backend)."),
    tta: bool = typer.Option(False, "--tta", help="Test-time augmentation for every prediction."),
    amp: bool = typer.Option(
        False, "--amp", help="bf16/fp16 autocast (torch backend): faster, changes a few borderline predictions."
    ),
    max_file_mb: float = typer.Option(32.0, min=0.001, help="Largest accepted upload per file, MiB."),
    max_files: int = typer.Option(256, min=1, help="Most files in one request (a series' verdict needs them all)."),
    max_request_mb: Optional[float] = typer.Option(
        None, min=0.001, help="Largest accepted request body, MiB (default: 256, or --max-file-mb + 1 if larger)."
    ),
    workers: int = typer.Option(
        1, min=1, help="Threads that batch concurrent predictions (1: the model already uses every core)."
    ),
    api_key: Optional[str] = typer.Option(
        None, envvar="BRAINTUMOR_API_KEY", help="Require this key (X-API-Key or Authorization: Bearer) on /v1/."
    ),
    allow_origin: list[str] = typer.Option(
        [], "--allow-origin", help="A web origin (https://host) whose pages may call the service; repeatable."
    ),
    allow_host: list[str] = typer.Option(
        [], "--allow-host", help="A host name clients use to reach the service (Host header; *.example.org for "
        "subdomains, * for any); repeatable. Default: localhost, 127.0.0.1, ::1 and --host.",
    ),
    max_connections: int = typer.Option(
        256, min=1, help="Connections open at once, idle ones included (--header-timeout closes those); more get 503."
    ),
    header_timeout: float = typer.Option(
        10.0, min=0.1, help="Seconds a connection may take to send a whole request head (idle ones included)."
    ),
) -> None:
    """HTTP service and web page: /, /healthz, /openapi.json, /v1/model, /v1/predict, /v1/explain."""
    _require("serve", "braintumor serve")
    from .inference.predict import load_model
    from .serving.app import ServiceLimits, create_app
    from .serving.security import LOCAL_HOSTS, AccessPolicy, header_deadline_protocol

    _setup_logging()
    _check_can_listen(host, port)  # before the model loads: a busy port should fail at once
    try:
        classifier = load_model(weights, device=device, tta=tta, backend=backend, amp=amp)
    except BraintumorError as exc:
        _fail(str(exc))
    import uvicorn

    request_mb = max_request_mb if max_request_mb is not None else max(256.0, max_file_mb + 1)
    limits = ServiceLimits(max_file_bytes=int(max_file_mb * 2**20), max_files=max_files,
                           max_request_bytes=int(request_mb * 2**20))
    typer.echo(f"serving {classifier.weights_path} ({classifier.backend}) on http://{host}:{port}/", err=True)
    try:
        hosts = tuple(allow_host) or (*LOCAL_HOSTS, *([host] if host not in ("0.0.0.0", "::") else []))
        typer.echo(f"answering requests addressed to: {', '.join(hosts)} (--allow-host)", err=True)
        policy = AccessPolicy(api_key=api_key or None, allowed_origins=tuple(allow_origin), allowed_hosts=hosts)
        uvicorn.run(
            create_app(classifier, limits, workers, policy), host=host, port=port, log_level="info",
            limit_concurrency=max_connections, timeout_keep_alive=5, server_header=False,
            http=header_deadline_protocol(header_timeout), timeout_graceful_shutdown=SHUTDOWN_SECONDS,
        )
    except OSError as exc:  # uvicorn logs bind failures and exits; other socket errors land here
        _fail(f"cannot serve on {host}:{port} ({exc.strerror or exc})")


SHUTDOWN_SECONDS = 3  # after SIGINT/SIGTERM, requests still running get this long, then are cancelled


@app.command("dicom-node")
def dicom_node(
    queue: Path = typer.Option(..., help="Folder of the node's queue on disk (created; survives restarts)."),
    send_to: str = typer.Option(
        ..., help="Where results go: AE@host:port (C-STORE) or a DICOMweb base URL (STOW-RS)."
    ),
    port: int = typer.Option(11112, min=1, max=65535, help="DICOM port to listen on."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0 for every interface)."),
    ae_title: str = typer.Option("BRAINTUMOR", help="This node's AE title (callers must address it)."),
    allow_ae: list[str] = typer.Option([], "--allow-ae", help="Accept only this calling AE title; repeatable."),
    quiet_seconds: float = typer.Option(10.0, min=0.0, help="A series is complete after this long without news."),
    retry_seconds: float = typer.Option(30.0, min=0.1, help="Wait between tries to send results."),
    keep_hours: float = typer.Option(24.0, min=0.0, help="Keep a done series' images this long for late instances."),
    min_free_mb: int = typer.Option(1024, min=0, help="Refuse instances while less than this is free for the queue."),
    weights: Optional[Path] = typer.Option(None, help="Weights file (default: the shipped model)."),
    verbose: bool = typer.Option(False, "--verbose", help="Log every association and the cause of each failure."),
) -> None:
    """A DICOM node: receives series (C-STORE), classifies each once complete, sends back an SR and
    a Grad-CAM Secondary Capture. Stops on Ctrl-C or SIGTERM; a restart resumes its queue."""
    import signal

    _require("pacs", "braintumor dicom-node")
    from .inference.predict import load_model
    from .pacs.destinations import check_ae_title, parse_destination
    from .pacs.node import DicomNode, NodeSettings
    from .pacs.queue import SeriesQueue

    _setup_logging(verbose)
    for name in ("pynetdicom", "dicomweb_client"):  # a line per association or request: only when asked
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
    _check_can_listen(host, port)
    try:
        callers = tuple(check_ae_title(a, "--allow-ae") for a in allow_ae)
        destination = parse_destination(send_to, check_ae_title(ae_title, "--ae-title"))
        probe = SeriesQueue(queue)  # before the model loads: a queue that cannot be written, or that
        probe.lock()  # another node holds, should fail at once
        probe.unlock()
    except OSError as exc:
        _fail(f"{queue}: cannot create the node's queue ({exc.strerror or exc})")
    except BraintumorError as exc:
        _fail(str(exc))
    try:
        settings = NodeSettings(queue, ae_title, host, port, quiet_seconds, retry_seconds, keep_hours * 3600, callers,
                                min_free_bytes=min_free_mb << 20)
        node = DicomNode(load_model(weights), destination, settings)
        node.start()
    except (BraintumorError, OSError) as exc:
        _fail(str(exc))
    for signal_number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signal_number, lambda *_: node.request_stop())
    node.wait()
    node.stop()
    logging.getLogger("braintumor.dicom_node").info("stopped; the queue in %s keeps what was not finished", queue)


@app.command()
def export(
    out: Path = typer.Option(..., help="File to write (for example braintumor-b0.onnx)."),
    format: str = typer.Option("onnx", "--format", help="Export format: onnx."),
    weights: Optional[Path] = typer.Option(None, help="Weights file to export (default: the shipped model)."),
    int8: bool = typer.Option(
        False, "--int8", help="int8 ONNX (static quantisation, needs --calibration): an option, slower and less "
        "faithful than fp32 on the CPUs measured (docs/performance.md).",
    ),
    calibration: Optional[Path] = typer.Option(
        None, help="Data root whose Training split calibrates --int8 (Kaggle layout)."
    ),
    calibration_count: int = typer.Option(256, min=16, help="Training slices that calibrate --int8."),
) -> None:
    """Export the model for deployment: ONNX with a dynamic batch, metadata and OOD guard inside."""
    from .inference.predict import default_weights_path
    from .models.network import load_torch_network
    from .models.onnx_backend import export_onnx, source_of

    _setup_logging()
    if format != "onnx":
        _fail(f"format {format!r} is not supported; the only format is onnx")
    if int8 != (calibration is not None):
        _fail("--int8 and --calibration go together: int8 is calibrated on training slices")
    _require("export", "braintumor export")
    try:
        path = weights or default_weights_path()
        network = load_torch_network(path, device="cpu")
        if int8:
            from .models.quantize import quantize_int8, training_slices

            pixels = training_slices(calibration, calibration_count, network.spec.image_size)
            written = quantize_int8(network, pixels, out, source_of(path))
        else:
            written = export_onnx(network, out, source_of(path))
    except BraintumorError as exc:
        _fail(str(exc))
    typer.echo(
        f"wrote {written} ({written.stat().st_size / 2**20:.1f} MiB); run it with --backend onnx --weights {written}"
    )


def _csv_flag(value: bool | None) -> str:
    """A flag as CSV text: empty when the model cannot tell (no threshold or guard)."""
    return "" if value is None else str(value).lower()


PNG_STEM_BYTES = 180  # a heat map's name stays well under the 255 bytes most file systems allow


def _png_name(source: str, used: set[str]) -> str:
    """A unique, safe PNG file name from an input name (``scan.dcm#frame=2`` -> ``scan.dcm_frame2.png``);
    a long name keeps its first ``PNG_STEM_BYTES`` bytes and a hash of the whole name."""
    import hashlib

    file, mark, part = source.rpartition("#")
    numbered = bool(mark) and part.startswith(("frame=", "slice="))  # a '#' in a file's own name stays in it
    base = Path(file if numbered else source).name
    suffix = part.replace("=", "") if numbered else ""
    raw = f"{base}_{suffix}" if suffix else base
    stem = "".join(c if c.isalnum() or c in "._-" else "_" for c in raw) or "scan"  # surrogates are not alnum
    if len(stem.encode("utf-8")) > PNG_STEM_BYTES:
        digest = hashlib.sha256(source.encode("utf-8", "surrogatepass")).hexdigest()[:10]
        stem = stem.encode("utf-8")[:PNG_STEM_BYTES].decode("utf-8", "ignore") + "-" + digest
    name, counter = f"{stem}.png", 1
    while name in used:
        counter += 1
        name = f"{stem}-{counter}.png"
    used.add(name)
    return name


def main() -> None:
    """Entry point of the ``braintumor`` console script. A ``BraintumorError`` that a command did not
    turn into its own message (an optional extra missing deep inside, say) still ends as one line.
    Any text the terminal's encoding cannot hold (a file name that is not UTF-8) is escaped, not fatal."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        app()
    except BraintumorError as exc:
        typer.echo(f"error: {one_line(str(exc))}", err=True)
        sys.exit(2)
