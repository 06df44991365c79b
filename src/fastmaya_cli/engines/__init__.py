"""Generation engines behind one interface.

An engine takes a batch of `Request`s and yields one `Generation` per request, in completion
order (not submission order). Engines load their weights once, in their constructor.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal, Protocol

FinishReason = Literal["stop", "length", "error"]


@dataclass(frozen=True)
class Sampling:
    """Maya1's recommended sampling; the same for every engine.

    top_k 50 is what Maya1's reference (transformers `generate`, whose default top-k is 50) applies.
    """

    temperature: float = 0.4
    top_p: float = 0.9
    top_k: int = 50
    repetition_penalty: float = 1.1
    stop_id: int = 128258


@dataclass(frozen=True)
class Request:
    chunk_index: int
    prompt_ids: tuple[int, ...]
    seed: int
    max_new_tokens: int = 2048
    min_new_tokens: int = 28


@dataclass(frozen=True)
class Generation:
    chunk_index: int
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    error: str = ""


class Engine(Protocol):
    name: str
    device: str

    def generate(self, requests: Iterable[Request]) -> Iterator[Generation]:
        """Yield a Generation for every request, as each completes."""
        ...

    def close(self) -> None: ...
