"""`fastmaya bench` pieces that need no GPU: the median pass and the options."""

from __future__ import annotations

from typer.testing import CliRunner

from fastmaya_cli.bench import StageResult, median_pass
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
