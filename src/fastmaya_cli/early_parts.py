"""Encode a long m4b, m4a or mp3 book in parts while it is still rendering.

With loudness on, the book's one gain is known only after its last chunk, and encoding 6 h of speech
then takes half a minute on 16 cores while the GPU idles. Yet a long book's integrated loudness settles
early, and its true peak only grows. So each part, once its last sample is final, is encoded at once at
the gain the book so far asks for (``speculative_gain``): on a grid, never above what the peak so far
allows, and kept while it stays near. When the book is done, the
final gain is the one most of the early parts used, if that one is within ``GAIN_TOLERANCE_DB`` of the
exact gain and keeps the true peak under its limit (``reuse_gain``); every part encoded at another gain
is encoded again from the intermediate file, with the rest of the book. The whole book still has one
gain, and every part is encoded from the same samples either way.

Cuts: the assembler offers each silence between chunks as it places them (``offer_silence``); once the
part is ``part_samples`` long, the first frame-aligned position with the margins ``split_encode``
describes becomes its end. The parts are fed exactly as ``split_encode.part_sources`` says, so they join
with those the finish encodes.

Memory stays bounded: a part waits in memory only until an encoder takes it, and a part that finds
``max_waiting`` parts already waiting is not encoded early but left to the finish. The assembler lets
``WAITING_SECONDS`` of the book wait: its samples come in bursts, whenever the chunk it waited for in book
order arrives and the audio decoded ahead of it follows at once.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastmaya_cli.outputs import StreamCodec
from fastmaya_cli.split_encode import cut_range

GAIN_STEP_DB = 0.1  # the grid early gains sit on, so that parts share one
GAIN_TOLERANCE_DB = 0.25  # how far the book's gain may sit from the exact one to reuse early parts
EARLY_PART_SECONDS = 120.0  # of the book per early part
# Of the book waiting for an encoder at most (0.35 GB of float32 at 48 kHz): a burst as long as the
# audio the renderer decodes ahead (render.DECODED_AHEAD_S) is encoded early, not left to the finish.
WAITING_SECONDS = 1800.0


@dataclass(frozen=True)
class EarlyPart:
    start: int  # the part covers [start, stop) of the book
    stop: int
    path: Path | None  # its bare stream; None where it was not encoded early (or its encoder failed)
    gain_db: float
    left: str = ""  # why it was not encoded early: one of the LEFT_ reasons below


LEFT_NO_ESTIMATE = "no loudness yet"
LEFT_BUSY = "encoders busy"
LEFT_AT_END = "still waiting at the end"
LEFT_CUT_SHORT = "cut short at the end"
LEFT_FAILED = "encoder failed"


def speculative_gain(loudness_db: float, peak_limit_db: float, previous_db: float | None) -> float:
    """The gain to encode an early part at, from the gain the loudness so far asks for and the most the
    peak so far allows. It sits on the grid, never above the peak's limit (the book's peak only grows,
    so its limit only falls), and stays at the previous gain while that is allowed and within half the
    tolerance of the estimate, so that parts share one gain."""
    ceiling = (
        math.floor(peak_limit_db / GAIN_STEP_DB + 1e-9) * GAIN_STEP_DB
        if math.isfinite(peak_limit_db)
        else math.inf
    )
    estimate = min(loudness_db, peak_limit_db)
    if (
        previous_db is not None
        and previous_db <= ceiling
        and abs(estimate - previous_db) <= GAIN_TOLERANCE_DB / 2
    ):
        return previous_db
    return round(min(round(estimate / GAIN_STEP_DB) * GAIN_STEP_DB, ceiling), 6)


def reuse_gain(exact_db: float, peak_limit_db: float, parts: list[EarlyPart]) -> float:
    """The book's gain: the early gain that covers the most samples among those within the tolerance of
    ``exact_db`` and at most ``peak_limit_db``; ``exact_db`` where there is none."""
    covered: dict[float, int] = {}
    for part in parts:
        if part.path is None or part.gain_db > peak_limit_db:
            continue
        if abs(part.gain_db - exact_db) <= GAIN_TOLERANCE_DB + 1e-9:
            covered[part.gain_db] = covered.get(part.gain_db, 0) + part.stop - part.start
    if not covered:
        return exact_db
    return max(covered, key=lambda gain: (covered[gain], -abs(gain - exact_db)))


class PartCutShort(Exception):
    """Stops the encoder of a part that the finish encodes again (see ``EarlyParts.finish``)."""


class EarlyParts:
    """Collects the book's samples as the assembler writes them and encodes finished parts on
    ``workers`` threads. ``encode(index, blocks, gain_db)`` encodes the samples of part ``index`` into a
    file and returns its path; ``estimate_gain()`` gives the gain the loudness of the book so far asks
    for (None while there is none) and the most its true peak so far allows (inf while unknown)."""

    def __init__(
        self,
        codec: StreamCodec,
        part_samples: int,
        workers: int,
        encode: Callable[[int, Iterable[np.ndarray], float], Path],
        estimate_gain: Callable[[], tuple[float | None, float]],
        max_waiting: int | None = None,
    ) -> None:
        self._codec = codec
        self._part_samples = part_samples
        self._encode = encode
        self._estimate_gain = estimate_gain
        self._max_waiting = max_waiting if max_waiting is not None else 2 * workers
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fastmaya-early")
        self._lock = threading.Lock()
        self._waiting = 0
        self._futures: list[Future[Path] | None] = []
        self._gains: list[float] = []
        self._left: dict[int, str] = {}  # why a part was left to the finish, by index
        self._progress: dict[int, tuple[int, int]] = {}  # parts being encoded: samples fed, of all
        self._cut_short: set[int] = set()  # parts whose encoders stop at their next block
        self._cuts: list[int] = [0]  # where each part starts; the last one is still collecting
        self._next_cut: int | None = None
        self._position = 0  # samples fed so far
        self._blocks: list[np.ndarray] = []
        self._gain: float | None = None

    @property
    def cuts(self) -> list[int]:
        """The part boundaries so far, without 0."""
        return self._cuts[1:] + ([self._next_cut] if self._next_cut is not None else [])

    def offer_silence(self, start: int, end: int) -> None:
        """``[start, end)`` of the book is silent and nothing has been fed beyond ``start``: end the
        current part inside it if the part is long enough and the silence has room for a clean cut."""
        if self._next_cut is not None or start - self._cuts[-1] < self._part_samples:
            return
        cut, last = cut_range(start, end, self._codec)
        if cut <= last and cut - self._codec.pad >= self._position:
            self._next_cut = cut

    def feed(self, values: np.ndarray) -> None:
        """The next samples of the book, as the finish would read them back from the intermediate file."""
        begin = self._position
        self._position += len(values)
        while True:
            part_start = self._cuts[-1]
            lo = max(begin, part_start + self._codec.lead)
            hi = (
                self._position
                if self._next_cut is None
                else min(self._position, self._next_cut - self._codec.pad)
            )
            if hi > lo:
                self._blocks.append(values[lo - begin : hi - begin])
            if self._next_cut is None or self._position < self._next_cut:
                return
            self._submit(self._blocks)
            self._blocks = []
            self._cuts.append(self._next_cut)
            self._next_cut = None

    def finish(self, longest_wait: int = 0) -> list[EarlyPart]:
        """The parts that ended before the book did, in order. A part still waiting for an encoder, or
        with more than ``longest_wait`` samples still to encode, is left to the finish, which shares it
        among every core; the encoders with less to do are waited for."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            for index, (fed, total) in self._progress.items():
                if total - fed > longest_wait:
                    self._cut_short.add(index)
        self._pool.shutdown(wait=True)
        self._blocks = []
        parts = []
        for index, future in enumerate(self._futures):
            path, left = None, self._left.get(index, "")
            if future is not None:
                if future.cancelled():
                    left = LEFT_AT_END
                elif index in self._cut_short:
                    left = LEFT_CUT_SHORT
                elif future.exception() is not None:
                    left = LEFT_FAILED
                else:
                    path = future.result()
            parts.append(EarlyPart(self._cuts[index], self._cuts[index + 1], path, self._gains[index], left))
        return parts

    def abort(self) -> None:
        """Drop what has not started; the caller's cancel flag stops what has."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._blocks = []

    def _submit(self, blocks: list[np.ndarray]) -> None:
        index = len(self._futures)
        loudness_db, peak_limit_db = self._estimate_gain()
        with self._lock:
            full = self._waiting >= self._max_waiting
        if loudness_db is None or not math.isfinite(loudness_db) or full:
            self._futures.append(None)  # the finish encodes this part
            self._gains.append(math.nan)
            self._left[index] = LEFT_BUSY if full else LEFT_NO_ESTIMATE
            return
        self._gain = speculative_gain(loudness_db, peak_limit_db, self._gain)
        with self._lock:
            self._waiting += 1
        self._futures.append(self._pool.submit(self._run, index, blocks, self._gain))
        self._gains.append(self._gain)

    def _run(self, index: int, blocks: list[np.ndarray], gain_db: float) -> Path:
        with self._lock:
            self._waiting -= 1  # taken by an encoder: it now streams the blocks out
            self._progress[index] = (0, sum(len(block) for block in blocks))
        try:
            return self._encode(index, self._counted(index, blocks), gain_db)
        finally:
            with self._lock:
                del self._progress[index]

    def _counted(self, index: int, blocks: list[np.ndarray]) -> Iterator[np.ndarray]:
        """The part's blocks, counted as the encoder takes them; stops the encoder if cut short."""
        for block in blocks:
            with self._lock:
                if index in self._cut_short:
                    raise PartCutShort(index)
                fed, total = self._progress[index]
                self._progress[index] = (fed + len(block), total)
            yield block
