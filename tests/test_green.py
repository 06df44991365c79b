"""green.py's failures on a machine that cannot make a green context (CI's: no CUDA driver at all)."""

from __future__ import annotations

import ctypes

import pytest
import torch  # noqa: F401 - loaded before CDLL is replaced: it loads libraries of its own

from fastmaya_cli import green


def test_without_a_cuda_driver_a_green_stream_is_a_clear_error(monkeypatch):
    def no_library(name: str) -> None:
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", no_library)
    with pytest.raises(green.GreenContextError, match="no CUDA driver library: libcuda.so.1"):
        green.green_stream(16)


def test_a_driver_older_than_green_contexts_is_named_as_such(monkeypatch):
    class OldDriver:
        cuDeviceGetDevResource = object()  # the rest came with CUDA 12.4

    monkeypatch.setattr(ctypes, "CDLL", lambda name: OldDriver())
    with pytest.raises(green.GreenContextError, match="no cuDevSmResourceSplitByCount .* CUDA 12.4"):
        green.green_stream(16)


def test_the_sm_count_is_read_where_the_driver_writes_it():
    resource = (ctypes.c_ubyte * green.RESOURCE_BYTES)()
    resource[green.SM_COUNT_OFFSET : green.SM_COUNT_OFFSET + 4] = (132).to_bytes(4, "little")
    resource[green.SM_COUNT_OFFSET - 1] = 7  # the padding before it is not part of the count
    assert green._sm_count(resource) == 132


def test_a_failing_driver_call_names_the_call_and_its_error():
    green._check(0, "cuDeviceGet")
    with pytest.raises(green.GreenContextError, match="cuGreenCtxCreate failed with CUDA driver error 801"):
        green._check(801, "cuGreenCtxCreate")


def test_cublas_is_the_copy_the_process_has_mapped_and_never_its_lt_sibling(tmp_path, monkeypatch):
    opened: list[str] = []
    monkeypatch.setattr(ctypes, "CDLL", lambda path: opened.append(path) or path)
    lt = "7f00-7f10 r-xp 00000000 08:01 11 /site/nvidia/cu13/lib/libcublasLt.so.13"
    blas = "7f10-7f20 r-xp 00000000 08:01 12 /site/nvidia/cu13/lib/libcublas.so.13"
    maps = tmp_path / "maps"
    maps.write_text(f"{lt}\n7f20-7f30 rw-p 00000000 00:00 0 \n{blas}\n")
    assert green._cublas(str(maps)) == "/site/nvidia/cu13/lib/libcublas.so.13"
    maps.write_text(f"{lt}\n")
    with pytest.raises(green.GreenContextError, match="PyTorch has not loaded cuBLAS"):
        green._cublas(str(maps))
    assert opened == ["/site/nvidia/cu13/lib/libcublas.so.13"]
