"""Byte-range sources: where a .kvc file's bytes come from, behind one small interface.

The loader asks for byte ranges and gets them; it does not care whether they come from a local
file, an HTTP(S) server answering Range requests, an fsspec filesystem (``s3://``, ``gs://``,
``memory://``, ...) or a pipe. fsspec's ``cat_file(path, start, end)`` is the model.

Every source answers ``read(offset, length, what)`` with exactly ``length`` bytes or raises, and
``prefix(n)`` with the first ``min(n, size)`` bytes (how the loader learns the header in one
request). ``fetch`` is ``read`` with timings and cancellation, which the loader uses for chunk
payloads so it can measure the link and abandon a chunk it decided to recompute instead.

Failures are kvc errors with one-line messages: :class:`SourceError` (exit code 2) when the
bytes cannot be had (unreachable, not found, connection dropped, timed out), and
:class:`SourceChangedError` (exit code 3) when the file changed between two reads."""

from __future__ import annotations

import http.client
import os
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import quote, urlsplit

from kvc.errors import FormatError, InputError

DEFAULT_TIMEOUT_S = 30.0
_PIECE = 64 * 1024  # the most bytes read between two checks for cancellation (and progress reports); an HTTP
# body is read as its packets arrive, so on a slow link the loader tells the rate (and cancels) after a few ms
_STALL_FLOOR = 1024  # an HTTP body that brings fewer bytes than this within the timeout has stalled
_URL_SAFE = "/%:@!$&'()*+,;=-._~"  # what a request target keeps unescaped (RFC 3986 pchar, plus "/" and "%")


def _reason(exc: BaseException) -> str:
    """An exception from a storage backend as a short reason: its message, or its type when it has none."""
    return str(exc) or type(exc).__name__


class SourceError(InputError):
    """The source could not deliver the bytes asked for: unreachable, not found, dropped, timed out."""


class SourceChangedError(FormatError):
    """The file changed while it was being read (its ETag or a chunk's SHA-256 no longer matches)."""


@dataclass
class Fetched:
    """One range's bytes and when they came: ``first`` is when the first byte (or the response
    headers) arrived, so ``first - started`` is the request's latency and ``done - first`` its transfer."""

    data: bytes
    started: float
    first: float
    done: float


class RangeSource:
    """Random access to a file's bytes by range. Subclasses implement ``_read`` (and may set ``size``)."""

    name: str = "<source>"
    size: int | None = None  # None: not known (a pipe) until the header says how long the file is
    seekable: bool = True  # False: ranges must be asked for in increasing order (a pipe)
    prefix_first_byte: float | None = None  # perf_counter() when prefix()'s first byte came, where known
    origin: str | None = None  # where the bytes come from (``scheme://host:port``), for links worth remembering

    def read(self, offset: int, length: int, what: str = "bytes") -> bytes:
        if offset < 0 or length < 0 or (self.size is not None and offset + length > self.size):
            raise FormatError(
                f"truncated file: {what} needs bytes {offset}..{offset + length}, {self.name} has {self.size}"
            )
        if length == 0:
            return b""
        data = self._read(offset, length, what, None, None)
        assert data is not None
        return data

    def prefix(self, n: int) -> bytes:
        """The first ``min(n, size)`` bytes."""
        return self.read(0, n if self.size is None else min(n, self.size), "the header")

    def fetch(
        self,
        offset: int,
        length: int,
        what: str = "bytes",
        cancel: threading.Event | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> Fetched | None:
        """``read`` with timings; None when ``cancel`` was set before the range was complete."""
        started = time.perf_counter()
        if offset < 0 or length < 0 or (self.size is not None and offset + length > self.size):
            raise FormatError(
                f"truncated file: {what} needs bytes {offset}..{offset + length}, {self.name} has {self.size}"
            )
        holder: list[float] = []
        data = self._read(offset, length, what, cancel, progress, holder) if length else b""
        if data is None:
            return None
        done = time.perf_counter()
        return Fetched(data=data, started=started, first=holder[0] if holder else started, done=done)

    def _read(self, offset, length, what, cancel, progress, first_byte: list | None = None) -> bytes | None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class BytesSource(RangeSource):
    def __init__(self, data: bytes | bytearray | memoryview, name: str = "<bytes>"):
        self._data = bytes(data)
        self.size, self.name = len(self._data), name

    def _read(self, offset, length, what, cancel, progress, first_byte=None):
        return self._data[offset : offset + length]


class FileSource(RangeSource):
    """A local file, read with ``os.pread`` (thread-safe, no shared file position)."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.exists():
            raise InputError(f"no such file: {path}")
        if path.is_dir():
            raise InputError(f"{path} is a folder, not a .kvc file")
        try:
            self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        except OSError as exc:
            raise InputError(f"cannot read {path}: {exc.strerror}") from exc
        self.size, self.name = os.fstat(self._fd).st_size, str(path)

    def _read(self, offset, length, what, cancel, progress, first_byte=None):
        out = bytearray()
        while len(out) < length:
            if cancel is not None and cancel.is_set():
                return None
            piece = os.pread(self._fd, min(length - len(out), 8 * _PIECE), offset + len(out))
            if not piece:
                raise FormatError(f"truncated file while reading {what} from {self.name}")
            out += piece
            if progress is not None:
                progress(len(piece))
        return bytes(out)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class FileObjectSource(RangeSource):
    """A seekable binary file object (an open file, a BytesIO), read under a lock."""

    def __init__(self, handle: BinaryIO, name: str = "<file>"):
        self._handle, self.name = handle, name
        self._lock = threading.Lock()
        handle.seek(0, os.SEEK_END)
        self.size = handle.tell()

    def _read(self, offset, length, what, cancel, progress, first_byte=None):
        with self._lock:
            self._handle.seek(offset)
            data = self._handle.read(length)
        if len(data) != length:
            raise FormatError(f"truncated file while reading {what} from {self.name}")
        return bytes(data)


class StreamSource(RangeSource):
    """A non-seekable stream (a pipe, stdin, a socket file): ranges are served in increasing order,
    bytes in between are read and dropped, nothing before the current position can be had again."""

    seekable = False

    def __init__(self, stream: BinaryIO, name: str = "<stream>"):
        self._stream, self.name = stream, name
        self._pos = 0  # stream offset of _pending[0]
        self._pending = b""  # bytes read ahead by prefix(), not yet consumed

    def _take(self, n: int, what: str) -> bytes:
        out = bytearray()
        if self._pending:
            out += self._pending[:n]
            self._pending = self._pending[n:]
        while len(out) < n:
            piece = self._stream.read(min(n - len(out), 1 << 20))
            if not piece:
                raise FormatError(
                    f"truncated stream: {self.name} ended after {self._pos + len(out)} bytes, "
                    f"in the middle of {what}"
                )
            out += piece
        self._pos += n
        return bytes(out)

    def prefix(self, n: int) -> bytes:
        # Read up to n bytes, fewer only if the stream ends; keep them for the reads that follow.
        if self._pos != 0:
            raise InputError("a stream's prefix can only be read first")
        buf = bytearray(self._pending)
        while len(buf) < n:
            piece = self._stream.read(n - len(buf))
            if not piece:
                break
            buf += piece
        self._pending = bytes(buf)
        return self._pending[:n]

    def _read(self, offset, length, what, cancel, progress, first_byte=None):
        if offset < self._pos:
            raise InputError(f"{self.name} is a stream: bytes {offset}.. were already passed")
        skip = offset - self._pos
        while skip:
            step = min(skip, 1 << 20)
            self._take(step, what)
            skip -= step
        return self._take(length, what)

    def close(self) -> None:
        if self._stream is not sys.stdin.buffer:
            try:
                self._stream.close()
            except OSError:
                pass


class FsspecSource(RangeSource):
    """Any fsspec URL (``s3://``, ``gs://``, ``memory://``, ``file://``, ...): ``fs.cat_file(path, start, end)``."""

    def __init__(self, url: str, **storage_options):
        try:
            import fsspec
        except ModuleNotFoundError as exc:  # pragma: no cover - fsspec is a core dependency
            raise InputError("reading URLs needs fsspec (pip install fsspec)") from exc
        self.name = url
        parts = urlsplit(url)
        self.origin = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}" if parts.netloc else None
        # Backends raise their own exception types (botocore's NoCredentialsError is no OSError; an ftp://
        # URL's refused connection comes out of url_to_fs), so anything they raise is this source's error.
        try:
            self._fs, self._path = fsspec.core.url_to_fs(url, **storage_options)
        except Exception as exc:  # noqa: BLE001
            raise SourceError(f"cannot open {url}: {_reason(exc)}") from exc
        try:
            info = self._fs.info(self._path)
        except FileNotFoundError as exc:
            raise SourceError(f"not found: {url}") from exc
        except Exception as exc:  # noqa: BLE001
            raise SourceError(f"cannot open {url}: {_reason(exc)}") from exc
        if info.get("type") == "directory":
            raise InputError(f"{url} is a folder, not a .kvc file")
        size = info.get("size")
        self.size = int(size) if size is not None else None

    def _read(self, offset, length, what, cancel, progress, first_byte=None):
        try:
            data = self._fs.cat_file(self._path, start=offset, end=offset + length)
        except FileNotFoundError as exc:
            raise SourceError(f"{self.name} disappeared while {what} was read") from exc
        except Exception as exc:  # noqa: BLE001 - as in __init__: the backend's own types
            raise SourceError(f"{self.name}: reading {what} failed: {_reason(exc)}") from exc
        if cancel is not None and cancel.is_set():
            return None
        if len(data) != length:
            raise SourceChangedError(
                f"{self.name}: asked for {length} bytes of {what}, got {len(data)}: "
                f"the file is shorter than its header says (changed while being read?)"
            )
        if progress is not None:
            progress(length)
        return bytes(data)


def _no_delay(sock) -> None:
    """Send small writes at once (no Nagle): a request and its acknowledgements should not wait for each other."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):  # not a TCP socket: nothing to tune
        pass


class _NoDelay:
    """Mixed into an http.client connection: its socket sends without Nagle's delays."""

    def connect(self):
        super().connect()
        _no_delay(self.sock)


class _HTTPConnection(_NoDelay, http.client.HTTPConnection):
    pass


class _HTTPSConnection(_NoDelay, http.client.HTTPSConnection):
    pass


class HttpSource(RangeSource):
    """An ``http://`` or ``https://`` URL read with Range requests over one kept-alive connection.

    The first response's ETag is sent back as ``If-Match`` on every later request, so a server
    that replaced the file in between answers 412 and the loader says the file changed."""

    def __init__(self, url: str, timeout: float = DEFAULT_TIMEOUT_S, headers: dict[str, str] | None = None):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InputError(f"not an http(s) URL: {url}")
        try:
            port = parts.port
        except ValueError:
            raise InputError(f"not a valid port in {url}") from None
        self.name, self._timeout = url, timeout
        self._scheme, self._host, self._port = parts.scheme, parts.hostname, port
        self.origin = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"
        # A request line is ASCII without spaces: other characters are percent-encoded (as a browser
        # does); escapes already in the URL stay as they are.
        self._target = quote(parts.path or "/", safe=_URL_SAFE) + (
            f"?{quote(parts.query, safe=_URL_SAFE + '?')}" if parts.query else "")
        self._headers = dict(headers or {})
        self._conn: http.client.HTTPConnection | None = None
        self._etag: str | None = None
        self._lock = threading.Lock()  # one request at a time on the connection

    def _connect(self) -> http.client.HTTPConnection:
        if self._conn is None:
            if self._scheme == "https":
                self._conn = _HTTPSConnection(
                    self._host, self._port, timeout=self._timeout, context=ssl.create_default_context()
                )
            else:
                self._conn = _HTTPConnection(self._host, self._port, timeout=self._timeout)
        return self._conn

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _send(self, offset: int, length: int):
        headers = {**self._headers, "Range": f"bytes={offset}-{offset + length - 1}", "Accept-Encoding": "identity"}
        if self._etag is not None and not self._etag.startswith("W/"):
            # If-Match compares strongly (RFC 9110): a weak tag there fails on an unchanged file, so a
            # server with weak ETags is checked by comparing the tags it sends back instead
            headers["If-Match"] = self._etag
        for attempt in (0, 1):
            conn = self._connect()
            try:
                conn.request("GET", self._target, headers=headers)
                return conn.getresponse()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
                # A kept-alive connection the server closed while idle: one fresh try, nothing was received.
                self._drop()
                if attempt:
                    raise SourceError(f"{self.name}: the server closed the connection ({exc})") from exc
            except TimeoutError as exc:
                self._drop()
                raise SourceError(f"{self.name}: no answer within {self._timeout:g} s") from exc
            except (OSError, http.client.HTTPException, UnicodeError) as exc:  # UnicodeError: a host not in ASCII
                self._drop()
                raise SourceError(f"cannot reach {self.name}: {getattr(exc, 'strerror', None) or exc}") from exc
        raise AssertionError("unreachable")

    def prefix(self, n: int) -> bytes:
        with self._lock:
            resp = self._send(0, n)
            if resp.status == 416:  # an empty file
                self._finish(resp)
                self.size = 0
                return b""
            total = self._check(resp, 0, None, "the header")
            self.prefix_first_byte = time.perf_counter()
            length = min(n, total)
            return self._body(resp, length, "the header", None, None)

    def _read(self, offset, length, what, cancel, progress, first_byte=None):
        with self._lock:
            resp = self._send(offset, length)
            self._check(resp, offset, length, what)
            if first_byte is not None:
                first_byte.append(time.perf_counter())
            return self._body(resp, length, what, cancel, progress)

    def _check(self, resp, offset: int, length: int | None, what: str) -> int:
        """The response must be 206 for exactly the asked range; returns the file's total size."""
        if resp.status == 206:
            etag = resp.getheader("ETag")
            if self._etag is None:
                self._etag = etag
            elif etag is not None and etag != self._etag:
                self._finish(resp)
                raise SourceChangedError(f"{self.name} changed while being read (its ETag changed)")
            first, last, total = _content_range(resp.getheader("Content-Range"))
            if first != offset or (length is not None and last != offset + length - 1) or total is None:
                self._finish(resp)
                raise SourceError(
                    f"{self.name}: asked for bytes {offset}.. of {what}, the server sent "
                    f"{resp.getheader('Content-Range')!r}"
                )
            if self.size is None:
                self.size = total
            elif total != self.size:
                self._finish(resp)
                raise SourceChangedError(f"{self.name} changed while being read (was {self.size} bytes, now {total})")
            return total
        self._finish(resp)
        if resp.status == 404:
            raise SourceError(f"not found: {self.name} (HTTP 404)")
        if resp.status == 412:
            raise SourceChangedError(f"{self.name} changed while being read (HTTP 412: its ETag no longer matches)")
        if resp.status == 416:
            raise FormatError(f"truncated file: {what} lies past the end of {self.name} (HTTP 416)")
        if resp.status == 200:
            raise SourceError(
                f"{self.name}: the server answered with the whole resource (HTTP 200): it ignores Range requests, "
                f"or the URL is not a file; serve the file with `kvc serve` or pipe it in (... | kvc ask - QUESTION)"
            )
        if 300 <= resp.status < 400 and resp.getheader("Location"):
            raise SourceError(f"{self.name}: HTTP {resp.status} {resp.reason}: redirects are not followed; give the "
                              f"URL it points to ({resp.getheader('Location')})")
        raise SourceError(f"{self.name}: HTTP {resp.status} {resp.reason}")

    def _finish(self, resp) -> None:
        # Drop the connection rather than drain an unwanted body of unknown size.
        resp.close()
        self._drop()

    def _body(self, resp, length, what, cancel, progress) -> bytes | None:
        """The response's ``length`` bytes. Read one system call at a time (``read1``), so cancellation,
        progress and a stalled link are noticed between any two packets: a socket timeout alone never
        fires on a server that trickles a byte every few seconds."""
        buf = bytearray(length)
        got, mark_t, mark_got = 0, time.monotonic(), 0
        try:
            while got < length:
                if cancel is not None and cancel.is_set():
                    self._finish(resp)
                    return None
                data = resp.read1(min(length - got, _PIECE))
                if not data:
                    break
                n = len(data)
                buf[got : got + n] = data
                got += n
                if progress is not None:
                    progress(n)
                if got - mark_got >= _STALL_FLOOR:
                    mark_t, mark_got = time.monotonic(), got
                elif time.monotonic() - mark_t > self._timeout:
                    self._finish(resp)
                    raise SourceError(f"{self.name}: the link stalled: {got - mark_got} bytes of {what} in "
                                      f"{self._timeout:g} s ({got} of {length} in all)")
        except TimeoutError as exc:
            self._finish(resp)
            raise SourceError(f"{self.name}: timed out after {got} of {length} bytes of {what}") from exc
        except (OSError, http.client.HTTPException) as exc:
            self._finish(resp)
            raise SourceError(
                f"{self.name}: the connection dropped after {got} of {length} bytes of {what}"
            ) from exc
        if got < length:
            self._finish(resp)
            raise SourceError(f"{self.name}: the connection dropped after {got} of {length} bytes of {what}")
        if resp.length is None:
            # Chunked, or ended by closing the connection: the asked bytes are here (Content-Range said
            # they are the range); whatever follows is not waited for, and the connection is not reused.
            self._finish(resp)
        elif resp.length:  # a Content-Length past the range: a confused server
            self._finish(resp)
            raise SourceError(f"{self.name}: the server sent more than the {length} bytes of {what} asked for")
        else:
            resp.close()  # the body is read to its end (read1 leaves that to the caller); the connection stays
        return bytes(buf)

    def close(self) -> None:
        self._drop()


def _content_range(value: str | None) -> tuple[int | None, int | None, int | None]:
    """``bytes a-b/total`` → (a, b, total); Nones where it does not parse."""
    try:
        unit, _, rest = (value or "").partition(" ")
        span, _, total = rest.partition("/")
        first, _, last = span.partition("-")
        if unit.strip().lower() != "bytes":
            return None, None, None
        return int(first), int(last), (int(total) if total.strip() != "*" else None)
    except ValueError:
        return None, None, None


def open_source(source, **options) -> RangeSource:
    """A RangeSource for what a user or application hands the loader:

    * a RangeSource: itself;
    * ``bytes``: the bytes;
    * ``"-"``: standard input, as a stream;
    * ``http://`` / ``https://`` URLs: Range requests (``options``: ``timeout``, ``headers``);
    * any other ``scheme://`` URL: fsspec (``options`` are its storage options);
    * a binary file object: as a file when it can seek, else as a stream;
    * anything else: a local path."""
    if isinstance(source, RangeSource):
        return source
    if isinstance(source, (bytes, bytearray, memoryview)):
        return BytesSource(source)
    if hasattr(source, "read") and not isinstance(source, (str, Path)):
        seekable = getattr(source, "seekable", lambda: False)
        if seekable():
            return FileObjectSource(source, str(getattr(source, "name", "<file>")))
        return StreamSource(source, str(getattr(source, "name", "<stream>")))
    text = str(source)
    if text == "-":
        if sys.stdin.isatty():
            raise InputError("reading from stdin, but stdin is a terminal: pipe a file in or give a path or URL")
        return StreamSource(sys.stdin.buffer, "<stdin>")
    scheme = text.split("://", 1)[0].lower() if "://" in text else ""
    if scheme in ("http", "https"):
        return HttpSource(text, **options)
    if scheme:
        return FsspecSource(text, **options)
    return FileSource(text)
