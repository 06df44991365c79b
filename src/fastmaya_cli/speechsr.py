"""The SpeechSR 48 kHz generator (HierSpeech++, MIT licence), written from its published description.

16 kHz in, 48 kHz out. The network, in order:

1. a 1 -> 32 channel convolution (kernel 7, weight norm) at 16 kHz;
2. linear interpolation to 48 kHz (x3, `align_corners=False`);
3. three anti-aliased AMP residual blocks (kernels 3, 7 and 11, dilations 1, 3, 5), run side by side on the
   same input and averaged; each holds three pairs (SnakeBeta, dilated conv, SnakeBeta, conv) with a residual
   add, and every SnakeBeta runs at twice the rate between a x2 Kaiser-sinc upsampler and a x2 low-pass
   decimator (12-tap filters, stored as buffers in the checkpoint);
4. a final anti-aliased SnakeBeta, a 32 -> 1 convolution (kernel 7, no bias) and tanh.

Two parts live here. `SpeechSRCheckpoint` mirrors the checkpoint's layout exactly, so that its state dict
loads with `strict=True`; it is only ever used to receive weights. `SpeechSR48k` is what runs: weight norm
folded into plain weights, log-scale SnakeBeta parameters turned into the factors the activation needs, and
each x2-up / SnakeBeta / x2-down sandwich written in polyphase form, so that the doubled-rate signal is
never zero-stuffed or interleaved. Three formulations of that sandwich compute the same numbers, ends
included: grouped convolutions (eager, on the CPU), sums of shifted slices (for `torch.compile` on the
CPU) and, on CUDA, one fused Triton kernel per activation (see the end of this file).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .triton_support import tl, triton

CHANNELS = 32
RESBLOCK_KERNELS = (3, 7, 11)
RESBLOCK_DILATIONS = (1, 3, 5)
FILTER_TAPS = 12  # the Kaiser-sinc filters of the x2 up / x2 down around every SnakeBeta
PRE_KERNEL = 7
POST_KERNEL = 7
INPUT_RATE = 16000
OUTPUT_RATE = 48000
RATE_FACTOR = OUTPUT_RATE // INPUT_RATE
PARAMETER_COUNT = 131_904  # trainable parameters of the published generator (buffers not counted)
# SnakeBeta divides by beta; the published code adds this to keep the division finite.
SNAKE_EPSILON = 1e-9

# How far (in 48 kHz samples, each side) one output sample of the generator depends on its input.
# conv_pre: 3 samples at 16 kHz = 9; interpolation: 3; the kernel-11 block: three pairs of
# (anti-aliased SnakeBeta 5, dilated conv 5*d, SnakeBeta 5, conv 5) = 20 + 30 + 40; activation_post: 5;
# conv_post: 3.
RECEPTIVE_FIELD_48K = 9 + 3 + 90 + 5 + 3


# ---------------------------------------------------------------------------------------------------------
# The checkpoint's layout. Module and parameter names are the published state dict's keys; nothing here runs.


class _WeightNormConv(nn.Module):
    """A weight-normalised Conv1d's stored form: direction `weight_v`, per-channel length `weight_g`."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int) -> None:
        super().__init__()
        self.weight_g = nn.Parameter(torch.empty(out_channels, 1, 1))
        self.weight_v = nn.Parameter(torch.empty(out_channels, in_channels, kernel))
        self.bias = nn.Parameter(torch.empty(out_channels))

    def folded_weight(self) -> torch.Tensor:
        norm = self.weight_v.norm(dim=(1, 2), keepdim=True)
        return self.weight_g * self.weight_v / norm


class _PlainConv(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel))


class _SnakeBetaParams(nn.Module):
    """Per-channel log-scale alpha (frequency) and beta (magnitude) of SnakeBeta."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.empty(channels))
        self.beta = nn.Parameter(torch.empty(channels))


class _Filter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("filter", torch.empty(1, 1, FILTER_TAPS))


class _Decimator(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lowpass = _Filter()


class _AntiAliasedSnake(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.act = _SnakeBetaParams(channels)
        self.upsample = _Filter()
        self.downsample = _Decimator()


class _AMPBlock(nn.Module):
    def __init__(self, channels: int, kernel: int) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList(_WeightNormConv(channels, channels, kernel) for _ in RESBLOCK_DILATIONS)
        self.convs2 = nn.ModuleList(_WeightNormConv(channels, channels, kernel) for _ in RESBLOCK_DILATIONS)
        self.activations = nn.ModuleList(
            _AntiAliasedSnake(channels) for _ in range(2 * len(RESBLOCK_DILATIONS))
        )


class _GeneratorLayout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv_pre = _WeightNormConv(1, CHANNELS, PRE_KERNEL)
        self.resblocks = nn.ModuleList(_AMPBlock(CHANNELS, kernel) for kernel in RESBLOCK_KERNELS)
        self.activation_post = _AntiAliasedSnake(CHANNELS)
        self.conv_post = _PlainConv(CHANNELS, 1, POST_KERNEL)


class SpeechSRCheckpoint(nn.Module):
    """Receives the published state dict (keys `dec.*`) with `load_state_dict(..., strict=True)`."""

    def __init__(self) -> None:
        super().__init__()
        self.dec = _GeneratorLayout()


# ---------------------------------------------------------------------------------------------------------
# The runnable generator.


def _snake_beta(u: torch.Tensor, alpha: torch.Tensor, inv_beta: torch.Tensor) -> torch.Tensor:
    return torch.addcmul(u, inv_beta, torch.sin(alpha * u).square())


class AntiAliasedSnakeBeta(nn.Module):
    """x2 Kaiser-sinc upsampling, SnakeBeta at the doubled rate, x2 low-pass decimation; [B,C,T] -> [B,C,T].

    The published form upsamples by a transposed convolution of the replicate-padded input (scaled by 2),
    applies SnakeBeta, replicate-pads the doubled-rate signal by 5 samples left and 6 right and filters it
    with stride 2. In polyphase form, with f the 12-tap upsampling filter and g the decimation filter:

        even[t] = 2 * sum_i f[11 - 2i] * x[t - 3 + i]      odd[t] = 2 * sum_i f[10 - 2i] * x[t - 2 + i]
        out[t]  = sum_i g[2i + 1] * snake(even)[t - 2 + i] + sum_i g[2i] * snake(odd)[t - 3 + i]

    for i = 0..5, with x replicated beyond its ends, and the snake outputs beyond the ends replaced by the
    first even value (left) and the last odd value (right), which is what replicate padding at the doubled
    rate amounts to. Both formulations below are exact, ends included.
    """

    def __init__(
        self, alpha: torch.Tensor, inv_beta: torch.Tensor, up: torch.Tensor, down: torch.Tensor
    ) -> None:
        super().__init__()
        channels = alpha.numel()
        up = up.reshape(FILTER_TAPS)
        down = down.reshape(FILTER_TAPS)
        self.register_buffer("alpha", alpha.reshape(1, channels, 1, 1).clone())
        self.register_buffer("inv_beta", inv_beta.reshape(1, channels, 1, 1).clone())
        # Taps over the 7 positions x[t-3 .. t+3] for the even and odd output phases.
        up_even = torch.cat([2 * up.flip(0)[0::2], up.new_zeros(1)])  # 2 f[11], 2 f[9], .., 2 f[1], 0
        up_odd = torch.cat([up.new_zeros(1), 2 * up.flip(0)[1::2]])  # 0, 2 f[10], .., 2 f[0]
        self.register_buffer("up_taps", torch.stack([up_even, up_odd]))  # [2, 7]
        # Taps over the 7 positions snake[t-3 .. t+3] of each phase.
        down_even = torch.cat([down.new_zeros(1), down[1::2]])  # 0, g[1], g[3], .., g[11]
        down_odd = torch.cat([down[0::2], down.new_zeros(1)])  # g[0], g[2], .., g[10], 0
        self.register_buffer("down_taps", torch.stack([down_even, down_odd]))  # [2, 7]
        self.use_slices = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_slices:
            return self._forward_slices(x)
        return self._forward_grouped_conv(x)

    def _pad_snake(self, s: torch.Tensor) -> torch.Tensor:
        """[B, C, 2, T] snake outputs -> [B, C, 2, T + 6], padded as the published replicate padding does."""
        batch, channels = s.shape[:2]
        left = s[:, :, :1, :1].expand(batch, channels, 2, 3)
        right = s[:, :, 1:, -1:].expand(batch, channels, 2, 3)
        return torch.cat([left, s, right], dim=-1)

    def _forward_grouped_conv(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, length = x.shape
        padded = F.pad(x, (3, 3), mode="replicate")
        up_weight = self.up_taps.to(x.dtype).repeat(channels, 1).unsqueeze(1)  # [2C, 1, 7]
        phases = F.conv1d(padded, up_weight, groups=channels).view(batch, channels, 2, length)
        s = _snake_beta(phases, self.alpha.to(x.dtype), self.inv_beta.to(x.dtype))
        s = self._pad_snake(s).reshape(batch, 2 * channels, length + 6)
        down_weight = self.down_taps.to(x.dtype).unsqueeze(0).expand(channels, 2, 7)  # [C, 2, 7]
        return F.conv1d(s, down_weight, groups=channels)

    def _forward_slices(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[-1]
        padded = F.pad(x, (3, 3), mode="replicate")
        up_taps = self.up_taps.to(x.dtype)
        down_taps = self.down_taps.to(x.dtype)
        even = sum(up_taps[0, i] * padded[..., i : i + length] for i in range(6))
        odd = sum(up_taps[1, i + 1] * padded[..., i + 1 : i + 1 + length] for i in range(6))
        s = _snake_beta(torch.stack([even, odd], dim=2), self.alpha.to(x.dtype), self.inv_beta.to(x.dtype))
        s = self._pad_snake(s)
        s_even, s_odd = s[:, :, 0], s[:, :, 1]
        out = sum(down_taps[0, i + 1] * s_even[..., i + 1 : i + 1 + length] for i in range(6))
        return out + sum(down_taps[1, i] * s_odd[..., i : i + length] for i in range(6))


class _Conv(nn.Module):
    """A plain Conv1d with 'same' padding, holding folded weights as buffers (nothing here trains)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dilation: int = 1) -> None:
        super().__init__()
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.dilation = dilation
        self.padding = dilation * (weight.shape[-1] - 1) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv1d(x, self.weight, self.bias, padding=self.padding, dilation=self.dilation)


class _ResidualBlock(nn.Module):
    def __init__(self, layout: _AMPBlock) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList(
            _Conv(conv.folded_weight(), conv.bias, dilation)
            for conv, dilation in zip(layout.convs1, RESBLOCK_DILATIONS, strict=True)
        )
        self.convs2 = nn.ModuleList(_Conv(conv.folded_weight(), conv.bias) for conv in layout.convs2)
        self.acts = nn.ModuleList(_runnable_activation(act) for act in layout.activations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for pair, (conv1, conv2) in enumerate(zip(self.convs1, self.convs2, strict=True)):
            step = conv2(self.acts[2 * pair + 1](conv1(self.acts[2 * pair](x))))
            x = x + step
        return x


def _runnable_activation(layout: _AntiAliasedSnake) -> AntiAliasedSnakeBeta:
    # The published SnakeBeta stores alpha and beta in log scale (alpha_logscale=True).
    alpha = layout.act.alpha.detach().exp()
    inv_beta = 1.0 / (layout.act.beta.detach().exp() + SNAKE_EPSILON)
    return AntiAliasedSnakeBeta(
        alpha, inv_beta, layout.upsample.filter.detach(), layout.downsample.lowpass.filter.detach()
    )


def interpolate_x3(x: torch.Tensor) -> torch.Tensor:
    """Linear interpolation to three times the rate, as `F.interpolate(mode="linear", align_corners=False)`.

    Output 3j + r sits at input position j + (r - 1) / 3, so the weights are fixed: (1/3, 2/3) for r = 0,
    1 for r = 1, (2/3, 1/3) for r = 2, with the ends replicated. Written out because F.interpolate computes
    each output's source position in floating point from a rounded scale, which drifts by up to ~3e-4
    samples over a second of audio: the result would depend on where a sample sits in its tensor, and no
    window could reproduce another's output.
    """
    padded = F.pad(x, (1, 1), mode="replicate")
    before, here, after = padded[..., :-2], padded[..., 1:-1], padded[..., 2:]
    phases = torch.stack([(before + 2 * here) / 3, here, (2 * here + after) / 3], dim=-1)
    return phases.reshape(*x.shape[:-1], RATE_FACTOR * x.shape[-1])


class SpeechSR48k(nn.Module):
    """The generator, ready to run: [B, T] at 16 kHz -> [B, 3T] at 48 kHz, values in (-1, 1)."""

    def __init__(self, checkpoint: SpeechSRCheckpoint) -> None:
        super().__init__()
        layout = checkpoint.dec
        with torch.no_grad():
            self.conv_pre = _Conv(layout.conv_pre.folded_weight(), layout.conv_pre.bias)
            self.resblocks = nn.ModuleList(_ResidualBlock(block) for block in layout.resblocks)
            self.activation_post = _runnable_activation(layout.activation_post)
            self.conv_post = _Conv(layout.conv_post.weight, None)
        self.requires_grad_(False)
        self.eval()
        self.use_triton = True  # on CUDA: the fused kernels of the end of this file

    def use_fusable_activations(self, enabled: bool) -> None:
        """Shifted-slice activations (for `torch.compile`) instead of grouped convolutions (for eager)."""
        for module in self.modules():
            if isinstance(module, AntiAliasedSnakeBeta):
                module.use_slices = enabled

    def forward(self, audio_16k: torch.Tensor) -> torch.Tensor:
        if audio_16k.is_cuda and self.use_triton and triton is not None:
            return _forward_cuda(self, audio_16k)
        x = interpolate_x3(self.conv_pre(audio_16k.unsqueeze(1)))
        total = self.resblocks[0](x)
        for block in self.resblocks[1:]:
            total = total + block(x)
        x = self.activation_post(total / len(self.resblocks))
        return torch.tanh(self.conv_post(x)).squeeze(1)


def describe_state_dict_mismatch(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """Why `state_dict` is not exactly the published generator's, or None when it is."""
    expected = SpeechSRCheckpoint().state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong_shape = sorted(
        key
        for key in set(expected) & set(state_dict)
        if not isinstance(state_dict[key], torch.Tensor)
        or tuple(state_dict[key].shape) != tuple(expected[key].shape)
    )
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
        if keys:
            shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
            problems.append(f"{len(keys)} {label} ({shown})")
    return "; ".join(problems) or None


def build_generator(state_dict: Mapping[str, torch.Tensor]) -> SpeechSR48k:
    """Load the published state dict strictly and return the runnable generator (on the CPU, float32).

    Raises ValueError naming the differences when the state dict is not exactly the published layout.
    """
    mismatch = describe_state_dict_mismatch(state_dict)
    if mismatch is not None:
        raise ValueError(mismatch)
    checkpoint = SpeechSRCheckpoint()
    checkpoint.load_state_dict({key: value.float() for key, value in state_dict.items()}, strict=True)
    if not all(torch.isfinite(p).all() for p in checkpoint.state_dict().values()):
        raise ValueError("the weights contain NaN or infinite values")
    return SpeechSR48k(checkpoint)


def reference_activation(
    x: torch.Tensor, alpha: torch.Tensor, inv_beta: torch.Tensor, up: torch.Tensor, down: torch.Tensor
) -> torch.Tensor:
    """The anti-aliased SnakeBeta computed the published, non-polyphase way (for tests): [B,C,T] -> [B,C,T]."""
    channels = x.shape[1]
    up = up.reshape(1, 1, FILTER_TAPS).expand(channels, 1, FILTER_TAPS)
    down = down.reshape(1, 1, FILTER_TAPS).expand(channels, 1, FILTER_TAPS)
    pad = FILTER_TAPS // 2 - 1
    u = 2 * F.conv_transpose1d(F.pad(x, (pad, pad), mode="replicate"), up, stride=2, groups=channels)
    crop_left = pad * 2 + (FILTER_TAPS - 2) // 2
    crop_right = pad * 2 + (FILTER_TAPS - 2 + 1) // 2
    u = u[..., crop_left : u.shape[-1] - crop_right]
    s = u + inv_beta.reshape(1, channels, 1) * torch.sin(alpha.reshape(1, channels, 1) * u).pow(2)
    s = F.pad(s, (FILTER_TAPS // 2 - 1, FILTER_TAPS // 2), mode="replicate")
    return F.conv1d(s, down, stride=2, groups=channels)


# ---------------------------------------------------------------------------------------------------------
# The CUDA path. Profiling the straightforward version on an H100 showed where the time goes: the grouped
# (depthwise) convolutions of the x2 up / x2 down filters ran at a tenth of memory bandwidth, the activation's
# elementwise steps each made a full pass over memory, and cuDNN transposed every dense convolution's input
# and output between channels-first and channels-last. Here every tensor between layers is kept
# channels-last ([B, C, 1, T] in torch.channels_last, i.e. [B, T, C] in memory), the dense convolutions are
# cuDNN's native channels-last kernels, and each anti-aliased SnakeBeta is one Triton kernel that reads its
# input once and writes its output once. On an H100, float16, 64 one-second windows per call: the
# straightforward version ran ~160 audio seconds per second, this one ~4,700 (the whole upsampler ~3,900).

# Launch geometry of the fused activation (measured on an H100 with benchmark_upsampler in upsample.py).
TILE_ROWS = 32  # rows per tile: 6 + 6 rows of halo (upsampler, decimator) leave 20 output samples
TILE_HALO = 12
TILE_WARPS = 2
PROGRAMS_PER_SM = 16


def _forward_cuda(model: SpeechSR48k, audio_16k: torch.Tensor) -> torch.Tensor:
    # cuDNN adds a convolution's bias in a separate pass over the output, which cost as much as the
    # convolution itself. So no convolution here adds its bias: the signals are carried without their
    # per-channel offsets, each offset is tracked on the side (`bias`, [C] float32), and the fused
    # activation, the only consumer of every signal, adds it as it loads its input.
    x, bias = _pre_and_interpolate_cuda(model.conv_pre, audio_16k)
    total, total_bias = _block_cuda(model.resblocks[0], x, bias)
    for block in model.resblocks[1:]:
        out, out_bias = _block_cuda(block, x, bias)
        total, total_bias = _add(total, out), total_bias + out_bias
    # The average's 1/3 rides on the (linear) upsampling filter of the last activation.
    x = _activation_cuda(model.activation_post, total, total_bias, input_scale=1 / len(model.resblocks))
    return torch.tanh(_conv_cuda(model.conv_post, x)).reshape(audio_16k.shape[0], -1)


def _pre_and_interpolate_cuda(conv_pre: _Conv, audio_16k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """conv_pre then the x3 linear interpolation, as one convolution: [B, T] -> [B, C, 1, 3T] channels-last
    (without conv_pre's bias, which is returned: interpolation keeps a constant as it is).

    Both are linear, so output phase r of channel c is a 9-tap filter of the input: phase 0 is
    (conv at j-1 + 2 conv at j) / 3, phase 1 is conv at j, phase 2 is (2 conv at j + conv at j+1) / 3.
    Computing the 3 x 32 phase channels directly and reading them as [B, T, 3, 32] lays the result out
    channels-last at 48 kHz with one transposing copy.
    """
    weight = getattr(conv_pre, "_phase_weight", None)
    if weight is None or weight.dtype != audio_16k.dtype or weight.device != audio_16k.device:
        taps = conv_pre.weight.double()  # [C, 1, 7] over x[j-3 .. j+3]
        earlier, centred, later = (
            F.pad(taps, (0, 2)),
            F.pad(taps, (1, 1)),
            F.pad(taps, (2, 0)),
        )  # x[j-4 .. j+4]
        phases = torch.cat([(earlier + 2 * centred) / 3, centred, (2 * centred + later) / 3])  # [3C, 1, 9]
        weight = phases.to(audio_16k).contiguous()
        conv_pre._phase_weight = weight
    batch, length = audio_16k.shape
    channels = conv_pre.weight.shape[0]
    phases = F.conv1d(audio_16k.unsqueeze(1), weight, padding=4)
    x = phases.view(batch, 3, channels, length).permute(0, 3, 1, 2).reshape(batch, 1, 3 * length, channels)
    x = x.permute(0, 3, 1, 2)  # [B, C, 1, 3T], channels-last in memory
    # The interpolation replicates the ends: its first and last samples equal their neighbours.
    x[..., 0] = x[..., 1]
    x[..., -1] = x[..., -2]
    return x, conv_pre.bias.float()


def _block_cuda(
    block: _ResidualBlock, x: torch.Tensor, bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    for pair, (conv1, conv2) in enumerate(zip(block.convs1, block.convs2, strict=True)):
        hidden = _conv_cuda(conv1, _activation_cuda(block.acts[2 * pair], x, bias))
        step = _conv_cuda(conv2, _activation_cuda(block.acts[2 * pair + 1], hidden, conv1.bias.float()))
        x, bias = _add(x, step), bias + conv2.bias.float()
    return x, bias


def _add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a + b for two channels-last [B, C, 1, T] tensors, over their flat storage (vectorised)."""
    batch, channels, _, length = a.shape
    flat = a.permute(0, 2, 3, 1).reshape(-1) + b.permute(0, 2, 3, 1).reshape(-1)
    return flat.view(batch, 1, length, channels).permute(0, 3, 1, 2)


def _conv_cuda(conv: _Conv, x: torch.Tensor) -> torch.Tensor:
    """The convolution without its bias, channels-last in and out."""
    weight = getattr(conv, "_channels_last_weight", None)
    if weight is None or weight.dtype != x.dtype or weight.device != x.device:
        weight = conv.weight.to(x).unsqueeze(2).contiguous(memory_format=torch.channels_last)
        conv._channels_last_weight = weight
    return F.conv2d(x, weight, padding=(0, conv.padding), dilation=(1, conv.dilation))


def _activation_cuda(
    activation: AntiAliasedSnakeBeta, x: torch.Tensor, bias: torch.Tensor, input_scale: float = 1.0
) -> torch.Tensor:
    """One fused kernel: (x + bias) * input_scale through the activation; [B, C, 1, T] channels-last."""
    batch, channels, _, length = x.shape
    x = x.contiguous(memory_format=torch.channels_last)
    out = torch.empty_like(x)
    tiles_per_row = -(-length // (TILE_ROWS - TILE_HALO))
    tiles = batch * tiles_per_row
    programs = min(tiles, PROGRAMS_PER_SM * torch.cuda.get_device_properties(x.device).multi_processor_count)
    _anti_aliased_snake_beta[(programs,)](
        x,
        out,
        bias.contiguous(),
        activation.alpha.reshape(-1).float().contiguous(),
        activation.inv_beta.reshape(-1).float().contiguous(),
        (activation.up_taps.float() * input_scale).contiguous(),
        activation.down_taps.float().contiguous(),
        length,
        tiles,
        tiles_per_row,
        CHANNELS=channels,
        ROWS=TILE_ROWS,
        OUT_ROWS=TILE_ROWS - TILE_HALO,
        HALF_DOT=x.dtype != torch.float32,
        FAST_SIN=torch.version.hip is None,
        num_warps=TILE_WARPS,
    )
    return out


if triton is not None:
    from .triton_support import sine as _sine

    @triton.jit
    def _banded(offsets, taps_ptr, HALF: tl.constexpr):
        """The [ROWS, ROWS] matrix with taps[k] where column - row == k (k = 0..6), zero elsewhere."""
        band = tl.where(offsets == 0, tl.load(taps_ptr), 0.0)
        for k in tl.static_range(1, 7):
            band = tl.where(offsets == k, tl.load(taps_ptr + k), band)
        if HALF:
            band = band.to(tl.float16)
        return band

    @triton.jit
    def _apply_band(band, values, HALF: tl.constexpr):
        if HALF:
            product = tl.dot(band, values.to(tl.float16))
        else:
            product = tl.dot(band, values, input_precision="ieee")
        return product

    @triton.jit
    def _anti_aliased_snake_beta(
        x_ptr, out_ptr, bias_ptr, alpha_ptr, inv_beta_ptr, up_ptr, down_ptr,
        length, tiles, tiles_per_row,
        CHANNELS: tl.constexpr, ROWS: tl.constexpr, OUT_ROWS: tl.constexpr,
        HALF_DOT: tl.constexpr, FAST_SIN: tl.constexpr,
    ):  # fmt: skip
        # A persistent program walks tiles of OUT_ROWS output samples of one batch row. A tile starting
        # at t0 loads x at t0 - 6 .. t0 - 6 + ROWS (replicated beyond the ends), computes both phases of the
        # doubled-rate signal at t0 - 3 + r (each from x at -3..+3: the 7-tap polyphase upsampler) and
        # SnakeBeta of them, then the output at t0 + o (each from the phases at -3..+3: the 7-tap
        # polyphase decimator). Registers cannot be shifted, so both filters are products with banded
        # ROWS x ROWS matrices of their taps, on the tensor cores; each stage loses 6 rows of the tile.
        program = tl.program_id(0)
        programs = tl.num_programs(0)
        rows = tl.arange(0, ROWS)
        channels = tl.arange(0, CHANNELS)
        bias = tl.load(bias_ptr + channels)[None, :]
        alpha = tl.load(alpha_ptr + channels)[None, :]
        inv_beta = tl.load(inv_beta_ptr + channels)[None, :]
        offsets = rows[None, :] - rows[:, None]
        up_even = _banded(offsets, up_ptr, HALF_DOT)
        up_odd = _banded(offsets, up_ptr + 7, HALF_DOT)
        down_even = _banded(offsets, down_ptr, HALF_DOT)
        down_odd = _banded(offsets, down_ptr + 7, HALF_DOT)
        for tile in range(program, tiles, programs):
            batch = tile // tiles_per_row
            t0 = (tile % tiles_per_row) * OUT_ROWS
            position = t0 - 3 + rows  # of the doubled-rate rows
            at = tl.minimum(tl.maximum(position - 3, 0), length - 1)
            source = x_ptr + batch.to(tl.int64) * length * CHANNELS
            x = tl.load(source + at[:, None] * CHANNELS + channels[None, :]).to(tl.float32) + bias
            even = _apply_band(up_even, x, HALF_DOT)
            odd = _apply_band(up_odd, x, HALF_DOT)
            sin_even = _sine(alpha * even, FAST_SIN)
            sin_odd = _sine(alpha * odd, FAST_SIN)
            even = even + inv_beta * sin_even * sin_even
            odd = odd + inv_beta * sin_odd * sin_odd
            if (t0 < 3) | (t0 - 3 + ROWS > length):
                # The published decimator replicates the doubled-rate signal's first sample (even) and
                # last sample (odd) beyond the ends.
                first = tl.sum(tl.where((position == 0)[:, None], even, 0.0), axis=0)[None, :]
                last = tl.sum(tl.where((position == length - 1)[:, None], odd, 0.0), axis=0)[None, :]
                before = (position < 0)[:, None]
                after = (position >= length)[:, None]
                even = tl.where(before, first, tl.where(after, last, even))
                odd = tl.where(before, first, tl.where(after, last, odd))
            result = _apply_band(down_even, even, HALF_DOT) + _apply_band(down_odd, odd, HALF_DOT)
            out_position = t0 + rows
            keep = ((rows < OUT_ROWS) & (out_position < length))[:, None]
            target = out_ptr + batch.to(tl.int64) * length * CHANNELS + out_position[:, None] * CHANNELS
            tl.store(target + channels[None, :], result.to(out_ptr.dtype.element_ty), mask=keep)
