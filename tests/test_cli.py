"""The real `kvc` executable in subprocesses: pipelines, JSON output, exit codes and one-line errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import kvc
from kvc.runtime.loading import load_model
from tests.conftest import KVC
from tests.tiny_models import build_tiny_model

TEXT = "The quick brown fox jumps over the lazy dog. KV caches let a model skip re-reading. " * 8


def run(*args, stdin: bytes | None = None, check_rc: int | None = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [KVC, *map(str, args)], input=stdin, capture_output=True, timeout=300, env={**os.environ, "KVC_DEBUG": ""}
    )
    if check_rc is not None:
        assert proc.returncode == check_rc, proc.stderr.decode()
    return proc


def one_line_error(proc: subprocess.CompletedProcess, code: int, fragment: str) -> None:
    err = proc.stderr.decode()
    assert proc.returncode == code, err
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("kvc: error:"), err
    assert fragment in err, err


@pytest.fixture(scope="module")
def llama(tiny_model_dirs):
    return tiny_model_dirs["llama"]


@pytest.fixture(scope="module")
def encoded(tmp_path_factory, llama):
    folder = tmp_path_factory.mktemp("cli")
    doc = folder / "doc.txt"
    doc.write_text(TEXT)
    out = folder / "doc.kvc"
    report = json.loads(
        run("encode", doc, "-o", out, "--model", llama, "--chunk-tokens", "32", "--level", "lossless", "--json").stdout
    )
    assert report["output"] == str(out) and report["tokens"] > 32
    return out


def test_encode_decode_gives_the_models_exact_kv(encoded, llama, tmp_path):
    out = tmp_path / "kv.safetensors"
    run("decode", encoded, "-o", out)
    lm = load_model(str(llama), device="cpu")
    exact = kvc.prefill(lm, kvc.tokenize(lm, TEXT))
    with safe_open(out, "pt") as f:
        meta = f.metadata()
        assert json.loads(meta["token_ids"]) == exact.token_ids
        for i, layer in enumerate(exact.layers):
            assert torch.equal(f.get_tensor(f"layers.{i}.key"), layer.key)
            assert torch.equal(f.get_tensor(f"layers.{i}.value"), layer.value)


def test_inspect_and_verify_report_json(encoded, llama):
    info = json.loads(run("inspect", encoded, "--json").stdout)
    assert info["levels"][0]["name"] == "lossless" and info["layers"] == 3 and info["kv_heads"] == [2]
    assert len(info["levels"][0]["layer_bytes"]) == 3
    report = json.loads(run("verify", "--deep", encoded, "--model", llama, "--json").stdout)
    assert report["ok"] and report["levels"]["lossless"]["exact"]


def test_inspect_shows_each_levels_settings():
    fixture = Path(__file__).parent / "data" / "fixtures" / "s3-tiny-llama.kvc"
    text = run("inspect", fixture).stdout.decode()
    assert "scale 0.66 · profile 0af81ff8 · 2 fine tokens (step ÷2)" in text
    assert "byteplanes · zstd level 3" in text and "delta bits 6,5,4" in text
    info = json.loads(run("inspect", fixture, "--json").stdout)
    assert info["levels"][1]["params"]["fine_tokens"] == [16, 294]


def test_stdin_to_stdout_pipeline(llama, tmp_path):
    proc = run("encode", "-", "-o", "-", "--model", llama, "--level", "lossless", stdin=TEXT.encode())
    encoded = proc.stdout
    assert encoded.startswith(b"\x89KVC")
    assert b"it/s" not in proc.stderr and b"Loading weights" not in proc.stderr  # no progress bars in a pipe
    tensors = run("decode", "-", "-o", "-", "--tokens", "4:20", stdin=encoded).stdout
    (tmp_path / "w.safetensors").write_bytes(tensors)
    with safe_open(tmp_path / "w.safetensors", "pt") as f:
        assert f.get_tensor("layers.0.key").shape[1] == 16 and f.metadata()["first_token"] == "4"
    info = json.loads(run("inspect", "-", "--json", stdin=encoded).stdout)
    assert info["tokens"] == len(kvc.open(encoded).token_ids)


def test_folder_input_writes_one_file_per_document(llama, tmp_path):
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "a.txt").write_text(TEXT)
    (docs / "sub" / "b.txt").write_text(TEXT[:200])
    (docs / "skip.md").write_text("not matched by the glob")
    report = json.loads(
        run("encode", docs, "--out-dir", tmp_path / "out", "--model", llama, "--level", "lossless", "--json").stdout
    )
    rows = report["documents"]
    assert sorted(r["output"] for r in rows) == [str(tmp_path / "out" / "a.kvc"), str(tmp_path / "out/sub/b.kvc")]
    assert report["summary"]["encoded"] == 2 and report["summary"]["failed"] == 0


def test_dataset_input(llama, tmp_path):
    rows = tmp_path / "corpus.jsonl"
    rows.write_text("\n".join(json.dumps({"text": TEXT[: 100 * (i + 1)], "id": i}) for i in range(3)))
    report = json.loads(
        run(
            "encode", "--dataset", rows, "--out-dir", tmp_path / "o", "--model", llama, "--level", "lossless", "--json"
        ).stdout
    )
    assert len(report["documents"]) == 3 and all(os.path.exists(r["output"]) for r in report["documents"])
    one_line_error(
        run("encode", "--dataset", rows, "--text-field", "body", "--model", llama, check_rc=None), 2, "no column 'body'"
    )


def test_bad_inputs_fail_with_one_line(encoded, llama, tiny_model_dirs, tmp_path):
    one_line_error(run("inspect", tmp_path / "missing.kvc", check_rc=None), 2, "no such file")
    (tmp_path / "text.kvc").write_text("just some text, not a cache")
    one_line_error(run("verify", tmp_path / "text.kvc", check_rc=None), 3, "not a .kvc file")
    data = encoded.read_bytes()
    for name, blob in [
        ("truncated", data[: len(data) // 2]),
        ("flipped", data[:-100] + bytes([data[-100] ^ 1]) + data[-99:]),
    ]:
        path = tmp_path / f"{name}.kvc"
        path.write_bytes(blob)
        for command in (("verify", path), ("decode", path, "-o", tmp_path / "x.safetensors")):
            one_line_error(run(*command, check_rc=None), 3, "corrupt" if name == "flipped" else "truncated")
        assert not (tmp_path / "x.safetensors").exists()
    newer = bytearray(data)
    newer[8] = 9
    (tmp_path / "newer.kvc").write_bytes(bytes(newer))
    one_line_error(run("inspect", tmp_path / "newer.kvc", check_rc=None), 4, "upgrade kvc")
    one_line_error(
        run("verify", "--deep", encoded, "--model", tiny_model_dirs["gpt2"], check_rc=None), 5, "model mismatch"
    )
    one_line_error(run("decode", encoded, "-o", tmp_path / "y.st", "--tokens", "5:1", check_rc=None), 2, "outside")
    one_line_error(run("encode", tmp_path / "nope.txt", "-o", tmp_path / "z.kvc", check_rc=None), 2, "no such file")


def test_deep_verify_catches_an_unfaithful_file(llama, tmp_path):
    lm = load_model(str(llama), device="cpu")
    kv = kvc.prefill(lm, kvc.tokenize(lm, TEXT))
    kv.layers[1].value[0, 3, 0] += 1.0  # well-formed, checksummed, and wrong
    path = tmp_path / "wrong.kvc"
    kvc.save(path, kvc.encode_kv(kv, kvc.api.model_identity(lm), prefill_info={"slice_tokens": 512}))
    run("verify", path)  # intact...
    one_line_error(
        run("verify", "--deep", path, "--model", llama, check_rc=None), 6, "deep lossless"
    )  # ...not faithful


def test_a_killed_encode_leaves_nothing_behind(tmp_path):
    model = build_tiny_model("llama", tmp_path / "m")
    (tmp_path / "long.txt").write_text(TEXT * 40)
    target = tmp_path / "out" / "long.kvc"
    (tmp_path / "out").mkdir()
    proc = subprocess.Popen(
        [
            KVC,
            "encode",
            tmp_path / "long.txt",
            "-o",
            target,
            "--model",
            model,
            "--level",
            "lossless",
            "--slice-tokens",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(8)
    assert proc.poll() is None, "encode finished before it could be killed; make the input longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list((tmp_path / "out").iterdir()) == []


def test_help_has_examples():
    for command in ("encode", "decode", "inspect", "verify"):
        assert "Examples" in run(command, "--help").stdout.decode()


def test_truncate_keeps_the_head_and_names_the_source(llama, tmp_path):
    doc = tmp_path / "long.txt"
    doc.write_text(TEXT)
    one_line_error(
        run("encode", doc, "-o", tmp_path / "a.kvc", "--model", llama, "--max-tokens", "30", check_rc=None),
        2,
        "over --max-tokens 30",
    )
    report = json.loads(
        run(
            "encode",
            doc,
            "-o",
            tmp_path / "a.kvc",
            "--model",
            llama,
            "--max-tokens",
            "30",
            "--truncate",
            "--level",
            "lossless",
            "--json",
        ).stdout
    )
    assert report["tokens"] == 30
    assert kvc.open(tmp_path / "a.kvc").header["context"]["source"] == str(doc.resolve())


def test_documents_past_the_models_context_are_refused(tiny_model_dirs, tmp_path):
    gpt2 = tiny_model_dirs["gpt2"]  # n_positions (its max_position_embeddings) is 1024
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "short.txt").write_text(TEXT)
    (docs / "long.txt").write_text(TEXT * 6)  # about 1150 tokens
    one_line_error(run("encode", docs / "long.txt", "-o", tmp_path / "a.kvc", "--model", gpt2, "-l", "lossless",
                       check_rc=None), 2, "long.txt: the document has ")  # fmt: skip
    assert "over the model's context length 1024" in run("encode", docs / "long.txt", "-o", tmp_path / "a.kvc",
                                                         "--model", gpt2, check_rc=2).stderr.decode()  # fmt: skip
    assert not (tmp_path / "a.kvc").exists()
    proc = run("encode", docs, "--out-dir", tmp_path / "out", "--model", gpt2, "-l", "lossless", "--json", check_rc=8)
    rows = {os.path.basename(r["source"]): r for r in json.loads(proc.stdout)["documents"]}
    assert rows["short.txt"]["status"] == "ok"
    assert rows["long.txt"]["status"] == "failed" and "context length 1024" in rows["long.txt"]["error"]
    assert not (tmp_path / "out" / "long.kvc").exists()


def test_outputs_that_are_not_where_a_file_can_go_are_refused(encoded, llama, tmp_path):
    doc = tmp_path / "f.txt"
    doc.write_text(TEXT[:100])
    one_line_error(run("encode", doc, "-o", f"{tmp_path}/newdir/", "--model", llama, check_rc=None), 2,
                   "newdir/ names a folder: give a file name")  # fmt: skip
    one_line_error(run("decode", encoded, "-o", f"{tmp_path}/x.dir/", check_rc=None), 2, "x.dir/ names a folder")
    assert not (tmp_path / "newdir").exists() and not (tmp_path / "x.dir").exists()
    (tmp_path / "afile").write_text("a file, not a folder")
    for out_dir in ("afile", "afile/sub"):
        one_line_error(run("encode", doc, "--out-dir", tmp_path / out_dir, "--model", llama, check_rc=None), 2,
                       f"{tmp_path / 'afile'} is not a folder")  # fmt: skip


def test_human_lines_are_written_through_at_once(monkeypatch):
    """A batch's document lines (Output.line) reach a pipe when written, not when the process ends."""
    import sys

    from kvc.cli._output import Output

    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    with open(write_end, "w", encoding="utf-8") as pipe:  # a buffered text stream, as sys.stdout is on a pipe
        monkeypatch.setattr(sys, "stdout", pipe)
        Output().line("doc.txt → doc.kvc: ok")
        assert os.read(read_end, 1000).decode() == "doc.txt → doc.kvc: ok\n"  # still open: nothing flushed it
    os.close(read_end)
