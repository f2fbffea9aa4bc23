"""kvc.batch on a real local Ray cluster (ray.init(num_cpus=2) in this process): the same manifest and
the same verifiable files as a single-process run, and a Ray Dataset as input."""

from __future__ import annotations

import json

import pytest

import kvc
from kvc.batch import encode_corpus
from kvc.formats.container import same_content
from tests.test_batch import _corpus

pytest.importorskip("ray.data")
pytestmark = pytest.mark.ray

_VOLATILE = ("seconds",)


@pytest.fixture(scope="module")
def cluster():
    from kvc.batch.ray import connect

    ray = connect(None, num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def llama(tiny_model_dirs):
    return tiny_model_dirs["llama"]


def _stable(rows: list[dict], root) -> list[dict]:
    return [{k: (v.replace(str(root), "<out>") if k == "output" else v) for k, v in r.items() if k not in _VOLATILE}
            for r in rows]  # fmt: skip


def test_ray_writes_what_one_process_writes(cluster, llama, tmp_path):
    docs = _corpus(tmp_path / "docs")
    local, remote = tmp_path / "local", tmp_path / "ray"
    settings = dict(model=str(llama), levels=["lossless"], max_tokens=256)
    one = encode_corpus([str(docs)], str(local), **settings)
    many = encode_corpus([str(docs)], str(remote), ray=True, ray_workers=2, **settings)
    assert (many.encoded, many.duplicates, many.failed) == (one.encoded, one.duplicates, one.failed) == (5, 1, 3)
    read = lambda d: [json.loads(x) for x in (d / "kvc-manifest.jsonl").read_text().splitlines()]  # noqa: E731
    assert _stable(read(remote), remote) == _stable(read(local), local)
    for path in sorted(local.glob("*.kvc")):
        # byte-identical, but for the kernel fingerprint: each actor has one CPU, so torch one thread
        assert same_content((remote / path.name).read_bytes(), path.read_bytes())
        kvc.open(remote / path.name).read()  # every payload checked against its checksum
    again = encode_corpus([str(docs)], str(remote), ray=True, **settings)
    assert again.unchanged == 6 and again.encoded == 0


def test_a_ray_dataset_as_input(cluster, llama, tmp_path):
    from kvc.batch.ray import encode_ray_dataset

    ds = cluster.data.from_items([{"text": f"Document {i}. " * (i + 3), "name": f"notes/n{i}.txt"} for i in range(4)])
    summary = encode_ray_dataset(ds, str(tmp_path / "out"), source_column="name", model=str(llama),
                                 levels=["lossless"])  # fmt: skip
    assert summary.encoded == 4 and sorted(p.name for p in (tmp_path / "out").glob("*.kvc")) == [
        "n0.kvc", "n1.kvc", "n2.kvc", "n3.kvc"]  # fmt: skip
