"""kvc inspect: what a .kvc file holds."""

from __future__ import annotations

import typer
from rich.markup import escape
from rich.table import Table

from kvc.cli._io import open_kvc_arg
from kvc.cli._output import Output, human_bytes, vs_fp16


def describe_params(codec: str, params: dict) -> str:
    """A level's codec parameters in a few words: what a second encoder would need to repeat it."""
    if not isinstance(params, dict):
        return ""
    if codec == "kvq":
        words = []
        if isinstance(params.get("scale"), (int, float)):
            words.append(f"scale {params['scale']:g}")
        if isinstance(params.get("profile"), str):
            words.append(f"profile {params['profile'][:8]}")
        fine = params.get("fine_tokens")
        if isinstance(fine, list) and fine:
            shift = params.get("fine_shift")
            words.append(f"{len(fine)} fine token{'s' if len(fine) != 1 else ''}"
                         + (f" (step ÷{2 ** shift})" if isinstance(shift, int) and 0 < shift <= 8 else ""))
        return " · ".join(words)

    def shown(key, v):  # a transform's name needs no label ("byteplanes"); other settings do ("zstd level 3")
        if isinstance(v, list) and all(isinstance(x, (int, float)) for x in v):
            v = ",".join(f"{x:g}" for x in v)
        elif isinstance(v, (int, float)):
            v = f"{v:g}"
        elif not isinstance(v, str):
            return None
        return v if key == "transform" else f"{key.replace('_', ' ')} {v}"

    return " · ".join(w for w in (shown(k, v) for k, v in params.items()) if w is not None)


def describe_target(target: dict) -> str:
    """A level's ``target`` record (docs/FORMAT.md) in a few words: what was asked, what was measured."""
    kind, value = target.get("kind"), target.get("value")
    if kind == "kl":
        est = target.get("estimate")
        shown = f"{est:.4g}" if isinstance(est, (int, float)) else "?"
        return f"KL {value:g} (estimated {shown} on its last {target.get('tail_tokens')} tokens)"
    if kind == "ratio":
        return f"{value:g}× vs fp16 ({human_bytes(target.get('bytes') or 0)})"
    if kind == "bytes":
        return f"≤ {human_bytes(value)} ({human_bytes(target.get('bytes') or 0)})"
    return str(kind)


def inspect_command(
    file: str = typer.Argument(..., help="A .kvc file, or - for stdin."),
    layers: bool = typer.Option(False, "--layers", help="Show the per-layer byte breakdown."),
    chunks: bool = typer.Option(False, "--chunks", help="Include the chunk index."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON (always includes per-layer bytes)."),
) -> None:
    """Show the model, context, chunks, levels and sizes inside a .kvc file.

    Reads the header only (its checksum included): payload checksums are checked by kvc verify.

    Examples:

      kvc inspect essay.kvc

      kvc inspect essay.kvc --layers

      kvc inspect essay.kvc --json | jq .levels
    """
    from kvc.describe import describe

    with open_kvc_arg(file, header_only=True) as f:
        info = describe(f, with_chunks=chunks)
        for lv in info["levels"]:  # a level tuned for this file (kvc encode --target-kl ...) says to what
            entry = f.header["levels"][lv["name"]]
            target = entry.get("target")
            if isinstance(target, dict):
                lv["target"] = target
            lv["params"] = entry.get("params", {})
    info["payloads_checked"] = False  # inspect reads the header; `kvc verify` reads and checks every payload

    def render(console):
        m = info["model"]
        console.print(f"[bold]{escape(info['file'])}[/bold]  (.kvc {info['format_version']}, {info['created_by']})")
        console.print("checked   the header and its checksum only, not the payloads: `kvc verify` reads them all")
        console.print(
            f"model     {m['name']} · {m['architecture']} · {m['dtype']} · source {m['source']}", markup=False
        )
        console.print(
            f"layout    {info['layers']} layers · {info['kv_heads']} KV heads · head dim {info['head_dim']}"
            + (f" · sliding layers {info['sliding_layers']}" if info["sliding_layers"] else "")
        )
        console.print(
            f"context   {info['tokens']} tokens · {info['chunks']} chunks of {info['chunk_tokens']}"
            + (f" · from {info['source']}" if info["source"] else ""),
            markup=False,
        )
        console.print(
            f"cache     stored in {info['dtype']} · {human_bytes(info['fp16_bytes'])} as raw fp16 (the yardstick below)"
        )
        table = Table("level", "codec")
        for header in ("bytes", "vs fp16", "bits/elem"):
            table.add_column(header, justify="right")
        table.add_column("settings")
        tuned = any("target" in lv for lv in info["levels"])
        if tuned:
            table.add_column("tuned for")
        for lv in info["levels"]:
            row = [
                lv["name"],
                lv["codec"],
                human_bytes(lv["bytes"]),
                vs_fp16(lv["bytes"], info["fp16_bytes"], short=True),
                f"{lv['bits_per_element']:.2f}",
                escape(describe_params(lv["codec"], lv["params"])),
            ]
            if tuned:
                row.append(escape(describe_target(lv["target"])) if "target" in lv else "")
            table.add_row(*row)
        console.print(table)
        if layers:
            names = [lv["name"] for lv in info["levels"]]
            per_layer = Table("layer", *[f"{n} key" for n in names], *[f"{n} value" for n in names])
            for i in range(info["layers"]):
                row = [human_bytes(lv["layer_bytes"][i]["key"]) for lv in info["levels"]]
                row += [human_bytes(lv["layer_bytes"][i]["value"]) for lv in info["levels"]]
                per_layer.add_row(str(i), *row)
            console.print(per_layer)
        if chunks:
            for c in info["chunk_index"]:
                console.print(
                    f"  chunk {c['start']}:{c['end']}  "
                    + "  ".join(f"{k}={human_bytes(v)}" for k, v in c["encodings"].items())
                )

    Output(json_out).result(info, render)
