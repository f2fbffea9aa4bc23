"""Render evaluation results: rich tables for a terminal, one JSON document, a matplotlib figure."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path

from kvc.evaluation.replay import ContextResult

_KIND_ORDER = {"text": 0, "exact": 1, "level": 2, "transform": 3}


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def aggregate(results: Sequence[ContextResult], bandwidths: Sequence[float] = ()) -> dict:
    """Per mode over contexts: mean quality, median time, total bytes (bits per element over all elements)."""
    modes: dict[str, list] = {}
    for r in results:
        for m in r.modes:
            modes.setdefault(m.mode, []).append((r, m))
    out = {}
    for mode, pairs in modes.items():
        ms = [m for _, m in pairs]
        elements = sum(r.elements for r, _ in pairs)
        nbytes = sum(m.transfer_bytes for m in ms)
        out[mode] = {
            "kind": ms[0].kind,
            "contexts": len(ms),
            "bytes": nbytes,
            "bits_per_element": nbytes * 8 / max(elements, 1),
            "perplexity_ratio": statistics.fmean(m.scores.perplexity_ratio for m in ms),
            "kl": statistics.fmean(m.scores.kl for m in ms),
            "top1_agreement": statistics.fmean(m.scores.top1_agreement for m in ms),
            "ttft": {
                step: statistics.median(getattr(m.timing, step) for m in ms)
                for step in ("read", "decode", "build", "first", "total")
            },
            "ttft_at_bandwidth": {f"{b:g}": statistics.median(m.ttft_at(b) for m in ms) for b in bandwidths},
        }
    return out


def _replay_rows(results: Sequence[ContextResult], bandwidths: Sequence[float]):
    """Per context and mode, then (with several contexts) the aggregate: dicts of what any table shows.
    ``label`` is the context name on a section's first row and its token count on the second."""
    for r in results:
        text_total = r.mode("text").timing.total if any(m.mode == "text" for m in r.modes) else 0.0
        modes = sorted(r.modes, key=lambda m: _KIND_ORDER.get(m.kind, 9))
        for i, m in enumerate(modes):
            d = m.as_dict(bandwidths)
            yield {
                "label": r.name if i == 0 else f"{r.tokens} tokens" if i == 1 else "",
                "context": r.name,
                "mode": m.mode,
                "bits": m.bits_per_element,
                "bytes": m.transfer_bytes,
                "ppl": d["perplexity_ratio"],
                "kl": d["kl"],
                "top1": d["top1_agreement"],
                "ttft": d["ttft"],
                "text_total": text_total,
                "at": d["ttft_at_bandwidth"],
                "end": i == len(modes) - 1,
            }
    if len(results) > 1:
        agg = aggregate(results, bandwidths)
        text_total = agg.get("text", {}).get("ttft", {}).get("total", 0.0)
        ordered = sorted(agg.items(), key=lambda kv: _KIND_ORDER.get(kv[1]["kind"], 9))
        for i, (mode, a) in enumerate(ordered):
            yield {
                "label": f"all {len(results)}" if i == 0 else "contexts" if i == 1 else "",
                "context": "all",
                "mode": mode,
                "bits": a["bits_per_element"],
                "bytes": a["bytes"],
                "ppl": a["perplexity_ratio"],
                "kl": a["kl"],
                "top1": a["top1_agreement"],
                "ttft": a["ttft"],
                "text_total": text_total,
                "at": a["ttft_at_bandwidth"],
                "end": i == len(ordered) - 1,
            }


def _vs_text(row: dict) -> str:
    return f"{row['ttft']['total'] / row['text_total']:.2f}x" if row["text_total"] > 0 else "-"


# (header, cell) for the columns of the replay tables; the compact ones fit 100 columns together.
_QUALITY_COLUMNS = [
    ("bits/elt", lambda r: f"{r['bits']:.2f}"),
    ("MB", lambda r: f"{r['bytes'] / 1e6:.2f}"),
    ("ppl ratio", lambda r: f"{r['ppl']:.4f}"),
    ("KL nats", lambda r: f"{r['kl']:.2e}"),
    ("top-1", lambda r: f"{r['top1']:.3f}"),
]
_BREAKDOWN_COLUMNS = [
    (step, lambda r, step=step: _ms(r["ttft"][step])) for step in ("read", "decode", "build", "first")
]
_TTFT_COLUMNS = [("TTFT ms", lambda r: _ms(r["ttft"]["total"])), ("vs text", _vs_text)]


def _bandwidth_columns(bandwidths: Sequence[float]):
    return [(f"@{b:g} Gb/s", lambda r, key=f"{b:g}": _ms(r["at"][key])) for b in bandwidths]


def _table(title: str, rows: list[dict], columns, context_width: int | None):
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    table.add_column("context", justify="left", max_width=context_width, overflow="fold")
    table.add_column("mode", justify="left", no_wrap=True)
    for header, _ in columns:
        table.add_column(header, justify="right", no_wrap=True)
    for row in rows:
        table.add_row(row["label"], row["mode"], *(cell(row) for _, cell in columns), end_section=row["end"])
    return table


def replay_tables(results: Sequence[ContextResult], bandwidths: Sequence[float] = (), wide: bool = False) -> list:
    """The replay as rich tables. By default two that each fit 100 columns (quality, size and TTFT; then
    TTFT over each modelled bandwidth); ``wide``: one table with the TTFT breakdown too (~170 columns)."""
    rows = list(_replay_rows(results, bandwidths))
    if wide:
        return [replay_table(results, bandwidths)]
    tables = [
        _table(
            "kvc eval: replay (quality vs the exact cache; time to first token in ms)",
            rows,
            _QUALITY_COLUMNS + _TTFT_COLUMNS,
            context_width=16,
        )
    ]
    if bandwidths:
        tables.append(
            _table("TTFT (ms) with the cache sent over a link", rows, _bandwidth_columns(bandwidths), context_width=16)
        )
    return tables


def replay_table(results: Sequence[ContextResult], bandwidths: Sequence[float] = (), title: str | None = None):
    """Every column in one table (``kvc eval --wide``, the benchmark): one row per (context, mode),
    the aggregate rows close it when there are several contexts."""
    rows = list(_replay_rows(results, bandwidths))
    columns = _QUALITY_COLUMNS + _BREAKDOWN_COLUMNS + _TTFT_COLUMNS + _bandwidth_columns(bandwidths)
    return _table(title or "kvc eval: replay (quality vs exact cache; time to first token, ms)", rows, columns, None)


def needle_table(needle) -> object:
    from rich.table import Table

    summary = needle.summary()
    modes = list(summary["modes"])
    table = Table(title="kvc eval: needle retrieval (exact-match accuracy)")
    table.add_column("length", justify="right")
    table.add_column("depth", justify="right")
    for mode in modes:
        table.add_column(mode, justify="right")
    for key, row in summary["cells"].items():
        length, depth = key.split("@")
        table.add_row(length, depth, *(_acc(row.get(mode)) for mode in modes))
    table.add_row("all", "", *(_acc(summary["modes"][m]) for m in modes), end_section=True)
    return table


def _acc(cell) -> str:
    if cell is None:
        return "-"
    return f"{cell['accuracy']:.2f} ({cell['correct']}/{cell['total']})"


def qa_table(qa) -> object:
    from rich.table import Table

    table = Table(title=f"kvc eval: QA ({qa.dataset}, {len(qa.examples)} examples; token F1 and exact match)")
    for name in ("mode", "F1", "EM", "examples"):
        table.add_column(name, justify="left" if name == "mode" else "right")
    for mode, s in qa.summary().items():
        table.add_row(mode, f"{s['f1']:.3f}", f"{s['em']:.3f}", str(s["examples"]))
    return table


def to_json(
    results: Sequence[ContextResult] = (),
    bandwidths: Sequence[float] = (),
    needle=None,
    qa=None,
    model: dict | None = None,
) -> dict:
    doc: dict = {"model": model or {}, "bandwidths_gbit": list(bandwidths)}
    if results:
        doc["contexts"] = [r.as_dict(bandwidths) for r in results]
        doc["aggregate"] = aggregate(results, bandwidths)
    if needle is not None:
        doc["needle"] = needle.as_dict()
    if qa is not None:
        doc["qa"] = qa.as_dict()
    return doc


def plot(path: str | Path, results: Sequence[ContextResult], bandwidths: Sequence[float] = ()) -> Path:
    """Left: rate–quality (bits per element vs perplexity ratio, one point per mode over all contexts).
    Right: TTFT vs bandwidth per mode (log–log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = aggregate(results, bandwidths)
    fig, (ax_rate, ax_time) = plt.subplots(1, 2, figsize=(12, 4.8))
    markers = {
        "text": ("s", "tab:gray"),
        "exact": ("D", "black"),
        "level": ("o", "tab:blue"),
        "transform": ("x", "tab:red"),
    }
    for mode, a in agg.items():
        marker, color = markers.get(a["kind"], ("o", "tab:blue"))
        if mode == "lossless":
            marker, color = "*", "tab:green"
        ax_rate.scatter(a["bits_per_element"], a["perplexity_ratio"], marker=marker, color=color, s=70, zorder=3)
        ax_rate.annotate(
            mode, (a["bits_per_element"], a["perplexity_ratio"]), textcoords="offset points", xytext=(5, 5), fontsize=8
        )
    levels = sorted((a["bits_per_element"], a["perplexity_ratio"]) for a in agg.values() if a["kind"] == "level")
    if len(levels) > 1:
        ax_rate.plot(*zip(*levels), color="tab:blue", alpha=0.5)
    ax_rate.set_xscale("symlog", linthresh=1.0)
    ax_rate.set_xlabel("bits per cached K/V element (bytes moved x 8 / elements)")
    ax_rate.set_ylabel("continuation perplexity ratio vs exact cache")
    ax_rate.axhline(1.0, color="black", lw=0.5, ls=":")
    ax_rate.set_title("rate vs quality")
    if bandwidths:
        xs = sorted(bandwidths)
        for mode, a in agg.items():
            ys = [a["ttft_at_bandwidth"][f"{b:g}"] * 1000 for b in xs]
            style = "--" if a["kind"] == "text" else "-"
            ax_time.plot(xs, ys, style, marker="o", label=mode)
        ax_time.set_xscale("log")
        ax_time.set_yscale("log")
        ax_time.set_xlabel("network bandwidth (Gbit/s)")
        ax_time.set_ylabel("time to first token (ms)")
        ax_time.legend(fontsize=8)
    else:
        ax_time.text(0.5, 0.5, "no --bandwidth given", ha="center", va="center", transform=ax_time.transAxes)
    ax_time.set_title("TTFT vs bandwidth (median)")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
