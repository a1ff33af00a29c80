"""Compare Grad-CAM methods and layers by faithfulness on the Testing split; check brain coverage.

Run: python scripts/compare_explanations.py --data DATA_ROOT [--per-class 25] [--out docs/explanations.json]

For a fixed, seeded sample of Testing images per class it computes, for each method and layer,
the mean drop in the predicted class's probability when the 10% and 20% most highlighted pixels
are blurred away (MoRF, higher = more faithful) and when the 20% least highlighted are (LeRF,
lower = more faithful), in the spirit of ROAD; the score is mean(MoRF) - LeRF. The baseline is a
random map with the same blob-like structure as a CAM (7x7 noise upsampled), since scattered
random pixels would measure the damage of speckle rather than of removing evidence. For the best
method it reports the share of the heat map inside a rough brain mask, per class.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from braintumor.data.cache import load_cached
from braintumor.data.datasets import load_split
from braintumor.inference.explain import HeatmapRequest, brain_mask, compute_heatmaps, deletion_drop, share_inside
from braintumor.inference.predict import load_model

METHODS = ("gradcam", "gradcam++", "eigencam", "layercam")
LAYERS = ("features.8", "features.7", "features.6", "features.5")  # 7x7 head ... 14x14 stage
FRACTIONS = (0.1, 0.2)


def random_blobs(rng: np.random.Generator, count: int, size: int) -> np.ndarray:
    """Random smooth maps: 7x7 uniform noise upsampled, like a CAM without any evidence."""
    import torch

    noise = torch.from_numpy(rng.random((count, 1, 7, 7)).astype(np.float32))
    return torch.nn.functional.interpolate(noise, size=(size, size), mode="bilinear", align_corners=False)[:, 0].numpy()


def score(row: dict) -> float:
    """mean MoRF drop minus LeRF drop: high when removing the highlighted evidence hurts and
    removing the rest does not."""
    return (row["drop_10"] + row["drop_20"]) / 2 - row["keep_20"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--per-class", type=int, default=25)
    parser.add_argument("--batch-size", type=int, default=25)
    parser.add_argument("--out", type=Path, default=Path("docs/explanations.json"))
    args = parser.parse_args()

    classifier = load_model()
    samples = load_split(args.data, "Testing")
    rng = np.random.default_rng(0)
    chosen = []
    for label in range(len(classifier.class_names)):
        members = [i for i, s in enumerate(samples) if s.label == label]
        chosen.extend(sorted(rng.choice(members, size=min(args.per_class, len(members)), replace=False)))
    decoded = load_cached([samples[i].path for i in chosen], classifier.image_size, None, progress=False)
    pixels, labels = decoded.pixels, np.array([samples[i].label for i in chosen])
    model, prep = classifier.model, classifier.preprocessing
    results: dict[str, dict] = {}
    baseline_maps = random_blobs(rng, len(pixels), pixels.shape[-1])
    for method in METHODS + ("random",):
        for layer in LAYERS if method != "random" else ("-",):
            started = time.perf_counter()
            drops: dict[str, list[float]] = {"drop_10": [], "drop_20": [], "keep_20": []}
            for start in range(0, len(pixels), args.batch_size):
                batch = pixels[start : start + args.batch_size]
                if method == "random":
                    probabilities = compute_heatmaps(model, batch, HeatmapRequest("gradcam", LAYERS[0]), prep).probabilities
                    heatmaps = baseline_maps[start : start + args.batch_size]
                else:
                    cams = compute_heatmaps(model, batch, HeatmapRequest(method, layer), prep)
                    heatmaps, probabilities = cams.heatmaps, cams.probabilities
                predicted = probabilities.argmax(1)
                for fraction in FRACTIONS:
                    drops[f"drop_{int(fraction * 100)}"].extend(deletion_drop(model, batch, heatmaps, predicted, fraction, prep))
                drops["keep_20"].extend(deletion_drop(model, batch, 1.0 - heatmaps, predicted, 0.2, prep))
            key = "random blobs" if method == "random" else f"{method} @ {layer}"
            results[key] = {name: float(np.mean(values)) for name, values in drops.items()}
            results[key]["score"] = score(results[key])
            results[key]["seconds"] = time.perf_counter() - started
            print(key, results[key], flush=True)
    baseline = results.pop("random blobs")
    best = max(results, key=lambda k: results[k]["score"])
    method, layer = best.split(" @ ")
    coverage: dict[str, list[float]] = {name: [] for name in classifier.class_names}
    area: dict[str, list[float]] = {name: [] for name in classifier.class_names}
    for start in range(0, len(pixels), args.batch_size):
        batch = pixels[start : start + args.batch_size]
        heatmaps = compute_heatmaps(model, batch, HeatmapRequest(method, layer), prep).heatmaps
        for grey, heatmap, label in zip(batch, heatmaps, labels[start : start + args.batch_size]):
            mask = brain_mask(np.asarray(grey))
            coverage[classifier.class_names[label]].append(share_inside(heatmap, mask))
            area[classifier.class_names[label]].append(float(mask.mean()))
    brain = {name: {"heat_inside_brain": float(np.mean(coverage[name])), "brain_area": float(np.mean(area[name]))} for name in coverage}
    report = {"n_images": int(len(pixels)), "per_class": args.per_class, "results": results, "random_baseline": baseline, "best": best, "brain_coverage": brain}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print("\n| method @ layer | MoRF 10% | MoRF 20% | LeRF 20% | score |\n|---|---|---|---|---|")
    for key, row in sorted(results.items(), key=lambda kv: -kv[1]["score"]):
        print(f"| {key} | {row['drop_10']:.3f} | {row['drop_20']:.3f} | {row['keep_20']:.3f} | {row['score']:.3f} |")
    print(f"| random blobs (baseline) | {baseline['drop_10']:.3f} | {baseline['drop_20']:.3f} | {baseline['keep_20']:.3f} | {baseline['score']:.3f} |")
    print(f"\nbest: {best}\n\n| class | heat inside brain | brain share of image |\n|---|---|---|")
    for name, row in brain.items():
        print(f"| {name} | {row['heat_inside_brain']:.3f} | {row['brain_area']:.3f} |")


if __name__ == "__main__":
    main()
