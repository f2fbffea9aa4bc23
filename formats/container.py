"""Read and write .kvc containers: bytes in, checked structures out.

The container knows chunks, levels and segments as byte ranges; what the bytes mean is the
codec's business (kvc.codec). Writing builds the whole file in memory and lands it atomically;
reading validates the preamble, header digest and header structure before touching any payload,
and every payload is checked against its SHA-256 when read."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from kvc.errors import FormatError, InputError, VersionError
from kvc.formats import header as header_schema
from kvc.formats import layout


@dataclass
class EncodedChunk:
    start: int
    end: int
    encodings: dict[str, list[bytes]]  # level name -> one byte string per segment


def build(header: dict, chunks: list[EncodedChunk], attachments: dict[str, bytes] | None = None) -> bytes:
    """The complete file: ``header`` gains chunks, attachments and data_length; payloads follow it."""
    data = io.BytesIO()
    index = []
    for chunk in chunks:
        entries = []
        for level, segments in chunk.encodings.items():
            payload = b"".join(segments)
            entries.append(
                {
                    "level": level,
                    "offset": data.tell(),
                    "length": len(payload),
                    "sha256": hashlib.sha256(payload).hexdigest(),
                    "segments": [len(s) for s in segments],
                }
            )
            data.write(payload)
        index.append({"start": chunk.start, "end": chunk.end, "encodings": entries})
    atts = []
    for name, blob in (attachments or {}).items():
        atts.append(
            {"name": name, "offset": data.tell(), "length": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
        )
        data.write(blob)
    full = dict(header, chunks=index, data_length=data.tell())
    if atts:
        full["attachments"] = atts
    text = json.dumps(full, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()
    if len(text) > layout.MAX_HEADER_BYTES:
        raise InputError(f"the header would be {len(text)} bytes, over the {layout.MAX_HEADER_BYTES}-byte limit")
    try:  # never write what a reader would refuse
        header_schema.validate(header_schema.parse_json(text, "the header"), data.tell())
    except FormatError as exc:
        raise InputError(f"refusing to write an invalid file: {exc}") from None
    head = layout.PREAMBLE.pack(layout.MAGIC, layout.MAJOR, layout.MINOR, len(text)) + text
    return head + hashlib.sha256(head).digest() + data.getvalue()


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that the name only ever holds a complete file."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


class _Source:
    """Random-access bytes from a file or a buffer, never read past their end."""

    def __init__(self, handle: BinaryIO | None = None, buffer: bytes | None = None):
        self._handle, self._buffer = handle, buffer
        if buffer is not None:
            self.size = len(buffer)
        else:
            handle.seek(0, os.SEEK_END)
            self.size = handle.tell()

    def read(self, offset: int, length: int, what: str) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise FormatError(
                f"truncated file: {what} needs bytes {offset}..{offset + length}, the file has {self.size}"
            )
        if self._buffer is not None:
            return bytes(self._buffer[offset : offset + length])
        self._handle.seek(offset)
        out = self._handle.read(length)
        if len(out) != length:
            raise FormatError(f"truncated file while reading {what}")
        return out

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()


class Container:
    """An opened .kvc: its validated header and checked access to its payloads."""

    def __init__(self, source: _Source, name: str):
        self._source, self.name = source, name
        magic, major, minor, header_len = layout.PREAMBLE.unpack(self._read_preamble(source, name))
        if magic != layout.MAGIC:
            raise FormatError(f"{name} is not a .kvc file (bad magic bytes)")
        if major > layout.MAJOR:
            raise VersionError(
                f"{name} uses .kvc format {major}.{minor}; this kvc reads format {layout.MAJOR}.x "
                f"and older: upgrade kvc"
            )
        if major < 1:
            raise FormatError(f"{name} claims format version {major}.{minor}, which never existed")
        if header_len > layout.MAX_HEADER_BYTES:
            raise FormatError(f"{name}: header of {header_len} bytes is over the {layout.MAX_HEADER_BYTES}-byte limit")
        head = layout.PREAMBLE.pack(magic, major, minor, header_len) + source.read(
            layout.PREAMBLE_BYTES, header_len, "the header"
        )
        digest = source.read(layout.PREAMBLE_BYTES + header_len, layout.DIGEST_BYTES, "the header checksum")
        if hashlib.sha256(head).digest() != digest:
            raise FormatError(f"{name}: header checksum mismatch (the file is corrupt)")
        header = header_schema.parse_json(head[layout.PREAMBLE_BYTES :], f"{name}: header")
        self.version = (major, minor)
        self.data_start = layout.PREAMBLE_BYTES + header_len + layout.DIGEST_BYTES
        available = source.size - self.data_start
        promised = header.get("data_length") if type(header) is dict else None
        if type(promised) is int and promised > available:
            raise FormatError(f"truncated file: {name} promises {promised} data bytes, holds {available}")
        if type(promised) is int and promised < available:
            raise FormatError(f"{name} has {available - promised} unexpected bytes after its data (data_length)")
        header_schema.validate(header, available)
        self.header = header

    @staticmethod
    def _read_preamble(source: _Source, name: str) -> bytes:
        if source.size < layout.PREAMBLE_BYTES:
            if source.size >= 4 and source.read(0, 4, "the magic") != layout.MAGIC[:4]:
                raise FormatError(f"{name} is not a .kvc file (bad magic bytes)")
            raise FormatError(f"{name} is not a .kvc file (only {source.size} bytes)")
        return source.read(0, layout.PREAMBLE_BYTES, "the preamble")

    def payload(self, chunk_index: int, level: str) -> tuple[dict, bytes]:
        """The checked payload of one chunk at one level, with its index entry."""
        chunk = self.header["chunks"][chunk_index]
        for enc in chunk["encodings"]:
            if enc["level"] == level:
                data = self._source.read(self.data_start + enc["offset"], enc["length"], f"chunk {chunk_index}")
                if hashlib.sha256(data).hexdigest() != enc["sha256"]:
                    raise FormatError(
                        f"{self.name}: chunk {chunk_index} ({level}) checksum mismatch (the file is corrupt)"
                    )
                return enc, data
        raise InputError(f"chunk {chunk_index} has no encoding at level {level!r}")

    def attachment(self, name: str, sha256: str | None = None) -> bytes | None:
        """The checked bytes of attachment ``name``; None when there is none, or when ``sha256`` is given
        and the attachment's recorded hash is another (its bytes are then never read)."""
        for att in self.header.get("attachments", []):
            if att["name"] == name:
                if sha256 is not None and att["sha256"] != sha256:
                    return None
                data = self._source.read(self.data_start + att["offset"], att["length"], f"attachment {name}")
                if hashlib.sha256(data).hexdigest() != att["sha256"]:
                    raise FormatError(f"{self.name}: attachment {name} checksum mismatch (the file is corrupt)")
                return data
        return None

    def close(self) -> None:
        self._source.close()


def open_container(source: str | Path | bytes | bytearray | memoryview) -> Container:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return Container(_Source(buffer=bytes(source)), "<bytes>")
    path = Path(source)
    if not path.exists():
        raise InputError(f"no such file: {path}")
    if path.is_dir():
        raise InputError(f"{path} is a folder, not a .kvc file")
    try:
        handle = open(path, "rb")
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        return Container(_Source(handle=handle), str(path))
    except BaseException:
        handle.close()
        raise
