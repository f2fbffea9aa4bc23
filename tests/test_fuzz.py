"""The hostile-file fuzzer (bench/fuzz.py) in CI: a bounded number of forged files, every one in a
worker process with a per-case time limit and memory measurement. Any exception that is not kvc's
own, hang, crash, allocation over the bound or forged data passing verify --deep fails the test and
prints each failing seed (replay: `.venv/bin/python bench/fuzz.py --seed S --cases 1 --replay`).

KVC_FUZZ_SEED / KVC_FUZZ_CASES override the seed and the number of cases (default 1,000, about a
minute on two shared cores)."""

from __future__ import annotations

import os

from bench import fuzz

SEED = int(os.environ.get("KVC_FUZZ_SEED", "20261125"))
CASES = int(os.environ.get("KVC_FUZZ_CASES", "1000"))


def test_fuzz_hostile_files(tmp_path_factory, tiny_model_dirs):
    folder = fuzz.build_fixtures(tmp_path_factory.mktemp("fuzz"), model_dirs=tiny_model_dirs)
    summary = fuzz.run(SEED, CASES, workers=2, fixtures=folder, timeout=60.0, progress=False)
    failures = summary["failures"]
    assert not failures, "\n".join(
        f"seed={f['seed']} [{f.get('family')}/{f.get('fixture')}] {f['failure']}" for f in failures
    )
    total = summary["total"]
    assert total["cases"] == CASES and total["hangs"] == 0 and total["crashes"] == 0
    assert set(summary["by_family"]) == set(fuzz.FAMILIES)
    assert set(summary["by_fixture"]) == set(fuzz.FIXTURES)
    # forged data did reach the decoders, and every piece of it was caught
    assert total["decoded_forged_data"] > 0
    assert total["deep_caught"] == total["decoded_forged_data"]
    assert total["max_peak_over_bound"] <= 1.0
