"""Compile every numba kernel once, so the first real decode does not pay for it.

numba compiles a kernel on first call (~5–10 s for all of them on a small machine) and caches the
machine code on disk (next to the sources, or in the user's cache when that is read-only); set-up
runs ``python -m kvc.codec.warm`` so a fresh checkout's first `kvc decode` is as fast as its
hundredth. Each kernel is called with the argument types real reads and writes use."""

from __future__ import annotations

import numpy as np


def warm_up() -> None:
    from kvc.codec import byteplanes, kvq_segment
    from kvc.codec.finish import finish_in_place
    from kvc.codec.kvq_lanes import Body, build_job
    from kvc.codec.rans import cpu
    from kvc.codec.rans.tables import build_bank, quantize_frequencies

    bank = build_bank([quantize_frequencies(np.array([1.0, 2.0, 1.0]))])
    # five one-channel lanes of 3 or 4 tokens: the lockstep four (with its uneven tail) and a single lane
    tokens = np.array([4, 3, 3, 3, 3], np.int64)
    job = {"ch_lo": np.arange(5, dtype=np.int64), "ch_hi": np.arange(1, 6, dtype=np.int64),
           "ch_model": np.zeros(5, np.int64), "ch_out": np.concatenate([[0], np.cumsum(tokens)[:-1]]),
           "ch_tokens": tokens, "ch_stride": np.ones(5, np.int64)}  # fmt: skip
    lanes, _ = cpu.encode(job, bank, np.array([1, -1, 0, 1] + [0, 1, -1] * 4, np.int64), threads=1)
    ends = np.cumsum([len(w) for w in lanes]).astype(np.int64)
    job.update(words=np.concatenate(lanes), word_lo=ends - [len(w) for w in lanes], word_hi=ends)
    cpu.decode(job, bank, np.zeros(16, np.float32), threads=1)
    body = kvq_segment.write(None, 4, np.array([0]), [lanes[0]])  # a one-channel, one-lane segment body
    build_job([Body(body, 4, 4, 1, 4, 4, 4, 0, 0, 0)])
    finish_in_place(np.zeros((1, 3, 4), np.float32)[:, 1:], np.ones((2, 4), np.float32), np.ones((2, 4), np.float32))
    finish_in_place(np.zeros((1, 2, 4), np.float32), None, None)
    cpu.zero_channels(np.zeros(3, np.float32), np.array([0]), np.array([3]), np.array([1]))
    for width in (np.uint16, np.uint32, np.uint64):
        size = np.dtype(width).itemsize
        byteplanes.join_into(np.zeros(size * 4, np.uint8), np.zeros(4, width), (1, 2, 2), 4, 2, 0)


if __name__ == "__main__":
    warm_up()
