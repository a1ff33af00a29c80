"""A DICOM series as data: each instance read once, one pass to the verdict and the heat map, and
DICOM results made from what was read, on the ``predict --dicom-out`` and DICOM node paths."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from typer.testing import CliRunner

from braintumor.cli import app
from braintumor.data import inputs as inputs_module
from braintumor.data.dicom_series import read_dicom_series
from braintumor.inference.predict import default_weights_path, load_model
from braintumor.models import checkpoint
from braintumor.pacs.node import DicomNode, NodeSettings
from braintumor.pacs.report import NO_HEATMAP, ModelIdentity, dicom_results
from braintumor.pacs.sample import write_series
from conftest import EXAMPLES, write_dicom

runner = CliRunner()
GLIOMA_SERIES = [EXAMPLES / "notumor" / "Te-no_0229.jpg", EXAMPLES / "glioma" / "Te-glTr_0006.jpg",
                 EXAMPLES / "glioma" / "Te-gl_0010.jpg", EXAMPLES / "notumor" / "Te-no_0292.jpg"]


class Count:
    """Calls of one function, counted and passed through."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, owner: Any, name: str):
        self.calls = 0
        original = getattr(owner, name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)


@pytest.fixture(scope="module")
def series_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_series(GLIOMA_SERIES, tmp_path_factory.mktemp("series"))


@pytest.fixture(scope="module")
def classifier() -> Any:
    return load_model(backend="torch")


def test_a_series_is_read_once_in_anatomical_order_with_its_headers(series_files: list[Path]) -> None:
    [series], failures = read_dicom_series(sorted(series_files, key=lambda p: p.name))
    assert failures == [] and len(series.instances) == 4
    assert [s.source for s in series.slices] == [str(p) for p in series_files]  # written in anatomical order
    header = series.header_of(str(series_files[1]))
    assert header.SOPInstanceUID == pydicom.dcmread(series_files[1], stop_before_pixels=True).SOPInstanceUID
    assert "PixelData" not in header  # the grey slices are kept, the stored pixels are not


def test_unreadable_instances_are_named_and_the_rest_still_form_the_series(
    series_files: list[Path], tmp_path: Path
) -> None:
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(series_files[0].read_bytes()[:-5000])
    [series], [failure] = read_dicom_series([*series_files[1:], broken])
    assert len(series.instances) == 3 and failure.source == str(broken) and str(broken) in failure.message


def test_predict_series_gives_the_verdict_and_the_key_heat_map_from_one_pass(
    series_files: list[Path], classifier: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    [series], _ = read_dicom_series(series_files)
    passes = Count(monkeypatch, classifier.network, "logits_and_features")
    result = classifier.predict_series(series, explain=True)
    assert passes.calls == 1  # every slice through the network once
    assert result.verdict.label == "glioma" and result.verdict.key_slices == (1, 2)
    explanation = result.key_heatmap
    assert explanation.prediction is result.shown_slice() and explanation.target == "glioma"
    assert explanation.heatmap.shape == explanation.pixels.shape == series.slices[1].pixels.shape


def test_dicom_results_read_no_file_and_run_no_model(
    series_files: list[Path], classifier: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    [series], _ = read_dicom_series(series_files)
    result = classifier.predict_series(series, explain=True)
    reads = Count(monkeypatch, pydicom, "dcmread")
    network = Count(monkeypatch, classifier.network, "logits_and_features")
    results = dicom_results(series, result, ModelIdentity.of(classifier))
    assert reads.calls == 0 and network.calls == 0
    assert results.capture is not None and results.sr.StudyInstanceUID == series.study_uid
    assert "PixelData" not in series.header_of(str(series_files[1]))  # the source header was not changed


def test_predict_dicom_out_reads_each_instance_once(
    series_files: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads = Count(monkeypatch, pydicom, "dcmread")
    scans = Count(monkeypatch, inputs_module, "read_scan")
    result = runner.invoke(app, ["predict", str(series_files[0].parent), "--dicom-out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert reads.calls == len(series_files) and scans.calls == 0
    assert len(list((tmp_path / "out").rglob("*.dcm"))) == 2  # the SR and the Secondary Capture


def test_the_node_reads_each_instance_once_and_hashes_the_weights_once(
    series_files: list[Path], classifier: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[Any] = []
    destination = type("Recorder", (), {"send": lambda self, datasets: sent.extend(datasets)})()
    node = DicomNode(classifier, destination, NodeSettings(tmp_path / "queue", quiet_seconds=5.0))
    for path in series_files:
        header = pydicom.dcmread(path, stop_before_pixels=True)
        node.queue.store(header.StudyInstanceUID, header.SeriesInstanceUID, header.SOPInstanceUID, path.read_bytes())
    reads = Count(monkeypatch, pydicom, "dcmread")
    node.run_once(now=time.time() + 10)
    assert {d.Modality for d in sent} == {"SR", "OT"}
    assert reads.calls == len(series_files) + len(sent)  # the instances once, then the results to send
    checkpoint._sha256_of.cache_clear()
    for _ in range(3):
        ModelIdentity.of(classifier)
    assert checkpoint._sha256_of.cache_info().misses == 1  # the weights file is hashed once per process


def test_dicom_out_names_a_series_without_a_series_uid_once_by_its_reason(tmp_path: Path) -> None:
    scan = write_dicom(tmp_path / "frames.dcm", np.stack([np.eye(64) * 900, np.ones((64, 64)) * 300]))
    assert "SeriesInstanceUID" not in pydicom.dcmread(scan, stop_before_pixels=True)
    result = runner.invoke(app, ["predict", str(scan), "--dicom-out", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "need a DICOM series with a SeriesInstanceUID" in result.output and "not DICOM" not in result.output
    assert "results of 1 series could not be written" in result.output
    assert "could not be classified" not in result.output
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("*.dcm"))


def test_dicom_out_with_an_onnx_file_writes_the_sr_and_says_why_there_is_no_picture(
    series_files: list[Path], tmp_path: Path
) -> None:
    onnx = default_weights_path().with_suffix(".onnx")
    out = tmp_path / "out"
    arguments = ["predict", str(series_files[0].parent), "--dicom-out", str(out), "--weights", str(onnx)]
    result = runner.invoke(app, arguments)
    assert result.exit_code == 0, result.output
    [sr] = list(out.rglob("*.dcm"))
    assert pydicom.dcmread(sr).Modality == "SR" and NO_HEATMAP in result.output


def test_a_hash_sign_in_a_folder_name_is_part_of_the_path(tmp_path: Path) -> None:
    files = write_series(GLIOMA_SERIES, tmp_path / "MR #1")
    out = tmp_path / "out"
    result = runner.invoke(app, ["predict", str(files[0].parent), "--dicom-out", str(out)])
    assert result.exit_code == 0, result.output
    assert len(list(out.rglob("*.dcm"))) == 2 and f"DICOM results of {files[0].parent}:" in result.output
