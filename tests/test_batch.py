"""kvc.batch on one machine: failures recorded, resume, duplicates, batched prefill, the streaming
writer, the weights fingerprint cache and memory:// outputs, with tiny real models and the real CLI."""

from __future__ import annotations

import io
import json
import os
import time

import pytest
import torch

import kvc
from kvc.api import encode_kv, encode_kv_to, prefill_record
from kvc.batch import encode_corpus
from kvc.runtime.identity import model_identity
from kvc.runtime.loading import load_model
from kvc.runtime.prefill import can_batch, prefill, prefill_batch
from tests.test_cli import TEXT, run


@pytest.fixture(scope="module")
def llama(tiny_model_dirs):
    return tiny_model_dirs["llama"]


def _corpus(folder, bad: bool = True):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(5):
        (folder / f"doc{i}.txt").write_text(TEXT[: 60 * (i + 1)])
    (folder / "copy.txt").write_text(TEXT[:120])  # the same text as doc1.txt
    if bad:
        (folder / "empty.txt").write_text("")
        (folder / "binary.txt").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00\x01")
        (folder / "long.txt").write_text(TEXT * 30)
    return folder


def _rows(out_dir) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "kvc-manifest.jsonl").read_text().splitlines()]


def test_bad_documents_are_recorded_by_name_and_the_batch_goes_on(llama, tmp_path):
    docs, out = _corpus(tmp_path / "docs"), tmp_path / "out"
    proc = run("encode", docs, "--out-dir", out, "--model", llama, "-l", "lossless", "--max-tokens", "256", "--json",
               check_rc=8)  # fmt: skip
    report = json.loads(proc.stdout)
    failed = {os.path.basename(f["source"]): f["error"] for f in report["summary"]["failures"]}
    assert failed.keys() == {"empty.txt", "binary.txt", "long.txt"}
    assert "empty" in failed["empty.txt"] and "UTF-8" in failed["binary.txt"] and "256" in failed["long.txt"]
    err = proc.stderr.decode()
    assert err.count("\n") == 1 and err.startswith("kvc: error: 3 of 9 documents failed"), err
    rows = _rows(out)
    assert [os.path.basename(r["source"]) for r in rows] == sorted(p.name for p in docs.iterdir())
    for r in rows:
        if r["status"] != "failed":
            assert r["bytes"] == os.path.getsize(r["output"]) and r["tokens"] > 0
            assert json.loads(run("verify", r["output"], "--json").stdout)["ok"]
    assert not (out / "empty.kvc").exists() and not (out / "binary.kvc").exists()


def test_identical_documents_are_encoded_once_and_each_names_its_source(llama, tmp_path):
    docs, out = _corpus(tmp_path / "docs", bad=False), tmp_path / "out"
    summary = encode_corpus([str(docs)], str(out), model=str(llama), levels=["lossless"])
    assert (summary.encoded, summary.duplicates, summary.failed) == (5, 1, 0)
    dup = next(r for r in summary.rows if r["status"] == "duplicate")
    assert dup["source"].endswith("doc1.txt") and dup["duplicate_of"].endswith("copy.txt")  # plan order: sorted
    a, b = kvc.open(out / "doc1.kvc"), kvc.open(out / "copy.kvc")
    assert a.header["context"]["source"].endswith("doc1.txt") and b.header["context"]["source"].endswith("copy.txt")
    assert a.read().equal(b.read())


def test_a_rerun_resumes_without_prefill_and_overwrite_forces(llama, tmp_path):
    docs, out = _corpus(tmp_path / "docs", bad=False), tmp_path / "out"
    first = encode_corpus([str(docs)], str(out), model=str(llama), levels=["lossless"])
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.kvc")}
    plans = []
    again = encode_corpus([str(docs)], str(out), model=str(llama), levels=["lossless"], on_plan=plans.append)
    assert plans[0].units == [] and again.unchanged == first.documents and again.encoded == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.kvc")} == stamps
    (docs / "doc3.txt").write_text("A changed document. " * 5)
    changed = encode_corpus([str(docs)], str(out), model=str(llama), levels=["lossless"])
    assert [os.path.basename(r["source"]) for r in changed.rows if r["status"] == "ok"] == ["doc3.txt"]
    other_level = encode_corpus([str(docs)], str(out), model=str(llama), levels=["lossless"], chunk_tokens=16)
    assert other_level.encoded + other_level.duplicates == first.documents  # settings are part of the key
    forced = encode_corpus([str(docs)], str(out), model=str(llama), levels=["lossless"], chunk_tokens=16,
                           overwrite=True)  # fmt: skip
    assert forced.unchanged == 0 and forced.encoded == 5
    # a batch killed before its manifest was written: the outputs' own headers carry their keys
    (out / "kvc-manifest.jsonl").unlink()
    plans.clear()
    encode_corpus([str(docs)], str(out), model=str(llama), levels=["lossless"], chunk_tokens=16, on_plan=plans.append)
    assert plans[0].units == []


def test_lossless_batches_stay_bit_exact_and_verify_deep(llama, tmp_path):
    docs, out = _corpus(tmp_path / "docs", bad=False), tmp_path / "out"
    encode_corpus([str(docs)], str(out), model=str(llama), levels=["lossless"])
    lm = load_model(str(llama), device="cpu")
    for name in ("doc0", "doc4"):
        f = kvc.open(out / f"{name}.kvc")
        assert "batch" not in f.header["prefill"]  # lossless is always prefilled alone
        assert f.read().equal(prefill(lm, f.token_ids))
    report = json.loads(run("verify", "--deep", out / "doc2.kvc", "--model", llama, "--json").stdout)
    assert report["ok"] and report["levels"]["lossless"]["exact"]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_batched_prefill_gives_each_document_its_lone_cache(tiny_model_dirs, arch):
    lm = load_model(str(tiny_model_dirs[arch]), device="cpu")
    assert can_batch(lm)
    gen = torch.Generator().manual_seed(1)
    docs = [torch.randint(3, 300, (n,), generator=gen).tolist() for n in (40, 7, 33, 1)]
    for doc, got in zip(docs, prefill_batch(lm, docs)):
        lone = prefill(lm, doc)
        assert got.token_ids == lone.token_ids and len(got.layers) == len(lone.layers)
        for a, b in zip(got.layers, lone.layers):
            assert a.key.shape == b.key.shape and a.value.shape == b.value.shape and a.start == b.start == 0
            # padding never reaches a real token; only the summation order of batched kernels differs
            assert torch.allclose(a.key, b.key, rtol=0, atol=1e-5) and torch.allclose(a.value, b.value, rtol=0,
                                                                                      atol=1e-5)  # fmt: skip


def test_sliding_window_models_are_not_batched(tiny_model_dirs):
    assert not can_batch(load_model(str(tiny_model_dirs["gemma2"]), device="cpu"))


def test_lossy_batches_prefill_together_and_verify(llama, tmp_path):
    (tmp_path / "cal.txt").write_text(TEXT * 20)
    run("profile", tmp_path / "cal.txt", "--model", llama, "--tokens", "96", "-o", tmp_path / "p.kvcp")
    docs, out = _corpus(tmp_path / "docs", bad=False), tmp_path / "out"
    proc = run("encode", docs, "--out-dir", out, "--model", llama, "-l", "balanced", "--profile", tmp_path / "p.kvcp",
               "--json")  # fmt: skip
    assert json.loads(proc.stdout)["summary"]["encoded"] == 5
    f = kvc.open(out / "doc0.kvc", profile=str(tmp_path / "p.kvcp"))
    assert f.header["prefill"]["batch"] == 5  # the five distinct short documents in one forward pass
    for doc in sorted(out.glob("*.kvc")):  # every one: a batch-mate a few ulps off its lone prefill once failed
        report = json.loads(run("verify", "--deep", doc, "--model", llama, "--profile", tmp_path / "p.kvcp",
                                "--json").stdout)  # fmt: skip
        assert report["ok"] and report["levels"]["balanced"]["ok"], doc
        assert report["levels"]["balanced"]["elements_outside_bound"] == 0
        # a lone prefill sums in another order than the batch did: no bit-for-bit re-encoding is asked for
        assert not report["same_environment"] and report["environment_differs"] == "prefilled in a padded batch"


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_the_streaming_writer_writes_what_build_writes(tiny_model_dirs, arch):
    lm = load_model(str(tiny_model_dirs[arch]), device="cpu")
    kv = prefill(lm, kvc.tokenize(lm, TEXT))
    args = (kv, model_identity(lm), ["lossless"], 16, None, {"source": "x"}, prefill_record(lm, 512))
    whole = encode_kv(*args)
    for group in (1, 3, None):
        streamed = io.BytesIO()
        encode_kv_to(streamed, *args, group_layers=group)
        assert streamed.getvalue() == whole


def test_the_weights_fingerprint_is_cached_beside_the_model(tmp_path, monkeypatch):
    from kvc.runtime.identity import cached_weights_fingerprint, weights_fingerprint
    from tests.tiny_models import build_tiny_model

    monkeypatch.setenv("KVC_CACHE_DIR", str(tmp_path / "cache"))
    folder = build_tiny_model("llama", tmp_path / "cache" / "models" / "m")
    lm = load_model(str(folder), device="cpu")
    truth = weights_fingerprint(lm.model)
    assert cached_weights_fingerprint(lm.model, folder) == truth
    store = folder / "kvc-weights-sha256.json"
    assert json.loads(store.read_text())["weights_sha256"] == truth
    store.write_text(json.dumps({**json.loads(store.read_text()), "weights_sha256": "0" * 64}))
    assert cached_weights_fingerprint(lm.model, folder) == "0" * 64  # read back, not recomputed
    weights = folder / "model.safetensors"
    os.utime(weights, ns=(time.time_ns(), weights.stat().st_mtime_ns + 10**9))  # a touched weight file
    assert cached_weights_fingerprint(lm.model, folder) == truth
    elsewhere = build_tiny_model("llama", tmp_path / "user-model")  # a user's folder is never written to
    cached_weights_fingerprint(load_model(str(elsewhere), device="cpu").model, elsewhere)
    assert not (elsewhere / "kvc-weights-sha256.json").exists()
    assert list((tmp_path / "cache" / "fingerprints").glob("*.json"))


def test_memory_urls_in_and_out(llama, tmp_path):
    import fsspec

    fs = fsspec.filesystem("memory")
    for i in range(3):
        fs.pipe(f"/corpus/d{i}.txt", (TEXT[: 50 * (i + 1)]).encode())
    summary = encode_corpus(["memory://corpus"], "memory://caches", model=str(llama), levels=["lossless"])
    assert summary.encoded == 3 and summary.failed == 0
    assert sorted(fs.ls("/caches", detail=False)) == ["/caches/d0.kvc", "/caches/d1.kvc", "/caches/d2.kvc",
                                                       "/caches/kvc-manifest.jsonl"]  # fmt: skip
    with kvc.open("memory://caches/d2.kvc") as f:
        lm = load_model(str(llama), device="cpu")
        assert f.read().equal(prefill(lm, kvc.tokenize(lm, TEXT[:150])))
    again = encode_corpus(["memory://corpus"], "memory://caches", model=str(llama), levels=["lossless"])
    assert again.unchanged == 3


def test_a_loaded_model_and_its_folder_share_the_resume_key(llama, tmp_path):
    docs, out = _corpus(tmp_path / "docs", bad=False), tmp_path / "out"
    encode_corpus([str(docs)], str(out), lm=load_model(str(llama), device="cpu"), levels=["lossless"])
    report = json.loads(run("encode", docs, "--out-dir", out, "--model", llama, "-l", "lossless", "--json").stdout)
    assert report["summary"]["unchanged"] == 6 and report["summary"]["encoded"] == 0


def test_an_output_folder_inside_the_input_folder_is_not_read_as_input(llama, tmp_path):
    docs = _corpus(tmp_path / "c2", bad=False)
    (docs / "old.kvc").write_bytes(b"a cache from elsewhere")  # a .kvc is never a document
    for _ in range(2):
        report = json.loads(run("encode", docs, "--out-dir", docs / "caches", "--glob", "*", "--model", llama, "-l",
                                "lossless", "--json").stdout)  # fmt: skip
        assert report["summary"]["documents"] == 6 and report["summary"]["failed"] == 0
    assert report["summary"]["unchanged"] == 6


def test_glob_repeats_and_document_lines_are_printed(llama, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for name in ("a.md", "b.py", "c.txt"):
        (docs / name).write_text(TEXT[:80] + name)
    out = tmp_path / "out"
    proc = run("encode", docs, "--out-dir", out, "--glob", "*.md", "--glob", "*.py", "--model", llama, "-l",
               "lossless")  # fmt: skip
    assert sorted(p.name for p in out.glob("*.kvc")) == ["a.kvc", "b.kvc"]
    lines = proc.stdout.decode().splitlines()
    assert len(lines) == 3 and lines[-1].startswith("2 documents: 2 encoded")
    assert sorted(line.split(" → ")[0].rsplit("/", 1)[-1] for line in lines[:2]) == ["a.md", "b.py"]


def test_a_document_that_now_fails_loses_its_stale_output(llama, tmp_path):
    docs, out = _corpus(tmp_path / "docs", bad=False), tmp_path / "out"
    encode_corpus([str(docs)], str(out), model=str(llama), levels=["lossless"])
    assert (out / "doc2.kvc").exists()
    (docs / "doc2.txt").write_bytes(b"\xff\xfe not text any more")
    (docs / "doc3.txt").write_text("")
    summary = encode_corpus([str(docs)], str(out), model=str(llama), levels=["lossless"])
    failed = {os.path.basename(f["source"]) for f in summary.failures}
    assert failed == {"doc2.txt", "doc3.txt"}  # not UTF-8 (fails in planning); empty (fails when tokenised)
    assert not (out / "doc2.kvc").exists() and not (out / "doc3.kvc").exists()
    assert (out / "doc1.kvc").exists() and summary.unchanged == 4
