"""Whole-book loudness: EBU R128 / ITU-R BS.1770 measurement and the one global gain.

The book's integrated loudness is measured in this process as the assembler writes it
(``IntegratedLoudnessMeter``: K-weighting with ``scipy.signal.sosfilt``, 400 ms blocks, absolute and
relative gating). Its true peak is measured by ffmpeg's ``ebur128`` filter with its 4x-oversampled peak
meter, fed through pipes while the book is assembled (``RangePeakMeters``, several ranges at once):

* ffmpeg's filter is a maintained, widely used implementation of BS.1770-4, written in C, and ffmpeg is
  needed anyway for mp3/ogg/opus/m4a/m4b.
* Both measure as the samples arrive, so the measurement overlaps with synthesis; when the last chunk
  arrives, the figures are ready. Memory stays small however long the book is.
* The loudness half of ffmpeg's filter once measured the book too. It ran at 179 audio s/s on one core of
  an H200 host, a tenth of this meter's rate, and set the pace of a render's assembler (run M2, BENCHMARKS.md).

pyloudnorm (used by the tests to check the result) measures a whole array in memory: a 13 h book at 48 kHz
would need about 9 GB of float32, and it has no true-peak meter.

The filter prints its summary with one decimal. The gain therefore keeps a 0.1 dB safety margin below the
true-peak limit, so rounding can never push the result over it.
"""

from __future__ import annotations

import math
import queue
import re
import subprocess
import tempfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from fastmaya_cli.errors import InputError, RuntimeFailure

# The summary rounds to 0.1 dB; keep this much below the true-peak limit so rounding cannot cross it.
TRUE_PEAK_SAFETY_DB = 0.1
# BS.1770's absolute gate: anything quieter is silence, and normalising silence would only amplify noise.
ABSOLUTE_GATE_LUFS = -70.0
# Samples waiting for the range meters, in ranges: every meter can have a whole range queued, so all of
# them work at once (with a queue of 8 blocks a range, a text of short sentences fed one meter at a time).
_QUEUED_RANGES_PER_METER = 1.5


@dataclass(frozen=True)
class LoudnessTarget:
    name: str
    integrated_lufs: float
    true_peak_dbtp: float


LOUDNESS_TARGETS: dict[str, LoudnessTarget] = {
    # ACX asks for -23..-18 dB RMS and peaks <= -3 dB; -19 LUFS sits inside that with room to spare.
    "acx": LoudnessTarget("acx", -19.0, -3.0),
    "podcast": LoudnessTarget("podcast", -16.0, -1.0),
}


def loudness_target(name: str) -> LoudnessTarget | None:
    """The target for a --loudness value; None for "off"."""
    key = name.strip().lower()
    if key == "off":
        return None
    if key not in LOUDNESS_TARGETS:
        choices = ", ".join([*LOUDNESS_TARGETS, "off"])
        raise InputError(f"unknown loudness target {name!r}.", f"Use one of: {choices}.")
    return LOUDNESS_TARGETS[key]


@dataclass(frozen=True)
class Measurement:
    integrated_lufs: float  # -inf for silence
    true_peak_dbtp: float  # -inf for silence; nan where the meter was asked for loudness only


@dataclass(frozen=True)
class LoudnessReport:
    """What was measured and applied. ``*_after`` are the measured values plus the gain (before lossy
    encoding, which can move peaks by a few tenths of a dB)."""

    mode: str  # "acx" | "podcast" | "off"
    target_lufs: float | None
    true_peak_limit_dbtp: float | None
    integrated_lufs_before: float | None
    true_peak_dbtp_before: float | None
    gain_db: float
    integrated_lufs_after: float | None
    true_peak_dbtp_after: float | None

    def as_dict(self) -> dict[str, object]:
        def clean(value: float | None) -> float | None:
            # JSON has no infinities; silence reads as null.
            return None if value is None or not math.isfinite(value) else round(value, 2)

        return {
            "mode": self.mode,
            "target_lufs": self.target_lufs,
            "true_peak_limit_dbtp": self.true_peak_limit_dbtp,
            "integrated_lufs_before": clean(self.integrated_lufs_before),
            "true_peak_dbtp_before": clean(self.true_peak_dbtp_before),
            "gain_db": round(self.gain_db, 2),
            "integrated_lufs_after": clean(self.integrated_lufs_after),
            "true_peak_dbtp_after": clean(self.true_peak_dbtp_after),
        }


def global_gain_db(measured: Measurement, target: LoudnessTarget) -> float:
    """The one gain for the whole book: reach the integrated target unless that would push the true peak
    over the limit, in which case stop at the limit (minus the rounding margin)."""
    if not math.isfinite(measured.integrated_lufs) or measured.integrated_lufs <= ABSOLUTE_GATE_LUFS:
        return 0.0
    return min(
        target.integrated_lufs - measured.integrated_lufs, peak_gain_limit_db(measured.true_peak_dbtp, target)
    )


def peak_gain_limit_db(true_peak_dbtp: float, target: LoudnessTarget) -> float:
    """The most gain a true peak allows under the target's limit (less the rounding margin); inf where
    the peak is not a number (silence, or not measured)."""
    if not math.isfinite(true_peak_dbtp):
        return math.inf
    return target.true_peak_dbtp - TRUE_PEAK_SAFETY_DB - true_peak_dbtp


def report_for(mode: str, measured: Measurement | None, gain_db: float) -> LoudnessReport:
    target = loudness_target(mode)
    if target is None or measured is None:
        return LoudnessReport("off", None, None, None, None, 0.0, None, None)
    return LoudnessReport(
        mode=target.name,
        target_lufs=target.integrated_lufs,
        true_peak_limit_dbtp=target.true_peak_dbtp,
        integrated_lufs_before=measured.integrated_lufs,
        true_peak_dbtp_before=measured.true_peak_dbtp,
        gain_db=gain_db,
        integrated_lufs_after=measured.integrated_lufs + gain_db,
        true_peak_dbtp_after=measured.true_peak_dbtp + gain_db,
    )


_NUMBER = r"(-?(?:inf|nan|\d+(?:\.\d+)?))"


def kill_process(process: subprocess.Popen | None) -> None:
    """Stop an ffmpeg child at once, closing its input pipe whether or not it is still reading."""
    if process is None:
        return
    process.kill()
    try:
        if process.stdin is not None:
            process.stdin.close()
    except BrokenPipeError:
        pass
    process.wait()


def parse_ebur128_summary(log: str) -> Measurement:
    """Read integrated loudness and true peak from the summary ffmpeg's ebur128 filter logs at the end."""
    start = log.rfind("Summary:")
    if start < 0:
        raise ValueError("no ebur128 summary in ffmpeg's log")
    summary = log[start:]
    integrated = re.search(r"Integrated loudness:\s*I:\s*" + _NUMBER + r"\s*LUFS", summary)
    peak = re.search(r"True peak:\s*Peak:\s*" + _NUMBER + r"\s*dBFS", summary)
    if integrated is None or peak is None:
        raise ValueError("ebur128 summary without integrated loudness or true peak")
    return Measurement(float(integrated.group(1)), float(peak.group(1)))


# BS.1770's K-weighting as libebur128 (and ffmpeg's ebur128 filter) derive it for any sample rate: a high
# shelf for the head's acoustics, then the RLB high-pass. At 48 kHz these give the standard's table.
_SHELF_HZ, _SHELF_GAIN_DB, _SHELF_Q = 1681.974450955533, 3.999843853973347, 0.7071752369554196
_HIGH_PASS_HZ, _HIGH_PASS_Q = 38.13547087602444, 0.5003270373238773
_ANTI_SUBNORMAL = np.float32(1e-12)  # see IntegratedLoudnessMeter._kept_normal


def k_weighting(sample_rate: int) -> np.ndarray:
    """The K-weighting filter as second-order sections (``scipy.signal.sosfilt``)."""
    k = math.tan(math.pi * _SHELF_HZ / sample_rate)
    vh = 10 ** (_SHELF_GAIN_DB / 20)
    vb = vh**0.4996667741545416
    a0 = 1 + k / _SHELF_Q + k * k
    shelf = [
        (vh + vb * k / _SHELF_Q + k * k) / a0,
        2 * (k * k - vh) / a0,
        (vh - vb * k / _SHELF_Q + k * k) / a0,
        1.0,
        2 * (k * k - 1) / a0,
        (1 - k / _SHELF_Q + k * k) / a0,
    ]
    k = math.tan(math.pi * _HIGH_PASS_HZ / sample_rate)
    a0 = 1 + k / _HIGH_PASS_Q + k * k
    high_pass = [1.0, -2.0, 1.0, 1.0, 2 * (k * k - 1) / a0, (1 - k / _HIGH_PASS_Q + k * k) / a0]
    return np.array([shelf, high_pass])


class IntegratedLoudnessMeter:
    """BS.1770-4 integrated loudness of a stream, measured in this process as it is fed.

    It replaced ffmpeg's ``ebur128`` filter behind a pipe for the book's loudness (the true peak is still
    ffmpeg's, see ``RangePeakMeters``): that filter ran at 179 audio s/s on one core of an H200
    host, and when a render's audio comes in a burst, that one pipe set the pace of the whole assembler
    (run M2, BENCHMARKS.md). Here the K-weighting is ``scipy.signal.sosfilt`` in float32, which frees the
    interpreter while it filters, and the rest is a sum of squares per 100 ms. It keeps those sums, 8 bytes
    per 100 ms (3.5 MB for 13 h), so the gating is exact rather than a histogram's, and it is not rounded
    to 0.1 LU as ffmpeg's summary is.
    """

    def __init__(self, sample_rate: int) -> None:
        from scipy.signal import sosfilt

        self._sosfilt = sosfilt
        self._sos = k_weighting(sample_rate).astype(np.float32)
        self._state = np.zeros((2, 2), dtype=np.float32)
        self._step = sample_rate // 10  # 100 ms: the 400 ms gating blocks overlap by 75%
        self._partial = 0.0  # sum of squares of the step being filled
        self._partial_count = 0
        self._energies = np.zeros(1024, dtype=np.float64)  # sum of squares of each complete step
        self._steps = 0
        self._dither = np.zeros(0, dtype=np.float32)
        self._fed = 0
        self._lock = threading.Lock()  # feed() runs on one thread, integrated_so_far() on another
        self._closed = False

    def feed(self, samples: np.ndarray) -> None:
        if self._closed:
            raise RuntimeError("loudness meter already closed")
        if not len(samples):
            return
        weighted, self._state = self._sosfilt(self._sos, self._kept_normal(samples), zi=self._state)
        head = min(len(weighted), self._step - self._partial_count)
        self._partial += _sum_of_squares(weighted[:head])
        self._partial_count += head
        if self._partial_count < self._step:
            return
        rest = weighted[head:]
        whole = len(rest) // self._step * self._step
        steps = rest[:whole].reshape(-1, self._step)
        # float32 products summed per step: 8e-7 from float64's sums, and 100 times as fast.
        energies = np.concatenate([[self._partial], np.einsum("ij,ij->i", steps, steps)])
        self._partial, self._partial_count = _sum_of_squares(rest[whole:]), len(rest) - whole
        with self._lock:
            self._append(energies)

    def _kept_normal(self, samples: np.ndarray) -> np.ndarray:
        """The samples plus a tone at Nyquist far under the absolute gate (-236 LUFS), so that in silence
        the filter's state never decays into subnormal floats, which the H200 hosts' CPUs compute 50 times
        slower (the meter measured 56 audio s/s there on silence after speech)."""
        count = len(samples)
        if len(self._dither) < count + 1:
            self._dither = _ANTI_SUBNORMAL * np.where(np.arange(count + 1) % 2, -1, 1).astype(np.float32)
        phase = self._fed % 2
        self._fed += count
        return np.asarray(samples, dtype=np.float32) + self._dither[phase : phase + count]

    def _append(self, energies: np.ndarray) -> None:
        needed = self._steps + len(energies)
        if needed > len(self._energies):
            grown = np.zeros(max(needed, 2 * len(self._energies)), dtype=np.float64)
            grown[: self._steps] = self._energies[: self._steps]
            self._energies = grown
        self._energies[self._steps : needed] = energies
        self._steps = needed

    def integrated_so_far(self) -> float | None:
        """The integrated loudness of what was fed so far; None before the first 400 ms, -inf for
        silence so far."""
        if self._closed:
            return None
        with self._lock:
            energies = self._energies[: self._steps].copy()
        return gated_loudness(energies, self._step)

    def result(self) -> Measurement:
        """The integrated loudness of everything fed (-inf for silence); no true peak (nan)."""
        loudness = self.integrated_so_far()
        self._closed = True
        return Measurement(-math.inf if loudness is None else loudness, math.nan)

    def abort(self) -> None:
        self._closed = True


def _sum_of_squares(samples: np.ndarray) -> float:
    return float(np.dot(samples, samples))


def gated_loudness(step_energies: np.ndarray, step_samples: int) -> float | None:
    """BS.1770-4 integrated loudness from the sums of squares of consecutive 100 ms steps of K-weighted
    samples: 400 ms blocks a step apart, gated at -70 LUFS and then 10 LU under the loudness of the
    blocks left. None with no whole block, -inf where no block passes the gates."""
    if len(step_energies) < 4:
        return None
    blocks = (step_energies[:-3] + step_energies[1:-2] + step_energies[2:-1] + step_energies[3:]) / (
        4 * step_samples
    )
    with np.errstate(divide="ignore"):
        loudness = -0.691 + 10 * np.log10(blocks)
    kept = blocks[loudness > ABSOLUTE_GATE_LUFS]
    if not len(kept):
        return -math.inf
    relative_gate = -0.691 + 10 * math.log10(float(kept.mean())) - 10
    kept = blocks[loudness > max(ABSOLUTE_GATE_LUFS, relative_gate)]
    return -0.691 + 10 * math.log10(float(kept.mean()))


class LoudnessMeter:
    """Streams float32 mono samples into ``ffmpeg -af ebur128=peak=true`` and reads its summary at the end.

    Only the pipe buffer is held in memory; ffmpeg's log goes to an anonymous temporary file so a chatty
    ffmpeg can never block on a full stderr pipe. The 4x-oversampled peak meter takes most of the
    filter's time (400 audio s/s on one core here): the assembler runs several at once on ranges of the
    book (``RangePeakMeters``) and measures the loudness with ``IntegratedLoudnessMeter``.
    """

    def __init__(self, ffmpeg: str, sample_rate: int) -> None:
        # Lives as long as the ffmpeg process, so no with-block; closed in result()/abort().
        self._log: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115
        command = [
            ffmpeg,
            "-hide_banner",
            "-nostats",
            "-loglevel",
            "info",
            "-f",
            "f32le",
            "-ar",
            str(sample_rate),
            "-ac",
            "1",
            "-i",
            "pipe:0",
            "-af",
            "ebur128=peak=true",
            "-f",
            "null",
            "-",
        ]
        try:
            self._process: subprocess.Popen[bytes] | None = subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self._log
            )
        except OSError as error:
            self._log.close()
            raise RuntimeFailure(
                f"could not start ffmpeg to measure loudness: {error}.",
                "Check that ffmpeg is installed and runs, or use --loudness off.",
            ) from error

    def feed(self, samples: np.ndarray) -> None:
        process = self._process
        if process is None or process.stdin is None:
            raise RuntimeError("loudness meter already closed")
        try:
            process.stdin.write(np.ascontiguousarray(samples, dtype="<f4").tobytes())
        except BrokenPipeError as error:
            raise RuntimeFailure(
                f"the ffmpeg loudness meter stopped early: {self._log_tail()}",
                "Check the ffmpeg installation, or use --loudness off.",
            ) from error

    def result(self) -> Measurement:
        """Close the input, wait for ffmpeg and return what it measured."""
        process = self._process
        if process is None:
            raise RuntimeError("loudness meter already closed")
        try:
            if process.stdin is not None:
                process.stdin.close()
        except BrokenPipeError:
            pass
        code = process.wait()
        self._process = None
        log = self._read_log()
        self._log.close()
        try:
            if code != 0:
                raise ValueError(f"ffmpeg exited with code {code}")
            return parse_ebur128_summary(log)
        except ValueError as error:
            raise RuntimeFailure(
                f"could not measure the book's loudness ({error}): {_last_lines(log)}",
                "Check the ffmpeg installation, or use --loudness off.",
            ) from error

    def abort(self) -> None:
        """Stop ffmpeg without waiting for a summary (on errors)."""
        kill_process(self._process)
        self._process = None
        self._log.close()

    def _read_log(self) -> str:
        self._log.seek(0)
        return self._log.read().decode("utf-8", "replace")

    def _log_tail(self) -> str:
        if self._process is not None:
            self._process.wait()
        return _last_lines(self._read_log())


class RangePeakMeters:
    """The true peak of a stream, measured in consecutive ranges by meters that run at once.

    The 4x-oversampled true-peak meter runs at about 400 audio s/s on one core here, slower than an H100
    renders speech. So the stream is cut into ranges of at least ``range_samples``, each measured by its own
    ffmpeg fed from a thread of its own, up to ``workers`` at a time; the stream's peak is the largest
    range's. A range ends only where the caller says silence follows, so each meter starts and ends on
    the silence its resampler assumes. The ranges' queues share one bound, in samples, room for a range
    and a half per meter: the caller waits while they hold that much, so memory stays bounded (about
    70 MB for 4 meters of 60 s at 48 kHz), yet every meter has its whole range to work on.
    """

    def __init__(self, ffmpeg: str, sample_rate: int, range_samples: int, workers: int) -> None:
        self._ffmpeg = ffmpeg
        self._sample_rate = sample_rate
        self._range_samples = range_samples
        workers = max(1, workers)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fastmaya-peak")
        self._futures: list[Future[float]] = []
        self._meters: list[LoudnessMeter] = []
        self._meters_lock = threading.Lock()
        self._queue: queue.Queue[np.ndarray | None] | None = None
        self._fed = 0
        self._queued_limit = math.ceil(_QUEUED_RANGES_PER_METER * workers * range_samples)
        self._queued = 0  # samples put and not yet taken by a meter, in every range
        self._taken = threading.Condition()

    @property
    def ranges(self) -> int:
        """Ranges begun so far."""
        return len(self._futures)

    def feed(self, samples: np.ndarray, silence_follows: bool = False) -> None:
        """Measure these samples next; the caller must not change them afterwards."""
        if self._queue is None:
            self._queue = queue.Queue()  # bounded by _queued_limit across every range
            self._futures.append(self._pool.submit(self._measure, self._queue))
            self._fed = 0
        self._put(samples)
        self._fed += len(samples)
        if silence_follows and self._fed >= self._range_samples:
            self._end_range()

    def peak_so_far(self) -> float:
        """The largest true peak of the ranges measured so far, without waiting (-inf before the first)."""
        done = [f.result() for f in self._futures if f.done() and f.exception() is None]
        return max(done, default=-math.inf)

    def result(self) -> float:
        """Wait for every range; the largest true peak in dBTP (-inf for silence or no samples)."""
        if self._queue is not None:
            self._end_range()
        self._pool.shutdown(wait=True)
        return max((future.result() for future in self._futures), default=-math.inf)

    def abort(self) -> None:
        """Stop every meter at once (on errors); nothing is measured."""
        if self._queue is not None:
            self._queue.put_nowait(None)
            self._queue = None
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._meters_lock:
            for meter in self._meters:
                meter.abort()

    def _end_range(self) -> None:
        self._put(None)
        self._queue = None

    def _put(self, item: np.ndarray | None) -> None:
        assert self._queue is not None
        size = 0 if item is None else len(item)
        with self._taken:
            # While the meters are behind, wait, unless one has failed. Something queued always drains:
            # every range but the last is complete, and the last is fed by this very caller.
            while self._queued and self._queued + size > self._queued_limit:
                failed = next((f for f in self._futures if f.done() and f.exception() is not None), None)
                if failed is not None:
                    failed.result()
                self._taken.wait(0.2)
            self._queued += size
        self._queue.put(item)

    def _measure(self, source: queue.Queue[np.ndarray | None]) -> float:
        meter = LoudnessMeter(self._ffmpeg, self._sample_rate)
        with self._meters_lock:
            self._meters.append(meter)
        try:
            while (block := source.get()) is not None:
                with self._taken:
                    self._queued -= len(block)
                    self._taken.notify_all()
                meter.feed(block)
        except BaseException:
            meter.abort()
            raise
        return meter.result().true_peak_dbtp


def _last_lines(log: str, count: int = 3) -> str:
    lines = [line.strip() for line in log.strip().splitlines() if line.strip()]
    return " | ".join(lines[-count:]) or "(no output)"


def measure_file(ffmpeg: str, path: Path) -> Measurement:
    """Measure an audio file (any format ffmpeg reads); used to check a finished output."""
    run = subprocess.run(
        [ffmpeg, "-hide_banner", "-nostats", "-i", str(path), "-af", "ebur128=peak=true", "-f", "null", "-"],
        capture_output=True,
        text=True,
        check=False,
    )
    if run.returncode != 0:
        raise RuntimeFailure(f"could not measure {path}: {_last_lines(run.stderr)}", "Check the file.")
    return parse_ebur128_summary(run.stderr)
