"""Copy a run's best weights into the package, adding the evaluation they were measured with.

Run: python scripts/ship_weights.py --run runs/shipped [--file epoch_09.safetensors] --report docs/evaluation/testing/report.json
Without --run, only the test metrics of the packaged weights are replaced (after calibration).
``--file`` ships another weights file of the run than best.safetensors (a checkpoint chosen on
the external set and the shift suite rather than on validation accuracy alone).

The metadata already holds class order, input size, normalisation, init, recipe, the training
data fingerprint and validation metrics (written by ``braintumor train``); this adds the test
metrics and the command that produced them, so `GET /v1/model` and the model card can quote them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from braintumor.inference.predict import default_weights_path
from braintumor.models.checkpoint import load_weights, save_weights

REPORT_KEYS = ("accuracy", "accuracy_ci95", "weighted_f1", "weighted_f1_ci95", "macro_f1", "macro_roc_auc", "ece", "n_images", "n_errors")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="run folder holding best.safetensors (default: update the packaged file)")
    parser.add_argument("--file", default="best.safetensors", help="which weights file of the run to ship")
    parser.add_argument("--report", type=Path, required=True, help="report.json of braintumor evaluate")
    parser.add_argument("--command", default="braintumor evaluate --data DATA_ROOT --out docs/evaluation/testing")
    args = parser.parse_args()
    target = default_weights_path()
    state, metadata = load_weights(args.run / args.file if args.run else target)
    report = json.loads(args.report.read_text())
    metadata["test_metrics"] = {key: report[key] for key in REPORT_KEYS if key in report}
    metadata["test_metrics"]["split"] = "official Kaggle Testing split (1,311 images; includes duplicates of Training images)"
    metadata["test_metrics"]["command"] = args.command
    if "leak_free" in report:
        clean = report["leak_free"]
        metadata["test_metrics"]["leak_free"] = {k: clean[k] for k in ("accuracy", "accuracy_ci95", "weighted_f1", "n_images", "n_errors") if k in clean}
    save_weights(state, target, metadata)
    print(f"wrote {target} ({target.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
