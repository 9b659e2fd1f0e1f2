"""Decoding in worker processes: every core for JPEG, and a wall-clock and a memory limit per image.

A Python thread cannot be stopped in the middle of a C decoder; a process can. Pebble's pool kills a
worker whose task runs past its timeout and starts a fresh one, so a pathological image costs at most
`timeout_s` of one core, and RLIMIT_AS turns a decode that would need more memory into a MemoryError in
that process instead of an OOM kill of the whole worker. The processes come from a fork server that has
imported only the torch-free decode modules: cheap to start, and never a fork of a CUDA process.
"""

from __future__ import annotations

import multiprocessing
import resource
import threading
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool

from pebble import ProcessExpired, ProcessPool

from worker.decode import DecodedInput, DecodeError, DecodeLimitError, decode_to_input
from worker.model.config import PreprocessConfig

_FORKSERVER_PRELOAD = ["worker.decode"]


class DecodeTimeoutError(DecodeLimitError):
    pass


class DecodePoolError(RuntimeError):
    """The pool itself failed (not the image): the job should be retried, not recorded as failed."""


def _limit_memory(memory_mb: int) -> None:
    limit = memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


class DecodePool:
    """Turns object bytes into the network's input, in `processes` worker processes (0: in the caller)."""

    def __init__(
        self,
        *,
        preprocessing: PreprocessConfig,
        max_pixels: int,
        processes: int,
        timeout_s: float,
        memory_mb: int,
    ) -> None:
        self.preprocessing = preprocessing
        self.max_pixels = max_pixels
        self.processes = processes
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        self._restart_lock = threading.Lock()
        self._pool = self._start() if processes > 0 else None

    def _start(self) -> ProcessPool:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(_FORKSERVER_PRELOAD)
        return ProcessPool(
            max_workers=self.processes, initializer=_limit_memory, initargs=(self.memory_mb,), context=context
        )

    def submit(self, data: bytes) -> Future[DecodedInput]:
        """Start decoding; collect the outcome with `result`."""
        kwargs = {"pre": self.preprocessing, "max_pixels": self.max_pixels}
        pool = self._pool
        if pool is not None:
            try:
                return pool.schedule(decode_to_input, args=(data,), kwargs=kwargs, timeout=self.timeout_s)
            except RuntimeError as error:  # pebble: the pool broke (e.g. its workers could not start)
                with self._restart_lock:
                    if self._pool is pool:
                        pool.stop()
                        self._pool = self._start()
                raise DecodePoolError(f"decoding pool restarted after: {error}") from None
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
            raise DecodePoolError(f"decoding pool broken: {error}") from None

    def decode(self, data: bytes) -> DecodedInput:
        return self.result(self.submit(data))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool.join()
