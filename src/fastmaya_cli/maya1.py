"""Maya1's token layout: prompt ids in, SNAC codes out.

Pure functions only; nothing here loads a model.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError

START_OF_HUMAN = 128259
BOS = 128000
END_OF_TEXT = 128009
END_OF_HUMAN = 128260
START_OF_AUDIO = 128261
START_OF_SPEECH = 128257
END_OF_SPEECH = 128258  # the stop id
AUDIO_FIRST_ID = 128266
AUDIO_LAST_ID = 156937
VOCAB_SIZE = 156940
PROMPT_PREFIX = (START_OF_HUMAN, BOS)
PROMPT_SUFFIX = (END_OF_TEXT, END_OF_HUMAN, START_OF_AUDIO, START_OF_SPEECH)

TOKENS_PER_FRAME = 7
SAMPLES_PER_FRAME = 2048
SNAC_RATE = 24000
TOKENS_PER_SECOND = TOKENS_PER_FRAME * SNAC_RATE / SAMPLES_PER_FRAME  # 82.03
CODEBOOK_SIZE = 4096
# Which codebook each of a frame's 7 slots belongs to.
SLOT_CODEBOOK = (0, 1, 2, 2, 1, 2, 2)

MAX_VOICE_CHARS = 500

TAGS = frozenset(
    {
        "angry",
        "appalled",
        "chuckle",
        "cry",
        "curious",
        "disappointed",
        "excited",
        "exhale",
        "gasp",
        "giggle",
        "gulp",
        "laugh",
        "laugh_harder",
        "mischievous",
        "sarcastic",
        "scream",
        "sigh",
        "sing",
        "snort",
        "whisper",
    }
)


def clean_voice(voice: str) -> str:
    """Make a voice description safe to put inside `<description="...">`.

    Newlines become spaces, a `"` becomes `'` (it would end the attribute) and `<`/`>` are removed
    (they would open or close the description tag).
    """
    cleaned = " ".join(voice.replace('"', "'").replace("<", " ").replace(">", " ").split())
    if not cleaned:
        raise InputError(
            "The voice description is empty.", 'Pass --voice "Female narrator in her 40s, warm".'
        )
    if len(cleaned) > MAX_VOICE_CHARS:
        raise InputError(
            f"The voice description has {len(cleaned)} characters; the limit is {MAX_VOICE_CHARS}.",
            "Describe the voice in a sentence or two.",
        )
    return cleaned


def prompt_text(voice: str, text: str) -> str:
    return f'<description="{clean_voice(voice)}"> {text}'


def prompt_ids(encode: Callable[[str], Sequence[int]], voice: str, text: str) -> tuple[int, ...]:
    """Maya1's exact prompt; `encode` must not add special tokens (no BOS of its own)."""
    return (*PROMPT_PREFIX, *encode(prompt_text(voice, text)), *PROMPT_SUFFIX)


def chunk_seed(book_seed: int, chunk_text: str, attempt: int = 0) -> int:
    """A 31-bit seed that depends on the book's seed, the chunk's own text and the retry attempt.

    Keyed on text rather than position so that editing one sentence leaves other chunks' audio alone.
    """
    digest = hashlib.blake2b(f"{book_seed}\x00{attempt}\x00{chunk_text}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


def expected_tokens(seconds: float) -> int:
    return math.ceil(seconds * TOKENS_PER_SECOND)


@dataclass(frozen=True)
class Codes:
    """SNAC 24 kHz codes of one chunk: c0 has 1 code a frame, c1 2 and c2 4."""

    c0: np.ndarray
    c1: np.ndarray
    c2: np.ndarray
    bad_ids: int = 0
    dropped_tokens: int = 0

    @property
    def frames(self) -> int:
        return int(self.c0.shape[0])

    @property
    def seconds(self) -> float:
        return self.frames * SAMPLES_PER_FRAME / SNAC_RATE


def audio_tokens(token_ids: Sequence[int]) -> tuple[np.ndarray, int]:
    """The generated ids up to the stop id, split into audio ids and a count of the others."""
    ids = np.asarray(token_ids, dtype=np.int64)
    stops = np.flatnonzero(ids == END_OF_SPEECH)
    if stops.size:
        ids = ids[: stops[0]]
    is_audio = (ids >= AUDIO_FIRST_ID) & (ids <= AUDIO_LAST_ID)
    return ids[is_audio], int((~is_audio).sum())


def unpack(token_ids: Sequence[int]) -> Codes:
    """Maya1 ids -> SNAC codebooks. An incomplete last frame is dropped; non-audio ids are counted."""
    audio, bad = audio_tokens(token_ids)
    frames = audio.shape[0] // TOKENS_PER_FRAME
    dropped = int(audio.shape[0] - frames * TOKENS_PER_FRAME)
    slots = ((audio[: frames * TOKENS_PER_FRAME] - AUDIO_FIRST_ID) % CODEBOOK_SIZE).reshape(frames, 7)
    return Codes(
        c0=slots[:, 0].copy(),
        c1=slots[:, [1, 4]].reshape(-1),
        c2=slots[:, [2, 3, 5, 6]].reshape(-1),
        bad_ids=bad,
        dropped_tokens=dropped,
    )


def pack(c0: np.ndarray, c1: np.ndarray, c2: np.ndarray) -> list[int]:
    """SNAC codebooks -> Maya1 ids, the inverse of `unpack`. Maya1 offsets slot k by k * 4096."""
    frames = c0.shape[0]
    c1f = np.asarray(c1).reshape(frames, 2)
    c2f = np.asarray(c2).reshape(frames, 4)
    slots = np.stack([c0, c1f[:, 0], c2f[:, 0], c2f[:, 1], c1f[:, 1], c2f[:, 2], c2f[:, 3]], axis=1)
    offsets = AUDIO_FIRST_ID + CODEBOOK_SIZE * np.arange(7)
    return (slots + offsets).reshape(-1).astype(np.int64).tolist()


# Failure detection -------------------------------------------------------------------------------
# A chunk is retried when its audio is implausible for its text. Rules (seconds of speech):
#   too long:  more than 3x the predicted duration plus 2 s, or the token limit was reached;
#   too short: under a quarter of the prediction, for text predicted to take at least 1 s;
#   a loop:    24 frames or more (2 s) in which every frame repeats the one 1 to 4 frames before;
#   non-audio ids, no complete frame, or an engine error.
# `fixed_length` (random-weight benchmarks) asks for exact lengths, so only the first rule is off.
LONG_FACTOR = 3.0
LONG_SLACK_S = 2.0
SHORT_FACTOR = 0.25
LOOP_FRAMES = 24
LOOP_MAX_PERIOD = 4


def token_budget(expected_s: float, *, fixed_length: bool, limit: int = 2048) -> tuple[int, int]:
    """(min_new_tokens, max_new_tokens) for a chunk predicted to last `expected_s` seconds."""
    if fixed_length:
        exact = max(28, math.ceil(expected_tokens(expected_s) / TOKENS_PER_FRAME) * TOKENS_PER_FRAME)
        exact = min(exact, limit - limit % TOKENS_PER_FRAME)
        return exact, exact
    cap = expected_tokens(LONG_FACTOR * expected_s + LONG_SLACK_S) + TOKENS_PER_FRAME
    return 28, min(limit, cap)


def frames_matrix(codes: Codes) -> np.ndarray:
    f = codes.frames
    return np.concatenate([codes.c0.reshape(f, 1), codes.c1.reshape(f, 2), codes.c2.reshape(f, 4)], axis=1)


def longest_loop(codes: Codes) -> int:
    """Length in frames of the longest stretch that repeats with a period of 1 to 4 frames."""
    frames = frames_matrix(codes)
    best = 0
    for period in range(1, LOOP_MAX_PERIOD + 1):
        if frames.shape[0] <= period:
            break
        same = np.all(frames[period:] == frames[:-period], axis=1).astype(np.int8)
        # Longest run of True.
        edges = np.diff(np.concatenate([[0], same, [0]]))
        starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
        if starts.size:
            best = max(best, int((ends - starts).max()) + period)
    return best


def check_generation(
    codes: Codes, finish_reason: str, expected_s: float, *, fixed_length: bool, error: str = ""
) -> str | None:
    """Why this chunk's output is unusable, or None when it is fine."""
    if finish_reason == "error":
        return f"engine error: {error or 'unknown'}"
    if codes.bad_ids:
        return f"{codes.bad_ids} non-audio ids in the output"
    if codes.frames == 0:
        return "no complete audio frame"
    if longest_loop(codes) >= LOOP_FRAMES:
        return f"a repeating frame pattern ({longest_loop(codes)} frames)"
    if fixed_length:
        return None
    if finish_reason == "length":
        return "reached the token limit without stopping"
    if codes.seconds > LONG_FACTOR * expected_s + LONG_SLACK_S:
        return f"{codes.seconds:.1f} s of audio where about {expected_s:.1f} s was expected"
    if expected_s >= 1.0 and codes.seconds < SHORT_FACTOR * expected_s:
        return f"stopped early: {codes.seconds:.1f} s of audio where about {expected_s:.1f} s was expected"
    return None


def load_encoder(model: str | Path) -> Callable[[str], list[int]]:
    """The model's tokenizer, as text -> ids without special tokens."""
    from transformers import AutoTokenizer

    from .errors import RuntimeFailure

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model))
    except (OSError, ValueError) as exc:
        raise RuntimeFailure(
            f"Could not load the tokenizer of '{model}': {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}",
            f"Pre-download the model while online with `hf download {model}`, or pass --model with a local directory.",
        ) from exc

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    return encode
