"""Give freed memory back to the operating system while a long context is prefilled and encoded,
and keep it for reuse the rest of the time.

glibc's malloc raises its mmap threshold each time a large block it had mmapped is freed (the
"dynamic" threshold, up to 32 MiB on 64-bit). After the first few multi-MiB tensors are freed,
every later one of that size comes from the malloc heaps instead; freed there, it stays in the
process, and the heaps of the pool threads fragment. Prefill (the KV cache grows by concatenation,
one new tensor per layer per slice) and encoding (a few float64 working tensors per (layer, kind))
free hundreds of such blocks, so the resident set kept growing to ~1.5 GB over the KV itself for
one 8k-token SmolLM2 context, though at most a few of them were alive at a time (bench/batch.py).

So prefill and encode run inside :func:`freed_memory_returned`: while any such block runs, every
block of at least ``threshold`` bytes is its own mapping and goes back to the system when freed.
Decoding wants the opposite: a read allocates the same multi-MiB buffers again and again, and
fresh mappings cost a page fault per 4 KiB (measured: a 2k-token SmolLM2 read 20% slower at
`balanced`, 15% at lossless). When the last block ends, the allocator is set to where glibc's
dynamic rule would have taken it (threshold 32 MiB, trim 64 MiB), so freed buffers are reused.

The bytes written are unchanged; only where the allocator puts them. A user who set a threshold of
their own (``MALLOC_MMAP_THRESHOLD_``, ``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=...``) keeps it,
and ``KVC_MALLOC=keep`` leaves the allocator alone."""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers
M_MMAP_THRESHOLD = -3
DEFAULT_THRESHOLD = 1 << 20  # 1 MiB: a [3, 256, 64] float32 chunk (192 KiB) stays on the heap; a layer's tensors do not
REUSE_THRESHOLD = 32 << 20  # glibc's dynamic maximum on 64-bit: blocks below it are reused from the heaps
REUSE_TRIM = 2 * REUSE_THRESHOLD  # what the dynamic rule sets with it

_lock = threading.Lock()
_state: dict = {"depth": 0}


def _libc():
    """glibc's handle, or None where kvc leaves the allocator alone."""
    if "libc" not in _state:
        _state["libc"] = None
        if not sys.platform.startswith("linux") or os.environ.get("KVC_MALLOC") == "keep":
            return None
        if "MALLOC_MMAP_THRESHOLD_" in os.environ or "mmap_threshold" in os.environ.get("GLIBC_TUNABLES", ""):
            return None  # the user's own threshold wins
        try:
            libc = ctypes.CDLL(None)
            if hasattr(libc, "gnu_get_libc_version"):  # glibc only: musl and others differ in what mallopt does
                _state["libc"] = libc
        except (OSError, AttributeError):
            pass
    return _state["libc"]


@contextmanager
def freed_memory_returned(threshold: int = DEFAULT_THRESHOLD) -> Iterator[bool]:
    """Within the block (from any thread; blocks may nest and overlap), freed blocks of at least
    ``threshold`` bytes go back to the system; yields whether the allocator was set."""
    libc = _libc()
    if libc is None:
        yield False
        return
    with _lock:
        if _state["depth"] == 0:
            libc.mallopt(M_MMAP_THRESHOLD, int(threshold))
        _state["depth"] += 1
    try:
        yield True
    finally:
        with _lock:
            _state["depth"] -= 1
            if _state["depth"] == 0:
                libc.mallopt(M_MMAP_THRESHOLD, REUSE_THRESHOLD)
                libc.mallopt(M_TRIM_THRESHOLD, REUSE_TRIM)
