"""The book's intermediate file: its 24-bit samples as consecutive FLAC files of `SEGMENT_SECONDS` each, encoded
on several lanes at once and read back as one stream.

When generation ends, the speech the assembler has not written yet comes at once (5,870 s of it after the whole
novel in run N1, BENCHMARKS.md), and a single FLAC encoder was then the slowest of the assembler's lanes: 614
audio s/s on the H200 host during that render, so it set the pace of the render's tail. libsndfile encodes with
Python's interpreter lock released, so segments encoded by lanes of their own take such a burst at several
times one encoder's rate. Segments go to the lanes in turn, and all of a segment's blocks go to its lane, in
order. While the book renders, speech arrives a little at a time and one lane at a time is busy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import suppress
from pathlib import Path

import numpy as np
import soundfile as sf

from .lanes import Lane

SEGMENT_SECONDS = 120.0
# Blocks (a chunk and its pause each, 3 to 20 s) waiting per encoder: a few segments, so that in a burst the
# writer is not held by one encoder while the others have nothing to do.
ENCODER_DEPTH = 24
_MOST_ENCODERS = 4
# soundfile ends a short write with an assertion (as outputs.SoundfileWriter knows).
_WRITE_ERRORS = (sf.LibsndfileError, OSError, AssertionError)


def intermediate_encoders(cpus: int) -> int:
    """Encoders of the intermediate file: one per 4 CPUs, 1 to 4 (the meter, the writer, the early parts' encoders
    and the engine's scheduler need the rest)."""
    return max(1, min(_MOST_ENCODERS, cpus // 4))


class SegmentedFlac:
    """The intermediate file. `reserve()` gives a new hidden path for each segment (the caller removes them);
    `failure(error)` turns a write error into the one to raise (naming the user's output)."""

    def __init__(
        self,
        reserve: Callable[[], Path],
        sample_rate: int,
        *,
        encoders: int,
        failure: Callable[[Exception], Exception],
        segment_seconds: float | None = None,
    ) -> None:
        self.sample_rate = sample_rate
        self.segment_samples = max(1, round((segment_seconds or SEGMENT_SECONDS) * sample_rate))
        self._reserve = reserve
        self._failure = failure
        self._paths: list[Path] = []
        self._open: dict[int, sf.SoundFile] = {}  # segments being written, by number
        self._lanes = [Lane(f"fastmaya-flac{i}", ENCODER_DEPTH) for i in range(max(1, encoders))]
        self._written = 0  # samples handed to write()
        self._discarded: set[int] = set()  # segments removed before the end (see discard)

    @property
    def encoders(self) -> int:
        return len(self._lanes)

    @property
    def busy_s(self) -> float:
        """Seconds the encoders worked, all of them together."""
        return sum(lane.busy_s for lane in self._lanes)

    @property
    def paths(self) -> list[Path]:
        return list(self._paths)

    def write(self, pcm: np.ndarray) -> None:
        """Append samples (int32, 24 bits in the top three bytes). One thread calls it, in book order; `pcm`
        must not change afterwards."""
        offset = 0
        while offset < len(pcm):
            segment, within = divmod(self._written, self.segment_samples)
            if within == 0:
                try:
                    self._paths.append(self._reserve())  # here, so the paths are in book order
                except OSError as error:
                    raise self._failure(error) from error
            take = min(len(pcm) - offset, self.segment_samples - within)
            last = within + take == self.segment_samples
            self._lanes[segment % len(self._lanes)].submit(
                self._encode, segment, pcm[offset : offset + take], last
            )
            offset += take
            self._written += take

    def _encode(self, segment: int, pcm: np.ndarray, last: bool) -> None:
        try:
            file = self._open.get(segment)
            if file is None:
                file = sf.SoundFile(
                    str(self._paths[segment]),
                    "w",
                    samplerate=self.sample_rate,
                    channels=1,
                    format="FLAC",
                    subtype="PCM_24",
                )
                self._open[segment] = file
            file.write(pcm)
            if last:
                del self._open[segment]
                file.close()
        except _WRITE_ERRORS as error:
            raise self._failure(error) from error

    def close(self) -> None:
        """Wait for every encoder, then close the last segment; raises the first failure, after stopping
        everything (as `abort`)."""
        try:
            for lane in self._lanes:
                lane.join()
            for segment in sorted(self._open):
                try:
                    self._open.pop(segment).close()
                except _WRITE_ERRORS as error:
                    raise self._failure(error) from error
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Stop encoding and close what is open; the caller removes the files."""
        for lane in self._lanes:
            lane.cancel()  # the call at work writes to a file, and ends by itself
        for file in self._open.values():
            with suppress(Exception):  # already failing; the file is removed next
                file.close()
        self._open.clear()

    def discard(self, keep: Sequence[tuple[int, int]]) -> list[Path]:
        """Remove, after `close`, the segments that no ``(start, stop)`` sample range in `keep` reads; returns their
        paths. At the finish most of a long book is already encoded in early parts: the segments only those
        cover are gigabytes that the finish can give back while it encodes the rest, not after."""
        needed: set[int] = set()
        for start, stop in keep:
            if stop > start:
                needed.update(
                    range(max(0, start) // self.segment_samples, (stop - 1) // self.segment_samples + 1)
                )
        removed = []
        for segment, path in enumerate(self._paths):
            if segment in needed or segment in self._discarded:
                continue
            self._discarded.add(segment)
            with suppress(OSError):  # the finish removes every reserved path again, quietly
                path.unlink()
            removed.append(path)
        return removed

    def read(self, start: int, stop: int, block: int) -> Iterator[np.ndarray]:
        """Samples ``[start, stop)`` as float32, at most `block` at a time (shorter where a segment ends)."""
        position = start
        while position < stop:
            segment, within = divmod(position, self.segment_samples)
            end = min(stop, (segment + 1) * self.segment_samples)
            if segment >= len(self._paths):
                raise RuntimeError("intermediate file ended early")
            if segment in self._discarded:
                raise RuntimeError(f"segment {segment} of the intermediate file was discarded")
            with sf.SoundFile(str(self._paths[segment])) as source:
                source.seek(within)
                while position < end:
                    data = source.read(min(block, end - position), dtype="float32")
                    if len(data) == 0:
                        raise RuntimeError("intermediate file ended early")
                    yield data
                    position += len(data)
