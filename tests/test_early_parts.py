"""Parts of a long m4b/mp3 encoded while the book renders: the gains they are encoded at, where they are
cut, and that the finished file is the same book at one gain whether a part was kept or encoded again."""

from __future__ import annotations

import dataclasses
import math
import os
import struct
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest

from fastmaya_cli import assemble, intermediate, split_encode
from fastmaya_cli.assemble import EARLY_ENCODER_NICENESS, Assembler, BookInfo, OutputSpec, Pauses, Segment
from fastmaya_cli.early_parts import (
    GAIN_TOLERANCE_DB,
    LEFT_AT_END,
    LEFT_BUSY,
    LEFT_CUT_SHORT,
    LEFT_NO_ESTIMATE,
    LEFT_SETTLING,
    SETTLE_SECONDS,
    WAITING_SECONDS,
    EarlyPart,
    EarlyParts,
    reuse_gain,
    speculative_gain,
)
from fastmaya_cli.intermediate import SegmentedFlac
from fastmaya_cli.outputs import STREAM_CODECS, FfmpegWriter
from fastmaya_cli.split_encode import MARGIN_FRAMES, part_sources
from test_split_encode import FFMPEG, SR, book_segments, decode, needs_ffmpeg

AAC = STREAM_CODECS["aac"]

# ------------------------------------------------------------------------------------------- gains


def test_an_early_gain_sits_on_the_grid_below_the_peak_limit_and_stays_while_near() -> None:
    assert speculative_gain(-2.83, math.inf, None) == pytest.approx(-2.8)
    assert speculative_gain(-2.7, math.inf, -2.8) == -2.8  # within half the tolerance: kept
    assert speculative_gain(-2.5, math.inf, -2.8) == pytest.approx(-2.5)  # drifted: follows
    # The peak so far allows at most -3.14: the gain is floored on the grid, never rounded up to it.
    assert speculative_gain(-2.8, -3.14, None) == pytest.approx(-3.2)
    assert speculative_gain(-2.8, -3.14, -3.1) == pytest.approx(-3.2)  # the previous one is now too loud
    assert speculative_gain(-2.8, -3.14, -3.2) == -3.2


def part(start: int, stop: int, gain: float, encoded: bool = True) -> EarlyPart:
    return EarlyPart(start, stop, Path(f"/p{start}") if encoded else None, gain)


def test_the_books_gain_is_the_early_gain_covering_most_of_it_within_the_limits() -> None:
    parts = [part(0, 100, -3.0), part(100, 400, -3.2), part(400, 500, -3.1), part(500, 900, -3.0, False)]
    assert reuse_gain(-3.05, math.inf, parts) == -3.2  # 300 samples; the unencoded part does not count
    assert reuse_gain(-3.05, -3.15, parts) == -3.2  # the others would lift the peak over its limit
    assert reuse_gain(-2.9, math.inf, parts) == -3.0  # -3.2 is too far from the exact gain
    assert reuse_gain(-3.0 - 2 * GAIN_TOLERANCE_DB, math.inf, parts) == -3.5  # none near: the exact gain
    assert reuse_gain(-1.0, math.inf, []) == -1.0


# -------------------------------------------------------------------------------------------- cuts


def test_parts_end_in_silence_at_frames_and_are_fed_what_the_finish_would_feed() -> None:
    """A timeline of sound and silences fed in uneven blocks: each early part is cut in the first
    silence after it is long enough, at a frame with the margins, and gets exactly the samples
    ``part_sources`` names for it."""
    rng = np.random.default_rng(3)
    frame, margin = AAC.frame, MARGIN_FRAMES * AAC.frame
    received: dict[int, np.ndarray] = {}

    def encode(index: int, blocks: Iterable[np.ndarray], gain_db: float) -> Path:
        received[index] = np.concatenate(list(blocks))
        return Path(f"/part{index}")

    # Room for every part to wait: on a loaded machine a part may otherwise be left to the finish.
    early = EarlyParts(AAC, 40_000, 2, encode, lambda: (-3.0, math.inf), max_waiting=1000)
    timeline: list[np.ndarray] = [np.zeros(6000, dtype=np.float32)]  # the head
    early.feed(timeline[0])
    silences = []
    position = 6000
    for _ in range(40):
        sound = rng.standard_normal(int(rng.integers(3000, 9000))).astype(np.float32)
        gap = int(rng.integers(0, 9000))  # some too short to cut in
        for block in np.array_split(sound, 3):
            early.feed(block)
        position += len(sound)
        early.offer_silence(position, position + gap)
        silences.append((position, position + gap))
        early.feed(np.zeros(gap, dtype=np.float32))
        timeline += [sound, np.zeros(gap, dtype=np.float32)]
        position += gap
    book = np.concatenate(timeline)
    cuts = early.cuts
    parts = early.finish()
    assert len(parts) >= 4 and [p.stop for p in parts] == cuts and parts[0].start == 0
    sources = part_sources(cuts, len(book), AAC)
    # The last parts may still be waiting for one of the 2 encoders when the book ends (more so on a
    # loaded machine); those are left to the finish. Every part encoded got exactly its samples.
    assert parts[0].path is not None
    for index, (start, stop) in enumerate(sources[: len(parts)]):
        if parts[index].path is not None:
            assert np.array_equal(received[index], book[start:stop])
        else:
            assert parts[index].left in (LEFT_AT_END, LEFT_CUT_SHORT)
    previous = 0
    for cut in cuts:
        assert cut % frame == 0 and cut - previous >= 40_000
        assert any(s + margin <= cut and cut + AAC.lead + margin <= e for s, e in silences)
        previous = cut


def test_a_part_without_a_gain_or_an_encoder_is_left_to_the_finish() -> None:
    encoded: list[int] = []

    def encode(index: int, blocks: Iterable[np.ndarray], gain_db: float) -> Path:
        encoded.append(index)
        return Path(f"/part{index}")

    for estimate, waiting, why in (((None, math.inf), 4, LEFT_NO_ESTIMATE), ((-2.0, math.inf), 0, LEFT_BUSY)):
        early = EarlyParts(AAC, 10_000, 1, encode, lambda estimate=estimate: estimate, max_waiting=waiting)
        early.feed(np.zeros(5000, dtype=np.float32))
        early.feed(np.ones(20_000, dtype=np.float32))
        early.offer_silence(25_000, 40_000)
        early.feed(np.zeros(15_000, dtype=np.float32))
        parts = early.finish()
        assert len(parts) == 1 and parts[0].path is None and parts[0].left == why
    assert encoded == []


def test_a_part_still_waiting_for_an_encoder_is_left_to_the_finish() -> None:
    started, release = threading.Event(), threading.Event()

    def encode(index: int, blocks: Iterable[np.ndarray], gain_db: float) -> Path:
        for _ in blocks:  # all fed: the finish waits for this encoder
            pass
        started.set()
        assert release.wait(10)
        return Path(f"/part{index}")

    early = EarlyParts(AAC, 10_000, 1, encode, lambda: (-2.0, math.inf))
    early.feed(np.zeros(5000, dtype=np.float32))
    for start in (5000, 40_000):  # two parts: the second waits while the first is being encoded
        early.feed(np.ones(20_000, dtype=np.float32))
        early.offer_silence(start + 20_000, start + 35_000)
        early.feed(np.zeros(15_000, dtype=np.float32))
    assert started.wait(10)
    threading.Timer(0.2, release.set).start()
    parts = early.finish()
    assert [p.path for p in parts] == [Path("/part0"), None]
    assert [p.left for p in parts] == ["", LEFT_AT_END]


def feed_parts(early: EarlyParts, count: int, part: int = 20_000) -> None:
    """``count`` parts of sound, each ending in a silence long enough to cut in."""
    for start in range(0, count * 2 * part, 2 * part):
        early.feed(np.ones(part, dtype=np.float32))
        early.offer_silence(start + part, start + 2 * part)
        early.feed(np.zeros(part, dtype=np.float32))


def test_parts_cut_before_the_settling_time_wait_for_it_and_share_its_gain() -> None:
    """The book so far asks for less gain as it grows. The parts cut before the settling time are not
    encoded at the gain of their own cut, but once the book reaches it, at the gain it asks for then."""
    fed = [0]
    encoded: list[tuple[int, float, int]] = []  # part, gain, samples fed when it was encoded

    def encode(index: int, blocks: Iterable[np.ndarray], gain_db: float) -> Path:
        encoded.append((index, gain_db, fed[0]))
        return Path(f"/part{index}")

    def estimate() -> tuple[float, float]:
        return -fed[0] / 40_000, math.inf  # -1 dB more each part

    early = EarlyParts(AAC, 30_000, 1, encode, estimate, max_waiting=100, settle_samples=160_000)
    real_feed = early.feed

    def counted(values: np.ndarray) -> None:
        fed[0] += len(values)
        real_feed(values)

    early.feed = counted  # type: ignore[method-assign]
    feed_parts(early, 6)  # parts end in the silences after 20k, 60k, ... 220k
    deadline = time.monotonic() + 10
    while len(encoded) < 5 and time.monotonic() < deadline:  # the encoder drains its queue
        time.sleep(0.01)
    parts = early.finish()
    assert [p.path is not None for p in parts] == [True] * 5
    # Parts 0-2, cut before 160k samples, got the gain asked for at 160k; the later ones their own.
    assert [p.gain_db for p in parts] == [-4.0, -4.0, -4.0, -5.0, -6.0]
    assert [p.loudness_gain_db for p in parts] == [-4.0, -4.0, -4.0, -5.0, -6.0]
    assert [p.stop < 160_000 for p in parts] == [True, True, True, False, False]
    assert all(at >= 160_000 for _, _, at in encoded)  # not one was encoded before the settling time


def test_a_book_shorter_than_the_settling_time_leaves_its_parts_to_the_finish() -> None:
    encoded: list[int] = []

    def encode(index: int, blocks: Iterable[np.ndarray], gain_db: float) -> Path:
        encoded.append(index)
        return Path(f"/part{index}")

    early = EarlyParts(AAC, 30_000, 2, encode, lambda: (-2.0, math.inf), settle_samples=10**7)
    feed_parts(early, 4)
    parts = early.finish()
    assert len(parts) == 3 and encoded == []
    assert [p.left for p in parts] == [LEFT_SETTLING] * 3 and all(p.path is None for p in parts)
    # No more parts wait for the settling time than may wait at all: the rest go to the finish.
    early = EarlyParts(AAC, 30_000, 2, encode, lambda: (-2.0, math.inf), max_waiting=2, settle_samples=10**7)
    feed_parts(early, 5)
    assert [p.left for p in early.finish()] == [LEFT_SETTLING] * 2 + [LEFT_BUSY] * 2 and encoded == []


@pytest.mark.parametrize("longest_wait", [5000, 100_000])
def test_a_part_with_much_left_to_encode_at_the_end_is_cut_short(longest_wait: int) -> None:
    """Its encoder stops, and the finish, which shares it among every core, encodes it again; with
    less left than ``longest_wait``, it is waited for."""
    started, release = threading.Event(), threading.Event()
    taken: list[int] = []

    def encode(index: int, blocks: Iterable[np.ndarray], gain_db: float) -> Path:
        for block in blocks:
            taken.append(len(block))
            started.set()
            assert release.wait(10)  # slow: one block of many taken when the book ends
        return Path(f"/part{index}")

    early = EarlyParts(AAC, 10_000, 1, encode, lambda: (-2.0, math.inf))
    early.feed(np.zeros(5000, dtype=np.float32))
    for block in np.array_split(np.ones(20_000, dtype=np.float32), 8):
        early.feed(block)
    early.offer_silence(25_000, 40_000)
    early.feed(np.zeros(15_000, dtype=np.float32))
    assert started.wait(10)
    threading.Timer(0.2, release.set).start()
    parts = early.finish(longest_wait)
    if longest_wait == 5000:  # about 17,000 samples were left
        assert [(p.path, p.left) for p in parts] == [(None, LEFT_CUT_SHORT)]
        assert len(taken) == 1  # the encoder got no block after the cut
    else:
        assert [(p.path, p.left) for p in parts] == [(Path("/part0"), "")]
        assert len(taken) > 8  # every block


# --------------------------------------------------------------------------------------- end to end


def render(
    path: Path,
    segments: list[Segment],
    loudness: str,
    parts_seconds: float | None,
    settle: float = 0.0,
    expected: float | None = None,
) -> object:
    info = BookInfo("Long Book", "Ann Author", None, None, None)
    # A high bitrate keeps coding noise well below the level steps the tests look for.
    spec = OutputSpec(path, path.suffix[1:], sample_rate=SR, loudness=loudness, info=info, bitrate="192k")
    with Assembler(
        spec,
        Pauses(),
        encode_workers=3,
        early_part_seconds=parts_seconds,
        early_settle_seconds=settle,
        expected_seconds=expected,
    ) as assembler:
        for segment in segments:
            assembler.add(segment)
            time.sleep(0.02)  # a render's pace: the early encoders keep up
        return assembler.finish()


@pytest.fixture
def patient(monkeypatch: pytest.MonkeyPatch) -> list[EarlyParts]:
    """Early encoders that never leave a part to the finish for being busy, recorded."""
    made: list[EarlyParts] = []

    class Recorded(EarlyParts):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **{**kwargs, "max_waiting": 100})  # type: ignore[arg-type]
            made.append(self)

        def finish(self, longest_wait: int = 0) -> list[EarlyPart]:
            self._pool.shutdown(wait=True)  # every part submitted is encoded, however slow this machine
            return super().finish(longest_wait)

    monkeypatch.setattr(assemble, "EarlyParts", Recorded)
    return made


@pytest.fixture
def joined_early(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """For each render that joined its early parts into its output file while it rendered, how many it
    had joined when its early encoders were done (the finish then takes back those it does not keep)."""
    counts: list[int] = []
    real_truncate = assemble._Mp4Joiner.truncate

    def truncate(self: assemble._Mp4Joiner, parts: int) -> None:
        counts.append(self.parts)
        real_truncate(self, parts)

    monkeypatch.setattr(assemble._Mp4Joiner, "truncate", truncate)
    return counts


def top_boxes(path: Path) -> list[bytes]:
    data, kinds, offset = path.read_bytes(), [], 0
    while offset < len(data):
        size, kind = struct.unpack(">I4s", data[offset : offset + 8])
        kinds.append(kind)
        offset += size if size != 1 else struct.unpack(">Q", data[offset + 8 : offset + 16])[0]
    return kinds


def chunk_levels(book: np.ndarray, decoded: np.ndarray, placements: list) -> list[float]:
    """Each chunk's level in the encoded file against the lossless book, in dB."""
    return [
        20
        * math.log10(
            np.sqrt(
                np.mean(decoded[p.start_sample : p.end_sample] ** 2)
                / np.mean(book[p.start_sample : p.end_sample] ** 2)
            )
        )
        for p in placements
    ]


@needs_ffmpeg
def test_early_parts_are_the_bytes_the_finish_would_write(tmp_path: Path, patient: list[EarlyParts]) -> None:
    """Loudness off: the same cuts, encoded while rendering or all after it, give the same file."""
    segments = book_segments(40.0)

    real_finish, real_plan = EarlyParts.finish, Assembler._split_plan
    planned: list[tuple] = []

    def dropped(self: EarlyParts, *args: int) -> list[EarlyPart]:
        return [dataclasses.replace(p, path=None) for p in real_finish(self, *args)]

    def plan(self: Assembler, *args: object) -> tuple | None:
        planned.append(real_plan(self, *args))  # type: ignore[arg-type]
        return planned[0]  # the cuts of the render that kept its early parts

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Assembler, "_split_plan", plan)
        kept = render(tmp_path / "early.m4b", segments, "off", 8.0)
        patch.setattr(EarlyParts, "finish", dropped)
        again = render(tmp_path / "finish.m4b", segments, "off", 8.0)
    assert kept.encoded_early >= 8 and again.encoded_early == 0  # type: ignore[attr-defined]
    assert len(patient) == 2 and patient[0].cuts == patient[1].cuts and len(patient[0].cuts) >= 3
    assert (tmp_path / "early.m4b").read_bytes() == (tmp_path / "finish.m4b").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["early.m4b", "finish.m4b"]  # no part left


@needs_ffmpeg
def test_the_finish_gives_back_the_segments_only_kept_parts_cover_while_it_encodes_the_rest(
    tmp_path: Path, patient: list[EarlyParts], monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the early parts kept cover is not read again: its segments of the intermediate file go while the
    finish encodes the rest, and the book is the same as with every segment kept to the end."""
    monkeypatch.setattr(intermediate, "SEGMENT_SECONDS", 2.0)
    real_read, real_discard = SegmentedFlac.read, SegmentedFlac.discard
    read: set[int] = set()
    discarded: list[tuple[list[Path], list[Path], int]] = []  # removed, every segment, segment samples

    def recording_read(self: SegmentedFlac, start: int, stop: int, block: int) -> Iterable[np.ndarray]:
        read.update(range(start // self.segment_samples, (stop - 1) // self.segment_samples + 1))
        return real_read(self, start, stop, block)

    def recording_discard(self: SegmentedFlac, keep: list[tuple[int, int]]) -> list[Path]:
        removed = real_discard(self, keep)
        discarded.append((removed, self.paths, self.segment_samples))
        return removed

    monkeypatch.setattr(SegmentedFlac, "read", recording_read)
    monkeypatch.setattr(SegmentedFlac, "discard", recording_discard)
    segments = book_segments(40.0)
    given_back = render(tmp_path / "given_back.m4b", segments, "acx", 8.0, expected=40.0)
    assert given_back.encoded_early >= 8 and read  # type: ignore[attr-defined]
    assert len(discarded) == 1
    removed, paths, _ = discarded[0]
    assert len(removed) >= 4  # 2 s segments under at least 8 s of kept parts
    assert {paths.index(path) for path in removed} == set(range(len(paths))) - read
    monkeypatch.setattr(SegmentedFlac, "discard", lambda self, keep: [])
    kept = render(tmp_path / "kept.m4b", segments, "acx", 8.0, expected=40.0)
    assert patient[0].cuts == patient[1].cuts
    assert (tmp_path / "given_back.m4b").read_bytes() == (tmp_path / "kept.m4b").read_bytes()
    assert kept.early_parts == given_back.early_parts  # type: ignore[attr-defined]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["given_back.m4b", "kept.m4b"]  # no segment left


@needs_ffmpeg
def test_early_encoders_yield_the_cpu_and_the_finishs_do_not(
    tmp_path: Path, patient: list[EarlyParts], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The early parts' encoders may lag (a part they have not taken goes to the finish); the meter and
    the FLAC encoder, which write the whole book in order, may not. The finish's own encoders are the
    last work left and keep their priority."""
    lowered: list[tuple[str, int, int]] = []
    real_lower = FfmpegWriter.lower_priority

    def lower(self: FfmpegWriter, niceness: int) -> bool:
        assert self._process is not None
        done = real_lower(self, niceness)
        now = os.getpriority(os.PRIO_PROCESS, self._process.pid)
        lowered.append((threading.current_thread().name, niceness, now))
        return done

    monkeypatch.setattr(FfmpegWriter, "lower_priority", lower)
    encoders: list[str] = []
    real_writer = Assembler._part_writer

    def part_writer(self: Assembler, *args: object) -> FfmpegWriter:
        encoders.append(threading.current_thread().name)
        return real_writer(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(Assembler, "_part_writer", part_writer)
    result = render(tmp_path / "book.m4b", book_segments(40.0), "off", 8.0)
    early = [name for name in encoders if name.startswith("fastmaya-early")]
    assert len(early) >= 3 and result.encoded_early >= 8  # type: ignore[attr-defined]
    assert len(encoders) > len(early)  # the finish encoded the rest
    assert [name for name, _, _ in lowered] == early
    base = os.getpriority(os.PRIO_PROCESS, 0)
    assert all(niceness == EARLY_ENCODER_NICENESS for _, niceness, _ in lowered)
    assert all(now == max(base, EARLY_ENCODER_NICENESS) for _, _, now in lowered)


@needs_ffmpeg
def test_early_parts_are_joined_into_the_file_while_the_book_renders(
    tmp_path: Path, patient: list[EarlyParts], joined_early: list[int]
) -> None:
    """With the book's length known about, the early parts go into the output's file as they are
    encoded; the finish adds the rest and the index, in the room kept before the audio. The book is
    the one joined after the last chunk, sample for sample."""
    segments = book_segments(40.0)
    streamed = render(tmp_path / "streamed.m4b", segments, "acx", 8.0, expected=40.0)
    after = render(tmp_path / "after.m4b", segments, "acx", 8.0)
    assert len(joined_early) == 1 and joined_early[0] >= 2  # the second render joined after its last chunk
    assert streamed.early_parts == after.early_parts and streamed.early_parts["kept"] >= 3  # type: ignore[attr-defined]
    assert streamed.loudness.gain_db == after.loudness.gain_db  # type: ignore[attr-defined]
    assert top_boxes(tmp_path / "streamed.m4b") == [b"ftyp", b"moov", b"free", b"mdat"]
    assert np.array_equal(decode(tmp_path / "streamed.m4b"), decode(tmp_path / "after.m4b"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["after.m4b", "streamed.m4b"]


@needs_ffmpeg
@pytest.mark.parametrize(("fmt", "expected"), [("m4b", None), ("mp3", None), ("m4b", 48.0)])
def test_a_book_that_grows_louder_still_has_one_gain(
    tmp_path: Path,
    patient: list[EarlyParts],
    joined_early: list[int],
    fmt: str,
    expected: float | None,
) -> None:
    """The second half is 8 dB louder: the parts encoded early at the first half's gain are encoded
    again, and every chunk of the file sits at the book's one gain, as in the file encoded after the
    last chunk. Where they were joined into the file already (``expected``), they are taken out again."""
    segments = book_segments(48.0)
    half = len(segments) // 2
    segments = [
        dataclasses.replace(s, audio=s.audio * np.float32(2.5)) if i >= half else s
        for i, s in enumerate(segments)
    ]
    render(tmp_path / "book.wav", segments, "off", None)
    reference = render(tmp_path / f"reference.{fmt}", segments, "acx", None)
    placements: list = []
    real_add = Assembler.add

    def add(self: Assembler, segment: Segment) -> object:
        placements.append(real_add(self, segment))
        return placements[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Assembler, "add", add)
        result = render(tmp_path / f"book.{fmt}", segments, "acx", 6.0, expected=expected)
    parts = patient[0].finish()  # already finished: the parts and their gains, again
    gains = {p.gain_db for p in parts if p.path is not None}
    assert len(gains) >= 2  # the loudness so far moved: early parts were encoded at several gains
    book_seconds = sum(p.stop - p.start for p in parts) / SR
    assert 0 < result.encoded_early < book_seconds  # type: ignore[attr-defined]
    tally = result.early_parts  # type: ignore[attr-defined]
    assert (
        tally.get("kept", 0) >= 1 and tally.get("another gain", 0) >= 1 and sum(tally.values()) == len(parts)
    )
    # Each part keeps what the book so far asked for when it was cut: the louder half asked for less gain.
    cut = result.early  # type: ignore[attr-defined]
    asked = [(p.gain_db, p.loudness_gain_db, p.peak_limit_db) for p in cut if p.path]
    assert asked[0][1] - asked[-1][1] > 4 and all(gain <= limit for gain, _, limit in asked)
    gain = result.loudness.gain_db  # type: ignore[attr-defined]
    exact = reference.loudness.gain_db  # type: ignore[attr-defined]
    assert gain in gains and abs(gain - exact) <= GAIN_TOLERANCE_DB
    if expected is not None:  # parts at the stale gain were joined before the finish, and dropped
        kept_first = next(i for i, p in enumerate(cut) if p.path is None or p.gain_db != gain)
        assert len(joined_early) == 1 and joined_early[0] > kept_first
    book = decode(tmp_path / "book.wav")
    levels = chunk_levels(book, decode(tmp_path / f"book.{fmt}"), placements)
    expected = chunk_levels(book, decode(tmp_path / f"reference.{fmt}"), placements)
    # Coding noise moves a chunk's level by a few hundredths of a dB; a part at a stale gain by 0.3 or more.
    assert max(abs(a - b - (gain - exact)) for a, b in zip(levels, expected, strict=True)) < 0.05


@needs_ffmpeg
@pytest.mark.parametrize("expected", [None, 30.0])
def test_an_interrupted_render_leaves_no_early_part(
    tmp_path: Path, patient: list[EarlyParts], expected: float | None
) -> None:
    spec = OutputSpec(tmp_path / "book.m4b", "m4b", sample_rate=SR, loudness="acx")
    with (
        pytest.raises(KeyboardInterrupt),
        Assembler(
            spec,
            Pauses(),
            encode_workers=3,
            early_part_seconds=5.0,
            early_settle_seconds=0.0,
            expected_seconds=expected,
        ) as a,
    ):
        for segment in book_segments(30.0):
            a.add(segment)
            time.sleep(0.02)
        assert patient[0].cuts  # parts were under way
        if expected is not None:  # and joined into the output's file
            deadline = time.monotonic() + 20
            while a._streamed is not None and a._streamed.joiner.parts == 0:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_early_parts_are_not_used_where_they_cannot_pay(tmp_path: Path, patient: list[EarlyParts]) -> None:
    segments = book_segments(10.0)
    for fmt, workers, seconds in (("flac", 3, 5.0), ("m4b", 1, 5.0), ("m4b", 3, None)):
        if fmt == "m4b" and FFMPEG is None:
            continue
        spec = OutputSpec(
            tmp_path / f"b{workers}{seconds}.{fmt}", fmt, sample_rate=SR, loudness="acx" if FFMPEG else "off"
        )
        with Assembler(spec, Pauses(), encode_workers=workers, early_part_seconds=seconds) as assembler:
            for segment in segments:
                assembler.add(segment)
            assert assembler.finish().encoded_early == 0
    assert patient == []


@needs_ffmpeg
def test_a_burst_of_parts_may_wait_for_the_early_encoders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Parts come in bursts when the chunk the book waited for arrives: as many may wait as
    ``WAITING_SECONDS`` of the book, not just two per encoder."""
    asked: list[int] = []
    settle: list[int] = []

    class Recorded(EarlyParts):
        def __init__(self, *args: object, **kwargs: object) -> None:
            asked.append(kwargs["max_waiting"])  # type: ignore[arg-type]
            settle.append(kwargs["settle_samples"])  # type: ignore[arg-type]
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(assemble, "EarlyParts", Recorded)
    spec = OutputSpec(tmp_path / "book.m4b", "m4b", sample_rate=SR, loudness="off")
    with Assembler(spec, Pauses(), encode_workers=8, early_part_seconds=60.0) as assembler:
        assembler.add(book_segments(3.0)[0])
        assembler.finish()
    assert asked == [math.ceil(WAITING_SECONDS / 60.0)] and asked[0] > 2 * assemble.early_encoders(8)
    # The parts before SETTLE_SECONDS of the book wait for it; they fit in what may wait.
    assert settle == [round(SETTLE_SECONDS * SR)] and SETTLE_SECONDS < WAITING_SECONDS


@needs_ffmpeg
def test_a_book_shorter_than_the_settling_time_is_encoded_in_the_finish(
    tmp_path: Path, patient: list[EarlyParts]
) -> None:
    segments = book_segments(30.0)
    result = render(tmp_path / "book.m4b", segments, "acx", 5.0, settle=60.0)
    reference = render(tmp_path / "reference.m4b", segments, "acx", None)
    assert result.encoded_early == 0 and len(patient[0].cuts) >= 3  # type: ignore[attr-defined]
    assert result.early_parts == {LEFT_SETTLING: len(patient[0].cuts)}  # type: ignore[attr-defined]
    assert result.loudness.gain_db == reference.loudness.gain_db  # type: ignore[attr-defined]
    assert np.array_equal(decode(tmp_path / "book.m4b"), decode(tmp_path / "reference.m4b"))


@needs_ffmpeg
@pytest.mark.parametrize(("count", "expected"), [(None, 4), (3, 3)])
def test_the_early_encoders_are_one_per_two_cpus_unless_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, count: int | None, expected: int
) -> None:
    workers: list[int] = []

    class Recorded(EarlyParts):
        def __init__(self, codec: object, part: int, encoders: int, *args: object, **kwargs: object) -> None:
            workers.append(encoders)
            super().__init__(codec, part, encoders, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(assemble, "EarlyParts", Recorded)
    spec = OutputSpec(tmp_path / "book.m4b", "m4b", sample_rate=SR, loudness="off")
    with Assembler(spec, Pauses(), encode_workers=8, early_encoder_count=count) as assembler:
        assembler.add(book_segments(3.0)[0])
        assembler.finish()
    assert workers == [expected]


@needs_ffmpeg
@pytest.mark.parametrize("expected", [None, 40.0])
def test_what_was_not_kept_is_shared_among_every_encoder(
    tmp_path: Path,
    patient: list[EarlyParts],
    joined_early: list[int],
    monkeypatch: pytest.MonkeyPatch,
    expected: float | None,
) -> None:
    """Only the first early part is kept: the rest of the book is cut anew for the finish's encoders,
    not left in the early parts' long pieces, and the book still lines up with the one-piece encode."""
    monkeypatch.setattr(split_encode, "MIN_PART_SECONDS", 5.0)
    real_finish, real_plan = EarlyParts.finish, Assembler._split_plan
    planned: list[tuple] = []

    def first_only(self: EarlyParts, *args: int) -> list[EarlyPart]:
        parts = real_finish(self, *args)
        return parts[:1] + [dataclasses.replace(p, path=None, left=LEFT_CUT_SHORT) for p in parts[1:]]

    def plan(self: Assembler, *args: object) -> tuple | None:
        planned.append(real_plan(self, *args))  # type: ignore[arg-type]
        return planned[-1]

    monkeypatch.setattr(EarlyParts, "finish", first_only)
    monkeypatch.setattr(Assembler, "_split_plan", plan)
    segments = book_segments(40.0)
    result = render(tmp_path / "book.m4b", segments, "off", 8.0, expected=expected)
    if expected is not None:  # every part was joined into the file early; all but the first taken out
        assert len(joined_early) == 1 and joined_early[0] >= 3
    early_cuts = patient[0].cuts
    assert len(early_cuts) >= 3 and result.early_parts == {  # type: ignore[attr-defined]
        "kept": 1,
        LEFT_CUT_SHORT: len(early_cuts) - 1,
    }
    cuts = planned[0][1]
    assert cuts[0] == early_cuts[0] and len(cuts) == 3  # the rest in one part for each other encoder
    assert not set(cuts[1:]) & set(early_cuts)
    reference = render(tmp_path / "whole.m4b", segments, "off", None)
    assert reference.early_parts == {}  # type: ignore[attr-defined]
    assert decode(tmp_path / "book.m4b").shape == decode(tmp_path / "whole.m4b").shape
    if expected is not None:  # the same book as the one cut the same way and joined after it
        render(tmp_path / "after.m4b", segments, "off", 8.0)
        assert planned[-1][1] == cuts
        assert np.array_equal(decode(tmp_path / "book.m4b"), decode(tmp_path / "after.m4b"))


def test_parts_are_joined_in_book_order_and_not_past_a_failed_join(tmp_path: Path) -> None:
    """Encoders end their parts in any order; the file takes them in book order, each once every part
    before it is in. After a failed join nothing more goes in: the finish joins the rest."""

    class Joiner:
        def __init__(self, fail_at: str | None = None) -> None:
            self.added: list[str] = []
            self.fail_at = fail_at

        @property
        def parts(self) -> int:
            return len(self.added)

        def add(self, part: Path) -> None:
            if part.name == self.fail_at:
                raise OSError("disk full")
            self.added.append(part.name)

    joiner = Joiner()
    streamed = assemble._StreamedJoin(tmp_path / "book.m4b", joiner)  # type: ignore[arg-type]
    for index in (2, 0, 3, 1, 5):
        streamed.encoded(index, tmp_path / f"p{index}")
    assert joiner.added == ["p0", "p1", "p2", "p3"]
    failing = Joiner(fail_at="p1")
    streamed = assemble._StreamedJoin(tmp_path / "book.m4b", failing)  # type: ignore[arg-type]
    for index in (0, 2, 1, 3):
        streamed.encoded(index, tmp_path / f"p{index}")
    assert failing.added == ["p0"]


@needs_ffmpeg
def test_a_finish_that_fails_closes_and_removes_the_file_joined_so_far(
    tmp_path: Path, patient: list[EarlyParts], joined_early: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing(self: Assembler, *args: object) -> None:
        raise RuntimeError("encoder crashed")

    monkeypatch.setattr(Assembler, "_render_in_parts", failing)
    spec = OutputSpec(tmp_path / "book.m4b", "m4b", sample_rate=SR, loudness="acx")
    with Assembler(
        spec,
        Pauses(),
        encode_workers=3,
        early_part_seconds=5.0,
        early_settle_seconds=0.0,
        expected_seconds=30.0,
    ) as assembler:
        for segment in book_segments(30.0):
            assembler.add(segment)
            time.sleep(0.02)
        assert assembler._streamed is not None
        joined_file = assembler._streamed.joiner._join._out
        with pytest.raises(RuntimeError, match="encoder crashed"):
            assembler.finish()
    assert len(joined_early) == 1 and joined_early[0] >= 1
    assert joined_file.closed
    assert list(tmp_path.iterdir()) == []
