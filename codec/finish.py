"""The last pass of a kvq decode on the CPU, fused: re-rotate keys, clamp to the output dtype's
finite range, write into the output tensor.

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
def _finish(x, out, lead, cos, sin, rotate, big):
    H, T, D = x.shape
    half = D // 2
    for h in range(H):
        for t in range(T):
            for d in range(D):
                v = x[h, t, d]
                if rotate:
                    if d < half:
                        v = _fma(x[h, t, d + half], sin[t, d], v * cos[t, d])
                    else:
                        v = _fma(x[h, t, d - half], sin[t, d], v * cos[t, d])
                if v != v:
                    v = np.float32(0.0)
                elif v > big:
                    v = big
                elif v < -big:
                    v = -big
                out[h, lead + t, d] = v


def finish_into(x: np.ndarray, out: np.ndarray, lead: int, cos: np.ndarray | None, sin: np.ndarray | None) -> None:
    """``out[:, lead:] = clamp(rotate(x))`` for float32 ``x [H, T, D]`` and ``out [H, lead + T, D]``;
    ``cos``/``sin`` ``[T, D]`` (sin with rotate_half's sign folded in) or None for values."""
    rotate = cos is not None
    if not rotate:
        cos = sin = np.zeros((1, 1), np.float32)
    _finish(x, out, lead, cos, sin, rotate, np.float32(np.finfo(np.float32).max))
