"""Would a transform across heads, or across layers, pay? A filter in the sensitivity-weighted space.

    .venv/bin/python bench/decorrelation.py [--groups head,xhead,2,3,30,chain,chain@0.62] [--contexts apple,legal]

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
today's (every kept coefficient times its group width). ``chain`` is prediction instead of a wider
group: each layer's vector (per kind) predicted from the layer before's reconstructed keys and values,
fitted closed loop, the residual rotated by its own PCA (``chain@S``: one predictor fitted at scale S
for every scale). A filter, not a codec: a real test is a fitted profile scored by KL."""

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


def ungroup(gs: list[np.ndarray], shape: tuple, mode: str) -> np.ndarray:
    """The inverse of :func:`groups`: ``[T, n]`` matrices back into ``[L, 2, H, T, D]``."""
    L, K, H, T, D = shape
    w = np.empty(shape)
    it = iter(gs)
    if mode == "head":
        for la in range(L):
            for k in range(K):
                for h in range(H):
                    w[la, k, h] = next(it)
    elif mode == "xhead":
        for la in range(L):
            for k in range(K):
                w[la, k] = next(it).reshape(T, H, D).transpose(1, 0, 2)
    else:
        g = int(mode)
        for k in range(K):
            for a in range(0, L, g):
                n = min(g, L - a)
                w[a : a + n, k] = next(it).reshape(T, n, H, D).transpose(1, 2, 0, 3)
    return w


def kl_sweep(lm, prof, modes, rotations, contexts, scales, continuation) -> list[dict]:
    """Quantise with step ``s`` after each group's rotation, rotate back, rebuild the cache and score the
    continuation's KL against the exact cache (rd_levers.Ctx: same contexts and scoring as its levers)."""
    from rd_levers import Ctx

    from kvc.evaluation.quality import compare, continuation_logprobs

    step = prof.component_steps()
    D = step.shape[-1]
    out = []
    for name, ids, cont in contexts:
        ctx = Ctx(lm, prof, name, ids, cont)
        L = len(ctx.kv.layers)
        w = np.stack([np.stack([ctx.coef[la, k] / step[la, k][:, None, :] for k in (0, 1)]) for la in range(L)])
        for mode in modes:
            for s in scales:
                if mode.startswith("chain"):
                    bits, wq, _ = chain_code(w, rotations[mode][s], s)
                else:
                    gs, rots = groups(w, mode), rotations[mode]
                    bits, recon_gs = 0.0, []
                    for i, g in enumerate(gs):
                        _, q, b, _ = quantise(g, None if rots is None else rots[i], s)
                        bits += b
                        yq = q * s
                        recon_gs.append(yq if rots is None else yq @ rots[i].T)
                    wq = ungroup(recon_gs, w.shape, mode)
                recon = {(la, k): wq[la, k] * step[la, k][:, None, :D] for la in range(L) for k in (0, 1)}
                qs = compare(ctx.ref, continuation_logprobs(lm, ctx.rebuild(recon), ctx.cont), ctx.cont)
                out.append({"group": mode, "context": name, "scale": s, "bits": bits / w.size, "kl": qs.kl,
                            "top1": qs.top1_agreement})
                print(f"{mode:6s} {name:10s} s={s:<5} bits {bits / w.size:.3f} KL {qs.kl:.5f}", flush=True)
    return out


def bits_at_kl(points: list[dict], target: float) -> float:
    """Bits at mean KL ``target`` by log–log interpolation between the two scales that bracket it."""
    pts = sorted(points, key=lambda p: p["kl"])
    for a, b in zip(pts, pts[1:]):
        if a["kl"] <= target <= b["kl"]:
            t = math.log(target / a["kl"]) / math.log(b["kl"] / a["kl"])
            return math.exp(math.log(a["bits"]) + t * math.log(b["bits"] / a["bits"]))
    return float("nan")


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


def quantise(g: np.ndarray, rot: np.ndarray | None, s: float) -> tuple[np.ndarray, np.ndarray, float, int]:
    """One group ``[T, n]`` rotated (``rot``: columns = directions) and quantised with step ``s``: (its
    coefficients, their symbols, the summed per-channel empirical entropy in bits, channels kept)."""
    from coder_gap import empirical_bits

    y = g if rot is None else g @ rot
    q = np.round(y / s).astype(np.int64)
    live = [col for col in q.T if col.any()]
    return y, q, sum(empirical_bits(col) for col in live), len(live)


def layer_vectors(w: np.ndarray) -> np.ndarray:
    """``[L, 2, H, T, D]`` -> ``[L, 2, T, H·D]``: each (layer, kind) as one vector per token."""
    L, K, H, T, D = w.shape
    return w.transpose(0, 1, 3, 2, 4).reshape(L, K, T, H * D)


def fit_chain(cal: list[np.ndarray], s: float) -> dict:
    """Predictive coding down the layers: layer l's vector (per kind) predicted linearly from layer l-1's
    *reconstructed* keys and values side by side (``[T, 2·H·D]``), the residual rotated by its own PCA.
    Fitted closed-loop at step ``s``: layer l-1 is quantised as the coder would before layer l is fitted.
    Layer 0 is the ``xhead`` case (no prediction)."""
    vs = [layer_vectors(c) for c in cal]
    L, K = vs[0].shape[:2]
    recon = [np.zeros_like(v) for v in vs]
    preds, rots = {}, {}
    for la in range(L):
        for k in range(K):
            X = np.concatenate([v[la, k] for v in vs])
            if la == 0:
                P = None
                R = X
            else:
                prev = np.concatenate([np.concatenate([r[la - 1, 0], r[la - 1, 1]], axis=1) for r in recon])
                P, *_ = np.linalg.lstsq(prev, X, rcond=None)
                R = X - prev @ P
            _, V = np.linalg.eigh(R.T @ R / len(R))
            V = V[:, ::-1]
            preds[la, k], rots[la, k] = P, V
            for v, r in zip(vs, recon):
                pred = 0.0 if P is None else np.concatenate([r[la - 1, 0], r[la - 1, 1]], axis=1) @ P
                y = (v[la, k] - pred) @ V
                r[la, k] = pred + (np.round(y / s) * s) @ V.T
    return {"pred": preds, "rot": rots}


def chain_code(w: np.ndarray, fit: dict, s: float) -> tuple[float, np.ndarray, int]:
    """Code ``w`` ([L, 2, H, T, D]) with the chain at step ``s``: (summed per-channel entropy in bits, the
    reconstruction in the same shape, synthesis multiply-adds per token)."""
    from coder_gap import empirical_bits

    L, K, H, T, D = w.shape
    v = layer_vectors(w)
    recon = np.zeros_like(v)
    bits, macs = 0.0, 0
    for la in range(L):
        for k in range(K):
            P, V = fit["pred"][la, k], fit["rot"][la, k]
            pred = 0.0 if P is None else np.concatenate([recon[la - 1, 0], recon[la - 1, 1]], axis=1) @ P
            q = np.round(((v[la, k] - pred) @ V) / s).astype(np.int64)
            bits += sum(empirical_bits(col) for col in q.T if col.any())
            recon[la, k] = pred + (q * s) @ V.T
            macs += V.size + (0 if P is None else P.size)
    out = recon.reshape(L, K, T, H, D).transpose(0, 1, 3, 2, 4)
    return bits, out, macs


def rate_distortion(gs, rots, s: float) -> tuple[float, float, float]:
    """(bits per element, weighted squared error per element, multiply-adds per token of synthesis)."""
    bits = err = 0.0
    n = macs = 0
    for i, g in enumerate(gs):
        y, q, b, kept = quantise(g, None if rots is None else rots[i], s)
        bits += b
        err += float(((y - q * s) ** 2).sum())
        n += y.size
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
    ap.add_argument("--groups", default="head,xhead,2,3,30",
                    help="head, xhead, G (consecutive layers), chain (each layer predicted from the one before, "
                    "fitted at each scale), chain@S (fitted once, at scale S)")
    ap.add_argument("--contexts", default="apple,legal", help="essay names (without .txt) or genre names")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--json", default=None)
    ap.add_argument("--kl", action="store_true", help="also rebuild the caches and score KL over the next "
                    "--continuation tokens at --kl-scales; compares bits at equal mean KL 0.01")
    ap.add_argument("--kl-scales", default="0.45,0.62,0.85")
    ap.add_argument("--continuation", type=int, default=128)
    args = ap.parse_args(argv)
    kl_scales = [float(x) for x in args.kl_scales.split(",")] if args.kl else []
    torch.set_num_threads(1)
    lm = load_model(None, device="cpu")
    prof = find_profile(model_identity(lm), None)
    cal = [weighted(lm, prof, tokenize(lm, essay_text(n))[: args.tokens]) for n in calibration_essays()[:3]]
    tests, raw = [], []
    for spec in args.contexts.split(","):
        try:
            full = tokenize(lm, essay_text(spec + ".txt"))
            ids, cont = full[: args.tokens], full[args.tokens : args.tokens + args.continuation]
        except Exception:  # not an essay: a genre name of bench/codec.py
            _, ids, cont = text_contexts(lm, [spec], args.tokens, args.continuation)[0]
        tests.append((spec, weighted(lm, prof, ids)))
        raw.append((spec, ids, cont))
    rows = []
    rotations = {}
    for mode in args.groups.split(","):
        if mode.startswith("chain"):  # "chain": fitted at every scale it codes at; "chain@S": once, at S
            fixed = float(mode.split("@")[1]) if "@" in mode else None
            wanted = sorted({*SCALES, *kl_scales})
            one = fit_chain(cal, fixed) if fixed is not None else None
            fits = rotations[mode] = {s: one if one is not None else fit_chain(cal, s) for s in wanted}
            for name, w in tests:
                pts = []
                for s in SCALES:
                    b, wq, m = chain_code(w, fits[s], s)
                    pts.append((b / w.size, float(((w - wq) ** 2).mean()), m))
                rows.append({"group": mode, "context": name, "points": [
                    {"scale": s, "bits": b, "error": e, "macs_per_token": m} for s, (b, e, m) in zip(SCALES, pts)]})
            continue
        rots = rotations[mode] = fit_rotations(cal, mode)
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
    if args.kl:
        scales = [float(x) for x in args.kl_scales.split(",")]
        kl_rows = kl_sweep(lm, prof, args.groups.split(","), rotations, raw, scales, args.continuation)
        rows.append({"kl_sweep": kl_rows})
        means = {}
        for r in kl_rows:
            means.setdefault((r["group"], r["scale"]), []).append(r)
        mean_pts = {}
        for (mode, _scale), rs in means.items():
            mean_pts.setdefault(mode, []).append({"bits": float(np.mean([r["bits"] for r in rs])),
                                                  "kl": float(np.mean([r["kl"] for r in rs]))})
        ref = bits_at_kl(mean_pts["head"], 0.01) if "head" in mean_pts else float("nan")
        kt = Table(title="scored by KL: bits per element at mean KL 0.01 (all contexts)")
        for col in ("group", "bits at KL 0.01", "saved vs head"):
            kt.add_column(col, justify="left" if col == "group" else "right")
        for mode, pts in mean_pts.items():
            b = bits_at_kl(pts, 0.01)
            kt.add_row(mode, f"{b:.3f}", f"{100 * (1 - b / ref):.1f}%")
            rows.append({"group": mode, "bits_at_kl_0.01": b, "saved_vs_head_at_kl_0.01": 1 - b / ref})
        Console(width=130).print(kt)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
