"""``kvq``: the profiled lossy codec (codec id "kvq").

Per segment (one layer's keys or values for one chunk, ``[H, T, D]``):

1. tokens at absolute positions ``< sinks`` are stored as float16 (quantizers.pack_sinks);
2. the rest go to a float64 working frame: keys are rotated back to pre-rotary positions;
3. per head, PCA coefficients ``(x - mean) @ inv(basis.T)`` with the profile's float16 basis;
4. uniform quantisation with step ``scale * base_step[layer, kind, head]`` (sensitivity-derived);
5. per-channel categorical models from the profile, escape lists, stack ANS (entropy.ChannelBank).

Byte layout and the exact arithmetic are in docs/CODEC.md.
"""

from __future__ import annotations

import struct

import numpy as np
import torch

from kvc.codec.base import Segment
from kvc.codec.entropy import ChannelBank, bank_probabilities, channel_radius
from kvc.codec.profile import GRID, Profile
from kvc.codec.quantizers import (
    pack_sinks,
    quantize_uniform,
    read_u32,
    sink_count,
    unpack_sinks,
)
from kvc.codec.transforms import analysis_matrix, rope_cos_sin, rope_inv_freq, unrotate_keys
from kvc.errors import FormatError, ProfileError

CODEC_ID = "kvq"
SEGMENT_VERSION = 1
_KINDS = {"key": 0, "value": 1}


# Coding tables are pure functions of (profile, scale): they are built once per process and shared by
# every codec object (each `kvc.open` builds a fresh codec). Small LRU over (profile sha, scale).
_BANK_CACHE: dict[tuple[str, float], dict] = {}
_BANK_CACHE_SIZE = 8


def _shared_state(profile: Profile, scale: float) -> dict:
    """``{(layer, kind): ChannelBank, ("m", layer, kind): matrices}`` shared by codecs of one (profile, scale)."""
    key = (profile.sha256, scale)
    banks = _BANK_CACHE.pop(key, None)
    if banks is None:
        banks = {}
        while len(_BANK_CACHE) >= _BANK_CACHE_SIZE:
            _BANK_CACHE.pop(next(iter(_BANK_CACHE)))
    _BANK_CACHE[key] = banks  # most recently used last
    return banks


def _finite_range(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max) if dtype.is_floating_point else float("inf")


class KvqCodec:
    codec_id = CODEC_ID

    def __init__(self, params: dict, profile: Profile | None):
        if profile is None:
            raise ProfileError("the kvq codec needs its profile")
        if not isinstance(profile, Profile):
            raise ProfileError("the kvq codec was given something that is not a profile")
        want = params.get("profile")
        if want and want != profile.sha256:
            raise ProfileError(f"this level was encoded with profile {str(want)[:16]}…, not {profile.sha256[:16]}…")
        try:
            self.scale = float(params["scale"])
        except (KeyError, TypeError, ValueError):
            raise FormatError("kvq level parameters lack a numeric scale") from None
        if not (1e-6 <= self.scale <= 1e6):
            raise FormatError("kvq scale out of range")
        self.profile = profile
        self.sinks = profile.sinks
        self._grid = np.linspace(GRID[0], GRID[1], GRID[2])
        self._banks = self._mats = _shared_state(profile, self.scale)
        self._steps: dict[tuple[int, int], torch.Tensor] = {}
        self._rope: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._inv_freq = rope_inv_freq(profile.rotary["theta"], profile.rotary["dim"]) if profile.rotary else None

    # ---- per (layer, kind) state, built lazily and cached ----
    def _dims(self, segment: Segment) -> tuple[int, int, int]:
        p = self.profile
        k = _KINDS.get(segment.kind)
        if k is None:
            raise FormatError(f"unknown segment kind {segment.kind!r}")
        if not 0 <= segment.layer < p.layers:
            raise ProfileError(f"layer {segment.layer} is outside the profile ({p.layers} layers)")
        dim = p.key_dim if k == 0 else p.value_dim
        H, _, D = segment.shape
        if H != p.heads or D != dim:
            raise ProfileError(
                f"segment shape {tuple(segment.shape)} does not fit the profile ({p.heads} heads × {dim})")
        return segment.layer, k, dim

    def steps(self, layer: int, k: int) -> torch.Tensor:
        key = (layer, k)
        if key not in self._steps:
            self._steps[key] = torch.from_numpy(
                self.profile.arrays["base_step"][layer, k].astype(np.float64) * self.scale)
        return self._steps[key]

    def bank(self, layer: int, k: int, dim: int) -> ChannelBank:
        key = (layer, k)
        bank = self._banks.get(key)
        if bank is None:
            sigma = self.profile.arrays["sigma"][layer, k, :, :dim].astype(np.float64)  # [H, dim]
            step = self.steps(layer, k).numpy()
            ratio = (sigma / step[:, None]).reshape(-1)
            radius = channel_radius(ratio)
            cdf = self.profile.arrays["cdf"][layer, k].astype(np.float64)
            bank = self._banks[key] = ChannelBank(bank_probabilities(ratio, radius, self._grid, cdf), radius)
        return bank

    def _cos_sin(self, start: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 (cos a, signed sin a) for re-rotation, cached: every layer of a chunk shares them."""
        key = (start, tokens)
        cs = self._rope.get(key)
        if cs is None:
            if len(self._rope) > 64:
                self._rope.clear()
            cos, sin = rope_cos_sin(start, tokens, self._inv_freq)
            half = sin.shape[1] // 2
            sin = torch.cat([-sin[:, :half], sin[:, half:]], dim=1)  # folds rotate_half's sign in
            cs = self._rope[key] = (cos.float(), sin.float())
        return cs

    def _matrices(self, layer: int, k: int, dim: int):
        key = ("m", layer, k)
        if key not in self._mats:
            basis16 = self.profile.arrays["basis"][layer, k, :, :dim, :dim]
            mean = torch.from_numpy(self.profile.arrays["mean"][layer, k, :, :dim].astype(np.float64))
            basis = torch.from_numpy(basis16.astype(np.float32))
            # decode folds the step into the synthesis matrix: x = q @ (Δ_h·Bᵀ) + mean (float32)
            synth = torch.from_numpy(
                (basis16.astype(np.float64) * self.steps(layer, k).numpy()[:, None, None]).transpose(0, 2, 1)
                .astype(np.float32).copy())
            self._mats[key] = (mean, torch.from_numpy(analysis_matrix(basis16)), basis, mean.float(), synth)
        return self._mats[key]

    # ---- error bounds (docs/CODEC.md "Error bounds") ----
    ARITH_REL_SLACK = 2.0**-14  # float32 synthesis/rotation rounding, relative to |x| (≈ 64·2⁻²⁴ needed)
    SINK_REL_ERROR = 2.0**-11  # float16 storage of sink tokens: half an ulp, relative
    SINK_ABS_ERROR = 2.0**-24  # … and at most half the float16 subnormal spacing absolutely
    RMSE_SAFETY = 2.0  # statistical bound: factor over the profile-predicted relative RMSE

    def max_abs_error_bound(self, layer: int, kind: str, dtype: torch.dtype = torch.float32) -> float:
        """Strict bound on |decoded − original| for every element at a position ≥ ``profile.sinks``.

        Quantisation leaves every PCA coefficient within Δ_h/2 of its value (escapes are exact), so a
        pre-rotary element j of head h is off by at most Δ_h/2·Σ_d|B[j,d]|; re-rotation mixes the pair
        (j, j+D/2) by a plane rotation, so keys get the pair's Euclidean norm. Holds for finite inputs
        whose coefficients stay below 2³⁰·Δ_h, up to float32 arithmetic (≤ ARITH_REL_SLACK·|x| more);
        a 16-bit output ``dtype`` at most doubles it (the original is representable there, so rounding
        to nearest moves the result by no more than its existing error)."""
        m = 2.0 if dtype in (torch.float16, torch.bfloat16) else 1.0
        cached = self._mats.get(("bound", layer, kind))
        if cached is not None:
            return cached * m
        k = _KINDS.get(kind)
        if k is None:
            raise ValueError(f"unknown kind {kind!r}")
        p = self.profile
        dim = p.key_dim if k == 0 else p.value_dim
        B = np.abs(p.arrays["basis"][layer, k, :, :dim, :dim].astype(np.float64))  # [H, D, D]
        b = 0.5 * self.steps(layer, k).numpy()[:, None] * B.sum(axis=2)  # [H, D]: per output element
        if k == 0 and self._inv_freq is not None:
            half = dim // 2
            pair = np.sqrt(b[:, :half] ** 2 + b[:, half:] ** 2)
            b = np.concatenate([pair, pair], axis=1)
        bound = self._mats[("bound", layer, kind)] = float(b.max()) * (1 + 1e-9)
        return bound * m

    def element_error_bound(self, layer: int, kind: str, original: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Per-element bound ``[H, T, D]`` on |decoded − original| for a segment starting at ``start``:
        ``m·(max_abs_error_bound + ARITH_REL_SLACK·|x|)`` past the sinks and
        ``m·(SINK_REL_ERROR·|x| + SINK_ABS_ERROR)`` on sink positions, m = 2 for 16-bit dtypes else 1."""
        x = original.detach().float().abs()
        m = 2.0 if original.dtype in (torch.float16, torch.bfloat16) else 1.0
        bound = m * (self.max_abs_error_bound(layer, kind) + self.ARITH_REL_SLACK * x)
        n_sink = sink_count(start, x.shape[1], self.sinks)
        if n_sink:
            bound[:, :n_sink] = m * (self.SINK_REL_ERROR * x[:, :n_sink] + self.SINK_ABS_ERROR)
        return bound

    @property
    def relative_rmse_bound(self) -> float:
        """Statistical (not strict) bound on ‖decoded − original‖/‖original‖ over a whole cache.

        Predicted from the profile alone: each coefficient's error variance is min(Δ²/12, σ²) (uniform
        rounding noise, or the whole coefficient when σ ≪ Δ), the energy per head is ‖mean‖² + Σσ²
        (the synthesis basis is orthonormal to float16 precision and rotation preserves norms), sinks
        are counted as error-free and excluded from the energy (they only lower the real ratio); the
        prediction is multiplied by RMSE_SAFETY. Text far from the profile's calibration data can
        exceed it; max_abs_error_bound is the strict per-element guarantee."""
        if getattr(self, "_rmse_bound", None) is None:
            p = self.profile
            err = energy = 0.0
            for k, dim in ((0, p.key_dim), (1, p.value_dim)):
                sigma = p.arrays["sigma"][:, k, :, :dim].astype(np.float64)  # [L, H, D]
                mean = p.arrays["mean"][:, k, :, :dim].astype(np.float64)
                step = p.arrays["base_step"][:, k].astype(np.float64) * self.scale  # [L, H]
                err += float(np.minimum(step[..., None] ** 2 / 12.0, sigma**2).sum())
                energy += float((sigma**2).sum() + (mean**2).sum())
            self._rmse_bound = self.RMSE_SAFETY * (err / energy) ** 0.5 if energy > 0 else float("inf")
        return self._rmse_bound

    # ---- the contract ----
    def encode(self, tensor: torch.Tensor, segment: Segment) -> bytes:
        layer, k, dim = self._dims(segment)
        H, T, D = segment.shape
        if tuple(tensor.shape) != (H, T, D):
            raise ValueError(f"tensor shape {tuple(tensor.shape)} != segment shape {tuple(segment.shape)}")
        n_sink = sink_count(segment.start, T, self.sinks)
        out = bytearray(struct.pack("<BBH", SEGMENT_VERSION, 1 if n_sink else 0, 0))
        if n_sink:
            out += pack_sinks(tensor[:, :n_sink])
        body = T - n_sink
        if body == 0:
            return bytes(out)
        x = torch.nan_to_num(tensor[:, n_sink:].double(), nan=0.0)
        big = _finite_range(tensor.dtype)
        x = x.clamp(-big, big)
        if k == 0 and self._inv_freq is not None:
            x = unrotate_keys(x, segment.start + n_sink, self._inv_freq)
        mean, analysis, *_ = self._matrices(layer, k, dim)
        coef = torch.bmm(x - mean[:, None, :], analysis)
        q = quantize_uniform(coef, self.steps(layer, k))  # [H, body, D]
        sym = q.transpose(0, 2, 1).reshape(H * D, body)  # channel-major: (head, coefficient)
        flags, excess, words = self.bank(layer, k, dim).encode(sym)
        out += np.packbits(flags, bitorder="little").tobytes()
        out += struct.pack("<I", len(excess)) + excess.astype("<u4").tobytes()
        out += struct.pack("<I", len(words)) + words.astype("<u4").tobytes()
        return bytes(out)

    def decode(self, data: bytes, segment: Segment) -> torch.Tensor:
        layer, k, dim = self._dims(segment)
        H, T, D = segment.shape
        data = bytes(data)
        if len(data) < 4:
            raise FormatError("truncated kvq segment")
        version, flags_byte, _ = struct.unpack_from("<BBH", data, 0)
        if version != SEGMENT_VERSION:
            raise FormatError(f"unknown kvq segment version {version}")
        n_sink = sink_count(segment.start, T, self.sinks)
        if flags_byte != (1 if n_sink else 0):
            raise FormatError("kvq segment flags do not match its position")
        pos = 4
        out = torch.empty((H, T, D), dtype=torch.float32)
        if n_sink:
            sinks, pos = unpack_sinks(data, pos, (H, n_sink, D))
            out[:, :n_sink] = sinks
        body = T - n_sink
        if body:
            C = H * D
            nflag = (C + 7) // 8
            if pos + nflag > len(data):
                raise FormatError("truncated kvq segment")
            flags = np.unpackbits(np.frombuffer(data, np.uint8, nflag, pos), count=C, bitorder="little").astype(bool)
            pos += nflag
            n_esc, pos = read_u32(data, pos)
            if n_esc > C * body or pos + 4 * n_esc > len(data):
                raise FormatError("kvq escape list out of bounds")
            excess = np.frombuffer(data, "<u4", n_esc, pos)
            pos += 4 * n_esc
            n_words, pos = read_u32(data, pos)
            if pos + 4 * n_words != len(data):
                raise FormatError("kvq segment length does not match its word count")
            words = np.frombuffer(data, "<u4", n_words, pos).copy()
            if n_words == 0 and flags.any():
                raise FormatError("kvq segment has flagged channels but no coded data")
            q = self.bank(layer, k, dim).decode(flags, excess, words, body)  # int32 [H·D, body]
            _, _, _, mean32, synth = self._matrices(layer, k, dim)
            coef = torch.from_numpy(q.astype(np.float32).reshape(H, D, body)).transpose(1, 2)  # [H, body, D]
            x = torch.baddbmm(mean32[:, None, :], coef, synth)
            if k == 0 and self._inv_freq is not None:
                cos, sin = self._cos_sin(segment.start + n_sink, body)
                half = D // 2
                rot = x * cos
                rot[..., :half].addcmul_(x[..., half:], sin[:, :half])
                rot[..., half:].addcmul_(x[..., :half], sin[:, half:])
                x = rot
            out[:, n_sink:] = x
        big = _finite_range(segment.dtype)
        out = torch.nan_to_num_(out, nan=0.0, posinf=big, neginf=-big).clamp_(-big, big)
        return out.to(segment.dtype)

    def model_bits(self, tensor: torch.Tensor, segment: Segment) -> tuple[float, int]:
        """(information content under the models, ANS bits actually written) for the coder-efficiency check."""
        layer, k, dim = self._dims(segment)
        H, T, D = segment.shape
        n_sink = sink_count(segment.start, T, self.sinks)
        x = tensor[:, n_sink:].double()
        if k == 0 and self._inv_freq is not None:
            x = unrotate_keys(x, segment.start + n_sink, self._inv_freq)
        mean, analysis, *_ = self._matrices(layer, k, dim)
        q = quantize_uniform(torch.bmm(x - mean[:, None, :], analysis), self.steps(layer, k))
        sym = q.transpose(0, 2, 1).reshape(H * D, T - n_sink)
        bank = self.bank(layer, k, dim)
        _, _, words = bank.encode(sym)
        return bank.cross_entropy_bits(sym), 32 * len(words)
