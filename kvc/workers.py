"""The one thread pool kvc's parallel work runs on, and how many threads it gets.

Decoding and encoding split into independent tasks (a layer's segments, a chunk's checksum) whose
heavy parts release the GIL (numba kernels, zstd, hashlib, torch ops), so plain threads use every
core without processes or copies."""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor

_POOLS: dict[int, ThreadPoolExecutor] = {}


def default_threads() -> int:
    """Every core this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _pool(threads: int) -> ThreadPoolExecutor:
    pool = _POOLS.get(threads)
    if pool is None:
        pool = _POOLS[threads] = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="kvc")
    return pool


@contextlib.contextmanager
def torch_single_thread():
    """torch with one intra-op thread meanwhile, for work whose own threads are the parallelism: idle OpenMP
    workers spinning after each small op would steal the cores (measured: 3× slower)."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def run_tasks(fn, tasks: list[tuple], threads: int | None = None, torch_single: bool = False) -> None:
    """``fn(*task)`` for every task on ``threads`` pool threads (default: every core; in order on the
    caller when 1); the first exception is re-raised once every task has ended.

    ``torch_single`` runs torch with one intra-op thread meanwhile (:func:`torch_single_thread`)."""
    threads = threads or default_threads()
    with torch_single_thread() if torch_single else contextlib.nullcontext():
        if threads <= 1 or len(tasks) <= 1:
            for task in tasks:
                fn(*task)
            return
        futures = [_pool(threads).submit(fn, *task) for task in tasks]
        for f in futures:
            f.exception()  # wait for all: no task may still write into a buffer the caller frees
        for f in futures:
            f.result()
