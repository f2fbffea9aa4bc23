"""Foundation benchmark: prefill, lossless encode and decode on SmolLM2 over 2,048-token essay contexts.

    .venv/bin/python bench/foundation.py [--contexts 3] [--tokens 2048] [--json out.json]

Prints one row per context and a mean row: prefill time, encode time (codec + container, after
prefill), decode time (open + checksum + decode), file bytes, the ratio against raw fp16 and
against plain zstd-3 of the model's own KV bytes."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import zstandard
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kvc  # noqa: E402
from kvc.runtime.identity import model_identity  # noqa: E402
from kvc.samples import essay_text, evaluation_essays  # noqa: E402


def contexts(lm, count: int, tokens: int) -> list[tuple[str, list[int]]]:
    out = []
    for name in evaluation_essays():
        ids = kvc.tokenize(lm, essay_text(name))
        if len(ids) >= tokens:
            out.append((name, ids[:tokens]))
        if len(out) == count:
            break
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    lm = kvc.load_model(None, device=args.device)
    identity = model_identity(lm)
    rows = []
    for name, ids in contexts(lm, args.contexts, args.tokens):
        t0 = time.perf_counter()
        kv = kvc.prefill(lm, ids)
        t1 = time.perf_counter()
        data = kvc.encode_kv(kv, identity, prefill_info={"slice_tokens": 512})
        t2 = time.perf_counter()
        decoded = kvc.open(data).read()
        t3 = time.perf_counter()
        assert decoded.equal(kv), "lossless round trip is not exact"
        raw = b"".join(t.contiguous().numpy().tobytes() for layer in kv.layers for t in (layer.key, layer.value))
        plain_zstd = len(zstandard.ZstdCompressor(level=3).compress(raw))
        fp16 = kv.nbytes() // kv.layers[0].key.element_size() * 2
        rows.append(
            {
                "context": name,
                "tokens": len(ids),
                "prefill_s": t1 - t0,
                "encode_s": t2 - t1,
                "decode_s": t3 - t2,
                "file_bytes": len(data),
                "raw_bytes": kv.nbytes(),
                "fp16_bytes": fp16,
                "ratio_vs_fp16": fp16 / len(data),
                "ratio_vs_raw": kv.nbytes() / len(data),
                "ratio_vs_plain_zstd": plain_zstd / len(data),
                "plain_zstd_bytes": plain_zstd,
            }
        )
    table = Table(
        title=f"kvc lossless on {lm.name} ({identity['dtype']}), {args.tokens}-token contexts, device {args.device}"
    )
    for col in (
        "context",
        "prefill s",
        "encode s",
        "decode s",
        "file MiB",
        "× vs fp16",
        f"× vs raw {identity['dtype']}",
        "× vs plain zstd",
    ):
        table.add_column(col, justify="left" if col == "context" else "right")
    mean = {k: statistics.mean(r[k] for r in rows) for k in rows[0] if k not in ("context",)}
    for r in [*rows, {"context": "mean", **mean}]:
        table.add_row(
            r["context"],
            f"{r['prefill_s']:.2f}",
            f"{r['encode_s']:.2f}",
            f"{r['decode_s']:.2f}",
            f"{r['file_bytes'] / 2**20:.2f}",
            f"{r['ratio_vs_fp16']:.3f}",
            f"{r['ratio_vs_raw']:.3f}",
            f"{r['ratio_vs_plain_zstd']:.3f}",
        )
    Console(width=160).print(table)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps({"rows": rows, "mean": mean}, indent=2))


if __name__ == "__main__":
    main()
