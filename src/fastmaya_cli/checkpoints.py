"""Maya1-shaped checkpoints with random weights, for tests and `fastmaya bench`.

No model hub is needed: the tokenizer is built from the exact Llama 3 vocabulary (package
quicktok-v1), Maya1's added tokens start at 128256, and the Llama and SNAC models keep Maya1's and
SNAC 24 kHz's layouts. The real loading code (`from_pretrained` on a directory) then runs on them.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from . import maya1

# Llama 3's pre-tokenizer split pattern.
LLAMA3_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
LLAMA3_SPECIALS = range(128000, 128256)
MAYA1_ADDED = range(128256, maya1.VOCAB_SIZE)
BUILD_VERSION = 2  # bump when the builders change, so stale builds are not reused


@dataclass(frozen=True)
class LlamaShape:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    tie_word_embeddings: bool


# Maya1's own shape (3.30 B parameters) and a tiny one for CPU tests.
MAYA1_SHAPE = LlamaShape(3072, 8192, 28, 24, 8, 128, True)
TINY_SHAPE = LlamaShape(64, 128, 2, 4, 2, 16, False)
# Small enough to build in seconds, with the head size GPU attention kernels expect.
SMALL_SHAPE = LlamaShape(256, 512, 2, 2, 1, 128, False)
SHAPES = {
    "tiny": (TINY_SHAPE, "float32"),
    "small": (SMALL_SHAPE, "bfloat16"),
    "full": (MAYA1_SHAPE, "bfloat16"),
}


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map that byte-level BPE vocabularies use."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


def _llama3_ranks() -> dict[bytes, int]:
    import quicktok

    enc = quicktok.get_encoding("llama3")
    return {enc.decode_single_token_bytes(i): i for i in range(LLAMA3_SPECIALS.start)}


def _merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Recover BPE merges from tiktoken-style ranks: a token is made from two lower-ranked tokens."""
    merges: list[tuple[int, int, int, bytes, bytes]] = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort()
    return [(left, right) for _, _, _, left, right in merges]


def build_tokenizer(directory: Path) -> None:
    """Write a Maya1 tokenizer (tokenizer.json etc.) covering all 156,940 ids into `directory`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    ranks = _llama3_ranks()
    to_text = _byte_to_unicode()

    def text_of(token: bytes) -> str:
        return "".join(to_text[b] for b in token)

    vocab = {text_of(token): rank for token, rank in ranks.items()}
    merges = [(text_of(a), text_of(b)) for a, b in _merges_from_ranks(ranks)]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    import quicktok

    enc = quicktok.get_encoding("llama3")
    specials = [enc.decode_single_token_bytes(i).decode() for i in LLAMA3_SPECIALS]
    added = [f"<custom_token_{i - MAYA1_ADDED.start}>" for i in MAYA1_ADDED]
    # Added in id order, so each lands on its exact id.
    tokenizer.add_special_tokens(specials + added)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<custom_token_7>",
    )
    if len(fast) != maya1.VOCAB_SIZE or fast.convert_tokens_to_ids("<custom_token_2>") != maya1.END_OF_SPEECH:
        raise RuntimeError("tokenizer ids do not follow Maya1's layout")
    fast.save_pretrained(directory)


def build_llama(directory: Path, shape: LlamaShape, *, seed: int = 0, dtype: str = "float32") -> None:
    """A LlamaForCausalLM of `shape` with random weights and Maya1's vocabulary and rope.

    The weights are steered so that random models still emit audio ids (see `_favour_audio_ids`).
    Large models are initialised on the GPU when there is one: it takes seconds instead of minutes.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=maya1.VOCAB_SIZE,
        **asdict(shape),
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        bos_token_id=maya1.BOS,
        eos_token_id=maya1.END_OF_SPEECH,
        torch_dtype=dtype,
    )
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() and shape.hidden_size >= 1024 else "cpu"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():
        _favour_audio_ids(model)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model.save_pretrained(directory, safe_serialization=True)


def _favour_audio_ids(model) -> None:  # noqa: ANN001 - transformers model
    """Make random weights emit (nearly uniform) audio ids, as the trained model does.

    Channel 0 of every embedding is a constant; the last layer's MLP turns it into a large constant
    on channel 1 whatever the input; the output layer (tied or not) reads channel 1 as +0.5 for audio
    ids and -0.5 for all others. The rest of the network is scaled down so it only adds variety.
    """
    import torch

    inner = model.model
    embed = inner.embed_tokens.weight
    embed.mul_(0.02)
    embed[:, 0] = 1.0
    for layer in inner.layers:
        layer.self_attn.o_proj.weight.mul_(0.01)
        layer.mlp.down_proj.weight.mul_(0.01)
    mlp = inner.layers[-1].mlp
    units = min(8, mlp.gate_proj.weight.shape[0])
    for proj in (mlp.gate_proj, mlp.up_proj):
        proj.weight[:units] = 0.0
        proj.weight[:units, 0] = 0.3
    mlp.down_proj.weight[:, :units] = 0.0
    mlp.down_proj.weight[1, :units] = 1.0
    inner.norm.weight.fill_(1.0)
    audio = torch.zeros(embed.shape[0], dtype=torch.bool, device=embed.device)
    audio[maya1.AUDIO_FIRST_ID : maya1.AUDIO_LAST_ID + 1] = True
    model.lm_head.weight[:, 1] = torch.where(audio, 0.5, -0.5).to(embed.dtype)


def build_snac(directory: Path, *, seed: int = 0, tiny: bool = True) -> None:
    """SNAC with the 24 kHz layout (hop 512, strides 4/2/1: 2048 samples a frame) and random weights."""
    import torch
    from snac import SNAC

    config = {
        "sampling_rate": 24000,
        "encoder_dim": 8 if tiny else 48,
        "encoder_rates": [2, 4, 8, 8],
        "decoder_dim": 32 if tiny else 768,
        "decoder_rates": [8, 8, 4, 2],
        "attn_window_size": None,
        "codebook_size": 4096,
        "codebook_dim": 8,
        "vq_strides": [4, 2, 1],
        "noise": True,
        "depthwise": True,
    }
    torch.manual_seed(seed)
    model = SNAC(**config)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    torch.save(model.state_dict(), directory / "pytorch_model.bin")


def _build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """Build into a temporary sibling and rename, so an interrupted build never looks finished."""
    if (target / ".complete").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(work)
        (work / ".complete").touch()
        if target.exists():
            shutil.rmtree(target)
        os.replace(work, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def random_maya1(cache: Path, *, size: str = "tiny") -> Path:
    """A directory holding a random-weight Maya1-shaped checkpoint and the Maya1 tokenizer."""
    shape, dtype = SHAPES[size]
    tokenizer_dir = _build_once(cache / "maya1-tokenizer", build_tokenizer)

    def build(directory: Path) -> None:
        build_llama(directory, shape, dtype=dtype)
        for item in tokenizer_dir.iterdir():
            if item.name != ".complete":
                shutil.copy2(item, directory / item.name)

    return _build_once(cache / f"maya1-random-{size}-v{BUILD_VERSION}", build)


def random_snac(cache: Path, *, tiny: bool = True) -> Path:
    return _build_once(
        cache / f"snac24-random-{'tiny' if tiny else 'full'}", lambda d: build_snac(d, tiny=tiny)
    )
