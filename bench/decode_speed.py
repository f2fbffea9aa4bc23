"""Decode speed per level, per thread count, on the CPU or a CUDA GPU; encode speed; v2 vs v1 size.

    .venv/bin/python bench/decode_speed.py [--contexts 2] [--tokens 2048] [--threads 1,2] [--repeat 5]
    .venv/bin/python bench/decode_speed.py --synthetic 32,8,128,16384 --device cuda   # an 8B model's 16k context

Default source: held-out essays prefilled by the embedded SmolLM2 (fp32). ``--synthetic
LAYERS,KV_HEADS,HEAD_DIM,TOKENS`` instead makes a cache of that shape (Gaussian coefficients with
a decaying spectrum) and a matching synthetic profile, so a GPU can be measured at a real model's
size without its weights. Decode is timed from the file's bytes in memory to tensors on the device
(header checks and every payload's checksum included), best of --repeat (thread counts interleaved
round by round; ``paired`` is the median over rounds of one round's 1-thread time over its 2-thread
time), and quoted as MB/s of fp16
KV produced (2 bytes per element, whatever the stored dtype). ``v2/v1`` is the size of the version-2
lane bitstream over what version 1 (one constriction stream per segment) writes for the same symbols.
``by chunk`` (CPU) decodes the same level chunk by chunk with one thread, as the streaming loader
does, from payloads already read and checked (so no checksum in it). ``--ceiling`` adds what two threads
give on this machine at all for a plain matrix product, a numba integer loop and a streaming copy of
256 MiB in numba (memory bandwidth). Prints a table;
``--json PATH`` writes the rows.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kvc  # noqa: E402
from kvc.api import decode_chunk  # noqa: E402
from kvc.runtime.kv import ContextKV, LayerKV  # noqa: E402


def synthetic(layers: int, heads: int, dim: int, tokens: int, seed: int = 0, mix: bool = False):
    """(cache, profile, model identity) of the given shape: identity PCA, no rotary, σ_d = 4·0.9^d; with
    ``mix`` a version-4 profile whose ``mix`` is a random rotation across the heads (unit steps), so the
    cost of synthesising every head from all heads' coefficients is measured at that size."""
    from kvc.codec.profile import GRID, SINKS, Profile

    sigma = (4.0 * 0.9 ** np.arange(dim)).astype(np.float32)
    grid = np.linspace(*GRID[:2], GRID[2])
    from math import erf

    cdf = np.array([0.5 * (1 + erf(g / 2**0.5)) for g in grid], dtype=np.float32)
    identity = {"name": f"synthetic-{layers}x{heads}x{dim}", "config_sha256": "0" * 64, "weights_sha256": "0" * 64,
                "tokenizer_sha256": "0" * 64}  # fmt: skip
    arrays = {
        "mean": np.zeros((layers, 2, heads, dim), np.float32),
        "basis": np.broadcast_to(np.eye(dim, dtype=np.float16), (layers, 2, heads, dim, dim)).copy(),
        "sigma": np.broadcast_to(sigma, (layers, 2, heads, dim)).copy(),
        "cdf": np.broadcast_to(cdf, (layers, 2, GRID[2])).copy(),
        "base_step": np.ones((layers, 2, heads), np.float32),
        "sensitivity": np.ones((layers, 2, heads), np.float32),
    }
    g = torch.Generator().manual_seed(seed)
    if mix:
        n = heads * dim
        rot = torch.linalg.qr(torch.randn(layers * 2, n, n, generator=g, dtype=torch.float64))[0]
        arrays["step"] = np.ones((layers, 2, heads, dim), np.float32)
        arrays["mix"] = rot.numpy().astype(np.float16).reshape(layers, 2, n, n)
    profile = Profile(identity=identity, layers=layers, heads=heads, key_dim=dim, value_dim=dim, rotary=None,
                      sinks=SINKS, arrays=arrays)  # fmt: skip
    std = torch.from_numpy(sigma)
    kv = ContextKV(token_ids=[1] * tokens, layers=[
        LayerKV(key=(torch.randn(heads, tokens, dim, generator=g) * std).half(),
                value=(torch.randn(heads, tokens, dim, generator=g) * std).half()) for _ in range(layers)])  # fmt: skip
    return kv, profile, identity


def v1_bytes(codec, kv: ContextKV, chunk_tokens: int) -> int:
    """What a version-1 kvq file's payload would hold for the same symbols (constriction stack ANS)."""
    from kvc.codec.quantizers import pack_sinks, sink_count

    total = 0
    if hasattr(codec, "bind_tokens"):  # the same symbols version 2 codes, fine rows included
        codec.bind_tokens(kv.token_ids)
    for i, layer in enumerate(kv.layers):
        for k, t in enumerate((layer.key, layer.value)):
            for a in range(0, kv.num_tokens, chunk_tokens):
                piece = t[:, a : a + chunk_tokens]
                H, T, D = piece.shape
                n_sink = sink_count(a, T, codec.sinks)
                total += 4 + (len(pack_sinks(piece[:, :n_sink])) if n_sink else 0)
                if T == n_sink:
                    continue
                q = codec._symbols(piece[:, n_sink:], a + n_sink, i, k, D)  # what version 2 codes, mixed or not
                sym = q.transpose(0, 2, 1).reshape(H * D, T - n_sink)
                flags, excess, words = codec.bank(i, k, D).encode(sym)
                total += (H * D + 7) // 8 + 8 + 4 * len(excess) + 4 * len(words)
    return total


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def machine_ceiling(repeat: int) -> dict:
    """What two threads can give on this machine at all, measured the way the decoder uses them
    (interleaved rounds, median of paired ratios): a float32 matrix product (torch's own threads, as the
    synthesis), a branchy integer loop in numba run from two Python threads (as the lane kernel), and a
    streaming copy of 256 MB in numba from two Python threads (memory bandwidth, as zstd and the plane
    join of lossless, which write ~0.9 GB/s of output per thread)."""
    import threading

    import numba

    @numba.njit(nogil=True, cache=False)
    def spin(n: int) -> int:
        x = 12345
        for i in range(n):
            x = (x * 1103515245 + 12345) & 0x7FFFFFFF
            if x & 1:
                x ^= i
        return x

    @numba.njit(nogil=True, cache=False)
    def stream(src, dst, lo: int, hi: int) -> None:
        for i in range(lo, hi):
            dst[i] = src[i] + 1

    n = 30_000_000
    spin(10)
    a = torch.randn(1024, 1024)
    src, dst = np.ones(32 << 20, np.float64), np.empty(32 << 20, np.float64)  # 256 MB each: far past any cache
    stream(src, dst, 0, 10)

    def mm(threads: int) -> float:
        torch.set_num_threads(threads)
        t = time.perf_counter()
        for _ in range(20):
            torch.mm(a, a)
        return time.perf_counter() - t

    def timed(parts: list) -> float:  # seconds from starting the threads to the last one ending
        t = time.perf_counter()
        for p in parts:
            p.start()
        for p in parts:
            p.join()
        return time.perf_counter() - t

    def loop(threads: int) -> float:  # the same total work on 1 or 2 threads
        return timed([threading.Thread(target=spin, args=(n // threads,)) for _ in range(threads)])

    def copy(threads: int) -> float:
        share = len(src) // threads
        return timed([threading.Thread(target=stream, args=(src, dst, i * share, (i + 1) * share))
                      for i in range(threads)])

    out = {}
    for name, fn in (("matmul", mm), ("integer_loop", loop), ("memory_copy", copy)):
        fn(1), fn(2)
        pairs = [(fn(1), fn(2)) for _ in range(repeat)]
        out[name] = float(np.median([x / y for x, y in pairs]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--levels", default="lossless,balanced")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--synthetic", default=None, help="LAYERS,KV_HEADS,HEAD_DIM,TOKENS instead of SmolLM2")
    parser.add_argument("--no-v1", action="store_true", help="skip the version-1 size comparison")
    parser.add_argument("--json", default=None)
    parser.add_argument("--mix", action="store_true", help="with --synthetic: a version-4 (mixed) profile")
    parser.add_argument("--profile", default=None, help="a profile file for the model (default: the one kvc finds)")
    parser.add_argument("--ceiling", action="store_true", help="also measure what 2 threads give on this "
                        "machine for a plain matrix product and a numba integer loop (the decoder's two halves) "
                        "and a 256 MiB memory copy (memory bandwidth)")
    args = parser.parse_args()
    levels, threads = args.levels.split(","), [int(t) for t in args.threads.split(",")]
    default_torch_threads = torch.get_num_threads()
    contexts = []  # (name, kv, identity, profile or None, prefill seconds or None)
    if args.synthetic:
        L, H, D, T = (int(v) for v in args.synthetic.split(","))
        kv, profile, identity = synthetic(L, H, D, T, mix=args.mix)
        contexts.append((f"synthetic {L}x{H}x{D}, {T} tok", kv, identity, profile, None))
    else:
        from kvc.runtime.identity import model_identity
        from kvc.samples import essay_text, evaluation_essays

        lm = kvc.load_model(None, device="cpu")
        identity = model_identity(lm)
        names = [n for n in evaluation_essays() if len(kvc.tokenize(lm, essay_text(n))) >= args.tokens]
        for name in names[: args.contexts]:
            ids = kvc.tokenize(lm, essay_text(name))[: args.tokens]
            t = time.perf_counter()
            kv = kvc.prefill(lm, ids)
            prof = None
            if args.profile:
                from kvc.codec.profile import Profile

                prof = Profile.load(args.profile)
            contexts.append((name, kv, identity, prof, time.perf_counter() - t))
    rows = []
    for name, kv, identity, profile, prefill_s in contexts:
        elements = kv.nbytes() // kv.layers[0].key.element_size()
        for level in levels:
            torch.set_num_threads(default_torch_threads)
            t = time.perf_counter()
            data = kvc.encode_kv(kv, identity, [level], profile=profile)
            encode_s = time.perf_counter() - t
            f = kvc.open(data, profile=profile)
            row = {"context": name, "level": level, "stored_dtype": f.header["dtype"], "bytes": f.level_bytes(level),
                   "fp16_bytes": 2 * elements, "encode_s": encode_s, "prefill_s": prefill_s,
                   "device": args.device}  # fmt: skip
            if level != "lossless" and not args.no_v1 and f.header["levels"][level]["codec"] == "kvq":
                row["v2_over_v1"] = row["bytes"] / v1_bytes(f._codec(level), kv, f.header["chunk_tokens"])
            counts = threads if args.device == "cpu" else [0]

            def read(n: int, data=data, profile=profile, level=level) -> float:
                if n:
                    torch.set_num_threads(n)
                sync(args.device)
                t = time.perf_counter()
                kvc.open(data, profile=profile).read(level, device=args.device, threads=n or None)
                sync(args.device)
                return time.perf_counter() - t

            for n in counts:
                read(n)  # warm: tables
            # Thread counts interleaved, round after round: a 2-vCPU VM's speed drifts by ±30% over
            # seconds, so each round's counts see the same machine and their ratio is a fair pair.
            times = {n: [] for n in counts}
            for _ in range(args.repeat):
                for n in counts:
                    times[n].append(read(n))
            for n in counts:
                row[f"decode_s_{n}"] = min(times[n])
                row[f"mbps_{n}"] = 2 * elements / min(times[n]) / 1e6
                row[f"median_mbps_{n}"] = 2 * elements / float(np.median(times[n])) / 1e6
            if 1 in counts and 2 in counts:
                row["paired_ratio_2_1"] = float(np.median([a / b for a, b in zip(times[1], times[2])]))
            if args.device == "cpu":  # as the streaming loader decodes: chunk by chunk, checked payloads in hand
                f = kvc.open(data, profile=profile)
                chunks = [f._container.payload(i, level) for i in range(len(f.header["chunks"]))]
                codec = f._codec(level)
                torch.set_num_threads(1)
                best = float("inf")
                for _ in range(args.repeat + 1):  # the first is a warm-up
                    t = time.perf_counter()
                    for i, (enc, payload) in enumerate(chunks):
                        decode_chunk(f.header, codec, i, enc, payload, f.dtype, threads=1)
                    best = min(best, time.perf_counter() - t)
                row["chunked_mbps_1"] = 2 * elements / best / 1e6
            rows.append(row)
    torch.set_num_threads(default_torch_threads)
    cols = threads if args.device == "cpu" else [0]
    table = Table(title=f"decode speed on {args.device} ({torch.get_num_threads()} cores seen); MB/s of fp16 KV")
    for col in ["context", "level", "stored", "ratio vs fp16", "v2/v1", "encode s", "prefill s"] + [
            f"{'GPU' if n == 0 else f'{n} thr'} MB/s" for n in cols] + (["2 thr / 1 thr"] if 1 in cols and 2 in cols
                                                                        else []) + (
            ["by chunk 1 thr MB/s"] if args.device == "cpu" else []):  # fmt: skip
        table.add_column(col, justify="left" if col in ("context", "level", "stored") else "right")
    for r in rows:
        cells = [r["context"], r["level"], r["stored_dtype"], f"{r['fp16_bytes'] / r['bytes']:.2f}×",
                 f"{r['v2_over_v1']:.4f}" if "v2_over_v1" in r else "—", f"{r['encode_s']:.2f}",
                 f"{r['prefill_s']:.2f}" if r["prefill_s"] else "—"] + [f"{r[f'mbps_{n}']:.0f}" for n in cols]
        if 1 in cols and 2 in cols:
            cells.append(f"{r['mbps_2'] / r['mbps_1']:.2f}× (paired {r['paired_ratio_2_1']:.2f}×)")
        if "chunked_mbps_1" in r:
            cells.append(f"{r['chunked_mbps_1']:.0f}")
        table.add_row(*cells)
    Console(width=170).print(table)
    if args.ceiling:
        ceiling = machine_ceiling(args.repeat)
        torch.set_num_threads(default_torch_threads)
        print("machine ceiling, 2 threads over 1 (median of paired rounds): "
              + ", ".join(f"{k} {v:.2f}×" for k, v in ceiling.items()))
        rows.append({"machine_ceiling_2_over_1": ceiling})
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
