"""SNAC 24 kHz: Maya1's codes -> 24 kHz audio, many chunks per batch on the engine's device."""

from __future__ import annotations

import os
import types
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .errors import RuntimeFailure
from .maya1 import SAMPLES_PER_FRAME, SNAC_RATE, Codes

DEFAULT_CODEC = "hubertsiuzdak/snac_24khz"


def _seeded_noise(block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """SNAC's NoiseBlock, with the noise drawn from the codec's own generator.

    The stock block draws from the global generator, so a decode would depend on whatever else
    used it (other threads included); a generator reseeded per batch makes decoding repeatable.
    """
    noise = torch.randn((x.shape[0], 1, x.shape[2]), generator=block.noise_generator, device=x.device)
    return x + noise.to(x.dtype) * block.linear(x)


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


class SnacDecoder:
    """Loads SNAC once; decodes padded batches of chunks and trims each to frames x 2048 samples."""

    def __init__(self, model: str | Path = DEFAULT_CODEC, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.model = load_snac(model, self.device)
        self.generator = torch.Generator(device=self.device)
        for module in self.model.modules():
            if type(module).__name__ == "NoiseBlock":
                module.noise_generator = self.generator
                module.forward = types.MethodType(_seeded_noise, module)
        if self.device.type == "cuda":
            # cuDNN and cuBLAS set up on the first call; pay that at load, not in the first batch.
            silence = np.zeros(4, dtype=np.int64)
            self.decode([Codes(silence, np.zeros(8, dtype=np.int64), np.zeros(16, dtype=np.int64))])

    @torch.inference_mode()
    def decode(self, codes: Sequence[Codes], seed: int = 0) -> tuple[torch.Tensor, list[int]]:
        """Decode a batch: returns audio [B, T] (float32, zero-padded, on device) and each length."""
        frames = [c.frames for c in codes]
        width = max(frames)
        books = []
        for level, per_frame in enumerate((1, 2, 4)):
            padded = np.zeros((len(codes), width * per_frame), dtype=np.int64)
            for row, c in enumerate(codes):
                values = (c.c0, c.c1, c.c2)[level]
                padded[row, : values.shape[0]] = values
            books.append(torch.from_numpy(padded).to(self.device))
        self.generator.manual_seed(seed)
        audio = self.model.decode(books)[:, 0, : width * SAMPLES_PER_FRAME].float()
        lengths = [f * SAMPLES_PER_FRAME for f in frames]
        for row, length in enumerate(lengths):
            audio[row, length:] = 0.0
        return audio, lengths
