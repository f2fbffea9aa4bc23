"""Profile version 5: each layer's step-scaled coefficients predicted from the previous layer's reconstruction
(``chain``; CODEC.md step 3c), coded closed loop."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

import kvc
from kvc.codec.base import Segment
from kvc.codec.levels import LEVEL_SCALES
from kvc.codec.profile import Profile, add_chain, fit_profile
from kvc.codec.registry import build_codec, level_entry
from kvc.errors import FormatError, InputError, ProfileError

TEXTS = ["The quick brown fox jumps over the lazy dog. " * 6,
         "KV caches let a model skip re-reading a long context. Compression makes them cheap to store. " * 3]


@pytest.fixture(scope="module")
def v2(tiny_llama):
    return fit_profile(tiny_llama, TEXTS, tokens=64, sensitivity_tokens=40, continuation=8, mix=False)


@pytest.fixture(scope="module")
def chained(tiny_llama, v2):
    return add_chain(v2, tiny_llama, TEXTS, tokens=64)


def _kv(lm, text=TEXTS[1], tokens=70):
    from kvc.runtime.prefill import prefill, tokenize

    return prefill(lm, tokenize(lm, text)[:tokens])


def _with_arrays(prof: Profile, **arrays) -> Profile:
    return Profile(identity=prof.identity, layers=prof.layers, heads=prof.heads, key_dim=prof.key_dim,
                   value_dim=prof.value_dim, rotary=prof.rotary, sinks=prof.sinks,
                   arrays={**prof.arrays, **arrays}, fit=dict(prof.fit), fine_tokens=prof.fine_tokens)


def test_chain_profile_is_version_5_and_reads_back(chained, v2):
    prof = chained
    assert prof.version == 5 and prof.chained and prof.mixed and not v2.chained
    L, H, D = prof.layers, prof.heads, max(prof.key_dim, prof.value_dim)
    assert prof.arrays["chain"].shape == (L, 2, 2 * H * D, H * D) and prof.arrays["chain"].dtype == np.float32
    assert not prof.arrays["chain"][0].any() and prof.arrays["chain"][1:].any()
    for name in ("mean", "basis", "step", "base_step"):  # the PCA and steps are the version-2 profile's
        assert np.array_equal(prof.arrays[name], v2.arrays[name]), name
    again = Profile.from_bytes(prof.to_bytes())
    assert again.version == 5 and again.sha256 == prof.sha256
    assert np.array_equal(again.arrays["chain"], prof.arrays["chain"])
    assert prof.fit["chain"]["scale"] == 0.57  # balanced, for a profile without fine tokens


def test_forged_chain_is_refused(chained):
    chain = chained.arrays["chain"]
    bad_nan = chain.copy()
    bad_nan[1, 0, 0, 0] = np.nan
    bad_first = chain.copy()
    bad_first[0, 1, 3, 2] = 0.5  # layer 0 has no layer before it
    for arr, match in ((chain[:, :, :-1], "shape|tensors need"), (chain[:1], "shape|tensors need"),
                       (bad_nan, "non-finite"), (bad_first, "layer 0")):
        with pytest.raises(ProfileError, match=match):
            Profile.from_bytes(_with_arrays(chained, chain=arr).to_bytes())
    # a version-5 file without its chain tensor (mix alone, header still saying 5) is refused too
    data = bytearray(_with_arrays(chained).to_bytes())
    plain = _with_arrays(chained)
    del plain.arrays["chain"]
    body = bytearray(plain.to_bytes()[:-32])
    body[8:10] = (5).to_bytes(2, "little")
    import hashlib

    with pytest.raises(ProfileError):
        Profile.from_bytes(bytes(body) + hashlib.sha256(bytes(body)).digest())
    assert Profile.from_bytes(bytes(data)).chained


@pytest.mark.parametrize("level", ["high", "balanced", "tiny"])
def test_chain_round_trip_file_within_bound_and_chunk_by_chunk(tiny_llama, chained, level):
    """encode → container → read: every element within the codec's strict bound; chunk by chunk (the streaming
    loader's path) gives the same bits as the whole read; segment-by-segment encode/decode (bench/codec.py's
    path) writes the same bytes as the file's and decodes to the same values; encoding is deterministic."""
    kv = _kv(tiny_llama)
    data = kvc.encode_kv(kv, {"name": "tiny"}, [level], chunk_tokens=32, profile=chained, embed_profile=True)
    assert data == kvc.encode_kv(kv, {"name": "tiny"}, [level], chunk_tokens=32, profile=chained,
                                 embed_profile=True)
    f = kvc.open(data)
    whole = f.read(level)
    codec = f._codec(level)
    for i, (x, y) in enumerate(zip(kv.layers, whole.layers)):
        for kind in ("key", "value"):
            a, b = getattr(x, kind), getattr(y, kind)
            bound = codec.element_error_bound(i, kind, a, 0)
            assert bool(((b - a).abs() <= bound * (1 + 1e-5) + 1e-6).all()), (i, kind)
    assert codec.relative_rmse_bound > 0
    fresh = f._codec(level)  # a new codec: its memory starts empty, as a streaming loader's does
    for index, c in enumerate(f.header["chunks"]):
        enc, payload = next(iter(f._container.payloads([index], level)))
        part = kvc.api.decode_chunk(f.header, fresh, index, enc, payload, f.dtype)
        for (key, value), w in zip(part, whole.layers):
            assert torch.equal(key, w.key[:, c["start"] : c["end"]])
            assert torch.equal(value, w.value[:, c["start"] : c["end"]])
    # segment by segment, layer by layer (one codec encodes, another decodes): the same bytes and values
    enc_codec = build_codec(level_entry(level, chained), chained)
    dec_codec = build_codec(level_entry(level, chained), chained)
    if hasattr(enc_codec, "bind_tokens"):
        enc_codec.bind_tokens(kv.token_ids)
    enc_chain, dec_chain = enc_codec.new_chain(), dec_codec.new_chain()  # this context's encode's, its read's
    for index, c in enumerate(f.header["chunks"]):
        enc, payload = next(iter(f._container.payloads([index], level)))
        view, off = memoryview(payload), 0
        for s, length in enumerate(enc["segments"]):
            layer, k = divmod(s, 2)
            kind = ("key", "value")[k]
            t = getattr(kv.layers[layer], kind)[:, c["start"] : c["end"]].contiguous()
            seg = Segment(layer, kind, c["start"], tuple(t.shape), t.dtype)
            blob = enc_codec.encode(t, seg, chain=enc_chain)
            assert blob == bytes(view[off : off + length]), (index, s)
            off += length
            got = dec_codec.decode(blob, seg, chain=dec_chain)
            assert torch.equal(got, getattr(whole.layers[layer], kind)[:, c["start"] : c["end"]])


def test_chain_synthesis_in_parallel_is_bit_exact(tiny_llama, chained):
    """The chain runs along layers, never across tokens: a read rebuilds each chunk's token range on its own
    thread (in layer order within it), and 1, 2 or 3 threads give the same bits."""
    kv = _kv(tiny_llama)
    data = kvc.encode_kv(kv, {"name": "tiny"}, ["balanced"], chunk_tokens=16, profile=chained, embed_profile=True)
    f = kvc.open(data)
    one = f.read("balanced", threads=1)
    for threads in (2, 3):
        again = f.read("balanced", threads=threads)
        for x, y in zip(one.layers, again.layers):
            assert torch.equal(x.key, y.key) and torch.equal(x.value, y.value), threads
    # one chunk (one token range): its keys and values on two threads, layer by layer, the same bits
    for index, c in enumerate(f.header["chunks"]):
        enc, payload = next(iter(f._container.payloads([index], "balanced")))
        alone = kvc.api.decode_chunk(f.header, f._codec("balanced"), index, enc, payload, f.dtype, threads=1)
        paired = kvc.api.decode_chunk(f.header, f._codec("balanced"), index, enc, payload, f.dtype, threads=2)
        for (k1, v1), (k2, v2), w in zip(alone, paired, one.layers):
            assert torch.equal(k1, k2) and torch.equal(v1, v2)
            assert torch.equal(k1, w.key[:, c["start"] : c["end"]])
    # chunks read by four threads at once, each chunk's keys and values side by side: every read ends (sides
    # that wait for each other never queue behind other reads' sides on the shared pool) with the same bits
    results = {}
    payloads = [next(iter(f._container.payloads([i], "balanced"))) for i in range(len(f.header["chunks"]))]

    def reader(r: int) -> None:
        codec = f._codec("balanced")
        results[r] = [kvc.api.decode_chunk(f.header, codec, i, enc, payload, f.dtype, threads=2)
                      for i, (enc, payload) in enumerate(payloads)]

    from kvc.workers import _pool

    busy = threading.Event()
    blockers = [_pool(2).submit(busy.wait, 600) for _ in range(2)]  # the shared pool's two workers, taken
    try:
        readers = [threading.Thread(target=reader, args=(r,), daemon=True) for r in range(4)]
        for t in readers:
            t.start()
        deadline = time.monotonic() + 60
        for t in readers:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in readers) and len(results) == 4
    finally:
        busy.set()
        for b in blockers:
            b.result()
    for got in results.values():
        for part, c in zip(got, f.header["chunks"]):
            for (k, v), w in zip(part, one.layers):
                a, b = c["start"], c["end"]
                assert torch.equal(k, w.key[:, a:b]) and torch.equal(v, w.value[:, a:b])
    # the sharing: every segment of one token range, at every layer, in one share, in layer order; a share's
    # segments of one (layer, kind) are consecutive rows, one call
    from kvc.codec.kvq import _synthesis_shares

    def item(layer, k):
        return ((None, layer, k, 4, 0, 0, [(0, 12), (12, 16), (28, 16), (44, 16)]), None)

    work = [item(layer, k) for layer in range(3) for k in (0, 1)]
    shares = _synthesis_shares(work, 2)
    assert [[(c[0][0][1], c[0][0][2], c[1]) for c in calls] for calls in shares] == [
        [(layer, k, (0, 2)) for layer in range(3) for k in (0, 1)],
        [(layer, k, (2, 4)) for layer in range(3) for k in (0, 1)]]
    assert len(_synthesis_shares(work, 9)) == 4 and len(_synthesis_shares(work, 1)) == 1
    from kvc.codec.kvq import _kinds_in_step

    keys, values = _kinds_in_step(_synthesis_shares(work, 1)[0])
    assert [[c[0][0][1:3] for c in layer] for layer in keys] == [[(0, 0)], [(1, 0)], [(2, 0)]]
    assert [[c[0][0][1:3] for c in layer] for layer in values] == [[(0, 1)], [(1, 1)], [(2, 1)]]
    assert _kinds_in_step(_synthesis_shares(work[:-1], 1)[0]) is None  # layer 2 without its values: one thread


def test_chain_needs_the_layer_before(chained):
    """Layer l > 0 encodes and decodes only after layer l−1 of the same tokens, in the same call or with the same
    chain state: never from what another call left on the (shared) codec."""
    codec = build_codec(level_entry("balanced", chained), chained)
    assert codec.chained and codec.new_chain() is not codec.new_chain()
    t = torch.randn(chained.heads, 20, chained.key_dim)
    seg0, seg1 = (Segment(layer, kind, 8, tuple(t.shape), t.dtype) for layer, kind in ((0, "key"), (1, "key")))
    with pytest.raises(ValueError, match="layer 1 after layer 0"):
        codec.encode(t, seg1)
    blob0 = codec.encode(t, seg0)
    with pytest.raises(ValueError, match="layer 1 after layer 0"):  # the encode before is not this one
        codec.encode(t, seg1)
    enc = codec.new_chain()
    blob0 = codec.encode(t, seg0, chain=enc)
    value0 = Segment(0, "value", 8, (chained.heads, 20, chained.value_dim), t.dtype)
    v = torch.randn(value0.shape)
    blobv = codec.encode(v, value0, chain=enc)
    blob1 = codec.encode(t, seg1, chain=enc)
    with pytest.raises(InputError, match="layer 1 after layer 0"):  # a read of layer 1 alone: a caller's mistake
        codec.decode(blob1, seg1)
    codec.decode(blob0, seg0)
    codec.decode(blobv, value0)
    with pytest.raises(InputError, match="layer 1 after layer 0"):  # what an earlier read decoded is not kept
        codec.decode(blob1, seg1)
    dec = codec.new_chain()
    for blob, seg in ((blob0, seg0), (blobv, value0)):
        codec.decode(blob, seg, chain=dec)
    one = codec.decode(blob1, seg1, chain=dec)
    together = [torch.empty(s.shape) for s in (seg0, value0, seg1)]
    codec.decode_many([([(b, s)], o) for b, s, o in zip((blob0, blobv, blob1), (seg0, value0, seg1), together)])
    assert torch.equal(one, together[2])
    # layers 0 and 2 of one token range, keys and values side by side on two threads: layer 2 has no layer 1,
    # the read fails with the caller's error on both threads' behalf, and nothing waits forever
    enc2 = codec.new_chain()
    segs = [Segment(layer, kind, 8, (chained.heads, 20, chained.key_dim), t.dtype)
            for layer in range(3) for kind in ("key", "value")]
    blobs = [codec.encode(torch.randn(seg.shape), seg, chain=enc2) for seg in segs]
    skip = [i for i, seg in enumerate(segs) if seg.layer != 1]
    with pytest.raises(InputError, match="layer 2 after layer 1"):
        codec.decode_many([([(blobs[i], segs[i])], torch.empty(segs[i].shape)) for i in skip], threads=2)
    shifted = Segment(0, "key", 9, tuple(t.shape), t.dtype)  # layer 0 of other tokens: the file does not fit
    other = Segment(0, "value", 9, value0.shape, t.dtype)
    with pytest.raises(FormatError, match="layer 1 after layer 0"):
        codec.decode_many([([(blob0, shifted)], torch.empty(t.shape)), ([(blobv, other)], torch.empty(v.shape)),
                           ([(blob1, seg1)], torch.empty(t.shape))])


def test_chain_with_fine_tokens(tiny_llama, chained):
    """Fine rows under the chain: the residual is quantised 2**s times finer there, the file reads back within
    the bound, and chunk by chunk equals the whole read."""
    kv = _kv(tiny_llama)
    ids = list(kv.token_ids)
    fine_ids = sorted(set(ids), key=lambda i: (-ids.count(i), i))[:2]
    prof = chained.with_fine_tokens({"ids": sorted(fine_ids), "shift": 3})
    entry = level_entry("balanced", prof)
    assert entry["params"]["scale"] == LEVEL_SCALES["balanced"] and entry["params"]["fine_tokens"]
    data = kvc.encode_kv(kv, {"name": "tiny"}, ["balanced"], chunk_tokens=32, profile=prof, embed_profile=True)
    base = level_entry("balanced", chained)  # the same scale without fine tokens
    base = {**base, "params": {**base["params"], "scale": LEVEL_SCALES["balanced"]}}
    plain = kvc.encode_kv(kv, {"name": "tiny"}, ["balanced"], chunk_tokens=32, profile=chained, embed_profile=True,
                          level_entries={"balanced": base})
    f = kvc.open(data)
    whole, codec = f.read("balanced"), f._codec("balanced")
    at = torch.from_numpy(np.isin(ids, fine_ids))
    at[: prof.sinks] = False
    err_fine = err_plain = 0.0
    plain_read = kvc.open(plain).read("balanced")
    for i, (x, y, z) in enumerate(zip(kv.layers, whole.layers, plain_read.layers)):
        for kind in ("key", "value"):
            a = getattr(x, kind)
            assert bool(((getattr(y, kind) - a).abs() <= codec.element_error_bound(i, kind, a, 0) * (1 + 1e-5)
                         + 1e-6).all())
            if kind == "value":
                err_fine += float((getattr(y, kind) - a)[:, at].pow(2).sum())
                err_plain += float((getattr(z, kind) - a)[:, at].pow(2).sum())
    assert err_fine < 0.25 * err_plain
    for index, c in enumerate(f.header["chunks"]):
        enc, payload = next(iter(f._container.payloads([index], "balanced")))
        part = kvc.api.decode_chunk(f.header, f._codec("balanced"), index, enc, payload, f.dtype)
        for (key, value), w in zip(part, whole.layers):
            assert torch.equal(key, w.key[:, c["start"] : c["end"]])
            assert torch.equal(value, w.value[:, c["start"] : c["end"]])


def _chunks(f, level):
    for index, c in enumerate(f.header["chunks"]):
        enc, payload = next(iter(f._container.payloads([index], level)))
        yield index, c, enc, payload


def test_shared_codec_decodes_two_contexts_concurrently(tiny_llama, chained, monkeypatch):
    """One codec object (the streaming loader's process-wide cache hands the same one to every load of a level)
    decoding two different contexts of the same length and chunking from two threads at once: each gets exactly
    what it gets alone. The threads are held in lockstep at every reconstruction, so that a chain memory kept on
    the codec (keyed by layer and token range, not by read) would hand one read the other's layer before."""
    import threading

    from kvc.codec.kvq import KvqCodec
    from kvc.streaming.loader import open_stream

    level = "balanced"
    kvs = [_kv(tiny_llama, TEXTS[0], 56), _kv(tiny_llama, TEXTS[1], 56)]
    assert kvs[0].token_ids != kvs[1].token_ids
    files = [kvc.encode_kv(kv, {"name": "tiny"}, [level], chunk_tokens=16, profile=chained, embed_profile=True)
             for kv in kvs]
    streams = [open_stream(data) for data in files]
    shared = streams[0].codec(level)
    assert streams[1].codec(level) is shared  # the loader's cache: one codec for both loads
    opened = [kvc.open(data) for data in files]
    alone = []
    for f in opened:
        alone.append([kvc.api.decode_chunk(f.header, f._codec(level), i, enc, payload, f.dtype)
                      for i, _, enc, payload in _chunks(f, level)])
    for f, want in zip(opened, alone):  # and chunk by chunk is the whole read
        whole = f.read(level)
        for (_, c, _, _), part in zip(_chunks(f, level), want):
            for (key, value), w in zip(part, whole.layers):
                assert torch.equal(key, w.key[:, c["start"] : c["end"]])
                assert torch.equal(value, w.value[:, c["start"] : c["end"]])

    def together(lockstep: bool) -> list:
        barrier = threading.Barrier(2, timeout=5)
        original = KvqCodec._chain_reconstruct
        if lockstep:
            def held(self, *args, **kwargs):
                out = original(self, *args, **kwargs)
                try:
                    barrier.wait()
                except threading.BrokenBarrierError:
                    pass
                return out

            monkeypatch.setattr(KvqCodec, "_chain_reconstruct", held)
        got: list = [None, None]
        errors: list = []

        def run(j: int) -> None:
            try:
                f = opened[j]
                got[j] = [kvc.api.decode_chunk(f.header, shared, i, enc, payload, f.dtype)
                          for i, _, enc, payload in _chunks(f, level)]
            except BaseException as exc:  # noqa: BLE001 (reported below)
                errors.append(exc)
                barrier.abort()

        threads = [threading.Thread(target=run, args=(j,)) for j in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        monkeypatch.setattr(KvqCodec, "_chain_reconstruct", original)
        assert not errors, errors
        return got

    for lockstep in (True, False, False, False):
        got = together(lockstep)
        for j in (0, 1):
            for part, ref in zip(got[j], alone[j]):
                for (key, value), (k0, v0) in zip(part, ref):
                    assert torch.equal(key, k0) and torch.equal(value, v0), (lockstep, j)


def test_verify_deep_reencodes_a_chained_level(tiny_llama, chained):
    """kvc verify --deep re-encodes the prefill with its own chain states (an encode's and a decode's, layers in
    order per chunk) and reproduces every segment of a chained level."""
    from kvc.runtime.prefill import tokenize
    from kvc.verify import verify

    ids = tokenize(tiny_llama, TEXTS[1])[:70]
    data = kvc.encode_tokens(tiny_llama, ids, levels=["balanced"], chunk_tokens=32, profile=chained,
                             embed_profile=True)
    report = verify(kvc.open(data), deep=True, lm=tiny_llama)
    assert report["ok"], report
    assert report["levels"]["balanced"]["segments_not_reproduced"] == 0
