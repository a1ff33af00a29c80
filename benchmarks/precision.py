"""Past the fp32 ceiling? The numeric paths of the shipped model against its default (fp32 ONNX Runtime):

    python benchmarks/precision.py --data DATA/brain-tumor-mri --pmram DATA/pmram-external [--int8 FILE]

For each path (fp32 ONNX Runtime, int8 ONNX Runtime, fp32 PyTorch, bf16 PyTorch autocast where the
CPU computes bf16 natively): images/s of the classifier on decoded Testing pixels (batch 32, guard
and slice-kind estimate included, file decoding excluded), and on Testing and PMRAM: accuracy, the
share of labels equal to the default's, refusals and outside-the-validated-range flags that
changed, and the expected calibration error. A path may become the default only where it agrees on
at least 99.5% of labels on both sets, changes no refusal, and keeps ECE within 0.5 points; the last
column says whether it does. Without --int8 the int8 file is made here (`braintumor export --int8`,
256 Training slices). Prints the CPU's model and flags. A few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from startup import cpu  # benchmarks/ is the script's own folder

from braintumor.data.datasets import load_split, scan_class_folders
from braintumor.data.imaging import decode_image_and_colour, resize_grey
from braintumor.evaluation.metrics import expected_calibration_error
from braintumor.inference.predict import Assessment, Classifier, default_weights_path, load_model
from braintumor.models.runtime import cpu_supports_bf16

MIN_AGREEMENT, MAX_ECE_CHANGE = 0.995, 0.005


@dataclass
class Labelled:
    pixels: np.ndarray
    labels: np.ndarray


def decoded(paths: list[Path], labels: list[int], size: int = 224) -> Labelled:
    return Labelled(np.stack([resize_grey(decode_image_and_colour(p)[0], size) for p in paths]), np.array(labels))


def assess_timed(classifier: Classifier, data: Labelled) -> tuple[Assessment, float]:
    classifier.assess(data.pixels[:32], batch_size=32)  # warm-up
    started = time.perf_counter()
    assessment = classifier.assess(data.pixels, batch_size=32)
    return assessment, len(data.pixels) / (time.perf_counter() - started)


def compare(reference: Assessment, other: Assessment, labels: np.ndarray) -> dict[str, float]:
    def flags(a: Assessment) -> np.ndarray:
        outside = a.outside_validated_range()
        return np.zeros(len(labels), bool) if outside is None else outside

    return {
        "accuracy": float((other.probabilities.argmax(1) == labels).mean()),
        "agreement": float((other.probabilities.argmax(1) == reference.probabilities.argmax(1)).mean()),
        "refusals_changed": int((other.rejected != reference.rejected).sum()) if reference.rejected is not None else 0,
        "flags_changed": int((flags(other) != flags(reference)).sum()),
        "ece": expected_calibration_error(labels, other.probabilities),
    }


def paths_to_compare(int8: Path) -> dict[str, Classifier | str]:
    """Each path's classifier, or why it is skipped on this machine."""
    return {
        "fp32 ONNX Runtime (default)": load_model(device="cpu", backend="onnx"),
        "int8 ONNX Runtime": load_model(int8),
        "fp32 PyTorch": load_model(device="cpu", backend="torch"),
        "bf16 PyTorch autocast": load_model(device="cpu", backend="torch", amp=True) if cpu_supports_bf16()
        else "skipped: this CPU does not compute bf16 natively",
    }


def report(sets: dict[str, Labelled], int8: Path) -> None:
    print(f"CPU: {cpu()}")
    print("| path | images/s | " + " | ".join(f"{s} accuracy | {s} agreement | {s} refusals changed | "
                                              f"{s} flags changed | {s} ECE" for s in sets) + " | may be default |")
    print("|" + "---|" * (3 + 5 * len(sets)))
    reference: dict[str, Assessment] = {}
    for name, classifier in paths_to_compare(int8).items():
        if isinstance(classifier, str):
            print(f"| {name} | {classifier} |")
            continue
        cells, ok, rate = [], True, 0.0
        for set_name, data in sets.items():
            assessment, set_rate = assess_timed(classifier, data)
            rate = rate or set_rate  # the first set (Testing) gives the speed
            reference.setdefault(set_name, assessment)
            row = compare(reference[set_name], assessment, data.labels)
            ece_change = row["ece"] - compare(reference[set_name], reference[set_name], data.labels)["ece"]
            ok &= (row["agreement"] >= MIN_AGREEMENT and row["refusals_changed"] == 0
                   and abs(ece_change) <= MAX_ECE_CHANGE)
            cells += [f"{row['accuracy']:.4f}", f"{row['agreement']:.4f}", str(row["refusals_changed"]),
                      str(row["flags_changed"]), f"{row['ece']:.4f} ({ece_change:+.4f})"]
        print(f"| {name} | {rate:.1f} | " + " | ".join(cells) + f" | {'yes' if ok else 'no'} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=os.environ.get("BRAINTUMOR_DATA"), help="Kaggle data root.")
    parser.add_argument("--pmram", type=Path, required=True, help="PMRAM root (class folders).")
    parser.add_argument("--int8", type=Path, help="An int8 ONNX file of the shipped model (default: made here).")
    args = parser.parse_args()
    if args.data is None or not Path(args.data).is_dir():
        parser.error("--data (or BRAINTUMOR_DATA) must point at the Kaggle data root")
    testing, pmram = load_split(args.data, "Testing"), scan_class_folders(args.pmram)
    sets = {name: decoded([s.path for s in samples], [s.label for s in samples])
            for name, samples in (("Testing", testing), ("PMRAM", pmram))}
    with tempfile.TemporaryDirectory() as tmp:
        int8 = args.int8
        if int8 is None:
            from braintumor.models.network import load_torch_network
            from braintumor.models.onnx_backend import source_of
            from braintumor.models.quantize import quantize_int8, training_slices

            weights = default_weights_path()
            int8 = quantize_int8(load_torch_network(weights, device="cpu"), training_slices(args.data, 256, 224),
                                 Path(tmp) / "int8.onnx", source_of(weights))
        report(sets, int8)


if __name__ == "__main__":
    main()
