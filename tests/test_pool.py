"""EnginePool: several real (scripted) engines in spawned processes behind one Engine interface."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest

from fastmaya_cli import cores
from fastmaya_cli.engines import Generation, Request
from fastmaya_cli.engines.feed import RequestFeed, batches
from fastmaya_cli.engines.pool import (
    EnginePool,
    EngineSpec,
    WorkerFeed,
    engine_depth,
    placement,
    worker_names,
)
from fastmaya_cli.engines.scripted import ScriptedEngine
from fastmaya_cli.errors import InputError, RuntimeFailure

SCRIPTED = "fastmaya_cli.engines.scripted:ScriptedEngine"


def make_requests(n: int, seed_base: int = 0) -> list[Request]:
    return [
        Request(i, (128259, 128000, 40 + i % 7), seed=seed_base + i, max_new_tokens=210 + 21 * (i % 5))
        for i in range(n)
    ]


def single_engine_results(requests: list[Request]) -> dict[int, Generation]:
    return {g.chunk_index: g for g in ScriptedEngine().generate(requests)}


def collect(pool: EnginePool, requests: list[Request]) -> dict[int, Generation]:
    generations = list(pool.generate(requests))
    counts = Counter(g.chunk_index for g in generations)
    assert counts == Counter(r.chunk_index for r in requests), "every request must be answered exactly once"
    return {g.chunk_index: g for g in generations}


def process_gone(pid: int) -> bool:
    """Exited (a zombie left for a container's init to reap counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def report_environment(device: str, **_: object) -> None:
    """A factory that fails on purpose, so its message shows what the worker saw."""
    seen = {
        k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "NCCL_NVLS_ENABLE", "NVSHMEM_DISABLE_NVLS")
    }
    raise RuntimeError(f"device={device} env={seen}")


@pytest.fixture(autouse=True)
def fail_instead_of_hanging() -> Iterator[None]:
    # A pool that loses a chunk would wait for it forever; make that a failure, not a stuck suite.
    def hung(*_: object) -> None:
        raise TimeoutError("the test did not finish within 60 s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def pair() -> Iterator[EnginePool]:
    # A little delay keeps workers busy when a run is cancelled, so stale results really occur.
    pool = EnginePool(EngineSpec(SCRIPTED, {"delay_s": 0.001}), ["cpu", "cpu"], inflight_per_worker=8)
    yield pool
    pool.close()


def test_every_request_is_answered_once_and_matches_one_engine(pair: EnginePool) -> None:
    requests = make_requests(200)
    assert collect(pair, requests) == single_engine_results(requests)


def test_both_workers_share_the_work(pair: EnginePool) -> None:
    before = pair.stats()
    requests = make_requests(120, seed_base=1000)
    results = collect(pair, requests)
    after = pair.stats()
    assert set(after) == {"cpu#0", "cpu#1"}
    done = {name: after[name]["chunks"] - before[name]["chunks"] for name in after}
    assert all(n > 0 for n in done.values()), done
    assert sum(done.values()) == len(requests)
    tokens = sum(after[name]["tokens"] - before[name]["tokens"] for name in after)
    assert tokens >= sum(len(g.token_ids) for g in results.values())


def test_closing_the_iterator_early_cancels_the_run_and_the_pool_stays_usable(pair: EnginePool) -> None:
    first = pair.generate(make_requests(200, seed_base=5))
    taken = [next(first) for _ in range(3)]
    assert len({g.chunk_index for g in taken}) == 3
    with pytest.raises(RuntimeError, match="previous iterator"):
        next(pair.generate(make_requests(2)))
    first.close()
    # Same chunk indices, other seeds: a result left over from the cancelled run would not match.
    requests = make_requests(200, seed_base=777)
    assert collect(pair, requests) == single_engine_results(requests)
    assert list(pair.generate([])) == []


def test_ctrl_c_reaching_the_workers_is_left_to_the_parent() -> None:
    events: list[str] = []
    with EnginePool(EngineSpec(SCRIPTED), ["cpu", "cpu"], on_event=events.append) as pool:
        for stats in pool.stats().values():
            os.kill(stats["pid"], signal.SIGINT)  # a terminal's Ctrl-C goes to the whole group
        requests = make_requests(30)
        assert collect(pool, requests) == single_engine_results(requests)
        assert all(s["alive"] for s in pool.stats().values())
    assert events == []


@dataclass
class DelayedEngine(ScriptedEngine):
    """Takes requests one at a time, like ScriptedEngine, but is slow on chosen attempts (by seed)."""

    seed_delays: dict[int, float] = field(default_factory=dict)

    def generate(self, requests: Iterable[Request]) -> Iterator[Generation]:
        self.calls += 1
        for request in requests:
            time.sleep(self.delay_s + self.seed_delays.get(request.seed, 0.0))
            yield self._generation(request, "ok")


@dataclass
class ContinuousEngine(ScriptedEngine):
    """Keeps up to `slots` requests running, like a continuously batching engine: every tick it tops
    up from what its feed has ready (waiting only when it runs nothing), and a request runs for 3-6
    ticks. It writes to `log` how many slots were busy at each tick and the last tick it took a request."""

    slots: int = 4
    tick_s: float = 0.02  # long enough that a pause of the parent process (a full GC) cannot drain a feed
    log: str = ""

    def generate(self, requests: RequestFeed) -> Iterator[Generation]:  # type: ignore[override]
        self.calls += 1
        running: dict[int, list] = {}
        occupancy: list[int] = []
        last_pull = -1
        try:
            while True:
                taken = []
                if not running:
                    first = requests.next_request(wait=True)
                    if first is None:
                        return
                    taken.append(first)
                taken += requests.take_ready(self.slots - len(running) - len(taken))
                for request in taken:
                    running[request.chunk_index] = [request, 3 + request.chunk_index % 4]
                if taken:
                    last_pull = len(occupancy)
                occupancy.append(len(running))
                time.sleep(self.tick_s)
                for index, entry in list(running.items()):
                    entry[1] -= 1
                    if entry[1] == 0:
                        del running[index]
                        yield self._generation(entry[0], "ok")
        finally:
            Path(self.log).write_text(json.dumps({"occupancy": occupancy, "last_pull": last_pull}))


def wait_until(condition: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_an_idle_worker_copies_a_slow_workers_chunks_and_each_is_delivered_once() -> None:
    # cpu#0 answers 0-3 at once and is then idle; cpu#1 needs 0.3 s for each of 4-7. cpu#0 gets
    # copies of them, so the run ends long before cpu#1's 1.2 s, and cpu#1's late answers are dropped.
    spec = EngineSpec(SCRIPTED, per_device_kwargs={"cpu#1": {"delay_s": 0.3}})
    with EnginePool(spec, ["cpu", "cpu"], inflight_per_worker=4) as pool:
        requests = make_requests(8)
        started = time.monotonic()
        assert collect(pool, requests) == single_engine_results(requests)
        elapsed = time.monotonic() - started
        assert wait_until(lambda: pool.stats()["cpu#1"]["discarded"] >= 1), pool.stats()
        stats = pool.stats()
    assert stats["cpu#0"]["chunks"] > 4, stats
    assert stats["cpu#0"]["chunks"] + stats["cpu#1"]["chunks"] == 8
    assert elapsed < 0.9, "cpu#1's chunks should have been answered by cpu#0's copies"


def test_each_worker_calls_generate_once_per_run_and_is_refilled_while_it_works() -> None:
    with EnginePool(EngineSpec(SCRIPTED, {"delay_s": 0.003}), ["cpu", "cpu"], inflight_per_worker=4) as pool:
        for run in (1, 2):
            requests = make_requests(80, seed_base=100 * run)
            assert collect(pool, requests) == single_engine_results(requests)
            stats = pool.stats()
            # Each worker got far more chunks than it may hold at once, all within one generate call.
            assert all(s["generate_calls"] == run for s in stats.values()), stats
            assert all(s["chunks"] > 4 * run for s in stats.values()), stats
            assert all(s["inflight"] == 4 for s in stats.values())
        assert wait_until(lambda: all(s["busy_s"] > 0 for s in pool.stats().values()))


def test_a_continuously_batching_engine_is_kept_full_until_the_book_runs_out(tmp_path) -> None:
    logs = {name: tmp_path / f"{name}.json" for name in ("cpu#0", "cpu#1")}
    spec = EngineSpec(
        f"{__name__}:ContinuousEngine",
        per_device_kwargs={name: {"log": str(log)} for name, log in logs.items()},
    )
    # Each worker may hold 24 chunks, 4 running and 20 queued in its feed, and is topped up as they finish.
    with EnginePool(spec, ["cpu", "cpu"], inflight_per_worker=24, speculative_tail=False) as pool:
        requests = make_requests(160)
        assert collect(pool, requests) == single_engine_results(requests)
        assert wait_until(lambda: all(log.exists() for log in logs.values()))
        stats = pool.stats()
    assert all(s["generate_calls"] == 1 and s["chunks"] > 24 for s in stats.values()), stats
    for name, log in logs.items():
        record = json.loads(log.read_text())
        before_the_end = record["occupancy"][: record["last_pull"]]
        short = [i for i, busy in enumerate(before_the_end) if busy < 4]
        stretches = [i for i in short if i - 1 not in short]
        # A pool that refilled only after a batch drained would leave slots empty at every refill; one
        # stretch is allowed for a stall of the whole test process on a busy machine.
        assert len(stretches) <= 1, (name, short, record)
        assert len(before_the_end) > 30, record


def test_a_request_feed_with_retries_is_read_lazily_and_served_to_the_end() -> None:
    pulled: list[int] = []

    def source() -> Iterator[Request]:
        for request in make_requests(60):
            pulled.append(request.chunk_index)
            yield request

    feed = RequestFeed(source())
    received: list[Generation] = []
    retries: dict[int, Request] = {}
    pulled_at_first_result = None
    with EnginePool(EngineSpec(SCRIPTED, {"delay_s": 0.01}), ["cpu", "cpu"], inflight_per_worker=4) as pool:
        for generation in pool.generate(feed):
            received.append(generation)
            index = generation.chunk_index
            retry = None
            first_answers = len({g.chunk_index for g in received})
            # Retry the first chunk answered and the last one (when nothing else is left to do).
            if index not in retries and (len(received) == 1 or first_answers == 60):
                if pulled_at_first_result is None:
                    pulled_at_first_result = len(pulled)
                retry = retries[index] = Request(index, (128259, 1), seed=5000 + index, max_new_tokens=231)
            feed.resolved(retry)
    assert len(retries) == 2 and len(received) == 62
    assert Counter(g.chunk_index for g in received) == Counter([*range(60), *retries])
    final = {g.chunk_index: g for g in received}
    expected = single_engine_results(make_requests(60)) | single_engine_results(list(retries.values()))
    assert final == expected
    # Two workers holding 4 each: the feed is read as they have room, not all at once.
    assert pulled_at_first_result is not None and pulled_at_first_result <= 20, pulled_at_first_result


def test_a_failing_feed_reaches_the_caller_and_the_pool_stays_usable(pair: EnginePool) -> None:
    def source() -> Iterator[Request]:
        yield from make_requests(5)
        raise InputError("Chunk 5 has no text.", "Fix the book.")

    with pytest.raises(InputError, match="Chunk 5"):
        list(pair.generate(RequestFeed(source())))
    repeated = make_requests(3)
    with pytest.raises(ValueError, match="chunk 0 was requested again"):
        list(pair.generate(RequestFeed([*repeated, repeated[0]])))
    requests = make_requests(20, seed_base=300)
    assert collect(pair, requests) == single_engine_results(requests)


def test_a_late_answer_to_an_earlier_attempt_is_not_taken_for_the_retry() -> None:
    # cpu#1 holds chunks 2-3 and is slow on chunk 3's first attempt (seed 3); idle cpu#0 copies it and
    # answers first (0.3 s). The caller retries chunk 3 (seed 103, 0.4 s), which cannot go to cpu#1
    # while it still runs the first attempt; cpu#1's answer to that (0.6 s) comes while the retry is
    # still out, and must not be delivered as the retry's.
    spec = EngineSpec(
        f"{__name__}:DelayedEngine",
        per_device_kwargs={
            "cpu#0": {"seed_delays": {3: 0.3, 103: 0.4}},
            "cpu#1": {"seed_delays": {3: 0.6, 103: 0.4}},
        },
    )
    retry = Request(3, (128259, 128000, 43), seed=103, max_new_tokens=252)
    feed = RequestFeed(make_requests(4))
    received: list[Generation] = []
    with EnginePool(spec, ["cpu", "cpu"], inflight_per_worker=2) as pool:
        for generation in pool.generate(feed):
            received.append(generation)
            feed.resolved(retry if generation.chunk_index == 3 and len(received) < 5 else None)
        assert wait_until(lambda: pool.stats()["cpu#1"]["discarded"] >= 1), pool.stats()
    assert [g.chunk_index for g in received].count(3) == 2 and len(received) == 5
    assert received[-1] == single_engine_results([retry])[3]
    assert {g.chunk_index: g for g in received} == single_engine_results([*make_requests(3), retry])


def test_a_worker_feed_gives_a_batching_engine_what_is_ready_and_ends_with_the_run() -> None:
    feed = WorkerFeed(run_id=1)
    feed.add(make_requests(3))
    batched = batches(feed, 8)
    assert [r.chunk_index for r in next(batched)] == [0, 1, 2]  # no waiting for a full batch
    threading.Timer(0.1, feed.add, (make_requests(5)[3:],)).start()
    assert [r.chunk_index for r in next(batched)] == [3, 4]  # waits only while it has nothing
    threading.Timer(0.1, feed.end).start()
    assert next(batched, None) is None
    feed.add(make_requests(2))  # after the run is over nothing more is taken
    assert feed.take_ready(2) == []


def test_engine_depth_follows_what_the_engine_holds() -> None:
    assert engine_depth(ScriptedEngine()) is None
    assert engine_depth(SimpleNamespace(max_inflight=512, max_batch=256)) == 512
    assert engine_depth(SimpleNamespace(max_batch=16)) == 32
    assert engine_depth(SimpleNamespace(max_batch=True)) is None


def test_closing_the_iterator_frees_busy_workers_promptly() -> None:
    with EnginePool(EngineSpec(SCRIPTED, {"delay_s": 0.25}), ["cpu", "cpu"], inflight_per_worker=8) as pool:
        first = pool.generate(make_requests(16))
        next(first)
        first.close()  # each worker still holds about 7 chunks (1.75 s) of the cancelled run
        started = time.monotonic()
        requests = make_requests(2, seed_base=50)
        assert collect(pool, requests) == single_engine_results(requests)
        assert time.monotonic() - started < 1.0


def test_a_slow_worker_does_fewer_chunks_and_close_leaves_no_process() -> None:
    spec = EngineSpec(SCRIPTED, per_device_kwargs={"cpu#1": {"delay_s": 0.02}})
    pool = EnginePool(spec, ["cpu", "cpu"], inflight_per_worker=4)
    try:
        requests = make_requests(80)
        assert collect(pool, requests) == single_engine_results(requests)
        stats = pool.stats()
        assert stats["cpu#1"]["chunks"] < stats["cpu#0"]["chunks"], stats
    finally:
        pool.close()
    assert all(process_gone(s["pid"]) for s in stats.values())


def test_a_worker_that_dies_has_its_chunks_requeued() -> None:
    # Only cpu#1 dies, and on any chunk past its first window (0-3 go to cpu#0, 4-7 to cpu#1).
    dying = {"faults": {i: ["die"] for i in range(8, 60)}}
    spec = EngineSpec(SCRIPTED, per_device_kwargs={"cpu#0": {"delay_s": 0.005}, "cpu#1": dying})
    events: list[str] = []
    pool = EnginePool(spec, ["cpu", "cpu"], inflight_per_worker=4, on_event=events.append)
    try:
        requests = make_requests(60)
        assert collect(pool, requests) == single_engine_results(requests)
        stats = pool.stats()
    finally:
        pool.close()
    # It dies on the first chunk of its refill, holding that and what else was sent meanwhile.
    assert len(events) == 1 and re.fullmatch(
        r"worker cpu#1 died \(exit 17\); re-queued [1-4] chunks to the others", events[0]
    )
    assert not stats["cpu#1"]["alive"] and stats["cpu#1"]["chunks"] == 4
    assert stats["cpu#0"]["chunks"] == 56


def test_all_workers_dying_is_a_runtime_failure() -> None:
    spec = EngineSpec(SCRIPTED, {"faults": {i: ["die"] for i in range(40)}})
    events: list[str] = []
    pool = EnginePool(spec, ["cpu", "cpu"], inflight_per_worker=4, on_event=events.append)
    try:
        with pytest.raises(RuntimeFailure, match=r"Every engine worker has stopped.*died \(exit 17\)"):
            list(pool.generate(make_requests(40)))
        with pytest.raises(RuntimeFailure, match="Every engine worker has stopped"):
            list(pool.generate(make_requests(3)))
    finally:
        pool.close()
    assert len(events) == 1 and re.fullmatch(r"worker cpu#[01] died \(exit 17\); re-queued \d+ .*", events[0])


def test_an_engine_that_cannot_be_built_is_a_runtime_failure_naming_the_devices() -> None:
    with pytest.raises(
        RuntimeFailure, match=r"on any device: cpu#0, cpu#1: ModuleNotFoundError: .*no_such_engine"
    ):
        EnginePool(EngineSpec("fastmaya_cli.engines.no_such_engine:Engine"), ["cpu", "cpu"])
    with pytest.raises(RuntimeFailure, match="module:callable"):
        EnginePool(EngineSpec("fastmaya_cli.engines.scripted"), ["cpu"])


def test_one_worker_failing_to_build_leaves_the_others_working() -> None:
    spec = EngineSpec(SCRIPTED, per_device_kwargs={"cpu#1": {"no_such_option": 1}})
    events: list[str] = []
    with EnginePool(spec, ["cpu", "cpu"], inflight_per_worker=4, on_event=events.append) as pool:
        assert len(events) == 1
        assert events[0].startswith("worker cpu#1 could not start (TypeError:")
        assert events[0].endswith("continuing with 1 others")
        requests = make_requests(10)
        assert collect(pool, requests) == single_engine_results(requests)
        assert pool.stats()["cpu#0"]["chunks"] == 10


def test_a_worker_sees_only_its_own_gpu_and_multicast_off() -> None:
    parent_visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    with pytest.raises(RuntimeFailure, match="on cuda:3") as failure:
        EnginePool(EngineSpec(f"{__name__}:report_environment"), ["cuda:3"])
    message = str(failure.value)
    assert "device=cuda:0" in message
    assert "'CUDA_VISIBLE_DEVICES': '3'" in message
    assert "'NCCL_NVLS_ENABLE': '0'" in message and "'NVSHMEM_DISABLE_NVLS': '1'" in message
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == parent_visible


class CollectingEngine(ScriptedEngine):
    """Leaves a reference cycle and runs a full collection for each chunk."""

    def generate(self, requests: Iterable[Request]) -> Iterator[Generation]:
        import gc

        for request in requests:
            cycle: list = []
            cycle.append(cycle)
            gc.collect()
            yield Generation(request.chunk_index, (), "error", error="collected")


def test_a_workers_garbage_collections_are_counted_and_timed() -> None:
    with EnginePool(EngineSpec(f"{__name__}:CollectingEngine"), ["cpu"]) as pool:
        before = next(iter(pool.stats().values()))
        assert len(list(pool.generate(make_requests(5)))) == 5
        (after,) = pool.stats().values()
    assert after["gc_full"] - before["gc_full"] >= 5
    assert after["gc_s"] > before["gc_s"]


def engine_that_does_not_fit(**_: object) -> None:
    raise RuntimeFailure("The model does not fit on the GPU.", "Lower --gpu-memory.")


def test_a_single_workers_own_error_reaches_the_user_with_its_fix() -> None:
    # One GPU runs its engine in one worker: the user must see the engine's advice, not the pool's.
    with pytest.raises(RuntimeFailure) as failure:
        EnginePool(EngineSpec(f"{__name__}:engine_that_does_not_fit"), ["cpu"])
    assert failure.value.problem == "The model does not fit on the GPU."
    assert failure.value.fix == "Lower --gpu-memory."
    # With several workers the failures are summed up per device, each with its own text.
    with pytest.raises(
        RuntimeFailure, match=r"any device: cpu#0, cpu#1: RuntimeFailure: The model does not fit"
    ):
        EnginePool(EngineSpec(f"{__name__}:engine_that_does_not_fit"), ["cpu", "cpu"])


def test_placement_counts_within_the_parents_visible_gpus() -> None:
    assert placement("cuda:1", "4,6")[0] == "cuda:0"
    assert placement("cuda:1", "4,6")[1]["CUDA_VISIBLE_DEVICES"] == "6"
    assert placement("cuda:2", None)[1]["CUDA_VISIBLE_DEVICES"] == "2"
    assert "OMP_NUM_THREADS" not in placement("cuda:2", None, cpu_threads=3)[1]
    device, env = placement("cpu", "0", cpu_threads=3)
    assert device == "cpu" and "CUDA_VISIBLE_DEVICES" not in env and env["NCCL_NVLS_ENABLE"] == "0"
    assert env["OMP_NUM_THREADS"] == "3"
    assert worker_names(["cuda:0", "cuda:1", "cpu", "cpu"]) == ["cuda:0", "cuda:1", "cpu#0", "cpu#1"]


def test_keyboard_interrupt_stops_every_worker() -> None:
    pool = EnginePool(EngineSpec(SCRIPTED, {"delay_s": 0.05}), ["cpu", "cpu"], inflight_per_worker=4)
    pids = [s["pid"] for s in pool.stats().values()]

    ctrl_c = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
    ctrl_c.start()
    started = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            list(pool.generate(make_requests(400)))
        assert time.monotonic() - started < 5
        assert all(process_gone(pid) for pid in pids), "the interrupt itself must stop the workers"
    finally:
        ctrl_c.cancel()
        pool.close()
    with pytest.raises(RuntimeFailure, match="closed"):
        list(pool.generate(make_requests(1)))


PARENT_THAT_DIES = """
import os, sys, threading
from fastmaya_cli.engines import Request
from fastmaya_cli.engines.pool import EnginePool, EngineSpec
if __name__ == "__main__":
    pool = EnginePool(EngineSpec("fastmaya_cli.engines.scripted:ScriptedEngine", {"delay_s": 60}), ["cpu", "cpu"])
    print(*(s["pid"] for s in pool.stats().values()), flush=True)
    results = pool.generate([Request(i, (1,), seed=i) for i in range(4)])
    threading.Timer(0.5, os._exit, (0,)).start()
    next(results)
"""


def test_workers_do_not_outlive_a_parent_that_dies_mid_run(tmp_path) -> None:
    script = tmp_path / "parent.py"
    script.write_text(PARENT_THAT_DIES)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    pids = [int(p) for p in done.stdout.split()]
    assert len(pids) == 2, done.stderr
    deadline = time.monotonic() + 10
    while not all(process_gone(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(process_gone(pid) for pid in pids)


@pytest.mark.slow
def test_two_hf_workers_give_what_one_hf_engine_gives(tiny_model) -> None:
    import torch

    from fastmaya_cli import maya1
    from fastmaya_cli.engines.hf import HFEngine

    encode = maya1.load_encoder(tiny_model)
    texts = ["One.", "Two words.", "A longer third sentence here.", "Four."]
    requests = [
        Request(
            i,
            maya1.prompt_ids(encode, "Calm narrator", text),
            seed=40 + i,
            max_new_tokens=14,
            min_new_tokens=14,
        )
        for i, text in enumerate(texts)
    ]
    spec = EngineSpec("fastmaya_cli.engines.hf:HFEngine", {"model": str(tiny_model), "max_batch": 2})
    with EnginePool(spec, ["cpu", "cpu"], inflight_per_worker=2) as pool:
        results = collect(pool, requests)
        stats = pool.stats()
    # Same thread count as each worker had (see placement), so the arithmetic is the same too.
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))
    single = HFEngine(tiny_model, device="cpu", max_batch=6)
    try:
        assert results == {g.chunk_index: g for g in single.generate(requests)}
    finally:
        single.close()
        torch.set_num_threads(threads)
    assert all(s["chunks"] > 0 and s["tokens"] > 0 for s in stats.values()), stats


@dataclass
class ThreadedEngine(ScriptedEngine):
    """A scripted engine with a thread of its own that stands for LMDeploy's scheduler thread."""

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        thread = threading.Thread(target=self._stop.wait, daemon=True)
        thread.start()
        self.scheduler_thread_id = thread.native_id

    def close(self) -> None:
        self._stop.set()


def affinities(pid: int | None = None) -> dict[int, set[int]]:
    return {tid: os.sched_getaffinity(tid) for tid in cores.thread_ids(pid)}


@pytest.fixture
def one_core_a_cpu(monkeypatch: pytest.MonkeyPatch) -> tuple[set[int], set[int]]:
    """Each allowed CPU counted as a core and any CPU enough for the rest, so a 2-CPU machine can keep
    one; returns the CPU the scheduler should get and those everything else should."""
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        pytest.skip("placing threads needs at least two CPUs")
    monkeypatch.setattr(cores, "physical_cores", lambda cpus, *_: [frozenset({c}) for c in sorted(cpus)])
    monkeypatch.setattr(cores, "MIN_CPUS_LEFT", 1)
    return {allowed[-1]}, set(allowed[:-1])


def test_the_scheduler_thread_has_a_core_of_its_own_and_every_other_thread_stays_off_it(
    one_core_a_cpu,
) -> None:
    kept, others = one_core_a_cpu
    everywhere = kept | others
    with EnginePool(EngineSpec(f"{__name__}:ThreadedEngine"), ["cpu"]) as pool:
        assert pool.core_plan == cores.CorePlan((frozenset(kept),), frozenset(others))
        assert wait_until(lambda: next(iter(pool.stats().values()))["scheduler_cpus"] == sorted(kept))
        (worker,) = pool.stats().values()
        scheduler = worker["scheduler_thread"]
        in_worker = affinities(worker["pid"])
        assert in_worker.pop(scheduler) == kept
        assert in_worker and all(cpus == others for cpus in in_worker.values())
        assert all(cpus == others for cpus in affinities().values())  # this process's threads
        child = subprocess.run(
            [sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"],
            capture_output=True,
            text=True,
            check=True,
        )
        assert child.stdout.strip() == str(sorted(others))  # and what it starts, an encoder say
        requests = make_requests(20)
        assert collect(pool, requests) == single_engine_results(requests)

        assert pool.keep_scheduler_cores(False) is None
        # The worker answers once every thread of its own is placed.
        assert wait_until(lambda: pool.stats()[worker["device"]]["scheduler_cpus"] is None)
        assert all(cpus == everywhere for cpus in affinities(worker["pid"]).values())
        assert all(cpus == everywhere for cpus in affinities().values())

        assert pool.keep_scheduler_cores(True) is not None
        assert wait_until(lambda: os.sched_getaffinity(scheduler) == kept)
        assert all(cpus == others for cpus in affinities().values())
    assert all(cpus == everywhere for cpus in affinities().values())  # closing frees this process again


def test_an_engine_without_a_scheduler_thread_leaves_every_cpu_to_everyone(one_core_a_cpu) -> None:
    kept, others = one_core_a_cpu
    with EnginePool(EngineSpec(SCRIPTED), ["cpu"]) as pool:
        assert pool.core_plan is None
        assert pool.keep_scheduler_cores(True) is None
        (worker,) = pool.stats().values()
        assert worker["scheduler_thread"] is None and worker["scheduler_cpus"] is None
        assert all(cpus == kept | others for cpus in affinities().values())
        assert all(cpus == kept | others for cpus in affinities(worker["pid"]).values())
