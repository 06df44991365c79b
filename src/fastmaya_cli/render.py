"""The orchestrator: text -> requests -> engine -> codes -> SNAC -> upsampler -> assembler.

The engine runs in the calling thread and yields chunks as they complete. A decode worker takes
completed chunks as they come, lowest index first, and turns them into audio on the GPU in batches
while generation goes on; the assembler puts the audio in book order. A chunk's audio depends only
on its codes and seed, not on which chunks shared its batch (see codec.SnacDecoder), so a resumed
run writes the same audio as an uninterrupted one, up to floating-point rounding.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import functools
import json
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import maya1, transfers
from .assemble import (
    Assembler,
    BookInfo,
    OutputSpec,
    Pauses,
    Segment,
    check_output,
    expected_length,
    output_lock,
    remove_stale_temps,
)
from .beside import DecoderSpec, RemoteDecoder
from .cache import CachedChunk, ChunkCache, atomic_write, fingerprint, model_fingerprint
from .codec import (
    DEFAULT_CODEC,
    RIGHT_CONTEXT_FRAMES,
    SnacDecoder,
    bucketed_rows,
    plan_calls,
    random_codes,
)
from .early_parts import EarlyPart
from .engines import Engine, Generation, Request, Sampling
from .engines.factory import parse_gpus
from .engines.feed import RequestFeed
from .errors import RuntimeFailure
from .loudness import LoudnessReport
from .progress import Progress
from .split_encode import available_cpus
from .text import Book, Chunk, expected_seconds, iter_chunks, read_book, sentence_splitter, spoken_text
from .upsample import output_rate_of, resolved_kind

if TYPE_CHECKING:
    import torch

DEFAULT_MODEL = "maya-research/maya1"
FAILED_SILENCE_S = 0.5


@dataclass(frozen=True)
class EngineOptions:
    kind: str = "auto"  # auto | lmdeploy | hf | scripted
    model: str = DEFAULT_MODEL
    device: str = "auto"
    dtype: str = "auto"
    max_batch: int | None = None
    gpu_memory: float = 0.85
    kv_cache: str = "bf16"
    tp: int = 1
    gpus: str | None = None
    backend: str = "pytorch"
    sampling: Sampling = Sampling()
    scripted_faults: dict[int, list[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class RenderOptions:
    voice: str
    seed: int = 0
    engine: EngineOptions = EngineOptions()
    codec: str = DEFAULT_CODEC
    upsampler: str = "auto"
    upsampler_weights: str | None = None
    retries: int = 2
    fixed_length: bool = False
    max_new_tokens: int = 2048
    max_chunk_seconds: float = 18.0
    words_per_second: float = 2.5
    decode_batch: int = 16  # the most chunks per decode call: small keeps the last chunks waiting little
    # How long the decoder may wait for a call of decode_batch chunks while the engine generates (DecodeQueue);
    # 0: it takes what has finished (4.2 chunks a call in the novel's render, BENCHMARKS.md run R2). Off
    # because 2 s for 32 chunks made the render no faster (run T1: 17 chunks a call, 41% less time in calls).
    decode_gather_s: float = 0.0
    early_encoders: int | None = None  # encoders of the output's early parts; None: assemble.early_encoders
    decode_as_before: bool = False  # SNAC calls in book order, pageable copies: the bench's baseline
    join_with_ffmpeg: bool = False  # m4b/m4a parts joined by ffmpeg's remux, not mp4: the bench's baseline
    join_after_render: bool = False  # m4b/m4a early parts joined after the last chunk: the bench baseline
    warm_decoder: bool = True  # decode the largest batches once at load (see Renderer.warm_decoder)
    # SNAC in float16 (codec.SnacDecoder's `half`): a candidate the bench measures (--codec-half, novel-half),
    # not yet a render option: it was checked against float32 with random weights only.
    codec_half: bool = False
    # Decode and upsample in the engine's worker process, on a CUDA stream of lower priority than the
    # engine's (see beside.py): the bench's renders ran 1.08x faster on an H100 (BENCHMARKS.md runs V1, V2),
    # but a command-line render with it stalled on a GPU (run W1), so it is off until that is understood.
    # Where the engine has no worker process (hf, or a tensor-parallel LMDeploy), in this process anyway.
    decode_beside: bool = False
    # A candidate the bench measures (novel-beside-smsN), not yet a render option: decoding beside the
    # engine, keep the decoder's kernels on this many of the GPU's SMs (a CUDA green context, green.py), so
    # that the engine's kernels always find the others free; on all of them once the engine is done. None:
    # on all of them. Only beside the engine. Its first render failed in cuBLAS (BENCHMARKS.md run Z6); since
    # the decoder tells cuBLAS how many SMs it has (green.limit_blas_to_sms), whole-novel renders on 32 SMs
    # finish, at 0.811 to 0.867 of LLM only (run AA1; 0.9 is the target).
    decode_sms: int | None = None
    # A candidate the bench measures (novel-beside-sms32-sleep-drain): keep the decoder on decode_sms SMs only
    # while the engine has a full batch of chunks left to generate, and on all of them while its batch drains.
    # On 32 SMs the decoder fell behind, with 5,925 to 9,041 s of speech left to decode when generation ended
    # (run AA1), when a draining batch leaves the GPU room. Not yet run on a GPU.
    decode_sms_until_drain: bool = False
    # A bench probe, never a render option: each chunk's audio is a stand-in of its length made on the CPU
    # (stand_in_audio), not decoded, so a render shows what everything but the decoder's GPU work costs
    # generation. The assembler, loudness and encoders get audio as long as SNAC's would be.
    decode_stand_in: bool = False
    # A candidate the bench measures (novel-sleep, novel-beside-sleep), not yet a render option: the decoder's
    # copies to the GPU do not wait, and its waits for the GPU sleep instead of spinning a CPU core
    # (transfers.sleeping). Beside the engine on 32 SMs it cut the decoder thread's CPU time from 157.7 to 45.3 s
    # for the novel (BENCHMARKS.md run AA1); in this process not yet run on a GPU.
    decode_sleeps: bool = False
    preview: int | None = None
    normalize: bool = True
    encoding: str = "utf-8"
    cache_dir: Path | None = None
    force: bool = False
    pauses: Pauses = Pauses()
    max_chunks: int | None = None  # render only the first N chunks (benchmarks)


@dataclass
class ChunkState:
    """What the renderer knows about one chunk while the book renders."""

    chunk: Chunk
    key: str
    attempts: int = 0
    seed: int = 0
    codes: maya1.Codes | None = None
    status: str = "pending"  # pending | ok | failed
    reason: str = ""


@dataclass(frozen=True)
class RenderResult:
    output: Path | None
    chunks: int
    failed: int
    cached: int
    audio_s: float
    wall_s: float
    skipped: bool = False
    generate_s: float = 0.0  # first request to last result from the engine
    startup_s: float = 0.0
    plan_s: float = 0.0  # reading, cleaning and chunking the text
    decode_tail_s: float = 0.0  # decoding and assembling what was left once the engine finished
    tail_decoding_s: float = 0.0  # the part of decode_tail_s until the decoder's last batch was done
    finish_s: float = 0.0  # loudness gain and the final encode, after the last chunk
    encoded_early_s: float = 0.0  # audio whose encode made while rendering was kept (see early_parts)
    finish_steps: dict[str, float] = field(default_factory=dict)  # AssemblyResult.finish_steps
    lane_busy_s: dict[str, float] = field(default_factory=dict)  # AssemblyResult.lane_busy_s
    early_parts: dict[str, int] = field(default_factory=dict)  # AssemblyResult.early_parts
    snac_padding: float = 0.0  # frames SNAC computed over the frames it decoded (1: no padding)
    # CPU seconds of the thread that ran SNAC and the upsampler, in its calls (beside the engine: the worker's),
    # its waits for the GPU included: they spin, unless RenderOptions.decode_sleeps.
    decoder_cpu_s: float = 0.0
    loudness: LoudnessReport | None = None  # AssemblyResult.loudness
    early: tuple[EarlyPart, ...] = ()  # AssemblyResult.early
    # Speech (s) not yet in the assembler when the engine finished: what decode_tail_s still had to do.
    behind_at_generation_end_s: float = 0.0
    trace: RenderTrace | None = None  # when chunks came back and the decoder ran (for the bench)


@dataclass(frozen=True)
class RenderTrace:
    """When, in seconds from the first request, each chunk came back from the engine (in the order they
    came) and each decode call ran: (start, end, chunks, audio seconds). It shows where in a render the
    decoder fell behind the engine, and how fast the engine went meanwhile."""

    resolved_s: tuple[float, ...]
    decode_calls: tuple[tuple[float, float, int, float], ...]

    def decoding_s(self, until: float) -> float:
        """Seconds the decoder spent in its calls before `until`."""
        return sum(max(0.0, min(end, until) - start) for start, end, _, _ in self.decode_calls)


def warm_up_batches(decode_batch: int, max_new_tokens: int) -> list[list[maya1.Codes]]:
    """Random codes for the decoder's largest batches: `decode_batch` chunks that fill SNAC's fullest call,
    and `decode_batch` of the longest chunks `max_new_tokens` allows (the upsampler's largest input)."""
    most = max(1, decode_batch)
    rng = np.random.default_rng(0)
    fullest_call = DECODE_FRAMES_PER_CALL // bucketed_rows(most) - RIGHT_CONTEXT_FRAMES
    longest = max_new_tokens // maya1.TOKENS_PER_FRAME
    return [[random_codes(frames, rng) for _ in range(most)] for frames in (fullest_call, longest)]


def pack_seconds(book_seconds: float, parallel: int, max_seconds: float) -> float:
    """How much speech to pack into one chunk.

    A long book fills the engine whatever the chunk size, and longer chunks keep more prosody; a short
    text packed that tightly would leave most of the batch idle, so it is cut finer, down to one
    sentence a chunk.
    """
    return min(max_seconds, book_seconds / max(1, parallel))


def select_preview(chunks: Sequence[Chunk], sentences: int | None) -> list[Chunk]:
    """The chunks that hold the book's first `sentences` sentences (headings before them included)."""
    if sentences is None:
        return list(chunks)
    return list(_until_sentence(chunks, sentences))


def _until_sentence(chunks: Sequence[Chunk], sentences: int) -> Iterator[Chunk]:
    for chunk in chunks:
        if chunk.sentences and min(chunk.sentences) >= sentences:
            return
        yield chunk


class Renderer:
    """Holds the models for a process: they load once, on the first book that needs them."""

    def __init__(
        self,
        options: RenderOptions,
        progress: Progress,
        *,
        engine: Engine | None = None,
        decoder_in_worker: bool = False,
    ) -> None:
        """`decoder_in_worker`: the engine's worker loads a decoder even where this renderer decodes
        itself, for renderers that share the engine and decode beside it (the bench's A/B)."""
        self.options = options
        self._decoder_in_worker = decoder_in_worker
        self.progress = progress
        self.voice = maya1.clean_voice(options.voice)
        self._engine = engine
        self._encode: Callable[[str], list[int]] | None = None
        self._decoder: SnacDecoder | None = None
        self._upsampler = None
        self._decode_thread: ThreadPoolExecutor | None = None
        self._decode_stream: torch.cuda.Stream | None = None
        self._decoder_warm = False
        self.startup: dict[str, float] = {}
        self.cache = ChunkCache(options.cache_dir)
        self._model_id = model_fingerprint(options.engine.model)

    # models ---------------------------------------------------------------------------------
    @property
    def encode(self) -> Callable[[str], list[int]]:
        if self._encode is None:
            self._encode = self._timed("tokenizer", lambda: maya1.load_encoder(self.options.engine.model))
        return self._encode

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            from .engines.factory import create_engine

            in_worker = self._decoder_in_worker or self.decodes_beside()
            decoder = self._beside_spec() if in_worker else None
            self._engine = self._timed(
                "engine", lambda: create_engine(self.options.engine, self.progress.note, decoder=decoder)
            )
            remote = getattr(self._engine, "beside_decoder", None)
            if remote is not None:
                # The engine's start included loading and warming the decoder in its worker.
                prefix = "" if self.options.decode_beside else "worker_"
                self.startup.update({prefix + step: s for step, s in remote.startup.items()})
                self.startup["engine"] -= sum(remote.startup.values())
            elif decoder is not None:
                self.progress.note("the engine could not decode beside it; decoding in this process")
        return self._engine

    def _beside_spec(self) -> DecoderSpec:
        o = self.options
        return DecoderSpec(
            o.codec,
            o.upsampler,
            o.upsampler_weights,
            o.decode_batch,
            o.max_new_tokens,
            o.warm_decoder,
            o.codec_half,
        )

    def decodes_beside(self) -> bool:
        """Whether the engine's worker process decodes (RenderOptions.decode_beside, where the engine has
        a worker: LMDeploy on one GPU, or any engine on several)."""
        if not self.options.decode_beside:
            return False
        if self._engine is not None:
            return self.beside_decoder() is not None
        from .engines.factory import resolve_kind, worker_devices

        engine = self.options.engine
        return worker_devices(resolve_kind(engine.kind), parse_gpus(engine.gpus), engine.tp) is not None

    def beside_decoder(self) -> RemoteDecoder | None:
        """The decoder in the engine's worker, once the engine is built, if it has one and the options ask for it."""
        if not self.options.decode_beside or self._engine is None:
            return None
        return getattr(self._engine, "beside_decoder", None)

    def output_rate(self) -> int:
        if self.decodes_beside():
            return output_rate_of(self.options.upsampler)
        return self.upsampler.output_rate

    @property
    def decode_thread(self) -> ThreadPoolExecutor:
        """The one thread that runs SNAC and the upsampler, for every book: what CUDA libraries set
        up per thread is set up once, when the models load, and not again in each book's first batch."""
        if self._decode_thread is None:
            self._decode_thread = ThreadPoolExecutor(1, thread_name_prefix="fastmaya-decode")
        return self._decode_thread

    def _on_decode_thread(self, load: Callable[[], object]) -> Callable[[], object]:
        def run() -> object:
            if threading.current_thread().name.startswith("fastmaya-decode"):
                return load()  # already there: waiting on itself would never return
            return self.decode_thread.submit(load).result()

        return run

    @property
    def decoder(self) -> SnacDecoder:
        if self._decoder is None:
            device = self.audio_device()
            self._decoder = self._timed(
                "codec",
                self._on_decode_thread(
                    lambda: SnacDecoder(self.options.codec, device, half=self.options.codec_half)
                ),
            )
        return self._decoder

    def warm_decoder(self) -> None:
        """On a GPU, decode and upsample once the largest batches a render can hand the decoder: SNAC's
        fullest call, and `decode_batch` chunks of the longest a chunk can be. CUDA's caching allocator
        then holds the decoder's working memory before the engine sizes its KV cache from what is free,
        and the page-locked buffers for the audio exist; otherwise the first render grows both while
        the engine generates."""
        if self._decoder_warm or not self.options.warm_decoder or not self.audio_device().startswith("cuda"):
            return
        self._decoder_warm = True
        decoder, upsampler = self.decoder, self.upsampler
        batches = warm_up_batches(self.options.decode_batch, self.options.max_new_tokens)

        def run() -> None:
            with self.decode_stream():
                for codes in batches:
                    decode_and_upsample(decoder, upsampler, codes, seeds=list(range(len(codes))))

        self._timed("decoder_warmup", self._on_decode_thread(run))

    def decode_stream(self) -> contextlib.AbstractContextManager:
        """A CUDA stream of its own for decoding, so its kernels and copies queue behind nothing else."""
        import torch

        device = self.decoder.device
        if device.type != "cuda":
            return contextlib.nullcontext()
        if self._decode_stream is None:
            self._decode_stream = torch.cuda.Stream(device)
        return torch.cuda.stream(self._decode_stream)

    @property
    def upsampler(self):  # noqa: ANN201 - upsample.Upsampler
        if self._upsampler is None:
            from .upsample import load_upsampler

            device = self.audio_device()
            self._upsampler = self._timed(
                "upsampler",
                self._on_decode_thread(
                    lambda: load_upsampler(
                        self.options.upsampler,
                        weights=self.options.upsampler_weights,
                        device=device,
                        warn=self.progress.note,
                        # On CUDA this compiles the fused kernels at load, not in the first batch.
                        compile=device.startswith("cuda"),
                    )
                ),
            )
        return self._upsampler

    def parallel_width(self) -> int:
        """How many chunks the engine runs side by side (its batch), without building the engine."""
        engine = self.options.engine
        if engine.max_batch:
            return engine.max_batch
        from .engines.factory import resolve_kind

        if resolve_kind(engine.kind) == "lmdeploy":
            from .engines.lmdeploy import device_max_batch

            return device_max_batch() * max(1, len(parse_gpus(engine.gpus)))
        return 64 if self.audio_device().startswith("cuda") else 8

    def audio_device(self) -> str:
        """Decode and upsample next to the engine: on the (first) GPU it uses, or the CPU.

        Known from the options, so the codec can load before the engine takes its share of GPU memory.
        """
        if self._engine is not None:
            device = self._engine.device.split(",")[0]
            return "cuda:0" if device == "cuda" else device
        import torch

        from .engines.factory import resolve_kind

        engine = self.options.engine
        if resolve_kind(engine.kind) == "hf" and engine.device not in ("auto", "cuda"):
            return engine.device
        if not torch.cuda.is_available():
            return "cpu"
        gpus = parse_gpus(engine.gpus)
        return f"cuda:{gpus[0]}" if gpus else "cuda:0"

    def _timed(self, name: str, load: Callable[[], object]):  # noqa: ANN202
        started = time.perf_counter()
        value = load()
        self.startup[name] = time.perf_counter() - started
        return value

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
        if self._decode_thread is not None:
            self._decode_thread.shutdown(wait=True)
            self._decode_thread = None

    # one book -------------------------------------------------------------------------------
    def plan(self, source: str | Path) -> tuple[Book, list[Chunk]]:
        """Read and chunk a book (text stage only; loads no model)."""
        opts = self.options
        book = read_book(source, encoding=opts.encoding, normalize=opts.normalize)
        for warning in book.warnings:
            self.progress.note(warning)
        pack = pack_seconds(
            expected_seconds(spoken_text(book), opts.words_per_second),
            self.parallel_width(),
            opts.max_chunk_seconds,
        )
        split = sentence_splitter(book, workers=min(PLAN_WORKERS, available_cpus()))
        chunks = list(
            iter_chunks(
                book,
                max_seconds=opts.max_chunk_seconds,
                words_per_second=opts.words_per_second,
                pack_seconds=pack,
                sentences=split,
            )
        )
        chunks = select_preview(chunks, opts.preview)[: opts.max_chunks]
        if not chunks:
            raise RuntimeFailure(f"Nothing to speak in {source}.", "Check that the file holds text.")
        return book, chunks

    def render(self, source: str | Path, spec: OutputSpec) -> RenderResult:
        opts = self.options
        started = time.perf_counter()
        book, chunks = self.plan(source)
        plan_s = time.perf_counter() - started
        states = [ChunkState(chunk=c, key=self.chunk_key(c)) for c in chunks]
        spec = self._complete_spec(spec, book)
        stamp = self._stamp(states, spec)
        if not opts.force and is_up_to_date(self.stamp_path(spec), stamp, spec):
            self.progress.note(f"{spec.path} is up to date; pass --force to render it again")
            return RenderResult(spec.path, len(states), 0, len(states), 0.0, 0.0, skipped=True)
        check_output(spec)
        self.load_decoder()
        lock = output_lock(spec.path) if spec.path is not None else _no_lock()
        with lock:
            files, size = remove_stale_temps(spec)
            if files:
                self.progress.note(
                    f"removed {files} temporary files ({size / 1e9:.2f} GB) that an interrupted run of "
                    f"{spec.path} left behind"
                )
            result = dataclasses.replace(self._render_states(book, states, spec), plan_s=plan_s)
        if spec.path is not None and result.failed == 0:
            write_stamp(self.stamp_path(spec), stamp, spec)
        return result

    def chunk_key(self, chunk: Chunk) -> str:
        o = self.options
        return fingerprint(
            chunk.text,
            self.voice,
            self._model_id,
            dataclasses.asdict(o.engine.sampling),
            o.seed,
            o.fixed_length,
            o.max_new_tokens,
        )

    def _complete_spec(self, spec: OutputSpec, book: Book) -> OutputSpec:
        info = spec.info
        meta = book.meta
        info = BookInfo(
            title=info.title or meta.title or (Path(meta.source).stem if meta.source != "-" else None),
            author=info.author or meta.author,
            narrator=info.narrator or self.voice,
            cover=info.cover or meta.cover,
            cover_mime=info.cover_mime or meta.cover_mime,
        )
        return dataclasses.replace(spec, info=info, sample_rate=self.output_rate())

    def _stamp(self, states: Sequence[ChunkState], spec: OutputSpec) -> str:
        o = self.options
        spec_fields = {k: v for k, v in dataclasses.asdict(spec).items() if k != "info"}
        info = dataclasses.asdict(spec.info)
        info["cover"] = fingerprint(info["cover"]) if info["cover"] else None
        return fingerprint(
            [s.key for s in states],
            spec_fields,
            info,
            dataclasses.asdict(o.pauses),
            o.codec,
            o.upsampler,
            o.upsampler_weights,
            resolved_kind(o.upsampler, o.upsampler_weights),  # the name of the upsampler that decodes
            *(["codec_half"] if o.codec_half else []),  # only when on: stamps written before it stay valid
            *(["decode_stand_in"] if o.decode_stand_in else []),
        )

    def stamp_path(self, spec: OutputSpec) -> Path | None:
        if spec.path is None or self.options.cache_dir is None:
            return None
        return self.options.cache_dir / "outputs" / f"{fingerprint(str(spec.path.resolve()))}.json"

    def decode_queue(self, states: Sequence[ChunkState]) -> DecodeQueue:
        # On the CPU chunks decode one by one, so there is nothing to gather.
        on_gpu = self.audio_device().startswith("cuda")
        return DecodeQueue(
            [s.chunk.seconds for s in states],
            DECODED_AHEAD_S,
            gather=self.options.decode_batch,
            patience_s=self.options.decode_gather_s if on_gpu else 0.0,
        )

    def _render_states(self, book: Book, states: list[ChunkState], spec: OutputSpec) -> RenderResult:
        opts = self.options
        expected_audio = sum(s.chunk.seconds for s in states)
        self.progress.start(str(book.meta.source), len(states), expected_audio)
        tracker = self.decode_queue(states)
        for index, state in enumerate(states):
            hit = self.cache.get(state.key)
            if hit is not None:
                state.codes, state.seed, state.attempts = hit.codes, hit.seed, hit.attempts
                state.status = "ok"
                self.progress.chunk_done(index, hit.codes.seconds, cached=True)
                tracker.resolve(index)
        pending = [i for i, s in enumerate(states) if s.status == "pending"]
        started = time.perf_counter()
        rate = spec.sample_rate
        expected_s = (
            expected_length(
                [round(s.chunk.seconds * rate) for s in states],
                [s.chunk.boundary for s in states],
                opts.pauses,
                rate,
            )
            / rate
        )
        with Assembler(
            spec,
            opts.pauses,
            early_encoder_count=opts.early_encoders,
            join_with_ffmpeg=opts.join_with_ffmpeg,
            expected_seconds=None if opts.join_after_render else expected_s,
        ) as assembler:
            worker = DecodeWorker(self, states, tracker, assembler, book)
            worker.start()
            try:
                if pending:
                    self._generate(states, pending, tracker)
                generated = time.perf_counter()
                assembled_then = worker.assembled_samples
                worker.join_checked()
            except BaseException:
                worker.stop()
                raise
            decoded = time.perf_counter()
            assembled = assembler.finish()
            finished = time.perf_counter()
        for warning in assembled.warnings:  # cover left out, clipped samples...
            self.progress.note(warning)
        failed = sum(1 for s in states if s.status == "failed")
        self.progress.finish(output=str(spec.path) if spec.path else "-")
        if spec.manifest is None and failed:
            self.progress.note("failed chunks are listed with --manifest PATH")
        tally = self.progress.tally
        return RenderResult(
            spec.path,
            len(states),
            failed,
            tally.cached,
            tally.audio_s,
            tally.wall_s,
            generate_s=generated - started,
            startup_s=sum(self.startup.values()),
            decode_tail_s=decoded - generated,
            tail_decoding_s=max(0.0, worker.last_decoded_at - generated),
            finish_s=finished - decoded,
            encoded_early_s=assembled.encoded_early,
            finish_steps=assembled.finish_steps,
            lane_busy_s=assembled.lane_busy_s,
            early_parts=assembled.early_parts,
            snac_padding=worker.frames_computed / worker.frames_decoded if worker.frames_decoded else 0.0,
            decoder_cpu_s=worker.decoder_cpu_s,
            loudness=assembled.loudness,
            early=assembled.early,
            behind_at_generation_end_s=(worker.assembled_samples - assembled_then) / rate,
            trace=RenderTrace(
                tuple(round(t - started, 4) for t in tracker.resolved_at if t >= started),
                tuple(
                    (round(began - started, 4), round(ended - started, 4), chunks, round(audio_s, 2))
                    for began, ended, chunks, audio_s in worker.calls
                ),
            ),
        )

    def _request(self, index: int, state: ChunkState) -> Request:
        state.seed = maya1.chunk_seed(self.options.seed, state.chunk.text, state.attempts)
        return self.request_for(index, state.chunk, state.seed)

    def request_for(self, index: int, chunk: Chunk, seed: int) -> Request:
        o = self.options
        min_new, max_new = maya1.token_budget(
            chunk.seconds, fixed_length=o.fixed_length, limit=o.max_new_tokens
        )
        return Request(index, maya1.prompt_ids(self.encode, self.voice, chunk.text), seed, max_new, min_new)

    def warm_up(self) -> None:
        """Load every model now rather than on first use (benchmarks time start-up on its own)."""
        _ = self.encode
        self.load_decoder()
        _ = self.engine

    def load_decoder(self) -> None:
        """Load and warm the decoder here, before the engine, which takes most of the free GPU memory;
        decoding beside the engine, its worker does that before it builds the engine."""
        if not self.decodes_beside():
            _ = self.decoder, self.upsampler
            self.warm_decoder()

    def _generate(self, states: list[ChunkState], pending: list[int], tracker: DecodeQueue) -> None:
        feed = RequestFeed(self._request(i, states[i]) for i in pending)
        try:
            for generation in self.engine.generate(feed):
                retry = self._accept(states, generation, tracker)
                feed.resolved(retry)
        except BaseException:
            feed.close()
            raise

    def _accept(
        self, states: list[ChunkState], generation: Generation, tracker: DecodeQueue
    ) -> Request | None:
        index = generation.chunk_index
        state = states[index]
        codes = maya1.unpack(generation.token_ids)
        reason = maya1.check_generation(
            codes,
            generation.finish_reason,
            state.chunk.seconds,
            fixed_length=self.options.fixed_length,
            error=generation.error,
        )
        state.attempts += 1
        if reason is not None and state.attempts <= self.options.retries:
            self.progress.retry(index, reason, state.attempts)
            return self._request(index, state)
        if reason is None:
            state.codes, state.status = codes, "ok"
            self.cache.put(state.key, CachedChunk(codes, state.seed, state.attempts))
            self.progress.chunk_done(index, codes.seconds, cached=False, tokens=len(generation.token_ids))
        else:
            state.status, state.reason = "failed", reason
            self.progress.failed(index, reason)
        tracker.resolve(index)
        return None


# Processes that split a long book's sentences before it renders (pysbd, about 4.5 s of one core for a
# 13 h novel), while the GPU waits for the first chunks: one per CPU, up to this many. 16 planned no faster
# than 8 on the 16-CPU H200 machines (1.49 to 2.07 s against 1.70 to 1.77 s, BENCHMARKS.md runs J1 to J3
# and H2 to H4): spawning them costs what they save.
PLAN_WORKERS = 8

# Decoded audio the decoder may hold ahead of the assembler (which writes in book order): about
# 0.35 GB of 48 kHz float32. Without a bound, one slow early chunk would let hours pile up. Two hours
# rendered slower (BENCHMARKS.md, run L2): the decoder then ran further ahead of the assembler, whose
# backlog at the end of generation grew from 2,700-3,700 s of speech to 4,400-4,800 s.
DECODED_AHEAD_S = 1800.0


class DecodeQueue:
    """Resolved chunks (generated, failed or cached) waiting for the decoder, handed out lowest first.

    The decoder never holds more than `ahead_s` seconds of audio the assembler cannot write yet,
    except for the lowest chunk not yet taken: everything before it is taken, so it is always the
    next one the assembler needs, and taking it always makes progress.

    With `patience_s` above 0, while chunks are still being generated a take waits until it can hand out
    `gather` chunks, for at most `patience_s` after the earliest of them resolved. Where the engine keeps
    the GPU busy, the driver time-slices the decoder's CUDA context with the engine's, so every call's GPU
    time is time generation waits; fewer, fuller calls cost less of it (1,868 audio s/s at 32 chunks a call
    against 1,480 at 4 on an H100, BENCHMARKS.md run R2). Once nothing is left to generate, or the bound
    above stops the take short, it hands out what it has at once. The renderer leaves it off: on a host
    bound by LMDeploy's scheduler thread rather than the GPU it did not shorten generation (run T1).
    """

    def __init__(
        self, seconds: Sequence[float], ahead_s: float, *, gather: int = 1, patience_s: float = 0.0
    ) -> None:
        self._seconds = list(seconds)
        self._ahead_s = ahead_s
        self._gather = max(1, gather)
        self._patience_s = patience_s
        self._ready: list[int] = []  # sorted
        self._ready_since: dict[int, float] = {}  # of the ready ones, time.monotonic()
        self._taken = [False] * len(seconds)
        self._lowest_untaken = 0  # == len(seconds) once every chunk is taken
        self._held_s = 0.0
        self._cond = threading.Condition()
        self._stopped = False
        self.resolved_at: list[float] = []  # perf_counter of each resolve, in the order they came

    def resolve(self, index: int) -> None:
        with self._cond:
            self.resolved_at.append(time.perf_counter())
            bisect.insort(self._ready, index)
            self._ready_since[index] = time.monotonic()
            self._cond.notify_all()

    def take(self, most: int) -> list[int] | None:
        """Up to `most` resolved chunks, waiting for at least one (and for more, see the class); None once
        all are taken (or stopped)."""
        with self._cond:
            while not self._stopped and self._lowest_untaken < len(self._taken):
                takeable, bounded = self._takeable(most)
                wait_s = 0.5
                if takeable:
                    generating = self.generating
                    waited_s = time.monotonic() - min(self._ready_since[i] for i in takeable)
                    full = len(takeable) >= min(most, self._gather)
                    if full or bounded or not generating or waited_s >= self._patience_s:
                        return self._hand_out(takeable)
                    wait_s = min(wait_s, self._patience_s - waited_s)
                self._cond.wait(timeout=wait_s)
            return None

    @property
    def generating(self) -> bool:
        """Whether chunks are still to be resolved (generated, failed or found cached)."""
        return self.unresolved > 0

    @property
    def unresolved(self) -> int:
        """How many chunks are still to be resolved: being generated or waiting for the engine."""
        return len(self._taken) - len(self.resolved_at)  # each chunk resolves once

    def _takeable(self, most: int) -> tuple[list[int], bool]:
        """The chunks a take would hand out now, and whether the bound on audio held stopped it short."""
        takeable: list[int] = []
        held_s = self._held_s
        needed = self._lowest_untaken
        for index in self._ready:
            if len(takeable) == most:
                break
            if index != needed and held_s + self._seconds[index] > self._ahead_s:
                return takeable, True
            takeable.append(index)
            held_s += self._seconds[index]
        return takeable, False

    def _hand_out(self, taken: list[int]) -> list[int]:
        for index in taken:
            self._held_s += self._seconds[index]
            self._taken[index] = True
            del self._ready_since[index]
        while self._lowest_untaken < len(self._taken) and self._taken[self._lowest_untaken]:
            self._lowest_untaken += 1
        del self._ready[: len(taken)]
        return taken

    def assembled(self, index: int) -> None:
        """The assembler has written chunk `index`: its audio no longer counts as held."""
        with self._cond:
            self._held_s -= self._seconds[index]
            self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()


class DecodeWorker:
    """Decodes and upsamples chunks in batches as they complete, on the renderer's decode thread; an
    assembling thread of its own puts them in book order."""

    def __init__(
        self,
        renderer: Renderer,
        states: list[ChunkState],
        tracker: DecodeQueue,
        assembler: Assembler,
        book: Book,
    ) -> None:
        self.renderer = renderer
        self.states = states
        self.tracker = tracker
        self.assembler = assembler
        self.titles = {c.index: c.title for c in book.chapters}
        self.error: BaseException | None = None
        self.frames_decoded = 0  # SNAC frames asked for in this render, and computed with the padding
        self.frames_computed = 0
        self.assembled_samples = 0  # of chunk audio handed to the assembler so far
        self.decoder_cpu_s = 0.0  # CPU seconds of the thread that ran SNAC and the upsampler, in its calls
        self.calls: list[tuple[float, float, int, float]] = []  # perf_counter start, end, chunks, audio s
        self._done: Future | None = None

    @property
    def last_decoded_at(self) -> float:
        """perf_counter when the decoder handed over its last batch (0 before the first)."""
        return self.calls[-1][1] if self.calls else 0.0

    def start(self) -> None:
        self._done = self.renderer.decode_thread.submit(self._run)

    def _run(self) -> None:
        # Decoding (GPU) of the next batch overlaps with assembling and encoding (CPU) of this one.
        decoded: queue.Queue = queue.Queue()
        assembling = threading.Thread(
            target=self._assemble_all, args=(decoded,), name="fastmaya-assemble", daemon=True
        )
        assembling.start()
        most = max(1, self.renderer.options.decode_batch)
        try:
            while self.error is None and (batch := self.tracker.take(most)) is not None:
                began = time.perf_counter()
                decoded.put(self._decode(batch))
                seconds = sum(self.states[i].chunk.seconds for i in batch)
                self.calls.append((began, time.perf_counter(), len(batch), seconds))
        except BaseException as exc:  # handed to the main thread by join_checked
            self.error = exc
        finally:
            decoded.put(None)
            assembling.join()

    def _assemble_all(self, decoded: queue.Queue) -> None:
        waiting: dict[int, np.ndarray | None] = {}
        next_index = 0
        try:
            while (audio := decoded.get()) is not None:
                waiting.update(audio)
                while next_index in waiting:
                    self._assemble(next_index, waiting.pop(next_index))
                    self.tracker.assembled(next_index)
                    next_index += 1
        except BaseException as exc:
            self.error = self.error or exc
            self.tracker.stop()  # the decoder must not wait for room this thread will never free

    def _decode(self, batch: list[int]) -> dict[int, np.ndarray | None]:
        audio: dict[int, np.ndarray | None] = dict.fromkeys(batch)
        members = [i for i in batch if self.states[i].status == "ok"]
        if members:
            codes = [self.states[i].codes for i in members]
            seeds = [self.states[i].seed for i in members]
            if self.renderer.options.decode_stand_in:
                rate = self.assembler.spec.sample_rate
                clips = [stand_in_audio(c.frames, s, rate) for c, s in zip(codes, seeds, strict=True)]
            else:
                clips = self._decoded(codes, seeds)
            audio.update(zip(members, clips, strict=True))
        return audio

    def _decoded(self, codes: list[maya1.Codes], seeds: list[int]) -> list[np.ndarray]:
        beside = self.renderer.beside_decoder()
        decoder = beside or self.renderer.decoder
        decoded, computed = decoder.frames_decoded, decoder.frames_computed
        if beside is not None:
            cpu = beside.cpu_s
            clips = beside.decode(
                codes, seeds, sms=self._decoder_sms(), sleep=self.renderer.options.decode_sleeps
            )
            self.decoder_cpu_s += beside.cpu_s - cpu
        else:
            cpu = time.thread_time()
            with self.renderer.decode_stream():
                clips, _ = decode_and_upsample(
                    decoder,
                    self.renderer.upsampler,
                    codes,
                    seeds=seeds,
                    sleep=self.renderer.options.decode_sleeps,
                    **(DECODE_AS_BEFORE if self.renderer.options.decode_as_before else {}),
                )
            self.decoder_cpu_s += time.thread_time() - cpu
        self.frames_decoded += decoder.frames_decoded - decoded
        self.frames_computed += decoder.frames_computed - computed
        return clips

    def _decoder_sms(self) -> int | None:
        """How many SMs the decoder beside the engine keeps to for its next call (None: all of them)."""
        opts = self.renderer.options
        if opts.decode_sms is None or not self.tracker.generating:
            return None  # once the engine is done, the decoder has the whole GPU for what is left
        if opts.decode_sms_until_drain and self.tracker.unresolved < self._engine_width:
            return None  # the engine's batch is draining: the GPU has room
        return opts.decode_sms

    @functools.cached_property
    def _engine_width(self) -> int:
        return self.renderer.parallel_width()

    def _assemble(self, index: int, clip: np.ndarray | None) -> None:
        rate = self.assembler.spec.sample_rate
        state = self.states[index]
        chunk = state.chunk
        if clip is None:
            clip = np.zeros(int(FAILED_SILENCE_S * rate), dtype=np.float32)
        self.assembler.add(
            Segment(
                chunk_index=index,
                audio=clip,
                boundary=chunk.boundary,
                chapter=chunk.chapter,
                chapter_title=self.titles.get(chunk.chapter),
                text=chunk.text,
                status=state.status,
                reason=state.reason,
                frames=state.codes.frames if state.codes is not None else 0,
                seed=state.seed,
                attempts=state.attempts,
            )
        )
        state.codes = None  # decoded: free it
        self.assembled_samples += len(clip)

    def stop(self) -> None:
        self.tracker.stop()
        if self._done is not None:
            with contextlib.suppress(BaseException):
                self._done.result(timeout=30)

    def join_checked(self) -> None:
        assert self._done is not None
        self._done.result()
        if self.error is not None:
            raise self.error


# Padded frames per SNAC call: about 3 minutes of audio, a few GB of activations at most.
DECODE_FRAMES_PER_CALL = 2048


def sub_batches(frames: Sequence[int], budget: int = DECODE_FRAMES_PER_CALL) -> list[range]:
    """Consecutive ranges whose unpadded size (rows x longest) stays within `budget` frames: how calls
    were cut before codec.plan_calls, kept as the bench's baseline."""
    ranges, start, widest = [], 0, 0
    for index, count in enumerate(frames):
        widest_with = max(widest, count)
        if index > start and widest_with * (index - start + 1) > budget:
            ranges.append(range(start, index))
            start, widest_with = index, count
        widest = widest_with
    if frames:
        ranges.append(range(start, len(frames)))
    return ranges


CallPlanner = Callable[[Sequence[int]], Sequence[Sequence[int]]]
# decode_and_upsample's arguments to decode as before codec.plan_calls and pinned memory (bench baselines).
DECODE_AS_BEFORE: dict[str, Any] = {"plan": sub_batches, "pinned": False}


def decode_and_upsample(
    decoder: SnacDecoder,
    upsampler,  # noqa: ANN001 - upsample.Upsampler
    codes: Sequence[maya1.Codes],
    *,
    seeds: Sequence[int],
    plan: CallPlanner | None = None,
    pinned: bool = True,
    sleep: bool = False,
) -> tuple[list[np.ndarray], list[int]]:
    """Chunks through SNAC and the upsampler, split back into per-chunk float32 arrays.

    `seeds` are the chunks' own (their SNAC noise). On a GPU, SNAC's calls group the chunks as `plan`
    says (by default codec.plan_calls: like lengths together, within DECODE_FRAMES_PER_CALL), and the
    upsampler takes them all at once; a batch that still runs out of GPU memory is split in half and
    retried. The audio comes back through page-locked memory unless `pinned` is False (the bench's
    baseline). With `sleep` the thread sleeps while it waits for the GPU (transfers.sleeping: a candidate).
    """
    with transfers.sleeping() if sleep else contextlib.nullcontext():
        if getattr(getattr(decoder, "device", None), "type", None) == "cpu":
            # The CPU gains little from batching, and a chunk decoded on its own always has the same
            # shape, so its audio is the same to the last bit however the chunks finished.
            clips = [
                clip
                for i in range(len(codes))
                for clip in _decode_part(
                    decoder, upsampler, codes[i : i + 1], seeds[i : i + 1], _one_call, pinned
                )
            ]
        else:
            if plan is None:
                bucketed = getattr(decoder, "bucketed", False)
                plan = partial(plan_calls, budget=DECODE_FRAMES_PER_CALL, bucketed=bucketed)
            clips = _decode_part(decoder, upsampler, list(codes), list(seeds), plan, pinned)
    return clips, [len(c) for c in clips]


def stand_in_audio(frames: int, seed: int, rate: int) -> np.ndarray:
    """What RenderOptions.decode_stand_in gives a chunk instead of its decoded audio: as many samples as SNAC
    and the upsampler would give `frames` frames at `rate`, a voice-like signal (a 140 Hz buzz with its
    harmonics, its loudness rising and falling four times a second, and a little noise), so that the
    encoders and the loudness meter work as they would on speech. It repeats a second made once, from a
    point the seed picks: making it afresh would load the CPU more than decoding does."""
    second = _stand_in_second(rate)
    return np.resize(
        np.roll(second, -(seed % rate)), frames * maya1.SAMPLES_PER_FRAME * rate // maya1.SNAC_RATE
    )


@functools.cache
def _stand_in_second(rate: int) -> np.ndarray:
    t = np.arange(rate) / rate
    buzz = sum(np.sin(2 * np.pi * 140 * k * t) / k for k in range(1, 9))
    envelope = 0.55 + 0.45 * np.sin(2 * np.pi * 4 * t)
    noise = np.random.default_rng(0).standard_normal(rate)
    second = (0.08 * envelope * buzz + 0.005 * noise).astype(np.float32)
    second.flags.writeable = False
    return second


def _one_call(frames: Sequence[int]) -> list[list[int]]:
    return [list(range(len(frames)))]


def _decode_part(
    decoder: SnacDecoder,
    upsampler,  # noqa: ANN001
    codes: list[maya1.Codes],
    seeds: list[int],
    plan: CallPlanner,
    pinned: bool,
) -> list[np.ndarray]:
    import torch

    try:
        rows: list[torch.Tensor | None] = [None] * len(codes)
        for call in plan([c.frames for c in codes]):
            audio, lengths = decoder.decode([codes[i] for i in call], [seeds[i] for i in call])
            for row, (index, length) in enumerate(zip(call, lengths, strict=True)):
                rows[index] = audio[row, :length]
        audio = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)  # every chunk is in one call
        audio, lengths = upsampler(audio, [len(row) for row in rows])
        host = transfers.to_host(audio.float()) if pinned else audio.float().cpu().numpy()
    except torch.OutOfMemoryError:
        if len(codes) == 1:
            raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        half = len(codes) // 2
        return _decode_part(decoder, upsampler, codes[:half], seeds[:half], plan, pinned) + _decode_part(
            decoder, upsampler, codes[half:], seeds[half:], plan, pinned
        )
    return [host[row, :length].copy() for row, length in enumerate(lengths)]


def is_up_to_date(stamp_path: Path | None, stamp: str, spec: OutputSpec) -> bool:
    if stamp_path is None or spec.path is None or not spec.path.exists():
        return False
    try:
        saved = json.loads(stamp_path.read_text())
    except (OSError, ValueError):
        return False
    stat = spec.path.stat()
    return (
        saved.get("stamp") == stamp
        and saved.get("size") == stat.st_size
        and saved.get("mtime") == stat.st_mtime
    )


def write_stamp(stamp_path: Path | None, stamp: str, spec: OutputSpec) -> None:
    if stamp_path is None or spec.path is None or not spec.path.exists():
        return
    stat = spec.path.stat()
    atomic_write(
        stamp_path,
        json.dumps(
            {"stamp": stamp, "size": stat.st_size, "mtime": stat.st_mtime, "output": str(spec.path)}
        ).encode(),
    )


class _no_lock:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
