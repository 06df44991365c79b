"""The render's assembler given a whole book of real speech at once, lane by lane (a development tool).

This is what happens at the end of a render: the speech the assembler has not written yet arrives together.
It prints how fast `add` took the book, the finish's steps, and each lane's working and CPU seconds, so a
change to the assembler can be timed against the code before it on the same machine, taking turns: put the
old tree first on PYTHONPATH for the anchor.

    python3 scripts/assembler_burst.py --minutes 60 --workers 16 --data-dir .devdata
    PYTHONPATH=/tmp/old/src python3 scripts/assembler_burst.py ...   # the anchor: `git archive REV src`

`fastmaya bench --stages finish` has the same book in its `burst` row, for the code as it is.
"""

from __future__ import annotations

import argparse
import collections
import resource
import tempfile
import threading
import time
from pathlib import Path

import soundfile as sf

from fastmaya_cli import lanes
from fastmaya_cli.assemble import Assembler, BookInfo, OutputSpec, Pauses, expected_length
from fastmaya_cli.bench import SPEECH_48K, finish_book


def _time_lanes() -> tuple[dict[str, float], dict[str, float]]:
    """Wrap every lane's calls to add up, per lane thread and call, their wall and CPU seconds."""
    busy: dict[str, float] = collections.defaultdict(float)
    cpu: dict[str, float] = collections.defaultdict(float)
    run = lanes.Lane._run

    def timed(self: lanes.Lane, call, args):  # noqa: ANN001, ANN202
        began, began_cpu = time.perf_counter(), time.thread_time()
        try:
            return run(self, call, args)
        finally:
            name = f"{threading.current_thread().name.split('_')[0]}:{getattr(call, '__name__', call)}"
            busy[name] += time.perf_counter() - began
            cpu[name] += time.thread_time() - began_cpu

    lanes.Lane._run = timed
    return busy, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=60.0, help="of speech in the book")
    parser.add_argument("--workers", type=int, default=None, help="the assembler's encode workers (CPUs)")
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    args = parser.parse_args()
    busy, cpu = _time_lanes()
    speech, rate = sf.read(str(args.data_dir / SPEECH_48K), dtype="float32", always_2d=True)
    book = finish_book(speech[:, 0], args.minutes * 60)
    seconds = expected_length([len(s.audio) for s in book], [s.boundary for s in book], Pauses(), rate) / rate
    with tempfile.TemporaryDirectory() as folder:
        info = BookInfo("Burst", "fastmaya", None, None, None)
        spec = OutputSpec(Path(folder) / "burst.m4b", "m4b", loudness="acx", info=info)
        with Assembler(spec, encode_workers=args.workers, expected_seconds=seconds) as assembler:
            began, began_cpu = time.perf_counter(), time.thread_time()
            for segment in book:
                assembler.add(segment)
            added, added_cpu = time.perf_counter(), time.thread_time()
            result = assembler.finish()
            finished = time.perf_counter()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(
        f"audio {result.duration:.1f} s: add {added - began:.2f} s ({result.duration / (added - began):.1f} "
        f"audio s/s, this thread's CPU {added_cpu - began_cpu:.2f} s), finish {finished - added:.2f} s"
    )
    for name in sorted(busy):
        print(f"  {name:40s} busy {busy[name]:.2f} s, CPU {cpu[name]:.2f} s")
    print(
        f"child processes' CPU {children.ru_utime + children.ru_stime:.1f} s; early parts {result.early_parts}"
    )
    print(f"lane_busy_s {result.lane_busy_s}; finish steps {result.finish_steps}")


if __name__ == "__main__":
    main()
