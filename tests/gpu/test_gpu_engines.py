"""Run on the GPU machine: `python -m pytest tests/gpu -q`."""

import contextlib
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastmaya_cli import maya1
from fastmaya_cli.engines import Request

pytestmark = [pytest.mark.gpu]


@pytest.fixture(scope="module")
def lmdeploy_engine(small_model):
    from fastmaya_cli.engines.lmdeploy import LMDeployEngine

    engine = LMDeployEngine(str(small_model), max_batch=64, gpu_memory=0.3)
    yield engine
    engine.close()


def _requests(small_model, seeds, tokens=70):
    encode = maya1.load_encoder(small_model)
    ids = maya1.prompt_ids(encode, "Warm narrator", "The tide came in slowly over the sand.")
    return [Request(i, ids, seed, tokens, tokens) for i, seed in enumerate(seeds)]


@pytest.mark.lmdeploy
def test_lmdeploy_samples_with_each_requests_seed(lmdeploy_engine, small_model):
    results = {g.chunk_index: g for g in lmdeploy_engine.generate(_requests(small_model, [1, 1, 2]))}
    assert all(len(g.token_ids) == 70 and g.finish_reason == "length" for g in results.values())
    # Same seed, same tokens; another seed, other tokens. Were do_sample off, all three would match.
    assert results[0].token_ids == results[1].token_ids
    assert results[0].token_ids != results[2].token_ids
    assert maya1.unpack(results[0].token_ids).bad_ids == 0


@pytest.mark.lmdeploy
def test_lmdeploy_whole_batch_streams_back(lmdeploy_engine, small_model):
    requests = _requests(small_model, range(300), tokens=35)
    seen = [g.chunk_index for g in lmdeploy_engine.generate(requests)]
    assert sorted(seen) == list(range(300))


# A three-sentence render takes well under a minute once LMDeploy has started (about 40 s on an H100).
RENDER_TIMEOUT_S = float(os.environ.get("FASTMAYA_GPU_RENDER_TIMEOUT_S", "300"))


def _run_or_dump_stacks(cmd: list[str], timeout_s: float) -> tuple[int | None, str]:
    """Run a render; one still running after `timeout_s` gets SIGABRT in every process of its session,
    so that each Python process (the renderer and its engine workers) prints its threads' stacks."""
    import signal

    env = {**os.environ, "PYTHONFAULTHANDLER": "1"}
    process = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        _, stderr = process.communicate(timeout=timeout_s)
        return process.returncode, stderr
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGABRT)
        try:
            _, stderr = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:  # a process that outlived SIGABRT still holds the pipe
            os.killpg(process.pid, signal.SIGKILL)
            _, stderr = process.communicate()
        return None, f"still running after {timeout_s:g} s; the stacks:\n{stderr[-20000:]}"


@pytest.mark.lmdeploy
def test_lmdeploy_and_hf_renders_agree_on_chunks_and_durations(tmp_path, small_model):
    """LMDeploy decoding in the renderer's process (the default) and beside the engine, and hf."""
    import json

    from fastmaya_cli.checkpoints import random_snac

    snac = random_snac(tmp_path / "snac", tiny=True)
    book = tmp_path / "book.txt"
    book.write_text(
        "Chapter 1\n\nIt was a bright cold day. The clocks were striking.\n\nShe walked on, quickly.\n"
    )
    durations = {}
    for engine, where in (("lmdeploy", "--no-decode-beside"), ("hf", ""), ("lmdeploy", "--decode-beside")):
        run = f"{engine}{where}"
        manifest = tmp_path / f"{run}.json"
        cmd = [
            sys.executable,
            "-m",
            "fastmaya_cli.cli",
            "render",
            str(book),
            "-o",
            str(tmp_path / f"{run}.wav"),
            "--engine",
            engine,
            "--model",
            str(small_model),
            "--codec",
            str(snac),
            "--upsampler",
            "resample",
            "--fixed-length",
            "--no-cache",
            "--manifest",
            str(manifest),
            "-q",
            "--gpu-memory",
            "0.3",
            "--loudness",
            "off",
            *([where] if where else []),
        ]
        returncode, stderr = _run_or_dump_stacks(cmd, timeout_s=RENDER_TIMEOUT_S)
        assert returncode == 0, stderr
        chunks = json.loads(manifest.read_text())["chunks"]
        durations[run] = [round(c["end"] - c["start"], 4) for c in chunks]
    assert len(durations["lmdeploy--decode-beside"]) == len(durations["hf"]) > 0
    assert durations["lmdeploy--decode-beside"] == durations["lmdeploy--no-decode-beside"] == durations["hf"]


def test_hf_engine_on_cuda(small_model):
    from fastmaya_cli.engines.hf import HFEngine

    engine = HFEngine(small_model, device="cuda", max_batch=4)
    results = list(engine.generate(_requests(small_model, [5, 6, 7, 8, 9], tokens=35)))
    assert sorted(g.chunk_index for g in results) == [0, 1, 2, 3, 4]
    assert all(maya1.unpack(g.token_ids).frames == 5 for g in results)


def test_snac_on_cuda_decodes_a_chunk_the_same_in_any_batch():
    """The renderer decodes chunks in whatever batches they finish in (see codec.SnacDecoder)."""
    import numpy as np

    from fastmaya_cli.checkpoints import random_snac
    from fastmaya_cli.codec import SnacDecoder
    from fastmaya_cli.maya1 import Codes

    decoder = SnacDecoder(random_snac(Path("/tmp/fastmaya-gpu-tests"), tiny=False), "cuda")
    rng = np.random.default_rng(0)
    chunks = [Codes(*(rng.integers(0, 4096, f * n) for n in (1, 2, 4))) for f in (30, 45, 38)]
    alone, _ = decoder.decode(chunks[:1], [5])
    beside, _ = decoder.decode([chunks[1], chunks[0], chunks[2]], [6, 5, 7])
    peak = float(alone.abs().max())
    assert peak > 1e-3  # real audio, not silence
    # cuDNN may pick other kernels for other shapes (TF32 included): equal up to rounding.
    assert float((alone[0] - beside[1, : 30 * 2048]).abs().max()) < 1e-3 * peak


@pytest.mark.parametrize("dilation", [1, 9])
def test_snake_depthwise_snake_kernel_equals_the_torch_formulation(dilation):
    import torch
    from snac.layers import ResidualUnit

    from fastmaya_cli import snac_fused

    torch.manual_seed(0)
    unit = ResidualUnit(48, dilation=dilation, groups=48)
    with torch.no_grad():
        unit.block[0].alpha.uniform_(0.3, 3.0)
        unit.block[2].alpha.uniform_(0.3, 3.0)
    snac_fused.bake_weight_norm(unit)
    x = torch.randn(3, 48, 5000) * 2  # 5000: not a whole number of kernel blocks
    expected = torch.empty_like(x)
    with torch.no_grad():
        snac_fused.snake_depthwise_snake(x, snac_fused.ResidualUnitWeights.of(unit), expected)
        out = torch.zeros(3, 49, 5000, device="cuda")  # a strided view, as residual_unit passes it
        snac_fused.snake_depthwise_snake(
            x.cuda(), snac_fused.ResidualUnitWeights.of(unit.cuda()), out[:, :48]
        )
    assert float((out[:, :48].cpu() - expected).abs().max()) < 1e-4 * float(expected.abs().max())
    assert torch.count_nonzero(out[:, 48]) == 0  # nothing written past its rows


def test_fused_snac_on_cuda_decodes_what_the_plain_snac_does():
    import numpy as np
    import torch

    from fastmaya_cli.checkpoints import random_snac
    from fastmaya_cli.codec import SnacDecoder
    from fastmaya_cli.maya1 import Codes

    path = random_snac(Path("/tmp/fastmaya-gpu-tests"), tiny=False)
    rng = np.random.default_rng(1)
    chunks = [Codes(*(rng.integers(0, 4096, f * n) for n in (1, 2, 4))) for f in (30, 45)]
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # compare float32 with float32, not with TF32 convolutions
    try:
        expected, _ = SnacDecoder(path, "cuda", fused=False).decode(chunks, [3, 4])
        exact, _ = SnacDecoder(path, "cuda", tf32=False).decode(chunks, [3, 4])  # fused, all float32
        default, _ = SnacDecoder(path, "cuda").decode(chunks, [3, 4])  # fused, its products in TF32
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    peak = float(expected.abs().max())
    assert peak > 1e-3 and float((exact - expected).abs().max()) < 1e-4 * peak
    # TF32 keeps 10 bits of mantissa: the default is close, not equal (61 dB SNR measured in run K1).
    assert 50 < _signal_to_error_db(expected, default) < math.inf  # not equal: it did run in TF32


def test_float16_snac_on_cuda_decodes_what_float32_does():
    """The fused path in float16 (the Triton kernel reads float16 and its float32 per-channel weights), a
    candidate the bench measures: 56.8 dB from TF32 in run R2, with weights converted another way."""
    import numpy as np

    from fastmaya_cli.checkpoints import random_snac
    from fastmaya_cli.codec import SnacDecoder
    from fastmaya_cli.maya1 import Codes

    path = random_snac(Path("/tmp/fastmaya-gpu-tests"), tiny=False)
    rng = np.random.default_rng(2)
    chunks = [Codes(*(rng.integers(0, 4096, f * n) for n in (1, 2, 4))) for f in (30, 45)]
    expected, _ = SnacDecoder(path, "cuda").decode(chunks, [3, 4])
    half = SnacDecoder(path, "cuda", half=True)
    got, _ = half.decode(chunks, [3, 4])
    assert half.fused and half.half_fallbacks == 0
    assert 45 < _signal_to_error_db(expected, got) < math.inf


def test_decoding_on_cuda_gives_each_chunk_the_same_audio_however_the_calls_are_cut():
    """The renderer's decode (planned SNAC calls, the audio back through pinned memory) against one call
    per chunk copied back the plain way: the same clips, up to rounding."""
    import numpy as np

    from fastmaya_cli.checkpoints import random_snac
    from fastmaya_cli.codec import SnacDecoder
    from fastmaya_cli.maya1 import Codes
    from fastmaya_cli.render import decode_and_upsample
    from fastmaya_cli.upsample import load_upsampler

    decoder = SnacDecoder(random_snac(Path("/tmp/fastmaya-gpu-tests"), tiny=False), "cuda")
    upsampler = load_upsampler("resample", weights=None, device="cuda")
    rng = np.random.default_rng(1)
    frames = [150, 12, 140, 9, 60, 150, 30, 20, 100]
    chunks = [Codes(*(rng.integers(0, 4096, f * n) for n in (1, 2, 4))) for f in frames]
    seeds = list(range(10, 10 + len(frames)))
    computed = decoder.frames_computed
    planned, lengths = decode_and_upsample(decoder, upsampler, chunks, seeds=seeds)
    assert decoder.frames_computed - computed < 1.3 * sum(frames)  # like lengths shared their calls
    alone, alone_lengths = decode_and_upsample(
        decoder, upsampler, chunks, seeds=seeds, plan=lambda f: [[i] for i in range(len(f))], pinned=False
    )
    assert lengths == alone_lengths == [f * 2048 * 2 for f in frames]
    for clip, reference in zip(planned, alone, strict=True):
        peak = float(np.abs(reference).max())
        assert peak > 1e-3 and float(np.abs(clip - reference).max()) < 1e-3 * peak


def test_the_decoder_sleeps_rather_than_spins_while_the_gpu_works_when_asked():
    """transfers.sleeping: a decode call with the GPU busy ahead of it (as behind the engine's work) copies its
    codes and waits for SNAC and the upsampler asleep, so its thread's CPU time is a small part of its wall.
    By default (sleep=False) a blocking copy from pageable memory, or a stream sync, spins the thread for all
    of that wait.

    The work ahead is one kernel that keeps the GPU busy for about a second (torch.cuda._sleep), and the call
    is small. In the first form of this test (run AA1, BENCHMARKS.md) the work ahead was a hundred large
    products and the call a render's largest, and the sleeping call still used 0.95 of its wall; most likely
    (not measured) because a thread that launches more kernels than CUDA's launch queue holds waits in the
    launch, sleeping or not."""
    import time

    import numpy as np
    import torch

    from fastmaya_cli.checkpoints import random_snac
    from fastmaya_cli.codec import SnacDecoder
    from fastmaya_cli.maya1 import Codes
    from fastmaya_cli.render import decode_and_upsample
    from fastmaya_cli.speechsr import SpeechSR48k, SpeechSRCheckpoint
    from fastmaya_cli.upsample import speechsr_upsampler

    decoder = SnacDecoder(random_snac(Path("/tmp/fastmaya-gpu-tests"), tiny=False), "cuda")
    generator = SpeechSR48k(SpeechSRCheckpoint())  # random weights: loud enough for the peak limiter too
    upsampler = speechsr_upsampler(generator, device=torch.device("cuda"), dtype=None, compile=True)
    rng = np.random.default_rng(5)
    chunks = [Codes(*(rng.integers(0, 4096, f * n) for n in (1, 2, 4))) for f in (40, 60)]
    seeds = [1, 2]
    expected, _ = decode_and_upsample(decoder, upsampler, chunks, seeds=seeds)  # kernels chosen
    torch.cuda.synchronize()
    shares = {}
    for sleep in (True, False):  # False: as by default, which must really spin
        torch.cuda._sleep(2_000_000_000)  # about a second of GPU clock cycles ahead of the call
        wall, cpu = time.perf_counter(), time.thread_time()
        clips, lengths = decode_and_upsample(decoder, upsampler, chunks, seeds=seeds, sleep=sleep)
        wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
        assert lengths == [c.frames * 2048 * 2 for c in chunks]
        assert all(_signal_to_error_db(b, a) > 100 for a, b in zip(clips, expected, strict=True))
        assert wall > 0.5, wall
        shares[sleep] = cpu / wall
    assert shares[True] < 0.3 and shares[False] > 0.7, shares


def test_a_green_context_stream_keeps_to_its_sms_and_computes_what_the_default_stream_does():
    import torch

    from fastmaya_cli.green import green_stream

    made = green_stream(16, priority=0)
    assert 16 <= made.sms < made.device_sms == torch.cuda.get_device_properties(0).multi_processor_count
    x = torch.randn(4096, 4096, device="cuda")
    expected = x @ x
    with torch.cuda.stream(made.stream):
        got = x @ x
    made.stream.synchronize()
    assert torch.equal(got, expected)


def _signal_to_error_db(expected, got) -> float:  # noqa: ANN001 - numpy arrays or tensors
    """How far `got` is from `expected`, as signal to error in dB (inf when equal). Where rounding differs
    (TF32, float16, or on fewer SMs, where cuBLAS picks other kernels for SNAC's TF32 products: up to 8.4e-4
    of the peak apart on 16 SMs in run AA1), a peak-relative bound is too tight; TF32 against float32 products
    is 61 dB (run K1)."""
    error = float(((got - expected) ** 2).mean())
    return math.inf if error == 0 else 10 * math.log10(float((expected**2).mean()) / error)


@contextlib.contextmanager
def _decoder_beside(warm: bool = True):  # noqa: ANN202
    """The engine worker's decoder service, on cuda:0 in this process, and the renderer's side of it."""
    import multiprocessing

    from fastmaya_cli import beside
    from fastmaya_cli.checkpoints import random_snac

    snac = str(random_snac(Path("/tmp/fastmaya-gpu-tests"), tiny=False))
    ours, theirs = multiprocessing.Pipe()
    beside.DecoderService(beside.DecoderSpec(snac, "resample", None, 16, 2048, warm=warm), "cuda:0", theirs)
    try:
        yield beside.RemoteDecoder(ours, "cuda:0")
    finally:
        ours.close()


def test_the_decoder_beside_the_engine_decodes_the_same_audio_on_a_few_sms_as_on_all():
    """What the bench's novel-beside-smsN asks of the engine's worker, in this process: the same decoder on
    a green context of 16 SMs, then on all of them again (each move hands the cached memory back)."""
    import numpy as np

    from fastmaya_cli.maya1 import Codes

    rng = np.random.default_rng(4)
    frames = [150, 40, 90]
    chunks = [Codes(*(rng.integers(0, 4096, f * n) for n in (1, 2, 4))) for f in frames]
    with _decoder_beside() as remote:
        everywhere = remote.decode(chunks, [1, 2, 3])
        on_16 = remote.decode(chunks, [1, 2, 3], sms=16)
        again = remote.decode(chunks, [1, 2, 3])
    for a, b, c in zip(everywhere, on_16, again, strict=True):
        assert float(np.abs(a).max()) > 1e-3 and len(a) == len(b) == len(c)
        assert _signal_to_error_db(a, b) > 50 and _signal_to_error_db(a, c) > 50


def test_the_decoder_beside_the_engine_decodes_render_sized_calls_on_32_sms():
    """The bench's novel-beside-sms32 at a render's largest calls (warm_up_batches: 16 chunks that fill SNAC's
    fullest call, and 16 of the longest). In run Z6 such a render failed in cuBLAS on 32 SMs; cuBLAS is now
    told how many SMs it has (green.limit_blas_to_sms)."""
    import numpy as np

    from fastmaya_cli.render import warm_up_batches

    with _decoder_beside(warm=False) as remote:
        for chunks in warm_up_batches(16, 2048):
            seeds = list(range(len(chunks)))
            everywhere = remote.decode(chunks, seeds)
            on_32 = remote.decode(chunks, seeds, sms=32)
            assert len(everywhere) == len(on_32) == 16
            for a, b in zip(everywhere, on_32, strict=True):
                assert float(np.abs(a).max()) > 1e-3 and len(a) == len(b) and _signal_to_error_db(a, b) > 50
