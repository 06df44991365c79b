"""The upsample stage: SNAC's 24 kHz audio to the 48 kHz output rate.

Three kinds:

- `speechsr`: the learned SpeechSR 48 kHz generator adds the band above 12 kHz that SNAC cannot produce.
  The generator was trained on 16 kHz input, so it gets the 16 kHz version of the audio, but only the band
  above ~12 kHz is taken from its output: everything below ~11.5 kHz is SNAC's own audio, resampled to
  48 kHz, untouched (an FFT crossover blends the two between 11.5 and 12 kHz). FastMaya1 instead used the
  generator's output for the whole band, which threw away SNAC's 8-12 kHz and re-synthesised it.
- `resample`: band-limited 24 -> 48 kHz resampling (a Kaiser-windowed sinc FIR, 90 dB stopband); nothing
  above 12 kHz.
- `none`: the 24 kHz audio as it is.

How `speechsr` runs. Each utterance is cut into windows of `SEGMENT_CORE_24K` samples plus
`SEGMENT_MARGIN_24K` samples of context on each side (zeros beyond the utterance's ends); all windows of a
batch are processed together, in groups of at most `max_segments` (this bounds memory, keeps the
generator's input length fixed, and wastes no work on batch padding), and only each window's core is kept. Every filter is a finite FIR applied circularly by FFT inside the window, and the
generator's receptive field is finite, so what reaches a core from the window's edges is nothing: the
margins (17.5 ms) exceed what everything together can reach (`DEPENDENCY_RADIUS_48K`, ~16 ms). So
the result does not depend on the window size, and processing a long signal in pieces equals processing
it whole except within `DEPENDENCY_RADIUS_48K` output samples of each seam, where a piece sees silence
instead of its neighbour.

Speed: on CUDA the generator runs in float16 with fused Triton kernels (see speechsr.py); on an H100,
`benchmark_upsampler("cuda", None, 64, 10.0, False)` measured ~3,900 audio seconds per second, end to end.

Peaks: nothing is normalised. After the merge, a peak limiter acts only around samples that would exceed
`OUTPUT_CEILING` (0.99, -0.09 dBFS): a smooth gain dip (Hann-shaped, ~2 ms) that brings them to the
ceiling, then a hard clamp at the ceiling only to absorb float rounding. The same limiter guards `resample`.
"""

from __future__ import annotations

import hashlib
import math
import sys
import time
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from scipy import signal

from .errors import InputError, RuntimeFailure
from .speechsr import RECEPTIVE_FIELD_48K, SpeechSR48k, build_generator
from .transfers import is_true, to_device
from .triton_support import fused_kernels_available

SNAC_RATE = 24_000
OUTPUT_RATE = 48_000
MODEL_INPUT_RATE = 16_000

FLASHSR_REPO = "YatharthS/FlashSR"
FLASHSR_FILENAME = "upsampler.pth"
EXPECTED_SHA256 = "62c70874ac4efeb4dc9c8aa9dc0a611a951e1c36292abeb4c406d7fb91e0eefc"
KINDS = ("auto", "speechsr", "resample", "none")

# Crossover: below the start only SNAC's audio, above the end only the generator's.
CROSSOVER_START_HZ = 11_500.0
CROSSOVER_END_HZ = 12_000.0
# The 16 kHz input for the generator: flat to 7.5 kHz, nothing from 8 kHz.
MODEL_INPUT_PASS_HZ = 7_500.0
MODEL_INPUT_STOP_HZ = 8_000.0
STOPBAND_DB = 90.0

OUTPUT_CEILING = 0.99
LIMITER_WINDOW_48K = 97  # odd; ~2 ms

# Window geometry for `speechsr`, in 24 kHz samples. Both are multiples of 3 so that every window starts on
# a sample shared by the 24, 16 and 48 kHz grids; core + 2 * margin = 24000 (one second, an FFT-friendly size).
# The margin (17.5 ms) covers DEPENDENCY_RADIUS_48K (~16 ms) with a little to spare; every extra sample of
# margin costs throughput (here 3.5% of the work is margin).
SEGMENT_CORE_24K = 23_160
SEGMENT_MARGIN_24K = 420


def print_to_stderr(message: str) -> None:
    print(message, file=sys.stderr)


class Upsampler(Protocol):
    output_rate: int
    name: str  # "speechsr" | "resample" | "none"

    def __call__(self, audio: torch.Tensor, lengths: Sequence[int]) -> tuple[torch.Tensor, list[int]]:
        """[B, T] float32 at 24 kHz, zero-padded, on the upsampler's device -> ([B, kT], lengths * k)."""
        ...


# ---------------------------------------------------------------------------------------------------------
# Filters


def design_lowpass(pass_hz: float, stop_hz: float, rate: int) -> np.ndarray:
    """A linear-phase Kaiser-windowed sinc low-pass: flat to `pass_hz`, STOPBAND_DB down from `stop_hz`.

    Odd length, so its delay is a whole number of samples; unity gain at DC.
    """
    nyquist = rate / 2
    taps, beta = signal.kaiserord(STOPBAND_DB, (stop_hz - pass_hz) / nyquist)
    taps |= 1
    return signal.firwin(taps, (pass_hz + stop_hz) / 2, window=("kaiser", beta), fs=rate)


@lru_cache(maxsize=1)
def crossover_taps() -> np.ndarray:
    """The 48 kHz low-pass that both upsamples SNAC's audio and splits the bands (float64)."""
    return design_lowpass(CROSSOVER_START_HZ, CROSSOVER_END_HZ, OUTPUT_RATE)


@lru_cache(maxsize=1)
def model_input_taps() -> np.ndarray:
    """The 48 kHz low-pass applied before taking every third sample for the 16 kHz generator input."""
    return design_lowpass(MODEL_INPUT_PASS_HZ, MODEL_INPUT_STOP_HZ, OUTPUT_RATE)


def _half_length(taps: np.ndarray) -> int:
    return (len(taps) - 1) // 2


# How far one 48 kHz output sample of `speechsr` depends on the 24 kHz input, in 48 kHz samples each side:
# the 16 kHz anti-alias filter, the generator, the crossover and the limiter's gain window.
DEPENDENCY_RADIUS_48K = (
    _half_length(model_input_taps())
    + 3  # one 16 kHz sample's worth of rounding of the x3 grid
    + RECEPTIVE_FIELD_48K
    + _half_length(crossover_taps())
    + LIMITER_WINDOW_48K
)
assert DEPENDENCY_RADIUS_48K < 2 * SEGMENT_MARGIN_24K, "the window margin must cover the dependency radius"


def _zero_phase_response(taps: np.ndarray, length: int) -> torch.Tensor:
    """The real frequency response (rfft bins) of a symmetric FIR centred on sample 0 of a circle of `length`."""
    circle = np.zeros(length)
    circle[: len(taps)] = taps
    circle = np.roll(circle, -_half_length(taps))
    return torch.from_numpy(np.fft.rfft(circle).real.astype(np.float32))


# ---------------------------------------------------------------------------------------------------------
# Shared helpers


def _check_batch(audio: torch.Tensor, lengths: Sequence[int]) -> list[int]:
    if audio.dim() != 2:
        raise ValueError(f"audio must be [batch, samples], got shape {tuple(audio.shape)}")
    lengths = [int(length) for length in lengths]
    if len(lengths) != audio.shape[0]:
        raise ValueError(f"{len(lengths)} lengths for a batch of {audio.shape[0]}")
    if any(length < 0 or length > audio.shape[1] for length in lengths):
        raise ValueError(f"lengths {lengths} do not fit {audio.shape[1]} samples")
    return lengths


def _zero_beyond(audio: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
    positions = torch.arange(audio.shape[-1], device=audio.device)
    limits = to_device(lengths, audio.device).unsqueeze(1)
    return audio * (positions < limits)


def limit_peaks(audio: torch.Tensor, ceiling: float = OUTPUT_CEILING) -> torch.Tensor:
    """Bring every sample of [B, T] within +-ceiling with a smooth local gain dip; elsewhere change nothing.

    Each sample needs its gain reduced by 1 - min(1, ceiling / |x|). That need is spread over the window
    around it (a running maximum) and then smoothed with a Hann window no wider, so the smoothed reduction
    is at least every sample's own need, and exactly 0 wherever no sample within the window needs any.
    The final clamp only absorbs float rounding.
    """
    magnitude = audio.abs()
    # The usual case; one wait for the GPU is cheaper than the filters.
    if not is_true((magnitude > ceiling).any()):
        return audio
    half = LIMITER_WINDOW_48K // 2
    need = ((magnitude - ceiling).clamp_min(0) / magnitude.clamp_min(ceiling)).unsqueeze(1)  # 0 when in range
    held = F.max_pool1d(F.pad(need, (half, half), mode="replicate"), LIMITER_WINDOW_48K, stride=1)
    hann = torch.hann_window(LIMITER_WINDOW_48K + 2, periodic=False, dtype=audio.dtype, device=audio.device)
    hann = hann[1:-1] / hann[1:-1].sum()
    held = F.pad(held, (half, half), mode="replicate")
    reduction = F.conv1d(held, hann.view(1, 1, -1))
    return (audio * (1 - reduction.squeeze(1))).clamp(-ceiling, ceiling)


# ---------------------------------------------------------------------------------------------------------
# none / resample


class PassThrough:
    """The 24 kHz audio, unchanged."""

    name = "none"
    output_rate = SNAC_RATE

    def __call__(self, audio: torch.Tensor, lengths: Sequence[int]) -> tuple[torch.Tensor, list[int]]:
        lengths = _check_batch(audio, lengths)
        return _zero_beyond(audio, lengths), lengths


class PolyphaseResampler:
    """24 -> 48 kHz with the crossover low-pass as anti-imaging filter, as two polyphase convolutions.

    Equals `scipy.signal.resample_poly(x, 2, 1, window=crossover_taps())` (zero padding at the ends).
    """

    name = "resample"
    output_rate = OUTPUT_RATE

    def __init__(self, device: str | torch.device) -> None:
        self.device = torch.device(device)
        self.weight, self.pad = _polyphase_weight(crossover_taps(), up=2)
        self.weight = self.weight.to(self.device)

    def __call__(self, audio: torch.Tensor, lengths: Sequence[int]) -> tuple[torch.Tensor, list[int]]:
        lengths = _check_batch(audio, lengths)
        audio = _zero_beyond(audio.to(self.device, torch.float32), lengths)
        phases = F.conv1d(F.pad(audio.unsqueeze(1), self.pad), self.weight)  # [B, 2, T]
        upsampled = phases.transpose(1, 2).reshape(audio.shape[0], -1)
        doubled = [2 * length for length in lengths]
        return _zero_beyond(limit_peaks(upsampled), doubled), doubled


def _polyphase_weight(taps: np.ndarray, up: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Per-phase correlation kernels ([up, 1, K]) and input padding for an up-by-`up` zero-phase FIR.

    Output sample up*t + p = up * sum_k taps[k] * x[m] over k = up*(t - m) + p + half: each phase p is a
    correlation of x over the offsets o = m - t that some tap reaches.
    """
    half = _half_length(taps)
    offsets = range(-((len(taps) - 1 - half) // up) - 1, half // up + 2)
    kernel = np.zeros((up, len(offsets)))
    for phase in range(up):
        for column, offset in enumerate(offsets):
            index = phase + half - up * offset
            if 0 <= index < len(taps):
                kernel[phase, column] = up * taps[index]
    used = np.nonzero(kernel.any(axis=0))[0]
    kernel = kernel[:, used[0] : used[-1] + 1]
    first, last = offsets[used[0]], offsets[used[-1]]
    return torch.from_numpy(kernel.astype(np.float32)).unsqueeze(1), (-first, last)


# ---------------------------------------------------------------------------------------------------------
# speechsr


class SpeechSRUpsampler:
    """24 -> 48 kHz: SNAC's audio below 11.5 kHz, the SpeechSR generator's output above 12 kHz."""

    name = "speechsr"
    output_rate = OUTPUT_RATE

    def __init__(
        self,
        generator: Callable[[torch.Tensor], torch.Tensor],
        *,
        device: str | torch.device,
        model_dtype: torch.dtype = torch.float32,
        max_segments: int = 8,
        segment_core: int = SEGMENT_CORE_24K,
        segment_margin: int = SEGMENT_MARGIN_24K,
        group_step: int = 1,
    ) -> None:
        """`generator` maps [n, 16 kHz samples] to [n, 3x samples]. Each group of windows is padded with
        silent ones to a multiple of `group_step` (see codec.WIDTH_STEP_FRAMES for why, on CUDA)."""
        if segment_core % 6 or segment_margin % 3 or segment_core <= 0:
            # Multiples of 3 keep the 16 kHz grid; an even window keeps the spectrum mirroring simple.
            raise ValueError("the segment core must be a positive multiple of 6, the margin a multiple of 3")
        if 2 * segment_margin <= DEPENDENCY_RADIUS_48K:
            raise ValueError(
                f"a margin of {segment_margin} samples does not cover the filters and the generator"
            )
        self.generator = generator
        self.device = torch.device(device)
        self.model_dtype = model_dtype
        self.max_segments = max_segments
        self.group_step = group_step
        self.core = segment_core
        self.margin = segment_margin
        self.window = segment_core + 2 * segment_margin
        self.crossover = _zero_phase_response(crossover_taps(), 2 * self.window).to(self.device)
        self.model_input_filter = _zero_phase_response(model_input_taps(), 2 * self.window).to(self.device)

    def __call__(self, audio: torch.Tensor, lengths: Sequence[int]) -> tuple[torch.Tensor, list[int]]:
        lengths = _check_batch(audio, lengths)
        audio = _zero_beyond(audio.to(self.device, torch.float32), lengths)
        batch, samples = audio.shape
        counts = [math.ceil(length / self.core) for length in lengths]
        most = max(counts, default=0)
        doubled = [2 * length for length in lengths]
        if most == 0:
            return audio.new_zeros(batch, 2 * samples), doubled
        padded = F.pad(audio, (self.margin, most * self.core + self.margin - samples))
        windows = padded.unfold(-1, self.window, self.core)  # [B, most, window], a view
        rows = to_device([b for b, count in enumerate(counts) for _ in range(count)], self.device)
        columns = to_device([j for count in counts for j in range(count)], self.device)
        segments = windows[rows, columns]
        cores = torch.cat([self._process_padded(group) for group in segments.split(self.max_segments)])
        out = audio.new_zeros(batch, most, 2 * self.core)
        out[rows, columns] = cores
        out = out.reshape(batch, most * 2 * self.core)[:, : 2 * samples]
        return _zero_beyond(out, doubled), doubled

    def _process_padded(self, segments: torch.Tensor) -> torch.Tensor:
        count = segments.shape[0]
        extra = -count % self.group_step
        if extra:
            segments = F.pad(segments, (0, 0, 0, extra))
        return self._process(segments)[:count]

    def _process(self, segments: torch.Tensor) -> torch.Tensor:
        """[n, window] at 24 kHz -> [n, 2 * core] at 48 kHz (the windows' cores only)."""
        stuffed = zero_stuffed_spectrum(torch.fft.rfft(segments))  # spectrum of x with zeros between samples
        length_48k = 2 * self.window
        filtered = torch.fft.irfft(stuffed * (2 * self.model_input_filter), n=length_48k)
        generated = self.generator(filtered[:, ::3].to(self.model_dtype).contiguous()).float()
        generated_spectrum = torch.fft.rfft(generated)
        merged_spectrum = generated_spectrum + self.crossover * (2 * stuffed - generated_spectrum)
        merged = torch.fft.irfft(merged_spectrum, n=length_48k)
        # The limiter needs its window's worth of context around the core, no more (the margins' outer
        # parts are wrapped around by the circular filters).
        context = LIMITER_WINDOW_48K
        start, end = 2 * self.margin - context, 2 * (self.margin + self.core) + context
        return limit_peaks(merged[:, start:end])[:, context:-context]

    @staticmethod
    def model_input(audio: torch.Tensor) -> torch.Tensor:
        """[B, T] at 24 kHz -> the [B, ceil(2T/3)] 16 kHz signal the generator is given, computed over the
        whole signal at once (zeros beyond its ends) rather than window by window; for inspection."""
        samples = audio.shape[-1]
        padded = -(-(samples + 2 * _half_length(model_input_taps())) // 6) * 6  # room for the filter, even
        stuffed = zero_stuffed_spectrum(torch.fft.rfft(audio.float(), n=padded))
        response = _zero_phase_response(model_input_taps(), 2 * padded).to(audio.device)
        filtered = torch.fft.irfft(stuffed * (2 * response), n=2 * padded)
        return filtered[:, : 2 * samples : 3]


def zero_stuffed_spectrum(spectrum: torch.Tensor) -> torch.Tensor:
    """rfft of x (even length N) -> rfft of x with a zero after every sample (length 2N).

    Stuffing zeros repeats the spectrum: bins above N/2 mirror those below.
    """
    return torch.cat([spectrum, spectrum[..., :-1].flip(-1).conj()], dim=-1)


# ---------------------------------------------------------------------------------------------------------
# Weights


def find_weights(explicit: str | Path | None) -> Path | None:
    """An explicit path (it must exist), else the local Hugging Face cache's copy, else None.

    Never downloads: the cache lookup uses `local_files_only=True`.
    """
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise InputError(
                f"The upsampler weights file {path} does not exist.",
                f"Pass --upsampler-weights with the path of {FLASHSR_FILENAME} (SpeechSR 48 kHz), "
                f"or leave it out to use the copy in the Hugging Face cache.",
            )
        return path
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        return None
    try:
        return Path(hf_hub_download(FLASHSR_REPO, FLASHSR_FILENAME, local_files_only=True))
    except (OSError, ValueError):
        return None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_generator(path: Path, warn: Callable[[str], None] = print_to_stderr) -> SpeechSR48k:
    """Read a SpeechSR 48 kHz checkpoint; its state dict must match the published layout exactly."""
    fix = (
        f"Download it again (`hf download {FLASHSR_REPO} {FLASHSR_FILENAME}`), pass --upsampler-weights with "
        f"a good copy, or use --upsampler resample."
    )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a damaged or foreign file
        # weights_only: a file that needs arbitrary unpickling is refused rather than executed.
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0].rstrip(".")
        raise RuntimeFailure(f"Could not read the upsampler weights {path}: {reason}.", fix) from error
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise RuntimeFailure(
            f"{path} holds no state dict (expected a dict with the generator under 'model').", fix
        )
    try:
        generator = build_generator(state)
    except (ValueError, RuntimeError) as error:
        raise RuntimeFailure(
            f"{path} is not the SpeechSR 48 kHz generator: its state dict does not match ({error}).", fix
        ) from error
    digest = file_sha256(path)
    if digest != EXPECTED_SHA256:
        warn(
            f"warning: {path} has sha256 {digest[:16]}..., not the published SpeechSR 48 kHz weights' "
            f"{EXPECTED_SHA256[:16]}...; it may be another revision. Its layout matches, so it is used."
        )
    return generator


# ---------------------------------------------------------------------------------------------------------
# Loading


def default_dtype(device: torch.device) -> torch.dtype:
    # float16 keeps 3 more mantissa bits than bfloat16, which matters for a band 40 dB below the speech.
    return torch.float16 if device.type == "cuda" else torch.float32


def resolved_kind(kind: str, weights: str | Path | None) -> str:
    """The `name` of the upsampler that load_upsampler(kind, weights=...) loads, without loading it."""
    if kind == "auto":
        return "speechsr" if find_weights(weights) is not None else "resample"
    return kind


def output_rate_of(kind: str) -> int:
    """The sample rate an upsampler of `kind` puts out."""
    return PassThrough.output_rate if kind == "none" else OUTPUT_RATE


def load_upsampler(
    kind: str,
    *,
    weights: str | Path | None,
    device: str | torch.device,
    dtype: torch.dtype | None = None,
    compile: bool = False,
    warn: Callable[[str], None] = print_to_stderr,
) -> Upsampler:
    """The upsampler of `kind` ("auto" | "speechsr" | "resample" | "none") on `device`.

    "auto" is "speechsr" when weights are found (explicit path or local Hugging Face cache), else
    "resample" with one warning. `dtype` is the generator's (default float16 on CUDA, float32 on CPU);
    filtering and the merge always run in float32.

    On CUDA the generator always runs its fused Triton kernels (compiled on first use, about a second);
    `compile=True` does that, and cuDNN's algorithm choice, at load time instead of in the first batch. On
    the CPU, `compile=True` runs the generator through `torch.compile` (~20 s once, then ~3x faster).
    """
    if kind not in KINDS:
        raise InputError(f"Unknown upsampler {kind!r}.", f"Use one of: {', '.join(KINDS)}.")
    device = torch.device(device)
    if kind == "none":
        return PassThrough()
    if kind == "resample":
        return PolyphaseResampler(device)
    path = find_weights(weights)
    if path is None:
        if kind == "speechsr":
            raise InputError(
                f"The SpeechSR upsampler weights ({FLASHSR_FILENAME} from the Hugging Face repo {FLASHSR_REPO}) "
                f"are not in the local Hugging Face cache.",
                f"Download them once with `hf download {FLASHSR_REPO} {FLASHSR_FILENAME}` (or "
                f"`huggingface-cli download {FLASHSR_REPO} {FLASHSR_FILENAME}`), or pass --upsampler-weights PATH.",
            )
        warn(
            f"warning: no SpeechSR upsampler weights found ({FLASHSR_FILENAME} of {FLASHSR_REPO} is not in the "
            f"Hugging Face cache); resampling to 48 kHz without adding the band above 12 kHz. "
            f"To add it: `hf download {FLASHSR_REPO} {FLASHSR_FILENAME}` or --upsampler-weights PATH."
        )
        return PolyphaseResampler(device)
    return speechsr_upsampler(
        load_generator(path, warn), device=device, dtype=dtype, compile=compile, warn=warn
    )


def speechsr_upsampler(
    generator: SpeechSR48k,
    *,
    device: torch.device,
    dtype: torch.dtype | None,
    compile: bool,
    warn: Callable[[str], None] = print_to_stderr,
) -> SpeechSRUpsampler:
    dtype = dtype or default_dtype(device)
    if dtype == torch.bfloat16:
        warn(
            "warning: bfloat16 rounds the SpeechSR generator's output ~15 dB worse than float16 in the band "
            "above 12 kHz that it adds (float16 is the default on CUDA)."
        )
    generator = generator.to(device=device, dtype=dtype)
    on_cuda = device.type == "cuda"
    if on_cuda and not fused_kernels_available():
        warn("warning: Triton is not installed, so the SpeechSR upsampler runs unfused, about 20x slower.")
    run: Callable[[torch.Tensor], torch.Tensor] = generator
    if compile and not on_cuda:
        generator.use_fusable_activations(True)
        run = _compiled_for_any_batch(generator)
    upsampler = SpeechSRUpsampler(
        _inference(run),
        device=device,
        model_dtype=dtype,
        max_segments=64 if on_cuda else 4,
        group_step=8 if on_cuda else 1,
    )
    if compile:
        noise = _speech_like_noise(
            torch.randn(1, SEGMENT_CORE_24K, generator=torch.Generator().manual_seed(0))
        )
        upsampler(noise.to(device), [SEGMENT_CORE_24K])
    return upsampler


def _compiled_for_any_batch(module: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    compiled = torch.compile(module)

    def run(audio: torch.Tensor) -> torch.Tensor:
        torch._dynamo.mark_dynamic(audio, 0)  # one graph for any number of windows (and one for a single one)
        return compiled(audio)

    return run


def _inference(function: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(audio: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return function(audio)

    return run


# ---------------------------------------------------------------------------------------------------------
# Benchmark


def benchmark_upsampler(
    device: str | torch.device,
    dtype: torch.dtype | None,
    batch: int,
    seconds: float,
    compile: bool,
    *,
    weights: str | Path | None = None,
    iterations: int = 5,
) -> dict[str, object]:
    """Time the `speechsr` upsampler on a [batch, seconds * 24 kHz] batch; returns audio seconds per second.

    Warms up first (compilation included), synchronises the device around the timed calls.
    """
    device = torch.device(device)
    path = find_weights(weights)
    if path is None:
        raise InputError("No SpeechSR weights to benchmark.", "Pass weights=PATH to upsampler.pth.")
    upsampler = speechsr_upsampler(load_generator(path), device=device, dtype=dtype, compile=compile)
    samples = int(seconds * SNAC_RATE)
    generator = torch.Generator().manual_seed(0)
    # Speech-like level and spectrum: low-passed noise, not zeros (zeros can run faster than real data).
    noise = torch.randn(batch, samples, generator=generator)
    audio = _speech_like_noise(noise).mul(0.1).to(device)
    lengths = [samples] * batch

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    started = time.perf_counter()
    upsampler(audio, lengths)
    sync()
    first_call_s = time.perf_counter() - started
    upsampler(audio, lengths)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    for _ in range(iterations):
        upsampler(audio, lengths)
    sync()
    elapsed = (time.perf_counter() - started) / iterations
    result: dict[str, object] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(upsampler.model_dtype).replace("torch.", ""),
        "batch": batch,
        "seconds": seconds,
        "compile": compile,
        "first_call_s": round(first_call_s, 3),
        "call_s": round(elapsed, 4),
        "audio_s_per_s": round(batch * seconds / elapsed, 2),
    }
    if device.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return result


def _speech_like_noise(noise: torch.Tensor) -> torch.Tensor:
    """Noise shaped roughly like speech (energy falling with frequency), for benchmarks."""
    kernel = torch.tensor([0.25, 0.5, 0.25]).view(1, 1, 3)
    return F.conv1d(F.pad(noise.unsqueeze(1), (1, 1)), kernel).squeeze(1)
