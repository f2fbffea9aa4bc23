"""Give freed memory back to the operating system while a long context is prefilled and encoded.

glibc's malloc raises its mmap threshold each time a large block it had mmapped is freed (the
"dynamic" threshold, up to 32 MiB on 64-bit). After the first few multi-MiB tensors are freed,
every later one of that size comes from the malloc heaps instead; freed there, it stays in the
process, and the heaps of the pool threads fragment. Prefill (the KV cache grows by concatenation,
one new tensor per layer per slice) and encoding (a few float64 working tensors per (layer, kind))
free hundreds of such blocks, so the resident set kept growing to ~1.5 GB over the KV itself for
one 8k-token SmolLM2 context, though at most a few of them were alive at a time (bench/batch.py).

Setting the threshold explicitly turns the dynamic adjustment off: every block of at least
``threshold`` bytes is its own mapping and goes back to the system when freed. The bytes written
are unchanged; only where the allocator puts them. A user who set a threshold of their own
(``MALLOC_MMAP_THRESHOLD_``, ``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=...``) keeps it, and
``KVC_MALLOC=keep`` leaves the allocator alone."""

from __future__ import annotations

import ctypes
import os
import sys

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
DEFAULT_THRESHOLD = 1 << 20  # 1 MiB: a [3, 256, 64] float32 chunk (192 KiB) stays on the heap; a layer's tensors do not

_state: dict[str, bool] = {}


def bound_freed_memory(threshold: int = DEFAULT_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes once per process; whether it was set.

    Does nothing off glibc, or when the user chose allocator settings of their own."""
    if "done" in _state:
        return _state["done"]
    _state["done"] = False
    if not sys.platform.startswith("linux") or os.environ.get("KVC_MALLOC") == "keep":
        return False
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "mmap_threshold" in os.environ.get("GLIBC_TUNABLES", ""):
        return False  # the user's own threshold wins
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return False  # glibc only: musl and others differ in what mallopt does
    _state["done"] = bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold)))
    return _state["done"]
