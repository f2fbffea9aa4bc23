"""Which arithmetic this process's kernels do: a fingerprint of fixed-input matmuls and an attention.

A lossless file promises the exact bytes of the prefill that made it, and a deep verify can hold it to
that only where the same kernels run. Device type and torch version do not say that: on one machine and
one torch build, oneDNN picks AMX, AVX-512 or AVX2 code per process (what the CPU offers, what the
kernel lets a process enable, ``ONEDNN_MAX_CPU_ISA``), and the thread count changes how float32 GEMMs
split their sums; each gives other bf16/fp32 roundings of the same model (measured: up to 1 bf16 ulp,
relative RMSE 2e-4 to 4e-4 over a tiny Llama's cache). So the prefill records this fingerprint: the
hash of the model dtype's results of two linear layers (a short and a long reduction) and a causal
attention on inputs built from integer arithmetic, the same on every machine. Equal fingerprints are
strong evidence of equal kernels; unequal ones mean a verify may only ask for float tolerance."""

from __future__ import annotations

import hashlib
from functools import cache

import torch
import torch.nn.functional as F

# (rows, reduction, outputs) of the probe's linear layers: a decode-sized and a prefill-sized GEMM.
_LINEAR_SHAPES = ((7, 576, 192), (256, 2048, 256))
_ATTENTION_SHAPE = (1, 3, 200, 64)  # batch, heads, tokens, head dim


def _values(count: int, multiplier: int, offset: int, modulus: int) -> torch.Tensor:
    """``count`` values in [-1, 1) from integer arithmetic: no random generator, identical everywhere."""
    n = torch.arange(count, dtype=torch.int64)
    return ((n * multiplier + offset) % modulus).to(torch.float32) / (modulus / 2) - 1.0


@cache
def _fingerprint(dtype: torch.dtype, device: str, threads: int) -> str:
    digest = hashlib.sha256()
    with torch.no_grad():
        for rows, k, out in _LINEAR_SHAPES:
            x = _values(rows * k, 2654435761, 0, 2003).reshape(rows, k).to(device, dtype)
            w = _values(out * k, 40503, 7, 1999).reshape(out, k).to(device, dtype)
            digest.update(F.linear(x, w).float().cpu().numpy().tobytes())
        count = 1
        for size in _ATTENTION_SHAPE:
            count *= size
        q = _values(count, 69069, 1, 997).reshape(_ATTENTION_SHAPE).to(device, dtype)
        attended = F.scaled_dot_product_attention(q, q.flip(2), q, is_causal=True)
        digest.update(attended.float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def kernel_fingerprint(dtype: torch.dtype, device: torch.device | str = "cpu") -> str:
    """16 hex digits naming the arithmetic of this process's kernels in ``dtype`` on ``device``.

    Cached per process and intra-op thread count (the one thing a process changes that changes its
    kernels' sums)."""
    device = torch.device(device)
    return _fingerprint(dtype, str(device), torch.get_num_threads())
