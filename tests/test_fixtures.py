"""Committed reference files of every format version still decode, bit for bit.

Each ``tests/data/fixtures/NAME.kvc`` was written by the kvc of its day
(``tests/data/fixtures/make_fixture.py``); ``NAME.json`` holds the SHA-256 of what each of its
levels decoded to then. A change that makes an old file decode differently fails here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import kvc
from tests.data.fixtures.make_fixture import digest

FIXTURES = Path(__file__).parent / "data" / "fixtures"
NAMES = sorted(p.stem for p in FIXTURES.glob("*.kvc"))


def test_there_is_a_fixture_per_kvq_segment_version_and_format_version():
    # v1-/v2-: kvq segment versions 1 and 2 (container 1.0); f12-: container 1.2, payloads level-major;
    # f13-: container 1.3, payloads carry XXH3-128 beside SHA-256;
    # p2-: a profile of version 2 (per-coefficient steps); p3-: version 3 (a tiny Gemma 3: sliding-window
    # layers, a rotary base per layer); p4-: version 4 (coefficients mixed across heads); s3-: kvq segment
    # version 3 (a profile with fine tokens: segments list their finer rows); c5-: version 5 (each layer
    # predicted from the one before, CODEC.md step 3c); the others embed version-1 profiles
    assert {"v1-tiny-llama", "v2-tiny-llama", "f12-tiny-llama", "f13-tiny-llama", "p2-tiny-llama",
            "p3-tiny-gemma3", "p4-tiny-llama", "s3-tiny-llama", "c5-tiny-llama"} <= set(NAMES)
    with kvc.open(FIXTURES / "s3-tiny-llama.kvc") as f:
        from kvc.codec import kvq_segment

        assert f.header["levels"]["balanced"]["params"]["fine_shift"] == 1
        payloads = [p for _, p in f._container.payloads(list(range(len(f.header["chunks"]))), "balanced")]
        assert {kvq_segment.read_head(p[:4])[0] for p in payloads} == {3}
    with kvc.open(FIXTURES / "f12-tiny-llama.kvc") as f:
        assert f.version == (1, 2) and f.header.get("payload_order") == "level"
        assert all("xxh3_128" not in e for c in f.header["chunks"] for e in c["encodings"])
    with kvc.open(FIXTURES / "f13-tiny-llama.kvc") as f:
        assert f.version == (1, 3) and f.header.get("payload_order") == "level"
        assert all("xxh3_128" in e and "sha256" in e for c in f.header["chunks"] for e in c["encodings"])
    versions = (("f12-tiny-llama", 1), ("f13-tiny-llama", 1), ("p2-tiny-llama", 2), ("p3-tiny-gemma3", 3),
                ("p4-tiny-llama", 4), ("c5-tiny-llama", 5))
    for name, version in versions:
        with kvc.open(FIXTURES / f"{name}.kvc") as f:
            assert f._codec("balanced").profile.version == version, name


@pytest.mark.parametrize("name", NAMES)
def test_fixture_decodes_bit_exactly(name):
    expected = json.loads((FIXTURES / f"{name}.json").read_text())
    with kvc.open(FIXTURES / f"{name}.kvc") as f:
        for level in f.levels:
            kv = f.read(level)
            for i, layer in enumerate(kv.layers):
                assert digest(layer.key) == expected[f"{level}.{i}.key"], (level, i)
                assert digest(layer.value) == expected[f"{level}.{i}.value"], (level, i)


@pytest.mark.parametrize("name", NAMES)
def test_fixture_window_reads_match_whole_reads(name):
    with kvc.open(FIXTURES / f"{name}.kvc") as f:
        for level in f.levels:
            whole = f.read(level)
            part = f.read(level, tokens=(100, 260))
            for a, b in zip(whole.layers, part.layers):
                assert (a.key[:, 100 - a.start : 260 - a.start] == b.key).all()
