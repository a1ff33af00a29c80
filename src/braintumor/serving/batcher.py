"""Dynamic batching for the service: concurrent requests share forward passes, fairly.

``workers`` threads each fill one batch of up to ``max_batch`` slices from the requests waiting,
taking slices from each request in turn, run it, and hand each request its own results when all
of its slices are done. With one client nothing waits; under load every forward pass is full,
which costs less per image than one pass per request (about 1.5x on a CPU); and a large request
(a whole volume) is served a batch at a time beside the others, so a one-scan request that
arrives behind it waits one batch, not the whole volume. Threads, not event-loop tasks, so it
serves any event loop; they start with the first request (or ``start``) and end with ``stop``
(the service's lifespan). A request whose future is cancelled (its client went away, the server is
stopping) has no more of its slices run.
"""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

from ..data.inputs import Slice
from ..inference.predict import Classifier
from ..inference.results import Prediction


@dataclass
class _Job:
    """One request: its slices, the next one to run, its results so far and its future."""

    slices: list[Slice]
    future: Future
    taken: int = 0
    results: list[Prediction | None] = field(default_factory=list)
    done: int = 0

    def __post_init__(self) -> None:
        self.results = [None] * len(self.slices)


class PredictionBatcher:
    """Runs the slices of concurrent requests through one classifier together."""

    def __init__(self, classifier: Classifier, workers: int = 1, max_batch: int = 32):
        self.classifier = classifier
        self.workers = workers
        self.max_batch = max_batch
        self._jobs: deque[_Job] = deque()
        self._ready = threading.Condition()
        self._stopping = False
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        """Start the worker threads (once; ``submit`` starts them when needed)."""
        with self._ready:
            if self._threads:
                return
            self._stopping = False
            for number in range(self.workers):
                thread = threading.Thread(target=self._serve, name=f"braintumor-batcher-{number}", daemon=True)
                thread.start()
                self._threads.append(thread)

    def stop(self, timeout: float = 10.0) -> None:
        """Let the workers finish the batch they hold, then end them."""
        with self._ready:
            threads, self._threads = self._threads, []
            self._stopping = True
            self._ready.notify_all()
        for thread in threads:
            thread.join(timeout)

    def submit(self, slices: list[Slice]) -> Future:
        """A future of the slices' predictions, in order."""
        self.start()
        future: Future = Future()
        if not slices:
            future.set_result([])
            return future
        with self._ready:
            self._jobs.append(_Job(slices, future))
            self._ready.notify()
        return future

    def _take(self) -> list[tuple[_Job, int, int]] | None:
        """The next batch as (job, start, stop) parts: slices from each waiting job in turn, in
        equal shares, until the batch is full (None: stopping)."""
        with self._ready:
            while not self._jobs and not self._stopping:
                self._ready.wait()
            if self._stopping:
                return None
            parts: dict[int, list] = {}
            room = self.max_batch
            while room and self._jobs:
                share = max(1, room // len(self._jobs))
                for _ in range(len(self._jobs)):
                    if room == 0:
                        break
                    job = self._jobs.popleft()
                    if job.future.cancelled():
                        continue  # nobody waits for the rest of it
                    count = min(share, room, len(job.slices) - job.taken)
                    parts.setdefault(id(job), [job, job.taken, job.taken])[2] += count
                    job.taken += count
                    room -= count
                    if job.taken < len(job.slices):
                        self._jobs.append(job)  # the rest waits its turn behind the others
            if not parts:
                return []  # every waiting job was cancelled
            return [(job, start, stop) for job, start, stop in parts.values()]

    def _serve(self) -> None:
        while (parts := self._take()) is not None:
            if not parts:
                continue
            batch = [s for job, start, stop in parts for s in job.slices[start:stop]]
            try:
                results = self.classifier.predict_slices(batch, self.max_batch)
            except Exception as exc:  # noqa: BLE001 - every request in the batch gets the failure
                for job, _, _ in parts:
                    self._fail(job, exc)
                continue
            offset = 0
            for job, start, stop in parts:
                job.results[start:stop] = results[offset : offset + stop - start]
                offset += stop - start
                with self._ready:
                    job.done += stop - start
                    finished = job.done == len(job.slices)
                if finished and not job.future.done():
                    job.future.set_result(list(job.results))

    def _fail(self, job: _Job, exc: Exception) -> None:
        with self._ready:
            if job in self._jobs:
                self._jobs.remove(job)
        if not job.future.done():
            job.future.set_exception(exc)
