import threading

import pytest

from fastmaya_cli import maya1
from fastmaya_cli.engines import Request
from fastmaya_cli.engines.factory import create_engine, parse_gpus, resolve_kind
from fastmaya_cli.engines.feed import RequestFeed, batches
from fastmaya_cli.engines.hf import HFEngine
from fastmaya_cli.engines.scripted import ScriptedEngine
from fastmaya_cli.errors import InputError, RuntimeFailure


@pytest.fixture(scope="module")
def hf_engine(tiny_model):
    engine = HFEngine(tiny_model, device="cpu", max_batch=3)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def encode(tiny_model):
    return maya1.load_encoder(tiny_model)


def _requests(encode, texts, new_tokens=35, seed_base=0):
    return [
        Request(i, maya1.prompt_ids(encode, "Calm narrator", text), seed_base + i, new_tokens, new_tokens)
        for i, text in enumerate(texts)
    ]


def test_hf_engine_batches_with_left_padding_and_reports_each_request(hf_engine, encode):
    texts = ["Hi.", "A much longer sentence to make the prompts differ in length.", "Third.", "Fourth one."]
    results = list(hf_engine.generate(_requests(encode, texts)))
    assert sorted(g.chunk_index for g in results) == [0, 1, 2, 3]
    for g in results:
        assert g.finish_reason == "length" and len(g.token_ids) == 35
        codes = maya1.unpack(g.token_ids)
        assert codes.frames == 5 and codes.bad_ids == 0


def test_hf_engine_seed_fixes_output_whatever_the_batch(hf_engine, encode):
    requests = _requests(encode, ["One.", "Two words.", "Three more words."])
    together = {g.chunk_index: g.token_ids for g in hf_engine.generate(requests)}
    alone = next(iter(hf_engine.generate([requests[1]])))
    assert alone.token_ids == together[1]
    other_seed = next(iter(hf_engine.generate(_requests(encode, ["One.", "Two words."], seed_base=100)[1:])))
    assert other_seed.token_ids != together[1]


def test_hf_engine_missing_model_names_repo_and_fix(tmp_path):
    with pytest.raises(RuntimeFailure) as error:
        HFEngine(tmp_path / "nothing-here", device="cpu")
    assert "nothing-here" in error.value.problem and "hf download" in error.value.fix


def test_feed_waits_for_retries_and_closes_when_nothing_is_outstanding():
    feed = RequestFeed(Request(i, (1,), i) for i in range(2))
    first = feed.next_request(wait=True)
    second = feed.next_request(wait=False)
    assert (first.chunk_index, second.chunk_index) == (0, 1)
    assert feed.next_request(wait=False) is None  # source done, but two are outstanding
    got = []
    waiter = threading.Thread(target=lambda: got.append(feed.next_request(wait=True)))
    waiter.start()
    feed.resolved(retry=Request(0, (1,), 99))
    waiter.join(timeout=5)
    assert got and got[0].seed == 99
    feed.resolved()
    feed.resolved()
    assert feed.next_request(wait=True) is None


def test_batches_take_only_what_is_ready_from_a_feed():
    feed = RequestFeed(Request(i, (1,), i) for i in range(5))
    sizes = []
    for batch in batches(feed, 2):
        sizes.append(len(batch))
        for _ in batch:
            feed.resolved()
    assert sizes == [2, 2, 1]
    assert [len(b) for b in batches([Request(i, (1,), i) for i in range(5)], 2)] == [2, 2, 1]


def test_scripted_engine_is_deterministic_and_fails_on_cue():
    request = Request(0, (1,), 7, 700)
    a = next(iter(ScriptedEngine().generate([request])))
    b = next(iter(ScriptedEngine().generate([request])))
    assert a == b and a.finish_reason == "stop"
    engine = ScriptedEngine(faults={0: ["error"]})
    assert next(iter(engine.generate([request]))).finish_reason == "error"
    assert next(iter(engine.generate([request]))).finish_reason == "stop"  # second attempt is fine


def test_engine_selection():
    assert resolve_kind("auto") in {"hf", "lmdeploy"}
    assert parse_gpus("0,1") == [0, 1] and parse_gpus(None) == []
    with pytest.raises(InputError):
        parse_gpus("zero")
    import importlib.util

    if importlib.util.find_spec("lmdeploy") is None:
        assert resolve_kind("auto") == "hf"
        with pytest.raises(InputError, match="lmdeploy"):
            resolve_kind("lmdeploy")


def test_lmdeploy_runs_in_a_worker_process_per_gpu_even_on_one():
    from fastmaya_cli.engines.factory import worker_devices

    # Its Python scheduler must not share an interpreter lock with decoding and assembling.
    assert worker_devices("lmdeploy", [], tp=1) == ["cuda:0"]
    assert worker_devices("lmdeploy", [2], tp=1) == ["cuda:2"]
    assert worker_devices("lmdeploy", [0, 1], tp=1) == ["cuda:0", "cuda:1"]
    assert worker_devices("hf", [0, 1], tp=1) == ["cuda:0", "cuda:1"]
    # Tensor parallel spans its GPUs itself; the reference engine on one device stays in process.
    assert worker_devices("lmdeploy", [0, 1], tp=2) is None
    assert worker_devices("hf", [], tp=1) is None and worker_devices("hf", [1], tp=1) is None


def test_create_engine_builds_hf_from_options(tiny_model):
    from fastmaya_cli.render import EngineOptions

    engine = create_engine(EngineOptions(kind="hf", model=str(tiny_model), device="cpu", max_batch=2), print)
    assert engine.name == "hf" and engine.max_batch == 2 and engine.device == "cpu"


def test_lmdeploy_config_overrides_come_from_json_and_bad_json_is_an_input_error(monkeypatch):
    from fastmaya_cli.engines.factory import lmdeploy_overrides

    monkeypatch.setenv("FASTMAYA_LMDEPLOY_CONFIG", '{"prefill_interval": 8}')
    assert lmdeploy_overrides() == {"prefill_interval": 8}
    for bad in ("{prefill_interval: 8}", "[8]"):
        monkeypatch.setenv("FASTMAYA_LMDEPLOY_CONFIG", bad)
        with pytest.raises(InputError, match="FASTMAYA_LMDEPLOY_CONFIG"):
            lmdeploy_overrides()
    monkeypatch.delenv("FASTMAYA_LMDEPLOY_CONFIG")
    assert lmdeploy_overrides() == {}


@pytest.mark.parametrize(("value", "kept"), [(None, True), ("1", True), ("0", False), (" 0 ", False)])
def test_the_engine_pool_keeps_a_core_for_the_scheduler_unless_switched_off(monkeypatch, value, kept):
    from fastmaya_cli.engines import pool

    built: dict = {}

    def recording_pool(spec, devices, **kwargs):  # noqa: ANN001, ANN003, ANN202
        built.update(kwargs, devices=devices)
        return "pool"

    monkeypatch.setattr(pool, "EnginePool", recording_pool)
    if value is None:
        monkeypatch.delenv("FASTMAYA_SCHEDULER_CORE", raising=False)
    else:
        monkeypatch.setenv("FASTMAYA_SCHEDULER_CORE", value)
    from fastmaya_cli.render import EngineOptions

    assert create_engine(EngineOptions(kind="hf", model="m", gpus="0,1"), print) == "pool"
    assert built["devices"] == ["cuda:0", "cuda:1"] and built["scheduler_cores"] is kept


def test_a_bad_scheduler_core_switch_is_an_input_error_naming_it(monkeypatch):
    monkeypatch.setenv("FASTMAYA_SCHEDULER_CORE", "yes")
    from fastmaya_cli.render import EngineOptions

    with pytest.raises(InputError, match="FASTMAYA_SCHEDULER_CORE") as raised:
        create_engine(EngineOptions(kind="hf", model="m", gpus="0,1"), print)
    assert "0" in raised.value.fix and raised.value.exit_code == 2
