"""Numbered contact sheets of a seeded random sample per class, for reading plane and sequence by eye.

Run: python scripts/sample_sheets.py --root DATA_ROOT/Training --out docs/generalisation/samples [--per-class 48]
     [--seed 0] [--classes notumor ...] [--thumb 112]

No tag in these JPEGs says which plane (axial, coronal, sagittal) or sequence (T1, contrast T1,
T2, FLAIR) a slice is, so the coverage of the training data is read by eye from a seeded random
sample of each class; the sheets make that reading repeatable and checkable. The counts read off
them are in docs/generalisation/coverage_by_eye.json.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from braintumor.data.datasets import scan_class_folders
from braintumor.data.imaging import decode_image, resize_grey

THUMB = 112
COLUMNS = 8


def sheet(paths: list[Path], title: str, thumb: int = THUMB) -> Image.Image:
    rows = -(-len(paths) // COLUMNS)
    canvas = Image.new("L", (COLUMNS * thumb, rows * thumb + 20), 255)
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 4), title, fill=0)
    for number, path in enumerate(paths):
        x, y = (number % COLUMNS) * thumb, (number // COLUMNS) * thumb + 20
        canvas.paste(Image.fromarray(resize_grey(decode_image(path), thumb)), (x, y))
        draw.rectangle([x, y, x + 22, y + 12], fill=255)
        draw.text((x + 2, y), str(number + 1), fill=0)
    return canvas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="a folder of class folders")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--per-class", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--classes", nargs="*", help="only these class folders (default: all)")
    parser.add_argument("--thumb", type=int, default=THUMB, help="tile size in pixels")
    args = parser.parse_args()
    samples = scan_class_folders(args.root)
    args.out.mkdir(parents=True, exist_ok=True)
    for label in sorted({s.label for s in samples}):
        members = [s.path for s in samples if s.label == label]
        if args.classes and members[0].parent.name not in args.classes:
            continue
        chosen = np.random.default_rng([args.seed, label]).choice(len(members), min(args.per_class, len(members)), replace=False)
        paths = [members[i] for i in sorted(chosen)]
        name = paths[0].parent.name
        stem = f"{args.root.name.lower().replace(' ', '-')}_{name}" + (f"_seed{args.seed}" if args.seed else "")
        title = f"{args.root.name}/{name}: {len(paths)} of {len(members)} (seed {args.seed})"
        sheet(paths, title, args.thumb).save(args.out / f"{stem}.png")
        write_index(paths, args.root, args.out / f"{stem}.csv")
        print(args.out / f"{stem}.png")


def write_index(paths: list[Path], root: Path, out: Path) -> None:
    """Tile number (as printed on the sheet) -> path relative to the sampled root."""
    with open(out, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["tile", "path"])
        writer.writerows((number + 1, path.relative_to(root).as_posix()) for number, path in enumerate(paths))


if __name__ == "__main__":
    main()
