"""GPU tests: run on a machine with CUDA (and LMDeploy for the engine tests); skipped elsewhere."""

import importlib.util
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def pytest_collection_modifyitems(config, items):
    # This hook sees every collected test, not only this folder's.
    items = [item for item in items if HERE in Path(str(item.path)).parents]
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    has_lmdeploy = importlib.util.find_spec("lmdeploy") is not None
    for item in items:
        item.add_marker(pytest.mark.gpu)
        if not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU; CI has none (run on the GPU machine)"))
        elif "lmdeploy" in item.keywords and not has_lmdeploy:
            item.add_marker(pytest.mark.skip(reason="needs lmdeploy (pip install .[lmdeploy])"))


@pytest.fixture(scope="session")
def small_model():
    from fastmaya_cli.checkpoints import random_maya1

    return random_maya1(Path("/tmp/fastmaya-gpu-tests"), size="small")
