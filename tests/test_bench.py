"""`fastmaya bench` pieces that need no GPU: the median pass, the options and the CPU finish stage."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from fastmaya_cli import split_encode
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
    one, parts = report["finish"]
    assert (one["encoders"], parts["encoders"]) == (1, 2)
    assert one["audio_s"] == parts["audio_s"] >= 72
    for row in (one, parts):
        assert row["finish_audio_s_per_s"] == pytest.approx(row["audio_s"] / row["finish_s"], rel=0.02)
    assert report["summary"]["finish_parts_over_one_piece"] == pytest.approx(
        one["finish_s"] / parts["finish_s"], abs=0.01
    )
    assert report["cpus"] == 2 and "device" not in report  # no GPU was touched


def test_finish_book_is_real_length_sentences_with_paragraphs_and_chapters():
    speech = np.linspace(-0.5, 0.5, 10 * 48000, dtype=np.float32)
    book = finish_book(speech, 300.0)
    seconds = [len(segment.audio) / 48000 for segment in book]
    assert 300 <= sum(seconds) < 306 and all(2.0 <= s <= 6.0 for s in seconds)
    assert [segment.chunk_index for segment in book] == list(range(len(book)))
    assert book[3].boundary == "paragraph" and book[39].boundary == "chapter" and book[40].chapter == 2
