"""The fixed parts of a .kvc file (docs/FORMAT.md is the normative text).

    offset  size  field
    0       8     magic  89 4B 56 43 0D 0A 1A 0A   ("\\x89KVC\\r\\n\\x1a\\n")
    8       2     major version, u16 little-endian
    10      2     minor version, u16 little-endian
    12      4     header length H, u32 little-endian, at most MAX_HEADER_BYTES
    16      H     header: UTF-8 JSON object
    16+H    32    SHA-256 of bytes [0, 16+H)
    48+H    ...   data: chunk payloads and attachments, at offsets the header gives

The magic's high first byte catches 7-bit transports and its CR LF / LF pair catches newline
translation, as PNG's does."""

from __future__ import annotations

import struct

MAGIC = b"\x89KVC\r\n\x1a\n"
MAJOR = 1
MINOR = 3  # 1.1: payloads level-major (payload_order); 1.2: a level's optional target; 1.3: xxh3_128; FORMAT.md
PREAMBLE = struct.Struct("<8sHHI")
PREAMBLE_BYTES = PREAMBLE.size  # 16
DIGEST_BYTES = 32
MAX_HEADER_BYTES = 64 << 20

# Bounds on what a header may claim, checked before anything is allocated from it.
MAX_TOKENS = 1 << 24
MAX_LAYERS = 1024
MAX_HEADS = 1024
MAX_HEAD_DIM = 4096
MAX_CHUNK_TOKENS = 1 << 16
MAX_TOKEN_ID = 1 << 31
MAX_LEVELS = 64
MAX_ATTACHMENTS = 64
