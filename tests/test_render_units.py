import numpy as np
import pytest
import torch

from fastmaya_cli import maya1
from fastmaya_cli.render import decode_and_upsample, decode_group_size, pack_seconds, sub_batches


def test_sub_batches_bound_padded_size_and_keep_order():
    frames = [100, 200, 50, 900, 900, 10]
    parts = sub_batches(frames, budget=1000)
    assert [i for part in parts for i in part] == list(range(len(frames)))
    for part in parts:
        assert len(part) == 1 or max(frames[i] for i in part) * len(part) <= 1000
    assert sub_batches([]) == []
    assert len(sub_batches([10] * 10)) == 1


def test_decode_groups_are_small_for_a_short_text_and_full_for_a_book():
    assert decode_group_size(144, 16) == 5  # the travel text: about 32 groups, decoded while others generate
    assert decode_group_size(2500, 16) == 16
    assert decode_group_size(3, 16) == 1
    assert decode_group_size(0, 16) == 1


def test_pack_seconds_cuts_short_books_finer():
    assert pack_seconds(50_000, 256, 18.0) == 18.0
    assert pack_seconds(380, 256, 18.0) == pytest.approx(380 / 256)


class _Decoder:
    """Runs out of memory on any batch of more than `limit` chunks."""

    def __init__(self, limit):
        self.limit, self.calls = limit, []

    def decode(self, codes, seed):
        self.calls.append(len(codes))
        if len(codes) > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        lengths = [c.frames * 2048 for c in codes]
        audio = torch.zeros(len(codes), max(lengths))
        for row, c in enumerate(codes):
            audio[row, : lengths[row]] = float(c.c0[0])
        return audio, lengths


def _identity(audio, lengths):
    return audio, lengths


def test_out_of_memory_splits_the_batch_and_keeps_every_chunk():
    codes = [maya1.Codes(np.full(f, i), np.zeros(2 * f, int), np.zeros(4 * f, int)) for i, f in enumerate([3, 5, 2, 4])]
    decoder = _Decoder(limit=1)
    clips, lengths = decode_and_upsample(decoder, _identity, codes, seed=0)
    assert lengths == [3 * 2048, 5 * 2048, 2 * 2048, 4 * 2048]
    assert [float(c[0]) for c in clips] == [0.0, 1.0, 2.0, 3.0]
    assert sorted(decoder.calls) == [1, 1, 1, 1, 2, 2, 4]  # halved until each part fits
    with pytest.raises(torch.OutOfMemoryError):
        decode_and_upsample(_Decoder(limit=0), _identity, codes[:1], seed=0)
