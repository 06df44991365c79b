"""A deterministic engine for tests and dry runs.

It is a real engine behind the same interface as the others: it emits well-formed Maya1 audio ids,
or, when told to, one of the ways Maya1 really fails (loops, early stops, runaway length, non-audio
ids). It needs no weights, so tests of retries, resume and worker failure run in milliseconds.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from .. import maya1
from . import Generation, Request

FAULTS = ("ok", "loop", "long", "short", "max_tokens", "bad_ids", "empty", "error", "die")


@dataclass
class ScriptedEngine:
    """`faults[chunk_index]` lists the behaviour of each attempt at that chunk ("ok" after the list ends).

    A chunk's normal length is a third of its max_new_tokens, which is what the renderer allows for
    3x the predicted duration. "die" kills the whole process, to test worker failure.
    """

    faults: Mapping[int, Sequence[str]] = field(default_factory=dict)
    delay_s: float = 0.0
    device: str = "cpu"
    name: str = "scripted"
    calls: int = 0
    _attempts: dict[int, int] = field(default_factory=dict)

    def generate(self, requests: Iterable[Request]) -> Iterator[Generation]:
        self.calls += 1
        for request in requests:
            attempt = self._attempts.get(request.chunk_index, 0)
            self._attempts[request.chunk_index] = attempt + 1
            script = self.faults.get(request.chunk_index, ())
            fault = script[attempt] if attempt < len(script) else "ok"
            if self.delay_s:
                time.sleep(self.delay_s)
            if fault == "die":
                os._exit(17)
            yield self._generation(request, fault)

    def _generation(self, request: Request, fault: str) -> Generation:
        rng = np.random.default_rng(request.seed)
        frames = max(4, request.max_new_tokens // maya1.TOKENS_PER_FRAME // 3)
        if fault == "error":
            return Generation(request.chunk_index, (), "error", error="scripted engine error")
        if fault == "empty":
            return Generation(request.chunk_index, (maya1.END_OF_SPEECH,), "stop")
        if fault == "short":
            frames = 1
        if fault in ("long", "max_tokens"):
            frames = request.max_new_tokens // maya1.TOKENS_PER_FRAME
        codes = [rng.integers(0, maya1.CODEBOOK_SIZE, size=frames * n) for n in (1, 2, 4)]
        if fault == "loop":
            period = 3
            codes = [
                np.tile(c[: period * n], frames // period + 1)[: frames * n]
                for c, n in zip(codes, (1, 2, 4), strict=True)
            ]
        ids = maya1.pack(*codes)
        if fault == "bad_ids":
            ids[5::9] = [1000] * len(ids[5::9])
        if fault == "max_tokens":
            return Generation(request.chunk_index, tuple(ids[: request.max_new_tokens]), "length")
        return Generation(request.chunk_index, (*ids, maya1.END_OF_SPEECH), "stop")

    def close(self) -> None:
        pass
