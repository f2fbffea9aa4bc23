"""kvc ask: stream a stored context into the model and answer a question about it."""

from __future__ import annotations

import json
import sys
import time

import typer

from kvc.errors import InputError

HELP = """Load a context through the streaming loader and answer a question about it.

SOURCE is a .kvc path, an http(s):// URL (read with Range requests, e.g. from `kvc serve`), any
fsspec URL (s3://, gs://, memory://) or - for a pipe. The answer goes to stdout; the load report
(per-chunk choices, bytes, time to first token split into wait / transfer / decode / prefill) to
stderr, or both as one JSON document with --json.

By default each chunk comes at the stored level (or as text, recomputed by the model) that the
controller predicts gives the first token soonest at the link rate it measures; --slo gives the
best quality that meets a time budget; --level forces one level, --level text recomputes all.

\b
Examples:
  kvc serve caches/ --rate 100mbit &               # then, in another shell:
  kvc ask http://127.0.0.1:8000/essay.kvc "What is this essay about?"
  kvc ask essay.kvc "Who wrote it?" --level text    # recompute from text, to compare
  kvc ask essay.kvc "Summarise it" --slo 1.5 --json
  cat essay.kvc | kvc ask - "What is the main point?" --level balanced"""


class _FirstTokenClock:
    """A generate() streamer that notes when the first new token exists (its first call is the prompt)."""

    def __init__(self):
        self.calls = 0
        self.first: float | None = None

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2 and self.first is None:
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def ask_command(
    source: str = typer.Argument(..., help="A .kvc path, http(s):// or fsspec URL, or - for stdin."),
    question: str = typer.Argument(..., help="The question to ask about the context."),
    level: str = typer.Option(None, "--level", "-l", help="Force one stored level for every chunk, or 'text' "
                              "to recompute the context (default: adaptive, per chunk)."),
    slo: float = typer.Option(None, "--slo", help="Time-to-first-token budget in seconds: the best quality "
                              "predicted to meet it."),
    min_level: str = typer.Option(None, "--min-level", help="Quality floor for adaptive loads: no stored level "
                                  "worse than this one (text always qualifies)."),
    model: str = typer.Option(None, "--model", "-m", help="Model (default: the one the file names)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    profile: str = typer.Option(None, "--profile", help="Profile file, if a level's profile is not found."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Answer length cap in tokens."),
    timeout: float = typer.Option(30.0, "--timeout", help="Seconds an http(s) request may go without an answer "
                                  "(or a body with less than 1 KiB)."),
    json_out: bool = typer.Option(False, "--json", help="Print {answer, question, model, report} as one JSON "
                                  "document on stdout."),
) -> None:
    import torch

    import kvc
    from kvc.evaluation.qa import question_after
    from kvc.streaming import open_stream

    if level is not None and (slo is not None or min_level is not None):
        raise InputError("--level forces one level: it does not combine with --slo or --min-level")
    if max_new_tokens < 1:
        raise InputError("--max-new-tokens must be at least 1")
    if not 0 < timeout <= 86_400:  # also refuses nan and inf, which the socket layer rejects with a traceback
        raise InputError("--timeout must be more than 0 and at most 86400 seconds")
    options = {"timeout": timeout} if source.lower().startswith(("http://", "https://")) else {}
    with open_stream(source, profile=profile, **options) as stream:
        # The model loads between reading the header and loading the context: it is not part of the
        # time to first token (an application has its model loaded already).
        lm = kvc.load_model(model or stream.model.get("source"), device=device)
        cache, report = stream.load(lm, level=level, slo=slo, min_level=min_level)
    question_ids = question_after(lm, report.token_ids, question)
    ids = torch.tensor([report.token_ids + question_ids], device=lm.device)
    clock = _FirstTokenClock()
    eos = lm.tokenizer.eos_token_id
    started = time.perf_counter()
    with torch.inference_mode():
        out = lm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=cache,
                                max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None,
                                top_k=None, num_beams=1, pad_token_id=eos if eos is not None else 0, streamer=clock)
    report.record_first_token((clock.first or time.perf_counter()) - started)
    answer = lm.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
    if json_out:
        doc = {"answer": answer, "question": question, "model": {"name": lm.name, "device": str(lm.device)},
               "report": report.as_dict()}
        sys.stdout.write(json.dumps(doc, indent=1) + "\n")
        return
    sys.stdout.write(answer + "\n")
    sys.stdout.flush()
    from kvc.cli._output import human_console

    render_report(human_console(sys.stderr), report)


def _runs(report) -> list[dict]:
    """Consecutive chunks with the same choice, summed: a readable report for any number of chunks."""
    runs: list[dict] = []
    for c in report.chunks:
        if runs and runs[-1]["choice"] == c.choice:
            run = runs[-1]
        else:
            run = {"choice": c.choice, "first": c.index, "last": c.index, "start": c.start, "end": c.end,
                   "bytes": 0, "wait": 0.0, "transfer": 0.0, "decode": 0.0, "prefill": 0.0}
            runs.append(run)
        run["last"], run["end"] = c.index, c.end
        run["bytes"] += c.bytes
        run["wait"] += c.wait_s
        run["transfer"] += c.latency_s + c.transfer_s
        run["decode"] += c.decode_s
        run["prefill"] += c.prefill_s
    return runs


def render_report(console, report) -> None:
    from rich.table import Table

    from kvc.cli._output import human_bytes

    mode = report.mode + (f" {report.slo_s:g} s" if report.slo_s is not None else "") + (
        f" {report.level}" if report.level else "") + (f", floor {report.min_level}" if report.min_level else "")
    table = Table(title=f"{report.source}: {report.tokens} tokens, {len(report.chunks)} chunks, {mode}",
                  title_justify="left")
    for col in ("chunks", "tokens", "choice", "bytes", "wait ms", "transfer ms", "decode ms", "prefill ms"):
        table.add_column(col, justify="left" if col in ("chunks", "choice") else "right")
    for r in _runs(report):
        span = f"{r['first']}" if r["first"] == r["last"] else f"{r['first']}–{r['last']}"
        table.add_row(span, f"{r['start']}:{r['end']}", r["choice"], human_bytes(r["bytes"]) if r["bytes"] else "–",
                      f"{r['wait'] * 1e3:.0f}", f"{r['transfer'] * 1e3:.0f}" if r["transfer"] else "–",
                      f"{r['decode'] * 1e3:.0f}" if r["decode"] else "–",
                      f"{r['prefill'] * 1e3:.0f}" if r["prefill"] else "–")
    console.print(table)
    first = report.first_token_s or 0.0
    console.print(
        f"time to first token {report.ttft_s * 1e3:.0f} ms = header {report.header_s * 1e3:.0f} + set-up "
        f"{report.setup_s * 1e3:.0f} + wait {report.wait_s * 1e3:.0f} + decode {report.decode_s * 1e3:.0f} + "
        f"prefill {report.prefill_s * 1e3:.0f} + other {report.other_s * 1e3:.0f} + first token {first * 1e3:.0f}"
    )
    link = report.link_gbit_per_s
    console.print(
        f"fetched {human_bytes(report.bytes + report.header_bytes)} in {report.transfer_s * 1e3:.0f} ms of link time"
        + (f" ({link:.3g} Gbit/s while transferring)" if link else "")
        + (f", {human_bytes(report.wasted_bytes)} of it unused" if report.wasted_bytes else "")
        + (f"; predicted {report.predicted_ttft_s * 1e3:.0f} ms" if report.predicted_ttft_s else "")
    )
    if report.slo_s is not None and report.slo_met is not None:
        console.print(f"budget {report.slo_s:g} s: {'met' if report.slo_met else 'missed'}")
    for note in report.notes:
        console.print(f"note: {note}")


ask_command.__doc__ = HELP
