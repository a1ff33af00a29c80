"""``evaluate(data, classifier)``: every published figure for a labelled folder, plus its PNGs.
``evaluate_shifts(data, classifier, shifts)``: the same images under seeded appearance shifts (``shifts``).

On a Kaggle layout the official ``Testing/`` split is evaluated; on a plain class-folder root,
everything in it. Unreadable images are reported and skipped, and their count is part of the report.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..data.cache import DecodedImages, load_cached
from ..data.datasets import Sample, is_kaggle_layout, resolve_split_dir, scan_class_folders
from ..data.inputs import Slice
from ..inference.predict import Assessment, Classifier, default_weights_path
from ..inference.results import Prediction, flags_of
from ..models.slice_kind import COVERAGE_WORDS
from .metrics import classification_report
from .plots import plot_confusion_matrix, plot_per_class, plot_reliability, plot_shift_examples, plot_shifts
from .report import Answers, EvaluationReport, Share, ShiftEntry, ShiftReport, Source, Subset, Uncertainty

logger = logging.getLogger(__name__)


def evaluate(
    data: str | Path,
    classifier: Classifier,
    out_dir: Path | None = None,
    batch_size: int = 64,
    bootstrap: int = 1000,
    cache_dir: Path | None = None,
    progress: bool = True,
    leak_free: bool = True,
) -> EvaluationReport:
    """Classify every labelled image under ``data`` and report the metrics (see ``metrics``).

    On a Kaggle layout with ``leak_free`` on, the report also holds ``leak_free``: the same figures
    on the Testing images that have no exact or near duplicate in Training (see ``audit``), which
    measure skill on new scans rather than memory of copies.

    Raises:
        DataError: missing root, no images, or an unknown class folder.
    """
    data = Path(data)
    split_dir, samples, decoded, keep, labels = _load_labelled(data, classifier, cache_dir, progress)
    pixels = decoded.pixels[keep]
    assessment = classifier.assess(pixels, batch_size=batch_size, progress=progress)
    probabilities, threshold = assessment.probabilities, classifier.uncertainty_threshold
    report = EvaluationReport(
        metrics=classification_report(labels, probabilities, classifier.class_names, bootstrap=bootstrap),
        answers=answer_summary(_answers(classifier, samples, keep, decoded, pixels, assessment), labels),
        source=_source(split_dir, data, classifier, decoded.errors),
        uncertainty=None if threshold is None else uncertainty_summary(probabilities, labels, threshold),
        leak_free=_leak_free(data, samples, keep, decoded, labels, probabilities, classifier, bootstrap)
        if leak_free and is_kaggle_layout(data) else None,
        guarded=classifier.guard is not None,
    )
    if out_dir is not None:
        write_outputs(out_dir, report, [samples[i].path for i in keep], labels, probabilities, classifier.class_names)
    return report


def _source(split_dir: Path, data: Path, classifier: Classifier, skipped: list[str]) -> Source:
    return Source(str(split_dir), "Testing" if is_kaggle_layout(data) else "all", _weights_name(classifier),
                  classifier.tta, list(skipped))


def _leak_free(
    data: Path, samples: list[Sample], keep: np.ndarray, decoded: DecodedImages, labels: np.ndarray,
    probabilities: np.ndarray, classifier: Classifier, bootstrap: int,
) -> Subset:
    """The figures on the Testing images with no exact or near duplicate in Training (``audit``)."""
    from .audit import training_twins

    kept_paths = [samples[i].path for i in keep]
    clean = ~training_twins(data, kept_paths, np.asarray(decoded.pixels)[keep])
    threshold = classifier.uncertainty_threshold
    return Subset(
        classification_report(labels[clean], probabilities[clean], classifier.class_names, bootstrap=bootstrap),
        "Testing images with no byte-identical or perceptual-hash (<= 4 bits) twin in Training",
        None if threshold is None else uncertainty_summary(probabilities[clean], labels[clean], threshold),
    )


def _load_labelled(
    data: Path, classifier: Classifier, cache_dir: Path | None, progress: bool
) -> tuple[Path, list[Sample], DecodedImages, np.ndarray, np.ndarray]:
    """(split folder, samples, decoded pixels, indices of the readable ones, their labels); skips are logged."""
    split_dir = resolve_split_dir(data, "Testing")
    samples = scan_class_folders(split_dir, tuple(classifier.class_names))
    decoded = load_cached([s.path for s in samples], classifier.image_size, cache_dir, progress=progress)
    for line in decoded.errors:
        logger.warning("skipped %s", line)
    keep = np.flatnonzero(decoded.ok)
    labels = np.array([samples[i].label for i in keep], dtype=int)
    return split_dir, samples, decoded, keep, labels


def _answers(
    classifier: Classifier, samples: list[Sample], keep: np.ndarray, decoded: DecodedImages, pixels: np.ndarray,
    assessment: Assessment,
) -> list[Prediction]:
    """What ``predict`` would have told the user about each kept image: its pixels as read, its
    colour share, and the network's assessment, through ``Classifier.answers``."""
    slices = [Slice(str(samples[i].path), pixels[k], str(samples[i].path), colour_share=float(decoded.colour[i]))
              for k, i in enumerate(keep)]
    return classifier.answers(slices, assessment)


def answer_summary(predictions: list[Prediction], labels: np.ndarray) -> Answers:
    """What the users were told about each scan (``Classifier.answers``, read by ``flags_of``: the
    same code path as ``predict``), and how many wrong answers came with no warning at all:
    classified (not refused as not brain MRI), confident (not flagged uncertain) and inside the
    validated range (neither in the guard's distance band nor outside what the training data
    covers), yet wrong. ``silent_wrong_ignoring_range`` counts the wrong answers that were neither
    refused nor flagged uncertain, whatever the outside-the-validated-range flag said;
    ``flagged_outside_coverage`` the answers flagged for the coverage reason."""
    n = len(labels)
    flags = [flags_of(p) for p in predictions]
    refused, uncertain, outside = (np.array([name in f for f in flags], dtype=bool).reshape(n)
                                   for name in ("refused", "uncertain", "outside_validated_range"))
    by_coverage = outside & np.array([_for_coverage(p) for p in predictions], dtype=bool).reshape(n)
    answered = ~refused & ~uncertain
    wrong = _wrong(predictions, labels)

    def share(mask: np.ndarray) -> Share:
        return Share(int(mask.sum()), float(mask.mean()) if n else 0.0)

    unflagged = answered & ~outside
    return Answers(
        n_images=n,
        refused_not_brain_mri=share(refused),
        flagged_uncertain=share(uncertain),
        flagged_outside_validated_range=share(outside),
        flagged_outside_coverage=share(by_coverage),
        silent_wrong=share(wrong & unflagged),
        silent_wrong_ignoring_range=share(wrong & answered),
        accuracy_of_unflagged=float((~wrong[unflagged]).mean()) if unflagged.any() else None,
    )


def _for_coverage(prediction: Prediction) -> bool:
    """Flagged outside the validated range because the training data has no counterpart of the
    slice's kind for its answer (``slice_kind.coverage_reason``'s words)."""
    return COVERAGE_WORDS in (prediction.outside_validated_range_reason or "")


def _wrong(predictions: list[Prediction], labels: np.ndarray) -> np.ndarray:
    """Whether the network's top class (refused scans included) is not the label."""
    top = [int(np.argmax(list(p.probabilities.values()))) for p in predictions]  # in class order
    return np.array(top, dtype=int).reshape(len(labels)) != labels


def uncertainty_summary(probabilities: np.ndarray, labels: np.ndarray, threshold: float) -> Uncertainty:
    """How many scans the refer-to-a-radiologist flag catches, and the accuracy on the rest."""
    confident = probabilities.max(axis=1) >= threshold
    correct = probabilities.argmax(axis=1) == labels
    return Uncertainty(
        threshold=threshold,
        n_flagged=int((~confident).sum()),
        coverage=float(confident.mean()) if len(labels) else 0.0,
        accuracy_unflagged=float(correct[confident].mean()) if confident.any() else None,
        errors_flagged=int((~correct & ~confident).sum()),
        errors_unflagged=int((~correct & confident).sum()),
    )


def write_outputs(
    out_dir: Path,
    report: EvaluationReport,
    paths: list[Path],
    labels: np.ndarray,
    probabilities: np.ndarray,
    class_names: list[str],
) -> None:
    """report.json, predictions.csv, confusion_matrix.png, per_class.png and reliability.png."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report.to_dict(), indent=2))
    with open(out_dir / "predictions.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "true", "predicted", "confidence", *class_names])
        for path, label, row in zip(paths, labels, probabilities, strict=True):
            predicted = class_names[int(row.argmax())]
            writer.writerow([path, class_names[label], predicted, f"{row.max():.6f}", *(f"{p:.6f}" for p in row)])
    m = report.metrics
    title = f"{report.source.split} split: accuracy {m.accuracy:.4f} (n={m.n_images})"
    plot_confusion_matrix(m.confusion_matrix, m.labels, out_dir / "confusion_matrix.png", title)
    plot_per_class(m.per_class, out_dir / "per_class.png")
    plot_reliability(probabilities.max(axis=1), probabilities.argmax(axis=1) == labels, out_dir / "reliability.png")


def evaluate_shifts(
    data: str | Path,
    classifier: Classifier,
    shifts: str | list[str] = "all",
    seed: int = 0,
    batch_size: int = 64,
    out_dir: Path | None = None,
    progress: bool = True,
    cache_dir: Path | None = None,
) -> ShiftReport:
    """Accuracy of the classifier on the same images as ``evaluate``, unshifted and under each shift.

    Every shift (``shifts.SHIFTS``) changes how the scans look, never their labels, so each entry
    measures robustness: accuracy, weighted and macro F1, per-class recall, the flip rate (share of
    images whose predicted class differs from the unshifted prediction, right or wrong) and, with an
    out-of-distribution guard, the share refused as not brain MRI. With ``out_dir``, also writes
    shifts.json, shifts.png (accuracy per shift against the unshifted line) and shift_examples.png
    (one scan under every shift).

    Raises:
        ConfigError: an unknown shift name.
        DataError: as ``evaluate``.
    """
    from tqdm import tqdm

    from .shifts import SHIFTS, resolve_shifts

    names = resolve_shifts(shifts)
    data = Path(data)
    split_dir, samples, decoded, keep, labels = _load_labelled(data, classifier, cache_dir, progress)
    pixels = np.asarray(decoded.pixels)[keep]

    def entry(
        images: np.ndarray, reference: np.ndarray | None, shift: dict[str, Any] | None = None
    ) -> tuple[ShiftEntry, np.ndarray]:
        """The entry of ``images`` and their predicted classes."""
        assessment = classifier.assess(images, batch_size=batch_size, progress=progress and reference is None)
        answers = _answers(classifier, samples, keep, decoded, images, assessment)
        return (_shift_entry(labels, assessment, reference, classifier, answers, shift),
                assessment.probabilities.argmax(axis=1))

    baseline, reference = entry(pixels, None)
    examples = _example(pixels, labels, classifier.class_names)
    results: dict[str, ShiftEntry] = {}
    for name in tqdm(names, desc="shifts", unit="shift", disable=not progress, leave=False):
        shift = SHIFTS[name]
        started = time.perf_counter()
        shifted = shift(pixels, labels, seed)
        applied = {"description": shift.description, "params": shift.params, "random": shift.random,
                   "transform_seconds": round(time.perf_counter() - started, 3)}
        results[name] = entry(shifted, reference, applied)[0]
        logger.info("shift %s: accuracy %.4f (unshifted %.4f), flip rate %.4f",
                    name, results[name].metrics.accuracy, baseline.metrics.accuracy, results[name].flipped.rate)
        if examples:
            examples[name] = shifted[_middle(pixels)]
    report = ShiftReport(_source(split_dir, data, classifier, decoded.errors), seed, baseline, results)
    if out_dir is not None:
        _write_shift_outputs(out_dir, report, examples)
    return report


def _middle(pixels: np.ndarray) -> int:
    """The image with the median share of head pixels: a typical slice to show every shift on."""
    head_share = (pixels > 20).mean(axis=(1, 2))
    return int(np.argsort(head_share, kind="stable")[len(head_share) // 2])


def _example(pixels: np.ndarray, labels: np.ndarray, class_names: list[str]) -> dict[str, np.ndarray]:
    if not len(pixels):
        return {}
    k = _middle(pixels)
    return {f"unshifted ({class_names[labels[k]]})": pixels[k]}


def _write_shift_outputs(out_dir: Path, report: ShiftReport, examples: dict[str, np.ndarray]) -> None:
    """shifts.json, shifts.png and shift_examples.png."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "shifts.json").write_text(json.dumps(report.to_dict(), indent=2))
    n, seed = report.baseline.metrics.n_images, report.seed
    title = f"Accuracy under appearance shifts: {n} images ({report.source.split}), seed {seed}"
    bars = {name: (e.metrics.accuracy, e.flipped.rate) for name, e in report.shifts.items()}
    plot_shifts(report.baseline.metrics.accuracy, bars, out_dir / "shifts.png", title)
    if examples:
        plot_shift_examples(examples, out_dir / "shift_examples.png", f"seed {seed}; labels never change")


def _weights_name(classifier: Classifier) -> str:
    return "shipped model" if classifier.weights_path == default_weights_path() else str(classifier.weights_path)


def _shift_entry(
    labels: np.ndarray, assessment: Assessment, reference: np.ndarray | None, classifier: Classifier,
    answers: list[Prediction], shift: dict[str, Any] | None = None,
) -> ShiftEntry:
    """The figures of one shift: accuracy, F1, per-class recall, flips against ``reference`` (the
    unshifted classes; None: this is the unshifted entry), and what the users were told."""
    predicted = assessment.probabilities.argmax(axis=1)
    flipped = np.zeros(len(labels), dtype=bool) if reference is None else predicted != reference
    return ShiftEntry(
        metrics=classification_report(labels, assessment.probabilities, classifier.class_names, bootstrap=0),
        flipped=Share(int(flipped.sum()), float(flipped.mean()) if len(flipped) else 0.0),
        answers=answer_summary(answers, labels),
        guarded=classifier.guard is not None,
        shift=shift,
    )
