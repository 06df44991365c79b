"""Where the decoder's GPU time goes, and what cheaper arithmetic would save (a development tool).

SNAC and the SpeechSR upsampler on random codes of novel-like lengths (4 to 16 s, 16 chunks a batch, as
the render's decode worker takes them), on a random full-size SNAC 24 kHz. Prints, and writes as JSON
to OUT/decoder-profile.json:

- audio seconds per second of SNAC alone, the upsampler alone and both (as `render.decode_and_upsample`),
  and of both in calls of 1 to 32 chunks;
- SNAC with its matrix products in full float32 (as before TF32), and the whole decoder in float16 and
  bfloat16, with the signal-to-error ratio against float32 products on the same codes (random weights:
  this measures the rounding, not what it does to real speech);
- the top CUDA kernels of SNAC and of the upsampler (torch.profiler), to OUT/decoder-kernels.txt.

    python3 scripts/profile_decoder.py --weights .devdata/speechsr48k.pth --out /tmp/profile

PROFILE_QUICK=1 stops after the throughputs and float32 products; PROFILE_FIRST=1 only times a fresh
process's first pass over the chunks against its second; PROFILE_BATCHES=N sets the calls of 16 (12).
`--device cpu` is a smoke test on a tiny SNAC.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from fastmaya_cli import maya1
from fastmaya_cli.checkpoints import random_snac
from fastmaya_cli.codec import SnacDecoder, random_codes, to_dtype
from fastmaya_cli.render import decode_and_upsample
from fastmaya_cli.upsample import load_upsampler

BATCH = 16
BATCHES = int(os.environ.get("PROFILE_BATCHES", "12"))
REPEAT = 3
BATCH_SIZES = (1, 2, 4, 8, 16, 32)
QUICK = os.environ.get("PROFILE_QUICK") == "1"  # throughputs and TF32 only
FIRST = os.environ.get("PROFILE_FIRST") == "1"  # only the first pass over the chunks against the second


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def kernels(title: str, run) -> str:  # noqa: ANN001
    cuda = torch.cuda.is_available()
    activity = torch.profiler.ProfilerActivity.CUDA if cuda else torch.profiler.ProfilerActivity.CPU
    with torch.profiler.profile(activities=[activity]) as profile:
        run()
        sync()
    sort_by = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    return f"{title}\n" + profile.key_averages().table(sort_by=sort_by, row_limit=25)


def timed(run, repeat: int = REPEAT) -> float:  # noqa: ANN001
    run()
    sync()
    walls = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        sync()
        walls.append(time.perf_counter() - started)
    return statistics.median(walls)


def snr_db(reference: torch.Tensor, other: torch.Tensor) -> float:
    error = (reference - other.float()).pow(2).sum().item()
    return round(10 * np.log10(reference.pow(2).sum().item() / max(error, 1e-30)), 1)


def decoder_parser() -> argparse.ArgumentParser:
    """The arguments of the decoder's development scripts (this one and decoder_memory.py)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--weights", required=True, help="SpeechSR-48k weights")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda", help="cpu: a smoke test on a tiny SNAC")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/fastmaya-bench-models"))
    return parser


def main() -> None:
    args = decoder_parser().parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    rng = np.random.default_rng(0)
    seconds = rng.uniform(4, 16, BATCH * BATCHES)
    frames = [max(1, round(s * maya1.SNAC_RATE / maya1.SAMPLES_PER_FRAME)) for s in seconds]
    codes = [random_codes(f, rng) for f in frames]
    batches = [range(i, i + BATCH) for i in range(0, len(codes), BATCH)]
    audio_s = sum(frames) * maya1.SAMPLES_PER_FRAME / maya1.SNAC_RATE
    path = random_snac(args.cache, tiny=device.type == "cpu")
    decoder = SnacDecoder(path, device)
    upsampler = load_upsampler("speechsr", weights=args.weights, device=device, compile=True)
    report: dict = {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "audio_s": round(audio_s, 1),
    }

    def snac_only(d: SnacDecoder = decoder) -> list[torch.Tensor]:
        return [d.decode([codes[i] for i in b], list(b))[0] for b in batches]

    snac_audio = [a.clone() for a in snac_only()]
    lengths = [[codes[i].frames * maya1.SAMPLES_PER_FRAME for i in b] for b in batches]

    def upsample_only() -> None:
        for audio, length in zip(snac_audio, lengths, strict=True):
            upsampler(audio, length)

    def both() -> None:
        for b in batches:
            decode_and_upsample(decoder, upsampler, [codes[i] for i in b], seeds=list(b))

    if FIRST:
        # The first pass meets every call shape for the first time in this process (cuDNN, cuFFT and
        # Triton set up per shape); the second reuses them.
        for attempt in ("first", "second"):
            started = time.perf_counter()
            both()
            sync()
            report[f"decode_and_upsample_{attempt}_pass_s"] = round(time.perf_counter() - started, 3)
        print(json.dumps(report), flush=True)
        return
    for name, run in (("snac", snac_only), ("upsampler", upsample_only), ("decode_and_upsample", both)):
        report[f"{name}_audio_s_per_s"] = round(audio_s / timed(run), 1)
    print(json.dumps(report), flush=True)

    # The same codes decoded with the fused path's matrix products in full float32 (tf32=False).
    full = SnacDecoder(path, device, tf32=False)
    reference = torch.cat([a.flatten() for a in snac_only(full)])
    report["snac_float32_products_audio_s_per_s"] = round(
        audio_s / timed(lambda full=full: snac_only(full)), 1
    )
    report["snac_tf32_products_snr_db"] = snr_db(reference, torch.cat([a.flatten() for a in snac_audio]))
    del full
    print(json.dumps(report), flush=True)
    if QUICK:
        (args.out / "decoder-profile.json").write_text(json.dumps(report, indent=2))
        return

    # The render's decoder takes what has finished, often fewer chunks than it may: what a call of each
    # size costs, the same chunks in all.
    for size in BATCH_SIZES:

        def in_calls_of(size: int = size) -> None:
            for start in range(0, len(codes), size):
                take = range(start, min(start + size, len(codes)))
                decode_and_upsample(decoder, upsampler, [codes[i] for i in take], seeds=list(take))

        report[f"decode_and_upsample_{size}_a_call_audio_s_per_s"] = round(audio_s / timed(in_calls_of, 1), 1)
    print(json.dumps(report), flush=True)

    tables = [kernels("SNAC (TF32 products)", snac_only), kernels("Upsampler", upsample_only)]

    for name, dtype in (("float16", torch.float16), ("bfloat16", torch.bfloat16)):
        try:
            low = SnacDecoder(path, device)
            to_dtype(low.model, dtype)
            report[f"snac_{name}_audio_s_per_s"] = round(audio_s / timed(lambda low=low: snac_only(low)), 1)
            report[f"snac_{name}_snr_db"] = snr_db(
                reference, torch.cat([a.flatten() for a in snac_only(low)])
            )
            if name == "float16":
                tables.append(kernels("SNAC, float16", lambda low=low: snac_only(low)))
            del low
        except Exception as exc:  # noqa: BLE001 - a development probe: report and go on
            report[f"snac_{name}_error"] = f"{type(exc).__name__}: {exc}"[:300]
        print(json.dumps(report), flush=True)
    (args.out / "decoder-kernels.txt").write_text("\n\n".join(tables))
    (args.out / "decoder-profile.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
