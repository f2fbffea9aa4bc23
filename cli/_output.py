"""One sink for everything a command reports: rich for people, JSON for machines, from one call.

Results go to stdout unless stdout carries binary data (``-o -``), in which case human output
moves to stderr so a pipeline's bytes stay clean. Progress bars appear only on a terminal."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class Output:
    def __init__(self, json_mode: bool = False, data_on_stdout: bool = False):
        self.json_mode = json_mode
        self.data_on_stdout = data_on_stdout
        stream = sys.stderr if data_on_stdout else sys.stdout
        self.console = human_console(stream)
        self.err = Console(file=sys.stderr, highlight=False)

    def result(self, data, render: Callable[[Console], None] | None = None) -> None:
        """Report a command's result: JSON in --json mode, else ``render`` (or a plain dump)."""
        if self.json_mode:
            stream = sys.stderr if self.data_on_stdout else sys.stdout
            stream.write(json.dumps(data, indent=2, default=str) + "\n")
            stream.flush()
        elif render is not None:
            render(self.console)
        else:
            self.console.print(data)

    def note(self, message: str) -> None:
        if not self.json_mode:
            self.err.print(message)

    def warning(self, message: str) -> None:
        self.err.print(f"[yellow]warning:[/yellow] {message}")

    @contextmanager
    def progress(self, description: str, total: int | None):
        """Yields ``advance(n)``; draws a bar only when stderr is a terminal and not in --json mode."""
        if self.json_mode or not sys.stderr.isatty():
            yield lambda n=1: None
            return
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=self.err,
            transient=True,
        ) as bar:
            task = bar.add_task(description, total=total)
            yield lambda n=1: bar.advance(task, n)


def human_console(stream) -> Console:
    """A console for people; when it is not a terminal (a log, a pipe into less) tables keep their full
    width instead of rich's 80-column default, which truncates every cell."""
    return Console(file=stream, highlight=False, width=None if stream.isatty() else 200)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
