"""A CUDA stream whose kernels run on only some of the GPU's SMs (a CUDA green context).

Decoding beside the engine, SNAC's and the upsampler's kernels fill every SM the engine's blocks are not
on, and a decode step of the engine that starts meanwhile waits for the decoder's blocks to finish before
it has the whole GPU again. A stream of a green context holding N SMs keeps the decoder's blocks on those
N: the engine's kernels still run on every SM, and find the others free of decoder blocks
(`RenderOptions.decode_sms`, the bench's `novel-beside-smsN`; `scripts/probe_beside.py`'s `green-N`).

The driver's API is called through ctypes (libcuda), as PyTorch's own GreenContext wraps it differently in
each release and cannot set a stream's priority. Needs a CUDA 12.4 driver or newer.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

CU_DEV_RESOURCE_TYPE_SM = 1
CU_GREEN_CTX_DEFAULT_STREAM = 1
CU_STREAM_NON_BLOCKING = 1
# CUdevResource is 4 bytes of type and 92 of padding, then the SM resource (smCount first): 144 bytes in
# CUDA 12.4, a little more in 13.x. Each one gets this much room.
RESOURCE_BYTES = 1024
SM_COUNT_OFFSET = 96


class GreenContextError(RuntimeError):
    """The driver could not make the green context or its stream."""


@dataclass(frozen=True)
class GreenStream:
    """A stream of a green context; `stream` is a torch.cuda.ExternalStream on it."""

    stream: object
    sms: int  # the SMs the driver gave (a multiple of its partition size, at least what was asked)
    device_sms: int


def _driver() -> ctypes.CDLL:
    try:
        return ctypes.CDLL("libcuda.so.1")
    except OSError as error:
        raise GreenContextError(f"no CUDA driver library: {error}") from error


def _check(result: int, call: str) -> None:
    if result != 0:
        raise GreenContextError(f"{call} failed with CUDA driver error {result}")


def _sm_count(resource: ctypes.Array) -> int:
    return int.from_bytes(bytes(resource[SM_COUNT_OFFSET : SM_COUNT_OFFSET + 4]), "little")


def green_stream(num_sms: int, *, priority: int = 0, device_index: int = 0) -> GreenStream:
    """A stream that runs its kernels on `num_sms` of the device's SMs (rounded up by the driver),
    at `priority` (lower is sooner, as for torch.cuda.Stream). PyTorch must have set up the device."""
    import torch

    lib = _driver()
    for name in ("cuDeviceGetDevResource", "cuDevSmResourceSplitByCount", "cuGreenCtxStreamCreate"):
        if not hasattr(lib, name):
            raise GreenContextError(f"the CUDA driver has no {name} (green contexts need CUDA 12.4 or newer)")
    torch.cuda.init()
    device = ctypes.c_int()
    _check(lib.cuDeviceGet(ctypes.byref(device), ctypes.c_int(device_index)), "cuDeviceGet")
    whole = (ctypes.c_ubyte * RESOURCE_BYTES)()
    _check(
        lib.cuDeviceGetDevResource(device, whole, ctypes.c_int(CU_DEV_RESOURCE_TYPE_SM)),
        "cuDeviceGetDevResource",
    )
    device_sms = _sm_count(whole)
    if not 0 < num_sms < device_sms:
        raise GreenContextError(f"asked for {num_sms} SMs of {device_sms}")
    part = (ctypes.c_ubyte * RESOURCE_BYTES)()
    rest = (ctypes.c_ubyte * RESOURCE_BYTES)()
    groups = ctypes.c_uint(1)
    _check(
        lib.cuDevSmResourceSplitByCount(
            part, ctypes.byref(groups), whole, rest, ctypes.c_uint(0), ctypes.c_uint(num_sms)
        ),
        "cuDevSmResourceSplitByCount",
    )
    if groups.value != 1:
        raise GreenContextError(f"the driver could not set {num_sms} SMs apart")
    desc = ctypes.c_void_p()
    _check(
        lib.cuDevResourceGenerateDesc(ctypes.byref(desc), part, ctypes.c_uint(1)), "cuDevResourceGenerateDesc"
    )
    context = ctypes.c_void_p()
    _check(
        lib.cuGreenCtxCreate(ctypes.byref(context), desc, device, ctypes.c_uint(CU_GREEN_CTX_DEFAULT_STREAM)),
        "cuGreenCtxCreate",
    )
    stream = ctypes.c_void_p()
    _check(
        lib.cuGreenCtxStreamCreate(
            ctypes.byref(stream), context, ctypes.c_uint(CU_STREAM_NON_BLOCKING), ctypes.c_int(priority)
        ),
        "cuGreenCtxStreamCreate",
    )
    # The context and its stream live as long as the process.
    external = torch.cuda.ExternalStream(stream.value, device=torch.device("cuda", device_index))
    return GreenStream(external, _sm_count(part), device_sms)


def _cublas(maps: str = "/proc/self/maps") -> ctypes.CDLL:
    """The cuBLAS library PyTorch has loaded (not a second copy of it: the handle must be its own)."""
    with open(maps) as lines:
        for line in lines:
            path = line.rsplit(None, 1)[-1]
            if "/libcublas.so" in path:
                return ctypes.CDLL(path)
    raise GreenContextError("PyTorch has not loaded cuBLAS in this process")


def limit_blas_to_sms(sms: int, device_index: int = 0) -> None:
    """Size cuBLAS's kernels on this thread, for the device, for `sms` SMs (0: all of them again).

    cuBLAS sizes some GEMM kernels for the whole device, and a GEMM on a green context's stream of 32 SMs
    failed in a render (CUBLAS_STATUS_EXECUTION_FAILED, BENCHMARKS.md run Z6). With this limit two renders
    of the whole novel on 32 SMs finished (run AA1), which shows the path runs, not that this was the cause.
    PyTorch keeps one cuBLAS handle for each thread and device, so the limit stays with the thread that
    sets it.
    """
    import torch

    with torch.cuda.device(device_index):
        handle = torch.cuda.current_blas_handle()
    status = _cublas().cublasSetSmCountTarget(ctypes.c_void_p(handle), ctypes.c_int(sms))
    if status != 0:
        raise GreenContextError(f"cublasSetSmCountTarget({sms}) failed with cuBLAS status {status}")
