"""The last pass of a kvq decode on the CPU, fused and in place in the output tensor (the synthesis
wrote there): re-rotate keys, clamp to the output dtype's finite range.

In torch this is five passes over the layer (``x * cos``, two ``addcmul_``, ``nan_to_num_``,
``clamp_``) plus the copy into the output; here it is one, in the same float32 operations in the
same order as torch's CPU kernels (``x * cos`` rounded, then ``addcmul_``'s fused multiply-add of
the partner half), so the values are bit-identical to the torch path, which the GPU and
non-float32 outputs still take (tests/test_fixtures.py pins them).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic


@intrinsic
def _fma(typingctx, a, b, c):
    """float32 a·b + c rounded once (LLVM's fma: the hardware instruction, or an exact fallback)."""

    def codegen(context, builder, signature, args):
        f32 = ir.FloatType()
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(f32, [f32, f32, f32]), "llvm.fma.f32")
        return builder.call(fn, args)

    return types.float32(types.float32, types.float32, types.float32), codegen


@njit(nogil=True, cache=True)
def _clamp(v, big):
    if v != v:
        return np.float32(0.0)
    if v > big:
        return big
    if v < -big:
        return -big
    return v


@njit(nogil=True, cache=True)
def _finish(x, cos, sin, rotate, big):
    """In place on ``x [H, T, D]``: each rotary pair (d, d + D/2) is read whole before either is written,
    so working in place gives exactly what reading one array and writing another did."""
    H, T, D = x.shape
    half = D // 2
    for h in range(H):
        for t in range(T):
            if rotate:
                for d in range(half):
                    a = x[h, t, d]
                    b = x[h, t, d + half]
                    x[h, t, d] = _clamp(_fma(b, sin[t, d], a * cos[t, d]), big)
                    x[h, t, d + half] = _clamp(_fma(a, sin[t, d + half], b * cos[t, d + half]), big)
            else:
                for d in range(D):
                    x[h, t, d] = _clamp(x[h, t, d], big)


def finish_in_place(x: np.ndarray, cos: np.ndarray | None, sin: np.ndarray | None) -> None:
    """``x = clamp(rotate(x))`` in place for float32 ``x [H, T, D]`` (rows of each head contiguous; the
    heads may be strided, e.g. ``out[:, lead:]``); ``cos``/``sin`` ``[T, D]`` (sin with rotate_half's
    sign folded in) or None for values."""
    rotate = cos is not None
    if not rotate:
        cos = sin = np.zeros((1, 1), np.float32)
    _finish(x, cos, sin, rotate, np.float32(np.finfo(np.float32).max))
