"""Triton, where it is installed (it ships with PyTorch's CUDA builds), and the helpers our kernels share."""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation; the CPU path needs none of this
    triton = None
    tl = None


def fused_kernels_available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def sine(x, FAST: tl.constexpr):
        if FAST:
            # The hardware sine is accurate to ~1e-6 within one turn; reduce the argument to it first.
            x = x - 6.283185307179586 * tl.floor(x * 0.15915494309189535 + 0.5)
            value = tl.inline_asm_elementwise(
                "sin.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1
            )
        else:
            value = tl.sin(x)
        return value
