"""The reference engine: transformers `generate`, batched with left padding, on CPU or CUDA.

Sampling is Maya1's (repetition penalty, temperature, top-p), but the final draw uses one random
generator per request, seeded from the request, so a chunk's audio does not depend on which other
chunks share its batch.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from ..errors import RuntimeFailure
from . import Generation, Request, Sampling
from .feed import batches


class SeededDraw:
    """A logits processor that samples one token per row with that row's own generator.

    It returns logits that are 0 at the drawn token and -inf elsewhere, so greedy decoding after it
    picks exactly the draw. Exponential-race sampling: argmax(p / E) with E ~ Exp(1) draws from p.
    """

    def __init__(self, seeds: list[int], device: torch.device) -> None:
        self.generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        probs = torch.softmax(scores.float(), dim=-1)
        race = torch.empty_like(probs)
        for row, generator in enumerate(self.generators):
            race[row].exponential_(generator=generator)
        choice = (probs / race).argmax(dim=-1, keepdim=True)
        drawn = torch.full_like(scores, float("-inf"))
        return drawn.scatter_(1, choice, 0.0)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_causal_lm(model: str, device: torch.device, dtype: torch.dtype):  # noqa: ANN201 - transformers type
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        lm = AutoModelForCausalLM.from_pretrained(model, dtype=dtype)
    except OSError as exc:
        raise RuntimeFailure(
            f"Could not load the Maya1 model '{model}': {first_line(exc)}",
            f"Pre-download it while online with `hf download {model}` (or `huggingface-cli download {model}`), "
            "then run again; or pass --model with a local directory.",
        ) from exc
    return lm.to(device).eval()


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class HFEngine:
    name = "hf"

    def __init__(
        self,
        model: str | Path,
        *,
        device: str = "auto",
        dtype: str = "auto",
        sampling: Sampling = Sampling(),
        max_batch: int = 16,
    ) -> None:
        self.torch_device = resolve_device(device)
        self.device = str(self.torch_device)
        if dtype == "auto":
            dtype = "bfloat16" if self.torch_device.type == "cuda" else "float32"
        self.sampling = sampling
        self.max_batch = max_batch
        started = time.perf_counter()
        self.model = load_causal_lm(str(model), self.torch_device, getattr(torch, dtype))
        self.load_seconds = time.perf_counter() - started
        self.pad_id = 0

    @torch.inference_mode()
    def generate(self, requests: Iterable[Request]) -> Iterator[Generation]:
        for batch in batches(requests, self.max_batch):
            yield from self._generate_batch(batch)

    def _generate_batch(self, batch: list[Request]) -> list[Generation]:
        from transformers import (
            GenerationConfig,
            LogitsProcessorList,
            RepetitionPenaltyLogitsProcessor,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        width = max(len(r.prompt_ids) for r in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, request in enumerate(batch):
            ids[row, width - len(request.prompt_ids) :] = torch.tensor(request.prompt_ids)
            mask[row, width - len(request.prompt_ids) :] = 1
        # One batch shares its lengths: the longest request sets the cap, shorter ones are cut below.
        max_new = max(r.max_new_tokens for r in batch)
        min_new = max(r.min_new_tokens for r in batch)
        processors = LogitsProcessorList(
            [
                RepetitionPenaltyLogitsProcessor(self.sampling.repetition_penalty),
                TemperatureLogitsWarper(self.sampling.temperature),
                TopKLogitsWarper(self.sampling.top_k),
                TopPLogitsWarper(self.sampling.top_p),
                SeededDraw([r.seed for r in batch], self.torch_device),
            ]
        )
        config = GenerationConfig(
            max_new_tokens=max_new,
            min_new_tokens=min_new,
            do_sample=False,
            eos_token_id=self.sampling.stop_id,
            pad_token_id=self.pad_id,
        )
        out = self.model.generate(
            input_ids=ids.to(self.torch_device),
            attention_mask=mask.to(self.torch_device),
            generation_config=config,
            logits_processor=processors,
        )
        new_tokens = out[:, width:].tolist()
        return [self._finish(request, tokens) for request, tokens in zip(batch, new_tokens, strict=True)]

    def _finish(self, request: Request, tokens: list[int]) -> Generation:
        stop = self.sampling.stop_id
        if stop in tokens[: request.max_new_tokens]:
            return Generation(request.chunk_index, tuple(tokens[: tokens.index(stop) + 1]), "stop")
        return Generation(request.chunk_index, tuple(tokens[: request.max_new_tokens]), "length")

    def close(self) -> None:
        self.model = None
