"""The contract between the container and any codec.

A chunk's payload is a run of *segments*, one per (layer, key|value) in layer order, key before
value. Each segment holds one tensor ``[heads, tokens, dim]`` and is encoded and decoded on its
own, so a reader can fetch a single layer and a codec never sees more than one tensor at a time.
A codec is built from a *level* entry of the file header (``{"codec": id, "params": {...}}``)
and, for lossy codecs, the fitted *profile* the level names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class Segment:
    layer: int
    kind: str  # "key" or "value"
    start: int  # absolute position in the context of the segment's first token
    shape: tuple[int, int, int]  # [heads, tokens, dim]
    dtype: torch.dtype  # the model's dtype, which decode must return


class SegmentCodec(Protocol):
    codec_id: str

    def encode(self, tensor: torch.Tensor, segment: Segment) -> bytes: ...

    def decode(self, data: bytes, segment: Segment) -> torch.Tensor: ...
