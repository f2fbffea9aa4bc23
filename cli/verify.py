"""kvc verify: prove a .kvc intact and, with --deep, faithful to a fresh prefill."""

from __future__ import annotations

import typer

from kvc import errors
from kvc.cli._io import open_kvc_arg
from kvc.cli._output import Output

# the exit code a failed check carries (kvc.verify records it) -> the error that reports it
_FAILURES = {
    cls.exit_code: cls
    for cls in (
        errors.InputError,
        errors.FormatError,
        errors.ModelMismatchError,
        errors.VerifyError,
        errors.ProfileError,
    )
}


def verify_command(
    file: str = typer.Argument(..., help="A .kvc file, or - for stdin."),
    deep: bool = typer.Option(False, "--deep", help="Re-run the prefill and compare every level with it."),
    model: str = typer.Option(None, "--model", "-m", help="Model for --deep (default: the one the file names)."),
    profile: str = typer.Option(None, "--profile", help="Profile file, if a level's profile is not found."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda (for --deep)."),
    dtype: str = typer.Option(
        None,
        "--dtype",
        help="Model dtype for --deep (float32/fp32, bfloat16/bf16, float16/fp16, auto). "
        "Default: the dtype the file was prefilled in.",
        show_default=False,
    ),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON report."),
) -> None:
    """Check every checksum and structural invariant; --deep also re-prefills and compares.

    Exit codes: 0 verified, 3 corrupt or invalid file, 4 newer format, 5 model mismatch,
    6 deep comparison failed, 7 a level's profile missing or wrong (pass --profile).

    Examples:

      kvc verify essay.kvc

      kvc verify --deep essay.kvc
    """
    from kvc.runtime.loading import load_for_file, parse_dtype
    from kvc.verify import verify

    out = Output(json_out)
    if dtype is not None:
        dtype = parse_dtype(dtype)
    with open_kvc_arg(file, profile) as f:
        lm = load_for_file(f, model, device=device, dtype=dtype) if deep else None
        report = verify(f, deep=deep, lm=lm)

    def render(console):
        for c in report["checks"]:
            mark = "[green]ok[/green]  " if c["ok"] else "[red]FAIL[/red]"
            console.print(f"{mark} {c['check']}: {c['detail']}")
        console.print("[green]verified[/green]" if report["ok"] else "[red]verification failed[/red]")

    out.result(report, render)
    if not report["ok"]:
        failed = next(c for c in report["checks"] if not c["ok"])
        error = _FAILURES.get(failed.get("exit_code"), errors.FormatError)
        raise error(f"{f.name}: {failed['check']}: {failed['detail']}")
