"""Decoding beside the engine: SNAC and the upsampler in the engine's worker process (`--decode-beside`;
experimental and off by default: a command-line render with it stalled on a GPU, BENCHMARKS.md run W1, and
finished in run X1; the cause is not known).

Decoding in the renderer's process (`--no-decode-beside`), the GPU driver time-slices two CUDA contexts, the
renderer's and the engine worker's: while a decode call holds the GPU, generation waits. Inside the worker's
own context, on a stream of lower priority than LMDeploy's, the GPU starts the engine's waiting thread blocks
first and gives the decoder what they leave (`scripts/probe_beside.py`; BENCHMARKS.md runs U1 and U2: 1.8x to
2.4x less generation lost per second of speech decoded; in renders, runs V1 and V2: 1.08x faster).

The renderer keeps its decode queue, batching and assembling; only the calls move. Each call's codes and
seeds go to the worker over a pipe of their own; the audio comes back through a file both processes map
(`SharedAudio`), not through the pipe. Pickled, or even written to the pipe as raw bytes, it would cost the
worker its interpreter lock, which LMDeploy's scheduler thread needs, once per socket buffer of audio (tens
of times a call, each a wait behind the scheduler); a copy into the mapping takes it once a chunk.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from . import maya1
from .errors import RuntimeFailure

# CUDA stream priorities: the lower the number, the sooner the GPU starts a stream's waiting blocks.
ENGINE_PRIORITY, DECODER_PRIORITY = -1, 0
# A decode call takes well under a second on a GPU (16 chunks of 18 s); a worker silent this long is stuck,
# and a render in a cron job must stop with a reason rather than wait forever.
REPLY_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class DecoderSpec:
    """What the worker needs to build the renderer's decoder (RenderOptions' fields of the same names)."""

    codec: str
    upsampler: str
    upsampler_weights: str | None
    decode_batch: int
    max_new_tokens: int
    warm: bool = True
    codec_half: bool = False


@dataclass(frozen=True)
class DecodedCall:
    clips: list[np.ndarray]
    frames_decoded: int  # SNAC frames asked for, and computed with the padding
    frames_computed: int


def make_new_streams_high_priority() -> Callable[..., Any]:
    """From now on, a torch.cuda.Stream made without a priority of its own gets ENGINE_PRIORITY (LMDeploy
    makes its streams so). Returns the original class, for streams that keep their own priority."""
    import torch

    original = torch.cuda.Stream
    if getattr(original, "fastmaya_high_priority", False):
        return original.__mro__[1]

    class HighPriorityStream(original):
        fastmaya_high_priority = True
        made = 0  # streams made through it (current_stream() and the like included)

        def __new__(cls, device=None, priority=0, **kwargs):  # noqa: ANN001, ANN204
            cls.made += 1
            return super().__new__(cls, device=device, priority=priority or ENGINE_PRIORITY, **kwargs)

    torch.cuda.Stream = HighPriorityStream
    return original


class DecodeStreams:
    """The worker decoder's CUDA streams: the low-priority stream it loads and warms on, and for calls that
    ask for N SMs (RenderOptions.decode_sms) a low-priority stream of a green context of N SMs (green.py),
    made on first use. Moving to another stream first hands the cached memory back to the driver: the
    caching allocator keeps a pool for each stream, and a second decoder's pool beside the engine's KV cache
    might not fit. Each move also tells cuBLAS how many SMs its kernels will have (`limit_blas`, 0 for all:
    green.limit_blas_to_sms); it must be called on the thread that decodes."""

    def __init__(
        self,
        plain: Any,
        make_green: Callable[[int], Any],
        release: Callable[[], None],
        limit_blas: Callable[[int], None],
    ) -> None:
        self._plain = plain
        self._make_green = make_green
        self._release = release
        self._limit_blas = limit_blas
        self._green: dict[int, Any] = {}
        self._current: int | None = None

    def stream(self, sms: int | None) -> Any:
        """The stream for a call on `sms` SMs (None: all of them)."""
        if sms != self._current:
            self._release()
            self._limit_blas(sms or 0)
            self._current = sms
        if sms is None:
            return self._plain
        if sms not in self._green:
            self._green[sms] = self._make_green(sms)
        return self._green[sms]


# Shared audio files grow in steps of this many bytes (a call of 16 chunks of 18 s is 55 MB).
SHARED_AUDIO_STEP = 64 << 20


class SharedAudio:
    """The worker's side of the audio's way back: a file in /dev/shm (else the temporary folder), mapped,
    that each call's clips are copied into, one after the other. The renderer maps it by its path and
    unlinks it; a larger call gets a new, larger file."""

    def __init__(self) -> None:
        self.path: str | None = None
        self._map: mmap.mmap | None = None

    def write(self, clips: Sequence[np.ndarray]) -> str:
        need = sum(clip.size for clip in clips) * 4
        if self._map is None or need > len(self._map):
            self._grow(need)
        assert self._map is not None and self.path is not None
        view = np.frombuffer(self._map, dtype=np.float32)
        offset = 0
        for clip in clips:
            view[offset : offset + clip.size] = clip  # numpy copies without the interpreter lock
            offset += clip.size
        del view  # a live view would keep the map from closing
        return self.path

    def _grow(self, need: int) -> None:
        size = -(-max(need, 1) // SHARED_AUDIO_STEP) * SHARED_AUDIO_STEP
        fd, path = tempfile.mkstemp(prefix="fastmaya-audio-", dir=_shared_folder(size))
        try:
            os.ftruncate(fd, size)
            mapped = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.close()
        self._map, self.path = mapped, path

    def close(self) -> None:
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)  # the renderer usually has already
        if self._map is not None:
            self._map.close()
        self._map, self.path = None, None


def _shared_folder(size: int) -> str | None:
    """/dev/shm where it has room (memory, never the disk), else the temporary folder (None)."""
    try:
        stat = os.statvfs("/dev/shm")
    except OSError:
        return None
    return "/dev/shm" if stat.f_bavail * stat.f_frsize > 2 * size else None


class DecoderService:
    """The worker's side: loads the decoder (before the engine sizes its KV cache from the free memory),
    warms it, then answers the renderer's calls on a thread of its own until the pipe closes."""

    def __init__(self, spec: DecoderSpec, device: str, conn: Connection) -> None:
        self.spec = spec
        self.device = device
        self.conn = conn
        self.startup: dict[str, float] = {}
        self.output_rate = 0
        self._loaded = threading.Event()
        self._load_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="fastmaya-decode-beside", daemon=True)
        self._thread.start()
        self._loaded.wait()
        if self._load_error is not None:
            raise self._load_error

    def _run(self) -> None:
        # One thread loads, warms and decodes: what CUDA libraries set up per thread is set up once, and
        # the caching allocator's blocks stay with the one stream they were warmed on.
        try:
            decode = self._load()
        except BaseException as exc:
            self._load_error = exc
            self._loaded.set()
            return
        self._loaded.set()
        audio = SharedAudio()
        try:
            with contextlib.suppress(EOFError, OSError):  # the renderer is gone
                self._serve(decode, audio)
        finally:
            audio.close()

    def _load(self) -> Callable[[list[maya1.Codes], list[int], int | None, bool], DecodedCall]:
        import torch

        from .codec import SnacDecoder
        from .render import decode_and_upsample, warm_up_batches
        from .upsample import load_upsampler

        original_stream = make_new_streams_high_priority()
        cuda = self.device.startswith("cuda")
        stream = original_stream(self.device, priority=DECODER_PRIORITY) if cuda else None
        spec = self.spec
        started = time.perf_counter()
        decoder = SnacDecoder(spec.codec, self.device, half=spec.codec_half)
        self.startup["codec"] = time.perf_counter() - started
        started = time.perf_counter()
        upsampler = load_upsampler(
            spec.upsampler, weights=spec.upsampler_weights, device=self.device, compile=cuda
        )
        self.startup["upsampler"] = time.perf_counter() - started
        self.output_rate = upsampler.output_rate

        streams = None
        if stream is not None:
            from .green import green_stream, limit_blas_to_sms

            index = torch.device(self.device).index or 0
            streams = DecodeStreams(
                stream,
                lambda sms: green_stream(sms, priority=DECODER_PRIORITY, device_index=index).stream,
                torch.cuda.empty_cache,
                lambda sms: limit_blas_to_sms(sms, index),
            )

        def decode(
            codes: list[maya1.Codes], seeds: list[int], sms: int | None = None, sleep: bool = False
        ) -> DecodedCall:
            decoded, computed = decoder.frames_decoded, decoder.frames_computed
            chosen = streams.stream(sms) if streams is not None else None  # a CPU has no SMs to keep apart
            with torch.cuda.stream(chosen) if chosen is not None else contextlib.nullcontext():
                clips, _ = decode_and_upsample(decoder, upsampler, codes, seeds=seeds, sleep=sleep)
            return DecodedCall(clips, decoder.frames_decoded - decoded, decoder.frames_computed - computed)

        if cuda and spec.warm:
            started = time.perf_counter()
            for codes in warm_up_batches(spec.decode_batch, spec.max_new_tokens):
                decode(codes, list(range(len(codes))))
            self.startup["decoder_warmup"] = time.perf_counter() - started
        return decode

    def _serve(
        self,
        decode: Callable[[list[maya1.Codes], list[int], int | None, bool], DecodedCall],
        audio: SharedAudio,
    ) -> None:
        while True:
            message = self.conn.recv()
            if message[0] == "info":
                self.conn.send(("info", self.output_rate, self.startup))
                continue
            cpu = time.thread_time()
            try:
                call = decode(message[1], message[2], message[3], message[4])
            except Exception as exc:  # the renderer stops the render with it; the worker lives on
                traceback.print_exc()
                self.conn.send(("error", f"{type(exc).__name__}: {exc}"))
                continue
            path = audio.write(call.clips)
            lengths = [len(clip) for clip in call.clips]
            cpu = time.thread_time() - cpu
            self.conn.send(("audio", path, lengths, call.frames_decoded, call.frames_computed, cpu))


class RemoteDecoder:
    """The renderer's side: decode calls answered by the engine's worker process."""

    def __init__(self, conn: Connection, worker: str, reply_timeout_s: float = REPLY_TIMEOUT_S) -> None:
        self._conn = conn
        self._worker = worker
        self._reply_timeout_s = reply_timeout_s
        self._lock = threading.Lock()
        self._info: tuple[int, dict[str, float]] | None = None
        self._audio_path: str | None = None
        self._audio: mmap.mmap | None = None
        self.frames_decoded = 0
        self.frames_computed = 0
        self.cpu_s = 0.0  # CPU seconds of the worker's decoding thread in the calls (see DecodeWorker)

    def _ask(self) -> tuple[int, dict[str, float]]:
        if self._info is None:
            with self._lock:
                self._request(("info",))
                _, rate, startup = self._reply("info")
            self._info = (rate, startup)
        return self._info

    @property
    def output_rate(self) -> int:
        return self._ask()[0]

    @property
    def startup(self) -> dict[str, float]:
        """Seconds the worker spent loading and warming the decoder, by step (inside the engine's start)."""
        return dict(self._ask()[1])

    def decode(
        self, codes: Sequence[maya1.Codes], seeds: Sequence[int], sms: int | None = None, sleep: bool = False
    ) -> list[np.ndarray]:
        """Each chunk's audio at the output rate, as decode_and_upsample returns it; with `sms`, decoded on
        that many of the GPU's SMs (DecodeStreams); with `sleep`, its waits for the GPU sleep (a candidate)."""
        with self._lock:
            self._request(("decode", list(codes), list(seeds), sms, sleep))
            _, path, lengths, decoded, computed, cpu_s = self._reply("audio")
            view = np.frombuffer(self._mapped(path), dtype=np.float32)
            ends = np.cumsum([0, *lengths])
            clips = [view[start:end].copy() for start, end in zip(ends[:-1], ends[1:], strict=True)]
            del view
        self.frames_decoded += decoded
        self.frames_computed += computed
        self.cpu_s += cpu_s
        return clips

    def _request(self, message: tuple[Any, ...]) -> None:
        try:
            self._conn.send(message)
        except OSError:
            raise self._gone() from None

    def _reply(self, kind: str) -> tuple[Any, ...]:
        try:
            if not self._conn.poll(self._reply_timeout_s):
                raise RuntimeFailure(
                    f"The engine's worker on {self._worker} has not answered a decode call in "
                    f"{self._reply_timeout_s:g} s.",
                    "Render again with --no-decode-beside; what was rendered is kept and the render resumes.",
                )
            message = self._conn.recv()
        except (EOFError, OSError):
            raise self._gone() from None
        if message[0] == "error":
            raise RuntimeFailure(
                f"Decoding beside the engine on {self._worker} failed: {message[1]}.",
                "Render again without --decode-beside; what was rendered is kept and the render resumes.",
            )
        if message[0] != kind:
            raise RuntimeFailure(
                f"The engine's worker on {self._worker} answered a decode call with {message[0]!r}.",
                "Render again without --decode-beside, and report this.",
            )
        return message

    def _mapped(self, path: str) -> mmap.mmap:
        if path != self._audio_path:
            try:
                with open(path, "rb") as file:
                    mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
            except OSError as exc:
                raise RuntimeFailure(
                    f"Could not map the audio that the engine's worker on {self._worker} decoded ({exc}).",
                    "Render again without --decode-beside.",
                ) from None
            with contextlib.suppress(OSError):
                os.unlink(path)  # mapped by both: the memory lives until both let go
            if self._audio is not None:
                self._audio.close()
            self._audio, self._audio_path = mapped, path
        assert self._audio is not None
        return self._audio

    def _gone(self) -> RuntimeFailure:
        return RuntimeFailure(
            f"The engine's worker on {self._worker}, which decodes beside it, stopped in the middle of a call.",
            "Render again: what was rendered is kept and the render resumes (its own output says why it stopped).",
        )

    def close(self) -> None:
        self._conn.close()
        if self._audio is not None:
            self._audio.close()
            self._audio = None
