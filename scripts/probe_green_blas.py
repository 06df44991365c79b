"""Does the decoder beside the engine fail on a CUDA green context at a render's call sizes, and does telling
cuBLAS the green context's SM count (green.limit_blas_to_sms) matter? Run Z6 (BENCHMARKS.md) failed in cuBLAS
decoding a render on 32 SMs in the engine's worker, while the GPU tests' small calls on 16 SMs passed.

The worker's decoder service, in this process (no LMDeploy), decodes the render's largest calls
(render.warm_up_batches) on all SMs and then on N, three times over, and prints one JSON line (PROBE ...) with
each call's time and the largest difference between the two, relative to the call's peak.

    bash scripts/gpu-session.sh python3 scripts/probe_green_blas.py --sms 32 --blas-target off
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from pathlib import Path

import numpy as np

from fastmaya_cli import beside, green
from fastmaya_cli.checkpoints import random_snac
from fastmaya_cli.render import warm_up_batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sms", type=int, default=32, help="SMs of the green context")
    parser.add_argument("--blas-target", choices=("on", "off"), default="on", help="off: cuBLAS is not told")
    parser.add_argument("--upsampler-weights", default=None, help="SpeechSR weights (default: resample)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if args.blas_target == "off":
        green.limit_blas_to_sms = lambda sms, device_index=0: None
    snac = str(random_snac(Path("/tmp/fastmaya-gpu-tests"), tiny=False))
    weights = args.upsampler_weights
    spec = beside.DecoderSpec(snac, "speechsr" if weights else "resample", weights, 16, 2048, warm=False)
    ours, theirs = multiprocessing.Pipe()
    beside.DecoderService(spec, "cuda:0", theirs)
    remote = beside.RemoteDecoder(ours, "cuda:0")
    report: dict = {
        "sms": args.sms,
        "blas_target": args.blas_target,
        "upsampler": spec.upsampler,
        "calls": [],
    }
    try:
        for turn in range(args.repeat):
            for chunks in warm_up_batches(16, 2048):
                seeds = list(range(len(chunks)))
                started = time.perf_counter()
                everywhere = remote.decode(chunks, seeds)
                all_s = time.perf_counter() - started
                started = time.perf_counter()
                on_few = remote.decode(chunks, seeds, sms=args.sms)
                few_s = time.perf_counter() - started
                difference = max(
                    float(np.abs(a - b).max()) / max(1e-9, float(np.abs(a).max()))
                    for a, b in zip(everywhere, on_few, strict=True)
                )
                report["calls"].append(
                    {
                        "turn": turn,
                        "all_sms_s": round(all_s, 4),
                        "few_sms_s": round(few_s, 4),
                        "rel_diff": difference,
                    }
                )
        report["ok"] = True
    except Exception as exc:  # the failure is the finding: report it and end normally
        report["ok"] = False
        report["error"] = f"{type(exc).__name__}: {exc}"[:600]
    report["decoder_cpu_s"] = round(remote.cpu_s, 3)
    ours.close()
    print("PROBE", json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
