"""numba kernels for lanes: compiled once (cached on disk), GIL released, one lane per loop turn.

A *job* describes many lanes at once in flat arrays, so one call decodes every lane of every
segment of a read. Lane i codes channels ``ch_lo[i]..ch_hi[i]``; channel j has model
``ch_model[j]`` and ``ch_tokens[j]`` values living at ``out[ch_out[j] + t * ch_stride[j]]``.
``decode`` splits the lanes over threads (balanced by symbol count, on kvc.workers' pool); each
thread runs the serial kernel on its share, so there is no threading layer to configure and callers
may be threads too.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from kvc.codec.rans import (
    BAD_EXCESS,
    BAD_FINAL_STATE,
    BAD_START_STATE,
    EXHAUSTED,
    LUT_SHIFT,
    LUT_SIZE,
    MAX_EXCESS,
    OK,
    STATE_LOWER,
)
from kvc.workers import default_threads, run_tasks

# The decode step is written out in place (and four times in _lanes4) on purpose: numba does not
# inline a tuple-returning helper into a hot loop, and a call per symbol doubles the time.
# Step, as in reference.decode_lane: slot = x mod 2**16; s = the symbol whose cumulative range holds
# slot (from the coarse table, then forward); x = freq·(x >> 16) + slot − cum; one word in when x < L;
# an end symbol is followed by two raw 16-bit pieces of the escape excess. The refill is branch-free
# (a mispredicted branch stalls all four interleaved lanes): it always loads a word, clamped to the
# lane's last one, and selects. A lane that runs out of words keeps counting past its end, so the
# final ``p == end`` check catches it.


@njit(nogil=True, cache=True)
def _channel_run(x, p, end, base, lb, A, o, st, t_lo, t_hi, words, cum, lut, out):
    """Tokens t_lo..t_hi of one channel (model at ``cum[base]``, ``lut[lb]``, A symbols; values at
    ``out[o + t * st]``) from state (x, p): returns (x, p, excess too large). A single lane's loop,
    and the tokens a lane has past its lockstep partners (the chunk with sinks has fewer)."""
    bad = False
    R = (A - 1) // 2
    for t in range(t_lo, t_hi):
        slot = x & 0xFFFF
        s = np.int64(lut[lb + (slot >> LUT_SHIFT)])
        while np.int64(cum[base + s + 1]) <= slot:
            s += 1
        c = np.int64(cum[base + s])
        x = (np.int64(cum[base + s + 1]) - c) * (x >> 16) + slot - c
        w = np.int64(words[min(p, end - 1)])
        n = x < STATE_LOWER
        x = ((x << 16) | w) if n else x
        p += n
        v = s - R
        if s == 0 or s == A - 1:
            hi = x & 0xFFFF
            x = ((x >> 16) << 16) | (np.int64(words[p]) if p < end else 0)
            lo = x & 0xFFFF
            x = ((x >> 16) << 16) | (np.int64(words[p + 1]) if p + 1 < end else 0)
            p += 2
            e = (hi << 16) | lo
            bad |= e > MAX_EXCESS
            v = R + e if s else -(R + e)
        out[o + t * st] = v
    return x, p, bad


@njit(nogil=True, cache=True)
def _lane_tail(x, p, end, c_lo, c_hi, words, ch_model, ch_out, ch_tokens, ch_stride, cum, start, alphabet, lut,
               out):  # fmt: skip
    """Channels c_lo..c_hi of one lane from state (x, p): returns (x, p, excess too large)."""
    bad = False
    for ch in range(c_lo, c_hi):
        m = ch_model[ch]
        x, p, b = _channel_run(x, p, end, start[m], m * LUT_SIZE, np.int64(alphabet[m]), ch_out[ch], ch_stride[ch],
                               0, ch_tokens[ch], words, cum, lut, out)  # fmt: skip
        bad |= b
    return x, p, bad


@njit(nogil=True, cache=True)
def _lanes4(lane, xs, ps, words, word_hi, ch_lo, ch_hi, ch_model, ch_out, ch_tokens, ch_stride, cum, start,
            alphabet, lut, out):  # fmt: skip
    """Four lanes in lockstep over the channels all four have: their state chains are independent,
    so the core overlaps their table loads. Tokens past the shortest lane's count (a segment with
    sinks has fewer body tokens) are finished lane by lane. Updates xs/ps and returns (channels done
    per lane, excess flags as a 4-bit mask). Indices are cast to unsigned where they are known to be
    ≥ 0 (numba then emits no negative-index wraparound), and each lane's output index runs."""
    common = ch_hi[lane] - ch_lo[lane]
    for j in range(1, 4):
        common = min(common, ch_hi[lane + j] - ch_lo[lane + j])
    T0, T1 = ch_tokens[ch_lo[lane]], ch_tokens[ch_lo[lane + 1]]
    T2, T3 = ch_tokens[ch_lo[lane + 2]], ch_tokens[ch_lo[lane + 3]]
    T = min(min(T0, T1), min(T2, T3))
    x0, x1, x2, x3 = xs[0], xs[1], xs[2], xs[3]
    p0, p1, p2, p3 = ps[0], ps[1], ps[2], ps[3]
    e0, e1, e2, e3 = word_hi[lane], word_hi[lane + 1], word_hi[lane + 2], word_hi[lane + 3]
    bad = 0
    for i in range(common):
        c = ch_lo[lane + 0] + i
        m0 = ch_model[c]
        t0 = ch_stride[c]
        q0 = ch_out[c]
        b0 = start[m0]
        l0 = m0 * LUT_SIZE
        A0 = np.int64(alphabet[m0])
        R0 = (A0 - 1) // 2
        c = ch_lo[lane + 1] + i
        m1 = ch_model[c]
        t1 = ch_stride[c]
        q1 = ch_out[c]
        b1 = start[m1]
        l1 = m1 * LUT_SIZE
        A1 = np.int64(alphabet[m1])
        R1 = (A1 - 1) // 2
        c = ch_lo[lane + 2] + i
        m2 = ch_model[c]
        t2 = ch_stride[c]
        q2 = ch_out[c]
        b2 = start[m2]
        l2 = m2 * LUT_SIZE
        A2 = np.int64(alphabet[m2])
        R2 = (A2 - 1) // 2
        c = ch_lo[lane + 3] + i
        m3 = ch_model[c]
        t3 = ch_stride[c]
        q3 = ch_out[c]
        b3 = start[m3]
        l3 = m3 * LUT_SIZE
        A3 = np.int64(alphabet[m3])
        R3 = (A3 - 1) // 2
        for _ in range(T):
            # lane 0
            slot = x0 & 0xFFFF
            s = np.int64(lut[np.uint64(l0 + (slot >> LUT_SHIFT))])
            while np.int64(cum[np.uint64(b0 + s + 1)]) <= slot:
                s += 1
            c = np.int64(cum[np.uint64(b0 + s)])
            x0 = (np.int64(cum[np.uint64(b0 + s + 1)]) - c) * (x0 >> 16) + slot - c
            w = np.int64(words[np.uint64(min(p0, e0 - 1))])  # branch-free refill: a clamped read, then a select
            n = x0 < STATE_LOWER
            x0 = ((x0 << 16) | w) if n else x0
            p0 += n
            v = s - R0
            if np.uint64(s - 1) >= np.uint64(A0 - 2):  # s == 0 or s == A - 1: an escape
                hi = x0 & 0xFFFF
                x0 = ((x0 >> 16) << 16) | (np.int64(words[p0]) if p0 < e0 else 0)
                lo = x0 & 0xFFFF
                x0 = ((x0 >> 16) << 16) | (np.int64(words[p0 + 1]) if p0 + 1 < e0 else 0)
                p0 += 2
                e = (hi << 16) | lo
                if e > MAX_EXCESS:
                    bad |= 1
                v = R0 + e if s else -(R0 + e)
            out[np.uint64(q0)] = v
            q0 += t0
            # lane 1
            slot = x1 & 0xFFFF
            s = np.int64(lut[np.uint64(l1 + (slot >> LUT_SHIFT))])
            while np.int64(cum[np.uint64(b1 + s + 1)]) <= slot:
                s += 1
            c = np.int64(cum[np.uint64(b1 + s)])
            x1 = (np.int64(cum[np.uint64(b1 + s + 1)]) - c) * (x1 >> 16) + slot - c
            w = np.int64(words[np.uint64(min(p1, e1 - 1))])  # branch-free refill: a clamped read, then a select
            n = x1 < STATE_LOWER
            x1 = ((x1 << 16) | w) if n else x1
            p1 += n
            v = s - R1
            if np.uint64(s - 1) >= np.uint64(A1 - 2):  # s == 0 or s == A - 1: an escape
                hi = x1 & 0xFFFF
                x1 = ((x1 >> 16) << 16) | (np.int64(words[p1]) if p1 < e1 else 0)
                lo = x1 & 0xFFFF
                x1 = ((x1 >> 16) << 16) | (np.int64(words[p1 + 1]) if p1 + 1 < e1 else 0)
                p1 += 2
                e = (hi << 16) | lo
                if e > MAX_EXCESS:
                    bad |= 2
                v = R1 + e if s else -(R1 + e)
            out[np.uint64(q1)] = v
            q1 += t1
            # lane 2
            slot = x2 & 0xFFFF
            s = np.int64(lut[np.uint64(l2 + (slot >> LUT_SHIFT))])
            while np.int64(cum[np.uint64(b2 + s + 1)]) <= slot:
                s += 1
            c = np.int64(cum[np.uint64(b2 + s)])
            x2 = (np.int64(cum[np.uint64(b2 + s + 1)]) - c) * (x2 >> 16) + slot - c
            w = np.int64(words[np.uint64(min(p2, e2 - 1))])  # branch-free refill: a clamped read, then a select
            n = x2 < STATE_LOWER
            x2 = ((x2 << 16) | w) if n else x2
            p2 += n
            v = s - R2
            if np.uint64(s - 1) >= np.uint64(A2 - 2):  # s == 0 or s == A - 1: an escape
                hi = x2 & 0xFFFF
                x2 = ((x2 >> 16) << 16) | (np.int64(words[p2]) if p2 < e2 else 0)
                lo = x2 & 0xFFFF
                x2 = ((x2 >> 16) << 16) | (np.int64(words[p2 + 1]) if p2 + 1 < e2 else 0)
                p2 += 2
                e = (hi << 16) | lo
                if e > MAX_EXCESS:
                    bad |= 4
                v = R2 + e if s else -(R2 + e)
            out[np.uint64(q2)] = v
            q2 += t2
            # lane 3
            slot = x3 & 0xFFFF
            s = np.int64(lut[np.uint64(l3 + (slot >> LUT_SHIFT))])
            while np.int64(cum[np.uint64(b3 + s + 1)]) <= slot:
                s += 1
            c = np.int64(cum[np.uint64(b3 + s)])
            x3 = (np.int64(cum[np.uint64(b3 + s + 1)]) - c) * (x3 >> 16) + slot - c
            w = np.int64(words[np.uint64(min(p3, e3 - 1))])  # branch-free refill: a clamped read, then a select
            n = x3 < STATE_LOWER
            x3 = ((x3 << 16) | w) if n else x3
            p3 += n
            v = s - R3
            if np.uint64(s - 1) >= np.uint64(A3 - 2):  # s == 0 or s == A - 1: an escape
                hi = x3 & 0xFFFF
                x3 = ((x3 >> 16) << 16) | (np.int64(words[p3]) if p3 < e3 else 0)
                lo = x3 & 0xFFFF
                x3 = ((x3 >> 16) << 16) | (np.int64(words[p3 + 1]) if p3 + 1 < e3 else 0)
                p3 += 2
                e = (hi << 16) | lo
                if e > MAX_EXCESS:
                    bad |= 8
                v = R3 + e if s else -(R3 + e)
            out[np.uint64(q3)] = v
            q3 += t3
        if T0 > T:
            o = ch_out[ch_lo[lane + 0] + i]
            x0, p0, b = _channel_run(x0, p0, e0, b0, l0, A0, o, t0, T, T0, words, cum, lut, out)
            if b:
                bad |= 1
        if T1 > T:
            o = ch_out[ch_lo[lane + 1] + i]
            x1, p1, b = _channel_run(x1, p1, e1, b1, l1, A1, o, t1, T, T1, words, cum, lut, out)
            if b:
                bad |= 2
        if T2 > T:
            o = ch_out[ch_lo[lane + 2] + i]
            x2, p2, b = _channel_run(x2, p2, e2, b2, l2, A2, o, t2, T, T2, words, cum, lut, out)
            if b:
                bad |= 4
        if T3 > T:
            o = ch_out[ch_lo[lane + 3] + i]
            x3, p3, b = _channel_run(x3, p3, e3, b3, l3, A3, o, t3, T, T3, words, cum, lut, out)
            if b:
                bad |= 8
    xs[0], xs[1], xs[2], xs[3] = x0, x1, x2, x3
    ps[0], ps[1], ps[2], ps[3] = p0, p1, p2, p3
    return common, bad


@njit(nogil=True, cache=True)
def _decode_lanes(a, b, words, word_lo, word_hi, ch_lo, ch_hi, ch_model, ch_out, ch_tokens, ch_stride,
                  cum, start, alphabet, lut, out, status):  # fmt: skip
    """Lanes a..b: four at a time (neighbours of similar work: callers order lanes by it), the rest one by one."""
    xs = np.zeros(4, np.int64)
    ps = np.zeros(4, np.int64)
    lane = a
    while lane < b:
        group = 1
        if lane + 4 <= b:
            group = 4
            for j in range(4):
                if ch_hi[lane + j] <= ch_lo[lane + j]:
                    group = 1
                elif word_hi[lane + j] - word_lo[lane + j] < 2:
                    group = 1
        for j in range(group):
            p = word_lo[lane + j]
            if word_hi[lane + j] - p < 2:
                xs[j], ps[j] = 0, p
            else:
                xs[j] = (np.int64(words[p]) << 16) | np.int64(words[p + 1])
                ps[j] = p + 2
        done, bad = 0, 0
        if group == 4 and xs.min() >= STATE_LOWER:
            done, bad = _lanes4(lane, xs, ps, words, word_hi, ch_lo, ch_hi, ch_model, ch_out, ch_tokens, ch_stride,
                                cum, start, alphabet, lut, out)  # fmt: skip
        for j in range(group):
            end = word_hi[lane + j]
            if end - word_lo[lane + j] < 2:
                status[lane + j] = EXHAUSTED
                continue
            if xs[j] < STATE_LOWER:
                status[lane + j] = BAD_START_STATE
                continue
            x, p, tail_bad = _lane_tail(xs[j], ps[j], end, ch_lo[lane + j] + done, ch_hi[lane + j], words, ch_model,
                                        ch_out, ch_tokens, ch_stride, cum, start, alphabet, lut, out)  # fmt: skip
            if p > end:  # checked first: a lane read past its end decodes garbage, escapes included
                status[lane + j] = EXHAUSTED
            elif tail_bad or (bad >> j) & 1:
                status[lane + j] = BAD_EXCESS
            elif p != end or x != STATE_LOWER:
                status[lane + j] = BAD_FINAL_STATE
            else:
                status[lane + j] = OK
        lane += group


@njit(nogil=True, cache=True)
def _encode_lanes(a, b, values, ch_lo, ch_hi, ch_model, ch_out, ch_tokens, ch_stride,
                  cum, start, alphabet, scratch, cap_hi, count, status):  # fmt: skip
    """Codes lanes backwards into ``scratch[.. cap_hi[lane])``, words ending at cap_hi in decode order."""
    for lane in range(a, b):
        x = np.int64(STATE_LOWER)
        q = cap_hi[lane]
        err = OK
        for ch in range(ch_hi[lane] - 1, ch_lo[lane] - 1, -1):
            m = ch_model[ch]
            base = start[m]
            A = np.int64(alphabet[m])
            R = (A - 1) // 2
            o = ch_out[ch]
            stride = ch_stride[ch]
            for t in range(ch_tokens[ch] - 1, -1, -1):
                v = np.int64(values[o + t * stride])
                mag = v if v >= 0 else -v
                if mag >= R:
                    excess = mag - R
                    if excess > MAX_EXCESS:
                        err = BAD_EXCESS
                        break
                    s = np.int64(0) if v < 0 else A - 1
                    # pieces in reverse decode order: low piece, then high piece
                    for piece in (excess & 0xFFFF, excess >> 16):
                        if x >= (np.int64(1) << 16):
                            q -= 1
                            scratch[q] = x & 0xFFFF
                            x >>= 16
                        x = (x << 16) + piece
                else:
                    s = v + R
                c = np.int64(cum[base + s])
                f = np.int64(cum[base + s + 1]) - c
                if x >= (f << 16):
                    q -= 1
                    scratch[q] = x & 0xFFFF
                    x >>= 16
                x = ((x // f) << 16) + (x % f) + c
            if err != OK:
                break
        q -= 1
        scratch[q] = x >> 16
        q -= 1
        scratch[q] = x & 0xFFFF
        # the flush went low then high: swap so the decoder reads high first
        scratch[q], scratch[q + 1] = scratch[q + 1], scratch[q]
        count[lane] = cap_hi[lane] - q
        status[lane] = err


@njit(nogil=True, cache=True)
def _zero_channels(out, at, tokens, stride):
    for i in range(len(at)):
        for t in range(tokens[i]):
            out[at[i] + t * stride[i]] = 0


def zero_channels(out: np.ndarray, at: np.ndarray, tokens: np.ndarray, stride: np.ndarray) -> None:
    """Clear ``tokens[i]`` values from ``out[at[i]]`` every ``stride[i]`` (the channels no lane writes)."""
    if len(at):
        _zero_channels(out, at.astype(np.int64), tokens.astype(np.int64), stride.astype(np.int64))


def _shares(work: np.ndarray, parts: int) -> list[tuple[int, int]]:
    """Split lanes 0..n into ≤ parts contiguous ranges of about equal total work."""
    n = len(work)
    if n == 0:
        return []
    parts = max(1, min(parts, n))
    if parts == 1:
        return [(0, n)]
    edges = np.searchsorted(np.cumsum(work), np.linspace(0, float(work.sum()), parts + 1)[1:-1], side="left")
    bounds = [0, *sorted(set(int(e) + 1 for e in edges if 0 <= e < n - 1)), n]
    return [(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo]


def _run(kernel, lanes_work: np.ndarray, threads: int, args: tuple) -> None:
    run_tasks(kernel, [(lo, hi, *args) for lo, hi in _shares(lanes_work, threads)], threads)


def lane_work(ch_lo, ch_hi, ch_tokens) -> np.ndarray:
    """Symbols per lane (what a share is balanced by)."""
    csum = np.concatenate([[0], np.cumsum(ch_tokens, dtype=np.int64)])
    return csum[ch_hi] - csum[ch_lo]


def decode(job: dict, bank, out: np.ndarray, threads: int | None = None) -> np.ndarray:
    """Decode every lane of ``job`` into ``out``; returns the per-lane status codes."""
    status = np.zeros(len(job["word_lo"]), dtype=np.int32)
    work = lane_work(job["ch_lo"], job["ch_hi"], job["ch_tokens"])
    # Lanes are independent, so they may run in any order: by work, largest first, neighbours have
    # about the same channels and tokens and nearly every lane runs in a lockstep four.
    order = np.argsort(-work, kind="stable")
    lane_arrays = [job[k][order] for k in ("word_lo", "word_hi", "ch_lo", "ch_hi")]
    ordered = np.zeros_like(status)
    args = (job["words"], *lane_arrays, job["ch_model"], job["ch_out"], job["ch_tokens"], job["ch_stride"],
            bank.cum, bank.start, bank.alphabet, bank.lut, out, ordered)  # fmt: skip
    _run(_decode_lanes, work[order], threads or default_threads(), args)
    status[order] = ordered
    return status


def encode(job: dict, bank, values: np.ndarray, threads: int | None = None) -> tuple[list[np.ndarray], np.ndarray]:
    """(uint16 words per lane in decode order, per-lane status) for the values ``job`` points into."""
    work = lane_work(job["ch_lo"], job["ch_hi"], job["ch_tokens"])
    n = len(work)
    cap = 3 * work + 2  # a symbol emits ≤ 1 word, an escape ≤ 2 more; the flush 2
    cap_hi = np.cumsum(cap).astype(np.int64)
    scratch = np.empty(int(cap_hi[-1]) if n else 0, dtype=np.uint16)
    count = np.zeros(n, dtype=np.int64)
    status = np.zeros(n, dtype=np.int32)
    args = (values, job["ch_lo"], job["ch_hi"], job["ch_model"], job["ch_out"], job["ch_tokens"], job["ch_stride"],
            bank.cum, bank.start, bank.alphabet, scratch, cap_hi, count, status)  # fmt: skip
    _run(_encode_lanes, work, threads or default_threads(), args)
    lanes = [scratch[cap_hi[i] - count[i] : cap_hi[i]] for i in range(n)]
    return lanes, status
