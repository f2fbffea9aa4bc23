"""Invertible transforms applied before quantisation.

These are the encode directions, on float tensors ``[heads, tokens, dim]``; the decoder in kvq.py
applies their inverses folded into one synthesis step (docs/CODEC.md says exactly how):

* rotary un-rotation: cached keys are post-rotary (HF ``rotate_half`` layout); rotating them back
  to the pre-rotary frame removes the position-dependent spin that spreads every channel's
  energy, so a per-channel model fitted once fits every position;
* per-(layer, kind, head) PCA: an orthogonal basis fitted on calibration text concentrates the
  energy in few channels, which a uniform quantiser then turns into many all-zero channels;
* CacheGen's anchor/delta lives in codec/cachegen.py: it is closed-loop on the reconstructed
  anchor, not a transform of its own.
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


def pca_forward(x: torch.Tensor, mean: torch.Tensor, analysis: torch.Tensor) -> torch.Tensor:
    """Coefficients ``(x - mean) @ analysis`` per head: x ``[H, T, D]``, mean ``[H, D]``, analysis ``[H, D, D]``."""
    return torch.bmm(x - mean[:, None, :], analysis)


def analysis_matrix(basis: np.ndarray) -> np.ndarray:
    """The exact inverse of ``basis.T`` (basis is stored in float16, so only nearly orthogonal)."""
    return np.linalg.inv(basis.astype(np.float64).transpose(0, 2, 1))
