"""A lane: one background thread that runs calls in the order they were given.

The assembler's thread hands each block of the book to lanes (the intermediate file's encoder, the
loudness meter) and goes on mixing the next segment while they work, so its pace is the slowest
lane's, not the sum of them all.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any


class Lane:
    """Runs calls one after another on a thread of its own.

    At most ``depth`` calls wait: a full lane holds the caller back, so the samples it holds stay
    bounded. A call that fails stops the lane: no later call runs, and the failure is raised to the
    caller by its next ``submit`` or by ``join``.
    """

    def __init__(self, name: str, depth: int = 8) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._depth = max(1, depth)
        self._waiting: deque[Future[None]] = deque()
        self._stopped = False
        self._busy_s = 0.0

    @property
    def busy_s(self) -> float:
        """Seconds its calls have run so far: next to the caller's wall time, whether this lane set the pace."""
        return self._busy_s

    @property
    def stopped(self) -> bool:
        """True once a call failed or the lane was cancelled."""
        return self._stopped

    def submit(self, call: Callable[..., Any], *args: Any) -> None:
        """Run ``call(*args)`` after every call before it; the caller must not change ``args`` afterwards."""
        while self._waiting and (self._waiting[0].done() or len(self._waiting) >= self._depth):
            self._waiting.popleft().result()  # raises the lane's failure
        self._waiting.append(self._pool.submit(self._run, call, args))

    def join(self) -> None:
        """Wait for every call; raises the lane's failure, if any. The lane takes no more calls."""
        try:
            while self._waiting:
                self._waiting.popleft().result()
        finally:
            self._pool.shutdown(wait=True)

    def cancel(self, *, wait: bool = True) -> None:
        """Drop the calls not yet started; with ``wait``, also wait for the one running, if any (without,
        the caller must first unblock it, e.g. by stopping the process it writes to)."""
        self._stopped = True
        for future in self._waiting:
            future.cancel()
        self._waiting.clear()
        self._pool.shutdown(wait=wait)

    def _run(self, call: Callable[..., Any], args: tuple[Any, ...]) -> None:
        if self._stopped:
            return
        started = time.perf_counter()
        try:
            call(*args)
        except BaseException:
            self._stopped = True
            raise
        finally:
            self._busy_s += time.perf_counter() - started
