"""The DICOM node's queue on disk: every received instance and every result is a file before it is
acknowledged or forgotten, so a node killed at any moment loses nothing when it starts again.

    incoming/<study>/<series>/<sop>.dcm  received; waiting for the series to go quiet
    work/<study>/<series>/                being classified (left here by a crash: classified again)
    outbox/<study>/<series>/              results and summary.json, waiting to be sent
    done/<study>/<series>/                classified; kept ``keep_seconds`` so that a late instance
                                          joins its series, which is then read again whole (its
                                          last SR, in .reports/, becomes the new one's predecessor)
    failed/<study>/<series>/error.txt     a series that could not be classified, with the reason
    results.jsonl                         one line per series sent: its verdict and destination

Each file is written under a temporary name, flushed to disk and renamed into place, and the folder
is synced, so what the node acknowledged survives a crash or a power cut. A series moves between
stages by renames; when a move must merge two folders (a late instance), it can be cut short by a
crash, and it is finished on start (``resume``) before the series is read. A receiving thread and
the worker thread can run at the same time.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import BraintumorError

UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)*$")
STAGES = ("incoming", "work", "outbox", "done", "failed")
REPORTS = ".reports"  # inside a series folder: the SRs written for it (hidden: never read as images)


class QueueError(BraintumorError):
    """An instance the queue refuses (its UIDs could not name files safely)."""


class SeriesFull(QueueError):
    """An instance of a series that already has the most instances a series may have waiting."""


class QueueInUse(BraintumorError):
    """Another process holds the queue."""


def check_uid(value: Any, name: str) -> str:
    """A DICOM UID (digits and dots, at most 64 characters): safe as a file name."""
    text = str(value or "").strip()
    if not UID_PATTERN.match(text) or len(text) > 64:
        raise QueueError(f"{name} {text[:80]!r} is not a valid DICOM UID")
    return text


def _sync_folder(folder: Path) -> None:
    """Make a rename or a new file in ``folder`` durable (the folder's own entry on disk)."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.part")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    _sync_folder(path.parent)


class SeriesQueue:
    """The folders of one node (see the module's docstring)."""

    def __init__(self, root: Path):
        self.root = root
        self._lock: int | None = None
        for stage in STAGES:
            (root / stage).mkdir(parents=True, exist_ok=True)

    def lock(self) -> None:
        """Hold the queue for this process until it exits (an advisory lock on ``.lock``): a second
        node started on the same queue would take series from under the first.

        Raises:
            QueueInUse: another process holds it.
        """
        import fcntl

        if self._lock is not None:
            return
        descriptor = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(descriptor, 32, 0).decode("ascii", "replace").strip() or "another process"
            os.close(descriptor)
            raise QueueInUse(f"{self.root}: the queue is in use by another node (pid {holder})") from None
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, str(os.getpid()).encode(), 0)
        self._lock = descriptor

    def unlock(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # closing the descriptor releases the lock
            self._lock = None

    def series_dir(self, stage: str, study: str, series: str) -> Path:
        return self.root / stage / study / series

    def store(self, study_uid: Any, series_uid: Any, sop_uid: Any, data: bytes, max_instances: int = 0) -> Path:
        """Write one received instance (file-format bytes); returns its path once it is on disk.
        With ``max_instances``, a new instance of a series that already has that many waiting is
        refused (``SeriesFull``)."""
        study, series = check_uid(study_uid, "StudyInstanceUID"), check_uid(series_uid, "SeriesInstanceUID")
        sop = check_uid(sop_uid, "SOPInstanceUID")
        for _ in range(3):  # the worker may move the series folder away between mkdir and rename
            folder = self.series_dir("incoming", study, series)
            folder.mkdir(parents=True, exist_ok=True)
            if max_instances and not (folder / f"{sop}.dcm").exists() and \
                    sum(1 for _ in folder.glob("*.dcm")) >= max_instances:
                raise SeriesFull(f"series {series} already has {max_instances} instances waiting")
            try:
                _write_atomically(folder / f"{sop}.dcm", data)
                os.utime(folder)  # the series' last arrival: its quiet period starts again
                return folder / f"{sop}.dcm"
            except FileNotFoundError:
                continue
        raise QueueError(f"series {series}: its folder kept moving while an instance was stored")

    def series_in(self, stage: str) -> Iterator[Path]:
        """Series folders of a stage, oldest first."""
        folders = [p for p in (self.root / stage).glob("*/*") if p.is_dir()]
        yield from sorted(folders, key=lambda p: p.stat().st_mtime)

    def quiet(self, quiet_seconds: float, now: float | None = None, since: float = 0.0) -> list[Path]:
        """Incoming series that have received nothing for ``quiet_seconds``, counted from ``since``
        at the earliest (a restarted node gives senders that were cut off time to send the rest)."""
        now = time.time() if now is None else now
        return [p for p in self.series_in("incoming") if now - max(p.stat().st_mtime, since) >= quiet_seconds]

    def move(self, folder: Path, stage: str) -> Path:
        """``folder`` (a series of any stage) moved to ``stage``, merged with what is there already."""
        target = self.series_dir(stage, folder.parent.name, folder.name)
        target.parent.mkdir(parents=True, exist_ok=True)
        source_parent = folder.parent
        _merge(folder, target)
        _sync_folder(target.parent)
        _remove_if_empty(source_parent)
        return target

    def take(self, folder: Path) -> Path:
        """An incoming series moved to work, with the images of the same series already done (a
        late instance makes the whole series be read again)."""
        return self.resume(self.move(folder, "work"))

    def resume(self, work: Path) -> Path:
        """A series in work with whatever of it is still in done: finishes a merge that a crash
        cut short, so a series is never read with part of its images left behind."""
        done = self.series_dir("done", work.parent.name, work.name)
        if done.exists():
            self.move(done, "work")
        return work

    def previous_reports(self, work: Path) -> list[Any]:
        """The SRs earlier reads of this series sent (kept in its .reports folder)."""
        import pydicom

        return [pydicom.dcmread(p) for p in sorted((work / REPORTS).glob("*.dcm"))]

    def finish(self, work: Path, report: bytes) -> Path:
        """A classified series to done, keeping its SR (the predecessor of any later one)."""
        (work / REPORTS).mkdir(exist_ok=True)
        _write_atomically(work / REPORTS / f"{uuid.uuid4().hex}.dcm", report)
        done = self.move(work, "done")
        os.utime(done)  # done now: kept keep_seconds from here
        return done

    def put_results(self, work: Path, files: dict[str, bytes]) -> Path:
        """The series' result files (the SR, the Secondary Capture and ``summary.json``, the JSON
        object its line in results.jsonl is made of) into its outbox folder, whole or not at all."""
        staging = self.root / "outbox" / f".{work.name}.{uuid.uuid4().hex}"
        staging.mkdir(parents=True)
        for name, data in files.items():
            _write_atomically(staging / name, data)
        outbox = self.series_dir("outbox", work.parent.name, work.name)
        outbox.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(outbox, ignore_errors=True)  # an older result of the same series is replaced
        os.replace(staging, outbox)
        _sync_folder(outbox.parent)
        return outbox

    def fail(self, work: Path, reason: str) -> Path:
        failed = self.move(work, "failed")
        _write_atomically(failed / "error.txt", (reason + "\n").encode())
        os.utime(failed)  # failed now: kept keep_seconds from here
        return failed

    def record_sent(self, outbox: Path, destination: str) -> str:
        """Forget a sent outbox folder, after one line in results.jsonl says what was sent where;
        returns the verdict sent."""
        summary = json.loads((outbox / "summary.json").read_text())
        line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "destination": destination, **summary}
        with open(self.root / "results.jsonl", "a") as handle:
            handle.write(json.dumps(line) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        shutil.rmtree(outbox)
        _remove_if_empty(outbox.parent)
        return str(summary.get("label", ""))

    def prune(self, keep_seconds: float, now: float | None = None) -> None:
        """Forget series done or failed more than ``keep_seconds`` ago."""
        now = time.time() if now is None else now
        for stage in ("done", "failed"):
            for folder in self.series_in(stage):
                if now - folder.stat().st_mtime > keep_seconds:
                    shutil.rmtree(folder, ignore_errors=True)
                    _remove_if_empty(folder.parent)

    def clean_staging(self) -> None:
        """Remove outbox folders a crash left half-written (the series is still in work)."""
        for staging in (self.root / "outbox").glob(".*"):
            shutil.rmtree(staging, ignore_errors=True)

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free


def _merge(source: Path, target: Path) -> None:
    """``source`` renamed to ``target``, or, when ``target`` exists, its entries moved in one by one
    (folders merged the same way): each step is a rename, so a merge cut short can be run again."""
    if not target.exists():
        os.replace(source, target)
        return
    for item in source.iterdir():
        destination = target / item.name
        if item.is_dir() and destination.is_dir():
            _merge(item, destination)
        else:
            os.replace(item, destination)
    shutil.rmtree(source, ignore_errors=True)


def _remove_if_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not empty, or already gone
        folder.rmdir()
