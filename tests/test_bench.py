"""`fastmaya bench` pieces that need no GPU: the median pass, the options and the CPU finish stage."""

from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from fastmaya_cli import bench, cores, split_encode
from fastmaya_cli.bench import SPEECH_48K, StageResult, finish_book, median_pass
from fastmaya_cli.cli import app


def _pass(wall_s: float, peak: float) -> StageResult:
    return StageResult(
        "render-travel", "lmdeploy", 144, 32_000, 392.0, wall_s, peak, notes={"plan_s": wall_s / 10}
    )


def test_median_pass_keeps_the_middle_pass_and_lists_every_wall_in_run_order():
    median = median_pass([_pass(3.0, 70.0), _pass(2.0, 72.0), _pass(2.5, 71.0)])
    assert median.wall_s == 2.5 and median.notes["plan_s"] == 0.25  # that pass's own breakdown
    assert median.notes["passes"] == 3 and median.notes["pass_walls_s"] == [3.0, 2.0, 2.5]
    assert median.peak_gpu_gib == 72.0  # the highest of all passes
    assert median.row()["audio_s_per_s"] == round(392.0 / 2.5, 1)


def test_median_of_an_even_count_is_the_slower_middle_pass():
    assert median_pass([_pass(1.0, 1.0), _pass(2.0, 1.0)]).wall_s == 2.0
    assert median_pass([_pass(4.0, 1.0)]).wall_s == 4.0


def test_bench_needs_at_least_one_pass():
    result = CliRunner().invoke(app, ["bench", "--repeat", "0"])
    assert result.exit_code == 2 and "--repeat" in result.output


def test_an_unknown_stage_is_a_usage_error():
    result = CliRunner().invoke(app, ["bench", "--stages", "finish,warp"])
    assert result.exit_code == 2 and "warp" in result.output


def test_an_unknown_render_format_is_a_usage_error_before_any_work():
    result = CliRunner().invoke(app, ["bench", "--stages", "finish", "--render-format", "wma"])
    assert result.exit_code == 2 and "wma" in result.output and "m4b" in result.output


@pytest.mark.parametrize("counts", ["four", "4,0", ","])
def test_early_encoder_counts_must_be_whole_numbers(counts):
    result = CliRunner().invoke(app, ["bench", "--stages", "finish", "--novel-early-encoders", counts])
    assert result.exit_code == 2 and "not a list of counts" in result.output and "4,8" in result.output


needs_ffmpeg = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg not installed")


@needs_ffmpeg
def test_finish_stage_runs_on_the_cpu_and_compares_one_piece_with_parts(tmp_path, monkeypatch):
    """The CPU stage needs no GPU: an m4b of real-length speech encoded in one piece and in parts."""
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    t = np.arange(20 * 48000) / 48000
    speech = 0.2 * np.sin(2 * np.pi * 150 * t) * (1 + np.sin(2 * np.pi * 3 * t)) + 0.02 * rng.standard_normal(
        len(t)
    )
    sf.write(data / SPEECH_48K, speech.astype(np.float32), 48000)
    monkeypatch.setattr(split_encode, "available_cpus", lambda: 2)
    report_path = tmp_path / "bench.json"
    args = ["bench", "--stages", "finish", "--finish-minutes", "1.2", "--data-dir", str(data)]
    result = CliRunner().invoke(app, [*args, "--json", str(report_path)])
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    one, parts, ffmpeg_join, burst = report["finish"]
    assert [row["encoders"] for row in report["finish"]] == [1, 2, 2, 2]
    assert [row["join"] for row in report["finish"]] == ["none (one piece)", "mp4", "ffmpeg", "burst"]
    assert one["audio_s"] == parts["audio_s"] == ffmpeg_join["audio_s"] == burst["audio_s"] >= 72
    for row in report["finish"]:
        assert row["finish_audio_s_per_s"] == pytest.approx(row["audio_s"] / row["finish_s"], rel=0.02)
        # add_s is rounded to 0.01 s, and an add of 72 s of speech takes a fraction of a second.
        slowest, fastest = (row["audio_s"] / (row["add_s"] + d) for d in (0.005, -0.005))
        assert slowest - 0.1 <= row["add_audio_s_per_s"] <= fastest + 0.1
    assert report["summary"]["burst_add_audio_s_per_s"] == burst["add_audio_s_per_s"]
    assert "join" not in one["finish_steps_s"] and parts["finish_steps_s"]["join"] >= 0
    summary = report["summary"]
    assert summary["finish_parts_over_one_piece"] == pytest.approx(
        one["finish_s"] / parts["finish_s"], abs=0.01
    )
    assert summary["finish_ffmpeg_join_over_mp4_join"] == pytest.approx(
        ffmpeg_join["finish_s"] / parts["finish_s"], rel=0.05
    )
    assert report["cpus"] == 2 and "device" not in report  # no GPU was touched


def test_finish_book_is_real_length_sentences_with_paragraphs_and_chapters():
    speech = np.linspace(-0.5, 0.5, 10 * 48000, dtype=np.float32)
    book = finish_book(speech, 300.0)
    seconds = [len(segment.audio) / 48000 for segment in book]
    assert 300 <= sum(seconds) < 306 and all(2.0 <= s <= 6.0 for s in seconds)
    assert [segment.chunk_index for segment in book] == list(range(len(book)))
    assert book[3].boundary == "paragraph" and book[39].boundary == "chapter" and book[40].chapter == 2


@needs_ffmpeg
@pytest.mark.parametrize("niceness", [0, 19])
def test_the_cpu_load_runs_its_encoders_and_stops_them(niceness):
    load = bench.CpuLoad(shutil.which("ffmpeg"), 3, niceness=niceness)
    with load:
        time.sleep(0.3)
        processes = list(load._processes)
        assert load.running() == 3
        base = os.getpriority(os.PRIO_PROCESS, 0)
        assert [os.getpriority(os.PRIO_PROCESS, p.pid) for p in processes] == [min(19, base + niceness)] * 3
    assert load.running() == 0 and all(p.poll() is not None for p in processes)


@needs_ffmpeg
def test_contention_takes_turns_and_keeps_the_median_of_each_load(monkeypatch):
    """Passes alone, beside the CPU load and beside the GPU load, in turns; each row is its median pass,
    and the summary gives each load's slowdown."""
    order: list[str] = []
    walls = {
        "alone": [2.0, 2.2, 1.8],
        "cpu-load": [2.6, 2.4, 3.0],
        "cpu-load-nice": [2.1, 2.2, 2.2],
        "gpu-load": [3.0, 3.2, 2.9],
    }

    def llm(renderer, chunks, stage, engine_name):
        load = stage.removeprefix("llm-travel-")
        order.append(load)
        if load.startswith("cpu-load"):
            assert len([p for p in running if p.poll() is None]) == expected  # the encoders are at work
        return StageResult(stage, engine_name, 144, 32_000, 392.0, walls[load].pop(0), 70.0)

    class FakeGpuLoad:
        def __init__(self, renderer):
            self.audio_s = 0.0

        def __enter__(self):
            self.audio_s = 500.0  # decoded meanwhile, as if over the pass
            return self

        def __exit__(self, *exc):
            return None

    running: list = []
    real_enter = bench.CpuLoad.__enter__

    def enter(self):
        real_enter(self)
        running[:] = self._processes
        return self

    monkeypatch.setattr(bench, "_run_llm", llm)
    monkeypatch.setattr(bench, "GpuLoad", FakeGpuLoad)
    monkeypatch.setattr(bench.CpuLoad, "__enter__", enter)
    monkeypatch.setattr(split_encode, "available_cpus", lambda: 16)
    expected = 8 + 1 + 4  # early encoders, the loudness meter and the true-peak meters on 16 CPUs
    rows = bench.run_contention(object(), [], "lmdeploy", 3)
    assert order == ["alone", "cpu-load", "cpu-load-nice", "gpu-load"] * 3
    assert [(r.stage, r.wall_s) for r in rows] == [
        ("llm-travel-alone", 2.0),
        ("llm-travel-cpu-load", 2.6),
        ("llm-travel-cpu-load-nice", 2.2),
        ("llm-travel-gpu-load", 3.0),
    ]
    assert rows[1].notes["ffmpeg_processes"] == expected and rows[1].notes["pass_walls_s"] == [2.6, 2.4, 3.0]
    report: dict = {}
    bench._summarise(report, rows)
    assert report["summary"]["llm_slowdown_cpu_load"] == 1.3
    assert report["summary"]["llm_slowdown_cpu_load_nice"] == 1.1
    assert report["summary"]["llm_slowdown_gpu_load"] == 1.5


def test_decode_mix_measures_book_order_calls_against_planned_ones():
    """The stage decodes the same chunks both ways, in turns, and reports what each way padded."""
    from concurrent.futures import ThreadPoolExecutor
    from contextlib import nullcontext
    from types import SimpleNamespace

    import torch

    from fastmaya_cli.codec import padded_shape

    class CountingDecoder:
        bucketed = True

        def __init__(self):
            self.frames_decoded = self.frames_computed = 0
            self.calls = 0

        def decode(self, codes, seeds):
            rows, width = padded_shape(len(codes), max(c.frames for c in codes), bucketed=True)
            self.frames_decoded += sum(c.frames for c in codes)
            self.frames_computed += rows * width
            self.calls += 1
            lengths = [c.frames * 2048 for c in codes]
            return torch.zeros(len(codes), max(lengths)), lengths

    seconds = [17.0, 2.0, 9.0, 17.5, 3.0, 12.0, 16.0, 1.5, 8.0, 17.0] * 4
    with ThreadPoolExecutor(1) as thread:
        renderer = SimpleNamespace(
            decoder=CountingDecoder(),
            upsampler=lambda audio, lengths: (audio, lengths),
            decode_thread=thread,
            decode_stream=nullcontext,
            options=SimpleNamespace(decode_batch=16, max_new_tokens=2048),
        )
        rows = bench.run_decode_mix(renderer, [SimpleNamespace(seconds=s) for s in seconds], repeat=2)
    before, planned_pageable, planned = rows
    assert [row.stage for row in rows] == [
        "decode-novel-before",
        "decode-novel-planned-pageable",
        "decode-novel-planned",
    ]
    assert before.audio_s == planned.audio_s == pytest.approx(sum(seconds), abs=0.2 * len(seconds))
    assert all(row.notes["passes"] == 2 for row in rows)
    assert before.notes["snac_padding"] > 1.5 > planned.notes["snac_padding"] > 1.0
    assert planned_pageable.notes["snac_padding"] == planned.notes["snac_padding"]


def test_each_novel_variant_is_a_known_stage_that_changes_a_real_render_option():
    import dataclasses

    from fastmaya_cli.render import EngineOptions, RenderOptions

    options = RenderOptions(voice="v", engine=EngineOptions())
    assert set(bench.NOVEL_VARIANTS) == {
        "decode-before",
        "ffmpeg-join",
        "join-after",
        "gather",
        "beside",
        "beside-sms16",
        "beside-sms24",
        "beside-sms32",
        "beside-sms48",
        "half",
        "stand-in",
        "sleep",
        "beside-sleep",
        "beside-sms32-sleep",
        "beside-sms32-sleep-drain",
    }
    for variant, change in bench.NOVEL_VARIANTS.items():
        assert f"novel-{variant}" in bench.RENDERER_STAGES and f"novel-{variant}" in bench.NOVEL_STAGES
        changed = dataclasses.replace(options, **change)  # a misspelt field raises here
        assert all(getattr(changed, key) == value != getattr(options, key) for key, value in change.items())


def test_the_engines_worker_loads_a_decoder_only_for_a_stage_that_decodes_beside_it():
    assert bench.decodes_beside_in_some_stage(["novel-llm", "novel-beside", "novel"])
    assert bench.decodes_beside_in_some_stage(["novel-beside-sms32"])
    assert bench.decodes_beside_in_some_stage(["novel-beside-sleep"])
    assert bench.decodes_beside_in_some_stage(["novel-beside-sms32-sleep"])
    assert not bench.decodes_beside_in_some_stage(
        ["novel-llm", "novel", "novel-half", "novel-stand-in", "novel-sleep", "llm"]
    )


def test_the_gain_trail_shows_what_each_early_part_asked_for_against_the_books_gain():
    import math
    from pathlib import Path

    from fastmaya_cli.early_parts import LEFT_NO_ESTIMATE, EarlyPart
    from fastmaya_cli.loudness import Measurement, report_for
    from fastmaya_cli.render import RenderResult

    # Peak-limited: -25 LUFS asks for +6 dB, a -8 dBTP peak allows 4.9 (the limit -3, less 0.1).
    loudness = report_for("acx", Measurement(-25.0, -8.0), 4.8)
    early = (
        EarlyPart(0, 10, None, math.nan, LEFT_NO_ESTIMATE),
        EarlyPart(10, 20, Path("/a"), 5.3, "", 6.2, 5.34),
        EarlyPart(20, 30, Path("/b"), 4.8, "", 6.0, 4.87),
    )
    result = RenderResult(None, 3, 0, 0, 1.0, 1.0, loudness=loudness, early=early)
    assert bench.gain_trail(result) == {
        "gain_db": 4.8,
        "exact_gain_db": 4.9,
        "early_gains_db": [None, 5.3, 4.8],
        "early_loudness_gains_db": [None, 6.2, 6.0],
        "early_peak_limits_db": [None, 5.34, 4.87],
    }
    off = RenderResult(None, 3, 0, 0, 1.0, 1.0, loudness=report_for("off", None, 0.0))
    assert bench.gain_trail(off) == {}


def test_the_novels_passes_run_in_the_order_the_stages_name_them():
    stages = ("llm", "novel-llm", "novel", "novel-llm", "novel-join-after", "novel", "decode-mix", "bs1")
    assert bench.novel_runs(stages) == ["llm", "novel", "llm", "join-after", "novel"]
    assert bench.novel_runs(("render", "novel-decode-eager")) == []
    shared = ("novel-llm", "novel-llm-shared-cores", "novel-shared-cores", "novel", "novel-shared-core")
    assert bench.novel_runs(shared) == ["llm", "llm-shared-cores", "shared-cores", "novel"]
    assert {"novel-llm-shared-cores", "novel-shared-cores"} <= bench.NOVEL_STAGES


class CoreKeeper:
    """An engine pool's core placement as the bench sees it: what it was asked, where it says it is."""

    def __init__(self) -> None:
        self.asked: list[bool] = []

    def keep_scheduler_cores(self, keep: bool):  # noqa: ANN201
        self.asked.append(keep)
        return cores.CorePlan((frozenset({7}),), frozenset(range(7))) if keep else None

    def stats(self) -> dict:
        return {"cuda:0": {"scheduler_cpus": [7] if self.asked[-1] else None}}


@pytest.mark.parametrize("keep", [True, False])
def test_a_pass_runs_with_the_cores_asked_for_and_the_engine_keeps_its_core_after(keep: bool) -> None:
    engine = CoreKeeper()
    with pytest.raises(RuntimeError), bench.scheduler_cores(engine, keep=keep) as note:
        assert engine.asked == [keep]
        raise RuntimeError("a pass that fails")
    assert engine.asked == [keep, True]
    assert note == {"scheduler_cpus": [[7] if keep else None], "other_cpus": 7 if keep else None}
    with bench.scheduler_cores(object(), keep=False) as note:  # an engine in this process: nothing to place
        pass
    assert note == {}


def row(stage: str, wall: float) -> StageResult:
    """A novel row of 1,000 s of speech that took `wall` seconds."""
    return StageResult(stage, "lmdeploy", 1000, 0, 1000.0, wall, 0.0)


def test_a_render_with_shared_cores_is_compared_with_the_last_llm_only_pass_with_shared_cores():
    stages = [
        row("llm-novel-shared-cores", 10.0),
        row("llm-novel", 8.0),
        row("render-novel-shared-cores", 20.0),
        row("render-novel", 10.0),
    ]
    assert bench.novel_shares(stages) == [("render-novel-shared-cores", 0.5), ("render-novel", 0.8)]
    report: dict = {}
    bench._summarise(report, stages)
    assert report["summary"]["novel_shared_cores_render_share_of_llm_only"] == 0.5


def test_allocator_change_counts_what_a_stage_added_and_keeps_what_is_held():
    before = {"device_allocs": 10, "alloc_retries": 0, "reserved_gib": 2.0}
    after = {"device_allocs": 14, "alloc_retries": 1, "reserved_gib": 3.5, "host_allocs": 2}
    assert bench.allocator_change(before, after) == {
        "device_allocs": 4,
        "alloc_retries": 1,
        "reserved_gib": 3.5,
        "host_allocs": 2,
    }


def test_gpu_memory_is_split_between_this_process_and_the_others(monkeypatch):
    from types import SimpleNamespace

    listing = f"{os.getpid()}, 2048\n4242, 90000\n4343, 10\n"
    monkeypatch.setattr(bench.subprocess, "run", lambda *a, **k: SimpleNamespace(stdout=listing))
    assert bench.gpu_memory_by_process() == {"renderer_mib": 2048, "others_mib": 90010}

    def missing(*args, **kwargs):
        raise FileNotFoundError("nvidia-smi")

    monkeypatch.setattr(bench.subprocess, "run", missing)
    assert bench.gpu_memory_by_process() == {}


def test_the_trace_summary_counts_chunks_by_quarter_of_generation_and_the_decoders_time():
    from fastmaya_cli.render import RenderTrace

    trace = RenderTrace((0.5, 2.4, 2.6, 7.0, 9.9, 10.0), ((1.0, 2.0, 2, 20.0), (9.5, 11.0, 4, 40.0)))
    assert bench.trace_summary(trace, 10.0) == {
        "resolved_by_quarter": [2, 1, 1, 2],
        "decoding_during_generation_s": 1.5,
        "decode_calls": 2,
    }
    assert bench.trace_summary(None, 10.0) == {}


def test_each_novel_render_is_compared_with_the_llm_only_pass_run_last_before_it():
    stages = [
        row("llm-novel", 10.0),  # the engine's first pass, slower
        row("llm-novel", 8.0),
        row("render-novel", 10.0),
        row("render-novel-join-after", 16.0),
        row("llm-novel", 5.0),
        row("render-novel", 10.0),
    ]
    assert bench.novel_shares(stages) == [
        ("render-novel", 0.8),
        ("render-novel-join-after", 0.5),
        ("render-novel", 0.5),
    ]
    report: dict = {}
    bench._summarise(report, stages)
    assert report["summary"]["novel_render_share_of_llm_only"] == 0.8  # the first render's
    assert report["summary"]["novel_join_after_render_share_of_llm_only"] == 0.5
    assert bench.novel_shares([row("render-novel", 10.0)]) == []  # no pass before it


def test_each_novel_render_is_also_compared_with_the_mean_of_the_llm_only_passes_around_it():
    stages = [
        row("llm-novel", 10.0),
        row("llm-novel", 8.0),
        row("render-novel", 10.0),
        row("llm-novel-shared-cores", 2.0),  # another kind: not an anchor of the renders with a kept core
        row("render-novel-gather", 16.0),
        row("llm-novel", 4.0),
        row("render-novel-shared-cores", 4.0),
        row("llm-novel-shared-cores", 6.0),
        row("render-novel", 1.0),  # nothing after it
    ]
    assert bench.novel_bracketed_shares(stages) == [
        ("render-novel", 0.6),  # the mean of 8 s and 4 s against 10 s
        ("render-novel-gather", 0.375),
        ("render-novel-shared-cores", 1.0),  # the mean of 2 s and 6 s
    ]
    report: dict = {}
    bench._summarise(report, stages)
    assert report["summary"]["novel_shares_of_bracketing_llm_only"][0] == ("render-novel", 0.6)


def test_a_variant_with_another_decoder_loads_its_own_and_the_others_share_the_loaded_one(scripted_options):
    from fastmaya_cli.engines.scripted import ScriptedEngine
    from fastmaya_cli.progress import Progress
    from fastmaya_cli.render import Renderer

    renderer = Renderer(scripted_options(max_chunk_seconds=1.0), Progress("none"), engine=ScriptedEngine())
    renderer.load_decoder()
    loaded = renderer.decoder
    gathering = bench._sharing(renderer, **bench.NOVEL_VARIANTS["gather"])
    assert gathering._decoder is loaded
    half = bench._sharing(renderer, **bench.NOVEL_VARIANTS["half"])
    assert half._decoder is None
    half.load_decoder()
    assert half.decoder is not loaded and half.decoder.half and not loaded.half
    assert half.upsampler is renderer.upsampler and half.decode_thread is renderer.decode_thread
    assert half._beside_spec().codec_half and not renderer._beside_spec().codec_half
    renderer.close()


def test_each_novel_pass_is_named_as_its_row_will_be():
    names = [bench.novel_stage_name(run) for run in ("llm", "llm-shared-cores", "novel", "shared-cores")]
    assert names == ["llm-novel", "llm-novel-shared-cores", "render-novel", "render-novel-shared-cores"]
    assert bench.novel_stage_name("beside-sms32") == "render-novel-beside-sms32"


def _failing_gpu_stages(error: BaseException):  # noqa: ANN202
    """A GPU bench that measures the novel's LLM-only pass, then fails in the render after it."""

    def run(opts, report):  # noqa: ANN001, ANN202
        report.update(device="Fake GPU", gpus=1)
        report["startup"]["engine_total_s"] = 60.0
        report["running"] = bench.novel_stage_name("llm")
        row = StageResult("llm-novel", "lmdeploy", 1000, 908_201, 11_071.4, 56.33, 69.22).row()
        report["stages"].append(row)
        report["running"] = bench.novel_stage_name("beside-sms32")
        raise error

    return run


def test_a_stage_that_fails_keeps_the_stages_measured_before_it(tmp_path, monkeypatch):
    """Run Z6: a render failing after a measured LLM-only pass of the novel left no JSON at all."""
    from fastmaya_cli.errors import RuntimeFailure

    failure = RuntimeFailure(
        "Decoding beside the engine on cuda:0 failed: CUBLAS.", "Render again without it."
    )
    monkeypatch.setattr(bench, "_run_gpu_stages", _failing_gpu_stages(failure))
    report_path = tmp_path / "bench.json"
    args = ["bench", "--stages", "novel-llm,novel-beside-sms32", "--json", str(report_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == failure.exit_code == 1
    assert "Decoding beside the engine on cuda:0 failed" in result.output and "Traceback" not in result.output
    report = json.loads(report_path.read_text())
    assert [row["stage"] for row in report["stages"]] == ["llm-novel"]
    assert report["stages"][0]["audio_s_per_s"] == pytest.approx(196.6, abs=0.1)
    assert report["startup"] == {"engine_total_s": 60.0} and report["device"] == "Fake GPU"
    assert report["failed"]["stage"] == "render-novel-beside-sms32"
    assert report["failed"]["error"].startswith("RuntimeFailure: Decoding beside the engine")
    assert "running" not in report
    assert "16123" in result.output  # tokens/s: the table of what was measured is printed too


def test_an_interrupted_bench_writes_what_it_measured_and_exits_as_interrupted(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "_run_gpu_stages", _failing_gpu_stages(KeyboardInterrupt()))
    report_path = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", "--stages", "novel-llm,novel", "--json", str(report_path)])
    assert result.exit_code == 130
    report = json.loads(report_path.read_text())
    assert report["failed"] == {"stage": "render-novel-beside-sms32", "error": "interrupted"}
    assert len(report["stages"]) == 1


def test_a_bench_that_finishes_names_no_failure_and_no_stage_in_progress(tmp_path, monkeypatch):
    def run(opts, report):  # noqa: ANN001, ANN202
        report.update(device="Fake GPU", gpus=1)
        report["running"] = "llm-novel"
        report["stages"].append(StageResult("llm-novel", "lmdeploy", 10, 8_000, 97.5, 1.0, 1.0).row())

    monkeypatch.setattr(bench, "_run_gpu_stages", run)
    report_path = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", "--stages", "novel-llm", "--json", str(report_path)])
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    assert "failed" not in report and "running" not in report and len(report["stages"]) == 1


def test_each_stage_is_written_as_it_is_measured_so_a_bench_cut_off_keeps_it(tmp_path, monkeypatch):
    """Run AA1: the machine was taken back during the fifth stage, and the bench, killed, wrote no JSON."""
    report_path = tmp_path / "bench.json"
    seen_mid_run = []

    def run(opts, report):  # noqa: ANN001, ANN202
        report.update(device="Fake GPU", gpus=1)
        for stage, wall in (("llm-novel", 248.43), ("render-novel-beside-sms32-sleep", 266.78)):
            report["running"] = stage
            bench.record_stage(
                report, StageResult(stage, "lmdeploy", 4312, 4_047_330, 49_338.9, wall, 70.0), opts.json_out
            )
            seen_mid_run.append(json.loads(report_path.read_text()))  # what a kill here would leave
        report["running"] = "llm-novel"

    monkeypatch.setattr(bench, "_run_gpu_stages", run)
    args = ["bench", "--stages", "novel-llm,novel-beside-sms32-sleep", "--json", str(report_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    first, second = seen_mid_run
    assert [row["stage"] for row in first["stages"]] == ["llm-novel"]
    assert [row["stage"] for row in second["stages"]] == ["llm-novel", "render-novel-beside-sms32-sleep"]
    assert second["stages"][1]["audio_s_per_s"] == pytest.approx(184.9, abs=0.1)
    assert first["partial"] is second["partial"] is True and first["device"] == "Fake GPU"
    assert "running" not in first and "running" not in second
    final = json.loads(report_path.read_text())
    assert "partial" not in final and len(final["stages"]) == 2
    assert list(tmp_path.iterdir()) == [report_path]  # written through a temporary file, none left behind


def test_a_candidate_render_that_fails_is_noted_and_the_bench_goes_on(tmp_path, monkeypatch):
    """In an A/B, a failing candidate (run Z6's novel-beside-sms32) no longer costs the passes after it."""
    from fastmaya_cli.errors import RuntimeFailure

    def fails() -> StageResult:
        raise RuntimeFailure(
            "Decoding beside the engine on cuda:0 failed: CUBLAS.", "Render again without it."
        )

    def run(opts, report):  # noqa: ANN001, ANN202
        report.update(device="Fake GPU", gpus=1)
        for stage, measure in (
            ("render-novel-beside-sms32", fails),
            (
                "render-novel-beside",
                lambda: StageResult("render-novel-beside", "lmdeploy", 10, 8_000, 97.5, 1.2, 1.0),
            ),
        ):
            report["running"] = stage
            measured = bench.measure_or_note(report, stage, measure)
            if measured is not None:
                report["stages"].append(measured.row())

    monkeypatch.setattr(bench, "_run_gpu_stages", run)
    report_path = tmp_path / "bench.json"
    args = ["bench", "--stages", "novel-beside-sms32,novel-beside", "--json", str(report_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "render-novel-beside-sms32 failed (RuntimeFailure: Decoding beside the engine" in result.output
    report = json.loads(report_path.read_text())
    assert [row["stage"] for row in report["stages"]] == ["render-novel-beside"]  # measured after the failure
    assert report["failed_renders"] == [
        {
            "stage": "render-novel-beside-sms32",
            "error": "RuntimeFailure: Decoding beside the engine on cuda:0 failed: CUBLAS. Render again without it.",
        }
    ]
    assert "failed" not in report and "running" not in report


def test_only_a_runtime_failure_of_a_candidate_lets_the_bench_go_on():
    report: dict = {}

    def bug() -> StageResult:
        raise ValueError("a bug, not a failing candidate")

    with pytest.raises(ValueError, match="a bug"):
        bench.measure_or_note(report, "render-novel-half", bug)
    with pytest.raises(KeyboardInterrupt):
        bench.measure_or_note(report, "render-novel-half", lambda: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert report == {}
    row = StageResult("render-novel-half", "lmdeploy", 10, 8_000, 97.5, 1.2, 1.0)
    assert bench.measure_or_note(report, "render-novel-half", lambda: row) is row and report == {}
