"""Lossless: the tensor's own bytes, split into byte planes, then zstandard.

Splitting an element's bytes into planes (all first bytes, then all second bytes, ...) puts the
slowly varying sign/exponent bytes side by side, where zstd finds structure that is invisible in
interleaved floats. Measured on SmolLM2 fp32 KV (1,024 tokens, 256-token chunks): plain zstd-3
1.086x, planes + zstd-3 1.163x, planes + XOR-to-previous-token 1.144x, planes + zstd-19 1.181x at
1/50 of the speed. The round trip is bit-exact, NaN payloads included.

Decoding trusts nothing in the frame: its header and block headers are walked first (one frame,
ending exactly where the segment ends, stating the content size the file's header implies, blocks
that can produce that much), and only then does zstd run, into an output of exactly that size with
its window bounded by it (docs/CODEC.md, "Bounds")."""

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

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
MAX_BLOCK = 128 << 10  # zstd's Block_Maximum_Size
MIN_FRAME_HEADER = 6  # magic, descriptor, 1-byte content size
MIN_BLOCK_BYTES = 4  # an RLE block (3-byte header + 1 byte) is the densest: 4 bytes -> up to 128 KiB
MAX_WINDOW_LOG = 27  # what zstd -22 (non-long mode) uses at most


def min_frame_bytes(content: int) -> int:
    """The fewest bytes a zstd frame stating ``content`` bytes can have: so a frame of n bytes decodes
    to at most ~32,768·n bytes, whatever its header claims."""
    return MIN_FRAME_HEADER + MIN_BLOCK_BYTES * max(1, -(-content // MAX_BLOCK))


def check_zstd_frame(data: bytes, content: int, what: str) -> None:
    """Raise FormatError unless ``data`` is exactly one zstd frame that states ``content`` bytes of
    content, uses no dictionary, and whose blocks can produce that much. Only headers are read: the
    walk costs one step per block and allocates nothing."""
    _, produced = walk_zstd_frame(data, what, content)
    if produced < content:
        raise FormatError(f"{what}: zstd blocks cannot produce the {content} bytes the frame states")


def walk_zstd_frame(data: bytes, what: str, content: int | None = None) -> tuple[int, int]:
    """(stated content size, most bytes its blocks can produce) of ``data``, which must be exactly one
    zstd frame with a stated content size (equal to ``content`` when given), no dictionary and a window
    of at most 2^27 bytes."""
    n = len(data)
    if n < MIN_FRAME_HEADER or data[:4] != ZSTD_MAGIC:
        raise FormatError(f"{what}: not a zstd frame")
    fhd = data[4]
    fcs_flag, single, reserved, checksum, dict_flag = fhd >> 6, (fhd >> 5) & 1, (fhd >> 3) & 1, (fhd >> 2) & 1, fhd & 3
    if reserved or dict_flag:
        raise FormatError(f"{what}: zstd frame uses reserved bits or a dictionary")
    pos = 5
    window = None
    if not single:
        wd = data[pos]
        exponent, mantissa = wd >> 3, wd & 7
        if 10 + exponent > MAX_WINDOW_LOG:
            raise FormatError(f"{what}: zstd frame asks for a window over 2^{MAX_WINDOW_LOG} bytes")
        base = 1 << (10 + exponent)
        window = base + (base >> 3) * mantissa
        pos += 1
    size_bytes = (1 if single else 0, 2, 4, 8)[fcs_flag]
    if size_bytes == 0:
        raise FormatError(f"{what}: zstd frame does not state its content size")
    if pos + size_bytes > n:
        raise FormatError(f"{what}: truncated zstd frame header")
    stated = int.from_bytes(data[pos : pos + size_bytes], "little") + (256 if size_bytes == 2 else 0)
    pos += size_bytes
    if content is not None and stated != content:
        raise FormatError(f"{what}: holds {stated} bytes, expected {content}")
    block_max = min(MAX_BLOCK, window if window is not None else max(stated, 1))
    produced = 0
    while True:
        if pos + 3 > n:
            raise FormatError(f"{what}: truncated zstd frame")
        bh = int.from_bytes(data[pos : pos + 3], "little")
        pos += 3
        last, kind, size = bh & 1, (bh >> 1) & 3, bh >> 3
        if kind == 3:
            raise FormatError(f"{what}: zstd block of the reserved type")
        if kind == 1:  # RLE: one byte repeated `size` times
            if size > block_max:
                raise FormatError(f"{what}: zstd block larger than the frame allows")
            pos += 1
            produced += size
        else:  # raw or compressed: `size` bytes follow, producing at most block_max
            if size > block_max:
                raise FormatError(f"{what}: zstd block larger than the frame allows")
            pos += size
            produced += size if kind == 0 else block_max
        if pos > n:
            raise FormatError(f"{what}: truncated zstd frame")
        if last:
            break
    if checksum:
        pos += 4
    if pos != n:
        raise FormatError(f"{what}: the zstd frame ends at byte {pos} of a {n}-byte segment")
    return stated, produced


def decompress_exact(data: bytes, content: int, what: str) -> bytes:
    """``data`` (one zstd frame, checked by check_zstd_frame) decompressed to exactly ``content`` bytes."""
    check_zstd_frame(data, content, what)
    window = 1 << max(10, min(MAX_WINDOW_LOG, max(content, 1).bit_length()))
    try:
        raw = zstandard.ZstdDecompressor(max_window_size=window).decompress(data, max_output_size=content)
    except zstandard.ZstdError as exc:
        raise FormatError(f"{what}: corrupt zstd data ({exc})") from None
    if len(raw) != content:
        raise FormatError(f"{what}: decoded {len(raw)} bytes, expected {content}")
    return raw


class LosslessCodec:
    codec_id = CODEC_ID

    def __init__(self, params: dict):
        if type(params) is not dict:
            raise FormatError("lossless level parameters must be an object")
        self.transform = params.get("transform", "byteplanes")
        if type(self.transform) is not str or self.transform not in _TRANSFORMS:
            raise FormatError(f"unknown lossless transform {str(self.transform)[:40]!r}: this file needs a newer kvc")
        level = params.get("zstd_level", 3)
        if type(level) is not int or not -7 <= level <= 22:
            raise FormatError(f"bad zstd level {str(level)[:40]!r} in the file header")
        self.level = level

    @staticmethod
    def min_segment_bytes(segment: Segment) -> int:
        """The shortest segment that can hold ``segment`` (the plausibility bound a reader checks first)."""
        H, T, D = segment.shape
        return min_frame_bytes(H * T * D * segment.dtype.itemsize)

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
        """The segment's zstd frame, walked and bounded (check_zstd_frame) before zstd allocates anything."""
        count = segment.shape[0] * segment.shape[1] * segment.shape[2]
        raw = decompress_exact(data, count * segment.dtype.itemsize, f"layer {segment.layer} {segment.kind}")
        return np.frombuffer(raw, dtype=np.uint8)


register_codec(CODEC_ID, lambda params, profile: LosslessCodec(params))
register_level(LOSSLESS, lambda profile: {"codec": CODEC_ID, "params": dict(DEFAULT_PARAMS), "profile": None})
