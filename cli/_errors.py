"""How a `kvc` run ends. Every exception, signal and closed pipe becomes an exit code here, and at
most one line on stderr; nothing else in the CLI turns an exception into an exit code.

    0    ok (and bare `kvc`, which prints the help)
    1    internal error: a bug (KVC_DEBUG=1 shows the traceback)
    2    bad input or usage (unknown command or option, missing argument, bad value)
    3-8  the KvcError subclasses in kvc/errors.py (corrupt file, newer format, model mismatch, ...,
         8: a batch finished with some documents failed)
    130  SIGINT (Ctrl-C); 143 SIGTERM; 129 SIGHUP: the stack unwinds first, so no partial file is left
    141  stdout closed early (`kvc decode f.kvc -o - | head -c 10`): quiet, as the shell's SIGPIPE

Usage errors come from Click, which Typer may carry as its own copy (typer 0.29 vendors it as
``typer._click``), so they are recognised by class name along the exception's MRO, never by
``isinstance`` against one particular ``click`` import.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_STDOUT_CLOSED = 128 + 13  # SIGPIPE

_SIGNAL_WORDS = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated"}
if hasattr(signal, "SIGHUP"):
    _SIGNAL_WORDS[signal.SIGHUP] = "hung up"


class Interrupted(BaseException):
    """A signal asked the run to stop. A BaseException, so neither Click's nor Typer's handlers (which
    turn KeyboardInterrupt into a silent exit code) nor ``except Exception`` stop it; ``finally`` and
    ``except BaseException`` clean-ups (atomic writes, the GGUF conversion) run on the way out."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class StdoutClosed(BaseException):
    """Whoever read our stdout has gone (`| head`). Raised by the output sink in place of
    BrokenPipeError, which Typer's main loop would otherwise turn into a silent exit 1."""


_running = False  # True while run() can unwind the stack; before and after, a signal ends the process at once


def _say(line: str) -> None:
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def _exit_now(signum: int, frame=None) -> None:
    _say(f"kvc: {_SIGNAL_WORDS.get(signum, 'stopped')}")
    os._exit(128 + signum)


def _on_signal(signum: int, frame) -> None:
    if not _running:  # start-up (imports) or shut-down: nothing written yet or everything written
        _exit_now(signum)
    _set_handlers(_exit_now)  # a second signal while unwinding ends the process at once
    raise Interrupted(signum)


def _set_handlers(handler) -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in _SIGNAL_WORDS:
        signal.signal(signum, handler)


def install_signal_handlers() -> None:
    """Called first thing by the `kvc` entry point, before anything slow is imported."""
    _set_handlers(_on_signal)


def _click_kind(exc: BaseException) -> str | None:
    """The Click exception class ``exc`` is (or derives from), by name, whichever copy of Click raised it."""
    for cls in type(exc).__mro__:
        if cls.__name__ in ("NoArgsIsHelpError", "UsageError", "ClickException", "Abort", "Exit") and (
            "click" in cls.__module__ or "typer" in cls.__module__
        ):
            return cls.__name__
    return None


def silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush cannot fail on a closed pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


def exit_code(exc: BaseException) -> int | None:
    """Report ``exc`` in at most one line on stderr and return the exit code; None for a bug."""
    from kvc.errors import KvcError

    if isinstance(exc, KvcError):
        _say(f"kvc: error: {exc}")
        return exc.exit_code
    if isinstance(exc, Interrupted):
        _set_handlers(signal.SIG_IGN)  # exiting now: a further signal must not add a second line
        _say(f"kvc: {_SIGNAL_WORDS.get(exc.signum, 'stopped')}")
        return 128 + exc.signum
    if isinstance(exc, KeyboardInterrupt):  # raised by code, or a signal before our handlers existed
        _say("kvc: interrupted")
        return 130
    if isinstance(exc, (StdoutClosed, BrokenPipeError)):
        silence_stdout()
        return EXIT_STDOUT_CLOSED
    if isinstance(exc, SystemExit):
        code = exc.code
        if code == 1 and type(sys.stdout).__name__ == "PacifyFlushWrapper":
            return EXIT_STDOUT_CLOSED  # Click/Typer's own handling of a closed pipe got there first
        if code is None or isinstance(code, int):
            return code or 0
        _say(f"kvc: error: {code}")
        return EXIT_INTERNAL
    kind = _click_kind(exc)
    if kind == "NoArgsIsHelpError":  # bare `kvc` (or a group without a command): a request for help
        from kvc.cli._output import write_all

        try:
            write_all(sys.stdout, (exc.ctx.get_help() + "\n").encode())
        except StdoutClosed:
            silence_stdout()
            return EXIT_STDOUT_CLOSED
        return 0
    if kind == "UsageError":
        ctx = getattr(exc, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        message = exc.format_message().strip().replace("\n", " ").rstrip(".")
        _say(f"kvc: error: {message[:1].lower() + message[1:]}{hint}")
        return EXIT_USAGE
    if kind == "ClickException":
        _say(f"kvc: error: {exc.format_message().strip()}")
        return int(getattr(exc, "exit_code", EXIT_INTERNAL))
    if kind == "Abort":
        _say("kvc: aborted")
        return EXIT_INTERNAL
    if kind == "Exit":
        return int(getattr(exc, "exit_code", 0))
    return None


def run(app) -> None:
    """Run the Typer ``app`` on sys.argv and exit with the code the outcome maps to."""
    global _running
    code = 0
    _running = True
    try:
        outcome = app(prog_name="kvc", standalone_mode=False)
        code = outcome if isinstance(outcome, int) and not isinstance(outcome, bool) else 0
        sys.stdout.flush()  # a closed pipe must show here, not in the interpreter's final flush
    except BaseException as exc:  # the one place every outcome is mapped
        _running = False
        mapped = exit_code(exc)
        if mapped is None:
            if os.environ.get("KVC_DEBUG"):
                raise
            _say(f"kvc: internal error: {type(exc).__name__}: {exc} (a bug: please report it; KVC_DEBUG=1 shows where)")
            mapped = EXIT_INTERNAL
        code = mapped
    finally:
        _running = False
    sys.exit(code)
