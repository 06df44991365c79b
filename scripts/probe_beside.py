"""What the decoder costs generation, in another process and in the engine's own (a development tool).

Runs LMDeploy in this process, and LLM-only passes over the novel's first N chunks, taking turns: alone,
and beside a decoder (SNAC and the SpeechSR upsampler on random codes, 4 chunks of 11 s a call, as a
render's calls) kept at the pace the engine made speech in the first pass alone. The decoder runs:

- `other-process`: in a process of its own, as a render decodes with `--no-decode-beside`: the driver time-slices the two
  CUDA contexts, so while the decoder holds the GPU, generation waits;
- `same-process`: in this process, on a CUDA stream of its own at the priority of LMDeploy's streams:
  one context, so its kernels may run beside the engine's, and its Python shares the interpreter lock
  with LMDeploy's scheduler;
- `same-process-low`: the same, on a stream of lower priority than LMDeploy's, so the GPU starts the
  engine's waiting blocks before the decoder's;
- `green-N`: the same, on a low-priority stream of a CUDA green context of N SMs (fastmaya_cli/green.py): the
  decoder's blocks stay on those N, the engine's run on all of them.

LMDeploy's streams are made high-priority for the whole run (torch.cuda.Stream is patched before the
engine is built); alone, nothing else uses the GPU, so that changes nothing there.

For each placement: the pass's wall time, the speech decoded meanwhile, and the decoder's cost: seconds
of generation lost per 1,000 s of speech decoded. A render at 0.9 of LLM-only on run R2's host (BENCHMARKS.md)
needs about 0.32 s per 1,000 s; R2's render lost 0.72.

    bash scripts/gpu-session.sh python3 scripts/probe_beside.py --data-dir .devdata --chunks 800 --json $OUT/beside.json

`--smoke` runs the same steps on the CPU with tiny random models and the transformers engine (no LMDeploy).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from fastmaya_cli import maya1
from fastmaya_cli.bench import BENCH_VOICE, NOVEL, _renderer, _run_llm
from fastmaya_cli.beside import DECODER_PRIORITY, ENGINE_PRIORITY, make_new_streams_high_priority
from fastmaya_cli.checkpoints import random_maya1, random_snac
from fastmaya_cli.codec import SnacDecoder, random_codes
from fastmaya_cli.green import green_stream
from fastmaya_cli.render import decode_and_upsample
from fastmaya_cli.upsample import load_upsampler

CHUNKS_A_CALL = 4
CHUNK_SECONDS = 11.0
HIGH, LOW = ENGINE_PRIORITY, DECODER_PRIORITY
PLACEMENTS = ("alone", "other-process", "same-process", "same-process-low")  # and green-N


def call_codes() -> list[maya1.Codes]:
    frames = round(CHUNK_SECONDS * maya1.SNAC_RATE / maya1.SAMPLES_PER_FRAME)
    rng = np.random.default_rng(0)
    return [random_codes(frames, rng) for _ in range(CHUNKS_A_CALL)]


def load_decoder(codec: str, weights: str | None, device: str) -> Callable[[], float]:
    """A function that decodes and upsamples one call of random codes and returns its speech seconds."""
    decoder = SnacDecoder(codec, device)
    upsampler = load_upsampler(
        "speechsr" if weights else "resample",
        weights=weights,
        device=device,
        compile=device.startswith("cuda"),
    )
    codes = call_codes()
    seconds = sum(c.seconds for c in codes)
    seeds = list(range(len(codes)))

    def decode_call() -> float:
        decode_and_upsample(decoder, upsampler, codes, seeds=seeds)
        return seconds

    decode_call()
    return decode_call


def paced(
    decode_call: Callable[[], float], rate: float, running: Callable[[], bool], tally: Callable[[float], None]
) -> None:
    """Decode calls while `running()`, never more than `rate` speech seconds a second ahead of the start."""
    started, done = time.perf_counter(), 0.0
    while running():
        if done > rate * (time.perf_counter() - started):
            time.sleep(0.002)
            continue
        seconds = decode_call()
        done += seconds
        tally(seconds)


def _decoder_process(codec: str, weights: str | None, rate, go, quit_, decoded, ready) -> None:  # noqa: ANN001
    decode_call = load_decoder(codec, weights, "cuda" if torch.cuda.is_available() else "cpu")
    ready.set()

    def tally(seconds: float) -> None:
        with decoded.get_lock():
            decoded.value += seconds

    while not quit_.is_set():
        if go.wait(0.05):
            paced(decode_call, rate.value, go.is_set, tally)


class OtherProcess:
    """The decoder in a process of its own, started once and paced during each pass."""

    def __init__(self, codec: str, weights: str | None) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.rate, self.decoded = ctx.Value("d", 0.0), ctx.Value("d", 0.0)
        self.go, self.quit, ready = ctx.Event(), ctx.Event(), ctx.Event()
        self.process = ctx.Process(
            target=_decoder_process,
            args=(codec, weights, self.rate, self.go, self.quit, self.decoded, ready),
            daemon=True,
        )
        self.process.start()
        if not ready.wait(600):
            raise RuntimeError("the decoder process did not start")

    @contextlib.contextmanager
    def running(self, rate: float) -> Iterator[Callable[[], float]]:
        self.rate.value = rate
        self.go.set()
        try:
            yield lambda: self.decoded.value
        finally:
            self.go.clear()

    def close(self) -> None:
        self.quit.set()
        self.process.join(30)


class SameProcess:
    """The decoder on a thread of this process, on a stream of the given priority."""

    def __init__(self, codec: str, weights: str | None, device: str) -> None:
        self.device = device
        self.decode_call = load_decoder(codec, weights, device)
        self.decoded = 0.0

    @contextlib.contextmanager
    def running(self, rate: float, priority: int, stream: object = None) -> Iterator[Callable[[], float]]:
        stop = threading.Event()
        cuda = self.device.startswith("cuda")
        if stream is None and cuda:
            stream = ORIGINAL_STREAM(priority=priority)

        def tally(seconds: float) -> None:
            self.decoded += seconds

        def loop() -> None:
            with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
                self.decode_call()  # this thread's first call sets up what CUDA's libraries keep per thread
                paced(self.decode_call, rate, lambda: not stop.is_set(), tally)

        thread = threading.Thread(target=loop, name="probe-decoder", daemon=True)
        thread.start()
        try:
            yield lambda: self.decoded
        finally:
            stop.set()
            thread.join()


ORIGINAL_STREAM = torch.cuda.Stream


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    parser.add_argument("--chunks", type=int, default=800)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--placements", default=",".join(PLACEMENTS), help="comma-separated; green-N too")
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU, transformers engine")
    args = parser.parse_args()

    cache = Path("/tmp/fastmaya-bench-models")
    model = str(random_maya1(cache, size="tiny" if args.smoke else "full"))
    codec = str(random_snac(cache, tiny=args.smoke))
    weights_path = args.data_dir / "speechsr48k.pth"
    weights = str(weights_path) if weights_path.exists() and not args.smoke else None
    device = "cpu" if args.smoke else "cuda"

    placements = tuple(args.placements.split(","))
    if placements[0] != "alone":
        placements = ("alone", *(p for p in placements if p != "alone"))
    # loaded before the engine sizes its KV cache from what is free
    other = OtherProcess(codec, weights) if "other-process" in placements else None
    same = SameProcess(codec, weights, device)
    greens = {}
    for placement in placements:
        if placement.startswith("green-"):
            made = green_stream(int(placement.removeprefix("green-")), priority=LOW)
            greens[placement] = made.stream
            print(f"{placement}: {made.sms} of {made.device_sms} SMs", flush=True)
    if args.smoke:
        from fastmaya_cli.engines.hf import HFEngine

        engine = HFEngine(model=model, device="cpu", max_batch=4)
        kind = "hf"
    else:
        from fastmaya_cli.engines.lmdeploy import LMDeployEngine

        make_new_streams_high_priority()
        engine = LMDeployEngine(model)
        kind = "lmdeploy"
    renderer = _renderer(
        dict(
            voice=BENCH_VOICE,
            codec=codec,
            fixed_length=True,
            cache_dir=None,
            force=True,
            engine=dict(kind=kind, model=model),
        ),
        engine=engine,
    )
    _, chunks = renderer.plan(args.data_dir / NOVEL)
    chunks = chunks[: args.chunks]
    report: dict = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "chunks": len(chunks),
        "streams_made_high_priority": getattr(torch.cuda.Stream, "made", 0),
        "placements": placements,
        "passes": [],
    }
    _run_llm(renderer, chunks[: max(1, len(chunks) // 4)], "warm-up", kind)  # compiles LMDeploy's kernels

    rate = 0.0
    for turn in range(args.repeat):
        # Odd turns go the other way round, so no placement always follows the same one.
        for placement in placements if turn % 2 == 0 else ("alone", *placements[:0:-1]):
            if placement == "alone":
                load = contextlib.nullcontext(lambda: 0.0)
            elif placement == "other-process":
                load = other.running(rate)
            elif placement in greens:
                load = same.running(rate, LOW, greens[placement])
            else:
                load = same.running(rate, HIGH if placement == "same-process" else LOW)
            with load as decoded:
                time.sleep(0.5)  # the decoder under way before the pass starts
                before = decoded()
                result = _run_llm(renderer, chunks, f"llm-{placement}", kind)
                speech = decoded() - before
            if placement == "alone" and turn == 0:
                rate = result.audio_s / result.wall_s
            row = {
                "turn": turn,
                "placement": placement,
                "wall_s": round(result.wall_s, 2),
                "audio_s": round(result.audio_s, 1),
                "audio_s_per_s": round(result.audio_s / result.wall_s, 1),
                "decoded_audio_s": round(speech, 1),
                "pace_audio_s_per_s": round(rate, 1) if placement != "alone" else None,
                "gpu": {k: v for k, v in result.notes.items() if k.startswith("gpu")},
            }
            report["passes"].append(row)
            print(json.dumps(row), flush=True)
    with contextlib.nullcontext():
        result = _run_llm(renderer, chunks, "llm-alone", kind)  # brackets the others: the engine drifts
    row = {
        "turn": args.repeat,
        "placement": "alone",
        "wall_s": round(result.wall_s, 2),
        "audio_s": round(result.audio_s, 1),
        "audio_s_per_s": round(result.audio_s / result.wall_s, 1),
        "decoded_audio_s": 0.0,
        "pace_audio_s_per_s": None,
        "gpu": {k: v for k, v in result.notes.items() if k.startswith("gpu")},
    }
    report["passes"].append(row)
    print(json.dumps(row), flush=True)
    passes = report["passes"]
    alone = statistics.mean(p["wall_s"] for p in passes if p["placement"] == "alone")
    report["alone_mean_s"] = round(alone, 2)
    summary = {}
    for placement in placements[1:]:
        rows = [p for p in passes if p["placement"] == placement]
        lost = statistics.mean(p["wall_s"] for p in rows) - alone
        speech = statistics.mean(p["decoded_audio_s"] for p in rows)
        summary[placement] = {
            "wall_over_alone": round((alone + lost) / alone, 3),
            "decoded_audio_s": round(speech, 1),
            "lost_s_per_1000_audio_s": round(1000 * lost / speech, 3) if speech else None,
        }
        print(f"{placement:18} {summary[placement]}", flush=True)
    report["summary"] = summary
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if other is not None:
        other.close()
    engine.close()


if __name__ == "__main__":
    main()
