"""Benchmark `kvc eval` on SmolLM2: replay of held-out essay contexts plus a needle sweep.

    .venv/bin/python bench/eval.py --out bench/results/

Contexts are the first ``--context-tokens`` of the first ``--contexts`` evaluation essays long
enough to also give a ``--continuation-tokens`` continuation; every stored level the codec offers
for the model (``--level``, default: every registered level with a usable profile, lossless
always) is encoded, replayed and timed. Writes ``eval.json`` and ``eval.png`` under ``--out``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def _levels(lm, wanted: str | None) -> list[str]:
    import kvc
    from kvc.codec.registry import LOSSLESS, level_names

    if wanted:
        return [v.strip() for v in wanted.split(",") if v.strip()]
    usable = [LOSSLESS]
    for name in level_names():
        if name == LOSSLESS:
            continue
        try:  # a lossy level needs the model's profile; skip levels this install cannot encode
            kvc.encode_tokens(lm, [1, 2, 3, 4], levels=(name,))
            usable.append(name)
        except kvc.errors.KvcError:
            pass
    return usable


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/results", help="folder for eval.json and eval.png")
    parser.add_argument("--contexts", type=int, default=4)
    parser.add_argument("--context-tokens", type=int, default=2048)
    parser.add_argument("--continuation-tokens", type=int, default=256)
    parser.add_argument("--level", default=None, help="levels, comma-separated (default: all usable)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--bandwidth", default="0.1,1,10")
    parser.add_argument("--depths", default="0.1,0.5,0.9")
    parser.add_argument("--lengths", default="1024,2048")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--profile", default=None, help="a profile file for the lossy levels (default: the one kvc "
                        "finds), e.g. codec/profiles/optional/smollm2-135m-mix.kvcp")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from rich.console import Console

    import kvc
    from kvc.evaluation import report
    from kvc.evaluation.needle import evaluate_needle
    from kvc.evaluation.replay import evaluate_tokens
    from kvc.evaluation.timing import parse_bandwidths
    from kvc.samples import essay_text, evaluation_essays

    console = Console(width=200)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bandwidths = parse_bandwidths(args.bandwidth)
    lm = kvc.load_model(None, device=args.device)
    levels = _levels(lm, args.level)
    console.print(
        f"model {lm.name} on {lm.device}, levels {', '.join(levels)}, torch threads "
        f"{__import__('torch').get_num_threads()}"
    )
    started = time.perf_counter()
    results = []
    need = args.context_tokens + args.continuation_tokens
    for name in evaluation_essays():
        if len(results) >= args.contexts:
            break
        ids = lm.tokenizer(essay_text(name))["input_ids"]
        if len(ids) < need:
            continue
        console.print(f"  replay {name} ({args.context_tokens} + {args.continuation_tokens} tokens)")
        results.append(
            evaluate_tokens(
                lm,
                ids[: args.context_tokens],
                ids[args.context_tokens : need],
                levels=levels,
                repeat=args.repeat,
                name=name,
                profile=args.profile,
            )
        )
    depths = [float(v) for v in args.depths.split(",")]
    lengths = [int(v) for v in args.lengths.split(",")]
    console.print(f"  needle sweep: depths {depths} x lengths {lengths}")
    needle = evaluate_needle(lm, depths=depths, lengths=lengths, levels=levels, profile=args.profile)
    console.print(report.replay_table(results, bandwidths))
    console.print(report.needle_table(needle))
    doc = report.to_json(
        results, bandwidths, needle, model={"name": lm.name, "source": lm.source, "device": str(lm.device)}
    )
    doc["wall_seconds"] = time.perf_counter() - started
    (out / "eval.json").write_text(json.dumps(doc, indent=1))
    report.plot(out / "eval.png", results, bandwidths)
    console.print(f"wrote {out / 'eval.json'} and {out / 'eval.png'} in {doc['wall_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
