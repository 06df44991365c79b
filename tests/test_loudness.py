"""Whole-book loudness: measurement, the one global gain, and the result on real speech."""

from __future__ import annotations

import math
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pyloudnorm
import pytest
import soundfile as sf
from scipy.signal import resample_poly

from fastmaya_cli.assemble import Assembler, OutputSpec, Pauses, Segment
from fastmaya_cli.errors import InputError
from fastmaya_cli.loudness import (
    LOUDNESS_TARGETS,
    TRUE_PEAK_SAFETY_DB,
    IntegratedLoudnessMeter,
    LoudnessMeter,
    LoudnessReport,
    Measurement,
    RangePeakMeters,
    global_gain_db,
    k_weighting,
    loudness_target,
    measure_file,
    parse_ebur128_summary,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FFMPEG = shutil.which("ffmpeg")
needs_ffmpeg = pytest.mark.skipif(FFMPEG is None, reason="ffmpeg is not installed")
SR = 48000


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    """5.5 s of real Maya1 speech, resampled 24 kHz -> 48 kHz (peak at 0 dBFS, about -16 LUFS)."""
    path = DATA / "maya1_24k.wav"
    if not path.exists():
        pytest.skip(f"real speech sample missing: {path}")
    audio, rate = sf.read(path, dtype="float32")
    assert rate == 24000
    return resample_poly(audio, 2, 1).astype(np.float32)


def true_peak_dbtp(audio: np.ndarray) -> float:
    """4x oversampled peak, as BS.1770 specifies for true peak."""
    return 20 * math.log10(float(np.max(np.abs(resample_poly(audio.astype(np.float64), 4, 1)))))


def assemble(tmp_path: Path, pieces: list[np.ndarray], loudness: str, name: str = "book.wav") -> Path:
    path, _ = assemble_with_report(tmp_path, pieces, loudness, name)
    return path


def assemble_with_report(
    tmp_path: Path, pieces: list[np.ndarray], loudness: str, name: str = "book.wav"
) -> tuple[Path, LoudnessReport]:
    spec = OutputSpec(tmp_path / name, "wav", sample_rate=SR, loudness=loudness, bit_depth=24)
    with Assembler(spec, Pauses()) as assembler:
        for index, piece in enumerate(pieces):
            assembler.add(Segment(index, piece, "paragraph", 1, "One", f"chunk {index}"))
        result = assembler.finish()
    return tmp_path / name, result.loudness


SUMMARY = """
[Parsed_ebur128_0 @ 0x55] t: 5.1  TARGET:-23 LUFS    M: -17.0 S: -16.4     I: -16.2 LUFS
[Parsed_ebur128_0 @ 0x55] Summary:

  Integrated loudness:
    I:         -16.1 LUFS
    Threshold: -26.7 LUFS

  Loudness range:
    LRA:         1.9 LU
    Threshold: -36.7 LUFS
    LRA low:   -17.6 LUFS
    LRA high:  -15.8 LUFS

  True peak:
    Peak:        0.4 dBFS
"""


def test_parse_summary_reads_the_final_figures_not_the_running_ones() -> None:
    assert parse_ebur128_summary(SUMMARY) == Measurement(-16.1, 0.4)


def test_parse_summary_needs_the_peak() -> None:
    loudness_only = SUMMARY[: SUMMARY.index("  True peak:")]
    with pytest.raises(ValueError):
        parse_ebur128_summary(loudness_only)


def test_k_weighting_at_48_khz_is_the_standards_table() -> None:
    """BS.1770-4, tables 1 and 2: the pre-filter and the RLB high-pass at 48 kHz."""
    expected = [
        [1.53512485958697, -2.69169618940638, 1.19839281085285, 1.0, -1.69065929318241, 0.73248077421585],
        [1.0, -2.0, 1.0, 1.0, -1.99004745483398, 0.99007225036621],
    ]
    np.testing.assert_allclose(k_weighting(48000), expected, atol=1e-8)


def test_a_full_scale_997_hz_tone_reads_minus_3_lufs() -> None:
    """BS.1770's calibration: a 0 dBFS 997 Hz sine in one channel measures -3.01 LKFS; at 24 kHz too."""
    # At 24 kHz the bilinear transform bends the shelf (at 1.7 kHz) a little toward Nyquist.
    for rate, tolerance in ((48000, 0.01), (44100, 0.01), (24000, 0.05)):
        tone = np.sin(np.arange(10 * rate) * 2 * np.pi * 997 / rate).astype(np.float32)
        meter = IntegratedLoudnessMeter(rate)
        meter.feed(tone)
        assert meter.result().integrated_lufs == pytest.approx(-3.01, abs=tolerance), rate


def test_gating_leaves_out_silence_and_quiet_passages() -> None:
    """Blocks under -70 LUFS, and then those 10 LU under the loudness of the rest, do not count."""
    rate = 48000
    loud = 0.5 * np.sin(np.arange(4 * rate) * 2 * np.pi * 997 / rate).astype(np.float32)
    alone = IntegratedLoudnessMeter(rate)
    alone.feed(loud)
    with_quiet = IntegratedLoudnessMeter(rate)
    pieces = (loud, np.zeros(20 * rate, np.float32), 0.01 * loud, loud)  # -40 dB: under the relative gate
    for block in pieces:
        with_quiet.feed(block)
    gated = with_quiet.result().integrated_lufs
    whole = np.concatenate(pieces).astype(np.float64)
    assert gated == pytest.approx(pyloudnorm.Meter(rate).integrated_loudness(whole), abs=0.05)
    # Only the blocks that straddle the loud tone's edges count besides the tone itself: not 13 dB down,
    # as the mean over the whole stream would be.
    assert gated == pytest.approx(alone.result().integrated_lufs, abs=0.2)
    silent = IntegratedLoudnessMeter(rate)
    assert silent.integrated_so_far() is None  # not a whole 400 ms block yet
    silent.feed(np.zeros(rate, np.float32))
    assert silent.result().integrated_lufs == -math.inf


def test_in_silence_the_filter_never_decays_into_subnormal_numbers(speech: np.ndarray) -> None:
    """Subnormal floats are 50 times slower on the GPU hosts' CPUs; a long pause must not reach them,
    nor change the loudness."""
    meter = IntegratedLoudnessMeter(SR)
    meter.feed(speech)
    before = meter.integrated_so_far()
    for _ in range(10):
        meter.feed(np.zeros(SR, dtype=np.float32))  # 10 s of silence: the state alone would underflow
        state = np.abs(meter._state)
        assert state.max() >= np.finfo(np.float32).tiny, state
        assert np.all((state == 0) | (state >= np.finfo(np.float32).tiny)), state
    meter.feed(speech)
    assert meter.result().integrated_lufs == pytest.approx(before, abs=0.05)  # the pause is gated out


def test_the_meter_gives_the_same_loudness_however_the_samples_are_cut(speech: np.ndarray) -> None:
    signal = np.concatenate([speech, 0.3 * speech, speech])
    figures = set()
    for size in (1, 4799, 4800, 10_007, len(signal)):
        meter = IntegratedLoudnessMeter(SR)
        for start in range(0, min(len(signal), 48_000 if size == 1 else len(signal)), size):
            meter.feed(signal[start : start + size])
        if size == 1:  # one sample at a time for the first second, then the rest at once
            meter.feed(signal[48_000:])
        figures.add(round(meter.result().integrated_lufs, 4))
    assert len(figures) == 1, figures


@needs_ffmpeg
def test_the_meter_agrees_with_ffmpeg_and_pyloudnorm(speech: np.ndarray) -> None:
    assert FFMPEG is not None
    signal = np.concatenate([speech, 0.5 * speech, np.zeros(SR, np.float32), 0.2 * speech, speech])
    meter = IntegratedLoudnessMeter(SR)
    ffmpeg = LoudnessMeter(FFMPEG, SR)
    for start in range(0, len(signal), 10_000):
        meter.feed(signal[start : start + 10_000])
        ffmpeg.feed(signal[start : start + 10_000])
    measured = meter.result()
    assert math.isnan(measured.true_peak_dbtp)  # loudness only
    ffmpegs = ffmpeg.result().integrated_lufs  # rounded to 0.1
    assert measured.integrated_lufs == pytest.approx(ffmpegs, abs=0.1)
    reference = pyloudnorm.Meter(SR).integrated_loudness(signal.astype(np.float64))
    assert measured.integrated_lufs == pytest.approx(reference, abs=0.1)


def test_the_meter_reports_the_loudness_so_far() -> None:
    meter = IntegratedLoudnessMeter(SR)
    tone = (0.1 * np.sin(np.arange(5 * SR) * 2 * np.pi * 997 / SR)).astype(np.float32)
    meter.feed(tone)
    assert meter.integrated_so_far() == pytest.approx(-23.01, abs=0.01)  # a -20 dBFS sine
    meter.feed(0.5 * tone)  # 6 dB down, inside the relative gate: the mean power is 5/8 of the tone's
    assert meter.integrated_so_far() == pytest.approx(-23.01 + 10 * math.log10(5 / 8), abs=0.02)
    assert meter.result().integrated_lufs == pytest.approx(-23.01 + 10 * math.log10(5 / 8), abs=0.02)
    assert meter.integrated_so_far() is None  # closed


@needs_ffmpeg
def test_range_meters_find_the_peak_of_the_whole_stream(speech: np.ndarray) -> None:
    """Ranges end only where silence follows; the largest range's peak is the whole stream's."""
    assert FFMPEG is not None
    pause = np.zeros(SR // 4, dtype=np.float32)
    pieces = [speech * gain for gain in (0.2, 0.3, 0.9, 0.25)]  # the peak is in the third piece
    meters = RangePeakMeters(FFMPEG, SR, range_samples=len(speech), workers=2)
    whole = LoudnessMeter(FFMPEG, SR)
    for piece in pieces:
        for block, silence_follows in ((piece, True), (pause, False)):
            meters.feed(block, silence_follows)
            whole.feed(block)
    peak = meters.result()
    assert meters.ranges == 5  # a range ends after each piece, and the last pause is a range of its own
    assert peak == pytest.approx(whole.result().true_peak_dbtp, abs=0.05)


class _HeldMeter:
    """Stands in for LoudnessMeter in RangePeakMeters: takes blocks only once `go` is set."""

    go = threading.Event()
    lock = threading.Lock()
    running = 0
    most_running = 0

    def __init__(self, ffmpeg: str, sample_rate: int) -> None:
        with _HeldMeter.lock:
            _HeldMeter.running += 1
            _HeldMeter.most_running = max(_HeldMeter.most_running, _HeldMeter.running)

    def feed(self, samples: np.ndarray) -> None:
        assert _HeldMeter.go.wait(10)

    def result(self) -> Measurement:
        with _HeldMeter.lock:
            _HeldMeter.running -= 1
        return Measurement(-20.0, -1.0)

    def abort(self) -> None:
        pass


def test_range_meters_of_short_blocks_all_work_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sentences shorter than a range's eighth (a text of short sentences) still give every meter a range
    to measure at once, while the samples queued for the meters stay within their bound."""
    monkeypatch.setattr("fastmaya_cli.loudness.LoudnessMeter", _HeldMeter)
    _HeldMeter.go.clear()
    _HeldMeter.running = _HeldMeter.most_running = 0
    block = np.zeros(SR, dtype=np.float32)  # 1 s sentences, ranges of 20 s
    meters = RangePeakMeters("ffmpeg", SR, range_samples=20 * SR, workers=3)
    fed: list[int] = []

    def feed() -> None:
        for _ in range(6 * 20):  # six ranges
            meters.feed(block, silence_follows=True)
            fed.append(len(block))

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    deadline = time.monotonic() + 10
    while _HeldMeter.most_running < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _HeldMeter.most_running == 3  # with a queue of 8 blocks a range, one meter held the feeder
    time.sleep(0.2)
    held = sum(fed)
    # The bound (a range and a half per meter) holds the feeder back; each meter has taken one block.
    assert feeder.is_alive() and held <= 1.5 * 3 * 20 * SR + 3 * SR
    _HeldMeter.go.set()
    feeder.join(10)
    assert not feeder.is_alive() and sum(fed) == 120 * SR
    assert meters.result() == -1.0 and meters.ranges == 6


@needs_ffmpeg
def test_range_meters_abort_without_waiting(speech: np.ndarray) -> None:
    assert FFMPEG is not None
    meters = RangePeakMeters(FFMPEG, SR, range_samples=SR, workers=1)
    meters.feed(speech)
    meters.abort()  # returns although the range was never ended


def test_parse_summary_of_silence_gives_minus_infinity() -> None:
    silent = SUMMARY.replace("-16.1 LUFS", "-70.0 LUFS").replace("0.4 dBFS", "-inf dBFS")
    measured = parse_ebur128_summary(silent)
    assert measured.integrated_lufs == -70.0 and measured.true_peak_dbtp == -math.inf
    with pytest.raises(ValueError):
        parse_ebur128_summary("ffmpeg said nothing useful")


def test_gain_reaches_the_target_when_the_peak_allows() -> None:
    acx = LOUDNESS_TARGETS["acx"]
    assert global_gain_db(Measurement(-25.0, -12.0), acx) == pytest.approx(6.0)
    assert global_gain_db(Measurement(-14.0, -1.0), acx) == pytest.approx(-5.0)


def test_gain_stops_at_the_true_peak_limit() -> None:
    acx = LOUDNESS_TARGETS["acx"]
    gain = global_gain_db(Measurement(-25.0, -6.0), acx)  # +6 dB would put the peak at 0 dBTP
    assert gain == pytest.approx(-3.0 - TRUE_PEAK_SAFETY_DB + 6.0)
    podcast = LOUDNESS_TARGETS["podcast"]
    assert global_gain_db(Measurement(-20.0, -2.0), podcast) == pytest.approx(1.0 - TRUE_PEAK_SAFETY_DB)


def test_silence_is_left_alone() -> None:
    acx = LOUDNESS_TARGETS["acx"]
    assert global_gain_db(Measurement(-math.inf, -math.inf), acx) == 0.0
    assert global_gain_db(Measurement(-70.0, -60.0), acx) == 0.0


def test_unknown_target_is_an_input_error() -> None:
    assert loudness_target("OFF") is None
    assert loudness_target("acx") == LOUDNESS_TARGETS["acx"]
    with pytest.raises(InputError, match="unknown loudness target"):
        loudness_target("loud")


@needs_ffmpeg
def test_streaming_meter_agrees_with_pyloudnorm(speech: np.ndarray) -> None:
    assert FFMPEG is not None
    signal = np.concatenate([speech, 0.5 * speech, speech])
    meter = LoudnessMeter(FFMPEG, SR)
    for start in range(0, len(signal), 10_000):  # fed in pieces, like the assembler does
        meter.feed(signal[start : start + 10_000])
    measured = meter.result()
    reference = pyloudnorm.Meter(SR).integrated_loudness(signal.astype(np.float64))
    assert measured.integrated_lufs == pytest.approx(reference, abs=0.15)
    assert measured.true_peak_dbtp == pytest.approx(true_peak_dbtp(signal), abs=0.15)


@needs_ffmpeg
def test_acx_on_real_speech_at_different_levels(tmp_path: Path, speech: np.ndarray) -> None:
    # Peak-limited speech (as a mastering limiter leaves it), so -19 LUFS is reachable under -3 dBTP;
    # raw Maya1 speech peaks 16 dB above its loudness, see the next test.
    limited = np.clip(speech, -0.5, 0.5)
    levels = [1.0, 0.6, 0.4, 0.8, 0.5]
    pieces = [level * limited for level in levels]  # about 28 s
    path, report = assemble_with_report(tmp_path, pieces, "acx")

    result, rate = sf.read(path, dtype="float64")
    assert rate == SR
    loudness = pyloudnorm.Meter(SR).integrated_loudness(result)
    assert loudness == pytest.approx(-19.0, abs=0.5)
    assert true_peak_dbtp(result) <= -3.0
    assert report.mode == "acx" and report.target_lufs == -19.0
    assert report.integrated_lufs_after == pytest.approx(loudness, abs=0.2)
    assert report.gain_db == pytest.approx(report.integrated_lufs_after - report.integrated_lufs_before)
    assert report.true_peak_dbtp_after == pytest.approx(true_peak_dbtp(result), abs=0.2)
    assert FFMPEG is not None
    assert measure_file(FFMPEG, path).true_peak_dbtp <= -3.0

    # One global gain: every chunk moved by the same number of dB, so their level differences survive.
    head, pause, fade = round(0.5 * SR), round(0.6 * SR), round(0.01 * SR)
    gains, start = [], head
    for piece in pieces:
        placed = result[start + fade : start + len(piece) - fade]
        gains.append(20 * math.log10(np.sqrt(np.mean(placed**2)) / np.sqrt(np.mean(piece[fade:-fade] ** 2))))
        start += len(piece) + pause - fade
    assert max(gains) - min(gains) < 0.01


@needs_ffmpeg
def test_true_peak_limit_wins_over_the_loudness_target(tmp_path: Path, speech: np.ndarray) -> None:
    pieces = [speech, 0.7 * speech, 0.5 * speech]  # raw speech: peak 0 dBFS, about -17 LUFS overall
    before = pyloudnorm.Meter(SR).integrated_loudness(
        np.concatenate([np.zeros(SR // 2), *[np.concatenate([p, np.zeros(SR // 2)]) for p in pieces]])
    )
    path = assemble(tmp_path, pieces, "acx")
    result, _ = sf.read(path, dtype="float64")
    peak = true_peak_dbtp(result)
    loudness = pyloudnorm.Meter(SR).integrated_loudness(result)
    assert -3.0 - 3 * TRUE_PEAK_SAFETY_DB <= peak <= -3.0  # the gain stopped right at the limit
    assert loudness < -19.5  # so the target was not reached ...
    assert loudness - before == pytest.approx(peak - true_peak_dbtp(np.concatenate(pieces)), abs=0.1)


@needs_ffmpeg
def test_podcast_target(tmp_path: Path, speech: np.ndarray) -> None:
    limited = np.clip(speech, -0.3, 0.3)
    path = assemble(tmp_path, [limited, 0.8 * limited], "podcast")
    result, _ = sf.read(path, dtype="float64")
    assert pyloudnorm.Meter(SR).integrated_loudness(result) == pytest.approx(-16.0, abs=0.5)
    assert true_peak_dbtp(result) <= -1.0


def test_loudness_off_keeps_the_samples(tmp_path: Path, speech: np.ndarray) -> None:
    piece = 0.3 * speech[: SR * 2]
    path = assemble(tmp_path, [piece], "off")
    result, _ = sf.read(path, dtype="float32")
    head, fade = round(0.5 * SR), round(0.01 * SR)
    np.testing.assert_allclose(result[head + fade : head + len(piece) - fade], piece[fade:-fade], atol=2e-6)
