"""Codec benchmark: baselines and our levels side by side on held-out essays.

    .venv/bin/python bench/codec.py [--contexts 4 --tokens 2048 --continuation 128 --json out.json]
    .venv/bin/python bench/codec.py --texts code,legal,technical --continuation 256 --only "kvq balanced" \
        --target-kl 0.001,0.003,0.01,0.03 --json target.json

``--texts`` takes files (read at run time, never stored) or the genre names of _held_out() below, which
name text every Linux/Python install has: a Python standard library module, a license, a CMake manual.
``--target-kl`` adds one row per target: ``kvc encode --target-kl X`` (kvc.codec.targeting picks the
scale per context from the context's own tail), scored on the held-out continuation like every row;
the JSON gives each context's KL, estimate and whether it is inside [0.5X, 1.3X].

Every method sees the same contexts (evaluation_essays() only; the profile never saw them), is
encoded segment by segment exactly as a .kvc chunk would be (256-token chunks, one segment per
layer × K/V), and is scored by KL of the continuation's next-token distributions against the
exact cache. Sizes count every byte a file would carry for the payload (scales, tables,
escape lists, sink tokens); a profile shipped once per model is not counted."""

from __future__ import annotations

import argparse
import json
import math
import struct
import sys
import time
from pathlib import Path

import numpy as np
import torch
import zstandard

from kvc.codec.base import Segment
from kvc.codec.profile import find_profile
from kvc.evaluation.quality import compare, continuation_logprobs
from kvc.runtime.identity import model_identity
from kvc.runtime.kv import ContextKV, LayerKV
from kvc.runtime.loading import load_model
from kvc.runtime.prefill import prefill, tokenize
from kvc.samples import essay_text, evaluation_essays

CHUNK = 256


# ---- simple baselines, as segment codecs ----
class Fp16Zstd:
    def encode(self, t, seg):
        return zstandard.ZstdCompressor(level=3).compress(t.to(torch.float16).numpy().tobytes())

    def decode(self, b, seg):
        a = np.frombuffer(zstandard.ZstdDecompressor().decompress(b), np.float16).reshape(seg.shape)
        return torch.from_numpy(a.astype(np.float32)).to(seg.dtype)


class Int8Zstd:
    """Per-token (over heads × dims) absmax int8, float16 scales, zstd over the lot."""

    def encode(self, t, seg):
        x = t.float().numpy()
        s = (np.abs(x).max(axis=(0, 2)) / 127).astype(np.float16)
        sf = np.where(s == 0, 1, s.astype(np.float32))
        q = np.clip(np.round(x / sf[None, :, None]), -127, 127).astype(np.int8)
        return zstandard.ZstdCompressor(level=3).compress(s.tobytes() + q.tobytes())

    def decode(self, b, seg):
        H, T, D = seg.shape
        raw = zstandard.ZstdDecompressor().decompress(b)
        s = np.frombuffer(raw, np.float16, T).astype(np.float32)
        q = np.frombuffer(raw, np.int8, H * T * D, 2 * T).reshape(H, T, D).astype(np.float32)
        return torch.from_numpy(q * s[None, :, None]).to(seg.dtype)


class Kivi:
    """KIVI: keys per-channel (groups of G tokens), values per-token (groups of G channels), asymmetric
    min/max b-bit with float16 scale and zero per group; size = packed bits + 32 bits per group."""

    def __init__(self, bits, group=32):
        self.bits, self.group = bits, group

    def _q(self, x, axis):  # x [..., G] grouped along last axis
        lo, hi = x.min(-1, keepdims=True), x.max(-1, keepdims=True)
        lo16, sc16 = lo.astype(np.float16), ((hi - lo) / (2**self.bits - 1)).astype(np.float16)
        sc = np.where(sc16 == 0, 1, sc16.astype(np.float32))
        q = np.clip(np.round((x - lo16.astype(np.float32)) / sc), 0, 2**self.bits - 1)
        return q * sc + lo16.astype(np.float32), x.size // x.shape[-1]

    def encode(self, t, seg):
        H, T, D = seg.shape
        x = t.float().numpy()
        G = self.group
        if seg.kind == "key":  # per channel: groups along tokens
            pad = (-T) % G
            xp = np.concatenate([x, np.repeat(x[:, -1:], pad, 1)], 1) if pad else x
            g = xp.transpose(0, 2, 1).reshape(H, D, -1, G)
            rec, ngroups = self._q(g, -1)
            rec = rec.reshape(H, D, -1).transpose(0, 2, 1)[:, :T]
        else:
            g = x.reshape(H, T, -1, min(G, D))
            rec, ngroups = self._q(g, -1)
            rec = rec.reshape(H, T, D)
        nbytes = math.ceil(x.size * self.bits / 8) + 4 * ngroups
        self._last = rec
        return struct.pack("<I", nbytes) + rec.astype(np.float32).tobytes()  # payload stand-in; size is nbytes

    def decode(self, b, seg):
        return torch.from_numpy(np.frombuffer(b, np.float32, offset=4).reshape(seg.shape).copy()).to(seg.dtype)

    @staticmethod
    def size(b):
        return struct.unpack_from("<I", b)[0]


def _held_out() -> dict[str, str]:
    import sysconfig

    return {
        "code": str(Path(sysconfig.get_paths()["stdlib"]) / "subprocess.py"),
        "legal": "/usr/share/common-licenses/GPL-3",
        "technical": "/usr/share/cmake-3.25/Help/manual/cmake-buildsystem.7.rst",
        "code2": str(Path(sysconfig.get_paths()["stdlib"]) / "argparse.py"),
        "legal2": "/usr/share/common-licenses/MPL-2.0",
        "technical2": "/usr/share/doc/dpkg/spec/triggers.txt",
    }


def text_contexts(lm, specs, tokens, continuation):
    """Contexts from files (or HELD_OUT genre names), each cut to ``tokens`` plus its continuation."""
    out = []
    for spec in specs:
        path = Path(_held_out().get(spec, spec))
        if not path.is_file():
            print(f"skipping {spec}: no file at {path}", file=sys.stderr)
            continue
        ids = tokenize(lm, path.read_text(encoding="utf-8", errors="replace"))
        if len(ids) < tokens + continuation:
            print(f"skipping {spec}: {len(ids)} tokens < {tokens + continuation}", file=sys.stderr)
            continue
        out.append((spec if spec in _held_out() else path.name, ids[:tokens], ids[tokens : tokens + continuation]))
    return out


def contexts(lm, n, tokens, continuation):
    out = []
    for name in evaluation_essays():
        ids = tokenize(lm, essay_text(name))
        if len(ids) >= tokens + continuation:
            out.append((name, ids[:tokens], ids[tokens : tokens + continuation]))
        if len(out) == n:
            break
    return out


def run_codec(codec, kv: ContextKV, size_fn=len):
    """Encode/decode every segment; return (decoded ContextKV, payload bytes, encode s, decode s)."""
    enc_s = dec_s = 0.0
    nbytes = 0
    layers = []
    if hasattr(codec, "bind_tokens"):  # kvq levels with fine tokens find them by token id
        codec.bind_tokens(kv.token_ids)
    chains = (codec.new_chain(), codec.new_chain()) if hasattr(codec, "new_chain") else (None, None)
    enc_extra, dec_extra = ({"chain": c} if c is not None else {} for c in chains)  # a chained level's own
    for li, lay in enumerate(kv.layers):
        parts = {}
        for kind in ("key", "value"):
            t = getattr(lay, kind)
            pieces = []
            for a in range(0, t.shape[1], CHUNK):
                x = t[:, a : a + CHUNK].contiguous()
                seg = Segment(li, kind, lay.start + a, tuple(x.shape), t.dtype)
                t0 = time.perf_counter()
                blob = codec.encode(x, seg, **enc_extra)
                t1 = time.perf_counter()
                y = codec.decode(blob, seg, **dec_extra)
                t2 = time.perf_counter()
                enc_s += t1 - t0
                dec_s += t2 - t1
                nbytes += size_fn(blob)
                pieces.append(y)
            parts[kind] = torch.cat(pieces, 1)
        layers.append(LayerKV(key=parts["key"], value=parts["value"], start=lay.start))
    return ContextKV(token_ids=kv.token_ids, layers=layers), nbytes, enc_s, dec_s


def methods(profile, num_layers, kvq_scales=()):
    from kvc.codec.cachegen import default_params
    from kvc.codec.levels import LEVEL_SCALES
    from kvc.codec.registry import build_codec, level_entry

    out = [("fp16+zstd", Fp16Zstd(), len), ("int8+zstd", Int8Zstd(), len),
           ("KIVI-4bit g32", Kivi(4), Kivi.size), ("KIVI-2bit g32", Kivi(2), Kivi.size)]
    for bits in ((8, 7, 6), (6, 5, 4), (5, 4, 3)):
        entry = {"codec": "cachegen", "params": default_params(num_layers, bits)}
        out.append((f"CacheGen {'/'.join(map(str, bits))}b", build_codec(entry), len))
    for name in LEVEL_SCALES:
        out.append((f"kvq {name}", build_codec(level_entry(name, profile), profile), len))
    for scale in kvq_scales:  # the balanced entry (so the profile's fine tokens too) at another scale
        entry = level_entry("balanced", profile)
        entry = {**entry, "params": {**entry["params"], "scale": scale}}
        out.append((f"kvq @{scale:g}", build_codec(entry, profile), len))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--continuation", type=int, default=128)
    ap.add_argument("--only", default="", help="comma-separated substrings of method names to run")
    ap.add_argument("--model", default=None, help="a .gguf file or Hugging Face folder (default: the embedded "
                    "SmolLM2); give its profile with --profile unless one is installed for it")
    ap.add_argument("--profile", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--texts", default="", help="comma-separated files or genre names (code, legal, technical, "
                    "code2, legal2, technical2) to use instead of the held-out essays")
    ap.add_argument("--target-kl", default="", help="comma-separated KL targets: one kvc encode --target-kl row each")
    ap.add_argument("--level", default="balanced", help="the level --target-kl rows tune")
    ap.add_argument("--kvq-scales", default="", help="comma-separated kvq scales: one more row each ('kvq @S'), "
                    "how the level scales are chosen")
    ap.add_argument("--aim", type=float, default=None, help="steer the tail estimate to aim × target "
                    "(default: kvc.codec.targeting.AIM)")
    ap.add_argument("--tail", type=int, default=None, help="tail tokens the estimate is measured on "
                    "(default: kvc.codec.targeting.TAIL)")
    args = ap.parse_args(argv)
    lm = load_model(args.model, device="cpu")
    profile = find_profile(model_identity(lm), args.profile)
    if args.texts:
        ctxs = text_contexts(lm, args.texts.split(","), args.tokens, args.continuation)[: args.contexts]
    else:
        ctxs = contexts(lm, args.contexts, args.tokens, args.continuation)
    prepared = []
    for name, ids, cont in ctxs:
        t0 = time.perf_counter()
        kv = prefill(lm, ids)
        prefill_s = time.perf_counter() - t0
        prepared.append((name, kv, cont, continuation_logprobs(lm, kv, cont), prefill_s))
    rows = []
    meths = methods(profile, len(prepared[0][1].layers), [float(x) for x in args.kvq_scales.split(",") if x])
    if args.only:
        keys = args.only.split(",")
        meths = [m for m in meths if any(k in m[0] for k in keys)]
    for label, codec, size_fn in meths:
        tot = {"bytes": 0, "elems": 0, "enc": 0.0, "dec": 0.0, "kl": [], "top1": [], "ppl": []}
        per = []
        for _name, kv, cont, ref, _ in prepared:
            dec, nbytes, es, ds = run_codec(codec, kv, size_fn)
            q = compare(ref, continuation_logprobs(lm, dec, cont), cont)
            elems = sum(lay.key.numel() + lay.value.numel() for lay in kv.layers)
            per.append({"context": _name, "kl": q.kl, "top1": q.top1_agreement, "ratio_vs_fp16": 2 * elems / nbytes})
            tot["bytes"] += nbytes
            tot["elems"] += sum(lay.key.numel() + lay.value.numel() for lay in kv.layers)
            tot["enc"] += es
            tot["dec"] += ds
            tot["kl"].append(q.kl)
            tot["top1"].append(q.top1_agreement)
            tot["ppl"].append(q.perplexity_ratio)
        fp16 = 2 * tot["elems"]
        row = {"method": label, "bits_per_element": 8 * tot["bytes"] / tot["elems"],
               "ratio_vs_fp16": fp16 / tot["bytes"],
               "kl": float(np.mean(tot["kl"])), "kl_max": float(np.max(tot["kl"])),
               "top1": float(np.mean(tot["top1"])), "ppl_ratio": float(np.mean(tot["ppl"])),
               "encode_MBps": fp16 / tot["enc"] / 1e6, "decode_MBps": fp16 / tot["dec"] / 1e6,
               "per_context": per}
        rows.append(row)
        print(f"{label:18s} {row['bits_per_element']:6.3f} b/elt {row['ratio_vs_fp16']:6.2f}x  KL {row['kl']:.5f} "
              f"top1 {row['top1']:.4f} ppl× {row['ppl_ratio']:.4f}  enc {row['encode_MBps']:6.1f} MB/s "
              f"dec {row['decode_MBps']:6.1f} MB/s", file=sys.stderr, flush=True)
    for target in [float(x) for x in args.target_kl.split(",") if x]:
        rows.append(target_row(lm, profile, prepared, target, args.level, args.aim, args.tail))
    prefill_s = float(np.mean([p[4] for p in prepared]))
    print(f"\n{len(prepared)} held-out contexts × {args.tokens} tokens, continuation {args.continuation}; "
          f"mean prefill {prefill_s:.2f} s; profile {profile.sha256[:16] if profile else None}")
    print("| method | bits/elt | × vs fp16 | KL (nats/tok) | top-1 | ppl ratio | encode MB/s | decode MB/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['bits_per_element']:.3f} | {r['ratio_vs_fp16']:.2f} | {r['kl']:.5f} | "
              f"{r['top1']:.4f} | {r['ppl_ratio']:.4f} | {r['encode_MBps']:.1f} | {r['decode_MBps']:.1f} |")
    for r in rows:
        if "target_kl" in r:
            print(f"\n{r['method']}: " + "; ".join(
                f"{c['context']} KL {c['kl']:.5f} (est. {c['estimate']:.5f}, scale {c['scale']:g}, "
                f"{c['ratio_vs_fp16']:.2f}×){'' if c['in_band'] else ' OUT OF BAND'}" for c in r["per_context"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"contexts": [p[0] for p in prepared], "tokens": args.tokens,
                       "continuation": args.continuation, "prefill_s": prefill_s, "rows": rows}, f, indent=1)


def target_row(lm, profile, prepared, target, level, aim=None, tail=None):
    """``kvc encode --target-kl target`` on every context (the file path exactly: tune, encode, open,
    read), scored on the held-out continuation."""
    import kvc
    from kvc.api import encode_kv
    from kvc.codec import targeting
    from kvc.codec.targeting import targeted_entries

    model = model_identity(lm)
    per, total_bytes, total_fp16, enc = [], 0, 0, 0.0
    for name, kv, cont, ref, _ in prepared:
        t0 = time.perf_counter()
        entries = targeted_entries(lm, kv, [level], CHUNK, profile, target_kl=target, aim=aim or targeting.AIM,
                                   tail=tail or targeting.TAIL)
        data = encode_kv(kv, model, [level], CHUNK, profile, level_entries=entries)
        enc += time.perf_counter() - t0
        with kvc.open(data, profile=profile) as f:
            dec, nbytes, fp16 = f.read(level), f.level_bytes(level), f.fp16_bytes()
        q = compare(ref, continuation_logprobs(lm, dec, cont), cont)
        rec = entries[level]["target"]
        per.append({"context": name, "kl": q.kl, "top1": q.top1_agreement, "ratio_vs_fp16": fp16 / nbytes,
                    "estimate": rec["estimate"], "scale": entries[level]["params"]["scale"], "tries": rec["tries"],
                    "in_band": 0.5 * target <= q.kl <= 1.3 * target})
        print(f"  target {target:g} {name}: KL {q.kl:.5f} est {rec['estimate']:.5f} scale "
              f"{entries[level]['params']['scale']:g} tries {rec['tries']} {fp16 / nbytes:.2f}x "
              f"{time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        total_bytes += nbytes
        total_fp16 += fp16
    elems = total_fp16 / 2
    row = {"method": f"kvq target-kl {target:g}", "target_kl": target,
           "bits_per_element": 8 * total_bytes / elems, "ratio_vs_fp16": total_fp16 / total_bytes,
           "kl": float(np.mean([c["kl"] for c in per])), "kl_max": float(np.max([c["kl"] for c in per])),
           "top1": float(np.mean([c["top1"] for c in per])), "ppl_ratio": float("nan"),
           "encode_MBps": total_fp16 / enc / 1e6, "decode_MBps": float("nan"),
           "all_in_band": all(c["in_band"] for c in per), "per_context": per}
    print(f"{row['method']:18s} {row['ratio_vs_fp16']:6.2f}x  KL {row['kl']:.5f} max {row['kl_max']:.5f} "
          f"in band: {row['all_in_band']}", file=sys.stderr, flush=True)
    return row


if __name__ == "__main__":
    main()
