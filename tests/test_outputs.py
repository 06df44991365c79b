"""Formats, checks before rendering, the output lock, file names, metadata and subtitle text."""

from __future__ import annotations

import errno
import io
import os
import re
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from fastmaya_cli import outputs
from fastmaya_cli.errors import InputError, RuntimeFailure
from fastmaya_cli.outputs import (
    ChapterEntry,
    Cue,
    OutputSpec,
    chapter_file_name,
    check_output,
    ffmetadata,
    format_for,
    image_kind,
    is_disk_full,
    output_lock,
    reserve_temp,
    safe_file_title,
    subtitles_text,
    to_pcm,
    write_failure,
)

# ------------------------------------------------------------------------------------------- format_for


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("book.wav", "wav"),
        ("book.FLAC", "flac"),
        ("book.mp3", "mp3"),
        ("book.ogg", "ogg"),
        ("book.oga", "ogg"),
        ("book.opus", "opus"),
        ("book.m4a", "m4a"),
        ("My.Book.m4b", "m4b"),
    ],
)
def test_format_from_suffix(name: str, expected: str) -> None:
    assert format_for(Path(name), None) == expected


def test_explicit_format_wins_and_must_agree_with_a_known_suffix() -> None:
    assert format_for(None, "MP3") == "mp3"
    assert format_for(Path("chapters"), "m4b") == "m4b"  # a directory for split chapters
    assert format_for(Path("book.m4b"), ".m4b") == "m4b"
    with pytest.raises(InputError, match="does not match"):
        format_for(Path("book.mp3"), "wav")


def test_unknown_or_missing_format_is_an_input_error() -> None:
    with pytest.raises(InputError, match="cannot tell the audio format") as caught:
        format_for(Path("book.txt"), None)
    assert ".m4b" in caught.value.fix
    with pytest.raises(InputError, match="stdout needs a format"):
        format_for(None, None)
    with pytest.raises(InputError, match="unknown output format"):
        format_for(Path("book"), "aiff")


# ----------------------------------------------------------------------------------------- check_output


def test_missing_directory(tmp_path: Path) -> None:
    spec = OutputSpec(tmp_path / "nope" / "book.wav", "wav", loudness="off")
    with pytest.raises(InputError, match="does not exist") as caught:
        check_output(spec)
    assert "mkdir -p" in caught.value.fix


def test_read_only_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        if os.access(locked, os.W_OK):  # root ignores permission bits: simulate what a user would see
            real_access = os.access
            monkeypatch.setattr(
                outputs.os,
                "access",
                lambda path, mode: False if Path(path) == locked else real_access(path, mode),
            )
        with pytest.raises(InputError, match="read-only") as caught:
            check_output(OutputSpec(locked / "book.wav", "wav", loudness="off"))
        assert caught.value.fix
    finally:
        locked.chmod(stat.S_IRWXU)


def test_output_that_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="is a directory") as caught:
        check_output(OutputSpec(tmp_path, "wav", loudness="off"))
    assert "--split-chapters" in caught.value.fix
    # ... which is exactly what split chapters want, while a file is not.
    check_output(OutputSpec(tmp_path, "wav", loudness="off", split_chapters=True))
    check_output(OutputSpec(tmp_path / "new-dir", "wav", loudness="off", split_chapters=True))
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="needs a directory"):
        check_output(OutputSpec(tmp_path / "file", "wav", loudness="off", split_chapters=True))


def test_missing_ffmpeg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(outputs, "find_ffmpeg", lambda: None)
    with pytest.raises(RuntimeFailure, match="ffmpeg is not installed") as caught:
        check_output(OutputSpec(tmp_path / "book.mp3", "mp3", loudness="off"))
    assert "apt install ffmpeg" in caught.value.fix
    # Loudness measurement needs it too ...
    with pytest.raises(RuntimeFailure, match="loudness"):
        check_output(OutputSpec(tmp_path / "book.wav", "wav", loudness="acx"))
    # ... but plain wav/flac do not.
    check_output(OutputSpec(tmp_path / "book.flac", "flac", loudness="off"))


def test_ffmpeg_without_the_encoder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(outputs, "find_ffmpeg", lambda: "/usr/bin/ffmpeg")
    monkeypatch.setattr(outputs, "ffmpeg_encoders", lambda ffmpeg: frozenset({"aac"}))
    with pytest.raises(RuntimeFailure, match="no libopus encoder"):
        check_output(OutputSpec(tmp_path / "book.opus", "opus", loudness="off"))
    check_output(OutputSpec(tmp_path / "book.m4b", "m4b", loudness="off"))


@pytest.mark.skipif(outputs.find_ffmpeg() is None, reason="ffmpeg is not installed")
def test_real_ffmpeg_lists_the_encoders_we_use() -> None:
    found = outputs.ffmpeg_encoders(str(outputs.find_ffmpeg()))
    for fmt in outputs.FORMATS.values():
        if fmt.encoder is not None:
            assert fmt.encoder in found


def test_side_files_are_checked(tmp_path: Path) -> None:
    base = OutputSpec(tmp_path / "book.wav", "wav", loudness="off")
    with pytest.raises(InputError, match="subtitle format"):
        check_output(OutputSpec(base.path, "wav", loudness="off", subtitles=tmp_path / "book.txt"))
    with pytest.raises(InputError, match="same as the audio output"):
        check_output(OutputSpec(base.path, "wav", loudness="off", manifest=tmp_path / "book.wav"))
    with pytest.raises(InputError, match="does not exist"):
        check_output(OutputSpec(base.path, "wav", loudness="off", manifest=tmp_path / "x" / "m.json"))
    check_output(
        OutputSpec(
            base.path, "wav", loudness="off", manifest=tmp_path / "m.json", subtitles=tmp_path / "s.VTT"
        )
    )


def test_bad_settings(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="bit depth"):
        check_output(OutputSpec(tmp_path / "b.wav", "wav", loudness="off", bit_depth=8))
    with pytest.raises(InputError, match="sample rate"):
        check_output(OutputSpec(tmp_path / "b.wav", "wav", loudness="off", sample_rate=0))
    with pytest.raises(InputError, match="loudness"):
        check_output(OutputSpec(tmp_path / "b.wav", "wav", loudness="max"))


def test_stdout_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stdout", Terminal())
    with pytest.raises(InputError, match="terminal"):
        check_output(OutputSpec(None, "wav", loudness="off"))
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    check_output(OutputSpec(None, "wav", loudness="off"))
    with pytest.raises(InputError, match="stdout"):
        check_output(OutputSpec(None, "wav", loudness="off", split_chapters=True))


# ------------------------------------------------------------------------------------------------- lock


def test_second_lock_on_the_same_output_fails(tmp_path: Path) -> None:
    target = tmp_path / "book.m4b"
    with output_lock(target) as lock_file:
        assert lock_file.exists() and lock_file.name.startswith(".")
        with (
            pytest.raises(RuntimeFailure, match="another fastmaya run is writing") as caught,
            output_lock(target),
        ):
            pass
        assert str(target) in caught.value.problem and caught.value.fix
        with output_lock(tmp_path / "other.m4b"):  # other outputs are independent
            pass
    assert not lock_file.exists()
    with output_lock(target):  # released: can be taken again
        pass


def test_lock_held_by_another_process(tmp_path: Path) -> None:
    target = tmp_path / "book.mp3"
    holder = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from fastmaya_cli.outputs import output_lock
        with output_lock(Path({str(target)!r})):
            print("locked", flush=True)
            sys.stdin.readline()
        """
    )
    process = subprocess.Popen(
        [sys.executable, "-c", holder], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None and process.stdout.readline().strip() == "locked"
        with pytest.raises(RuntimeFailure, match="another fastmaya run"), output_lock(target):
            pass
    finally:
        assert process.stdin is not None
        process.stdin.write("\n")
        process.stdin.flush()
        process.wait(timeout=30)
    with output_lock(target):
        pass


# ------------------------------------------------------------------------------------------ small parts


def test_chapter_file_names_are_numbered_and_safe() -> None:
    assert chapter_file_name(3, 12, "Chapter 3: The Ball", ".m4b") == "03 - Chapter 3 The Ball.m4b"
    assert chapter_file_name(7, 120, 'A/B\\C?*<>|"', ".mp3") == "007 - A B C.mp3"
    assert chapter_file_name(1, 2, None, ".wav") == "01 - Chapter 1.wav"
    assert chapter_file_name(2, 2, "  ...  ", ".wav") == "02 - Chapter 2.wav"
    assert chapter_file_name(1, 1, "Ünïcödé\ntitle", ".ogg") == "01 - Ünïcödé title.ogg"
    long_name = chapter_file_name(1, 9, "é" * 400, ".m4b")
    assert len(long_name.encode()) < 255 and long_name.endswith(".m4b")
    assert safe_file_title("é" * 400).encode().decode() == "é" * 60  # cut on a character boundary


def test_ffmetadata_escapes_and_lists_chapters() -> None:
    text = ffmetadata(
        {"title": "A=B; #1 \\ x\nnext"}, [ChapterEntry(0, 480, "One"), ChapterEntry(480, 960, "Two")], 48000
    )
    lines = text.splitlines()
    assert lines[0] == ";FFMETADATA1"
    assert lines[1] == "title=A\\=B\\; \\#1 \\\\ x\\"
    assert lines[2] == "next"
    assert text.count("[CHAPTER]") == 2
    assert "TIMEBASE=1/48000\nSTART=480\nEND=960\ntitle=Two" in text


def test_subtitle_text_formats() -> None:
    cues = [Cue(0.5, 3661.5, "Hello <world> & --> you"), Cue(3661.5, 3662.0, "two\n\nlines")]
    srt = subtitles_text(cues, "srt")
    assert srt.startswith("1\n00:00:00,500 --> 01:01:01,500\nHello <world> & -> you\n\n2\n")
    assert "two lines" in srt
    vtt = subtitles_text(cues, "vtt")
    assert vtt.startswith("WEBVTT\n\n00:00:00.500 --> 01:01:01.500\nHello &lt;world&gt; &amp; -&gt; you\n")


def test_image_kind_by_magic_bytes() -> None:
    assert image_kind(b"\xff\xd8\xff\xe0rest") == "jpeg"
    assert image_kind(b"\x89PNG\r\n\x1a\nrest") == "png"
    assert image_kind(b"GIF89a") is None


def test_temp_files_are_hidden_unique_and_not_private(tmp_path: Path) -> None:
    first = reserve_temp(tmp_path, "book.m4b", ".m4b")
    second = reserve_temp(tmp_path, "book.m4b", ".m4b")
    assert first != second and first.name.startswith(".book.m4b.") and first.suffix == ".m4b"
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(first.stat().st_mode) == 0o666 & ~umask


def test_disk_full_is_recognised() -> None:
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full("av_interleaved_write_frame(): No space left on device")
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    failure = write_failure(Path("out/book.mp3"), OSError(errno.ENOSPC, "No space left on device"))
    assert failure.problem == "disk full while writing out/book.mp3." and failure.fix
    other = write_failure(Path("b.wav"), OSError(errno.EIO, "Input/output error"))
    assert re.match(r"could not write b\.wav: Input/output error", other.problem)


@pytest.mark.parametrize("bits", [16, 24])
@pytest.mark.parametrize("container", ["FLAC", "WAV"])
def test_pcm_conversion_rounds_to_the_nearest_step_and_clips(tmp_path, bits, container):
    rng = np.random.default_rng(3)
    step = 2.0 ** (1 - bits)
    samples = rng.uniform(-1.0, 1.0, 20_000).astype(np.float32)
    path = tmp_path / "pcm"
    sf.write(str(path), to_pcm(samples, bits), 48000, format=container, subtype=f"PCM_{bits}")
    stored, _ = sf.read(str(path), dtype="float64")
    assert np.abs(stored - samples).max() <= step / 2 + 1e-7  # the nearest step
    edges = np.array([1.0, 2.0, -1.0, -3.0, 0.0, 2.5 * step, 3.5 * step], dtype=np.float32)
    codes = to_pcm(edges, bits).astype(np.int64) >> (0 if bits == 16 else 8)
    top = 2 ** (bits - 1)
    assert codes.tolist() == [top - 1, top - 1, -top, -top, 0, 2, 4]  # clipped; halves round to even


def test_stale_temps_are_only_the_hidden_files_reserved_for_that_output(tmp_path: Path) -> None:
    from fastmaya_cli.outputs import lock_path_for, reserve_temp, stale_temps

    mine = [reserve_temp(tmp_path, "book.m4b", suffix) for suffix in (".flac", ".aac", "")]
    others = [
        reserve_temp(tmp_path, "other.m4b", ".flac"),  # another output's
        tmp_path / ".book.m4b.12345.fastmaya-tmp.flac",  # not a name reserve_temp makes
        tmp_path / "book.m4b",  # the output itself
        lock_path_for(tmp_path / "book.m4b"),
    ]
    for path in others[1:]:
        path.write_bytes(b"x")
    (tmp_path / ".book.m4b.abcdef01.fastmaya-tmp.dir").mkdir()  # not a file
    assert stale_temps(tmp_path, "book.m4b") == sorted(mine)
    assert stale_temps(tmp_path / "missing", "book.m4b") == []
