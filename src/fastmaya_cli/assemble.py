"""Assemble per-chunk audio, in book order, into the finished audiobook, streaming.

Timeline rules (lengths in samples at the output rate ``sr``; every duration is ``round(seconds * sr)``)::

    F       = round(pauses.crossfade * sr)        the crossfade length
    L_i     = max(len(audio_i), F)                a segment shorter than F is padded with silence to F
    P_i     = pause after segment i               from its boundary; "end" and the last segment use tail
    start_1 = head
    end_i   = start_i + L_i
    start_i+1 = end_i + P_i - F                   each join overlaps by F samples
    total   = end_n + tail
            = head + sum(L_i) + sum(P_1 .. P_n-1) - (n - 1) * F + tail      (head + tail when n == 0)

``expected_length`` computes ``total``; the file written has exactly that many samples.

No clicks: the first and last F samples of every segment (``len // 2`` each when it is shorter than 2F)
are shaped by raised-cosine fades, so every segment starts and ends at zero. Segments are mixed by adding
them into the timeline. Where ``P_i >= F``, one segment's fade-out, ``P_i - F`` samples of silence and the
next segment's fade-in follow each other; where ``P_i < F`` (a clause join without a pause) the two
overlap by ``F - P_i`` samples, and with ``P_i == 0`` the fade-out and fade-in are complementary
(``cos^2 + sin^2 = 1``): an equal-gain crossfade.

Chapters: a chapter begins where ``Segment.chapter`` changes. Its marker, and with ``split_chapters`` the
cut between files, lies in the middle of the silence before the chapter's first segment (at that
segment's start when there is no silence), so chapter files begin and end with half the pause. The first
chapter begins at 0.

Streaming: only samples a later segment may still overlap stay in memory (between calls to ``add`` at most
F samples; during one, that segment plus its pause). Everything before is appended at once to a hidden
24-bit intermediate file beside the output (stored 12 dB down, so sums above full scale survive; FLAC in
segments of 2 minutes, about 0.3 GB per hour of speech, see ``intermediate``; for stdout it lives in TMPDIR)
and fed to the loudness meters: one for loudness, and true-peak meters that measure ranges of the book at once
(``loudness.RangePeakMeters``). The file's FLAC encoders (one lane per segment in turn, up to 4 at once), the
conversion to its 24-bit samples (which also feeds the early parts) and the loudness meter each run on lanes
of their own (``lanes.Lane``), beside the thread that mixes the segments: when the book comes in a burst, the
slowest of them bounds how fast it is written (runs M2 and N1, BENCHMARKS.md).
``finish`` waits for the last of them, reads the file back once per output, applies the one global gain,
encodes to a hidden temporary name beside the final one, and only when every file (audio, manifest,
subtitles) is complete moves them into place with ``os.replace``. With
``split_chapters`` the chapter files are encoded in parallel; one m4b, m4a or mp3 file is encoded in parts
at once, cut in silence and joined without encoding again (see ``split_encode``), and most of those parts
are encoded while the book renders, at the gain the book so far asks for (see ``early_parts``). What was not
kept is cut anew for every encoder, and the join copies each part as soon as it is encoded.

Direct: a single FLAC file with loudness off needs no gain, so there is nothing to wait for. The
timeline is then encoded straight into the output's temporary file as it is emitted: no intermediate,
no second pass, and ``finish`` only closes and publishes it. Samples over full scale are clipped there
(and counted).

Loudness: one gain for the whole book, from EBU R128 integrated loudness and true peak over the whole
book (see ``loudness``); it reaches the target unless the true peak would exceed the limit, in which case
the gain stops at the limit. Where parts were encoded early, the gain is the early gain that covers most
of the book, if it is within ``early_parts.GAIN_TOLERANCE_DB`` of that and keeps the peak under the limit.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from contextlib import suppress
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import numpy as np

from fastmaya_cli.early_parts import (
    EARLY_PART_SECONDS,
    SETTLE_SECONDS,
    WAITING_SECONDS,
    EarlyPart,
    EarlyParts,
    reuse_gain,
)
from fastmaya_cli.errors import RuntimeFailure
from fastmaya_cli.intermediate import SegmentedFlac, intermediate_encoders
from fastmaya_cli.lanes import Lane
from fastmaya_cli.loudness import (
    ABSOLUTE_GATE_LUFS,
    IntegratedLoudnessMeter,
    LoudnessReport,
    RangePeakMeters,
    global_gain_db,
    loudness_target,
    peak_gain_limit_db,
    report_for,
)
from fastmaya_cli.mp4 import AdtsError, M4bJoin, index_room
from fastmaya_cli.outputs import (
    FORMATS,
    AudioWriter,
    BookInfo,
    ChapterEntry,
    Cue,
    FfmpegWriter,
    OutputSpec,
    SoundfileWriter,
    StreamCodec,
    book_tags,
    chapter_file_name,
    check_output,
    copy_to_stdout,
    ffmetadata,
    format_for,
    fsync_file,
    image_kind,
    output_lock,
    remove_quietly,
    require_ffmpeg,
    reserve_temp,
    stale_temps,
    stream_codec_for,
    subtitle_kind,
    subtitles_text,
    to_pcm,
    write_failure,
    write_text_file,
)
from fastmaya_cli.split_encode import (
    MARGIN_FRAMES,
    available_cpus,
    min_part_samples,
    part_count,
    part_sources,
    plan_cuts,
)

__all__ = [
    "BOUNDARIES",
    "AssemblyResult",
    "Assembler",
    "BookInfo",
    "ChapterMark",
    "LoudnessReport",
    "OutputSpec",
    "Pauses",
    "Placement",
    "Segment",
    "check_output",
    "expected_length",
    "format_for",
    "output_lock",
]

BOUNDARIES = ("clause", "sentence", "paragraph", "heading", "chapter", "end")

# The intermediate file stores samples 12 dB down, so a mix up to 4x full scale is kept unclipped.
_HEADROOM = 0.25
_READ_BLOCK = 1 << 18  # samples per read when encoding (about 5 s at 48 kHz)
_COPY_BLOCK = 1 << 20  # bytes per read when joining encoded parts
# The room kept for the index of an m4b joined while the book renders, over the index of the book's
# expected length (see ``mp4.M4bJoin``): speech may run longer than expected, and chapters add to it.
INDEX_ROOM_MARGIN = 1.5
INDEX_ROOM_CHAPTERS = 1 << 16  # bytes: some 250 chapters with titles of 255 bytes
PEAK_RANGE_SECONDS = 60.0  # of the book per true-peak meter: the last one finishes soon after the book
_PEAK_METERS = 4  # at most, at once: each measures about 400 audio s/s, and the GPU's process needs a core
# One early encoder per this many CPUs. With one per 4, 4 encoders on a 16-CPU H100 host fell behind the
# book (bench runs A2: 20 parts left to the finish as "encoders busy"); LLM-only passes beside as many
# ffmpeg AAC encoders as a render runs helpers were no slower (bench --stages contention, runs A1, A3).
_EARLY_SHARE = 2
# The early parts' encoders are work that may lag: a part they have not taken is left to the finish. The
# loudness meter and the FLAC encoder are not: each writes the whole book in order, alone, and when the
# book comes in a burst all of them want every core (run M2, BENCHMARKS.md). So the encoders yield.
EARLY_ENCODER_NICENESS = 10
_PCM24_READ_BACK = np.float32(2.0**-31)  # libsndfile's float of a 24-bit code in int32's top bytes
_ZERO_BLOCK = 1 << 16


@dataclass(frozen=True)
class Pauses:
    """Silence in seconds: ``head`` before the first segment, ``tail`` after the last, one per boundary
    kind after each segment, and the crossfade length at every join."""

    head: float = 0.5
    sentence: float = 0.25
    clause: float = 0.0
    paragraph: float = 0.6
    heading: float = 1.0
    chapter: float = 2.0
    tail: float = 1.0
    crossfade: float = 0.010

    def __post_init__(self) -> None:
        for name in ("head", "sentence", "clause", "paragraph", "heading", "chapter", "tail", "crossfade"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"pause {name} must be a non-negative number of seconds, not {value!r}")

    def samples(self, sample_rate: int) -> dict[str, int]:
        """Samples of silence after a segment, by boundary ("end" is the tail)."""
        table = {
            kind: round(getattr(self, kind) * sample_rate)
            for kind in ("clause", "sentence", "paragraph", "heading", "chapter")
        }
        table["end"] = round(self.tail * sample_rate)
        return table


@dataclass(frozen=True)
class Segment:
    chunk_index: int
    audio: np.ndarray  # float32 mono at the assembler's sample rate
    boundary: str  # pause AFTER this segment: one of BOUNDARIES
    chapter: int
    chapter_title: str | None
    text: str
    status: str = "ok"  # "ok" | "failed" (failed chunks arrive as short silence; still placed and listed)
    reason: str = ""
    frames: int = 0
    seed: int = 0
    attempts: int = 1


@dataclass(frozen=True)
class Placement:
    """Where a segment landed in the final timeline."""

    chunk_index: int
    start: float  # seconds
    end: float
    start_sample: int
    end_sample: int


@dataclass(frozen=True)
class ChapterMark:
    index: int  # 1-based position in the book
    number: int  # Segment.chapter
    title: str
    start: float  # seconds
    end: float
    start_sample: int
    end_sample: int
    path: Path | None = None  # the chapter's own file with split_chapters


@dataclass(frozen=True)
class AssemblyResult:
    paths: tuple[Path, ...]  # audio files written; empty when the book went to stdout
    manifest: Path | None
    subtitles: Path | None
    duration: float  # seconds
    samples: int
    sample_rate: int
    loudness: LoudnessReport
    chapters: tuple[ChapterMark, ...]
    warnings: tuple[str, ...] = ()
    encoded_early: float = 0.0  # seconds of the book whose encode, made while it rendered, was kept
    early_parts: dict[str, int] = field(default_factory=dict)  # parts: kept, at another gain, or why left
    finish_steps: dict[str, float] = field(default_factory=dict)  # seconds each step of finish() took
    # Seconds each lane worked (the writing lane's conversion, the FLAC encoders together, the loudness
    # meter) while the book was added and its tail written: the one as long as the adding set its pace.
    # The writing lane's include its waits for room in the FLAC encoders' lanes, which it feeds.
    lane_busy_s: dict[str, float] = field(default_factory=dict)
    early: tuple[EarlyPart, ...] = ()  # the parts cut while the book rendered, with the gains they asked for


def expected_length(
    lengths: Sequence[int], boundaries: Sequence[str], pauses: Pauses, sample_rate: int
) -> int:
    """Exact number of samples the assembler writes for segments of these lengths and boundaries:
    ``head + sum(max(len_i, F)) + sum(pause after each but the last) - (n - 1) * F + tail``."""
    lengths = [int(length) for length in lengths]
    if len(lengths) != len(boundaries):
        raise ValueError("lengths and boundaries differ in count")
    table = pauses.samples(sample_rate)
    for boundary in boundaries:
        if boundary not in table:
            raise ValueError(f"unknown boundary {boundary!r}; expected one of {BOUNDARIES}")
    head, tail = round(pauses.head * sample_rate), round(pauses.tail * sample_rate)
    if not lengths:
        return head + tail
    crossfade = round(pauses.crossfade * sample_rate)
    padded = sum(max(length, crossfade) for length in lengths)
    between = sum(table[boundary] for boundary in boundaries[:-1])
    return head + padded + between - (len(lengths) - 1) * crossfade + tail


def _fade_in(length: int) -> np.ndarray:
    # Raised cosine sampled at half-sample offsets: fade_in[i] + fade_in[length - 1 - i] == 1 exactly.
    return (0.5 - 0.5 * np.cos(np.pi * (np.arange(length) + 0.5) / length)).astype(np.float32)


@dataclass
class _ChapterBuilder:
    number: int
    title: str | None
    start_sample: int


@dataclass(frozen=True)
class _ChunkRecord:
    """What the manifest and subtitles need of a segment; never its audio, which would add up to the
    whole book in memory."""

    chunk_index: int
    text: str
    chapter: int
    boundary: str
    length: int  # samples as given, before padding
    status: str
    reason: str
    frames: int
    seed: int
    attempts: int
    start_sample: int
    end_sample: int
    chapter_position: int  # 0-based index into the chapter list


@dataclass
class _Output:
    final: Path | None  # None = stdout
    temp: Path
    start_sample: int
    end_sample: int
    tags: dict[str, str]
    chapters: list[ChapterEntry] = field(default_factory=list)


class _Joiner(Protocol):
    def add(self, part: Path) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...


class _FfmpegJoiner:
    """Copies each part's bytes into an ffmpeg remux."""

    def __init__(self, writer: FfmpegWriter, cancel: threading.Event) -> None:
        self._writer, self._cancel = writer, cancel

    def add(self, part: Path) -> None:
        with part.open("rb") as stream:
            while block := stream.read(_COPY_BLOCK):
                if self._cancel.is_set():
                    raise RuntimeError("cancelled")
                self._writer.write_bytes(block)

    def close(self) -> None:
        self._writer.close()

    def abort(self) -> None:
        self._writer.abort()


class _Mp4Joiner:
    """Hands each part to ``M4bJoin``; a write error becomes the usual failure (disk full included).
    ``samples`` and ``chapters`` describe the book to ``close``."""

    def __init__(self, join: M4bJoin, shown: Path | str) -> None:
        self._join, self._shown = join, shown
        self.samples = 0
        self.chapters: list[tuple[int, str]] = []

    @property
    def parts(self) -> int:
        return self._join.parts

    def add(self, part: Path) -> None:
        try:
            self._join.add(part.read_bytes())
        except (OSError, AdtsError) as error:
            raise write_failure(self._shown, error) from error

    def truncate(self, parts: int) -> None:
        try:
            self._join.truncate(parts)
        except OSError as error:
            raise write_failure(self._shown, error) from error

    def close(self) -> None:
        try:
            self._join.close(self.samples, self.chapters)
        except (OSError, AdtsError) as error:
            raise write_failure(self._shown, error) from error

    def abort(self) -> None:
        self._join.abort()


class _StreamedJoin:
    """Joins the early parts into the output's file while the book renders, in book order, each as
    soon as it and every part before it are encoded; the finish joins the rest (see ``_finish``).
    Called from the early encoders' threads."""

    def __init__(self, temp: Path, joiner: _Mp4Joiner) -> None:
        self.temp, self.joiner = temp, joiner  # the output's hidden file, and the join writing it
        self._lock = threading.Lock()
        self._encoded: dict[int, Path] = {}
        self._next = 0
        self._broken = False  # a join failed: the finish joins from the last whole part on

    def encoded(self, index: int, path: Path) -> None:
        with self._lock:
            self._encoded[index] = path
            while not self._broken and self._next in self._encoded:
                try:
                    self.joiner.add(self._encoded.pop(self._next))
                except Exception:  # noqa: BLE001 - the finish joins this part again, and reports a failure then
                    self._broken = True
                    return
                self._next += 1


class Assembler:
    """Builds the audiobook from segments added in chunk order; see the module docstring for the rules.

    Use as a context manager. If the with-block raises (or ``finish`` fails), every temporary file is
    removed and no output is left behind, complete or partial.
    """

    def __init__(
        self,
        spec: OutputSpec,
        pauses: Pauses = Pauses(),  # noqa: B008 - frozen default
        *,
        encode_workers: int | None = None,
        early_part_seconds: float | None = EARLY_PART_SECONDS,
        early_encoder_count: int | None = None,
        early_settle_seconds: float = SETTLE_SECONDS,
        join_with_ffmpeg: bool = False,
        expected_seconds: float | None = None,
    ) -> None:
        """``encode_workers``: encoders run at once when finishing (default: the CPUs this process may use).
        ``early_part_seconds``: the length of the parts of one m4b, m4a or mp3 file encoded while the book
        renders (see ``early_parts``); None encodes everything after the last chunk.
        ``early_encoder_count``: the encoders of those parts (default: ``early_encoders``).
        ``early_settle_seconds``: the book measured before those parts get a gain (see ``early_parts``).
        ``join_with_ffmpeg``: join m4b and m4a parts with ffmpeg's remux as before ``mp4`` (for the bench's
        comparison only).
        ``expected_seconds``: about how long the book will be. With it, one m4b or m4a file whose parts
        are encoded early has them joined into it while the book renders, with room for its index before
        the audio (see ``mp4.M4bJoin``)."""
        if spec.format not in FORMATS:
            raise ValueError(f"unknown format {spec.format!r}")
        self.spec = spec
        self.pauses = pauses
        self.sample_rate = spec.sample_rate
        self._format = FORMATS[spec.format]
        self._target = loudness_target(spec.loudness)
        self._pause_table = pauses.samples(spec.sample_rate)
        self._crossfade = round(pauses.crossfade * spec.sample_rate)
        self._head = round(pauses.head * spec.sample_rate)
        self._tail = round(pauses.tail * spec.sample_rate)
        self._fades: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._encode_workers = max(1, encode_workers or available_cpus())
        self._early_part_seconds = early_part_seconds
        self._early_encoder_count = early_encoder_count
        self._early_settle_seconds = early_settle_seconds
        self._join_with_ffmpeg = join_with_ffmpeg
        self._expected_seconds = expected_seconds
        self._early: EarlyParts | None = None
        self._streamed: _StreamedJoin | None = None
        self._sample_peak = 0.0  # of the book so far, while early parts need it
        self._finish_steps: dict[str, float] = {}
        self._lane_busy_s: dict[str, float] = {}
        self._lap_at = 0.0  # when the last step of finish() ended

        self._state = "new"  # new -> open -> finished | failed
        self._work_dir: Path | None = None
        self._created_dir: Path | None = None
        self._intermediate: SegmentedFlac | None = None
        # Direct mode: the output's own encoder instead of the intermediate file (see the module doc).
        self._direct = self._target is None and not spec.split_chapters and spec.format == "flac"
        self._direct_output: _Output | None = None
        self._direct_writer: SoundfileWriter | None = None
        self._meter: IntegratedLoudnessMeter | None = None
        self._peaks: RangePeakMeters | None = None
        # The encoder of the intermediate (or direct) file, the conversion to its samples and the loudness
        # meter each take about as long as everything else the assembler does: they run beside it (lanes).
        self._writing: Lane | None = None  # it feeds the intermediate file's encoders, lanes of their own
        self._metering: Lane | None = None
        self._written = 0  # samples the writing lane has written
        self._metered = 0  # and the metering lane has fed the meter
        self._metered_more = threading.Condition()
        self._temps: list[Path] = []
        self._temps_lock = threading.Lock()
        self._cancel = threading.Event()

        self._pending = np.zeros(0, dtype=np.float32)  # timeline samples from _flushed on
        self._flushed = 0
        self._next_start = self._head
        self._last_end = 0
        self._last_index: int | None = None
        self._chunks: list[_ChunkRecord] = []
        self._chapters: list[_ChapterBuilder] = []
        self._peak_buffered = 0
        self._clipped = 0
        self._nonfinite_chunks: list[int] = []

    # ------------------------------------------------------------------------------------ context manager

    def __enter__(self) -> Assembler:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self._state in ("new", "open"):
            # An exception, or a with-block left without finish(): nothing is published either way.
            self._abort()

    @property
    def buffered_samples(self) -> int:
        """Samples held in memory now (the tail a later segment may still overlap)."""
        return len(self._pending)

    @property
    def peak_buffered_samples(self) -> int:
        """The most samples ever held in memory at once."""
        return self._peak_buffered

    # ------------------------------------------------------------------------------------------- adding

    def add(self, seg: Segment) -> Placement:
        """Place the next segment; returns its position in the final timeline."""
        if self._state not in ("new", "open"):
            raise RuntimeError(f"cannot add to an assembler that is {self._state}")
        if seg.boundary not in self._pause_table:
            raise ValueError(f"unknown boundary {seg.boundary!r}; expected one of {BOUNDARIES}")
        if self._last_index is not None and seg.chunk_index <= self._last_index:
            raise ValueError(f"chunk {seg.chunk_index} arrived after chunk {self._last_index}; add in order")
        audio = self._shape(seg)
        try:
            if self._state == "new":
                self._open()
            start = self._next_start
            end = start + len(audio)
            self._note_chapter(seg, start)
            if self._early is not None and self._chunks and start > self._last_end:
                assert self._writing is not None  # in order with the samples the writing lane feeds it
                self._writing.submit(self._early.offer_silence, self._last_end, start)
            self._mix(start, audio)
            self._next_start = end + self._pause_table[seg.boundary] - self._crossfade
            # A later segment starts at _next_start at the earliest; all before it is final.
            self._emit_until(min(self._next_start, end), silence_follows=self._next_start > end)
        except BaseException:
            self._abort()
            raise
        self._last_end = end
        self._last_index = seg.chunk_index
        self._chunks.append(
            _ChunkRecord(
                seg.chunk_index,
                seg.text,
                seg.chapter,
                seg.boundary,
                len(seg.audio),
                seg.status,
                seg.reason,
                seg.frames,
                seg.seed,
                seg.attempts,
                start,
                end,
                len(self._chapters) - 1,
            )
        )
        return Placement(seg.chunk_index, start / self.sample_rate, end / self.sample_rate, start, end)

    def _shape(self, seg: Segment) -> np.ndarray:
        audio = np.array(seg.audio, dtype=np.float32, copy=True)
        if audio.ndim != 1:
            raise ValueError(f"chunk {seg.chunk_index}: audio must be mono (1-D), got shape {audio.shape}")
        if not np.all(np.isfinite(audio)):
            # A NaN would poison the loudness measurement of the whole book; silence it and say so.
            self._nonfinite_chunks.append(seg.chunk_index)
            audio = np.nan_to_num(audio, nan=0.0, posinf=0.0, neginf=0.0)
        crossfade = self._crossfade
        fade = crossfade if len(audio) >= 2 * crossfade else len(audio) // 2
        if fade:
            fade_in, fade_out = self._fade_pair(fade)
            audio[:fade] *= fade_in
            audio[-fade:] *= fade_out
        if len(audio) < crossfade:
            audio = np.concatenate([audio, np.zeros(crossfade - len(audio), dtype=np.float32)])
        return audio

    def _fade_pair(self, length: int) -> tuple[np.ndarray, np.ndarray]:
        if length not in self._fades:
            rising = _fade_in(length)
            self._fades[length] = (rising, rising[::-1].copy())
        return self._fades[length]

    def _note_chapter(self, seg: Segment, start: int) -> None:
        if not self._chapters:
            self._chapters.append(_ChapterBuilder(seg.chapter, seg.chapter_title, 0))
            return
        current = self._chapters[-1]
        if seg.chapter == current.number:
            if current.title is None and seg.chapter_title:
                current.title = seg.chapter_title
            return
        gap = start - self._last_end
        marker = self._last_end + gap // 2 if gap > 0 else start
        self._chapters.append(_ChapterBuilder(seg.chapter, seg.chapter_title, marker))

    def _mix(self, start: int, audio: np.ndarray) -> None:
        offset = start - self._flushed
        needed = offset + len(audio)
        if needed > len(self._pending):
            grown = np.zeros(needed, dtype=np.float32)
            grown[: len(self._pending)] = self._pending
            self._pending = grown
        self._pending[offset:needed] += audio
        self._peak_buffered = max(self._peak_buffered, len(self._pending))

    def _emit_until(self, position: int, silence_follows: bool = False) -> None:
        count = position - self._flushed
        if count <= 0:
            return
        self._write_timeline(self._pending[:count], silence_follows)
        self._pending = self._pending[count:].copy()

    def _write_timeline(self, block: np.ndarray, silence_follows: bool = False) -> None:
        """Hand ``block``, the next final samples of the book, to the lanes; it is not changed afterwards."""
        assert self._writing is not None
        if self._direct_writer is not None:
            self._writing.submit(self._write_direct, block)
        else:
            if self._metering is not None and self._peaks is not None:
                self._metering.submit(self._measure, block)
                self._peaks.feed(block, silence_follows)  # a new range may begin after this block
            self._writing.submit(self._write_intermediate, block)
        self._flushed += len(block)

    def _write_direct(self, block: np.ndarray) -> None:
        assert self._direct_writer is not None
        self._clipped += int(np.count_nonzero(np.abs(block) > 1.0))
        self._direct_writer.write(block)  # clips

    def _measure(self, block: np.ndarray) -> None:
        assert self._meter is not None
        if self._early is not None and len(block):
            self._sample_peak = max(self._sample_peak, float(np.abs(block).max()))
        self._meter.feed(block)
        with self._metered_more:
            self._metered += len(block)
            self._metered_more.notify_all()

    def _write_intermediate(self, block: np.ndarray) -> None:
        stored = block * _HEADROOM
        over = np.abs(stored) > 1.0
        if over.any():
            self._clipped += int(over.sum())
            stored = np.clip(stored, -1.0, 1.0)
        pcm = to_pcm(stored, 24)  # as the direct writer converts (see to_pcm)
        assert self._intermediate is not None
        self._intermediate.write(pcm)
        self._written += len(block)
        if self._early is not None:
            self._early.feed(pcm.astype(np.float32) * _PCM24_READ_BACK)  # what the finish reads back

    # ------------------------------------------------------------------------------------ files / states

    def _shown_name(self) -> str:
        return str(self.spec.path) if self.spec.path is not None else "stdout"

    def _open(self) -> None:
        """Create the hidden intermediate file beside the output and start the loudness meter."""
        spec = self.spec
        work_dir = work_directory(spec)
        if spec.split_chapters and not work_dir.exists():
            try:
                work_dir.mkdir()
            except OSError as error:
                raise write_failure(work_dir, error) from error
            self._created_dir = work_dir
        self._work_dir = work_dir
        self._state = "open"
        self._writing = Lane("fastmaya-write")
        if self._direct:
            temp = self._reserve(self._format.suffix)
            tags = book_tags(spec.info)
            self._direct_output = _Output(spec.path, temp, 0, 0, tags)
            self._direct_writer = SoundfileWriter(
                temp, self._format, self.sample_rate, spec.bit_depth, 0, tags, self._shown_name()
            )
            self._emit_zeros(self._head)
            return
        self._intermediate = SegmentedFlac(
            partial(self._reserve, ".flac"),
            self.sample_rate,
            encoders=intermediate_encoders(self._encode_workers),
            failure=partial(write_failure, self._shown_name()),
        )
        if self._target is not None:
            # The true-peak meter is slower than an H100 renders speech: several measure ranges at once.
            ffmpeg = require_ffmpeg("it measures loudness")
            self._meter = IntegratedLoudnessMeter(self.sample_rate)
            self._metering = Lane("fastmaya-meter")
            meters = peak_meters(self._encode_workers)
            range_samples = round(PEAK_RANGE_SECONDS * self.sample_rate)
            self._peaks = RangePeakMeters(ffmpeg, self.sample_rate, range_samples, meters)
        self._early = self._early_parts()
        if self._early is not None:
            self._streamed = self._streamed_join()
        self._emit_zeros(self._head)

    def _early_parts(self) -> EarlyParts | None:
        """Encoders for the parts of the book that are final while it renders, where it pays."""
        codec = stream_codec_for(self._format, self.sample_rate)
        if (
            codec is None
            or self._early_part_seconds is None
            or self.spec.split_chapters
            or self._encode_workers < 2
            or self._head < codec.lead + MARGIN_FRAMES * codec.frame  # the first part's priming
        ):
            return None
        require_ffmpeg(f"it is needed to write {self._format.name} files")
        workers = self._early_encoder_count or early_encoders(self._encode_workers)
        return EarlyParts(
            codec,
            round(self._early_part_seconds * self.sample_rate),
            workers,
            partial(self._encode_early, codec),
            self._estimated_gain,
            max_waiting=max(2 * workers, math.ceil(WAITING_SECONDS / self._early_part_seconds)),
            settle_samples=round(self._early_settle_seconds * self.sample_rate),
        )

    def _streamed_join(self) -> _StreamedJoin | None:
        """The output's file, open from the start to take the early parts (see ``_StreamedJoin``), where
        the book's length is known about and ``mp4.M4bJoin`` joins its parts."""
        spec = self.spec
        if self._expected_seconds is None or self._format.muxer != "ipod" or self._join_with_ffmpeg:
            return None
        usable = self._usable_cover()  # the finish warns of a cover left out
        image, kind = usable if isinstance(usable, tuple) else (None, None)
        tags = book_tags(spec.info)
        expected = round(INDEX_ROOM_MARGIN * self._expected_seconds * self.sample_rate)
        room = index_room(expected, tags, (), image, kind) + INDEX_ROOM_CHAPTERS
        temp = self._reserve(self._format.suffix)
        try:
            join = M4bJoin(temp, tags, image, kind, room)
        except OSError as error:
            raise write_failure(self._shown_name(), error) from error
        return _StreamedJoin(temp, _Mp4Joiner(join, self._shown_name()))

    def _estimated_gain(self) -> tuple[float | None, float]:
        """The gain the loudness of the book so far asks for, and the most its true peak so far allows:
        the larger of the peak meters' finished ranges and the sample peak since (true peaks are higher)."""
        if self._target is None:
            return 0.0, math.inf
        assert self._meter is not None and self._peaks is not None
        self._wait_for_meter(self._written)
        so_far = self._meter.integrated_so_far()
        if so_far is None or not math.isfinite(so_far) or so_far <= ABSOLUTE_GATE_LUFS:
            return None, math.inf
        peak = max(self._peaks.peak_so_far(), 20 * math.log10(max(self._sample_peak, 1e-10)))
        return self._target.integrated_lufs - so_far, peak_gain_limit_db(peak, self._target)

    def _wait_for_meter(self, samples: int) -> None:
        """Until the meter has been fed ``samples`` (it may lag the writing lane by a few blocks), so that
        an early part's gain counts its own samples; not if the metering lane stopped."""
        with self._metered_more:
            while self._metered < samples and not self._cancel.is_set():
                if self._metering is None or self._metering.stopped:
                    return
                self._metered_more.wait(0.05)

    def _encode_early(
        self, codec: StreamCodec, index: int, blocks: Iterable[np.ndarray], gain_db: float
    ) -> Path:
        path = self._reserve(f".early{index}.{codec.muxer}")
        writer = self._part_writer(codec, path, self._shown_name())
        writer.lower_priority(EARLY_ENCODER_NICENESS)
        self._encode_blocks(writer, blocks, 10 ** (gain_db / 20) / _HEADROOM)
        if self._streamed is not None:
            self._streamed.encoded(index, path)
        return path

    def _reserve(self, suffix: str, name: str | None = None) -> Path:
        assert self._work_dir is not None
        base = name or (self.spec.path.name if self.spec.path is not None else "fastmaya-stdout")
        try:
            path = reserve_temp(self._work_dir, base, suffix)
        except OSError as error:
            raise write_failure(self._shown_name(), error) from error
        with self._temps_lock:  # encoder threads reserve files too
            self._temps.append(path)
        return path

    def _emit_zeros(self, count: int) -> None:
        # Silence before the first segment and after the last never overlaps anything: write it directly.
        while count > 0:
            step = min(count, _ZERO_BLOCK)
            self._write_timeline(np.zeros(step, dtype=np.float32))
            count -= step
        self._next_start = max(self._next_start, self._flushed)

    def _abort(self) -> None:
        self._state = "failed"
        self._cancel.set()
        if self._writing is not None:
            self._writing.cancel()  # its call at work writes to the intermediate file, and ends by itself
            self._writing = None
        if self._intermediate is not None:
            self._intermediate.abort()
            self._intermediate = None
        if self._metering is not None:
            self._metering.cancel()  # its call at work measures a block, and ends by itself
            self._metering = None
        if self._meter is not None:
            self._meter.abort()
        if self._early is not None:
            self._early.abort()
            self._early = None
        if self._streamed is not None:
            self._streamed.joiner.abort()
            self._streamed = None
        self._meter = None
        if self._peaks is not None:
            self._peaks.abort()
            self._peaks = None
        if self._direct_writer is not None:
            self._direct_writer.abort()
            self._direct_writer = None
        for path in self._temps:
            remove_quietly(path)
        self._temps.clear()
        if self._created_dir is not None:
            with suppress(OSError):
                self._created_dir.rmdir()  # only if still empty
        self._pending = np.zeros(0, dtype=np.float32)

    # ------------------------------------------------------------------------------------------ finishing

    def finish(self) -> AssemblyResult:
        """Write the tail, apply loudness, encode, and publish every output atomically."""
        if self._state != "open":
            if self._state == "new":
                raise RuntimeFailure(
                    "nothing to assemble: no chunk audio was produced.", "Check that the input has text."
                )
            raise RuntimeError(f"cannot finish an assembler that is {self._state}")
        try:
            result = self._finish()
        except BaseException:
            self._abort()
            raise
        self._state = "finished"
        return result

    def _lap(self, step: str, at: float | None = None) -> None:
        """Add the time from the last lap to now (or ``at``) to ``step`` of finish()."""
        now = time.perf_counter() if at is None else at
        self._finish_steps[step] = self._finish_steps.get(step, 0.0) + now - self._lap_at
        self._lap_at = now

    def _finish(self) -> AssemblyResult:
        spec = self.spec
        self._lap_at = time.perf_counter()
        self._emit_until(self._last_end)
        self._emit_zeros(self._tail)
        total = self._flushed
        expected = expected_length(
            [record.length for record in self._chunks],
            [record.boundary for record in self._chunks],
            self.pauses,
            self.sample_rate,
        )
        if total != expected:  # the two descriptions of the timeline must agree to the sample
            raise RuntimeError(f"assembled {total} samples, expected {expected}")
        lanes = {"write": self._writing, "meter": self._metering}
        for lane in lanes.values():
            if lane is not None:
                lane.join()
        self._lane_busy_s = {name: round(lane.busy_s, 3) for name, lane in lanes.items() if lane is not None}
        if self._intermediate is not None:
            self._intermediate.close()  # after the writing lane, which feeds its encoders
            self._lane_busy_s["flac"] = round(self._intermediate.busy_s, 3)
        self._writing = self._metering = None

        self._lap("tail")
        # A part with more left to encode than the finish gives one encoder waits no longer than that.
        early = self._early.finish(min_part_samples(self.sample_rate)) if self._early is not None else []
        self._early = None
        self._lap("early_encoders")
        warnings: list[str] = []
        measured = self._meter.result() if self._meter is not None else None
        self._meter = None
        if measured is not None:
            assert self._peaks is not None
            measured = replace(measured, true_peak_dbtp=self._peaks.result())
        self._peaks = None
        gain_db = global_gain_db(measured, self._target) if measured and self._target else 0.0
        if early:
            peak_limit = math.inf
            if measured is not None and self._target is not None:
                peak_limit = peak_gain_limit_db(measured.true_peak_dbtp, self._target)
            gain_db = reuse_gain(gain_db, peak_limit, early)
        loudness = report_for(spec.loudness, measured, gain_db)
        factor = 10 ** (gain_db / 20) / _HEADROOM
        self._lap("meters")
        kept: dict[int, Path] = {}
        for index, part in enumerate(early):
            if part.path is not None and part.gain_db == gain_db:
                kept[index] = part.path
            elif part.path is not None:
                remove_quietly(part.path)  # encoded at another gain: the finish encodes it again
        streamed = self._streamed  # left to _abort until the finish has published the file
        if streamed is not None:  # keep what was joined up to the first part not kept
            joined = streamed.joiner.parts
            streamed.joiner.truncate(next((index for index in range(joined) if index not in kept), joined))

        chapters = self._chapter_marks(total)
        cover = self._cover_file(warnings)
        if self._direct_writer is not None:
            outputs = [self._close_direct(total)]
        else:
            outputs = self._plan_outputs(chapters, streamed)
            if spec.split_chapters:
                chapters = [
                    replace(mark, path=output.final) for mark, output in zip(chapters, outputs, strict=True)
                ]
            kept_parts = {(early[index].start, early[index].stop): path for index, path in kept.items()}
            self._render_all(outputs, factor, cover, kept_parts, streamed)
        self._lap("encode")

        manifest_temp = subtitles_temp = None
        paths = tuple(output.final for output in outputs if output.final is not None)
        if spec.manifest is not None:
            manifest_temp = self._reserve_beside(spec.manifest)
            manifest = self._manifest(total, loudness, chapters, paths)
            write_text_file(
                manifest_temp, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", spec.manifest
            )
        if spec.subtitles is not None:
            subtitles_temp = self._reserve_beside(spec.subtitles)
            text = subtitles_text(self._cues(), subtitle_kind(spec.subtitles))
            write_text_file(subtitles_temp, text, spec.subtitles)

        # Everything is complete on disk: publish it.
        for output in outputs:
            if output.final is None:
                copy_to_stdout(output.temp)
            else:
                os.replace(output.temp, output.final)
        if manifest_temp is not None and spec.manifest is not None:
            os.replace(manifest_temp, spec.manifest)
        if subtitles_temp is not None and spec.subtitles is not None:
            os.replace(subtitles_temp, spec.subtitles)
        self._lap("publish")  # with the manifest and subtitles
        for path in self._temps:
            remove_quietly(path)
        self._temps.clear()
        self._streamed = None
        self._lap("remove_temps")  # the intermediate file and the early parts: gigabytes for a long book

        if self._clipped:
            over = "over full scale" if self._direct else "more than 12 dB over full scale"
            warnings.append(f"{self._clipped} samples were {over} and were clipped.")
        if self._nonfinite_chunks:
            chunks = ", ".join(str(index) for index in self._nonfinite_chunks[:10])
            warnings.append(f"chunks {chunks} had NaN/inf samples; those samples were silenced.")
        return AssemblyResult(
            paths=paths,
            manifest=spec.manifest,
            subtitles=spec.subtitles,
            duration=total / self.sample_rate,
            samples=total,
            sample_rate=self.sample_rate,
            loudness=loudness,
            chapters=tuple(chapters),
            warnings=tuple(warnings),
            encoded_early=sum(early[index].stop - early[index].start for index in kept) / self.sample_rate,
            early_parts=_early_tally(early, kept),
            early=tuple(early),
            finish_steps={name: round(seconds, 3) for name, seconds in self._finish_steps.items()},
            lane_busy_s=self._lane_busy_s,
        )

    def _close_direct(self, total: int) -> _Output:
        assert self._direct_writer is not None and self._direct_output is not None
        writer, self._direct_writer = self._direct_writer, None
        writer.close()
        output = replace(self._direct_output, end_sample=total)
        _make_durable(output.temp, self._shown_name())
        return output

    def _reserve_beside(self, final: Path) -> Path:
        try:
            path = reserve_temp(final.parent, final.name, "")
        except OSError as error:
            raise write_failure(final, error) from error
        self._temps.append(path)
        return path

    def _chapter_marks(self, total: int) -> list[ChapterMark]:
        marks = []
        for position, chapter in enumerate(self._chapters):
            end = self._chapters[position + 1].start_sample if position + 1 < len(self._chapters) else total
            marks.append(
                ChapterMark(
                    index=position + 1,
                    number=chapter.number,
                    title=chapter.title or f"Chapter {chapter.number}",
                    start=chapter.start_sample / self.sample_rate,
                    end=end / self.sample_rate,
                    start_sample=chapter.start_sample,
                    end_sample=end,
                )
            )
        return marks

    def _plan_outputs(self, chapters: list[ChapterMark], streamed: _StreamedJoin | None) -> list[_Output]:
        spec, suffix = self.spec, self._format.suffix
        total = chapters[-1].end_sample
        if not spec.split_chapters:
            entries = [ChapterEntry(mark.start_sample, mark.end_sample, mark.title) for mark in chapters]
            temp = streamed.temp if streamed is not None else self._reserve(suffix)
            return [_Output(spec.path, temp, 0, total, book_tags(spec.info), entries)]
        assert spec.path is not None
        outputs = []
        for mark in chapters:
            name = chapter_file_name(mark.index, len(chapters), mark.title, suffix)
            tags = book_tags(spec.info, title=mark.title, track=(mark.index, len(chapters)))
            temp = self._reserve(suffix, name)
            outputs.append(_Output(spec.path / name, temp, mark.start_sample, mark.end_sample, tags))
        return outputs

    def _usable_cover(self) -> tuple[bytes, str] | str | None:
        """The cover and its kind where the output can carry it; else why it is left out, or None."""
        cover = self.spec.info.cover
        if not cover:
            return None
        kind = image_kind(cover)
        if kind is None:
            return "the cover is neither JPEG nor PNG; it was left out."
        if not self._format.supports_cover:
            return f"{self._format.name} files carry no cover here; it was left out."
        return cover, kind

    def _cover_file(self, warnings: list[str]) -> Path | None:
        usable = self._usable_cover()
        if isinstance(usable, str):
            warnings.append(usable)
        if not isinstance(usable, tuple):
            return None
        cover, kind = usable
        path = self._reserve(".jpg" if kind == "jpeg" else ".png")
        try:
            path.write_bytes(cover)
        except OSError as error:
            raise write_failure(self._shown_name(), error) from error
        return path

    def _render_all(
        self,
        outputs: list[_Output],
        factor: float,
        cover: Path | None,
        kept_parts: dict[tuple[int, int], Path],
        streamed: _StreamedJoin | None = None,
    ) -> None:
        """Encode every output; ``kept_parts`` are the files of the parts encoded while the book
        rendered at the book's gain, by the ``(start, stop)`` samples they cover, and ``streamed`` the
        output's file where the first of them are already joined."""
        if len(outputs) == 1:
            plan = self._split_plan(outputs[0], list(kept_parts))
            if plan is None:
                if streamed is not None:
                    streamed.joiner.abort()  # the file is encoded anew, in one piece
                self._render(outputs[0], factor, cover)
            else:
                codec, cuts = plan
                bounds = [0, *cuts]
                encoded = {bounds.index(start): path for (start, _), path in kept_parts.items()}
                joiner = streamed.joiner if streamed is not None else None
                self._render_in_parts(outputs[0], factor, cover, codec, cuts, encoded, joiner)
            return
        # Encoders run on one core each; with one file per chapter, encode several chapters at once.
        self._run_all([partial(self._render, output, factor, cover) for output in outputs])

    def _run_all(self, tasks: list[Callable[[], None]]) -> None:
        """Run the tasks on up to ``encode_workers`` threads; the first failure cancels the rest."""
        workers = min(len(tasks), self._encode_workers)
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fastmaya-encode") as pool:
            futures = [pool.submit(task) for task in tasks]
            try:
                wait(futures, return_when=FIRST_EXCEPTION)
            except BaseException:  # interrupted: the workers stop at their next block
                self._cancel.set()
                raise
            failure = next((f.exception() for f in futures if f.done() and f.exception() is not None), None)
            if failure is not None:
                self._cancel.set()
                raise failure

    def _render(self, output: _Output, factor: float, cover: Path | None) -> None:
        """Read the output's range of the intermediate file, apply the gain, encode into its temp file."""
        if self._cancel.is_set():
            return
        shown = output.final if output.final is not None else "stdout"
        writer: AudioWriter
        if self._format.needs_ffmpeg:
            metadata = self._metadata_file(output, shown)
            ffmpeg = require_ffmpeg(f"it is needed to write {self._format.name} files")
            writer = FfmpegWriter(
                ffmpeg, output.temp, self._format, self.sample_rate, self.spec.bitrate, metadata, cover, shown
            )
        else:
            writer = SoundfileWriter(
                output.temp,
                self._format,
                self.sample_rate,
                self.spec.bit_depth,
                output.end_sample - output.start_sample,
                output.tags,
                shown,
            )
        self._encode_blocks(writer, self._intermediate_blocks(output.start_sample, output.end_sample), factor)
        _make_durable(output.temp, shown)

    def _metadata_file(self, output: _Output, shown: Path | str) -> Path:
        metadata = self._reserve(".ffmeta")
        write_text_file(metadata, ffmetadata(output.tags, output.chapters, self.sample_rate), shown)
        return metadata

    def _intermediate_blocks(self, start: int, stop: int) -> Iterator[np.ndarray]:
        """Samples ``[start, stop)`` of the intermediate file, a block at a time."""
        assert self._intermediate is not None
        return self._intermediate.read(start, stop, _READ_BLOCK)

    def _encode_blocks(self, writer: AudioWriter, blocks: Iterable[np.ndarray], factor: float) -> None:
        """Feed the blocks, times ``factor``, to the writer and close it; on a failure or a cancel, abort it."""
        try:
            for block in blocks:
                if self._cancel.is_set():
                    raise RuntimeError("cancelled")
                writer.write(block * np.float32(factor))
            writer.close()
        except BaseException:
            writer.abort()
            raise

    def _part_writer(self, codec: StreamCodec, path: Path, shown: Path | str) -> FfmpegWriter:
        """An encoder of one part's bare stream (see ``split_encode``)."""
        ffmpeg = require_ffmpeg(f"it is needed to write {self._format.name} files")
        return FfmpegWriter.bare_stream(
            ffmpeg, path, self._format, codec, self.sample_rate, self.spec.bitrate, shown
        )

    def _split_plan(
        self, output: _Output, kept: list[tuple[int, int]]
    ) -> tuple[StreamCodec, list[int]] | None:
        """The codec and cuts to encode this one output in parts with (see ``split_encode``), if any:
        the bounds of the ``kept`` parts (encoded while the book rendered, ascending), then cuts that
        share the rest of the book among the encoders."""
        codec = stream_codec_for(self._format, self.sample_rate)
        if codec is None or self._encode_workers < 2 or output.start_sample != 0:
            return None
        total = output.end_sample
        fixed = {bound for part in kept for bound in part if 0 < bound < total}
        bounds = [0, *sorted(fixed), total]
        free = [(a, b) for a, b in zip(bounds, bounds[1:], strict=False) if (a, b) not in kept]
        free_total = sum(b - a for a, b in free)
        silences = self._silences(total)
        cuts = set(fixed)
        for start, stop in free:
            # A kept part's bound lies in silence with room for the next part's priming, so a free range
            # starts silent, as plan_cuts asks of a book's head.
            inside = [(max(a - start, 0), b - start) for a, b in silences if b > start and a < stop]
            share = max(1, round(self._encode_workers * (stop - start) / free_total))
            parts = part_count(stop - start, self.sample_rate, share)
            cuts.update(start + cut for cut in plan_cuts(stop - start, inside, parts, codec))
        return (codec, sorted(cuts)) if cuts else None

    def _silences(self, total: int) -> list[tuple[int, int]]:
        """The sample ranges of the timeline no segment reaches: there it is digital silence."""
        silences = []
        reached = 0
        for record in self._chunks:
            if record.start_sample > reached:
                silences.append((reached, record.start_sample))
            reached = max(reached, record.end_sample)
        if total > reached:
            silences.append((reached, total))
        return silences

    def _render_in_parts(
        self,
        output: _Output,
        factor: float,
        cover: Path | None,
        codec: StreamCodec,
        cuts: list[int],
        encoded: dict[int, Path],
        joiner: _Mp4Joiner | None = None,
    ) -> None:
        """Encode the parts between the cuts at once, but for those already ``encoded`` (by index), then
        join them into the output's container (``joiner``'s, which holds the first parts already)."""
        shown = output.final if output.final is not None else "stdout"
        sources = part_sources(cuts, output.end_sample, codec)
        parts = [
            encoded[index] if index in encoded else self._reserve(f".part{index}.{codec.muxer}")
            for index in range(len(sources))
        ]

        def encode(index: int) -> float:
            if not self._cancel.is_set():
                writer = self._part_writer(codec, parts[index], shown)
                self._encode_blocks(writer, self._intermediate_blocks(*sources[index]), factor)
            return time.perf_counter()

        # The join copies the parts in order while the rest are still being encoded: it is one ffmpeg,
        # bound by its time per packet, and need not wait for the last encoder to start. It waits for
        # the encoders most of the time, so they keep every core.
        missing = [index for index in range(len(parts)) if index not in encoded]
        workers = max(1, min(len(missing), self._encode_workers))
        # Removing a long book's intermediate file took 1.86 s after the finish's encode on an H100 host
        # (BENCHMARKS.md run X2); what the parts kept from early encoding cover goes meanwhile.
        discarding = None
        if self._intermediate is not None:
            discarding = threading.Thread(
                target=self._intermediate.discard,
                args=([sources[index] for index in missing],),
                name="fastmaya-discard",
                daemon=True,
            )
            discarding.start()
        try:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fastmaya-encode") as pool:
                encoding = {index: pool.submit(encode, index) for index in missing}
                try:
                    self._join_parts(output, cover, codec, parts, encoding, shown, joiner)
                except BaseException:
                    self._cancel.set()  # the encoders stop at their next block
                    raise
        finally:
            if discarding is not None:
                discarding.join()

    def _join_parts(
        self,
        output: _Output,
        cover: Path | None,
        codec: StreamCodec,
        parts: list[Path],
        encoding: dict[int, Future[float]],
        shown: Path | str,
        joined: _Mp4Joiner | None = None,
    ) -> None:
        """Join the parts into the output's container (``joined``'s, which holds the first parts
        already), each as soon as its encoder (if any) is done. The finish's steps: ``encode`` until the
        last encoder is done, ``join`` the time after it."""
        joiner = self._joiner(output, cover, codec, shown, joined)
        first = joined.parts if joined is not None else 0
        try:
            for index, part in enumerate(parts):
                if index < first:
                    remove_quietly(part)
                    continue
                if index in encoding:
                    encoding[index].result()
                if self._cancel.is_set():
                    raise RuntimeError("cancelled")
                joiner.add(part)
                remove_quietly(part)  # the joined copy replaces it: give the disk back now
            encoded_at = max((future.result() for future in encoding.values()), default=self._lap_at)
            joiner.close()
        except BaseException:
            joiner.abort()
            raise
        _make_durable(output.temp, shown)
        self._lap("encode", at=encoded_at)
        self._lap("join")

    def _joiner(
        self,
        output: _Output,
        cover: Path | None,
        codec: StreamCodec,
        shown: Path | str,
        joined: _Mp4Joiner | None = None,
    ) -> _Joiner:
        """m4b and m4a parts are joined by ``mp4.M4bJoin`` (``joined``'s where the first parts are
        already in it); mp3 parts by ffmpeg, copied, not encoded again."""
        if self._format.muxer == "ipod" and codec.muxer == "adts" and not self._join_with_ffmpeg:
            chapters = [(chapter.start_sample, chapter.title) for chapter in output.chapters]
            samples = output.end_sample - output.start_sample
            if joined is None:
                image = cover.read_bytes() if cover is not None else None
                kind = image_kind(image) if image is not None else None
                room = index_room(samples, output.tags, chapters, image, kind)
                try:
                    join = M4bJoin(output.temp, output.tags, image, kind, room)
                except OSError as error:
                    raise write_failure(shown, error) from error
                joined = _Mp4Joiner(join, shown)
            joined.samples, joined.chapters = samples, chapters
            return joined
        ffmpeg = require_ffmpeg(f"it is needed to write {self._format.name} files")
        metadata = self._metadata_file(output, shown)
        return _FfmpegJoiner(
            FfmpegWriter.remux(ffmpeg, output.temp, self._format, codec, metadata, cover, shown), self._cancel
        )

    # ----------------------------------------------------------------------------------- manifest, cues

    def _manifest(
        self, total: int, loudness: LoudnessReport, chapters: list[ChapterMark], paths: tuple[Path, ...]
    ) -> dict[str, Any]:
        sr, info = self.sample_rate, self.spec.info
        return {
            "fastmaya_manifest": 1,
            "book": {
                "title": info.title,
                "author": info.author,
                "narrator": info.narrator,
                "cover": info.cover_mime if info.cover else None,
            },
            "format": self.spec.format,
            "outputs": [str(path) for path in paths] if paths else ["-"],
            "sample_rate": sr,
            "samples": total,
            "duration": round(total / sr, 6),
            "pauses": asdict(self.pauses),
            "loudness": loudness.as_dict(),
            "chapters": [
                {
                    "index": mark.index,
                    "number": mark.number,
                    "title": mark.title,
                    "start": round(mark.start, 6),
                    "end": round(mark.end, 6),
                    "start_sample": mark.start_sample,
                    "end_sample": mark.end_sample,
                    "file": str(mark.path) if mark.path is not None else None,
                }
                for mark in chapters
            ],
            "chunks": [
                {
                    "index": record.chunk_index,
                    "text": record.text,
                    "chapter": record.chapter,
                    "boundary": record.boundary,
                    "start": round(record.start_sample / sr, 6),
                    "end": round(record.end_sample / sr, 6),
                    "start_sample": record.start_sample,
                    "end_sample": record.end_sample,
                    "frames": record.frames,
                    "seed": record.seed,
                    "status": record.status,
                    "reason": record.reason,
                    "attempts": record.attempts,
                    **self._file_position(record, chapters),
                }
                for record in self._chunks
            ],
        }

    def _file_position(self, record: _ChunkRecord, chapters: list[ChapterMark]) -> dict[str, Any]:
        """With one file per chapter: which file holds the chunk, and where in that file."""
        mark = chapters[record.chapter_position]
        if mark.path is None:
            return {}
        sr = self.sample_rate
        return {
            "file": mark.path.name,
            "file_start": round((record.start_sample - mark.start_sample) / sr, 6),
            "file_end": round((record.end_sample - mark.start_sample) / sr, 6),
        }

    def _cues(self) -> list[Cue]:
        sr, cues = self.sample_rate, []
        for position, record in enumerate(self._chunks):
            end = record.end_sample
            if position + 1 < len(self._chunks):
                # Crossfades overlap neighbours by a few ms; cues must not, or players show two lines.
                end = min(end, self._chunks[position + 1].start_sample)
            cues.append(Cue(record.start_sample / sr, end / sr, record.text))
        return cues


def work_directory(spec: OutputSpec) -> Path:
    """Where the assembler keeps its hidden files (the intermediate file, the early parts): beside the output,
    in the folder of a book split into chapters, or in TMPDIR for stdout."""
    if spec.path is None:
        return Path(tempfile.gettempdir())
    return spec.path if spec.split_chapters else spec.path.parent


def remove_stale_temps(spec: OutputSpec) -> tuple[int, int]:
    """Remove the hidden files a killed run writing ``spec.path`` left behind (hundreds of intermediate
    segments and early parts, gigabytes for a long book); (files, bytes) removed. Call it only while
    holding ``output_lock(spec.path)``."""
    if spec.path is None:  # stdout runs share TMPDIR and hold no lock
        return 0, 0
    files = size = 0
    for path in stale_temps(work_directory(spec), spec.path.name):
        with suppress(OSError):
            length = path.stat().st_size
            path.unlink()
            files, size = files + 1, size + length
    return files, size


def peak_meters(encode_workers: int) -> int:
    """True-peak meters run at once, beside a render with loudness on."""
    return max(1, min(_PEAK_METERS, encode_workers // 2))


def early_encoders(encode_workers: int) -> int:
    """Encoders of early parts, beside a render of a long m4b, m4a or mp3 with loudness on."""
    return max(1, encode_workers // _EARLY_SHARE)


def _early_tally(early: Sequence[EarlyPart], kept: dict[int, Path]) -> dict[str, int]:
    """How many early parts were kept, encoded at another gain, or left to the finish (and why)."""
    tally: dict[str, int] = {}
    for index, part in enumerate(early):
        key = "kept" if index in kept else ("another gain" if part.path is not None else part.left)
        tally[key] = tally.get(key, 0) + 1
    return tally


def _make_durable(temp: Path, shown: Path | str) -> None:
    """fsync a finished temporary file before it replaces anything; a failure names the output."""
    try:
        fsync_file(temp)
    except OSError as error:
        raise write_failure(shown, error) from error
