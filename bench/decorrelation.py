"""Would a transform across heads, or across layers, pay? A filter in the sensitivity-weighted space.

    .venv/bin/python bench/decorrelation.py [--groups head,xhead,2,3,30] [--contexts apple,legal] [--json PATH]

kvq transforms each (layer, kind, head) on its own (a PCA of 64 coefficients for SmolLM2) and gives each
coefficient a step from the model's sensitivity. Here every coefficient is divided by its profile step
(version 2), so that a uniform step ``s`` in this space is kvq at scale ``s`` and the squared error is the
sensitivity-weighted error the KL follows (to the extent the sensitivity is diagonal). Then a second
orthonormal transform is fitted (PCA on three calibration essays) over a wider group and applied to
held-out contexts: ``xhead`` = the heads of one (layer, kind) together (192 coefficients), ``G`` = G
consecutive layers of one kind with their heads (G·192). Each is quantised with step ``s`` and scored by
the summed per-channel empirical entropy of its symbols (the same optimistic estimate for every row) and
the weighted squared error; ``saved`` is the bits saved against ``head`` at ``head``'s error (log–log
interpolation between the two scales). ``synthesis`` is the decoder's multiply-adds per token against
today's (every kept coefficient times its group width). A filter, not a codec: a real test is a fitted
profile scored by KL."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
SCALES = (0.57, 0.8)


def weighted(lm, prof, ids) -> np.ndarray:
    """The profile's PCA coefficients over their steps, ``[L, 2, H, T', D]``."""
    from kvc.codec.transforms import analysis_matrix, rope_inv_freq, unrotate_keys
    from kvc.runtime.prefill import prefill

    step = prof.component_steps()
    L, _, H, D = step.shape
    S = prof.sinks
    kv = prefill(lm, ids)
    out = np.zeros((L, 2, H, len(ids) - S, D))
    for li, lay in enumerate(kv.layers):
        for k, kind in enumerate(("key", "value")):
            x = getattr(lay, kind)[:, S:].double()
            if k == 0 and prof.rotary is not None:
                x = unrotate_keys(x, S, rope_inv_freq(prof.rotary_theta(li), prof.rotary["dim"]))
            b16 = prof.arrays["basis"][li, k, :, :D, :D]
            mean = torch.from_numpy(prof.arrays["mean"][li, k, :, :D].astype(np.float64))
            c = torch.bmm(x - mean[:, None], torch.from_numpy(analysis_matrix(b16))).numpy()
            out[li, k] = c / step[li, k][:, None, :]
    return out


def groups(w: np.ndarray, mode: str) -> list[np.ndarray]:
    """``[T, n]`` matrices, one per group of coefficients transformed together."""
    L, K, H, T, D = w.shape
    if mode == "head":
        return [w[la, k, h] for la in range(L) for k in range(K) for h in range(H)]
    if mode == "xhead":
        return [w[la, k].transpose(1, 0, 2).reshape(T, H * D) for la in range(L) for k in range(K)]
    g = int(mode)
    return [w[a : a + g, k].transpose(2, 0, 1, 3).reshape(T, -1) for k in range(K) for a in range(0, L, g)]


def fit_rotations(cal: list[np.ndarray], mode: str) -> list[np.ndarray] | None:
    if mode == "head":
        return None
    per = [groups(c, mode) for c in cal]
    rots = []
    for i in range(len(per[0])):
        X = np.concatenate([p[i] for p in per])
        _, V = np.linalg.eigh(X.T @ X / len(X))
        rots.append(V[:, ::-1])
    return rots


def rate_distortion(gs, rots, s: float) -> tuple[float, float, float]:
    """(bits per element, weighted squared error per element, multiply-adds per token of synthesis)."""
    bits = err = 0.0
    n = macs = 0
    for i, g in enumerate(gs):
        y = g if rots is None else g @ rots[i]
        q = np.round(y / s).astype(np.int64)
        err += float(((y - q * s) ** 2).sum())
        n += y.size
        kept = 0
        for col in q.T:
            if col.any():
                kept += 1
                _, counts = np.unique(col, return_counts=True)
                bits += float(-(counts * np.log2(counts / len(col))).sum())
        macs += kept * g.shape[1]
    return bits / n, err / n, macs


def main(argv=None) -> None:
    from rich.console import Console
    from rich.table import Table

    from codec import text_contexts
    from kvc.codec.profile import find_profile
    from kvc.runtime.identity import model_identity
    from kvc.runtime.loading import load_model
    from kvc.runtime.prefill import tokenize
    from kvc.samples import calibration_essays, essay_text

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", default="head,xhead,2,3,30")
    ap.add_argument("--contexts", default="apple,legal", help="essay names (without .txt) or genre names")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    lm = load_model(None, device="cpu")
    prof = find_profile(model_identity(lm), None)
    cal = [weighted(lm, prof, tokenize(lm, essay_text(n))[: args.tokens]) for n in calibration_essays()[:3]]
    tests = []
    for spec in args.contexts.split(","):
        try:
            ids = tokenize(lm, essay_text(spec + ".txt"))[: args.tokens]
        except Exception:  # not an essay: a genre name of bench/codec.py
            _, ids, _ = text_contexts(lm, [spec], args.tokens, 0)[0]
        tests.append((spec, weighted(lm, prof, ids)))
    rows = []
    for mode in args.groups.split(","):
        rots = fit_rotations(cal, mode)
        for name, w in tests:
            pts = [rate_distortion(groups(w, mode), rots, s) for s in SCALES]
            rows.append({"group": mode, "context": name, "points": [
                {"scale": s, "bits": b, "error": e, "macs_per_token": m} for s, (b, e, m) in zip(SCALES, pts)]})
    base = {r["context"]: r["points"][0] for r in rows if r["group"] == "head"}
    for r in rows:
        (p0, p1), ref = r["points"], base.get(r["context"])
        if ref is None:
            continue
        slope = math.log(p1["bits"] / p0["bits"]) / math.log(p1["error"] / p0["error"])
        at_ref = p0["bits"] * (ref["error"] / p0["error"]) ** slope
        r["saved_at_head_error"] = 1 - at_ref / ref["bits"]
        r["synthesis_vs_head"] = p0["macs_per_token"] / ref["macs_per_token"]
    table = Table(title="decorrelating wider groups, sensitivity-weighted space (SmolLM2, version-2 profile)")
    for col in ("group", "context", "bits @0.57", "error @0.57", "saved at head's error", "synthesis × head"):
        table.add_column(col, justify="left" if col in ("group", "context") else "right")
    for r in rows:
        p = r["points"][0]
        table.add_row(r["group"], r["context"], f"{p['bits']:.3f}", f"{p['error']:.4f}",
                      f"{100 * r.get('saved_at_head_error', 0):.1f}%", f"{r.get('synthesis_vs_head', 1):.1f}×")
    Console(width=130).print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
