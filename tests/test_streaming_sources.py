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
