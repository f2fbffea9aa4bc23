"""The contract the `kvc` command keeps with shells, pipelines and people (issues 7, 11 and 12), tested on
the real executable in subprocesses: usage errors and help, exit codes, signals, closed pipes, file
modes, dtypes, sizes in words, the eval tables, profiles, the GGUF conversion notice, lazy imports."""

from __future__ import annotations

import json
import os
import pty
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import kvc
from tests.conftest import KVC, REPO
from tests.test_cli import TEXT, one_line_error, run
from tests.tiny_models import _tokenizer


def kvc_proc(*args, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [KVC, *map(str, args)],
        capture_output=True,
        timeout=300,
        env={**os.environ, "KVC_DEBUG": "", **(env or {})},
        **kwargs,
    )


def wait_for(condition, what: str, limit: float = 180.0) -> None:
    """Poll until ``condition()`` holds; the limit only guards against a hung test."""
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def llama(tiny_model_dirs) -> Path:
    return tiny_model_dirs["llama"]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("contract")


@pytest.fixture(scope="module")
def doc(work) -> Path:
    path = work / "doc.txt"
    path.write_text(TEXT * 10)
    return path


@pytest.fixture(scope="module")
def lossless(work, doc, llama) -> Path:
    out = work / "doc.kvc"
    run("encode", doc, "-o", out, "--model", llama, "--level", "lossless")
    return out


@pytest.fixture(scope="module")
def user_profile(work, llama) -> Path:
    """A profile fitted by `kvc profile` and kept out of every search path: only --profile finds it."""
    (work / "cal.txt").write_text(TEXT * 3)
    out = work / "mine.kvcp"
    run("profile", work / "cal.txt", "--model", llama, "--tokens", "96", "-o", out)
    return out


@pytest.fixture(scope="module")
def two_levels(work, doc, llama, user_profile) -> tuple[Path, dict]:
    out = work / "two.kvc"
    report = json.loads(
        run(
            "encode", doc, "-o", out, "--model", llama, "-l", "lossless", "-l", "balanced",
            "--profile", user_profile, "--json",
        ).stdout
    )  # fmt: skip
    return out, report


# ---- 1. usage errors, help, version, completion ----------------------------------------------------


def test_usage_errors_are_one_line_and_exit_2():
    for args, fragment in [
        (["nosuch"], "no such command 'nosuch' (see 'kvc --help')"),
        (["encode", "--nosuch"], "no such option: --nosuch (see 'kvc encode --help')"),
        (["decode"], "missing argument"),
        (["encode", "--chunk-tokens", "x", "a.txt"], "invalid value for '--chunk-tokens'"),
        (["inspect", "a.kvc", "b.kvc"], "unexpected extra argument"),
    ]:
        proc = kvc_proc(*args)
        err = proc.stderr.decode()
        assert proc.returncode == 2, err
        assert err.startswith("kvc: error: ") and err.count("\n") == 1 and fragment in err, err
        assert "internal error" not in err and not proc.stdout


def test_help_version_and_bare_kvc():
    for args in (["-h"], ["--help"]):
        proc = kvc_proc(*args)
        assert proc.returncode == 0 and proc.stdout.startswith(b"Usage: kvc") and not proc.stderr
        for command in ("encode", "decode", "inspect", "verify", "eval", "profile"):
            assert command.encode() in proc.stdout
    assert kvc_proc("decode", "-h").stdout.startswith(b"Usage: kvc decode")
    version = kvc_proc("--version")
    assert version.returncode == 0 and version.stdout.decode() == f"kvc {kvc.__version__}\n"
    bare = kvc_proc()
    assert bare.returncode == 0 and bare.stdout.startswith(b"Usage: kvc") and not bare.stderr


def _under_bash(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    """``kvc args`` with a bash parent that stays alive ("; exit $?" keeps bash from exec'ing it): typer
    finds the shell by walking the process tree (shellingham), whatever argument it is given, as it
    would from a user's terminal; a detached test runner may have no shell above it."""
    return subprocess.run(["bash", "-c", '"$@"; exit $?', "bash", KVC, *map(str, args)], capture_output=True,
                          timeout=300, env={**os.environ, "SHELL": "/bin/bash", **(env or {})})  # fmt: skip


def test_shell_completion(tmp_path):
    script = _under_bash("--show-completion", "bash")
    assert script.returncode == 0 and b"_KVC_COMPLETE=complete_bash" in script.stdout
    words = kvc_proc(env={"_KVC_COMPLETE": "complete_bash", "COMP_WORDS": "kvc enc", "COMP_CWORD": "1"})
    assert words.returncode == 0 and words.stdout.split() == [b"encode"]
    options = kvc_proc(env={"_KVC_COMPLETE": "complete_bash", "COMP_WORDS": "kvc decode --to", "COMP_CWORD": "2"})
    assert b"--tokens" in options.stdout.split()
    installed = _under_bash("--install-completion", "bash", env={"HOME": str(tmp_path)})
    assert installed.returncode == 0, installed.stderr
    assert "kvc" in (tmp_path / ".bashrc").read_text()


# ---- 2. dtype: recorded, reused, named --------------------------------------------------------------


def test_a_bf16_file_is_verified_and_evaluated_in_bf16(work, doc, llama):
    fp32, bf16 = work / "fp32.kvc", work / "bf16.kvc"
    run("encode", doc, "-o", fp32, "--model", llama, "--level", "lossless")
    report = json.loads(
        run("encode", doc, "-o", bf16, "--model", llama, "--level", "lossless", "--dtype", "bf16", "--json").stdout
    )
    header = kvc.open(bf16).header
    assert report["dtype"] == header["dtype"] == header["prefill"]["dtype"] == header["model"]["dtype"] == "bfloat16"
    assert kvc.open(fp32).header["prefill"]["dtype"] == "float32"
    # lossless stores the cache's own dtype: half the bytes of float32 (zstd does a little differently on each)
    assert 0.3 < bf16.stat().st_size / fp32.stat().st_size < 0.7
    deep = json.loads(run("verify", "--deep", bf16, "--json").stdout)  # no --dtype: the file's is used
    # torch's bf16 attention on CPU is not deterministic (1 prefill in ~20 differs by an ulp): verify says so
    # and holds the file to bf16's precision, not to exact bytes
    assert deep["ok"] and not deep["same_environment"] and "not deterministic" in deep["environment_differs"]
    assert deep["levels"]["lossless"]["relative_rmse"] < 0.0078
    ev = json.loads(run("eval", bf16, "--repeat", "1", "--continuation-tokens", "16", "--json").stdout)
    # 1.0 but for the ulps of bf16 attention on CPU, which is not deterministic
    assert ev["model"]["dtype"] == "bfloat16" and abs(ev["aggregate"]["lossless"]["perplexity_ratio"] - 1.0) < 1e-3
    one_line_error(run("verify", "--deep", bf16, "--dtype", "fp32", check_rc=None), 5, "pass --dtype bfloat16")
    one_line_error(run("verify", "--deep", bf16, "--dtype", "fp12", check_rc=None), 2, "unknown dtype 'fp12'")


def test_auto_dtype_is_the_checkpoints(work, doc, llama):
    from transformers import AutoModelForCausalLM

    folder = work / "llama-bf16"
    AutoModelForCausalLM.from_pretrained(llama).to("cpu").bfloat16().save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    out = work / "ckpt.kvc"
    report = json.loads(run("encode", doc, "-o", out, "--model", folder, "--level", "lossless", "--json").stdout)
    assert report["dtype"] == "bfloat16"
    assert json.loads(run("verify", "--deep", out, "--json").stdout)["ok"]


def _kernels_under(env: dict, dtype: str) -> str:
    code = f"import torch; from kvc.runtime.kernels import kernel_fingerprint; print(kernel_fingerprint(torch.{dtype}))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300,
                          env={**os.environ, **env}).stdout.strip()  # fmt: skip


def test_other_kernels_hold_lossless_to_tolerance_not_exactness(work, doc, llama):
    """float32 GEMMs split their sums by thread count, and oneDNN rounds otherwise under AVX2 than under
    AVX-512 or AMX: a verify whose kernels are not the file's is told so and holds lossless to float
    tolerance; where they are the file's, to exact bytes."""
    out = work / "kernels.kvc"
    run("encode", doc, "-o", out, "--model", llama, "--level", "lossless")
    recorded = kvc.open(out).header["prefill"]["kernels"]
    assert recorded == _kernels_under({}, "float32") and re.fullmatch("[0-9a-f]{16}", recorded)
    other = {"ONEDNN_MAX_CPU_ISA": "AVX2", "OMP_NUM_THREADS": "1"}
    proc = kvc_proc("verify", "--deep", out, "--json", env=other)
    assert proc.returncode == 0, proc.stderr.decode()
    deep = json.loads(proc.stdout)
    if _kernels_under(other, "float32") == recorded:  # a one-core machine without AVX-512: nothing differs
        assert deep["same_environment"] and deep["levels"]["lossless"]["exact"]
    else:
        assert not deep["same_environment"] and "kernels" in deep["environment_differs"]
        assert deep["levels"]["lossless"]["bound"].startswith("relative RMSE < 0.0001")
    same = json.loads(run("verify", "--deep", out, "--json").stdout)
    assert same["same_environment"] and same["levels"]["lossless"]["exact"]


# ---- 3. sizes read the right way round, per level ---------------------------------------------------


def test_sizes_say_smaller_or_larger_per_level(two_levels, lossless):
    path, report = two_levels
    sizes = {s["level"]: s for s in report["sizes"]}
    assert sizes["lossless"]["vs_fp16"].endswith("× larger than fp16")  # a float32 cache, stored exactly
    assert sizes["balanced"]["vs_fp16"].endswith("× smaller than fp16")
    assert sizes["lossless"]["ratio_vs_fp16"] < 1 < sizes["balanced"]["ratio_vs_fp16"]
    assert sum(s["bytes"] for s in report["sizes"]) < report["bytes"]  # the rest is the header
    shown = run("inspect", path).stdout.decode()
    assert re.search(r"lossless .*\d\.\d\d× larger", shown) and re.search(r"balanced .*\d\.\d\d× smaller", shown)
    human = run("inspect", lossless).stdout.decode()
    assert "vs fp16" in human and "× vs fp16" not in human


# ---- 4. the eval tables fit 100 columns; the bar ends at its total --------------------------------


def test_eval_tables_fit_100_columns_and_wide_has_everything(lossless):
    args = ("eval", lossless, "--repeat", "1", "--continuation-tokens", "16", "--bandwidth", "0.1,1,10")
    compact = run(*args).stdout.decode()
    assert "TTFT ms" in compact and "@0.1 Gb/s" in compact and "…" not in compact
    assert max(len(line) for line in compact.splitlines()) <= 100
    wide = run(*args, "--wide").stdout.decode()
    header = next(line for line in wide.splitlines() if "decode" in line and "@10 Gb/s" in line)
    assert len(header) > 100 and "…" not in wide


def _stderr_on_a_terminal(*args) -> str:
    """Run kvc with stderr on a pseudo-terminal (so progress bars draw) and return what it drew."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([KVC, *map(str, args)], stdout=subprocess.DEVNULL, stderr=slave, stdin=subprocess.DEVNULL)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(timeout=300) == 0
    return b"".join(chunks).decode(errors="replace")


def test_eval_progress_ends_at_its_total(lossless):
    drawn = _stderr_on_a_terminal("eval", lossless, "--repeat", "1", "--continuation-tokens", "16")
    counts = [(int(a), int(b)) for a, b in re.findall(r"replay\S*\s.*?(\d+)/(\d+)", drawn)]
    assert counts, drawn
    assert all(done <= total for done, total in counts), counts
    assert counts[-1][0] == counts[-1][1] == 2 + 1 + 1  # exact, text, one level, one timing repeat


# ---- 5. --profile for eval; a missing profile is exit 7 everywhere -------------------------------


def test_levels_made_with_a_users_profile(two_levels, user_profile):
    path, _ = two_levels
    one_line_error(run("verify", path, check_rc=None), 7, "pass --profile")
    one_line_error(run("eval", path, "--level", "balanced", "--repeat", "1", check_rc=None), 7, "pass --profile")
    assert json.loads(run("verify", path, "--profile", user_profile, "--json").stdout)["ok"]
    doc = json.loads(
        run(
            "eval", path, "--profile", user_profile, "--level", "balanced", "--repeat", "1",
            "--continuation-tokens", "16", "--json",
        ).stdout
    )  # fmt: skip
    assert [m["mode"] for m in doc["contexts"][0]["modes"]] == ["text", "exact", "balanced"]


# ---- 6. files respect the umask ----------------------------------------------------------------------


def test_written_files_respect_the_umask(work, doc, llama, lossless, tmp_path):
    def made_with(mask: int, *args) -> int:
        proc = subprocess.run([KVC, *map(str, args)], capture_output=True, timeout=300, umask=mask)
        assert proc.returncode == 0, proc.stderr.decode()
        return os.stat(args[args.index("-o") + 1]).st_mode & 0o777

    assert made_with(0o022, "encode", doc, "-o", tmp_path / "a.kvc", "--model", llama, "-l", "lossless") == 0o644
    assert made_with(0o077, "encode", doc, "-o", tmp_path / "b.kvc", "--model", llama, "-l", "lossless") == 0o600
    assert made_with(0o002, "decode", lossless, "-o", tmp_path / "kv.safetensors") == 0o664
    (tmp_path / "cal.txt").write_text(TEXT)
    assert (
        made_with(0o022, "profile", tmp_path / "cal.txt", "--model", llama, "--tokens", "32", "-o", tmp_path / "p.kvcp")
        == 0o644
    )


# ---- 7. the first GGUF conversion says so, once --------------------------------------------------


def build_tiny_gguf(path: Path) -> Path:
    """A real GGUF (llama, two layers, byte-level BPE tokenizer) small enough to convert in a second."""
    import gguf
    import numpy as np

    spec = json.loads(_tokenizer().backend_tokenizer.to_str())
    tokens = [t for t, _ in sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    vocab, hidden, ffn, layers, heads, kv_heads = len(tokens), 64, 128, 2, 4, 2
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(layers)
    w.add_context_length(8192)  # the tests' documents (up to ~2k tokens) fit
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_rope_dimension_count(hidden // heads)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in ("<unk>", "<s>", "</s>") else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    rng = np.random.default_rng(0)
    kv_dim = kv_heads * hidden // heads

    def tensor(name: str, *shape: int) -> None:
        data = rng.standard_normal(shape) * 0.05 if len(shape) > 1 else np.ones(shape)
        w.add_tensor(name, data.astype(np.float32))

    tensor("token_embd.weight", vocab, hidden)
    tensor("output_norm.weight", hidden)
    tensor("output.weight", vocab, hidden)
    for i in range(layers):
        for name, shape in [
            ("attn_norm", (hidden,)), ("ffn_norm", (hidden,)), ("attn_q", (hidden, hidden)),
            ("attn_k", (kv_dim, hidden)), ("attn_v", (kv_dim, hidden)), ("attn_output", (hidden, hidden)),
            ("ffn_gate", (ffn, hidden)), ("ffn_up", (ffn, hidden)), ("ffn_down", (hidden, ffn)),
        ]:  # fmt: skip
            tensor(f"blk.{i}.{name}.weight", *shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_the_first_gguf_conversion_says_so_once(tmp_path, doc):
    model = build_tiny_gguf(tmp_path / "tiny.gguf")
    env = {"KVC_CACHE_DIR": str(tmp_path / "cache")}
    first = kvc_proc("encode", doc, "-o", tmp_path / "a.kvc", "--model", model, "-l", "lossless", "--json", env=env)
    assert first.returncode == 0, first.stderr.decode()
    lines = first.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvc: first use of tiny.gguf: converting it once"), lines
    assert json.loads(first.stdout)["dtype"] == "float32"  # a GGUF's default: its exact dequantisation
    again = kvc_proc("encode", doc, "-o", tmp_path / "b.kvc", "--model", model, "-l", "lossless", env=env)
    assert again.returncode == 0 and not again.stderr


# ---- 8. -o with --out-dir; unknown essays; the default level in --help ------------------------------


def test_conflicting_or_unknown_inputs_are_named(doc, tmp_path):
    one_line_error(run("encode", doc, "-o", tmp_path / "a.kvc", "--out-dir", tmp_path, check_rc=None), 2, "not both")
    proc = run("encode", "--essay", "nosuch.txt", "-o", tmp_path / "e.kvc", check_rc=None)
    one_line_error(proc, 2, "no sample essay named 'nosuch.txt'")
    err = proc.stderr.decode()
    assert "addiction.txt" in err and "site-packages" not in err
    assert not list(tmp_path.glob("*.kvc"))


def test_encode_help_names_the_default_level_and_defaults():
    from kvc.codec.levels import DEFAULT_LEVEL
    from kvc.codec.registry import level_names
    from kvc.defaults import DEFAULT_CHUNK_TOKENS, DEFAULT_SLICE_TOKENS

    text = " ".join(run("encode", "--help").stdout.decode().split())
    assert f"Default: {DEFAULT_LEVEL} when the model has a profile" in text
    assert all(name in text for name in level_names())
    assert f"[default: {DEFAULT_CHUNK_TOKENS}]" in text and f"[default: {DEFAULT_SLICE_TOKENS}]" in text


# ---- 9. the docs quote the level that is registered --------------------------------------------------


def test_docs_quote_the_registered_cachegen_level(work, doc, llama, user_profile):
    out = work / "cg.kvc"
    run("encode", doc, "-o", out, "--model", llama, "-l", "cachegen", "--profile", user_profile)
    params = kvc.open(out).header["levels"]["cachegen"]["params"]
    bits = "/".join(str(b) for b in dict.fromkeys(params["delta_bits"]))  # layers in thirds: e.g. 6/5/4
    codec_md = (REPO / "docs" / "CODEC.md").read_text()
    row = next(line for line in codec_md.splitlines() if line.startswith(f"| CacheGen {bits} bits"))
    ratio, kl = float(row.split("|")[3]), float(row.split("|")[4])
    readme_row = next(line for line in (REPO / "README.md").read_text().splitlines() if line.startswith("| `cachegen`"))
    assert f"{bits} bits" in readme_row and f"{ratio:.1f}× smaller" in readme_row and f"KL {kl:.4f}" in readme_row
    ladder = next(line for line in codec_md.splitlines() if line.startswith("| `cachegen`"))
    assert f"{ratio:.2f}×" in ladder and f"KL {kl:.5f}" in ladder


# ---- 10. inspect says it did not read the payloads --------------------------------------------------


def test_inspect_says_payloads_were_not_checked(lossless, tmp_path):
    data = bytearray(lossless.read_bytes())
    data[-100] ^= 1  # inside the last chunk's payload
    damaged = tmp_path / "damaged.kvc"
    damaged.write_bytes(bytes(data))
    shown = run("inspect", damaged)
    assert "not the payloads" in shown.stdout.decode()
    assert json.loads(run("inspect", damaged, "--json").stdout)["payloads_checked"] is False
    one_line_error(run("verify", damaged, check_rc=None), 3, "checksum mismatch")


# ---- issue 11: closed pipes and signals --------------------------------------------------------------


def _pipestatus(script: str, folder: Path) -> tuple[list[int], str]:
    """Run a bash pipeline; the exit status of each of its commands, and its stderr."""
    status = folder / "pipestatus"
    proc = subprocess.run(
        ["bash", "-c", f"{script}; echo \"${{PIPESTATUS[@]}}\" > '{status}'"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        timeout=300,
        env={**os.environ, "KVC_DEBUG": ""},
    )
    return [int(c) for c in status.read_text().split()], proc.stderr.decode()


def test_a_closed_downstream_pipe_ends_quietly(lossless, tmp_path):
    size = len(kvc.to_safetensors(kvc.open(lossless), kvc.open(lossless).read("lossless"), "lossless"))
    assert size > 1 << 20  # far more than a pipe buffers, so the reader's exit is seen
    for reader in ("head -c 10 >/dev/null", "true"):
        codes, err = _pipestatus(f"'{KVC}' decode '{lossless}' -o - | {reader}", tmp_path)
        assert codes[0] == 141 and err == "", (reader, codes, err)
    codes, err = _pipestatus(f"'{KVC}' --version | head -c 3 >/dev/null", tmp_path)  # it all fitted: success
    assert codes == [0, 0] and err == ""


def _loaded_torch(pid: int) -> bool:
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to see the child's start-up")
def test_ctrl_c_during_start_up_is_one_line(doc, llama, tmp_path):
    target = tmp_path / "x.kvc"
    proc = subprocess.Popen(
        [KVC, "encode", str(doc), "-o", str(target), "--model", str(llama), "-l", "lossless"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    wait_for(lambda: _loaded_torch(proc.pid) or proc.poll() is not None, "torch to start loading")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err.decode() == "kvc: interrupted\n" and not out, err.decode()
    assert not target.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("signum", "code", "word"), [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")]
)
def test_a_signal_mid_encode_exits_with_one_line_and_no_partial_file(tmp_path, llama, signum, code, word):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text(TEXT)
    (docs / "b.txt").write_text(TEXT * 40)  # one token per prefill step: many seconds of work
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [
            KVC,
            "encode",
            str(docs),
            "--out-dir",
            str(out),
            "--model",
            str(llama),
            "-l",
            "lossless",
            "--slice-tokens",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    wait_for(lambda: (out / "a.kvc").exists() or proc.poll() is not None, "the first document's file")
    assert proc.poll() is None, "encode finished before the signal; make b.txt longer"
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code and stderr.decode() == f"kvc: {word}\n", stderr.decode()
    # the finished document's line went out when it finished, so a log keeps it; no summary follows
    assert [line.split(" → ")[0].rsplit("/", 1)[-1] for line in stdout.decode().splitlines()] == ["a.txt"]
    # complete files stay, with their manifest rows; no temp file, no b.kvc
    assert sorted(p.name for p in out.iterdir()) == ["a.kvc", "kvc-manifest.jsonl"]
    rows = [json.loads(line) for line in (out / "kvc-manifest.jsonl").read_text().splitlines()]
    assert [(r["output"].rsplit("/", 1)[-1], r["status"]) for r in rows] == [("a.kvc", "ok")]
    assert kvc.open(out / "a.kvc").num_tokens > 0


def test_an_interrupted_profile_leaves_the_old_file(tmp_path, llama):
    (tmp_path / "cal.txt").write_text(TEXT * 20)
    target = tmp_path / "p.kvcp"
    target.write_bytes(b"the previous profile")
    proc = subprocess.Popen(
        [KVC, "profile", str(tmp_path / "cal.txt"), "--model", str(llama), "-o", str(target)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    wait_for(lambda: _loaded_torch(proc.pid) or proc.poll() is not None, "torch to start loading")
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143 and stderr.decode() == "kvc: terminated\n"
    assert target.read_bytes() == b"the previous profile"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cal.txt", "p.kvcp"]


# ---- issue 7: commands that need no model do not import transformers ---------------------------------


def test_model_free_commands_do_not_import_transformers(lossless, tmp_path):
    def imported(*args) -> set[str]:
        proc = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "kvc.cli.main", *map(str, args)],
            capture_output=True,
            timeout=300,
            cwd=tmp_path,
        )
        assert proc.returncode == 0, proc.stderr.decode()[-2000:]
        return {
            m.group(1).split(".")[0]
            for m in re.finditer(r"^import time:\s+\d+ \|\s+\d+ \|\s+(\S+)$", proc.stderr.decode(), re.M)
        }

    for args in (["--help"], ["--version"], ["inspect", lossless]):  # inspect reads the header only
        modules = imported(*args)
        assert "kvc" in modules and not modules & {"torch", "transformers", "numba"}, args
    for args in (
        ["verify", lossless],
        ["decode", lossless, "-o", tmp_path / "kv.safetensors", "--tokens", "0:8"],
    ):
        modules = imported(*args)
        assert "torch" in modules and "transformers" not in modules, args
