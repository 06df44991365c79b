"""The intermediate file in FLAC pieces: exact round trips, pieces encoded at once, failures and cleanup."""

from __future__ import annotations

import errno
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from fastmaya_cli import intermediate
from fastmaya_cli.intermediate import IntermediateFlac

SR = 8000


def pcm24(values: np.ndarray) -> np.ndarray:
    """24-bit codes in the top three bytes of int32, as the assembler hands them over."""
    return values.astype(np.int32) << 8


@pytest.fixture
def small_pieces(monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(intermediate, "PIECE_SECONDS", 0.1)
    return 800


def test_any_range_reads_back_exactly_across_pieces(tmp_path: Path, small_pieces: int) -> None:
    rng = np.random.default_rng(0)
    codes = rng.integers(-(1 << 23), 1 << 23, 10_000)
    (tmp_path / "pieces").mkdir()
    book = IntermediateFlac(tmp_path / "pieces", SR, workers=2)
    position = 0
    while position < len(codes):  # writes of any size, across piece boundaries
        size = int(rng.integers(1, 3 * small_pieces))
        book.write(pcm24(codes[position : position + size]))
        position += size
    book.close()
    assert len(list((tmp_path / "pieces").glob("*.flac"))) == -(-len(codes) // small_pieces)
    expected = (codes / float(1 << 23)).astype(np.float32)
    for start, stop in [(0, len(codes)), (799, 801), (800, 1600), (1234, 9876), (9999, 10_000), (5, 5)]:
        blocks = list(book.blocks(start, stop))
        got = np.concatenate(blocks) if blocks else np.zeros(0, np.float32)
        np.testing.assert_array_equal(got, expected[start:stop])
    with pytest.raises(RuntimeError, match="ended early"):
        list(book.blocks(0, len(codes) + 1))
    book.remove()
    assert not (tmp_path / "pieces").exists()


def test_reading_before_close_is_refused(tmp_path: Path) -> None:
    book = IntermediateFlac(tmp_path, SR, workers=1)
    book.write(pcm24(np.zeros(10)))
    with pytest.raises(RuntimeError, match="still being written"):
        list(book.blocks(0, 10))
    book.remove()


def test_pieces_are_encoded_at_once_and_the_writer_waits_when_they_pile_up(
    tmp_path: Path, small_pieces: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    running = 0
    most = 0
    lock = threading.Lock()
    go = threading.Event()

    def slow_encode(self: IntermediateFlac, path: Path, samples: np.ndarray) -> None:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        go.wait(10)
        with lock:
            running -= 1

    monkeypatch.setattr(IntermediateFlac, "_encode", slow_encode)
    book = IntermediateFlac(tmp_path, SR, workers=3)
    written: list[int] = []

    def write() -> None:
        for _ in range(20):
            book.write(pcm24(np.zeros(small_pieces)))
            written.append(1)
        book.close()

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    deadline = time.monotonic() + 10
    while most < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)
    assert most == 3  # three pieces at once
    # 3 being encoded and 3 more waiting; the writer is held back at the seventh.
    assert writer.is_alive() and len(written) == 6
    go.set()
    writer.join(10)
    assert not writer.is_alive() and len(written) == 20


def test_a_failed_piece_raises_and_remove_cleans_up(
    tmp_path: Path, small_pieces: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full_disk(self: IntermediateFlac, path: Path, samples: np.ndarray) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    folder = tmp_path / "pieces"
    folder.mkdir()
    monkeypatch.setattr(IntermediateFlac, "_encode", full_disk)
    book = IntermediateFlac(folder, SR, workers=1)
    book.write(pcm24(np.zeros(small_pieces + 5)))  # one full piece goes to the encoder
    with pytest.raises(OSError, match="No space"):
        book.close()
    book.remove()
    assert not folder.exists()


@pytest.mark.parametrize("workers", [0, 2])
def test_pieces_are_encoded_on_the_pool_or_with_none_by_the_writer(
    tmp_path: Path, small_pieces: int, monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    """workers=0 is the bench's baseline: each piece encoded by the write that completes it."""
    threads: list[str] = []
    real = IntermediateFlac._encode

    def spy(self: IntermediateFlac, path: Path, samples: np.ndarray) -> None:
        threads.append(threading.current_thread().name)
        real(self, path, samples)

    monkeypatch.setattr(IntermediateFlac, "_encode", spy)
    book = IntermediateFlac(tmp_path, SR, workers=workers)
    book.write(pcm24(np.arange(3 * small_pieces)))
    if workers == 0:
        assert len(list(tmp_path.glob("*.flac"))) == 3  # already on disk, before close
    book.close()
    assert len(threads) == 3
    on_pool = [name.startswith("fastmaya-flac") for name in threads]
    assert all(on_pool) if workers else not any(on_pool)
    np.testing.assert_array_equal(
        np.concatenate(list(book.blocks(0, 3 * small_pieces))), np.arange(3 * small_pieces) / float(1 << 23)
    )
