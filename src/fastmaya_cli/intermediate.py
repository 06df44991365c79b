"""The book's intermediate audio: 24-bit FLAC in pieces, encoded on several threads, read back as one.

With loudness on (or for m4b, m4a, mp3, ogg, opus), the assembler keeps the whole book in an intermediate
file that the finish reads back at the book's gain. libFLAC encodes one stream on one core, about 1,100
audio s/s on the development machine, the slowest of the assembler's lanes: at the end of a render the
last burst of chunks (more than 1,000 s of speech arrive in the last second of generation) waited for it.
So the book is cut into pieces of ``PIECE_SECONDS``, each a FLAC file of its own, and the pieces are
encoded by a pool of threads (libsndfile's calls run without Python's interpreter lock). The pieces live
in one hidden folder beside the output, removed as a whole.
"""

from __future__ import annotations

import shutil
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import soundfile as sf

PIECE_SECONDS = 60.0  # of the book per FLAC piece: 11.5 MB of int32 at 48 kHz while it waits
READ_BLOCK = 1 << 18  # samples per read


class IntermediateFlac:
    """Takes the book as 24-bit PCM (int32, the code in the top three bytes, as libsndfile reads it) in
    order, encodes it in pieces on ``workers`` threads, and reads any range of it back once closed.

    At most ``2 * workers`` pieces wait for an encoder: a full pool holds ``write`` back, so memory
    stays bounded. A failed piece raises from the next ``write`` or from ``close``. With ``workers=0``
    each piece is encoded by the ``write`` that completes it, as one FLAC file was before the pool (the
    bench's baseline).
    """

    def __init__(self, folder: Path, sample_rate: int, workers: int) -> None:
        self.folder = folder
        self.sample_rate = sample_rate
        self.piece_samples = round(PIECE_SECONDS * sample_rate)
        self._workers = max(0, workers)
        self._pool = ThreadPoolExecutor(max_workers=max(1, self._workers), thread_name_prefix="fastmaya-flac")
        self._encoding: deque[Future[None]] = deque()
        self._buffer: list[np.ndarray] = []
        self._buffered = 0
        self._pieces = 0
        self.samples = 0  # written so far
        self._closed = False

    def write(self, pcm: np.ndarray) -> None:
        """The next samples of the book; the caller must not change them afterwards."""
        if self._closed:
            raise RuntimeError("the intermediate file is closed")
        self.samples += len(pcm)
        while len(pcm):
            room = self.piece_samples - self._buffered
            self._buffer.append(pcm[:room])
            self._buffered += min(room, len(pcm))
            pcm = pcm[room:]
            if self._buffered == self.piece_samples:
                self._encode_piece()

    def close(self) -> None:
        """Encode what is left and wait for every piece; raises the first failure."""
        if self._closed:
            return
        if self._buffered:
            self._encode_piece()
        self._closed = True
        try:
            while self._encoding:
                self._encoding.popleft().result()
        finally:
            self._pool.shutdown(wait=True)

    def blocks(self, start: int, stop: int) -> Iterator[np.ndarray]:
        """Samples ``[start, stop)`` as float32 (full scale 1.0), a block at a time; only once closed."""
        if not self._closed:
            raise RuntimeError("the intermediate file is still being written")
        if stop > self.samples:
            raise RuntimeError("intermediate file ended early")
        position = start
        while position < stop:
            piece, offset = divmod(position, self.piece_samples)
            with sf.SoundFile(str(self._piece_path(piece))) as source:
                source.seek(offset)
                end = min(stop, (piece + 1) * self.piece_samples)
                while position < end:
                    block = source.read(min(READ_BLOCK, end - position), dtype="float32")
                    if len(block) == 0:
                        raise RuntimeError("intermediate file ended early")
                    yield block
                    position += len(block)

    def remove(self) -> None:
        """Stop encoding (pieces not started are dropped) and delete the pieces; for cleanup."""
        self._closed = True
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._encoding.clear()
        self._buffer = []
        shutil.rmtree(self.folder, ignore_errors=True)

    def _encode_piece(self) -> None:
        while self._encoding and (self._encoding[0].done() or len(self._encoding) >= 2 * self._workers):
            self._encoding.popleft().result()  # raises a piece's failure
        samples = np.concatenate(self._buffer) if len(self._buffer) > 1 else self._buffer[0]
        path = self._piece_path(self._pieces)
        if self._workers:
            self._encoding.append(self._pool.submit(self._encode, path, samples))
        else:
            self._encode(path, samples)
        self._pieces += 1
        self._buffer = []
        self._buffered = 0

    def _encode(self, path: Path, samples: np.ndarray) -> None:
        with sf.SoundFile(
            str(path), "w", samplerate=self.sample_rate, channels=1, format="FLAC", subtype="PCM_24"
        ) as piece:
            piece.write(samples)

    def _piece_path(self, index: int) -> Path:
        return self.folder / f"{index:06d}.flac"
