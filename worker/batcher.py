"""A dynamic micro-batcher: many task threads submit one job each; one loop runs them in batches.

Two threads overlap the stages: while the infer thread runs batch N on the device and writes its rows,
the collect thread gathers and fetches/decodes batch N+1. A submitter waits on its Future, which resolves
only after its row is committed, so a Celery task acked late is acked after the commit.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future

from worker.pipeline import Job, Outcome, Pipeline, Prepared

_Batch = tuple[list[Prepared], list["Future[Outcome]"]]


class MicroBatcher:
    def __init__(self, pipeline: Pipeline, *, batch_size: int, max_wait_s: float) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.pipeline = pipeline
        self.batch_size = batch_size
        self.max_wait_s = max_wait_s
        self._inbox: queue.Queue[tuple[Job, Future[Outcome]] | None] = queue.Queue()
        # Depth 1: at most one prepared batch waits for the device, bounding decoded pixels in memory.
        self._prepared: queue.Queue[_Batch | None] = queue.Queue(maxsize=1)
        self._collector = threading.Thread(target=self._collect_loop, name="enrich-collect", daemon=True)
        self._inferer = threading.Thread(target=self._infer_loop, name="enrich-infer", daemon=True)
        self._closed = False
        # Jobs submitted and not yet resolved, and when one last resolved (or work arrived after a lull):
        # what the liveness probe reads (worker/liveness.py).
        self._unresolved = 0
        self._last_progress = time.monotonic()
        self._progress_lock = threading.Lock()
        self._collector.start()
        self._inferer.start()

    def submit(self, job: Job) -> Future[Outcome]:
        if self._closed:
            raise RuntimeError("batcher is closed")
        future: Future[Outcome] = Future()
        with self._progress_lock:
            if self._unresolved == 0:
                self._last_progress = time.monotonic()
            self._unresolved += 1
        future.add_done_callback(self._resolved)
        self._inbox.put((job, future))
        return future

    def stalled_s(self) -> float:
        """Seconds this batcher has held work without resolving any of it (0 when it holds none)."""
        with self._progress_lock:
            return time.monotonic() - self._last_progress if self._unresolved else 0.0

    def _resolved(self, _future: Future[Outcome]) -> None:
        with self._progress_lock:
            self._unresolved -= 1
            self._last_progress = time.monotonic()

    def close(self) -> None:
        """Finish what was submitted, then stop both threads."""
        if self._closed:
            return
        self._closed = True
        self._inbox.put(None)
        self._collector.join()
        self._inferer.join()

    def _next_batch(self) -> list[tuple[Job, Future[Outcome]]] | None:
        first = self._inbox.get()
        if first is None:
            return None
        batch = [first]
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.batch_size:
            remaining = deadline - time.monotonic()
            try:
                item = (
                    self._inbox.get(timeout=max(remaining, 0)) if remaining > 0 else self._inbox.get_nowait()
                )
            except queue.Empty:
                break
            if item is None:
                self._inbox.put(None)  # let the outer loop see the stop after this batch
                break
            batch.append(item)
        return batch

    def _collect_loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            futures = [future for _job, future in batch]
            try:
                prepared = self.pipeline.prepare([job for job, _future in batch])
            except Exception as error:  # noqa: BLE001 - never let the loop die; the tasks will retry
                for future in futures:
                    future.set_exception(error)
                continue
            self._prepared.put((prepared, futures))
        self._prepared.put(None)

    def _infer_loop(self) -> None:
        while (item := self._prepared.get()) is not None:
            prepared, futures = item
            try:
                outcomes = self.pipeline.infer_and_sink(prepared)
            except Exception as error:  # noqa: BLE001
                for future in futures:
                    future.set_exception(error)
                continue
            for future, outcome in zip(futures, outcomes, strict=True):
                future.set_result(outcome)
