"""Which CPUs the engine's scheduler thread keeps to itself, read from the kernel's CPU topology."""

from __future__ import annotations

from pathlib import Path

import pytest

from fastmaya_cli import cores


def fake_topology(root: Path, siblings: dict[int, str]) -> Path:
    for cpu, text in siblings.items():
        folder = root / f"cpu{cpu}" / "topology"
        folder.mkdir(parents=True)
        (folder / "thread_siblings_list").write_text(text + "\n")
    return root


@pytest.mark.parametrize(
    ("text", "cpus"),
    [("0-3,8,10-11", {0, 1, 2, 3, 8, 10, 11}), ("5", {5}), ("0,4", {0, 4}), ("", set())],
)
def test_a_kernel_cpu_list_is_read_into_its_cpus(text: str, cpus: set[int]) -> None:
    assert cores.parse_cpu_list(text) == cpus


def test_smt_siblings_make_one_core_and_only_allowed_cpus_count(tmp_path: Path) -> None:
    root = fake_topology(tmp_path, {c: f"{c % 4},{c % 4 + 4}" for c in range(8)})
    assert cores.physical_cores(range(8), root) == [{0, 4}, {1, 5}, {2, 6}, {3, 7}]
    # A process allowed only some CPUs sees only those in each core.
    assert cores.physical_cores({0, 1, 5}, root) == [{0}, {1, 5}]


def test_a_cpu_without_readable_topology_is_a_core_of_its_own(tmp_path: Path) -> None:
    root = fake_topology(tmp_path, {0: "0-1", 1: "0-1"})
    assert cores.physical_cores([0, 1, 2, 3], root) == [{0, 1}, {2}, {3}]


def test_each_scheduler_gets_a_core_from_the_end_and_the_rest_go_to_everything_else() -> None:
    eight = [frozenset({c, c + 8}) for c in range(8)]
    plan = cores.plan_cores(eight, 1)
    assert plan == cores.CorePlan(schedulers=(frozenset({7, 15}),), others=frozenset(range(16)) - {7, 15})
    two = cores.plan_cores(eight, 2)
    assert two is not None and two.schedulers == (frozenset({6, 14}), frozenset({7, 15}))
    assert two.others.isdisjoint({6, 14, 7, 15}) and len(two.others) == 12


def test_no_core_is_kept_where_too_few_cpus_would_be_left() -> None:
    four_smt = [frozenset({c, c + 4}) for c in range(4)]
    assert cores.plan_cores(four_smt, 1) is not None  # 6 CPUs left
    assert cores.plan_cores(four_smt, 2) is None  # 4 left
    assert cores.plan_cores([frozenset({0}), frozenset({1})], 1) is None  # a 2-core machine
    assert cores.plan_cores([frozenset({c}) for c in range(16)], 0) is None  # nothing to place
