"""Every lane of many version-2 kvq segments as one decode job, parsed by one compiled pass.

kvc.codec.kvq_segment describes a segment's body (channel flags, lane word counts, the lanes'
16-bit words) and parses one in Python, which is clear but costs ~100 µs a segment: a 2k-token
SmolLM2 read has 480 segments, a fifth of the decode time. Here the same checks run in numba over
all of a (layer, kind)'s segments (or, for the GPU, all of a read's), and the result is what
kvc.codec.rans.cpu / gpu decode: per-lane word ranges, per-channel model, output index and token
count, plus the channels no lane writes (their coefficients are zero).

Every field is checked against the bytes it came from before it is used, and every array is
sized by what the bytes can justify (a lane needs ≥ 2 words, a channel a flag bit), so a hostile
segment raises FormatError and never allocates or reads past its own bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from kvc.errors import FormatError

# error codes of _parse, in the order its checks run
_ERRORS = {
    1: "truncated kvq segment (channel flags)",
    2: "kvq segment sets flags past its last channel",
    3: "kvq segment has more lanes than flagged channels, or lanes without any",
    4: "truncated kvq segment (lane table)",
    5: "kvq segment length does not match its lane table",
    6: "kvq lane sizes are impossible for its symbol count",
}


@dataclass
class Body:
    """One segment's entropy-coded body: ``data[pos:]`` holds ``tokens`` tokens of ``channels``
    channels (``channels = heads · dim``) in ``lanes`` lanes. Its coefficients land at ``out`` +
    ((h · span + t0) · dim + d) for channel h · dim + d, token 0 (then every ``dim``); its channel
    c uses model ``model0 + c``."""

    data: bytes
    pos: int
    tokens: int
    lanes: int
    channels: int
    dim: int
    span: int  # tokens in the coefficient block this body is part of
    t0: int  # first token of this body in that block
    out: int  # where that block starts in the coefficient buffer
    model0: int


@njit(nogil=True, cache=True)
def _parse(buf, seg_lo, seg_hi, tokens, lanes, channels, dim, span, t0, out0, model0,
           words, word_lo, word_hi, ch_lo, ch_hi, ch_model, ch_out, ch_tokens, ch_stride, lane_seg,
           zero_at, zero_tokens, zero_stride, counts):  # fmt: skip
    """Fills the job arrays; returns (error code, segment) — (0, -1) when every segment is sound."""
    nl = 0  # lanes written
    nc = 0  # flagged channels written
    nw = 0  # words written
    nz = 0  # unflagged channels written
    for i in range(len(seg_lo)):
        pos, end, T, L, C, D = seg_lo[i], seg_hi[i], tokens[i], lanes[i], channels[i], dim[i]
        nflag = (C + 7) // 8
        if pos + nflag > end:
            return 1, i
        if C % 8 and (np.int64(buf[pos + nflag - 1]) >> (C % 8)) != 0:
            return 2, i
        first = nc
        for c in range(C):
            h = c // D
            at = out0[i] + (h * span[i] + t0[i]) * D + (c - h * D)
            if (np.int64(buf[pos + (c >> 3)]) >> (c & 7)) & 1:
                ch_model[nc] = model0[i] + c
                ch_out[nc] = at
                ch_tokens[nc] = T
                ch_stride[nc] = D
                nc += 1
            else:
                zero_at[nz] = at
                zero_tokens[nz] = T
                zero_stride[nz] = D
                nz += 1
        F = nc - first
        pos += nflag
        if (F == 0) != (L == 0) or L > F:
            return 3, i
        if pos + 4 * L > end:
            return 4, i
        total = 0
        for j in range(L):
            q = pos + 4 * j
            n = (np.int64(buf[q]) | (np.int64(buf[q + 1]) << 8) | (np.int64(buf[q + 2]) << 16)
                 | (np.int64(buf[q + 3]) << 24))  # fmt: skip
            word_lo[nl + j] = nw + total
            total += n
            word_hi[nl + j] = nw + total
        pos += 4 * L
        if pos + 2 * total != end:
            return 5, i
        for j in range(L):
            lo = first + (j * F) // L
            hi = first + ((j + 1) * F) // L
            n = word_hi[nl + j] - word_lo[nl + j]
            if n < 2 or n > 3 * (hi - lo) * T + 2:  # ≥ 2 words, ≤ 3 a symbol + 2: else it cannot decode
                return 6, i
            ch_lo[nl + j] = lo
            ch_hi[nl + j] = hi
            lane_seg[nl + j] = i
        for w in range(total):
            words[nw + w] = np.uint16(np.int64(buf[pos + 2 * w]) | (np.int64(buf[pos + 2 * w + 1]) << 8))
        nl += L
        nw += total
    counts[0], counts[1], counts[2], counts[3] = nl, nc, nw, nz
    return 0, -1


def build_job(bodies: list[Body]) -> tuple[dict, np.ndarray, dict]:
    """(the lane job for kvc.codec.rans, the segment index of each lane, the unflagged channels as
    ``{"at", "tokens", "stride"}``); raises FormatError naming the first unsound segment."""
    buf = np.frombuffer(b"".join(b.data[b.pos :] for b in bodies), dtype=np.uint8)
    sizes = np.array([len(b.data) - b.pos for b in bodies], dtype=np.int64)
    seg_hi = np.cumsum(sizes)
    seg_lo = seg_hi - sizes
    field = {name: np.array([getattr(b, name) for b in bodies], dtype=np.int64)
             for name in ("tokens", "lanes", "channels", "dim", "span", "t0", "out", "model0")}  # fmt: skip
    n_ch = int(field["channels"].sum())  # bounds: a lane has a flagged channel, a word 2 bytes
    ints = lambda n: np.empty(n, dtype=np.int64)  # noqa: E731
    job = {"words": np.empty(len(buf) // 2, dtype=np.uint16), "word_lo": ints(n_ch), "word_hi": ints(n_ch),
           "ch_lo": ints(n_ch), "ch_hi": ints(n_ch), "ch_model": ints(n_ch), "ch_out": ints(n_ch),
           "ch_tokens": ints(n_ch), "ch_stride": ints(n_ch)}  # fmt: skip
    lane_seg = ints(n_ch)
    zero = {"at": ints(n_ch), "tokens": ints(n_ch), "stride": ints(n_ch)}
    counts = np.zeros(4, dtype=np.int64)
    code, seg = _parse(buf, seg_lo, seg_hi, field["tokens"], field["lanes"], field["channels"], field["dim"],
                       field["span"], field["t0"], field["out"], field["model0"], job["words"], job["word_lo"],
                       job["word_hi"], job["ch_lo"], job["ch_hi"], job["ch_model"], job["ch_out"], job["ch_tokens"],
                       job["ch_stride"], lane_seg, zero["at"], zero["tokens"], zero["stride"], counts)  # fmt: skip
    if code:
        raise FormatError(_ERRORS[int(code)])
    nl, nc, nw, nz = (int(v) for v in counts)
    for key in ("word_lo", "word_hi", "ch_lo", "ch_hi"):
        job[key] = job[key][:nl]
    for key in ("ch_model", "ch_out", "ch_tokens", "ch_stride"):
        job[key] = job[key][:nc]
    job["words"] = job["words"][:nw]
    return job, lane_seg[:nl], {k: v[:nz] for k, v in zero.items()}
