import threading
import time

import numpy as np
import pytest
import torch

from fastmaya_cli import maya1
from fastmaya_cli.codec import RIGHT_CONTEXT_FRAMES
from fastmaya_cli.render import DecodeQueue, decode_and_upsample, pack_seconds, sub_batches


def test_sub_batches_bound_padded_size_and_keep_order():
    frames = [100, 200, 50, 900, 900, 10]
    parts = sub_batches(frames, budget=1000)
    assert [i for part in parts for i in part] == list(range(len(frames)))
    for part in parts:
        assert len(part) == 1 or max(frames[i] for i in part) * len(part) <= 1000
    assert sub_batches([]) == []
    assert len(sub_batches([10] * 10)) == 1


def test_decode_queue_hands_out_chunks_as_they_finish_lowest_first():
    queue = DecodeQueue([2.0] * 6, ahead_s=100.0)
    for index in (4, 1, 5):
        queue.resolve(index)
    assert queue.take(2) == [1, 4]  # not waiting for chunk 0: the decoder works on what is done
    assert queue.take(8) == [5]
    for index in (0, 2, 3):
        queue.resolve(index)
    assert queue.take(8) == [0, 2, 3]
    assert queue.take(8) is None  # all taken


def test_decode_queue_bounds_audio_held_ahead_of_the_assembler_but_never_blocks_the_next_chunk():
    queue = DecodeQueue([10.0] * 6, ahead_s=25.0)
    for index in (1, 2, 3, 5):
        queue.resolve(index)
    assert queue.take(8) == [1, 2]  # a third would hold 30 s that the assembler cannot write yet
    queue.resolve(0)
    assert queue.take(8) == [0]  # over the bound, but it is the one the assembler waits for
    for index in (0, 1):
        queue.assembled(index)
    assert queue.take(8) == [3]  # 0 and 1 written: room for one more (2 and 3 held)
    taken: list = []
    waiter = threading.Thread(target=lambda: taken.append(queue.take(8)))
    waiter.start()
    waiter.join(0.3)
    assert waiter.is_alive()  # no room for 5, and the assembler will need 4 first: it waits
    queue.assembled(2)
    waiter.join(5)
    assert taken == [[5]]
    queue.resolve(4)
    assert queue.take(8) == [4]  # 30 s would be held, but the assembler needs it next
    assert queue.take(8) is None


def test_decode_queue_stop_releases_a_waiting_decoder():
    queue = DecodeQueue([1.0] * 3, ahead_s=10.0)
    taken: list = []
    waiter = threading.Thread(target=lambda: taken.append(queue.take(8)))
    waiter.start()
    queue.stop()
    waiter.join(5)
    assert taken == [None]


def _take_in_thread(queue: DecodeQueue, most: int) -> tuple[threading.Thread, list]:
    taken: list = []

    def take() -> None:
        started = time.monotonic()
        taken.append((queue.take(most), time.monotonic() - started))

    waiter = threading.Thread(target=take)
    waiter.start()
    return waiter, taken


def test_decode_queue_gathers_a_full_call_while_chunks_are_still_generating():
    queue = DecodeQueue([1.0] * 40, ahead_s=1800.0, gather=4, patience_s=60.0)
    for index in (0, 1):
        queue.resolve(index)
    waiter, taken = _take_in_thread(queue, 16)
    waiter.join(0.3)
    assert waiter.is_alive()  # two ready, 38 still generating: it waits for a fuller call
    for index in (5, 2):
        queue.resolve(index)
    waiter.join(5)
    assert taken[0][0] == [0, 1, 2, 5]


def test_decode_queue_gathers_no_longer_than_its_patience():
    queue = DecodeQueue([1.0] * 40, ahead_s=1800.0, gather=16, patience_s=0.3)
    queue.resolve(3)
    waiter, taken = _take_in_thread(queue, 16)
    waiter.join(5)
    chunks, waited_s = taken[0]
    assert chunks == [3]
    assert 0.25 <= waited_s < 5


def test_decode_queue_hands_out_at_once_when_nothing_is_left_to_generate():
    queue = DecodeQueue([1.0] * 5, ahead_s=1800.0, gather=16, patience_s=60.0)
    for index in (0, 1):
        queue.resolve(index)
    assert queue.take(1) == [0]  # `most` reached: a full call
    for index in (2, 3, 4):
        queue.resolve(index)
    waiter, taken = _take_in_thread(queue, 16)
    waiter.join(5)
    assert taken[0][0] == [1, 2, 3, 4]  # every chunk left is resolved: no reason to wait
    assert taken[0][1] < 5


def test_decode_queue_does_not_gather_past_the_bound_on_audio_held():
    queue = DecodeQueue([10.0] * 40, ahead_s=25.0, gather=16, patience_s=60.0)
    for index in (1, 2, 3):
        queue.resolve(index)
    waiter, taken = _take_in_thread(queue, 16)
    waiter.join(5)
    assert taken[0][0] == [1, 2]  # a third would pass the bound: more cannot come before the assembler writes


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_the_renderer_gathers_decode_calls_only_when_it_decodes_on_a_gpu(device):
    from types import SimpleNamespace

    from fastmaya_cli.progress import Progress
    from fastmaya_cli.render import EngineOptions, Renderer, RenderOptions

    options = RenderOptions(voice="v", engine=EngineOptions(), decode_batch=4, decode_gather_s=60.0)
    renderer = Renderer(options, Progress("none"), engine=SimpleNamespace(device=device))
    states = [SimpleNamespace(chunk=SimpleNamespace(seconds=1.0)) for _ in range(10)]
    queue = renderer.decode_queue(states)
    queue.resolve(0)
    waiter, taken = _take_in_thread(queue, 4)
    waiter.join(0.3)
    if device == "cuda":
        assert waiter.is_alive()  # one of four ready, nine still generating: it waits
        for index in (1, 2, 3):
            queue.resolve(index)
        waiter.join(5)
        assert taken[0][0] == [0, 1, 2, 3]
    else:
        waiter.join(5)
        assert taken[0][0] == [0]  # on the CPU each chunk decodes on its own: no reason to wait
        assert taken[0][1] < 0.3


def test_pack_seconds_cuts_short_books_finer():
    assert pack_seconds(50_000, 256, 18.0) == 18.0
    assert pack_seconds(380, 256, 18.0) == pytest.approx(380 / 256)


class _Decoder:
    """Runs out of memory on any batch of more than `limit` chunks."""

    def __init__(self, limit):
        self.limit, self.calls = limit, []

    def decode(self, codes, seeds):
        self.calls.append(len(codes))
        if len(codes) > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        lengths = [c.frames * 2048 for c in codes]
        audio = torch.zeros(len(codes), max(lengths))
        for row, c in enumerate(codes):
            audio[row, : lengths[row]] = float(c.c0[0])
        return audio, lengths


def _identity(audio, lengths):
    return audio, lengths


def test_out_of_memory_splits_the_batch_and_keeps_every_chunk():
    codes = [
        maya1.Codes(np.full(f, i), np.zeros(2 * f, int), np.zeros(4 * f, int))
        for i, f in enumerate([3, 5, 2, 4])
    ]
    decoder = _Decoder(limit=1)
    clips, lengths = decode_and_upsample(decoder, _identity, codes, seeds=[0, 1, 2, 3])
    assert lengths == [3 * 2048, 5 * 2048, 2 * 2048, 4 * 2048]
    assert [float(c[0]) for c in clips] == [0.0, 1.0, 2.0, 3.0]
    assert sorted(decoder.calls) == [1, 1, 1, 1, 2, 2, 4]  # halved until each part fits
    with pytest.raises(torch.OutOfMemoryError):
        decode_and_upsample(_Decoder(limit=0), _identity, codes[:1], seeds=[0])


class _RecordingDecoder(_Decoder):
    """Records each call's chunk lengths; never runs out of memory."""

    def __init__(self):
        super().__init__(limit=10**6)
        self.frames = []

    def decode(self, codes, seeds):
        self.frames.append(sorted(c.frames for c in codes))
        return super().decode(codes, seeds)


def test_decode_calls_follow_the_plan_and_clips_keep_the_chunks_order():
    frames = [200, 20, 200, 20, 200, 20]
    codes = [
        maya1.Codes(np.full(f, i), np.zeros(2 * f, int), np.zeros(4 * f, int)) for i, f in enumerate(frames)
    ]
    decoder = _RecordingDecoder()
    clips, lengths = decode_and_upsample(decoder, _identity, codes, seeds=list(range(6)))
    assert sorted(decoder.frames) == [[20, 20, 20], [200, 200, 200]]  # like lengths together
    assert lengths == [f * 2048 for f in frames]
    assert [float(c[0]) for c in clips] == [0, 1, 2, 3, 4, 5]
    assert all(np.all(c == c[0]) for c in clips)  # no padding left on any clip
    decoder = _RecordingDecoder()
    decode_and_upsample(decoder, _identity, codes, seeds=list(range(6)), plan=lambda f: sub_batches(f, 400))
    assert decoder.frames == [[20, 200], [20, 200], [20, 200]]  # the book-order baseline, as asked


def _render_two_sentences(tmp_path, scripted_options, **options):
    """Renders a two-chunk book with the scripted engine and the tiny SNAC, on the CPU: (renderer, result)."""
    from fastmaya_cli import render
    from fastmaya_cli.assemble import OutputSpec
    from fastmaya_cli.engines.scripted import ScriptedEngine
    from fastmaya_cli.progress import Progress

    options = scripted_options(**options)
    book = tmp_path / "book.txt"
    book.write_text("The tide came in. The boats lifted.\n")
    renderer = render.Renderer(options, Progress("none"), engine=ScriptedEngine())
    result = renderer.render(book, OutputSpec(path=tmp_path / "book.flac", format="flac", loudness="off"))
    return renderer, result


def test_render_reports_how_long_decoding_ran_on_after_generation(scripted_options, tmp_path, monkeypatch):
    from fastmaya_cli import render

    real = render.decode_and_upsample

    def slow_decode(*args, **kwargs):
        time.sleep(0.3)  # every batch; the scripted engine finishes at once, so all of this is tail
        return real(*args, **kwargs)

    monkeypatch.setattr(render, "decode_and_upsample", slow_decode)
    renderer, result = _render_two_sentences(tmp_path, scripted_options)
    assert result.tail_decoding_s >= 0.29
    assert result.decode_tail_s >= result.tail_decoding_s
    # The decoder had not handed over any chunk when the engine finished: all the speech was behind.
    assert result.behind_at_generation_end_s == pytest.approx(result.audio_s, rel=1e-3)
    assert result.audio_s > 0
    # On the CPU each chunk is a call of its own, padded by SNAC's right context only.
    decoded = renderer.decoder.frames_decoded
    assert result.chunks == 2 and decoded > 0
    assert result.snac_padding == pytest.approx((decoded + 2 * RIGHT_CONTEXT_FRAMES) / decoded)


def test_render_reports_the_decoding_threads_cpu_seconds_not_its_wall(
    scripted_options, tmp_path, monkeypatch
):
    from fastmaya_cli import render

    real = render.decode_and_upsample
    spent: list[float] = []

    def waits_then_decodes(*args, **kwargs):
        time.sleep(0.5)  # as a thread asleep while the GPU works: wall, no CPU
        started = time.thread_time()
        decoded = real(*args, **kwargs)
        spent.append(time.thread_time() - started)
        return decoded

    monkeypatch.setattr(render, "decode_and_upsample", waits_then_decodes)
    _, result = _render_two_sentences(tmp_path, scripted_options)
    assert spent and sum(spent) > 0  # one call or two, as the two chunks came back
    assert sum(spent) <= result.decoder_cpu_s < sum(spent) + 0.5  # the sleeps (0.5 s a call) are not in it


@pytest.mark.parametrize("sleeps", [False, True])
def test_the_decode_worker_sleeps_in_its_waits_only_for_the_benchs_candidate(
    scripted_options, tmp_path, monkeypatch, sleeps
):
    from fastmaya_cli import render

    real = render.decode_and_upsample
    asked: list[bool] = []

    def watched(*args, sleep=False, **kwargs):
        asked.append(sleep)
        return real(*args, sleep=sleep, **kwargs)

    monkeypatch.setattr(render, "decode_and_upsample", watched)
    _, result = _render_two_sentences(tmp_path, scripted_options, decode_sleeps=sleeps)
    assert result.failed == 0 and asked and set(asked) == {sleeps}


@pytest.mark.parametrize("as_before", [False, True])
def test_the_decode_worker_plans_its_calls_unless_asked_to_decode_as_before(
    scripted_options, tmp_path, monkeypatch, as_before
):
    from fastmaya_cli import render

    real = render.decode_and_upsample
    asked: list[tuple] = []

    def spy(*args, plan=None, pinned=True, **kwargs):
        asked.append((plan, pinned))
        return real(*args, plan=plan, pinned=pinned, **kwargs)

    monkeypatch.setattr(render, "decode_and_upsample", spy)
    _render_two_sentences(tmp_path, scripted_options, decode_as_before=as_before)
    assert asked
    for plan, pinned in asked:
        assert pinned is not as_before
        if as_before:
            assert [list(r) for r in plan([5, 9, 7])] == [[0, 1, 2]]  # book order, one call within budget
        else:
            assert plan is None  # decode_and_upsample's own: codec.plan_calls


@pytest.mark.parametrize("with_ffmpeg", [False, True])
def test_the_renderer_hands_the_bench_baseline_join_to_the_assembler(
    scripted_options, tmp_path, monkeypatch, with_ffmpeg
):
    from fastmaya_cli import render

    asked: list[object] = []
    real = render.Assembler

    class Spy(real):
        def __init__(self, *args, **kwargs):
            asked.append(kwargs.get("join_with_ffmpeg"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(render, "Assembler", Spy)
    _render_two_sentences(tmp_path, scripted_options, join_with_ffmpeg=with_ffmpeg)
    assert asked == [with_ffmpeg]


@pytest.mark.parametrize("after", [False, True])
def test_the_assembler_is_told_the_books_expected_length_unless_joining_after_the_render(
    scripted_options, tmp_path, monkeypatch, after
):
    """With it, an m4b's early parts go into the file while the book renders (room for the index is
    kept from it); the bench's `novel-join-after` baseline joins them after the last chunk."""
    from fastmaya_cli import render
    from fastmaya_cli.assemble import expected_length

    told: list[float | None] = []
    real = render.Assembler

    def recording(*args, **kwargs):
        told.append(kwargs.get("expected_seconds"))
        return real(*args, **kwargs)

    monkeypatch.setattr(render, "Assembler", recording)
    renderer, result = _render_two_sentences(tmp_path, scripted_options, join_after_render=after)
    assert result.chunks == 2 and len(told) == 1
    if after:
        assert told == [None]
    else:
        chunks = renderer.plan(tmp_path / "book.txt")[1]
        rate = renderer.upsampler.output_rate
        lengths = [round(c.seconds * rate) for c in chunks]
        expected = (
            expected_length(lengths, [c.boundary for c in chunks], renderer.options.pauses, rate) / rate
        )
        assert told[0] == pytest.approx(expected) and told[0] > sum(c.seconds for c in chunks)


def test_the_render_traces_when_chunks_came_back_and_when_the_decoder_ran(scripted_options, tmp_path):
    renderer, result = _render_two_sentences(tmp_path, scripted_options, cache_dir=tmp_path / "cache")
    trace = result.trace
    assert trace is not None and len(trace.resolved_s) == result.chunks == 2
    assert list(trace.resolved_s) == sorted(trace.resolved_s) and trace.resolved_s[0] >= 0
    assert sum(chunks for _, _, chunks, _ in trace.decode_calls) == 2  # every chunk decoded once
    assert all(0 <= start <= end for start, end, _, _ in trace.decode_calls)
    assert sum(seconds for *_, seconds in trace.decode_calls) == pytest.approx(
        sum(c.seconds for c in renderer.plan(tmp_path / "book.txt")[1]), abs=0.02
    )
    # A call is counted only up to the moment asked for.
    first_start, first_end = trace.decode_calls[0][:2]
    assert trace.decoding_s(first_start) == pytest.approx(0.0, abs=1e-9)
    assert trace.decoding_s(1e9) == pytest.approx(sum(end - start for start, end, *_ in trace.decode_calls))
    # Chunks taken from the cache were resolved before generation started: a second render traces none.
    cached = renderer.render(tmp_path / "book.txt", _flac(tmp_path / "again.flac"))
    assert cached.trace is not None and cached.trace.resolved_s == () and cached.cached == 2


def _flac(path):
    from fastmaya_cli.assemble import OutputSpec

    return OutputSpec(path=path, format="flac", loudness="off")


class _FakeDecoder:
    device = torch.device("cuda:0")


@pytest.mark.parametrize("enabled", [True, False])
def test_on_a_gpu_the_decoder_is_warmed_once_with_the_largest_batches_before_the_engine(monkeypatch, enabled):
    """SNAC's fullest call (16 rows x 128 padded frames = the call budget) and 16 of the longest chunks the
    token limit allows; once per renderer, and not when switched off (the bench's baseline)."""
    from fastmaya_cli import render
    from fastmaya_cli.progress import Progress

    calls: list[tuple[int, list[int], list[int]]] = []

    def recording(decoder, upsampler, codes, *, seeds, **kwargs):
        calls.append((len(codes), sorted({c.frames for c in codes}), list(seeds)))
        assert threading.current_thread().name.startswith("fastmaya-decode")
        return [], []

    monkeypatch.setattr(render, "decode_and_upsample", recording)
    options = render.RenderOptions(voice="Calm narrator", max_new_tokens=2048, warm_decoder=enabled)
    renderer = render.Renderer(options, Progress("none"))
    renderer._decoder, renderer._upsampler = _FakeDecoder(), object()
    monkeypatch.setattr(renderer, "audio_device", lambda: "cuda:0")
    monkeypatch.setattr(renderer, "decode_stream", lambda: __import__("contextlib").nullcontext())
    renderer.warm_decoder()
    renderer.warm_decoder()
    renderer.close()
    if not enabled:
        assert calls == []
        return
    fullest = 2048 // 16 - RIGHT_CONTEXT_FRAMES
    assert calls == [(16, [fullest], list(range(16))), (16, [2048 // 7], list(range(16)))]
    assert "decoder_warmup" in renderer.startup


def test_on_the_cpu_the_decoder_is_not_warmed(monkeypatch):
    from fastmaya_cli import render
    from fastmaya_cli.progress import Progress

    monkeypatch.setattr(render, "decode_and_upsample", lambda *a, **k: pytest.fail("decoded on the CPU"))
    renderer = render.Renderer(render.RenderOptions(voice="Calm narrator"), Progress("none"))
    monkeypatch.setattr(renderer, "audio_device", lambda: "cpu")
    renderer.warm_decoder()
    assert "decoder_warmup" not in renderer.startup


def test_a_stand_in_render_decodes_nothing_yet_gives_every_chunk_its_decoded_length(
    scripted_options, tmp_path, monkeypatch
):
    import soundfile

    from fastmaya_cli import render

    cache = tmp_path / "cache"  # a render whose output is up to date with its stamp is skipped
    _, decoded = _render_two_sentences(tmp_path, scripted_options, cache_dir=cache)
    assert decoded.decoder_cpu_s > 0
    assert _render_two_sentences(tmp_path, scripted_options, cache_dir=cache)[1].skipped
    decoded_audio, rate = soundfile.read(tmp_path / "book.flac", dtype="float32")

    def no_decoding(*args, **kwargs):
        raise AssertionError("a stand-in render decoded")

    monkeypatch.setattr(render, "decode_and_upsample", no_decoding)
    _, stood_in = _render_two_sentences(tmp_path, scripted_options, cache_dir=cache, decode_stand_in=True)
    stand_in_audio, stand_in_rate = soundfile.read(tmp_path / "book.flac", dtype="float32")
    assert not stood_in.skipped  # the same book and output, but the decoded render's file is not its own
    assert stood_in.decoder_cpu_s == 0  # no decoder ran
    assert (stood_in.chunks, stood_in.failed) == (decoded.chunks, decoded.failed) == (2, 0)
    assert stood_in.audio_s == pytest.approx(decoded.audio_s)
    assert (len(stand_in_audio), stand_in_rate) == (len(decoded_audio), rate)
    assert not np.array_equal(stand_in_audio, decoded_audio)
    spectrum = np.abs(np.fft.rfft(stand_in_audio))
    assert np.fft.rfftfreq(len(stand_in_audio), 1 / rate)[spectrum.argmax()] == pytest.approx(140.0, abs=1.0)


def test_the_stand_in_is_as_long_as_the_decoded_audio_and_about_as_loud_as_speech():
    from fastmaya_cli.render import stand_in_audio

    for rate in (24000, 48000):
        audio = stand_in_audio(65, 7, rate)
        assert audio.dtype == np.float32 and len(audio) == 65 * maya1.SAMPLES_PER_FRAME * rate // 24000
    rms_db = 20 * np.log10(np.sqrt(np.mean(audio.astype(np.float64) ** 2)))
    assert -30.0 < rms_db < -12.0 and np.abs(audio).max() < 0.5
    assert np.array_equal(stand_in_audio(65, 7, 48000), audio)
    assert not np.array_equal(stand_in_audio(65, 8, 48000), audio)


def test_a_renderer_renders_again_after_a_render_whose_decoder_failed(
    scripted_options, tmp_path, monkeypatch
):
    """The bench goes on after a candidate's render fails (bench.measure_or_note), with the same engine and
    models: the next render must find nothing left of the failed one."""
    from fastmaya_cli import render
    from fastmaya_cli.assemble import OutputSpec
    from fastmaya_cli.engines.scripted import ScriptedEngine
    from fastmaya_cli.errors import RuntimeFailure
    from fastmaya_cli.progress import Progress

    decode = render.decode_and_upsample
    calls: list[int] = []

    def fails_first(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(len(calls))
        if len(calls) == 1:
            raise RuntimeFailure(
                "Decoding beside the engine on cuda:0 failed: CUBLAS.", "Render again without it."
            )
        return decode(*args, **kwargs)

    monkeypatch.setattr(render, "decode_and_upsample", fails_first)
    book = tmp_path / "book.txt"
    book.write_text("The tide came in. The boats lifted.\n")
    renderer = render.Renderer(scripted_options(), Progress("none"), engine=ScriptedEngine())
    spec = OutputSpec(path=tmp_path / "book.flac", format="flac", loudness="off")
    with pytest.raises(RuntimeFailure, match="CUBLAS"):
        renderer.render(book, spec)
    assert not spec.path.exists()  # no partial output
    result = renderer.render(book, spec)
    assert result.failed == 0 and result.chunks == 2 and spec.path.exists() and len(calls) > 1
    renderer.close()
