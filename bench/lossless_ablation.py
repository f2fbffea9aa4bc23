"""Lossless ablation: which transform before zstd makes a float KV cache smallest, and at what speed.

    .venv/bin/python bench/lossless_ablation.py [--tokens 1024] [--essay apple.txt] [--dtype float32] [--json out.json]

Prefills one held-out essay on the embedded SmolLM2, cuts its KV into 256-token chunks and one
segment per (layer, key|value), as a .kvc file does, and compresses every segment with each variant:

* plain zstd-3 of the tensor's bytes;
* byte planes + zstd-3 (what the `lossless` codec does: all first bytes of the elements, then all
  second bytes, ...);
* byte planes of each token XOR the previous token + zstd-3;
* byte planes + zstd-19.

Reports each variant's size as a ratio against the raw bytes and its compression speed."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kvc  # noqa: E402
from kvc.defaults import DEFAULT_CHUNK_TOKENS  # noqa: E402
from kvc.samples import essay_text, evaluation_essays  # noqa: E402


def planes(raw: np.ndarray) -> bytes:
    """[elements, itemsize] bytes -> all first bytes, then all second bytes, ..."""
    return np.ascontiguousarray(raw.T).tobytes()


def variants():
    z3, z19 = zstandard.ZstdCompressor(level=3), zstandard.ZstdCompressor(level=19)

    def plain(a: np.ndarray) -> bytes:
        return z3.compress(a.tobytes())

    def byte_planes(a: np.ndarray) -> bytes:
        return z3.compress(planes(a.reshape(-1).view(np.uint8).reshape(-1, a.itemsize)))

    def xor_previous(a: np.ndarray) -> bytes:  # a: [heads, tokens, dim]
        bits = a.view(np.dtype(f"u{a.itemsize}")).copy()
        bits[:, 1:] ^= bits[:, :-1].copy()
        return z3.compress(planes(bits.reshape(-1).view(np.uint8).reshape(-1, a.itemsize)))

    def planes_19(a: np.ndarray) -> bytes:
        return z19.compress(planes(a.reshape(-1).view(np.uint8).reshape(-1, a.itemsize)))

    return [
        ("plain zstd-3", plain),
        ("byte planes + zstd-3 (lossless codec)", byte_planes),
        ("byte planes + XOR previous token + zstd-3", xor_previous),
        ("byte planes + zstd-19", planes_19),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--essay", default=None, help="Default: the first held-out essay long enough.")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    lm = kvc.load_model(None, device="cpu", dtype=args.dtype)
    names = [args.essay] if args.essay else evaluation_essays()
    name, ids = next((n, i) for n in names if len(i := kvc.tokenize(lm, essay_text(n))) >= args.tokens)
    kv = kvc.prefill(lm, ids[: args.tokens])
    segments = []
    for start in range(0, kv.num_tokens, DEFAULT_CHUNK_TOKENS):
        for layer in kv.layers:
            for tensor in (layer.key, layer.value):
                segments.append(tensor[:, start : start + DEFAULT_CHUNK_TOKENS].contiguous().numpy())
    raw = sum(s.nbytes for s in segments)
    rows = []
    for label, compress in variants():
        started = time.perf_counter()
        size = sum(len(compress(s)) for s in segments)
        seconds = time.perf_counter() - started
        rows.append({"variant": label, "bytes": size, "ratio_vs_raw": raw / size, "mb_per_s": raw / 1e6 / seconds})
    print(f"{name}, {kv.num_tokens} tokens, {lm.name} in {str(lm.dtype).removeprefix('torch.')}: {raw} raw bytes")
    print("| variant | × smaller than raw | compress MB/s |")
    print("|---|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['ratio_vs_raw']:.3f} | {r['mb_per_s']:.0f} |")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps({"essay": name, "tokens": kv.num_tokens, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
