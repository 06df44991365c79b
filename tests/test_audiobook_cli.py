"""Audiobook features end to end, with the scripted engine (no weights) and the tiny tokenizer and SNAC."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib

import pytest
import soundfile as sf
from typer.testing import CliRunner

from fastmaya_cli.cli import app
from fastmaya_cli.outputs import output_lock
from test_render_cli import RENDER

BOOK = """Chapter 1. The Storm

The storm had been building all afternoon. By evening the rain came sideways.

She pushed the door open. <laugh> It could not get any wetter.

Chapter 2. The Keeper

The old keeper looked up from his logbook. He had not expected a visitor.
"""


@pytest.fixture()
def args(tiny_cli_args, tmp_path):
    return [
        "--engine",
        "scripted",
        *tiny_cli_args,
        "--cache-dir",
        str(tmp_path / "cache"),
        "--progress",
        "none",
        "--voice",
        "@storyteller",
    ]


@pytest.fixture()
def book(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text(BOOK)
    return path


def render(*argv):
    return CliRunner().invoke(app, ["render", *map(str, argv)], catch_exceptions=False)


def _png() -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\x00" + b"\xff\x00\x00" * 8 for _ in range(8))
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def test_m4b_has_chapters_metadata_cover_and_subtitles(book, args, tmp_path):
    cover = tmp_path / "cover.png"
    cover.write_bytes(_png())
    out, subs, manifest = tmp_path / "book.m4b", tmp_path / "book.srt", tmp_path / "book.json"
    result = render(
        book,
        "-o",
        out,
        "--cover",
        cover,
        "--author",
        "A. Writer",
        "--subtitles",
        subs,
        "--manifest",
        manifest,
        *args,
    )
    assert result.exit_code == 0, result.output
    probe = json.loads(
        subprocess.run(
            [
                "ffprobe",
                "-v",
                "error",
                "-show_chapters",
                "-show_format",
                "-show_streams",
                "-of",
                "json",
                str(out),
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    titles = [c["tags"]["title"] for c in probe["chapters"]]
    assert titles == ["Chapter 1. The Storm", "Chapter 2. The Keeper"]
    chapter_starts = [c["start"] for c in json.loads(manifest.read_text())["chapters"]]
    assert [float(c["start_time"]) for c in probe["chapters"]] == pytest.approx(chapter_starts, abs=0.05)
    tags = {k.lower(): v for k, v in probe["format"]["tags"].items()}
    assert tags["artist"] == "A. Writer" and "storyteller" in tags["composer"].lower()
    assert any(s.get("disposition", {}).get("attached_pic") for s in probe["streams"])
    srt = subs.read_text()
    assert "00:00:00,500 -->" in srt and "keeper looked up" in srt


def test_several_books_render_to_one_file_each(book, args, tmp_path):
    second = tmp_path / "second.md"
    second.write_text("# Part One\n\nA *short* second book.\n")
    result = render(book, second, "-o", tmp_path / "shelf", "--format", "flac", *args)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "shelf").iterdir()) == ["book.flac", "second.flac"]


def test_split_chapters_writes_numbered_files(book, args, tmp_path):
    result = render(book, "--split", "chapters", "--format", "flac", "-o", tmp_path / "parts", *args)
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in (tmp_path / "parts").iterdir())
    assert names == ["01 - Chapter 1. The Storm.flac", "02 - Chapter 2. The Keeper.flac"]
    assert all(sf.info(str(tmp_path / "parts" / n)).frames > 0 for n in names)


def test_preview_renders_only_the_first_sentences(book, args, tmp_path):
    manifest = tmp_path / "m.json"
    result = render(book, "--preview", "2", "-o", tmp_path / "p.wav", "--manifest", manifest, *args)
    assert result.exit_code == 0, result.output
    text = " ".join(c["text"] for c in json.loads(manifest.read_text())["chunks"])
    assert "building all afternoon" in text and "rain came sideways" in text
    assert "pushed the door" not in text and "keeper" not in text


def test_a_second_run_on_the_same_output_is_refused(book, args, tmp_path):
    out = tmp_path / "locked.wav"
    with output_lock(out):
        done = subprocess.run(
            [*RENDER, str(book), "-o", str(out), *args],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 1 and "another fastmaya run" in done.stderr
    assert not out.exists()


def test_progress_json_lines(book, args, tmp_path):
    done = subprocess.run(
        [*RENDER, str(book), "-o", str(tmp_path / "j.wav"), *args, "--progress", "json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "finish" and kinds.count("chunk") == events[0]["chunks"]
    assert all(
        {"audio_s", "rtf", "eta_s", "done", "total"} <= e.keys() for e in events if e["event"] == "chunk"
    )


def test_lmdeploy_out_of_memory_at_start_names_the_options(monkeypatch, tmp_path):
    import types

    from fastmaya_cli.errors import RuntimeFailure

    fake = types.ModuleType("lmdeploy")

    def pipeline(*_, **__):
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")

    fake.pipeline = pipeline
    fake.PytorchEngineConfig = fake.TurbomindEngineConfig = lambda **kw: kw
    monkeypatch.setitem(sys.modules, "lmdeploy", fake)
    from fastmaya_cli.engines.lmdeploy import LMDeployEngine

    with pytest.raises(RuntimeFailure) as error:
        LMDeployEngine("some/model")
    assert "--gpu-memory" in error.value.fix and "--max-batch" in error.value.fix
