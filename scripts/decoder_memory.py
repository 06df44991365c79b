"""How much GPU memory the decoder's caching allocator holds over a render's worth of batches (a
development tool).

SNAC and the SpeechSR upsampler (as `render.decode_and_upsample`) on random codes in batches like a
render's: 1 to 16 chunks of 1 to 18 s each. Prints, and appends as one JSON line to OUT/decoder-memory.jsonl:
the memory reserved after each tenth of the batches, the device allocations, frees and retries, the
peak allocated, and audio seconds per second. Run it once plain and once with
PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to compare the two allocators; `--warm` first decodes
the renderer's warm-up batches (render.warm_up_batches):

    python3 scripts/decoder_memory.py --weights .devdata/speechsr48k.pth --out /tmp/memory

`--device cpu` is a smoke test on a tiny SNAC (no allocator figures).
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import torch
from profile_decoder import decoder_parser  # beside this script

from fastmaya_cli import maya1
from fastmaya_cli.checkpoints import random_snac
from fastmaya_cli.codec import SnacDecoder, random_codes
from fastmaya_cli.render import decode_and_upsample, warm_up_batches
from fastmaya_cli.upsample import load_upsampler


def allocator() -> dict[str, float]:
    if not torch.cuda.is_available():
        return {}
    stats = torch.cuda.memory_stats()
    return {
        "reserved_gib": round(torch.cuda.memory_reserved() / 2**30, 2),
        "peak_allocated_gib": round(stats.get("allocated_bytes.all.peak", 0) / 2**30, 2),
        "device_allocs": stats.get("num_device_alloc", 0),
        "device_frees": stats.get("num_device_free", 0),
        "alloc_retries": stats.get("num_alloc_retries", 0),
    }


def main() -> None:
    parser = decoder_parser()
    parser.add_argument("--batches", type=int, default=400)
    parser.add_argument("--warm", action="store_true", help="first decode the renderer's warm-up batches")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    rng = np.random.default_rng(0)
    decoder = SnacDecoder(random_snac(args.cache, tiny=device.type == "cpu"), device)
    upsampler = load_upsampler("speechsr", weights=args.weights, device=device, compile=device.type == "cuda")
    warm = {}
    if args.warm:  # as Renderer.warm_decoder does before the engine starts
        for codes in warm_up_batches(16, 2048):
            decode_and_upsample(decoder, upsampler, codes, seeds=list(range(len(codes))))
        warm = {"after_warm_up": allocator()}
    step = max(1, args.batches // 10)
    trail, audio_s, started = [], 0.0, time.perf_counter()
    for index in range(args.batches):
        seconds = rng.uniform(1, 18, int(rng.integers(1, 17)))
        frames = [max(1, round(s * maya1.SNAC_RATE / maya1.SAMPLES_PER_FRAME)) for s in seconds]
        decode_and_upsample(
            decoder, upsampler, [random_codes(f, rng) for f in frames], seeds=list(range(len(frames)))
        )
        audio_s += sum(frames) * maya1.SAMPLES_PER_FRAME / maya1.SNAC_RATE
        if (index + 1) % step == 0:
            trail.append(allocator().get("reserved_gib"))
    wall = time.perf_counter() - started
    row = {
        "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
        "batches": args.batches,
        "audio_s": round(audio_s, 1),
        "audio_s_per_s": round(audio_s / wall, 1),
        "reserved_gib_by_tenth": trail,
        **warm,
        **allocator(),
    }
    print(json.dumps(row), flush=True)
    with (args.out / "decoder-memory.jsonl").open("a") as log:
        log.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
