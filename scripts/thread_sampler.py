"""Where the renderer's threads spend a render, sampled from inside the process (a development tool).

Runs `fastmaya` with the given arguments while a thread samples every other thread's stack every
10 ms (``sys._current_frames``) and counts, per thread and per phase of each render (generation, then
the tail and the finish), the innermost three frames. Writes the counts as JSON to $THREAD_SAMPLES
(default thread-samples.json). Python-level only: time inside C (a pipe write, a CUDA wait) shows as
the Python line that called it.

    THREAD_SAMPLES=out.json python3 scripts/thread_sampler.py bench --stages novel --limit 1500 ...
"""

from __future__ import annotations

import collections
import json
import os
import sys
import threading
import time

PERIOD_S = 0.01
DEPTH = 3

phase = "start"
counts: dict[str, dict[str, collections.Counter]] = collections.defaultdict(
    lambda: collections.defaultdict(collections.Counter)
)
samples: collections.Counter = collections.Counter()


def sample() -> None:
    me = threading.get_ident()
    while True:
        time.sleep(PERIOD_S)
        names = {thread.ident: thread.name for thread in threading.enumerate()}
        current = phase
        samples[current] += 1
        for ident, frame in sys._current_frames().items():
            if ident == me:
                continue
            stack = []
            while frame is not None and len(stack) < DEPTH:
                code = frame.f_code
                stack.append(f"{os.path.basename(code.co_filename)}:{code.co_name}:{frame.f_lineno}")
                frame = frame.f_back
            name = names.get(ident, str(ident))
            name = name.split("_")[0] if name.startswith("fastmaya-early") else name
            counts[current][name][" < ".join(stack)] += 1


def main() -> None:
    global phase
    from fastmaya_cli import cli, render

    real_generate, real_render_states = render.Renderer._generate, render.Renderer._render_states
    renders = iter(range(1000))

    def generate(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        global phase
        number = next(renders)
        phase = f"render{number}-generation"
        try:
            return real_generate(self, *args, **kwargs)
        finally:
            phase = f"render{number}-after"

    def render_states(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        global phase
        try:
            return real_render_states(self, *args, **kwargs)
        finally:
            phase = "between"

    render.Renderer._generate = generate
    render.Renderer._render_states = render_states
    threading.Thread(target=sample, name="sampler", daemon=True).start()
    try:
        sys.argv = ["fastmaya", *sys.argv[1:]]
        cli.main()
    except SystemExit:
        pass
    finally:
        report = {
            "period_s": PERIOD_S,
            "samples": dict(samples),
            "phases": {
                phase_name: {
                    thread: dict(counter.most_common(12)) for thread, counter in threads.items()
                }
                for phase_name, threads in counts.items()
            },
        }
        with open(os.environ.get("THREAD_SAMPLES", "thread-samples.json"), "w") as out:
            json.dump(report, out, indent=1)


if __name__ == "__main__":
    main()
