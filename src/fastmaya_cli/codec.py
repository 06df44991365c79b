"""SNAC 24 kHz: Maya1's codes -> 24 kHz audio, many chunks per batch on the engine's device."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import time
import types
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from . import snac_fused
from .errors import RuntimeFailure
from .maya1 import SAMPLES_PER_FRAME, SNAC_RATE, Codes
from .transfers import is_true, to_device

DEFAULT_CODEC = "hubertsiuzdak/snac_24khz"


# Frames of silent latent decoded past each chunk's end. SNAC's decoder sees about two frames to the
# right of a sample; with this margin a chunk decodes the same whatever longer chunk shares its batch.
RIGHT_CONTEXT_FRAMES = 4


def _int64(value: int) -> int:
    """A Python int wrapped to a signed 64-bit value, as torch's int64 arithmetic wraps."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >> 63 else value


_GOLDEN = _int64(0x9E3779B97F4A7C15)  # splitmix64's constants
_MIX1 = _int64(0xBF58476D1CE4E5B9)
_MIX2 = _int64(0x94D049BB133111EB)


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> keeps the sign)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser; int64 multiplication wraps, as the algorithm needs."""
    x = (x ^ _shift_right(x, 30)) * _MIX1
    x = (x ^ _shift_right(x, 27)) * _MIX2
    return x ^ _shift_right(x, 31)


def chunk_noise(seeds: torch.Tensor, length: int, layer: int) -> torch.Tensor:
    """Standard normal noise [B, 1, length] in which row b depends only on seeds[b], layer and position.

    A counter-based generator (splitmix64, then Box-Muller): a chunk's noise is the same whatever
    batch it is decoded in, and one set of element-wise kernels makes a whole batch's.
    """
    stream = _mix(seeds.view(-1, 1) * _GOLDEN + _int64((layer + 1) * _MIX1))
    positions = torch.arange(1, length + 1, device=seeds.device, dtype=torch.int64)
    bits = _mix(stream + positions * _GOLDEN)
    scale = 1.0 / (1 << 24)
    uniform = (_shift_right(bits, 40).to(torch.float32) + 0.5) * scale  # in (0, 1)
    angle = ((bits >> 16) & 0xFFFFFF).to(torch.float32) * (2 * math.pi * scale)
    return (torch.sqrt(-2.0 * torch.log(uniform)) * torch.cos(angle)).unsqueeze(1)


def _chunk_seeded_noise(block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """SNAC's NoiseBlock, with each row's noise drawn from its chunk's own seed (see chunk_noise)."""
    noise = chunk_noise(block.noise_seeds(), x.shape[2], block.noise_layer).to(x.dtype)
    if block.fused_weight is not None:
        return snac_fused.noise_block(x, noise, block.fused_weight)
    return x + noise * block.linear(x)


def load_snac(model: str | Path, device: torch.device):  # noqa: ANN201 - snac.SNAC
    from snac import SNAC

    try:
        snac = SNAC.from_pretrained(str(model))
    except (OSError, ValueError) as exc:
        local = os.path.isdir(str(model))
        raise RuntimeFailure(
            f"Could not load the SNAC codec '{model}': {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}",
            "Check that the directory holds config.json and pytorch_model.bin."
            if local
            else f"Pre-download it while online with `hf download {model}`, or pass --codec with a local directory.",
        ) from exc
    hop = int(np.prod(snac.decoder_rates)) * snac.vq_strides[0]
    if snac.sampling_rate != SNAC_RATE or hop != SAMPLES_PER_FRAME or len(snac.vq_strides) != 3:
        raise RuntimeFailure(
            f"The codec '{model}' is not SNAC 24 kHz (rate {snac.sampling_rate}, {hop} samples a frame).",
            f"Maya1 needs {DEFAULT_CODEC}; pass --codec {DEFAULT_CODEC} or a copy of it.",
        )
    return snac.to(device).eval()


# On CUDA, cuDNN (and cuFFT, in the upsampler) set up their kernels for each new input shape, and that
# cost more than the decode of a small batch: on an H100, batches of new shapes decoded at about 1,000
# audio s/s, a batch shape seen before at about 1,460. Rounding each batch up to a few sizes lets the
# set-ups be reused: the width to a multiple of WIDTH_STEP_FRAMES, the rows to 1, 2, 4, 8 or a multiple
# of ROW_STEP. The extra rows are silent and dropped.
WIDTH_STEP_FRAMES = 16
ROW_STEP = 8


def bucketed_rows(rows: int) -> int:
    """`rows` rounded up to 1, 2, 4, 8 or a multiple of ROW_STEP."""
    if rows <= ROW_STEP:
        return 1 << (rows - 1).bit_length()
    return -(-rows // ROW_STEP) * ROW_STEP


def padded_shape(rows: int, longest: int, *, bucketed: bool) -> tuple[int, int]:
    """The (rows, frames) a SNAC call decodes for `rows` chunks whose longest has `longest` frames."""
    width = longest + RIGHT_CONTEXT_FRAMES
    if not bucketed:
        return rows, width
    return bucketed_rows(rows), -(-width // WIDTH_STEP_FRAMES) * WIDTH_STEP_FRAMES


# What one SNAC call costs whatever its size, in frames decoded: its hundred-odd kernel launches and the
# codes' copy to the device. It weighs fewer, larger calls against less padding.
CALL_OVERHEAD_FRAMES = 32


def plan_calls(
    frames: Sequence[int], budget: int, *, bucketed: bool, call_frames: int = CALL_OVERHEAD_FRAMES
) -> list[list[int]]:
    """Groups of indexes into `frames` (chunk lengths), one SNAC call each, that decode every chunk with
    the least work: the padded size of each call (see padded_shape) plus `call_frames` a call. A call
    of more than one chunk stays within `budget` padded frames, which bounds its memory.

    Every row of a call is as wide as its longest chunk, and rows are rounded up to a bucket, so the
    novel's chunks, 16 at a time in book order, made SNAC decode 2.5 times the frames they held (bench
    stage decode-mix); planned, 1.11 times. Sorted longest first, the best split into consecutive runs
    is found exactly (dynamic programming over the run ends): runs of like lengths, and row counts that
    fill their bucket. Which chunks share a call does not change their audio (see SnacDecoder)."""
    order = sorted(range(len(frames)), key=lambda index: -frames[index])
    cost = [0.0] + [math.inf] * len(order)
    run_start = [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        for start in range(end - 1, -1, -1):
            rows, width = padded_shape(end - start, frames[order[start]], bucketed=bucketed)
            if rows * width > budget and end - start > 1:
                break  # an earlier start only adds rows and width
            if cost[start] + rows * width + call_frames < cost[end]:
                cost[end], run_start[end] = cost[start] + rows * width + call_frames, start
    calls, end = [], len(order)
    while end:
        calls.append(order[run_start[end] : end])
        end = run_start[end]
    return calls[::-1]


@contextlib.contextmanager
def tf32_matmuls(enabled: bool) -> Iterator[None]:
    """CUDA matrix products of float32 in TF32 while inside, as cuDNN's convolutions are by default.

    PyTorch's switch is process-wide: set around each decode and put back after. In the renderer's process
    the decoder is the only thread with float32 products on the GPU (the upsampler runs in float16).
    """
    if not enabled:
        yield
        return
    matmul = torch.backends.cuda.matmul
    # torch >= 2.9 has fp32_precision, and mixing it with the older allow_tf32 is an error there.
    name, value = ("fp32_precision", "tf32") if hasattr(matmul, "fp32_precision") else ("allow_tf32", True)
    previous = getattr(matmul, name)
    setattr(matmul, name, value)
    try:
        yield
    finally:
        setattr(matmul, name, previous)


def fused_by_default(device: torch.device) -> bool:
    """snac_fused's formulation pays off on a GPU; on the CPU SNAC's own modules are as fast."""
    return device.type == "cuda"


class SnacDecoder:
    """Loads SNAC once; decodes padded batches of chunks and trims each to frames x 2048 samples.

    A chunk's audio depends on its codes and its seed only, not on the batch it is decoded in (up to
    floating-point rounding): each row's noise comes from its own seed, and every row is followed by
    RIGHT_CONTEXT_FRAMES of zero latent, as if it had been decoded alone. So chunks can be decoded in
    whatever groups they finish in, and a resumed render decodes them as an uninterrupted one did.
    """

    def __init__(
        self,
        model: str | Path = DEFAULT_CODEC,
        device: str | torch.device = "cpu",
        *,
        fused: bool | None = None,
        bucketed: bool | None = None,
        tf32: bool | None = None,
        half: bool = False,
    ) -> None:
        """`fused` runs the decoder's residual units and noise blocks as in snac_fused. By default it is on
        on CUDA, unless the decoder's residual units are not laid out as the snac package's are.
        `bucketed` rounds each batch's shape up (see WIDTH_STEP_FRAMES); by default on CUDA only.
        `tf32` runs the fused path's matrix products in TF32 (by default on CUDA): SNAC's own modules do
        the same products as 1x1 convolutions, which cuDNN runs in TF32 under PyTorch's defaults, so
        this is the precision SNAC decodes at on a GPU anyway. Full float32 made them 44% of SNAC's time
        on an H200, and TF32 decoded 1.33x and 1.32x faster (scripts/profile_decoder.py, BENCHMARKS.md runs K1, K2).
        `half` (a candidate, off by default) decodes in float16: 1.25x as fast as TF32 and 56.8 dB from it on an
        H100, with random weights (run R2). A call whose audio is not finite in float16 (an activation past
        float16's range) is decoded again in float32; `half_fallbacks` counts them."""
        self.device = torch.device(device)
        self.bucketed = self.device.type == "cuda" if bucketed is None else bucketed
        self.tf32 = self.device.type == "cuda" if tf32 is None else tf32
        # Frames asked for, and frames computed with the padding (rows and width); for the bench.
        self.frames_decoded = 0
        self.frames_computed = 0
        self.model = load_snac(model, self.device)
        snac_fused.bake_weight_norm(self.model)
        self.fused = fused_by_default(self.device) if fused is None else fused
        if self.fused:
            try:
                snac_fused.use_fused_residual_units(self.model.decoder)
            except ValueError:
                if fused:
                    raise
                self.fused = False  # SNAC's own modules still decode it, only slower
        self._seeds = torch.zeros(1, dtype=torch.int64, device=self.device)
        layer = 0
        for module in self.model.modules():
            if type(module).__name__ == "NoiseBlock":
                module.noise_seeds = lambda: self._seeds
                module.noise_layer = layer
                module.fused_weight = module.linear.weight[:, :, 0].detach() if self.fused else None
                module.forward = types.MethodType(_chunk_seeded_noise, module)
                layer += 1
        self.half_fallbacks = 0
        self._float32_model = None
        if half:
            # The float32 model stays, for calls float16 cannot hold; the noise hooks are copied with it.
            self._float32_model, self.model = self.model, copy.deepcopy(self.model)
            to_dtype(self.model, torch.float16)
        if self.device.type == "cuda":
            # cuDNN and cuBLAS set up on the first call; pay that at load, not in the first batch.
            silence = np.zeros(4, dtype=np.int64)
            self.decode([Codes(silence, np.zeros(8, dtype=np.int64), np.zeros(16, dtype=np.int64))], [0])

    @torch.inference_mode()
    def decode(self, codes: Sequence[Codes], seeds: Sequence[int]) -> tuple[torch.Tensor, list[int]]:
        """Decode a batch: returns audio [B, T] (float32, zero-padded, on device) and each length."""
        frames = [c.frames for c in codes]
        rows, width = padded_shape(len(codes), max(frames), bucketed=self.bucketed)
        self.frames_decoded += sum(frames)
        self.frames_computed += rows * width
        row_frames = frames + [0] * (rows - len(codes))  # extra rows: no frames, all silent latent
        books = []
        for level, per_frame in enumerate((1, 2, 4)):
            padded = np.zeros((rows, width * per_frame), dtype=np.int64)
            for row, c in enumerate(codes):
                values = (c.c0, c.c1, c.c2)[level]
                padded[row, : values.shape[0]] = values
            books.append(to_device(padded, self.device))
        # Seeds are 63-bit: a chunk seed (any Python int) folded into int64's positive range.
        row_seeds = [seed % (1 << 63) for seed in seeds] + [0] * (rows - len(codes))
        self._seeds = to_device(row_seeds, self.device)
        lengths = [f * SAMPLES_PER_FRAME for f in frames]
        kept = (len(codes), max(lengths))
        audio = self._run(self.model, books, row_frames, width, kept)
        if self.half and not is_true(torch.isfinite(audio).all()):
            self.half_fallbacks += 1
            audio = self._run(self._float32_model, books, row_frames, width, kept)
        sample_ends = to_device(lengths, self.device).view(-1, 1)
        audio = audio.masked_fill(torch.arange(audio.shape[-1], device=self.device) >= sample_ends, 0.0)
        return audio, lengths

    @property
    def half(self) -> bool:
        """Whether SNAC decodes in float16 (a float32 twin kept for the calls it cannot hold)."""
        return self._float32_model is not None

    def _run(  # noqa: ANN001 - model: snac.SNAC
        self, model, books: list[torch.Tensor], row_frames: list[int], width: int, kept: tuple[int, int]
    ) -> torch.Tensor:
        """SNAC's decoder on the padded codes, each row's latent past its frames silenced: float32 audio of
        the first ``kept`` rows and samples."""
        latent = model.quantizer.from_codes(books)
        latent_per_frame = latent.shape[-1] // width
        latent_ends = to_device(row_frames, self.device).view(-1, 1, 1) * latent_per_frame
        latent = latent.masked_fill(torch.arange(latent.shape[-1], device=self.device) >= latent_ends, 0.0)
        rows, samples = kept
        with tf32_matmuls(self.tf32):
            return model.decoder(latent)[:rows, 0, :samples].float()


def to_dtype(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """SNAC, set up by SnacDecoder (weight norm baked, fused units, noise hooks), in `dtype`. The fused units'
    per-channel weights stay float32: the Triton kernel reads them so and computes in float32."""
    for module in model.modules():
        weights = getattr(module, "fused_weights", None)
        if weights is not None:
            # Copies first: some of them are the parameters themselves, which half() converts in place.
            tensors = {
                field.name: getattr(weights, field.name).detach().clone()
                for field in dataclasses.fields(weights)
                if isinstance(getattr(weights, field.name), torch.Tensor)
            }
            tensors["pointwise"] = tensors["pointwise"].to(dtype)
            module.fused_weights = dataclasses.replace(weights, **tensors)
        if getattr(module, "fused_weight", None) is not None:
            module.fused_weight = module.fused_weight.detach().to(dtype)
    model.to(dtype)


def random_codes(frames: int, rng: np.random.Generator) -> Codes:
    """`frames` frames of uniformly random codes: the decoder's work for benchmarks, whatever it sounds like."""
    return Codes(*(rng.integers(0, 4096, frames * per_frame) for per_frame in (1, 2, 4)))


def benchmark_codec(
    model: str | Path,
    device: str | torch.device,
    *,
    fused: bool | None,
    batch: int = 16,
    seconds: float = 11.0,
    iterations: int = 5,
) -> dict[str, object]:
    """Time SnacDecoder.decode on `batch` chunks of random codes, `seconds` long each (the renderer decodes
    up to 16 chunks a call; a novel's chunks average about 11 s). Returns audio seconds per second."""
    decoder = SnacDecoder(model, device, fused=fused)  # loads and warms up
    frames = max(1, round(seconds * SNAC_RATE / SAMPLES_PER_FRAME))
    rng = np.random.default_rng(0)
    codes = [random_codes(frames, rng) for _ in range(batch)]
    seeds = list(range(batch))

    def sync() -> None:
        if decoder.device.type == "cuda":
            torch.cuda.synchronize(decoder.device)

    decoder.decode(codes, seeds)
    sync()
    best = math.inf
    for _ in range(iterations):
        started = time.perf_counter()
        decoder.decode(codes, seeds)
        sync()
        best = min(best, time.perf_counter() - started)
    audio_s = batch * frames * SAMPLES_PER_FRAME / SNAC_RATE
    return {
        "device": torch.cuda.get_device_name(decoder.device) if decoder.device.type == "cuda" else "cpu",
        "fused": decoder.fused,
        "batch": batch,
        "seconds": round(audio_s / batch, 3),
        "call_s": round(best, 4),
        "audio_s_per_s": round(audio_s / best, 1),
    }
