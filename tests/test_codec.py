import json

import numpy as np
import pytest
import torch

from fastmaya_cli.codec import SnacDecoder
from fastmaya_cli.errors import RuntimeFailure
from fastmaya_cli.maya1 import Codes


def _codes(frames, seed):
    rng = np.random.default_rng(seed)
    return Codes(*(rng.integers(0, 4096, size=frames * n) for n in (1, 2, 4)))


def test_batched_decode_trims_each_chunk_to_its_frames(tiny_snac):
    decoder = SnacDecoder(tiny_snac, "cpu")
    batch = [_codes(3, 0), _codes(8, 1), _codes(5, 2)]
    audio, lengths = decoder.decode(batch, seed=4)
    assert lengths == [3 * 2048, 8 * 2048, 5 * 2048]
    assert audio.shape == (3, 8 * 2048)
    assert torch.count_nonzero(audio[0, 3 * 2048 :]) == 0
    assert torch.count_nonzero(audio[0, : 3 * 2048]) > 0


def test_decode_is_repeatable_for_a_seed(tiny_snac):
    decoder = SnacDecoder(tiny_snac, "cpu")
    batch = [_codes(4, 0), _codes(6, 1)]
    a, _ = decoder.decode(batch, seed=1)
    torch.randn(100)  # other users of the global generator must not matter
    b, _ = decoder.decode(batch, seed=1)
    c, _ = decoder.decode(batch, seed=2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


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
