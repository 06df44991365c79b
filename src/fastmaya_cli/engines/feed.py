"""A request feed: the lazy, retry-aware stream of requests that the renderer hands an engine.

Engines iterate it like any iterable. It stays open while results are outstanding, because a result
may still turn into a retry; it closes once the source is exhausted and nothing is outstanding.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable, Iterator

from . import Request


class RequestFeed:
    def __init__(self, source: Iterable[Request]) -> None:
        self._source = iter(source)
        self._source_done = False
        self._retries: deque[Request] = deque()
        self._outstanding = 0
        self._closed = False
        self._cond = threading.Condition()

    def __iter__(self) -> Iterator[Request]:
        while (request := self.next_request(wait=True)) is not None:
            yield request

    def next_batch(self, limit: int) -> list[Request]:
        """The next request (waiting for it if need be) plus up to `limit` - 1 more that are ready now;
        empty once the feed is done."""
        first = self.next_request(wait=True)
        return [] if first is None else [first, *self.take_ready(limit - 1)]

    def take_ready(self, limit: int) -> list[Request]:
        """Up to `limit` requests that are available now, without waiting for retries."""
        taken: list[Request] = []
        while len(taken) < limit and (request := self.next_request(wait=False)) is not None:
            taken.append(request)
        return taken

    def next_request(self, *, wait: bool) -> Request | None:
        with self._cond:
            while True:
                if self._retries:
                    return self._hand_out(self._retries.popleft())
                if not self._source_done:
                    request = next(self._source, None)
                    if request is not None:
                        return self._hand_out(request)
                    self._source_done = True
                if self._closed or self._outstanding == 0 or not wait:
                    return None
                self._cond.wait()

    def _hand_out(self, request: Request) -> Request:
        self._outstanding += 1
        return request

    def resolved(self, retry: Request | None = None) -> None:
        """The renderer has dealt with one handed-out request, possibly by asking for a retry."""
        with self._cond:
            self._outstanding -= 1
            if retry is not None:
                self._retries.append(retry)
            self._cond.notify_all()

    def close(self) -> None:
        """Stop handing out requests (on interruption)."""
        with self._cond:
            self._closed = True
            self._retries.clear()
            self._source_done = True
            self._cond.notify_all()


def batches(requests: Iterable[Request], size: int) -> Iterator[list[Request]]:
    """Batches for engines that run one batch at a time.

    With a RequestFeed a batch takes what is ready rather than waiting to fill: the feed only
    waits when the engine holds nothing, so a retry can never wait on its own batch.
    """
    if isinstance(requests, RequestFeed):
        while batch := requests.next_batch(size):
            yield batch
        return
    batch: list[Request] = []
    for request in requests:
        batch.append(request)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
