"""The embedded default model, real weights: lossless is bit-exact, generation from a decoded
file is token-identical to generation from the text, and the README's main job passes."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

import kvc
from kvc.samples import evaluation_essays
from tests.conftest import KVC

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def context(smollm2):
    return kvc.tokenize(smollm2, kvc.samples.essay_text(evaluation_essays()[0]))[:600]


def test_lossless_is_bit_exact_with_partial_chunks(smollm2, context):
    f = kvc.open(kvc.encode_tokens(smollm2, context, chunk_tokens=256, slice_tokens=200))
    exact = kvc.prefill(smollm2, context, slice_tokens=200)
    assert f.read().equal(exact)
    assert len(f.header["chunks"]) == 3 and f.header["layout"]["layers"][0] == {
        "kv_heads": 3,
        "key_dim": 64,
        "value_dim": 64,
        "start": 0,
    }
    window = f.read(tokens=(300, 555))
    assert torch.equal(window.layers[29].value, exact.layers[29].value[:, 300:555])


def test_greedy_generation_from_file_matches_generation_from_text(smollm2, context):
    f = kvc.open(kvc.encode_tokens(smollm2, context))
    question = kvc.tokenize(smollm2, "\n\nIn one sentence, this essay argues that", add_special_tokens=False)
    prompt = torch.tensor([context + question])
    from_file = smollm2.model.generate(prompt, past_key_values=f.to_cache(smollm2), max_new_tokens=24, do_sample=False)
    from_text = smollm2.model.generate(prompt, max_new_tokens=24, do_sample=False)
    assert from_file.tolist() == from_text.tolist()


def test_the_main_job_from_the_cli(tmp_path):
    out = tmp_path / "e.kvc"
    subprocess.run(
        [KVC, "encode", "--essay", "nft.txt", "-o", out, "--level", "lossless", "--max-tokens", "100000"],
        check=True,
        capture_output=True,
        timeout=600,
    )
    report = json.loads(
        subprocess.run([KVC, "verify", "--deep", out, "--json"], check=True, capture_output=True, timeout=600).stdout
    )
    assert report["ok"] and report["levels"]["lossless"]["exact"]


def test_streamed_over_http_equals_the_file_and_answers_the_same(smollm2, context, tmp_path):
    from kvc.runtime.cache import from_transformers_cache
    from kvc.streaming import RangeServer

    data = kvc.encode_tokens(smollm2, context, levels=["lossless", "balanced"], chunk_tokens=256)
    (tmp_path / "c.kvc").write_bytes(data)
    f = kvc.open(data)
    question = kvc.tokenize(smollm2, "\nQ: What is this about?\nA:", add_special_tokens=False)
    ids = torch.tensor([context + question])
    with RangeServer(tmp_path, rate=50e6) as srv:
        cache, report = kvc.load_cache(srv.url_for("c.kvc"), smollm2, level="balanced")
        assert from_transformers_cache(cache, context).equal(f.read("balanced"))
        streamed = smollm2.model.generate(ids, past_key_values=cache, max_new_tokens=12, do_sample=False)
        direct = smollm2.model.generate(ids, past_key_values=f.to_cache(smollm2, "balanced"), max_new_tokens=12,
                                        do_sample=False)
        assert torch.equal(streamed, direct)
        cache, report = kvc.load_cache(srv.url_for("c.kvc"), smollm2)
    assert sum(report.choices().values()) == 3 and report.ready_s > 0
    out = smollm2.model.generate(ids, past_key_values=cache, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 4
