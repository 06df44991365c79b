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

The gain of the first minutes is a poor guess at the book's (in the bench's 13.7 h novel, the first two
minutes asked for 0.2 dB more than the book did, and the parts that kept that gain, the first 36 minutes,
were all encoded again). So the parts cut before ``SETTLE_SECONDS`` of the book was measured wait, and are
encoded at the gain the book asks for then.

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
# Of the book measured before the first early gain is chosen; the parts before it wait (0.12 GB), within
# WAITING_SECONDS.
SETTLE_SECONDS = 600.0


@dataclass(frozen=True)
class EarlyPart:
    start: int  # the part covers [start, stop) of the book
    stop: int
    path: Path | None  # its bare stream; None where it was not encoded early (or its encoder failed)
    gain_db: float
    left: str = ""  # why it was not encoded early: one of the LEFT_ reasons below
    # What the book so far asked for when the part got its gain (when it was cut, or at the end of the
    # settling time): the loudness's gain and the peak's limit (``estimate_gain``), to tell in a report
    # which of them moved the gain.
    loudness_gain_db: float = math.nan
    peak_limit_db: float = math.nan


LEFT_NO_ESTIMATE = "no loudness yet"
LEFT_BUSY = "encoders busy"
LEFT_AT_END = "still waiting at the end"
LEFT_CUT_SHORT = "cut short at the end"
LEFT_FAILED = "encoder failed"
LEFT_SETTLING = "loudness still settling at the end"


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
    for (None while there is none) and the most its true peak so far allows (inf while unknown). Parts
    cut before ``settle_samples`` of the book wait for it (see the module doc)."""

    def __init__(
        self,
        codec: StreamCodec,
        part_samples: int,
        workers: int,
        encode: Callable[[int, Iterable[np.ndarray], float], Path],
        estimate_gain: Callable[[], tuple[float | None, float]],
        max_waiting: int | None = None,
        settle_samples: int = 0,
    ) -> None:
        self._codec = codec
        self._settle_samples = settle_samples
        self._settling: list[tuple[int, list[np.ndarray]]] = []  # parts cut before it, waiting
        self._part_samples = part_samples
        self._encode = encode
        self._estimate_gain = estimate_gain
        self._max_waiting = max_waiting if max_waiting is not None else 2 * workers
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fastmaya-early")
        self._lock = threading.Lock()
        self._waiting = 0
        self._futures: list[Future[Path] | None] = []
        self._gains: list[float] = []
        self._estimates: list[tuple[float, float]] = []
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
                break
            if self._next_cut < self._settle_samples:
                self._settle(self._blocks)
            else:
                self._submit(self._blocks)
            self._blocks = []
            self._cuts.append(self._next_cut)
            self._next_cut = None
        if self._settling and self._position >= self._settle_samples:
            self._release_settled()

    def finish(self, longest_wait: int = 0) -> list[EarlyPart]:
        """The parts that ended before the book did, in order. A part still waiting for an encoder, or
        with more than ``longest_wait`` samples still to encode, is left to the finish, which shares it
        among every core; the encoders with less to do are waited for."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        for index, _ in self._settling:  # the book was shorter than the settling time
            self._left[index] = LEFT_SETTLING
        self._settling = []
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
            parts.append(
                EarlyPart(
                    self._cuts[index],
                    self._cuts[index + 1],
                    path,
                    self._gains[index],
                    left,
                    *self._estimates[index],
                )
            )
        return parts

    def abort(self) -> None:
        """Drop what has not started; the caller's cancel flag stops what has."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._blocks = []
        self._settling = []

    def _settle(self, blocks: list[np.ndarray]) -> None:
        """Keep a part cut before the settling time until the book reaches it (see ``_release_settled``)."""
        index = self._reserve()
        if self._take_place(index):
            self._settling.append((index, blocks))

    def _release_settled(self) -> None:
        """Encode the parts that waited for the settling time, at the one gain the book asks for now."""
        estimate = self._estimate_gain()
        settling, self._settling = self._settling, []
        for index, blocks in settling:
            self._encode_at(index, blocks, estimate)

    def _submit(self, blocks: list[np.ndarray]) -> None:
        index = self._reserve()
        estimate = self._estimate_gain()
        if self._take_place(index):
            self._encode_at(index, blocks, estimate)
        else:
            self._estimates[index] = _recorded(estimate)

    def _reserve(self) -> int:
        """A place for the next part: not encoded early until it is submitted."""
        self._futures.append(None)
        self._gains.append(math.nan)
        self._estimates.append((math.nan, math.inf))
        return len(self._futures) - 1

    def _take_place(self, index: int) -> bool:
        """Count part ``index`` as waiting for an encoder; where ``max_waiting`` already wait, leave it
        to the finish."""
        with self._lock:
            full = self._waiting >= self._max_waiting
            if not full:
                self._waiting += 1
        if full:
            self._left[index] = LEFT_BUSY
        return not full

    def _encode_at(self, index: int, blocks: list[np.ndarray], estimate: tuple[float | None, float]) -> None:
        """Encode waiting part ``index`` at the gain ``estimate`` asks for; without a loudness yet, leave
        it to the finish."""
        loudness_db, peak_limit_db = estimate
        self._estimates[index] = _recorded(estimate)
        if loudness_db is None or not math.isfinite(loudness_db):
            with self._lock:
                self._waiting -= 1
            self._left[index] = LEFT_NO_ESTIMATE
            return
        self._gain = speculative_gain(loudness_db, peak_limit_db, self._gain)
        self._gains[index] = self._gain
        self._futures[index] = self._pool.submit(self._run, index, blocks, self._gain)

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


def _recorded(estimate: tuple[float | None, float]) -> tuple[float, float]:
    """An estimate as an ``EarlyPart`` keeps it: no loudness yet is nan."""
    loudness_db, peak_limit_db = estimate
    return (math.nan if loudness_db is None else loudness_db, peak_limit_db)
