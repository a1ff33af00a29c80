"""``braintumor dicom-node``: a DICOM listener (C-ECHO, C-STORE) that classifies each series once
it is complete and sends its results (an SR and a Grad-CAM Secondary Capture, ``report``) back to
a PACS by C-STORE or STOW-RS (``destinations``).

A series is complete when it has received nothing for ``quiet_seconds`` (and, after a restart,
not before ``quiet_seconds`` from the restart: the sender may be sending the rest). An instance is
acknowledged only once it is on disk (``queue.SeriesQueue``); results are on disk before they are
sent and are forgotten only once the destination has stored them, so killing the node at any
moment loses no series: on start it classifies what it had received and sends what it had not
sent. A series that cannot be classified is logged with its reason and set aside; the node goes
on. Results that cannot be sent stay queued and are tried again every ``retry_seconds``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data.dicom_series import read_dicom_series
from ..data.inputs import expand_inputs
from ..data.medical import MAX_INPUT_SLICES, dicom_header
from ..errors import BraintumorError, InvalidImageError, one_line
from ..inference.predict import Classifier
from ..inference.results import SeriesResult
from .destinations import Destination, SendError
from .queue import QueueError, SeriesFull, SeriesQueue
from .report import MANUFACTURER, ModelIdentity, SeriesResults, dicom_results

log = logging.getLogger("braintumor.dicom_node")

# C-STORE statuses (PS3.4 B.2.3): out of resources, cannot understand.
OUT_OF_RESOURCES, CANNOT_UNDERSTAND = 0xA700, 0xC000


@dataclass(frozen=True)
class NodeSettings:
    """Where the node listens, how it decides a series is complete, and whom it accepts."""

    queue: Path
    ae_title: str = "BRAINTUMOR"
    host: str = "127.0.0.1"
    port: int = 11112
    quiet_seconds: float = 10.0
    retry_seconds: float = 30.0
    keep_seconds: float = 24 * 3600.0
    allowed_callers: tuple[str, ...] = ()  # calling AE titles accepted (empty: any)
    poll_seconds: float = 0.5
    min_free_bytes: int = 1 << 30  # below this much free disk, instances are refused (out of resources)
    max_series_instances: int = MAX_INPUT_SLICES  # instances of one series waiting; more are refused


class SeriesFailed(BraintumorError):
    """A series that cannot be classified: none of its instances is a readable image."""


class DicomNode:
    """The listener and the worker thread that classifies quiet series and sends their results."""

    def __init__(self, classifier: Classifier, destination: Destination, settings: NodeSettings):
        self.classifier = classifier
        self.destination = destination
        self.settings = settings
        self.queue = SeriesQueue(settings.queue)
        self.model = ModelIdentity.of(classifier)
        self._stop = threading.Event()
        self._server: Any = None
        self._threads: list[threading.Thread] = []
        self._series_locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._retry_at: dict[str, float] = {}  # outbox folder -> when to try sending it again
        self._listening_since = 0.0  # a series received before a restart waits a quiet period from here

    # ------------------------------------------------------------- listening

    def start(self) -> None:
        """Listen, and start the worker (which first finishes what a previous run left)."""
        from pynetdicom import AE, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification

        self.queue.lock()
        ae = AE(ae_title=self.settings.ae_title)
        ae.require_called_aet = True
        if self.settings.allowed_callers:
            ae.require_calling_aet = list(self.settings.allowed_callers)
        ae.supported_contexts = AllStoragePresentationContexts
        ae.add_supported_context(Verification)
        handlers = [(evt.EVT_C_STORE, self._on_store)]
        self._server = ae.start_server((self.settings.host, self.settings.port), block=False, evt_handlers=handlers)
        self.classifier.model  # noqa: B018 - load the Grad-CAM network now, not inside the first series
        self._listening_since = time.time()
        self._threads = [threading.Thread(target=self._work, name="dicom-node-worker", daemon=True),
                         threading.Thread(target=self._send, name="dicom-node-sender", daemon=True)]
        for thread in self._threads:
            thread.start()
        log.info("listening as %s on %s:%d; results go to %s", self.settings.ae_title, self.settings.host,
                 self.settings.port, self.destination)

    def request_stop(self) -> None:
        """Ask ``wait`` to return (safe from a signal handler)."""
        self._stop.set()

    def stop(self, seconds: float = 3.0) -> None:
        """Stop listening, and give the worker and the sender ``seconds`` to finish what they are on.
        Whatever is cut short is safe on disk: a series still in work is classified again at the
        next start, and results not recorded as sent are sent again (same UIDs: a PACS keeps one)."""
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
        deadline = time.monotonic() + seconds
        for thread in self._threads:
            thread.join(timeout=max(deadline - time.monotonic(), 0.0))
        self.queue.unlock()

    def wait(self) -> None:
        """Block until ``request_stop`` or ``stop`` is called (a signal handler, another thread)."""
        while not self._stop.wait(0.5):
            pass

    def _on_store(self, event: Any) -> int:
        """Acknowledge an instance only once it is on disk; our own results are not queued again.
        The instance's header is read from the bytes as received, within the input budget
        (``medical.dicom_header``): pynetdicom's own decoding would inflate a deflated dataset
        without limit."""
        encoded = event.encoded_dataset()
        try:
            dataset = dicom_header(encoded, f"C-STORE from {_caller(event)}")
        except InvalidImageError as exc:
            log.error("%s", exc)
            return CANNOT_UNDERSTAND
        if str(dataset.get("Manufacturer", "")) == MANUFACTURER:
            return 0x0000  # a result of ours, sent back to us by a routing rule: nothing to classify
        if self.queue.free_bytes() < self.settings.min_free_bytes:
            log.error("C-STORE from %s refused: less than %d MiB free for the queue", _caller(event),
                      self.settings.min_free_bytes >> 20)
            return OUT_OF_RESOURCES
        try:
            self.queue.store(dataset.get("StudyInstanceUID"), dataset.get("SeriesInstanceUID"),
                             dataset.get("SOPInstanceUID"), encoded, self.settings.max_series_instances)
        except SeriesFull as exc:
            log.error("C-STORE from %s refused: %s", _caller(event), exc)
            return OUT_OF_RESOURCES
        except QueueError as exc:
            log.error("C-STORE from %s refused: %s", _caller(event), exc)
            return CANNOT_UNDERSTAND
        except OSError as exc:
            log.error("C-STORE from %s: cannot write to the queue (%s)", _caller(event), exc.strerror)
            return OUT_OF_RESOURCES
        return 0x0000

    # ------------------------------------------------------------- working

    def _work(self) -> None:
        """The worker thread: what a crash left first, then a pass every ``poll_seconds``. A
        failure outside any one series (a full disk) is logged and the next pass tries again."""
        self.queue.clean_staging()
        for left in list(self.queue.series_in("work")):  # a crash in the middle of a series
            self._classify(self.queue.resume(left))
        self._every_poll(self._classify_and_prune, "worker")

    def _classify_and_prune(self) -> None:
        self._classify_quiet(None)
        self.queue.prune(self.settings.keep_seconds)

    def _send(self) -> None:
        """The sender thread: results go out on their own thread, so a destination that is down or
        slow (a STOW-RS timeout) delays no series' classification."""
        self._every_poll(lambda: self._send_waiting(None), "sender")

    def _every_poll(self, task: Callable[[], None], name: str) -> None:
        while not self._stop.is_set():
            try:
                task()
            except Exception:  # noqa: BLE001 - the node must outlive any one failure
                log.exception("the %s's pass failed; trying again", name)
            self._stop.wait(self.settings.poll_seconds)

    def run_once(self, now: float | None = None) -> None:
        """One pass of both threads' work in the caller's thread: classify every quiet series, send
        what waits to be sent, forget old done and failed series."""
        self._classify_quiet(now)
        self._send_waiting(now)
        self.queue.prune(self.settings.keep_seconds, now)

    def _classify_quiet(self, now: float | None) -> None:
        for folder in self.queue.quiet(self.settings.quiet_seconds, now, self._listening_since):
            self._classify(self.queue.take(folder))

    def _series_lock(self, series: str) -> threading.Lock:
        """The lock that keeps the worker from replacing a series' results while they are sent."""
        with self._locks_guard:
            return self._series_locks.setdefault(series, threading.Lock())

    def _classify(self, work: Path) -> None:
        """One series: its results into the outbox and its images to done, or the series to failed
        with the reason. Any failure stays with this series."""
        started = time.perf_counter()
        try:
            files, result, report = self._results(work)
            with self._series_lock(work.name):
                self.queue.put_results(work, files)
            self.queue.finish(work, report)
        except Exception as exc:  # noqa: BLE001 - whatever goes wrong with one series stays with it
            reason = str(exc) if isinstance(exc, BraintumorError) else f"{type(exc).__name__}: {exc}"
            log.error("series %s failed: %s", work.name, one_line(reason))
            log.debug("%s", traceback.format_exc())
            self.queue.fail(work, reason)
            return
        log.info("series %s (%d slices, %s %s): %s (%s) in %.1f s", work.name, len(result.slices),
                 result.kind.plane, result.kind.sequence, result.verdict.label, result.verdict.reason,
                 time.perf_counter() - started)

    def _results(self, work: Path) -> tuple[dict[str, bytes], SeriesResult, bytes]:
        """(result files by name, summary.json among them; the series judged; the SR's bytes).
        Each instance is read once; the verdict and the heat map come from one classifier."""
        found, failures = read_dicom_series(expand_inputs([work]))
        if not found:
            first = failures[0].message if failures else "no instances"
            raise SeriesFailed(f"no instance of the series is a readable image ({first})")
        if len(found) > 1:
            raise SeriesFailed(f"{len(found)} series in one series folder: instances without matching UIDs")
        [series] = found
        result = self.classifier.predict_series(series, explain=self.classifier.model is not None)
        results = dicom_results(series, result, self.model, previous=self.queue.previous_reports(work))
        files = {f"{d.SOPInstanceUID}.dcm": _file_bytes(d) for d in results.datasets()}
        files["summary.json"] = json.dumps(_summary_line(results, len(failures))).encode()
        return files, result, files[f"{results.sr.SOPInstanceUID}.dcm"]

    def _send_waiting(self, now: float | None) -> None:
        """Send each outbox folder whose turn has come; one that fails waits ``retry_seconds`` and
        does not hold up the others."""
        now = time.time() if now is None else now
        for outbox in list(self.queue.series_in("outbox")):
            if now < self._retry_at.get(outbox.name, 0.0):
                continue
            with self._series_lock(outbox.name):
                self._send_one(outbox, now)

    def _send_one(self, outbox: Path, now: float) -> None:
        if not outbox.is_dir():  # sent, or replaced, since the listing
            return
        try:
            self.destination.send(_read_results(outbox))
        except Exception as exc:  # noqa: BLE001 - SendError, or results damaged on disk
            reason = str(exc) if isinstance(exc, SendError) else f"{type(exc).__name__}: {exc}"
            log.error("results of series %s not sent, will try again in %.0f s: %s", outbox.name,
                      self.settings.retry_seconds, reason)
            self._retry_at[outbox.name] = now + self.settings.retry_seconds
            return
        self._retry_at.pop(outbox.name, None)
        label = self.queue.record_sent(outbox, str(self.destination))
        log.info("results of series %s (%s) sent to %s", outbox.name, label, self.destination)


def _summary_line(results: SeriesResults, unreadable: int) -> dict[str, Any]:
    """What results.jsonl keeps of a series: the verdict, what the series is, the slice counts."""
    left_out = ("path", "key_paths", "slice_paths", "classes")
    line = {k: v for k, v in results.result.summary().items() if k not in left_out}
    line["unreadable"] = unreadable
    if results.note:
        line["note"] = results.note
    return line


def _caller(event: Any) -> str:
    requestor = event.assoc.requestor
    return f"{requestor.ae_title}@{requestor.address}"


def _file_bytes(dataset: Any) -> bytes:
    import io

    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _read_results(outbox: Path) -> list[Any]:
    import pydicom

    return [pydicom.dcmread(path) for path in sorted(outbox.glob("*.dcm"))]
