"""The decoder's copies between the host and the GPU and its waits for the GPU, and a way to make them sleep
rather than spin a CPU core.

While a thread waits for the GPU, CUDA spins it on its core unless told otherwise: with fewer CUDA contexts in
a process than CPUs, its default (cudaDeviceScheduleAuto) spins, and so does a blocking copy to or from
ordinary (pageable) memory, which waits for all the stream's work first. The decoder waits for SNAC and the
upsampler several times a call, and while the engine generates, their kernels wait behind the engine's, so its
thread spins for much of each call. In run X2 (BENCHMARKS.md) the engine's process, where it decoded, used
303 CPU s against 189 and 204 LLM only, on a host whose pace the engine's scheduler thread set; how much of
that was spinning was not measured (RenderResult.decoder_cpu_s now tells).

Within `sleeping()`, small host values go to the GPU through page-locked memory without waiting, and the
decoder waits on an event made with blocking sync, which puts its thread to sleep until the GPU is done.
Outside it the copies and waits are as they always were (blocking copies, stream syncs). Sleeping is a
candidate, off by default (RenderOptions.decode_sleeps; the bench's novel-sleep, novel-beside-sleep and
novel-beside-sms32-sleep): beside the engine on 32 SMs it cut the decoding thread's CPU time for the novel
from 157.7 to 45.3 s (BENCHMARKS.md run AA1), and whether it changes the render's pace is not yet known.
The engine's own waits are untouched either way: they set its pace, and a sleeping thread wakes later than a
spinning one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from contextvars import ContextVar

import numpy as np
import torch

_sleeping: ContextVar[bool] = ContextVar("fastmaya_decoder_sleeps", default=False)


@contextlib.contextmanager
def sleeping() -> Iterator[None]:
    """On this thread, until the block ends, copy to the GPU without waiting and wait for it asleep."""
    token = _sleeping.set(True)
    try:
        yield
    finally:
        _sleeping.reset(token)


def sleeps() -> bool:
    """Whether this thread is within `sleeping()`."""
    return _sleeping.get()


def to_device(
    values: Sequence[int] | np.ndarray, device: torch.device, dtype: torch.dtype = torch.int64
) -> torch.Tensor:
    """`values` as a tensor on `device`. Within `sleeping()`, to a GPU through page-locked memory, so that the
    copy waits for nothing queued before it (PyTorch keeps the page-locked block until the copy is done)."""
    host = torch.as_tensor(values, dtype=dtype)
    if device.type != "cuda" or not sleeps():
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def wait_for_gpu(device: torch.device) -> None:
    """Wait until the work queued so far on `device`'s current stream is done: asleep within `sleeping()`,
    else as a stream sync does (no-op off the GPU)."""
    if device.type != "cuda":
        return
    stream = torch.cuda.current_stream(device)
    if sleeps():
        done = torch.cuda.Event(blocking=True)
        done.record(stream)
        done.synchronize()
    else:
        stream.synchronize()


def to_host(tensor: torch.Tensor) -> np.ndarray:
    """`tensor` in host memory as a numpy array. From a GPU, through page-locked memory (a copy to pageable
    memory ran at about 1 GB/s on an H100 host and took a quarter of the decoder's time), waiting as
    `wait_for_gpu`."""
    if tensor.device.type != "cuda":
        return tensor.numpy()
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)  # torch caches these blocks
    host.copy_(tensor, non_blocking=True)
    wait_for_gpu(tensor.device)
    return host.numpy()


def is_true(flag: torch.Tensor) -> bool:
    """A one-element tensor's truth; within `sleeping()`, read back from the GPU asleep."""
    return bool(to_host(flag.reshape(1))[0]) if sleeps() else bool(flag)
