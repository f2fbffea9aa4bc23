"""The executable spec of a lane: a plain-Python rANS coder, slow and obvious.

Every fast path (``cpu``, ``gpu``) is tested bit for bit against these two functions; the text of
docs/CODEC.md ("Lanes") describes exactly what they do.

A lane codes *channels* one after another; a channel is ``tokens`` signed values under one model
whose alphabet ``A = 2R + 1`` covers ``-R..R``. A value with ``|v| >= R`` is coded as the end
symbol (``0`` for ``-R``, ``A - 1`` for ``+R``) followed by two raw 16-bit pieces of its excess
``|v| - R`` (high piece first, each coded with frequency 1 at cumulative frequency = the piece).
"""

from __future__ import annotations

import numpy as np

from kvc.codec.rans import (
    BAD_EXCESS,
    BAD_FINAL_STATE,
    BAD_START_STATE,
    EXHAUSTED,
    MAX_EXCESS,
    OK,
    PRECISION,
    STATE_LOWER,
)
from kvc.codec.rans.tables import TableBank

_MASK = (1 << PRECISION) - 1


def _symbols(bank: TableBank, model: int, values: np.ndarray):
    """(symbol, excess or None) per value, in decode order."""
    R = (int(bank.alphabet[model]) - 1) // 2
    for v in values.tolist():
        if abs(v) >= R:
            yield (0 if v < 0 else 2 * R), abs(v) - R
        else:
            yield v + R, None


def encode_lane(bank: TableBank, models: list[int], values: list[np.ndarray]) -> np.ndarray:
    """uint16 words, in the order the decoder reads them."""
    steps = []  # (cum, freq) in decode order
    for m, vals in zip(models, values):
        base = int(bank.start[m])
        for s, excess in _symbols(bank, m, np.asarray(vals)):
            c, c1 = int(bank.cum[base + s]), int(bank.cum[base + s + 1])
            steps.append((c, c1 - c))
            if excess is not None:
                if excess > MAX_EXCESS:
                    raise ValueError("escape excess over 2**30")
                steps.append((excess >> 16, 1))
                steps.append((excess & 0xFFFF, 1))
    x, emitted = STATE_LOWER, []
    for c, f in reversed(steps):
        if x >= f << 16:  # renormalise: at most one word, since x < 2**32
            emitted.append(x & 0xFFFF)
            x >>= 16
        x = ((x // f) << PRECISION) + (x % f) + c
    emitted += [x & 0xFFFF, x >> 16]
    return np.array(emitted[::-1], dtype=np.uint16)


def decode_lane(bank: TableBank, words: np.ndarray, models: list[int], tokens: int) -> tuple[int, list[np.ndarray]]:
    """(status, values per channel); status is one of the codes in kvc.codec.rans."""
    w = [int(v) for v in words]
    out = [np.zeros(tokens, dtype=np.int64) for _ in models]
    if len(w) < 2:
        return EXHAUSTED, out
    x, p = (w[0] << 16) | w[1], 2
    if x < STATE_LOWER:
        return BAD_START_STATE, out

    def step(c: int, f: int) -> bool:
        nonlocal x, p
        x = f * (x >> PRECISION) + (x & _MASK) - c
        if x < STATE_LOWER:
            if p >= len(w):
                return False
            x = (x << 16) | w[p]
            p += 1
        return True

    for ch, m in enumerate(models):
        base, A = int(bank.start[m]), int(bank.alphabet[m])
        cum = [int(v) for v in bank.cum[base : base + A + 1]]
        R = (A - 1) // 2
        for t in range(tokens):
            slot = x & _MASK
            s = next(j for j in range(A) if cum[j] <= slot < cum[j + 1])
            if not step(cum[s], cum[s + 1] - cum[s]):
                return EXHAUSTED, out
            v = s - R
            if s == 0 or s == A - 1:
                hi = x & _MASK
                if not step(hi, 1):
                    return EXHAUSTED, out
                lo = x & _MASK
                if not step(lo, 1):
                    return EXHAUSTED, out
                excess = (hi << 16) | lo
                if excess > MAX_EXCESS:
                    return BAD_EXCESS, out
                v = -(R + excess) if s == 0 else R + excess
            out[ch][t] = v
    if p != len(w) or x != STATE_LOWER:
        return BAD_FINAL_STATE, out
    return OK, out
