"""Lossy levels through the real container and CLI: several levels per chunk, profiles found by hash,
embedded, missing or wrong, and the `kvc profile` → `kvc encode` → `kvc decode` flow."""

from __future__ import annotations

import json

import pytest
import torch

import kvc
from kvc.codec.profile import fit_profile
from kvc.errors import ProfileError
from kvc.runtime.identity import model_identity
from kvc.runtime.loading import load_model
from tests.test_cli import one_line_error, run

TEXT = "KV caches let a model skip re-reading a long context. Compression makes them cheap to store. " * 6


@pytest.fixture(scope="module")
def lm(tiny_model_dirs):
    return load_model(str(tiny_model_dirs["llama"]), device="cpu")


@pytest.fixture(scope="module")
def profile(lm):
    return fit_profile(lm, [TEXT, TEXT[::-1]], tokens=64, sensitivity_tokens=40, continuation=8)


def test_several_levels_per_chunk_in_one_file(lm, profile):
    ids = kvc.tokenize(lm, TEXT)
    f = kvc.open(
        kvc.encode_tokens(lm, ids, levels=["lossless", "high", "compact"], profile=profile, chunk_tokens=32),
        profile=profile,
    )
    exact = kvc.prefill(lm, ids)
    assert f.levels == ["lossless", "high", "compact"]
    assert all(len(c["encodings"]) == 3 for c in f.header["chunks"])
    assert f.read("lossless").equal(exact)
    assert f.level_bytes("compact") < f.level_bytes("high") < f.level_bytes("lossless")
    errors = {}
    for level in ("high", "compact"):
        decoded = f.read(level)
        # keys and values: a version-2 profile may step a random model's keys so coarsely that both levels zero them
        errors[level] = sum((a.key - b.key).pow(2).sum().item() + (a.value - b.value).pow(2).sum().item()
                            for a, b in zip(exact.layers, decoded.layers))
        assert decoded.layers[0].key.dtype == exact.layers[0].key.dtype
    assert 0 < errors["high"] < errors["compact"]
    window = f.read("high", tokens=(40, 70))
    assert torch.equal(window.layers[1].value, f.read("high").layers[1].value[:, 40:70])


def test_profiles_are_found_by_hash_embedded_or_refused(lm, profile, tmp_path):
    ids = kvc.tokenize(lm, TEXT)
    plain = kvc.encode_tokens(lm, ids, levels=["balanced"], profile=profile)
    with pytest.raises(ProfileError, match="not found"):
        kvc.open(plain).read()  # the tiny model's profile is nowhere on the search path
    assert kvc.open(plain, profile=profile).read().num_tokens == len(ids)
    path = tmp_path / "p.kvcp"
    profile.save(path)
    assert kvc.open(plain, profile=str(path)).read().num_tokens == len(ids)
    other = fit_profile(lm, [TEXT[:200]], tokens=32, sensitivity_tokens=24, continuation=4, seed=3)
    other.save(tmp_path / "other.kvcp")
    with pytest.raises(ProfileError):
        kvc.open(plain, profile=str(tmp_path / "other.kvcp")).read()
    embedded = kvc.encode_tokens(lm, ids, levels=["balanced"], profile=profile, embed_profile=True)
    assert len(embedded) > len(plain) + len(profile.to_bytes()) - 1
    assert kvc.open(embedded).read().equal(kvc.open(plain, profile=profile).read())


def test_lossy_levels_need_a_profile_for_the_model(lm):
    with pytest.raises(ProfileError, match="no profile"):
        kvc.encode_tokens(lm, kvc.tokenize(lm, TEXT), levels=["balanced"])
    assert kvc.api.default_levels(lm) == ["lossless"]  # an unprofiled model still gets a correct file


def test_profile_encode_verify_decode_cli(tiny_model_dirs, lm, tmp_path):
    model = tiny_model_dirs["llama"]
    (tmp_path / "cal.txt").write_text(TEXT * 3)
    (tmp_path / "doc.txt").write_text(TEXT[::-1] * 2)
    made = json.loads(
        run(
            "profile", tmp_path / "cal.txt", "--model", model, "--tokens", "96", "-o", tmp_path / "p.kvcp", "--json"
        ).stdout
    )
    assert made["sha256"] == kvc.codec.profile.Profile.load(tmp_path / "p.kvcp").sha256
    out = tmp_path / "doc.kvc"
    run(
        "encode",
        tmp_path / "doc.txt",
        "-o",
        out,
        "--model",
        model,
        "--profile",
        tmp_path / "p.kvcp",
        "--level",
        "lossless",
        "--level",
        "balanced",
    )
    one_line_error(run("decode", out, "-l", "balanced", "-o", tmp_path / "x.st", check_rc=None), 7, "profile")
    run("decode", out, "-l", "balanced", "-o", tmp_path / "x.st", "--profile", tmp_path / "p.kvcp")
    report = json.loads(run("verify", "--deep", out, "--profile", tmp_path / "p.kvcp", "--json").stdout)
    assert report["ok"] and report["levels"]["lossless"]["exact"]
    assert "bound" in report["levels"]["balanced"] and report["levels"]["balanced"]["ok"]
    info = json.loads(run("inspect", out, "--json").stdout)
    assert [lv["name"] for lv in info["levels"]] == ["lossless", "balanced"]
    assert model_identity(lm)["weights_sha256"] == info["model"]["weights_sha256"]


def test_deep_verify_holds_lossy_levels_to_their_bounds(lm, profile):
    from kvc.verify import verify

    ids = kvc.tokenize(lm, TEXT)
    kv = kvc.prefill(lm, ids)
    info = {"slice_tokens": 512, "device": "cpu", "torch": torch.__version__.split("+")[0]}
    faithful = kvc.open(
        kvc.encode_kv(kv, model_identity(lm), ["balanced"], profile=profile, prefill_info=info), profile=profile
    )
    report = verify(faithful, deep=True, lm=lm)
    assert report["ok"] and report["levels"]["balanced"]["elements_outside_bound"] == 0
    # a stored cache that is not what this model computes: moved well past the strict bound (a version-2
    # profile may step a random model's keys coarsely, so the bound, not a fixed size, sets the move)
    bound = faithful._codec("balanced").max_abs_error_bound(2, "key")
    kv.layers[2].key[1, 30:34] += 4 * bound + 5.0
    unfaithful = kvc.open(
        kvc.encode_kv(kv, model_identity(lm), ["balanced"], profile=profile, prefill_info=info), profile=profile
    )
    report = verify(unfaithful, deep=True, lm=lm)
    assert not report["ok"] and report["levels"]["balanced"]["elements_outside_bound"] > 0


def test_profile_chain_cli(tiny_model_dirs, tmp_path):
    """`kvc profile --chain` makes a version-5 profile a user can encode, decode and verify with; a model with
    sliding-window layers is refused in one line before any fitting, and no profile is written."""
    model = tiny_model_dirs["llama"]
    (tmp_path / "cal.txt").write_text(TEXT * 3)
    # a document like the calibration text: a predictor fitted on 288 tokens of a random tiny model predicts
    # text unlike them (TEXT reversed) worse than no prediction, past the statistical RMSE bound verify checks
    (tmp_path / "doc.txt").write_text(TEXT[len(TEXT) // 2 :] + TEXT)
    made = json.loads(run("profile", tmp_path / "cal.txt", "--model", model, "--tokens", "96", "--chain",
                          "-o", tmp_path / "c.kvcp", "--json").stdout)
    prof = kvc.codec.profile.Profile.load(tmp_path / "c.kvcp")
    assert made["version"] == 5 and prof.chained and made["sha256"] == prof.sha256
    out = tmp_path / "doc.kvc"
    run("encode", tmp_path / "doc.txt", "-o", out, "--model", model, "--profile", tmp_path / "c.kvcp",
        "--level", "balanced")
    report = json.loads(run("verify", "--deep", out, "--profile", tmp_path / "c.kvcp", "--json").stdout)
    assert report["ok"] and report["levels"]["balanced"]["ok"]
    run("decode", out, "-o", tmp_path / "x.st", "--profile", tmp_path / "c.kvcp")
    assert (tmp_path / "x.st").stat().st_size > 0
    err = run("profile", tmp_path / "cal.txt", "--model", tiny_model_dirs["gemma2"], "--chain", "-o",
              tmp_path / "s.kvcp", check_rc=None)
    one_line_error(err, 2, "sliding-window")
    assert not (tmp_path / "s.kvcp").exists()
