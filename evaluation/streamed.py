"""Time to first token measured for real over a rate-limited local link (`kvc eval --link`, bench/stream.py).

The modelled figures of :mod:`kvc.evaluation.timing` add transfer and decode one after the other;
this module measures what the streaming loader actually achieves: a `kvc serve` process on
127.0.0.1 holds the file behind an emulated link of each rate, and the loader fetches it, per mode:

* ``text``: only the header (the token ids) comes over the link; the model recomputes the context,
* each stored level, forced for every chunk (fetch, decode chunk k while k+1 is in flight),
* ``adaptive``: the controller's per-chunk choice of level or text.

TTFT is the loader's ready time (header request to complete cache) plus one forward of the next
token over that cache. A level whose bytes alone would take longer over the link than recomputing
the text does is not run (it cannot be the best option there); it is reported as skipped. The
*crossover* of a level is the link rate where its TTFT falls below text's (log-interpolated
between measured rates)."""

from __future__ import annotations

import math
import os
import select
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kvc.errors import InputError

ADAPTIVE = "adaptive"
TEXT = "text"
SKIP_FACTOR = 1.5  # a level whose transfer alone exceeds this many times text's TTFT is not run


class ServedFolder:
    """A `kvc serve` process for ``folder`` at ``rate`` bytes/s (None: unlimited), on a free port of 127.0.0.1."""

    def __init__(self, folder: str | Path, rate: float | None, latency_ms: float = 0.0, startup_s: float = 120.0):
        cmd = [sys.executable, "-m", "kvc.cli.main", "serve", str(folder), "--port", "0"]
        if rate:
            cmd += ["--rate", f"{rate}B/s"]
        if latency_ms:
            cmd += ["--latency", f"{latency_ms:g}"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        line, deadline = b"", time.monotonic() + startup_s
        while not line.endswith(b"\n"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                err = self.proc.stderr.read().decode() if self.proc.poll() is not None else "no answer"
                self.close()
                raise InputError(f"kvc serve did not start: {err.strip()}")
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.5)
            if ready:
                line += os.read(self.proc.stdout.fileno(), 4096)
        self.url = line.decode().split(" at ", 1)[1].split(" ", 1)[0]

    def url_for(self, name: str) -> str:
        return self.url + name

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def __enter__(self) -> ServedFolder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class LinkRun:
    """One mode at one link rate: medians over the repeats (``ttft_s``), and the best of them (``best_s``)."""

    mode: str
    gbit: float
    ttft_s: float | None = None
    best_s: float | None = None  # the fastest repeat: on a shared machine, the least disturbed one
    ready_s: float | None = None
    first_token_s: float | None = None
    bytes: int = 0
    choices: dict = field(default_factory=dict)
    samples: list[float] = field(default_factory=list)
    skipped: str | None = None
    slo_s: float | None = None
    report: dict | None = None  # the last run's full load report

    def as_dict(self) -> dict:
        return asdict(self)

    def stat(self, which: str = "median") -> float | None:
        """``median`` (ttft_s) or ``best`` (best_s) of the repeats."""
        return self.best_s if which == "best" else self.ttft_s


def first_token_after(lm, cache, report, next_id: int) -> float:
    """One forward of ``next_id`` over the loaded cache, timed; recorded in the report."""
    from kvc.evaluation.replay import first_token
    from kvc.evaluation.timing import _sync

    _sync(lm.device)
    t = time.perf_counter()
    first_token(lm, cache, next_id, report.tokens)
    _sync(lm.device)
    seconds = time.perf_counter() - t
    report.record_first_token(seconds)
    return seconds


def measure(url: str, lm, gbit: float, *, mode: str, repeat: int = 1, next_id: int = 0, slo: float | None = None,
            overlap: bool = True, profile=None, keep: Callable | None = None) -> LinkRun:
    """Load ``url`` ``repeat`` times in ``mode`` (text, a level or adaptive) and time each to its first token.
    ``keep(cache, report)`` sees every load (the benchmark scores quality on it)."""
    from kvc.streaming import open_stream

    level = None if mode == ADAPTIVE else mode
    run = LinkRun(mode=mode if slo is None else f"{ADAPTIVE} slo", gbit=gbit, slo_s=slo)
    ready, firsts, ttfts = [], [], []
    for _ in range(repeat):
        with open_stream(url, profile=profile) as stream:
            cache, report = stream.load(lm, level=level, slo=slo, overlap=overlap)
        if keep is not None:  # before the first token, which appends one to the cache
            keep(cache, report)
        first_token_after(lm, cache, report, next_id)
        ready.append(report.ready_s)
        firsts.append(report.first_token_s)
        ttfts.append(report.ttft_s)
        run.bytes, run.choices, run.report = report.bytes, report.choices(), report.as_dict()
        del cache
    run.samples = ttfts
    run.ttft_s, run.ready_s, run.first_token_s = (statistics.median(x) for x in (ttfts, ready, firsts))
    run.best_s = min(ttfts)
    return run


def merge(runs: list[LinkRun]) -> LinkRun:
    """Several measurements of one mode at one rate (taken interleaved with other modes) as one: medians."""
    first = runs[0]
    samples = [t for r in runs for t in r.samples]
    out = LinkRun(mode=first.mode, gbit=first.gbit, slo_s=first.slo_s, bytes=runs[-1].bytes, choices=runs[-1].choices,
                  report=runs[-1].report, samples=samples)
    out.ttft_s = statistics.median(samples)
    out.best_s = min(samples)
    out.ready_s = statistics.median(r.ready_s for r in runs)
    out.first_token_s = statistics.median(r.first_token_s for r in runs)
    return out


def interleaved(url: str, lm, gbit: float, modes: Sequence[str], repeat: int,
                done: dict[str, list[LinkRun]] | None = None, **kwargs) -> dict[str, LinkRun]:
    """Each mode ``repeat`` times, round-robin, so that the machine's drift hits every mode alike;
    ``done`` holds measurements already taken (they count towards ``repeat``)."""
    got: dict[str, list[LinkRun]] = {m: list((done or {}).get(m, [])) for m in modes}
    for i in range(repeat):
        for mode in modes:
            if len(got[mode]) <= i:
                got[mode].append(measure(url, lm, gbit, mode=mode, **kwargs))
    return {m: merge(runs) for m, runs in got.items()}


@dataclass
class StreamedResult:
    name: str
    tokens: int
    level_bytes: dict[str, int]
    runs: list[LinkRun] = field(default_factory=list)

    def get(self, mode: str, gbit: float) -> LinkRun | None:
        return next((r for r in self.runs if r.mode == mode and r.gbit == gbit), None)

    @property
    def rates(self) -> list[float]:
        return sorted({r.gbit for r in self.runs})

    @property
    def modes(self) -> list[str]:
        return list(dict.fromkeys(r.mode for r in self.runs))

    def best_single(self, gbit: float, stat: str = "median") -> LinkRun | None:
        """The fastest of text and the forced levels at this rate (by ``stat``: median or best of the repeats)."""
        done = [r for r in self.runs if r.gbit == gbit and r.mode != ADAPTIVE and r.ttft_s is not None
                and r.slo_s is None]
        return min(done, key=lambda r: r.stat(stat)) if done else None

    def crossovers(self) -> dict[str, float | None]:
        """Per level: the link rate (Gbit/s) above which loading it beats recomputing the text."""
        out = {}
        for mode in self.modes:
            if mode in (TEXT, ADAPTIVE) or mode.endswith("slo"):
                continue
            out[mode] = crossover([(g, self.get(mode, g), self.get(TEXT, g)) for g in self.rates])
        return out

    def as_dict(self) -> dict:
        return {"context": self.name, "tokens": self.tokens, "level_bytes": self.level_bytes,
                "runs": [r.as_dict() for r in self.runs], "crossover_gbit": self.crossovers()}


def crossover(points: list[tuple[float, LinkRun | None, LinkRun | None]]) -> float | None:
    """Where a level's TTFT meets text's, log-interpolated between the measured rates around it."""
    prev = None
    for gbit, level, text in points:
        if text is None or text.ttft_s is None:
            continue
        diff = (level.ttft_s - text.ttft_s) if (level is not None and level.ttft_s is not None) else math.inf
        if prev is not None and prev[1] > 0 >= diff:
            g0, d0 = prev
            if not math.isfinite(d0):
                return gbit
            frac = d0 / (d0 - diff)
            return math.exp(math.log(g0) + frac * (math.log(gbit) - math.log(g0)))
        if prev is None and diff <= 0:
            return gbit  # already faster at the slowest rate measured
        prev = (gbit, diff)
    return None


def streamed_ttft(path: str | Path, lm, rates_gbit: Sequence[float], *, levels: Sequence[str] | None = None,
                  repeat: int = 1, adaptive: bool = True, profile=None,
                  on_step: Callable[[str], None] | None = None) -> StreamedResult:
    """TTFT through the loader for text, each level and adaptive, at each link rate (Gbit/s)."""
    import kvc

    path = Path(path)
    tick = on_step or (lambda _s: None)
    with kvc.open(path, profile=profile) as f:
        stored = list(f.levels)
        chosen = [lv for lv in stored if not levels or lv in levels]
        missing = [lv for lv in (levels or []) if lv not in stored]
        if missing:
            raise InputError(f"level {', '.join(missing)} is not stored in {path.name} (it has: {', '.join(stored)})")
        level_bytes = {lv: f.level_bytes(lv) for lv in stored}
        tokens, next_id = f.num_tokens, f.token_ids[0]
        f.check_model(lm)
    result = StreamedResult(name=path.name, tokens=tokens, level_bytes=level_bytes)
    for gbit in sorted(rates_gbit):
        rate = gbit * 1e9 / 8
        with ServedFolder(path.parent, rate) as served:
            url = served.url_for(path.name)
            # Text once first, to know which levels cannot beat it; then every mode round-robin.
            first_text = measure(url, lm, gbit, mode=TEXT, next_id=next_id, profile=profile)
            skipped = {lv: level_bytes[lv] / rate for lv in chosen if level_bytes[lv] / rate > SKIP_FACTOR *
                       first_text.ttft_s}
            modes = [TEXT, *(lv for lv in chosen if lv not in skipped), *([ADAPTIVE] if adaptive else [])]
            runs = interleaved(url, lm, gbit, modes, repeat, done={TEXT: [first_text]}, next_id=next_id,
                               profile=profile)
            for mode in [TEXT, *chosen, *([ADAPTIVE] if adaptive else [])]:
                if mode in skipped:
                    result.runs.append(LinkRun(mode=mode, gbit=gbit, bytes=level_bytes[mode],
                                               skipped=f"its {skipped[mode]:.1f} s of transfer alone exceed text's "
                                                       f"{first_text.ttft_s:.1f} s"))
                else:
                    result.runs.append(runs[mode])
                tick(mode)
    return result


def table(result: StreamedResult, title: str | None = None, stat: str = "median"):
    from rich.table import Table

    modes = result.modes
    t = Table(title=title or f"{result.name}: measured TTFT (ms) over a rate-limited local link, {result.tokens} "
                             "tokens", title_justify="left")
    t.add_column("link Gbit/s", justify="right")
    for mode in modes:
        t.add_column(mode, justify="right")
    t.add_column("best single", justify="left")
    if ADAPTIVE in modes:
        t.add_column("adaptive / best", justify="right")
        t.add_column("adaptive chose", justify="left")
    for g in result.rates:
        row = [f"{g:g}"]
        for mode in modes:
            r = result.get(mode, g)
            row.append("–" if r is None else ("skip" if r.skipped else f"{r.stat(stat) * 1e3:,.0f}"))
        best = result.best_single(g, stat)
        row.append(best.mode if best else "–")
        if ADAPTIVE in modes:
            a = result.get(ADAPTIVE, g)
            row.append(f"{a.stat(stat) / best.stat(stat):.2f}" if a and best and a.ttft_s else "–")
            row.append(", ".join(f"{k} {v}" for k, v in a.choices.items()) if a else "–")
        t.add_row(*row)
    return t


def plot(path: str | Path, result: StreamedResult) -> Path:
    """TTFT against link rate (log–log), one line per mode, each level's crossover with text marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    styles = {TEXT: dict(color="tab:gray", marker="s", lw=2), ADAPTIVE: dict(color="black", marker="D", lw=2.5)}
    for mode in result.modes:
        pts = [(g, result.get(mode, g).ttft_s) for g in result.rates
               if result.get(mode, g) is not None and result.get(mode, g).ttft_s is not None]
        if pts:
            ax.plot(*zip(*pts), label=mode, **styles.get(mode, dict(marker="o", alpha=0.8)))
    text_pts = {g: result.get(TEXT, g).ttft_s for g in result.rates if result.get(TEXT, g)}
    for level, g in result.crossovers().items():
        if g is not None and text_pts:
            y = min(text_pts.values(), key=lambda v: v)
            ax.axvline(g, color="tab:red", ls=":", lw=1)
            ax.annotate(f"{level} beats text\nabove {g:.3g} Gbit/s", (g, y), textcoords="offset points",
                        xytext=(4, 10), fontsize=7, color="tab:red")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("link rate, Gbit/s (emulated by kvc serve --rate)")
    ax.set_ylabel("time to first token, s (measured)")
    ax.set_title(f"{result.name}: streamed TTFT vs link rate")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def to_json(results: Sequence[StreamedResult]) -> list[dict]:
    return [r.as_dict() for r in results]
