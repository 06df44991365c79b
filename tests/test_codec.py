import json
import math

import numpy as np
import pytest
import torch

from fastmaya_cli import snac_fused
from fastmaya_cli.codec import (
    SnacDecoder,
    bucketed_rows,
    chunk_noise,
    load_snac,
    padded_shape,
    plan_calls,
    tf32_matmuls,
)
from fastmaya_cli.errors import RuntimeFailure
from fastmaya_cli.maya1 import Codes


def _codes(frames, seed):
    rng = np.random.default_rng(seed)
    return Codes(*(rng.integers(0, 4096, size=frames * n) for n in (1, 2, 4)))


def test_batched_decode_trims_each_chunk_to_its_frames(tiny_snac):
    decoder = SnacDecoder(tiny_snac, "cpu")
    batch = [_codes(3, 0), _codes(8, 1), _codes(5, 2)]
    audio, lengths = decoder.decode(batch, [4, 5, 6])
    assert lengths == [3 * 2048, 8 * 2048, 5 * 2048]
    assert audio.shape == (3, 8 * 2048)
    assert torch.count_nonzero(audio[0, 3 * 2048 :]) == 0
    assert torch.count_nonzero(audio[0, : 3 * 2048]) > 0


def test_decode_is_repeatable_for_a_seed(tiny_snac):
    decoder = SnacDecoder(tiny_snac, "cpu")
    batch = [_codes(4, 0), _codes(6, 1)]
    a, _ = decoder.decode(batch, [1, 2])
    torch.randn(100)  # other users of the global generator must not matter
    b, _ = decoder.decode(batch, [1, 2])
    c, _ = decoder.decode(batch, [3, 2])
    assert torch.equal(a, b)
    assert not torch.allclose(a[0], c[0])  # the first chunk's own seed changed its noise
    assert torch.equal(a[1], c[1])  # the second chunk's did not change


def test_a_chunk_decodes_the_same_alone_or_beside_longer_chunks(tiny_snac):
    """Chunks are decoded in whatever batches they finish in: a chunk's audio must not depend on them
    (the noise of its batch-mates, or whether a longer chunk follows it in the padded batch)."""
    decoder = SnacDecoder(tiny_snac, "cpu")
    short, long_ = _codes(5, 0), _codes(9, 1)
    alone, _ = decoder.decode([short], [11])
    beside, _ = decoder.decode([long_, _codes(7, 2), short], [12, 13, 11])
    assert torch.allclose(alone[0], beside[2, : 5 * 2048], atol=1e-5)
    assert float(alone.abs().max()) > 1e-3  # real audio, not silence


def test_bucketed_rows_round_up_to_few_sizes():
    assert [bucketed_rows(n) for n in (1, 2, 3, 5, 8, 9, 16, 17, 64)] == [1, 2, 4, 8, 8, 16, 16, 24, 64]


def test_bucketed_batches_decode_what_exact_ones_do(tiny_snac, monkeypatch):
    """On CUDA a batch is rounded up to a few shapes (extra silent rows, a wider padding): same audio."""
    shapes: dict[bool, tuple[int, ...]] = {}
    decoders = {flag: SnacDecoder(tiny_snac, "cpu", bucketed=flag) for flag in (False, True)}
    for flag, decoder in decoders.items():
        real = decoder.model.decoder.forward

        def spy(latent, flag=flag, real=real):
            shapes[flag] = tuple(latent.shape)
            return real(latent)

        monkeypatch.setattr(decoder.model.decoder, "forward", spy)
    batch, seeds = [_codes(5, 0), _codes(9, 1), _codes(7, 2)], [4, 5, 6]
    want, want_lengths = decoders[False].decode(batch, seeds)
    got, lengths = decoders[True].decode(batch, seeds)
    assert shapes[False][0] == 3 and shapes[True][0] == 4  # 3 chunks decoded as 4 rows
    assert shapes[True][-1] * 13 == shapes[False][-1] * 16  # 9 + 4 frames of right context, up to 16
    assert lengths == want_lengths and got.shape == want.shape == (3, 9 * 2048)
    assert float(want.abs().max()) > 1e-3
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_baking_weight_norm_keeps_every_weight(tiny_snac):
    model = load_snac(tiny_snac, torch.device("cpu"))
    before = {name: p.detach().clone() for name, p in model.named_parameters() if "original" not in name}
    with torch.no_grad():
        computed = {
            name: m.weight.clone() for name, m in model.named_modules() if hasattr(m, "parametrizations")
        }
    snac_fused.bake_weight_norm(model)
    assert computed and not any(hasattr(m, "parametrizations") for m in model.modules())
    for name, weight in computed.items():
        assert torch.equal(model.get_submodule(name).weight, weight), name
    for name, value in before.items():
        assert torch.equal(model.get_parameter(name), value), name


def _random_snac_unit(dilation, channels=24, seed=0):
    from snac.layers import ResidualUnit

    torch.manual_seed(seed)
    unit = ResidualUnit(channels, dilation=dilation, groups=channels)
    with torch.no_grad():
        for module in unit.block:
            if hasattr(module, "alpha"):
                module.alpha.uniform_(0.3, 3.0)  # trained alphas are not all 1
    snac_fused.bake_weight_norm(unit)
    return unit


@pytest.mark.parametrize("dilation", [1, 3, 9])
def test_fused_residual_unit_computes_what_snac_computes(dilation):
    unit = _random_snac_unit(dilation)
    x = torch.randn(3, 24, 500) * 2
    with torch.no_grad():
        expected = unit(x)
        got = snac_fused.residual_unit(snac_fused.ResidualUnitWeights.of(unit), x.clone())
    assert got.shape == expected.shape
    assert float((got - expected).abs().max()) < 1e-5 * float(expected.abs().max())


def test_fused_noise_block_computes_what_snac_computes():
    from snac.layers import NoiseBlock

    torch.manual_seed(0)
    block = NoiseBlock(16)
    snac_fused.bake_weight_norm(block)
    x, noise = torch.randn(2, 16, 300), torch.randn(2, 1, 300)
    with torch.no_grad():
        expected = x + noise * block.linear(x)
        got = snac_fused.noise_block(x.clone(), noise, block.linear.weight[:, :, 0])
    assert float((got - expected).abs().max()) < 1e-5 * float(expected.abs().max())


def test_fused_decoder_decodes_what_the_plain_one_does(tiny_snac):
    plain, fused = SnacDecoder(tiny_snac, "cpu", fused=False), SnacDecoder(tiny_snac, "cpu", fused=True)
    assert sum(hasattr(m, "fused_weights") for m in fused.model.modules()) == 12  # 4 blocks x 3 units
    batch = [_codes(5, 0), _codes(9, 1)]
    expected, expected_lengths = plain.decode(batch, [1, 2])
    got, lengths = fused.decode(batch, [1, 2])
    assert lengths == expected_lengths
    peak = float(expected.abs().max())
    assert peak > 1e-3 and float((got - expected).abs().max()) < 1e-4 * peak


def test_chunk_noise_is_splitmix64_then_box_muller():
    seeds = torch.tensor([0, 7, (1 << 63) - 1])
    noise = chunk_noise(seeds, 4000, layer=2)
    assert noise.shape == (3, 1, 4000)
    mask = (1 << 64) - 1

    def mix(x):
        x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & mask
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB & mask
        return x ^ (x >> 31)

    for row, seed in enumerate(seeds.tolist()):
        stream = mix((seed * 0x9E3779B97F4A7C15 + 3 * 0xBF58476D1CE4E5B9) & mask)
        for position in (1, 2, 3999):
            bits = mix((stream + (position + 1) * 0x9E3779B97F4A7C15) & mask)
            uniform = ((bits >> 40) + 0.5) / 2**24
            angle = ((bits >> 16) & 0xFFFFFF) / 2**24 * 2 * math.pi
            expected = math.sqrt(-2 * math.log(uniform)) * math.cos(angle)
            assert float(noise[row, 0, position]) == pytest.approx(expected, abs=1e-4)
    assert abs(float(noise.mean())) < 0.05 and float(noise.std()) == pytest.approx(1.0, abs=0.05)
    assert not torch.equal(noise, chunk_noise(seeds, 4000, layer=3))


def test_wrong_codec_layout_is_refused(tmp_path, tiny_snac):
    config = json.loads((tiny_snac / "config.json").read_text())
    config["sampling_rate"] = 44100
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "pytorch_model.bin").write_bytes((tiny_snac / "pytorch_model.bin").read_bytes())
    with pytest.raises(RuntimeFailure, match="not SNAC 24 kHz"):
        SnacDecoder(tmp_path, "cpu")


def test_missing_codec_names_the_fix(tmp_path):
    with pytest.raises(RuntimeFailure) as error:
        SnacDecoder(tmp_path / "absent", "cpu")
    assert "absent" in error.value.problem and "--codec" in error.value.fix


def test_codec_benchmark_reports_audio_seconds_per_second(tiny_snac):
    from fastmaya_cli.codec import benchmark_codec

    result = benchmark_codec(tiny_snac, "cpu", fused=True, batch=2, seconds=0.5, iterations=1)
    assert result["device"] == "cpu" and result["fused"] is True and result["batch"] == 2
    # 0.5 s is 5.86 frames: rounded to 6 frames of 2048 samples
    assert result["seconds"] == pytest.approx(6 * 2048 / 24000, abs=1e-3)
    assert result["audio_s_per_s"] == pytest.approx(2 * 6 * 2048 / 24000 / result["call_s"], rel=0.02)


def test_a_decoder_not_laid_out_as_snac_falls_back_to_its_own_modules(tiny_snac, monkeypatch):
    def refuse(unit):
        raise ValueError("not a SNAC residual unit")

    monkeypatch.setattr(snac_fused.ResidualUnitWeights, "of", staticmethod(refuse))
    with pytest.raises(ValueError):
        SnacDecoder(tiny_snac, "cpu", fused=True)  # asked for explicitly: the error shows
    monkeypatch.setattr("fastmaya_cli.codec.fused_by_default", lambda device: True)  # as on CUDA
    decoder = SnacDecoder(tiny_snac, "cpu")  # the default: falls back to SNAC's own modules
    assert decoder.fused is False
    assert not any(hasattr(m, "fused_weights") for m in decoder.model.modules())


def _partitions(items):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for partition in _partitions(rest):
        for i in range(len(partition)):
            yield partition[:i] + [[first, *partition[i]]] + partition[i + 1 :]
        yield [[first], *partition]


def _work(frames, calls, budget, bucketed, call_frames):
    """Padded frames of every call plus the cost of the calls; inf where a call breaks the budget."""
    total = 0
    for call in calls:
        rows, width = padded_shape(len(call), max(frames[i] for i in call), bucketed=bucketed)
        if rows * width > budget and len(call) > 1:
            return math.inf
        total += rows * width + call_frames
    return total


def test_planned_calls_decode_every_chunk_once_with_the_least_work():
    rng = np.random.default_rng(3)
    for _ in range(60):
        frames = [int(f) for f in rng.integers(1, 220, size=rng.integers(1, 7))]
        budget = int(rng.choice([300, 800, 2048]))
        bucketed, call_frames = bool(rng.integers(2)), int(rng.choice([0, 32]))
        calls = plan_calls(frames, budget, bucketed=bucketed, call_frames=call_frames)
        assert sorted(i for call in calls for i in call) == list(range(len(frames)))
        best = min(
            _work(frames, p, budget, bucketed, call_frames) for p in _partitions(list(range(len(frames))))
        )
        assert _work(frames, calls, budget, bucketed, call_frames) == best
    assert plan_calls([], 2048, bucketed=True) == []
    assert plan_calls([5000], 2048, bucketed=True) == [[0]]  # one chunk over the budget still gets a call


def test_planned_calls_fill_their_row_buckets_and_group_like_lengths():
    # Nine equal chunks: 8 rows and 1 row, not 9 rows rounded up to 16.
    calls = plan_calls([100] * 9, 4096, bucketed=True, call_frames=32)
    assert sorted(len(call) for call in calls) == [1, 8]
    # Long and short chunks in turn are not padded to the long ones' width.
    frames = [200, 20] * 4
    calls = plan_calls(frames, 4096, bucketed=True, call_frames=32)
    assert sorted(sorted(frames[i] for i in call) for call in calls) == [[20] * 4, [200] * 4]


def test_decoder_counts_the_frames_its_padding_adds(tiny_snac):
    decoder = SnacDecoder(tiny_snac, "cpu", bucketed=True)
    decoder.decode([_codes(5, 0), _codes(9, 1), _codes(7, 2)], [0, 1, 2])
    assert decoder.frames_decoded == 21
    assert decoder.frames_computed == 4 * 16  # 4 rows (3 rounded up) of 9 + 4 frames rounded up to 16


def _matmul_precision() -> str:
    matmul = torch.backends.cuda.matmul
    return (
        matmul.fp32_precision
        if hasattr(torch.backends.cuda.matmul, "fp32_precision")
        else str(matmul.allow_tf32)
    )


def test_tf32_matmuls_switches_products_to_tf32_and_back():
    before = _matmul_precision()
    with tf32_matmuls(True):
        assert _matmul_precision() in ("tf32", "True")  # the switch of torch >= 2.9, or the older one
    assert _matmul_precision() == before
    with pytest.raises(RuntimeError), tf32_matmuls(True):
        raise RuntimeError("a failed decode")
    assert _matmul_precision() == before  # put back even when the decode fails
    with tf32_matmuls(False):
        assert _matmul_precision() == before


@pytest.mark.parametrize("tf32", [True, False])
def test_decoder_runs_snac_in_tf32_only_when_asked(tiny_snac, tf32):
    decoder = SnacDecoder(tiny_snac, "cpu", tf32=tf32)
    assert SnacDecoder(tiny_snac, "cpu").tf32 is False  # on by default on CUDA only
    seen: list[str] = []
    decoder.model.decoder.register_forward_pre_hook(lambda *_: seen.append(_matmul_precision()))
    decoder.decode([_codes(3, 0)], [1])
    on = "tf32" if hasattr(torch.backends.cuda.matmul, "fp32_precision") else "True"
    assert seen == ([on] if tf32 else [_matmul_precision()])
    assert _matmul_precision() != on


@pytest.mark.parametrize("fused", [False, True])
def test_a_float16_decoder_decodes_what_float32_does_to_60_db(tiny_snac, fused):
    full = SnacDecoder(tiny_snac, "cpu", fused=fused)
    half = SnacDecoder(tiny_snac, "cpu", fused=fused, half=True)
    assert {p.dtype for p in half.model.parameters()} == {torch.float16}
    assert {p.dtype for p in full.model.parameters()} == {torch.float32}
    batch = [_codes(5, 0), _codes(9, 1)]
    expected, expected_lengths = full.decode(batch, [1, 2])
    got, lengths = half.decode(batch, [1, 2])
    assert got.dtype == torch.float32 and lengths == expected_lengths
    snr_db = 10 * math.log10(float((expected**2).sum()) / float(((got - expected) ** 2).sum()))
    assert 60.0 < snr_db < 120.0  # float16's rounding, not float32's result by another way
    assert half.half_fallbacks == 0


def test_a_call_float16_cannot_hold_is_decoded_again_in_float32(tiny_snac):
    full = SnacDecoder(tiny_snac, "cpu")
    half = SnacDecoder(tiny_snac, "cpu", half=True)
    batch = [_codes(4, 0), _codes(6, 1)]
    expected, _ = full.decode(batch, [1, 2])
    handle = half.model.decoder.register_forward_hook(lambda module, args, out: out * float("inf"))
    got, _ = half.decode(batch, [1, 2])
    assert half.half_fallbacks == 1
    torch.testing.assert_close(got, expected, rtol=0, atol=0)  # the float32 twin: the same weights and noise
    handle.remove()
    half.decode(batch, [1, 2])
    assert half.half_fallbacks == 1
