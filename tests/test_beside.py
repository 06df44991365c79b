"""Decoding beside the engine (beside.py): the decoder in the engine's worker process, on the CPU here."""

from __future__ import annotations

import dataclasses
import glob
import multiprocessing
import threading

import numpy as np
import pytest
import soundfile as sf

from fastmaya_cli import beside, render
from fastmaya_cli.assemble import OutputSpec
from fastmaya_cli.codec import random_codes
from fastmaya_cli.engines.pool import EnginePool, EngineSpec
from fastmaya_cli.engines.scripted import ScriptedEngine
from fastmaya_cli.errors import RuntimeFailure
from fastmaya_cli.progress import Progress

SCRIPTED = "fastmaya_cli.engines.scripted:ScriptedEngine"
# With chunks of at most 1 s, a chunk a sentence: several decode calls.
BOOK = "The tide came in. The boats lifted.\n\nGulls rose over the harbour. Nobody spoke.\n"


def _render_result(renderer: render.Renderer, tmp_path, name: str) -> render.RenderResult:
    book = tmp_path / "book.txt"
    book.write_text(BOOK)
    result = renderer.render(book, OutputSpec(path=tmp_path / f"{name}.flac", format="flac", loudness="off"))
    assert result.failed == 0
    return result


def _render(renderer: render.Renderer, tmp_path, name: str) -> tuple[np.ndarray, int]:
    audio, rate = sf.read(_render_result(renderer, tmp_path, name).output, dtype="float32")
    return audio, rate


def test_a_book_decoded_in_the_engines_worker_sounds_as_one_decoded_here(scripted_options, tmp_path):
    here = render.Renderer(scripted_options(max_chunk_seconds=1.0), Progress("none"), engine=ScriptedEngine())
    expected, expected_rate = _render(here, tmp_path, "here")
    here.close()

    options = scripted_options(max_chunk_seconds=1.0, decode_beside=True)
    spec = EngineSpec(SCRIPTED, decoder=render.Renderer(options, Progress("none"))._beside_spec())
    with EnginePool(spec, ["cpu"], scheduler_cores=False) as pool:
        beside_renderer = render.Renderer(options, Progress("none"), engine=pool)
        assert beside_renderer.decodes_beside()
        audio, rate = _render(beside_renderer, tmp_path, "beside")
        remote = pool.beside_decoder
        assert remote.frames_decoded > 0 and remote.frames_computed >= remote.frames_decoded
        assert set(remote.startup) == {"codec", "upsampler"}  # no warm-up on the CPU
    assert beside_renderer._decoder is None and beside_renderer._upsampler is None  # nothing decoded here
    assert rate == expected_rate == 48_000
    # On the CPU each chunk decodes on its own, so the same codes give the same samples in either process.
    np.testing.assert_array_equal(audio, expected)


def test_the_benchs_ab_an_engine_worker_that_decodes_for_one_renderer_and_not_another(
    scripted_options, tmp_path, monkeypatch
):
    """The bench's novel-beside: one engine, whose worker decodes for a renderer that asks for it, while the
    renderer that built it (the default: decoding in its own process) decodes itself."""
    from fastmaya_cli.bench import _sharing
    from fastmaya_cli.engines import factory

    monkeypatch.setattr(factory, "worker_devices", lambda kind, gpus, tp: ["cpu"])  # a pooled scripted engine
    here = render.Renderer(scripted_options(max_chunk_seconds=1.0), Progress("none"), decoder_in_worker=True)
    try:
        expected, _ = _render(here, tmp_path, "here")
        remote = here.engine.beside_decoder
        assert remote is not None and remote.frames_decoded == 0  # loaded in the worker, not used
        assert not here.decodes_beside() and here.decoder.frames_decoded > 0
        assert {"worker_codec", "worker_upsampler"} <= set(here.startup)
        other = _sharing(here, decode_beside=True)
        audio, _ = _render(other, tmp_path, "beside")
        assert other.decodes_beside() and remote.frames_decoded > 0
        np.testing.assert_array_equal(audio, expected)
    finally:
        here.close()


def test_an_engine_in_this_process_cannot_decode_beside_so_the_renderer_decodes(scripted_options, tmp_path):
    renderer = render.Renderer(
        scripted_options(max_chunk_seconds=1.0, decode_beside=True), Progress("none"), engine=ScriptedEngine()
    )
    audio, rate = _render(renderer, tmp_path, "fallback")
    assert not renderer.decodes_beside()
    assert renderer.decoder.frames_decoded > 0  # decoded here
    assert rate == 48_000 and len(audio) > 0


def test_only_an_engine_in_a_worker_process_decodes_beside_it_and_only_when_asked(scripted_options):
    def decodes_beside(kind: str, tp: int = 1, gpus: str | None = None, **changes) -> bool:
        options = scripted_options(max_chunk_seconds=1.0, **changes)
        engine = dataclasses.replace(options.engine, kind=kind, tp=tp, gpus=gpus)
        return render.Renderer(dataclasses.replace(options, engine=engine), Progress("none")).decodes_beside()

    assert decodes_beside("scripted", gpus="0,1", decode_beside=True)  # data parallel: workers
    assert not decodes_beside("scripted", gpus="0,1")  # not asked: the default
    assert not decodes_beside("hf", decode_beside=True)  # one hf engine runs in this process


class _RecordedStream:
    def __new__(cls, device=None, priority=0, **kwargs):  # noqa: ANN001, ANN204
        stream = object.__new__(cls)
        stream.priority = priority
        return stream


def test_streams_made_without_a_priority_outrank_the_decoders(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "Stream", _RecordedStream)
    original = beside.make_new_streams_high_priority()
    assert original is _RecordedStream
    assert torch.cuda.Stream().priority == beside.ENGINE_PRIORITY  # as LMDeploy makes its streams
    assert torch.cuda.Stream(priority=-3).priority == -3  # a priority of its own is kept
    assert original(priority=beside.DECODER_PRIORITY).priority == beside.DECODER_PRIORITY
    assert torch.cuda.Stream.made == 2  # the decoder's own stream is not among them
    assert beside.ENGINE_PRIORITY < beside.DECODER_PRIORITY  # lower numbers run first
    assert beside.make_new_streams_high_priority() is _RecordedStream  # patched once, however often asked


def _service(tiny_snac, conn) -> beside.DecoderService:
    spec = beside.DecoderSpec(str(tiny_snac), "none", None, decode_batch=4, max_new_tokens=70)
    return beside.DecoderService(spec, "cpu", conn)


def test_the_decoder_service_sends_each_chunks_audio_as_decode_and_upsample_makes_it(tiny_snac, monkeypatch):
    from fastmaya_cli.codec import SnacDecoder
    from fastmaya_cli.upsample import PassThrough

    monkeypatch.setattr(beside, "SHARED_AUDIO_STEP", 4096 * 4)  # a frame of audio: the file has to grow
    left_before = set(glob.glob("/dev/shm/fastmaya-audio-*"))
    ours, theirs = multiprocessing.Pipe()
    service = _service(tiny_snac, theirs)
    remote = beside.RemoteDecoder(ours, "cpu")
    snac = SnacDecoder(str(tiny_snac), "cpu")
    rng = np.random.default_rng(3)
    for frames, seeds in (((2,), [4]), ((3, 9, 5), [11, 12, 13]), ((12, 1), [5, 6])):  # grows once
        codes = [random_codes(n, rng) for n in frames]
        clips = remote.decode(codes, seeds)
        expected, _ = render.decode_and_upsample(snac, PassThrough(), codes, seeds=seeds)
        assert [len(c) for c in clips] == [n * 2048 for n in frames]
        for clip, want in zip(clips, expected, strict=True):
            np.testing.assert_array_equal(clip, want)
    assert remote.output_rate == 24_000 and remote.frames_decoded == 17 + 2 + 13
    assert remote.cpu_s > 0  # the worker's decoding thread's CPU seconds come back with each call
    assert set(glob.glob("/dev/shm/fastmaya-audio-*")) == left_before  # each file unlinked once mapped
    ours.close()
    service._thread.join(5)
    assert not service._thread.is_alive()  # the renderer gone, the service stops


def test_a_decode_call_that_fails_in_the_worker_stops_the_render_with_its_reason(tiny_snac, monkeypatch):
    def broken(*_: object, **__: object) -> None:
        raise ValueError("codes out of range")

    monkeypatch.setattr(render, "decode_and_upsample", broken)
    ours, theirs = multiprocessing.Pipe()
    _service(tiny_snac, theirs)
    remote = beside.RemoteDecoder(ours, "cuda:0")
    codes = [random_codes(2, np.random.default_rng(0))]
    with pytest.raises(
        RuntimeFailure, match="beside the engine on cuda:0 failed: ValueError: codes out of range"
    ) as caught:
        remote.decode(codes, [0])
    assert "without --decode-beside" in caught.value.fix
    ours.close()


def test_a_worker_gone_in_the_middle_of_a_call_is_a_runtime_failure(tiny_snac):
    ours, theirs = multiprocessing.Pipe()
    remote = beside.RemoteDecoder(ours, "cuda:0")

    def dies_in_the_call() -> None:
        theirs.recv()
        theirs.close()

    threading.Thread(target=dies_in_the_call).start()
    with pytest.raises(RuntimeFailure, match="stopped in the middle of a call") as caught:
        remote.decode([random_codes(2, np.random.default_rng(0))], [0])
    assert "resumes" in caught.value.fix
    with pytest.raises(RuntimeFailure, match="stopped in the middle of a call"):
        remote.decode([random_codes(2, np.random.default_rng(0))], [0])  # the pipe is closed: send fails


def test_a_worker_that_stops_answering_is_a_runtime_failure_not_a_hang():
    ours, theirs = multiprocessing.Pipe()
    remote = beside.RemoteDecoder(ours, "cuda:0", reply_timeout_s=0.2)
    with pytest.raises(RuntimeFailure, match="has not answered a decode call in 0.2 s") as caught:
        remote.decode([random_codes(2, np.random.default_rng(0))], [0])
    assert "--no-decode-beside" in caught.value.fix
    assert theirs.recv()[0] == "decode"  # the call went out; its answer never came
    theirs.close()


def test_the_upsampler_is_known_without_loading_it(tmp_path):
    from fastmaya_cli.upsample import output_rate_of, resolved_kind

    weights = tmp_path / "speechsr48k.pth"
    weights.write_bytes(b"not read")
    assert resolved_kind("auto", weights) == "speechsr"
    assert resolved_kind("resample", None) == "resample"
    assert output_rate_of("none") == 24_000 and output_rate_of("speechsr") == 48_000


def test_the_decoder_service_decodes_in_float16_when_the_spec_says_so(tiny_snac):
    from fastmaya_cli.codec import SnacDecoder
    from fastmaya_cli.upsample import PassThrough

    ours, theirs = multiprocessing.Pipe()
    spec = beside.DecoderSpec(
        str(tiny_snac), "none", None, decode_batch=4, max_new_tokens=70, codec_half=True
    )
    service = beside.DecoderService(spec, "cpu", theirs)
    remote = beside.RemoteDecoder(ours, "cpu")
    codes = [random_codes(n, np.random.default_rng(5)) for n in (3, 6)]
    clips = remote.decode(codes, [7, 8])
    for half in (True, False):
        expected, _ = render.decode_and_upsample(
            SnacDecoder(str(tiny_snac), "cpu", half=half), PassThrough(), codes, seeds=[7, 8]
        )
        same = all(np.array_equal(clip, want) for clip, want in zip(clips, expected, strict=True))
        assert same == half
    ours.close()
    service._thread.join(5)


def test_decode_streams_make_each_green_stream_once_and_hand_memory_back_on_each_move():
    made: list[int] = []
    released: list[int | None] = []
    blas_targets: list[int] = []
    streams = beside.DecodeStreams(
        "plain",
        lambda sms: made.append(sms) or f"green-{sms}",
        lambda: released.append(streams._current),
        blas_targets.append,
    )
    asked = [None, None, 16, 16, 32, 16, None]
    assert [streams.stream(sms) for sms in asked] == [
        "plain", "plain", "green-16", "green-16", "green-32", "green-16", "plain"
    ]  # fmt: skip
    assert made == [16, 32]  # a green context is made once for each size
    assert released == [None, 16, 32, 16]  # before each move, what the last stream cached goes back
    assert blas_targets == [16, 32, 16, 0]  # cuBLAS sizes its kernels for the SMs of each move (0: all)


def test_a_decode_call_asks_the_worker_for_the_sms_the_render_keeps_for_the_decoder():
    ours, theirs = multiprocessing.Pipe()
    remote = beside.RemoteDecoder(ours, "cuda:0")
    received = []

    def worker() -> None:
        received.append(theirs.recv())
        theirs.send(("error", "only listening"))

    for sms, sleep in ((24, False), (None, True)):
        threading.Thread(target=worker).start()
        with pytest.raises(RuntimeFailure, match="only listening"):
            remote.decode([random_codes(2, np.random.default_rng(0))], [0], sms=sms, sleep=sleep)
    assert [message[3:] for message in received] == [(24, False), (None, True)]


def test_the_decoder_service_sleeps_only_for_the_calls_that_ask(tiny_snac, monkeypatch):
    """The bench's novel-beside-sleep: the worker decodes the calls that ask with its waits sleeping."""
    asked: list[bool] = []
    real = render.decode_and_upsample

    def watched(*args, sleep=False, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        asked.append(sleep)
        return real(*args, sleep=sleep, **kwargs)

    monkeypatch.setattr(render, "decode_and_upsample", watched)
    ours, theirs = multiprocessing.Pipe()
    _service(tiny_snac, theirs)
    remote = beside.RemoteDecoder(ours, "cpu")
    codes = [random_codes(2, np.random.default_rng(0))]
    assert len(remote.decode(codes, [0], sleep=True)[0]) == len(remote.decode(codes, [0])[0]) == 2 * 2048
    assert asked == [True, False]
    ours.close()


class _BesideStub:
    """The decoder beside the engine, as the renderer sees it: records each call's SMs and sleep flag, and
    reports 0.25 CPU s of the worker's decoding thread a call."""

    frames_decoded = frames_computed = 0

    def __init__(self) -> None:
        self.asked: list[int | None] = []
        self.slept: list[bool] = []
        self.cpu_s = 0.0

    def decode(self, codes, seeds, sms=None, sleep=False):  # noqa: ANN001, ANN202
        self.asked.append(sms)
        self.slept.append(sleep)
        self.cpu_s += 0.25  # the worker's decoding thread, as its replies tell
        return [np.zeros(c.frames * 4096, dtype=np.float32) for c in codes]  # 48 kHz


def test_the_renderer_hands_its_decode_sms_to_the_decoder_beside_the_engine(
    scripted_options, tmp_path, monkeypatch
):
    stub = _BesideStub()
    asked, slept = stub.asked, stub.slept
    monkeypatch.setattr(render.Renderer, "beside_decoder", lambda self: stub)
    options = scripted_options(max_chunk_seconds=1.0, decode_beside=True, decode_sms=24)
    for generating, expected in ((True, 24), (False, None)):  # once the engine is done: every SM
        monkeypatch.setattr(render.DecodeQueue, "generating", property(lambda self, g=generating: g))
        asked.clear()
        renderer = render.Renderer(options, Progress("none"), engine=ScriptedEngine())
        result = _render_result(renderer, tmp_path, f"beside-{generating}")
        assert sf.info(str(result.output)).samplerate == 48_000
        assert asked and set(asked) == {expected}
        assert renderer._decoder is None  # nothing decoded in the renderer's process
        # The render reports the worker's decoding thread's CPU seconds, not its own thread's.
        assert result.decoder_cpu_s == pytest.approx(0.25 * len(asked))
    assert slept and set(slept) == {False}  # the decoder's waits sleep only when the bench's candidate asks
    slept.clear()
    sleeping = render.Renderer(
        dataclasses.replace(options, decode_sleeps=True), Progress("none"), engine=ScriptedEngine()
    )
    _render_result(sleeping, tmp_path, "slept")
    assert slept and set(slept) == {True}


def test_the_decoder_beside_the_engine_takes_every_sm_once_the_engines_batch_drains_when_asked(
    scripted_options, tmp_path, monkeypatch
):
    """RenderOptions.decode_sms_until_drain: decode_sms only while a full batch is left to generate."""
    stub = _BesideStub()
    asked = stub.asked
    monkeypatch.setattr(render.Renderer, "beside_decoder", lambda self: stub)
    options = scripted_options(max_chunk_seconds=1.0, decode_beside=True, decode_sms=24)
    options = dataclasses.replace(options, engine=dataclasses.replace(options.engine, max_batch=4))
    for until_drain, unresolved, expected in (
        (True, 4, 24),  # a full batch of 4 still to generate
        (True, 3, None),  # draining
        (False, 3, 24),  # as before the option: on 24 SMs until the engine is done
    ):
        monkeypatch.setattr(render.DecodeQueue, "unresolved", property(lambda self, n=unresolved: n))
        asked.clear()
        changed = dataclasses.replace(options, decode_sms_until_drain=until_drain)
        renderer = render.Renderer(changed, Progress("none"), engine=ScriptedEngine())
        _render_result(renderer, tmp_path, f"drain-{until_drain}-{unresolved}")
        assert asked and set(asked) == {expected}, (until_drain, unresolved)


def test_the_decode_queue_knows_while_chunks_are_still_to_come():
    queue = render.DecodeQueue([1.0, 2.0, 1.5], ahead_s=60.0)
    states = []
    for index in (1, 0, 2):
        states.append((queue.generating, queue.unresolved))
        queue.resolve(index)
    assert states == [(True, 3), (True, 2), (True, 1)] and not queue.generating and queue.unresolved == 0
