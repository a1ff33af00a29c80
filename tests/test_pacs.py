"""The DICOM node with a real PACS in the loop: Debian's Orthanc, started here on loopback ports with
a throw-away configuration and storage folder. A series goes into Orthanc, Orthanc routes it to
``braintumor dicom-node`` (a separate process), and the SR and Secondary Capture must come back
into the same study with the right class. Also: a node killed in the middle of a series loses
nothing, a bad series is set aside with its reason, and results that cannot be sent are kept.

``.ci/run`` installs Orthanc and sets BRAINTUMOR_REQUIRE_ORTHANC=1, so there a missing Orthanc
fails these tests instead of skipping them.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import highdicom as hd
import httpx
import pydicom
import pytest
from orthanc import DICOMWEB_PLUGIN, Orthanc, free_port, throwaway_orthanc, wait_for

from braintumor.errors import ConfigError
from braintumor.inference.predict import load_model
from braintumor.pacs.destinations import CStoreDestination, SendError, parse_destination
from braintumor.pacs.node import DicomNode, NodeSettings
from braintumor.pacs.queue import QueueError, SeriesQueue
from braintumor.pacs.sample import write_series
from conftest import EXAMPLES

pytestmark = pytest.mark.slow  # subprocesses, servers or the real data: minutes of CPU in all

GLIOMA_SERIES = [EXAMPLES / "notumor" / "Te-no_0229.jpg", EXAMPLES / "glioma" / "Te-glTr_0006.jpg",
                 EXAMPLES / "glioma" / "Te-gl_0010.jpg", EXAMPLES / "notumor" / "Te-no_0292.jpg"]


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    if shutil.which("Orthanc") is None:
        if os.environ.get("BRAINTUMOR_REQUIRE_ORTHANC"):
            pytest.fail("Orthanc is not installed (apt-get install orthanc orthanc-dicomweb)")
        pytest.skip("Orthanc is not installed")
    with throwaway_orthanc(tmp_path_factory.mktemp("orthanc"), node_port=free_port()) as server:
        yield server


def _echo(port: int) -> bool:
    from pynetdicom import AE

    ae = AE(ae_title="TEST")
    ae.add_requested_context("1.2.840.10008.1.1")
    association = ae.associate("127.0.0.1", port, ae_title="BRAINTUMOR")
    if not association.is_established:
        return False
    status = association.send_c_echo()
    association.release()
    return getattr(status, "Status", None) == 0x0000


@pytest.fixture()
def start_node(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen]]:
    """Starts ``braintumor dicom-node`` processes (killed at the end), each ready to answer C-ECHO."""
    processes: list[subprocess.Popen] = []

    def start(queue: Path, send_to: str, port: int, quiet: float = 1.0) -> subprocess.Popen:
        command = [sys.executable, "-m", "braintumor", "dicom-node", "--queue", str(queue), "--send-to", send_to,
                   "--port", str(port), "--quiet-seconds", str(quiet), "--retry-seconds", "1"]
        log = open(tmp_path / f"node-{len(processes)}.log", "w")  # noqa: SIM115 - closed with the process
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        processes.append(process)
        wait_for(lambda: process.poll() is not None or _echo(port), 60, "the node to listen")
        assert process.poll() is None, (tmp_path / f"node-{len(processes) - 1}.log").read_text()
        return process

    yield start
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)


def _results_in_orthanc(orthanc: Orthanc, study_uid: str) -> dict[str, dict]:
    """The study's series by modality, once the SR and the Secondary Capture are both there."""
    def ready() -> dict[str, dict] | None:
        by_modality = {s["MainDicomTags"].get("Modality"): s for s in orthanc.study_series(study_uid)}
        return by_modality if {"SR", "OT"} <= set(by_modality) else None

    return wait_for(ready, 40, "the node's results in Orthanc")


def _verdict(report_bytes: bytes) -> tuple[str, dict[str, float]]:
    report = hd.sr.srread(io.BytesIO(report_bytes))
    [group] = report.content.get_image_measurement_groups()
    return group.finding_type.value, {m.name.meaning: m.value for m in group.get_measurements()}


def test_orthanc_routes_a_series_to_the_node_and_gets_the_results_in_the_study(
    orthanc: Orthanc, start_node: Callable, tmp_path: Path
) -> None:
    files = write_series(GLIOMA_SERIES, tmp_path / "series")
    files.append(_pydicom_sample_in(files, tmp_path / "series" / "sample.dcm"))
    series_id = orthanc.upload(files)
    start_node(tmp_path / "queue", f"ORTHANC@127.0.0.1:{orthanc.dicom_port}", orthanc.node_port)
    job = httpx.post(f"{orthanc.http}/modalities/braintumor/store", json=series_id, timeout=30).json()
    assert job["InstancesCount"] == 5 and job["FailedInstancesCount"] == 0
    source = pydicom.dcmread(files[0], stop_before_pixels=True)
    results = _results_in_orthanc(orthanc, source.StudyInstanceUID)
    label, measured = _verdict(orthanc.instance_file(results["SR"]))
    assert label == "glioma" and measured["Slices in the series"] == 5
    assert measured["Slices refused as not brain MRI"] == 1  # pydicom's 20 mm MR sample is no whole brain slice
    capture = pydicom.dcmread(io.BytesIO(orthanc.instance_file(results["OT"])))
    assert capture.StudyInstanceUID == source.StudyInstanceUID and capture.PatientID == source.PatientID
    log = tmp_path / "queue" / "results.jsonl"  # written just after the destination confirmed
    sent = wait_for(lambda: log.exists() and [json.loads(line) for line in log.read_text().splitlines()], 10,
                    "results.jsonl")
    assert [s["label"] for s in sent] == ["glioma"] and sent[0]["key_slices"] == [1, 2]


def _pydicom_sample_in(series: list[Path], path: Path) -> Path:
    """pydicom's own MR sample file (its pixels and header) made the next slice of ``series``."""
    from pydicom.data import get_testdata_file

    sample, last = pydicom.dcmread(get_testdata_file("MR_small.dcm")), pydicom.dcmread(series[-1])
    sample.StudyInstanceUID, sample.SeriesInstanceUID = last.StudyInstanceUID, last.SeriesInstanceUID
    sample.SOPInstanceUID = sample.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    sample.ImagePositionPatient = [*last.ImagePositionPatient[:2], last.ImagePositionPatient[2] + 5]
    sample.SeriesDescription, sample.InstanceNumber = last.SeriesDescription, last.InstanceNumber + 1
    sample.save_as(path)
    return path


def _c_store(port: int, files: list[Path]) -> None:
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import AE

    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(pydicom.dcmread(files[0], stop_before_pixels=True).SOPClassUID, ExplicitVRLittleEndian)
    association = ae.associate("127.0.0.1", port, ae_title="BRAINTUMOR")
    assert association.is_established
    for path in files:
        assert association.send_c_store(pydicom.dcmread(path)).Status == 0x0000
    association.release()


def test_a_node_killed_mid_series_loses_nothing(orthanc: Orthanc, start_node: Callable, tmp_path: Path) -> None:
    """Half a series arrives, the node is killed (SIGKILL: no clean-up), a new node gets the rest:
    the verdict covers all six slices, sent by STOW-RS through Orthanc's DICOMweb plugin."""
    if not DICOMWEB_PLUGIN.exists():
        pytest.skip("Orthanc's DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)")
    images = GLIOMA_SERIES[:1] + GLIOMA_SERIES + GLIOMA_SERIES[-1:]
    files = write_series(images, tmp_path / "series")
    queue, port, stow = tmp_path / "queue", free_port(), f"{orthanc.http}/dicom-web"
    first = start_node(queue, stow, port, quiet=30.0)
    _c_store(port, files[:3])
    first.kill()
    first.wait()
    start_node(queue, stow, port, quiet=2.0)  # the first half waits for the rest: no verdict on half a series
    _c_store(port, files[3:])
    study_uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    results = _results_in_orthanc(orthanc, study_uid)
    label, measured = _verdict(orthanc.instance_file(results["SR"]))
    assert label == "glioma" and measured["Slices in the series"] == 6
    assert len(results["SR"]["Instances"]) == 1  # no verdict was sent on half the series


# ----------------------------------------------------------------- the node without a network


class Recorder:
    """A destination that fails ``failures`` times, then keeps what it is sent."""

    def __init__(self, failures: int = 0):
        self.failures = failures
        self.sent: list[Any] = []

    def send(self, datasets: list[Any]) -> None:
        if self.failures:
            self.failures -= 1
            raise SendError("TEST@nowhere:1: association refused or no answer")
        self.sent.extend(datasets)

    def __str__(self) -> str:
        return "recorder"


def _node(tmp_path: Path, destination: Recorder) -> DicomNode:
    settings = NodeSettings(tmp_path / "queue", quiet_seconds=5.0, retry_seconds=60.0)
    return DicomNode(load_model(), destination, settings)


def _queue_files(queue: SeriesQueue, files: list[Path]) -> None:
    for path in files:
        header = pydicom.dcmread(path, stop_before_pixels=True)
        queue.store(header.StudyInstanceUID, header.SeriesInstanceUID, header.SOPInstanceUID, path.read_bytes())


def test_a_bad_series_is_set_aside_with_its_reason_and_the_next_one_is_read(tmp_path: Path) -> None:
    recorder = Recorder()
    node = _node(tmp_path, recorder)
    good = write_series(GLIOMA_SERIES, tmp_path / "good")
    bad = write_series(GLIOMA_SERIES[:2], tmp_path / "bad", seed=3)
    for path in bad:  # pixel data cut short: every instance is damaged
        path.write_bytes(path.read_bytes()[:-5000])
    _queue_files(node.queue, bad + good)
    assert node.queue.quiet(5.0) == []  # just arrived: the series may not be complete
    node.run_once(now=time.time() + 10)
    [failed] = list(node.queue.series_in("failed"))
    assert "no instance of the series is a readable image" in (failed / "error.txt").read_text()
    assert failed.name == pydicom.dcmread(bad[0], stop_before_pixels=True).SeriesInstanceUID
    assert sorted(d.Modality for d in recorder.sent) == ["OT", "SR"]


def test_results_that_cannot_be_sent_stay_queued_until_they_can(tmp_path: Path) -> None:
    recorder = Recorder(failures=1)
    node = _node(tmp_path, recorder)
    _queue_files(node.queue, write_series(GLIOMA_SERIES, tmp_path / "series"))
    later = time.time() + 10
    node.run_once(now=later)
    assert recorder.sent == [] and len(list(node.queue.series_in("outbox"))) == 1
    node.run_once(now=later + 61)
    assert len(recorder.sent) == 2 and list(node.queue.series_in("outbox")) == []
    [line] = (tmp_path / "queue" / "results.jsonl").read_text().splitlines()
    assert json.loads(line)["destination"] == "recorder"


def test_a_series_left_in_work_by_a_crash_is_classified_on_start(tmp_path: Path) -> None:
    recorder = Recorder()
    node = _node(tmp_path, recorder)
    _queue_files(node.queue, write_series(GLIOMA_SERIES, tmp_path / "series"))
    [incoming] = list(node.queue.series_in("incoming"))
    node.queue.take(incoming)  # as if the node died while classifying it
    restarted = _node(tmp_path, recorder)
    restarted._stop.set()  # the worker finishes what was left, then returns
    restarted._work()
    assert list(restarted.queue.series_in("work")) == [] and len(list(restarted.queue.series_in("outbox"))) == 1
    restarted.run_once()
    assert sorted(d.Modality for d in recorder.sent) == ["OT", "SR"]


def test_a_late_instance_makes_the_whole_series_be_read_again(tmp_path: Path) -> None:
    recorder = Recorder()
    node = _node(tmp_path, recorder)
    files = write_series(GLIOMA_SERIES, tmp_path / "series")
    _queue_files(node.queue, files[:3])
    node.run_once(now=time.time() + 10)
    _queue_files(node.queue, files[3:])
    node.run_once(now=time.time() + 10)
    reports = [d for d in recorder.sent if d.Modality == "SR"]
    counts = [_verdict(_bytes(r))[1]["Slices in the series"] for r in reports]
    assert counts == [3, 4] and reports[0].SOPInstanceUID != reports[1].SOPInstanceUID
    assert reports[0].SeriesInstanceUID == reports[1].SeriesInstanceUID  # versions of one result, in one series
    [predecessor] = reports[1].PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence
    assert predecessor.ReferencedSOPInstanceUID == reports[0].SOPInstanceUID


def _bytes(dataset: Any) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.mark.parametrize("uid", ["../../etc", "1.2.3/4", "", "1." + "2" * 80])
def test_the_queue_refuses_uids_that_cannot_name_files_safely(tmp_path: Path, uid: str) -> None:
    queue = SeriesQueue(tmp_path / "queue")
    with pytest.raises(QueueError, match="not a valid DICOM UID"):
        queue.store("1.2.3", uid, "1.2.3.4", b"data")
    assert list((tmp_path / "queue" / "incoming").rglob("*")) == []


def test_destinations_are_parsed_or_refused_with_the_reason() -> None:
    assert parse_destination("ORTHANC@pacs.local:4242") == CStoreDestination("ORTHANC", "pacs.local", 4242)
    assert str(parse_destination("http://pacs/dicom-web/")) == "http://pacs/dicom-web"
    for bad in ("ORTHANC", "pacs:4242", "ORTHANC@pacs:99999"):
        with pytest.raises(ConfigError, match="give AE@host:port"):
            parse_destination(bad)
    for bad in ("A" * 17 + "@pacs:4242", "A\\B@pacs:4242", " @pacs:4242"):
        with pytest.raises(ConfigError, match="1 to 16 printable ASCII characters"):
            parse_destination(bad)


def test_dicom_node_refuses_bad_options_in_one_line_before_loading_the_model(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from braintumor.cli import app

    cases = [
        (["--send-to", "pacs:104"], "give AE@host:port"),
        (["--send-to", "PACS@pacs:104", "--ae-title", "A" * 17], "--ae-title"),
        (["--send-to", "PACS@pacs:104", "--allow-ae", ""], "--allow-ae"),
    ]
    for options, message in cases:
        result = CliRunner().invoke(app, ["dicom-node", "--queue", str(tmp_path / "q"), *options])
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    (tmp_path / "file").write_text("")
    result = CliRunner().invoke(app, ["dicom-node", "--queue", str(tmp_path / "file"), "--send-to", "PACS@pacs:104"])
    assert result.exit_code == 2 and "cannot create the node's queue" in result.output


def test_a_merge_cut_short_by_a_crash_is_finished_before_the_series_is_read(tmp_path: Path) -> None:
    recorder = Recorder()
    node = _node(tmp_path, recorder)
    files = write_series(GLIOMA_SERIES, tmp_path / "series")
    _queue_files(node.queue, files[:2])
    node.run_once(now=time.time() + 10)  # the first two slices are read and done
    _queue_files(node.queue, files[2:])
    [incoming] = list(node.queue.series_in("incoming"))
    node.queue.move(incoming, "work")  # the crash: done/ was not merged into work/ yet
    restarted = _node(tmp_path, recorder)
    restarted._stop.set()
    restarted._work()
    restarted.run_once()
    last = [d for d in recorder.sent if d.Modality == "SR"][-1]
    assert _verdict(_bytes(last))[1]["Slices in the series"] == 4


class Broken(Recorder):
    """Refuses the results of one series with an unexpected error; takes the others."""

    def __init__(self, refused_series: str):
        super().__init__()
        self.refused_series = refused_series

    def send(self, datasets: list[Any]) -> None:
        if any(d.Modality == "SR" and _source_series(d) == self.refused_series for d in datasets):
            raise RuntimeError("the PACS hung up")
        super().send(datasets)


def _source_series(dataset: Any) -> str:
    return str(dataset.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].SeriesInstanceUID)


def test_results_one_destination_refuses_do_not_hold_up_the_others(tmp_path: Path) -> None:
    first = write_series(GLIOMA_SERIES, tmp_path / "first", seed=1)
    second = write_series(GLIOMA_SERIES, tmp_path / "second", seed=2)
    refused = pydicom.dcmread(first[0], stop_before_pixels=True).SeriesInstanceUID
    destination = Broken(refused)
    node = _node(tmp_path, destination)
    _queue_files(node.queue, first + second)
    node.run_once(now=time.time() + 10)
    assert sorted(d.Modality for d in destination.sent) == ["OT", "SR"]  # the second series went
    [waiting] = list(node.queue.series_in("outbox"))
    assert waiting.name == refused


class FakeEvent:
    """What pynetdicom hands the C-STORE handler: the dataset, its encoding and the caller."""

    def __init__(self, dataset: Any):
        self.dataset = dataset
        self.assoc = type("Assoc", (), {"requestor": type("R", (), {"ae_title": "TEST", "address": "127.0.0.1"})})

    def encoded_dataset(self) -> bytes:
        return _bytes(self.dataset)


def test_the_store_handler_answers_with_the_right_status(tmp_path: Path) -> None:
    node = _node(tmp_path, Recorder())
    [path] = write_series(GLIOMA_SERIES[:1], tmp_path / "one")
    dataset = pydicom.dcmread(path)
    assert node._on_store(FakeEvent(dataset)) == 0x0000 and len(list(node.queue.series_in("incoming"))) == 1
    bad = pydicom.dcmread(path)
    bad.SeriesInstanceUID = "../../x"
    assert node._on_store(FakeEvent(bad)) == 0xC000
    ours = pydicom.dcmread(path)
    ours.Manufacturer, ours.SeriesInstanceUID = "braintumor", "1.2.3.4"
    assert node._on_store(FakeEvent(ours)) == 0x0000 and len(list(node.queue.series_in("incoming"))) == 1
    node.settings = NodeSettings(tmp_path / "queue", min_free_bytes=1 << 62)  # more than any disk
    assert node._on_store(FakeEvent(dataset)) == 0xA700


class RawEvent(FakeEvent):
    """A C-STORE event whose dataset must not be decoded by pynetdicom (it would inflate it whole)."""

    def __init__(self, encoded: bytes):
        self.encoded = encoded
        self.assoc = FakeEvent(None).assoc

    @property
    def dataset(self) -> Any:
        raise AssertionError("the handler asked pynetdicom to decode the dataset")

    def encoded_dataset(self) -> bytes:
        return self.encoded


def test_the_store_handler_reads_headers_within_the_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from braintumor.data import medical

    node = _node(tmp_path, Recorder())
    [path] = write_series(GLIOMA_SERIES[:1], tmp_path / "one")
    assert node._on_store(RawEvent(path.read_bytes())) == 0x0000
    monkeypatch.setattr(medical, "MAX_INFLATED_BYTES", 1 << 20)
    bomb = pydicom.dcmread(path)
    bomb.SeriesInstanceUID, bomb.PixelData = "1.2.3.5", bytes(8 << 20)  # 8 MiB of zeros, deflated to a few KiB
    bomb.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    assert len(_bytes(bomb)) < 100_000 and node._on_store(RawEvent(_bytes(bomb))) == 0xC000
    many = pydicom.dcmread(path)
    many.SeriesInstanceUID, many.NumberOfFrames = "1.2.3.6", 20_000
    assert node._on_store(RawEvent(_bytes(many))) == 0xC000
    assert [p.name for p in node.queue.series_in("incoming")] == [pydicom.dcmread(path).SeriesInstanceUID]


def test_a_series_over_the_instance_cap_is_refused_as_out_of_resources(tmp_path: Path) -> None:
    node = _node(tmp_path, Recorder())
    node.settings = NodeSettings(tmp_path / "queue", max_series_instances=2)
    files = write_series(GLIOMA_SERIES[:3], tmp_path / "three")
    answers = [node._on_store(RawEvent(p.read_bytes())) for p in files]
    assert answers == [0x0000, 0x0000, 0xA700]
    assert node._on_store(RawEvent(files[0].read_bytes())) == 0x0000  # the same instance again is no new one


def test_a_queue_is_held_by_one_node(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from braintumor.cli import app
    from braintumor.pacs.queue import QueueInUse

    first = SeriesQueue(tmp_path / "queue")
    first.lock()
    with pytest.raises(QueueInUse, match=f"in use by another node \\(pid {os.getpid()}\\)"):
        SeriesQueue(tmp_path / "queue").lock()
    result = CliRunner().invoke(app, ["dicom-node", "--queue", str(tmp_path / "queue"), "--send-to",
                                      "PACS@127.0.0.1:104", "--port", str(free_port())])
    assert result.exit_code == 2 and "in use by another node" in result.stderr
    first.unlock()
    SeriesQueue(tmp_path / "queue").lock()


class Stuck(Recorder):
    """A destination that hangs on every send until released (a STOW-RS server that is down)."""

    def __init__(self) -> None:
        super().__init__()
        import threading

        self.release = threading.Event()

    def send(self, datasets: list[Any]) -> None:
        self.release.wait(30)
        super().send(datasets)


def test_a_destination_that_hangs_delays_no_classification(tmp_path: Path) -> None:
    stuck = Stuck()
    settings = NodeSettings(tmp_path / "queue", port=free_port(), quiet_seconds=0.0, poll_seconds=0.1)
    node = DicomNode(load_model(), stuck, settings)
    node.start()
    try:
        _queue_files(node.queue, write_series(GLIOMA_SERIES[:2], tmp_path / "a", seed=1))
        wait_for(lambda: len(list(node.queue.series_in("outbox"))) == 1, 30, "the first results")  # send hangs
        _queue_files(node.queue, write_series(GLIOMA_SERIES[2:], tmp_path / "b", seed=2))
        wait_for(lambda: len(list(node.queue.series_in("done"))) == 2, 30, "the second series, classified")
        assert stuck.sent == []
        stuck.release.set()
        wait_for(lambda: not list(node.queue.series_in("outbox")), 30, "both results sent")
    finally:
        stuck.release.set()
        node.stop()
    assert len(stuck.sent) == 4  # an SR and a Secondary Capture per series
