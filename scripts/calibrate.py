"""Fit a model's temperature and uncertainty threshold on its validation split and the shift suite.

Run: python scripts/calibrate.py --data DATA_ROOT [--external PMRAM_ROOT] [--weights FILE] [--run RUN]
         [--target-accuracy 0.99]

Uses the validation images the model was selected on (docs/training/split.json: leak-free, never
trained on) twice: as they are, and under every shift of the shift suite (braintumor.evaluation.shifts: the
same scans made to look as if another scanner or hospital had produced them). Temperature scaling
is fitted on both together, so that a confidence means about the same on unfamiliar-looking scans
as on familiar ones; the confidence threshold below which predictions are flagged ``uncertain``
is the lowest one whose kept predictions, on both together, reach ``--target-accuracy``. Writes
both into the weights' metadata (default: the packaged weights), a coverage-versus-accuracy PNG and
a JSON summary under docs/calibration/, and reports, without fitting on them, the same figures on
the external set (other hospitals), the official Testing split and its leak-free subset.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from shipped_data import (  # noqa: E402  (scripts/ is on the path)
    classifier_for,
    decoded_split,
    labels_of,
    network_outputs,
    shifted_suite,
    training_set,
    weights_argument,
)

from braintumor.evaluation.calibration import choose_threshold, coverage_curve, fit_temperature  # noqa: E402
from braintumor.evaluation.metrics import expected_calibration_error  # noqa: E402
from braintumor.models.checkpoint import load_weights, save_weights  # noqa: E402

OUT = Path("docs/calibration")


def kept_accuracy(probabilities: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float]:
    keep = probabilities.max(1) >= threshold
    accuracy = float((probabilities.argmax(1)[keep] == labels[keep]).mean()) if keep.any() else float("nan")
    wrong_kept = float(((probabilities.argmax(1) != labels) & keep).mean())
    return {"coverage": float(keep.mean()), "kept_accuracy": accuracy, "wrong_and_confident": wrong_kept}


def measured(logits: np.ndarray, labels: np.ndarray, temperature: float, threshold: float) -> dict[str, float]:
    """ECE before and after scaling, and coverage/accuracy at the threshold, on one set."""
    raw, scaled = (torch.softmax(torch.as_tensor(logits) / t, 1).numpy() for t in (1.0, temperature))
    return {"n": int(len(labels)), "accuracy": float((scaled.argmax(1) == labels).mean()),
            "ece_before": expected_calibration_error(labels, raw), "ece_after": expected_calibration_error(labels, scaled),
            **kept_accuracy(scaled, labels, threshold)}


def plot(sets: dict[str, tuple[np.ndarray, np.ndarray]], temperature: float, threshold: float, coverage: float) -> None:
    fig, ax = plt.subplots(figsize=(5.8, 4.4))
    for name, (logits, labels) in sets.items():
        probabilities = torch.softmax(torch.as_tensor(logits) / temperature, 1).numpy()
        curve = coverage_curve(probabilities.max(1), probabilities.argmax(1) == labels)
        ax.plot(curve["coverage"], curve["accuracy"], label=name)
    ax.axvline(coverage, color="grey", linestyle="--", label=f"threshold {threshold:.3f} (fitted set)")
    ax.set(xlabel="coverage (share of scans not flagged)", ylabel="accuracy of the scans kept", title="Coverage versus accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT / "coverage_accuracy.png", dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--external", type=Path, default=None, help="a class-folder set from elsewhere, measured only")
    parser.add_argument("--target-accuracy", type=float, default=0.99)
    weights_argument(parser)
    args = parser.parse_args()
    classifier, weights = classifier_for(args.weights)
    _, training_pixels, training_labels, is_val = training_set(args.data, args.run)
    val_pixels, val_labels = training_pixels[is_val], training_labels[is_val]
    shifted_pixels, shifted_labels = shifted_suite(val_pixels, val_labels)
    val_logits, shifted_logits = network_outputs(classifier, val_pixels)[0], network_outputs(classifier, shifted_pixels)[0]
    fit_logits, fit_labels = np.concatenate([val_logits, shifted_logits]), np.concatenate([val_labels, shifted_labels])
    temperature = fit_temperature(fit_logits, fit_labels)
    fitted = torch.softmax(torch.as_tensor(fit_logits) / temperature, 1).numpy()
    threshold = choose_threshold(fitted.max(1), fitted.argmax(1) == fit_labels, args.target_accuracy)

    sets = {"validation": (val_logits, val_labels), "validation, shift suite": (shifted_logits, shifted_labels)}
    if args.external is not None:
        external, external_pixels = decoded_split(args.external, None)
        sets["external (not fitted on)"] = (network_outputs(classifier, external_pixels)[0], labels_of(external))
    testing, testing_pixels = decoded_split(args.data, "Testing")
    test_logits, test_labels = network_outputs(classifier, testing_pixels)[0], labels_of(testing)
    sets["official Testing (not fitted on)"] = (test_logits, test_labels)
    leak_free = set(Path("docs/audit/leak_free_testing.txt").read_text().split())
    clean = np.array([str(s.path.relative_to(args.data)) in leak_free for s in testing])
    sets["leak-free Testing (not fitted on)"] = (test_logits[clean], test_labels[clean])
    summary = {
        "weights": str(args.weights) if args.weights else "packaged weights",
        "temperature": temperature,
        "fitted_on": ("validation split" + (f" of every source of {args.run.name}" if args.run else " (docs/training/split.json)")
                      + " plus the same images under every shift of the suite"),
        "target_accuracy": args.target_accuracy,
        "uncertainty_threshold": threshold,
        "sets": {name: measured(logits, labels, temperature, threshold) for name, (logits, labels) in sets.items()},
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "calibration.json").write_text(json.dumps(summary, indent=2))
    plot(sets, temperature, threshold, kept_accuracy(fitted, fit_labels, threshold)["coverage"])
    state, metadata = load_weights(weights)
    metadata.update({"temperature": temperature, "uncertainty_threshold": threshold,
                     "calibration": {"fitted_on": summary["fitted_on"], "target_accuracy": args.target_accuracy}})
    save_weights(state, weights, metadata)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
