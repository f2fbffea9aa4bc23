"""Profiles for a user's own model: rotary settings read wherever the config nests them, sensitivity
measured on sliding-window layers, and every fallback recorded in the profile and said by `kvc profile`.
Real forward passes on tiny random models of sliding-window families (tests/tiny_models.py)."""

from __future__ import annotations

import json
import subprocess
from types import SimpleNamespace

import numpy as np
import pytest

from kvc.codec.profile import Profile, fit_profile, rotary_plan
from kvc.runtime.identity import rope_info
from kvc.runtime.loading import load_model
from tests.conftest import KVC
from tests.tiny_models import build_tiny_model

TEXT = (
    "Sliding-window attention keeps only the most recent tokens in some layers, so the cache of those layers "
    "is a suffix of the context. A profile must measure how much noise in that suffix changes the next token. "
) * 6


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("sw-models")
    return {arch: build_tiny_model(arch, root / arch) for arch in ("gemma3", "gemma3-one-base", "qwen2-sw")}


def _lm_of(config):
    return SimpleNamespace(model=SimpleNamespace(config=config))


def test_rotary_settings_are_read_wherever_the_config_nests_them():
    from transformers import Gemma3Config, LlamaConfig, Qwen2Config

    from tests.tiny_models import _config

    # flat rope_parameters (transformers 5), with sliding-window layers
    rot, why = rotary_plan(_lm_of(_config("qwen2-sw")))
    assert rot == {"theta": 50000.0, "dim": 16} and why is None
    # per layer type, one base for both: un-rotated
    rot, why = rotary_plan(_lm_of(_config("gemma3-one-base")))
    assert rot == {"theta": 10000.0, "dim": 16} and why is None
    # per layer type, two bases: each layer is un-rotated with its own (a version-3 profile)
    cfg = _config("gemma3")
    rot, why = rotary_plan(_lm_of(cfg))
    assert rot == {"theta": 10000.0, "dim": 16, "layer_theta": [1e4, 1e6, 1e4, 1e6]} and why is None
    info = rope_info(cfg)
    assert info["rope_type"] == "per-layer" and info["rope_theta"] is None
    assert info["rope_layer_types"]["full_attention"]["rope_theta"] == 1e6
    # a text sub-config of a multimodal config
    mm = Gemma3Config(text_config=cfg.to_dict())
    assert rotary_plan(_lm_of(mm)) == (rot, None)
    # scaled rope (old rope_scaling spelling, or a rope_type other than default): recorded, not applied
    rot, why = rotary_plan(_lm_of(LlamaConfig(rope_scaling={"type": "linear", "factor": 2.0})))
    assert rot is None and "linear" in why
    # a plain Llama still is
    assert rotary_plan(_lm_of(LlamaConfig(head_dim=64)))[0]["theta"] == 10000.0
    # learned positions: nothing to undo, nothing to say
    from transformers import GPT2Config

    assert rotary_plan(_lm_of(GPT2Config())) == (None, None)
    assert Qwen2Config  # imported for the sub-config case above's sibling families


@pytest.mark.parametrize("arch", ["qwen2-sw", "gemma3"])
def test_sensitivity_is_measured_on_sliding_window_layers(models, arch):
    lm = load_model(str(models[arch]), device="cpu")
    prof = fit_profile(lm, [TEXT, TEXT[::-1]], tokens=160, sensitivity_tokens=96, continuation=24)
    sliding = prof.fit["sliding_layers"]
    assert sliding, "the calibration context must be longer than the window"
    sens = prof.arrays["sensitivity"]
    for layer in sliding:  # measured: heads differ, not one uniform fallback value
        assert np.all(sens[layer] > 0) and len(np.unique(sens[layer])) == sens[layer].size
    assert len(np.unique(prof.arrays["base_step"])) == prof.arrays["base_step"].size
    warnings = prof.fit["warnings"]
    assert not any(w.startswith("sensitivity") for w in warnings)
    assert warnings == []
    if arch == "gemma3":
        assert prof.rotary["layer_theta"] == [1e4, 1e6, 1e4, 1e6] and prof.version == 3
    else:
        assert prof.rotary == {"theta": 50000.0, "dim": 16} and prof.version == 2
    again = Profile.from_bytes(prof.to_bytes())  # the record survives the file
    assert again.fit["warnings"] == warnings and again.fit["sliding_layers"] == sliding


def test_a_profile_that_falls_back_records_it(models):
    lm = load_model(str(models["qwen2-sw"]), device="cpu")
    prof = fit_profile(lm, ["too short for a continuation"], tokens=64, continuation=64)
    assert np.all(prof.arrays["sensitivity"] == 1.0)
    assert len(prof.fit["warnings"]) == 1 and prof.fit["warnings"][0].startswith("sensitivity: no calibration text")


def test_keys_are_unrotated_with_each_layers_own_base(models):
    """Gemma 3 rotates local layers' keys with base 1e4 and global ones' with 1e6: un-rotating the cached
    keys with the profile's base for each layer gives back exactly the keys before rotary (captured
    from the model's own k_norm output), sliding-window layers (a suffix of the context) included."""
    import torch

    from kvc.codec.profile import _pre_frame
    from kvc.runtime.prefill import prefill, tokenize

    lm = load_model(str(models["gemma3"]), device="cpu")
    rot, _ = rotary_plan(lm)
    pre = {}
    hooks = [layer.self_attn.k_norm.register_forward_hook(lambda m, i, o, n=n: pre.__setitem__(n, o.detach()))
             for n, layer in enumerate(lm.model.model.layers)]
    ids = tokenize(lm, TEXT)[:120]
    try:
        kv = prefill(lm, ids)
    finally:
        for h in hooks:
            h.remove()
    assert any(lay.start > 0 for lay in kv.layers), "a sliding layer must keep only a suffix"
    for n, lay in enumerate(kv.layers):
        got = _pre_frame(lay.key, "key", n, lay.start, rot)
        want = pre[n][0, :, lay.start : len(ids)].double()
        assert torch.allclose(got, want, atol=1e-4), n
        if n % 2:  # the other base would not undo a global layer's rotation
            wrong = _pre_frame(lay.key, "key", n, lay.start, {"theta": 1e4, "dim": 16})
            assert not torch.allclose(wrong, want, atol=1e-2)


def test_a_version_3_profile_round_trips_and_older_versions_are_refused_its_field(models, tmp_path):
    lm = load_model(str(models["gemma3"]), device="cpu")
    prof = fit_profile(lm, [TEXT], tokens=120, sensitivity_tokens=64, continuation=16, mix=False)
    again = Profile.from_bytes(prof.to_bytes())
    assert again.version == 3 and again.rotary == prof.rotary and again.rotary_theta(1) == 1e6
    import kvc
    from kvc.runtime.identity import model_identity

    ids = kvc.tokenize(lm, TEXT)[:120]
    kv = kvc.prefill(lm, ids)
    f = kvc.open(kvc.encode_kv(kv, model_identity(lm), ["balanced"], profile=prof), profile=again)
    out = f.read("balanced")
    codec = f._codec("balanced")
    for n, (lay, dec) in enumerate(zip(kv.layers, out.layers)):
        for a in range(0, lay.key.shape[1], 256):
            x = lay.key[:, a : a + 256]
            err = (dec.key[:, a : a + 256].double() - x.double()).abs()
            assert bool((err <= codec.element_error_bound(n, "key", x, lay.start + a).double()).all()), n
    # every field of the per-layer list is checked, with the checksum recomputed (a file is attacker-controlled)
    import hashlib
    import struct

    from kvc.codec.profile import MAGIC
    from kvc.errors import ProfileError

    raw = prof.to_bytes()
    hlen = struct.unpack_from("<I", raw, len(MAGIC) + 4)[0]
    start = len(MAGIC) + 8
    header = json.loads(raw[start : start + hlen])

    def forged(rotary, version=3):
        hj = json.dumps(dict(header, rotary=rotary, version=version), sort_keys=True, separators=(",", ":")).encode()
        body = raw[:len(MAGIC)] + struct.pack("<HHI", version, 0, len(hj)) + hj + raw[start + hlen : -32]
        return body + hashlib.sha256(body).digest()

    assert Profile.from_bytes(forged(header["rotary"])).sha256 == prof.sha256
    good = header["rotary"]
    for bad, why in (
        (dict(good, layer_theta=None), "one base per layer"),
        (dict(good, layer_theta=good["layer_theta"][:-1]), "one base per layer"),
        (dict(good, layer_theta=[True] * 4), "numbers in"),
        (dict(good, layer_theta=["1e4"] * 4), "numbers in"),
        (dict(good, layer_theta=[1e4, 1e6, 0, 1e6]), "numbers in"),
        (dict(good, layer_theta=[1e4, 1e6, 1e4, 1e13]), "numbers in"),
        (dict(good, theta=1e6), "must equal"),
        (dict(good, extra=1), "unknown field"),
        (None, "version 3 needs"),
    ):
        with pytest.raises(ProfileError, match=why):
            Profile.from_bytes(forged(bad))
    with pytest.raises(ProfileError, match="needs profile version 3"):  # the list is version 3's alone
        Profile.from_bytes(forged(good, version=2))
    # nor is one written: a profile whose list does not fit its layers never reaches a file
    import copy

    broken = copy.copy(prof)
    broken._bytes = broken._sha256 = None
    broken.rotary = dict(good, layer_theta=good["layer_theta"][:-1])
    with pytest.raises(ProfileError, match="one base per layer"):
        broken.to_bytes()


def test_kvc_profile_warns_in_one_line_per_fallback(models, tmp_path):
    short, text = tmp_path / "short.txt", tmp_path / "doc.txt"
    short.write_text("too short for a continuation")
    text.write_text(TEXT)
    out = tmp_path / "g3.kvcp"
    run = subprocess.run([KVC, "profile", "--model", str(models["gemma3"]), str(short), "-o", str(out),
                          "--tokens", "160", "--json"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    warned = [line for line in run.stderr.splitlines() if line.startswith("warning: profile:")]
    assert len(warned) == 1 and "sensitivity" in warned[0]
    result = json.loads(run.stdout)
    assert result["rotary"]["layer_theta"] == [1e4, 1e6, 1e4, 1e6] and len(result["warnings"]) == 1
    assert result["version"] == 3  # a base per layer; not mixed across heads unless told --mix (below)
    assert Profile.load(out).fit["warnings"] == result["warnings"]
    # a model whose profile does all of its job prints no warning
    clean = subprocess.run([KVC, "profile", "--model", str(models["qwen2-sw"]), str(text), "-o",
                            str(tmp_path / "q.kvcp"), "--tokens", "160", "--mix"], capture_output=True, text=True,
                           timeout=300)
    assert clean.returncode == 0 and "warning" not in clean.stderr, clean.stderr
    assert Profile.load(tmp_path / "q.kvcp").version == 4


def test_every_fitting_stage_reports_its_start_and_its_end(models):
    """`kvc profile` shows one bar per stage: each stage announces itself before its first (long) step
    and ends at its total, in the order the fit runs them."""
    lm = load_model(str(models["gemma3"]), device="cpu")
    seen: list[tuple[str, int, int]] = []
    fit_profile(lm, [TEXT, TEXT[::-1]], tokens=120, sensitivity_tokens=64, continuation=16, mix=True,
                on_progress=lambda stage, done, total: seen.append((stage, done, total)))  # fmt: skip
    stages = list(dict.fromkeys(stage for stage, _, _ in seen))
    assert stages == ["prefill", "pca", "sensitivity", "fisher", "mix", "fine"]
    for stage in ("sensitivity", "fisher", "fine"):
        steps = [(done, total) for s, done, total in seen if s == stage]
        assert steps[0][0] == 0 and steps[-1][0] == steps[-1][1] > 0
        assert [d for d, _ in steps] == sorted(d for d, _ in steps)
