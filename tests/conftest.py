"""Shared fixtures: tiny Maya1-layout checkpoints built at test time, and the real data folder."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


def _cache_root() -> Path:
    # Outside the repo, reused between runs: building the tokenizer takes a few seconds.
    return Path(os.environ.get("FASTMAYA_TEST_CACHE", Path.home() / ".cache" / "fastmaya-tests"))


@pytest.fixture(scope="session", autouse=True)
def offline_hub() -> None:
    """No test may touch the network: the hub client is told it is offline."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


@pytest.fixture(scope="session", autouse=True)
def ctrl_c_is_heard() -> None:
    """A shell starts a background job (`make test &`, nohup, some CI runners) with SIGINT ignored, and
    Python then never raises KeyboardInterrupt; the interrupt tests need it heard here and in the renders
    they start (a Python handler is reset to the default across exec)."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    from fastmaya_cli.checkpoints import random_maya1

    return random_maya1(_cache_root(), size="tiny")


@pytest.fixture(scope="session")
def tiny_snac() -> Path:
    from fastmaya_cli.checkpoints import random_snac

    return random_snac(_cache_root(), tiny=True)


@pytest.fixture
def tiny_cli_args(tiny_model: Path, tiny_snac: Path) -> list[str]:
    """The command line's options for the tiny checkpoints, upsampled by plain resampling."""
    return ["--model", str(tiny_model), "--codec", str(tiny_snac), "--upsampler", "resample"]


@pytest.fixture
def scripted_options(tiny_model: Path, tiny_snac: Path):  # noqa: ANN201 - a RenderOptions factory
    """RenderOptions(**changes) for the scripted engine with the tiny checkpoints, fixed-length chunks."""
    from fastmaya_cli import render

    def make(**changes: object) -> render.RenderOptions:
        return render.RenderOptions(
            voice="Calm narrator",
            engine=render.EngineOptions(kind="scripted", model=str(tiny_model)),
            codec=str(tiny_snac),
            upsampler="resample",
            fixed_length=True,
            max_new_tokens=70,
            **changes,
        )

    return make


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"real data folder {DATA} is absent (it sits beside the repo as ../shared/data)")
    return DATA
