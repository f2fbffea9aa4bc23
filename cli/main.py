"""The `kvc` command: a thin shell over the library. How a run ends (exit code, one line on stderr)
is decided in one place, cli/_errors.py; output goes through one sink, cli/_output.py.

Start-up imports only what parsing the command line needs (no torch, no transformers): each command
imports the library when it runs, so `kvc --help`, `kvc inspect` and `kvc decode` start fast."""

from __future__ import annotations

from kvc.cli import _errors

_errors.install_signal_handlers()  # first: Ctrl-C at any moment of start-up ends in one line, not a traceback

import os  # noqa: E402
import sys  # noqa: E402

import typer  # noqa: E402

import kvc  # noqa: E402
from kvc.cli._output import write_all  # noqa: E402
from kvc.cli.ask import ask_command  # noqa: E402
from kvc.cli.decode import decode_command  # noqa: E402
from kvc.cli.encode import encode_command  # noqa: E402
from kvc.cli.eval import eval_command  # noqa: E402
from kvc.cli.inspect import inspect_command  # noqa: E402
from kvc.cli.profile import profile_command  # noqa: E402
from kvc.cli.serve import serve_command  # noqa: E402
from kvc.cli.verify import verify_command  # noqa: E402

app = typer.Typer(
    name="kvc",
    help="Precompute, compress and verify the KV caches of language-model contexts.\n\n"
    "Exit codes: 0 ok, 1 internal error, 2 bad input or usage, 3 corrupt or invalid file, "
    "4 newer format, 5 model mismatch, 6 verification failed, 7 profile missing or wrong, "
    "8 batch finished with failed documents, "
    "130/143/129 interrupted (SIGINT/SIGTERM/SIGHUP), 141 stdout closed early.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _show_version(value: bool) -> None:
    if value:
        write_all(sys.stdout, f"kvc {kvc.__version__}\n".encode())
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(
        False, "--version", help="Show the version and exit.", is_eager=True, callback=_show_version
    ),
) -> None:
    pass


app.command("encode")(encode_command)
app.command("decode")(decode_command)
app.command("inspect")(inspect_command)
app.command("verify")(verify_command)
app.command("eval")(eval_command)
app.command("profile")(profile_command)
app.command("ask")(ask_command)
app.command("serve")(serve_command)


def run() -> None:
    # Nothing here ever reaches a model hub; transformers reads these when (and if) a command imports it.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _errors.run(app)


if __name__ == "__main__":
    run()
