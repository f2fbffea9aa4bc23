"""A small HTTP server for a folder of .kvc files: Range requests, ETags, and an emulated link.

``kvc serve DIR`` runs it; tests and benchmarks start it in a thread (:class:`RangeServer`). It
binds 127.0.0.1 unless told otherwise and serves regular files inside DIR only: a path that
resolves outside DIR (``..``, a symlink pointing out) is 404, as is anything that is not a file.

* ``GET`` / ``HEAD`` with ``Range: bytes=a-b`` (also ``a-`` and ``-n``) answer 206 with
  ``Content-Range``; no Range (or several ranges) answers 200 with the whole file; a range past
  the end answers 416.
* Every response carries an ``ETag`` made from the file's inode, size and modification time; a
  request with ``If-Match`` naming another ETag gets 412, so a reader notices a replaced file.
* ``rate`` (bytes/s) emulates a link: all responses together never send faster than that (one
  shared token bucket, paced in slices of a few milliseconds); ``latency`` delays every response.
* ``GET /`` lists the .kvc files, one relative path per line."""

from __future__ import annotations

import email.utils
import os
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

from kvc.errors import InputError

_RATE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)(?:/s|ps)?\s*$", re.IGNORECASE)
_UNITS = {  # bytes per second per unit; "bit" spelled out, so "mb" (megabytes) and "mbit" never mix
    "bit": 1 / 8, "kbit": 1e3 / 8, "mbit": 1e6 / 8, "gbit": 1e9 / 8,
    "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 1024, "mib": 1024**2, "gib": 1024**3,
}


def parse_rate(text: str) -> float:
    """A link rate as bytes per second: ``"100mbit"``, ``"1gbit/s"``, ``"0.5Gbit"``, ``"20MB/s"``, ``"4MiB"``."""
    match = _RATE.match(text or "")
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _UNITS:
        raise InputError(f"--rate takes a number and a unit (bit, kbit, mbit, gbit, B, KB, MB, GB, KiB, MiB, GiB "
                         f"per second), e.g. 100mbit or 20MB/s; got {text!r}")
    rate = float(match.group(1)) * _UNITS[unit]
    if rate <= 0:
        raise InputError(f"--rate must be positive, got {text!r}")
    return rate


def gbit(bytes_per_s: float) -> float:
    return bytes_per_s * 8 / 1e9


class Link:
    """One emulated link shared by every response: ``send(n)`` returns when n more bytes may go out."""

    def __init__(self, rate: float | None = None):
        self._lock = threading.Lock()
        self._free_at = 0.0
        self.rate = rate

    @property
    def slice_bytes(self) -> int:
        """Bytes sent per pacing step: about 4 ms of the link, between 4 KiB and 1 MiB."""
        if not self.rate:
            return 1 << 20
        return int(min(1 << 20, max(4096, self.rate * 0.004)))

    def wait(self, nbytes: int) -> None:
        rate = self.rate
        if not rate:
            return
        with self._lock:
            now = time.perf_counter()
            start = max(now, self._free_at)
            self._free_at = start + nbytes / rate
            until = self._free_at
        delay = until - time.perf_counter()
        if delay > 0:
            time.sleep(delay)


def _etag(st: os.stat_result) -> str:
    return f'"{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns:x}"'


_SPAN = re.compile(r"^([0-9]*)-([0-9]*)$")  # digits only: int() would also take signs, spaces and "1_0"


def _parse_range(value: str, size: int) -> tuple[int, int] | None | str:
    """``bytes=a-b`` → (a, b) inclusive within the file; None to send the whole file (no range, or one that
    does not parse, as RFC 9110 says to ignore it); "416" if unsatisfiable."""
    unit, _, spec = value.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    match = _SPAN.match(spec.strip())
    if match is None or match.group(1) == match.group(2) == "":
        return None
    first, last = match.groups()
    if first == "":
        n = int(last)
        if n <= 0 or size == 0:  # a suffix of an empty file is no byte at all
            return "416"
        return max(0, size - n), size - 1
    a = int(first)
    b = int(last) if last else size - 1
    if a >= size:
        return "416"
    if b < a:
        return None
    return a, min(b, size - 1)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    server_version = "kvc-serve"
    # A response is two writes, its headers and its body. With Nagle's algorithm a small body waits for the
    # client to acknowledge the headers, which it delays by 40 ms: every read of a .kvc header past its first
    # request took ~45 ms on 127.0.0.1 (0.09 s of every load's time to first token).
    disable_nagle_algorithm = True

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        if self.server.log is not None:
            self.server.log(f"{self.address_string()} {format % args}")

    def do_HEAD(self):  # noqa: N802 - http.server's naming
        self._serve(body=False)

    def do_GET(self):  # noqa: N802
        self._serve(body=True)

    def _resolve(self) -> Path | None:
        path = unquote(urlsplit(self.path).path)
        root = self.server.root
        try:
            target = (root / path.lstrip("/")).resolve()
            target.relative_to(root)
            target.is_file()  # a name too long for the file system raises here, not later
        except (ValueError, OSError, RuntimeError):  # RuntimeError: a symlink loop (Python < 3.13)
            return None
        return target

    def _plain(self, status: int, text: str, body: bool, extra: dict | None = None) -> None:
        data = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if body:
            self.wfile.write(data)

    def _serve(self, body: bool) -> None:
        if self.server.latency:
            time.sleep(self.server.latency)
        target = self._resolve()
        if target is not None and target == self.server.root:
            names = sorted(p.relative_to(self.server.root).as_posix() for p in self.server.root.rglob("*.kvc")
                           if p.is_file() and self._inside(p))
            self._plain(200, "".join(quote(n) + "\n" for n in names), body)
            return
        if target is None or not target.is_file():
            self._plain(404, "not found\n", body)
            return
        try:
            handle = open(target, "rb")
        except OSError:
            self._plain(404, "not found\n", body)
            return
        with handle:
            st = os.fstat(handle.fileno())
            size, etag = st.st_size, _etag(st)
            wanted = self.headers.get("If-Match")
            if wanted is not None and wanted.strip() != "*" and etag not in [w.strip() for w in wanted.split(",")]:
                self._plain(412, "precondition failed: the file changed\n", body, {"ETag": etag})
                return
            span = _parse_range(self.headers.get("Range", ""), size) if self.headers.get("Range") else None
            if span == "416":
                self._plain(416, "range not satisfiable\n", body, {"Content-Range": f"bytes */{size}"})
                return
            first, last = span if span is not None else (0, size - 1)
            length = max(0, last - first + 1)
            self.send_response(206 if span is not None else 200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(length))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("ETag", etag)
            self.send_header("Last-Modified", email.utils.formatdate(st.st_mtime, usegmt=True))
            if span is not None:
                self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
            self.end_headers()
            if not body:
                return
            self._send_file(handle, first, length)

    def _inside(self, path: Path) -> bool:
        try:
            path.resolve().relative_to(self.server.root)
            return True
        except (ValueError, OSError, RuntimeError):
            return False

    def _send_file(self, handle, offset: int, length: int) -> None:
        link = self.server.link
        sent = 0
        try:
            while sent < length:
                n = min(link.slice_bytes, length - sent)
                data = os.pread(handle.fileno(), n, offset + sent)
                if not data:  # the file shrank under us: end the response short, the client notices
                    self.close_connection = True
                    return
                link.wait(len(data))
                self.wfile.write(data)
                sent += len(data)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client gave up on this range (it may have chosen text)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, root: Path, link: Link, latency: float, log):
        self.root, self.link, self.latency, self.log = root, link, latency, log
        if ":" in address[0]:  # an IPv6 literal such as ::1 (the base class listens on IPv4 only)
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def handle_error(self, request, client_address):  # a client that went away is not an error
        if self.log is not None:
            super().handle_error(request, client_address)


class RangeServer:
    """``kvc serve`` as an object: start it (``with RangeServer(folder, rate=...) as srv``) and read
    ``srv.url``. ``rate`` is in bytes per second (None: as fast as it goes) and can be changed while
    running (``srv.rate = ...``); ``port=0`` picks a free port."""

    def __init__(self, root: str | Path, host: str = "127.0.0.1", port: int = 0, rate: float | None = None,
                 latency: float = 0.0, log=None):
        root = Path(root)
        if not root.exists():  # checked here, not per request: serving nothing would answer 404 forever
            raise InputError(f"no such folder: {root}")
        if not root.is_dir():
            raise InputError(f"{root} is not a folder")
        self.link = Link(rate)
        try:
            self._server = _Server((host, port), root.resolve(), self.link, latency, log)
        except OSError as exc:
            raise InputError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
        self._thread: threading.Thread | None = None

    @property
    def host(self) -> str:
        return self._server.server_address[0]

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        host = self.host if ":" not in self.host else f"[{self.host}]"
        return f"http://{host}:{self.port}/"

    def url_for(self, name: str) -> str:
        return self.url + quote(str(name).lstrip("/"))

    @property
    def rate(self) -> float | None:
        return self.link.rate

    @rate.setter
    def rate(self, value: float | None) -> None:
        self.link.rate = value

    def serve_forever(self) -> None:
        self._server.serve_forever(poll_interval=0.2)

    def start(self) -> RangeServer:
        self._thread = threading.Thread(target=self.serve_forever, name="kvc-serve", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> RangeServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

