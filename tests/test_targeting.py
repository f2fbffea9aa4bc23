"""kvc encode --target-kl / --max-bytes / --ratio: a kvq level's scale chosen per file with the model, the
target and what was measured recorded in the header and shown by inspect. Real forward passes on a
tiny random Llama with a profile fitted in the test."""

from __future__ import annotations

import copy
import json
import math

import pytest

import kvc
from kvc.api import encode_kv
from kvc.codec.profile import fit_profile
from kvc.codec.targeting import AIM, TOLERANCE_HIGH, TOLERANCE_LOW, _secant
from kvc.errors import FormatError, InputError
from kvc.evaluation.quality import compare, continuation_logprobs
from kvc.formats.header import validate
from kvc.runtime.identity import model_identity
from kvc.runtime.loading import load_model
from kvc.runtime.prefill import prefill, tokenize
from tests.test_cli import one_line_error, run

TEXT = (
    "A cache that is compressed too hard changes what the model predicts next; one compressed too gently "
    "wastes space. The encoder has the model, so it can measure which scale keeps the promise. "
) * 5


@pytest.fixture(scope="module")
def setup(tiny_model_dirs, tmp_path_factory):
    folder = tiny_model_dirs["llama"]
    lm = load_model(str(folder), device="cpu")
    prof = fit_profile(lm, [TEXT, TEXT[::-1]], tokens=200, sensitivity_tokens=96, continuation=24)
    path = tmp_path_factory.mktemp("targeting") / "llama.kvcp"
    prof.save(path)
    ids = tokenize(lm, TEXT)[:160]
    return lm, prof, path, folder, ids


def _target(data: bytes, level: str = "balanced") -> tuple[dict, dict]:
    with kvc.open(data) as f:
        entry = f.header["levels"][level]
        return entry, entry.get("target")


def test_target_kl_lands_near_its_aim_and_is_recorded(setup):
    lm, prof, _, _, ids = setup
    scales, estimates = [], []
    for target in (0.0002, 0.002):  # a tiny random model's KL saturates near 0.003 at coarse scales
        data = kvc.encode_tokens(lm, ids, ["balanced"], chunk_tokens=64, profile=prof, target_kl=target)
        entry, rec = _target(data)
        assert rec["kind"] == "kl" and rec["value"] == target and rec["aim"] == AIM
        assert 1 <= rec["tries"] <= 5 and rec["tail_tokens"] == 40  # a quarter of 160 tokens
        # the secant reached the aim (or the best of its tries is within a factor 2 of it)
        assert abs(math.log(rec["estimate"] / (AIM * target))) <= math.log(2.0), rec
        scales.append(entry["params"]["scale"])
        estimates.append(rec["estimate"])
        with kvc.open(data, profile=prof) as f:  # the file reads back at the chosen scale
            assert f.read("balanced").num_tokens == len(ids)
    assert scales[0] < scales[1] and estimates[0] < estimates[1]  # a tighter target: a finer scale


def test_the_estimate_is_the_kl_the_chosen_scale_causes_on_the_tail(setup):
    """The recorded estimate is reproducible: the probe prefix encoded at the recorded scale, decoded and
    scored on the held-back tail gives the same KL."""
    lm, prof, _, _, ids = setup
    data = kvc.encode_tokens(lm, ids, ["balanced"], chunk_tokens=64, profile=prof, target_kl=0.01)
    entry, rec = _target(data)
    n = len(ids) - rec["tail_tokens"]
    prefix, tail = prefill(lm, ids[:n]), ids[n:]
    probe = encode_kv(prefix, model_identity(lm), ["balanced"], 64, prof, level_entries={"balanced": entry})
    with kvc.open(probe, profile=prof) as f:
        decoded = f.read("balanced")
    kl = compare(continuation_logprobs(lm, prefix, tail), continuation_logprobs(lm, decoded, tail), tail).kl
    assert kl == pytest.approx(rec["estimate"], rel=1e-3)


def test_ratio_and_max_bytes_fit_their_budget(setup):
    lm, prof, _, _, ids = setup
    data = kvc.encode_tokens(lm, ids, ["balanced"], chunk_tokens=64, profile=prof, ratio=12.0)
    entry, rec = _target(data)
    with kvc.open(data) as f:
        stored, fp16 = f.level_bytes("balanced"), f.fp16_bytes()
    assert rec["kind"] == "ratio" and stored <= fp16 / 12.0 and rec["bytes"] == stored
    budget = stored * 2
    data = kvc.encode_tokens(lm, ids, ["balanced"], chunk_tokens=64, profile=prof, max_bytes=budget)
    entry2, rec2 = _target(data)
    with kvc.open(data) as f:
        assert f.level_bytes("balanced") <= budget and rec2["kind"] == "bytes" and rec2["value"] == budget
    assert entry2["params"]["scale"] < entry["params"]["scale"]  # more bytes allowed: finer steps
    with pytest.raises(InputError, match="no kvq scale fits"):
        kvc.encode_tokens(lm, ids, ["balanced"], chunk_tokens=64, profile=prof, max_bytes=10)


def test_targets_refuse_what_they_cannot_tune(setup):
    lm, prof, _, _, ids = setup
    with pytest.raises(InputError, match="tune one kvq level"):
        kvc.encode_tokens(lm, ids, ["lossless"], profile=prof, target_kl=0.01)
    with pytest.raises(InputError, match="tune one kvq level"):
        kvc.encode_tokens(lm, ids, ["balanced", "compact"], profile=prof, target_kl=0.01)
    with pytest.raises(InputError, match="at least 32 tokens"):
        kvc.encode_tokens(lm, ids[:20], ["balanced"], profile=prof, target_kl=0.01)
    with pytest.raises(InputError, match="greater than 0"):
        kvc.encode_tokens(lm, ids, ["balanced"], profile=prof, target_kl=-1.0)


def test_secant_stays_inside_the_bracket():
    # too fine at 0.5, too coarse at 1.0: the next try lies between them whatever the slope says
    nxt = _secant([(0.5, 0.001), (1.0, 0.1)], aim=0.008)
    assert 0.5 < nxt < 1.0
    # one try: slope 2, so a KL 4× too high halves the scale
    assert _secant([(1.0, 0.04)], aim=0.01) == pytest.approx(0.5)
    # far from the aim: at most ×4 per step (KL saturates at coarse scales)
    assert _secant([(1.0, 1e-6)], aim=0.01) == pytest.approx(4.0)
    assert TOLERANCE_LOW > 1 and TOLERANCE_HIGH > 1


def test_header_target_is_validated_and_optional(setup):
    lm, prof, _, _, ids = setup
    data = kvc.encode_tokens(lm, ids, ["balanced"], chunk_tokens=64, profile=prof, target_kl=0.01)
    with kvc.open(data) as f:
        header, data_bytes = copy.deepcopy(f.header), f.header["data_length"]
        assert f.version >= (1, 2)  # targets came with 1.2
    validate(header, data_bytes)
    plain = copy.deepcopy(header)
    del plain["levels"]["balanced"]["target"]  # files without it (every earlier one) are valid
    validate(plain, data_bytes)
    for bad in ({"kind": "speed", "value": 1}, {"kind": "kl", "value": "0.01"}, {"kind": "kl", "value": 0.01,
                "estimate": -1}, {"kind": "kl", "value": 0.01, "tail_tokens": 1.5}, [1]):
        hostile = copy.deepcopy(header)
        hostile["levels"]["balanced"]["target"] = bad
        with pytest.raises(FormatError, match="target"):
            validate(hostile, data_bytes)


def test_cli_target_kl_and_inspect(setup, tmp_path):
    _, _, profile, folder, _ = setup
    doc = tmp_path / "doc.txt"
    doc.write_text(TEXT)
    out = tmp_path / "doc.kvc"
    proc = run("encode", doc, "--model", folder, "--profile", profile, "--target-kl", "0.01", "-o", out,
               "--chunk-tokens", "64", "--json")
    report = json.loads(proc.stdout)
    assert report["targets"]["balanced"]["value"] == 0.01
    shown = run("inspect", out).stdout.decode()
    assert "tuned for" in shown and "KL 0.01 (estimated" in shown
    assert json.loads(run("inspect", out, "--json").stdout)["levels"][0]["target"]["kind"] == "kl"
    common = ("encode", doc, "--model", folder, "--profile", profile)
    one_line_error(run(*common, "--target-kl", "0.01", "--ratio", "10", "-o", out, check_rc=None), 2, "not several")
    one_line_error(run(*common, "--target-kl", "0.01", "--out-dir", tmp_path / "o", check_rc=None), 2, "-o FILE")
    one_line_error(run(*common, "--target-kl", "0.01", "-l", "lossless", "-o", out, check_rc=None), 2, "kvq level")
    one_line_error(run(*common, "--max-bytes", "lots", "-o", out, check_rc=None), 2, "--max-bytes")
