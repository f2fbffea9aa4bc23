"""kvc verify: prove a .kvc intact and, with --deep, faithful to a fresh prefill."""

from __future__ import annotations

import typer

from kvc.cli._io import open_kvc_arg
from kvc.cli._output import Output
from kvc.errors import FormatError, VerifyError


def verify_command(
    file: str = typer.Argument(..., help="A .kvc file, or - for stdin."),
    deep: bool = typer.Option(False, "--deep", help="Re-run the prefill and compare every level with it."),
    model: str = typer.Option(None, "--model", "-m", help="Model for --deep (default: the one the file names)."),
    profile: str = typer.Option(None, "--profile", help="Profile file, if a level's profile is not found."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda (for --deep)."),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON report."),
) -> None:
    """Check every checksum and structural invariant; --deep also re-prefills and compares.

    Exit codes: 0 verified, 3 corrupt or invalid file, 4 newer format, 5 model mismatch,
    6 deep comparison failed, 7 profile missing.

    Examples:

      kvc verify essay.kvc

      kvc verify --deep essay.kvc
    """
    import kvc
    from kvc.verify import verify

    out = Output(json_out)
    with open_kvc_arg(file, profile) as f:
        lm = kvc.load_model(model or f.model.get("source"), device=device) if deep else None
        report = verify(f, deep=deep, lm=lm)

    def render(console):
        for c in report["checks"]:
            mark = "[green]ok[/green]  " if c["ok"] else "[red]FAIL[/red]"
            console.print(f"{mark} {c['check']}: {c['detail']}")
        console.print("[green]verified[/green]" if report["ok"] else "[red]verification failed[/red]")

    out.result(report, render)
    if not report["ok"]:
        failed = next(c for c in report["checks"] if not c["ok"])
        error = VerifyError if failed["check"].startswith("deep") else FormatError
        raise error(f"{f.name}: {failed['check']}: {failed['detail']}")
