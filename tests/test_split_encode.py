"""A long lossy output encoded in parts at once: where it is cut, the codec facts the cuts rely on, and
that the joined file decodes like the one encoded in one piece (timing to the sample, chapters, tags)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastmaya_cli import assemble, outputs, split_encode
from fastmaya_cli.assemble import Assembler, BookInfo, OutputSpec, Pauses, Segment
from fastmaya_cli.errors import RuntimeFailure
from fastmaya_cli.loudness import RangePeakMeters, measure_file
from fastmaya_cli.outputs import FORMATS, STREAM_CODECS, FfmpegWriter, StreamCodec, stream_codec_for
from fastmaya_cli.split_encode import MARGIN_FRAMES, part_count, part_sources, plan_cuts

FFMPEG = shutil.which("ffmpeg")
FFPROBE = shutil.which("ffprobe")
needs_ffmpeg = pytest.mark.skipif(FFMPEG is None, reason="ffmpeg not installed")
SR = 48000
AAC = STREAM_CODECS["aac"]
MP3 = STREAM_CODECS["libmp3lame"]
TOY = StreamCodec("adts", "aac", 100, 50, 1, frozenset({SR}))  # margin 200


# ---------------------------------------------------------------------------------------- planning


def test_cuts_by_hand() -> None:
    silences = [(0, 1000), (2990, 3600), (5000, 5100), (6900, 7700), (9000, 10000)]
    # Allowed cuts: 300-700 (the head: lead + margin from 0), 3200-3300, none in the 100-sample silence,
    # 7100-7400, 9200-9700. Ideal 2500 -> 3200. Ideal 5000 -> 3300, only 100 after the last cut: dropped.
    # Ideal 7500 -> 7400.
    assert plan_cuts(10000, silences, 4, TOY) == [3200, 7400]
    assert plan_cuts(10000, silences, 2, TOY) == [3300]  # ideal 5000; 3300 is nearer than 7100
    assert part_sources([3200, 7400], 10000, TOY) == [(50, 3199), (3250, 7399), (7450, 9999)]


def test_nothing_is_cut_without_room() -> None:
    silences = [(0, 1000), (4000, 6000)]
    assert plan_cuts(10000, silences, 1, TOY) == []
    assert plan_cuts(10000, [(0, 249), (4000, 6000)], 2, TOY) == []  # the head cannot hold the priming
    assert plan_cuts(10000, [(100, 1000), (4000, 6000)], 2, TOY) == []  # the book starts with sound
    assert plan_cuts(10000, [(0, 1000), (4000, 4449)], 2, TOY) == []  # 4449 - 4000 < lead + 2 margins
    assert plan_cuts(10000, [(0, 1000), (4000, 4450)], 2, TOY) == [4200]


@settings(max_examples=200, deadline=None)
@given(
    total=st.integers(2_000, 200_000),
    gaps=st.lists(st.tuples(st.integers(0, 200_000), st.integers(0, 3_000)), max_size=40),
    head=st.integers(0, 2_000),
    parts=st.integers(1, 16),
)
def test_cuts_always_fall_in_silence(total: int, gaps: list[tuple[int, int]], head: int, parts: int) -> None:
    silences = [(0, min(head, total))]
    for start, length in sorted(gaps):
        if start > silences[-1][1] and start + length <= total:
            silences.append((start, start + length))
    cuts = plan_cuts(total, silences, parts, TOY)
    assert len(cuts) <= parts - 1 if parts > 1 else cuts == []
    assert cuts == sorted(set(cuts))
    margin = MARGIN_FRAMES * TOY.frame
    for cut in cuts:
        assert cut % TOY.frame == 0
        assert any(a + margin <= cut and cut + TOY.lead + margin <= b for a, b in silences)
    bounds = [0, *cuts, total]
    assert all(b - a >= total // parts // 2 for a, b in zip(bounds, bounds[1:], strict=False))
    for start, stop in part_sources(cuts, total, TOY):
        assert start < stop


def test_part_count_and_codecs() -> None:
    minute = 60 * SR
    assert part_count(minute, SR, 16) == 2  # 30 s parts at the least
    assert part_count(100 * minute, SR, 16) == 16
    assert part_count(100 * minute, SR, 1) == 1
    assert split_encode.available_cpus() >= 1
    assert stream_codec_for(FORMATS["m4b"], SR) is AAC
    assert stream_codec_for(FORMATS["mp3"], SR) is MP3
    assert stream_codec_for(FORMATS["mp3"], 24000) is None  # MPEG-2 frames are 576 samples
    assert stream_codec_for(FORMATS["opus"], SR) is None
    assert stream_codec_for(FORMATS["flac"], SR) is None


# ------------------------------------------------------------------------------------- codec facts


def decode(path: Path, demuxer: str | None = None) -> np.ndarray:
    assert FFMPEG is not None
    source = ["-f", demuxer] if demuxer else []
    pcm = subprocess.run(
        [FFMPEG, "-v", "error", *source, "-i", str(path), "-f", "f32le", "-ac", "1", "-"],
        capture_output=True,
        check=True,
    ).stdout
    return np.frombuffer(pcm, dtype="<f4")


def burst(length: int, at: int) -> np.ndarray:
    signal = np.zeros(length, dtype=np.float32)
    window = np.hanning(2400).astype(np.float32)
    signal[at : at + 2400] = 0.5 * np.sin(np.arange(2400) * 2 * np.pi * 440 / SR) * window
    return signal


def lag_of(decoded: np.ndarray, signal: np.ndarray, at: int) -> int:
    piece = signal[at : at + 2400]
    scores = [float(np.dot(decoded[at + lag : at + lag + 2400], piece)) for lag in range(0, 3000)]
    return int(np.argmax(scores))


@needs_ffmpeg
@pytest.mark.parametrize(("fmt", "encoder"), [("m4b", "aac"), ("mp3", "libmp3lame")])
def test_frame_and_lead_hold_for_this_ffmpeg(tmp_path: Path, fmt: str, encoder: str) -> None:
    """A bare part fed k frames less the lead and the pad decodes to exactly k frames, the input delayed
    by the lead: the numbers every cut relies on. One sample more, and a frame is added."""
    assert FFMPEG is not None
    codec = STREAM_CODECS[encoder]
    for frames, extra in ((40, 0), (41, 0), (40, 1)):
        length = frames * codec.frame - codec.lead - codec.pad + extra
        signal = burst(length, 20000)
        path = tmp_path / f"part.{codec.muxer}"
        writer = FfmpegWriter.bare_stream(FFMPEG, path, FORMATS[fmt], codec, SR, None, path)
        writer.write(signal)
        writer.close()
        decoded = decode(path, codec.demuxer)
        assert len(decoded) == (frames + extra) * codec.frame
        assert lag_of(decoded, signal, 20000) == codec.lead


# --------------------------------------------------------------------------------------- end to end


def speechlike(rng: np.random.Generator, seconds: float) -> np.ndarray:
    """Voiced sound with a moving pitch and an envelope, sound to the very first and last sample."""
    n = int(seconds * SR)
    t = np.arange(n) / SR
    pitch = 110 + 40 * np.sin(2 * np.pi * rng.uniform(0.5, 2) * t)
    phase = 2 * np.pi * np.cumsum(pitch) / SR
    voice = sum(np.sin(k * phase) / k for k in range(1, 8)) + 0.3 * rng.standard_normal(n)
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(2, 5) * t) ** 2
    return (0.2 * voice * envelope).astype(np.float32)


def book_segments(seconds: float) -> list[Segment]:
    rng = np.random.default_rng(7)
    segments, total, index = [], 0.0, 0
    while total < seconds:
        length = float(rng.uniform(1.5, 4.0))
        chapter = 1 + index // 6
        boundary = "chapter" if index % 6 == 5 else ("paragraph" if index % 3 == 2 else "sentence")
        audio = speechlike(rng, length)
        segments.append(Segment(index, audio, boundary, chapter, f"Chapter {chapter}", f"Chunk {index}."))
        total += length + 0.3
        index += 1
    return segments


def render(
    path: Path, fmt: str, workers: int, segments: list[Segment], loudness: str = "acx"
) -> tuple[object, list]:
    info = BookInfo("Long Book", "Ann Author", None, None, None)
    spec = OutputSpec(path, fmt, sample_rate=SR, loudness=loudness, info=info)
    with Assembler(spec, Pauses(), encode_workers=workers) as assembler:
        placements = [assembler.add(segment) for segment in segments]
        result = assembler.finish()
    return result, placements


def probe(path: Path) -> dict:
    assert FFPROBE is not None
    command = [FFPROBE, "-v", "error", "-show_format", "-show_streams", "-show_chapters", "-of", "json"]
    return json.loads(
        subprocess.run([*command, str(path)], capture_output=True, text=True, check=True).stdout
    )


def record_cuts(patch: pytest.MonkeyPatch, planner: str) -> list[list[int]]:
    """Wrap the assembler's ``planner`` to record the cuts of every call."""
    calls: list[list[int]] = []
    real = getattr(assemble, planner)

    def spy(*args: object) -> list[int]:
        calls.append(real(*args))
        return calls[-1]

    patch.setattr(assemble, planner, spy)
    return calls


@dataclasses.dataclass
class Rendered:
    fmt: str
    folder: Path
    cuts: list[int]
    whole: object  # AssemblyResult of the one-piece encode
    joined: object  # and of the encode in parts
    placements: list


@pytest.fixture(scope="module", params=[("m4b", "aac"), ("mp3", "libmp3lame")], ids=["m4b", "mp3"])
def rendered(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Rendered:
    """The same 45 s book as lossless wav, as one piece and in three parts of about 15 s."""
    if FFMPEG is None:
        pytest.skip("ffmpeg not installed")
    fmt, _ = request.param
    folder = tmp_path_factory.mktemp(fmt)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(split_encode, "MIN_PART_SECONDS", 10.0)
        planned = record_cuts(patch, "plan_cuts")
        segments = book_segments(45.0)
        render(folder / "book.wav", "wav", 3, segments, loudness="off")
        whole, _ = render(folder / f"whole.{fmt}", fmt, 1, segments)
        assert planned == []  # wav is not cut, and one encoder has nothing to plan
        joined, placements = render(folder / f"joined.{fmt}", fmt, 3, segments)
    assert len(planned) == 1 and len(planned[0]) == 2
    return Rendered(fmt, folder, planned[0], whole, joined, placements)


def test_parts_join_into_the_same_book(rendered: Rendered) -> None:
    fmt, folder = rendered.fmt, rendered.folder
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted(["book.wav", f"joined.{fmt}", f"whole.{fmt}"])  # no part left behind
    codec = stream_codec_for(FORMATS[fmt], SR)
    assert codec is not None
    book = decode(folder / "book.wav")
    one_piece, parts = decode(folder / f"whole.{fmt}"), decode(folder / f"joined.{fmt}")
    total = rendered.joined.samples  # type: ignore[attr-defined]
    assert len(book) == total and total <= len(parts) < total + codec.frame  # only the last frame pads
    for cut in rendered.cuts:  # the joins are silent, as the book is there
        assert np.abs(parts[cut - 2 * codec.frame : cut + codec.lead + 2 * codec.frame]).max() < 1e-3
    gain = np.sqrt(np.mean(one_piece[:total] ** 2) / np.mean(book**2))
    for placement in rendered.placements:  # every chunk sits where the book has it, to the sample
        start, end = placement.start_sample, placement.end_sample
        piece = book[start : start + 4800]
        scores = [float(np.dot(parts[start + lag : start + lag + 4800], piece)) for lag in range(-64, 65)]
        assert int(np.argmax(scores)) - 64 == 0
        # Coding noise only: the joined file is as close to the book as the one-piece file is.
        errors = [
            np.sqrt(np.mean((decoded[start:end] / gain - book[start:end]) ** 2))
            for decoded in (one_piece, parts)
        ]
        assert errors[1] < 1.5 * errors[0] + 1e-4


@pytest.mark.skipif(FFPROBE is None, reason="ffprobe not installed")
def test_parts_keep_chapters_and_tags(rendered: Rendered) -> None:
    fmt, folder = rendered.fmt, rendered.folder
    before, after = probe(folder / f"whole.{fmt}"), probe(folder / f"joined.{fmt}")
    titles = [chapter["tags"]["title"] for chapter in after["chapters"]]
    assert titles == [chapter["tags"]["title"] for chapter in before["chapters"]]
    marks = rendered.joined.chapters  # type: ignore[attr-defined]
    assert len(titles) == len(marks) >= 3
    starts = [float(chapter["start_time"]) for chapter in after["chapters"]]
    assert starts == pytest.approx([mark.start for mark in marks], abs=0.002)
    tags = {key.lower(): value for key, value in after["format"]["tags"].items()}
    assert tags["title"] == "Long Book" and tags["artist"] == "Ann Author"
    assert after["streams"][0]["codec_name"] == before["streams"][0]["codec_name"]


@needs_ffmpeg
def test_a_failing_part_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(split_encode, "MIN_PART_SECONDS", 10.0)
    broken = dataclasses.replace(AAC, bare_args=("-no_such_option", "1"))
    monkeypatch.setitem(outputs.STREAM_CODECS, "aac", broken)
    with pytest.raises(RuntimeFailure, match=r"ffmpeg could not write .*book\.m4b"):
        render(tmp_path / "book.m4b", "m4b", 3, book_segments(30.0))
    assert list(tmp_path.iterdir()) == []


@needs_ffmpeg
def test_true_peak_measured_in_ranges_is_the_books(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The render's loudness meter leaves out the true peak; meters over ranges of the book measure it at
    once. The book's peak, an inter-sample over, sits near its end, so only the largest range finds it."""
    assert FFMPEG is not None
    monkeypatch.setattr(assemble, "PEAK_RANGE_SECONDS", 10.0)
    meters: list[RangePeakMeters] = []

    class Recorded(RangePeakMeters):
        def __init__(self, *args: object) -> None:
            super().__init__(*args)  # type: ignore[arg-type]
            meters.append(self)

    monkeypatch.setattr(assemble, "RangePeakMeters", Recorded)
    segments = book_segments(45.0)
    loud = segments[-3].audio.copy()
    loud[1000:1100] = 0.9 * np.sign(np.sin(np.arange(100) * 2.9))  # a square burst: a high true peak
    segments[-3] = dataclasses.replace(segments[-3], audio=loud)
    render(tmp_path / "book.wav", "wav", 4, segments, loudness="off")
    reference = measure_file(FFMPEG, tmp_path / "book.wav")
    result, _ = render(tmp_path / "normalised.wav", "wav", 4, segments, loudness="acx")
    assert len(meters) == 1 and meters[0].ranges >= 4  # about 53 s in ranges of at least 10 s
    report = result.loudness  # type: ignore[attr-defined]
    assert report.true_peak_dbtp_before == pytest.approx(reference.true_peak_dbtp, abs=0.05)
    assert report.integrated_lufs_before == pytest.approx(reference.integrated_lufs, abs=0.05)
    assert reference.true_peak_dbtp > 0.0  # inter-sample overs: a sample peak would read 0.9


@needs_ffmpeg
@pytest.mark.parametrize(("fmt", "with_ffmpeg"), [("m4b", False), ("m4b", True), ("mp3", False)])
def test_the_join_starts_before_the_last_part_is_encoded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str, with_ffmpeg: bool
) -> None:
    """The join takes the first parts while a later one is still being encoded, and still waits for it."""
    monkeypatch.setattr(split_encode, "MIN_PART_SECONDS", 10.0)
    events: list[str] = []
    real_writer = Assembler._part_writer

    def part_writer(self: Assembler, codec: StreamCodec, path: Path, shown: Path | str) -> FfmpegWriter:
        if ".part2." in path.name:
            time.sleep(1.0)  # a slow encoder for the last part
            events.append("last part encoding")
        return real_writer(self, codec, path, shown)

    monkeypatch.setattr(Assembler, "_part_writer", part_writer)
    for joiner in (assemble._Mp4Joiner, assemble._FfmpegJoiner):
        real_add = joiner.add

        def add(self: object, part: Path, real_add=real_add, name=joiner.__name__) -> None:  # noqa: ANN001
            events.append(f"joining in {name}")
            real_add(self, part)

        monkeypatch.setattr(joiner, "add", add)
    segments = book_segments(45.0)
    if with_ffmpeg:  # the bench's baseline: m4b parts joined by ffmpeg's remux
        monkeypatch.setattr(
            Assembler.__init__,
            "__kwdefaults__",
            {**Assembler.__init__.__kwdefaults__, "join_with_ffmpeg": True},
        )
    result, _ = render(tmp_path / f"book.{fmt}", fmt, 3, segments)
    joining = "joining in _Mp4Joiner" if fmt == "m4b" and not with_ffmpeg else "joining in _FfmpegJoiner"
    assert events == [joining, joining, "last part encoding", joining]
    assert result.finish_steps["encode"] >= 1.0  # type: ignore[attr-defined]
    frame = STREAM_CODECS[FORMATS[fmt].encoder or ""].frame
    assert result.samples <= len(decode(tmp_path / f"book.{fmt}")) < result.samples + frame  # type: ignore[attr-defined]


@needs_ffmpeg
def test_every_encoder_works_while_the_join_waits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With 2 encoders and 2 parts, both parts are encoded at once: the join takes no encoder's place."""
    monkeypatch.setattr(split_encode, "MIN_PART_SECONDS", 10.0)
    lock, inside, most = threading.Lock(), [0], [0]
    real_writer = Assembler._part_writer

    def part_writer(self: Assembler, codec: StreamCodec, path: Path, shown: Path | str) -> FfmpegWriter:
        with lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        time.sleep(0.5)  # long enough for the other encoder to arrive, if there is one
        with lock:
            inside[0] -= 1
        return real_writer(self, codec, path, shown)

    monkeypatch.setattr(Assembler, "_part_writer", part_writer)
    planned = record_cuts(monkeypatch, "plan_cuts")
    render(tmp_path / "book.m4b", "m4b", 2, book_segments(25.0))
    assert len(planned) == 1 and len(planned[0]) == 1  # two parts
    assert most[0] == 2
