"""The GPU engine: LMDeploy with continuous batching over the whole book.

Requests go to LMDeploy as exact token ids (so the prompt is exactly Maya1's, with no second BOS)
and are kept `max_inflight` deep, so the scheduler always has the next chunks queued and never
waits for the slowest member of a fixed batch. Results come back as each chunk finishes.
`lmdeploy` is imported only here, and only when this engine is built.

LMDeploy's PyTorch engine schedules every decode step in Python on one thread, so on a fast GPU
that thread is the bottleneck: whatever else runs on it (text detokenisation, one wake-up per
submitted request) costs throughput directly. Hence requests are submitted in bulk and the text
detokenisation that Maya1's audio codes never need is switched off.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

from ..errors import RuntimeFailure
from . import Generation, Request, Sampling
from .feed import RequestFeed

KV_CACHE_POLICIES = {"bf16": 0, "fp16": 0, "int8": 8, "int4": 4}
# Prompt (description + chunk text, ~100-300 ids) plus at most 2048 new ids.
SESSION_LEN = 4096
_FEED_DONE = object()
# Requests handed to LMDeploy's event loop in one call: enough to fill a prefill step at once,
# few enough that the first ones start while later prompts are still being built.
SUBMIT_BATCH = 256


def _is_oom(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
    return "out of memory" in text or "outofmemory" in text or "no enough" in text or "not enough" in text


class LMDeployEngine:
    name = "lmdeploy"

    def __init__(
        self,
        model: str,
        *,
        backend: str = "pytorch",
        sampling: Sampling = Sampling(),
        gpu_memory: float = 0.85,
        max_batch: int | None = None,
        kv_cache: str = "bf16",
        tp: int = 1,
        gpus: Sequence[int] = (),
        device: str = "cuda:0",
        max_inflight: int | None = None,
        log_level: str = "ERROR",
        engine_config: dict | None = None,
    ) -> None:
        from lmdeploy import PytorchEngineConfig, TurbomindEngineConfig, pipeline

        # A pool worker sees only its own GPU, which is then cuda:0 whatever `device` it was given.
        self.device = "cuda:0"
        del device, gpus
        self.sampling = sampling
        self.max_batch = max_batch or device_max_batch()
        self.max_inflight = max_inflight or 2 * self.max_batch
        common = dict(
            tp=tp,
            max_batch_size=self.max_batch,
            cache_max_entry_count=gpu_memory,
            quant_policy=KV_CACHE_POLICIES[kv_cache],
            session_len=SESSION_LEN,
        )
        common.update(engine_config or {})
        config = TurbomindEngineConfig(**common) if backend == "turbomind" else PytorchEngineConfig(**common)
        started = time.perf_counter()
        try:
            self.pipe = pipeline(str(model), backend_config=config, log_level=log_level)
        except Exception as exc:
            if _is_oom(exc):
                raise RuntimeFailure(
                    f"The model '{model}' or its KV cache does not fit on the GPU ({str(exc).splitlines()[0]}).",
                    "Lower --gpu-memory (the share of free GPU memory for the KV cache, now "
                    f"{gpu_memory}) or --max-batch (now {self.max_batch}), use --kv-cache int8, or spread it "
                    "with --tp 2.",
                ) from exc
            raise RuntimeFailure(
                f"LMDeploy could not start on '{model}': {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
                "Check the model path (pre-download it with `hf download maya-research/maya1`) and the GPU; "
                "--engine hf runs without LMDeploy.",
            ) from exc
        self.load_seconds = time.perf_counter() - started
        self.engine = self.pipe.async_engine
        self.loop = self.pipe.internal_thread.loop
        # The thread that runs LMDeploy's event loop, and with it every decode step: the pool gives it a
        # core of its own (see `cores`).
        loop_thread = getattr(self.pipe.internal_thread, "thread", None)
        self.scheduler_thread_id: int | None = getattr(loop_thread, "native_id", None)
        _skip_text_detokenisation(self.engine)

    def _gen_config(self, request: Request):  # noqa: ANN202 - lmdeploy.GenerationConfig
        from lmdeploy import GenerationConfig

        s = self.sampling
        # do_sample must be set: LMDeploy's default (False) silently turns sampling and the
        # repetition penalty off. top_k as in Maya1's reference.
        return GenerationConfig(
            do_sample=True,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k,
            repetition_penalty=s.repetition_penalty,
            random_seed=request.seed,
            max_new_tokens=request.max_new_tokens,
            min_new_tokens=request.min_new_tokens,
            stop_token_ids=[s.stop_id],
            ignore_eos=request.min_new_tokens >= request.max_new_tokens,
            skip_special_tokens=True,
        )

    async def _run_batch(self, batch: list[Request], results: queue.Queue) -> None:
        await asyncio.gather(*(self._run_one(request, results) for request in batch))

    async def _run_one(self, request: Request, results: queue.Queue) -> None:
        engine = self.engine
        tokens: list[int] = []
        finish = None
        try:
            prepared = await engine.preprocess(
                messages=None,
                session_id=engine.session_mgr.get(),
                input_ids=list(request.prompt_ids),
                gen_config=self._gen_config(request),
            )
            async for out in engine.generate(prepared, stream_response=False):
                tokens.extend(out.token_ids or ())
                finish = out.finish_reason or finish
        except Exception as exc:  # one failed request must not stop the book
            results.put(
                Generation(request.chunk_index, tuple(tokens), "error", error=str(exc) or type(exc).__name__)
            )
            return
        if finish == "stop":
            results.put(Generation(request.chunk_index, (*tokens, self.sampling.stop_id), "stop"))
        elif finish == "length":
            results.put(Generation(request.chunk_index, tuple(tokens), "length"))
        else:
            results.put(
                Generation(request.chunk_index, tuple(tokens), "error", error=f"finish reason {finish}")
            )

    def generate(self, requests: Iterable[Request]) -> Iterator[Generation]:
        results: queue.Queue = queue.Queue()
        room = threading.Condition()
        inflight = submitted = 0
        stop = threading.Event()
        pull = _puller(requests)

        def feed() -> None:
            # Its own thread: pulling a request may wait for the renderer's retries.
            nonlocal inflight, submitted
            try:
                while not stop.is_set():
                    with room:
                        while inflight >= self.max_inflight and not stop.is_set():
                            room.wait(0.5)
                        free = self.max_inflight - inflight
                    batch = pull(min(free, SUBMIT_BATCH))
                    if not batch or stop.is_set():
                        return
                    with room:
                        inflight += len(batch)
                        submitted += len(batch)
                    asyncio.run_coroutine_threadsafe(self._run_batch(batch, results), self.loop)
            except BaseException as exc:
                results.put(exc)
            finally:
                results.put(_FEED_DONE)

        feeder = threading.Thread(target=feed, name="fastmaya-lmdeploy-feed", daemon=True)
        feeder.start()
        received, feed_done = 0, False
        try:
            while not feed_done or received < submitted:
                item = results.get()
                if item is _FEED_DONE:
                    feed_done = True
                    continue
                if isinstance(item, BaseException):
                    raise item
                received += 1
                with room:
                    inflight -= 1
                    room.notify()
                yield item
        finally:
            stop.set()

    def close(self) -> None:
        pipe, self.pipe = getattr(self, "pipe", None), None
        if pipe is not None:
            pipe.close()


# The most chunks LMDeploy runs at once by default. An 80 GB GPU's KV cache (85% of the memory left
# after the weights, bf16) holds about 530k tokens: some 500 chunks of up to 18 s of speech. A larger
# batch admits more than fit, and LMDeploy then evicts running chunks and computes them again. Measured
# on the novel (BENCHMARKS.md, runs D and E, one H100): 512 ran at 169 audio s/s, 1,024 at 151.
KV_FITTING_BATCH = 512


def device_max_batch() -> int:
    """LMDeploy's own batch size for this GPU (1,024 on an H100), at most `KV_FITTING_BATCH`: the
    larger the batch, the more of its per-step Python cost each step's tokens share, up to what the
    KV cache holds."""
    try:
        from lmdeploy.utils import get_max_batch_size

        return min(KV_FITTING_BATCH, int(get_max_batch_size("cuda")))
    except Exception:  # an LMDeploy without the helper, or an unknown device
        return 256


def _puller(requests: Iterable[Request]) -> Callable[[int], list[Request]]:
    """pull(n): the next request (waiting for it if need be) plus up to n - 1 more that are ready now."""
    if isinstance(requests, RequestFeed):
        return requests.next_batch
    iterator = iter(requests)
    return lambda limit: list(itertools.islice(iterator, limit))


def _skip_text_detokenisation(async_engine) -> None:  # noqa: ANN001 - lmdeploy AsyncEngine
    """Maya1 emits audio codes, never text: LMDeploy's per-request detokenisation is pure cost, on the
    engine's own thread. Replaced by one that only moves the read offset past the new ids."""
    tokenizer = getattr(async_engine, "tokenizer", None)
    if tokenizer is None or not hasattr(tokenizer, "detokenize_incrementally"):
        return
    from lmdeploy.tokenizer import DetokenizeState

    def offsets_only(all_input_ids, state, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        return "", DetokenizeState(len(all_input_ids))

    tokenizer.detokenize_incrementally = offsets_only
