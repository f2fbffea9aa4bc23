"""The .kvc container on synthetic caches: exact round trips, random access, and refusal of every
kind of damaged or foreign input. No model is needed: the bytes are what is under test."""

from __future__ import annotations

import hashlib
import json
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvc
from kvc.errors import FormatError, InputError, VersionError
from kvc.formats import layout
from kvc.runtime.kv import ContextKV, LayerKV

IDENTITY = {
    "name": "synthetic",
    "source": "none",
    "config_sha256": "0" * 64,
    "weights_sha256": "1" * 64,
    "tokenizer_sha256": "2" * 64,
}


def synthetic_kv(
    tokens: int,
    layers: int = 3,
    heads: int = 2,
    dim: int = 8,
    dtype=torch.float32,
    window: int | None = None,
    seed: int = 0,
) -> ContextKV:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(layers):
        kept = min(tokens, window) if (window and i % 2 == 0) else tokens
        key = torch.randn(heads, kept, dim, generator=gen).to(dtype)
        value = torch.randn(heads, kept, dim + 4, generator=gen).to(dtype)
        out.append(LayerKV(key=key, value=value, start=tokens - kept))
    return ContextKV(token_ids=list(range(100, 100 + tokens)), layers=out)


def encode(kv: ContextKV, chunk_tokens: int = 4) -> bytes:
    return kvc.encode_kv(kv, IDENTITY, chunk_tokens=chunk_tokens)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    tokens=st.integers(1, 40),
    chunk=st.integers(1, 17),
    layers=st.integers(1, 4),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    window=st.one_of(st.none(), st.integers(1, 12)),
    data=st.data(),
)
def test_round_trip_and_windows_are_exact(tokens, chunk, layers, dtype, window, data):
    kv = synthetic_kv(tokens, layers=layers, dtype=dtype, window=window)
    f = kvc.open(encode(kv, chunk))
    assert f.read().equal(kv)
    a = data.draw(st.integers(0, tokens - 1))
    b = data.draw(st.integers(a + 1, tokens))
    part = f.read(tokens=(a, b))
    assert part.first_token == a and part.token_ids == kv.token_ids[a:b]
    for got, full in zip(part.layers, kv.layers):
        lo = max(a, full.start)
        assert got.start == lo
        assert torch.equal(got.key, full.key[:, max(0, lo - full.start) : max(0, b - full.start)])
        assert torch.equal(got.value, full.value[:, max(0, lo - full.start) : max(0, b - full.start)])


def test_nan_and_inf_payloads_survive_bit_exactly():
    kv = synthetic_kv(5)
    kv.layers[0].key[0, 0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    kv.layers[1].value.view(torch.int32)[0, 0, 0] = 0x7FC00123  # a NaN with a payload
    assert kvc.open(encode(kv)).read().equal(kv)


def test_random_access_reads_only_the_chunks_it_needs(tmp_path, monkeypatch):
    path = tmp_path / "c.kvc"
    kvc.save(path, encode(synthetic_kv(40), chunk_tokens=8))
    f = kvc.open(path)
    read = []  # byte ranges actually read from the file, after the header
    original = f._container._source.read
    monkeypatch.setattr(f._container._source, "read", lambda o, n, what: read.append((o, n)) or original(o, n, what))
    f.read(tokens=(9, 17))
    chunks = f.header["chunks"]
    start = f._container.data_start
    assert read == [(start + chunks[i]["encodings"][0]["offset"], chunks[i]["encodings"][0]["length"]) for i in (1, 2)]
    chunks = f.header["chunks"]
    assert f.level_bytes("lossless", (9, 17)) == sum(chunks[i]["encodings"][0]["length"] for i in (1, 2))


@settings(max_examples=60, deadline=None)
@given(position=st.floats(0, 1, exclude_max=True), bit=st.integers(0, 7))
def test_any_flipped_bit_is_caught(position, bit):
    data = bytearray(encode(synthetic_kv(12), chunk_tokens=5))
    index = int(position * len(data))
    data[index] ^= 1 << bit
    with pytest.raises(FormatError):  # VersionError is a FormatError too
        kvc.open(bytes(data)).read()


@settings(max_examples=40, deadline=None)
@given(cut=st.floats(0, 1, exclude_max=True))
def test_truncation_anywhere_is_caught(cut):
    data = encode(synthetic_kv(12), chunk_tokens=5)
    with pytest.raises(FormatError):
        kvc.open(data[: int(cut * len(data))]).read()


def test_trailing_bytes_are_refused():
    with pytest.raises(FormatError, match="data_length"):
        kvc.open(encode(synthetic_kv(3)) + b"\0")


def _rewrite_header(data: bytes, change) -> bytes:
    """Re-pack a file with a modified header and a *valid* digest: structure checks must still hold."""
    _, major, minor, length = layout.PREAMBLE.unpack(data[:16])
    header = json.loads(data[16 : 16 + length])
    result = change(header)
    if isinstance(result, tuple):  # a change may return a new (major, minor)
        major, minor = result
    text = json.dumps(header).encode()
    head = layout.PREAMBLE.pack(layout.MAGIC, major, minor, len(text)) + text
    return head + hashlib.sha256(head).digest() + data[16 + length + 32 :]


def _restamp_payload(data: bytes, change, digests) -> bytes:
    """``data`` with chunk 0's first payload changed by ``change(bytes) -> bytes`` (same length) and
    only the checksums named in ``digests`` recomputed (a valid header digest either way)."""
    from kvc.formats.digests import payload_digests

    f = kvc.open(data)
    enc = f.header["chunks"][0]["encodings"][0]
    at = f._container.data_start + enc["offset"]
    new = change(data[at : at + enc["length"]])
    fresh = payload_digests(new)
    data = data[:at] + new + data[at + enc["length"] :]

    def restamp(header):
        header["chunks"][0]["encodings"][0].update({k: fresh[k] for k in digests})

    return _rewrite_header(data, restamp)


def test_payloads_carry_both_checksums_and_reads_check_the_fast_one():
    from kvc.formats.digests import payload_digests

    data = encode(synthetic_kv(12), chunk_tokens=5)
    f = kvc.open(data)
    assert f.version == (1, 3)
    for chunk in f.header["chunks"]:
        for enc in chunk["encodings"]:
            _, payload = f._container.payload(f.header["chunks"].index(chunk), enc["level"])
            assert {k: enc[k] for k in ("sha256", "xxh3_128")} == payload_digests(payload)

    def flip(b):
        return bytes([b[0] ^ 1]) + bytes(b[1:])

    # only the SHA-256 recomputed: the XXH3-128 (checked first) catches it
    with pytest.raises(FormatError, match="chunk 0 .*checksum mismatch"):
        kvc.open(_restamp_payload(data, flip, ["sha256"])).read()
    # only the XXH3-128 recomputed: a read's check passes it, a thorough check (kvc verify) does not
    forged = kvc.open(_restamp_payload(data, flip, ["xxh3_128"]))
    forged._container.payload(0, forged.levels[0])
    with pytest.raises(FormatError, match="chunk 0 .*checksum mismatch"):
        forged.check_payloads(forged.levels[0])


def test_files_with_only_sha256_still_read_and_are_checked():
    data = encode(synthetic_kv(12), chunk_tokens=5)

    def drop(header):
        for chunk in header["chunks"]:
            for enc in chunk["encodings"]:
                del enc["xxh3_128"]
        return (1, 2)

    old = _rewrite_header(data, drop)
    assert kvc.open(old).read().layers[0].key.equal(kvc.open(data).read().layers[0].key)
    with pytest.raises(FormatError, match="checksum mismatch"):
        kvc.open(_restamp_payload(old, lambda b: bytes([b[0] ^ 1]) + bytes(b[1:]), [])).read()


def test_newer_major_version_is_refused_with_a_clear_message():
    data = _rewrite_header(encode(synthetic_kv(3)), lambda h: (2, 0))
    with pytest.raises(VersionError, match="format 2.0.*upgrade kvc"):
        kvc.open(data)


def test_newer_minor_version_is_read():
    data = _rewrite_header(encode(synthetic_kv(3)), lambda h: (1, 7))
    assert kvc.open(data).version == (1, 7)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda h: h["chunks"][0]["encodings"][0].update(offset=10**9), "offset"),
        (lambda h: h["chunks"][0]["encodings"][0].update(length=h["data_length"] + 1), "length"),
        (lambda h: h["chunks"][0].update(end=h["chunks"][0]["end"] + 1), "end"),
        (lambda h: h["chunks"].pop(), "cover"),
        (lambda h: h["context"].update(num_tokens=10**9), "num_tokens"),
        (lambda h: h["context"]["token_ids"].append(5), "num_tokens"),
        (lambda h: h["layout"]["layers"][0].update(kv_heads=10**7), "kv_heads"),
        (lambda h: h["chunks"][0]["encodings"][0]["segments"].append(0), "segments"),
        (lambda h: h["chunks"][0]["encodings"][0].update(level="nope"), "unknown level"),
        (lambda h: h["chunks"][0]["encodings"][0].update(xxh3_128="AB" * 16), "xxh3_128"),
        (lambda h: h["chunks"][0]["encodings"][0].update(xxh3_128=None), "xxh3_128"),
        (lambda h: h["chunks"][0]["encodings"][0].pop("sha256"), "sha256"),
        (lambda h: h.update(dtype="int8"), "dtype"),
        (lambda h: h.setdefault("prefill", {}).update(dtype=16), "prefill.dtype"),
        (lambda h: h["levels"]["lossless"].update(codec="future-codec"), None),
    ],
)
def test_structurally_bad_headers_are_refused(change, message):
    data = _rewrite_header(encode(synthetic_kv(9), chunk_tokens=4), change)
    with pytest.raises(FormatError, match=message):
        kvc.open(data).read()


def test_segment_claiming_a_huge_size_is_refused_before_allocation():
    kv = synthetic_kv(4, layers=1)
    data = bytearray(encode(kv))
    # A zstd frame header that states 2**40 bytes of content where 256 were promised.
    frame = b"\x28\xb5\x2f\xfd" + bytes([0xC0]) + struct.pack("<Q", 1 << 40) + b"\x01\x00\x00"
    f = kvc.open(bytes(data))
    with pytest.raises(FormatError, match="expected"):
        from kvc.codec.base import Segment
        from kvc.codec.lossless import LosslessCodec

        LosslessCodec({}).decode(frame, Segment(0, "key", 0, (2, 4, 8), torch.float32))
    assert f.read().equal(kv)


@pytest.mark.parametrize(
    "blob, message",
    [
        (b"", "not a .kvc"),
        (b"hello", "not a .kvc"),
        (b"PK\x03\x04" + b"\0" * 100, "bad magic"),
        (layout.MAGIC + struct.pack("<HHI", 1, 0, layout.MAX_HEADER_BYTES + 1), "limit"),
        (layout.MAGIC + struct.pack("<HHI", 1, 0, 100), "truncated"),
    ],
)
def test_foreign_bytes_are_refused(blob, message):
    with pytest.raises(FormatError, match=message):
        kvc.open(blob)


def test_missing_file_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        kvc.open(tmp_path / "nope.kvc")


def test_save_is_atomic_when_writing_fails(tmp_path, monkeypatch):
    target = tmp_path / "out.kvc"
    import os

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        kvc.save(target, encode(synthetic_kv(3)))
    assert list(tmp_path.iterdir()) == []


def test_same_content_ignores_only_the_kernel_fingerprint():
    from kvc.formats.container import same_content

    data = encode(synthetic_kv(12), chunk_tokens=5)

    def kernels(value):
        def change(header):
            header.setdefault("prefill", {})["kernels"] = value

        return change

    a, b = _rewrite_header(data, kernels("0123456789abcdef")), _rewrite_header(data, kernels("fedcba9876543210"))
    assert a != b and same_content(a, b) and same_content(a, data)
    other_source = _rewrite_header(a, lambda h: h["context"].update(source="elsewhere"))
    assert not same_content(a, other_source)
    flipped = _restamp_payload(a, lambda p: p[:-1] + bytes([p[-1] ^ 1]), ("sha256", "xxh3_128"))
    assert not same_content(a, flipped)
