"""Integer frequency tables: the one deterministic rule from float64 weights to rANS tables.

``quantize_frequencies`` (docs/CODEC.md, "Integer tables") gives every symbol at least one slot
and apportions the remaining ``M - A`` slots by largest remainder:

    S   = w[0] + w[1] + ... + w[A-1]          float64, summed left to right
    y_j = (w_j * (M - A)) / S                 float64, each operation correctly rounded
    f_j = 1 + floor(y_j)
    r   = (M - A) - sum(floor(y_j))           then +1 to the r symbols of largest y_j - floor(y_j)
                                              (ties: lower index first)

Only IEEE-754 multiplication, division, addition and floor are involved, so the tables are the
same on every platform and in every language, and files never depend on a library's rounding.
A table bank holds, for many models at once, the cumulative frequencies and a coarse lookup
table (the first symbol of every block of 2**LUT_SHIFT slots) that the decoders search from.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvc.codec.rans import LUT_SHIFT, LUT_SIZE, MAX_ALPHABET, PRECISION

M = 1 << PRECISION


def quantize_frequencies(weights: np.ndarray) -> np.ndarray:
    """int64 frequencies (each ≥ 1, summing to 2**16) from positive float64 weights."""
    w = np.asarray(weights, dtype=np.float64)
    A = len(w)
    if not 2 <= A <= MAX_ALPHABET:
        raise ValueError(f"alphabet of {A} symbols is outside 2..{MAX_ALPHABET}")
    if not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise ValueError("weights must be finite and positive")
    K = float(M - A)
    S = float(np.cumsum(w)[-1])  # cumsum adds left to right: the sum the spec names
    y = (w * K) / S
    base = np.floor(y)
    freq = 1 + base.astype(np.int64)
    r = (M - A) - int(base.sum())
    if r > 0:
        frac = y - base
        order = np.lexsort((np.arange(A), -frac))  # largest remainder first, lower index on ties
        freq[order[:r]] += 1
    while r < 0:  # only reachable through rounding in y; taken from the largest, lower index on ties
        j = int(np.argmax(freq))
        take = min(-r, int(freq[j]) - 1)
        freq[j] -= take
        r += take
    return freq


@dataclass
class TableBank:
    """Many models in flat arrays, as the kernels want them.

    ``cum[start[m] + s]`` is symbol s's cumulative frequency in model m (``cum[start[m] + A_m] ==
    2**16``); ``lut[m * LUT_SIZE + b]`` is the symbol holding slot ``b << LUT_SHIFT``; ``alphabet[m]``
    is A_m."""

    cum: np.ndarray  # uint32
    start: np.ndarray  # int64 [models]
    alphabet: np.ndarray  # int32 [models]
    lut: np.ndarray  # uint16 [models * LUT_SIZE]

    @property
    def models(self) -> int:
        return len(self.start)

    def frequencies(self, m: int) -> np.ndarray:
        a = self.start[m]
        return np.diff(self.cum[a : a + self.alphabet[m] + 1].astype(np.int64))


def build_bank(frequencies: list[np.ndarray]) -> TableBank:
    """A bank from per-model frequency tables (each summing to 2**16)."""
    n = len(frequencies)
    alphabet = np.array([len(f) for f in frequencies], dtype=np.int32)
    start = np.zeros(n, dtype=np.int64)
    if n:
        start[1:] = np.cumsum(alphabet[:-1].astype(np.int64) + 1)
    cum = np.zeros(int(alphabet.sum()) + n, dtype=np.uint32)
    lut = np.zeros(n * LUT_SIZE, dtype=np.uint16)
    probes = np.arange(LUT_SIZE, dtype=np.int64) << LUT_SHIFT
    for m, f in enumerate(frequencies):
        f = np.asarray(f, dtype=np.int64)
        if int(f.sum()) != M or np.any(f < 1):
            raise ValueError("frequencies must be ≥ 1 and sum to 2**16")
        c = np.concatenate([[0], np.cumsum(f)])
        cum[start[m] : start[m] + len(c)] = c
        lut[m * LUT_SIZE : (m + 1) * LUT_SIZE] = np.searchsorted(c, probes, side="right") - 1
    return TableBank(cum=cum, start=start, alphabet=alphabet, lut=lut)


def quantize_many(weights: list[np.ndarray]) -> list[np.ndarray]:
    """:func:`quantize_frequencies` for many tables, bit-identical to calling it one by one.

    Tables of one alphabet size are done as one array: every operation is elementwise or a
    per-row left-to-right cumsum, and a stable argsort of the negated remainders orders ties by
    index as lexsort does (tests check the equality exactly)."""
    out: list[np.ndarray | None] = [None] * len(weights)
    sizes = np.array([len(w) for w in weights], dtype=np.int64)
    for A in np.unique(sizes):
        idx = np.flatnonzero(sizes == A)
        A = int(A)
        if not 2 <= A <= MAX_ALPHABET:
            raise ValueError(f"alphabet of {A} symbols is outside 2..{MAX_ALPHABET}")
        w = np.stack([np.asarray(weights[i], dtype=np.float64) for i in idx])
        if not np.all(np.isfinite(w)) or np.any(w <= 0):
            raise ValueError("weights must be finite and positive")
        K = float(M - A)
        S = np.cumsum(w, axis=1)[:, -1:]
        y = (w * K) / S
        base = np.floor(y)
        freq = 1 + base.astype(np.int64)
        r = (M - A) - base.sum(axis=1).astype(np.int64)
        order = np.argsort(-(y - base), axis=1, kind="stable")
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.arange(A)[None, :].repeat(len(idx), axis=0), axis=1)
        freq += rank < np.maximum(r, 0)[:, None]
        for row, i in enumerate(idx):
            f = freq[row]
            if r[row] < 0:  # rare rounding case: fall back to the scalar rule
                f = quantize_frequencies(weights[i])
            out[i] = f
    return out  # type: ignore[return-value]
