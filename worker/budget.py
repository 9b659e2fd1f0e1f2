"""A cap on the bytes of fetched objects one worker process holds at once.

Decoded pixels reach the worker only at the network's input size, but the fetched bytes pass through it on
their way to a decoding process, and queue there while the decoders are busy. Without a cap a batch of 256
large originals (a digital-asset library's 40 MB TIFFs or PNGs) is 10 GB in one process: an OOM kill, its
messages redelivered to the next worker, and the same again. With it, fetching waits for decodes to free
bytes; the work is slower for such a batch, never lost.
"""

from __future__ import annotations

import threading
from collections.abc import Callable


class ByteBudget:
    def __init__(self, limit: int, *, on_change: Callable[[int], None] | None = None) -> None:
        self.limit = limit
        self._held = 0
        self._changed = threading.Condition()
        self._on_change = on_change

    @property
    def held(self) -> int:
        return self._held

    def reserve(self, n: int) -> Hold:
        """Wait until `n` more bytes fit, then hold them (0 never waits). An object larger than the whole
        limit is let in when nothing else is held: alone, it would otherwise wait forever."""
        with self._changed:
            self._changed.wait_for(lambda: self._fits(n))
            self._add(n)
        return Hold(self, n)

    def _fits(self, n: int) -> bool:
        return n == 0 or self._held == 0 or self._held + n <= self.limit

    def _add(self, n: int) -> None:
        # Called with the condition held.
        self._held += n
        if n < 0:
            self._changed.notify_all()
        if self._on_change is not None:
            self._on_change(self._held)


class Hold:
    """Bytes held in a ByteBudget until `release` (which may be called more than once)."""

    def __init__(self, budget: ByteBudget, n: int) -> None:
        self._budget = budget
        self._n = n

    def resize(self, n: int) -> None:
        """Hold `n` bytes instead. A hold of nothing waits, as `reserve` does; one that holds bytes does
        not (the object was larger than its event said, and the bytes are in hand already): two holders
        waiting to grow could otherwise wait on each other forever."""
        budget = self._budget
        with budget._changed:
            if self._n == 0:
                budget._changed.wait_for(lambda: budget._fits(n))
            budget._add(n - self._n)
            self._n = n

    def release(self) -> None:
        self.resize(0)
