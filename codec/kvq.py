"""``kvq``: the profiled lossy codec (codec id "kvq").

Per segment (one layer's keys or values for one chunk, ``[H, T, D]``):

1. tokens at absolute positions ``< sinks`` are stored as float16 (quantizers.pack_sinks);
2. the rest go to a float64 working frame: keys are rotated back to pre-rotary positions;
3. per head, PCA coefficients ``(x - mean) @ inv(basis.T)`` with the profile's float16 basis;
4. uniform quantisation with step ``scale * step[layer, kind, head, coefficient]`` (from the model's sensitivity;
   a version-1 profile has one ``base_step`` per head);
5. per-channel categorical models from the profile, quantised to integer tables by kvc's own rule
   (kvc.codec.rans.tables) and coded in independent rANS lanes (kvc.codec.rans, segment version 2;
   kvc.codec.kvq_segment is the byte layout). Version-1 segments (one constriction stack-ANS stream
   and an escape list, entropy.ChannelBank) still decode.

Byte layout and the exact arithmetic are in docs/CODEC.md.
"""

from __future__ import annotations

import itertools
import numbers
import struct
import threading
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch

from kvc.codec import kvq_segment
from kvc.codec.base import Segment
from kvc.codec.entropy import ChannelBank, bank_probabilities, bank_weights, channel_radius
from kvc.codec.profile import GRID, Profile, check_fine_tokens
from kvc.codec.quantizers import (
    SYMBOL_LIMIT,
    pack_sinks,
    read_u32,
    sink_count,
    unpack_sinks,
)
from kvc.codec.transforms import analysis_matrix, rope_cos_sin, rope_inv_freq
from kvc.errors import FormatError, InputError, ProfileError, VersionError
from kvc.workers import default_threads, run_tasks, torch_single_thread

CODEC_ID = "kvq"
SEGMENT_VERSION = kvq_segment.VERSION  # what encode writes without fine tokens (3 with them); 1, 2 and 3 decode
BATCH_COEFFICIENTS = 1 << 20  # a CPU decode task's share: ~4 MB of float32 coefficients (L2-sized)
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


class _ParsedV2(NamedTuple):
    segment: Segment
    sinks: torch.Tensor | None  # [H, n_sink, D] float32
    data: bytes
    pos: int  # where the body (channel flags, lane table, words) starts in data
    lanes: int  # rANS lanes in the body (0 when no channel is flagged)
    body: int  # tokens past the sinks (0: the segment is all sinks and has no body)
    fine: np.ndarray | None  # version 3: the fine rows (body offsets, int64); None for version 2
    shift: int  # their symbols are in steps of 2**-shift


def _finite_range(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max) if dtype.is_floating_point else float("inf")


def _fine_params(params: dict) -> tuple[np.ndarray | None, int]:
    """A level's fine tokens (``fine_tokens``: token ids whose positions are quantised ``2**fine_shift`` times
    finer; the encoder's choice, recorded so a re-encode repeats it: decoding reads each segment's own rows),
    checked as a profile's are (they are copied from one)."""
    ids = params.get("fine_tokens")
    if ids is None:
        return None, 0
    fine = check_fine_tokens({"ids": ids, "shift": params.get("fine_shift")}, lambda m: FormatError(f"kvq {m}"))
    return np.asarray(fine["ids"], dtype=np.int64), fine["shift"]


def _fine_elements(fine: list[tuple]) -> list[tuple[np.ndarray, float]]:
    """(flat indices into the coefficient buffer, factor) per distinct factor, from :meth:`KvqCodec._plan`'s
    fine rows: (block offset, block shape [H, T, D], rows in it, factor)."""
    by_factor: dict[float, list[np.ndarray]] = {}
    for off, (H, T, D), rows, factor in fine:
        idx = off + ((np.arange(H)[:, None, None] * T + rows[None, :, None]) * D + np.arange(D)[None, None, :])
        by_factor.setdefault(factor, []).append(idx.ravel())
    return [(np.concatenate(parts), factor) for factor, parts in by_factor.items()]


class ChainState:
    """The reconstructions one encode or one read of one context keeps for a chained (version-5) level: per token
    range (first body position, body tokens), the last two layers' keys and values (float32 ``[T, H·dim]``), which
    the next layer is predicted from (CODEC.md step 3c).

    It belongs to that encode or read, never to the codec: codecs are shared (the streaming loader keeps one per
    level for every load in the process), and two contexts of the same length would otherwise read each other's
    layers for the same token range. :meth:`KvqCodec.decode_many` and :meth:`KvqCodec.encode_many` make a fresh
    one per call unless the caller passes its own (``chain=``) to carry one context over several calls (layers
    in order: 0, 1, …, for each token range)."""

    def __init__(self) -> None:
        self._memory: dict[tuple[int, int], dict[tuple[int, int], torch.Tensor]] = {}
        self.layers: set[int] = set()  # every layer this state has been given, of any tokens
        self._lock = threading.Lock()  # one context's calls are in order; this only keeps the dicts whole

    def get(self, layer: int, first: int, count: int) -> list[torch.Tensor | None]:
        """Layer ``layer``'s (key, value) reconstructions of tokens ``first..first+count`` (None where not kept)."""
        with self._lock:
            kept = self._memory.get((first, count), {})
            return [kept.get((layer, k)) for k in (0, 1)]

    def put(self, layer: int, k: int, first: int, count: int, recon: torch.Tensor) -> None:
        """Keep ``recon``; of the same tokens only this layer's and the one before stay."""
        with self._lock:
            kept = self._memory.setdefault((first, count), {})
            for old in [o for o in kept if not layer - 1 <= o[0] <= layer]:
                del kept[old]
            kept[(layer, k)] = recon
            self.layers.add(layer)


def _synthesis_shares(work: list, shares: int) -> list[list[tuple]]:
    """A chained read's synthesis (``work``: ``(plan, coef)`` in layer order) shared out among ``shares`` threads
    by token range: the chain runs along layers and never across tokens, so every segment of one token range
    (first position, rows), at every layer, goes to the same share, in layer order, and no share waits on
    another. Ranges are dealt in position order, in contiguous blocks, so a share's segments of one (layer,
    kind) are consecutive rows: one call each. Returns per share its calls ``(item, (i0, i1))``."""
    keys = sorted({(plan[3] + r0, count) for plan, _ in work for r0, count in plan[6]})
    shares = max(1, min(shares, len(keys)))
    share_of = {key: i * shares // len(keys) for i, key in enumerate(keys)}
    out: list[list[tuple]] = [[] for _ in range(shares)]
    for item in work:
        first, ranges = item[0][3], item[0][6]
        i0 = 0
        for share, run in itertools.groupby(share_of[(first + r0, count)] for r0, count in ranges):
            i1 = i0 + sum(1 for _ in run)  # a run of consecutive segments of one share
            out[share].append((item, (i0, i1)))
            i0 = i1
    return [calls for calls in out if calls]


def _kinds_in_step(calls: list[tuple]) -> list[list[list[tuple]]] | None:
    """One share's calls (:func:`_synthesis_shares`) as two lists, keys' and values', each per layer in order,
    when every layer has both kinds: layer ``l`` of either kind needs both of layer ``l − 1`` and nothing else,
    so two threads can rebuild a layer's keys and values side by side and meet before the next. None when a
    layer lacks a kind (a read that is not whole layers: it stays on one thread)."""
    layers: dict[int, list[list[tuple]]] = {}
    for call in calls:
        layer, k = call[0][0][1], call[0][0][2]
        layers.setdefault(layer, [[], []])[k].append(call)
    if not layers or any(not keys or not values for keys, values in layers.values()):
        return None
    order = sorted(layers)
    return [[layers[layer][k] for layer in order] for k in (0, 1)]


def _in_step(synthesise, by_kind: list[list[list[tuple]]]) -> None:
    """Keys' calls on this thread and values' on a thread of their own (:func:`_kinds_in_step`), meeting after
    each layer. Not on the shared pool: two sides that wait for each other, queued behind other reads' sides on
    a pool of two workers, would each hold a worker and wait forever. The first error (keys' before values')
    is raised once both sides have stopped; a side whose partner failed stops at the next meeting."""
    barrier = threading.Barrier(2)
    errors: list[BaseException | None] = [None, None]

    def side(k: int) -> None:
        try:
            for calls in by_kind[k]:
                synthesise(calls)
                barrier.wait()  # both kinds of this layer before either of the next
        except threading.BrokenBarrierError:
            pass  # the other side failed: its error is the one raised
        except BaseException as exc:  # noqa: BLE001 - handed to the caller below
            errors[k] = exc
            barrier.abort()

    with torch_single_thread():  # the two threads are the parallelism
        partner = threading.Thread(target=side, args=(1,), name="kvc-chain-values", daemon=True)
        partner.start()
        side(0)
        partner.join()
    for exc in errors:
        if exc is not None:
            raise exc


def _round_to_symbols(t: torch.Tensor) -> None:
    """Coefficients over their steps to symbols, in place: round half to even, NaN → 0, ±inf and beyond
    → ±SYMBOL_LIMIT (CODEC.md step 4)."""
    t.round_()
    torch.nan_to_num(t, nan=0.0, posinf=SYMBOL_LIMIT, neginf=-SYMBOL_LIMIT, out=t)
    t.clamp_(-SYMBOL_LIMIT, SYMBOL_LIMIT)


class KvqCodec:
    codec_id = CODEC_ID
    decodes_on_gpu = True  # decode_many writes into CUDA tensors through kvc.codec.rans.gpu

    def __init__(self, params: dict, profile: Profile | None):
        if profile is None:
            raise ProfileError("the kvq codec needs its profile")
        if not isinstance(profile, Profile):
            raise ProfileError("the kvq codec was given something that is not a profile")
        want = params.get("profile")
        if want and want != profile.sha256:
            raise ProfileError(f"this level was encoded with profile {str(want)[:16]}…, not {profile.sha256[:16]}…")
        scale = params.get("scale")
        if not isinstance(scale, numbers.Real) or isinstance(scale, bool):  # a number: not a string, not a bool
            raise FormatError("kvq level parameters lack a numeric scale")
        try:
            self.scale = float(scale)
        except OverflowError:  # an integer past float range (a library caller's params, not JSON's)
            raise FormatError("kvq scale out of range") from None
        if not (1e-6 <= self.scale <= 1e6):
            raise FormatError("kvq scale out of range")
        self.profile = profile
        self.sinks = profile.sinks
        self.fine_ids, self.fine_shift = _fine_params(params)
        self._fine_at: np.ndarray | None = None  # per context position: is its token a fine one (bind_tokens)
        self._grid = np.linspace(GRID[0], GRID[1], GRID[2])
        self._banks = self._mats = _shared_state(profile, self.scale)
        self._steps: dict[tuple[int, int], torch.Tensor] = {}
        self._rope: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._inv_freqs: dict[float, np.ndarray] = {}
        # version 5's reconstructions live in a ChainState per encode or read, never here (codecs are shared)

    @property
    def chained(self) -> bool:
        """Whether this level predicts each layer from the one before (profile version 5)."""
        return self.profile.chained

    def new_chain(self) -> ChainState | None:
        """A fresh :class:`ChainState` for one context's encode or read, or None when the level is not chained."""
        return ChainState() if self.profile.chained else None

    def bind_tokens(self, token_ids) -> None:
        """The context's token ids, which a level with fine tokens needs to encode (decoding reads the fine
        rows from each segment and needs nothing)."""
        if self.fine_ids is not None:
            self._fine_at = np.isin(np.asarray(list(token_ids), dtype=np.int64), self.fine_ids)

    def _fine_rows(self, start: int, count: int) -> np.ndarray | None:
        """The fine rows among positions ``start..start+count`` as offsets from ``start`` (None: the level has
        no fine tokens)."""
        if self.fine_ids is None:
            return None
        if self._fine_at is None or start + count > len(self._fine_at):
            raise ValueError("this level refines fine tokens: bind the context's token ids first (bind_tokens)")
        return np.flatnonzero(self._fine_at[start : start + count]).astype(np.int64)

    def _inv_freq(self, layer: int) -> np.ndarray | None:
        """The rotary frequencies keys of ``layer`` are un-rotated with (None: keys are coded as they are).
        A version-3 profile gives each layer its own base (e.g. Gemma 3's local and global layers)."""
        if self.profile.rotary is None:
            return None
        theta = self.profile.rotary_theta(layer)
        freqs = self._inv_freqs.get(theta)
        if freqs is None:
            freqs = self._inv_freqs[theta] = rope_inv_freq(theta, self.profile.rotary["dim"])
        return freqs

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
        """Quantiser steps ``[H, dim]`` (float64) of a (layer, kind): ``scale`` times the profile's per-coefficient
        base steps (a version-1 profile's per-head ``base_step``, repeated over the head's coefficients)."""
        key = (layer, k)
        if key not in self._steps:
            dim = self.profile.key_dim if k == 0 else self.profile.value_dim
            self._steps[key] = torch.from_numpy(self.profile.coded_steps(layer, k)[:, :dim] * self.scale)
        return self._steps[key]

    def bank(self, layer: int, k: int, dim: int) -> ChannelBank:
        key = (layer, k)
        bank = self._banks.get(key)
        if bank is None:
            sigma = self.profile.arrays["sigma"][layer, k, :, :dim].astype(np.float64)  # [H, dim]
            ratio = (sigma / self.steps(layer, k).numpy()).reshape(-1)
            radius = channel_radius(ratio)
            cdf = self.profile.arrays["cdf"][layer, k].astype(np.float64)
            bank = self._banks[key] = ChannelBank(bank_probabilities(ratio, radius, self._grid, cdf), radius)
        return bank

    def channel_models(self, layer: int, k: int) -> tuple[object, int]:
        """(the version-2 table bank of every (layer, kind, channel), the model id of this (layer, kind)'s
        channel 0). Built once per (profile, scale) for all layers, in one vectorised pass."""
        built = self._banks.get("v2")
        if built is None:
            from kvc.codec.rans.tables import build_bank, quantize_many

            p = self.profile
            weights, base, n = [], {}, 0
            for lay in range(p.layers):
                for kk, dim in ((0, p.key_dim), (1, p.value_dim)):
                    sigma = p.arrays["sigma"][lay, kk, :, :dim].astype(np.float64)
                    ratio = (sigma / self.steps(lay, kk).numpy()).reshape(-1)
                    cdf = p.arrays["cdf"][lay, kk].astype(np.float64)
                    weights += bank_weights(ratio, channel_radius(ratio), self._grid, cdf)
                    base[(lay, kk)] = n
                    n += len(ratio)
            built = self._banks["v2"] = (build_bank(quantize_many(weights)), base)
        bank, base = built
        return bank, base[(layer, k)]

    def _cos_sin(self, layer: int, start: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 (cos a, signed sin a) for re-rotation, cached: every layer of a chunk with the same rotary
        base shares them."""
        key = (self.profile.rotary_theta(layer), start, tokens)
        cs = self._rope.get(key)
        if cs is None:
            if len(self._rope) > 64:
                self._rope.clear()
            cos, sin = rope_cos_sin(start, tokens, self._inv_freq(layer))
            half = sin.shape[1] // 2
            sin = torch.cat([-sin[:, :half], sin[:, half:]], dim=1)  # folds rotate_half's sign in
            cs = self._rope[key] = (cos.float(), sin.float())
        return cs

    def _matrices(self, layer: int, k: int, dim: int):
        """(mean float64 [H, dim], per-head analysis float64 [H, dim, dim], basis float32, mean float32,
        synthesis float32): ``[H, dim, dim]`` (x_h = q_h @ synth_h + mean_h), or for a mixed profile
        ``[H, H·dim, dim]`` (x_h = Y @ synth_h + mean_h, Y the token-major ``[T, H·dim]`` symbols)."""
        key = ("m", layer, k)
        if key not in self._mats:
            basis16 = self.profile.arrays["basis"][layer, k, :, :dim, :dim]
            mean = torch.from_numpy(self.profile.arrays["mean"][layer, k, :, :dim].astype(np.float64))
            basis = torch.from_numpy(basis16.astype(np.float32))
            synth = torch.from_numpy(self._synthesis64(layer, k, dim).astype(np.float32))
            self._mats[key] = (mean, torch.from_numpy(analysis_matrix(basis16)), basis, mean.float(), synth)
        return self._mats[key]

    def _synthesis64(self, layer: int, k: int, dim: int) -> np.ndarray:
        """The synthesis matrices in float64 (the float32 ones are these rounded; the error bounds use these).
        Per head: ``diag(Δ_h)·B_hᵀ`` (decode folds the steps in: x = q @ (diag(Δ_h)·Bᵀ) + mean); mixed:
        ``scale · (Rᵀ)[:, h·dim:(h+1)·dim] · diag(step_h) · B_hᵀ`` (CODEC.md step 3b)."""
        B = self.profile.arrays["basis"][layer, k, :, :dim, :dim].astype(np.float64)  # [H, dim, dim]
        if not self.profile.mixed:
            return (B * self.steps(layer, k).numpy()[:, None, :]).transpose(0, 2, 1)
        H = B.shape[0]
        n = H * dim
        R = self.profile.arrays["mix"][layer, k, :n, :n].astype(np.float64)
        step = self.profile.component_steps(layer, k)[:, :dim]  # [H, dim]
        # W_h[i, j] = Σ_d (scale · R[h·dim + d, i] · step[h, d]) · B[h, j, d], summed over d in increasing order
        # (a fixed order, not a BLAS product's, so every decoder gets the same float64 and so float32 bits)
        out = np.zeros((H, n, dim))
        for h in range(H):
            for d in range(dim):
                out[h] += np.multiply.outer(self.scale * R[h * dim + d, :] * step[h, d], B[h, :, d])
        return out

    def _mixing(self, layer: int, k: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A mixed profile's (steps ``[H, dim]``, analysis ``inv(Rᵀ)`` ``[H·dim, H·dim]``), float64."""
        key = ("mix", layer, k)
        if key not in self._mats:
            n = self.profile.heads * dim
            R = self.profile.arrays["mix"][layer, k, :n, :n]
            step = torch.from_numpy(self.profile.component_steps(layer, k)[:, :dim])
            self._mats[key] = (step, torch.from_numpy(analysis_matrix(R[None])[0]))
        return self._mats[key]

    # ---- version 5: each layer predicted from the one before (CODEC.md step 3c) ----
    def _chain_mats(self, layer: int, k: int, dim: int):
        """A chained profile's per-(layer, kind) matrices: (predictor ``C`` float32 ``[H·Dk + H·Dv, H·dim]``,
        ``G = float32(scale · Rᵀ)`` ``[H·dim, H·dim]``, per-head synthesis ``S_h = float32(diag(step_h)·B_hᵀ)``
        ``[H, dim, dim]``, mean float32 ``[H, dim]``)."""
        key = ("chain", layer, k)
        if key not in self._mats:
            p = self.profile
            n = p.heads * dim
            R = p.arrays["mix"][layer, k, :n, :n].astype(np.float64)
            B = p.arrays["basis"][layer, k, :, :dim, :dim].astype(np.float64)  # [H, dim(j), dim(d)]
            step = p.component_steps(layer, k)[:, :dim]  # [H, dim]
            synth = (B * step[:, None, :]).transpose(0, 2, 1)  # S_h[d, j] = step[h, d] · B[h, j, d]
            self._mats[key] = (torch.from_numpy(p.chain_matrix(layer, k).astype(np.float32)),
                               torch.from_numpy((self.scale * R.T).astype(np.float32)),
                               torch.from_numpy(synth.astype(np.float32)),
                               torch.from_numpy(p.arrays["mean"][layer, k, :, :dim].astype(np.float32)))
        return self._mats[key]

    def _chain_prediction(self, state: ChainState, layer: int, k: int, dim: int, first: int, count: int,
                          side: str, given: set[int] | None = None) -> torch.Tensor:
        """The prediction ``P [count, H·dim]`` (float32) of tokens ``first..first+count`` of (layer, kind): 0 for
        layer 0, else ``[Ŵ_{l−1, key} | Ŵ_{l−1, value}] @ C`` (one float32 product) from the reconstructions
        ``state`` (this encode's or this read's) kept for exactly these tokens. Missing: when encoding a
        ValueError; when decoding an InputError if this read has decoded no layer l−1 at all (a chained level
        decodes every layer of its tokens, from 0, in one call or with one ``chain``), else a FormatError (the
        file's layers do not tile the same tokens, so it does not fit the profile). ``given``: the layers this
        read has or will have decoded by then (default: the state's), so that which error it is does not
        depend on how the token ranges were shared out among threads."""
        n = self.profile.heads * dim
        if layer == 0:
            return torch.zeros((count, n), dtype=torch.float32)
        prev = state.get(layer - 1, first, count)
        if prev[0] is None or prev[1] is None:
            where = (f"layer {layer} after layer {layer - 1}'s keys and values of the same tokens "
                     f"({first}..{first + count})")
            if side == "encode":
                raise ValueError(f"a chained (version-5) kvq level encodes {where}, in one encode_many call "
                                 "or with one chain state")
            if layer - 1 not in (state.layers if given is None else given):
                raise InputError(f"a chained (version-5) kvq level decodes {where}: give one read every layer of "
                                 "its tokens from layer 0 (one decode_many call, or one chain state)")
            raise FormatError(f"a chained (version-5) kvq level decodes {where}; this file's layers do not "
                              "tile the same tokens")
        return torch.mm(torch.cat(prev, dim=1), self._chain_mats(layer, k, dim)[0])

    def _chain_reconstruct(self, q: torch.Tensor, pred: torch.Tensor, layer: int, k: int, dim: int) -> torch.Tensor:
        """``Ŵ = P + q @ G`` (float32 ``addmm``): the step-scaled reconstruction from the symbols ``q [T, H·dim]``
        (float32, fine rows already times ``2^−s``). Encoder and decoder both call this on one segment's rows."""
        return torch.addmm(pred, q, self._chain_mats(layer, k, dim)[1])

    def _chain_symbols(self, state: ChainState, x: torch.Tensor, start: int, layer: int, k: int, dim: int,
                       ranges: list[tuple[int, int]]) -> np.ndarray:
        """:meth:`_symbols` for a chained profile: body tokens ``x [H, T, dim]`` from ``start``, coded segment
        by segment (``ranges``: (first row, rows)), each against the prediction from the previous layer's
        reconstruction of its tokens, closed loop: every segment's reconstruction is computed as the decoder
        computes it and kept for the next layer."""
        H, T, _ = x.shape
        n = H * dim
        w = self._pre_symbols(x, start, layer, k, dim)  # [H, T, dim] PCA coefficients, float64
        step, mix_analysis = self._mixing(layer, k, dim)
        w.div_(step[:, None, :])
        w = w.permute(1, 0, 2).reshape(T, n)  # token-major, a copy
        fine = self._fine_rows(start, T)
        factor = float(1 << self.fine_shift) if fine is not None else 1.0
        q = torch.empty((T, n), dtype=torch.float64)
        for r0, count in ranges:
            pred = self._chain_prediction(state, layer, k, dim, start + r0, count, "encode")
            y = (w[r0 : r0 + count] - pred.double()) @ mix_analysis
            y.div_(self.scale)
            rows = None
            if fine is not None:
                rows = torch.from_numpy(fine[(fine >= r0) & (fine < r0 + count)] - r0)
                if len(rows):
                    y[rows] *= factor
            _round_to_symbols(y)
            q[r0 : r0 + count] = y
            qf = y.float()  # the decoder's float32 symbols (int → float32 rounds to nearest, as this does)
            if rows is not None and len(rows):
                qf[rows] *= np.float32(1.0 / factor)
            recon = self._chain_reconstruct(qf, pred, layer, k, dim)
            state.put(layer, k, start + r0, count, recon)
        return q.reshape(T, H, dim).permute(1, 0, 2).to(torch.int64).numpy()

    def _chain_synthesise(self, state: ChainState, coef: torch.Tensor, layer: int, k: int, first: int,
                          out: torch.Tensor, lead: int, ranges: list[tuple[int, int]],
                          given: set[int] | None = None, span: tuple[int, int] | None = None) -> None:
        """Decode side of step 3c for one (layer, kind): symbols ``coef [H, T, dim]`` (float32, fine rows
        scaled) → per segment ``Ŵ = P + Q @ G`` (kept for the next layer) → per head ``x_h = Ŵ_h @ S_h + mean_h``
        into ``out[:, lead:]``, then re-rotation and clamping as :meth:`_synthesise_into`. ``span`` ``(i0, i1)``:
        only the segments ``ranges[i0:i1]`` (consecutive rows), the share of one thread (:func:`_synthesis_shares`)."""
        from kvc.codec.finish import finish_in_place

        H, _, dim = coef.shape
        i0, i1 = span if span is not None else (0, len(ranges))
        a = ranges[i0][0]
        b = ranges[i1 - 1][0] + ranges[i1 - 1][1]
        T, n = b - a, H * dim
        q = coef[:, a:b].permute(1, 0, 2).reshape(T, n)  # token-major (a copy)
        recon = torch.empty((T, n), dtype=torch.float32)
        for r0, count in ranges[i0:i1]:
            at = r0 - a
            pred = self._chain_prediction(state, layer, k, dim, first + r0, count, "decode", given)
            recon[at : at + count] = self._chain_reconstruct(q[at : at + count], pred, layer, k, dim)
            state.put(layer, k, first + r0, count, recon[at : at + count])
        _, _, synth, mean32 = self._chain_mats(layer, k, dim)
        direct = out.dtype == torch.float32 and out.is_contiguous() and out.device.type == "cpu"
        dest = out[:, lead + a : lead + b] if direct else torch.empty((H, T, dim), dtype=torch.float32)
        for h in range(H):  # each head's rows of the span are contiguous in out
            torch.addmm(mean32[h], recon[:, h * dim : (h + 1) * dim], synth[h], out=dest[h])
        cos = sin = None
        if k == 0 and self.profile.rotary is not None:
            cos, sin = (t.numpy() for t in self._cos_sin(layer, first + a, T))
        finish_in_place(dest.numpy(), cos, sin)
        if not direct:
            big = _finite_range(out.dtype)
            out[:, lead + a : lead + b] = dest.clamp_(-big, big).to(dtype=out.dtype, device=out.device)

    # ---- what a reader may allocate (kvc.api._check_decoded_size) ----
    def table_bytes(self, layers: list[int]) -> int:
        """Memory of the coding tables a decode builds: version 2 builds every layer's at once (and a
        version-1 file builds the touched layers'), so this counts all layers, per the profile's estimate."""
        return self.profile.coding_table_bytes(self.scale, list(range(self.profile.layers)))

    def min_segment_bytes(self, segment: Segment) -> int:
        """The shortest segment that can hold ``segment``: its head, its sinks as float16 and, with body
        tokens, its channel flags (both versions hold at least that)."""
        H, T, D = segment.shape
        n_sink = sink_count(segment.start, T, self.sinks)
        return 4 + (1 + 2 * H * n_sink * D if n_sink else 0) + ((H * D + 7) // 8 if T > n_sink else 0)

    # ---- error bounds (docs/CODEC.md "Error bounds") ----
    ARITH_REL_SLACK = 2.0**-14  # float32 synthesis/rotation rounding, relative to |x| (≈ 64·2⁻²⁴ needed)
    SINK_REL_ERROR = 2.0**-11  # float16 storage of sink tokens: half an ulp, relative
    SINK_ABS_ERROR = 2.0**-24  # … and at most half the float16 subnormal spacing absolutely
    RMSE_SAFETY = 2.0  # statistical bound: factor over the profile-predicted relative RMSE

    def max_abs_error_bound(self, layer: int, kind: str, dtype: torch.dtype = torch.float32) -> float:
        """Strict bound on |decoded − original| for every element at a position ≥ ``profile.sinks``.

        Quantisation leaves every PCA coefficient d within Δ_{h,d}/2 of its value (escapes are exact), so a
        pre-rotary element j of head h is off by at most Σ_d Δ_{h,d}/2·|B[j,d]|; re-rotation mixes the pair
        (j, j+D/2) by a plane rotation, so keys get the pair's Euclidean norm. Holds for finite inputs
        whose coefficients stay below 2³⁰·Δ (2^(30−s)·Δ on a fine row, whose step is 2^s times finer, so the
        bound holds there with room), up to float32 arithmetic (≤ ARITH_REL_SLACK·|x| more);
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
        # each coded coefficient is within Δ/2 of its value: an output element is off by at most the sum of
        # |its synthesis column| · Δ/2 (Δ is folded into the synthesis matrix; per head or mixed alike)
        b = 0.5 * np.abs(self._synthesis64(layer, k, dim)).sum(axis=1)  # [H, D]: per output element
        if k == 0 and self.profile.rotary is not None:
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
                if p.mixed:  # coded coefficient j reaches the output scaled by g_j = Σ_i step_i²·R[i, j]²
                    n = p.heads * dim
                    R = p.arrays["mix"][:, k, :n, :n].astype(np.float64)  # [L, n, n]
                    st = p.component_steps()[:, k, :, :dim].reshape(-1, n)  # [L, n]
                    g = (st[:, :, None] ** 2 * R**2).sum(1)  # [L, n]
                    sig = sigma.reshape(-1, n)
                    err += float((np.minimum(self.scale**2 / 12.0, sig**2) * g).sum())
                    energy += float((sig**2 * g).sum() + (mean**2).sum())
                    continue
                step = p.component_steps()[:, k, :, :dim] * self.scale  # [L, H, D]
                err += float(np.minimum(step**2 / 12.0, sigma**2).sum())
                energy += float((sigma**2).sum() + (mean**2).sum())
            self._rmse_bound = self.RMSE_SAFETY * (err / energy) ** 0.5 if energy > 0 else float("inf")
        return self._rmse_bound

    # ---- the contract ----
    def encode(self, tensor: torch.Tensor, segment: Segment, chain: ChainState | None = None) -> bytes:
        """One segment's bytes. A chained level encodes layer l > 0 only with the ``chain`` (:meth:`new_chain`)
        that encoded layer l−1 of the same tokens."""
        if tuple(tensor.shape) != tuple(segment.shape):
            raise ValueError(f"tensor shape {tuple(tensor.shape)} != segment shape {tuple(segment.shape)}")
        if self.profile.chained:  # its products run with one torch thread, as encode_many's and decode's do
            return self.encode_many([(tensor, [segment])], threads=1, chain=chain)[0][0]
        return self._encode_group(tensor, [segment])[0]

    def encode_many(self, groups: list[tuple[torch.Tensor, list[Segment]]], threads: int | None = None,
                    chain: ChainState | None = None):
        """Encode each (layer, kind)'s whole tensor ``[H, T, D]`` at once: the transforms run over all its
        tokens in one pass, then its segments (which tile it in order) are cut and coded, every lane of
        the layer in one kernel call. Groups run on a thread pool as in :meth:`decode_many`. The bytes
        are exactly what :meth:`encode` writes segment by segment.

        A chained level keeps the reconstructions it predicts the next layer from in ``chain``: the caller's
        (one per context, carried over the calls that encode its layers in order), else a fresh one for this
        call alone, which must then hold layer 0 of its tokens onward."""

        results: list[list[bytes] | None] = [None] * len(groups)
        state = (chain if chain is not None else ChainState()) if self.profile.chained else None

        def task(i: int) -> None:
            results[i] = self._encode_group(*groups[i], state)

        if self.profile.chained:  # layer l needs layer l−1's reconstruction: layers in order, one at a time
            first = [groups[i][1][0] for i in range(len(groups))]
            order = sorted(range(len(groups)), key=lambda i: (first[i].layer, _KINDS.get(first[i].kind, 0)))
            run_tasks(lambda: [task(i) for i in order], [()], 1, torch_single=True)
            return results  # type: ignore[return-value]
        run_tasks(task, [(i,) for i in range(len(groups))], threads, torch_single=True)
        return results  # type: ignore[return-value]

    def _symbols(self, x: torch.Tensor, start: int, layer: int, k: int, dim: int) -> np.ndarray:
        """The quantised PCA coefficients ``[H, T, D]`` (int64) of body tokens ``x`` starting at ``start``.

        The same operations, in the same order, as ``quantize_uniform(bmm(unrotate_keys(clamp(nan_to_num(
        x.double()))) - mean, analysis), step)`` (so the same bits), but done in place on one float64
        working copy: a layer's encode holds two float64 frames at a time instead of six."""
        coef = self._pre_symbols(x, start, layer, k, dim)
        if self.profile.mixed:  # CODEC.md step 3b: over the steps, then across the heads
            step, mix_analysis = self._mixing(layer, k, dim)
            coef.div_(step[:, None, :])
            H, T, _ = coef.shape
            coef = (coef.permute(1, 0, 2).reshape(T, H * dim) @ mix_analysis).reshape(T, H, dim)
            coef = coef.permute(1, 0, 2).contiguous()
        coef.div_(self.steps(layer, k)[:, None, :])  # quantize_uniform, in place
        fine = self._fine_rows(start, coef.shape[1])
        if fine is not None and len(fine):  # fine rows: steps 2**shift times finer (an exact power of two)
            coef[:, torch.from_numpy(fine)] *= float(1 << self.fine_shift)
        _round_to_symbols(coef)
        return coef.to(torch.int64).numpy()

    def _pre_symbols(self, x: torch.Tensor, start: int, layer: int, k: int, dim: int) -> torch.Tensor:
        """Steps 2–3 of :meth:`_symbols`: the per-head PCA coefficients ``[H, T, dim]`` (float64) of ``x``."""
        w = x.to(torch.float64, copy=True)  # never the caller's tensor, even when it is float64 already
        torch.nan_to_num(w, nan=0.0, out=w)
        big = _finite_range(x.dtype)
        w.clamp_(-big, big)
        if k == 0 and self.profile.rotary is not None:  # unrotate_keys: w * cos - rotate_half(w) * sin
            cos, sin = rope_cos_sin(start, w.shape[1], self._inv_freq(layer))
            half = w.shape[-1] // 2
            r = torch.cat([-w[..., half:], w[..., :half]], dim=-1)
            r.mul_(sin)
            w.mul_(cos)
            w.sub_(r)
            del r
        mean, analysis, *_ = self._matrices(layer, k, dim)
        w.sub_(mean[:, None, :])
        return torch.bmm(w, analysis)

    def _encode_group(self, tensor: torch.Tensor, segments: list[Segment],
                      state: ChainState | None = None) -> list[bytes]:
        from kvc.codec.rans import cpu

        if sum(s.shape[1] for s in segments) != tensor.shape[1]:
            raise ValueError("segments do not tile the tensor")
        layer, k, dim = self._dims(segments[0])
        H, T, D = tensor.shape
        lead = sink_count(segments[0].start, T, self.sinks)  # sinks lead the layer (positions < sinks)
        pieces, at, body_at, fines = [], 0, 0, []
        for seg in segments:
            t = seg.shape[1]
            n_sink = sink_count(seg.start, t, self.sinks)
            sinks = pack_sinks(tensor[:, at : at + n_sink]) if n_sink else None
            body = t - n_sink
            pieces.append((sinks, body_at, body))  # the segment's body: q[:, body_at : body_at + body]
            fines.append(self._fine_rows(seg.start + n_sink, body))
            at += t
            body_at += body
        q = None
        if T > lead and self.profile.chained:  # closed loop, segment by segment (CODEC.md step 3c)
            q = self._chain_symbols(state if state is not None else ChainState(), tensor[:, lead:],
                                    segments[0].start + lead, layer, k, dim,
                                    [(b0, body) for _, b0, body in pieces if body])
        elif T > lead:
            q = self._symbols(tensor[:, lead:], segments[0].start + lead, layer, k, dim)
        # every lane of the layer in one call; a segment's symbols are channel-major: [H·D, body]
        bank, model0 = self.channel_models(layer, k)
        lo, hi, models, outs, tokens, coded, owners, offset = [], [], [], [], [], [], [], 0
        flagged_per = []
        for i, (_, b0, body) in enumerate(pieces):
            if not body:
                flagged_per.append(None)
                continue
            flagged = np.flatnonzero(np.any(q[:, b0 : b0 + body] != 0, axis=1).reshape(-1)).astype(np.int64)
            flagged_per.append(flagged)
            n_lanes = kvq_segment.choose_lanes(len(flagged), body)
            if n_lanes == 0:
                continue
            bounds = kvq_segment.lane_bounds(len(flagged), n_lanes)
            base = sum(len(m) for m in models)
            lo.append(base + bounds[:-1])
            hi.append(base + bounds[1:])
            models.append(model0 + flagged)
            outs.append(offset + flagged * body)
            tokens.append(np.full(len(flagged), body, np.int64))
            coded.append((b0, body))
            owners += [i] * n_lanes
            offset += H * D * body
        lanes_of: dict[int, list[np.ndarray]] = {}
        if lo:
            # the coded segments' symbols, transposed straight into one buffer (no per-segment copies)
            values, at = np.empty(offset, np.int64), 0
            for b0, body in coded:
                values[at : at + H * D * body].reshape(H, D, body)[...] = q[:, b0 : b0 + body].transpose(0, 2, 1)
                at += H * D * body
            q = None  # the lanes need only `values` now
            job = {"ch_lo": np.concatenate(lo), "ch_hi": np.concatenate(hi), "ch_model": np.concatenate(models),
                   "ch_out": np.concatenate(outs), "ch_tokens": np.concatenate(tokens)}  # fmt: skip
            job["ch_stride"] = np.ones(len(job["ch_model"]), np.int64)
            words, status = cpu.encode(job, bank, values, threads=1)
            del values
            if status.any():  # symbols are clamped to ±2**30, so this is a bug, not bad input
                raise RuntimeError("kvq lane encoder refused its own symbols")
            for owner, w in zip(owners, words):
                lanes_of.setdefault(owner, []).append(w)
        return [
            kvq_segment.write(sinks, H * D if body else 0,
                              flagged if flagged is not None else np.zeros(0, np.int64), lanes_of.get(i, []),
                              fine, self.fine_shift)
            for i, ((sinks, _, body), flagged, fine) in enumerate(zip(pieces, flagged_per, fines))
        ]  # fmt: skip

    def decode(self, data: bytes, segment: Segment, chain: ChainState | None = None) -> torch.Tensor:
        """One segment, decoded. A chained level decodes layer l > 0 only with the ``chain`` (:meth:`new_chain`)
        that decoded layer l−1 of the same tokens (else InputError)."""
        out = torch.empty(segment.shape, dtype=segment.dtype)
        self.decode_many([([(data, segment)], out)], threads=1, chain=chain)
        return out

    def decode_many(self, groups: list[tuple[list[tuple[bytes, Segment]], torch.Tensor]], threads: int | None = None,
                    chain: ChainState | None = None):
        """Decode many segments straight into their output tensors.

        Each group is one (layer, kind)'s consecutive segments and the ``[H, T, D]`` tensor (in the
        segments' dtype) they tile in order. On the CPU groups are packed into batches of a few MB of
        coefficients (a whole read: a few layers; a streamed chunk: a third of its layers), and every
        batch is one task on a pool of ``threads`` (default: every core): its segments are parsed and
        all its lanes decoded by numba kernels (GIL released) into float32 coefficients, then each
        group is synthesised, so one task's Python glue overlaps another's compiled work and a
        chunk's short lanes still run four at a time. On a CUDA device all lanes of all groups go to
        the GPU in one launch. Version-1 groups decode segment by segment.

        A chained level (version 5) decodes each layer from the previous layer's reconstruction of the same
        tokens, kept in ``chain``: the caller's (one per read of one context, carried over its calls in layer
        order), else a fresh one for this call alone, which must then be given every layer of its tokens from
        layer 0 (a layer whose layer before is missing from the call: InputError). Never on the codec, which
        other reads share."""

        if not groups:
            return
        device = groups[0][1].device
        for parts, out in groups:
            if sum(seg.shape[1] for _, seg in parts) != out.shape[1] or out.device != device:
                raise ValueError("segments do not tile their output")
        if self.profile.chained:
            self._decode_chained(groups, threads, chain)
            return
        if device.type != "cpu":
            self._decode_on_gpu(groups)
            return
        batches, batch, size = [], [], 0
        for group in groups:
            batch.append(group)
            size += group[1].numel()
            if size >= BATCH_COEFFICIENTS:
                batches.append((batch,))
                batch, size = [], 0
        if batch:
            batches.append((batch,))
        run_tasks(self._decode_batch, batches, threads, torch_single=True)

    def _plan(self, groups) -> tuple[list[tuple], list[tuple], int, list[tuple]]:
        """Parses the groups and places their sinks (version-1 groups are decoded right there); returns
        (per group with body tokens: (out, layer, kind, first body position, offset of its coefficient
        block, sink tokens leading it, its segments' (first row, rows) in the block), the bodies for
        :meth:`_lane_job`, coefficients in all, the fine
        rows to scale: (block offset, [H, T, D] of the block, rows in it, factor))."""
        plans, offset, bodies, fine = [], 0, [], []
        for parts, out in groups:
            parsed = self._parse_group(parts, out)
            if parsed is None:
                continue
            layer, k, _ = self._dims(parts[0][1])
            H, T, D = out.shape
            lead = self._place_sinks(parsed, out)
            if T > lead:
                bodies += [(p, layer, k, offset, T - lead) for p in self._bodies(parsed)]
                fine += [(offset, (H, T - lead, D), t0 + p.fine, 2.0**-p.shift)
                         for p, t0 in self._bodies(parsed) if p.fine is not None and len(p.fine)]
                ranges = [(t0, p.body) for p, t0 in self._bodies(parsed)]
                plans.append((out, layer, k, parsed[0].segment.start + lead, offset, lead, ranges))
                offset += H * (T - lead) * D
        return plans, bodies, offset, fine

    def _decode_batch(self, groups: list[tuple[list[tuple[bytes, Segment]], torch.Tensor]]) -> None:
        """Some (layer, kind)s' segments into their outputs on the CPU: one lane job, then one
        synthesis per group."""
        plans, coef = self._decode_symbols(groups)
        for out, layer, k, first, off, lead, _ in plans:
            H, T, D = out.shape
            c = torch.from_numpy(coef[off : off + H * (T - lead) * D]).view(H, T - lead, D)
            if out.dtype == torch.float32 and out.is_contiguous():
                self._synthesise_into(c, layer, k, first, out, lead)
            else:
                out[:, lead:] = self._synthesise(c, layer, k, first, out.dtype)

    def _decode_chained(self, groups, threads: int | None, chain: ChainState | None = None) -> None:
        """A chained profile's read: the lanes of every batch on the pool, as :meth:`_decode_batch`; then the
        (layer, kind)s synthesised in layer order, each from the previous layer's reconstruction (step 3c), the
        token ranges shared out on the pool (:func:`_synthesis_shares`), or for one token range (a streamed
        chunk) its keys and values side by side (:func:`_in_step`).
        Outputs on a GPU are decoded on the CPU and copied (the chain has no GPU path yet). The reconstructions
        live in ``chain``, else in a state of this call's own."""
        state = chain if chain is not None else ChainState()
        on_cpu = []
        for parts, out in groups:
            host = out if out.device.type == "cpu" else torch.empty(out.shape, dtype=out.dtype)
            on_cpu.append((parts, host, out))
        batches, batch, size = [], [], 0
        for parts, host, _ in on_cpu:
            batch.append((parts, host))
            size += host.numel()
            if size >= BATCH_COEFFICIENTS:
                batches.append((batch,))
                batch, size = [], 0
        if batch:
            batches.append((batch,))
        decoded: list[tuple[list, np.ndarray]] = []

        def lanes(batch) -> None:
            decoded.append(self._decode_symbols(batch))

        run_tasks(lanes, batches, threads, torch_single=True)
        work = sorted(((plan, coef) for plans, coef in decoded for plan in plans), key=lambda pc: (pc[0][1], pc[0][2]))
        # Known before any thread starts, in layer order as a serial read would have them when it needs them.
        given = state.layers | {plan[1] for plan, _ in work}

        def synthesise(calls) -> None:
            for ((out, layer, k, first, off, lead, ranges), coef), span in calls:
                H, T, D = out.shape
                c = torch.from_numpy(coef[off : off + H * (T - lead) * D]).view(H, T - lead, D)
                self._chain_synthesise(state, c, layer, k, first, out, lead, ranges, given, span)

        pool = threads or default_threads()
        shares = _synthesis_shares(work, pool)
        by_kind = _kinds_in_step(shares[0]) if len(shares) == 1 and pool >= 2 else None
        if by_kind is not None:  # one token range (a streamed chunk): keys and values side by side, layer by layer
            _in_step(synthesise, by_kind)
        else:
            run_tasks(synthesise, [(calls,) for calls in shares], threads, torch_single=True)
        for _, host, out in on_cpu:
            if host is not out:
                out.copy_(host)

    def _decode_symbols(self, groups) -> tuple[list[tuple], np.ndarray]:
        """(the groups' plans (:meth:`_plan`), their symbols as float32 coefficients, fine rows scaled): sinks
        placed, every lane decoded on the CPU, nothing synthesised."""
        from kvc.codec.rans import cpu

        plans, bodies, offset, fine = self._plan(groups)
        if not plans:
            return [], np.empty(0, dtype=np.float32)
        coef = np.empty(offset, dtype=np.float32)
        job, owners, zero = self._lane_job(bodies)
        cpu.zero_channels(coef, zero["at"], zero["tokens"], zero["stride"])  # channels no lane writes are 0
        if len(job["word_lo"]):
            status = cpu.decode(job, self.channel_models(0, 0)[0], coef, threads=1)
            bad = np.flatnonzero(status)
            if len(bad):
                self._check_lanes(status[bad[:1]], *owners(bad[0]))
        for idx, factor in _fine_elements(fine):  # symbols in finer steps: q · 2**-s (exact in float32)
            coef[idx] *= np.float32(factor)
        return plans, coef

    def _decode_on_gpu(self, groups) -> None:
        """Every lane of every group in one GPU launch, then one synthesis per group on the device."""
        from kvc.codec.rans import gpu

        plans, bodies, offset, fine = self._plan(groups)
        coef = torch.zeros(offset, dtype=torch.float32, device=groups[0][1].device)  # unflagged channels: 0
        if bodies:
            job, owners, _ = self._lane_job(bodies)
            if len(job["word_lo"]):
                status = gpu.decode(job, self.channel_models(0, 0)[0], coef)
                bad = np.flatnonzero(status)
                if len(bad):
                    self._check_lanes(status[bad[:1]], *owners(bad[0]))
        for idx, factor in _fine_elements(fine):  # one transfer and one scatter per shift, not per segment
            coef[torch.from_numpy(idx).to(coef.device)] *= factor
        for out, layer, k, first, off, lead, _ in plans:
            H, T, D = out.shape
            c = coef[off : off + H * (T - lead) * D].view(H, T - lead, D)
            out[:, lead:] = self._synthesise(c, layer, k, first, out.dtype)

    @staticmethod
    def _bodies(parsed: list[_ParsedV2]) -> list[tuple[_ParsedV2, int]]:
        """(segment, its first token in the layer's coefficient block) for segments with a body."""
        bodies, t0 = [], 0
        for p in parsed:
            if p.body:
                bodies.append((p, t0))
            t0 += p.body
        return bodies

    def _lane_job(self, bodies) -> tuple[dict, Callable[[int], tuple[int, int]], dict]:
        """(the lane job, lane → the (layer, kind) owning it, the unflagged channels) for bodies given as
        ((segment, t0), layer, kind, offset of its coefficient block, tokens in that block)."""
        from kvc.codec.kvq_lanes import Body, build_job

        spec, owner_of = [], []
        for (p, t0), layer, k, off, span in bodies:
            H, _, D = p.segment.shape
            _, model0 = self.channel_models(layer, k)
            spec.append(Body(p.data, p.pos, p.body, p.lanes, H * D, D, span, t0, off, model0))
            owner_of.append((layer, k))
        job, lane_seg, zero = build_job(spec)
        return job, lambda lane: owner_of[int(lane_seg[lane])], zero

    def _parse_group(self, parts, out: torch.Tensor) -> list[_ParsedV2] | None:
        """The group's version-2 segments, parsed and checked; a version-1 group is decoded right here
        (returns None)."""
        versions = {kvq_segment.read_head(data)[0] for data, _ in parts}
        if len(versions) > 1:
            raise FormatError("a layer's kvq segments mix bitstream versions")
        if versions == {1}:
            at = 0
            for data, seg in parts:
                out[:, at : at + seg.shape[1]] = self._decode_v1(bytes(data), seg)
                at += seg.shape[1]
            return None
        return [self._parse_v2(data, seg) for data, seg in parts]

    @staticmethod
    def _place_sinks(parsed: list[_ParsedV2], out: torch.Tensor) -> int:
        """Writes the sink tokens; returns how many lead the layer (sinks are the positions
        < profile.sinks, so they come first and every body follows them)."""
        at = 0
        for p in parsed:
            if p.sinks is not None:
                out[:, at : at + p.sinks.shape[1]] = p.sinks.to(out.device)
            at += p.segment.shape[1]
        return sum(p.sinks.shape[1] for p in parsed if p.sinks is not None)

    @staticmethod
    def _check_lanes(status: np.ndarray, layer: int, k: int) -> None:
        from kvc.codec.rans import OK

        bad = np.flatnonzero(status != OK)
        if len(bad):
            raise FormatError(f"corrupt entropy-coded payload (layer {layer} {('key', 'value')[k]}, "
                              f"lane error {int(status[bad[0]])})")  # fmt: skip

    def _parse_v2(self, data: bytes, segment: Segment) -> _ParsedV2:
        """A version-2 segment's sinks and lanes, every length checked against its bytes."""
        layer, k, dim = self._dims(segment)
        H, T, D = segment.shape
        version, flags_byte, n_lanes = kvq_segment.read_head(data)
        if version not in (kvq_segment.VERSION, kvq_segment.FINE_VERSION):
            raise VersionError(f"kvq segment version {version} needs a newer kvc")
        n_sink = sink_count(segment.start, T, self.sinks)
        if flags_byte != (1 if n_sink else 0):
            raise FormatError("kvq segment flags do not match its position")
        pos, sinks = 4, None
        if n_sink:
            sinks, pos = unpack_sinks(data, pos, (H, n_sink, D))
        body = T - n_sink
        if body == 0 and (pos != len(data) or n_lanes):
            raise FormatError("kvq segment holds bytes past its sinks")
        fine, shift = None, 0
        if version == kvq_segment.FINE_VERSION and body:
            fine, shift, pos = kvq_segment.read_fine(data, pos, body)
        return _ParsedV2(segment, sinks, data, pos, n_lanes, body, fine, shift)  # the body: kvq_lanes checks it

    def _synthesise(self, coef: torch.Tensor, layer: int, k: int, first: int, dtype: torch.dtype) -> torch.Tensor:
        """Coefficients ``[H, T, D]`` (float32) → keys/values at absolute positions ``first..``, in ``dtype``."""
        _, _, _, mean32, synth = self._matrices(layer, k, coef.shape[2])
        if coef.device.type != "cpu":
            mean32, synth = self._on_device(("m", layer, k), (mean32, synth), coef.device)
        if self.profile.mixed:
            x = torch.empty(coef.shape, dtype=torch.float32, device=coef.device)
            self._product_into(coef, mean32, synth, x)
        else:
            x = torch.baddbmm(mean32[:, None, :], coef, synth)
        if k == 0 and self.profile.rotary is not None:
            cos, sin = self._cos_sin(layer, first, coef.shape[1])
            if coef.device.type != "cpu":
                cos, sin = cos.to(coef.device), sin.to(coef.device)
            half = coef.shape[2] // 2
            rot = x * cos
            rot[..., :half].addcmul_(x[..., half:], sin[:, :half])
            rot[..., half:].addcmul_(x[..., :half], sin[:, half:])
            x = rot
        big = _finite_range(dtype)
        return torch.nan_to_num_(x, nan=0.0, posinf=big, neginf=-big).clamp_(-big, big).to(dtype)

    def _synthesise_into(self, coef: torch.Tensor, layer: int, k: int, first: int, out: torch.Tensor, lead: int):
        """:meth:`_synthesise` for a contiguous float32 CPU output, bit-identical: each head's matrix product
        written straight into ``out[h, lead:]`` (a contiguous block; ``addmm`` there gives the same bits as
        the batched ``baddbmm``, tested), then re-rotation and clamping fused into one pass in place. No
        temporary the size of the layer: a 2k-token read no longer allocates and faults in ~90 MB."""
        from kvc.codec.finish import finish_in_place

        _, _, _, mean32, synth = self._matrices(layer, k, coef.shape[2])
        self._product_into(coef, mean32, synth, out[:, lead:])
        cos = sin = None
        if k == 0 and self.profile.rotary is not None:
            cos, sin = (t.numpy() for t in self._cos_sin(layer, first, coef.shape[1]))
        finish_in_place(out.numpy()[:, lead:], cos, sin)

    def _product_into(self, coef: torch.Tensor, mean32, synth, dest: torch.Tensor) -> None:
        """``dest[h] = src @ synth[h] + mean32[h]``, one ``addmm`` per head into ``dest [H, T, D]`` (each
        ``dest[h]`` contiguous): ``src`` is head ``h``'s coefficients, or for a mixed profile every head's,
        token-major ``[T, H·D]``."""
        H, T, D = coef.shape
        y = coef.permute(1, 0, 2).reshape(T, H * D) if self.profile.mixed else None
        for h in range(H):
            torch.addmm(mean32[h], coef[h] if y is None else y, synth[h], out=dest[h])

    def _on_device(self, key, tensors: tuple, device: torch.device) -> tuple:
        """Copies of per-(layer, kind) matrices on ``device``, made once."""
        cache = self._mats.setdefault(("device", str(device)), {})
        if key not in cache:
            cache[key] = tuple(t.to(device) for t in tensors)
        return cache[key]

    def _decode_v1(self, data: bytes, segment: Segment) -> torch.Tensor:
        layer, k, dim = self._dims(segment)
        H, T, D = segment.shape
        if len(data) < 4:
            raise FormatError("truncated kvq segment")
        version, flags_byte, reserved = struct.unpack_from("<BBH", data, 0)
        if version != 1:
            raise FormatError(f"unknown kvq segment version {version}")
        if reserved:
            raise FormatError("kvq segment reserved bytes set")
        if self.profile.mixed:  # no kvc ever wrote one: version-1 segments predate mixed profiles
            raise FormatError("a version-1 kvq segment cannot name a mixed (version-4) profile")
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
            if k == 0 and self.profile.rotary is not None:
                cos, sin = self._cos_sin(layer, segment.start + n_sink, body)
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
        """(information content under the float models, rANS bits actually written) for the coder-efficiency
        check; each escape's excess counts 32 bits on both sides (it is stored raw). Not for a chained
        profile, whose symbols depend on the previous layer's reconstruction."""
        if self.profile.chained:
            raise NotImplementedError("model_bits codes one segment alone: a chained profile needs the layer before")
        layer, k, dim = self._dims(segment)
        H, T, D = segment.shape
        n_sink = sink_count(segment.start, T, self.sinks)
        q = self._symbols(tensor[:, n_sink:], segment.start + n_sink, layer, k, dim)
        sym = np.ascontiguousarray(q.transpose(0, 2, 1).reshape(H * D, T - n_sink))
        bank = self.bank(layer, k, dim)
        escapes = int(np.count_nonzero(np.abs(sym) >= bank.radius[:, None]))
        blob = self.encode(tensor, segment)
        version, _, n_lanes = kvq_segment.read_head(blob)
        head = 4 + (len(pack_sinks(tensor[:, :n_sink])) if n_sink else 0)
        if version == kvq_segment.FINE_VERSION and T > n_sink:
            head = kvq_segment.read_fine(blob, head, T - n_sink)[2]
        lanes = kvq_segment.parse_body(blob, head, H * D, T - n_sink, n_lanes)
        return bank.cross_entropy_bits(sym) + 32 * escapes, 16 * len(lanes.words)
