"""What the machine did during one bench stage, beside the stage's own figures: CPU seconds of the engine's
processes (and of their busiest thread, LMDeploy's scheduler), the host's stolen and idle CPU time, and the
GPU's clock, load and power as nvidia-smi samples them.

The same LLM-only pass has run 1.29x faster at the fourth try than at the first in one process (BENCHMARKS.md,
run M3). These figures tell a slower CPU (the scheduler's thread busier for the same work, or time stolen by
the host), a slower GPU (a lower clock) and a busier GPU (its load) apart. Everything is read from /proc and
nvidia-smi; where either is missing the figures are left out, never guessed.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Iterable
from contextlib import suppress
from pathlib import Path

GPU_QUERY = "index,clocks.sm,utilization.gpu,power.draw"
GPU_SAMPLE_MS = 500


def _stat_times(stat: Path) -> dict[str, float] | None:
    """User and system CPU seconds and minor page faults from a process's or thread's /proc stat file (each
    fault a trip through the kernel, costly in a sandbox); None if it cannot be read (the task is gone)."""
    with suppress(OSError, ValueError, IndexError):
        # The command name (field 2) may hold spaces and parentheses: count fields after its last ')'.
        fields = stat.read_text().rpartition(")")[2].split()
        tick = os.sysconf("SC_CLK_TCK")
        return {
            "user": int(fields[11]) / tick,
            "system": int(fields[12]) / tick,
            "minor_faults": int(fields[7]),
        }
    return None


def thread_cpu_seconds(pid: int, proc: Path = Path("/proc")) -> dict[int, float]:
    """CPU seconds (user + system) each live thread of process `pid` has used; empty if it is gone."""
    seconds: dict[int, float] = {}
    with suppress(OSError):
        for task in (proc / str(pid) / "task").iterdir():
            times = _stat_times(task / "stat")
            if times is not None and task.name.isdigit():
                seconds[int(task.name)] = times["user"] + times["system"]
    return seconds


def process_times(pid: int, proc: Path = Path("/proc")) -> dict[str, float] | None:
    """Process `pid`'s CPU seconds in user and in system mode, its ended threads included, and its minor
    page faults; None if it is gone."""
    return _stat_times(proc / str(pid) / "stat")


def process_cpu_seconds(pid: int, proc: Path = Path("/proc")) -> float | None:
    """CPU seconds (user + system) process `pid` has used, its ended threads included; None if it is gone."""
    times = process_times(pid, proc)
    return None if times is None else times["user"] + times["system"]


def host_cpu_seconds(proc: Path = Path("/proc")) -> dict[str, float]:
    """The host's idle and stolen CPU seconds so far, summed over its CPUs (/proc/stat); empty without it."""
    tick = os.sysconf("SC_CLK_TCK")
    with suppress(OSError, ValueError, IndexError):
        first = (proc / "stat").read_text().splitlines()[0].split()
        if first[0] == "cpu":
            values = [int(v) for v in first[1:]]
            return {
                "idle": (values[3] + values[4]) / tick,
                "steal": (values[7] if len(values) > 7 else 0) / tick,
            }
    return {}


def busiest_thread_change(before: dict[int, dict[int, float]], after: dict[int, dict[int, float]]) -> float:
    """The most CPU seconds one thread used between two readings of thread_cpu_seconds per process. A thread
    that started in between counts from zero; one that ended in between is not seen."""
    return max(
        (
            seconds - before.get(pid, {}).get(tid, 0.0)
            for pid, threads in after.items()
            for tid, seconds in threads.items()
        ),
        default=0.0,
    )


def summarise_gpu_samples(lines: Iterable[str]) -> dict[str, dict[str, float]]:
    """Mean SM clock (MHz), load (%) and power (W) per GPU from nvidia-smi's `GPU_QUERY` CSV lines
    (no header, no units). Lines it cannot read ("[N/A]", a partial last line) are skipped."""
    sums: dict[str, list[float]] = {}
    for line in lines:
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 4:
            continue
        try:
            clock, load, power = (float(p) for p in parts[1:])
        except ValueError:
            continue
        entry = sums.setdefault(parts[0], [0.0, 0.0, 0.0, 0])
        entry[0] += clock
        entry[1] += load
        entry[2] += power
        entry[3] += 1
    return {
        index: {
            "sm_mhz": round(clock / n),
            "load_pct": round(load / n, 1),
            "power_w": round(power / n, 1),
            "samples": n,
        }
        for index, (clock, load, power, n) in sums.items()
    }


class GpuSampler:
    """nvidia-smi sampling the GPUs every `interval_ms` for as long as the `with` block runs."""

    def __init__(self, interval_ms: int = GPU_SAMPLE_MS, command: str = "nvidia-smi") -> None:
        self.command = command
        self.interval_ms = interval_ms
        self.lines: list[str] = []
        self._process: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None

    def __enter__(self) -> GpuSampler:
        argv = [
            self.command,
            f"--query-gpu={GPU_QUERY}",
            "--format=csv,noheader,nounits",
            f"--loop-ms={self.interval_ms}",
        ]
        try:
            self._process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
            )
        except OSError:  # no nvidia-smi here
            return self
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        for line in self._process.stdout:
            self.lines.append(line)

    def __exit__(self, *exc: object) -> None:
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        if self._reader is not None:
            self._reader.join(timeout=5)
        if self._process.stdout is not None:
            self._process.stdout.close()

    def summary(self) -> dict[str, dict[str, float]]:
        return summarise_gpu_samples(self.lines)


class StageProbe:
    """The machine's side of one stage (see the module's docstring) for `engine`'s processes (a pool's
    workers; this process for an engine that runs in it). `notes` holds the figures after the block."""

    def __init__(self, engine: object, gpu_interval_ms: int = GPU_SAMPLE_MS) -> None:
        self.engine = engine
        self.pids = engine_pids(engine)
        self.notes: dict = {}
        self._gpu = GpuSampler(gpu_interval_ms)

    def _threads(self) -> dict[int, dict[int, float]]:
        return {pid: thread_cpu_seconds(pid) for pid in self.pids}

    def _processes(self) -> dict[int, dict[str, float] | None]:
        return {pid: process_times(pid) for pid in self.pids}

    def _gc(self) -> tuple[float, int] | None:
        stats = getattr(self.engine, "stats", None)
        if not callable(stats):
            return None
        workers = stats().values()
        if not all("gc_s" in w for w in workers):
            return None
        return sum(w["gc_s"] for w in workers), sum(w["gc_full"] for w in workers)

    def __enter__(self) -> StageProbe:
        self._host = host_cpu_seconds()
        self._cpu = self._processes()
        self._gc_before = self._gc()
        self._own = process_cpu_seconds(os.getpid())
        self._before = self._threads()
        self._started = time.perf_counter()
        self._started_unix = time.time()
        self._gpu.__enter__()  # last: nothing after it can fail and leave nvidia-smi running
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            wall = time.perf_counter() - self._started
            busiest = busiest_thread_change(self._before, self._threads())
            cpu = self._processes()
            host = host_cpu_seconds()
        finally:
            self._gpu.__exit__(*exc)
        notes: dict = {"started_unix": round(self._started_unix, 1)}
        pairs = [
            (was, cpu[pid]) for pid, was in self._cpu.items() if was is not None and cpu[pid] is not None
        ]
        if pairs:
            user = sum(now["user"] - was["user"] for was, now in pairs)
            system = sum(now["system"] - was["system"] for was, now in pairs)
            notes["engine_cpu_s"] = round(user + system, 2)
            notes["engine_system_cpu_s"] = round(system, 2)
            notes["engine_minor_faults"] = sum(
                int(now["minor_faults"] - was["minor_faults"]) for was, now in pairs
            )
        gc_after = self._gc()
        if gc_after is not None and self._gc_before is not None:
            notes["engine_gc_s"] = round(gc_after[0] - self._gc_before[0], 2)
            notes["engine_gc_full"] = gc_after[1] - self._gc_before[1]
        own = process_cpu_seconds(os.getpid())
        if os.getpid() not in self.pids and own is not None and self._own is not None:
            notes["renderer_cpu_s"] = round(own - self._own, 2)  # decoding, assembling, planning
        if any(self._before.values()):
            notes["engine_busiest_thread_cpu_s"] = round(busiest, 2)
            notes["engine_busiest_thread_share"] = round(busiest / wall, 3) if wall else None
        if host and self._host:
            notes["host_steal_s"] = round(host["steal"] - self._host["steal"], 2)
            notes["host_idle_s"] = round(host["idle"] - self._host["idle"], 2)
        gpu = self._gpu.summary()
        if gpu:
            notes["gpu"] = gpu
        self.notes = notes


def engine_pids(engine: object) -> list[int]:
    """The processes an engine generates in: its pool's workers, else this process."""
    stats = getattr(engine, "stats", None)
    if callable(stats):
        pids = [entry["pid"] for entry in stats().values() if entry.get("pid")]
        if pids:
            return pids
    return [os.getpid()]
