import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastmaya_cli import maya1
from fastmaya_cli.errors import InputError


def test_prompt_ids_are_maya1s_exact_layout(tiny_model):
    encode = maya1.load_encoder(tiny_model)
    ids = maya1.prompt_ids(encode, "Female narrator, warm", "Hello there. <laugh>")
    body = encode('<description="Female narrator, warm"> Hello there. <laugh>')
    assert list(ids) == [128259, 128000, *body, 128009, 128260, 128261, 128257]
    assert ids.count(128000) == 1  # no second BOS from the tokenizer


def test_tokenizer_matches_llama3_vocabulary(tiny_model):
    quicktok = pytest.importorskip("quicktok")
    encode = maya1.load_encoder(tiny_model)
    reference = quicktok.get_encoding("llama3")
    for text in [
        "It's 1813, Mr. Bennet said—“quoted”.",
        "  tabs\tand\n\nnewlines ",
        "你好, مرحبا, Ünïcödé 😀 <sigh>",
    ]:
        assert encode(text) == reference.encode(text)


def test_voice_description_is_escaped():
    text = maya1.prompt_text('A "quoted"\nvoice <b>', "Hi.")
    assert text == "<description=\"A 'quoted' voice b\"> Hi."
    with pytest.raises(InputError):
        maya1.clean_voice(" \n ")
    with pytest.raises(InputError, match="limit"):
        maya1.clean_voice("x" * (maya1.MAX_VOICE_CHARS + 1))


@settings(max_examples=50, deadline=None)
@given(st.integers(min_value=0, max_value=40), st.integers(min_value=0, max_value=2**32 - 1))
def test_unpack_inverts_pack(frames, seed):
    rng = np.random.default_rng(seed)
    c0, c1, c2 = (rng.integers(0, 4096, size=frames * n) for n in (1, 2, 4))
    ids = maya1.pack(c0, c1, c2)
    assert all(maya1.AUDIO_FIRST_ID <= i <= maya1.AUDIO_LAST_ID for i in ids)
    codes = maya1.unpack([*ids, maya1.END_OF_SPEECH, 128266, 128266])  # ids after the stop are ignored
    assert codes.frames == frames and codes.bad_ids == 0
    np.testing.assert_array_equal(codes.c0, c0)
    np.testing.assert_array_equal(codes.c1, c1)
    np.testing.assert_array_equal(codes.c2, c2)


def test_unpack_slot_layout_and_partial_frame():
    frame = [maya1.AUDIO_FIRST_ID + k * 4096 + 10 * (k + 1) for k in range(7)]
    codes = maya1.unpack([*frame, *frame[:5], 5])
    assert codes.frames == 1 and codes.dropped_tokens == 5 and codes.bad_ids == 1
    assert codes.c0.tolist() == [10]
    assert codes.c1.tolist() == [20, 50]
    assert codes.c2.tolist() == [30, 40, 60, 70]


def test_chunk_seed_depends_on_book_seed_text_and_attempt():
    base = maya1.chunk_seed(0, "Hello.")
    assert base == maya1.chunk_seed(0, "Hello.")
    assert (
        len(
            {
                base,
                maya1.chunk_seed(1, "Hello."),
                maya1.chunk_seed(0, "Hello!"),
                maya1.chunk_seed(0, "Hello.", 1),
            }
        )
        == 4
    )
    assert 0 <= base < 2**31


def test_token_budget():
    assert maya1.token_budget(0.1, fixed_length=True) == (28, 28)
    low, high = maya1.token_budget(10.0, fixed_length=True)
    assert low == high and high % 7 == 0 and high >= 820
    assert maya1.token_budget(30.0, fixed_length=True)[1] <= 2048
    low, high = maya1.token_budget(4.0, fixed_length=False)
    assert low == 28 and high == maya1.expected_tokens(3 * 4.0 + 2.0) + 7
    assert maya1.token_budget(20.0, fixed_length=False)[1] == 2048


def _codes(frames, rng, period=None):
    c = [rng.integers(0, 4096, size=frames * n) for n in (1, 2, 4)]
    if period:
        c = [
            np.tile(x[: period * n], frames // period + 1)[: frames * n]
            for x, n in zip(c, (1, 2, 4), strict=True)
        ]
    return maya1.unpack(maya1.pack(*c))


def test_failure_detection_rules():
    rng = np.random.default_rng(0)
    ok = _codes(47, rng)  # 4.0 s
    assert maya1.check_generation(ok, "stop", 4.0, fixed_length=False) is None
    assert "token limit" in maya1.check_generation(ok, "length", 4.0, fixed_length=False)
    assert maya1.check_generation(ok, "length", 4.0, fixed_length=True) is None
    long = _codes(int((3 * 1.0 + 2.0) / 0.0853) + 2, rng)
    assert "expected" in maya1.check_generation(long, "stop", 1.0, fixed_length=False)
    short = _codes(2, rng)
    assert "early" in maya1.check_generation(short, "stop", 4.0, fixed_length=False)
    assert maya1.check_generation(short, "stop", 0.5, fixed_length=False) is None
    looped = _codes(60, rng, period=3)
    assert "repeating" in maya1.check_generation(looped, "stop", 5.0, fixed_length=True)
    brief_repeat = _codes(60, rng)
    assert maya1.longest_loop(brief_repeat) < maya1.LOOP_FRAMES
    assert "no complete" in maya1.check_generation(
        maya1.unpack([maya1.END_OF_SPEECH]), "stop", 1.0, fixed_length=False
    )
    assert "non-audio" in maya1.check_generation(
        maya1.unpack([*maya1.pack(*[np.zeros(n, int) for n in (1, 2, 4)]), 42]),
        "stop",
        0.1,
        fixed_length=False,
    )
    assert maya1.check_generation(ok, "error", 4.0, fixed_length=False, error="boom") == "engine error: boom"
