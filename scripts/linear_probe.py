"""Linear probe: how much useful signal each initialisation carries before any fine-tuning.

Run: python scripts/linear_probe.py --data DATA_ROOT [--train-per-class 300]

Freezes EfficientNet-B0 as initialised by each ``--init`` (lite0, none; imagenet when online),
extracts the 1280-d pooled features of a seeded subset of the leak-free training split and of the
whole validation split (the same near-duplicate groups as ``braintumor train``), fits a
logistic regression on the former and reports accuracy on the latter.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from braintumor.data.cache import load_cached
from braintumor.data.datasets import group_split, load_split
from braintumor.data.duplicates import group_near_duplicates
from braintumor.data.transforms import normalise
from braintumor.errors import ConfigError
from braintumor.models.registry import create_model


@torch.inference_mode()
def features(model: torch.nn.Module, pixels: np.ndarray, batch_size: int = 64) -> np.ndarray:
    model.eval()
    out = []
    for start in range(0, len(pixels), batch_size):
        batch = normalise(torch.as_tensor(pixels[start : start + batch_size])).contiguous(memory_format=torch.channels_last)
        out.append(torch.flatten(model.avgpool(model.features(batch)), 1).numpy())
    return np.concatenate(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--train-per-class", type=int, default=300)
    parser.add_argument("--inits", nargs="+", default=["lite0", "none", "imagenet"])
    args = parser.parse_args()
    samples = load_split(args.data, "Training")
    decoded = load_cached([s.path for s in samples], 224, None, progress=False)
    pixels, labels = np.asarray(decoded.pixels), np.array([s.label for s in samples])
    train_index, val_index = group_split(labels, group_near_duplicates(pixels), 0.1, seed=0)
    rng = np.random.default_rng(0)
    subset = np.concatenate([rng.choice(train_index[labels[train_index] == c], args.train_per_class, replace=False) for c in range(4)])
    print(f"probe: {len(subset)} training images, {len(val_index)} validation images (leak-free split, seed 0)")
    print("| init | validation accuracy | seconds |\n|---|---|---|")
    for init in args.inits:
        started = time.perf_counter()
        torch.manual_seed(0)
        try:
            model = create_model(init)
        except ConfigError as exc:
            print(f"| {init} | not available: {exc} | |")
            continue
        train_features = features(model, pixels[subset])
        scaler = StandardScaler().fit(train_features)
        probe = LogisticRegression(max_iter=2000, C=0.5).fit(scaler.transform(train_features), labels[subset])
        accuracy = probe.score(scaler.transform(features(model, pixels[val_index])), labels[val_index])
        print(f"| {init} | {accuracy:.4f} | {time.perf_counter() - started:.0f} |", flush=True)


if __name__ == "__main__":
    main()
