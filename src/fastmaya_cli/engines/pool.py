"""One engine per device, each in its own process, fed from one shared queue.

Several GPUs render data-parallel. On one GPU the single worker still matters: LMDeploy's scheduler, Python
on one thread, then has an interpreter lock of its own instead of sharing the renderer's with decoding and
assembling (see `factory.worker_devices`).

Each worker calls its engine's `generate` once per run, on a feed that stays open for the whole run,
and the parent keeps that feed topped up: whenever the chunks a worker holds fall a little below its
depth (`inflight_per_worker`, by default what its engine asks for), the parent sends it more from the
book's pending queue. A continuously batching engine therefore never drains to its slowest chunk before
new chunks arrive, and a fast GPU simply takes more of the book than a slow one.

When nothing is left to hand out and a worker has nothing of its own to do while another still holds
unfinished chunks, the idle one is given copies of them (the first answer wins), so one slow or stuck
GPU cannot hold up the end of a run.

Each worker talks to the parent over its own pipe rather than a queue shared by all processes: a
worker killed in the middle of a `multiprocessing.Queue` operation can leave that queue's lock held
or its stream half-written for everybody else, while a dead pipe only affects its own worker. The
parent therefore knows exactly which chunks each worker holds, and re-queues them if it dies.

A background thread in the parent reads the pipes and hands out work, so workers keep generating
while the caller is busy with the results (decoding audio, writing files). When the caller passes a
`RequestFeed`, another thread pulls from it only as workers have room, so a retry that the caller adds
goes out next rather than behind the rest of the book.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import itertools
import math
import os
import queue
import signal
import threading
import time
import traceback
import weakref
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing import get_context
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_for_ready
from multiprocessing.process import BaseProcess
from typing import Any

from .. import cores
from ..errors import FastmayaError, InputError, RuntimeFailure
from . import Generation, Request
from .feed import RequestFeed

# Our multi-GPU hosts must run with NVLink multicast off (NCCL, torch symmetric memory, NVSHMEM).
WORKER_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}

DEFAULT_DEPTH = 256
_STOP_GRACE_S = 10.0
# How long keep_scheduler_cores waits for the workers to say they have placed their threads.
_PLACEMENT_WAIT_S = 5.0
_POLL_S = 0.5
# A worker is topped up once an eighth of its depth has come back: its engine stays at least 7/8 full
# without a message per chunk.
_REFILL_FRACTION = 8
# Requests pulled from a caller's feed in one go, so the first workers start before the rest are built.
_PULL_SLICE = 64


@dataclass(frozen=True)
class EngineSpec:
    """A picklable recipe for building an engine inside a worker process.

    `factory` is "module:callable" (the callable may be a class or a dotted attribute path). It is
    called with `kwargs`, then the worker's entry in `per_device_kwargs` (keyed by worker name, see
    `EnginePool`, or by device string), then `device=` the device the worker's engine should use.

    With a `decoder` (a beside.DecoderSpec), the first worker also loads the renderer's decoder, before
    its engine, and answers decode calls beside it (`EnginePool.beside_decoder`).
    """

    factory: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    per_device_kwargs: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    decoder: Any = None

    def __post_init__(self) -> None:
        # Plain dicts so the spec pickles whatever mapping type the caller used.
        object.__setattr__(self, "kwargs", dict(self.kwargs))
        object.__setattr__(self, "per_device_kwargs", {k: dict(v) for k, v in self.per_device_kwargs.items()})

    def kwargs_for(self, worker_name: str, device: str, engine_device: str) -> dict[str, Any]:
        extra = self.per_device_kwargs.get(worker_name, self.per_device_kwargs.get(device, {}))
        return {**self.kwargs, **extra, "device": engine_device}


def worker_names(devices: Sequence[str]) -> list[str]:
    """Unique names for the workers: the device string, with "#k" added when a device repeats."""
    counts = Counter(devices)
    seen: Counter[str] = Counter()
    names = []
    for device in devices:
        names.append(device if counts[device] == 1 else f"{device}#{seen[device]}")
        seen[device] += 1
    return names


def placement(device: str, visible: str | None, cpu_threads: int | None = None) -> tuple[str, dict[str, str]]:
    """The device a worker's engine uses and the environment it needs for it.

    "cuda:N" becomes "cuda:0" in a process that sees only GPU N; N counts within the parent's own
    CUDA_VISIBLE_DEVICES when that is set, as torch in the parent would count it. A CPU worker gets
    `cpu_threads` OpenMP threads, so that several CPU workers do not each claim every core.
    """
    env = dict(WORKER_ENV)
    kind, _, index = device.partition(":")
    if kind == "cpu" and cpu_threads:
        env["OMP_NUM_THREADS"] = str(cpu_threads)
    if kind != "cuda" or not index.isdigit():
        return device, env
    parent_visible = [d.strip() for d in visible.split(",") if d.strip()] if visible else []
    n = int(index)
    env["CUDA_VISIBLE_DEVICES"] = parent_visible[n] if n < len(parent_visible) else str(n)
    return "cuda:0", env


def engine_depth(engine: object) -> int | None:
    """How many requests an engine wants to hold: its own `max_inflight` (a continuously batching
    engine's running batch plus its queue), else two of its batches (one running, the next ready)."""
    for attr, factor in (("max_inflight", 1), ("max_batch", 2)):
        value = getattr(engine, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value * factor
    return None


def describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "stopped responding"
    if exitcode < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-exitcode).name}"
        return f"killed by signal {-exitcode}"
    return f"exit {exitcode}"


def _resolve(factory: str) -> Callable[..., Any]:
    module_name, _, attr_path = factory.partition(":")
    target: Any = importlib.import_module(module_name)
    for attr in attr_path.split("."):
        target = getattr(target, attr)
    return target


# --------------------------------------------------------------------------------------------------
# Worker process


class WorkerFeed(RequestFeed):
    """What the parent has sent one worker for one run, as the feed its engine's `generate` reads.

    It blocks only while it is empty and the run is open, and `take_ready` never waits, so an engine
    that batches (through `feed.batches`) or pulls from its own thread never waits for a request that
    the parent will only send once the engine's own results are in. It is finished once the parent has
    said that the run is over for this worker; what was queued then is dropped (it is all answered).
    """

    def __init__(self, run_id: int) -> None:
        super().__init__(())
        self.run_id = run_id
        self.pulled = 0
        self._queue: deque[Request] = deque()
        self._in_engine: dict[int, Request] = {}
        self._over = False
        self._busy_s = 0.0
        self._busy_since: float | None = None

    # ---- the engine's side

    def next_request(self, *, wait: bool) -> Request | None:
        with self._cond:
            while True:
                if self._queue:
                    request = self._queue.popleft()
                    self._in_engine[request.chunk_index] = request
                    self.pulled += 1
                    if self._busy_since is None:
                        self._busy_since = time.perf_counter()
                    return request
                if self._over or not wait:
                    return None
                self._cond.wait()

    def resolved(self, retry: Request | None = None) -> None:
        raise TypeError("a worker's feed takes no retries; the parent's feed does")

    def close(self) -> None:
        self.end()

    # ---- the worker's side

    @property
    def over(self) -> bool:
        with self._cond:
            return self._over

    def add(self, requests: Iterable[Request]) -> None:
        with self._cond:
            if not self._over:
                self._queue.extend(requests)
                self._cond.notify_all()

    def end(self) -> None:
        with self._cond:
            self._over = True
            self._queue.clear()
            self._cond.notify_all()

    def wait_for_work(self) -> None:
        with self._cond:
            while not self._queue and not self._over:
                self._cond.wait()

    def answered(self, chunk_index: int) -> None:
        with self._cond:
            self._in_engine.pop(chunk_index, None)
            if not self._in_engine:
                self._settle_busy()

    def take_unanswered(self) -> list[int]:
        """Chunks the engine took but gave no result for; they count as answered from now on."""
        with self._cond:
            missing = list(self._in_engine)
            self._in_engine.clear()
            self._settle_busy()
            return missing

    def busy_seconds(self) -> float:
        """Seconds so far during which the engine held at least one request of this run."""
        with self._cond:
            open_s = time.perf_counter() - self._busy_since if self._busy_since is not None else 0.0
            return self._busy_s + open_s

    def _settle_busy(self) -> None:
        if self._busy_since is not None:
            self._busy_s += time.perf_counter() - self._busy_since
            self._busy_since = None


class GcClock:
    """Seconds this process has spent in the garbage collector, and its full (oldest generation)
    collections. Each collection stops every thread, LMDeploy's scheduler included."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.full = 0
        self._began: float | None = None
        self._reported = (0.0, 0)

    def __call__(self, phase: str, info: Mapping[str, int]) -> None:
        if phase == "start":
            self._began = time.perf_counter()
        elif self._began is not None:
            self.seconds += time.perf_counter() - self._began
            self.full += info.get("generation") == 2
            self._began = None

    def install(self) -> GcClock:
        gc.callbacks.append(self)
        return self

    def since_reported(self) -> tuple[float, int]:
        """(seconds, full collections) since the last call."""
        now, then = (self.seconds, self.full), self._reported
        self._reported = now  # one reading: a collection in between is in the next report
        return now[0] - then[0], now[1] - then[1]


def _watch_parent(parent_pid: int) -> None:
    # A worker busy inside a long generate call would not notice its parent's death through the
    # pipe; without this it would keep the GPU until the batch ends.
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os._exit(0)


def _worker_main(
    spec: EngineSpec,
    name: str,
    device: str,
    engine_device: str,
    env: Mapping[str, str],
    conn: Connection,
    parent_pid: int,
    decode_conn: Connection | None = None,
) -> None:
    os.environ.update(env)  # inherited at spawn already; this guards against a changed environment
    # Ctrl-C reaches the whole process group; the parent decides how the workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    try:
        if decode_conn is not None:
            from ..beside import DecoderService

            DecoderService(spec.decoder, engine_device, decode_conn)  # serves on a thread of its own
        engine = _resolve(spec.factory)(**spec.kwargs_for(name, device, engine_device))
        if not callable(getattr(engine, "generate", None)):
            raise TypeError(f"{spec.factory} returned {type(engine).__name__}, which has no generate()")
    except BaseException as exc:  # report anything, including SystemExit from a library
        # An error meant for the user (a model that does not fit, say) keeps its own fix.
        advice = (exc.problem, exc.fix, exc.exit_code) if isinstance(exc, FastmayaError) else None
        with contextlib.suppress(OSError):
            _send(conn, ("build_error", f"{type(exc).__name__}: {exc}", advice))
        return
    try:
        scheduler = getattr(engine, "scheduler_thread_id", None)
        _send(
            conn, ("ready", getattr(engine, "name", type(engine).__name__), engine_depth(engine), scheduler)
        )
        _serve(engine, conn, name, GcClock().install(), scheduler)
    except (EOFError, OSError):
        pass  # the parent is gone
    except BaseException as exc:
        traceback.print_exc()  # the whole story on stderr; the parent tells the user the last line
        with contextlib.suppress(OSError):
            _send(conn, ("crash", f"{type(exc).__name__}: {exc}"))
        raise SystemExit(1) from None
    finally:
        with contextlib.suppress(Exception):
            engine.close()


def _place_worker_threads(
    conn: Connection, scheduler: int | None, scheduler_cpus: list[int] | None, others: list[int]
) -> None:
    """Give the engine's scheduler thread the CPUs of its own core and this worker's other threads
    `others`; with no `scheduler_cpus`, every thread goes on `others`. Tells the parent where the
    scheduler thread now runs (None: anywhere the others may)."""
    if scheduler is None:
        return
    if scheduler_cpus is None:
        cores.place_threads(others)
        _send(conn, ("cores", None))
        return
    cores.place_threads(others, except_ids={scheduler})
    placed = cores.place_thread(scheduler, scheduler_cpus)
    if not placed:
        cores.place_thread(scheduler, others)
    _send(conn, ("cores", scheduler_cpus if placed else None))


# The worker's main thread sends results while its reader thread may answer the parent.
_SEND_LOCK = threading.Lock()


def _send(conn: Connection, message: tuple[Any, ...]) -> None:
    with _SEND_LOCK:
        conn.send(message)


def _read_parent(
    conn: Connection, runs: queue.Queue[WorkerFeed | None], scheduler: int | None = None
) -> None:
    """The worker's reader thread: it fills the current run's feed while the engine generates."""
    current: WorkerFeed | None = None
    try:
        while True:
            message = conn.recv()
            kind = message[0]
            if kind == "work":
                _, run_id, requests = message
                if current is None or current.run_id != run_id:
                    if current is not None:
                        current.end()  # the parent starts a run only after the last one ended here
                    current = WorkerFeed(run_id)
                    runs.put(current)
                current.add(requests)
            elif kind == "cancel":
                if current is not None and current.run_id == message[1]:
                    current.end()
            elif kind == "cores":
                _place_worker_threads(conn, scheduler, message[1], message[2])
            elif kind == "stop":
                return
    except Exception:  # the parent is gone (EOF, OSError) or sent something unreadable: stop either way
        return
    finally:
        if current is not None:
            current.end()
        runs.put(None)


def _serve(engine: Any, conn: Connection, name: str, gc_clock: GcClock, scheduler: int | None = None) -> None:
    runs: queue.Queue[WorkerFeed | None] = queue.Queue()
    threading.Thread(
        target=_read_parent, args=(conn, runs, scheduler), name="fastmaya-worker-reader", daemon=True
    ).start()
    while (feed := runs.get()) is not None:
        reported_busy = _serve_run(engine, conn, feed, name, gc_clock)
        _send(conn, ("run_done", feed.run_id, feed.busy_seconds() - reported_busy))


def _serve_run(engine: Any, conn: Connection, feed: WorkerFeed, name: str, gc_clock: GcClock) -> float:
    """Generate for one run until the parent ends it; returns the busy seconds already reported."""
    reported_busy = 0.0
    calls = 0
    while not feed.over:
        if calls:
            # The engine returned while the run is still open (an engine that ends on an idle feed):
            # start it again once there is work rather than spin.
            feed.wait_for_work()
            if feed.over:
                break
        calls += 1
        _send(conn, ("generate", feed.run_id))
        pulled_before, produced = feed.pulled, 0
        results = iter(engine.generate(feed))
        try:
            for generation in results:
                feed.answered(generation.chunk_index)
                busy = feed.busy_seconds()
                _send(
                    conn, ("result", feed.run_id, generation, busy - reported_busy, gc_clock.since_reported())
                )
                reported_busy, produced = busy, produced + 1
                if feed.over:
                    break  # the run is over: what the engine still holds has been answered elsewhere
        finally:
            close = getattr(results, "close", None)
            if close is not None:
                close()
        missing = feed.take_unanswered()
        if feed.over:
            break
        for index in missing:
            error = f"the engine on {name} returned no result for this chunk"
            _send(conn, ("result", feed.run_id, Generation(index, (), "error", error=error), 0.0, (0.0, 0)))
        if not produced and feed.pulled == pulled_before:
            raise RuntimeError(f"{type(engine).__name__}.generate returned without taking a request")
    return reported_busy


# --------------------------------------------------------------------------------------------------
# Parent side

_ENV_LOCK = threading.Lock()


@contextlib.contextmanager
def _environment(values: Mapping[str, str]) -> Iterator[None]:
    """Set variables in this process while a child is spawned, so the child has them from its first
    instruction (before it imports torch or anything that initialises CUDA)."""
    with _ENV_LOCK:
        saved = {key: os.environ.get(key) for key in values}
        os.environ.update(values)
        try:
            yield
        finally:
            for key, old in saved.items():
                if old is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = old


@dataclass(frozen=True, eq=False)
class _Ticket:
    """One attempt at a chunk. A retry is a new ticket for the same chunk index, so a late answer to
    an earlier attempt (another worker's copy) is never taken for the retry's."""

    id: int
    request: Request

    @property
    def index(self) -> int:
        return self.request.chunk_index


@dataclass(eq=False)
class _Worker:
    name: str
    device: str
    process: BaseProcess
    conn: Connection
    depth: int = DEFAULT_DEPTH
    alive: bool = True
    in_run: bool = False  # its engine is generating for run `run_id` (until it reports run_done)
    run_id: int = -1
    assigned: dict[int, _Ticket] = field(default_factory=dict)  # by chunk index: sent, no result yet
    chunks: int = 0
    discarded: int = 0
    tokens: int = 0
    busy_s: float = 0.0
    gc_s: float = 0.0  # in its garbage collector, and its full collections
    gc_full: int = 0
    generate_calls: int = 0
    error: str = ""
    scheduler: int | None = None  # its engine's scheduler thread (see `cores`), if it has one
    scheduler_cpus: list[int] | None = None  # where that thread has a core of its own, as it reported
    placements: int = 0  # how many times it has reported placing its threads

    @property
    def refill_step(self) -> int:
        return max(1, self.depth // _REFILL_FRACTION)


@dataclass(eq=False)
class _Run:
    id: int
    feed: RequestFeed | None  # None: every request was given up front
    pending: deque[_Ticket] = field(default_factory=deque)  # not held by any worker
    live: dict[int, int] = field(default_factory=dict)  # chunk index -> the ticket whose answer counts
    dry: bool = False  # everything still to come is in `pending` or is a retry
    feed_finished: bool = False  # nothing more will come


def _stop_processes(workers: list[_Worker], grace_s: float) -> None:
    """Ask politely, then terminate, then kill: no worker outlives this call."""
    for worker in workers:
        if grace_s > 0 and worker.process.is_alive():
            with contextlib.suppress(OSError, ValueError):
                worker.conn.send(("stop",))
    deadline = time.monotonic() + grace_s
    for worker in workers:
        worker.process.join(max(0.0, deadline - time.monotonic()))
    for worker in workers:
        if worker.process.is_alive():
            worker.process.terminate()
    for worker in workers:
        worker.process.join(2.0)
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join(2.0)
    for worker in workers:
        with contextlib.suppress(OSError):
            worker.conn.close()


class EnginePool:
    """Several engines, one per device, behind the Engine interface.

    Workers are named after their device ("cuda:1"); a device listed more than once gets "#k" added
    ("cpu#0", "cpu#1"). Each worker holds at most `inflight_per_worker` chunks at a time; by default
    what its engine asks for (see `engine_depth`), else 256. Events for the user (a worker that died or
    failed to start) go to `on_event`, always from the thread that created the pool or iterates
    `generate`.

    Close the pool when done (or use it as a context manager). Closing a `generate` iterator early
    cancels that run and keeps the pool usable; a KeyboardInterrupt that reaches the iterator stops
    all workers at once.
    """

    name = "pool"

    def __init__(
        self,
        spec: EngineSpec,
        devices: Sequence[str],
        *,
        inflight_per_worker: int | None = None,
        on_event: Callable[[str], None] | None = None,
        start_timeout_s: float = 600,
        speculative_tail: bool = True,
        scheduler_cores: bool = True,
    ) -> None:
        if not devices:
            raise RuntimeFailure("No devices were given to the engine pool.", "Name at least one device.")
        if inflight_per_worker is not None and inflight_per_worker < 1:
            raise ValueError("inflight_per_worker must be at least 1")
        module_name, colon, attr_path = spec.factory.partition(":")
        if not (module_name and colon and attr_path):
            raise RuntimeFailure(
                f"The engine factory {spec.factory!r} is not of the form 'module:callable'.",
                "Name the engine as e.g. 'fastmaya_cli.engines.scripted:ScriptedEngine'.",
            )
        self.device = ",".join(devices)
        self._inflight = inflight_per_worker
        self._on_event = on_event
        self._speculative = speculative_tail
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)  # workers gained room: the feed puller may pull
        self._inbox: queue.Queue[tuple[int | None, str, Any]] = queue.Queue()
        self._run: _Run | None = None
        self._next_run_id = 0
        self._tickets = itertools.count()
        self._active_stream = False
        self._closed = False
        self._stopping = False
        self._last_error = ""
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)
        self._workers: list[_Worker] = []
        self.beside_decoder: Any = None  # a beside.RemoteDecoder when the spec has a decoder
        # Stops the workers at interpreter exit if close() was never called.
        self._finalizer = weakref.finalize(self, _stop_processes, self._workers, 0.0)
        try:
            self._start_workers(spec, devices, start_timeout_s)
        except BaseException:
            self._finalizer()
            os.close(self._wake_read)
            os.close(self._wake_write)
            raise
        self._dispatcher = threading.Thread(target=self._dispatch_loop, name="fastmaya-pool", daemon=True)
        self._dispatcher.start()
        self._cpus = cores.allowed_cpus()
        self.core_plan: cores.CorePlan | None = None
        if scheduler_cores:
            self.keep_scheduler_cores(True)

    # ---- start-up

    def _start_workers(self, spec: EngineSpec, devices: Sequence[str], timeout_s: float) -> None:
        ctx = get_context("spawn")  # CUDA and LMDeploy cannot live in a forked child
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        cpu_workers = sum(1 for d in devices if d.partition(":")[0] == "cpu")
        # Oversubscribed OpenMP threads spin against each other; split the cores unless the user chose.
        cpu_threads = None
        if cpu_workers > 1 and "OMP_NUM_THREADS" not in os.environ:
            cpu_threads = max(1, (os.cpu_count() or 1) // cpu_workers)
        decode_pipe = ctx.Pipe(duplex=True) if spec.decoder is not None else None
        for name, device in zip(worker_names(devices), devices, strict=True):
            engine_device, env = placement(device, visible, cpu_threads)
            parent_conn, child_conn = ctx.Pipe(duplex=True)
            decode_conn = decode_pipe[1] if decode_pipe is not None and not self._workers else None
            process = ctx.Process(
                target=_worker_main,
                args=(spec, name, device, engine_device, env, child_conn, os.getpid(), decode_conn),
                name=f"fastmaya-worker-{name}",
            )
            with _environment(env):
                process.start()
            child_conn.close()  # so the parent sees EOF when the worker dies
            if decode_conn is not None:
                decode_conn.close()
                from ..beside import RemoteDecoder

                self.beside_decoder = RemoteDecoder(decode_pipe[0], name)
            self._workers.append(_Worker(name, device, process, parent_conn))

        deadline = time.monotonic() + timeout_s
        waiting = {w.conn: w for w in self._workers}
        failures: dict[str, str] = {}
        advice: dict[str, tuple[str, str, int]] = {}
        while waiting:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            ready = wait_for_ready([*waiting, *(w.process.sentinel for w in waiting.values())], remaining)
            for conn, worker in list(waiting.items()):
                if conn not in ready and worker.process.sentinel not in ready:
                    continue
                try:
                    message = conn.recv()
                except (EOFError, OSError):
                    worker.process.join(2.0)
                    message = (
                        "build_error",
                        f"the worker process ended ({describe_exit(worker.process.exitcode)}) before reporting; its own output says why",
                    )
                del waiting[conn]
                if message[0] != "ready":
                    failures[worker.name] = str(message[1])
                    if len(message) > 2 and message[2] is not None:
                        advice[worker.name] = message[2]
                else:
                    worker.depth = self._inflight or message[2] or DEFAULT_DEPTH
                    worker.scheduler = message[3]
        for worker in waiting.values():
            failures[worker.name] = f"it did not start within {timeout_s:g} s"

        failed = [w for w in self._workers if w.name in failures]
        for worker in failed:
            worker.alive = False
            worker.error = failures[worker.name]
        _stop_processes(failed, 0.0)
        if self.beside_decoder is not None and self._workers[0] in failed:
            self.beside_decoder.close()
            self.beside_decoder = None
        if len(self._workers) == 1 and failed and failed[0].name in advice:
            problem, fix, exit_code = advice[failed[0].name]
            kind = InputError if exit_code == InputError.exit_code else RuntimeFailure
            raise kind(problem, fix, exit_code=exit_code)
        if len(failed) == len(self._workers):
            by_error: dict[str, list[str]] = {}
            for worker in failed:  # in device order, one line per distinct error
                by_error.setdefault(worker.error, []).append(worker.name)
            detail = "; ".join(f"{', '.join(names)}: {error}" for error, names in by_error.items())
            raise RuntimeFailure(
                f"Could not start the engine on {'any device' if len(failed) > 1 else failed[0].name}: {detail}.",
                "Check that the engine's packages are installed and the device is free, then try again.",
            )
        ok = len(self._workers) - len(failed)
        for worker in failed:
            self._emit(f"worker {worker.name} could not start ({worker.error}); continuing with {ok} others")

    # ---- the caller's side

    def generate(self, requests: Iterable[Request]) -> Iterator[Generation]:
        """Yield one Generation per request, in completion order, whichever worker made it.

        A `RequestFeed` is read lazily, only as workers have room, and may add retries (a chunk index
        again, once its earlier request has been answered) until it is finished; an error raised by
        its source reaches the caller. Closing the iterator early leaves the feed to its owner (close
        it too); requests pulled from it while the run was being cancelled are dropped. Any other
        iterable is read at once and must not repeat a chunk index.

        Engines must yield each result as it completes, taking requests as they come: an engine that
        reads its whole input before yielding would wait forever on a worker's open feed.
        """
        if isinstance(requests, RequestFeed):
            return self._stream(requests)
        batch = list(requests)
        indices = [r.chunk_index for r in batch]
        if len(set(indices)) != len(indices):
            repeated = sorted(i for i, n in Counter(indices).items() if n > 1)
            raise ValueError(f"chunk indices must be unique in one generate call; repeated: {repeated[:5]}")
        return self._stream(batch)

    def _stream(self, requests: list[Request] | RequestFeed) -> Iterator[Generation]:
        run = self._begin(requests)
        finished = run is None
        try:
            while not finished:
                try:
                    run_id, kind, payload = self._inbox.get(timeout=_POLL_S)
                except queue.Empty:
                    if not self._dispatcher.is_alive():
                        raise RuntimeFailure(
                            "The engine pool stopped working.", "This is a bug in fastmaya; please report it."
                        ) from None
                    continue
                if kind == "event":
                    self._emit(payload)
                elif run is None or run_id != run.id:
                    continue  # left over from a cancelled run
                elif kind == "generation":
                    yield payload
                elif kind == "done":
                    finished = True
                elif kind == "error":
                    finished = True
                    raise payload
        except KeyboardInterrupt:
            finished = True
            self._shutdown(grace_s=0.0)
            raise
        finally:
            if not finished and run is not None:
                self._cancel(run)
            with self._lock:
                self._active_stream = False

    def _begin(self, requests: list[Request] | RequestFeed) -> _Run | None:
        with self._lock:
            if self._closed:
                raise RuntimeFailure("The engine pool is closed.", "Create a new pool to generate again.")
            if self._active_stream:
                raise RuntimeError("EnginePool.generate: finish or close the previous iterator first")
            self._active_stream = True
        try:
            self._flush_events()  # e.g. a worker that died between runs: say so before anything else
            with self._lock:
                if not any(w.alive for w in self._workers):
                    raise self._all_dead_failure()
                if isinstance(requests, list) and not requests:
                    return None
                self._next_run_id += 1
                if isinstance(requests, RequestFeed):
                    run = _Run(self._next_run_id, requests)
                else:
                    run = _Run(self._next_run_id, None, dry=True, feed_finished=True)
                    for request in requests:
                        self._add_pending(run, request)
                self._run = run
        except BaseException:
            with self._lock:
                self._active_stream = False
            raise
        if run.feed is not None:
            puller = threading.Thread(
                target=self._pull_loop, args=(run,), name="fastmaya-pool-feed", daemon=True
            )
            puller.start()
        self._wake()
        return run

    def _cancel(self, run: _Run) -> None:
        with self._lock:
            if self._run is run:
                self._end_run(run)

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per worker: chunks it delivered, chunks it finished that were not used (another worker's
        copy came first, or the run was over), tokens generated (all of them), seconds its engine held
        work, seconds in its garbage collector and its full collections (`GcClock`), how many times
        `engine.generate` was called (once per run it took part in, unless the engine returned early), how
        many chunks it may hold, its engine's scheduler thread and the CPUs of the core that thread has
        to itself (see `keep_scheduler_cores`), and whether it is alive (with its error if not)."""
        with self._lock:
            return {
                w.name: {
                    "device": w.device,
                    "pid": w.process.pid,
                    "alive": w.alive,
                    "chunks": w.chunks,
                    "discarded": w.discarded,
                    "tokens": w.tokens,
                    "busy_s": w.busy_s,
                    "gc_s": w.gc_s,
                    "gc_full": w.gc_full,
                    "generate_calls": w.generate_calls,
                    "inflight": w.depth,
                    "scheduler_thread": w.scheduler,
                    "scheduler_cpus": w.scheduler_cpus,
                    "error": w.error,
                }
                for w in self._workers
            }

    def keep_scheduler_cores(self, keep: bool) -> cores.CorePlan | None:
        """Give each worker's engine scheduler thread a core of its own and keep every other thread of the
        run, this process's included, off those cores (see `cores`); with `keep` False, or where no core can
        be spared, let every thread run anywhere again. Returns the plan now in force. The workers place
        their threads on their reader threads; this waits until each has said so (at most
        `_PLACEMENT_WAIT_S`), and `stats()` then shows where each scheduler thread went."""
        if self._cpus is None:
            return None
        with self._lock:
            workers = [w for w in self._workers if w.alive and w.scheduler is not None]
            plan = (
                cores.plan_cores(cores.physical_cores(self._cpus), len(workers)) if keep and workers else None
            )
            if plan is None and self.core_plan is None:
                return None
            others = plan.others if plan is not None else self._cpus
            asked: list[tuple[_Worker, int]] = []  # each worker asked, with its placements before
            for i, w in enumerate(workers):
                kept = sorted(plan.schedulers[i]) if plan is not None else None
                with contextlib.suppress(OSError):
                    w.conn.send(("cores", kept, sorted(others)))
                    asked.append((w, w.placements))
            cores.place_threads(others)
            self.core_plan = plan
            self._room.wait_for(
                lambda: all(not w.alive or w.placements > before for w, before in asked), _PLACEMENT_WAIT_S
            )
            return plan

    def close(self) -> None:
        self._shutdown(grace_s=_STOP_GRACE_S)

    def __enter__(self) -> EnginePool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._shutdown(grace_s=0.0 if exc_info[0] is KeyboardInterrupt else _STOP_GRACE_S)

    def _shutdown(self, grace_s: float) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._stopping = True
            if self._run is not None:
                failure = RuntimeFailure("The engine pool was closed during a run.", "")
                self._inbox.put((self._run.id, "error", failure))
                self._run = None
            self._room.notify_all()
        self._wake()
        self._dispatcher.join(5.0)
        _stop_processes([w for w in self._workers if w.process.is_alive()], grace_s)
        for w in self._workers:
            w.alive = False
        if self.beside_decoder is not None:
            self.beside_decoder.close()  # after its worker stopped: a call still waiting sees EOF
        self._finalizer.detach()
        os.close(self._wake_read)
        os.close(self._wake_write)
        if self.core_plan is not None and self._cpus is not None:
            cores.place_threads(self._cpus)  # this process's threads may run anywhere again
            self.core_plan = None
        if grace_s > 0:
            self._flush_events()

    def _emit(self, message: str) -> None:
        if self._on_event is not None:
            self._on_event(message)

    def _flush_events(self) -> None:
        """Deliver waiting events; called only while no run is being read, so anything else in the
        inbox belongs to a finished or cancelled run and is dropped."""
        while True:
            try:
                _, kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "event":
                self._emit(payload)

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_write, b"x")

    # ---- the feed puller thread: one per run on a RequestFeed

    def _pull_loop(self, run: _Run) -> None:
        feed = run.feed
        assert feed is not None
        try:
            while True:
                with self._lock:
                    while self._run is run and (want := self._want(run)) <= 0:
                        self._room.wait(1.0)
                    if self._run is not run:
                        return
                pulled = feed.take_ready(min(want, _PULL_SLICE))
                if not pulled:
                    # The book itself is all handed out; from now on only retries can come, and the
                    # blocking pull below returns None once the caller has resolved everything.
                    with self._lock:
                        run.dry = True
                    self._wake()
                    request = feed.next_request(wait=True)
                    pulled = [] if request is None else [request]
                with self._lock:
                    if self._run is not run:
                        return  # cancelled meanwhile: whatever was pulled is the caller's to drop
                    if not pulled:
                        run.feed_finished = True
                        self._finish_if_done(run)
                    for request in pulled:
                        self._add_pending(run, request)
                self._wake()
                if not pulled:
                    return
        except Exception as exc:  # the caller's source failed: that is the caller's error to see
            with self._lock:
                if self._run is run:
                    self._inbox.put((run.id, "error", exc))
                    self._end_run(run)

    def _want(self, run: _Run) -> int:
        """How many more requests the workers could take now; at least one while none is pending, so
        the end of the feed (or a retry) is noticed even while every worker is full."""
        free = sum(max(0, w.depth - len(w.assigned)) for w in self._workers_for(run))
        return max(free - len(run.pending), 0 if run.pending else 1)

    # ---- the dispatcher thread (everything below runs with self._lock held)

    def _dispatch_loop(self) -> None:
        try:
            while True:
                with self._lock:
                    if self._stopping:
                        return
                    live = [w for w in self._workers if w.alive]
                    watched: list[Any] = [self._wake_read]
                    for w in live:
                        watched += [w.conn, w.process.sentinel]
                ready = set(wait_for_ready(watched, timeout=1.0))
                with self._lock:
                    if self._stopping:
                        return
                    if self._wake_read in ready:
                        with contextlib.suppress(BlockingIOError):
                            os.read(self._wake_read, 4096)
                    for w in live:
                        pipe_closed = w.conn in ready and not self._read_messages(w)
                        if pipe_closed or w.process.sentinel in ready:
                            self._on_worker_exit(w)
                    self._assign_work()
                    self._room.notify_all()
        except Exception as exc:  # a bug here must reach the caller, not hang it
            with self._lock:
                run, self._run = self._run, None
                self._room.notify_all()
            if run is not None:
                failure = RuntimeFailure(f"The engine pool failed: {type(exc).__name__}: {exc}", "")
                self._inbox.put((run.id, "error", failure))
            raise

    def _read_messages(self, w: _Worker) -> bool:
        """Handle everything the worker has sent; False once its pipe is closed."""
        try:
            while w.conn.poll():
                self._handle(w, w.conn.recv())
        except (EOFError, OSError):
            return False
        except Exception as exc:  # a message cut off by the worker's death
            w.error = w.error or f"unreadable message ({type(exc).__name__})"
            return False
        return True

    def _handle(self, w: _Worker, message: tuple[Any, ...]) -> None:
        kind = message[0]
        run = self._run
        if kind == "result":
            _, run_id, generation, busy_s, (gc_s, gc_full) = message
            w.tokens += len(generation.token_ids)
            w.busy_s += busy_s
            w.gc_s += gc_s
            w.gc_full += gc_full
            ticket = w.assigned.pop(generation.chunk_index, None) if w.in_run and run_id == w.run_id else None
            if run is None or ticket is None or run_id != run.id or run.live.get(ticket.index) != ticket.id:
                w.discarded += 1
            elif generation.finish_reason == "error" and self._held(run, exclude=w)[ticket.index]:
                w.discarded += 1  # another worker's copy may still succeed; its answer will count
            else:
                del run.live[ticket.index]
                w.chunks += 1
                self._inbox.put((run.id, "generation", generation))
                self._finish_if_done(run)
        elif kind == "generate":
            w.generate_calls += 1
        elif kind == "run_done":
            _, run_id, busy_s = message
            w.busy_s += busy_s
            if w.in_run and w.run_id == run_id:
                leftover, w.assigned, w.in_run = w.assigned, {}, False
                if run is not None and run.id == run_id:  # not expected: the parent ends a worker's run
                    self._requeue(run, leftover.values())
        elif kind == "cores":
            w.scheduler_cpus = message[1]
            w.placements += 1
        elif kind == "crash":
            w.error = message[1]

    def _add_pending(self, run: _Run, request: Request) -> None:
        if request.chunk_index in run.live:
            raise ValueError(
                f"chunk {request.chunk_index} was requested again before its earlier request was answered"
            )
        ticket = _Ticket(next(self._tickets), request)
        run.live[ticket.index] = ticket.id
        run.pending.append(ticket)

    def _finish_if_done(self, run: _Run) -> None:
        if self._run is run and run.feed_finished and not run.live:
            self._inbox.put((run.id, "done", None))
            self._end_run(run)

    def _end_run(self, run: _Run) -> None:
        """The run is over (done, failed or cancelled): its workers drop whatever they still hold."""
        self._run = None
        for w in self._workers:
            if w.alive and w.in_run and w.run_id == run.id:
                with contextlib.suppress(OSError):
                    w.conn.send(("cancel", run.id))
        self._room.notify_all()

    def _workers_for(self, run: _Run) -> list[_Worker]:
        # A worker still finishing an earlier run joins once it reports that run done.
        return [w for w in self._workers if w.alive and (not w.in_run or w.run_id == run.id)]

    def _held(self, run: _Run, exclude: _Worker | None = None) -> Counter[int]:
        """How many live workers hold each chunk's current attempt."""
        return Counter(
            index
            for o in self._workers
            if o.alive and o.in_run and o.run_id == run.id and o is not exclude
            for index, ticket in o.assigned.items()
            if run.live.get(index) == ticket.id
        )

    def _requeue(self, run: _Run, tickets: Iterable[_Ticket]) -> int:
        """Put back at the front the current attempts that no other worker holds."""
        held = self._held(run)
        requeued = [t for t in tickets if run.live.get(t.index) == t.id and not held[t.index]]
        run.pending.extendleft(reversed(requeued))
        return len(requeued)

    def _on_worker_exit(self, w: _Worker) -> None:
        if not w.alive:
            return
        self._read_messages(w)  # results sent just before the end still count
        w.alive = False
        w.process.join(2.0)
        if w.process.is_alive():  # pipe closed but the process hangs on: finish it
            w.process.kill()
            w.process.join(2.0)
        reason = describe_exit(w.process.exitcode) + (f": {w.error}" if w.error else "")
        w.error = w.error or describe_exit(w.process.exitcode)
        with contextlib.suppress(OSError):
            w.conn.close()
        run = self._run
        held, w.assigned, w.in_run = w.assigned, {}, False
        requeued = self._requeue(run, held.values()) if run is not None and w.run_id == run.id else 0
        self._last_error = f"worker {w.name} died ({reason})"
        if any(o.alive for o in self._workers):
            event = f"{self._last_error}; re-queued {requeued} chunks to the others"
            self._inbox.put((None, "event", event))
        elif run is not None:
            self._inbox.put((run.id, "error", self._all_dead_failure()))
            self._end_run(run)

    def _all_dead_failure(self) -> RuntimeFailure:
        last = self._last_error or "no worker is running"
        return RuntimeFailure(
            f"Every engine worker has stopped; the last: {last}.",
            "See the error above; try again with fewer GPUs or a single device.",
        )

    def _assign_work(self) -> None:
        run = self._run
        if run is None:
            return
        workers = self._workers_for(run)
        if not workers:
            return
        # Once everything left is pending, split it rather than let the first worker take it all.
        share = max(1, math.ceil(len(run.pending) / len(workers))) if run.dry else None
        for w in workers:
            free = w.depth - len(w.assigned)
            if free < w.refill_step:
                continue
            batch = self._take_pending(run, w, free if share is None else min(free, share))
            if not batch and run.dry and self._speculative and not self._has_live_work(run, w):
                idle = sum(1 for o in workers if not self._has_live_work(run, o))
                batch = self._copies_of_held_work(run, w, free, idle)
            if not batch:
                continue
            try:
                w.conn.send(("work", run.id, [t.request for t in batch]))
            except OSError:  # it is dying; its exit is handled when its sentinel fires
                self._requeue(run, batch)
                continue
            w.in_run, w.run_id = True, run.id
            w.assigned.update((t.index, t) for t in batch)

    def _take_pending(self, run: _Run, w: _Worker, size: int) -> list[_Ticket]:
        batch: list[_Ticket] = []
        skipped: list[_Ticket] = []
        while run.pending and len(batch) < size:
            ticket = run.pending.popleft()
            if run.live.get(ticket.index) != ticket.id:
                continue  # answered meanwhile (a re-queued chunk that a copy answered)
            if ticket.index in w.assigned:
                # Its engine still has an earlier attempt at this chunk, and results name only the
                # chunk: the two could not be told apart. Another worker (or this one, later) takes it.
                skipped.append(ticket)
                continue
            batch.append(ticket)
        run.pending.extendleft(reversed(skipped))
        return batch

    def _has_live_work(self, run: _Run, w: _Worker) -> bool:
        return w.in_run and w.run_id == run.id and any(run.live.get(i) == t.id for i, t in w.assigned.items())

    def _copies_of_held_work(self, run: _Run, w: _Worker, free: int, idle: int) -> list[_Ticket]:
        held = self._held(run)
        candidates: dict[int, _Ticket] = {}
        for other in self._workers:
            if other is w or not (other.alive and other.in_run and other.run_id == run.id):
                continue
            # From the end of what it holds: what its engine will reach last.
            for index, ticket in reversed(other.assigned.items()):
                if held[index] == 1 and run.live.get(index) == ticket.id and index not in w.assigned:
                    candidates[index] = ticket
        size = min(free, max(1, math.ceil(len(candidates) / max(1, idle))))
        return list(candidates.values())[:size]
