"""Hostile files: one test per case reported in issue 11, each a file an attacker wrote with every
checksum recomputed. Each case runs the real `kvc` in a subprocess once (exit code, one-line error);
its variants go through the library. Memory cases also measure the subprocess's peak RSS, so a
refusal that allocates first still fails."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

import kvc
from bench.fuzz import RawText, _shaped_profile, index, rle_frame, serialize, split, zstd_frame
from kvc.codec.base import Segment
from kvc.codec.cachegen import CacheGenCodec
from kvc.codec.lossless import LosslessCodec
from kvc.codec.profile import Profile, fit_profile
from kvc.errors import FormatError, InputError, LimitError
from kvc.formats.container import EncodedChunk, build
from kvc.runtime.loading import load_model
from kvc.verify import verify
from tests.conftest import KVC
from tests.test_cli import one_line_error

TEXT = "KV caches let a model skip re-reading a long context. Compression makes them cheap to store. " * 6
IDENTITY = {
    "name": "synthetic",
    "source": "none",
    "config_sha256": "0" * 64,
    "weights_sha256": "1" * 64,
    "tokenizer_sha256": "2" * 64,
}
MB = 1 << 20


@pytest.fixture(scope="module")
def lm(tiny_model_dirs):
    return load_model(str(tiny_model_dirs["llama"]), device="cpu")


@pytest.fixture(scope="module")
def profile(lm):
    return fit_profile(lm, [TEXT, TEXT[::-1]], tokens=64, sensitivity_tokens=40, continuation=8)


@pytest.fixture(scope="module")
def files(lm, profile) -> dict[str, bytes]:
    ids = kvc.tokenize(lm, TEXT)[:48]
    out = {}
    for name, levels, embed in (
        ("lossless", ["lossless"], False),
        ("balanced", ["balanced"], False),
        ("cachegen", ["cachegen"], False),
        ("embedded", ["compact"], True),
    ):
        out[name] = kvc.encode_tokens(lm, ids, levels=levels, chunk_tokens=16, profile=profile, embed_profile=embed)
    return out


@pytest.fixture(scope="module")
def profile_path(profile, tmp_path_factory):
    path = tmp_path_factory.mktemp("profile") / "p.kvcp"
    profile.save(path)
    return path


def forge(data: bytes, change, parts_change=None) -> bytes:
    """``data`` with its header changed by ``change(header, raw)`` (and its parts by ``parts_change``),
    every checksum recomputed. ``raw.raw(text)`` puts literal JSON (NaN, deep nesting) into the header."""
    parts = split(data)
    if parts_change is not None:
        parts_change(parts)
    header, body = index(parts)
    raw = RawText()
    change(header, raw)
    return serialize(header, body, raw)


def write(tmp_path, data: bytes, name: str = "hostile.kvc"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def run_env(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [KVC, *map(str, args)], capture_output=True, timeout=300, env={**os.environ, "KVC_DEBUG": "", **(env or {})}
    )


def refused(tmp_path, data: bytes, command: str, fragment: str = "", code: int = 3) -> None:
    """``kvc <command> FILE`` exits ``code`` with one line on stderr naming ``fragment``, and writes nothing."""
    path = write(tmp_path, data)
    out = tmp_path / "out.safetensors"
    one_line_error(run_env(command, path, *(["-o", out] if command == "decode" else [])), code, fragment)
    assert not out.exists()


def refused_by_library(data: bytes, fragment: str = "", error=FormatError) -> None:
    """Opening and reading every level (as `kvc decode` would) raises ``error`` naming ``fragment``."""
    with pytest.raises(error, match=fragment):
        f = kvc.open(data)
        for level in f.levels:
            f.read(level)


def peak_rss_of(*args, env=None) -> tuple[subprocess.CompletedProcess, int]:
    """Run ``kvc args`` under a fresh wrapper whose only child it is: (result, the child's peak RSS in bytes)."""
    wrapper = (
        "import resource, subprocess, sys;"
        "p = subprocess.run(sys.argv[1:], capture_output=True);"
        "sys.stdout.buffer.write(p.stdout); sys.stderr.buffer.write(p.stderr);"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(p.returncode)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", wrapper, KVC, *map(str, args)],
        capture_output=True,
        timeout=300,
        env={**os.environ, "KVC_DEBUG": "", **(env or {})},
    )
    *lines, peak = proc.stderr.decode().rstrip("\n").split("\n")
    proc.stderr = ("\n".join(lines) + "\n").encode() if lines else b""
    return proc, int(peak) * 1024


@pytest.fixture(scope="module")
def baseline(files, tmp_path_factory) -> int:
    """Peak RSS of `kvc decode` on a genuine file: the cost of starting kvc at all."""
    folder = tmp_path_factory.mktemp("baseline")
    proc, peak = peak_rss_of("decode", write(folder, files["lossless"], "genuine.kvc"), "-o", folder / "g.st")
    assert proc.returncode == 0, proc.stderr
    return peak


# ---------------------------------------------------------------- forged headers: types


def test_chunk_encoding_level_given_as_list_or_object_is_refused(files, tmp_path):
    for value in (["lossless"], {"name": "lossless"}):
        data = forge(files["lossless"], lambda h, raw, v=value: h["chunks"][0]["encodings"][0].update(level=v))
        refused_by_library(data, "unknown level")
    refused(tmp_path, data, "inspect", "unknown level")


def test_attachments_given_as_number_or_null_are_refused(files, tmp_path):
    for value in (5, None):
        data = forge(files["embedded"], lambda h, raw, v=value: h.update(attachments=v))
        refused_by_library(data, "attachments must be a list")
    refused(tmp_path, data, "decode", "attachments must be a list")


def test_level_params_given_as_list_or_number_are_refused(files, tmp_path):
    for fixture in ("lossless", "balanced", "cachegen"):
        for value in ([1, 2], 3):

            def change(h, raw, value=value):
                for entry in h["levels"].values():
                    entry["params"] = value

            refused_by_library(forge(files[fixture], change), "params must be an object")
            for codec in (LosslessCodec, CacheGenCodec):  # the constructors refuse on their own too
                with pytest.raises(FormatError):
                    codec(value)
    refused(tmp_path, forge(files["cachegen"], change), "decode", "params must be an object")


def test_cachegen_group_or_anchor_bits_infinity_is_refused(files, tmp_path):
    for key in ("group", "anchor_bits"):
        for literal in ("Infinity", "-Infinity", "NaN", "1e999"):

            def change(h, raw, key=key, literal=literal):
                h["levels"]["cachegen"]["params"][key] = raw.raw(literal)

            refused_by_library(forge(files["cachegen"], change), "not valid JSON")
        for value in (1e300, 10.0, True, 2**40):  # nor a finite non-integer, nor an integer out of range
            with pytest.raises(FormatError, match=key):
                CacheGenCodec({"group": 10, "anchor_bits": 8, "delta_bits": [6, 5, 4], key: value})
    refused(tmp_path, forge(files["cachegen"], change), "decode", "not valid JSON")


def test_dtype_forged_to_float64_on_a_lossy_level(files, lm, tmp_path):
    # kvq decodes in float32 and cannot produce float64: the header is invalid.
    refused(tmp_path, forge(files["balanced"], lambda h, raw: h.update(dtype="float64")), "decode", "float64")
    # cachegen can: the forged file decodes (to float64), and verify --deep finds it unfaithful.
    data = forge(files["cachegen"], lambda h, raw: h.update(dtype="float64"))
    assert kvc.open(data).read().layers[0].key.dtype == torch.float64
    report = verify(kvc.open(data), deep=True, lm=lm)
    assert not report["ok"] and report["checks"][-1]["check"] == "deep layout"


def test_writer_refuses_a_file_readers_would_refuse(lm, profile):
    kv = kvc.prefill(lm, kvc.tokenize(lm, TEXT)[:8])
    for layer in kv.layers:
        layer.key, layer.value = layer.key.double(), layer.value.double()
    with pytest.raises(InputError, match="cannot decode float64"):
        kvc.encode_kv(kv, IDENTITY, ["balanced"], profile=profile)


def test_inspect_of_a_file_with_an_unused_level_is_refused(files, tmp_path):
    def change(h, raw):
        h["levels"]["spare"] = {"codec": "lossless", "params": {}, "profile": None}

    refused(tmp_path, forge(files["lossless"], change), "inspect", "stores no data")
    # nor can a level hold only empty segments: every layer keeps a token, every kept token has bytes
    start = lambda h, raw: h["layout"]["layers"][0].update(start=h["context"]["num_tokens"])  # noqa: E731
    refused_by_library(forge(files["lossless"], start), "start")


def test_header_json_that_cannot_be_printed_or_dumped_is_refused(files, tmp_path):
    for literal, fragment in [
        ('{"a":' * 5000 + "0" + "}" * 5000, "nested"),
        ("[" * 40 + "]" * 40, "nested"),
        ('"\\ud800"', "surrogate"),
        ("123456789012345678901234567890", "out of range"),
        ('"two\\nlines"', "control character"),
    ]:
        data = forge(files["lossless"], lambda h, raw, text=literal: h["model"].update(name=raw.raw(text)))
        refused_by_library(data, fragment)
    refused(tmp_path, data, "inspect", "control character")


def test_duplicate_header_keys_are_refused(files):
    data = forge(files["lossless"], lambda h, raw: h.update({raw.key("dtype"): "float16"}))
    refused_by_library(data, "duplicate key")


# ---------------------------------------------------------------- embedded profiles


def _profile_with_header(profile: Profile, change) -> bytes:
    """The profile's bytes with its JSON header rewritten by ``change(text) -> text``, digest recomputed."""
    body = profile.to_bytes()[:-32]
    hlen = struct.unpack_from("<I", body, 12)[0]
    text = change(body[16 : 16 + hlen].decode()).encode()
    body = body[:12] + struct.pack("<I", len(text)) + text + body[16 + hlen :]
    return body + hashlib.sha256(body).digest()


def _embed(data: bytes, blob: bytes, named: bool = True) -> bytes:
    def parts_change(parts):
        parts.attachments["profile"] = blob

    def change(h, raw):
        if named:
            for entry in h["levels"].values():
                entry["profile"] = entry["params"]["profile"] = hashlib.sha256(blob).hexdigest()

    return forge(data, change, parts_change)


@pytest.mark.parametrize(
    "rewrite",
    [
        lambda t: "[" + t + "]",
        lambda t: t[:-1] + ',"fit":' + '{"a":' * 100000 + "0" + "}" * 100000 + "}",
        lambda t: t.replace('"layers":3', '"layers":Infinity'),
        lambda t: t.replace('"sinks":4', '"sinks":Infinity'),
        lambda t: t.replace('"sinks":4', '"sinks":1e999'),
        lambda t: t.replace('"layers":3', '"layers":3.0'),
    ],
    ids=["header-is-a-list", "deeply-nested", "layers-infinity", "sinks-infinity", "sinks-1e999", "layers-float"],
)
def test_embedded_profile_with_a_hostile_header_is_refused(files, profile, tmp_path, rewrite, request):
    data = _embed(files["embedded"], _profile_with_header(profile, rewrite))
    refused_by_library(data, "embedded profile is invalid")
    if request.node.callspec.id == "header-is-a-list":
        refused(tmp_path, data, "decode", "embedded profile is invalid")


def test_embedded_profile_is_parsed_only_when_its_hash_is_the_one_asked_for(files, profile, profile_path, tmp_path):
    # A corrupt attachment that no level names is never parsed: the level's own profile is looked
    # for elsewhere (and found when given), so the garbage costs nothing.
    garbage = _profile_with_header(profile, lambda t: "[" + t + "]")
    data = _embed(files["balanced"], garbage, named=False)
    refused(tmp_path, data, "decode", "not found", code=7)
    assert kvc.open(data, profile=str(profile_path)).read().num_tokens > 0
    # Nor is an attachment whose recorded hash is not the level's read at all.
    f = kvc.open(data, profile=profile)
    assert f._container.attachment("profile", sha256=profile.sha256) is None


def test_embedded_profile_that_does_not_fit_the_layout_is_refused(files, profile):
    other = _shaped_profile(profile, layers=profile.layers, heads=8, dim=32, sigma=1.0)
    refused_by_library(_embed(files["embedded"], other.to_bytes()), "does not match its profile")


def test_kvq_tables_sized_by_an_embedded_profile_are_refused_before_allocation(files, profile, tmp_path, baseline):
    """A valid profile of 64 heads × 128 dims whose sigma makes every channel's alphabet 8,193 symbols:
    kvq (v1) would build ~0.4 GB of tables per layer and kind before reading a word."""
    big = _shaped_profile(profile, layers=1, heads=64, dim=128, sigma=1e6)

    def parts_change(parts):
        parts.attachments["profile"] = big.to_bytes()
        for key, segs in parts.payloads.items():  # long enough to pass kvq's plausibility check
            parts.payloads[key] = [seg + bytes(70_000) for seg in segs[:2]]

    def change(h, raw):
        h["layout"]["layers"] = [{"kv_heads": 64, "key_dim": 128, "value_dim": 128, "start": 0}]
        for entry in h["levels"].values():
            entry["profile"] = entry["params"]["profile"] = big.sha256

    data = forge(files["embedded"], change, parts_change)
    refused_by_library(data, "would take", LimitError)
    proc, peak = peak_rss_of("decode", write(tmp_path, data), "-o", tmp_path / "x.st")
    one_line_error(proc, 3, "would take")
    assert peak < baseline + 100 * MB


# ---------------------------------------------------------------- memory sized by the file


def _synthetic(layers: list[dict], tokens: int, dtype: str, segments: list[bytes], level="lossless", params=None):
    header = {
        "created_by": "attacker",
        "model": IDENTITY,
        "dtype": dtype,
        "layout": {"layers": layers},
        "context": {"num_tokens": tokens, "token_ids": [0] * tokens},
        "prefill": {},
        "chunk_tokens": tokens,
        "levels": {level: {"codec": level, "params": params or {}, "profile": None}},
    }
    return build(header, [EncodedChunk(0, tokens, {level: segments})])


def test_a_33_kb_file_that_decodes_to_1_gib_is_refused_by_default(tmp_path, baseline):
    """1 layer, 1,024 heads of width 4,096, float64, 16 tokens: two genuine RLE zstd frames of 512 MiB."""
    layer = {"kv_heads": 1024, "key_dim": 4096, "value_dim": 4096, "start": 0}
    frame = rle_frame(1024 * 16 * 4096 * 8)
    data = _synthetic([layer], 16, "float64", [frame, frame])
    assert len(data) < 34_000
    proc, peak = peak_rss_of("decode", write(tmp_path, data), "-o", tmp_path / "x.st")
    one_line_error(proc, 3, "KVC_MAX_DECODED_BYTES")
    assert peak < baseline + 100 * MB
    # The same kind of file, smaller, decodes under the limit a user sets, and not above it.
    small = _synthetic([dict(layer, kv_heads=2)], 16, "float64", [rle_frame(2 * 16 * 4096 * 8)] * 2)
    need = 2 * 2 * 16 * 4096 * 8
    assert kvc.open(small, max_decoded_bytes=need).read().layers[0].key.abs().sum() == 0
    with pytest.raises(LimitError, match="max_decoded_bytes"):
        kvc.open(small, max_decoded_bytes=need - 1).read()
    os.environ["KVC_MAX_DECODED_BYTES"] = "2M"
    try:
        assert kvc.open(small).read().nbytes() == need
        os.environ["KVC_MAX_DECODED_BYTES"] = "1MiB"
        with pytest.raises(LimitError, match="KVC_MAX_DECODED_BYTES"):
            kvc.open(small).read()
    finally:
        del os.environ["KVC_MAX_DECODED_BYTES"]
    proc = run_env(
        "decode", write(tmp_path, small, "s.kvc"), "-o", tmp_path / "s.st", env={"KVC_MAX_DECODED_BYTES": "x"}
    )
    one_line_error(proc, 2, "KVC_MAX_DECODED_BYTES")


def test_a_small_file_whose_zstd_frame_claims_32_gib_is_refused_before_allocation(tmp_path, baseline):
    layer = {"kv_heads": 1024, "key_dim": 4096, "value_dim": 4096, "start": 0}
    claim = 1024 * 1024 * 4096 * 8  # 32 GiB, as the header's shape implies
    frame = zstd_frame(claim, [(1, 1 << 17, b"\0")])
    data = _synthetic([layer], 1024, "float64", [frame, frame])
    assert len(data) < 4096
    proc, peak = peak_rss_of("decode", write(tmp_path, data), "-o", tmp_path / "x.st")
    one_line_error(proc, 3, "cannot encode")
    assert peak < baseline + 100 * MB
    with pytest.raises(FormatError, match="cannot produce"):  # the codec alone refuses it too
        frame = zstd_frame(8 << 20, [(1, 1 << 17, b"\0")])
        LosslessCodec({}).decode(frame, Segment(0, "key", 0, (1, 1, 1 << 20), torch.float64))


def test_a_cachegen_segment_claiming_205_gib_is_refused_before_allocation(tmp_path, baseline):
    """[1024 heads, 6,554 tokens, 4,096 dims] from a 131 KB segment: the codec allocated
    [heads·dim, tokens] int64 symbols (205 GiB) before reading its tables."""
    H, T, D = 1024, 6554, 4096
    seg = bytes([1, 0, 0]) + bytes(2 * T) + struct.pack("<I", 0) + bytes(131_000 - 3 - 2 * T - 4)
    layer = {"kv_heads": H, "key_dim": D, "value_dim": D, "start": 0}
    params = {"group": 10, "anchor_bits": 8, "delta_bits": [6]}
    header_chunk = 8192
    data = _synthetic([layer], T, "float32", [seg, seg], level="cachegen", params=params)
    data = forge(data, lambda h, raw: h.update(chunk_tokens=header_chunk))
    proc, peak = peak_rss_of("decode", write(tmp_path, data), "-o", tmp_path / "x.st")
    one_line_error(proc, 3, "would take")
    assert peak < baseline + 100 * MB
    # With no limit at all, the codec still reads its tables before it allocates anything.
    with pytest.raises(FormatError, match="cachegen tables"):
        CacheGenCodec(params).decode(seg, Segment(0, "key", 0, (H, T, D), torch.float32))


def test_decoded_size_limit_follows_the_file_by_default(files):
    f = kvc.open(files["lossless"])
    assert f.read().nbytes() > 0  # a genuine file is far below 512 MiB + 1024 × its bytes
    with pytest.raises(LimitError, match="max_decoded_bytes"):
        kvc.open(files["lossless"], max_decoded_bytes=1000).read()
    with pytest.raises(InputError):
        kvc.open(files["lossless"], max_decoded_bytes=-1).read()


# ---------------------------------------------------------------- token ids


def test_token_ids_outside_the_vocabulary_are_refused_wherever_a_model_is_present(files, lm, tmp_path):
    vocab = len(lm.tokenizer)
    data = forge(files["lossless"], lambda h, raw: h["context"]["token_ids"].__setitem__(5, vocab))
    f = kvc.open(data)
    assert f.read().token_ids[5] == vocab  # without a model there is nothing to check against
    with pytest.raises(FormatError, match="outside the model's vocabulary"):
        f.to_cache(lm)
    with pytest.raises(FormatError, match="outside the model's vocabulary"):
        verify(f, deep=True, lm=lm)
    path = write(tmp_path, data)
    one_line_error(run_env("verify", "--deep", path, "--model", lm.source), 3, "vocabulary")
    proc = run_env("eval", path, "--model", lm.source, "--continuation-tokens", "8", "--repeat", "1")
    one_line_error(proc, 3, "vocabulary")


# ---------------------------------------------------------------- forged payloads meet verify --deep


def _payload_of_other_data(files, lm, profile, fixture: str, layer: int, kind: str, chunk: int, change) -> bytes:
    """The fixture with one segment replaced by what its own codec makes of the true KV after
    ``change(piece, scale)``, for the smallest scale (doubling from 1/64) that alters the payload."""
    f = kvc.open(files[fixture], profile=profile)
    level = f.levels[0]
    codec = f._codec(level)
    kv = kvc.prefill(lm, f.token_ids)
    a, b = 16 * chunk, 16 * chunk + 16
    truth = getattr(kv.layers[layer], kind)[:, a:b]
    seg = Segment(layer, kind, a, tuple(truth.shape), truth.dtype)
    s = 2 * layer + (kind == "value")
    original = split(files[fixture]).payloads[(chunk, level)][s]
    for k in range(-6, 12):
        piece = truth.clone()
        change(piece, 2.0**k)
        forged = codec.encode(piece.contiguous(), seg)
        if forged != original:
            break
    assert forged != original

    def parts_change(parts):
        parts.payloads[(chunk, level)][s] = forged

    return forge(files[fixture], lambda h, raw: None, parts_change)


def test_a_valid_payload_of_other_data_fails_verify_deep(files, lm, profile, profile_path, tmp_path):
    """A payload the level's own codec made from slightly changed KV: every check but --deep passes."""

    def bump(piece, scale):
        piece[0, 3, 2] += scale

    for fixture in ("lossless", "balanced", "cachegen"):
        data = _payload_of_other_data(files, lm, profile, fixture, 1, "value", 1, bump)
        assert verify(kvc.open(data, profile=profile))["ok"]
        report = verify(kvc.open(data, profile=profile), deep=True, lm=lm)
        assert not report["ok"] and report["checks"][-1]["check"].startswith("deep"), report
    path = write(tmp_path, data)
    proc = run_env("verify", "--deep", path, "--model", lm.source, "--profile", profile_path)
    one_line_error(proc, 6, "deep cachegen")


def test_a_lossy_payload_inside_the_error_bound_is_still_caught(files, lm, profile):
    """The smallest change a forger can make to a kvq level moves values by less than the quantiser's
    error bound; re-encoding the fresh prefill still tells."""
    step = float(kvc.open(files["balanced"], profile=profile)._codec("balanced").steps(2, 1)[0, 0])
    direction = torch.from_numpy(profile.arrays["basis"][2, 1, 0].astype(np.float32))[:, 0]  # a value direction

    def nudge(piece, scale):  # one token of one head moved along one PCA direction
        piece[0, 5] += scale * step * direction

    g = kvc.open(_payload_of_other_data(files, lm, profile, "balanced", 2, "value", 1, nudge), profile=profile)
    report = verify(g, deep=True, lm=lm)
    assert not report["ok"], report["levels"]
    assert report["levels"]["balanced"]["segments_not_reproduced"] == 1
    assert report["levels"]["balanced"]["elements_outside_bound"] == 0  # the bound alone would have passed it


def test_inspect_json_of_a_genuine_file_reports_every_level(files, tmp_path):
    proc = run_env("inspect", write(tmp_path, files["balanced"]), "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert all(lv["ratio_vs_fp16"] > 0 and lv["bits_per_element"] > 0 for lv in info["levels"])


def test_every_frame_zstd_writes_passes_the_frame_walk():
    """The frame rules refuse hostile frames, never genuine ones: every level, sizes across block and
    window boundaries (multi-segment frames), with and without a checksum."""
    import zstandard

    from kvc.codec.lossless import decompress_exact

    rng = np.random.default_rng(0)
    for level in (-7, 1, 3, 19, 22):
        for n in (1, 131071, 131072, 131073, 3_000_000):
            data = rng.standard_normal(n // 4 + 1).astype(np.float32).tobytes()[:n] if n % 2 else bytes(n)
            for checksum in (False, True):
                writer = zstandard.ZstdCompressor(level=level, write_content_size=True, write_checksum=checksum)
                assert decompress_exact(writer.compress(data), n, "test") == data
    with pytest.raises(FormatError, match="content size"):  # a streamed frame states no size
        decompress_exact(zstandard.ZstdCompressor(write_content_size=False).compress(b"abc"), 3, "test")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_hardened_cachegen_round_trip_is_within_half_a_step(dtype):
    """The channel-by-channel decoder: every element within half its token's quantiser step (anchors
    and deltas alike, deltas being coded against the reconstructed anchor), in every dtype, and the
    segment never shorter than the plausibility bound."""
    codec = CacheGenCodec({"group": 4, "anchor_bits": 8, "delta_bits": [5]})
    x = (torch.randn(3, 23, 8, generator=torch.Generator().manual_seed(1)) * 4).to(dtype)
    seg = Segment(0, "key", 0, (3, 23, 8), dtype)
    data = codec.encode(x, seg)
    assert len(data) >= codec.min_segment_bytes(seg)
    out = codec.decode(data, seg)
    assert out.dtype == dtype and out.shape == x.shape
    steps = torch.from_numpy(np.frombuffer(data, "<f2", 23, 3).astype(np.float32)).double()
    err = (out.double() - x.double()).abs().amax(dim=(0, 2))
    slack = {torch.float16: 2e-2, torch.bfloat16: 1e-1}.get(dtype, 1e-5)
    assert torch.all(err <= 0.5 * steps * (1 + 1e-3) + slack), (err, steps)


def test_null_where_a_value_is_used_is_refused(files):
    """Found by bench/fuzz.py: `prefill.slice_tokens: null` reached verify --deep's prefill."""
    for section, key in (("prefill", "slice_tokens"), ("context", "add_special_tokens"), ("context", "source")):
        refused_by_library(forge(files["lossless"], lambda h, raw, s=section, k=key: h[s].update({k: None})), key)


def test_cachegen_words_constriction_refuses_outright_are_a_format_error(files):
    """Found by bench/fuzz.py: an ANS stream whose last word is 0 is refused by constriction's
    constructor, before any decoding."""
    parts = split(files["cachegen"])
    seg = parts.payloads[(1, "cachegen")][2]
    codec = CacheGenCodec(kvc.open(files["cachegen"]).header["levels"]["cachegen"]["params"])
    with pytest.raises(FormatError, match="corrupt cachegen"):
        codec.decode(seg[:-4] + b"\0\0\0\0", Segment(1, "key", 16, (2, 16, 16), torch.float32))
