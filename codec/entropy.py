"""Entropy coding: per-channel categorical models behind a tiny interface, coded with constriction's ANS.

A *bank* holds one categorical model per channel (a channel = one (head, coefficient) of one
(layer, K/V)); its alphabet is ``-R..R`` and the two end symbols are escapes: a symbol whose
magnitude reaches ``R`` is coded as ``±R`` and its excess ``|q| - R`` goes to a side list. A
per-channel flag says whether a channel has any nonzero symbol in the segment; all-zero channels
cost one bit and nothing is decoded for them (PCA leaves many such channels at coarse steps).

The models come from the profile: a channel's probabilities are the mass that the (layer, kind)
*shape* — the pooled CDF of the standardised coefficients, tabulated on a fixed grid and linearly
interpolated — puts on each quantiser bin, scaled by the channel's calibration std over the step.
Only linear interpolation and basic arithmetic are involved, so a second decoder can rebuild the
exact same float64 probabilities. constriction then quantises them (``Categorical(perfect=False)``,
24-bit precision) and codes with a 32-bit-word stack ANS coder.
"""

from __future__ import annotations

import constriction
import numpy as np

from kvc.errors import FormatError

PROB_FLOOR = 2.0**-20  # every symbol stays encodable, even ones the profile never saw
MAX_RADIUS = 4096  # alphabet cap: beyond it the escape list carries the excess
TAIL_SIGMAS = 10.0  # alphabet radius in units of the channel's std over the step
_CODER_ERRORS = (ValueError, RuntimeError, OverflowError, TypeError, IndexError)


def channel_radius(ratio: np.ndarray) -> np.ndarray:
    """Alphabet radius per channel from std/step (≥ 1 so a dead channel still has 0 and ±escape)."""
    r = np.ceil(TAIL_SIGMAS * np.asarray(ratio, dtype=np.float64)) + 1
    return np.clip(r, 1, MAX_RADIUS).astype(np.int64)


def channel_probabilities(ratio: float, radius: int, grid: np.ndarray, cdf: np.ndarray) -> np.ndarray:
    """float64 probabilities of symbols ``-radius..radius`` (ends are escape bins holding the tails)."""
    k = np.arange(-radius, radius, dtype=np.float64) + 0.5  # the inner bin edges
    edges = k / max(float(ratio), 1e-12)
    F = np.interp(edges, grid, cdf, left=0.0, right=1.0)
    F = np.concatenate([[0.0], F, [1.0]])
    p = np.diff(F)
    p = np.maximum(p, 0.0) + PROB_FLOOR
    return p / p.sum()


def bank_weights(ratio: np.ndarray, radius: np.ndarray, grid: np.ndarray, cdf: np.ndarray) -> list[np.ndarray]:
    """Unnormalised float64 weights ``max(diff(F), 0) + PROB_FLOOR`` per channel (step 6 of docs/CODEC.md).

    Channels sharing a radius are evaluated as one ``[n, 2R+1]`` array; every step is elementwise,
    so the result is bit-identical to evaluating each channel alone. Version-2 segments quantise
    these weights with kvc's own rule (kvc.codec.rans.tables); version 1 normalised them for
    constriction (:func:`bank_probabilities`)."""
    ratio = np.asarray(ratio, dtype=np.float64)
    radius = np.asarray(radius, dtype=np.int64)
    out: list[np.ndarray | None] = [None] * len(ratio)
    for R in np.unique(radius):
        idx = np.flatnonzero(radius == R)
        R = int(R)
        k = np.arange(-R, R, dtype=np.float64) + 0.5
        edges = k[None, :] / np.maximum(ratio[idx], 1e-12)[:, None]
        F = np.interp(edges.ravel(), grid, cdf, left=0.0, right=1.0).reshape(len(idx), 2 * R)
        F = np.concatenate([np.zeros((len(idx), 1)), F, np.ones((len(idx), 1))], axis=1)
        w = np.maximum(np.diff(F, axis=1), 0.0) + PROB_FLOOR
        for row, c in enumerate(idx):
            out[c] = w[row]
    return out  # type: ignore[return-value]


def bank_probabilities(ratio: np.ndarray, radius: np.ndarray, grid: np.ndarray, cdf: np.ndarray) -> list[np.ndarray]:
    """:func:`channel_probabilities` for many channels at once, bit-identical to calling it per channel
    (the normalising sum is numpy's pairwise sum of each row, as on a 1-D array; tests check it)."""
    return [w / w.sum() for w in bank_weights(ratio, radius, grid, cdf)]


class ChannelBank:
    """One categorical model per channel; encodes/decodes ``[channels, tokens]`` int symbols."""

    def __init__(self, probabilities: list[np.ndarray], radius: np.ndarray):
        self.radius = np.asarray(radius, dtype=np.int64)
        self._radius32 = self.radius.astype(np.int32)
        self.probabilities = probabilities
        self.models = [constriction.stream.model.Categorical(p, perfect=False) for p in probabilities]

    @property
    def channels(self) -> int:
        return len(self.models)

    def encode(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Returns (nonzero-channel flags, escape excesses uint32, ANS words uint32)."""
        flags = np.any(q != 0, axis=1)
        R = self.radius[:, None]
        mag = np.abs(q)
        esc = mag >= R
        excess = (mag - R)[esc].astype(np.uint32)  # row-major: channel by channel, token order
        sym = (np.clip(q, -R, R) + R).astype(np.int32)
        coder = constriction.stream.stack.AnsCoder()
        models = self.models
        for c in np.flatnonzero(flags)[::-1].tolist():  # stack coder: encode backwards, decode forwards
            coder.encode_reverse(sym[c], models[c])
        return flags, excess, coder.get_compressed()

    def decode(self, flags: np.ndarray, excess: np.ndarray, words: np.ndarray, tokens: int) -> np.ndarray:
        """int32 symbols ``[channels, tokens]`` (escapes re-attached; |q| ≤ 2³⁰ + 4096 fits int32)."""
        C = self.channels
        q = np.zeros((C, tokens), dtype=np.int32)
        chans = np.flatnonzero(flags).tolist()
        try:  # the constructor too: it refuses a stream whose last word is 0
            coder = constriction.stream.stack.AnsCoder(words)
            decode, models = coder.decode, self.models
            for c in chans:
                q[c] = decode(models[c], tokens)
        except _CODER_ERRORS as exc:  # constriction raises on an exhausted or garbled stream
            raise FormatError(f"corrupt entropy-coded payload: {exc}") from None
        R = self._radius32[:, None]
        if chans:
            q[chans] -= R[chans]
        # an escape is a symbol at either end of its alphabet: q = ±R
        esc = np.abs(q) >= R
        n_esc = int(np.count_nonzero(esc))
        if n_esc != len(excess):
            raise FormatError("corrupt payload: escape count does not match the coded symbols")
        if n_esc:
            if excess.size and int(excess.max()) > (1 << 30):
                raise FormatError("corrupt payload: escape excess out of range")
            e = q[esc]
            q[esc] = np.sign(e) * (np.abs(e) + excess.astype(np.int32))
        return q

    def cross_entropy_bits(self, q: np.ndarray) -> float:
        """Information content of ``q`` under the bank's float models (flagged channels only)."""
        total = 0.0
        R = self.radius[:, None]
        sym = np.clip(q, -R, R) + R
        for c in np.flatnonzero(np.any(q != 0, axis=1)):
            total -= float(np.log2(self.probabilities[c][sym[c]]).sum())
        return total


# ---- per-chunk histogram tables (CacheGen as published stores its tables with the chunk) ----

TABLE_TOTAL = 1 << 12


def _quantized_counts(row: np.ndarray, lo: int, hi: int) -> np.ndarray:
    counts = np.bincount(row - lo, minlength=hi - lo + 1).astype(np.float64)
    scaled = np.maximum(np.round(counts / counts.sum() * TABLE_TOTAL), (counts > 0).astype(np.float64))
    return scaled.astype(np.uint16)


def _chunk_model(counts: np.ndarray):
    # constriction refuses a one-symbol categorical, which a constant channel produces; a trailing
    # zero-count symbol (never coded) makes it valid on both sides without changing the table bytes.
    return constriction.stream.model.Categorical(np.append(counts, 0.0), perfect=False)


def encode_with_chunk_tables(q: np.ndarray) -> tuple[bytes, bytes]:
    """Per-channel tables measured on this chunk (returned as bytes: they are side information)."""
    import struct

    C = q.shape[0]
    table = bytearray()
    models = []
    for c in range(C):
        lo, hi = int(q[c].min()), int(q[c].max())
        counts = _quantized_counts(q[c], lo, hi)
        table += struct.pack("<iH", lo, len(counts)) + counts.tobytes()
        models.append((lo, _chunk_model(counts.astype(np.float64))))
    coder = constriction.stream.stack.AnsCoder()
    for c in reversed(range(C)):
        lo, m = models[c]
        coder.encode_reverse((q[c] - lo).astype(np.int32), m)
    return bytes(table), coder.get_compressed().tobytes()


def decode_with_chunk_tables(table: bytes, words: bytes, channels: int, tokens: int) -> np.ndarray:
    import struct

    q = np.zeros((channels, tokens), dtype=np.int64)
    pos = 0
    models = []
    for _ in range(channels):
        if pos + 6 > len(table):
            raise FormatError("corrupt chunk table")
        lo, k = struct.unpack_from("<iH", table, pos)
        pos += 6
        if k == 0 or pos + 2 * k > len(table):
            raise FormatError("corrupt chunk table")
        counts = np.frombuffer(table, dtype="<u2", count=k, offset=pos).astype(np.float64)
        pos += 2 * k
        if counts.sum() <= 0:
            raise FormatError("corrupt chunk table")
        models.append((lo, _chunk_model(counts)))
    if len(words) % 4:
        raise FormatError("corrupt payload length")
    coder = constriction.stream.stack.AnsCoder(np.frombuffer(words, dtype="<u4").copy())
    try:
        for c in range(channels):
            lo, m = models[c]
            q[c] = coder.decode(m, tokens) + lo
    except _CODER_ERRORS as exc:
        raise FormatError(f"corrupt entropy-coded payload: {exc}") from None
    return q
