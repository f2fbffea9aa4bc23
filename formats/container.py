"""Read and write .kvc containers: bytes in, checked structures out.

The container knows chunks, levels and segments as byte ranges; what the bytes mean is the
codec's business (kvc.codec). Writing builds the whole file in memory and lands it atomically;
reading validates the preamble, header digest and header structure before touching any payload,
and every payload is checked against its checksum when read (kvc.formats.digests)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from kvc.errors import FormatError, InputError, VersionError
from kvc.formats import header as header_schema
from kvc.formats import layout
from kvc.formats.digests import PayloadHasher, payload_digests, payload_intact


@dataclass
class EncodedChunk:
    start: int
    end: int
    encodings: dict[str, list[bytes]]  # level name -> one byte string per segment


def build(header: dict, chunks: list[EncodedChunk], attachments: dict[str, bytes] | None = None) -> bytes:
    """The complete file: ``header`` gains chunks, attachments and data_length; payloads follow it.

    Payloads are laid out level-major (format 1.1, ``payload_order: "level"``): every chunk of the
    first level in chunk order, then every chunk of the next level, so one level is one contiguous
    run of the data section and a reader streaming through a pipe can stop after the run it wants."""
    levels = list(dict.fromkeys(name for chunk in chunks for name in chunk.encodings))
    data = io.BytesIO()
    entries: list[dict[str, dict]] = [{} for _ in chunks]
    for level in levels:
        for c, chunk in enumerate(chunks):
            segments = chunk.encodings.get(level)
            if segments is None:
                continue
            payload = b"".join(segments)
            entries[c][level] = {
                "level": level,
                "offset": data.tell(),
                "length": len(payload),
                **payload_digests(payload),
                "segments": [len(s) for s in segments],
            }
            data.write(payload)
    index = [
        {"start": chunk.start, "end": chunk.end, "encodings": [entries[c][level] for level in chunk.encodings]}
        for c, chunk in enumerate(chunks)
    ]
    atts = []
    for name, blob in (attachments or {}).items():
        atts.append(
            {"name": name, "offset": data.tell(), "length": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
        )
        data.write(blob)
    full = dict(header, payload_order="level", chunks=index, data_length=data.tell())
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


def new_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file (0666 less the umask). mkstemp makes 0600, so a
    temporary file gets this before it is renamed into place."""
    mask = os.umask(0o022)  # the only portable way to read the umask is to set it; put it straight back
    os.umask(mask)
    return 0o666 & ~mask


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that the name only ever holds a complete file (with the mode a
    plain write would give it)."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, new_file_mode())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


class PayloadSpool:
    """A container written without holding its payloads in memory.

    Segments are put as a codec produces them (for each level, one (layer, kind) across all chunks
    at a time, in slot order) and go straight to a temporary file; :meth:`write_to` then writes the
    header and copies the payloads out in the layout :func:`build` gives the same chunks, so the
    result is the file build() would make. Memory: one segment at a time plus the index."""

    def __init__(self, bounds: list[tuple[int, int]], levels: list[str], slots: int, folder: str | None = None):
        self.bounds, self.levels, self.slots = bounds, list(levels), slots
        self._file = tempfile.TemporaryFile(prefix="kvc-spool-", dir=folder)
        self._end = 0
        self._parts: dict[tuple[int, str], list[tuple[int, int]]] = {(c, lv): [] for c in range(len(bounds))
                                                                       for lv in self.levels}  # fmt: skip
        self._hash = {key: PayloadHasher() for key in self._parts}

    def put(self, chunk: int, level: str, slot: int, blob: bytes) -> None:
        parts = self._parts[(chunk, level)]
        if slot != len(parts):
            raise ValueError(f"segment {slot} of chunk {chunk} ({level}) put out of order")
        self._file.write(blob)
        parts.append((self._end, len(blob)))
        self._end += len(blob)
        self._hash[(chunk, level)].update(blob)

    def close(self) -> None:
        self._file.close()

    def index(self, header: dict, attachments: dict[str, bytes] | None = None) -> dict:
        """``header`` with chunks, attachments and data_length, as build() would complete it (level-major)."""
        entries: list[dict[str, dict]] = [{} for _ in self.bounds]
        at = 0
        for level in self.levels:
            for c in range(len(self.bounds)):
                parts = self._parts[(c, level)]
                if len(parts) != self.slots:
                    raise ValueError(f"chunk {c} ({level}) has {len(parts)} of {self.slots} segments")
                length = sum(n for _, n in parts)
                entries[c][level] = {"level": level, "offset": at, "length": length,
                                     **self._hash[(c, level)].digests(), "segments": [n for _, n in parts]}
                at += length
        index = [{"start": start, "end": end, "encodings": [entries[c][level] for level in self.levels]}
                 for c, (start, end) in enumerate(self.bounds)]  # fmt: skip
        atts = []
        for name, blob in (attachments or {}).items():
            atts.append({"name": name, "offset": at, "length": len(blob), "sha256": hashlib.sha256(blob).hexdigest()})
            at += len(blob)
        full = dict(header, payload_order="level", chunks=index, data_length=at)
        if atts:
            full["attachments"] = atts
        return full

    def write_to(self, out: BinaryIO, header: dict, attachments: dict[str, bytes] | None = None) -> int:
        """Write the whole container to ``out``; returns its size in bytes. May be called more than once
        (the same payloads under different headers: a duplicate document under its own name)."""
        full = self.index(header, attachments)
        text = json.dumps(full, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()
        if len(text) > layout.MAX_HEADER_BYTES:
            raise InputError(f"the header would be {len(text)} bytes, over the {layout.MAX_HEADER_BYTES}-byte limit")
        try:  # never write what a reader would refuse
            header_schema.validate(header_schema.parse_json(text, "the header"), full["data_length"])
        except FormatError as exc:
            raise InputError(f"refusing to write an invalid file: {exc}") from None
        head = layout.PREAMBLE.pack(layout.MAGIC, layout.MAJOR, layout.MINOR, len(text)) + text
        out.write(head + hashlib.sha256(head).digest())
        self._file.flush()
        for level in self.levels:
            for c in range(len(self.bounds)):
                for offset, length in self._parts[(c, level)]:
                    if length:
                        self._file.seek(offset)
                        out.write(self._file.read(length))
        for blob in (attachments or {}).values():
            out.write(blob)
        self._file.seek(0, os.SEEK_END)
        return len(head) + layout.DIGEST_BYTES + full["data_length"]


class _Source:
    """Random-access bytes from a file or a buffer, never read past their end."""

    def __init__(self, handle: BinaryIO | None = None, buffer: bytes | None = None):
        self._handle = handle
        self._buffer = memoryview(buffer) if buffer is not None else None
        if buffer is not None:
            self.size = len(buffer)
        else:
            handle.seek(0, os.SEEK_END)
            self.size = handle.tell()

    def read(self, offset: int, length: int, what: str) -> bytes | memoryview:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise FormatError(
                f"truncated file: {what} needs bytes {offset}..{offset + length}, the file has {self.size}"
            )
        if self._buffer is not None:
            return self._buffer[offset : offset + length]  # a view: in-memory files are read without copies
        self._handle.seek(offset)
        out = self._handle.read(length)
        if len(out) != length:
            raise FormatError(f"truncated file while reading {what}")
        return out

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()


@dataclass
class Head:
    """What the front of a file says: its validated header, its version and where its data starts."""

    header: dict
    version: tuple[int, int]
    data_start: int  # 48 + H: the header's offsets count from here


def read_head(read: Callable[[int, int, str], bytes], size: int | None, name: str) -> Head:
    """Preamble, header and header digest, read through ``read(offset, length, what)`` and checked in the
    order docs/FORMAT.md gives. ``size`` is the file size, or None when it is not known (a pipe): then
    the data section is taken to be as long as the header says and the reader checks it as it goes."""
    if size is not None and size < layout.PREAMBLE_BYTES:
        if size >= 4 and bytes(read(0, 4, "the magic")) != layout.MAGIC[:4]:
            raise FormatError(f"{name} is not a .kvc file (bad magic bytes)")
        raise FormatError(f"{name} is not a .kvc file (only {size} bytes)")
    preamble = bytes(read(0, layout.PREAMBLE_BYTES, "the preamble"))
    magic, major, minor, header_len = layout.PREAMBLE.unpack(preamble)
    if magic != layout.MAGIC:
        raise FormatError(f"{name} is not a .kvc file (bad magic bytes)")
    if major > layout.MAJOR:
        raise VersionError(
            f"{name} uses .kvc format {major}.{minor}; this kvc reads format {layout.MAJOR}.x and older: upgrade kvc"
        )
    if major < 1:
        raise FormatError(f"{name} claims format version {major}.{minor}, which never existed")
    if header_len > layout.MAX_HEADER_BYTES:
        raise FormatError(f"{name}: header of {header_len} bytes is over the {layout.MAX_HEADER_BYTES}-byte limit")
    head = preamble + bytes(read(layout.PREAMBLE_BYTES, header_len, "the header"))
    digest = bytes(read(layout.PREAMBLE_BYTES + header_len, layout.DIGEST_BYTES, "the header checksum"))
    if hashlib.sha256(head).digest() != digest:
        raise FormatError(f"{name}: header checksum mismatch (the file is corrupt)")
    header = header_schema.parse_json(head[layout.PREAMBLE_BYTES :], f"{name}: header")
    data_start = layout.PREAMBLE_BYTES + header_len + layout.DIGEST_BYTES
    promised = header.get("data_length") if type(header) is dict else None
    if size is None:
        if not (type(promised) is int and 0 <= promised < 1 << 62):
            raise FormatError(f"invalid header: data_length must be a non-negative integer, got {promised!r}")
        available = promised
    else:
        available = size - data_start
        if type(promised) is int and promised > available:
            raise FormatError(f"truncated file: {name} promises {promised} data bytes, holds {available}")
        if type(promised) is int and promised < available:
            raise FormatError(f"{name} has {available - promised} unexpected bytes after its data (data_length)")
    header_schema.validate(header, available)
    return Head(header=header, version=(major, minor), data_start=data_start)


def same_content(a: bytes, b: bytes) -> bool:
    """Whether two .kvc files hold the same context, payloads and metadata: byte for byte, but for the
    fingerprint of the kernels that prefilled them (``prefill.kernels``; a Ray actor given one CPU runs
    torch on one thread and records another than a process running on several)."""

    def parts(data: bytes) -> tuple[dict, bytes]:
        head = read_head(lambda offset, length, what: data[offset : offset + length], len(data), "a file")
        header = dict(head.header, prefill=dict(head.header.get("prefill", {})))
        header["prefill"].pop("kernels", None)
        return header, data[head.data_start :]

    return parts(a) == parts(b)


class Container:
    """An opened .kvc: its validated header and checked access to its payloads."""

    def __init__(self, source: _Source, name: str):
        self._source, self.name = source, name
        head = read_head(source.read, source.size, name)
        self.header, self.version, self.data_start = head.header, head.version, head.data_start

    def payload(self, chunk_index: int, level: str) -> tuple[dict, bytes]:
        """The checked payload of one chunk at one level, with its index entry."""
        chunk = self.header["chunks"][chunk_index]
        for enc in chunk["encodings"]:
            if enc["level"] == level:
                data = self._source.read(self.data_start + enc["offset"], enc["length"], f"chunk {chunk_index}")
                if not payload_intact(enc, data):
                    raise FormatError(
                        f"{self.name}: chunk {chunk_index} ({level}) checksum mismatch (the file is corrupt)"
                    )
                return enc, data
        raise InputError(f"chunk {chunk_index} has no encoding at level {level!r}")

    def payloads(self, chunk_indices: list[int], level: str, threads: int | None = None,
                 thorough: bool = False) -> list[tuple[dict, bytes]]:
        """:meth:`payload` for many chunks: read in order, checksums verified on kvc.workers' pool
        (hashing releases the GIL, and it is still a visible part of a read)."""
        from kvc.workers import run_tasks

        found = []
        for index in chunk_indices:
            enc = next((e for e in self.header["chunks"][index]["encodings"] if e["level"] == level), None)
            if enc is None:
                raise InputError(f"chunk {index} has no encoding at level {level!r}")
            found.append((index, enc, self._source.read(self.data_start + enc["offset"], enc["length"],
                                                        f"chunk {index}")))  # fmt: skip

        def check(index: int, enc: dict, data) -> None:
            if not payload_intact(enc, data, thorough):
                raise FormatError(f"{self.name}: chunk {index} ({level}) checksum mismatch (the file is corrupt)")

        run_tasks(check, found, threads)
        return [(enc, data) for _, enc, data in found]

    def attachment(self, name: str, sha256: str | None = None) -> bytes | None:
        """The checked bytes of attachment ``name``; None when there is none, or when ``sha256`` is given
        and the attachment's recorded hash is another (its bytes are then never read)."""
        for att in self.header.get("attachments", []):
            if att["name"] == name:
                if sha256 is not None and att["sha256"] != sha256:
                    return None
                data = bytes(self._source.read(self.data_start + att["offset"], att["length"], f"attachment {name}"))
                if hashlib.sha256(data).hexdigest() != att["sha256"]:
                    raise FormatError(f"{self.name}: attachment {name} checksum mismatch (the file is corrupt)")
                return data
        return None

    def close(self) -> None:
        self._source.close()


def open_container(source: str | Path | bytes | bytearray | memoryview) -> Container:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return Container(_Source(buffer=bytes(source)), "<bytes>")
    if isinstance(source, str) and "://" in source and not source.startswith("file://"):
        from kvc.batch.storage import open_read  # any fsspec URL: s3://, gs://, memory://, http(s)://

        handle = open_read(source)
        try:
            return Container(_Source(handle=handle), source)
        except BaseException:
            handle.close()
            raise
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
