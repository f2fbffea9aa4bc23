"""Checksums of chunk payloads: which ones a file carries, how to make them and how to check them.

Every encoding in the index has carried a SHA-256 of its payload since format 1.0. At the speed the
decoders reach, SHA-256 (about 1 GB/s per core even with the CPU's SHA instructions) became a third of
a lossless read, so format 1.3 adds an XXH3-128 of the same bytes beside it (several GB/s per core).
A reader that knows ``xxh3_128`` checks it instead of the SHA-256; older readers ignore the field and
check the SHA-256, so they read 1.3 files unchanged. ``kvc verify`` checks both.

Neither is a defence against a forger, who can recompute any checksum: they catch damage (a bad
disk, a truncated upload, a file changed while being read). The header, which holds them, keeps its
SHA-256 digest."""

from __future__ import annotations

import hashlib

import xxhash

FAST = "xxh3_128"  # format 1.3: 32 lowercase hex digits
STRONG = "sha256"  # every format: 64 lowercase hex digits


def payload_digests(data) -> dict[str, str]:
    """The checksums a writer records for a payload, in index-entry order."""
    return {STRONG: hashlib.sha256(data).hexdigest(), FAST: xxhash.xxh3_128_hexdigest(data)}


class PayloadHasher:
    """:func:`payload_digests` of bytes given piece by piece."""

    def __init__(self):
        self._strong, self._fast = hashlib.sha256(), xxhash.xxh3_128()

    def update(self, data) -> None:
        self._strong.update(data)
        self._fast.update(data)

    def digests(self) -> dict[str, str]:
        return {STRONG: self._strong.hexdigest(), FAST: self._fast.hexdigest()}


def payload_intact(entry: dict, data, thorough: bool = False) -> bool:
    """Whether ``data`` matches the index ``entry``'s checksums: the fast one when the entry has it
    (format 1.3), else the SHA-256; ``thorough`` checks every one it has."""
    if FAST in entry:
        if xxhash.xxh3_128_hexdigest(data) != entry[FAST]:
            return False
        if not thorough:
            return True
    return hashlib.sha256(data).hexdigest() == entry[STRONG]
