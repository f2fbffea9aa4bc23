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
    # per layer type, two bases: kvq un-rotates with one, so it must not, and must say why
    cfg = _config("gemma3")
    rot, why = rotary_plan(_lm_of(cfg))
    assert rot is None and "different rotary bases" in why and "1e+06" in why
    info = rope_info(cfg)
    assert info["rope_type"] == "per-layer" and info["rope_theta"] is None
    assert info["rope_layer_types"]["full_attention"]["rope_theta"] == 1e6
    # a text sub-config of a multimodal config
    mm = Gemma3Config(text_config=cfg.to_dict())
    assert rotary_plan(_lm_of(mm))[0] is None and "different rotary bases" in rotary_plan(_lm_of(mm))[1]
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
    if arch == "gemma3":
        assert prof.rotary is None and any(w.startswith("rotary:") for w in warnings)
    else:
        assert prof.rotary == {"theta": 50000.0, "dim": 16} and warnings == []
    again = Profile.from_bytes(prof.to_bytes())  # the record survives the file
    assert again.fit["warnings"] == warnings and again.fit["sliding_layers"] == sliding


def test_a_profile_that_falls_back_records_it(models):
    lm = load_model(str(models["qwen2-sw"]), device="cpu")
    prof = fit_profile(lm, ["too short for a continuation"], tokens=64, continuation=64)
    assert np.all(prof.arrays["sensitivity"] == 1.0)
    assert len(prof.fit["warnings"]) == 1 and prof.fit["warnings"][0].startswith("sensitivity: no calibration text")


def test_kvc_profile_warns_in_one_line_per_fallback(models, tmp_path):
    text = tmp_path / "doc.txt"
    text.write_text(TEXT)
    out = tmp_path / "g3.kvcp"
    run = subprocess.run([KVC, "profile", "--model", str(models["gemma3"]), str(text), "-o", str(out),
                          "--tokens", "160", "--json"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    warned = [line for line in run.stderr.splitlines() if line.startswith("warning: profile:")]
    assert len(warned) == 1 and "different rotary bases" in warned[0]
    result = json.loads(run.stdout)
    assert result["rotary"] is None and len(result["warnings"]) == 1
    assert Profile.load(out).fit["warnings"] == result["warnings"]
    # a model whose profile does all of its job prints no warning
    clean = subprocess.run([KVC, "profile", "--model", str(models["qwen2-sw"]), str(text), "-o",
                            str(tmp_path / "q.kvcp"), "--tokens", "160"], capture_output=True, text=True, timeout=300)
    assert clean.returncode == 0 and "warning" not in clean.stderr, clean.stderr
