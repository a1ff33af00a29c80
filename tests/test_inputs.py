"""Every input a radiology user has: image formats, DICOM, NIfTI, folders, globs, and bad files."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from braintumor.data.inputs import expand_inputs, read_scan
from braintumor.errors import InvalidImageError
from conftest import write_dicom


def _ramp(height: int = 32, width: int = 48) -> np.ndarray:
    return np.tile(np.linspace(0, 1, width), (height, 1))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "BMP", "TIFF", "WEBP"])
@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P"])
def test_image_formats_and_modes(tmp_path: Path, fmt: str, mode: str) -> None:
    if fmt == "JPEG" and mode in ("RGBA", "P"):
        pytest.skip("JPEG has no alpha or palette")
    image = Image.fromarray((_ramp() * 255).astype(np.uint8)).convert(mode)
    path = tmp_path / f"scan.{fmt.lower()}"
    image.save(path, format=fmt)
    [slice_] = read_scan(path)
    assert slice_.pixels.shape == (32, 48) and slice_.pixels.dtype == np.uint8
    assert slice_.pixels[:, -1].mean() > 200 and slice_.pixels[:, 0].mean() < 30


def test_dicom_rescale_and_window_are_applied(tmp_path: Path) -> None:
    raw = (_ramp() * 1000).astype(np.uint16)  # stored values 0..1000
    # slope 2, intercept -1000: modality values -1000..1000; window 0 +/- 500 keeps the middle half.
    path = write_dicom(tmp_path / "ct.dcm", raw, slope=2.0, intercept=-1000.0, window=(0.0, 1000.0))
    [slice_] = read_scan(path)
    row = slice_.pixels[0].astype(int)
    assert row[0] == 0 and row[-1] == 255
    assert (row == 0).sum() >= 10 and (row == 255).sum() >= 10  # clipped outside the window


def test_dicom_monochrome1_is_inverted(tmp_path: Path) -> None:
    raw = (_ramp() * 4000).astype(np.uint16)
    normal = read_scan(write_dicom(tmp_path / "m2.dcm", raw))[0].pixels
    inverted = read_scan(write_dicom(tmp_path / "m1.dcm", raw, photometric="MONOCHROME1"))[0].pixels
    assert np.array_equal(inverted, 255 - normal)


def test_multiframe_dicom_gives_one_slice_per_frame(tmp_path: Path) -> None:
    frames = np.stack([_ramp() * 100 * (k + 1) for k in range(3)]).astype(np.uint16)
    slices = read_scan(write_dicom(tmp_path / "multi.dcm", frames))
    assert [s.index for s in slices] == [0, 1, 2]
    assert slices[2].source.endswith("multi.dcm#frame=2")


def test_extensionless_dicom_is_found_in_folders(tmp_path: Path) -> None:
    folder = tmp_path / "pacs"
    folder.mkdir()
    write_dicom(folder / "IM0001", _ramp() * 100)
    (folder / "notes").write_text("not a scan")
    assert expand_inputs([folder]) == [folder / "IM0001"]


def test_dicom_without_pixel_data_is_refused(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "empty.dcm", _ramp(), pixel_data=False)
    with pytest.raises(InvalidImageError, match="no pixel data"):
        read_scan(path)


def test_dicom_with_unsupported_transfer_syntax_is_refused(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "j2k.dcm", _ramp() * 100, transfer_syntax="1.2.840.10008.1.2.4.90")
    with pytest.raises(InvalidImageError, match="j2k.dcm"):
        read_scan(path)


def test_nifti_2d_is_one_image(tmp_path: Path) -> None:
    path = tmp_path / "slice.nii"
    nib.save(nib.Nifti1Image((_ramp() * 300).astype(np.float32), np.eye(4)), path)
    [slice_] = read_scan(path)
    assert slice_.pixels.shape == (48, 32) and not slice_.volume


def test_nifti_volume_gives_axial_slices(tmp_path: Path) -> None:
    volume = np.zeros((40, 30, 5), dtype=np.float32)
    for k in range(5):
        volume[5:35, 5:25, k] = 100 * (k + 1)
    path = tmp_path / "vol.nii.gz"
    nib.save(nib.Nifti1Image(volume, np.eye(4)), path)
    slices = read_scan(path)
    assert len(slices) == 5 and all(s.volume for s in slices)
    assert slices[0].pixels.shape == (30, 40)  # rows: anterior-posterior, columns: left-right
    assert slices[4].pixels.max() == 255 and slices[0].pixels.max() < slices[4].pixels.max()


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("empty.jpg", b"", "empty"),
        ("text.png", b"just some text, not a picture", "not a recognised image"),
        ("bad.nii", b"\0" * 400, "NIfTI"),
        ("bad.dcm", b"\0" * 10, "DICOM"),
    ],
)
def test_bad_files_name_themselves(tmp_path: Path, name: str, content: bytes, reason: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(InvalidImageError, match=reason) as info:
        read_scan(path)
    assert name in str(info.value) and "\n" not in str(info.value)


def test_truncated_jpeg_and_missing_path(tmp_path: Path) -> None:
    path = tmp_path / "cut.jpg"
    Image.fromarray((np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(InvalidImageError, match="cut.jpg"):
        read_scan(path)
    with pytest.raises(InvalidImageError, match="no such file"):
        read_scan(tmp_path / "absent.png")


def test_expand_inputs_walks_folders_and_globs(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/1.png", "a/b/2.jpg", "a/b/.hidden.png", "a/readme.txt", "top.png"):
        if name.endswith("png") or name.endswith("jpg"):
            Image.new("L", (4, 4)).save(tmp_path / name, format="PNG")
        else:
            (tmp_path / name).write_text("x")
    assert expand_inputs([tmp_path / "a"]) == [tmp_path / "a" / "1.png", tmp_path / "a" / "b" / "2.jpg"]
    assert expand_inputs([str(tmp_path / "**" / "*.png")]) == [tmp_path / "a" / "1.png", tmp_path / "top.png"]
    assert expand_inputs([tmp_path / "absent.png"]) == [tmp_path / "absent.png"]


def test_bytes_read_as_their_file_does(tmp_path: Path) -> None:
    """Uploads are decoded from memory: the same slices as from the file, named as the client said."""
    volume = (np.random.default_rng(0).random((16, 16, 5)) * 1000).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "vol.nii.gz")
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "vol.nii")
    image = tmp_path / "scan.png"
    Image.fromarray((_ramp() * 255).astype(np.uint8)).save(image)
    files = [image, write_dicom(tmp_path / "frames.dcm", np.zeros((3, 8, 8), np.uint16) + 7), tmp_path / "vol.nii.gz"]
    files.append(tmp_path / "vol.nii")
    for path in files:
        from_file = read_scan(path)
        from_bytes = read_scan(path.read_bytes(), "upload name")
        assert len(from_bytes) == len(from_file) and from_bytes[0].path == "upload name"
        for a, b in zip(from_file, from_bytes, strict=True):
            assert np.array_equal(a.pixels, b.pixels) and (a.index, a.volume) == (b.index, b.volume)
    # A NIfTI volume sent under a name without its suffix is still recognised by its header.
    assert len(read_scan((tmp_path / "vol.nii").read_bytes(), "upload")) == 5
    with pytest.raises(InvalidImageError, match="^empty.png: file is empty$"):
        read_scan(b"", "empty.png")
