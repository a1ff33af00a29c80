"""Evaluation reports as lines of text for a terminal, beside the module that makes them: the
command line prints these lines and reads no key of a report itself."""

from __future__ import annotations

from typing import Any


def _interval(report: dict[str, Any], key: str) -> str:
    """'  95% CI [low, high]' when the report has bootstrap intervals, else nothing."""
    if key not in report:
        return ""
    low, high = report[key]
    return f"  95% CI [{low:.4f}, {high:.4f}]"


def report_lines(report: dict[str, Any]) -> list[str]:
    """An evaluation report (``evaluate.evaluate``) as lines for a terminal."""
    lines: list[str] = []
    lines.append(f"{report['data']} ({report['split']}): {report['n_images']} images, {report['n_skipped']} skipped")
    lines.append(
        f"accuracy     {report['accuracy']:.4f}{_interval(report, 'accuracy_ci95')}  ({report['n_errors']} errors)"
    )
    lines.append(f"weighted F1  {report['weighted_f1']:.4f}{_interval(report, 'weighted_f1_ci95')}")
    lines.append(
        f"macro F1     {report['macro_f1']:.4f}   "
        f"macro ROC-AUC {report['macro_roc_auc'] or float('nan'):.4f}   ECE {report['ece']:.4f}"
    )
    lines.append(f"{'class':<12}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>9}")
    for name, row in report["per_class"].items():
        lines.append(f"{name:<12}{row['precision']:>10.4f}{row['recall']:>10.4f}{row['f1']:>10.4f}{row['support']:>9}")
    lines.append("confusion matrix (rows true, columns predicted): " + ", ".join(report["labels"]))
    for name, row in zip(report["labels"], report["confusion_matrix"], strict=True):
        lines.append(f"  {name:<12}" + "".join(f"{v:>6}" for v in row))
    if "rejected_as_not_brain_mri" in report:
        lines.append(f"rejected as not a brain MRI: {report['rejected_as_not_brain_mri']['n']} real scans "
                     f"({report['rejected_as_not_brain_mri']['rate']:.2%}); "
                     "the figures above still score their tumour class")
    if "uncertainty" in report:
        flag = report["uncertainty"]
        lines.append(f"flagged uncertain (confidence < {flag['threshold']:.3f}): {flag['n_flagged']} scans holding "
                     f"{flag['errors_flagged']} of the errors; "
                     f"accuracy on the other {flag['coverage']:.1%}: {flag['accuracy_unflagged']:.4f}")
    answers = report.get("answers")
    if answers is not None:
        lines.append("outside the validated range (classified, flagged): "
                     f"{answers['flagged_outside_validated_range']['n']}; "
                     f"silent wrong answers (wrong, with no flag): {answers['silent_wrong']['n']} "
                     f"({answers['silent_wrong']['rate']:.2%})")
    if "leak_free" in report:
        clean = report["leak_free"]
        lines.append(f"leak-free subset ({clean['n_images']} Testing images with no near duplicate in Training): "
                     f"accuracy {clean['accuracy']:.4f}{_interval(clean, 'accuracy_ci95')}  "
                     f"weighted F1 {clean['weighted_f1']:.4f}  "
                     f"({clean['n_errors']} errors)")
    return lines


def shift_report_lines(report: dict[str, Any]) -> list[str]:
    """A shift-suite report (``evaluate.evaluate_shifts``) as lines: one row per shift, with accuracy
    (and its change), weighted F1, flip rate, refused, flagged outside and silent wrong answers."""
    lines: list[str] = []
    lines.append(f"{report['data']} ({report['split']}): {report['n_images']} images, {report['n_skipped']} skipped, "
                 f"seed {report['seed']}")
    lines.append(f"{'shift':<16}{'accuracy':>9}{'change':>8}{'wF1':>8}{'flips':>8}{'rejected':>10}{'outside':>9}{'silent':>8}")
    rows = [("unshifted", report["baseline"])] + list(report["shifts"].items())
    for name, row in rows:
        rejected = row["rejected_as_not_brain_mri"]
        change = row.get("accuracy_change", 0.0)
        answers = row["answers"]
        lines.append(f"{name:<16}{row['accuracy']:>9.4f}{change:>+8.4f}{row['weighted_f1']:>8.4f}{row['flip_rate']:>8.2%}"
                     f"{'-' if rejected is None else format(rejected['rate'], '.2%'):>10}"
                     f"{answers['flagged_outside_validated_range']['rate']:>9.2%}{answers['silent_wrong']['rate']:>8.2%}")
    lines.append("flips: share of images whose predicted class differs from the unshifted prediction; outside: flagged "
                 "outside the validated range; silent: wrong with no flag (not refused, not uncertain, not outside)")
    return lines
