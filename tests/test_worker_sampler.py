"""scripts/worker_sampler: every Python process of a run, a spawned worker included, reports its threads."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

SAMPLER = Path(__file__).resolve().parents[1] / "scripts" / "worker_sampler"

PROGRAM = textwrap.dedent(
    """
    import multiprocessing, threading, time

    def spin(seconds):
        end = time.time() + seconds
        while time.time() < end:
            sum(range(200))

    def worker_busy_function():
        spin(0.8)

    def parent_busy_function():
        spin(0.8)

    if __name__ == "__main__":
        child = multiprocessing.get_context("spawn").Process(target=worker_busy_function)
        child.start()
        side = threading.Thread(target=parent_busy_function, name="side-thread")
        side.start()
        side.join()
        child.join()
    """
)


def _reports(folder: Path) -> list[dict]:
    return [json.loads(path.read_text()) for path in folder.glob("*.json")]


def _inclusive(report: dict, thread: str) -> set[str]:
    names: set[str] = set()
    for threads in report["windows"].values():
        names.update(threads.get(thread, {}).get("inclusive", {}))
    return names


def test_sampler_reports_the_parent_and_its_spawned_worker(tmp_path: Path) -> None:
    program = tmp_path / "run.py"
    program.write_text(PROGRAM)
    samples = tmp_path / "samples"
    env = {**os.environ, "WORKER_SAMPLES": str(samples), "PYTHONPATH": str(SAMPLER)}
    done = subprocess.run(
        [sys.executable, str(program)], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr

    reports = _reports(samples)
    pids = {report["pid"] for report in reports}
    assert done.returncode == 0 and len(pids) >= 2  # the parent and the worker at least
    parent = [r for r in reports if "run.py:parent_busy_function" in _inclusive(r, "side-thread")]
    worker = [r for r in reports if "run.py:worker_busy_function" in _inclusive(r, "MainThread")]
    assert len(parent) == 1 and len(worker) == 1
    assert parent[0]["pid"] != worker[0]["pid"]
    side = next(iter(parent[0]["windows"].values()))["side-thread"]
    assert side["samples"] > 0 and any("spin" in stack for stack in side["self"])


def test_sampler_is_inert_without_its_variable(tmp_path: Path) -> None:
    program = tmp_path / "run.py"
    program.write_text(PROGRAM)
    env = {k: v for k, v in os.environ.items() if k != "WORKER_SAMPLES"}
    env["PYTHONPATH"] = str(SAMPLER)
    done = subprocess.run(
        [sys.executable, str(program)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert not list(tmp_path.rglob("*.json"))
