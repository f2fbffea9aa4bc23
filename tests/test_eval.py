"""`kvc eval` on real models: exact and text agree, lossless is exact, a damaged cache is caught,
QA and needle run end to end, and the CLI works in a real subprocess."""

import json
import subprocess
from pathlib import Path

import pytest

import kvc
from kvc.evaluation.needle import evaluate_needle
from kvc.evaluation.qa import build_prompt, evaluate_qa, load_examples
from kvc.evaluation.replay import evaluate_context, evaluate_file, evaluate_tokens, zero_values
from tests.conftest import KVC, essay

DATA = Path(__file__).parent / "data"
TEXT = (
    "KV caches let a model skip re-reading a long context. Compression makes them cheap to store. "
    "The quick brown fox jumps over the lazy dog. Numbers 0 1 2 3 4 5 6 7 8 9. "
) * 6
DAMAGE = {"damaged": zero_values(range(100))}  # every layer's values zeroed


def _ids(lm, text=TEXT):
    return lm.tokenizer(text)["input_ids"]


def test_exact_equals_text_and_damage_is_caught_tiny(tiny_lm):
    ids = _ids(tiny_lm)
    r = evaluate_context(tiny_lm, ids[:96], ids[96:136], transforms=DAMAGE, repeat=1)
    text, exact, damaged = r.mode("text"), r.mode("exact"), r.mode("damaged")
    assert text.scores.nll == pytest.approx(exact.scores.nll, abs=1e-4)
    assert text.scores.top1_agreement == 1.0 and text.scores.kl < 1e-6
    assert exact.scores.perplexity_ratio == 1.0
    # Random tiny weights are nearly uniform, so the damage is small but must show; SmolLM2 tests its size.
    assert damaged.scores.kl > 1e-6 and damaged.scores.nll != exact.scores.nll
    assert text.bits_per_element < 1 and exact.bits_per_element == 32  # token ids vs fp32 tensors
    assert all(m.timing.total > 0 and m.timing.samples == 1 for m in r.modes)


def test_lossless_file_replays_exactly_tiny(tiny_lm, tmp_path):
    ids = _ids(tiny_lm)
    path = tmp_path / "ctx.kvc"
    kvc.save(path, kvc.encode_tokens(tiny_lm, ids[:120]))
    sliding = any(layer.start for layer in kvc.prefill(tiny_lm, ids[:120]).layers)
    if sliding:  # a held-out continuation cannot be cut from a sliding-window cache
        with pytest.raises(kvc.errors.InputError, match="--continuation"):
            evaluate_file(path, tiny_lm, continuation_tokens=24, repeat=1)
        r = evaluate_file(path, tiny_lm, continuation_ids=ids[120:150], repeat=1)
    else:
        r = evaluate_file(path, tiny_lm, continuation_tokens=24, repeat=1)
        assert r.tokens == 96 and r.continuation_source == "held-out"
    lossless = r.mode("lossless")
    assert lossless.scores.kl == 0.0 and lossless.scores.top1_agreement == 1.0
    assert lossless.scores.nll == r.mode("exact").scores.nll
    assert lossless.timing.read > 0 and lossless.timing.decode > 0 and lossless.transfer_bytes > 0


def test_wrong_model_is_refused(tiny_model_dirs, tmp_path):
    llama = kvc.load_model(str(tiny_model_dirs["llama"]), device="cpu")
    gpt2 = kvc.load_model(str(tiny_model_dirs["gpt2"]), device="cpu")
    path = tmp_path / "ctx.kvc"
    kvc.save(path, kvc.encode_tokens(llama, _ids(llama)[:64]))
    with pytest.raises(kvc.errors.ModelMismatchError):
        evaluate_file(path, gpt2, continuation_tokens=16, repeat=1)


def test_qa_fixture_end_to_end_tiny(tiny_model_dirs):
    lm = kvc.load_model(str(tiny_model_dirs["llama"]), device="cpu")
    examples = load_examples(DATA / "qa_small.jsonl")
    assert [e.answers for e in examples] == [["a meadow near Sintra", "near Sintra"], ["1998"], ["green"]]
    r = evaluate_qa(lm, examples, max_new_tokens=6, transforms=DAMAGE)
    for ex in r.examples:
        answers = {a.mode: a.text for a in ex.predictions}
        # Greedy decoding from the exact and lossless caches is the same computation as from the text.
        assert answers["text"] == answers["exact"] == answers["lossless"]
    summary = r.summary()
    assert set(summary) == {"text", "exact", "lossless", "damaged"} and summary["text"]["examples"] == 3


def test_cli_json_replay_qa_needle_plot(tiny_model_dirs, tmp_path):
    folder = tiny_model_dirs["llama"]
    lm = kvc.load_model(str(folder), device="cpu")
    path = tmp_path / "ctx.kvc"
    kvc.save(path, kvc.encode_tokens(lm, _ids(lm)[:120]))
    hay = tmp_path / "hay"
    hay.mkdir()
    (hay / "a.txt").write_text(TEXT * 3)
    out = subprocess.run(
        [
            KVC,
            "eval",
            str(path),
            "--continuation-tokens",
            "24",
            "--repeat",
            "2",
            "--bandwidth",
            "0.1,10",
            "--json",
            "--qa",
            str(DATA / "qa_small.jsonl"),
            "--limit",
            "2",
            "--needle",
            "--haystack",
            str(hay),
            "--depths",
            "0.5",
            "--lengths",
            "200",
            "--max-new-tokens",
            "4",
            "--plot",
            str(tmp_path / "p.png"),
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    )
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    ctx = doc["contexts"][0]
    assert [m["mode"] for m in ctx["modes"]] == ["text", "exact", "lossless"]
    assert ctx["modes"][2]["ttft_at_bandwidth"]["0.1"] > ctx["modes"][2]["ttft_at_bandwidth"]["10"]
    assert doc["aggregate"]["lossless"]["perplexity_ratio"] == 1.0
    assert doc["qa"]["summary"]["exact"]["examples"] == 2
    assert doc["needle"]["cells"][0]["length"] == 200
    assert (tmp_path / "p.png").stat().st_size > 1000

    bad = subprocess.run([KVC, "eval"], check=False, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "nothing to evaluate" in bad.stderr


@pytest.mark.real
def test_smollm2_exact_text_lossless_and_damage(smollm2):
    ids = smollm2.tokenizer(essay("addiction.txt"))["input_ids"]
    r = evaluate_tokens(smollm2, ids[:320], ids[320:384], transforms=DAMAGE, repeat=1)
    text, exact, lossless, damaged = (r.mode(m) for m in ("text", "exact", "lossless", "damaged"))
    assert text.scores.nll == pytest.approx(exact.scores.nll, abs=1e-3)
    assert text.scores.top1_agreement == 1.0
    assert lossless.scores.nll == exact.scores.nll and lossless.scores.kl == 0.0
    assert damaged.scores.perplexity_ratio > 1.5 and damaged.scores.top1_agreement < 0.7
    assert lossless.bits_per_element < exact.bits_per_element  # lossless actually compresses


@pytest.mark.real
def test_smollm2_needle_found_from_cache_and_lost_when_damaged(smollm2):
    r = evaluate_needle(smollm2, depths=(0.5,), lengths=(384,), transforms=DAMAGE, max_new_tokens=16)
    cell = r.cells[0]
    assert cell.correct("text") and cell.correct("exact") and cell.correct("lossless"), cell.answers
    assert not cell.correct("damaged"), cell.answers


@pytest.mark.real
def test_smollm2_chat_template_split_keeps_the_context_a_prefix(smollm2):
    context_ids, question_ids = build_prompt(smollm2, "Some document.", "What is it?")
    whole = smollm2.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Some document.\n\nWhat is it?"}], tokenize=False, add_generation_prompt=True
    )
    assert smollm2.tokenizer.decode(context_ids + question_ids) == whole
    assert smollm2.tokenizer.decode(context_ids).endswith("Some document.")
