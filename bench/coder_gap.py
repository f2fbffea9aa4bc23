"""How much kvq's entropy models leave on the table: the symbols' information content under the profile's
models against an oracle that knew each channel's distribution in each 256-token chunk.

    .venv/bin/python bench/coder_gap.py [--level balanced] [--contexts essay:apple.txt,legal,code] [--json PATH]

For each held-out context (the default model, its shipped profile) every (layer, kind, chunk) segment is
quantised as kvq does; ``model`` is the information content of its symbols under the profile's
per-channel models (what the rANS coder writes, within 1%), ``oracle`` the summed empirical entropy of each
channel's symbols within the chunk (side information free, so a lower bound on what per-chunk adaptive
tables could reach). Flags, escapes, sinks and segment heads are left out of both. Prints a table."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def empirical_bits(row: np.ndarray) -> float:
    _, counts = np.unique(row, return_counts=True)
    return float(-(counts * np.log2(counts / len(row))).sum())


def measure(lm, codec, ids, chunk: int = 256) -> dict:
    from kvc.codec.base import Segment
    from kvc.codec.quantizers import quantize_uniform
    from kvc.codec.transforms import unrotate_keys
    from kvc.runtime.prefill import prefill

    kv = prefill(lm, ids)
    model = oracle = 0.0
    elements = 0
    for li, lay in enumerate(kv.layers):
        for k, kind in enumerate(("key", "value")):
            t = getattr(lay, kind)
            for a in range(0, t.shape[1], chunk):
                x = t[:, a : a + chunk].contiguous()
                start = lay.start + a
                seg = Segment(layer=li, kind=kind, start=start, shape=tuple(x.shape), dtype=x.dtype)
                model += codec.model_bits(x, seg)[0]
                sinks = max(0, min(codec.sinks - start, x.shape[1]))
                body = x[:, sinks:].double()
                if k == 0 and codec._inv_freq(li) is not None:
                    body = unrotate_keys(body, start + sinks, codec._inv_freq(li))
                mean, analysis, *_ = codec._matrices(li, k, x.shape[2])
                q = quantize_uniform(torch.bmm(body - mean[:, None, :], analysis), codec.steps(li, k))
                for row in q.transpose(0, 2, 1).reshape(-1, q.shape[1]):
                    if row.any():
                        oracle += empirical_bits(row)
                elements += x.numel()
    return {"model_bits_per_element": model / elements, "oracle_bits_per_element": oracle / elements,
            "gap": (model - oracle) / model}


def main(argv=None) -> None:
    from rich.console import Console
    from rich.table import Table

    from codec import text_contexts
    from kvc.codec.profile import find_profile
    from kvc.codec.registry import build_codec, level_entry
    from kvc.runtime.identity import model_identity
    from kvc.runtime.loading import load_model
    from kvc.runtime.prefill import tokenize
    from kvc.samples import essay_text

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--level", default="balanced")
    ap.add_argument("--contexts", default="essay:apple.txt,legal,code")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    lm = load_model(None, device="cpu")
    prof = find_profile(model_identity(lm), None)
    prof = prof.with_fine_tokens(None)  # the oracle below sees the plain symbols: so must the coder's models
    codec = build_codec(level_entry(args.level, prof), prof)
    rows = []
    for spec in args.contexts.split(","):
        if spec.startswith("essay:"):
            name, ids = spec[6:], tokenize(lm, essay_text(spec[6:]))[: args.tokens]
        else:
            name, ids, _ = text_contexts(lm, [spec], args.tokens, 0)[0]
        rows.append({"context": name, "level": args.level, **measure(lm, codec, ids)})
    table = Table(title=f"kvq models against a per-chunk oracle, level {args.level}; bits per element")
    for col in ("context", "model", "oracle", "gap"):
        table.add_column(col, justify="left" if col == "context" else "right")
    for r in rows:
        table.add_row(r["context"], f"{r['model_bits_per_element']:.3f}", f"{r['oracle_bits_per_element']:.3f}",
                      f"{100 * r['gap']:.1f}%")
    Console(width=120).print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
