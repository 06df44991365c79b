"""End to end: the `fastmaya render` command on the tiny Maya1-layout model, on the CPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from fastmaya_cli.assemble import Pauses, expected_length
from fastmaya_cli.cli import app

BOOK = """Chapter 1

It was a bright cold day in April. The clocks were striking thirteen.

Winston slipped quickly through the glass doors. <sigh> A swirl of gritty dust entered along with him.

Chapter 2

The hallway smelt of boiled cabbage and old rag mats.
"""
RATE = 48000
# The command line in a process of its own, as a shell runs it.
RENDER = [sys.executable, "-m", "fastmaya_cli.cli", "render"]


@pytest.fixture()
def book(tmp_path: Path) -> Path:
    path = tmp_path / "book.txt"
    path.write_text(BOOK)
    return path


@pytest.fixture()
def base_args(tiny_cli_args, tmp_path):
    return [
        "--engine",
        "hf",
        "--device",
        "cpu",
        *tiny_cli_args,
        "--fixed-length",
        "--max-new-tokens",
        "70",
        "--max-batch",
        "8",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--progress",
        "none",
        "--voice",
        "Calm narrator, low voice",
    ]


def run_cli(args: list[str], input: bytes | None = None):
    return CliRunner().invoke(app, ["render", *args], input=input, catch_exceptions=False)


def manifest_length(manifest: dict, pauses: Pauses) -> int:
    chunks = manifest["chunks"]
    lengths = [c["frames"] * 2048 * 2 if c["status"] == "ok" else int(0.5 * RATE) for c in chunks]
    return expected_length(lengths, [c["boundary"] for c in chunks], pauses, RATE)


@pytest.mark.parametrize("suffix", ["wav", "flac", "mp3"])
def test_render_to_each_format_has_the_exact_duration(book, base_args, tmp_path, suffix):
    out = tmp_path / f"book.{suffix}"
    manifest = tmp_path / "book.json"
    result = run_cli(
        [str(book), "-o", str(out), "--manifest", str(manifest), "--loudness", "off", *base_args]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(manifest.read_text())
    assert len(data["chunks"]) >= 5 and all(c["status"] == "ok" for c in data["chunks"])
    expected = manifest_length(data, Pauses())
    if suffix == "mp3":
        probe = subprocess.run(
            ["ffprobe", "-v", "error", "-show_entries", "format=duration", "-of", "csv=p=0", str(out)],
            capture_output=True,
            text=True,
            check=True,
        )
        # MP3 adds encoder delay and frame padding; the decoded length is within one 1152-sample frame + delay.
        assert abs(float(probe.stdout) - expected / RATE) < 0.06
    else:
        info = sf.info(str(out))
        assert info.samplerate == RATE and info.channels == 1
        assert info.frames == expected  # to the sample
    texts = " ".join(c["text"] for c in data["chunks"])
    for sentence in ("bright cold day in April", "striking thirteen", "boiled cabbage", "<sigh>"):
        assert sentence in texts


def test_stdin_to_stdout(base_args, tmp_path):
    done = subprocess.run(
        [*RENDER, "-", "-o", "-", "--loudness", "off", *base_args],
        input=b"Hello from a pipe. <laugh> It works.\n",
        capture_output=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout[:4] == b"RIFF" and done.stdout[8:12] == b"WAVE"
    (tmp_path / "piped.wav").write_bytes(done.stdout)
    audio, rate = sf.read(str(tmp_path / "piped.wav"))
    assert rate == RATE and len(audio) > RATE


def test_same_seed_same_audio_other_seed_other_audio(book, base_args, tmp_path):
    outs = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        out = tmp_path / f"{name}.wav"
        args = [str(book), "-o", str(out), "--seed", str(seed), "--loudness", "off", *base_args, "--no-cache"]
        assert run_cli(args).exit_code == 0
        outs.append(sf.read(str(out))[0])
    assert np.array_equal(outs[0], outs[1])
    assert not np.array_equal(outs[0], outs[2])


def test_second_run_does_no_engine_work_and_up_to_date_output_is_skipped(book, base_args, tmp_path):
    out = tmp_path / "book.wav"

    def rendered() -> subprocess.CompletedProcess:
        command = [*RENDER, str(book), "-o", str(out), *base_args, "--progress", "json"]
        return subprocess.run(command, capture_output=True, text=True, timeout=300)

    first = rendered()
    assert first.returncode == 0, first.stderr
    events = [json.loads(line) for line in first.stderr.splitlines() if line.startswith("{")]
    assert [e for e in events if e["event"] == "chunk" and not e["cached"]]
    out.unlink()  # the output is gone, so the book is rendered again, from the cache
    second = rendered()
    events = [json.loads(line) for line in second.stderr.splitlines() if line.startswith("{")]
    chunk_events = [e for e in events if e["event"] == "chunk"]
    assert chunk_events and all(e["cached"] for e in chunk_events)
    started = time.perf_counter()
    third = run_cli([str(book), "-o", str(out), *base_args, "--progress", "plain"])
    assert third.exit_code == 0 and "up to date" in third.output, third.output
    assert time.perf_counter() - started < 30


def test_editing_one_sentence_rerenders_only_its_chunk(book, base_args, tmp_path):
    out = tmp_path / "book.wav"
    assert run_cli([str(book), "-o", str(out), *base_args]).exit_code == 0
    book.write_text(BOOK.replace("boiled cabbage", "fresh bread"))
    done = subprocess.run(
        [*RENDER, str(book), "-o", str(out), *base_args, "--progress", "json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    chunk_events = [json.loads(x) for x in done.stderr.splitlines() if x.startswith('{"event": "chunk"')]
    fresh = [e for e in chunk_events if not e["cached"]]
    assert len(fresh) == 1 and len(chunk_events) >= 5


def test_failed_chunks_are_listed_and_exit_code_is_3(book, tiny_cli_args, tmp_path):
    manifest = tmp_path / "m.json"
    env = {
        **os.environ,
        "FASTMAYA_SCRIPTED_FAULTS": json.dumps({"1": ["loop", "loop", "loop"], "2": ["short"]}),
    }
    done = subprocess.run(
        [
            *RENDER,
            str(book),
            "-o",
            str(tmp_path / "o.wav"),
            "--engine",
            "scripted",
            *tiny_cli_args,
            "--no-cache",
            "--loudness",
            "off",
            "--manifest",
            str(manifest),
            "--progress",
            "plain",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 3, done.stderr
    chunks = json.loads(manifest.read_text())["chunks"]
    assert chunks[1]["status"] == "failed" and "repeating" in chunks[1]["reason"] and chunks[1]["text"]
    assert chunks[2]["status"] == "ok" and chunks[2]["attempts"] == 2  # retried once with a new seed
    assert "retrying" in done.stderr and "failed" in done.stderr
    assert (tmp_path / "o.wav").exists()


def _render_cmd(book, base_args, out, cache):
    args = [a if a != base_args[base_args.index("--cache-dir") + 1] else str(cache) for a in base_args]
    return [
        *RENDER,
        str(book),
        "-o",
        str(out),
        *args,
        "--max-batch",
        "1",
        "--progress",
        "json",
        "--loudness",
        "off",
    ]


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM", "SIGKILL"])
def test_interrupted_run_resumes_and_matches_an_uninterrupted_one(book, base_args, tmp_path, how):
    reference = tmp_path / "reference.wav"
    assert (
        subprocess.run(
            _render_cmd(book, base_args, reference, tmp_path / "c1"), capture_output=True, timeout=300
        ).returncode
        == 0
    )
    out = tmp_path / "resumed.wav"
    proc = subprocess.Popen(
        _render_cmd(book, base_args, out, tmp_path / "c2"), stderr=subprocess.PIPE, text=True
    )
    done_chunks = 0
    for line in proc.stderr:
        if line.startswith('{"event": "chunk"'):
            done_chunks += 1
            if done_chunks == 2:
                proc.send_signal(getattr(signal, how))
                break
    code = proc.wait(timeout=60)
    proc.stderr.close()
    assert code == {"SIGINT": 130, "SIGTERM": 143, "SIGKILL": -9}[how]
    assert not out.exists()  # no partial output
    rerun = subprocess.run(
        _render_cmd(book, base_args, out, tmp_path / "c2"), capture_output=True, text=True, timeout=300
    )
    assert rerun.returncode == 0, rerun.stderr
    chunk_events = [json.loads(x) for x in rerun.stderr.splitlines() if x.startswith('{"event": "chunk"')]
    assert sum(e["cached"] for e in chunk_events) >= 2
    assert sum(not e["cached"] for e in chunk_events) >= 1
    assert np.array_equal(sf.read(str(out))[0], sf.read(str(reference))[0])


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (["missing.txt"], 2, "missing.txt"),
        (["-"], 2, "-o"),
        (["BOOK", "--voice", "@nobody"], 2, "@narrator"),
        (["BOOK", "-o", "x.xyz"], 2, "xyz"),
        (["BOOK", "-o", "no/such/dir/x.wav"], 2, "no/such/dir"),
        (["BOOK", "--model", "not/a-real-model-dir"], 1, "hf download"),
        (["BOOK", "--max-batch", "0"], 2, "--max-batch"),
        (["BOOK", "--engine", "lmdeploy"], 2, "lmdeploy"),
    ],
)
def test_errors_are_one_line_with_a_fix_and_a_documented_code(book, base_args, tmp_path, args, code, words):
    if "lmdeploy" in args:
        pytest.importorskip("torch")
        import importlib.util

        if importlib.util.find_spec("lmdeploy"):
            pytest.skip("lmdeploy is installed here")
    args = [str(book) if a == "BOOK" else a for a in args]
    rest = list(base_args)
    for option in ("--model", "--max-batch", "--voice", "--engine"):
        if option in args:  # the case's own value must not be overridden by the base arguments
            i = rest.index(option)
            del rest[i : i + 2]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [*RENDER, *args, *rest],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == code, done.stderr
    assert "Traceback" not in done.stderr
    assert "error:" in done.stderr and words in done.stderr
    assert not list(tmp_path.glob("*.wav")) and not list(tmp_path.glob("*.m4b"))


def test_help_documents_exit_codes_and_voices_lists_presets():
    runner = CliRunner()
    help_text = runner.invoke(app, ["render", "--help"]).output
    assert "3 finished with failed chunks" in help_text and "--gpu-memory" in help_text
    listing = runner.invoke(app, ["voices"]).output
    assert "@narrator\t" in listing and "@storyteller\t" in listing


def test_a_run_removes_the_temporary_files_a_killed_run_left_behind(book, base_args, tmp_path):
    out = tmp_path / "book.flac"
    left = [
        tmp_path / f".book.flac.{n:08x}.fastmaya-tmp{suffix}"
        for n, suffix in ((1, ".flac"), (2, ".flac"), (3, ""))
    ]
    for path in left:
        path.write_bytes(b"\0" * 1000)
    kept = tmp_path / ".other.flac.00000004.fastmaya-tmp.flac"
    kept.write_bytes(b"\0")
    args = [a if a != "none" else "plain" for a in base_args]
    result = CliRunner().invoke(app, ["render", str(book), "-o", str(out), *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "removed 3 temporary files (0.00 GB) that an interrupted run of" in result.output
    assert not any(path.exists() for path in left)
    assert kept.exists() and out.exists()
