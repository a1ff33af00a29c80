"""Fit a model's out-of-distribution guard (both of its thresholds) and measure it.

Run: python scripts/fit_ood.py --data DATA_ROOT [--external PMRAM_ROOT] [--weights FILE] [--run RUN] [--keep-weights]

Fits the guard (see braintumor.models.ood) on the features of the model's training images (Training minus
the validation split in docs/training/split.json; with --run, the training images of every source of
that run, less its validation split) and sets its two thresholds on real scans only:
- ``range_threshold`` (outside the validated range): the ``--range-percentile`` (99) of the
  validation scans' scores; a slice beyond it is classified but flagged, as the validation
  accuracy does not vouch for it;
- ``threshold`` (not a brain MRI slice: refused): the ``--percentile`` (99.5) of the scores of the
  validation scans and of the same scans under every shift of the shift suite (braintumor.evaluation.shifts),
  whichever is higher, so that a real slice that only looks as if another scanner made it is not
  refused.
It then reports how many real scans each rule refuses and flags (official Testing; the external
set, which nothing was fitted on) and which non-MRI images it catches: photos shipped with
scikit-learn and matplotlib, rendered charts, a logo, blank, noise, gradient and checkerboard
images (the design set), and, as predict applies it (features plus the colour rule,
braintumor.models.ood.COLOUR_LIMIT), every picture scikit-image ships (photos, micrographs, a fundus
photograph, a head phantom, text, faces), which no design decision looked at; and the colour
rule's share on every real file of the data set. Last, medical images that are not brain MRI
slices, from the sample DICOM files pydicom ships (a chest CT, a head CT, a 2 cm crop of a head
MR, an abdominal MR, a nuclear-medicine bone scan, a segmentation mask, a test pattern, an
ultrasound cine loop), classified through `predict` as a user would, header rule included.
Writes docs/ood/ood.json; --keep-weights measures without rewriting the weights' guard.
"""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from shipped_data import (  # noqa: E402  (scripts/ is on the path)
    classifier_for,
    decoded_split,
    network_outputs,
    shifted_suite,
    split_features,
    training_set,
    weights_argument,
)

from braintumor.data.imaging import array_to_grey, colour_share, decode_image_and_colour, resize_grey  # noqa: E402
from braintumor.models.checkpoint import load_weights, save_weights  # noqa: E402
from braintumor.models.ood import COLOUR_LIMIT, colour_rejects, fit_guard  # noqa: E402


def _chart(kind: str) -> np.ndarray:
    fig, ax = plt.subplots(figsize=(4, 4), dpi=56)
    x = np.linspace(0, 10, 50)
    if kind == "line":
        ax.plot(x, np.sin(x))
        ax.plot(x, np.cos(x))
    else:
        ax.bar(range(6), [3, 5, 2, 6, 4, 1])
    ax.set_title(kind)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return np.asarray(Image.open(buffer).convert("RGB"))


def non_mri_images() -> dict[str, np.ndarray]:
    """Inputs that are not brain MRI slices, all available offline."""
    from sklearn.datasets import load_sample_images

    sample_data = Path(matplotlib.get_data_path()) / "sample_data"
    rng = np.random.default_rng(0)
    ramp = np.tile(np.linspace(0, 255, 224), (224, 1)).astype(np.uint8)
    checker = ((np.indices((224, 224)) // 28).sum(0) % 2 * 255).astype(np.uint8)
    images = dict(zip(("photo: china.jpg (scikit-learn)", "photo: flower.jpg (scikit-learn)"), load_sample_images().images))
    images["photo: grace_hopper.jpg (matplotlib)"] = np.asarray(Image.open(sample_data / "grace_hopper.jpg").convert("RGB"))
    images["picture: Minduka_Present_Blue_Pack.png (matplotlib)"] = np.asarray(Image.open(sample_data / "Minduka_Present_Blue_Pack.png").convert("RGB"))
    images["logo: logo2.png (matplotlib)"] = np.asarray(Image.open(sample_data / "logo2.png").convert("RGB"))
    images["chart: line plot"] = _chart("line")
    images["chart: bar chart"] = _chart("bar")
    images["blank: black"] = np.zeros((224, 224), np.uint8)
    images["blank: white"] = np.full((224, 224), 255, np.uint8)
    images["blank: mid grey"] = np.full((224, 224), 128, np.uint8)
    images["noise: uniform"] = (rng.random((224, 224)) * 255).astype(np.uint8)
    images["noise: gaussian"] = np.clip(rng.normal(128, 40, (224, 224)), 0, 255).astype(np.uint8)
    images["pattern: gradient"] = ramp
    images["pattern: checkerboard"] = checker
    return images


def held_out_images() -> dict[str, np.ndarray]:
    """Every picture in scikit-image's data folder (a test dependency), plus three faces from its
    LFW subset: not used to design the guard, so they measure it."""
    import skimage

    folder = Path(skimage.__file__).parent / "data"
    images = {}
    for path in sorted(folder.glob("*.png")) + sorted(folder.glob("*.jpg")):
        with Image.open(path) as image:
            images[f"skimage {path.name}"] = np.asarray(image.convert("RGBA") if image.mode == "P" else image)
    faces = np.load(folder / "lfw_subset.npy")
    for k in (0, 50, 120):
        images[f"skimage lfw_subset face {k}"] = faces[k]
    return images


MEDICAL_DICOMS = (
    "CT_small.dcm", "693_J2KI.dcm", "MR_small.dcm", "examples_overlay.dcm", "JPEG2000.dcm",
    "liver_1frame.dcm", "image_dfl.dcm", "examples_ybr_color.dcm",
)


def medical_dicom_results(classifier) -> dict[str, dict[str, int]]:
    """Per pydicom sample file: frames, frames refused, and refused by the features alone."""
    from pydicom.data import get_testdata_file

    results = {}
    for name in MEDICAL_DICOMS:
        predictions = classifier.predict(get_testdata_file(name))
        reasons = [p.not_brain_mri_reason or "" for p in predictions]
        results[name] = {
            "frames": len(predictions),
            "refused": sum(p.not_brain_mri is True for p in predictions),
            "refused_by_features": sum("out-of-distribution features" in r for r in reasons),
            "refused_by_header": sum("DICOM header" in r for r in reasons),
        }
    return results


def matplotlib_mri() -> np.ndarray:
    """matplotlib's sample MRI slice (256x256, 16-bit): a real brain MRI from outside our data set."""
    raw = gzip.open(Path(matplotlib.get_data_path()) / "sample_data" / "s1045.ima.gz").read()
    return np.frombuffer(raw, np.uint16).reshape(256, 256)


def fit_thresholds(guard, val_scores: np.ndarray, shifted_scores: np.ndarray, args) -> None:
    """Set both thresholds from real scans' scores (see the module docstring)."""
    guard.range_threshold = float(np.percentile(val_scores, args.range_percentile))
    guard.threshold = float(max(np.percentile(val_scores, args.percentile), np.percentile(shifted_scores, args.percentile)))


def real_scan_rates(guard, scores: np.ndarray) -> dict[str, float | int]:
    refused = scores > guard.threshold
    outside = (scores > guard.range_threshold) & ~refused
    return {"n": int(len(scores)), "refused": int(refused.sum()), "refused_rate": float(refused.mean()),
            "outside_range": int(outside.sum()), "outside_range_rate": float(outside.mean())}


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--external", type=Path, default=None, help="a class-folder set from elsewhere, measured only")
    parser.add_argument("--percentile", type=float, default=99.5)
    parser.add_argument("--range-percentile", type=float, default=99.0)
    parser.add_argument("--keep-weights", action="store_true", help="measure only; leave the weights' guard as it is")
    weights_argument(parser)
    args = parser.parse_args()
    classifier, weights = classifier_for(args.weights)

    def features(pixels: np.ndarray) -> np.ndarray:
        return network_outputs(classifier, pixels)[1]

    training, training_pixels, training_labels, is_val = training_set(args.data, args.run)
    all_features = features(training_pixels)
    guard = fit_guard(all_features[~is_val], all_features[is_val], args.percentile)
    shifted_pixels, _ = shifted_suite(training_pixels[is_val], training_labels[is_val])
    val_scores, shifted_scores = guard.score(all_features[is_val]), guard.score(features(shifted_pixels))
    fit_thresholds(guard, val_scores, shifted_scores, args)
    classifier.guard = guard
    testing, _, test_features = split_features(classifier, args.data, "Testing")
    test_rejected = guard.rejects(test_features)
    others = non_mri_images()
    other_pixels = np.stack([resize_grey(array_to_grey(image), 224) for image in others.values()])
    other_distance = guard.score(features(other_pixels))

    def measured(images: dict[str, np.ndarray]) -> dict[str, dict[str, float | bool]]:
        pixels = np.stack([resize_grey(array_to_grey(image), 224) for image in images.values()])
        scores = guard.score(features(pixels))
        shares = np.array([colour_share(image) for image in images.values()])
        by_colour = colour_rejects(shares)
        return {
            name: {"score": float(d), "colour_share": float(c), "rejected_by_features": bool(d > guard.threshold),
                   "rejected": bool(d > guard.threshold or r)}
            for name, d, c, r in zip(images, scores, shares, by_colour)
        }

    held_out = measured(held_out_images())
    real_shares = np.array([decode_image_and_colour(s.path)[1] for s in training + testing])
    mri_distance = float(guard.score(features(resize_grey(array_to_grey(matplotlib_mri()), 224)[None]))[0])
    real_scans = {"validation": real_scan_rates(guard, val_scores), "validation, shift suite": real_scan_rates(guard, shifted_scores),
                  "official Testing": real_scan_rates(guard, guard.score(test_features))}
    if args.external is not None:
        external, external_pixels = decoded_split(args.external, None)
        real_scans["external (not fitted on)"] = real_scan_rates(guard, guard.score(features(external_pixels)))
    summary = {
        "weights": str(args.weights) if args.weights else "packaged weights",
        "threshold": guard.threshold,
        "range_threshold": guard.range_threshold,
        "percentile": args.percentile,
        "range_percentile_of_validation": args.range_percentile,
        "validation_images": int(is_val.sum()),
        "real_scans": real_scans,
        "testing_wrongly_rejected": int(test_rejected.sum()),
        "testing_images": len(testing),
        "testing_rejection_rate": float(test_rejected.mean()),
        "testing_rejected_paths": [str(s.path.relative_to(args.data)) for s, r in zip(testing, test_rejected) if r],
        "non_mri_caught": int((other_distance > guard.threshold).sum()),
        "non_mri_images": len(others),
        "non_mri": {name: {"score": float(d), "rejected": bool(d > guard.threshold)} for name, d in zip(others, other_distance)},
        "matplotlib_mri_slice": {"score": mri_distance, "rejected": mri_distance > guard.threshold},
        "colour_rule": {
            "limit": COLOUR_LIMIT,
            "real_files": len(real_shares),
            "real_files_rejected": int(colour_rejects(real_shares).sum()),
            "real_files_max_share": float(real_shares.max()),
            "design_set_caught": int(colour_rejects([colour_share(image) for image in others.values()]).sum()),
        },
        "held_out_caught_by_features": sum(v["rejected_by_features"] for v in held_out.values()),
        "held_out_caught": sum(v["rejected"] for v in held_out.values()),
        "held_out_images": len(held_out),
        "held_out": held_out,
        "medical_dicoms": medical_dicom_results(classifier),
    }
    if not args.keep_weights:
        tensors, metadata = load_weights(weights)
        tensors = {k: v for k, v in tensors.items() if not k.startswith("ood.")} | guard.to_tensors()
        metadata["ood_guard"] = {
            k: summary[k] for k in ("threshold", "range_threshold", "percentile", "range_percentile_of_validation",
                                    "testing_rejection_rate", "non_mri_caught", "non_mri_images", "held_out_caught", "held_out_images")
        } | {"colour_limit": COLOUR_LIMIT}
        save_weights(tensors, weights, metadata)
    Path("docs/ood").mkdir(parents=True, exist_ok=True)
    Path("docs/ood/ood.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k not in ("testing_rejected_paths", "non_mri", "held_out")}, indent=2))


if __name__ == "__main__":
    main()
