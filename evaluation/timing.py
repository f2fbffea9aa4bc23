"""Time to first token, split into the steps an application pays for, and a modelled network.

A mode's TTFT is ``read + decode + build + first``:

* ``read``   bytes from local storage into memory (the .kvc file; nothing for text or exact),
* ``decode`` the container parsed and the level decoded to plain tensors (checksums verified),
* ``build``  the transformers cache made ready: a copy of tensors for a cache, the whole prefill for text,
* ``first``  one forward of the next token over that cache, to its argmax: the first generated token.

With a network of ``B`` Gbit/s between storage and the model, ``read`` is replaced by
``transfer = bytes * 8 / (B * 1e9)``: the bytes actually stored for the level (text sends only its
token ids, 4 bytes each; exact sends the raw tensors, as an uncompressed cache would be sent)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

STEPS = ("read", "decode", "build", "first")
TOKEN_ID_BYTES = 4  # a token id as a uint32: what text mode moves over the network


@dataclass
class Breakdown:
    read: float = 0.0
    decode: float = 0.0
    build: float = 0.0
    first: float = 0.0
    samples: int = 0  # how many repeats the medians are taken over

    @property
    def total(self) -> float:
        return self.read + self.decode + self.build + self.first

    def at_bandwidth(self, transfer_bytes: int, gbit_per_s: float) -> float:
        """TTFT when the bytes come over a ``gbit_per_s`` link instead of from local storage."""
        return transfer_seconds(transfer_bytes, gbit_per_s) + self.decode + self.build + self.first

    def as_dict(self) -> dict:
        return {**{s: getattr(self, s) for s in STEPS}, "total": self.total, "repeats": self.samples}


def transfer_seconds(nbytes: int, gbit_per_s: float) -> float:
    if gbit_per_s <= 0:
        raise ValueError("bandwidth must be positive")
    return nbytes * 8 / (gbit_per_s * 1e9)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Stopwatch:
    """Times named steps of one run; ``device`` is synchronised so GPU work is charged to its step."""

    device: object = "cpu"
    laps: dict[str, float] = field(default_factory=dict)

    def step(self, name: str, fn: Callable, *args, **kwargs):
        _sync(self.device)
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        _sync(self.device)
        self.laps[name] = self.laps.get(name, 0.0) + time.perf_counter() - t0
        return result


def median_breakdown(runs: list[dict[str, float]]) -> Breakdown:
    """Per-step medians. Each step's median is taken on its own: the total is their sum, which is
    what a steady-state run costs, not the median of whole runs."""
    if not runs:
        return Breakdown()
    return Breakdown(**{s: statistics.median(r.get(s, 0.0) for r in runs) for s in STEPS}, samples=len(runs))


def parse_bandwidths(text: str | None) -> list[float]:
    """``"0.1,1,10"`` → ``[0.1, 1.0, 10.0]`` (Gbit/s); raises ValueError on anything else."""
    if not text:
        return []
    values = [float(v) for v in text.split(",") if v.strip()]
    if any(v <= 0 for v in values):
        raise ValueError("bandwidths must be positive Gbit/s values")
    return values
