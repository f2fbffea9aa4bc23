"""Scalar quantisers and the high-precision sink store.

* uniform: one step per (layer, kind, head, PCA coefficient) — a version-2 profile's ``step``, from the
  model's own sensitivity to each coefficient (the KL Hessian's diagonal), which is the KL-optimal
  allocation at high rate; a version-1 profile has one step per head (``base_step``) shared by every
  coefficient of the head (the MSE-optimal allocation in an orthonormal basis);
* per-token absmax scaling (CacheGen as published): each token's step is ``max|x| / (2^(b-1)-1)``;
* sinks: the first few positions of a context draw attention from every later token, so they are
  stored as float16 (or raw in the model dtype when float16 cannot hold them) instead of quantised.
"""

from __future__ import annotations

import struct

import numpy as np
import torch

from kvc.errors import FormatError

SYMBOL_LIMIT = 1 << 30  # |symbol| cap: no float outlier can overflow the integer path


def quantize_uniform(coef: torch.Tensor, step: torch.Tensor) -> np.ndarray:
    """``round(coef / step)``; coef ``[H, T, D]``, step ``[H]`` or ``[H, D]``; int64 numpy, NaN → 0, ±inf → ±cap."""
    q = torch.round(coef / (step[:, None, None] if step.dim() == 1 else step[:, None, :]))
    q = torch.nan_to_num(q, nan=0.0, posinf=SYMBOL_LIMIT, neginf=-SYMBOL_LIMIT).clamp(-SYMBOL_LIMIT, SYMBOL_LIMIT)
    return q.to(torch.int64).numpy()


def quantize_per_token(x: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-token absmax over ``[H, D]`` of x ``[H, T, D]`` → (int symbols, float16 scales per token)."""
    levels = (1 << (bits - 1)) - 1
    amax = np.abs(x).max(axis=(0, 2))
    scale = (amax / levels).astype(np.float16)
    s = scale.astype(np.float32)
    s[s == 0] = 1.0
    q = np.clip(np.round(x / s[None, :, None]), -levels, levels).astype(np.int64)
    return q, scale


def dequantize_per_token(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) * scale.astype(np.float32)[None, :, None]


def sink_count(segment_start: int, tokens: int, sinks: int) -> int:
    return max(0, min(tokens, sinks - segment_start))


def pack_sinks(x: torch.Tensor) -> bytes:
    """Sink tokens ``[H, S, D]`` as float16 when that is faithful enough, else raw float32 (flag byte first)."""
    xf = torch.nan_to_num(x.float(), nan=0.0, posinf=65504.0, neginf=-65504.0)
    if xf.numel() and float(xf.abs().max()) >= 65504.0:
        return b"\x01" + xf.numpy().astype("<f4").tobytes()
    return b"\x00" + xf.numpy().astype("<f2").tobytes()


def unpack_sinks(data: bytes, pos: int, shape: tuple[int, int, int]) -> tuple[torch.Tensor, int]:
    n = shape[0] * shape[1] * shape[2]
    if pos >= len(data):
        raise FormatError("truncated sink block")
    flag = data[pos]
    if flag not in (0, 1):
        raise FormatError("bad sink block flag")
    dt = np.dtype("<f2") if flag == 0 else np.dtype("<f4")
    end = pos + 1 + n * dt.itemsize
    if end > len(data):
        raise FormatError("truncated sink block")
    arr = np.frombuffer(data, dtype=dt, count=n, offset=pos + 1).astype(np.float32).reshape(shape)
    return torch.from_numpy(np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)), end


def read_u32(data: bytes, pos: int) -> tuple[int, int]:
    if pos + 4 > len(data):
        raise FormatError("truncated segment")
    return struct.unpack_from("<I", data, pos)[0], pos + 4
