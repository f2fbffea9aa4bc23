"""Rate–distortion levers for kvq, measured by fake quantisation (issue 9, phase 1).

    nice -n 19 .venv/bin/python bench/rd_levers.py --json /tmp/rd.json

For held-out contexts (essays the profile never saw, code, legal, technical text) the real kvq transform
(un-rotation, the profile's PCA) gives each (layer, kind) its coefficients; each *variant* quantises them
(its own steps and rounding rule), reconstructs them (its own reconstruction rule) and is scored by the KL of
the continuation against the exact cache. Bits are the information content of the symbols under the
profile's per-channel models (what the rANS coder writes, within 1%), with a channel that is all zero in a
256-token chunk costing one flag bit, escapes 32 bits more, plus the sinks (float16) and segment heads.
Each variant sweeps the level scale; bits at equal KL come from log–log interpolation."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import numpy as np
import torch

from kvc.codec.entropy import bank_weights, channel_radius
from kvc.codec.profile import GRID, find_profile
from kvc.codec.transforms import analysis_matrix, rope_cos_sin, rope_inv_freq, unrotate_keys
from kvc.evaluation.quality import compare, continuation_logprobs
from kvc.runtime.cache import to_transformers_cache
from kvc.runtime.identity import model_identity
from kvc.runtime.kv import ContextKV, LayerKV
from kvc.runtime.loading import load_model
from kvc.runtime.prefill import prefill, tokenize
from kvc.samples import calibration_essays, essay_text

CHUNK = 256
GRIDX = np.linspace(*GRID[:2], GRID[2])


def held_out(lm, names, tokens, cont):
    sys.path.insert(0, "bench")
    from codec import text_contexts

    out = []
    for n in names:
        if n.startswith("essay:"):
            ids = tokenize(lm, essay_text(n[6:]))
            out.append((n[6:], ids[:tokens], ids[tokens : tokens + cont]))
        else:
            out += text_contexts(lm, [n], tokens, cont)
    return out


class Ctx:
    """One context: its exact KV, reference log-probs, and every (layer, kind)'s PCA coefficients."""

    def __init__(self, lm, prof, name, ids, cont):
        self.name, self.cont = name, cont
        self.kv = prefill(lm, ids)
        self.ref = continuation_logprobs(lm, self.kv, cont)
        self.inv_freq = rope_inv_freq(prof.rotary["theta"], prof.rotary["dim"])
        self.coef, self.B, self.mean = {}, {}, {}
        S = prof.sinks
        for li, lay in enumerate(self.kv.layers):
            assert lay.start == 0
            for k, kind in enumerate(("key", "value")):
                x = getattr(lay, kind)[:, S:].double()
                if k == 0:
                    x = unrotate_keys(x, S, self.inv_freq)
                b16 = prof.arrays["basis"][li, k, :, :64, :64]
                mean = torch.from_numpy(prof.arrays["mean"][li, k, :, :64].astype(np.float64))
                ana = torch.from_numpy(analysis_matrix(b16))
                self.coef[li, k] = torch.bmm(x - mean[:, None], ana).numpy()  # [H, T', D] float64
                self.B[li, k] = torch.from_numpy(b16.astype(np.float64))
                self.mean[li, k] = mean
        self.cos, self.sin = rope_cos_sin(S, self.coef[0, 0].shape[1], self.inv_freq)

    def rebuild(self, recon: dict) -> ContextKV:
        """recon[(l, k)]: reconstructed coefficients [H, T', D] → a ContextKV (sinks exact)."""
        layers = []
        for li, lay in enumerate(self.kv.layers):
            parts = []
            for k, kind in enumerate(("key", "value")):
                c = torch.from_numpy(recon[li, k])
                x = torch.bmm(c, self.B[li, k].transpose(1, 2)) + self.mean[li, k][:, None]
                if k == 0:
                    half = x.shape[-1] // 2
                    rh = torch.cat([-x[..., half:], x[..., :half]], -1)
                    x = x * self.cos + rh * self.sin
                orig = getattr(lay, kind)
                parts.append(torch.cat([orig[:, : orig.shape[1] - x.shape[1]], x.to(orig.dtype)], 1))
            layers.append(LayerKV(key=parts[0], value=parts[1], start=lay.start))
        return ContextKV(token_ids=self.kv.token_ids, layers=layers)


class Models:
    """log2 probabilities of every channel's symbols for given steps [H, D] of a (layer, kind)."""

    def __init__(self, prof):
        self.prof = prof

    def tables(self, la, k, steps):  # steps [H, D]
        sigma = self.prof.arrays["sigma"][la, k, :, :64].astype(np.float64)
        ratio = (sigma / steps).reshape(-1)
        R = channel_radius(ratio)
        cdf = self.prof.arrays["cdf"][la, k].astype(np.float64)
        w = bank_weights(ratio, R, GRIDX, cdf)
        return [np.log2(x / x.sum()) for x in w], R, ratio


def chunk_bounds(T_body, S):
    b, t = [0], CHUNK - S
    while t < T_body:
        b.append(t)
        t += CHUNK
    b.append(T_body)
    return b


def symbol_bits(q, lp, R, bounds):
    """q [H, T', D] int → bits (symbols of flagged channels + flags + escapes)."""
    H, T, D = q.shape
    qc = q.transpose(0, 2, 1).reshape(H * D, T)
    bits = 0.0
    cost = np.empty((H * D, T))
    for c in range(H * D):
        r = R[c]
        s = np.clip(qc[c], -r, r) + r
        cost[c] = -lp[c][s]
        esc = np.abs(qc[c]) >= r
        if esc.any():
            cost[c][esc] += 32
    for a, b in zip(bounds[:-1], bounds[1:]):
        live = np.any(qc[:, a:b] != 0, axis=1)
        bits += cost[live, a:b].sum() + H * D
    return bits


def per_channel(q, R, tables):
    """For q [H, T, D]: (tables[c][symbol of q] with channel c = h·D + d and the value clipped to its
    alphabet ±R[c], whether the value is an escape end), both [H, T, D]."""
    H, T, D = q.shape
    looked, esc = np.empty(q.shape), np.empty(q.shape, dtype=bool)
    for h in range(H):
        for d in range(D):
            c = h * D + d
            r = R[c]
            looked[h, :, d] = tables[c][np.clip(q[h, :, d], -r, r) + r]
            esc[h, :, d] = np.abs(q[h, :, d]) >= r
    return looked, esc


def lp_of(q, lp, R):
    """-log2 p of symbols q for every channel: q [H, T, D] → bits [H, T, D] (escape ends counted +32)."""
    log_p, esc = per_channel(q, R, lp)
    return -log_p + 32 * esc


def quantise(c, steps, rule, lp=None, R=None, weight=None):
    """c [H, T, D] float, steps [H, D] → integer q. rule: ("round",) | ("deadzone", theta) | ("rdo", lam)."""
    u = c / steps[:, None, :]
    if rule[0] == "round":
        return np.round(u).astype(np.int64)
    if rule[0] == "deadzone":
        th = rule[1]
        return (np.sign(u) * np.floor(np.abs(u) + 0.5 - th).clip(0)).astype(np.int64)
    if rule[0] == "rdo":  # per symbol: round or one step toward zero, min (u-q)^2 + lam * bits(q)
        lam = rule[1]
        q0 = np.round(u).astype(np.int64)
        q1 = q0 - np.sign(q0)
        j0 = (u - q0) ** 2 + lam * lp_of(q0, lp, R)
        j1 = (u - q1) ** 2 + lam * lp_of(q1, lp, R)
        return np.where(j1 < j0, q1, q0)
    raise ValueError(rule)


def centroid_table(ratio, R, cdf, n_sub=64):
    """Per channel: E[u | symbol] (in steps) under the profile's model: reconstruction offsets a decoder can
    derive from the profile alone. Returns list of arrays of length 2R+1 (the value for symbol j - R)."""
    out = []
    for rt, r in zip(ratio, R):
        j = np.arange(-r, r + 1)
        lo = (j[:, None] - 0.5) + np.arange(n_sub)[None, :] / n_sub + 0.5 / n_sub  # midpoints in bin
        F = lambda e, rt=rt: np.interp(e / max(rt, 1e-12), GRIDX, cdf, left=0.0, right=1.0)  # noqa: E731
        a = lo - 0.5 / n_sub
        b = lo + 0.5 / n_sub
        m = np.maximum(F(b) - F(a), 0)
        tot = m.sum(1)
        cen = np.where(tot > 0, (m * lo).sum(1) / np.maximum(tot, 1e-300), j)
        cen[0], cen[-1] = j[0], j[-1]  # escape ends are exact
        cen[r] = 0.0
        out.append(cen)
    return out


def reconstruct(q, steps, rec, ratio=None, R=None, cdf=None, cache=None):
    if rec[0] == "mid":
        return q * steps[:, None, :]
    if rec[0] == "offset":  # |q| - delta for q != 0
        d = rec[1]
        return (q - d * np.sign(q)) * steps[:, None, :]
    if rec[0] == "centroid":
        centre, esc = per_channel(q, R, cache)
        return np.where(esc, q, centre) * steps[:, None, :]
    raise ValueError(rec)


def evaluate(lm, prof, models, ctx, variant, scale):
    """(bits, elements, KL, top1) of one variant at one scale on one context."""
    S = prof.sinks
    recon, bits = {}, 0.0
    for (la, k), c in ctx.coef.items():
        bounds = chunk_bounds(c.shape[1], S)
        mults = variant.get("chunk_m", [])  # step multipliers of the last chunks (the most recent first)
        if mults:  # per-chunk steps: each chunk quantised and coded with its own step and tables
            out = np.empty_like(c)
            n = len(bounds) - 1
            for j, (a0, b0) in enumerate(zip(bounds[:-1], bounds[1:])):
                m = mults[n - 1 - j] if n - 1 - j < len(mults) else 1.0
                steps = scale * m * variant["step"](la, k)
                lp, R, ratio = models.tables(la, k, steps)
                q = quantise(c[:, a0:b0], steps, variant["q"], lp, R)
                bits += symbol_bits(q, lp, R, [0, b0 - a0])
                out[:, a0:b0] = reconstruct(q, steps, variant["rec"])
            recon[la, k] = out
            continue
        steps = scale * variant["step"](la, k)  # [H, D]
        lp, R, ratio = models.tables(la, k, steps)
        q = quantise(c, steps, variant["q"], lp, R)
        bits += symbol_bits(q, lp, R, bounds)
        cache = None
        if variant["rec"][0] == "centroid":
            cache = centroid_table(ratio, R, prof.arrays["cdf"][la, k].astype(np.float64))
        recon[la, k] = reconstruct(q, steps, variant["rec"], ratio, R, None, cache)
    H, T = ctx.kv.layers[0].key.shape[:2]
    L = len(ctx.kv.layers)
    segs = 2 * L * math.ceil(T / CHUNK)
    bits += 2 * L * H * S * 64 * 16 + segs * (4 * 8 + 2 * 32 + 8)  # sinks, heads, ~2 lanes' tables + flushes
    elems = 2 * L * H * T * 64
    dec = ctx.rebuild(recon)
    qs = compare(ctx.ref, continuation_logprobs(lm, dec, ctx.cont), ctx.cont)
    return bits, elems, qs.kl, qs.top1_agreement


# ---------------------------------------------------------------- per-component sensitivity (Fisher)


def fisher(lm, prof, texts, tokens=2048, cont=128, samples=8, seed=0):
    """s[l, k, h, d] = E Σ_t (∂ log p(y)/∂ c_{t,d})² summed over continuation positions, with y drawn from
    the model: the diagonal of the KL Hessian in PCA coordinates, per unit coefficient variance at every
    token (so KL ≈ ½ Σ s·var). Averaged over texts; tokens at positions < sinks are left out."""
    L, H = prof.layers, prof.heads
    s = np.zeros((L, 2, H, 64))
    gen = torch.Generator().manual_seed(seed)
    inv = rope_inv_freq(prof.rotary["theta"], prof.rotary["dim"])
    S = prof.sinks
    for text in texts:
        ids = tokenize(lm, text)
        ctx, c_ids = ids[:tokens], ids[tokens : tokens + cont]
        kv = prefill(lm, ctx)
        leaves = []
        for lay in kv.layers:
            lay.key = lay.key.float().clone().requires_grad_(True)
            lay.value = lay.value.float().clone().requires_grad_(True)
            leaves.append((lay.key, lay.value))
        pos = torch.arange(len(ctx), len(ctx) + len(c_ids))
        for _ in range(samples):
            cache = to_transformers_cache(kv, lm.model.config)
            with torch.enable_grad():
                logits = lm.model(input_ids=torch.tensor([c_ids]), past_key_values=cache, use_cache=True,
                                  cache_position=pos).logits[0].float()
                logp = torch.log_softmax(logits, -1)
                y = torch.multinomial(logp.detach().exp(), 1, generator=gen)[:, 0]
                obj = logp[torch.arange(len(y)), y].sum()
                grads = torch.autograd.grad(obj, [t for pair in leaves for t in pair])
            for li in range(L):
                for k in range(2):
                    g = grads[2 * li + k][:, S:].double()
                    if k == 0:
                        g = unrotate_keys(g, S, inv)
                    B = torch.from_numpy(prof.arrays["basis"][li, k, :, :64, :64].astype(np.float64))
                    gc = torch.bmm(g, B)  # dL/dc = dL/dx · B  [H, T, D]
                    s[li, k] += (gc**2).sum(1).numpy() / (samples * len(texts))
        print(f"fisher: text done {time.strftime('%H:%M:%S')}", file=sys.stderr, flush=True)
    return s


def summarise(results: list[dict], target: float) -> list[str]:
    """Per variant: bits/element at mean KL = ``target`` (log–log interpolation over its scales, NaN outside
    them) on all contexts, the essays and the other genres, and the saving against ``base``."""
    from collections import defaultdict

    groups = {"all": lambda c: True, "essays": lambda c: c.endswith(".txt"),
              "other genres": lambda c: not c.endswith(".txt")}

    def at(rows, sel):
        pts = defaultdict(lambda: [0.0, 0, []])
        for x in rows:
            if sel(x["context"]):
                p = pts[x["scale"]]
                p[0] += x["bits"]
                p[1] += x["elems"]
                p[2].append(x["kl"])
        b = np.array([pts[s][0] / pts[s][1] for s in sorted(pts)])
        k = np.array([np.mean(pts[s][2]) for s in sorted(pts)])
        if len(b) < 2:
            return float("nan")
        o = np.argsort(k)
        return float(np.exp(np.interp(np.log(target), np.log(k[o]), np.log(b[o]), left=np.nan, right=np.nan)))

    by = defaultdict(list)
    for x in results:
        by[x["variant"]].append(x)
    base = {g: at(by["base"], sel) for g, sel in groups.items()} if "base" in by else {}
    lines = [f"bits/element at mean KL {target:g} (saving against base)",
             "| variant | " + " | ".join(groups) + " |", "|---|" + "---:|" * len(groups)]
    for v, rows in by.items():
        cells = []
        for g, sel in groups.items():
            bits = at(rows, sel)
            save = 100 * (1 - bits / base[g]) if base else float("nan")
            cells.append(f"{bits:.3f} ({save:+.1f}%)")
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="essay:apple.txt,essay:boss.txt,code,legal,technical")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--continuation", type=int, default=128)
    ap.add_argument("--scales", default="0.45,0.62,0.85")
    ap.add_argument("--variants", default="base")
    ap.add_argument("--fisher", default="/tmp/fisher.npy")
    ap.add_argument("--profile", default=None, help="the profile (default: the model's); v2 variants need version 2")
    ap.add_argument("--json", default=None)
    ap.add_argument("--summarise", default=None, help="only print the summary of earlier --json results")
    ap.add_argument("--kl", default="0.01,0.015", help="the mean KLs the summary compares bits at")
    args = ap.parse_args(argv)
    if args.summarise:
        results = [r for path in args.summarise.split(",") for r in json.load(open(path))]
        for kl in args.kl.split(","):
            print("\n".join(summarise(results, float(kl))) + "\n")
        return
    torch.set_num_threads(2)
    lm = load_model(None, device="cpu")
    prof = find_profile(model_identity(lm), args.profile)
    if prof.rotary is None or prof.version >= 3 or prof.key_dim != 64:
        sys.exit("rd_levers.py measures SmolLM2-shaped profiles (64-dim heads, one rotary base)")
    models = Models(prof)
    base_step = prof.arrays["base_step"].astype(np.float64)

    def fisher_s():
        try:
            return np.load(args.fisher)
        except FileNotFoundError:
            texts = [essay_text(n) for n in calibration_essays()]
            texts = [t for t in texts if len(tokenize(lm, t)) >= args.tokens + args.continuation][:2]
            f = fisher(lm, prof, texts, args.tokens, args.continuation)
            np.save(args.fisher, f)
            return f

    head = lambda la, k: np.repeat(base_step[la, k][:, None], 64, 1)  # noqa: E731
    variants = {"base": {"step": head, "q": ("round",), "rec": ("mid",)}}
    for th in (0.1, 0.2, 0.3):
        variants[f"dz{th}"] = {"step": head, "q": ("deadzone", th), "rec": ("mid",)}
    for lam in (0.05, 0.1, 0.2):
        variants[f"rdo{lam}"] = {"step": head, "q": ("rdo", lam), "rec": ("mid",)}
    for lam in (0.03,):
        variants[f"rdo{lam}"] = {"step": head, "q": ("rdo", lam), "rec": ("mid",)}
    for d in (-0.05, 0.05, 0.1, 0.15):
        variants[f"off{d}"] = {"step": head, "q": ("round",), "rec": ("offset", d)}
    variants["cen"] = {"step": head, "q": ("round",), "rec": ("centroid",)}
    for th in (0.2, 0.3):
        variants[f"dz{th}+cen"] = {"step": head, "q": ("deadzone", th), "rec": ("centroid",)}
        for d in (0.1, 0.15):
            variants[f"dz{th}+off{d}"] = {"step": head, "q": ("deadzone", th), "rec": ("offset", d)}
    if prof.version == 2:  # the profile's own per-coefficient steps (base: its per-head base_step)
        v2 = prof.component_steps()[..., :64]
        variants["v2"] = {"step": lambda la, k: v2[la, k], "q": ("round",), "rec": ("mid",)}
        variants["v2+rdo0.03"] = {"step": lambda la, k: v2[la, k], "q": ("rdo", 0.03), "rec": ("mid",)}
        for ms in ("0.5", "0.35", "0.5/0.75"):  # token-adaptive at chunk grain: finer steps for the last chunks
            variants[f"v2+last{ms}"] = {"step": lambda la, k: v2[la, k], "q": ("round",), "rec": ("mid",),
                                        "chunk_m": [float(x) for x in ms.split("/")]}
    want = args.variants.split(",")  # name or name@s1/s2/s3
    if any(v.startswith("pc") for v in want):
        F = fisher_s()  # [L, 2, H, D]
        Fm = np.maximum(F, 1e-6 * F.max())
        for alpha in (0.5, 1.0):
            # within-head: the head's base step times s^(-alpha/2), geometric mean 1 inside each head
            g = Fm ** (-alpha / 2)
            g = g / np.exp(np.log(g).mean(-1, keepdims=True))
            comp = base_step[..., None] * g
            variants[f"pc_in{alpha}"] = {"step": (lambda c: lambda la, k: c[la, k])(comp), "q": ("round",),
                                         "rec": ("mid",)}
            # fully Fisher: every (layer, kind, head, component) from s alone, global geometric mean 1
            full = Fm ** (-alpha / 2)
            full = full / np.exp(np.log(full).mean())
            variants[f"pc_all{alpha}"] = {"step": (lambda c: lambda la, k: c[la, k])(full), "q": ("round",),
                                          "rec": ("mid",)}
            for th in (0.2,):
                variants[f"pc_all{alpha}+dz{th}+off0.1"] = {"step": (lambda c: lambda la, k: c[la, k])(full),
                                                           "q": ("deadzone", th), "rec": ("offset", 0.1)}
                variants[f"pc_in{alpha}+dz{th}+off0.1"] = {"step": (lambda c: lambda la, k: c[la, k])(comp),
                                                          "q": ("deadzone", th), "rec": ("offset", 0.1)}
    ctxs = [Ctx(lm, prof, *c) for c in held_out(lm, args.contexts.split(","), args.tokens, args.continuation)]
    print(f"contexts ready {time.strftime('%H:%M:%S')}", file=sys.stderr, flush=True)
    results = []
    for spec in want:
        vname, _, own = spec.partition("@")
        v = variants[vname]
        for sc in [float(x) for x in (own.replace("/", ",") or args.scales).split(",")]:
            for ctx in ctxs:
                t0 = time.time()
                bits, elems, kl, top1 = evaluate(lm, prof, models, ctx, v, sc)
                results.append({"variant": vname, "scale": sc, "context": ctx.name, "bits": bits, "elems": elems,
                                "kl": kl, "top1": top1})
                print(f"{vname:22s} {sc:5.2f} {ctx.name:10s} {bits / elems:6.3f} b/elt KL {kl:.5f} top1 {top1:.3f} "
                      f"({time.time() - t0:.0f}s)", file=sys.stderr, flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(results, f)
    for kl in args.kl.split(","):
        print("\n".join(summarise(results, float(kl))) + "\n")


if __name__ == "__main__":
    main()
