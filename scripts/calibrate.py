"""Fit the shipped model's temperature and uncertainty threshold on its validation split.

Run: python scripts/calibrate.py --data DATA_ROOT [--target-accuracy 0.99]

Uses the 571 validation images the shipped model was selected on (docs/training/split.json:
leak-free, never trained on), fits temperature scaling there, and picks the confidence threshold
below which predictions are flagged ``uncertain``: the lowest one whose kept validation
predictions reach ``--target-accuracy``. Writes both into the packaged weights' metadata, a
coverage-versus-accuracy PNG and a JSON summary under docs/calibration/, and reports the same
figures on the official Testing split and its leak-free subset.
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

from braintumor.calibration import choose_threshold, coverage_curve, fit_temperature  # noqa: E402
from braintumor.checkpoint import load_weights, save_weights  # noqa: E402
from braintumor.metrics import expected_calibration_error  # noqa: E402
from braintumor.predict import default_weights_path, load_model  # noqa: E402
from shipped_data import decoded_split, network_outputs, validation_mask  # noqa: E402  (scripts/ is on the path)

OUT = Path("docs/calibration")


def kept_accuracy(probabilities: np.ndarray, labels: np.ndarray, threshold: float) -> tuple[float, float]:
    keep = probabilities.max(1) >= threshold
    accuracy = float((probabilities.argmax(1)[keep] == labels[keep]).mean()) if keep.any() else float("nan")
    return float(keep.mean()), accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--target-accuracy", type=float, default=0.99)
    args = parser.parse_args()
    classifier = load_model()
    training, training_pixels = decoded_split(args.data, "Training")
    is_val = validation_mask(training)
    val_labels = np.array([s.label for s in training])[is_val]
    val_logits = network_outputs(classifier, training_pixels[is_val])[0]
    temperature = fit_temperature(val_logits, val_labels)
    raw, calibrated = (torch.softmax(torch.as_tensor(val_logits) / t, 1).numpy() for t in (1.0, temperature))
    correct = calibrated.argmax(1) == val_labels
    threshold = choose_threshold(calibrated.max(1), correct, args.target_accuracy)

    testing, testing_pixels = decoded_split(args.data, "Testing")
    test_labels = np.array([s.label for s in testing])
    test_probabilities = torch.softmax(torch.as_tensor(network_outputs(classifier, testing_pixels)[0]) / temperature, 1).numpy()
    leak_free = set((Path("docs/audit/leak_free_testing.txt").read_text()).split())
    clean = np.array([str(s.path.relative_to(args.data)) in leak_free for s in testing])
    summary = {
        "temperature": temperature,
        "validation": {"n": int(len(val_labels)), "ece_before": expected_calibration_error(val_labels, raw),
                       "ece_after": expected_calibration_error(val_labels, calibrated)},
        "target_accuracy": args.target_accuracy,
        "uncertainty_threshold": threshold,
        "validation_at_threshold": dict(zip(("coverage", "accuracy"), kept_accuracy(calibrated, val_labels, threshold))),
        "testing_at_threshold": dict(zip(("coverage", "accuracy"), kept_accuracy(test_probabilities, test_labels, threshold))),
        "leak_free_at_threshold": dict(zip(("coverage", "accuracy"), kept_accuracy(test_probabilities[clean], test_labels[clean], threshold))),
        "testing_ece_after": expected_calibration_error(test_labels, test_probabilities),
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "calibration.json").write_text(json.dumps(summary, indent=2))
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for name, probabilities, labels in (("validation (leak-free)", calibrated, val_labels), ("official Testing", test_probabilities, test_labels)):
        curve = coverage_curve(probabilities.max(1), probabilities.argmax(1) == labels)
        ax.plot(curve["coverage"], curve["accuracy"], label=name)
    ax.axvline(summary["validation_at_threshold"]["coverage"], color="grey", linestyle="--", label=f"threshold {threshold:.3f}")
    ax.set(xlabel="coverage (share of scans not flagged)", ylabel="accuracy of the scans kept", title="Coverage versus accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(OUT / "coverage_accuracy.png", dpi=110)
    state, metadata = load_weights(default_weights_path())
    metadata.update({"temperature": temperature, "uncertainty_threshold": threshold,
                     "calibration": {"fitted_on": "validation split (docs/training/split.json)", "target_accuracy": args.target_accuracy}})
    save_weights(state, default_weights_path(), metadata)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
