"""Where to cut a long lossy output so several encoders can share it.

With loudness on, the whole book is encoded once more after its last chunk, and ffmpeg's AAC, MP3 and
Opus encoders each run on one core: for a novel, minutes of one busy core while the GPU waits for the
next book. AAC (ADTS) and MP3 frames carry their own headers, so parts encoded by separate encoders
join, byte for byte, into one valid stream (``outputs.StreamCodec``), which is then put into its container
without re-encoding.

Exact timing: a decoder puts ``lead`` samples (the encoder's delay and priming) before the first input
sample, and the encoder pads the input by at least ``pad`` samples, up to whole frames. The book is cut at
multiples of the frame size, inside the silence between chunks, and the part covering ``[cut_k, cut_k+1)``
is fed ``[cut_k + lead, cut_k+1 - pad)``: the priming and the padding stand in for as many samples of
silence, and the part decodes to exactly ``cut_k+1 - cut_k`` samples. So the joined stream lines up with
the book to the sample, and only the last frame is padded (less than one frame of silence at the end).
The first part's priming stands in for the silence at the head of the book.

Clean joins: on both sides of a cut the book is silent for ``MARGIN_FRAMES`` frames beyond the skipped
lead, so no encoder's window at a join ever holds sound; digital silence encodes to silence.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Sequence

from fastmaya_cli.outputs import StreamCodec

MARGIN_FRAMES = 2  # an MDCT window spans two frames
MIN_PART_SECONDS = 30.0  # shorter parts spend more on starting ffmpeg than they save


def available_cpus() -> int:
    """CPUs this process may run on (taskset and cgroup cpusets count, unlike ``os.cpu_count``)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def min_part_samples(sample_rate: int) -> int:
    """The shortest part worth its own encoder."""
    return round(MIN_PART_SECONDS * sample_rate)


def part_count(total: int, sample_rate: int, workers: int) -> int:
    """How many parts a book of ``total`` samples is worth splitting into for ``workers`` encoders."""
    return max(1, min(workers, total // min_part_samples(sample_rate)))


def cut_range(start: int, end: int, codec: StreamCodec) -> tuple[int, int]:
    """The first and last cut positions a silence ``[start, end)`` allows: multiples of the frame with
    the margin of silence before them and ``lead`` plus the margin after them (none where first > last)."""
    frame = codec.frame
    before, after = MARGIN_FRAMES * frame, codec.lead + MARGIN_FRAMES * frame
    return -(-(start + before) // frame) * frame, (end - after) // frame * frame


def plan_cuts(total: int, silences: Sequence[tuple[int, int]], parts: int, codec: StreamCodec) -> list[int]:
    """Cut positions for about ``parts`` equal parts of a ``total``-sample timeline, for ``codec``.

    ``silences`` are ``(start, end)`` sample ranges of digital silence, ascending. Each cut is a multiple
    of the frame size, with the margin of silence before it and ``lead`` plus the margin after it, and is
    the allowed position nearest to its ideal one; a cut that would leave a part shorter than half the
    ideal part is dropped. Returns the cuts in order: fewer than ``parts - 1`` where silences are sparse,
    none where no silence is long enough. The first part's priming needs the head of the book silent for
    ``lead`` plus the margin, or nothing is cut.
    """
    frame, before = codec.frame, MARGIN_FRAMES * codec.frame
    after = codec.lead + before
    if parts < 2 or not silences or silences[0][0] > 0 or silences[0][1] < after:
        return []  # the first part's priming must land on silence
    ranges: list[tuple[int, int]] = []  # allowed cut positions, inclusive, ascending
    for start, end in silences:
        low, high = cut_range(start, min(end, total), codec)
        low = max(low, -(-after // frame) * frame)  # room for the first part's priming
        if low <= high:
            ranges.append((low, high))
    if not ranges:
        return []
    lows = [low for low, _ in ranges]
    shortest = total // parts // 2  # a part much shorter than the rest would only add an ffmpeg
    cuts: list[int] = []
    for index in range(1, parts):
        ideal = total * index // parts
        position = bisect.bisect_right(lows, ideal)
        candidates = [
            min(max(ideal // frame * frame, low), high)
            for low, high in ranges[max(0, position - 1) : position + 1]
        ]
        cut = min(candidates, key=lambda candidate: abs(candidate - ideal))
        if cut - (cuts[-1] if cuts else 0) >= shortest and total - cut >= shortest:
            cuts.append(cut)
    return cuts


def part_sources(cuts: Sequence[int], total: int, codec: StreamCodec) -> list[tuple[int, int]]:
    """The ``(start, stop)`` samples of the book each part's encoder is fed (see the module doc)."""
    bounds = [0, *cuts, total]
    return [(start + codec.lead, stop - codec.pad) for start, stop in zip(bounds, bounds[1:], strict=False)]
