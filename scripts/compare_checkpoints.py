"""Compare weights files on what a recipe may be chosen on: the validation images of a training
run (per source, and per source and sequence or plane), PMRAM, and PMRAM under the shift suite.
Never Testing.

    python scripts/compare_checkpoints.py --run runs/two_sources --pmram DATA/pmram-external \
        [--shifts] [--weights W1 W2 ...] [--out docs/training/two_sources/checkpoints.json]

Default weights: the shipped model and every ``epoch_NN.safetensors`` of the run. The validation
split is recomputed from the run's ``config.yaml`` (deterministic: the same subjects and images as
in training). Weights without a fitted guard refuse nothing, so the refusal column is only
comparable between weights that carry a guard.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from shipped_data import run_data  # scripts/ is on the path

from braintumor.data.sources import held_out_groups
from braintumor.evaluation.evaluate import evaluate_shifts
from braintumor.inference.predict import default_weights_path, load_model
from braintumor.training.fit import TrainingData


def measure(weights: Path, data: TrainingData, groups: dict[str, np.ndarray], pmram: Path, shifts: bool) -> dict:
    classifier = load_model(weights, backend="torch")
    index = data.val_index
    predicted = classifier.predict_pixels(data.pixels[index].numpy()).argmax(1)
    right = predicted == data.labels[index].numpy()
    row: dict = {"weights": str(weights), "val": {name: float(right[mask].mean()) for name, mask in groups.items()}}
    report = evaluate_shifts(pmram, classifier, "all" if shifts else ["gamma"], progress=False).to_dict()
    row["pmram"] = report["baseline"]["accuracy"]
    refused = report["baseline"]["rejected_as_not_brain_mri"]
    row["pmram_refused"] = None if refused is None else refused["n"]
    row["pmram_recall"] = report["baseline"]["per_class_recall"]
    if shifts:
        accuracies = {name: entry["accuracy"] for name, entry in report["shifts"].items()}
        worst = min(accuracies, key=accuracies.get)
        row["pmram_shifts"] = accuracies
        row["pmram_shift_mean"] = float(np.mean(list(accuracies.values())))
        row["pmram_shift_worst"] = [worst, accuracies[worst]]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="training run folder (its config.yaml)")
    parser.add_argument("--pmram", type=Path, required=True, help="PMRAM class-folder root")
    parser.add_argument("--weights", type=Path, nargs="*", help="weights files (default: shipped + every epoch)")
    parser.add_argument("--shifts", action="store_true", help="also the PMRAM shift suite (about 2 min per file)")
    parser.add_argument("--out", type=Path, help="JSON file for the rows")
    args = parser.parse_args()
    data = run_data(args.run)
    held_out = [data.images[i] for i in data.val_index]
    groups = {name: mask for name, mask in held_out_groups(held_out, ("sequence", "plane")).items()
              if not name.endswith("/unknown")}
    weights = args.weights or [default_weights_path(), *sorted(args.run.glob("epoch_*.safetensors"))]
    rows = []
    for path in weights:
        row = measure(path, data, groups, args.pmram, args.shifts)
        rows.append(row)
        shift = f"  shift mean {row['pmram_shift_mean']:.4f} worst {row['pmram_shift_worst']}" if args.shifts else ""
        val = "  ".join(f"{name} {value:.4f}" for name, value in row["val"].items())
        print(f"{path.name}: {val}  PMRAM {row['pmram']:.4f}{shift}", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
