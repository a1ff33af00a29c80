"""A DICOM series made from 2-D images, to try ``predict`` and ``dicom-node`` without a PACS at hand.

Each image becomes one single-frame MR file of one new study and series, built on the header of
pydicom's own MR sample file (``MR_small.dcm``) with the pixel size set for a 220 mm field of view,
axial slices 5 mm apart, and the SeriesDescription given. Files are written in shuffled order
of name, as a PACS export does not promise any order.

    python -m braintumor.pacs.sample OUT_DIR IMAGE [IMAGE ...] [--description "AX T1 POST GD"]
"""

from __future__ import annotations

import argparse
import copy
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..data.imaging import decode_image_and_colour

FIELD_OF_VIEW_MM = 220.0
SLICE_GAP_MM = 5.0


def write_series(
    images: Sequence[Path | np.ndarray], out_dir: Path, description: str = "AX T1 POST GD", seed: int = 0
) -> list[Path]:
    """One DICOM file per image (a path, or (H, W) uint8 pixels) in ``out_dir``, in series order;
    returns their paths in that order (file names are shuffled)."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    template = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    study, series, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    names = list(range(len(images)))
    random.Random(seed).shuffle(names)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for number, image in enumerate(images):
        pixels = image if isinstance(image, np.ndarray) else decode_image_and_colour(Path(image), str(image))[0]
        dataset = copy.deepcopy(template)
        uid = generate_uid()
        dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID = uid
        dataset.StudyInstanceUID, dataset.SeriesInstanceUID = study, series
        dataset.FrameOfReferenceUID = frame_of_reference
        dataset.SeriesDescription, dataset.SeriesNumber, dataset.InstanceNumber = description, 1, number + 1
        dataset.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        dataset.ImagePositionPatient = [-FIELD_OF_VIEW_MM / 2, -FIELD_OF_VIEW_MM / 2, SLICE_GAP_MM * number]
        dataset.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        dataset.SliceLocation = SLICE_GAP_MM * number
        dataset.Rows, dataset.Columns = pixels.shape
        dataset.PixelSpacing = [FIELD_OF_VIEW_MM / pixels.shape[0], FIELD_OF_VIEW_MM / pixels.shape[1]]
        dataset.PixelRepresentation, dataset.SmallestImagePixelValue, dataset.LargestImagePixelValue = 0, 0, 255
        for keyword in ("WindowCenter", "WindowWidth"):
            dataset.pop(keyword, None)
        dataset.PixelData = pixels.astype(np.uint16).tobytes()
        path = out_dir / f"IM{names[number]:05d}.dcm"
        dataset.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("images", type=Path, nargs="+")
    parser.add_argument("--description", default="AX T1 POST GD")
    arguments = parser.parse_args()
    paths = write_series(arguments.images, arguments.out_dir, arguments.description)
    print(f"{len(paths)} files of one series in {arguments.out_dir}")


if __name__ == "__main__":
    main()
