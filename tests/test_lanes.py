"""A lane runs calls in order on a thread of its own, holds the caller back when full, and stops at the
first failure."""

from __future__ import annotations

import threading
import time

import pytest

from fastmaya_cli.lanes import Lane


def test_calls_run_in_order_on_another_thread() -> None:
    lane = Lane("test-lane", depth=3)
    seen: list[tuple[int, str]] = []
    for number in range(50):
        lane.submit(lambda n: seen.append((n, threading.current_thread().name)), number)
    lane.join()
    assert [n for n, _ in seen] == list(range(50))
    assert {name for _, name in seen} != {threading.current_thread().name}
    assert all(name.startswith("test-lane") for _, name in seen)


def test_a_full_lane_holds_the_caller_back() -> None:
    lane = Lane("test-lane", depth=2)
    release = threading.Event()
    lane.submit(release.wait)  # runs, and blocks the lane
    lane.submit(lambda: None)  # 2 in the lane: one running, one waiting
    submitted = threading.Event()

    def one_more() -> None:
        lane.submit(lambda: None)
        submitted.set()

    caller = threading.Thread(target=one_more)
    caller.start()
    assert not submitted.wait(0.3)  # held back while the lane is full
    release.set()
    assert submitted.wait(5)
    caller.join()
    lane.join()


def test_a_failure_stops_the_lane_and_reaches_the_caller() -> None:
    lane = Lane("test-lane", depth=4)
    ran: list[int] = []
    gate = threading.Event()
    lane.submit(gate.wait)

    def fail() -> None:
        raise OSError("disk full")

    lane.submit(fail)
    lane.submit(ran.append, 1)  # queued behind the failure: must never run
    gate.set()
    with pytest.raises(OSError, match="disk full"):
        for number in range(2, 100):
            lane.submit(ran.append, number)
        lane.join()
    assert ran == [] and lane.stopped


def test_join_raises_a_failure_of_the_last_call() -> None:
    lane = Lane("test-lane")

    def fail() -> None:
        raise ValueError("bad block")

    lane.submit(fail)
    with pytest.raises(ValueError, match="bad block"):
        lane.join()


def test_cancel_drops_what_has_not_started() -> None:
    lane = Lane("test-lane", depth=8)
    gate = threading.Event()
    ran: list[int] = []
    lane.submit(gate.wait)
    for number in range(5):
        lane.submit(ran.append, number)
    lane.cancel(wait=False)
    gate.set()
    lane.cancel()  # now waits for the running call
    assert ran == [] and lane.stopped


def test_busy_time_counts_the_calls_not_the_waits_between_them() -> None:
    lane = Lane("test-lane", depth=2)
    assert lane.busy_s == 0.0
    lane.submit(time.sleep, 0.2)
    lane.join()
    time.sleep(0.2)  # idle: not counted
    assert 0.2 <= lane.busy_s < 0.35


def test_a_failing_call_counts_as_busy_too() -> None:
    lane = Lane("test-lane", depth=2)

    def slow_failure() -> None:
        time.sleep(0.1)
        raise RuntimeError("boom")

    lane.submit(slow_failure)
    with pytest.raises(RuntimeError, match="boom"):
        lane.join()
    assert lane.busy_s >= 0.1
