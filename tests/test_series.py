"""DICOM series: grouping by study and series, anatomical order, plane and sequence from the
header, the verdict rules that depend on them, and the SR and Secondary Capture of --dicom-out."""

from __future__ import annotations

import json
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from typer.testing import CliRunner

from braintumor.cli import app
from braintumor.data.series import plane_of, sequence_of, slice_normal
from braintumor.inference.results import series_result
from braintumor.pacs.report import SCHEME, VERDICT
from braintumor.pacs.sample import write_series
from conftest import EXAMPLES, local_client

runner = CliRunner()
# Two confident glioma slices between confident normal ones (shipped model; examples/scans/README.md).
GLIOMA_SERIES = [EXAMPLES / "notumor" / "Te-no_0229.jpg", EXAMPLES / "glioma" / "Te-glTr_0006.jpg",
                 EXAMPLES / "glioma" / "Te-gl_0010.jpg", EXAMPLES / "notumor" / "Te-no_0292.jpg"]


@pytest.fixture(scope="module")
def glioma_series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_series(GLIOMA_SERIES, tmp_path_factory.mktemp("series"))


def _predict_json(*arguments: str) -> list[dict]:
    result = runner.invoke(app, ["predict", *arguments, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_files_of_a_series_are_put_back_in_order_and_judged_once(glioma_series: list[Path]) -> None:
    folder = glioma_series[0].parent
    assert [p.name for p in glioma_series] != sorted(p.name for p in glioma_series)  # names do not give the order
    objects = _predict_json(str(folder))
    [series] = [o for o in objects if o.get("kind") == "series"]
    assert series["label"] == "glioma" and series["plane"] == "axial" and series["sequence"] == "T1C"
    summary = series["summary"]
    assert summary["n_slices"] == 4 and summary["key_slices"] == [1, 2]
    assert summary["key_paths"] == [str(glioma_series[1]), str(glioma_series[2])]
    assert summary["description"] == "AX T1 POST GD" and summary["sequence_from"] == "SeriesDescription"
    source = pydicom.dcmread(glioma_series[0], stop_before_pixels=True)
    assert summary["series_instance_uid"] == source.SeriesInstanceUID
    assert all(o["series_instance_uid"] == source.SeriesInstanceUID for o in objects if o.get("kind") != "series")


def test_two_series_in_one_folder_get_two_verdicts(tmp_path: Path) -> None:
    write_series(GLIOMA_SERIES, tmp_path / "a", seed=1)
    write_series(GLIOMA_SERIES[::-1][:3], tmp_path / "b", description="AX T2 TSE", seed=2)
    objects = _predict_json(str(tmp_path))
    verdicts = {o["summary"]["n_slices"]: o for o in objects if o.get("kind") == "series"}
    assert set(verdicts) == {4, 3} and verdicts[3]["sequence"] == "T2"


def _header(**tags: object) -> Dataset:
    dataset = Dataset()
    for keyword, value in tags.items():
        setattr(dataset, keyword, value)
    return dataset


@pytest.mark.parametrize(
    ("tags", "expected"),
    [
        ({"SeriesDescription": "AX T1 POST GD"}, ("T1C", "SeriesDescription")),
        ({"SeriesDescription": "Ax T1+C MPRAGE"}, ("T1C", "SeriesDescription")),
        ({"SeriesDescription": "AX FLAIR POST"}, ("FLAIR", "SeriesDescription")),
        ({"SeriesDescription": "COR T2 TSE"}, ("T2", "SeriesDescription")),
        ({"SeriesDescription": "sag t1_mprage"}, ("T1", "SeriesDescription")),
        ({"SeriesDescription": "ep2d_diff_3scan_trace"}, ("DWI", "SeriesDescription")),
        ({"SeriesDescription": "3-plane localizer"}, ("localizer", "SeriesDescription")),
        ({"SeriesDescription": "ep2d_mddw_20"}, ("DWI", "SeriesDescription")),
        ({"SeriesDescription": "AX T2", "DiffusionBValue": 1000}, ("DWI", "diffusion tags")),
        ({"SeriesDescription": "Series 5", "ImageType": ["DERIVED", "PRIMARY", "ADC"]}, ("ADC", "diffusion tags")),
        ({"RepetitionTime": 9000, "EchoTime": 90, "InversionTime": 2500, "ScanningSequence": "IR"},
         ("FLAIR", "acquisition tags")),
        ({"RepetitionTime": 500, "EchoTime": 12, "ContrastBolusAgent": "Gadovist"}, ("T1C", "acquisition tags")),
        ({"RepetitionTime": 4000, "EchoTime": 100}, ("T2", "acquisition tags")),
        ({"SeriesDescription": "Series 3"}, ("unknown", "")),
    ],
)
def test_the_sequence_is_read_from_the_description_else_the_acquisition_tags(tags: dict, expected: tuple) -> None:
    assert sequence_of(_header(**tags)) == expected


@pytest.mark.parametrize(
    ("orientation", "description", "plane"),
    [
        ([1, 0, 0, 0, 1, 0], "", "axial"),
        ([1, 0, 0, 0, 0, -1], "", "coronal"),
        ([0, 1, 0, 0, 0, -1], "", "sagittal"),
        ([1, 0, 0, 0, 0.7071, 0.7071], "", "oblique"),
        (None, "SAG T1", "sagittal"),
        (None, "", "unknown"),
    ],
)
def test_the_plane_comes_from_the_orientation_else_the_description(orientation, description: str, plane: str) -> None:
    assert plane_of(slice_normal(orientation) if orientation else None, description) == plane


def _slices(labels: list[str], sequence: str, positions: list[float] | None = None) -> list:
    from braintumor.data.series import DicomRef
    from braintumor.inference.results import Prediction

    positions = positions or [float(-k) for k in range(len(labels))]
    refs = [DicomRef("1.2", "1.2.3", f"1.2.3.{k}", None, k, None, positions[k], "", "axial", sequence, "test")
            for k in range(len(labels))]
    return [Prediction(f"{k}.dcm", label, 0.999, uncertain=False, not_brain_mri=False, outside_validated_range=False,
                       dicom=ref) for k, (label, ref) in enumerate(zip(labels, refs, strict=True))]


@pytest.mark.parametrize(
    ("labels", "sequence", "verdict", "reason"),
    [
        (["notumor"] * 4, "T1C", "notumor", "no tumour on 4 of 4"),
        (["notumor"] * 4, "T2", "indeterminate", "no T2 tumour slices"),
        (["notumor"] * 4, "FLAIR", "indeterminate", "cannot rule one out"),
        (["notumor", "glioma", "glioma", "notumor"], "T2", "glioma", "2 adjacent"),
        (["glioma", "glioma", "glioma"], "DWI", "indeterminate", "never trained on"),
    ],
)
def test_a_verdict_depends_on_what_the_training_data_covers(labels, sequence, verdict, reason) -> None:
    summary = series_result(_slices(labels, sequence)).summary()
    assert summary["label"] == verdict and reason in summary["reason"]


@pytest.mark.parametrize(
    ("labels", "positions", "verdict"),
    [
        # two echoes (or a repeat) of one place are one location, not two adjacent slices
        (["notumor", "glioma", "glioma", "notumor"], [0.0, 5.0, 5.0, 10.0], "indeterminate"),
        # a place whose slices disagree is not confident
        (["glioma", "glioma", "notumor", "glioma"], [0.0, 5.0, 5.0, 10.0], "indeterminate"),
        # slices missing between 10 and 25 mm: the two glioma slices are not neighbours
        (["notumor", "notumor", "glioma", "glioma", "notumor"], [0.0, 5.0, 10.0, 25.0, 30.0], "indeterminate"),
        (["notumor", "notumor", "notumor", "glioma", "glioma"], [0.0, 5.0, 10.0, 25.0, 30.0], "glioma"),
    ],
)
def test_adjacent_means_neighbouring_places_along_the_normal(labels, positions, verdict) -> None:
    assert series_result(_slices(labels, "T1C", positions)).summary()["label"] == verdict


def test_slices_are_ordered_by_position_along_the_normal() -> None:
    slices = _slices(["glioma", "notumor", "glioma", "notumor"], "T1C")  # positions 0, -1, -2, -3
    summary = series_result(slices).summary()
    assert summary["classes"]["glioma"]["slices"] == [1, 3]  # reversed: no two glioma slices adjacent
    assert summary["label"] == "indeterminate"


def test_dicom_out_writes_an_sr_and_a_secondary_capture_in_the_source_study(
    glioma_series: list[Path], tmp_path: Path
) -> None:
    out = tmp_path / "results"
    result = runner.invoke(app, ["predict", str(glioma_series[0].parent), "--dicom-out", str(out)])
    assert result.exit_code == 0, result.output
    source = [pydicom.dcmread(p, stop_before_pixels=True) for p in glioma_series]
    written = sorted((out / source[0].StudyInstanceUID).glob("*.dcm"))
    by_modality = {pydicom.dcmread(p).Modality: p for p in written}
    assert set(by_modality) == {"SR", "OT"}
    report = hd.sr.srread(by_modality["SR"])
    assert report.StudyInstanceUID == source[0].StudyInstanceUID and report.PatientID == source[0].PatientID
    [group] = report.content.get_image_measurement_groups()
    assert group.finding_type.value == "glioma" and group.finding_type.scheme_designator == SCHEME
    [verdict] = group.get_qualitative_evaluations(name=VERDICT)
    assert verdict.value.value == "glioma"
    assert {i.referenced_sop_instance_uid for i in group.source_images} == {
        source[1].SOPInstanceUID, source[2].SOPInstanceUID
    }
    measured = {m.name.meaning: m.value for m in group.get_measurements()}
    assert measured["Slices in the series"] == 4 and 0.4 < measured["Probability of Glioma"] < 0.6
    texts = " | ".join(str(e.value) for e in report.iterall() if e.keyword == "TextValue")
    assert "sha256 " in texts and "glioma on 2 adjacent confident slices (1, 2)" in texts
    capture = pydicom.dcmread(by_modality["OT"])
    assert capture.StudyInstanceUID == source[0].StudyInstanceUID and capture.pixel_array.shape[2] == 3
    assert capture.pixel_array.std() > 10  # a picture, not a blank
    again = tmp_path / "again"
    runner.invoke(app, ["predict", str(glioma_series[0].parent), "--dicom-out", str(again)])
    assert sorted(p.name for p in (again / source[0].StudyInstanceUID).glob("*.dcm")) == [p.name for p in written]


def test_dicom_out_says_why_a_volume_gets_no_dicom_results(tmp_path: Path) -> None:
    import nibabel as nib

    volume = tmp_path / "head.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((24, 24, 3)).astype(np.float32), np.eye(4)), volume)
    result = runner.invoke(app, ["predict", str(volume), "--dicom-out", str(tmp_path / "out")])
    assert result.exit_code == 0 and "not DICOM, so no DICOM results" in result.stderr
    assert not (tmp_path / "out").exists()


def test_the_service_judges_a_series_uploaded_as_separate_files(glioma_series: list[Path]) -> None:

    from braintumor.inference.predict import load_model
    from braintumor.serving.app import create_app

    with local_client(create_app(load_model())) as client:
        uploads = [("files", (p.name, p.read_bytes(), "application/dicom")) for p in reversed(glioma_series)]
        objects = client.post("/v1/predict", files=uploads).json()
    [series] = [o for o in objects if o.get("kind") == "series"]
    assert series["label"] == "glioma" and series["summary"]["key_paths"] == [p.name for p in glioma_series[1:3]]
    assert series["path"].startswith("series 1.") and series["sequence"] == "T1C"


def test_an_enhanced_multi_frame_header_gives_each_frame_its_position() -> None:
    from pydicom.sequence import Sequence

    from braintumor.data.series import dicom_refs

    def group(**items: Dataset) -> Dataset:
        return _header(**{k: Sequence([v]) for k, v in items.items()})

    header = _header(SeriesInstanceUID="1.2.3", SeriesDescription="T1 post contrast", NumberOfFrames=3)
    header.SharedFunctionalGroupsSequence = Sequence([group(PlaneOrientationSequence=_header(
        ImageOrientationPatient=[1, 0, 0, 0, 0, -1]))])
    header.PerFrameFunctionalGroupsSequence = Sequence([
        group(PlanePositionSequence=_header(ImagePositionPatient=[0, y, 0])) for y in (10.0, -5.0, 0.0)
    ])
    refs = dicom_refs(header, 3)
    assert [r.frame for r in refs] == [0, 1, 2] and [r.position for r in refs] == [10.0, -5.0, 0.0]
    assert {(r.plane, r.sequence) for r in refs} == {("coronal", "T1C")}


def test_a_slice_given_twice_does_not_pass_for_two_adjacent_slices(glioma_series: list[Path]) -> None:
    lone = str(glioma_series[1])  # one confident glioma slice, named twice
    [series] = [o for o in _predict_json(lone, lone) if o.get("kind") == "series"]
    assert series["label"] == "indeterminate" and series["summary"]["n_slices"] == 1
    objects = _predict_json(lone, str(glioma_series[0].parent))
    [series] = [o for o in objects if o.get("kind") == "series"]
    assert series["summary"]["n_slices"] == 4 and series["summary"]["key_slices"] == [1, 2]


def test_a_multi_frame_series_is_referenced_once_with_its_key_frames(tmp_path: Path) -> None:
    from PIL import Image

    from conftest import write_dicom

    frames = np.stack([np.asarray(Image.open(p).convert("L")) for p in GLIOMA_SERIES])  # all 224 x 224
    path = write_dicom(tmp_path / "enhanced.dcm", frames.astype(np.uint16))
    dataset = pydicom.dcmread(path)
    dataset.StudyInstanceUID, dataset.SeriesInstanceUID = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    dataset.PatientID, dataset.SeriesDescription, dataset.PixelSpacing = "P1", "AX T1 +C", [1.0, 1.0]
    dataset.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    dataset.SOPClassUID = dataset.file_meta.MediaStorageSOPClassUID = pydicom.uid.EnhancedMRImageStorage
    dataset.save_as(path)
    result = runner.invoke(app, ["predict", str(path), "--dicom-out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    [report_path] = [p for p in (tmp_path / "out").rglob("*.dcm") if pydicom.dcmread(p).Modality == "SR"]
    [group] = hd.sr.srread(report_path).content.get_image_measurement_groups()
    [source] = group.source_images
    assert group.finding_type.value == "glioma" and source.referenced_frame_numbers == [2, 3]


def test_a_series_without_orientation_gets_its_sr_and_says_why_there_is_no_capture(tmp_path: Path) -> None:
    files = write_series(GLIOMA_SERIES, tmp_path / "series")
    for path in files:
        dataset = pydicom.dcmread(path)
        del dataset.ImageOrientationPatient
        dataset.save_as(path)
    result = runner.invoke(app, ["predict", str(tmp_path / "series"), "--dicom-out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "no Secondary Capture: the source gives no ImageOrientationPatient" in result.stderr
    assert [pydicom.dcmread(p).Modality for p in (tmp_path / "out").rglob("*.dcm")] == ["SR"]


def test_dicom_out_refuses_a_study_uid_that_would_leave_the_folder(glioma_series: list[Path], tmp_path: Path) -> None:
    folder = tmp_path / "series"
    folder.mkdir()
    for path in glioma_series:
        dataset = pydicom.dcmread(path)
        dataset.StudyInstanceUID = "../../escaped"
        dataset.save_as(folder / path.name)
    result = runner.invoke(app, ["predict", str(folder), "--dicom-out", str(tmp_path / "out" / "inner")])
    assert result.exit_code == 1 and "is not a valid DICOM UID" in result.stderr
    assert not list(tmp_path.rglob("escaped"))
