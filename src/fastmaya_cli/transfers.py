"""The decoder's copies between the host and the GPU, and its waits for the GPU, without spinning a CPU core.

While a thread waits for the GPU, CUDA spins it on its core unless told otherwise: with fewer CUDA contexts in
a process than CPUs, its default (cudaDeviceScheduleAuto) spins, and so does a blocking copy to or from
ordinary (pageable) memory, which waits for all the stream's work first. The decoder waits for SNAC and the
upsampler several times a call, and while the engine generates, their kernels wait behind the engine's, so its
thread spins for much of each call. In run X2 (BENCHMARKS.md) the engine's process, where it decoded, used
303 CPU s against 189 and 204 LLM only, on a host whose pace the engine's scheduler thread set; how much of
that was spinning was not measured (RenderResult.decoder_cpu_s now tells).

Here small host values go to the GPU through page-locked memory without waiting, and the decoder waits on an
event made with blocking sync, which puts its thread to sleep until the GPU is done. The engine's own waits
are untouched: they set its pace, and a sleeping thread wakes later than a spinning one. Within `spinning()`
the copies and waits spin as before, for the bench's A/B (RenderOptions.decode_spins, novel-beside-spin).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from contextvars import ContextVar

import numpy as np
import torch

_spinning: ContextVar[bool] = ContextVar("fastmaya_decoder_spins", default=False)


@contextlib.contextmanager
def spinning() -> Iterator[None]:
    """On this thread, until the block ends, copy and wait as before this module: blocking copies from
    pageable memory and stream syncs, which spin (the bench's baseline)."""
    token = _spinning.set(True)
    try:
        yield
    finally:
        _spinning.reset(token)


def spins() -> bool:
    """Whether this thread is within `spinning()`."""
    return _spinning.get()


def to_device(
    values: Sequence[int] | np.ndarray, device: torch.device, dtype: torch.dtype = torch.int64
) -> torch.Tensor:
    """`values` as a tensor on `device`. To a GPU through page-locked memory, so that the copy waits for
    nothing queued before it (PyTorch keeps the page-locked block until the copy is done)."""
    host = torch.as_tensor(values, dtype=dtype)
    if device.type != "cuda" or spins():
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def wait_for_gpu(device: torch.device) -> None:
    """Sleep until the work queued so far on `device`'s current stream is done (no-op off the GPU)."""
    if device.type == "cuda" and spins():
        torch.cuda.current_stream(device).synchronize()
    elif device.type == "cuda":
        done = torch.cuda.Event(blocking=True)
        done.record(torch.cuda.current_stream(device))
        done.synchronize()


def to_host(tensor: torch.Tensor) -> np.ndarray:
    """`tensor` in host memory as a numpy array. From a GPU, through page-locked memory (a copy to pageable
    memory ran at about 1 GB/s on an H100 host and took a quarter of the decoder's time), waiting asleep."""
    if tensor.device.type != "cuda":
        return tensor.numpy()
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)  # torch caches these blocks
    host.copy_(tensor, non_blocking=True)
    wait_for_gpu(tensor.device)
    return host.numpy()


def is_true(flag: torch.Tensor) -> bool:
    """A one-element tensor's truth, read back from the GPU asleep rather than spinning."""
    return bool(flag) if spins() else bool(to_host(flag.reshape(1))[0])
