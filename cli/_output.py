"""One sink for everything a command reports: rich for people, JSON for machines, from one call.

Results go to stdout unless stdout carries binary data (``-o -``), in which case human output
moves to stderr so a pipeline's bytes stay clean. Progress bars appear only when stderr is a
terminal, never in --json runs. A reader that closes stdout early (``| head``) ends the run
quietly with exit 141 (cli/_errors.py), never with a claim of output that was not delivered."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console

from kvc.cli._errors import StdoutClosed


class Output:
    def __init__(self, json_mode: bool = False, data_on_stdout: bool = False):
        self.json_mode = json_mode
        self.data_on_stdout = data_on_stdout
        self.stream = sys.stderr if data_on_stdout else sys.stdout
        self.console = human_console(self.stream)
        self.err = Console(file=sys.stderr, highlight=False)

    def result(self, data, render: Callable[[Console], None] | None = None) -> None:
        """Report a command's result: JSON in --json mode, else ``render`` (or a plain dump)."""
        if self.json_mode:
            text = json.dumps(data, indent=2, default=str) + "\n"
        else:
            with self.console.capture() as captured:
                if render is not None:
                    render(self.console)
                else:
                    self.console.print(data)
            text = captured.get()
        write_all(self.stream, text.encode(getattr(self.stream, "encoding", None) or "utf-8", "replace"))

    def line(self, text: str, bar: Bar | None = None) -> None:
        """One line of the result as soon as it is known (a batch's documents), not in --json mode. It
        goes out at once, unbuffered, so a log or a pipe shows each document while the batch runs and
        keeps those lines when the batch is interrupted; above the progress bar where one is drawn."""
        if self.json_mode:
            return
        live = getattr(bar, "_progress", None)
        if live is not None and self.stream.isatty():  # the bar's terminal: print above it, not through it
            live.console.print(text, markup=False, soft_wrap=True)
            return
        write_all(self.stream, (text + "\n").encode(getattr(self.stream, "encoding", None) or "utf-8", "replace"))

    def note(self, message: str) -> None:
        """A line for people on stderr (not in --json mode)."""
        if not self.json_mode:
            self.err.print(message)

    def warning(self, message: str) -> None:
        self.err.print(f"[yellow]warning:[/yellow] {message}")

    @contextmanager
    def progress(self, description: str, total: int | None = None) -> Iterator[Bar]:
        """Yields a Bar; draws it only when stderr is a terminal and not in --json mode."""
        if self.json_mode or not sys.stderr.isatty():
            yield Bar()
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.err,
            transient=True,
        ) as rich_progress:
            yield Bar(rich_progress, description, total)


class Bar:
    """The one progress bar of the CLI. ``bar(n)`` advances it by n (any non-integer argument, such as
    a step's label, counts as 1); ``bar.stage(name, done, total)`` shows a named stage's own count."""

    def __init__(self, progress=None, description: str = "", total: int | None = None):
        self._progress = progress
        self._tasks: dict[str, int] = {}
        self._first = (description, total)
        self._current: int | None = None  # the task is made on first use, so a staged bar shows only its stages

    def _task(self, description: str, total: int | None) -> int:
        if description not in self._tasks:
            self._tasks[description] = self._progress.add_task(description, total=total)
        return self._tasks[description]

    def __call__(self, n=1) -> None:
        if self._progress is not None:
            if self._current is None:
                self._current = self._task(*self._first)
            self._progress.advance(self._current, n if isinstance(n, int) and not isinstance(n, bool) else 1)

    def describe(self, description: str) -> None:
        """A new description for the bar (a batch shows its tokens/s there)."""
        if self._progress is not None:
            if self._current is None:
                self._current = self._task(*self._first)
            self._progress.update(self._current, description=description)

    def stage(self, description: str, done: int, total: int) -> None:
        if self._progress is not None:
            self._current = self._task(description, total)
            self._progress.update(self._current, completed=done, total=total)


def write_all(stream, data: bytes) -> None:
    """Every byte of ``data`` to ``stream``, or StdoutClosed. Python's buffered write of a large block to
    a pipe whose reader has gone can return a short count without raising, so the bytes go out with
    os.write until all are taken: the sink never reports output it did not deliver."""
    try:
        stream.flush()
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (a test harness's buffer)
        fd = None
    try:
        if fd is None:
            target = getattr(stream, "buffer", None)
            target.write(data) if target is not None else stream.write(data.decode())
            stream.flush()
            return
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    except BrokenPipeError:
        raise StdoutClosed() from None


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


def vs_fp16(stored: int, fp16: int, short: bool = False) -> str:
    """A size against the fp16 yardstick, in words that cannot be read backwards:
    '7.48× smaller than fp16', '1.72× larger than fp16' (``short`` drops 'than fp16')."""
    tail = "" if short else " than fp16"
    if not stored or not fp16:
        return "-"
    ratio = fp16 / stored
    if ratio >= 1.005:
        return f"{ratio:.2f}× smaller{tail}"
    if ratio <= 1 / 1.005:
        return f"{1 / ratio:.2f}× larger{tail}"
    return "same size" + (" as fp16" if not short else "")
