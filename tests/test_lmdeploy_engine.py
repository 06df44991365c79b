"""The LMDeploy engine's own logic (feeding, bounds, retries, detokenisation), on a fake `lmdeploy`.

The real library runs in tests/gpu; this fake has the same async API (preprocess, generate,
the pipeline's event-loop thread), so the feeder is exercised here on the CPU.
"""

import asyncio
import sys
import threading
import types
from dataclasses import dataclass

import pytest

from fastmaya_cli.engines import Request
from fastmaya_cli.engines.feed import RequestFeed

AUDIO = 128266


@dataclass
class DetokenizeState:
    ids_offset: int = 0


class FakeTokenizer:
    def detokenize_incrementally(self, all_ids, state, **_):  # noqa: ANN001, ANN003, ANN201
        raise AssertionError("LMDeploy's text detokenisation should be switched off")


class FakeAsyncEngine:
    """Answers each request with max_new_tokens audio ids that depend on its seed, like a sampler would."""

    def __init__(self) -> None:
        self.session_mgr = types.SimpleNamespace(get=lambda: object())
        self.tokenizer = FakeTokenizer()
        self.running = 0
        self.peak = 0

    async def preprocess(self, messages, session_id, input_ids, gen_config):  # noqa: ANN001, ANN201
        assert messages is None
        return list(input_ids), gen_config

    async def generate(self, prepared, stream_response):  # noqa: ANN001, ANN201
        ids, config = prepared
        assert config.do_sample is True and stream_response is False
        self.running += 1
        self.peak = max(self.peak, self.running)
        await asyncio.sleep(0.002)
        tokens = [AUDIO + (config.random_seed * 7 + i) % 4096 for i in range(config.max_new_tokens)]
        # As LMDeploy does: detokenise what came back, and hand out the ids past the read offset.
        text, state = self.tokenizer.detokenize_incrementally(ids + tokens, DetokenizeState(len(ids)))
        assert text == "" and state.ids_offset == len(ids) + len(tokens)
        self.running -= 1
        yield types.SimpleNamespace(token_ids=tokens, finish_reason=None)
        yield types.SimpleNamespace(token_ids=[], finish_reason="length")


class FakePipeline:
    def __init__(self) -> None:
        self.async_engine = FakeAsyncEngine()
        loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=loop.run_forever, daemon=True)
        self.thread.start()
        self.internal_thread = types.SimpleNamespace(
            loop=loop, thread=self.thread
        )  # as lmdeploy's _EventLoopThread

    def close(self) -> None:
        self.internal_thread.loop.call_soon_threadsafe(self.internal_thread.loop.stop)
        self.thread.join(timeout=5)


@pytest.fixture
def engine(monkeypatch):
    fake = types.ModuleType("lmdeploy")
    fake.pipeline = lambda *_, **__: FakePipeline()
    fake.PytorchEngineConfig = fake.TurbomindEngineConfig = lambda **kw: kw
    fake.GenerationConfig = lambda **kw: types.SimpleNamespace(**kw)
    tokenizer_module = types.ModuleType("lmdeploy.tokenizer")
    tokenizer_module.DetokenizeState = DetokenizeState
    monkeypatch.setitem(sys.modules, "lmdeploy", fake)
    monkeypatch.setitem(sys.modules, "lmdeploy.tokenizer", tokenizer_module)
    from fastmaya_cli.engines.lmdeploy import LMDeployEngine

    built = LMDeployEngine("some/model", max_batch=50)
    yield built
    built.close()


def _requests(count: int, tokens: int = 14) -> list[Request]:
    return [
        Request(i, (128259, 128000, 1000 + i), seed=i, max_new_tokens=tokens, min_new_tokens=tokens)
        for i in range(count)
    ]


def _expected(request: Request) -> tuple[int, ...]:
    return tuple(AUDIO + (request.seed * 7 + i) % 4096 for i in range(request.max_new_tokens))


def test_the_scheduler_thread_is_the_one_that_runs_lmdeploys_event_loop(engine):
    async def current_thread() -> int:
        return threading.get_native_id()

    running = asyncio.run_coroutine_threadsafe(current_thread(), engine.loop).result(timeout=5)
    assert engine.scheduler_thread_id == running != threading.get_native_id()


def test_every_request_answered_once_with_its_own_tokens_within_the_inflight_bound(engine):
    requests = _requests(600)
    submitted: list[int] = []
    run_batch = engine._run_batch

    async def recording(batch, results):  # noqa: ANN001, ANN202
        submitted.append(len(batch))
        await run_batch(batch, results)

    engine._run_batch = recording
    results = {g.chunk_index: g for g in engine.generate(requests)}
    assert sorted(results) == list(range(600))
    assert all(results[r.chunk_index].token_ids == _expected(r) for r in requests)
    assert all(g.finish_reason == "length" for g in results.values())
    assert engine.max_inflight == 100
    assert 0 < engine.engine.peak <= 100
    # The first fill goes to LMDeploy in one call, so its first prefill sees the whole batch.
    assert submitted[0] == 100 and sum(submitted) == 600


def test_a_retry_from_the_feed_is_generated_and_the_stream_then_ends(engine):
    feed = RequestFeed(_requests(30))
    retried = False
    answered = []
    for generation in engine.generate(feed):
        answered.append((generation.chunk_index, len(generation.token_ids)))
        retry = None
        if generation.chunk_index == 7 and not retried:
            retried = True
            retry = Request(7, (128259, 128000, 5), seed=99, max_new_tokens=21, min_new_tokens=21)
        feed.resolved(retry)
    assert sorted(answered) == sorted([*((i, 14) for i in range(30)), (7, 21)])


@pytest.mark.parametrize(("lmdeploy_size", "expected"), [(1024, 512), (256, 256)])
def test_default_batch_is_lmdeploys_own_but_no_more_than_the_kv_cache_holds(
    monkeypatch, lmdeploy_size, expected
):
    utils = types.ModuleType("lmdeploy.utils")
    utils.get_max_batch_size = lambda device: lmdeploy_size if device == "cuda" else 0
    monkeypatch.setitem(sys.modules, "lmdeploy", types.ModuleType("lmdeploy"))
    monkeypatch.setitem(sys.modules, "lmdeploy.utils", utils)
    from fastmaya_cli.engines.lmdeploy import device_max_batch

    assert device_max_batch() == expected
