"""Fetching and decoding in worker processes: every core, and a wall-clock and a memory limit per image.

A Python thread cannot be stopped in the middle of a C decoder; a process can. Pebble's pool kills a
worker whose task runs past its timeout and starts a fresh one, so a pathological image costs at most
`timeout_s` of one core, and RLIMIT_AS turns a decode that would need more memory into a MemoryError in
that process instead of an OOM kill of the whole worker. The processes come from a fork server that has
imported only the torch-free modules: cheap to start, and never a fork of a CUDA process.

The S3 GETs run in processes too, each with its own client: a boto3 GET costs 2-2.5 ms of Python on the
development machine, which in the worker process would share one GIL with Celery and the batcher (the
worker process measured 8.2 ms of CPU per image with fetches in its threads, 6.3 ms without). Fetching
has its own pool, as many processes as `fetch_threads`, because a fetch mostly waits on the network and
must not hold up decodes; and fetch and decode stay two tasks, so a slow S3 read is a transient fetch
error, never a decode over its time limit.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import resource
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from pebble import ProcessExpired, ProcessPool

from schema.results import ObjectRef
from worker.decode import DecodedInput, DecodeError, DecodeLimitError, decode_to_input
from worker.model.config import PreprocessConfig
from worker.storage import FetchedObject, FetchError, ObjectStore

_FORKSERVER_PRELOAD = ["worker.decode", "worker.storage"]
log = logging.getLogger(__name__)

# The store of a fetching process, set once by its pool's initializer: one client and connection pool
# per process, not per task.
_store: ObjectStore | None = None


class DecodeTimeoutError(DecodeLimitError):
    pass


class ImagePoolError(RuntimeError):
    """The pool itself failed (not the image): the job should be retried, not recorded as failed."""


def _address_space_bytes() -> int:
    """The address space this process maps (Linux: /proc/self/statm); 0 where that cannot be read."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[0]) * resource.getpagesize()
    except (OSError, ValueError, IndexError):
        return 0


def _limit_memory(memory_mb: int) -> None:
    # The limit is on what decoding adds to the process as it starts. multiprocessing runs the caller's main
    # module again in every child, and a main module that imports torch maps 3 GiB before decoding anything:
    # an absolute 1 GiB limit then failed every image as "needed more than 1024 MiB".
    limit = _address_space_bytes() + memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _set_store(store: ObjectStore) -> None:
    global _store
    _store = store


def _pid_after(delay_s: float) -> int:
    time.sleep(delay_s)  # long enough that one process cannot take every task of a round
    return os.getpid()


def _fetch_here(ref: ObjectRef, max_bytes: int) -> FetchedObject:
    assert _store is not None, "the pool initializer sets the store"
    return _store.get(ref, max_bytes=max_bytes)


class _RestartingPool:
    """A Pebble pool that is replaced when it breaks (e.g. its processes could not start)."""

    def __init__(self, start: Callable[[], ProcessPool]) -> None:
        self._start = start
        self._pool = start()
        self._lock = threading.Lock()

    def schedule(self, function: Any, *args: Any, timeout: float | None = None, **kwargs: Any) -> Future[Any]:
        pool = self._pool
        try:
            return pool.schedule(function, args=args, kwargs=kwargs, timeout=timeout)
        except RuntimeError as error:
            with self._lock:
                if self._pool is pool:
                    pool.stop()
                    self._pool = self._start()
            raise ImagePoolError(f"pool restarted after: {error}") from None

    def wait_started(self, processes: int, timeout_s: float) -> None:
        """Return once `processes` distinct processes have each run a task (and so their initializer)."""
        deadline = time.monotonic() + timeout_s
        seen: set[int] = set()
        while len(seen) < processes:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ImagePoolError(f"{len(seen)} of {processes} pool processes started in {timeout_s:g} s")
            futures = [self.schedule(_pid_after, 0.05) for _ in range(processes)]
            seen |= {future.result(timeout=left) for future in futures}

    def close(self) -> None:
        self._pool.close()
        self._pool.join()


def _process_pool(processes: int, initializer: Callable[..., None], *initargs: Any) -> ProcessPool:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(_FORKSERVER_PRELOAD)
    return ProcessPool(max_workers=processes, initializer=initializer, initargs=initargs, context=context)


class ImagePool:
    """Fetches objects (`fetch_processes` processes) and turns their bytes into the network's input
    (`processes` processes); with processes=0 both run in the calling thread."""

    def __init__(
        self,
        *,
        store: ObjectStore,
        preprocessing: PreprocessConfig,
        max_pixels: int,
        processes: int,
        fetch_processes: int,
        timeout_s: float,
        memory_mb: int,
        fetch_timeout_s: float | None = None,
        defer_upscale: bool = False,
    ) -> None:
        self.store = store
        self.fetch_timeout_s = fetch_timeout_s
        self.preprocessing = preprocessing
        self.defer_upscale = defer_upscale  # the model's device enlarges the images (a GPU worker)
        self.max_pixels = max_pixels
        self.processes = processes
        self.fetch_processes = fetch_processes
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        self._decoders: _RestartingPool | None = None
        self._fetchers: _RestartingPool | None = None
        if processes > 0:
            self._decoders = _RestartingPool(lambda: _process_pool(processes, _limit_memory, memory_mb))
            self._fetchers = _RestartingPool(lambda: _process_pool(fetch_processes, _set_store, store))

    def start(self, timeout_s: float = 120.0) -> None:
        """Start every fetching and decoding process now (Pebble starts them at the first task) and wait
        for each, so that the first batch after a worker starts (a KEDA scale-up) does not wait for them:
        10 processes took 0.9 s and 1 s of CPU on the 2-core development machine.
        """
        for pool, processes in ((self._fetchers, self.fetch_processes), (self._decoders, self.processes)):
            if pool is None:
                continue
            try:
                pool.wait_started(processes, timeout_s)
            except (ImagePoolError, BrokenProcessPool, ProcessExpired, TimeoutError) as error:
                # Not fatal here: each job that meets the broken pool is retried (and the pool restarted),
                # then recorded as failed with the reason, as when a pool breaks later.
                log.warning("image pool processes did not all start: %s", error)

    def fetch(self, ref: ObjectRef, *, max_bytes: int) -> FetchedObject:
        """The object's bytes; FetchError as the store raises it, ImagePoolError if the pool failed."""
        if self._fetchers is None:
            return self.store.get(ref, max_bytes=max_bytes)
        # The S3 client's connect/read timeouts bound each socket call; the pool's deadline bounds the whole
        # fetch (a server trickling bytes), killing its process. There are as many fetching processes as
        # fetch threads, so a fetch never queues and the deadline is the fetch's own.
        future = self._fetchers.schedule(_fetch_here, ref, max_bytes, timeout=self.fetch_timeout_s)
        try:
            return future.result()
        except TimeoutError:
            message = f"fetching took longer than {self.fetch_timeout_s:g} s (its process was stopped)"
            raise FetchError(message, transient=True) from None
        except ProcessExpired as error:
            message = f"the fetching process died (exit code {error.exitcode})"
            raise FetchError(message, transient=True) from None
        except BrokenProcessPool as error:
            raise ImagePoolError(f"fetching pool broken: {error}") from None

    def submit(self, data: bytes) -> Future[DecodedInput]:
        """Start decoding; collect the outcome with `result`."""
        kwargs = {
            "pre": self.preprocessing,
            "max_pixels": self.max_pixels,
            "defer_upscale": self.defer_upscale,
        }
        if self._decoders is not None:
            return self._decoders.schedule(decode_to_input, data, timeout=self.timeout_s, **kwargs)
        future: Future[DecodedInput] = Future()
        try:
            future.set_result(decode_to_input(data, **kwargs))  # type: ignore[arg-type]
        except Exception as error:  # noqa: BLE001 - delivered through the future, as from a process
            future.set_exception(error)
        return future

    def result(self, future: Future[DecodedInput]) -> DecodedInput:
        """The decoded input, or a DecodeError that says which limit or failure stopped it."""
        try:
            return future.result()
        except TimeoutError:
            raise DecodeTimeoutError(f"decoding took longer than {self.timeout_s:g} s") from None
        except MemoryError:
            raise DecodeLimitError(f"decoding needed more than {self.memory_mb} MiB") from None
        except ProcessExpired as error:
            raise DecodeError(f"the decoding process died (exit code {error.exitcode})") from None
        except BrokenProcessPool as error:
            raise ImagePoolError(f"decoding pool broken: {error}") from None

    def decode(self, data: bytes) -> DecodedInput:
        return self.result(self.submit(data))

    def close(self) -> None:
        for pool in (self._fetchers, self._decoders):
            if pool is not None:
                pool.close()
