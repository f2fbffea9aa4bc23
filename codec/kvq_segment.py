"""The byte layout of a kvq segment, versions 2 and 3 (docs/CODEC.md, "Byte layout of a kvq segment").

    u8   version = 2 or 3
    u8   flags   = 1 if the segment holds sink tokens else 0
    u16  lanes   = n (0 when no channel is flagged)
    [sinks]      as in version 1 (kvc.codec.quantizers.pack_sinks)
    [if body tokens]
         (version 3 only)
         u8          fine shift s: the fine rows' symbols are in steps of 2^-s (0 when there is no fine row)
         u32         r: fine rows (a 65,536-token chunk can hold 65,536)
         r × u16     the fine rows: body token offsets, strictly increasing
         (both versions)
         ceil(C / 8) bytes   channel flags, bit c of byte c // 8 (little bit order)
         n × u32             words in each lane
         Σ words × u16       the lanes' rANS words, lane after lane, each in decode order

Lane j codes the flagged channels ``[j·F // n, (j+1)·F // n)`` of the F flagged ones, in channel
order, each channel's body tokens in token order. A version-3 segment's fine rows (the tokens the
profile found the model most sensitive to, e.g. SmolLM2's " the") were quantised with a step 2^s times
finer; their symbols are coded with the same tables and multiplied by 2^-s before synthesis. This
module turns bytes into lane descriptions (and back); the arithmetic lives in kvc.codec.rans, the
transforms in kvc.codec.kvq.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from kvc.errors import FormatError

VERSION = 2  # what a level without fine tokens writes (and every kvc since the lane bitstream reads)
FINE_VERSION = 3  # what a level with fine tokens writes: version 2 plus the fine rows
MAX_FINE_SHIFT = 4  # fine rows' steps are 1/2 to 1/16 of the others'
LANE_SYMBOLS = 16384  # the encoder's target symbols per lane: enough lanes to feed every core and a GPU
MAX_LANES = 65535
_HEAD = struct.Struct("<BBH")
_FINE_HEAD = struct.Struct("<BI")  # version 3: fine shift, fine row count


@dataclass
class SegmentLanes:
    """What a version-2 segment holds past its sinks, checked against its own bytes."""

    flagged: np.ndarray  # int64 channel indices with any nonzero symbol
    lane_bounds: np.ndarray  # int64 [n + 1]: lane j codes flagged[lane_bounds[j]:lane_bounds[j+1]]
    words: np.ndarray  # uint16 [Σ words], possibly unaligned view of the segment bytes
    lane_words: np.ndarray  # int64 [n]


def lane_bounds(flagged_count: int, lanes: int) -> np.ndarray:
    return (np.arange(lanes + 1, dtype=np.int64) * flagged_count) // max(lanes, 1)


def choose_lanes(flagged_count: int, tokens: int) -> int:
    if flagged_count == 0 or tokens == 0:
        return 0
    return int(min(max(1, -(-flagged_count * tokens // LANE_SYMBOLS)), flagged_count, MAX_LANES))


def read_head(data: bytes) -> tuple[int, int, int]:
    """(version, flags, lanes)."""
    if len(data) < _HEAD.size:
        raise FormatError("truncated kvq segment")
    return _HEAD.unpack_from(data, 0)


def write(sinks: bytes | None, channels: int, flagged: np.ndarray, lanes: list[np.ndarray],
          fine: np.ndarray | None = None, shift: int = 0) -> bytes:
    """A segment's bytes: version 3 when ``fine`` (the fine rows, body offsets; possibly empty) is given."""
    version = VERSION if fine is None else FINE_VERSION
    out = bytearray(_HEAD.pack(version, 1 if sinks is not None else 0, len(lanes)))
    if sinks is not None:
        out += sinks
    if channels and fine is not None:
        out += _FINE_HEAD.pack(shift if len(fine) else 0, len(fine))
        out += np.asarray(fine, dtype="<u2").tobytes()
    if channels:
        flags = np.zeros(channels, dtype=bool)
        flags[flagged] = True
        out += np.packbits(flags, bitorder="little").tobytes()
        out += np.array([len(w) for w in lanes], dtype="<u4").tobytes()
        for w in lanes:
            out += w.astype("<u2").tobytes()
    return bytes(out)


def read_fine(data: bytes, pos: int, tokens: int) -> tuple[np.ndarray, int, int]:
    """A version-3 segment's fine rows at ``pos`` (its body of ``tokens`` tokens starts there): (rows as
    int64 body offsets, shift, where the channel flags start); every field checked against the bytes."""
    if pos + _FINE_HEAD.size > len(data):
        raise FormatError("truncated kvq segment (fine rows)")
    shift, count = _FINE_HEAD.unpack_from(data, pos)
    pos += _FINE_HEAD.size
    if count > tokens or pos + 2 * count > len(data):
        raise FormatError("kvq segment lists more fine rows than it has tokens")
    if (count == 0) != (shift == 0) or shift > MAX_FINE_SHIFT:
        raise FormatError(f"kvq segment fine shift {shift} is out of range for {count} fine rows")
    rows = np.frombuffer(data, "<u2", count, pos).astype(np.int64)
    if count and (rows[-1] >= tokens or np.any(np.diff(rows) <= 0)):
        raise FormatError("kvq segment fine rows are not increasing body offsets")
    return rows, shift, pos + 2 * count


def parse_body(data: bytes, pos: int, channels: int, tokens: int, lanes: int) -> SegmentLanes:
    """The lanes of a segment whose body (``tokens`` tokens of ``channels`` channels) starts at ``pos``."""
    nflag = (channels + 7) // 8
    if pos + nflag > len(data):
        raise FormatError("truncated kvq segment (channel flags)")
    flags = np.unpackbits(np.frombuffer(data, np.uint8, nflag, pos), count=channels, bitorder="little")
    if nflag and channels % 8 and int(data[pos + nflag - 1]) >> (channels % 8):
        raise FormatError("kvq segment sets flags past its last channel")
    pos += nflag
    flagged = np.flatnonzero(flags).astype(np.int64)
    F = len(flagged)
    if (F == 0) != (lanes == 0) or lanes > F:
        raise FormatError(f"kvq segment has {lanes} lanes for {F} flagged channels")
    if pos + 4 * lanes > len(data):
        raise FormatError("truncated kvq segment (lane table)")
    lane_words = np.frombuffer(data, "<u4", lanes, pos).astype(np.int64)
    pos += 4 * lanes
    total = int(lane_words.sum())
    if pos + 2 * total != len(data):
        raise FormatError("kvq segment length does not match its lane table")
    bounds = lane_bounds(F, lanes)
    # a lane holds ≥ 2 words and ≤ 3 per symbol + 2; anything else cannot decode, so refuse it now
    symbols = (bounds[1:] - bounds[:-1]) * tokens
    if lanes and (np.any(lane_words < 2) or np.any(lane_words > 3 * symbols + 2)):
        raise FormatError("kvq lane sizes are impossible for its symbol count")
    return SegmentLanes(flagged, bounds, np.frombuffer(data, "<u2", total, pos), lane_words)
