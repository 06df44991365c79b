"""The assembler: exact timeline, crossfades, streaming, formats, chapters, manifest, subtitles, atomicity."""

from __future__ import annotations

import errno
import io
import json
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.signal import resample_poly

from fastmaya_cli import outputs
from fastmaya_cli.assemble import (
    BOUNDARIES,
    Assembler,
    BookInfo,
    OutputSpec,
    Pauses,
    Placement,
    Segment,
    expected_length,
)
from fastmaya_cli.errors import RuntimeFailure

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FFMPEG = shutil.which("ffmpeg")
FFPROBE = shutil.which("ffprobe")
needs_ffmpeg = pytest.mark.skipif(FFMPEG is None or FFPROBE is None, reason="ffmpeg/ffprobe not installed")

SR = 8000
# At 8 kHz: head 800, sentence 400, clause 0, paragraph 1600, heading 2400, chapter 4000, tail 800, F = 80.
PAUSES = Pauses(
    head=0.1, sentence=0.05, clause=0.0, paragraph=0.2, heading=0.3, chapter=0.5, tail=0.1, crossfade=0.01
)


def seg(
    index: int, audio: np.ndarray, boundary: str = "sentence", chapter: int = 1, **extra: object
) -> Segment:
    fields: dict = {"chapter_title": f"Chapter {chapter}", "text": f"Chunk number {index}."} | extra
    return Segment(index, np.asarray(audio, dtype=np.float32), boundary, chapter, **fields)


def assemble(
    spec: OutputSpec, segments: list[Segment], pauses: Pauses = PAUSES
) -> tuple[list[Placement], object]:
    with Assembler(spec, pauses) as assembler:
        placements = [assembler.add(segment) for segment in segments]
        result = assembler.finish()
    return placements, result


def wav_spec(path: Path, **extra: object) -> OutputSpec:
    fields: dict = {"sample_rate": SR, "loudness": "off", "bit_depth": 24} | extra
    return OutputSpec(path, "wav", **fields)


def visible(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


@pytest.fixture(scope="module")
def speech48() -> np.ndarray:
    path = DATA / "maya1_24k.wav"
    if not path.exists():
        pytest.skip(f"real speech sample missing: {path}")
    audio, _ = sf.read(path, dtype="float32")
    return resample_poly(audio, 2, 1).astype(np.float32)


def tiny_png() -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", 2, 2, 8, 2, 0, 0, 0)  # 2x2 RGB
    pixels = zlib.compress(b"\x00" + b"\xff\x00\x00" * 2 + b"\x00" + b"\x00\x00\xff" * 2)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def ffprobe(path: Path) -> dict:
    assert FFPROBE is not None
    run = subprocess.run(
        [FFPROBE, "-v", "error", "-show_format", "-show_streams", "-show_chapters", "-of", "json", str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(run.stdout)


# ---------------------------------------------------------------------------------------- length rules


def test_expected_length_by_hand() -> None:
    # head 800 + (1000 + 400 + 80 + 1600) + pauses (400 + 0) - 3 * 80 + tail 800; the 5-sample segment is padded to F.
    lengths, boundaries = [1000, 400, 5, 1600], ["sentence", "clause", "paragraph", "chapter"]
    assert expected_length(lengths, boundaries, PAUSES, SR) == 800 + 3080 + 400 + 0 + 1600 - 240 + 800
    assert expected_length([], [], PAUSES, SR) == 1600
    with pytest.raises(ValueError):
        expected_length([10], ["stanza"], PAUSES, SR)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    lengths=st.lists(st.integers(0, 1500), min_size=1, max_size=8),
    kinds=st.lists(st.sampled_from(BOUNDARIES), min_size=8, max_size=8),
    crossfade=st.sampled_from([0.0, 0.001, 0.01, 0.04]),
    sentence=st.sampled_from([0.0, 0.005, 0.05]),
)
def test_written_file_has_exactly_the_expected_length(
    tmp_path: Path, lengths: list[int], kinds: list[str], crossfade: float, sentence: float
) -> None:
    pauses = Pauses(head=0.02, sentence=sentence, clause=0.0, paragraph=0.03, crossfade=crossfade, tail=0.01)
    boundaries = kinds[: len(lengths)]
    rng = np.random.default_rng(len(lengths))
    segments = [
        seg(i, rng.uniform(-0.5, 0.5, n), b) for i, (n, b) in enumerate(zip(lengths, boundaries, strict=True))
    ]
    path = tmp_path / f"len-{os.getpid()}-{rng.integers(1 << 30)}.wav"
    placements, result = assemble(wav_spec(path), segments, pauses)

    total = expected_length(lengths, boundaries, pauses, SR)
    assert sf.info(str(path)).frames == total == result.samples  # type: ignore[attr-defined]
    fade, table = round(crossfade * SR), pauses.samples(SR)
    start = round(pauses.head * SR)
    for placement, length, boundary in zip(placements, lengths, boundaries, strict=True):
        assert (placement.start_sample, placement.end_sample) == (start, start + max(length, fade))
        start = placement.end_sample + table[boundary] - fade
    path.unlink()


def test_samples_land_exactly_where_the_rules_say(tmp_path: Path) -> None:
    path = tmp_path / "exact.wav"
    segments = [
        seg(0, np.full(1000, 0.1), "sentence"),
        seg(1, np.full(1200, 0.2), "clause"),
        seg(2, np.full(900, 0.3)),
    ]
    placements, _ = assemble(wav_spec(path), segments)
    out, _ = sf.read(path, dtype="float64")
    # s1 = head = 800; s2 = 1800 + 400 - 80 = 2120; s3 = 3320 + 0 - 80 = 3240; total = 4140 + tail 800.
    assert [(p.start_sample, p.end_sample) for p in placements] == [(800, 1800), (2120, 3320), (3240, 4140)]
    assert len(out) == 4940
    assert placements[1].start == pytest.approx(2120 / SR)
    np.testing.assert_array_equal(out[:800], 0.0)
    np.testing.assert_allclose(out[880:1720], 0.1, atol=1e-6)
    np.testing.assert_array_equal(out[1800:2120], 0.0)  # the sentence pause, minus the crossfade
    np.testing.assert_allclose(out[2200:3240], 0.2, atol=1e-6)
    np.testing.assert_allclose(out[3320:4060], 0.3, atol=1e-6)
    np.testing.assert_array_equal(out[4140:], 0.0)
    # Across the clause join (pause 0) the fades are complementary: 0.2 -> 0.3 monotonically, no dip.
    join = out[3240:3320]
    assert np.all(np.diff(join) > 0) and join[0] > 0.2 - 1e-3 and join[-1] < 0.3 + 1e-3


def test_crossfade_is_equal_gain(tmp_path: Path) -> None:
    path = tmp_path / "xfade.wav"
    assemble(wav_spec(path), [seg(0, np.full(800, 0.5), "clause"), seg(1, np.full(800, 0.5), "end")])
    out, _ = sf.read(path, dtype="float64")
    # Two equal constant segments crossfaded must read as one unbroken constant.
    np.testing.assert_allclose(out[880 : 800 + 1520 - 80], 0.5, atol=1e-6)


def test_no_clicks_where_real_speech_is_cut(tmp_path: Path, speech48: np.ndarray) -> None:
    speech = speech48[: 48000 * 3]
    # Cut where the waveform is near its extremes, so butting the pieces together would jump.
    order = np.argsort(speech)
    high = int(order[-1])
    low = int(order[0])
    first, second = speech[: high + 1], speech[low:]
    naive_jump = abs(float(first[-1]) - float(second[0]))
    speech_step = float(np.max(np.abs(np.diff(speech))))
    assert naive_jump > 2 * speech_step  # without fades this would click

    pauses = Pauses(crossfade=0.01)
    for boundary in ("clause", "sentence"):
        path = tmp_path / f"{boundary}.wav"
        spec = OutputSpec(path, "wav", sample_rate=48000, loudness="off", bit_depth=24)
        placements, _ = assemble(spec, [seg(0, first, boundary), seg(1, second, "end")], pauses)
        out, _ = sf.read(path, dtype="float64")
        assert np.max(np.abs(np.diff(out))) <= speech_step * 1.01
        assert abs(out[placements[0].start_sample]) < 1e-3 and abs(out[placements[1].end_sample - 1]) < 1e-3


def test_tiny_and_empty_segments(tmp_path: Path) -> None:
    path = tmp_path / "tiny.wav"
    lengths = [500, 0, 30, 1, 500]
    segments = [seg(i, np.full(n, 0.4), "clause") for i, n in enumerate(lengths)]
    placements, result = assemble(wav_spec(path), segments)
    assert result.samples == expected_length(lengths, ["clause"] * 5, PAUSES, SR)  # type: ignore[attr-defined]
    starts = [p.start_sample for p in placements]
    ends = [p.end_sample for p in placements]
    assert starts == sorted(starts) and ends == sorted(ends)
    assert [e - s for s, e in zip(starts, ends, strict=True)] == [500, 80, 80, 80, 500]  # padded to F = 80
    out, _ = sf.read(path, dtype="float64")
    # The tiny ones overlap their neighbours' fades only; the long segments' bodies are untouched.
    for placement in (placements[0], placements[-1]):
        np.testing.assert_allclose(
            out[placement.start_sample + 80 : placement.end_sample - 80], 0.4, atol=1e-6
        )


# --------------------------------------------------------------------------------------------- streaming


def test_memory_holds_only_the_overlap_tail(tmp_path: Path) -> None:
    path = tmp_path / "long.wav"
    rng = np.random.default_rng(0)
    lengths = rng.integers(200, 2000, 300)
    with Assembler(wav_spec(path), PAUSES) as assembler:
        for index, length in enumerate(lengths):
            assembler.add(seg(index, rng.uniform(-0.3, 0.3, length), BOUNDARIES[index % 5]))
            assert assembler.buffered_samples <= PAUSES.samples(SR)["chapter"]
        hidden = [p for p in tmp_path.iterdir() if p.name.startswith(".")]
        assert len(hidden) == 1 and hidden[0].stat().st_size > 0  # the book so far is on disk ...
        assert not path.exists()  # ... and nothing is published yet
        result = assembler.finish()
    # In memory at most: one segment plus one pause (the longest here: chapter, 4000 samples).
    assert assembler.peak_buffered_samples <= int(lengths.max()) + 4000
    assert result.samples > 20 * assembler.peak_buffered_samples
    assert visible(tmp_path) == ["long.wav"]


def test_flac_without_loudness_is_encoded_as_it_streams(tmp_path: Path) -> None:
    """No gain to wait for: the FLAC output grows while segments arrive, and equals the two-pass result."""
    rng = np.random.default_rng(1)
    segments = [
        seg(i, rng.uniform(-0.5, 0.5, int(n)), BOUNDARIES[i % 5])
        for i, n in enumerate(rng.integers(300, 3000, 40))
    ]
    flac = tmp_path / "direct" / "book.flac"
    flac.parent.mkdir()
    sizes = []
    with Assembler(OutputSpec(flac, "flac", sample_rate=SR, loudness="off"), PAUSES) as assembler:
        for segment in segments:
            assembler.add(segment)
            sizes.append(sum(p.stat().st_size for p in flac.parent.iterdir()))
        hidden = list(flac.parent.iterdir())
        assert len(hidden) == 1 and hidden[0].name.startswith(".") and hidden[0].suffix == ".flac"
        assert sf.info(str(hidden[0])).subtype == "PCM_16"  # the output's own encoding, not the intermediate
        result = assembler.finish()
    assert sizes[-1] > sizes[len(sizes) // 2] > sizes[0]
    assert visible(flac.parent) == ["book.flac"] and result.paths == (flac,)

    wav = tmp_path / "two-pass.wav"
    assemble(wav_spec(wav, bit_depth=16), segments)  # the intermediate file and a second pass
    direct, _ = sf.read(str(flac), dtype="float64")
    two_pass, _ = sf.read(str(wav), dtype="float64")
    assert len(direct) == len(two_pass) == result.samples
    assert np.max(np.abs(direct - two_pass)) <= 1 / 2**15  # one 16-bit step at most


def test_flac_without_loudness_clips_over_full_scale_and_says_so(tmp_path: Path) -> None:
    path = tmp_path / "loud.flac"
    _, result = assemble(
        OutputSpec(path, "flac", sample_rate=SR, loudness="off"), [seg(0, np.full(1000, 1.5))]
    )
    audio, _ = sf.read(str(path))
    assert np.max(np.abs(audio)) <= 1.0 and np.max(audio) > 0.99
    assert any("over full scale and were clipped" in w for w in result.warnings)  # type: ignore[attr-defined]

    with (
        pytest.raises(KeyError),
        Assembler(OutputSpec(path, "flac", sample_rate=SR, loudness="off")) as assembler,
    ):
        assembler.add(seg(0, np.full(1000, 0.1)))
        raise KeyError("rendering failed")
    assert visible(tmp_path) == ["loud.flac"]  # the earlier book, untouched; no temporary file left


def test_exception_in_the_with_block_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "book.wav"
    path.write_bytes(b"previous book")
    with pytest.raises(KeyError), Assembler(wav_spec(path), PAUSES) as assembler:
        assembler.add(seg(0, np.full(1000, 0.1)))
        assembler.add(seg(1, np.full(1000, 0.1)))
        raise KeyError("rendering failed")
    assert visible(tmp_path) == ["book.wav"] and path.read_bytes() == b"previous book"

    split_dir = tmp_path / "chapters"
    with pytest.raises(KeyError), Assembler(wav_spec(split_dir, split_chapters=True), PAUSES) as assembler:
        assembler.add(seg(0, np.full(1000, 0.1)))
        raise KeyError("rendering failed")
    assert not split_dir.exists()  # created for the run, removed again

    with Assembler(wav_spec(tmp_path / "never.wav"), PAUSES) as assembler:
        assembler.add(seg(0, np.full(1000, 0.1)))  # left without finish(): nothing published
    assert visible(tmp_path) == ["book.wav"]


def test_bad_input_is_refused(tmp_path: Path) -> None:
    with Assembler(wav_spec(tmp_path / "b.wav"), PAUSES) as assembler:
        assembler.add(seg(3, np.zeros(100)))
        with pytest.raises(ValueError, match="add in order"):
            assembler.add(seg(3, np.zeros(100)))
        with pytest.raises(ValueError, match="unknown boundary"):
            assembler.add(seg(4, np.zeros(100), "stanza"))
        with pytest.raises(ValueError, match="mono"):
            assembler.add(seg(5, np.zeros((2, 100))))
    with (
        Assembler(wav_spec(tmp_path / "c.wav"), PAUSES) as assembler,
        pytest.raises(RuntimeFailure, match="nothing to assemble"),
    ):
        assembler.finish()
    assert visible(tmp_path) == []


def test_nan_samples_are_silenced_and_reported(tmp_path: Path) -> None:
    audio = np.full(1000, 0.2)
    audio[500:510] = np.nan
    _, result = assemble(wav_spec(tmp_path / "nan.wav"), [seg(0, audio), seg(1, np.full(1000, 0.2))])
    out, _ = sf.read(tmp_path / "nan.wav")
    assert np.all(np.isfinite(out)) and np.all(out[800 + 500 : 800 + 510] == 0)
    assert any("NaN" in warning for warning in result.warnings)  # type: ignore[attr-defined]


# ----------------------------------------------------------------------------------------------- chapters


def chapter_segments() -> list[Segment]:
    return [
        seg(0, np.full(1000, 0.1), "paragraph", 1, chapter_title=None),
        seg(1, np.full(1000, 0.1), "chapter", 1, chapter_title="Chapter 1: It Is a Truth"),
        seg(2, np.full(1000, 0.2), "chapter", 2, chapter_title="Chapter 2 / Mr. Bennet"),
        seg(3, np.full(1000, 0.3), "end", 5, chapter_title=None),
    ]


def test_chapter_marks_sit_in_the_middle_of_the_pause(tmp_path: Path) -> None:
    placements, result = assemble(wav_spec(tmp_path / "ch.wav"), chapter_segments())
    marks = result.chapters  # type: ignore[attr-defined]
    assert [m.title for m in marks] == ["Chapter 1: It Is a Truth", "Chapter 2 / Mr. Bennet", "Chapter 5"]
    assert [m.number for m in marks] == [1, 2, 5]
    gap = PAUSES.samples(SR)["chapter"] - 80  # silence between the segments
    assert marks[0].start_sample == 0
    assert marks[1].start_sample == placements[1].end_sample + gap // 2
    assert marks[2].start_sample == placements[2].end_sample + gap // 2
    assert marks[2].end_sample == result.samples  # type: ignore[attr-defined]
    assert marks[1].start == pytest.approx(marks[1].start_sample / SR)


def test_split_chapters_cut_the_book_into_numbered_files(tmp_path: Path) -> None:
    whole = tmp_path / "whole.wav"
    assemble(wav_spec(whole), chapter_segments())
    folder = tmp_path / "book"
    info = BookInfo("Pride and Prejudice", "Jane Austen", "calm voice", None, None)
    spec = OutputSpec(
        folder,
        "flac",
        sample_rate=SR,
        loudness="off",
        bit_depth=24,
        split_chapters=True,
        info=info,
        manifest=tmp_path / "split.json",
    )
    _, result = assemble(spec, chapter_segments())
    names = ["01 - Chapter 1 It Is a Truth.flac", "02 - Chapter 2 Mr. Bennet.flac", "03 - Chapter 5.flac"]
    assert visible(folder) == names
    assert [p.name for p in result.paths] == names  # type: ignore[attr-defined]
    assert [m.path.name for m in result.chapters] == names  # type: ignore[attr-defined]
    pieces = [sf.read(folder / name, dtype="float64")[0] for name in names]
    np.testing.assert_array_equal(np.concatenate(pieces), sf.read(whole, dtype="float64")[0])
    chunks = json.loads((tmp_path / "split.json").read_text())["chunks"]
    assert [c["file"] for c in chunks] == [names[0], names[0], names[1], names[2]]
    second_start = result.chapters[1].start  # type: ignore[attr-defined]
    assert chunks[2]["file_start"] == pytest.approx(chunks[2]["start"] - second_start, abs=1e-6)
    with sf.SoundFile(folder / names[1]) as second:
        tags = second.copy_metadata()
    assert tags["tracknumber"] == "2/3" and tags["album"] == "Pride and Prejudice"
    assert tags["title"] == "Chapter 2 / Mr. Bennet" and tags["artist"] == "Jane Austen"


@needs_ffmpeg
def test_split_chapters_tags_in_m4a(tmp_path: Path) -> None:
    info = BookInfo("Emma", "Jane Austen", "bright voice", tiny_png(), "image/png")
    spec = OutputSpec(
        tmp_path / "emma", "m4a", sample_rate=SR, loudness="off", split_chapters=True, info=info
    )
    _, result = assemble(spec, chapter_segments())
    probes = [ffprobe(path) for path in result.paths]  # type: ignore[attr-defined]
    assert [p["format"]["tags"]["track"] for p in probes] == ["1/3", "2/3", "3/3"]
    assert {p["format"]["tags"]["album"] for p in probes} == {"Emma"}
    assert probes[2]["format"]["tags"]["title"] == "Chapter 5"
    assert all(any(s["disposition"]["attached_pic"] for s in p["streams"]) for p in probes)


@needs_ffmpeg
def test_m4b_has_chapters_tags_and_cover(tmp_path: Path, speech48: np.ndarray) -> None:
    sr = 48000
    piece = speech48[: sr // 2]
    titles = ["Opening; Credits", "Chapter 1 = The Start", "Chapter 2 # Ünïcode"]
    segments = [
        seg(i, piece, "chapter" if i % 2 else "sentence", i // 2, chapter_title=titles[i // 2])
        for i in range(6)
    ]
    info = BookInfo("My Book", "Ann Author", "a warm, low female voice", tiny_png(), "image/png")
    spec = OutputSpec(tmp_path / "book.m4b", "m4b", sample_rate=sr, loudness="acx", info=info)
    _, result = assemble(spec, segments, Pauses())
    probe = ffprobe(tmp_path / "book.m4b")
    chapters = probe["chapters"]
    assert [c["tags"]["title"] for c in chapters] == titles
    for chapter, mark in zip(chapters, result.chapters, strict=True):  # type: ignore[attr-defined]
        assert float(chapter["start_time"]) == pytest.approx(mark.start, abs=1024 / sr + 0.002)
    tags = probe["format"]["tags"]
    assert tags["title"] == "My Book" and tags["album"] == "My Book"
    assert tags["artist"] == "Ann Author" and tags["composer"] == "a warm, low female voice"
    assert tags["genre"] == "Audiobook"
    assert [s["codec_name"] for s in probe["streams"] if s["disposition"]["attached_pic"]] == ["png"]
    audio = [s for s in probe["streams"] if s["codec_type"] == "audio"]
    assert audio[0]["codec_name"] == "aac"
    assert float(probe["format"]["duration"]) == pytest.approx(result.duration, abs=0.05)  # type: ignore[attr-defined]


def decoded_seconds(path: Path) -> float:
    """Duration by decoding every sample (container estimates are rough for some codecs)."""
    assert FFMPEG is not None
    pcm = subprocess.run(
        [FFMPEG, "-v", "error", "-i", str(path), "-f", "s16le", "-ac", "1", "-ar", "48000", "-"],
        capture_output=True,
        check=True,
    ).stdout
    return len(pcm) / 2 / 48000


@needs_ffmpeg
@pytest.mark.parametrize(
    ("fmt", "codec", "sample_rate", "coded_rate"),
    [("mp3", "mp3", 48000, 48000), ("ogg", "vorbis", 48000, 48000), ("opus", "opus", 24000, 48000)],
)
def test_lossy_formats(tmp_path: Path, fmt: str, codec: str, sample_rate: int, coded_rate: int) -> None:
    path = tmp_path / f"book.{fmt}"
    info = BookInfo("Title", "Author", None, None, None)
    spec = OutputSpec(path, fmt, sample_rate=sample_rate, loudness="off", info=info)
    tone = np.sin(np.arange(sample_rate // 2) * 0.3) * 0.3
    segments = [seg(i, tone, "paragraph", 1 + i // 2) for i in range(4)]
    _, result = assemble(spec, segments)
    probe = ffprobe(path)
    stream = probe["streams"][0]
    assert (
        stream["codec_name"] == codec and int(stream["sample_rate"]) == coded_rate and stream["channels"] == 1
    )
    assert decoded_seconds(path) == pytest.approx(result.duration, abs=0.03)  # type: ignore[attr-defined]
    tags = {k.lower(): v for k, v in {**probe["format"].get("tags", {}), **stream.get("tags", {})}.items()}
    assert tags["artist"] == "Author" and tags["album"] == "Title"  # ogg keeps tags on the stream
    if fmt == "mp3":
        assert [c["tags"]["title"] for c in probe["chapters"]] == ["Chapter 1", "Chapter 2"]


@pytest.mark.parametrize("fmt", ["wav", "flac"])  # flac: encoded as it streams, then copied out
def test_stdout_gets_a_complete_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str) -> None:
    sink = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", SimpleNamespace(buffer=sink, isatty=lambda: False))
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    segments = [seg(0, np.full(1000, 0.25)), seg(1, np.full(500, 0.25), "end")]
    _, result = assemble(OutputSpec(None, fmt, sample_rate=SR, loudness="off"), segments)
    audio, rate = sf.read(io.BytesIO(sink.getvalue()), dtype="float64")
    assert rate == SR and len(audio) == expected_length([1000, 500], ["sentence", "end"], PAUSES, SR)
    assert result.paths == ()  # type: ignore[attr-defined]
    assert visible(tmp_path) == []  # the temporary files are gone


def test_output_replaces_atomically_with_normal_permissions(tmp_path: Path) -> None:
    path = tmp_path / "book.wav"
    path.write_bytes(b"old")
    assemble(wav_spec(path), [seg(0, np.full(1000, 0.1))])
    assert sf.info(str(path)).frames > 0
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert visible(tmp_path) == ["book.wav"]


def test_wav_over_4_gib_becomes_rf64(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(outputs, "_WAV_LIMIT_BYTES", 1000)  # stand-in for 4 GiB
    path = tmp_path / "huge.wav"
    _, result = assemble(wav_spec(path), [seg(0, np.full(1000, 0.1))])
    assert path.read_bytes()[:4] == b"RF64"
    assert sf.info(str(path)).frames == result.samples  # type: ignore[attr-defined]
    small = tmp_path / "small.wav"
    monkeypatch.undo()
    assemble(wav_spec(small), [seg(0, np.full(1000, 0.1))])
    assert small.read_bytes()[:4] == b"RIFF"


@needs_ffmpeg
def test_loud_input_is_kept_unclipped_until_the_gain(tmp_path: Path) -> None:
    tone = 3.0 * np.sin(2 * np.pi * 440 * np.arange(SR) / SR)  # 10 dB over full scale
    path = tmp_path / "loud.wav"
    _, result = assemble(wav_spec(path, loudness="acx"), [seg(0, tone)])
    out, _ = sf.read(path, dtype="float64")
    body = out[800 + 80 : 800 + SR - 80]
    ratio = body / tone[80:-80]
    assert np.ptp(ratio[np.abs(tone[80:-80]) > 0.5]) < 1e-4  # one scale factor: nothing was clipped
    assert result.loudness.gain_db < -10  # type: ignore[attr-defined]
    assert not result.warnings  # type: ignore[attr-defined]
    _, clipped = assemble(wav_spec(tmp_path / "louder.wav", loudness="acx"), [seg(0, 2 * tone)])
    assert any("clipped" in warning for warning in clipped.warnings)  # type: ignore[attr-defined]


# -------------------------------------------------------------------------------------- manifest, subtitles


def test_manifest_lists_every_chunk(tmp_path: Path) -> None:
    segments = chapter_segments()
    segments[2] = seg(
        2, np.zeros(400), "chapter", 2, chapter_title="Two", status="failed", reason="timeout", attempts=3
    )
    info = BookInfo("T", "A", "N", None, None)
    spec = wav_spec(tmp_path / "b.wav", manifest=tmp_path / "b.json", info=info)
    placements, result = assemble(spec, segments)
    manifest = json.loads((tmp_path / "b.json").read_text())
    assert manifest["book"] == {"title": "T", "author": "A", "narrator": "N", "cover": None}
    assert manifest["sample_rate"] == SR and manifest["samples"] == result.samples  # type: ignore[attr-defined]
    chunks = manifest["chunks"]
    assert [c["index"] for c in chunks] == [0, 1, 2, 3]
    assert chunks[2]["status"] == "failed" and chunks[2]["reason"] == "timeout" and chunks[2]["attempts"] == 3
    assert chunks[2]["text"] == "Chunk number 2." and chunks[2]["chapter"] == 2
    for chunk, placement in zip(chunks, placements, strict=True):
        assert (chunk["start"], chunk["end"]) == pytest.approx((placement.start, placement.end))
        assert set(chunk) >= {"frames", "seed", "attempts", "status", "reason", "text"}
    assert [c["title"] for c in manifest["chapters"]] == ["Chapter 1: It Is a Truth", "Two", "Chapter 5"]
    assert manifest["loudness"]["mode"] == "off" and manifest["loudness"]["gain_db"] == 0
    assert manifest["outputs"] == [str(tmp_path / "b.wav")]


CUE = re.compile(r"(\d\d):(\d\d):(\d\d)[,.](\d\d\d) --> (\d\d):(\d\d):(\d\d)[,.](\d\d\d)")


def cue_times(text: str) -> list[tuple[float, float]]:
    def seconds(parts: tuple[str, ...]) -> float:
        h, m, s, ms = (int(part) for part in parts)
        return h * 3600 + m * 60 + s + ms / 1000

    return [(seconds(m.groups()[:4]), seconds(m.groups()[4:])) for m in CUE.finditer(text)]


@pytest.mark.parametrize("suffix", [".srt", ".vtt"])
def test_subtitles_follow_the_chunks(tmp_path: Path, suffix: str) -> None:
    segments = [seg(i, np.full(900, 0.1), "clause" if i % 2 else "sentence") for i in range(6)]
    subtitles = tmp_path / f"book{suffix}"
    placements, _ = assemble(wav_spec(tmp_path / "b.wav", subtitles=subtitles), segments)
    text = subtitles.read_text()
    times = cue_times(text)
    assert len(times) == 6
    for (start, end), placement in zip(times, placements, strict=True):
        assert start == pytest.approx(placement.start, abs=0.001) and start < end <= placement.end + 0.001
    for (_, end), (next_start, _) in zip(times, times[1:], strict=False):
        assert end <= next_start  # monotonic and never two cues at once, even across crossfades
    if suffix == ".vtt":
        assert text.startswith("WEBVTT\n\n")
    else:
        blocks = text.strip().split("\n\n")
        assert [block.splitlines()[0] for block in blocks] == [str(n) for n in range(1, 7)]
        assert blocks[3].splitlines()[2] == "Chunk number 3."


# ------------------------------------------------------------------------------------------------ disk full


def fail_writes(monkeypatch: pytest.MonkeyPatch, when: object) -> None:
    real_write = sf.SoundFile.write

    def write(self: sf.SoundFile, data: np.ndarray) -> None:
        if when(self):  # type: ignore[operator]
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(self, data)

    monkeypatch.setattr(sf.SoundFile, "write", write)


@needs_ffmpeg
def test_the_intermediate_files_encoder_has_a_lane_of_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The FLAC encoder runs on a lane of its own: slow, it holds up the meter not at all, nor the conversion
    lane that feeds it while few blocks wait for it (intermediate.ENCODER_DEPTH). Each lane's working time is
    reported."""
    real_write = sf.SoundFile.write
    writers: set[str] = set()

    def slow_write(self: sf.SoundFile, data: np.ndarray) -> None:
        if self.name.endswith(".flac"):
            writers.add(threading.current_thread().name)
            time.sleep(0.05)
        real_write(self, data)

    monkeypatch.setattr(sf.SoundFile, "write", slow_write)
    segments = [seg(i, 0.1 * np.ones(SR // 2)) for i in range(12)]
    _, result = assemble(wav_spec(tmp_path / "book.wav", loudness="acx"), segments)
    busy = result.lane_busy_s  # type: ignore[attr-defined]
    assert writers and all(name.startswith("fastmaya-flac") for name in writers)
    assert set(busy) == {"write", "flac", "meter"}
    assert busy["flac"] >= 12 * 0.05  # one write a segment at least, all on the FLAC lane
    assert busy["meter"] < busy["flac"] / 3
    assert busy["write"] < busy["flac"] - 4 * 0.05  # it never waited, and never wrote


def test_disk_full_while_assembling(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = iter(range(100))
    fail_writes(monkeypatch, lambda file: next(calls) == 4)  # midway through the intermediate file
    path = tmp_path / "book.wav"
    with pytest.raises(RuntimeFailure, match="disk full while writing") as caught:
        assemble(wav_spec(path), [seg(i, np.full(1000, 0.1)) for i in range(10)])
    assert str(path) in caught.value.problem and caught.value.fix
    assert visible(tmp_path) == []


def test_disk_full_while_writing_the_final_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fail_writes(monkeypatch, lambda file: file.name.endswith(".wav"))
    path = tmp_path / "book.wav"
    with pytest.raises(RuntimeFailure, match="disk full while writing"):
        assemble(wav_spec(path, manifest=tmp_path / "m.json"), [seg(i, np.full(1000, 0.1)) for i in range(3)])
    assert visible(tmp_path) == []


def test_disk_full_in_one_chapter_file_publishes_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fail_writes(monkeypatch, lambda file: "02 - " in file.name)
    folder = tmp_path / "book"
    spec = wav_spec(folder, split_chapters=True, manifest=tmp_path / "m.json")
    with pytest.raises(RuntimeFailure, match=r"disk full while writing .*02 - Chapter 2 Mr\. Bennet\.wav"):
        assemble(spec, chapter_segments())
    assert visible(tmp_path) == []  # no chapter files, no manifest, and the new directory is gone


def test_disk_full_inside_ffmpeg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "ffmpeg"
    fake.write_text(
        f"#!{sys.executable}\n"
        "import sys\n"
        "sys.stdin.buffer.read(20000)\n"
        "sys.stderr.write('[mp3 @ 0x5] Error writing trailer: No space left on device\\n')\n"
        "sys.exit(1)\n"
    )
    fake.chmod(0o755)
    monkeypatch.setattr(outputs, "find_ffmpeg", lambda: str(fake))
    folder = tmp_path / "out"
    folder.mkdir()
    spec = OutputSpec(folder / "book.mp3", "mp3", sample_rate=SR, loudness="off", subtitles=folder / "b.srt")
    with pytest.raises(RuntimeFailure, match=r"disk full while writing .*book\.mp3"):
        assemble(spec, [seg(i, np.full(4000, 0.1)) for i in range(10)])
    assert visible(folder) == []


def test_the_finish_times_publishing_and_removing_its_temporary_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fastmaya_cli.assemble as assemble_module

    real_remove = assemble_module.remove_quietly
    removed: list[Path] = []

    def slow_remove(path: Path) -> None:
        time.sleep(0.05)
        removed.append(path)
        real_remove(path)

    monkeypatch.setattr(assemble_module, "remove_quietly", slow_remove)
    spec = wav_spec(tmp_path / "book.wav", manifest=tmp_path / "book.json")
    _, result = assemble(spec, [seg(i, np.full(SR // 4, 0.1)) for i in range(4)])
    steps = result.finish_steps  # type: ignore[attr-defined]
    assert {"publish", "remove_temps"} <= set(steps)
    assert removed and steps["remove_temps"] >= 0.05 * len(removed) - 0.002  # rounded to 1 ms
    assert visible(tmp_path) == ["book.json", "book.wav"]
