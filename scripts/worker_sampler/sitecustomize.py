"""Where every Python process of a run spends its threads, LMDeploy's engine worker included (a
development tool; scripts/thread_sampler.py sees only the renderer's own process).

Put this folder first on PYTHONPATH and set WORKER_SAMPLES to a folder: each Python process then
samples its threads' stacks every 20 ms (``sys._current_frames``) and rewrites
WORKER_SAMPLES/<pid>.json every 10 s and at exit. Counts are kept per 15-s window of wall time (the
window's unix start), so they line up with the bench rows' `started_unix`, and per thread as
  - `self`: the innermost three frames (where the thread is), and
  - `inclusive`: every function on the stack, once per sample (what it is inside).
Python-level only: time in C shows as the Python line that called it.

    WORKER_SAMPLES=/tmp/s PYTHONPATH=scripts/worker_sampler:$PYTHONPATH fastmaya bench ...
"""

from __future__ import annotations

import os

if os.environ.get("WORKER_SAMPLES"):
    import atexit
    import collections
    import json
    import sys
    import threading
    import time

    PERIOD_S = 0.02
    WINDOW_S = 15
    SELF_DEPTH = 3
    KEEP_SELF, KEEP_INCLUSIVE = 25, 40

    folder = os.environ["WORKER_SAMPLES"]
    windows: dict = collections.defaultdict(
        lambda: collections.defaultdict(
            lambda: {"samples": 0, "self": collections.Counter(), "inclusive": collections.Counter()}
        )
    )
    lock = threading.Lock()

    def _where(code, line: int) -> str:  # noqa: ANN001
        return f"{os.path.basename(code.co_filename)}:{code.co_name}:{line}"

    def _sample_forever() -> None:
        me = threading.get_ident()
        last_write = time.time()
        while True:
            time.sleep(PERIOD_S)
            now = time.time()
            window = int(now // WINDOW_S * WINDOW_S)
            names = {thread.ident: thread.name for thread in threading.enumerate()}
            with lock:
                for ident, frame in sys._current_frames().items():
                    if ident == me:
                        continue
                    tally = windows[window][names.get(ident, str(ident))]
                    tally["samples"] += 1
                    inner, seen = [], set()
                    while frame is not None:
                        code = frame.f_code
                        if len(inner) < SELF_DEPTH:
                            inner.append(_where(code, frame.f_lineno))
                        seen.add(f"{os.path.basename(code.co_filename)}:{code.co_name}")
                        frame = frame.f_back
                    tally["self"][" < ".join(inner)] += 1
                    tally["inclusive"].update(seen)
            if now - last_write > 10:
                _write()
                last_write = now

    def _write() -> None:
        with lock:
            report = {
                "pid": os.getpid(),
                "argv": sys.argv,
                "period_s": PERIOD_S,
                "window_s": WINDOW_S,
                "windows": {
                    str(window): {
                        thread: {
                            "samples": tally["samples"],
                            "self": dict(tally["self"].most_common(KEEP_SELF)),
                            "inclusive": dict(tally["inclusive"].most_common(KEEP_INCLUSIVE)),
                        }
                        for thread, tally in threads.items()
                    }
                    for window, threads in windows.items()
                },
            }
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{os.getpid()}.json")
        with open(path + ".part", "w") as out:
            json.dump(report, out)
        os.replace(path + ".part", path)

    threading.Thread(target=_sample_forever, name="stack-sampler", daemon=True).start()
    atexit.register(_write)
