"""Invertible transforms applied before quantisation.

Each one is a plain function pair on float tensors ``[heads, tokens, dim]`` so the codec can
chain them and a second decoder can re-implement them from docs/CODEC.md:

* rotary un-rotation: cached keys are post-rotary (HF ``rotate_half`` layout); rotating them back
  to the pre-rotary frame removes the position-dependent spin that spreads every channel's
  energy, so a per-channel model fitted once fits every position;
* per-(layer, kind, head) PCA: an orthogonal basis fitted on calibration text concentrates the
  energy in few channels, which a uniform quantiser then turns into many all-zero channels;
* anchor/delta (CacheGen) and previous-token delta (DPCM) on integer symbols: lossless on the
  symbols, so they never drift.
"""

from __future__ import annotations

import numpy as np
import torch


def rope_inv_freq(theta: float, dim: int) -> np.ndarray:
    """The default-rope inverse frequencies, float64 (the same formula transformers uses)."""
    return 1.0 / (float(theta) ** (np.arange(0, dim, 2, dtype=np.float64) / dim))


def rope_cos_sin(start: int, tokens: int, inv_freq: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 ``cos a``, ``sin a`` ``[tokens, dim]`` for positions ``start..start+tokens-1``."""
    return _cos_sin(start, tokens, inv_freq)


def _cos_sin(start: int, tokens: int, inv_freq: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    # float64 angles: positions up to 1e6 keep ~1e-10 rad accuracy, so un-rotate/rotate is exact to fp32 noise.
    pos = np.arange(start, start + tokens, dtype=np.float64)
    ang = np.outer(pos, inv_freq)
    ang = np.concatenate([ang, ang], axis=1)
    return torch.from_numpy(np.cos(ang)), torch.from_numpy(np.sin(ang))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def unrotate_keys(keys: torch.Tensor, start: int, inv_freq: np.ndarray) -> torch.Tensor:
    """Post-rotary keys ``[H, T, D]`` (float64) back to the pre-rotary frame."""
    cos, sin = _cos_sin(start, keys.shape[1], inv_freq)
    return keys * cos - _rotate_half(keys) * sin


def rotate_keys(keys: torch.Tensor, start: int, inv_freq: np.ndarray) -> torch.Tensor:
    """Inverse of :func:`unrotate_keys` (what the model's attention applies)."""
    cos, sin = _cos_sin(start, keys.shape[1], inv_freq)
    return keys * cos + _rotate_half(keys) * sin


def pca_forward(x: torch.Tensor, mean: torch.Tensor, analysis: torch.Tensor) -> torch.Tensor:
    """Coefficients ``(x - mean) @ analysis`` per head: x ``[H, T, D]``, mean ``[H, D]``, analysis ``[H, D, D]``."""
    return torch.bmm(x - mean[:, None, :], analysis)


def pca_inverse(coef: torch.Tensor, mean: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``coef @ basis.T + mean``: basis columns are the principal directions."""
    return torch.bmm(coef, basis.transpose(1, 2)) + mean[:, None, :]


def analysis_matrix(basis: np.ndarray) -> np.ndarray:
    """The exact inverse of ``basis.T`` (basis is stored in float16, so only nearly orthogonal)."""
    return np.linalg.inv(basis.astype(np.float64).transpose(0, 2, 1))


def dpcm_forward(q: np.ndarray) -> np.ndarray:
    """Previous-token delta on integer symbols ``[..., T]`` (the first token is kept)."""
    out = q.copy()
    out[..., 1:] = q[..., 1:] - q[..., :-1]
    return out


def dpcm_inverse(d: np.ndarray) -> np.ndarray:
    return np.cumsum(d, axis=-1, dtype=np.int64).astype(d.dtype)


def anchor_delta_forward(q: np.ndarray, group: int) -> np.ndarray:
    """CacheGen's anchor/delta on tokens (axis -2 of ``[..., T, D]``): first token of each group is the anchor."""
    out = q.copy()
    for a in range(0, q.shape[-2], group):
        out[..., a + 1 : a + group, :] = q[..., a + 1 : a + group, :] - q[..., a : a + 1, :]
    return out


def anchor_delta_inverse(d: np.ndarray, group: int) -> np.ndarray:
    out = d.copy()
    for a in range(0, d.shape[-2], group):
        out[..., a + 1 : a + group, :] = d[..., a + 1 : a + group, :] + d[..., a : a + 1, :]
    return out
