"""transfers.py off the GPU: the same values as plain torch (the GPU side is in tests/gpu)."""

from __future__ import annotations

import threading

import numpy as np
import torch

from fastmaya_cli.transfers import is_true, sleeping, sleeps, to_device, to_host, wait_for_gpu


def test_values_reach_the_device_with_their_dtype():
    cpu = torch.device("cpu")
    from_list = to_device([3, 1 << 62, 0], cpu)  # seeds are 63-bit
    assert from_list.dtype == torch.int64 and from_list.tolist() == [3, 1 << 62, 0]
    from_array = to_device(np.array([[1, 2], [3, 4]], dtype=np.int32), cpu)
    assert from_array.dtype == torch.int64 and from_array.tolist() == [[1, 2], [3, 4]]
    assert to_device([1.5, 2.0], cpu, torch.float32).tolist() == [1.5, 2.0]


def test_host_copies_and_flags_read_back_what_the_tensor_holds():
    audio = torch.linspace(-1, 1, 7)
    np.testing.assert_array_equal(to_host(audio), audio.numpy())
    wait_for_gpu(torch.device("cpu"))  # nothing to wait for
    assert is_true((audio > 0.9).any()) and not is_true((audio > 1).any())
    assert is_true(torch.tensor(True)) and not is_true(torch.tensor([False]))


def test_sleeping_holds_for_this_thread_and_this_block_only():
    seen_elsewhere = []
    assert not sleeps()
    with sleeping():
        assert sleeps()
        other = threading.Thread(target=lambda: seen_elsewhere.append(sleeps()))
        other.start()
        other.join()
        assert to_device([1, 2], torch.device("cpu")).tolist() == [1, 2]  # the same values either way
    assert not sleeps() and seen_elsewhere == [False]
    try:
        with sleeping():
            raise KeyError("a failing decode call")
    except KeyError:
        pass
    assert not sleeps()  # a call that fails does not leave its thread sleeping


def test_decode_and_upsample_sleeps_only_when_asked(tiny_snac, monkeypatch):
    from fastmaya_cli import render
    from fastmaya_cli.codec import SnacDecoder, random_codes
    from fastmaya_cli.upsample import PassThrough

    decoder = SnacDecoder(str(tiny_snac), "cpu")
    real = render._decode_part
    during: list[bool] = []

    def watched(*args, **kwargs):
        during.append(sleeps())
        return real(*args, **kwargs)

    monkeypatch.setattr(render, "_decode_part", watched)
    codes = [random_codes(3, np.random.default_rng(1))]
    spun, _ = render.decode_and_upsample(decoder, PassThrough(), codes, seeds=[7])
    slept, _ = render.decode_and_upsample(decoder, PassThrough(), codes, seeds=[7], sleep=True)
    assert during == [False, True] and not sleeps()
    np.testing.assert_array_equal(slept[0], spun[0])
