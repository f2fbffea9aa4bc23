"""The streaming loader with real tiny models, a real Range server on 127.0.0.1, fsspec ``memory://`` and
real pipes: whatever the controller chooses, the cache it builds is the one the file (or the model)
gives, and bad sources fail with one clear error."""

from __future__ import annotations

import os
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import fsspec
import pytest
import torch

import kvc
from kvc.api import decode_chunk
from kvc.codec.profile import fit_profile
from kvc.errors import FormatError, InputError, ModelMismatchError
from kvc.formats import layout
from kvc.runtime.cache import from_transformers_cache
from kvc.runtime.loading import load_model
from kvc.streaming import RangeServer, SourceChangedError, SourceError, load_cache, open_stream
from kvc.streaming.cache import IncrementalCache

TEXT = "KV caches let a model skip re-reading a long context. Compression makes them cheap to store. " * 5
CHUNK = 16


def next_logits(lm, cache, ids: list[int], next_id: int) -> torch.Tensor:
    with torch.no_grad():
        out = lm.model(input_ids=torch.tensor([[next_id]]), past_key_values=cache, use_cache=True,
                       cache_position=torch.tensor([len(ids)]))
    return out.logits[0, -1]


def assert_close_kv(kv, exact, atol=1e-5):
    for a, b in zip(kv.layers, exact.layers):
        assert a.start == b.start and a.key.shape == b.key.shape and a.value.shape == b.value.shape
        torch.testing.assert_close(a.key, b.key, atol=atol, rtol=0)
        torch.testing.assert_close(a.value, b.value, atol=atol, rtol=0)


@pytest.fixture(scope="module")
def llama(tiny_model_dirs):
    return load_model(str(tiny_model_dirs["llama"]), device="cpu")


@pytest.fixture(scope="module")
def profile(llama):
    return fit_profile(llama, [TEXT, TEXT[::-1]], tokens=64, sensitivity_tokens=40, continuation=8)


@pytest.fixture(scope="module")
def ladder(llama, profile, tmp_path_factory):
    """A llama context stored at lossless, high and compact, in a served folder."""
    ids = kvc.tokenize(llama, TEXT)
    data = kvc.encode_tokens(llama, ids, levels=["lossless", "high", "compact"], profile=profile,
                             chunk_tokens=CHUNK, embed_profile=True)
    folder = tmp_path_factory.mktemp("ladder")
    (folder / "doc.kvc").write_bytes(data)
    return ids, data, folder


# ---- the cache, built in any order


@pytest.mark.parametrize("text_chunks", [0, 1, 3, "all"])
def test_incremental_cache_matches_a_prefill_for_every_split(tiny_lm, text_chunks):
    """Text from the front, decoded chunks from the back (in reverse order, as the loader fetches them),
    on every architecture, sliding windows included: the cache is the model's own."""
    ids = kvc.tokenize(tiny_lm, TEXT)[:90]
    data = kvc.encode_tokens(tiny_lm, ids, chunk_tokens=CHUNK)
    f = kvc.open(data)
    n = len(f.header["chunks"])
    j = n if text_chunks == "all" else text_chunks
    builder = IncrementalCache(tiny_lm, f.header, f.dtype)
    codec = f._codec("lossless")
    back = list(range(n - 1, j - 1, -1))
    for step in range(max(j, len(back))):  # interleave: a text chunk, then a decoded one from the back
        if step < j:
            c = f.header["chunks"][step]
            builder.prefill(c["start"], c["end"])
        if step < len(back):
            k = back[step]
            enc, payload = f._container.payload(k, "lossless")
            c = f.header["chunks"][k]
            builder.put(c["start"], c["end"], decode_chunk(f.header, codec, k, enc, payload, f.dtype))
    cache = builder.finish()
    exact = kvc.prefill(tiny_lm, ids)
    got = from_transformers_cache(cache, ids)
    if j == 0:
        assert got.equal(exact)
    assert_close_kv(got, exact)
    reference = f.to_cache(tiny_lm)
    torch.testing.assert_close(next_logits(tiny_lm, cache, ids, ids[3]), next_logits(tiny_lm, reference, ids, ids[3]),
                               atol=1e-4, rtol=0)


def test_decode_chunk_gives_what_read_gives(llama, ladder, profile):
    ids, data, _ = ladder
    f = kvc.open(data, profile=profile)
    whole = f.read("high")
    chunk = f.header["chunks"][2]
    enc, payload = f._container.payload(2, "high")
    layers = decode_chunk(f.header, f._codec("high"), 2, enc, payload, f.dtype)
    assert len(layers) == len(whole.layers)
    for (key, value), layer in zip(layers, whole.layers):
        assert torch.equal(key, layer.key[:, chunk["start"] : chunk["end"]])
        assert torch.equal(value, layer.value[:, chunk["start"] : chunk["end"]])


# ---- loading over real sources


def test_lossless_over_http_is_bit_exact_and_generates_the_same(tiny_lm, tmp_path):
    ids = kvc.tokenize(tiny_lm, TEXT)[:90]
    data = kvc.encode_tokens(tiny_lm, ids, chunk_tokens=CHUNK)
    (tmp_path / "c.kvc").write_bytes(data)
    with RangeServer(tmp_path, rate=2_000_000) as srv:
        cache, report = load_cache(srv.url_for("c.kvc"), tiny_lm, level="lossless")
    assert from_transformers_cache(cache, ids).equal(kvc.prefill(tiny_lm, ids))
    assert report.choices() == {"lossless": len(report.chunks)} and report.token_ids == ids
    assert report.bytes == kvc.open(data).level_bytes("lossless") and report.wasted_bytes == 0
    question = ids[5:9]
    ours = tiny_lm.model.generate(torch.tensor([ids + question]), past_key_values=cache, max_new_tokens=6,
                                  do_sample=False)
    theirs = tiny_lm.model.generate(torch.tensor([ids + question]), past_key_values=kvc.open(data).to_cache(tiny_lm),
                                    max_new_tokens=6, do_sample=False)
    assert torch.equal(ours, theirs)


def test_text_mode_fetches_only_the_header(llama, ladder):
    ids, data, folder = ladder
    with RangeServer(folder) as srv:
        cache, report = load_cache(srv.url_for("doc.kvc"), llama, level="text")
    assert report.choices() == {"text": len(report.chunks)} and report.bytes == 0
    assert report.header_bytes < len(data) // 4
    assert_close_kv(from_transformers_cache(cache, ids), kvc.prefill(llama, ids))


def test_a_header_past_the_first_request_costs_one_more_request(llama, tmp_path):
    # The first request brings 16 KiB; a longer header (here ~4,000 token ids) and its digest come in one more
    # request, not one each (every request is a round trip: to object storage, tens of ms).
    ids = (kvc.tokenize(llama, TEXT) * 400)[:4000]
    (tmp_path / "long.kvc").write_bytes(kvc.encode_tokens(llama, ids, levels=["lossless"], chunk_tokens=1024))
    lines: list[str] = []
    with RangeServer(tmp_path, log=lines.append) as srv:
        with open_stream(srv.url_for("long.kvc")) as stream:
            assert stream.header_bytes > 16 * 1024 and stream.num_tokens == 4000
            cache, _ = stream.load(llama, level="lossless")
    gets = [line for line in lines if '"GET ' in line]
    assert len(gets) == 2 + 4, gets  # the header's two, then one per chunk
    assert_close_kv(from_transformers_cache(cache, ids), kvc.prefill(llama, ids))


@pytest.mark.parametrize("rate", [30_000, 1_000_000, None])
def test_adaptive_loads_are_right_whatever_they_choose(llama, ladder, profile, rate):
    """At a slow, a medium and an unlimited link: text chunks form a prefix and equal a prefill, fetched
    chunks are exactly their level's decoded tensors, and the report adds up."""
    ids, data, folder = ladder
    f = kvc.open(data, profile=profile)
    decoded = {lv: f.read(lv) for lv in f.levels}
    exact = kvc.prefill(llama, ids)
    with RangeServer(folder, rate=rate) as srv:
        cache, report = load_cache(srv.url_for("doc.kvc"), llama)
    got = from_transformers_cache(cache, ids)
    choices = [c.choice for c in report.chunks]
    assert all(c in ("text", "lossless", "high", "compact") for c in choices)
    texts = choices.count("text")
    assert choices[:texts] == ["text"] * texts  # recomputed from the front only
    for c in report.chunks:
        a, b = c.start, c.end
        want = exact if c.choice == "text" else decoded[c.choice]
        for mine, theirs in zip(got.layers, want.layers):
            if c.choice == "text":
                torch.testing.assert_close(mine.key[:, a:b], theirs.key[:, a:b], atol=1e-5, rtol=0)
            else:
                assert torch.equal(mine.key[:, a:b], theirs.key[:, a:b])
                assert torch.equal(mine.value[:, a:b], theirs.value[:, a:b])
        assert c.bytes == (0 if c.choice == "text" else f.header["chunks"][c.index]["encodings"][
            f.levels.index(c.choice)]["length"])
    parts = report.header_s + report.setup_s + report.wait_s + report.decode_s + report.prefill_s + report.other_s
    assert parts == pytest.approx(report.ready_s, abs=1e-6)
    assert report.predicted_ttft_s is not None and report.estimates["link_gbit_per_s"] > 0
    d = report.as_dict()
    assert d["choices"] == report.choices() and len(d["chunks"]) == len(report.chunks)


def test_slo_and_quality_floor_are_respected(llama, ladder):
    ids, data, folder = ladder
    with RangeServer(folder) as srv:
        url = srv.url_for("doc.kvc")
        _, generous = load_cache(url, llama, slo=30.0)
        _, floor = load_cache(url, llama, min_level="high")
    # A budget far above any option: the best quality, i.e. only exact chunks (lossless or text).
    assert set(generous.choices()) <= {"lossless", "text"} and generous.mode == "slo"
    assert "compact" not in floor.choices()


def test_a_link_slower_than_the_budget_falls_back_to_text_and_says_so(llama, ladder):
    ids, data, folder = ladder
    # 1 s before every response: any chunk takes far longer to come than recomputing the whole context.
    with RangeServer(folder, rate=100_000, latency=1.0) as srv:
        cache, report = load_cache(srv.url_for("doc.kvc"), llama, slo=0.001)
    assert report.choices() == {"text": len(report.chunks)} and report.fell_back_to_text
    assert any("budget" in note for note in report.notes) and any("text" in note for note in report.notes)
    report.record_first_token(0.01)
    assert report.slo_met is False
    assert_close_kv(from_transformers_cache(cache, ids), kvc.prefill(llama, ids))


def test_overlap_off_gives_the_same_cache(llama, ladder, profile):
    ids, data, folder = ladder
    with open_stream(data, profile=profile) as s:
        a, ra = s.load(llama, level="high")
    with open_stream(data, profile=profile) as s:
        b, rb = s.load(llama, level="high", overlap=False)
    assert from_transformers_cache(a, ids).equal(from_transformers_cache(b, ids))
    assert ra.choices() == rb.choices() == {"high": len(ra.chunks)}


def test_fsspec_memory_source_and_a_file_changed_while_being_read(llama, ladder):
    ids, data, _ = ladder
    fs = fsspec.filesystem("memory")
    fs.pipe_file("/loader/doc.kvc", data)
    cache, report = load_cache("memory://loader/doc.kvc", llama, level="lossless")
    assert from_transformers_cache(cache, ids).equal(kvc.prefill(llama, ids))
    # The header is read, then the file is rewritten (same size, one payload byte different).
    stream = open_stream("memory://loader/doc.kvc")
    enc = stream.header["chunks"][1]["encodings"][0]
    changed = bytearray(data)
    changed[stream.data_start + enc["offset"] + 7] ^= 0xFF
    fs.pipe_file("/loader/doc.kvc", bytes(changed))
    with pytest.raises(SourceChangedError, match="chunk 1 .*checksum mismatch.*changed while being read"):
        stream.load(llama, level=enc["level"])
    stream.close()


def test_a_file_replaced_on_the_server_is_refused(llama, ladder, tmp_path):
    ids, data, _ = ladder
    (tmp_path / "doc.kvc").write_bytes(data)
    with RangeServer(tmp_path) as srv:
        stream = open_stream(srv.url_for("doc.kvc"))
        (tmp_path / "doc.kvc.new").write_bytes(kvc.encode_tokens(llama, ids, chunk_tokens=CHUNK * 2))
        os.replace(tmp_path / "doc.kvc.new", tmp_path / "doc.kvc")
        with pytest.raises(SourceChangedError, match="changed while being read"):
            stream.load(llama, level="lossless")
        stream.close()


class _DroppingHandler(BaseHTTPRequestHandler):
    """Answers the header's range properly, then sends half of any other range and hangs up."""

    protocol_version = "HTTP/1.1"
    data = b""

    def log_message(self, *args):
        pass

    def do_GET(self):  # noqa: N802
        first, last = (int(x) for x in self.headers["Range"].split("=")[1].split("-"))
        last = min(last, len(self.data) - 1)
        body = self.data[first : last + 1]
        self.send_response(206)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Range", f"bytes {first}-{last}/{len(self.data)}")
        self.end_headers()
        if first == 0:
            self.wfile.write(body)
            return
        self.wfile.write(body[: len(body) // 2])
        self.wfile.flush()
        self.close_connection = True


def test_a_connection_dropped_mid_chunk_is_a_clear_error(llama, ladder):
    ids, data, _ = ladder
    handler = type("H", (_DroppingHandler,), {"data": data})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with pytest.raises(SourceError, match=r"connection dropped after \d+ of \d+ bytes of chunk 0"):
            load_cache(f"http://127.0.0.1:{server.server_address[1]}/doc.kvc", llama, level="lossless")
    finally:
        server.shutdown()
        server.server_close()


def _pipe(data: bytes):
    r, w = os.pipe()
    written = [0]

    def writer():
        with os.fdopen(w, "wb") as f:
            try:
                for i in range(0, len(data), 4096):
                    f.write(data[i : i + 4096])
                    f.flush()
                    written[0] = i + 4096
            except BrokenPipeError:
                pass

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    return os.fdopen(r, "rb"), t, written


def test_a_pipe_is_read_in_order_and_only_as_far_as_its_level_needs(llama, ladder, profile):
    ids, data, _ = ladder
    stream_file, writer, _ = _pipe(data)
    with open_stream(stream_file, profile=profile) as s:
        runs = {lv: max(e["offset"] + e["length"] for c in s.header["chunks"] for e in c["encodings"]
                        if e["level"] == lv) for lv in s.levels}
        cache, report = s.load(llama)  # adaptive asked, but a pipe gives one level: the first in the file
        consumed = s.source._pos
    assert report.choices() == {"lossless": len(report.chunks)}
    assert any("stream" in note for note in report.notes)
    assert consumed == s.data_start + runs["lossless"] < len(data)  # the other levels never read
    assert from_transformers_cache(cache, ids).equal(kvc.prefill(llama, ids))
    stream_file, writer, _ = _pipe(data)
    with open_stream(stream_file, profile=profile) as s:
        _, report = s.load(llama, level="compact")
    assert report.choices() == {"compact": len(report.chunks)}
    writer.join(timeout=10)


def _as_format_1_0(data: bytes) -> bytes:
    """The same file as kvc 0.1 wrote it: format 1.0, payloads chunk-major, no payload_order."""
    import hashlib
    import json

    f = kvc.open(data)
    start = f._container.data_start
    header = json.loads(json.dumps(f.header))
    header.pop("payload_order", None)
    out = bytearray()
    for chunk in header["chunks"]:
        for enc in chunk["encodings"]:
            payload = data[start + enc["offset"] : start + enc["offset"] + enc["length"]]
            enc["offset"] = len(out)
            out += payload
    for att in header.get("attachments", []):
        blob = data[start + att["offset"] : start + att["offset"] + att["length"]]
        att["offset"] = len(out)
        out += blob
    text = json.dumps(header, separators=(",", ":")).encode()
    head = layout.PREAMBLE.pack(layout.MAGIC, 1, 0, len(text)) + text
    return head + hashlib.sha256(head).digest() + bytes(out)


def test_format_1_1_is_level_major_and_1_0_files_still_load(llama, ladder, profile):
    ids, data, _ = ladder
    f = kvc.open(data, profile=profile)
    assert f.version >= (1, 1) and f.header["payload_order"] == "level"
    offsets = [(e["offset"], e["level"], i) for i, c in enumerate(f.header["chunks"]) for e in c["encodings"]]
    assert [lv for _, lv, _ in sorted(offsets)] == sorted((lv for _, lv, _ in offsets), key=f.levels.index)
    old = _as_format_1_0(data)
    assert struct.unpack("<HH", old[8:12]) == (1, 0)
    g = kvc.open(old, profile=profile)
    assert g.version == (1, 0) and all(g.read(lv).equal(f.read(lv)) for lv in f.levels)
    stream_file, writer, _ = _pipe(old)
    with open_stream(stream_file, profile=profile) as s:
        cache, _ = s.load(llama, level="high")
    assert from_transformers_cache(cache, ids).equal(f.read("high"))
    cache, _ = load_cache(old, llama, profile=profile)
    assert from_transformers_cache(cache, ids).num_tokens == len(ids)


def test_wrong_model_and_bad_arguments_are_refused(llama, ladder, tiny_model_dirs):
    ids, data, _ = ladder
    other = load_model(str(tiny_model_dirs["llama-mqa"]), device="cpu")
    with open_stream(data) as s:
        with pytest.raises(ModelMismatchError):
            s.load(other)
        with pytest.raises(InputError, match="holds no level 'tiny'"):
            s.load(llama, level="tiny")
        with pytest.raises(InputError, match="--slo"):
            s.load(llama, slo=-1)
    with pytest.raises(FormatError, match="truncated"):
        open_stream(data[:100])


def test_a_level_whose_profile_is_missing_is_left_out_or_refused(llama):
    # A profile no load in this process has seen (the loader keeps the ones it found).
    profile = fit_profile(llama, [TEXT[::2], TEXT[1::2]], tokens=48, sensitivity_tokens=32, continuation=8)
    ids = kvc.tokenize(llama, TEXT)
    data = kvc.encode_tokens(llama, ids, levels=["lossless", "compact"], profile=profile, chunk_tokens=CHUNK)
    cache, report = load_cache(data, llama)  # no embedded profile, none on the search path, no hint
    assert "compact" not in report.choices() and any("profile" in note for note in report.notes)
    assert_close_kv(from_transformers_cache(cache, ids), kvc.prefill(llama, ids))
    from kvc.errors import ProfileError

    with pytest.raises(ProfileError, match="not found"):
        load_cache(data, llama, level="compact")
    cache, report = load_cache(data, llama, level="compact", profile=profile)
    assert report.choices() == {"compact": len(report.chunks)}


def test_an_origins_fetches_of_different_sizes_become_the_next_loads_link(llama, ladder, profile, tmp_path):
    """Loads from one server leave fetches of different sizes behind (here two files whose chunks differ 5×);
    the next load from there, with a budget or without, starts from the rate and per-fetch overhead fitted over
    them (its report says so), and a load from another origin does not."""
    from kvc.streaming import controller

    ids, data, _ = ladder
    (tmp_path / "doc.kvc").write_bytes(data)
    big = kvc.encode_tokens(llama, ids, levels=["lossless", "high"], profile=profile, chunk_tokens=5 * CHUNK,
                            embed_profile=True)
    (tmp_path / "big.kvc").write_bytes(big)
    with RangeServer(tmp_path, rate=5_000_000) as srv:  # slow enough that bytes, not stalls, decide the times
        origin = srv.url_for("doc.kvc").split("/doc.kvc")[0]
        try:
            for name in ("doc.kvc", "big.kvc", "doc.kvc", "big.kvc"):
                load_cache(srv.url_for(name), llama, level="lossless")
            fetched = controller._REMEMBERED[("fetches", origin)]
            chunks = len(kvc.open(data).header["chunks"]) + len(kvc.open(big).header["chunks"])
            assert len(fetched) == 2 * chunks  # each fetch remembered once
            fit = controller.fetch_fit(fetched)
            assert fit is not None and fit[1] > 0
            for kwargs in ({"slo": 30.0}, {}):
                _, report = load_cache(srv.url_for("doc.kvc"), llama, **kwargs)
                assert report.estimates["link_remembered"], kwargs
                assert report.estimates["fetch_overhead_ms"] == pytest.approx(fit[0] * 1e3)
                fit = controller.fetch_fit(controller._REMEMBERED[("fetches", origin)])  # this load's fetches too
        finally:
            controller._REMEMBERED.pop(("fetches", origin), None)
            controller._REMEMBERED.pop(("link", origin), None)
    with RangeServer(tmp_path) as other:
        _, report = load_cache(other.url_for("doc.kvc"), llama)
    assert not report.estimates["link_remembered"] and report.estimates["fetch_overhead_ms"] == 0.0
