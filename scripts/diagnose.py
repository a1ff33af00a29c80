"""What does a model key on when it fails on scans from another source? Evidence, as JSON and PNGs.

Run: python scripts/diagnose.py --data DATA_ROOT --external EXTERNAL_ROOT [--weights FILE] --out docs/generalisation/NAME

Three measurements, each on the external class-folder set (PMRAM: other hospitals) and, for
contrast, on the Kaggle Testing split:

1. Dose-response to appearance alone. The same slices are blurred or sharpened (unsharp mask) and
   their grey curve bent (gamma) at several strengths; a model that reads the anatomy keeps its
   answers, one that reads a source's look moves them, and the direction says which look it
   associates with which class (for example: sharper -> ``notumor``).
2. Nearest training neighbours. For every external slice, the 10 Training slices nearest in the
   network's pooled features (cosine): what class they carry, whether a mistaken slice's
   neighbours carry the predicted class rather than the true one, and how sharp and bright they
   are compared with the slice itself. A contact sheet shows mistaken slices beside their
   neighbours.
3. Where the network looks on its mistakes: Grad-CAM (the shipped default, LayerCAM at
   features.5) on mistaken external slices, for the predicted class.

Writes OUT/diagnosis.json, OUT/dose_response.png, OUT/neighbours.png and OUT/mistakes_gradcam.png.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageFilter  # noqa: E402

from braintumor.data.cache import load_cached  # noqa: E402
from braintumor.data.datasets import load_split, resolve_split_dir, scan_class_folders  # noqa: E402
from braintumor.evaluation.shortcuts import pixel_cues  # noqa: E402
from braintumor.inference.explain import overlay  # noqa: E402
from braintumor.inference.predict import load_model  # noqa: E402

SHARPNESS_STEPS = (("blur 2.0", 2.0), ("blur 1.0", 1.0), ("none", 0.0), ("unsharp 75%", -75), ("unsharp 150%", -150), ("unsharp 300%", -300))
GAMMA_STEPS = (0.5, 0.7, 1.0, 1.4, 2.0)
NEIGHBOURS = 10


def _sharpness(pixels: np.ndarray, step: float) -> np.ndarray:
    """Blur (step > 0: Gaussian radius) or sharpen (step < 0: unsharp mask percent, radius 2)."""
    if step == 0:
        return pixels
    operation = ImageFilter.GaussianBlur(step) if step > 0 else ImageFilter.UnsharpMask(radius=2, percent=int(-step), threshold=0)
    return np.stack([np.asarray(Image.fromarray(p).filter(operation)) for p in pixels])


def _gamma(pixels: np.ndarray, gamma: float) -> np.ndarray:
    return (255.0 * (pixels / 255.0) ** gamma).round().astype(np.uint8)


def labelled(root: Path, class_names: list[str], split: str | None) -> tuple[list, np.ndarray, np.ndarray]:
    """(samples, labels, decoded pixels) of a Kaggle split or a plain class-folder root."""
    samples = load_split(root, split) if split else scan_class_folders(resolve_split_dir(root, "Testing"), tuple(class_names))
    decoded = load_cached([s.path for s in samples], 224, None, progress=False)
    keep = np.flatnonzero(decoded.ok)
    return [samples[i] for i in keep], np.array([samples[i].label for i in keep]), np.asarray(decoded.pixels)[keep]


def dose_response(classifier, pixels: np.ndarray, labels: np.ndarray) -> dict:
    """Per appearance change: accuracy, and the share of each true class predicted as each class."""
    names = classifier.class_names
    results: dict[str, dict] = {}
    steps = [(f"sharpness: {n}", lambda p, s=s: _sharpness(p, s)) for n, s in SHARPNESS_STEPS]
    steps += [(f"gamma {g}", lambda p, g=g: _gamma(p, g)) for g in GAMMA_STEPS]
    for name, change in steps:
        predicted = classifier.predict_pixels(change(pixels)).argmax(1)
        results[name] = {
            "accuracy": float((predicted == labels).mean()),
            "predicted_share": {
                names[t]: {names[c]: float((predicted[labels == t] == c).mean()) for c in range(len(names))}
                for t in np.unique(labels)
            },
        }
    return results


def neighbour_evidence(train_features, train_labels, train_cues, features, labels, predicted, cues, names) -> tuple[dict, np.ndarray]:
    """Class make-up and look of each external slice's nearest training slices."""
    unit = train_features / np.linalg.norm(train_features, axis=1, keepdims=True)
    query = features / np.linalg.norm(features, axis=1, keepdims=True)
    nearest = np.argsort(-(query @ unit.T), axis=1)[:, :NEIGHBOURS]
    neighbour_labels = train_labels[nearest]
    wrong = predicted != labels
    share_true = (neighbour_labels == labels[:, None]).mean(1)
    share_predicted = (neighbour_labels == predicted[:, None]).mean(1)
    summary = {
        "k": NEIGHBOURS,
        "mistakes": int(wrong.sum()),
        "mistakes_neighbours_of_predicted_class": float(share_predicted[wrong].mean()) if wrong.any() else None,
        "mistakes_neighbours_of_true_class": float(share_true[wrong].mean()) if wrong.any() else None,
        "correct_neighbours_of_true_class": float(share_true[~wrong].mean()) if (~wrong).any() else None,
        "neighbour_class_share_by_true_class": {
            names[t]: {names[c]: float((neighbour_labels[labels == t] == c).mean()) for c in range(len(names))} for t in np.unique(labels)
        },
        "look_of_slice_vs_its_neighbours": {
            cue: {"external_median": float(np.median(cues[cue])), "neighbours_median": float(np.median(train_cues[cue][nearest]))}
            for cue in ("laplacian_var_log10", "hf_share", "noise_sigma", "head_mean", "head_area")
        },
    }
    return summary, nearest


def contact_sheet(path: Path, pixels, labels, predicted, train_pixels, train_labels, nearest, names, rows: int = 6) -> None:
    """Mistaken external slices (first column) beside their five nearest training slices."""
    chosen = _spread_mistakes(labels, predicted, rows)
    fig, axes = plt.subplots(max(1, len(chosen)), 6, figsize=(12, 2.2 * max(1, len(chosen))), squeeze=False)
    for row, index in enumerate(chosen):
        axes[row, 0].imshow(pixels[index], cmap="gray", vmin=0, vmax=255)
        axes[row, 0].set_title(f"external: {names[labels[index]]}\ncalled {names[predicted[index]]}", fontsize=8, color="firebrick")
        for column, neighbour in enumerate(nearest[index][:5], start=1):
            axes[row, column].imshow(train_pixels[neighbour], cmap="gray", vmin=0, vmax=255)
            axes[row, column].set_title(f"Training: {names[train_labels[neighbour]]}", fontsize=8)
    _finish(fig, axes, "Mistaken external slices and their nearest Training slices (network features, cosine)", path)


def gradcam_sheet(path: Path, classifier, pixels, labels, predicted, names, count: int = 8) -> None:
    """Grad-CAM of the predicted class on mistaken external slices."""
    chosen = _spread_mistakes(labels, predicted, count)
    if not len(chosen):
        return
    explanations = classifier.explain([pixels[i] for i in chosen])
    fig, axes = plt.subplots(2, (len(chosen) + 1) // 2, figsize=(2.6 * ((len(chosen) + 1) // 2), 5.6), squeeze=False)
    for axis, index, explanation in zip(axes.ravel(), chosen, explanations):
        axis.imshow(overlay(pixels[index], explanation.heatmap))
        axis.set_title(f"{names[labels[index]]} called {names[predicted[index]]}", fontsize=8)
    _finish(fig, axes, "Where the network looks on its mistakes (LayerCAM, predicted class)", path)


def _spread_mistakes(labels: np.ndarray, predicted: np.ndarray, count: int) -> np.ndarray:
    """Up to ``count`` mistaken indices spread evenly over the set (so every class can appear)."""
    wrong = np.flatnonzero(predicted != labels)
    return wrong[np.linspace(0, len(wrong) - 1, min(count, len(wrong))).astype(int)] if len(wrong) else wrong


def _finish(fig, axes, title: str, path: Path) -> None:
    for axis in axes.ravel():
        axis.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_dose(path: Path, external: dict, testing: dict) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for axis, prefix in zip(axes, ("sharpness", "gamma")):
        for name, results, style in (("external", external, "-o"), ("Testing", testing, "--s")):
            keys = [k for k in results if k.startswith(prefix)]
            axis.plot(range(len(keys)), [results[k]["accuracy"] for k in keys], style, label=f"{name}: accuracy")
            notumor = [np.mean([row.get("notumor", 0.0) for cls, row in results[k]["predicted_share"].items() if cls != "notumor"]) for k in keys]
            axis.plot(range(len(keys)), notumor, style, alpha=0.6, label=f"{name}: tumours called notumor")
            axis.set_xticks(range(len(keys)), [k.split(": ")[-1] for k in keys], rotation=20, fontsize=8)
        axis.set_ylim(0, 1)
        axis.grid(alpha=0.3)
        axis.set_title(f"Same slices, only the {prefix} changed")
        axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--external", type=Path, required=True)
    parser.add_argument("--weights", type=Path, default=None, help="default: the shipped model")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--testing-sample", type=int, default=400, help="Testing slices for the dose-response contrast")
    args = parser.parse_args()
    classifier = load_model(args.weights, device="cpu")
    names = classifier.class_names
    _, train_labels, train_pixels = labelled(args.data, names, "Training")
    _, test_labels, test_pixels = labelled(args.data, names, "Testing")
    sample = np.random.default_rng(0).permutation(len(test_labels))[: args.testing_sample]  # a seeded subsample: CPU time
    test_labels, test_pixels = test_labels[sample], test_pixels[sample]
    _, labels, pixels = labelled(args.external, names, None)
    train_features = classifier.logits_and_features(train_pixels)[1]
    logits, features = classifier.logits_and_features(pixels)
    predicted = logits.argmax(1)  # the temperature changes no argmax
    train_cues, cues = pixel_cues(train_pixels), pixel_cues(pixels)
    neighbours, nearest = neighbour_evidence(train_features, train_labels, train_cues, features, labels, predicted, cues, names)
    report = {
        "weights": str(args.weights or "shipped model"),
        "external": {"n": int(len(labels)), "accuracy": float((predicted == labels).mean()), "dose_response": dose_response(classifier, pixels, labels)},
        "testing": {"n": int(len(test_labels)), "sampled_seed": 0, "dose_response": dose_response(classifier, test_pixels, test_labels)},
        "neighbours": neighbours,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "diagnosis.json").write_text(json.dumps(report, indent=2))
    plot_dose(args.out / "dose_response.png", report["external"]["dose_response"], report["testing"]["dose_response"])
    contact_sheet(args.out / "neighbours.png", pixels, labels, predicted, train_pixels, train_labels, nearest, names)
    gradcam_sheet(args.out / "mistakes_gradcam.png", classifier, pixels, labels, predicted, names)
    print(json.dumps({k: v for k, v in report.items() if k != "testing"}, indent=1)[:6000])


if __name__ == "__main__":
    main()
