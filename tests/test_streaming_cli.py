"""`kvc serve` and `kvc ask` as real processes: a rate-limited server on 127.0.0.1, the loader over it, the
answer on stdout, the report on stderr or in JSON, and one-line errors."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import time

import pytest

import kvc
from kvc.runtime.loading import load_model
from tests.conftest import KVC
from tests.test_cli import one_line_error, run

TEXT = "KV caches let a model skip re-reading a long context. Compression makes them cheap to store. " * 5


@pytest.fixture(scope="module")
def folder(tiny_model_dirs, tmp_path_factory):
    lm = load_model(str(tiny_model_dirs["llama"]), device="cpu")
    out = tmp_path_factory.mktemp("served")
    kvc.save(out / "doc.kvc", kvc.encode_tokens(lm, kvc.tokenize(lm, TEXT), chunk_tokens=16))
    return out


@pytest.fixture(scope="module")
def server(folder):
    proc = subprocess.Popen([KVC, "serve", str(folder), "--port", "0", "--rate", "4mbit"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    line = b""
    while not line.endswith(b"\n") and time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if ready:
            line += os.read(proc.stdout.fileno(), 1024)
        assert proc.poll() is None, proc.stderr.read().decode()
    text = line.decode()
    assert text.startswith(f"serving {folder} at http://127.0.0.1:"), text
    url = text.split(" at ")[1].split(" ")[0]
    yield url
    proc.send_signal(signal.SIGINT)
    try:
        assert proc.wait(timeout=20) == 130  # the CLI's contract for Ctrl-C, a server included
    finally:
        if proc.poll() is None:
            proc.kill()


def test_ask_over_http_answers_on_stdout_and_reports_in_json(server):
    proc = run("ask", server + "doc.kvc", "What does a cache skip?", "--max-new-tokens", "5", "--json")
    doc = json.loads(proc.stdout)
    assert isinstance(doc["answer"], str) and doc["question"] == "What does a cache skip?"
    report = doc["report"]
    assert report["mode"] == "fastest" and sum(report["choices"].values()) == len(report["chunks"])
    assert report["ttft_s"] == pytest.approx(report["ready_s"] + report["first_token_s"])
    for key in ("wait_s", "decode_s", "prefill_s", "transfer_s", "header_s", "bytes", "estimates"):
        assert key in report
    assert {"index", "choice", "bytes", "wait_s", "transfer_s", "decode_s", "prefill_s"} <= set(report["chunks"][0])


def test_ask_forced_level_and_text_give_the_same_answer(server):
    by_level = run("ask", server + "doc.kvc", "Why?", "--level", "lossless", "--max-new-tokens", "6")
    by_text = run("ask", server + "doc.kvc", "Why?", "--level", "text", "--max-new-tokens", "6")
    assert by_level.stdout == by_text.stdout and by_level.stdout.strip()
    err = by_level.stderr.decode()
    assert "lossless" in err and "time to first token" in err and "Traceback" not in err
    assert "text" in by_text.stderr.decode()


def test_ask_reads_a_pipe_and_a_local_path(folder, server):
    data = (folder / "doc.kvc").read_bytes()
    piped = run("ask", "-", "Why?", "--level", "lossless", "--max-new-tokens", "6", stdin=data)
    local = run("ask", folder / "doc.kvc", "Why?", "--level", "lossless", "--max-new-tokens", "6")
    remote = run("ask", server + "doc.kvc", "Why?", "--level", "lossless", "--max-new-tokens", "6")
    assert piped.stdout == local.stdout == remote.stdout


def test_ask_and_serve_errors_are_one_line(server, folder):
    one_line_error(run("ask", server + "missing.kvc", "q", check_rc=None), 2, "not found")
    one_line_error(run("ask", server + "doc.kvc", "q", "--level", "tiny", check_rc=None), 2, "no level 'tiny'")
    one_line_error(run("ask", server + "doc.kvc", "q", "--level", "lossless", "--slo", "1", check_rc=None), 2,
                   "does not combine")
    one_line_error(run("serve", folder, "--rate", "fast", check_rc=None), 2, "--rate")
    one_line_error(run("serve", folder / "doc.kvc", check_rc=None), 2, "not a folder")
    for bad in ("nan", "inf", "-1", "0"):  # the socket layer would raise ValueError/OverflowError for these
        one_line_error(run("ask", server + "doc.kvc", "q", "--timeout", bad, check_rc=None), 2, "--timeout")
    for bad in ("nan", "inf", "-5"):  # accepted before, then every response failed
        one_line_error(run("serve", folder, "--latency", bad, check_rc=None), 2, "--latency")
    one_line_error(run("ask", "http://127.0.0.1:99999/doc.kvc", "q", check_rc=None), 2, "port")


def test_eval_link_measures_ttft_through_the_loader(folder, tmp_path):
    proc = run("eval", folder / "doc.kvc", "--link", "0.01,1", "--repeat", "1", "--continuation-tokens", "8",
               "--bandwidth", "", "--json", "--plot", tmp_path / "e.png")
    streamed = json.loads(proc.stdout)["streamed"][0]
    assert {(r["mode"], r["gbit"]) for r in streamed["runs"]} == {
        (m, g) for m in ("text", "lossless", "adaptive") for g in (0.01, 1.0)}
    for r in streamed["runs"]:
        assert r["skipped"] or r["ttft_s"] > 0 and r["report"]["tokens"] == streamed["tokens"]
    assert "lossless" in streamed["crossover_gbit"]
    assert (tmp_path / "e-link-doc.png").stat().st_size > 0


def test_serve_refuses_a_missing_folder(tmp_path):
    one_line_error(run("serve", tmp_path / "nodir", "--port", "0", check_rc=None), 2, "no such folder: ")
