"""Byte planes: an element's bytes split into planes (all first bytes, then all second bytes, ...).

The lossless codec's transform. ``split`` runs at encode time (numpy); ``join_into`` is the
decode direction, a numba kernel (GIL released) that writes straight into the output tensor's
memory, wherever in it the segment lies, so a decoded segment costs one pass and no copies."""

from __future__ import annotations

import numpy as np
from numba import njit


def split(raw: np.ndarray, itemsize: int) -> np.ndarray:
    """uint8 elements ``[n·itemsize]`` → planes ``[itemsize·n]`` (plane b holds byte b of every element)."""
    return np.ascontiguousarray(raw.reshape(-1, itemsize).T)


@njit(nogil=True, cache=True)
def _join(planes, out, heads, tokens, dim, row_stride, head_stride, base):
    """``planes`` is ``[itemsize, count]``; ``out`` the output as unsigned integers of the element's
    width: each element is its planes' bytes, little-endian. Written per width so every row is a
    straight loop the compiler vectorises."""
    itemsize = planes.shape[0]
    for h in range(heads):
        for t in range(tokens):
            e = (h * tokens + t) * dim
            o = base + h * head_stride + t * row_stride
            if itemsize == 4:
                for d in range(dim):
                    out[o + d] = (np.uint32(planes[0, e + d]) | (np.uint32(planes[1, e + d]) << np.uint32(8))
                                  | (np.uint32(planes[2, e + d]) << np.uint32(16))
                                  | (np.uint32(planes[3, e + d]) << np.uint32(24)))  # fmt: skip
            elif itemsize == 2:
                for d in range(dim):
                    out[o + d] = np.uint16(planes[0, e + d]) | (np.uint16(planes[1, e + d]) << np.uint16(8))
            else:
                for d in range(dim):
                    v = np.uint64(0)
                    for b in range(itemsize):
                        v |= np.uint64(planes[b, e + d]) << np.uint64(8 * b)
                    out[o + d] = v


_UINTS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_SAME_WIDTH = {1: "uint8", 2: "int16", 4: "int32", 8: "int64"}  # torch views every dtype can take


def join_into(planes: np.ndarray, out: np.ndarray, shape: tuple[int, int, int],
              head_stride: int, row_stride: int, base: int) -> None:  # fmt: skip
    """Planes of a ``[H, T, D]`` segment into ``out`` (the whole output tensor's memory as a flat
    array of unsigned integers of the element's width, see :func:`uint_view`), element (h, t, d) at
    ``base + h·head_stride + t·row_stride + d``."""
    H, T, D = shape
    _join(planes.reshape(out.itemsize, H * T * D), out, H, T, D, row_stride, head_stride, base)


def uint_view(tensor) -> np.ndarray:
    """A contiguous tensor's memory as a flat numpy array of unsigned integers of its element width
    (through a same-width torch integer view: numpy has no bfloat16)."""
    import torch

    size = tensor.element_size()
    return tensor.view(-1).view(getattr(torch, _SAME_WIDTH[size])).numpy().view(_UINTS[size])
