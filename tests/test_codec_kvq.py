"""The profiled lossy codec: round trips, determinism, bounds, robustness, profile format."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvc.codec.base import Segment
from kvc.codec.levels import LEVEL_SCALES, PLAIN_LEVEL_SCALES, level_scale
from kvc.codec.profile import Profile, find_profile, find_profile_by_sha, fit_profile
from kvc.codec.registry import build_codec, level_entry, level_names
from kvc.errors import FormatError, ProfileError

TEXTS = ["The quick brown fox jumps over the lazy dog. " * 6,
         "KV caches let a model skip re-reading a long context. Compression makes them cheap to store. " * 3]


@pytest.fixture(scope="module")
def tiny_profile(tiny_llama):
    return fit_profile(tiny_llama, TEXTS, tokens=64, sensitivity_tokens=40, continuation=8)


@pytest.fixture(scope="module")
def tiny_profile_v2(tiny_llama):
    """Explicitly without mixing across heads: a version-2 profile (per-coefficient steps)."""
    return fit_profile(tiny_llama, TEXTS, tokens=64, sensitivity_tokens=40, continuation=8, mix=False)


@pytest.fixture(scope="module")
def tiny_profile_mix(tiny_llama):
    """The same fit mixed across heads: a version-4 profile."""
    return fit_profile(tiny_llama, TEXTS, tokens=64, sensitivity_tokens=40, continuation=8, mix=True)


def _kv(lm, text=TEXTS[1]):
    from kvc.runtime.prefill import prefill, tokenize

    return prefill(lm, tokenize(lm, text)[:70])


def _roundtrip(codec, t, layer, kind, start):
    seg = Segment(layer, kind, start, tuple(t.shape), t.dtype)
    blob = codec.encode(t, seg)
    return blob, codec.decode(blob, seg), seg


def test_levels_registered(tiny_profile):
    names = level_names()
    for name in LEVEL_SCALES:
        assert name in names
        entry = level_entry(name, tiny_profile)
        assert entry["profile"] == tiny_profile.sha256
    with pytest.raises(ProfileError):
        level_entry("balanced", None)
    with pytest.raises(ProfileError):
        build_codec(level_entry("balanced", tiny_profile), None)


@pytest.mark.parametrize("level", list(LEVEL_SCALES))
def test_roundtrip_shapes_dtypes_determinism(tiny_llama, tiny_profile, level):
    kv = _kv(tiny_llama)
    codec = build_codec(level_entry(level, tiny_profile), tiny_profile)
    for li, lay in enumerate(kv.layers):
        for kind in ("key", "value"):
            t = getattr(lay, kind)
            for a in range(0, t.shape[1], 32):  # chunks, the first one holding the sinks
                x = t[:, a : a + 32].contiguous()
                blob, y, seg = _roundtrip(codec, x, li, kind, a)
                assert y.shape == x.shape and y.dtype == x.dtype
                assert torch.isfinite(y).all()
                y2 = build_codec(level_entry(level, tiny_profile), tiny_profile).decode(blob, seg)
                assert y.numpy().tobytes() == y2.numpy().tobytes()  # bit-identical, fresh codec
                assert blob == codec.encode(x, seg)
                if a == 0:  # sink tokens are kept at float16 precision
                    s = tiny_profile.sinks
                    assert torch.allclose(y[:, :s], x[:, :s], rtol=2e-3, atol=1e-3)


def test_error_shrinks_with_level(tiny_llama, tiny_profile):
    kv = _kv(tiny_llama)
    errs = []
    for level in LEVEL_SCALES:  # ordered from finest to coarsest
        codec = build_codec(level_entry(level, tiny_profile), tiny_profile)
        t = kv.layers[1].value
        _, y, _ = _roundtrip(codec, t, 1, "value", 0)
        errs.append(float((y - t).pow(2).mean()))
        # error bound: uniform quantiser in an (almost) orthonormal basis ⇒ MSE ≤ max step² / 4
        steps = codec.steps(1, 1).numpy()
        assert errs[-1] <= float(steps.max()) ** 2 / 4 + 1e-9
    assert errs == sorted(errs)


@pytest.mark.parametrize("case", ["outlier", "zero", "one_token", "short", "nan_inf", "huge"])
def test_robustness(tiny_profile, case):
    codec = build_codec(level_entry("balanced", tiny_profile), tiny_profile)
    H, D = tiny_profile.heads, tiny_profile.key_dim
    g = torch.Generator().manual_seed(1)
    T = {"one_token": 1, "short": 7}.get(case, 40)
    x = torch.randn(H, T, D, generator=g)
    if case == "outlier":
        x[:, :, 3] *= 1000
    elif case == "zero":
        x[:, :, :] = 0.25
    elif case == "nan_inf":
        x[0, 5, 1], x[1, 6, 2], x[0, 7, 0] = float("nan"), float("inf"), float("-inf")
    elif case == "huge":
        x *= 1e30
    for start in (0, 100):
        for kind in ("key", "value"):
            _, y, _ = _roundtrip(codec, x, 0, kind, start)
            assert y.shape == x.shape and torch.isfinite(y).all()
            if case == "outlier":
                fin = torch.isfinite(x)
                assert float((y - x)[fin].abs().max()) < 0.01 * float(x.abs().max())


def test_fp16_and_bf16_segments(tiny_profile):
    codec = build_codec(level_entry("high", tiny_profile), tiny_profile)
    x = torch.randn(tiny_profile.heads, 20, tiny_profile.value_dim)
    for dt in (torch.float16, torch.bfloat16):
        _, y, _ = _roundtrip(codec, x.to(dt), 0, "value", 0)
        assert y.dtype == dt and torch.isfinite(y).all()


def test_corrupt_payload_rejected(tiny_llama, tiny_profile):
    kv = _kv(tiny_llama)
    codec = build_codec(level_entry("balanced", tiny_profile), tiny_profile)
    t = kv.layers[0].key[:, :32].contiguous()
    blob, _, seg = _roundtrip(codec, t, 0, "key", 0)
    for cut in (0, 3, len(blob) // 2, len(blob) - 1):
        with pytest.raises(FormatError):
            codec.decode(blob[:cut], seg)
    with pytest.raises(FormatError):
        codec.decode(blob + b"\0\0\0\0", seg)
    rng = np.random.default_rng(0)
    for _ in range(50):  # flipped bytes: a clean error or finite output, never a crash
        b = bytearray(blob)
        b[int(rng.integers(len(b)))] ^= 1 << int(rng.integers(8))
        try:
            y = codec.decode(bytes(b), seg)
            assert torch.isfinite(y).all()
        except FormatError:
            pass


def test_profile_roundtrip_and_corruption(tiny_profile, tmp_path):
    data = tiny_profile.to_bytes()
    again = Profile.from_bytes(data)
    assert again.sha256 == tiny_profile.sha256 and again.to_bytes() == data
    for name, arr in tiny_profile.arrays.items():
        assert np.array_equal(again.arrays[name], arr.astype(again.arrays[name].dtype))
    for i in (0, 9, 20, len(data) // 2, len(data) - 1):
        b = bytearray(data)
        b[i] ^= 0x40
        with pytest.raises((ProfileError, FormatError)):
            Profile.from_bytes(bytes(b))
    for cut in (0, 10, len(data) - 1):
        with pytest.raises((ProfileError, FormatError)):
            Profile.from_bytes(data[:cut])
    path = tmp_path / "p.kvcp"
    tiny_profile.save(path)
    assert Profile.load(path).sha256 == tiny_profile.sha256
    assert find_profile_by_sha(tiny_profile.sha256, path=str(path)) is not None


def test_wrong_model_profile_refused(tiny_profile, tiny_model_dirs, tmp_path, monkeypatch):
    from kvc.runtime.identity import model_identity
    from kvc.runtime.loading import load_model

    path = tmp_path / "p.kvcp"
    tiny_profile.save(path)
    other = model_identity(load_model(str(tiny_model_dirs["llama-mqa"]), device="cpu"))
    with pytest.raises(ProfileError):
        find_profile(other, str(path))
    monkeypatch.setenv("KVC_CACHE_DIR", str(tmp_path))
    (tmp_path / "profiles").mkdir()
    tiny_profile.save(tmp_path / "profiles" / "tiny.kvcp")
    (tmp_path / "profiles" / "junk.kvcp").write_bytes(b"garbage")
    assert find_profile(other) is None
    assert find_profile(dict(tiny_profile.identity)).sha256 == tiny_profile.sha256


def test_profile_found_in_default_cache_without_env(tiny_profile, tmp_path, monkeypatch):
    """Without $KVC_CACHE_DIR the search still reaches the default cache, ~/.cache/kvc/profiles/."""
    monkeypatch.delenv("KVC_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    folder = tmp_path / ".cache" / "kvc" / "profiles"
    folder.mkdir(parents=True)
    tiny_profile.save(folder / "tiny.kvcp")
    assert find_profile(dict(tiny_profile.identity)).sha256 == tiny_profile.sha256


def test_coder_within_one_percent_of_model_entropy(tiny_profile):
    codec = build_codec(level_entry("high", tiny_profile), tiny_profile)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(tiny_profile.heads, 512, tiny_profile.key_dim, generator=g) * 2
    info, written = codec.model_bits(x, Segment(1, "key", 300, tuple(x.shape), torch.float32))
    assert info > 10_000
    assert written <= info * 1.01 + 64


@settings(max_examples=25, deadline=None)
@given(tokens=st.integers(1, 40), start=st.integers(0, 6), scale=st.floats(1e-3, 1e3), seed=st.integers(0, 99),
       kind=st.sampled_from(["key", "value"]))
def test_property_roundtrip(tiny_profile, tokens, start, scale, seed, kind):
    codec = build_codec(level_entry("compact", tiny_profile), tiny_profile)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tiny_profile.heads, tokens, tiny_profile.key_dim, generator=g) * scale
    blob, y, seg = _roundtrip(codec, x, 2, kind, start)
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert torch.equal(codec.decode(blob, seg), y)


def test_bank_probabilities_match_per_channel(tiny_profile):
    """The vectorised table build is bit-identical to the per-channel reference (docs/CODEC.md step 6)."""
    from kvc.codec.entropy import bank_probabilities, channel_probabilities, channel_radius
    from kvc.codec.profile import GRID

    grid = np.linspace(GRID[0], GRID[1], GRID[2])
    rng = np.random.default_rng(0)
    ratio = np.concatenate([rng.uniform(0, 3, 200), [0.0, 1e-13, 40.0, 500.0]])
    radius = channel_radius(ratio)
    cdf = tiny_profile.arrays["cdf"][0, 0].astype(np.float64)
    got = bank_probabilities(ratio, radius, grid, cdf)
    for r, R, p in zip(ratio, radius, got):
        assert p.tobytes() == channel_probabilities(r, int(R), grid, cdf).tobytes()


def _decode_all(codec, kv, chunk):
    from dataclasses import replace

    from kvc.runtime.kv import LayerKV

    layers = []
    for li, lay in enumerate(kv.layers):
        parts = [torch.cat([_roundtrip(codec, getattr(lay, kind)[:, a : a + chunk].contiguous(), li, kind, a)[1]
                            for a in range(0, lay.key.shape[1], chunk)], dim=1) for kind in ("key", "value")]
        layers.append(LayerKV(*parts))
    return replace(kv, layers=layers)


def _bound_ratio(codec, kv, dec, chunk):
    """(max over elements of |decoded − original| / stated per-element bound, relative RMSE)."""
    worst, err2, ref2 = 0.0, 0.0, 0.0
    for li, (lay, dlay) in enumerate(zip(kv.layers, dec.layers)):
        for kind in ("key", "value"):
            t, y = getattr(lay, kind), getattr(dlay, kind)
            d = (y.double() - t.double()).abs()
            for a in range(0, t.shape[1], chunk):
                x = t[:, a : a + chunk]
                bound = codec.element_error_bound(li, kind, x, a).double()
                worst = max(worst, float((d[:, a : a + chunk] / bound).max()))
            err2 += float((d**2).sum())
            ref2 += float((t.double() ** 2).sum())
    return worst, (err2 / ref2) ** 0.5


@pytest.mark.parametrize("level", list(LEVEL_SCALES))
def test_error_bound_holds_tiny(tiny_llama, tiny_profile, level):
    codec = build_codec(level_entry(level, tiny_profile), tiny_profile)
    kv = _kv(tiny_llama)
    worst, rel = _bound_ratio(codec, kv, _decode_all(codec, kv, 32), 32)
    assert worst <= 1.0
    assert 0 < codec.max_abs_error_bound(0, "key") < float("inf")
    assert codec.max_abs_error_bound(0, "value", torch.bfloat16) == 2 * codec.max_abs_error_bound(0, "value")
    assert rel <= codec.relative_rmse_bound


def test_error_bound_scales_with_level(tiny_profile):
    codecs = [build_codec(level_entry(lv, tiny_profile), tiny_profile) for lv in LEVEL_SCALES]
    bounds = [c.max_abs_error_bound(1, "key") for c in codecs]
    rmse = [c.relative_rmse_bound for c in codecs]
    assert bounds == sorted(bounds) and rmse == sorted(rmse)


@pytest.mark.real
def test_smollm2_error_bound_and_kl(smollm2):
    """512 tokens of a held-out essay: the strict and statistical bounds hold, balanced KL is small
    and a much coarser step is clearly worse (so this test can fail)."""
    import kvc
    from kvc.codec.profile import find_profile
    from kvc.evaluation.quality import compare, continuation_logprobs
    from kvc.runtime.identity import model_identity
    from kvc.samples import essay_text, evaluation_essays

    lm = smollm2
    profile = find_profile(model_identity(lm))
    ids = kvc.tokenize(lm, essay_text(evaluation_essays()[1]))
    ctx, cont = ids[:512], ids[512:544]
    data = kvc.encode_tokens(lm, ctx, levels=["lossless", "balanced"])
    f = kvc.open(data)
    ref_kv = f.read("lossless")
    ref = continuation_logprobs(lm, ref_kv, cont)
    kl = compare(ref, continuation_logprobs(lm, f.read("balanced"), cont), cont).kl
    print(f"balanced KL {kl:.4g}")
    assert kl < 0.05

    balanced = build_codec(level_entry("balanced", profile), profile)
    worst, rel = _bound_ratio(balanced, ref_kv, f.read("balanced"), 256)
    assert worst <= 1.0 and rel <= balanced.relative_rmse_bound

    coarse = build_codec({"codec": "kvq", "params": {"scale": 8.0}}, profile)
    coarse_kv = _decode_all(coarse, ref_kv, 256)
    kl_coarse = compare(ref, continuation_logprobs(lm, coarse_kv, cont), cont).kl
    assert kl_coarse > 3 * kl and kl_coarse > 0.02


def _as_version_1(profile: Profile) -> Profile:
    """The same profile without per-coefficient steps: a version-1 profile (per-head ``base_step``)."""
    arrays = {k: v for k, v in profile.arrays.items() if k not in ("step", "mix")}
    return Profile(identity=profile.identity, layers=profile.layers, heads=profile.heads, key_dim=profile.key_dim,
                   value_dim=profile.value_dim, rotary=profile.rotary, sinks=profile.sinks, arrays=arrays,
                   fit=profile.fit)


def test_profile_versions_and_per_coefficient_steps(tiny_profile_v2):
    tiny_profile = tiny_profile_v2
    # fit_profile(mix=False) writes version 2: one step per (layer, kind, head, coefficient), and they differ
    assert tiny_profile.version == 2
    step = tiny_profile.arrays["step"]
    assert step.shape == tiny_profile.arrays["sigma"].shape and np.all(step > 0)
    assert len(np.unique(step[:, :, :, : tiny_profile.key_dim])) > step.shape[0] * 2 * step.shape[2]
    # a version-1 profile still round-trips as version 1 and steps every coefficient of a head alike
    old = _as_version_1(tiny_profile)
    data = old.to_bytes()
    assert int.from_bytes(data[8:10], "little") == 1
    again = Profile.from_bytes(data)
    assert again.version == 1 and "step" not in again.arrays and again.sha256 == old.sha256
    codec = build_codec(level_entry("balanced", again), again)
    assert torch.equal(codec.steps(1, 0), codec.steps(1, 0)[:, :1].expand(-1, again.key_dim))
    scale = level_scale("balanced", again)  # a profile without fine tokens: the plain scales
    assert scale == PLAIN_LEVEL_SCALES["balanced"]
    assert np.array_equal(codec.steps(1, 0)[:, 0].numpy(), again.arrays["base_step"][1, 0].astype(np.float64) * scale)
    # the v2 codec uses its per-coefficient steps
    v2 = build_codec(level_entry("balanced", tiny_profile), tiny_profile)
    assert np.array_equal(v2.steps(1, 0).numpy(), step[1, 0, :, : tiny_profile.key_dim].astype(np.float64) * scale)


def test_per_head_steps_as_version_2_encode_the_same_bytes(tiny_llama, tiny_profile_v2):
    """Version 1 is version 2 with every coefficient of a head at the head's step: the same bytes and values,
    so generalising the steps changed nothing for files made with version-1 profiles."""
    old = _as_version_1(tiny_profile_v2)
    flat = _as_version_1(tiny_profile_v2)
    per_head = np.repeat(old.arrays["base_step"][..., None], old.arrays["sigma"].shape[-1], -1)
    flat.arrays = dict(flat.arrays, step=per_head)
    assert flat.version == 2 and flat.sha256 != old.sha256
    kv = _kv(tiny_llama)
    for level in ("high", "tiny"):
        a = build_codec({"codec": "kvq", "params": {"scale": LEVEL_SCALES[level]}}, old)
        b = build_codec({"codec": "kvq", "params": {"scale": LEVEL_SCALES[level]}}, flat)
        for layer in (0, 1):
            for kind in ("key", "value"):
                t = getattr(kv.layers[layer], kind)
                blob_a, y_a, _ = _roundtrip(a, t, layer, kind, 0)
                blob_b, y_b, _ = _roundtrip(b, t, layer, kind, 0)
                assert blob_a == blob_b and torch.equal(y_a, y_b)


def test_version_2_profile_tensors_are_checked(tiny_profile_v2):
    tiny_profile = tiny_profile_v2
    import json
    import struct

    data = tiny_profile.to_bytes()
    hlen = struct.unpack_from("<I", data, 12)[0]
    header = json.loads(data[16 : 16 + hlen])

    def rebuild(header, version=2):
        import hashlib

        hj = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        body = data[:8] + struct.pack("<HHI", version, 0, len(hj)) + hj + data[16 + hlen : -32]
        return body + hashlib.sha256(body).digest()

    assert Profile.from_bytes(rebuild(header)).sha256 == tiny_profile.sha256
    with pytest.raises(ProfileError):  # version 2 without its step tensor
        Profile.from_bytes(rebuild(dict(header, tensors=[t for t in header["tensors"] if t["name"] != "step"])))
    with pytest.raises(ProfileError):  # a version-1 profile may not carry one
        Profile.from_bytes(rebuild(header, version=1))
    from kvc.errors import VersionError

    with pytest.raises(ProfileError, match="layer_theta"):  # version 3 is version 2 plus a base per layer
        Profile.from_bytes(rebuild(dict(header, version=3), version=3))
    with pytest.raises(ProfileError, match="version differs"):  # the header says what the file says
        Profile.from_bytes(rebuild(dict(header, version=1), version=2))
    with pytest.raises(VersionError):
        Profile.from_bytes(rebuild(header, version=6))  # 5 is the chain (tests/test_chain.py)
    bad = dict(tiny_profile.arrays, step=-tiny_profile.arrays["step"])
    forged = _as_version_1(tiny_profile)
    forged.arrays = bad
    with pytest.raises(ProfileError):
        Profile.from_bytes(forged.to_bytes())


def test_mixed_profile_decorrelates_heads_and_round_trips(tiny_llama, tiny_profile_mix, tiny_profile_v2):
    """Version 4 (fit_profile(mix=True)): one rotation across the heads of each (layer, kind) after the
    per-coefficient steps; the coded coefficients' stds are what the profile says, every level decodes
    within its stated bound, and the profile file checks the rotation like the basis."""
    import hashlib
    import json
    import struct

    prof = tiny_profile_mix
    assert prof.version == 4 and prof.mixed and not tiny_profile_v2.mixed
    H, kd = prof.heads, prof.key_dim
    n = H * kd
    R = prof.arrays["mix"][1, 0, :n, :n].astype(np.float64)
    assert np.abs(R.T @ R - np.eye(n)).max() < 5e-3
    # the same PCA and steps as version 2; only sigma and cdf describe the mixed coefficients
    for name in ("mean", "basis", "step", "base_step"):
        assert np.array_equal(prof.arrays[name], tiny_profile_v2.arrays[name]), name
    assert not np.array_equal(prof.arrays["sigma"], tiny_profile_v2.arrays["sigma"])
    kv = _kv(tiny_llama)
    for level in LEVEL_SCALES:
        codec = build_codec(level_entry(level, prof), prof)
        worst, rel = _bound_ratio(codec, kv, _decode_all(codec, kv, 32), 32)
        assert worst <= 1.0 and rel <= codec.relative_rmse_bound, level
    # bytes: round trip, and a mix that is not a rotation is refused (checksum recomputed)
    again = Profile.from_bytes(prof.to_bytes())
    assert again.version == 4 and again.sha256 == prof.sha256
    data = prof.to_bytes()
    hlen = struct.unpack_from("<I", data, 12)[0]
    header = json.loads(data[16 : 16 + hlen])
    entry = next(t for t in header["tensors"] if t["name"] == "mix")
    blob = bytearray(data[16 + hlen : -32])
    off = entry["offset"]
    blob[off : off + 2] = np.float16(3.0).tobytes()  # mix[0, 0, 0, 0] = 3
    body = data[: 16 + hlen] + bytes(blob)
    with pytest.raises(ProfileError, match="not orthonormal"):
        Profile.from_bytes(body + hashlib.sha256(body).digest())
    # a version-2 reader's view: a version-4 file is refused by version, never misread
    assert int.from_bytes(data[8:10], "little") == 4


def test_the_optional_mixed_smollm2_profile_is_found_by_hash_only():
    """SmolLM2's version-4 profile ships in profiles/optional/: encoding picks the version-2 default (fast
    CPU decode), a file that names the mixed one by hash still decodes without being told where it is."""
    from kvc.codec.profile import find_profile, find_profile_by_sha, optional_profiles_dir

    mixed = Profile.load(optional_profiles_dir() / "smollm2-135m-mix.kvcp")
    assert mixed.version == 4
    default = find_profile(mixed.identity)
    assert default is not None and default.version == 2 and default.matches(mixed.identity)
    assert find_profile_by_sha(mixed.sha256).sha256 == mixed.sha256
    # both carry SmolLM2's fine token, " the" (id 260: PROFILE.md fitting step 9)
    assert default.fine_tokens == mixed.fine_tokens == {"ids": [260], "shift": 1}


def test_superseded_smollm2_profiles_still_decode_their_files():
    """The profiles the fine-token ones replaced ship in profiles/superseded/: never chosen to encode,
    found by hash for the files that name them, the same arrays as their successors."""
    from kvc.codec.profile import find_profile, find_profile_by_sha, superseded_profiles_dir

    old = {p.name: Profile.load(p) for p in superseded_profiles_dir().glob("*.kvcp")}
    assert {"smollm2-135m-2026-12-07.kvcp", "smollm2-135m-mix-2026-12-07.kvcp"} <= set(old)
    for prof in old.values():
        assert prof.fine_tokens is None and find_profile_by_sha(prof.sha256).sha256 == prof.sha256
    new = find_profile(old["smollm2-135m-2026-12-07.kvcp"].identity)
    assert new.sha256 not in {p.sha256 for p in old.values()}
    assert all(np.array_equal(new.arrays[k], old["smollm2-135m-2026-12-07.kvcp"].arrays[k]) for k in new.arrays)


def _fine_file(lm, profile, kv, fine_ids, shift=1):
    import kvc

    prof = profile.with_fine_tokens({"ids": sorted(fine_ids), "shift": shift})
    data = kvc.encode_kv(kv, {"name": "tiny"}, ["balanced"], chunk_tokens=32, profile=prof, embed_profile=True)
    return prof, data


def test_fine_tokens_are_quantised_finer_and_read_back(tiny_llama, tiny_profile_v2, tiny_profile_mix):
    """A profile's fine tokens: every kvq level quantises the positions holding them with a step 2**shift
    times finer, lists those rows in each segment (version 3) and decodes them exactly as it encoded them;
    the other positions are untouched."""
    import kvc
    from kvc.codec import kvq_segment

    kv = _kv(tiny_llama)
    ids = list(kv.token_ids)
    fine_ids = sorted(set(ids), key=lambda i: (-ids.count(i), i))[:2]
    at = np.isin(ids, fine_ids)
    at[: tiny_profile_v2.sinks] = False  # sinks are stored exactly anyway
    assert 3 <= at.sum() < len(ids) - 10
    for base in (tiny_profile_v2, tiny_profile_mix):
        entry = level_entry("balanced", base)  # at the scale a profile with fine tokens gets
        entry = {**entry, "params": {**entry["params"], "scale": LEVEL_SCALES["balanced"]}}
        plain = kvc.encode_kv(kv, {"name": "tiny"}, ["balanced"], chunk_tokens=32, profile=base, embed_profile=True,
                              level_entries={"balanced": entry})
        prof, data = _fine_file(tiny_llama, base, kv, fine_ids, shift=3)
        f = kvc.open(data)
        assert f.header["levels"]["balanced"]["params"]["fine_tokens"] == sorted(fine_ids)
        rows_seen = 0
        for index, chunk in enumerate(f.header["chunks"]):
            for enc, payload in f._container.payloads([index], "balanced"):
                view, off = memoryview(payload), 0
                for s, length in enumerate(enc["segments"]):
                    seg = bytes(view[off : off + length])
                    off += length
                    assert kvq_segment.read_head(seg)[0] == 3
                    if s == 0:  # layer 0 keys: its fine rows are the chunk's fine positions past the sinks
                        n_sink = max(0, min(chunk["end"], prof.sinks) - chunk["start"])
                        start = 4 + ((1 + 2 * prof.heads * n_sink * prof.key_dim) if n_sink else 0)
                        rows, shift, _ = kvq_segment.read_fine(seg, start, chunk["end"] - chunk["start"] - n_sink)
                        want = np.flatnonzero(at[chunk["start"] + n_sink : chunk["end"]])
                        assert rows.tolist() == want.tolist() and shift == (3 if len(want) else 0)
                        rows_seen += len(rows)
        assert rows_seen == at.sum()
        fine_read, plain_read = f.read("balanced"), kvc.open(plain).read("balanced")
        codec = f._codec("balanced")
        mask = torch.from_numpy(at)
        sq_fine, sq_plain = {"key": 0.0, "value": 0.0}, {"key": 0.0, "value": 0.0}
        for i, (x, a, b) in enumerate(zip(kv.layers, fine_read.layers, plain_read.layers)):
            for kind in ("key", "value"):
                err_fine = (getattr(a, kind) - getattr(x, kind)).abs()
                err_plain = (getattr(b, kind) - getattr(x, kind)).abs()
                # elsewhere the same symbols, so the same values; at fine positions, smaller errors
                assert torch.equal(err_fine[:, ~mask], err_plain[:, ~mask])
                sq_fine[kind] += float(err_fine[:, mask].pow(2).sum())
                sq_plain[kind] += float(err_plain[:, mask].pow(2).sum())
                assert err_fine.max() <= codec.max_abs_error_bound(i, kind) * (1 + 1e-5) + 1e-6
        # (the random tiny model's keys are so insensitive that even 8x finer steps round most to 0)
        assert sq_fine["key"] <= sq_plain["key"] and sq_fine["value"] < 0.25 * sq_plain["value"]
        # chunk by chunk (the streaming loader's path) gives the same bits as the whole read
        for index in range(len(f.header["chunks"])):
            enc, payload = next(iter(f._container.payloads([index], "balanced")))
            part = kvc.api.decode_chunk(f.header, codec, index, enc, payload, f.dtype)
            c = f.header["chunks"][index]
            for (key, value), whole in zip(part, fine_read.layers):
                assert torch.equal(key, whole.key[:, c["start"] : c["end"]])
                assert torch.equal(value, whole.value[:, c["start"] : c["end"]])


def test_fine_tokens_need_the_context_and_are_checked(tiny_llama, tiny_profile_v2):
    from kvc.codec import kvq_segment

    prof = tiny_profile_v2.with_fine_tokens({"ids": [3, 7], "shift": 2})
    again = Profile.from_bytes(prof.to_bytes())
    assert again.fine_tokens == {"ids": [3, 7], "shift": 2} and again.sha256 == prof.sha256
    assert tiny_profile_v2.fine_tokens is None and prof.sha256 != tiny_profile_v2.sha256
    for bad in ({"ids": [7, 3], "shift": 1}, {"ids": [], "shift": 1}, {"ids": [1], "shift": 5},
                {"ids": [-1], "shift": 1}, {"ids": [1]}, {"ids": [True], "shift": 1}):
        with pytest.raises(ProfileError, match="fine_tokens"):
            tiny_profile_v2.with_fine_tokens(bad)
    codec = build_codec(level_entry("balanced", prof), prof)
    t = torch.randn(prof.heads, 20, prof.key_dim)
    with pytest.raises(ValueError, match="bind"):
        codec.encode(t, Segment(0, "key", 8, tuple(t.shape), t.dtype))
    for params in ({"fine_tokens": [1], "fine_shift": 0}, {"fine_tokens": "1", "fine_shift": 1},
                   {"fine_tokens": [1]}):
        with pytest.raises(FormatError, match="fine"):
            build_codec({"codec": "kvq", "params": {"scale": 0.5, **params}}, prof)
    # a segment's fine rows are checked against its own bytes before anything is scaled
    codec.bind_tokens([3, 1, 7, 1] * 10)
    seg = Segment(0, "key", 8, tuple(t.shape), t.dtype)
    blob = codec.encode(t, seg)
    rows, shift, _ = kvq_segment.read_fine(blob, 4, 20)
    assert rows.tolist() == [i for i in range(20) if (8 + i) % 2 == 0] and shift == 2
    assert torch.equal(codec.decode(blob, seg), codec.decode(blob, seg))
    for forged in (blob[:4] + bytes([5]) + blob[5:],  # shift past 4
                   blob[:4] + bytes([0]) + blob[5:],  # no shift for its rows
                   blob[:5] + (21).to_bytes(4, "little") + blob[9:],  # more rows than tokens
                   blob[:5] + (1 << 31).to_bytes(4, "little") + blob[9:],  # a count no segment can back
                   blob[:9] + blob[11:13] + blob[9:11] + blob[13:],  # rows out of order
                   blob[:6]):  # truncated
        with pytest.raises(FormatError):
            codec.decode(forged, seg)
