"""Load + decode of a stored context against re-reading it, per level, on this machine.

    .venv/bin/python bench/load_vs_prefill.py [--contexts 2] [--tokens 2048] [--levels lossless,high,balanced,compact]

For each held-out essay context: the median of --repeat prefills (the text path) and, per level,
the median time to read the .kvc bytes from disk, open it (header checks) and decode every chunk
(checksums verified) into plain tensors; the decode throughput is quoted in fp16-equivalent MB/s
(2 bytes per element produced), the unit of the codec targets."""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kvc  # noqa: E402
from kvc.runtime.identity import model_identity  # noqa: E402
from kvc.samples import essay_text, evaluation_essays  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--levels", default="lossless,high,balanced,compact")
    args = parser.parse_args()
    levels = args.levels.split(",")
    lm = kvc.load_model(None, device="cpu")
    identity = model_identity(lm)
    folder = Path(tempfile.mkdtemp())
    rows = []
    names = [n for n in evaluation_essays() if len(kvc.tokenize(lm, essay_text(n))) >= args.tokens][: args.contexts]
    for name in names:
        ids = kvc.tokenize(lm, essay_text(name))[: args.tokens]
        prefills = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            kv = kvc.prefill(lm, ids)
            prefills.append(time.perf_counter() - t)
        prefill_s = statistics.median(prefills)
        elements = kv.nbytes() // kv.layers[0].key.element_size()
        for level in levels:
            path = folder / f"{level}.kvc"
            kvc.save(path, kvc.encode_kv(kv, identity, [level]))
            kvc.open(path).read()  # warm: the profile's coding tables are built once per process
            times = []
            for _ in range(args.repeat):
                t = time.perf_counter()
                kvc.open(path.read_bytes()).read()
                times.append(time.perf_counter() - t)
            load_s = statistics.median(times)
            rows.append({"context": name, "level": level, "bytes": path.stat().st_size, "prefill_s": prefill_s,
                         "load_s": load_s, "mbps": 2 * elements / load_s / 1e6, "speedup": prefill_s / load_s})
    table = Table(title=f"load + decode vs prefill, {lm.name}, {args.tokens} tokens, CPU, "
                        f"{torch.get_num_threads()} torch threads")
    for col in ("context", "level", "file MiB", "prefill s", "load+decode s", "fp16 MB/s", "× faster than prefill"):
        table.add_column(col, justify="left" if col in ("context", "level") else "right")
    for r in rows:
        table.add_row(r["context"], r["level"], f"{r['bytes'] / 2**20:.2f}", f"{r['prefill_s']:.2f}",
                      f"{r['load_s']:.3f}", f"{r['mbps']:.0f}", f"{r['speedup']:.1f}")
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
