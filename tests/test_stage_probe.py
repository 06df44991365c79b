"""The bench's per-stage view of the machine: CPU seconds per thread, the host's stolen time, GPU samples."""

from __future__ import annotations

import os
import stat
import threading
import time
from pathlib import Path

import pytest

from fastmaya_cli import stage_probe
from fastmaya_cli.stage_probe import (
    GpuSampler,
    StageProbe,
    busiest_thread_change,
    engine_pids,
    host_cpu_seconds,
    process_cpu_seconds,
    process_times,
    summarise_gpu_samples,
    thread_cpu_seconds,
)

linux_only = pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads Linux's /proc")


def _spin(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


@linux_only
def test_the_busiest_thread_is_the_one_that_burned_the_cpu_and_ended_threads_still_count():
    spun, release = threading.Event(), threading.Event()

    def spin_then_wait() -> None:
        _spin(0.4)
        spun.set()
        release.wait()

    with StageProbe(object(), gpu_interval_ms=100) as probe:
        alive = threading.Thread(target=spin_then_wait)
        alive.start()
        ended = threading.Thread(target=_spin, args=(0.3,))
        ended.start()
        ended.join()
        assert spun.wait(30)  # done spinning, but still alive when the probe reads it
    release.set()
    alive.join()
    notes = probe.notes
    assert 0.35 <= notes["engine_busiest_thread_cpu_s"] < 0.6  # the live spinner, not the ended one
    assert notes["engine_cpu_s"] >= 0.65  # both spinners, the ended one too
    assert 0 <= notes["engine_system_cpu_s"] < notes["engine_cpu_s"]
    assert notes["engine_minor_faults"] >= 0
    assert "engine_gc_s" not in notes  # an engine without a pool's statistics
    assert 0 < notes["engine_busiest_thread_share"] <= 1.05
    assert abs(notes["started_unix"] - time.time()) < 60
    assert "renderer_cpu_s" not in notes  # this process is the engine's here


@linux_only
def test_beside_an_engine_of_its_own_this_process_reports_its_cpu_apart():
    with StageProbe(_Pool([os.getppid()]), gpu_interval_ms=100) as probe:
        _spin(0.3)
    assert probe.notes["renderer_cpu_s"] >= 0.29


def _fake_task(root: Path, pid: int, tid: int, comm: str, utime: int, stime: int) -> None:
    task = root / str(pid) / "task" / str(tid)
    task.mkdir(parents=True)
    # Fields 3 to 13 (state ... cmajflt), then utime (14) and stime (15), then the rest.
    rest = ["S"] + ["0"] * 10 + [str(utime), str(stime)] + ["0"] * 30
    (task / "stat").write_text(f"{tid} ({comm}) {' '.join(rest)}\n")


def test_thread_times_are_read_past_a_command_name_with_spaces_and_parentheses(tmp_path):
    tick = os.sysconf("SC_CLK_TCK")
    _fake_task(tmp_path, 7, 7, "python3", utime=3 * tick, stime=tick)
    _fake_task(tmp_path, 7, 9, "sched (a) b", utime=10 * tick, stime=2 * tick)
    assert thread_cpu_seconds(7, tmp_path) == {7: 4.0, 9: 12.0}
    assert thread_cpu_seconds(8, tmp_path) == {}  # a process that is gone


def test_the_busiest_thread_is_found_across_processes_and_new_threads_count_from_zero():
    before = {1: {1: 1.0, 2: 5.0}, 2: {3: 0.5}}
    assert busiest_thread_change(before, {1: {1: 1.5, 2: 9.0}, 2: {3: 2.5}}) == pytest.approx(4.0)
    assert busiest_thread_change(before, {1: {1: 1.5, 4: 6.0}, 2: {3: 2.5}}) == pytest.approx(6.0)
    assert busiest_thread_change({}, {}) == 0.0


def test_process_times_are_read_past_a_command_name_with_parentheses(tmp_path):
    tick = os.sysconf("SC_CLK_TCK")
    (tmp_path / "5").mkdir()
    rest = ["S"] + ["0"] * 10 + [str(6 * tick), str(2 * tick)] + ["0"] * 30
    (tmp_path / "5" / "stat").write_text(f"5 (a) b) {' '.join(rest)}\n")
    assert process_cpu_seconds(5, tmp_path) == 8.0
    assert process_cpu_seconds(6, tmp_path) is None


def test_host_idle_includes_iowait_and_steal_is_its_own(tmp_path):
    tick = os.sysconf("SC_CLK_TCK")
    values = [10, 0, 5, 100, 20, 0, 0, 7, 0, 0]  # user nice system idle iowait irq softirq steal ...
    (tmp_path / "stat").write_text("cpu  " + " ".join(str(v * tick) for v in values) + "\ncpu0 1 2 3\n")
    assert host_cpu_seconds(tmp_path) == {"idle": 120.0, "steal": 7.0}
    assert host_cpu_seconds(tmp_path / "missing") == {}


def test_gpu_samples_are_averaged_per_gpu_and_unreadable_lines_skipped():
    lines = [
        "0, 1980, 90, 500.5\n",
        "1, 1000, 10, 100\n",
        "0, 1780, 70, 400.5\n",
        "0, [N/A], 50, 300\n",
        "0, 1980\n",  # cut off when the sampler stopped
    ]
    assert summarise_gpu_samples(lines) == {
        "0": {"sm_mhz": 1880, "load_pct": 80.0, "power_w": 450.5, "samples": 2},
        "1": {"sm_mhz": 1000, "load_pct": 10.0, "power_w": 100.0, "samples": 1},
    }


def _fake_nvidia_smi(folder: Path) -> Path:
    script = folder / "nvidia-smi"
    script.write_text(
        '#!/bin/sh\necho "$@" > "$(dirname "$0")/argv"\nwhile true; do echo "0, 1500, 60, 250"; sleep 0.05; done\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


@pytest.mark.skipif(os.name != "posix", reason="a shell script stands in for nvidia-smi")
def test_the_gpu_sampler_reads_nvidia_smi_until_the_block_ends(tmp_path):
    script = _fake_nvidia_smi(tmp_path)
    with GpuSampler(interval_ms=50, command=str(script)) as sampler:
        time.sleep(0.4)
    summary = sampler.summary()
    assert summary["0"]["sm_mhz"] == 1500 and summary["0"]["samples"] >= 2
    argv = (tmp_path / "argv").read_text()
    assert f"--query-gpu={stage_probe.GPU_QUERY}" in argv and "--loop-ms=50" in argv
    count = len(sampler.lines)
    time.sleep(0.2)
    assert len(sampler.lines) == count  # stopped with the block


def test_without_nvidia_smi_there_are_no_gpu_figures(tmp_path):
    with GpuSampler(command=str(tmp_path / "no-such-program")) as sampler:
        pass
    assert sampler.summary() == {}


class _Pool:
    """An engine pool's statistics, as EnginePool.stats gives them."""

    def __init__(self, pids: list[int], gc_s: float = 0.0, gc_full: int = 0) -> None:
        self.pids, self.gc_s, self.gc_full = pids, gc_s, gc_full

    def stats(self) -> dict:
        return {
            f"cuda:{i}": {"pid": pid, "gc_s": self.gc_s, "gc_full": self.gc_full}
            for i, pid in enumerate(self.pids)
        }


def test_an_engine_pool_gives_its_workers_pids_and_any_other_engine_this_process():
    assert engine_pids(_Pool([11, 12])) == [11, 12]
    assert engine_pids(object()) == [os.getpid()]


def test_the_workers_garbage_collection_during_the_stage_is_summed_over_workers():
    pool = _Pool([os.getppid(), os.getppid()], gc_s=1.5, gc_full=4)
    with StageProbe(pool, gpu_interval_ms=100) as probe:
        pool.gc_s, pool.gc_full = 2.0, 7
    assert probe.notes["engine_gc_s"] == 1.0
    assert probe.notes["engine_gc_full"] == 6


def test_process_times_split_user_and_system_and_count_minor_faults(tmp_path):
    tick = os.sysconf("SC_CLK_TCK")
    (tmp_path / "5").mkdir()
    rest = ["S", "1", "1", "1", "0", "0", "0", "123", "0", "4", "0", str(6 * tick), str(2 * tick)] + [
        "0"
    ] * 30
    (tmp_path / "5" / "stat").write_text(f"5 (x) {' '.join(rest)}\n")
    assert process_times(5, tmp_path) == {"user": 6.0, "system": 2.0, "minor_faults": 123}
