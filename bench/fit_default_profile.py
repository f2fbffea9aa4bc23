"""Reproduce the shipped default profile: ``.venv/bin/python bench/fit_default_profile.py``.

Fits on ``calibration_essays()`` only (never the evaluation essays) and writes
``codec/profiles/smollm2-135m.kvcp``; same inputs and seed give the same bytes on one platform."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from kvc.codec.profile import default_progress, fit_profile
from kvc.runtime.loading import load_model
from kvc.samples import calibration_essays, essay_text

OUT = Path(__file__).resolve().parents[1] / "codec" / "profiles" / "smollm2-135m.kvcp"


def _plain(stage: str, done: int, total: int) -> None:
    if done == total or done % max(1, total // 10) == 0:
        print(f"{stage} {done}/{total} {time.strftime('%H:%M:%S')}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    t = time.time()
    lm = load_model(None, device="cpu")
    texts = [essay_text(n) for n in calibration_essays()]
    prof = fit_profile(lm, texts, on_progress=default_progress() or _plain)
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else OUT
    prof.save(out)
    print(f"{out}: {len(prof.to_bytes())} bytes, sha256 {prof.sha256}, {time.time() - t:.0f} s")
