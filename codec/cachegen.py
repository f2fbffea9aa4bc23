"""CacheGen as published (Liu et al., SIGCOMM 2024), as a baseline and an option (codec id "cachegen").

* tokens in groups of ``group`` (10); the first of each group is the *anchor*, quantised with
  ``anchor_bits`` (8) and a per-token absmax scale; the others are coded as deltas from the
  reconstructed anchor, per-token scaled, with ``delta_bits[layer]`` bits — layers in thirds,
  earlier layers getting more bits;
* arithmetic coding with one table per channel (head × dim) — anchors and deltas separately —
  measured on the chunk itself and stored with it (side information, counted in the bytes);
* no profile: the codec works on raw post-rotary keys and values.

Segment layout (docs/CODEC.md): ``u8 version | u16 reserved | f16 scales[T] | u32 table_len |
zstd(tables) | u32 n_anchor_words | u32 words[n_anchor_words] | u32 n_delta_words |
u32 words[n_delta_words]``.
"""

from __future__ import annotations

import struct

import constriction
import numpy as np
import torch
import zstandard

from kvc.codec.base import Segment
from kvc.codec.entropy import _CODER_ERRORS, _chunk_model, encode_with_chunk_tables
from kvc.codec.lossless import decompress_exact, min_frame_bytes, walk_zstd_frame
from kvc.codec.quantizers import dequantize_per_token, quantize_per_token, read_u32
from kvc.errors import FormatError
from kvc.formats.layout import MAX_LAYERS

VERSION = 1
MAX_TABLE = 64 << 20


def default_params(num_layers: int, bits: tuple[int, int, int] = (6, 5, 4), group: int = 10) -> dict:
    third = [min(2, (3 * i) // max(1, num_layers)) for i in range(num_layers)]
    return {"group": group, "anchor_bits": 8, "delta_bits": [bits[t] for t in third]}


def _plain_int(value, low: int, high: int, what: str) -> int:
    if type(value) is not int or not low <= value <= high:
        raise FormatError(f"cachegen parameter {what} must be an integer in [{low}, {high}]")
    return value


def _parse_tables(table: bytes, channels: int, what: str) -> list[tuple[int, np.ndarray]]:
    """Per-channel ``(lo, counts)`` from a table blob (``i32 lo, u16 K, K × u16`` per channel); the blob
    must hold exactly ``channels`` tables with K ≥ 1 and a positive total each."""
    out = []
    pos, n = 0, len(table)
    for _ in range(channels):
        if pos + 6 > n:
            raise FormatError(f"corrupt cachegen {what} tables")
        lo, k = struct.unpack_from("<iH", table, pos)
        pos += 6
        if k == 0 or pos + 2 * k > n:
            raise FormatError(f"corrupt cachegen {what} tables")
        counts = np.frombuffer(table, dtype="<u2", count=k, offset=pos)
        pos += 2 * k
        if not counts.any():
            raise FormatError(f"corrupt cachegen {what} tables")
        out.append((lo, counts))
    if pos != n:
        raise FormatError(f"cachegen {what} tables hold {n - pos} unexpected bytes")
    return out


def _decode_channels(tables: list[tuple[int, np.ndarray]], words: bytes, tokens: int, what: str):
    """Yield each channel's ``tokens`` symbols (int64), decoded in channel order from one ANS stream
    coded with that channel's table (entropy.encode_with_chunk_tables is the encoder)."""
    if len(words) % 4:
        raise FormatError("corrupt cachegen payload length")
    try:  # constriction refuses some streams outright (a last word of 0), before any decoding
        coder = constriction.stream.stack.AnsCoder(np.frombuffer(words, dtype="<u4").copy())
    except _CODER_ERRORS as exc:
        raise FormatError(f"corrupt cachegen {what} data: {exc}") from None
    for lo, counts in tables:
        try:
            symbols = coder.decode(_chunk_model(counts.astype(np.float64)), tokens)
        except _CODER_ERRORS as exc:
            raise FormatError(f"corrupt cachegen {what} data: {exc}") from None
        yield symbols.astype(np.int64) + lo


class CacheGenCodec:
    codec_id = "cachegen"

    def __init__(self, params: dict):
        if type(params) is not dict:
            raise FormatError("cachegen level parameters must be an object")
        self.group = _plain_int(params.get("group", 10), 1, 4096, "group")
        self.anchor_bits = _plain_int(params.get("anchor_bits", 8), 2, 16, "anchor_bits")
        bits = params.get("delta_bits")
        if type(bits) is not list or not 1 <= len(bits) <= MAX_LAYERS:
            raise FormatError("cachegen level parameters are malformed: delta_bits must list one width per layer")
        self.delta_bits = [_plain_int(b, 2, 16, "delta_bits") for b in bits]

    def _bits(self, layer: int) -> int:
        if not 0 <= layer < len(self.delta_bits):
            raise FormatError(f"cachegen level has no bit width for layer {layer}")
        return self.delta_bits[layer]

    def _split(self, T: int) -> tuple[np.ndarray, np.ndarray]:
        t = np.arange(T)
        return t[t % self.group == 0], t[t % self.group != 0]

    def _min_table_content(self, channels: int, tokens: int) -> int:
        # u32 anchor-table length, then 6 + 2·K ≥ 8 bytes per channel table: anchors always, deltas when
        # some token is not an anchor
        return 4 + 8 * channels * (2 if tokens > 1 and self.group > 1 else 1)

    def min_segment_bytes(self, segment: Segment) -> int:
        """The shortest segment that can hold ``segment``: header, T scales, the smallest zstd frame the
        per-channel tables fit in, and the three u32 lengths (the ANS words may be empty)."""
        H, T, D = segment.shape
        return 3 + 2 * T + 4 + min_frame_bytes(self._min_table_content(H * D, T)) + 4 + 4

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
        tables = zstandard.ZstdCompressor(level=19).compress(struct.pack("<I", len(table_a)) + table_a + table_d)
        out = bytearray(struct.pack("<BH", VERSION, 0)) + scales.astype("<f2").tobytes()
        out += struct.pack("<I", len(tables)) + tables
        out += struct.pack("<I", len(words_a) // 4) + words_a
        out += struct.pack("<I", len(words_d) // 4) + words_d
        return bytes(out)

    def decode(self, data: bytes, segment: Segment) -> torch.Tensor:
        """Every length and table is checked against the segment before the output is allocated; the
        output (float32 ``[H, T, D]``) is then filled channel by channel, so decoding takes the output
        plus one channel's symbols, never a ``[H·D, T]`` symbol array."""
        H, T, D = segment.shape
        C = H * D
        data = bytes(data)
        if len(data) < self.min_segment_bytes(segment) or data[0] != VERSION or data[1:3] != b"\0\0":
            raise FormatError("bad cachegen segment header")
        pos = 3
        scales = np.frombuffer(data, "<f2", T, pos).astype(np.float32)
        scales = np.nan_to_num(scales, nan=0.0, posinf=0.0, neginf=0.0)
        pos += 2 * T
        tlen, pos = read_u32(data, pos)
        if tlen > len(data) - pos:
            raise FormatError("truncated cachegen tables")
        frame = data[pos : pos + tlen]
        pos += tlen
        content, _ = walk_zstd_frame(frame, "cachegen tables")
        if not self._min_table_content(C, T) <= content <= MAX_TABLE:
            raise FormatError("corrupt cachegen tables: implausible size")
        tables = decompress_exact(frame, content, "cachegen tables")
        alen = struct.unpack_from("<I", tables, 0)[0]
        if 4 + alen > len(tables):
            raise FormatError("corrupt cachegen tables")
        anchors, deltas = self._split(T)
        table_a = _parse_tables(tables[4 : 4 + alen], C, "anchor")
        table_d = _parse_tables(tables[4 + alen :], C if len(deltas) else 0, "delta")
        del tables
        na, pos = read_u32(data, pos)
        if na > (len(data) - pos) // 4:
            raise FormatError("truncated cachegen payload")
        words_a = data[pos : pos + 4 * na]
        pos += 4 * na
        nd, pos = read_u32(data, pos)
        if pos + 4 * nd != len(data):
            raise FormatError("cachegen segment length mismatch")
        words_d = data[pos:]
        if len(deltas):
            self._bits(segment.layer)  # a level without a delta width for this layer is invalid
        out = np.zeros((H, T, D), np.float32)
        sa, sd = scales[anchors], scales[deltas]
        owner = deltas // self.group  # the anchor each delta token refers to (index into anchors)
        delta_symbols = _decode_channels(table_d, words_d, len(deltas), "delta") if len(deltas) else None
        for c, qa in enumerate(_decode_channels(table_a, words_a, len(anchors), "anchor")):
            h, d = divmod(c, D)
            rec = qa.astype(np.float32) * sa  # = quantizers.dequantize_per_token, one channel
            out[h, anchors, d] = rec
            if delta_symbols is not None:
                qd = next(delta_symbols)
                out[h, deltas, d] = rec[owner] + qd.astype(np.float32) * sd
        res = torch.from_numpy(np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0, copy=False))
        if segment.dtype != torch.float32 and segment.dtype.is_floating_point:
            big = float(torch.finfo(segment.dtype).max)
            if big < float(torch.finfo(torch.float32).max):
                res = res.clamp_(-big, big)
        return res.to(segment.dtype)
