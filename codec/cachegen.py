"""CacheGen as published (Liu et al., SIGCOMM 2024), as a baseline and an option (codec id "cachegen").

* tokens in groups of ``group`` (10); the first of each group is the *anchor*, quantised with
  ``anchor_bits`` (8) and a per-token absmax scale; the others are coded as deltas from the
  reconstructed anchor, per-token scaled, with ``delta_bits[layer]`` bits — layers in thirds,
  earlier layers getting more bits;
* arithmetic coding with one table per channel (head × dim) — anchors and deltas separately —
  measured on the chunk itself and stored with it (side information, counted in the bytes);
* no profile: the codec works on raw post-rotary keys and values.

Segment layout: ``u8 version | u16 reserved | f16 scales[T] | u32 table_len | zstd(tables) |
u32 n_words | u32 words[n_words]``.
"""

from __future__ import annotations

import struct

import numpy as np
import torch
import zstandard

from kvc.codec.base import Segment
from kvc.codec.entropy import decode_with_chunk_tables, encode_with_chunk_tables
from kvc.codec.quantizers import dequantize_per_token, quantize_per_token, read_u32
from kvc.errors import FormatError

VERSION = 1
MAX_TABLE = 64 << 20


def default_params(num_layers: int, bits: tuple[int, int, int] = (6, 5, 4), group: int = 10) -> dict:
    third = [min(2, (3 * i) // max(1, num_layers)) for i in range(num_layers)]
    return {"group": group, "anchor_bits": 8, "delta_bits": [bits[t] for t in third]}


class CacheGenCodec:
    codec_id = "cachegen"

    def __init__(self, params: dict):
        try:
            self.group = int(params.get("group", 10))
            self.anchor_bits = int(params.get("anchor_bits", 8))
            self.delta_bits = [int(b) for b in params["delta_bits"]]
        except (KeyError, TypeError, ValueError):
            raise FormatError("cachegen level parameters are malformed") from None
        if not (1 <= self.group <= 4096 and 2 <= self.anchor_bits <= 16 and all(2 <= b <= 16 for b in self.delta_bits)):
            raise FormatError("cachegen parameters out of range")

    def _bits(self, layer: int) -> int:
        if not 0 <= layer < len(self.delta_bits):
            raise FormatError(f"cachegen level has no bit width for layer {layer}")
        return self.delta_bits[layer]

    def _split(self, T: int) -> tuple[np.ndarray, np.ndarray]:
        t = np.arange(T)
        return t[t % self.group == 0], t[t % self.group != 0]

    def encode(self, tensor: torch.Tensor, segment: Segment) -> bytes:
        H, T, D = segment.shape
        x = torch.nan_to_num(tensor.float(), nan=0.0).clamp(-65504, 65504).numpy()
        anchors, deltas = self._split(T)
        scales = np.zeros(T, np.float16)
        qa, sa = quantize_per_token(x[:, anchors], self.anchor_bits)
        scales[anchors] = sa
        rec_anchor = dequantize_per_token(qa, sa)
        qd = np.zeros((H, 0, D), np.int64)
        if len(deltas):
            d = x[:, deltas] - rec_anchor[:, deltas // self.group]  # anchor index = t // group
            qd, sd = quantize_per_token(d, self._bits(segment.layer))
            scales[deltas] = sd
        table_a, words_a = encode_with_chunk_tables(qa.transpose(0, 2, 1).reshape(H * D, -1))
        table_d, words_d = (b"", b"")
        if len(deltas):
            table_d, words_d = encode_with_chunk_tables(qd.transpose(0, 2, 1).reshape(H * D, -1))
        tables = zstandard.ZstdCompressor(level=19).compress(
            struct.pack("<I", len(table_a)) + table_a + table_d)
        out = bytearray(struct.pack("<BH", VERSION, 0)) + scales.astype("<f2").tobytes()
        out += struct.pack("<I", len(tables)) + tables
        out += struct.pack("<I", len(words_a) // 4) + words_a
        out += struct.pack("<I", len(words_d) // 4) + words_d
        return bytes(out)

    def decode(self, data: bytes, segment: Segment) -> torch.Tensor:
        H, T, D = segment.shape
        data = bytes(data)
        if len(data) < 3 or data[0] != VERSION:
            raise FormatError("bad cachegen segment header")
        pos = 3
        if pos + 2 * T > len(data):
            raise FormatError("truncated cachegen segment")
        scales = np.frombuffer(data, "<f2", T, pos).astype(np.float32)
        scales = np.nan_to_num(scales, nan=0.0, posinf=0.0, neginf=0.0)
        pos += 2 * T
        tlen, pos = read_u32(data, pos)
        if pos + tlen > len(data):
            raise FormatError("truncated cachegen tables")
        try:
            tables = zstandard.ZstdDecompressor().decompress(data[pos : pos + tlen], max_output_size=MAX_TABLE)
        except zstandard.ZstdError as exc:
            raise FormatError(f"corrupt cachegen tables: {exc}") from None
        pos += tlen
        if len(tables) < 4:
            raise FormatError("corrupt cachegen tables")
        alen = struct.unpack_from("<I", tables, 0)[0]
        if 4 + alen > len(tables):
            raise FormatError("corrupt cachegen tables")
        table_a, table_d = tables[4 : 4 + alen], tables[4 + alen :]
        na, pos = read_u32(data, pos)
        if pos + 4 * na > len(data):
            raise FormatError("truncated cachegen payload")
        words_a = data[pos : pos + 4 * na]
        pos += 4 * na
        nd, pos = read_u32(data, pos)
        if pos + 4 * nd != len(data):
            raise FormatError("cachegen segment length mismatch")
        words_d = data[pos:]
        anchors, deltas = self._split(T)
        qa = decode_with_chunk_tables(table_a, words_a, H * D, len(anchors)).reshape(H, D, -1).transpose(0, 2, 1)
        out = np.zeros((H, T, D), np.float32)
        rec_anchor = dequantize_per_token(qa, scales[anchors])
        out[:, anchors] = rec_anchor
        if len(deltas):
            self._bits(segment.layer)
            qd = decode_with_chunk_tables(table_d, words_d, H * D, len(deltas)).reshape(H, D, -1).transpose(0, 2, 1)
            out[:, deltas] = rec_anchor[:, deltas // self.group] + dequantize_per_token(qd, scales[deltas])
        res = torch.from_numpy(np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0))
        if segment.dtype.is_floating_point:
            big = float(torch.finfo(segment.dtype).max)
            res = res.clamp(-big, big)
        return res.to(segment.dtype)
