"""Fit a model's sequence and plane estimator, measure it, and count what its training data covers.

Run: python scripts/fit_slice_kind.py --data DATA/brain-tumor-mri --extra DATA/extra-source
     --pmram DATA/pmram-external [--weights FILE] [--run RUN] [--out docs/slice_kind] [--keep-weights]

Labelled slices (braintumor.models.slice_kind):
- the extra source's manifest: every slice's sequence (FLAIR, plain T1, contrast T1) and plane,
  by subject (TCGA-LGG gliomas, IXI healthy brains);
- docs/slice_kind/labels_by_eye.csv: Kaggle Training and PMRAM slices read by eye from the contact
  sheets in docs/slice_kind/sheets (scripts/sample_sheets.py), T2 included, which no manifest has.
Measured by 5-fold cross-validation with each subject (extra source) or image (by eye) in one fold:
accuracy per true sequence and per true plane, on each kind of label. Then fitted on all of them,
stored in the weights (``slice_kind.*`` tensors), and applied to the model's training images to
count training slices per (class, sequence, plane): the coverage table stored in the weights'
metadata, which the ``outside_validated_range`` flag reads. Last, how often the flag fires on
Testing and PMRAM, and on how many of the wrong answers. Writes OUT/slice_kind.json and
OUT/slice_kind_confusion.png; rewrites the weights unless --keep-weights.
"""

from __future__ import annotations

import argparse
import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
from shipped_data import classifier_for, decoded_split, training_set, weights_argument  # scripts/ is on the path

from braintumor.data.cache import load_cached
from braintumor.models.checkpoint import load_weights, save_weights
from braintumor.models.slice_kind import (
    PLANES,
    SEQUENCES,
    TENSOR_PREFIX,
    Coverage,
    fit_estimator,
)

LABELS = Path("docs/slice_kind/labels_by_eye.csv")
EXTRA_SEQUENCES = {"t1pre": "t1", "t1": "t1", "t1c": "t1c", "flair": "flair"}
FOLDS = 5


def labelled_slices(extra: Path, data: Path, pmram: Path) -> list[dict]:
    """Every labelled slice: path, sequence, plane, group (subject or image) and kind of label."""
    rows = []
    with open(extra / "manifest.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            rows.append({"path": extra / row["path"], "sequence": EXTRA_SEQUENCES[row["sequence"]],
                         "plane": row["plane"], "group": f"extra/{row['subject']}", "label": "manifest"})
    roots = {"kaggle-training": data / "Training", "pmram-external": pmram}
    with open(LABELS, newline="") as handle:
        for row in csv.DictReader(handle):
            if row["repeat"] == "1":
                continue
            how = "eye" + ("" if row["sure"] == "1" else " (unsure)")
            rows.append({"path": roots[row["source"]] / row["path"], "sequence": row["sequence"], "plane": row["plane"],
                         "group": f"{row['source']}/{row['path']}", "label": how})
    return rows


def features_of(classifier, paths: list[Path]) -> np.ndarray:
    decoded = load_cached(paths, classifier.image_size, None, progress=True)
    assert decoded.ok.all(), decoded.errors
    return classifier.logits_and_features(np.asarray(decoded.pixels))[1]


def cross_validated(features: np.ndarray, rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-fold predicted sequence and plane of every labelled slice."""
    from sklearn.model_selection import GroupKFold

    groups = np.array([r["group"] for r in rows])
    sequences, planes = np.empty(len(rows), dtype=object), np.empty(len(rows), dtype=object)
    for train, test in GroupKFold(n_splits=FOLDS).split(features, groups=groups):
        truth = [rows[i]["sequence"] for i in train], [rows[i]["plane"] for i in train]
        estimator = fit_estimator(features[train], *truth)
        for i, kind in zip(test, estimator.estimate(features[test]), strict=True):
            sequences[i], planes[i] = kind.sequence, kind.plane
    return sequences, planes


def accuracy_table(rows: list[dict], sequences: np.ndarray, planes: np.ndarray) -> dict:
    """Accuracy per true sequence and per true plane, for each kind of label and all together."""
    table: dict = {}
    for kind in ("manifest", "eye", "eye (unsure)", "all"):
        chosen = [i for i, r in enumerate(rows) if kind == "all" or r["label"] == kind]
        entry = table.setdefault(kind, {"sequence": {}, "plane": {}})
        for axis, predicted, values in (("sequence", sequences, SEQUENCES), ("plane", planes, PLANES)):
            for value in values:
                members = [i for i in chosen if rows[i][axis] == value]
                if members:
                    right = sum(predicted[i] == value for i in members)
                    entry[axis][value] = {"n": len(members), "accuracy": round(right / len(members), 4)}
    return table


def confusion(rows: list[dict], predicted: np.ndarray, axis: str, values: tuple[str, ...]) -> list[list[int]]:
    counts = Counter((r[axis], p) for r, p in zip(rows, predicted, strict=True))
    return [[counts[(truth, guess)] for guess in values] for truth in values]


def plot_confusions(matrices: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    for axis, (name, values) in zip(axes, (("sequence", SEQUENCES), ("plane", PLANES)), strict=True):
        matrix = np.array(matrices[name])
        axis.imshow(matrix / np.maximum(matrix.sum(1, keepdims=True), 1), cmap="Blues", vmin=0, vmax=1)
        for (r, c), n in np.ndenumerate(matrix):
            axis.text(c, r, str(n), ha="center", va="center", fontsize=9)
        axis.set(xticks=range(len(values)), yticks=range(len(values)), xticklabels=values, yticklabels=values,
                 xlabel="estimated", ylabel="labelled", title=f"{name}, out of fold ({FOLDS}-fold by subject)")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


def flag_rates(classifier, pixels: np.ndarray, labels: np.ndarray) -> dict:
    """How often the outside-the-validated-range flag fires, for which reason, and on the wrong answers."""
    from braintumor.data.inputs import Slice
    from braintumor.evaluation.evaluate import answer_summary

    assessment = classifier.assess(pixels)
    slices = [Slice(f"<image {k}>", p, f"<image {k}>") for k, p in enumerate(pixels)]
    summary = answer_summary(classifier.answers(slices, assessment), labels).to_dict()
    wrong = (assessment.probabilities.argmax(1) != labels)
    if assessment.rejected is not None:
        wrong &= ~assessment.rejected
    flagged = assessment.outside_validated_range()
    return {
        **{k: summary[k] for k in ("n_images", "refused_not_brain_mri", "flagged_uncertain",
                                   "flagged_outside_validated_range", "flagged_outside_coverage", "silent_wrong")},
        "wrong_answers": int(wrong.sum()), "wrong_answers_flagged_outside": int((wrong & flagged).sum()),
        "estimated_sequences": dict(Counter(k.sequence for k in assessment.kinds)),
        "estimated_planes": dict(Counter(k.plane for k in assessment.kinds)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="Kaggle root (Training/, Testing/)")
    parser.add_argument("--extra", type=Path, required=True, help="the extra source (its manifest.csv labels slices)")
    parser.add_argument("--pmram", type=Path, required=True, help="PMRAM class folders (labelled by eye, and measured)")
    parser.add_argument("--out", type=Path, default=Path("docs/slice_kind"))
    parser.add_argument("--keep-weights", action="store_true", help="measure only; do not rewrite the weights")
    weights_argument(parser)
    args = parser.parse_args()
    classifier, path = classifier_for(args.weights)
    rows = labelled_slices(args.extra, args.data, args.pmram)
    features = features_of(classifier, [r["path"] for r in rows])
    sequences, planes = cross_validated(features, rows)
    report = {
        "weights": path.name, "labelled": dict(Counter(r["label"] for r in rows)), "folds": FOLDS,
        "cross_validated": accuracy_table(rows, sequences, planes),
        "confusion": {"sequence": confusion(rows, sequences, "sequence", SEQUENCES),
                      "plane": confusion(rows, planes, "plane", PLANES)},
    }
    estimator = fit_estimator(features, [r["sequence"] for r in rows], [r["plane"] for r in rows])
    samples, pixels, labels, is_val = training_set(args.data, args.run)
    train_features = classifier.logits_and_features(pixels[~is_val])[1]
    names = classifier.class_names
    coverage = Coverage.count(estimator.estimate(train_features), [names[int(y)] for y in labels[~is_val]], names)
    report["coverage"] = coverage.to_metadata()
    print("\n".join(coverage.lines()))
    if not args.keep_weights:
        tensors, metadata = load_weights(path)
        tensors = {k: v for k, v in tensors.items() if not k.startswith(TENSOR_PREFIX)} | estimator.to_tensors()
        metadata["coverage"] = coverage.to_metadata()
        metadata["slice_kind"] = {"labelled": report["labelled"], "cross_validated": report["cross_validated"]}
        save_weights(tensors, path, metadata)
        classifier, _ = classifier_for(path)
    report["flags"] = {}
    for name, split in (("testing", "Testing"), ("pmram", None)):
        samples, pixels = decoded_split(args.data if split else args.pmram, split)
        truth = np.array([s.label for s in samples])
        report["flags"][name] = flag_rates(classifier, pixels, truth)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "slice_kind.json").write_text(json.dumps(report, indent=2))
    plot_confusions(report["confusion"], args.out / "slice_kind_confusion.png")
    print(json.dumps({k: report[k] for k in ("cross_validated", "flags")}, indent=1))


if __name__ == "__main__":
    main()
