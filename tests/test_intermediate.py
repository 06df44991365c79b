"""The intermediate file: 24-bit FLAC segments encoded on several lanes at once, read back as one stream."""

from __future__ import annotations

import errno
import itertools
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from fastmaya_cli import intermediate
from fastmaya_cli.assemble import Assembler, OutputSpec
from fastmaya_cli.errors import RuntimeFailure
from fastmaya_cli.intermediate import SegmentedFlac, intermediate_encoders
from fastmaya_cli.outputs import to_pcm
from test_assemble import PAUSES, SR, seg, visible, wav_spec


def _flac(tmp_path: Path, encoders: int, segment_seconds: float = 0.01) -> tuple[SegmentedFlac, list[Path]]:
    counter = itertools.count()
    made: list[Path] = []

    def reserve() -> Path:
        path = tmp_path / f".part{next(counter)}.flac"
        made.append(path)
        return path

    def failure(error: Exception) -> Exception:
        return RuntimeFailure(f"disk full while writing book.wav ({error})", "Free some space.")

    flac = SegmentedFlac(reserve, SR, encoders=encoders, failure=failure, segment_seconds=segment_seconds)
    return flac, made


def _samples(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-0.9, 0.9, count).astype(np.float32)


@pytest.mark.parametrize("encoders", [1, 3])
def test_what_is_read_back_is_what_was_written_to_the_last_bit_across_segments(tmp_path, encoders):
    flac, made = _flac(tmp_path, encoders)  # 80 samples a segment at 8 kHz
    samples = _samples(1234)
    pcm = to_pcm(samples, 24)
    for start, stop in [(0, 7), (7, 300), (300, 301), (301, 1234)]:  # blocks across and within segments
        flac.write(pcm[start:stop])
    flac.close()
    assert len(made) == 16 and flac.paths == made  # ceil(1234 / 80), in book order
    exact = pcm.astype(np.float64) / 2**31  # 24-bit codes, read back as floats
    for start, stop in [(0, 1234), (79, 81), (160, 1200), (1233, 1234), (5, 5)]:
        got = np.concatenate([np.zeros(0, np.float32), *flac.read(start, stop, block=50)])
        np.testing.assert_array_equal(got, exact[start:stop])
    assert all(sf.info(str(path)).subtype == "PCM_24" for path in made)


def test_reading_past_what_was_written_is_an_error(tmp_path):
    flac, _ = _flac(tmp_path, 2)
    flac.write(to_pcm(_samples(100), 24))
    flac.close()
    with pytest.raises(RuntimeError, match="ended early"):
        list(flac.read(0, 200, block=64))


def test_segments_are_encoded_on_several_lanes_at_once(tmp_path, monkeypatch):
    real_write = sf.SoundFile.write
    spans: list[tuple[str, float, float]] = []

    def slow_write(self: sf.SoundFile, data: np.ndarray) -> None:
        began = time.perf_counter()
        time.sleep(0.05)
        real_write(self, data)
        spans.append((threading.current_thread().name, began, time.perf_counter()))

    monkeypatch.setattr(sf.SoundFile, "write", slow_write)
    flac, _ = _flac(tmp_path, 3)
    for block in range(12):  # one segment each
        flac.write(to_pcm(_samples(80, seed=block), 24))
    flac.close()
    threads = {name for name, _, _ in spans}
    assert len(threads) == 3 and all(name.startswith("fastmaya-flac") for name in threads)
    overlapping = [
        (a, b) for a, b in itertools.combinations(spans, 2) if a[0] != b[0] and a[1] < b[2] and b[1] < a[2]
    ]
    assert overlapping, "no two encoders ever worked at the same time"
    assert flac.busy_s >= 12 * 0.05


def test_a_write_error_in_an_encoder_reaches_the_writer_as_the_callers_failure(tmp_path, monkeypatch):
    calls = itertools.count()
    real_write = sf.SoundFile.write

    def failing(self: sf.SoundFile, data: np.ndarray) -> None:
        if next(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(self, data)

    monkeypatch.setattr(sf.SoundFile, "write", failing)
    flac, _ = _flac(tmp_path, 2)
    with pytest.raises(RuntimeFailure, match="disk full while writing book.wav"):
        for block in range(40):
            flac.write(to_pcm(_samples(80, seed=block), 24))
        flac.close()
    flac.abort()


def test_one_encoder_per_four_cpus_from_one_to_four():
    assert [intermediate_encoders(cpus) for cpus in (1, 2, 4, 8, 12, 16, 64)] == [1, 1, 1, 2, 3, 4, 4]


def test_a_book_assembled_from_many_segments_on_several_encoders_is_the_same_file(tmp_path, monkeypatch):
    book = [seg(i, _samples(SR // 3 + 37 * i, seed=i) * 0.5) for i in range(12)]
    one = tmp_path / "one.wav"
    with Assembler(wav_spec(one), PAUSES, encode_workers=2) as assembler:
        for segment in book:
            assembler.add(segment)
        assembler.finish()
    monkeypatch.setattr(intermediate, "SEGMENT_SECONDS", 0.25)  # about 20 segments
    many = tmp_path / "many.wav"
    with Assembler(wav_spec(many), PAUSES, encode_workers=12) as assembler:
        for segment in book:
            assembler.add(segment)
        assembler.finish()
        written = assembler._intermediate
    assert written is not None and written.encoders == 3
    assert len(written.paths) > 15
    assert one.read_bytes() == many.read_bytes()
    assert visible(tmp_path) == ["many.wav", "one.wav"]  # no segment left behind


def test_a_cancelled_book_leaves_no_segment_behind(tmp_path, monkeypatch):
    monkeypatch.setattr(intermediate, "SEGMENT_SECONDS", 0.25)
    spec = OutputSpec(tmp_path / "book.wav", "wav", sample_rate=SR, loudness="off", bit_depth=24)
    with pytest.raises(KeyboardInterrupt), Assembler(spec, PAUSES, encode_workers=8) as assembler:
        for i in range(8):
            assembler.add(seg(i, _samples(SR // 2, seed=i) * 0.5))
        raise KeyboardInterrupt
    assert visible(tmp_path) == []


def test_an_encoder_holds_the_writer_back_once_its_lane_is_full(tmp_path, monkeypatch):
    monkeypatch.setattr(intermediate, "ENCODER_DEPTH", 2)
    release = threading.Event()
    real_write = sf.SoundFile.write

    def held_write(self: sf.SoundFile, data: np.ndarray) -> None:
        release.wait(30)
        real_write(self, data)

    monkeypatch.setattr(sf.SoundFile, "write", held_write)
    flac, _ = _flac(tmp_path, 1, segment_seconds=10.0)
    handed = []

    def writer() -> None:
        for block in range(6):
            flac.write(to_pcm(_samples(80, seed=block), 24))
            handed.append(block)

    thread = threading.Thread(target=writer)
    thread.start()
    time.sleep(0.3)
    assert len(handed) == 2  # one being written, one waiting (the depth counts both); the third waits
    release.set()
    thread.join(30)
    flac.close()
    assert len(handed) == 6
    assert len(np.concatenate(list(flac.read(0, 480, block=1000)))) == 480


def test_a_short_write_is_the_callers_failure_too(tmp_path, monkeypatch):
    def short(self: sf.SoundFile, data: np.ndarray) -> None:
        raise AssertionError  # what soundfile raises when fewer frames were written than given

    monkeypatch.setattr(sf.SoundFile, "write", short)
    flac, _ = _flac(tmp_path, 2)
    with pytest.raises(RuntimeFailure, match="disk full while writing book.wav"):
        flac.write(to_pcm(_samples(100), 24))
        flac.close()


def test_discard_removes_only_the_segments_no_kept_range_reads(tmp_path):
    flac, made = _flac(tmp_path, 2)  # 80 samples a segment
    pcm = to_pcm(_samples(800), 24)
    flac.write(pcm)
    flac.close()
    removed = flac.discard([(150, 170), (-20, 5), (400, 481)])  # keeps 1 and 2, 0 (from before 0), 5 and 6
    assert removed == [made[i] for i in (3, 4, 7, 8, 9)]
    assert [path.exists() for path in made] == [i not in (3, 4, 7, 8, 9) for i in range(10)]
    exact = pcm.astype(np.float64) / 2**31
    for start, stop in [(0, 5), (150, 170), (80, 240), (400, 560)]:
        np.testing.assert_array_equal(
            np.concatenate(list(flac.read(start, stop, block=50))), exact[start:stop]
        )
    with pytest.raises(RuntimeError, match="segment 3 of the intermediate file was discarded"):
        list(flac.read(230, 250, block=50))
    assert flac.discard([]) == [made[i] for i in (0, 1, 2, 5, 6)]  # the rest, each once
