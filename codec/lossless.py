"""Lossless: the tensor's own bytes, split into byte planes, then zstandard.

Splitting an element's bytes into planes (all first bytes, then all second bytes, ...) puts the
slowly varying sign/exponent bytes side by side, where zstd finds structure that is invisible in
interleaved floats. Measured on SmolLM2 fp32 KV (1,024 tokens, 256-token chunks): plain zstd-3
1.086x, planes + zstd-3 1.163x, planes + XOR-to-previous-token 1.144x, planes + zstd-19 1.181x at
1/50 of the speed. The round trip is bit-exact, NaN payloads included."""

from __future__ import annotations

import numpy as np
import torch
import zstandard

from kvc.codec import byteplanes
from kvc.codec.base import Segment
from kvc.codec.registry import LOSSLESS, register_codec, register_level
from kvc.errors import FormatError
from kvc.workers import run_tasks

CODEC_ID = "lossless"
DEFAULT_PARAMS = {"transform": "byteplanes", "zstd_level": 3}
_TRANSFORMS = ("byteplanes", "none")


class LosslessCodec:
    codec_id = CODEC_ID

    def __init__(self, params: dict):
        self.transform = params.get("transform", "byteplanes")
        if self.transform not in _TRANSFORMS:
            raise FormatError(f"unknown lossless transform {self.transform!r}: this file needs a newer kvc")
        level = params.get("zstd_level", 3)
        if not isinstance(level, int) or not -7 <= level <= 22:
            raise FormatError(f"bad zstd level {level!r} in the file header")
        self.level = level

    def encode(self, tensor: torch.Tensor, segment: Segment) -> bytes:
        raw = tensor.contiguous().view(torch.uint8).numpy()
        if self.transform == "byteplanes":
            raw = byteplanes.split(raw, tensor.element_size())
        return zstandard.ZstdCompressor(level=self.level, write_content_size=True).compress(raw.tobytes())

    def encode_many(self, groups: list[tuple[torch.Tensor, list[Segment]]], threads: int | None = None):
        """Each group's segments (which tile its tensor in order), one group per task on a thread pool:
        zstd releases the GIL."""

        results: list[list[bytes] | None] = [None] * len(groups)

        def task(i: int) -> None:
            tensor, segments = groups[i]
            out, at = [], 0
            for seg in segments:
                out.append(self.encode(tensor[:, at : at + seg.shape[1]], seg))
                at += seg.shape[1]
            results[i] = out

        run_tasks(task, [(i,) for i in range(len(groups))], threads)
        return results

    def decode(self, data: bytes, segment: Segment) -> torch.Tensor:
        out = torch.empty(segment.shape, dtype=segment.dtype)
        self.decode_many([([(data, segment)], out)], threads=1)
        return out

    def decode_many(self, groups: list[tuple[list[tuple[bytes, Segment]], torch.Tensor]], threads: int | None = None):
        """Decode segments straight into the ``[H, T, D]`` tensors they tile (one group per (layer, kind)),
        one segment per task on a thread pool: zstd and the plane join both release the GIL."""

        tasks = []
        for parts, out in groups:
            at = 0
            for data, segment in parts:
                tasks.append((data, segment, out, at))
                at += segment.shape[1]
            if at != out.shape[1]:
                raise ValueError("segments do not tile their output")
        run_tasks(self._decode_into, tasks, threads)

    def _decode_into(self, data, segment: Segment, out: torch.Tensor, at: int) -> None:
        if out.dtype != segment.dtype or not out.is_contiguous():
            raise ValueError("lossless decodes into contiguous tensors of the segment's dtype")
        raw = self._planes(data, segment)
        H, T, D = segment.shape
        if self.transform == "byteplanes":
            byteplanes.join_into(raw, byteplanes.uint_view(out), (H, T, D), out.shape[1] * D, D, at * D)
        else:
            out[:, at : at + T] = torch.frombuffer(bytearray(raw), dtype=out.dtype).view(H, T, D)

    def _planes(self, data, segment: Segment) -> np.ndarray:
        itemsize = torch.empty(0, dtype=segment.dtype).element_size()
        count = segment.shape[0] * segment.shape[1] * segment.shape[2]
        expected = count * itemsize
        # The frame states its own size: check it against what the header promises before
        # letting zstd allocate anything.
        try:
            stated = zstandard.frame_content_size(data)
        except zstandard.ZstdError as exc:
            raise FormatError(f"layer {segment.layer} {segment.kind}: not a zstd frame") from exc
        if stated != expected:
            raise FormatError(f"layer {segment.layer} {segment.kind}: holds {stated} bytes, expected {expected}")
        try:
            raw = zstandard.ZstdDecompressor().decompress(data, max_output_size=expected)
        except zstandard.ZstdError as exc:
            raise FormatError(f"layer {segment.layer} {segment.kind}: corrupt zstd data ({exc})") from exc
        if len(raw) != expected:
            raise FormatError(f"layer {segment.layer} {segment.kind}: decoded {len(raw)} bytes, expected {expected}")
        return np.frombuffer(raw, dtype=np.uint8)


register_codec(CODEC_ID, lambda params, profile: LosslessCodec(params))
register_level(LOSSLESS, lambda profile: {"codec": CODEC_ID, "params": dict(DEFAULT_PARAMS), "profile": None})
