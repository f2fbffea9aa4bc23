"""kvc against a real S3-compatible server: moto's standalone server (what s3fs's own tests use),
started on 127.0.0.1 by this module, spoken to by s3fs over HTTP. Inputs, outputs, the manifest and
every reading command by s3:// URL."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from tests.test_cli import TEXT, run

pytest.importorskip("s3fs")
pytest.importorskip("moto")
pytestmark = pytest.mark.s3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    port = _free_port()
    log = open(tmp_path_factory.mktemp("moto") / "server.log", "wb")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:  # bounded: the server answers within seconds or the test fails
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                pytest.fail("moto server did not start")
            time.sleep(0.2)
    env = {"KVC_S3_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)
    fs.mkdir("kvc-test")
    try:
        yield fs
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def llama(tiny_model_dirs):
    return tiny_model_dirs["llama"]


def test_a_corpus_from_s3_to_s3_and_every_reader_by_url(s3, llama, tmp_path):
    for i in range(3):
        s3.pipe(f"kvc-test/docs/d{i}.txt", TEXT[: 80 * (i + 1)].encode())
    s3.pipe("kvc-test/docs/sub/empty.txt", b"")
    proc = run("encode", "s3://kvc-test/docs", "--out-dir", "s3://kvc-test/caches", "--model", llama, "-l",
               "lossless", "--json", check_rc=8)  # fmt: skip
    report = json.loads(proc.stdout)
    assert report["summary"]["encoded"] == 3 and [f["source"] for f in report["summary"]["failures"]] == [
        "s3://kvc-test/docs/sub/empty.txt"]  # fmt: skip
    names = ["d0.kvc", "d1.kvc", "d2.kvc", "kvc-manifest.jsonl"]
    assert sorted(s3.ls("kvc-test/caches", detail=False)) == [f"kvc-test/caches/{n}" for n in names]
    rows = [json.loads(line) for line in s3.cat("kvc-test/caches/kvc-manifest.jsonl").decode().splitlines()]
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "failed"]
    url = "s3://kvc-test/caches/d2.kvc"
    assert json.loads(run("inspect", url, "--json").stdout)["tokens"] == rows[2]["tokens"]
    assert json.loads(run("verify", url, "--deep", "--model", llama, "--json").stdout)["ok"]
    run("decode", url, "-o", tmp_path / "kv.safetensors", "--tokens", "0:8")
    assert json.loads(run("eval", url, "--model", llama, "--continuation-tokens", "16", "--json").stdout)
    assert (tmp_path / "kv.safetensors").stat().st_size > 0
    again = json.loads(run("encode", "s3://kvc-test/docs", "--out-dir", "s3://kvc-test/caches", "--model", llama,
                           "-l", "lossless", "--json", check_rc=8).stdout)  # fmt: skip
    assert again["summary"]["unchanged"] == 3


def test_a_failed_upload_leaves_no_object(s3):
    from kvc.batch import storage

    with pytest.raises(RuntimeError):
        with storage.atomic_writer("s3://kvc-test/partial/x.kvc") as f:
            f.write(b"x" * (6 << 20))  # past s3fs's 5 MiB block: a multipart upload is under way
            raise RuntimeError("the encoder died")
    assert not s3.exists("kvc-test/partial/x.kvc")
    storage.write_bytes("s3://kvc-test/partial/y.kvc", b"whole")
    assert s3.cat("kvc-test/partial/y.kvc") == b"whole"


def test_a_dataset_file_by_url(s3, llama):
    s3.pipe("kvc-test/rows.jsonl", "\n".join(json.dumps({"text": TEXT[: 50 * (i + 1)]}) for i in range(3)).encode())
    report = json.loads(run("encode", "--dataset", "s3://kvc-test/rows.jsonl", "--out-dir", "s3://kvc-test/ds",
                            "--model", llama, "-l", "lossless", "--json").stdout)  # fmt: skip
    assert report["summary"]["encoded"] == 3
    assert s3.exists("kvc-test/ds/rows-000002.kvc")
