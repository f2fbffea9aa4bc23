"""The `kvc` command: a thin shell over the library. Errors are mapped to one line and an exit code here,
in one place, so no command prints a traceback for a user's mistake."""

from __future__ import annotations

import os
import sys

import typer

from kvc.cli.ask import ask_command
from kvc.cli.decode import decode_command
from kvc.cli.encode import encode_command
from kvc.cli.inspect import inspect_command
from kvc.cli.serve import serve_command
from kvc.cli.verify import verify_command

app = typer.Typer(
    name="kvc",
    help="Precompute, compress and verify the KV caches of language-model contexts.\n\n"
    "Exit codes: 0 ok, 1 internal error, 2 bad input or usage, 3 corrupt or invalid file, "
    "4 newer format, 5 model mismatch, 6 verification failed, 7 profile missing or wrong.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
app.command("encode")(encode_command)
app.command("decode")(decode_command)
app.command("inspect")(inspect_command)
app.command("verify")(verify_command)
app.command("ask")(ask_command)
app.command("serve")(serve_command)

try:  # commands whose modules land with their features
    from kvc.cli.eval import eval_command

    app.command("eval")(eval_command)
except ModuleNotFoundError as exc:
    if exc.name != "kvc.cli.eval":
        raise
try:
    from kvc.cli.profile import profile_command

    app.command("profile")(profile_command)
except ModuleNotFoundError as exc:
    if exc.name != "kvc.cli.profile":
        raise


def _quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def run() -> None:
    from kvc.errors import KvcError

    _quiet_libraries()
    try:
        app(standalone_mode=False)
    except KvcError as exc:
        print(f"kvc: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except (typer.Exit, SystemExit) as exc:
        sys.exit(getattr(exc, "exit_code", getattr(exc, "code", 0)))
    except KeyboardInterrupt:
        print("kvc: interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(141)
    except Exception as exc:  # click usage errors and genuine bugs
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):
            sys.exit(130)
        if os.environ.get("KVC_DEBUG"):
            raise
        print(f"kvc: internal error: {type(exc).__name__}: {exc} (set KVC_DEBUG=1 for a traceback)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    run()
