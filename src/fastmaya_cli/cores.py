"""A CPU core of its own for each GPU engine's scheduler thread.

LMDeploy's PyTorch engine schedules every decode step in Python on one thread, and on a fast GPU that thread
sets the pace of generation (BENCHMARKS.md). A render runs much else on the same host: AAC and FLAC encoders,
the assembler's lanes, the decoder's thread. Wherever one of them shares a core with the scheduler (the same
CPU, or its SMT sibling, which shares the core's pipelines and caches) the scheduler runs slower, and so does
the whole book. So each engine worker's scheduler thread is given one physical core, and every other thread
of the run, in the workers and in the renderer, with the encoders they start, is kept off it.

Only Linux can place threads; elsewhere, or with too few CPUs to spare one, nothing is placed.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

SYS_CPUS = Path("/sys/devices/system/cpu")
# Keep a core only where at least this many CPUs remain for the rest of the run (encoders, assembler,
# decoder): on a small machine a core taken from them costs more than the scheduler gains.
MIN_CPUS_LEFT = 6


@dataclass(frozen=True)
class CorePlan:
    """The CPUs of the core each scheduler thread has to itself, in worker order, and the CPUs for every
    other thread of the run."""

    schedulers: tuple[frozenset[int], ...]
    others: frozenset[int]


def parse_cpu_list(text: str) -> frozenset[int]:
    """The CPUs of a kernel CPU list such as "0-3,8,10-11"."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return frozenset(cpus)


def physical_cores(cpus: Iterable[int], sys_cpus: Path = SYS_CPUS) -> list[frozenset[int]]:
    """`cpus` grouped by physical core (SMT siblings together), in order of their lowest CPU. A CPU whose
    topology cannot be read counts as a core of its own."""
    allowed = frozenset(cpus)
    cores: dict[frozenset[int], None] = {}
    for cpu in sorted(allowed):
        siblings = frozenset({cpu})
        for name in ("core_cpus_list", "thread_siblings_list"):
            with suppress(OSError, ValueError):
                siblings = parse_cpu_list((sys_cpus / f"cpu{cpu}" / "topology" / name).read_text()) & allowed
                break
        cores[siblings or frozenset({cpu})] = None
    return sorted(cores, key=min)


def plan_cores(cores: Sequence[frozenset[int]], schedulers: int) -> CorePlan | None:
    """One core for each of `schedulers` threads, taken from the end of `cores` (CPU 0 takes most of the
    host's interrupts), and the rest for everything else; None when that would leave fewer than
    MIN_CPUS_LEFT CPUs for everything else, or there is nothing to place."""
    if schedulers < 1 or len(cores) <= schedulers:
        return None
    kept = tuple(cores[-schedulers:])
    others = frozenset().union(*cores[:-schedulers])
    if len(others) < MIN_CPUS_LEFT:
        return None
    return CorePlan(schedulers=kept, others=others)


def allowed_cpus() -> frozenset[int] | None:
    """The CPUs this process may run on; None where threads cannot be placed (not Linux)."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    return frozenset(os.sched_getaffinity(0))


def thread_ids(pid: int | None = None) -> list[int]:
    """The ids of the live threads of process `pid` (this one by default)."""
    with suppress(OSError):
        return sorted(int(t) for t in os.listdir(f"/proc/{pid or os.getpid()}/task") if t.isdigit())
    return []


def place_threads(cpus: Collection[int], *, except_ids: Collection[int] = ()) -> None:
    """Put every thread of this process but `except_ids` on `cpus`; threads and processes they start later
    inherit it. A thread that ended meanwhile is skipped."""
    for tid in thread_ids():
        if tid not in except_ids:
            place_thread(tid, cpus)


def place_thread(tid: int, cpus: Collection[int]) -> bool:
    """Put thread `tid` on `cpus`; False if it could not be placed."""
    try:
        os.sched_setaffinity(tid, cpus)
    except (OSError, AttributeError):
        return False
    return True
