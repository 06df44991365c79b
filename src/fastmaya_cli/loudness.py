"""Whole-book loudness: EBU R128 / ITU-R BS.1770 measurement and the one global gain.

Why ffmpeg's ``ebur128`` filter, fed through a pipe while the book is being assembled:

* It is a maintained, widely used implementation of BS.1770-4 (K-weighting, 400 ms blocks, absolute and
  relative gating) with a 4x-oversampled true-peak meter, written in C: about 450x real time with the
  true-peak meter on one core, so a 13 h book costs under two minutes of CPU.
* Its gating works on a histogram, so memory stays constant however long the book is.
* Running as a subprocess that receives every sample as soon as the assembler writes it, the measurement
  overlaps with synthesis; when the last chunk arrives, the figures are ready.
* ffmpeg is needed anyway for mp3/ogg/opus/m4a/m4b.

pyloudnorm (used by the tests to check the result) measures a whole array in memory: a 13 h book at 48 kHz
would need about 9 GB of float32, and it has no true-peak meter.

The filter prints its summary with one decimal. The gain therefore keeps a 0.1 dB safety margin below the
true-peak limit, so rounding can never push the result over it.
"""

from __future__ import annotations

import math
import os
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
_LOG_TAIL_BYTES = 4096  # the last few of ebur128's per-100 ms lines
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


def parse_ebur128_summary(log: str, true_peak: bool = True) -> Measurement:
    """Read integrated loudness and true peak from the summary ffmpeg's ebur128 filter logs at the end
    (without ``true_peak``, the filter ran without its peak meter: the peak is nan)."""
    start = log.rfind("Summary:")
    if start < 0:
        raise ValueError("no ebur128 summary in ffmpeg's log")
    summary = log[start:]
    integrated = re.search(r"Integrated loudness:\s*I:\s*" + _NUMBER + r"\s*LUFS", summary)
    peak = re.search(r"True peak:\s*Peak:\s*" + _NUMBER + r"\s*dBFS", summary)
    if integrated is None or (true_peak and peak is None):
        raise ValueError("ebur128 summary without integrated loudness or true peak")
    return Measurement(float(integrated.group(1)), float(peak.group(1)) if true_peak and peak else math.nan)


class LoudnessMeter:
    """Streams float32 mono samples into ``ffmpeg -af ebur128=peak=true`` and reads its summary at the end.

    Only the pipe buffer is held in memory; ffmpeg's log goes to an anonymous temporary file so a chatty
    ffmpeg can never block on a full stderr pipe.

    ``true_peak=False`` leaves out the 4x-oversampled peak meter, which takes about 70% of the filter's
    time (1,370 against 400 audio s/s on one core here): the assembler measures the peak with
    ``RangePeakMeters`` instead, on several cores.
    """

    def __init__(self, ffmpeg: str, sample_rate: int, *, true_peak: bool = True) -> None:
        self._true_peak = true_peak
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
            "ebur128=peak=true" if true_peak else "ebur128",
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

    def integrated_so_far(self) -> float | None:
        """The integrated loudness of what ffmpeg has measured so far (from its per-100 ms log lines);
        None before the first line, -inf for silence so far."""
        if self._process is None:
            return None
        # pread: the log's file offset is shared with ffmpeg, which is still writing at it.
        descriptor = self._log.fileno()
        size = os.fstat(descriptor).st_size
        start = max(0, size - _LOG_TAIL_BYTES)
        found = re.findall(
            r"\bI:\s*" + _NUMBER + r"\s*LUFS",
            os.pread(descriptor, size - start, start).decode("ascii", "replace"),
        )
        return float(found[-1]) if found else None

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
            return parse_ebur128_summary(log, self._true_peak)
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
