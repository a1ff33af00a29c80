"""What an evaluation reports, as typed objects: ``EvaluationReport`` (``evaluate.evaluate``) and
``ShiftReport`` (``evaluate.evaluate_shifts``), with what the users were told (``Answers``) and
the refer-to-a-radiologist flag's catch (``Uncertainty``). ``to_dict`` makes the JSON of
report.json and shifts.json at the edge; ``lines`` the text the command line prints.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .metrics import Metrics

SILENT_WRONG = ("silent_wrong: wrong, not refused, not flagged uncertain, not flagged outside the validated range "
                "(the flags predict shows)")


@dataclass(frozen=True)
class Share:
    """How many of the images, and their share."""

    n: int
    rate: float


@dataclass(frozen=True)
class Answers:
    """What the users were told about the images (``evaluate.answer_summary``): refused, flagged
    uncertain, flagged outside the validated range (and for the coverage reason), and the wrong
    answers that came with no flag (``silent_wrong``; ``silent_wrong_ignoring_range``: neither
    refused nor uncertain, whatever the range flag said)."""

    n_images: int
    refused_not_brain_mri: Share
    flagged_uncertain: Share
    flagged_outside_validated_range: Share
    flagged_outside_coverage: Share
    silent_wrong: Share
    silent_wrong_ignoring_range: Share
    accuracy_of_unflagged: float | None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "definition": SILENT_WRONG}


@dataclass(frozen=True)
class Uncertainty:
    """How many images the refer-to-a-radiologist flag catches, and the accuracy on the rest."""

    threshold: float
    n_flagged: int
    coverage: float
    accuracy_unflagged: float | None
    errors_flagged: int
    errors_unflagged: int


@dataclass(frozen=True)
class Subset:
    """The figures on a subset of the images (the leak-free Testing images), with its definition."""

    metrics: Metrics
    definition: str
    uncertainty: Uncertainty | None = None

    def to_dict(self) -> dict[str, Any]:
        found = {**self.metrics.to_dict(), "definition": self.definition}
        return found if self.uncertainty is None else {**found, "uncertainty": asdict(self.uncertainty)}


@dataclass(frozen=True)
class Source:
    """Which images were evaluated, with which model, and which could not be read."""

    data: str
    split: str  # Testing on a Kaggle layout, else all
    weights: str
    tta: bool
    skipped: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"data": self.data, "split": self.split, "weights": self.weights, "tta": self.tta,
                "n_skipped": len(self.skipped), "skipped": list(self.skipped)}


@dataclass(frozen=True)
class EvaluationReport:
    """Every published figure for a labelled folder (``evaluate.evaluate``)."""

    metrics: Metrics
    answers: Answers
    source: Source
    uncertainty: Uncertainty | None = None
    leak_free: Subset | None = None
    guarded: bool = True  # the model has an out-of-distribution guard, so refusals are counted

    def to_dict(self) -> dict[str, Any]:
        """The JSON of report.json and ``evaluate --json``."""
        found = {**self.metrics.to_dict(), "answers": self.answers.to_dict()}
        if self.guarded:
            found["rejected_as_not_brain_mri"] = asdict(self.answers.refused_not_brain_mri)
        if self.uncertainty is not None:
            found["uncertainty"] = asdict(self.uncertainty)
        if self.leak_free is not None:
            found["leak_free"] = self.leak_free.to_dict()
        return {**found, **self.source.to_dict()}

    def lines(self) -> list[str]:
        """The report as lines for a terminal."""
        m, source = self.metrics, self.source
        lines = [
            f"{source.data} ({source.split}): {m.n_images} images, {len(source.skipped)} skipped",
            f"accuracy     {m.accuracy:.4f}{_interval(m.accuracy_ci95)}  ({m.n_errors} errors)",
            f"weighted F1  {m.weighted_f1:.4f}{_interval(m.weighted_f1_ci95)}",
            f"macro F1     {m.macro_f1:.4f}   macro ROC-AUC {m.macro_roc_auc or float('nan'):.4f}   ECE {m.ece:.4f}",
            *_class_lines(m),
        ]
        if self.guarded:
            refused = self.answers.refused_not_brain_mri
            lines.append(f"rejected as not a brain MRI: {refused.n} real scans ({refused.rate:.2%}); "
                         "the figures above still score their tumour class")
        if self.uncertainty is not None:
            flag = self.uncertainty
            unflagged = "-" if flag.accuracy_unflagged is None else f"{flag.accuracy_unflagged:.4f}"
            lines.append(f"flagged uncertain (confidence < {flag.threshold:.3f}): {flag.n_flagged} scans holding "
                         f"{flag.errors_flagged} of the errors; accuracy on the other {flag.coverage:.1%}: {unflagged}")
        silent = self.answers.silent_wrong
        lines.append(f"outside the validated range (classified, flagged): "
                     f"{self.answers.flagged_outside_validated_range.n}; "
                     f"silent wrong answers (wrong, with no flag): {silent.n} ({silent.rate:.2%})")
        if self.leak_free is not None:
            clean = self.leak_free.metrics
            lines.append(f"leak-free subset ({clean.n_images} Testing images with no near duplicate in Training): "
                         f"accuracy {clean.accuracy:.4f}{_interval(clean.accuracy_ci95)}  "
                         f"weighted F1 {clean.weighted_f1:.4f}  ({clean.n_errors} errors)")
        return lines


@dataclass(frozen=True)
class ShiftEntry:
    """The figures under one shift (or unshifted): ``metrics``, the share of images whose class
    changed from the unshifted prediction (``flipped``), and what the users were told."""

    metrics: Metrics
    flipped: Share
    answers: Answers
    guarded: bool = True
    shift: dict[str, Any] | None = None  # description, params, random, transform_seconds (None: unshifted)

    def to_dict(self, change: float | None = None) -> dict[str, Any]:
        """The entry's JSON; ``change``: its accuracy less the unshifted one (shifted entries)."""
        m = self.metrics
        found = {
            "accuracy": m.accuracy, "weighted_f1": m.weighted_f1, "macro_f1": m.macro_f1, "n_errors": m.n_errors,
            "per_class_recall": {name: row.recall for name, row in m.per_class.items()},
            "flip_rate": self.flipped.rate, "n_flipped": self.flipped.n,
            "rejected_as_not_brain_mri": asdict(self.answers.refused_not_brain_mri) if self.guarded else None,
            "answers": self.answers.to_dict(), "ece": m.ece, "labels": m.labels, "confusion_matrix": m.confusion_matrix,
        }
        return found if change is None else {**found, "accuracy_change": change, **(self.shift or {})}


@dataclass(frozen=True)
class ShiftReport:
    """The same images unshifted and under each appearance shift (``evaluate.evaluate_shifts``)."""

    source: Source
    seed: int
    baseline: ShiftEntry
    shifts: dict[str, ShiftEntry]

    def to_dict(self) -> dict[str, Any]:
        """The JSON of shifts.json and ``evaluate --shift --json``."""
        source = self.source.to_dict()
        return {
            "data": source["data"], "split": source["split"], "weights": source["weights"], "tta": source["tta"],
            "seed": self.seed, "n_images": self.baseline.metrics.n_images, "n_skipped": source["n_skipped"],
            "skipped": source["skipped"],
            "flip_rate_definition": "share of images whose predicted class differs from the unshifted prediction",
            "baseline": self.baseline.to_dict(),
            "shifts": {name: e.to_dict(e.metrics.accuracy - self.baseline.metrics.accuracy)
                       for name, e in self.shifts.items()},
        }

    def lines(self) -> list[str]:
        """One row per shift: accuracy (and its change), weighted F1, flips, refused, outside, silent."""
        lines = [
            f"{self.source.data} ({self.source.split}): {self.baseline.metrics.n_images} images, "
            f"{len(self.source.skipped)} skipped, seed {self.seed}",
            f"{'shift':<16}{'accuracy':>9}{'change':>8}{'wF1':>8}{'flips':>8}{'rejected':>10}{'outside':>9}{'silent':>8}",
        ]
        for name, entry in [("unshifted", self.baseline), *self.shifts.items()]:
            m, answers = entry.metrics, entry.answers
            change = m.accuracy - self.baseline.metrics.accuracy
            rejected = format(answers.refused_not_brain_mri.rate, ".2%") if entry.guarded else "-"
            lines.append(f"{name:<16}{m.accuracy:>9.4f}{change:>+8.4f}{m.weighted_f1:>8.4f}{entry.flipped.rate:>8.2%}"
                         f"{rejected:>10}{answers.flagged_outside_validated_range.rate:>9.2%}"
                         f"{answers.silent_wrong.rate:>8.2%}")
        lines.append("flips: share of images whose predicted class differs from the unshifted prediction; outside: "
                     "flagged outside the validated range; silent: wrong with no flag (not refused, not uncertain, "
                     "not outside)")
        return lines


def _interval(interval: tuple[float, float] | None) -> str:
    """'  95% CI [low, high]' when bootstrap intervals were computed, else nothing."""
    return "" if interval is None else f"  95% CI [{interval[0]:.4f}, {interval[1]:.4f}]"


def _class_lines(m: Metrics) -> list[str]:
    lines = [f"{'class':<12}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>9}"]
    lines += [f"{name:<12}{row.precision:>10.4f}{row.recall:>10.4f}{row.f1:>10.4f}{row.support:>9}"
              for name, row in m.per_class.items()]
    lines.append("confusion matrix (rows true, columns predicted): " + ", ".join(m.labels))
    lines += [f"  {name:<12}" + "".join(f"{v:>6}" for v in row)
              for name, row in zip(m.labels, m.confusion_matrix, strict=True)]
    return lines
