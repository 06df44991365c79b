"""`fastmaya bench`: throughput of each stage on this machine's GPU, measured in one run; and the CPU's
``finish`` stage, the m4b encode after the last chunk, in one piece against in parts.

Without --model it builds (or reuses) a checkpoint of Maya1's exact architecture with random
weights. Random weights never emit the stop id, so every chunk's length is fixed from its text at
the renderer's speaking rate (2.5 words a second, 82.03 tokens a second of audio): the audio
produced is as long as a real narration of the same text.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gc
import json
import os
import platform
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import suppress
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import maya1
from .errors import InputError, RuntimeFailure
from .progress import Progress
from .stage_probe import StageProbe

if TYPE_CHECKING:
    from .assemble import Segment

TRAVEL = "travel_145_sentences.txt"
NOVEL = "pride_and_prejudice.txt"
SPEECH_48K = "fastmaya1_flashsr_48k.wav"
BENCH_VOICE = "Female narrator in her 40s, warm, measured pace"
# The novel rendered as before a change, or with a candidate that is not the default yet, stage
# novel-VARIANT (an A/B with "novel" in one run): the renderer's options for each.
NOVEL_VARIANTS: dict[str, dict[str, object]] = {
    "decode-before": {"decode_as_before": True},  # decoded as before codec.plan_calls and pinned memory
    "ffmpeg-join": {"join_with_ffmpeg": True},  # m4b parts joined by ffmpeg's remux, as before mp4
    "join-after": {"join_after_render": True},  # m4b early parts joined after the last chunk, as before
    # Candidate: the decoder waits up to 2 s for calls of 32 chunks while the engine generates (no faster
    # in BENCHMARKS.md run T1, a scheduler-bound host; kept to measure on a GPU-bound one).
    "gather": {"decode_batch": 32, "decode_gather_s": 2.0},
    # Candidate: decoding in the engine's worker process on a low-priority stream (beside.py; faster in
    # runs V1, V2, not the default since run W1). With this stage the bench's engine worker loads that
    # decoder too, so every stage has a little less KV cache.
    "beside": {"decode_beside": True},
    # Candidate: the same, with the decoder's kernels kept on N of the GPU's SMs (RenderOptions.decode_sms).
    # Its first render (sms32) failed in cuBLAS inside the engine's worker (run Z6); with cuBLAS told the SMs it
    # has (green.limit_blas_to_sms), two whole-novel renders on 32 SMs finished (run AA1).
    **{f"beside-sms{n}": {"decode_beside": True, "decode_sms": n} for n in (16, 24, 32, 48)},
    # Candidate: the decoder's waits for the GPU sleep instead of spinning a CPU core (transfers.sleeping,
    # RenderOptions.decode_sleeps), in the renderer's process and beside the engine. Beside the engine on 32
    # SMs it cut the decoder's CPU time 3.5x (run AA1); in the renderer's process not yet run on a GPU.
    "sleep": {"decode_sleeps": True},
    "beside-sleep": {"decode_beside": True, "decode_sleeps": True},
    # Candidate: both of the above, the decoder beside the engine on 32 SMs with sleeping waits.
    "beside-sms32-sleep": {"decode_beside": True, "decode_sms": 32, "decode_sleeps": True},
    # Candidate: the same, on all SMs once fewer chunks are left to generate than the engine runs at once.
    "beside-sms32-sleep-drain": {
        "decode_beside": True,
        "decode_sms": 32,
        "decode_sleeps": True,
        "decode_sms_until_drain": True,
    },
    # Candidate: SNAC in float16 (codec.SnacDecoder's `half`), with a decoder of its own in the renderer's
    # process. For decoding beside the engine in float16, --codec-half makes every stage's decoder so.
    "half": {"codec_half": True},
    # Probe: every chunk's audio made on the CPU instead of decoded (RenderOptions.decode_stand_in), so the
    # render's generation shows what all but the decoder's GPU work costs it.
    "stand-in": {"decode_stand_in": True},
}

# Options that make a different decoder: a renderer changing one of them does not share the loaded one.
DECODER_OPTIONS = ("codec", "codec_half")
# The novel's LLM-only pass or render with every thread free to run on any CPU, as before the engine's
# scheduler thread had a core of its own (`cores`): an A/B in one process, with the same engine.
SHARED_CORES = "shared-cores"
NOVEL_STAGES = frozenset(
    {"novel-llm", "novel", "decode-mix", f"novel-llm-{SHARED_CORES}", f"novel-{SHARED_CORES}"}
    | {f"novel-{v}" for v in NOVEL_VARIANTS}
)
# The stages that run on the LMDeploy renderer (its engine, SNAC and upsampler), built once for all of them.
RENDERER_STAGES = NOVEL_STAGES | {"llm", "render", "bs1", "contention"}
GPU_STAGES = RENDERER_STAGES | {"hf", "upsampler", "codec"}
DECODE_MIX_CHUNKS = 600  # of the novel, for the decode-mix stage: about 6,700 s of speech
CPU_STAGES = frozenset({"finish"})


@dataclass(frozen=True)
class BenchOptions:
    model: str | None = None
    data_dir: Path = Path("../shared/data")
    cache_dir: Path | None = None
    stages: tuple[str, ...] = (
        "hf",
        "llm",
        "render",
        "novel-llm",
        "novel",
        "decode-mix",
        "bs1",
        "upsampler",
        "codec",
        "finish",
    )
    limit: int | None = None
    finish_minutes: float = 60.0  # of audio, for the finish stage
    render_format: str = "flac"  # of the render stages' output
    render_loudness: str = "off"  # and its loudness (anything but off needs ffmpeg)
    # The novel is rendered once per count of early encoders given, in this order (an A/B in one run);
    # none: once, with the default count.
    novel_early_encoders: tuple[int, ...] = ()
    repeat: int = 3  # passes over the travel text, LLM only and rendered
    hf_batch: int = 64
    hf_chunks: int = 64
    max_batch: int | None = None
    gpu_memory: float = 0.85
    kv_cache: str = "bf16"
    gpus: str | None = None
    upsampler_weights: str | None = None
    json_out: Path | None = None
    out_dir: Path = Path("/tmp/fastmaya-bench")
    warm_decoder: bool = True  # RenderOptions.warm_decoder of every render stage
    codec_half: bool = False  # RenderOptions.codec_half of every render stage and of the engine's worker


class MemoryPeak:
    """Peak device memory in use (all processes), sampled: LMDeploy allocates outside torch's counters.
    Also what the stage did to this process's allocator, and each process's memory after it (`notes`)."""

    def __init__(self, interval_s: float = 0.1) -> None:
        import torch

        self.torch = torch
        self.interval_s = interval_s
        self.peak = 0
        self.notes: dict = {}
        self._allocator: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _used(self) -> int:
        total = 0
        for index in range(self.torch.cuda.device_count()):
            free, capacity = self.torch.cuda.mem_get_info(index)
            total += capacity - free
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._used())
            time.sleep(self.interval_s)

    def __enter__(self) -> MemoryPeak:
        self._allocator = allocator_counts()
        self.peak = self._used()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.notes = {
            "renderer_allocator": allocator_change(self._allocator, allocator_counts()),
            **gpu_memory_by_process(),
        }

    @property
    def gib(self) -> float:
        return round(self.peak / 2**30, 2)


def decodes_beside_in_some_stage(stages: Sequence[str]) -> bool:
    """Whether a novel variant among `stages` decodes beside the engine, so its worker must load a decoder."""
    return any(NOVEL_VARIANTS.get(stage.removeprefix("novel-"), {}).get("decode_beside") for stage in stages)


def novel_runs(stages: Sequence[str]) -> list[str]:
    """The novel's passes in the order `stages` names them, as often as it names them: "llm" (LLM only),
    "novel" (the render), either with SHARED_CORES, or a NOVEL_VARIANTS entry."""
    plain = ("llm", "novel", f"llm-{SHARED_CORES}", SHARED_CORES)
    runs = [name.removeprefix("novel-") for name in stages if name.startswith("novel")]
    return [run for run in runs if run in plain or run in NOVEL_VARIANTS]


def novel_stage_name(run: str) -> str:
    """The report's stage name of a novel_runs entry (the plain render's, when --novel-early-encoders
    renders it once for each count, is render-novel-early-encoders-N instead)."""
    if run.startswith("llm"):
        return f"llm-novel{run.removeprefix('llm')}"
    return "render-novel" if run == "novel" else f"render-novel-{run}"


@contextlib.contextmanager
def scheduler_cores(engine, keep: bool) -> Iterator[dict]:  # noqa: ANN001 - an Engine
    """Within it, the engine's scheduler threads have a core of their own or not (`EnginePool.
    keep_scheduler_cores`); after it, they have one again, as a render has. Yields the row's note: where
    the scheduler threads ran, as the workers said."""
    keep_cores = getattr(engine, "keep_scheduler_cores", None)
    note: dict = {}
    if keep_cores is None:
        yield note
        return
    plan = keep_cores(keep)
    note["scheduler_cpus"] = [w.get("scheduler_cpus") for w in engine.stats().values()]
    note["other_cpus"] = len(plan.others) if plan is not None else None
    try:
        yield note
    finally:
        keep_cores(True)


def allocator_counts() -> dict[str, float]:
    """This process's CUDA caching allocator (the decoder's; LMDeploy runs in a process of its own):
    device allocations and frees, retries after freeing its cache, out-of-memory errors, what it
    holds; and its page-locked host allocations."""
    import torch

    stats = torch.cuda.memory_stats()
    names = {
        "num_device_alloc": "device_allocs",
        "num_device_free": "device_frees",
        "num_alloc_retries": "alloc_retries",
        "num_ooms": "ooms",
    }
    counts: dict[str, float] = {name: int(stats.get(key, 0)) for key, name in names.items()}
    counts["reserved_gib"] = round(torch.cuda.memory_reserved() / 2**30, 2)
    with suppress(Exception):  # torch without host allocator statistics
        counts["host_allocs"] = int(torch.cuda.host_memory_stats().get("num_host_alloc", 0))
    return counts


def allocator_change(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """What a stage added to allocator_counts, and what the allocator held after it."""
    change = {name: after[name] - before.get(name, 0) for name in after if name != "reserved_gib"}
    return {**change, "reserved_gib": after["reserved_gib"]}


def gpu_memory_by_process() -> dict[str, int]:
    """MiB of GPU memory used by this process and by all others (nvidia-smi); empty without it."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    mine = others = 0
    for line in out.splitlines():
        pid, _, used = line.partition(",")
        with suppress(ValueError):
            if int(pid) == os.getpid():
                mine += int(used)
            else:
                others += int(used)
    return {"renderer_mib": mine, "others_mib": others}


def trace_summary(trace, generate_s: float) -> dict:  # noqa: ANN001 - render.RenderTrace
    """From a render's trace: the chunks that came back in each quarter of generation, and the seconds the
    decoder spent decoding before generation ended."""
    if trace is None or generate_s <= 0:
        return {}
    quarters = [0, 0, 0, 0]
    for at in trace.resolved_s:
        quarters[min(3, int(4 * at / generate_s))] += 1
    return {
        "resolved_by_quarter": quarters,
        "decoding_during_generation_s": round(trace.decoding_s(generate_s), 2),
        "decode_calls": len(trace.decode_calls),
    }


@dataclass
class StageResult:
    stage: str
    engine: str
    chunks: int
    tokens: int
    audio_s: float
    wall_s: float
    peak_gpu_gib: float
    notes: dict = field(default_factory=dict)
    trace: dict | None = None  # a render's RenderTrace, kept in the report's "traces", not in its row

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else 0.0

    @property
    def audio_per_s(self) -> float:
        return self.audio_s / self.wall_s if self.wall_s else 0.0

    def row(self) -> dict:
        return {
            "stage": self.stage,
            "engine": self.engine,
            "chunks": self.chunks,
            "tokens": self.tokens,
            "audio_s": round(self.audio_s, 1),
            "wall_s": round(self.wall_s, 2),
            "tokens_per_s": round(self.tokens_per_s, 1),
            "audio_s_per_s": round(self.audio_per_s, 1),
            "rtf": round(self.wall_s / self.audio_s, 5) if self.audio_s else None,
            "peak_gpu_gib": self.peak_gpu_gib,
            **self.notes,
        }


def _renderer(options_kwargs: dict, engine=None, decoder_in_worker: bool = False):  # noqa: ANN001, ANN202
    from .render import EngineOptions, Renderer, RenderOptions

    engine_options = EngineOptions(**options_kwargs.pop("engine"))
    options = RenderOptions(engine=engine_options, **options_kwargs)
    return Renderer(options, Progress("none"), engine=engine, decoder_in_worker=decoder_in_worker)


def _sharing(renderer, **changes):  # noqa: ANN001, ANN202
    """A renderer with `changes` to `renderer`'s options that shares its engine and loaded models."""
    from .render import Renderer

    other = Renderer(
        dataclasses.replace(renderer.options, **changes), Progress("none"), engine=renderer.engine
    )
    if all(getattr(other.options, name) == getattr(renderer.options, name) for name in DECODER_OPTIONS):
        other._decoder, other._decoder_warm = renderer._decoder, renderer._decoder_warm  # loaded, if it is
    other._upsampler = renderer._upsampler
    other._decode_thread = renderer.decode_thread  # where the models were warmed
    other._encode = renderer.encode
    return other


def _run_llm(renderer, chunks, stage: str, engine_name: str) -> StageResult:  # noqa: ANN001
    requests = [renderer.request_for(i, c, maya1.chunk_seed(0, c.text)) for i, c in enumerate(chunks)]
    tokens = 0
    frames = 0
    with MemoryPeak() as memory, StageProbe(renderer.engine) as probe:
        started = time.perf_counter()
        for generation in renderer.engine.generate(requests):
            tokens += len(generation.token_ids)
            frames += maya1.unpack(generation.token_ids).frames
        wall = time.perf_counter() - started
    audio = frames * maya1.SAMPLES_PER_FRAME / maya1.SNAC_RATE
    notes = {**memory.notes, **probe.notes}
    return StageResult(stage, engine_name, len(requests), tokens, audio, wall, memory.gib, notes=notes)


def _run_render(  # noqa: ANN001
    renderer, source: Path, output: Path, stage: str, engine_name: str, loudness: str = "off"
) -> StageResult:
    from .assemble import OutputSpec

    spec = OutputSpec(path=output, format=output.suffix.lstrip("."), loudness=loudness)
    with MemoryPeak() as memory, StageProbe(renderer.engine) as probe:
        started = time.perf_counter()
        result = renderer.render(source, spec)
        wall = time.perf_counter() - started
    tokens = renderer.progress.tally.generated_tokens
    return StageResult(
        stage,
        engine_name,
        result.chunks,
        tokens,
        result.audio_s,
        wall,
        memory.gib,
        notes={
            "failed": result.failed,
            "plan_s": round(result.plan_s, 2),
            "generate_s": round(result.generate_s, 2),
            "decode_tail_s": round(result.decode_tail_s, 2),
            "tail_decoding_s": round(result.tail_decoding_s, 2),
            "behind_at_generation_end_s": round(result.behind_at_generation_end_s, 1),
            "finish_s": round(result.finish_s, 2),
            "encoded_early_s": round(result.encoded_early_s, 1),
            "finish_steps_s": result.finish_steps,
            "lane_busy_s": result.lane_busy_s,
            "early_parts": result.early_parts,
            "snac_padding": round(result.snac_padding, 3),
            "decoder_cpu_s": round(result.decoder_cpu_s, 2),
            **trace_summary(result.trace, result.generate_s),
            **memory.notes,
            **probe.notes,
            **gain_trail(result),
        },
        trace=dataclasses.asdict(result.trace) if result.trace is not None else None,
    )


def _run_candidate(  # noqa: ANN001
    renderer, source: Path, output: Path, stage: str, engine_name: str, loudness: str
) -> StageResult:
    renderer.load_decoder()  # one of its own (novel-half) loads and warms here, untimed
    return _run_render(renderer, source, output, stage, engine_name, loudness)


def gain_trail(result) -> dict:  # noqa: ANN001 - render.RenderResult
    """The book's gain against the exact one, and for each early part, in book order: the gain it was
    encoded at, and the loudness's gain and the peak's limit that the book so far asked for when it got
    that gain. It tells which of the two moved the early gains away from the book's."""
    from .loudness import LOUDNESS_TARGETS, Measurement, global_gain_db

    report = result.loudness
    if report is None or report.target_lufs is None:
        return {}

    def rounded(value: float) -> float | None:
        return round(value, 2) if np.isfinite(value) else None

    measured = Measurement(report.integrated_lufs_before, report.true_peak_dbtp_before)
    return {
        "gain_db": round(report.gain_db, 2),
        "exact_gain_db": rounded(global_gain_db(measured, LOUDNESS_TARGETS[report.mode])),
        "early_gains_db": [rounded(part.gain_db) for part in result.early],
        "early_loudness_gains_db": [rounded(part.loudness_gain_db) for part in result.early],
        "early_peak_limits_db": [rounded(part.peak_limit_db) for part in result.early],
    }


class CpuLoad:
    """``count`` ffmpeg processes encoding noise to AAC and throwing it away: about the CPU work that a
    default render (m4b, loudness on) runs beside the engine, its early encoders and loudness meters,
    without any of its GPU work. ``niceness`` lowers their scheduling priority, as a render could."""

    def __init__(self, ffmpeg: str, count: int, niceness: int = 0) -> None:
        self.ffmpeg = ffmpeg
        self.count = count
        self.niceness = niceness
        self._processes: list[subprocess.Popen] = []

    def __enter__(self) -> CpuLoad:
        command = [self.ffmpeg, "-hide_banner", "-nostats", "-loglevel", "error", "-f", "lavfi"]
        command += ["-i", "anoisesrc=r=48000:a=0.1", "-c:a", "aac", "-f", "null", "-"]
        for _ in range(self.count):
            process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            self._processes.append(process)
            if self.niceness:
                os.setpriority(os.PRIO_PROCESS, process.pid, self.niceness)
        return self

    def __exit__(self, *exc: object) -> None:
        from .loudness import kill_process

        for process in self._processes:
            kill_process(process)
        self._processes.clear()

    def running(self) -> int:
        return sum(1 for process in self._processes if process.poll() is None)


class GpuLoad:
    """The renderer's decoder (SNAC and the upsampler) kept busy on its own thread with random codes of
    16 chunks of 11 s a call: the decoder's GPU work during a render, without its CPU work."""

    def __init__(self, renderer) -> None:  # noqa: ANN001 - render.Renderer
        self._renderer = renderer
        self._stop = threading.Event()
        self._done: Future | None = None
        self.audio_s = 0.0

    def __enter__(self) -> GpuLoad:
        from .codec import random_codes
        from .render import decode_and_upsample

        rng = np.random.default_rng(0)
        frames = round(11.0 * maya1.SNAC_RATE / maya1.SAMPLES_PER_FRAME)
        codes = [random_codes(frames, rng) for _ in range(16)]
        seconds = sum(c.seconds for c in codes)

        def loop() -> None:
            with self._renderer.decode_stream():
                while not self._stop.is_set():
                    decode_and_upsample(
                        self._renderer.decoder, self._renderer.upsampler, codes, seeds=list(range(16))
                    )
                    self.audio_s += seconds

        self._done = self._renderer.decode_thread.submit(loop)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._done is not None:
            self._done.result()


def run_contention(renderer, chunks, engine_name: str, repeat: int) -> list[StageResult]:  # noqa: ANN001
    """LLM-only passes over ``chunks`` alone, beside the CPU work of a default render (``CpuLoad``, at
    normal priority and at nice 19), and beside the decoder's GPU work (``GpuLoad``), taking turns; the
    median pass of each."""
    from .assemble import early_encoders, peak_meters
    from .outputs import require_ffmpeg
    from .split_encode import available_cpus

    cpus = available_cpus()
    helpers = early_encoders(cpus) + 1 + peak_meters(cpus)  # and the loudness meter
    ffmpeg = require_ffmpeg("the contention stage loads the CPU with it")
    loads: dict[str, Callable[[], contextlib.AbstractContextManager]] = {
        "alone": contextlib.nullcontext,
        "cpu-load": partial(CpuLoad, ffmpeg, helpers),
        "cpu-load-nice": partial(CpuLoad, ffmpeg, helpers, niceness=19),
        "gpu-load": partial(GpuLoad, renderer),
    }
    passes: dict[str, list[StageResult]] = {load: [] for load in loads}
    notes: dict[str, dict] = {load: {} for load in loads}
    notes["cpu-load"] = notes["cpu-load-nice"] = {"ffmpeg_processes": helpers}
    for _ in range(repeat):
        for load, results in passes.items():
            with loads[load]() as running:
                time.sleep(0.5)  # the load under way before the pass starts
                if isinstance(running, CpuLoad) and running.running() < helpers:
                    raise RuntimeError("the CPU load's ffmpeg processes did not start")
                audio_before = running.audio_s if isinstance(running, GpuLoad) else 0.0
                result = _run_llm(renderer, chunks, f"llm-travel-{load}", engine_name)
                if isinstance(running, GpuLoad):
                    rate = (running.audio_s - audio_before) / result.wall_s
                    notes[load].setdefault("decoded_audio_s_per_s", []).append(round(rate, 1))
            results.append(result)
    medians = []
    for load, results in passes.items():
        middle = median_pass(results)
        middle.notes.update(notes[load])
        medians.append(middle)
    return medians


def run_decode_mix(renderer, chunks, repeat: int) -> list[StageResult]:  # noqa: ANN001
    """SNAC and the upsampler alone on ``chunks``' lengths (random codes), taken as the render's decode
    worker takes them at most: ``decode_batch`` chunks in book order at a time. Three ways, taking turns
    ``repeat`` times, the median pass of each: as the renderer did before codec.plan_calls and pinned
    memory (``before``: SNAC's calls cut in book order, render.sub_batches, and the audio copied to
    pageable memory), with planned calls only (``planned-pageable``), and as the renderer does now
    (``planned``)."""
    from .codec import random_codes
    from .render import DECODE_AS_BEFORE, decode_and_upsample

    rng = np.random.default_rng(0)
    frames = [
        maya1.token_budget(chunk.seconds, fixed_length=True, limit=renderer.options.max_new_tokens)[1]
        // maya1.TOKENS_PER_FRAME
        for chunk in chunks
    ]
    codes = [random_codes(count, rng) for count in frames]
    audio_s = sum(c.seconds for c in codes)
    most = renderer.options.decode_batch
    ways: dict[str, dict] = {  # decode_and_upsample's arguments for each
        "before": DECODE_AS_BEFORE,
        "planned-pageable": {"pinned": False},
        "planned": {},
    }
    decoder, upsampler = renderer.decoder, renderer.upsampler
    passes: dict[str, list[StageResult]] = {name: [] for name in ways}
    for _ in range(repeat):
        for name, way in ways.items():
            decoded, computed = decoder.frames_decoded, decoder.frames_computed

            def run(way=way) -> None:  # noqa: ANN001 - on the decode thread, with the models
                with renderer.decode_stream():
                    for start in range(0, len(codes), most):
                        decode_and_upsample(
                            decoder,
                            upsampler,
                            codes[start : start + most],
                            seeds=list(range(start, min(start + most, len(codes)))),
                            **way,
                        )

            started = time.perf_counter()
            renderer.decode_thread.submit(run).result()
            wall = time.perf_counter() - started
            padding = (decoder.frames_computed - computed) / (decoder.frames_decoded - decoded)
            passes[name].append(
                StageResult(
                    f"decode-novel-{name}",
                    "snac+upsampler",
                    len(codes),
                    sum(frames) * maya1.TOKENS_PER_FRAME,
                    audio_s,
                    wall,
                    0.0,
                    notes={"snac_padding": round(padding, 3), "chunks_a_take": most},
                )
            )
    return [median_pass(results) for results in passes.values()]


def median_pass(passes: list[StageResult]) -> StageResult:
    """The pass with the median wall time (the slower middle one of an even count), listing every
    pass's wall time in run order."""
    middle = sorted(passes, key=lambda result: result.wall_s)[len(passes) // 2]
    walls = [round(result.wall_s, 2) for result in passes]
    return StageResult(
        middle.stage,
        middle.engine,
        middle.chunks,
        middle.tokens,
        middle.audio_s,
        middle.wall_s,
        max(result.peak_gpu_gib for result in passes),
        notes={**middle.notes, "passes": len(passes), "pass_walls_s": walls},
    )


def finish_book(speech: np.ndarray, seconds: float, seed: int = 0) -> list[Segment]:
    """A book of ``seconds`` of real speech: sentences of 2 to 6 s cut from ``speech`` at random, with
    a paragraph every fourth sentence and a chapter every fortieth."""
    from .assemble import Segment

    rng = np.random.default_rng(seed)
    segments: list[Segment] = []
    total = 0.0
    while total < seconds:
        length = min(len(speech), int(rng.uniform(2.0, 6.0) * 48000))
        start = int(rng.integers(0, len(speech) - length + 1))
        index = len(segments)
        boundary = "chapter" if index % 40 == 39 else ("paragraph" if index % 4 == 3 else "sentence")
        chapter = 1 + index // 40
        text = f"Sentence {index}."
        segments.append(Segment(index, speech[start : start + length], boundary, chapter, None, text))
        total += length / 48000
    return segments


def run_finish(data_dir: Path, out_dir: Path, minutes: float, workers: int) -> list[dict]:
    """The finish of an m4b with loudness on (the default render) over ``minutes`` of real speech:
    encoded in one piece, then in parts by ``workers`` encoders, the parts joined by ``mp4`` and then by
    ffmpeg's remux as before it. Then the render's own assembler (early parts on, the book's length known)
    given the whole book at once, as it is given the speech left when generation ends: its ``add_s`` is
    what a render's tail costs for that much speech. CPU only."""
    import soundfile as sf

    from .assemble import Assembler, BookInfo, OutputSpec, Pauses, expected_length

    speech, rate = sf.read(str(data_dir / SPEECH_48K), dtype="float32", always_2d=True)
    if rate != 48000:
        raise InputError(f"{SPEECH_48K} is {rate} Hz, not 48 kHz.", "Pass --data-dir with the real data.")
    book = finish_book(speech[:, 0], minutes * 60)
    book_s = expected_length([len(s.audio) for s in book], [s.boundary for s in book], Pauses(), rate) / rate
    rows = []
    ways = [(1, "mp4")] + ([(workers, "mp4"), (workers, "ffmpeg"), (workers, "burst")] if workers > 1 else [])
    for encoders, join in ways:
        path = out_dir / f"finish-{encoders}-{join}.m4b"
        spec = OutputSpec(path, "m4b", loudness="acx", info=BookInfo("Bench", "fastmaya", None, None, None))
        # The finish rows: the whole book after its last chunk, as runs P-W measured it, early parts off (an
        # unpaced loop of adds leaves them nothing to overlap with). The burst row: the render's assembler.
        early = {"expected_seconds": book_s} if join == "burst" else {"early_part_seconds": None}
        with Assembler(
            spec, encode_workers=encoders, join_with_ffmpeg=join == "ffmpeg", **early
        ) as assembler:
            started = time.perf_counter()
            for segment in book:
                assembler.add(segment)
            added = time.perf_counter()
            result = assembler.finish()
            finished = time.perf_counter()
        finish_s = finished - added
        rows.append(
            {
                "format": "m4b",
                "loudness": "acx",
                "encoders": encoders,
                "join": join if encoders > 1 else "none (one piece)",
                "audio_s": round(result.duration, 1),
                "add_s": round(added - started, 2),
                "add_audio_s_per_s": round(result.duration / (added - started), 1),
                "finish_s": round(finish_s, 2),
                "finish_audio_s_per_s": round(result.duration / finish_s, 1),
                "finish_steps_s": result.finish_steps,
                "lane_busy_s": result.lane_busy_s,
                "early_parts": result.early_parts,
            }
        )
    return rows


def _cpu_name() -> str:
    with suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def run_bench(opts: BenchOptions) -> dict:
    unknown = set(opts.stages) - GPU_STAGES - CPU_STAGES
    if unknown:
        raise InputError(
            f"unknown bench stage(s): {', '.join(sorted(unknown))}.",
            f"Choose from {','.join(sorted(GPU_STAGES | CPU_STAGES))}.",
        )
    from .outputs import FORMATS

    if opts.render_format not in FORMATS:
        raise InputError(
            f"unknown --render-format {opts.render_format!r}.", f"Choose from {', '.join(FORMATS)}."
        )
    report: dict = {"date": datetime.date.today().isoformat(), "stages": [], "startup": {}}
    try:
        if GPU_STAGES & set(opts.stages):
            _run_gpu_stages(opts, report)
        if "finish" in opts.stages:
            report[RUNNING] = "finish"
            _add_finish(report, opts)
    except BaseException as error:
        # A bench of the whole novel runs for many minutes: a stage that fails (or Ctrl-C) must not take the
        # stages already measured with it. They are printed and written, with what failed, and the error
        # still ends the run with its own message and exit code.
        report["failed"] = {"stage": report.pop(RUNNING, None), "error": _error_text(error)}
        _report(report, opts)
        raise
    report.pop(RUNNING, None)
    _report(report, opts)
    failed = report.get(FAILED_RENDERS)
    if failed:
        raise RuntimeFailure(
            f"The bench's {', '.join(entry['stage'] for entry in failed)} failed ({failed[0]['error']}); "
            "the other stages were measured.",
            "The report names each failed render and its error (failed_renders).",
        )
    return report


# The report's key for the stage in progress; it becomes report["failed"]["stage"] if that stage fails.
RUNNING = "running"
# The report's key for the candidates' renders that failed while the bench went on with its other passes.
FAILED_RENDERS = "failed_renders"


def measure_or_note(report: dict, stage: str, measure: Callable[[], StageResult]) -> StageResult | None:
    """Run a candidate's render of the novel (NOVEL_VARIANTS).

    One that fails with a RuntimeFailure (novel-beside-sms32 failing on the GPU, say) is noted in
    report[FAILED_RENDERS] and gives None, and the bench goes on with its next pass: in a long A/B, a
    failing candidate must not cost the passes after it (run Z6 lost two). The engine cancels the failed
    render's requests and stays usable. Any other error, and Ctrl-C, still end the bench.
    """
    try:
        return measure()
    except RuntimeFailure as error:
        report.setdefault(FAILED_RENDERS, []).append({"stage": stage, "error": _error_text(error)})
        print(json.dumps({"stage": stage, "failed": _error_text(error)}), flush=True)
        return None


def _error_text(error: BaseException) -> str:
    if isinstance(error, KeyboardInterrupt):
        return "interrupted"
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def _report(report: dict, opts: BenchOptions) -> None:
    _print_table(report)
    if opts.json_out:
        _write_json(opts.json_out, report)


# The key that marks a report written while the bench still runs. A bench whose machine is taken back
# mid-run is killed before it can write its report (run AA1 left only printed lines); this one, rewritten
# after each stage, keeps what was measured.
PARTIAL = "partial"


def record_stage(report: dict, result: StageResult, json_out: Path | None) -> None:
    """Add a measured stage to `report`, print its row, and write the report so far to `json_out`, marked
    PARTIAL (the bench's last write, when it ends, is the whole report without the mark)."""
    row = result.row()
    report["stages"].append(row)
    if result.trace is not None:
        report.setdefault("traces", []).append({"stage": result.stage, **result.trace})
    print(json.dumps(row), flush=True)
    if json_out:
        so_far = {key: value for key, value in report.items() if key != RUNNING}
        _write_json(json_out, {**so_far, PARTIAL: True})


def _write_json(path: Path, report: dict) -> None:
    """Write `report` whole or not at all: a reader, or a bench killed mid-write, never sees half a file."""
    temporary = path.with_name(f".{path.name}.partial")
    temporary.write_text(json.dumps(report, indent=2))
    os.replace(temporary, path)


def _add_finish(report: dict, opts: BenchOptions) -> None:
    from .outputs import find_ffmpeg
    from .split_encode import available_cpus

    workers = available_cpus()
    report.update(cpu=_cpu_name(), cpus=workers)
    if find_ffmpeg() is None:
        report["finish_skipped"] = "ffmpeg is not on the PATH"
        print(json.dumps({"stage": "finish", "skipped": report["finish_skipped"]}), flush=True)
        return
    if not (opts.data_dir / SPEECH_48K).exists():
        raise InputError(
            f"Benchmark audio {opts.data_dir / SPEECH_48K} is missing.",
            "Pass --data-dir with the folder that holds it.",
        )
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    rows = run_finish(opts.data_dir, opts.out_dir, opts.finish_minutes, workers)
    for row in rows:
        print(json.dumps({"stage": "finish", **row}), flush=True)
    report["finish"] = rows
    if len(rows) == 4:
        summary = report.setdefault("summary", {})
        summary["finish_parts_over_one_piece"] = round(rows[0]["finish_s"] / rows[1]["finish_s"], 2)
        summary["finish_ffmpeg_join_over_mp4_join"] = round(rows[2]["finish_s"] / rows[1]["finish_s"], 3)
        summary["burst_add_audio_s_per_s"] = rows[3]["add_audio_s_per_s"]


def _run_gpu_stages(opts: BenchOptions, report: dict) -> None:
    """Run the GPU stages, adding each result to `report` as it is measured (report[RUNNING] names the
    stage in progress)."""
    import torch

    from .checkpoints import random_maya1, random_snac
    from .codec import benchmark_codec
    from .upsample import benchmark_upsampler

    if not torch.cuda.is_available():
        raise InputError(
            "fastmaya bench measures a GPU, and no CUDA device is visible.",
            "Run it on a machine with an NVIDIA GPU, or only the CPU stage: --stages finish.",
        )
    travel, novel = opts.data_dir / TRAVEL, opts.data_dir / NOVEL
    for needed in (travel, novel):
        if not needed.exists():
            raise InputError(
                f"Benchmark text {needed} is missing.", "Pass --data-dir with the folder that holds it."
            )
    cache = opts.cache_dir or Path("/tmp/fastmaya-bench-models")
    startup: dict[str, float] = report["startup"]
    report[RUNNING] = "start-up"
    t = time.perf_counter()
    model = opts.model or str(random_maya1(cache, size="full"))
    codec = str(random_snac(cache, tiny=False))
    startup["checkpoint_s"] = round(time.perf_counter() - t, 2)
    fixed = opts.model is None
    weights = opts.upsampler_weights or str(opts.data_dir / "speechsr48k.pth")
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    base = dict(
        voice=BENCH_VOICE,
        codec=codec,
        upsampler="speechsr" if Path(weights).exists() else "resample",
        upsampler_weights=weights if Path(weights).exists() else None,
        fixed_length=fixed,
        cache_dir=None,
        force=True,
        warm_decoder=opts.warm_decoder,
        codec_half=opts.codec_half,
    )
    report.update(
        {
            "device": torch.cuda.get_device_name(0),
            "gpus": torch.cuda.device_count(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "model": "random Maya1-shaped (3.3B, bf16)" if fixed else model,
            "speaking_rate_wps": 2.5,
            "fixed_length": fixed,
            "render_output": {"format": opts.render_format, "loudness": opts.render_loudness},
            "warm_decoder": opts.warm_decoder,
            "codec_half": opts.codec_half,
        }
    )
    stages: list[StageResult] = []

    def emit(result: StageResult) -> None:
        stages.append(result)
        record_stage(report, result, opts.json_out)

    if "hf" in opts.stages:
        report[RUNNING] = "llm-travel (hf)"
        t = time.perf_counter()
        hf = _renderer(
            {**base, "engine": dict(kind="hf", model=model, device="cuda", max_batch=opts.hf_batch)}
        )
        _ = hf.engine, hf.encode
        startup["hf_engine_s"] = round(time.perf_counter() - t, 2)
        _, chunks = hf.plan(travel)
        emit(_run_llm(hf, chunks[: opts.hf_chunks], "llm-travel", "hf"))
        hf.close()
        del hf
        gc.collect()
        torch.cuda.empty_cache()

    if RENDERER_STAGES & set(opts.stages):
        engine_kwargs = dict(
            kind="lmdeploy",
            model=model,
            max_batch=opts.max_batch,
            gpu_memory=opts.gpu_memory,
            kv_cache=opts.kv_cache,
            gpus=opts.gpus,
        )
        report[RUNNING] = "start-up"
        renderer = _renderer(
            {**base, "engine": engine_kwargs},
            decoder_in_worker=decodes_beside_in_some_stage(opts.stages),
        )
        t = time.perf_counter()
        renderer.warm_up()
        startup["engine_total_s"] = round(time.perf_counter() - t, 2)
        startup.update({f"{k}_s": round(v, 2) for k, v in renderer.startup.items()})
        name = (
            "lmdeploy"
            if not opts.gpus
            else f"lmdeploy x{len(opts.gpus.split(',')) if opts.gpus != 'all' else report['gpus']}"
        )
        _, travel_chunks = renderer.plan(travel)
        if "llm" in opts.stages:
            report[RUNNING] = "llm-travel-first-pass"
            # The first pass after start also compiles LMDeploy's Triton kernels for this workload's
            # shapes; Triton keeps them on disk, so only a machine's first run ever pays that.
            emit(_run_llm(renderer, travel_chunks, "llm-travel-first-pass", name))
        # A pass over the travel text takes 2 to 3 s, and consecutive LLM-only passes in one process
        # varied by a third on a lent H100: both stages run `repeat` times, taking turns, and each
        # reports its median pass.
        llm_passes: list[StageResult] = []
        render_passes: list[StageResult] = []
        for _ in range(opts.repeat):
            if "llm" in opts.stages:
                report[RUNNING] = "llm-travel"
                llm_passes.append(_run_llm(renderer, travel_chunks, "llm-travel", name))
            if "render" in opts.stages:
                report[RUNNING] = "render-travel"
                travel_out = opts.out_dir / f"travel.{opts.render_format}"
                render_passes.append(
                    _run_render(renderer, travel, travel_out, "render-travel", name, opts.render_loudness)
                )
        for passes in (llm_passes, render_passes):
            if passes:
                emit(median_pass(passes))
        if NOVEL_STAGES & set(opts.stages):
            novel_renderer = _sharing(renderer, max_chunks=opts.limit)
            _, novel_chunks = novel_renderer.plan(novel)
        novel_out = opts.out_dir / f"novel.{opts.render_format}"
        # The novel's LLM-only passes and renders run in the order --stages names them, as often as it
        # names them, so an A/B can take turns (novel-llm,novel,novel-VARIANT,novel,novel-llm) and show
        # what the order alone does.
        for variant in novel_runs(opts.stages):
            stage = report[RUNNING] = novel_stage_name(variant)
            results: list[StageResult] = []
            with scheduler_cores(renderer.engine, keep=not variant.endswith(SHARED_CORES)) as placed:
                if variant.startswith("llm"):
                    # The same chunks as the novel's render, LLM only: the render's own yardstick at book length.
                    results.append(_run_llm(novel_renderer, novel_chunks, stage, name))
                elif variant in NOVEL_VARIANTS:
                    candidate = _sharing(novel_renderer, **NOVEL_VARIANTS[variant])
                    measure = partial(
                        _run_candidate, candidate, novel, novel_out, stage, name, opts.render_loudness
                    )
                    measured = measure_or_note(report, stage, measure)
                    if measured is not None:
                        results.append(measured)
                else:
                    for count in opts.novel_early_encoders or (None,):
                        changed = (
                            novel_renderer
                            if count is None
                            else _sharing(novel_renderer, early_encoders=count)
                        )
                        if count is not None:
                            stage = report[RUNNING] = f"render-novel-early-encoders-{count}"
                        results.append(
                            _run_render(changed, novel, novel_out, stage, name, opts.render_loudness)
                        )
            for result in results:
                result.notes.update(placed)
                emit(result)
        if "novel" in opts.stages:
            pool_stats = getattr(renderer.engine, "stats", None)
            if callable(pool_stats):
                report["per_gpu"] = pool_stats()
        if "decode-mix" in opts.stages:
            report[RUNNING] = "decode-mix"
            for result in run_decode_mix(renderer, novel_chunks[:DECODE_MIX_CHUNKS], opts.repeat):
                emit(result)
        if "contention" in opts.stages:
            report[RUNNING] = "contention"
            for result in run_contention(renderer, travel_chunks, name, opts.repeat):
                emit(result)
        if "bs1" in opts.stages:
            report[RUNNING] = "first-audio-bs1"
            one = opts.out_dir / "one.txt"
            one.write_text("The lighthouse keeper climbed the stairs one last time.\n")
            emit(_run_render(renderer, one, opts.out_dir / "one.wav", "first-audio-bs1", name))
        renderer.close()

    if "upsampler" in opts.stages and Path(weights).exists():
        report[RUNNING] = "upsampler"
        # None: the dtype the renderer uses (fp16 on CUDA); bf16 for comparison.
        for dtype in (None, torch.bfloat16):
            row = benchmark_upsampler("cuda", dtype, batch=64, seconds=10.0, compile=True, weights=weights)
            report.setdefault("upsampler", []).append(row)
            print(json.dumps({"stage": "upsampler", **row}), flush=True)

    if "codec" in opts.stages:
        report[RUNNING] = "codec"
        # SNAC alone, the CUDA path the renderer uses (fused) against SNAC's own modules (plain).
        for fused in (False, True):
            row = benchmark_codec(codec, "cuda", fused=fused)
            report.setdefault("codec", []).append(row)
            print(json.dumps({"stage": "codec", **row}), flush=True)

    _summarise(report, stages)


def _llm_only_around(
    stages: Sequence[StageResult],
) -> list[tuple[StageResult, StageResult | None, StageResult | None]]:
    """Each render of the novel, in order, with the LLM-only passes of the novel of its kind (shared cores or
    not) nearest before and after it, or None where there is none."""

    def shared(stage: StageResult) -> bool:
        return stage.stage.endswith(SHARED_CORES)

    anchors = [
        (position, stage) for position, stage in enumerate(stages) if stage.stage.startswith("llm-novel")
    ]
    around = []
    for position, stage in enumerate(stages):
        if stage.stage.startswith("render-novel"):
            kind = [(at, anchor) for at, anchor in anchors if shared(anchor) == shared(stage)]
            before = next((anchor for at, anchor in reversed(kind) if at < position), None)
            after = next((anchor for at, anchor in kind if at > position), None)
            around.append((stage, before, after))
    return around


def novel_shares(stages: Sequence[StageResult]) -> list[tuple[str, float]]:
    """Each render of the novel against the LLM-only pass of the novel run last before it, in order; a
    render with shared cores against the last such LLM-only pass.

    The engine's first pass after start can be the slow one (run L1: 56.7 s, then 48.6 s for the same
    chunks, LLM only; run L2: the same twice), so a render is compared with the pass nearest before it, and
    a bench that wants the engine warm names novel-llm twice before the first render."""
    return [
        (render.stage, round(render.audio_per_s / before.audio_per_s, 3))
        for render, before, _ in _llm_only_around(stages)
        if before is not None and before.audio_per_s
    ]


def novel_bracketed_shares(stages: Sequence[StageResult]) -> list[tuple[str, float]]:
    """Each render of the novel against the mean of the LLM-only passes nearest before and after it (of
    the same cores kind), in order; renders without a pass on both sides are left out.

    LLM-only passes of the same chunks drifted 1.03x to 1.31x within one process (runs N1, R1, R2), so a
    render between two of them is read against both. Their mean is taken over wall times (the chunks are
    the same), which is the harmonic mean of their audio seconds per second."""
    shares: list[tuple[str, float]] = []
    for render, before, after in _llm_only_around(stages):
        if before is None or after is None or not (before.audio_per_s and after.audio_per_s):
            continue
        anchor_per_s = 2 / (1 / before.audio_per_s + 1 / after.audio_per_s)
        shares.append((render.stage, round(render.audio_per_s / anchor_per_s, 3)))
    return shares


def _summarise(report: dict, stages: list[StageResult]) -> None:
    hf = next((s for s in stages if s.engine == "hf"), None)
    llm = next((s for s in stages if s.stage == "llm-travel" and s.engine != "hf"), None)
    render = next((s for s in stages if s.stage == "render-travel"), None)
    summary = {}
    if hf and llm:
        summary["lmdeploy_over_hf"] = round(llm.audio_per_s / hf.audio_per_s, 1)
    shares = novel_shares(stages)
    if shares:
        summary["novel_shares_of_llm_only"] = shares
    bracketed = novel_bracketed_shares(stages)
    if bracketed:
        summary["novel_shares_of_bracketing_llm_only"] = bracketed
    for variant in ("", f"-{SHARED_CORES}", *(f"-{v}" for v in NOVEL_VARIANTS)):
        first = next((share for stage, share in shares if stage == f"render-novel{variant}"), None)
        if first is not None:
            summary[f"novel{variant.replace('-', '_')}_render_share_of_llm_only"] = first
    if llm and render:
        summary["render_share_of_llm_only"] = round(render.audio_per_s / llm.audio_per_s, 3)
        # The render's time beyond what the LLM alone needs for the same audio.
        summary["share_of_wall_outside_llm"] = round(
            max(0.0, 1 - llm.wall_s / render.wall_s * render.audio_s / llm.audio_s), 3
        )
    alone = next((s for s in stages if s.stage == "llm-travel-alone"), None)
    for load in ("cpu-load", "cpu-load-nice", "gpu-load"):
        loaded = next((s for s in stages if s.stage == f"llm-travel-{load}"), None)
        if alone and loaded:
            summary[f"llm_slowdown_{load.replace('-', '_')}"] = round(loaded.wall_s / alone.wall_s, 3)
    mix = {s.stage: s for s in stages if s.stage.startswith("decode-novel-")}
    for way in ("planned-pageable", "planned"):
        if {"decode-novel-before", f"decode-novel-{way}"} <= set(mix):
            summary[f"decode_{way.replace('-', '_')}_over_before"] = round(
                mix[f"decode-novel-{way}"].audio_per_s / mix["decode-novel-before"].audio_per_s, 3
            )
    codec = {row["fused"]: row["audio_s_per_s"] for row in report.get("codec", [])}
    if True in codec and False in codec:
        summary["codec_fused_over_plain"] = round(codec[True] / codec[False], 2)
    report["summary"] = summary


def _print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    device = f"{report['device']} x{report['gpus']}" if "device" in report else report.get("cpu", "CPU")
    table = Table(title=f"fastmaya bench: {device}, {report['date']}")
    for column in ("stage", "engine", "chunks", "tokens/s", "audio s/s", "RTF", "wall s", "peak GiB"):
        table.add_column(column)
    for row in report["stages"]:
        table.add_row(
            row["stage"],
            row["engine"],
            str(row["chunks"]),
            f"{row['tokens_per_s']:.0f}",
            f"{row['audio_s_per_s']:.1f}",
            str(row["rtf"]),
            f"{row['wall_s']:.1f}",
            str(row["peak_gpu_gib"]),
        )
    console = Console(stderr=False)
    if report["stages"]:
        console.print(table)
    console.print(
        {
            "startup": report["startup"],
            "summary": report.get("summary"),
            "upsampler": report.get("upsampler"),
            "codec": report.get("codec"),
            "finish": report.get("finish"),
            "failed": report.get("failed"),
            "failed_renders": report.get(FAILED_RENDERS),
        }
    )
