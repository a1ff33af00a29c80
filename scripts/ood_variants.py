"""Why the bundled annotated figure Te-meTr_0002.jpg is still refused: guard variants compared.

Run: python scripts/ood_variants.py --data DATA_ROOT

With the shipped model's features (the same training/validation split and non-MRI images as
scripts/fit_ood.py), prints for PCA subspaces of 64, 128 and 256 components how many non-MRI
images score below the figure (so that no threshold accepts it and catches them all); for
cosine distance to k-means centroids how many non-MRI images the validation threshold catches;
and for a pixel rule in front of the guard (too few dark pixels in a 12-pixel border, or a flat
centre) how many non-MRI images the pair catches at the highest threshold that accepts the figure.
Then, with the shipped guard: the figure's score with its two drawn arrows painted over (are the
arrows the reason?), and which held-out non-MRI images (scikit-image's pictures, see
scripts/fit_ood.py) a threshold just above the figure's score would let through.
The figures are quoted in docs/ood/README.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from fit_ood import held_out_images, non_mri_images  # scripts/ is on the path when this file runs
from shipped_data import decoded_split, network_outputs, split_features, validation_mask
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA

from braintumor.data.imaging import array_to_grey, resize_grey
from braintumor.inference.predict import load_model
from braintumor.models.ood import OODGuard

FIGURE = "Te-meTr_0002.jpg"
BORDER = 12
# The two white arrows drawn on the figure (rows, then columns, in its 224x224 pixels).
ARROW_BOXES = ((slice(95, 120), slice(70, 90)), (slice(85, 102), slice(145, 165)))


def paint_over_arrows(pixels: np.ndarray) -> np.ndarray:
    """The figure with each arrow's box replaced by a 7x7 median of the image: the scan without the drawing."""
    from PIL import Image, ImageFilter

    smooth = np.asarray(Image.fromarray(pixels).filter(ImageFilter.MedianFilter(7)))
    painted = pixels.copy()
    for rows, cols in ARROW_BOXES:
        painted[rows, cols] = smooth[rows, cols]
    return painted


def dark_border_share(pixels: np.ndarray) -> np.ndarray:
    """Share of pixels darker than 40 in the outer band: real slices have dark corners."""
    band = np.concatenate([pixels[:, :BORDER].reshape(len(pixels), -1), pixels[:, -BORDER:].reshape(len(pixels), -1),
                           pixels[:, :, :BORDER].reshape(len(pixels), -1), pixels[:, :, -BORDER:].reshape(len(pixels), -1)], 1)
    return (band < 40).mean(1)


def flat_centre(pixels: np.ndarray) -> np.ndarray:
    return pixels[:, 56:168, 56:168].reshape(len(pixels), -1).astype(np.float32).std(1) < 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    args = parser.parse_args()
    classifier = load_model()

    def features(pixels: np.ndarray) -> np.ndarray:
        return network_outputs(classifier, pixels)[1]

    training, _, train_features = split_features(classifier, args.data, "Training")
    is_val = validation_mask(training)
    testing, test_pixels = decoded_split(args.data, "Testing")
    figure = [s.path.name for s in testing].index(FIGURE)
    figure_pixels = test_pixels[figure : figure + 1]
    figure_features = features(figure_pixels)
    others = non_mri_images()
    other_pixels = np.stack([resize_grey(array_to_grey(image), 224) for image in others.values()])
    other_features = features(other_pixels)
    fit, val = train_features[~is_val], train_features[is_val]

    print("PCA residual share (the shipped guard uses 64 components):")
    for k in (64, 128, 256):
        pca = PCA(k, random_state=0).fit(fit)
        guard = OODGuard(pca.mean_, pca.components_, np.inf)
        figure_score, other_scores = guard.score(figure_features)[0], guard.score(other_features)
        below = {name: round(float(s), 3) for name, s in zip(others, other_scores) if s < figure_score}
        print(f"  {k:3d} components: figure {figure_score:.3f}; {len(below)} of {len(others)} non-MRI images score lower: {below}")

    print("cosine distance to the nearest k-means centroid, threshold at the 99.5th validation percentile:")
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    for centroids in (64, 256):
        centres = unit(KMeans(centroids, random_state=0, n_init=1).fit(unit(fit)).cluster_centers_)
        distance = lambda x: 1 - (unit(x) @ centres.T).max(1)  # noqa: E731
        threshold = np.percentile(distance(val), 99.5)
        caught = int((distance(other_features) > threshold).sum())
        print(f"  {centroids} centroids: {caught} of {len(others)} caught; figure refused: {bool(distance(figure_features)[0] > threshold)}")

    pca = PCA(64, random_state=0).fit(fit)
    guard = OODGuard(pca.mean_, pca.components_, np.inf)
    threshold = guard.score(figure_features)[0] + 1e-9  # the highest that still accepts the figure
    pixel_rule = (dark_border_share(other_pixels) < 0.3) | flat_centre(other_pixels)
    caught = pixel_rule | (guard.score(other_features) > threshold)
    missed = [name for name, c in zip(others, caught) if not c]
    print(f"pixel rule (dark border share < 0.3 or flat centre) catches {int(pixel_rule.sum())} of {len(others)}; "
          f"with the 64-component guard at the figure's score the pair catches {int(caught.sum())}; misses {missed}; "
          f"figure's dark border share {dark_border_share(figure_pixels)[0]:.2f}")


    shipped = classifier.guard
    painted = paint_over_arrows(figure_pixels[0])[None]
    scores = shipped.score(np.concatenate([figure_features, features(painted)]))
    print(f"shipped guard (threshold {shipped.threshold:.3f}): figure {scores[0]:.3f}, arrows painted over {scores[1]:.3f}")
    held = held_out_images()
    held_scores = shipped.score(features(np.stack([resize_grey(array_to_grey(image), 224) for image in held.values()])))
    let_through = {name: round(float(s), 3) for name, s in zip(held, held_scores) if s <= scores[0]}
    print(f"a threshold at the figure's score would let {len(let_through)} of {len(held)} held-out non-MRI images past the features: {let_through}")


if __name__ == "__main__":
    main()
