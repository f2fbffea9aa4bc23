"""Byte-range sources and the Range server, for real: a server on 127.0.0.1 started by the test, fsspec's
``memory://`` filesystem, a real pipe. Every source must hand back the same bytes for the same range."""

from __future__ import annotations

import hashlib
import http.client
import os
import random
import threading
import time

import fsspec
import pytest

import kvc
from kvc.errors import FormatError, InputError
from kvc.runtime.kv import ContextKV, LayerKV
from kvc.streaming import RangeServer, SourceChangedError, SourceError, open_source, open_stream, parse_rate
from kvc.streaming.sources import BytesSource, FileSource, FsspecSource, HttpSource, StreamSource


def small_file() -> bytes:
    import torch

    torch.manual_seed(0)
    layers = [LayerKV(torch.randn(2, 40, 8), torch.randn(2, 40, 8)) for _ in range(2)]
    return kvc.encode_kv(ContextKV(list(range(40)), layers), {"name": "t"}, chunk_tokens=16)


@pytest.fixture()
def served(tmp_path):
    data = os.urandom(300_000)
    (tmp_path / "blob.bin").write_bytes(data)
    (tmp_path / "a.kvc").write_bytes(small_file())
    with RangeServer(tmp_path) as srv:
        yield srv, tmp_path, data


def _get(srv, path: str, headers: dict | None = None, method: str = "GET"):
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=10)
    conn.request(method, path, headers=headers or {})
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp, body


def test_parse_rate_units():
    assert parse_rate("100mbit") == pytest.approx(12.5e6)
    assert parse_rate("1Gbit/s") == pytest.approx(125e6)
    assert parse_rate("20MB/s") == pytest.approx(20e6)
    assert parse_rate("4MiB") == 4 * 1024**2
    for bad in ("100", "fast", "-1gbit", "0mbit", ""):
        with pytest.raises(InputError):
            parse_rate(bad)


def test_every_source_reads_the_same_ranges(served):
    srv, folder, data = served
    fs = fsspec.filesystem("memory")
    fs.pipe_file("/sources/blob.bin", data)
    sources = [
        BytesSource(data),
        FileSource(folder / "blob.bin"),
        HttpSource(srv.url_for("blob.bin")),
        FsspecSource("memory://sources/blob.bin"),
    ]
    rng = random.Random(0)
    ranges = [(rng.randrange(0, len(data) - 5000), rng.randrange(1, 5000)) for _ in range(20)]
    ranges += [(0, 16), (len(data) - 1, 1), (0, len(data))]
    try:
        for src in sources:
            assert src.prefix(1000) == data[:1000]
            assert src.size == len(data)
            for offset, length in ranges:
                assert src.read(offset, length) == data[offset : offset + length], type(src).__name__
            with pytest.raises(FormatError, match="truncated"):
                src.read(len(data) - 10, 20)
    finally:
        for src in sources:
            src.close()


def test_stream_source_reads_a_pipe_forward_only():
    data = os.urandom(200_000)
    r, w = os.pipe()

    def writer():
        with os.fdopen(w, "wb") as f:
            try:
                f.write(data)
            except BrokenPipeError:
                pass

    t = threading.Thread(target=writer)
    t.start()
    src = StreamSource(os.fdopen(r, "rb"), "<pipe>")
    assert src.size is None and not src.seekable
    assert src.prefix(100) == data[:100]
    assert src.read(50, 10) == data[50:60]  # still inside the prefix
    assert src.read(150_000, 1000) == data[150_000:151_000]  # skips forward
    with pytest.raises(InputError, match="already passed"):
        src.read(10, 10)
    with pytest.raises(FormatError, match="truncated stream"):
        src.read(199_990, 100)
    src.close()
    t.join(timeout=10)


def test_http_requests_are_sent_without_nagle_delays(served):
    # A request is small and so are a header's responses: with Nagle's algorithm on either end, each waits
    # for a delayed acknowledgement (40 ms on Linux), which made every header past its first request cost ~45 ms.
    import socket

    srv, _, data = served
    src = HttpSource(srv.url_for("blob.bin"))
    assert src.read(0, 10) == data[:10]
    assert src._conn.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    src.close()
    from kvc.streaming.server import _Handler

    assert _Handler.disable_nagle_algorithm  # socketserver sets TCP_NODELAY on every accepted connection


def test_fetch_reports_timings_and_can_be_cancelled(served):
    srv, _, data = served
    src = HttpSource(srv.url_for("blob.bin"))
    got = []
    fetched = src.fetch(1000, 200_000, progress=got.append)
    assert fetched.data == data[1000:201_000] and sum(got) == 200_000
    assert fetched.started <= fetched.first <= fetched.done
    srv.rate = 100_000  # 100 kB/s: cancelling after the first piece must not wait for the rest
    cancel = threading.Event()
    assert src.fetch(0, 250_000, cancel=cancel, progress=lambda n: cancel.set()) is None
    srv.rate = None
    assert src.read(0, 10) == data[:10]  # the source is still usable after a cancelled range
    src.close()


def test_server_ranges_etags_and_errors(served):
    srv, folder, data = served
    resp, body = _get(srv, "/blob.bin", {"Range": "bytes=10-19"})
    assert resp.status == 206 and body == data[10:20]
    assert resp.getheader("Content-Range") == f"bytes 10-19/{len(data)}" and resp.getheader("Accept-Ranges") == "bytes"
    etag = resp.getheader("ETag")
    assert _get(srv, "/blob.bin", {"Range": "bytes=299990-"})[1] == data[299_990:]
    assert _get(srv, "/blob.bin", {"Range": "bytes=-5"})[1] == data[-5:]
    resp, body = _get(srv, "/blob.bin")
    assert resp.status == 200 and body == data
    resp, body = _get(srv, "/blob.bin", {"Range": "bytes=0-0,5-9"})  # several ranges: the whole file
    assert resp.status == 200 and body == data
    assert _get(srv, "/blob.bin", {"Range": f"bytes={len(data)}-"})[0].status == 416
    resp, body = _get(srv, "/blob.bin", method="HEAD")
    assert resp.status == 200 and body == b"" and resp.getheader("Content-Length") == str(len(data))
    assert _get(srv, "/blob.bin", {"Range": "bytes=0-9", "If-Match": etag})[0].status == 206
    assert _get(srv, "/blob.bin", {"Range": "bytes=0-9", "If-Match": '"other"'})[0].status == 412
    assert _get(srv, "/")[1].decode().split() == ["a.kvc"]
    assert _get(srv, "/missing.kvc")[0].status == 404


def test_server_serves_nothing_outside_its_folder(tmp_path):
    inside = tmp_path / "served"
    inside.mkdir()
    (inside / "ok.kvc").write_bytes(b"fine")
    (tmp_path / "secret.txt").write_text("do not serve")
    (inside / "link.txt").symlink_to(tmp_path / "secret.txt")
    (inside / "sub").mkdir()
    with RangeServer(inside) as srv:
        assert srv.host == "127.0.0.1"
        assert _get(srv, "/ok.kvc")[1] == b"fine"
        for path in ("/../secret.txt", "/%2e%2e/secret.txt", "/sub/../../secret.txt", "/link.txt", "/sub",
                     "//etc/passwd", "/%00"):
            resp, body = _get(srv, path)
            assert resp.status == 404 and b"do not serve" not in body, path


def test_rate_limit_holds_the_link_to_its_rate(served):
    srv, _, data = served
    srv.rate = 1_000_000  # 1 MB/s: 200 kB cannot come in much under 0.2 s
    src = HttpSource(srv.url_for("blob.bin"))
    started = time.perf_counter()
    assert src.read(0, 200_000) == data[:200_000]
    assert time.perf_counter() - started >= 0.15
    src.close()


def test_http_errors_are_one_line_source_errors(served):
    srv, folder, _ = served
    with pytest.raises(SourceError, match="not found.*404"):
        open_stream(srv.url_for("nope.kvc"))
    with pytest.raises(SourceError, match="cannot reach"):
        open_stream("http://127.0.0.1:9/a.kvc")  # the discard port: nothing listens there
    with pytest.raises(FormatError, match="not a .kvc file"):
        open_stream(srv.url_for("blob.bin"))


def test_a_replaced_file_is_noticed_by_its_etag(served):
    srv, folder, _ = served
    src = HttpSource(srv.url_for("blob.bin"))
    src.read(0, 100)
    time.sleep(0.01)
    (folder / "blob.bin.new").write_bytes(os.urandom(300_000))
    os.replace(folder / "blob.bin.new", folder / "blob.bin")
    with pytest.raises(SourceChangedError, match="changed while being read"):
        src.read(100, 100)
    src.close()


def test_headers_read_from_every_source_match_kvc_open(served):
    srv, folder, _ = served
    data = (folder / "a.kvc").read_bytes()
    fsspec.filesystem("memory").pipe_file("/h/a.kvc", data)
    expected = kvc.open(data).header
    for source in (folder / "a.kvc", str(folder / "a.kvc"), srv.url_for("a.kvc"), "memory://h/a.kvc", data):
        with open_stream(source) as s:
            assert s.header == expected and s.version == kvc.open(data).version
            assert s.header_bytes <= len(data)
    r, w = os.pipe()
    os.write(w, data)
    os.close(w)
    with open_stream(os.fdopen(r, "rb")) as s:
        assert s.header == expected


def test_fsspec_missing_and_folder_are_clear(tmp_path):
    fs = fsspec.filesystem("memory")
    fs.pipe_file("/dir/x.kvc", b"x")
    with pytest.raises(SourceError, match="not found"):
        open_stream("memory://dir/none.kvc")
    with pytest.raises(InputError, match="folder"):
        open_stream("memory://dir")
    with pytest.raises(InputError, match="no such file"):
        open_stream(tmp_path / "none.kvc")


def test_open_source_dispatch(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"0123456789")
    assert isinstance(open_source(path), FileSource)
    fsspec.filesystem("memory").pipe_file("/x/y", b"1")
    assert isinstance(open_source("memory://x/y"), FsspecSource)
    assert isinstance(open_source(b"abc"), BytesSource)
    with open(path, "rb") as f:
        assert open_source(f).read(2, 3) == b"234"
    assert hashlib.sha256(open_source(path).read(0, 10)).hexdigest() == hashlib.sha256(b"0123456789").hexdigest()


def test_a_url_source_names_its_origin_and_a_local_one_none():
    # The link a load measured is kept per origin (scheme, host, port; no credentials) for the next --slo load.
    from kvc.streaming.sources import BytesSource, HttpSource

    assert HttpSource("http://user:secret@127.0.0.1:8000/a/doc.kvc").origin == "http://127.0.0.1:8000"
    assert HttpSource("https://example.org/doc.kvc").origin == "https://example.org"
    assert BytesSource(b"x").origin is None


class _OddServer:
    """A real HTTP server on 127.0.0.1 that answers Range requests correctly but in an unusual way:
    ``chunked`` (Transfer-Encoding: chunked), ``close`` (no Content-Length: the body ends when the
    connection closes), ``weak`` (a weak ETag, and If-Match compared strongly, as RFC 9110 says) or
    ``trickle`` (the right headers, then one byte every 0.4 s)."""

    def __init__(self, data: bytes, mode: str):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):  # noqa: N802
                a, b = (int(x) for x in self.headers["Range"].removeprefix("bytes=").split("-"))
                b = min(b, len(data) - 1)
                body = data[a : b + 1]
                if mode == "weak" and self.headers.get("If-Match"):  # a weak tag never matches strongly
                    self.send_response(412)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {a}-{b}/{len(data)}")
                self.send_header("ETag", 'W/"1"' if mode == "weak" else '"1"')
                if mode == "chunked":
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
                elif mode == "close":
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.write(body)
                    self.close_connection = True
                elif mode == "trickle":
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    try:
                        for i in range(min(len(body), 20)):  # bounded: 8 s at most, then the test has failed anyway
                            self.wfile.write(body[i : i + 1])
                            self.wfile.flush()
                            time.sleep(0.4)
                    except (BrokenPipeError, ConnectionResetError):
                        pass  # the reader gave up on the stalled link: what the test wants
                    self.close_connection = True
                else:
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/a.kvc"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.parametrize("mode", ["chunked", "close", "weak"])
def test_unusual_but_correct_servers_load(mode):
    # Chunked and close-delimited bodies hold exactly the range asked for (Content-Range says so); a weak
    # ETag is not sent back as If-Match (which compares strongly): each used to fail a complete read.
    data = small_file()
    with _OddServer(data, mode) as srv:
        src = HttpSource(srv.url, timeout=5)
        for _ in range(2):  # and again on the same source: a connection that cannot be reused is replaced
            assert src.read(0, 100) == data[:100] and src.read(100, len(data) - 100) == data[100:]
        src.close()
        with open_stream(srv.url, timeout=5) as s:
            assert s.header == kvc.open(data).header


def test_a_trickling_server_is_a_stalled_link_within_the_timeout():
    # A byte every 0.4 s never trips a socket timeout of 1 s; less than 1 KiB in 1 s is a stall all the same.
    data = os.urandom(50_000)
    with _OddServer(data, "trickle") as srv:
        src = HttpSource(srv.url, timeout=1)
        started = time.perf_counter()
        with pytest.raises(SourceError, match="stalled"):
            src.read(0, 10_000)
        assert time.perf_counter() - started < 5
        src.close()


def test_odd_urls_are_one_line_errors(served):
    srv, folder, _ = served
    with pytest.raises(InputError, match="port"):
        HttpSource("http://127.0.0.1:99999/a.kvc")
    with pytest.raises(InputError, match="port"):
        HttpSource("http://127.0.0.1:abc/a.kvc")
    (folder / "café à.kvc").write_bytes((folder / "a.kvc").read_bytes())
    with open_stream(srv.url + "café à.kvc") as s:  # not ASCII, and a space: percent-encoded on the wire
        assert s.header == kvc.open(folder / "a.kvc").header
    with pytest.raises(SourceError, match="whole resource"):
        open_stream(srv.url)  # the folder listing is no file


def test_fsspec_backend_errors_are_source_errors():
    # ftp:// fails inside fsspec's url_to_fs with the backend's own exception type (ConnectionRefusedError
    # here; botocore raises types that are no OSError at all): a one-line SourceError either way.
    with pytest.raises(SourceError, match="cannot open"):
        open_stream("ftp://127.0.0.1:9/a.kvc")


def test_server_edge_cases(tmp_path):
    (tmp_path / "empty.kvc").write_bytes(b"")
    (tmp_path / "f.kvc").write_bytes(bytes(range(100)))
    (tmp_path / "loop.kvc").symlink_to(tmp_path / "loop.kvc")
    with RangeServer(tmp_path) as srv:
        assert _get(srv, "/empty.kvc", {"Range": "bytes=-10"})[0].status == 416
        for malformed in ("bytes=--5", "bytes=+5-+9", "bytes=1_0-2_0", "bytes= 5 - 9", "bytes=-"):
            resp, body = _get(srv, "/f.kvc", {"Range": malformed})  # ignored, as RFC 9110 says: the whole file
            assert resp.status == 200 and body == bytes(range(100)), malformed
        assert _get(srv, "/f.kvc", {"Range": "bytes=5-9"})[1] == bytes(range(5, 10))
        assert _get(srv, "/loop.kvc")[0].status == 404  # a symlink loop: an answer, not a dropped connection
        assert _get(srv, "/" + "a" * 300 + ".kvc")[0].status == 404  # a name too long for the file system


def test_server_listens_on_ipv6_loopback(tmp_path):
    import socket

    if not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    (tmp_path / "f.kvc").write_bytes(b"hello")
    try:
        srv = RangeServer(tmp_path, host="::1")
    except InputError as exc:  # a kernel without IPv6 (some containers): nothing to test
        pytest.skip(str(exc))
    with srv:
        assert srv.url.startswith("http://[::1]:")
        assert HttpSource(srv.url_for("f.kvc")).read(1, 3) == b"ell"
