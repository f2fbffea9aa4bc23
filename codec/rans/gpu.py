"""The lane decoder on a CUDA GPU: one GPU thread per lane, bit-exact with kvc.codec.rans.cpu.

The kernel is the CPU kernel's serial lane loop (``cpu._lane_tail``) run by thousands of threads at
once: a read of an 8B model's 16k-token context has ~65,000 lanes. Tables and job arrays are copied
to the device once per call (tables once per process); the words are the compressed bytes, so the
only large transfer is what the file holds. ``out`` is a device array, e.g. a CUDA torch tensor,
which the caller then synthesises on the GPU: nothing decoded comes back to the host.

CI has no GPU: tests run this kernel in numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``), which
executes the same Python source thread by thread, and compare it bit for bit with the CPU kernel.
On a GPU machine numba's CUDA target comes from the ``gpu`` extra (``pip install 'kvc[gpu]'``).
"""

from __future__ import annotations

import numpy as np
from numba import cuda

from kvc.codec.rans import BAD_EXCESS, BAD_FINAL_STATE, BAD_START_STATE, EXHAUSTED, LUT_SHIFT, LUT_SIZE, MAX_EXCESS, OK

_L = 1 << 16  # STATE_LOWER as a plain int: the simulator and the compiler both take it as a constant
THREADS_PER_BLOCK = 128


@cuda.jit
def _decode_lanes(words, word_lo, word_hi, ch_lo, ch_hi, ch_model, ch_out, ch_tokens, ch_stride, cum, start,
                  alphabet, lut, out, status):  # fmt: skip
    lane = cuda.grid(1)
    if lane >= word_lo.shape[0]:
        return
    p = word_lo[lane]
    end = word_hi[lane]
    if end - p < 2:
        status[lane] = EXHAUSTED
        return
    x = (np.int64(words[p]) << 16) | np.int64(words[p + 1])
    p += 2
    if x < _L:
        status[lane] = BAD_START_STATE
        return
    bad = False
    for ch in range(ch_lo[lane], ch_hi[lane]):
        m = ch_model[ch]
        base = start[m]
        A = np.int64(alphabet[m])
        R = (A - 1) // 2
        lb = m * LUT_SIZE
        o = ch_out[ch]
        st = ch_stride[ch]
        for t in range(ch_tokens[ch]):
            slot = x & 0xFFFF
            s = np.int64(lut[lb + (slot >> LUT_SHIFT)])
            while np.int64(cum[base + s + 1]) <= slot:
                s += 1
            c = np.int64(cum[base + s])
            x = (np.int64(cum[base + s + 1]) - c) * (x >> 16) + slot - c
            if x < _L:  # the CPU kernel's refill: past the end, the lane's last word (then caught below)
                x = (x << 16) | np.int64(words[min(p, end - 1)])
                p += 1
            v = s - R
            if s == 0 or s == A - 1:
                hi = x & 0xFFFF
                w = np.int64(0)
                if p < end:
                    w = np.int64(words[p])
                x = ((x >> 16) << 16) | w
                lo = x & 0xFFFF
                w = np.int64(0)
                if p + 1 < end:
                    w = np.int64(words[p + 1])
                x = ((x >> 16) << 16) | w
                p += 2
                e = (hi << 16) | lo
                if e > MAX_EXCESS:
                    bad = True
                v = R + e
                if s == 0:
                    v = -v
            out[o + t * st] = v
    if p > end:
        status[lane] = EXHAUSTED
    elif bad:
        status[lane] = BAD_EXCESS
    elif p != end or x != _L:
        status[lane] = BAD_FINAL_STATE
    else:
        status[lane] = OK


_JOB_FIELDS = ("words", "word_lo", "word_hi", "ch_lo", "ch_hi", "ch_model", "ch_out", "ch_tokens", "ch_stride")
_TABLES: dict[int, tuple] = {}  # id(bank) -> (bank, device arrays): a bank lives as long as its profile level


def _device_tables(bank):
    entry = _TABLES.get(id(bank))
    if entry is None or entry[0] is not bank:
        if len(_TABLES) > 8:
            _TABLES.clear()
        entry = _TABLES[id(bank)] = (bank, tuple(cuda.to_device(a) for a in (bank.cum, bank.start, bank.alphabet,
                                                                               bank.lut)))  # fmt: skip
    return entry[1]


def decode(job: dict, bank, out) -> np.ndarray:
    """Decode every lane of ``job`` into the device array ``out`` (anything with
    ``__cuda_array_interface__``, or a numpy array under the simulator); returns per-lane status."""
    n = len(job["word_lo"])
    status = cuda.to_device(np.zeros(n, dtype=np.int32))
    arrays = [cuda.to_device(np.ascontiguousarray(job[k])) for k in _JOB_FIELDS]
    if hasattr(out, "__cuda_array_interface__"):
        target = cuda.as_cuda_array(out)
    else:  # a host array: only meaningful under the simulator (tests), where "device" memory is host memory
        target = out.numpy() if hasattr(out, "numpy") else out
    blocks = max(1, -(-n // THREADS_PER_BLOCK))
    _decode_lanes[blocks, THREADS_PER_BLOCK](*arrays, *_device_tables(bank), target, status)
    return status.copy_to_host()
