"""Hostile and damaged inputs (issue 13): each ends in a one-line error for its own file, never a
traceback, never a lost batch, and costs bounded memory: sizes are checked before anything is
decoded or inflated (these tests never hold gigabytes)."""

from __future__ import annotations

import gzip
import json
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from braintumor.cli import app
from braintumor.data import medical
from braintumor.data.inputs import read_scan
from braintumor.errors import InvalidImageError
from conftest import EXAMPLES, write_dicom

runner = CliRunner()
SCAN = sorted(EXAMPLES.glob("*/*.jpg"))[0]


def _dicom_with(tmp_path: Path, name: str, **raw: object) -> Path:
    """A valid 16x16 MR DICOM, then the given header elements overwritten with raw (possibly
    invalid) bytes, written as they are, as a damaged file would hold them."""
    path = write_dicom(tmp_path / name, (np.arange(256).reshape(16, 16) * 50).astype(np.uint16))
    dataset = pydicom.dcmread(path)
    for keyword, value in raw.items():
        tag = pydicom.tag.Tag(pydicom.datadict.tag_for_keyword(keyword))
        vr = pydicom.datadict.dictionary_VR(tag)
        if vr == "US" and str(value).isdigit() and int(value) < 65536:
            encoded = int(value).to_bytes(2, "little")
        else:
            encoded = str(value).encode("latin-1", "replace")
        encoded += b" " * (len(encoded) % 2)
        dataset[tag] = pydicom.dataelem.RawDataElement(tag, vr, len(encoded), encoded, 0, False, True)
    dataset.save_as(path, enforce_file_format=True)
    return path


BAD_HEADERS = {
    "slope.dcm": ({"RescaleSlope": "abc"}, "invalid rescale"),
    "rows.dcm": ({"Rows": 0}, "Rows = 0"),
    "bits.dcm": ({"BitsAllocated": 0}, "BitsAllocated = 0"),
    "frames.dcm": ({"NumberOfFrames": "x"}, "invalid NumberOfFrames"),
}
DISPLAY_ONLY = {  # a window we cannot apply falls back to the slice's own range: still classified
    "width0.dcm": {"WindowCenter": "100", "WindowWidth": "0"},
    "text-window.dcm": {"WindowCenter": "abc", "WindowWidth": "def"},
}


def test_bad_dicom_header_values_fail_their_own_file_with_the_tag_named(tmp_path: Path) -> None:
    for name, (raw, reason) in BAD_HEADERS.items():
        with pytest.raises(InvalidImageError, match=reason) as caught:
            read_scan(_dicom_with(tmp_path, name, **raw))
        assert "\n" not in str(caught.value) and name in str(caught.value)
    for name, raw in DISPLAY_ONLY.items():
        [slice_] = read_scan(_dicom_with(tmp_path, name, **raw))
        assert slice_.pixels.std() > 10


def test_one_bad_file_never_loses_the_batch(tmp_path: Path) -> None:
    bad = [_dicom_with(tmp_path, name, **raw) for name, (raw, _) in BAD_HEADERS.items()]
    display = [_dicom_with(tmp_path, name, **raw) for name, raw in DISPLAY_ONLY.items()]
    good = sorted(EXAMPLES.glob("*/*.jpg"))
    inputs = [str(p) for p in [*good[:6], *bad, *display, *good[6:]]]
    result = runner.invoke(app, ["predict", *inputs, "--json", "--csv", str(tmp_path / "out.csv")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    objects = json.loads(result.stdout)
    assert len(objects) == len(inputs)
    assert sum(1 for o in objects if o.get("error")) == len(bad)
    assert all(o["label"] for o in objects if not o.get("error"))
    assert len((tmp_path / "out.csv").read_text().splitlines()) == len(inputs) + 1


def test_nan_and_inf_voxels_are_left_out_of_the_window_and_reported(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    volume = (rng.random((16, 16, 5)) * 1000).astype(np.float32)
    volume[3, 4, 2] = np.nan
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "nan.nii.gz")
    slices = read_scan(tmp_path / "nan.nii.gz")
    assert len(slices) == 5 and all(s.pixels.std() > 10 for s in slices)
    assert "1 NaN or infinite voxels" in slices[0].note
    inf = volume.copy()
    inf[rng.random(inf.shape) < 0.02] = np.inf
    nib.save(nib.Nifti1Image(inf, np.eye(4)), tmp_path / "inf.nii")
    assert all(s.pixels.std() > 10 for s in read_scan(tmp_path / "inf.nii"))
    flat = volume[:, :, 0].copy()
    flat[0, 0] = np.nan
    nib.save(nib.Nifti1Image(flat, np.eye(4)), tmp_path / "flat.nii")
    [one] = read_scan(tmp_path / "flat.nii")
    assert one.pixels.std() > 10 and one.note
    result = runner.invoke(app, ["predict", str(tmp_path / "nan.nii.gz"), "--json"])
    assert result.exit_code == 0 and "RuntimeWarning" not in result.output
    assert "NaN" in json.loads(result.stdout)[0]["note"]


def test_sizes_are_checked_before_anything_is_inflated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A NIfTI header claiming 2048^3 float32 voxels (32 GiB) over a few bytes of data.
    header = nib.Nifti1Header()
    header.set_data_shape((2048, 2048, 2048))
    header.set_data_dtype(np.float32)
    claimed = tmp_path / "claims.nii"
    claimed.write_bytes(header.binaryblock + b"\0" * 4 + b"\0" * 1024)
    with pytest.raises(InvalidImageError, match="over the limit of"):
        read_scan(claimed)
    # Compressed streams are inflated no further than the budget (shrunk here to 1 MiB).
    monkeypatch.setattr(medical, "MAX_INFLATED_BYTES", 1 << 20)
    volume = np.zeros((128, 128, 64), np.float32)  # 4 MiB of zeros, a few KiB compressed
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "zeros.nii")
    packed = gzip.compress((tmp_path / "zeros.nii").read_bytes())
    with pytest.raises(InvalidImageError, match="decompresses to more than the limit of 1 MiB"):
        read_scan(packed, "bomb.nii.gz")
    big = write_dicom(tmp_path / "deflated.dcm", np.zeros((16, 512, 512), np.uint16))
    dataset = pydicom.dcmread(big)
    dataset.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    dataset.save_as(big, enforce_file_format=True)
    assert len(big.read_bytes()) < 200_000
    with pytest.raises(InvalidImageError, match="decompresses to more than the limit"):
        read_scan(big)
    wide = tmp_path / "wide.png"
    Image.new("L", (5000, 4000)).save(wide)
    with pytest.raises(InvalidImageError, match="exceeds the cap"):
        read_scan(wide)


def _nifti_claiming(shape: tuple[int, ...], dtype: type, version: int = 1) -> bytes:
    """A NIfTI header claiming ``shape`` of ``dtype`` over a few bytes of data."""
    header = nib.Nifti2Header() if version == 2 else nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    return header.binaryblock + b"\0" * 4 + b"\0" * 1024


@pytest.mark.parametrize(
    ("shape", "dtype", "version", "reason"),
    [((2, 2, 30_000_000), np.float32, 2, "30,000,000 slices or frames is over the limit of 1,024"),
     ((1024, 1024, 120), np.float64, 1, "960 MiB of 64-bit pixel data is over the limit of 512 MiB")],
)
def test_a_volume_over_the_slice_or_byte_budget_is_refused_from_its_header(
    shape: tuple[int, ...], dtype: type, version: int, reason: str, tmp_path: Path
) -> None:
    claimed = _nifti_claiming(shape, dtype, version)
    (tmp_path / "claims.nii").write_bytes(claimed)
    for source, name in ((claimed, "claims.nii"), (gzip.compress(claimed), "claims.nii.gz"),
                         (tmp_path / "claims.nii", None)):
        with pytest.raises(InvalidImageError, match=reason):
            read_scan(source, name)


def test_dicom_frames_over_the_budget_are_refused_from_the_header(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "frames.dcm", np.zeros((2, 16, 16), np.uint16))
    dataset = pydicom.dcmread(path)
    dataset.NumberOfFrames = 20_000  # 5 MB of real frames would do the same; the header decides first
    dataset.save_as(path, enforce_file_format=True)
    with pytest.raises(InvalidImageError, match="20,000 slices or frames is over the limit"):
        read_scan(path)


def test_a_file_over_the_size_limit_is_refused_before_it_is_read(tmp_path: Path) -> None:
    sparse = tmp_path / "sparse.dcm"
    with sparse.open("wb") as handle:
        handle.truncate(1536 * 2**20)  # 1.5 GiB that takes no disk
    with pytest.raises(InvalidImageError, match="a file of 1,536 MiB is over the limit of 1024 MiB"):
        read_scan(sparse)


def test_a_transfer_syntax_lie_is_named_as_such(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "lie.dcm", np.ones((64, 64), np.uint16))
    raw = path.read_bytes()
    path.write_bytes(raw.replace(b"1.2.840.10008.1.2.1\x00", b"1.2.840.10008.1.2.2\x00", 1))  # says big endian
    with pytest.raises(InvalidImageError, match="lie.dcm: .*Big Endian"):
        read_scan(path)


def test_uncompressed_dicom_decode_failures_name_the_true_reason(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "cut.dcm", np.ones((64, 64), np.uint16))
    path.write_bytes(path.read_bytes()[:-3000])
    with pytest.raises(InvalidImageError) as caught:
        read_scan(path)
    assert "not supported" not in str(caught.value) and "cut.dcm" in str(caught.value)


def test_noise_pictures_are_refused() -> None:
    from braintumor.inference.predict import load_model

    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 256, (16, 16), dtype=np.uint8) for _ in range(20)]
    results = load_model().predict(noise)
    assert all(r.not_brain_mri for r in results), [round(r.confidence, 3) for r in results if not r.not_brain_mri]


# Seeded and bounded: the same examples on every run, seconds not minutes, whatever the machine's load.
FUZZ = {"deadline": None, "derandomize": True, "suppress_health_check": list(HealthCheck)}


@settings(max_examples=40, **FUZZ)
@given(
    keyword=st.sampled_from(["RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth", "Rows",
                             "Columns", "BitsAllocated", "NumberOfFrames", "PhotometricInterpretation",
                             "SamplesPerPixel", "PixelSpacing"]),
    value=st.one_of(
        st.text(max_size=12), st.integers(-(2**31), 2**31 - 1).map(str), st.sampled_from(["0", "-1", "1e308", "nan"])
    ),
)
def test_fuzzed_dicom_header_values_end_in_a_result_or_one_line(tmp_path: Path, keyword: str, value: str) -> None:
    path = _dicom_with(tmp_path, "fuzz.dcm", **{keyword: value})
    try:
        slices = read_scan(path)
    except InvalidImageError as exc:
        assert "\n" not in str(exc) and "fuzz.dcm" in str(exc)
    else:
        assert all(s.pixels.dtype == np.uint8 for s in slices)


@settings(max_examples=60, **FUZZ)
@given(data=st.binary(max_size=2048), name=st.sampled_from(["x.jpg", "x.png", "x.dcm", "x.nii", "x.nii.gz", "x"]))
def test_fuzzed_bytes_end_in_a_result_or_one_line(data: bytes, name: str) -> None:
    try:
        read_scan(data, name)
    except InvalidImageError as exc:
        assert "\n" not in str(exc) and str(exc).startswith(name)


def test_bounded_inflate_refuses_at_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(medical, "MAX_INFLATED_BYTES", 1000)
    assert medical.inflate(gzip.compress(b"a" * 1000), "x", 31) == b"a" * 1000
    raw = zlib.compressobj(wbits=-15)
    assert medical.inflate(raw.compress(b"b" * 1000) + raw.flush(), "x", -15) == b"b" * 1000
    with pytest.raises(InvalidImageError, match="more than the limit"):
        medical.inflate(gzip.compress(b"a" * 1001), "x", 31)
