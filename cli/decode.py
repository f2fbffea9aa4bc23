"""kvc decode: a .kvc back to tensors (safetensors)."""

from __future__ import annotations

import typer

from kvc.cli._io import check_output_file, open_kvc_arg, parse_token_range, write_output
from kvc.cli._output import Output, human_bytes
from kvc.errors import InputError


def decode_command(
    file: str = typer.Argument(..., help="A .kvc file, or - for stdin."),
    output: str = typer.Option(None, "-o", "--output", help="Output .safetensors file; - writes to stdout."),
    tokens: str = typer.Option(None, "--tokens", help="Only tokens A:B (reads only the chunks covering them)."),
    level: str = typer.Option(None, "--level", "-l", help="Which stored level to decode (default: the first)."),
    profile: str = typer.Option(None, "--profile", help="Profile file, if the level's profile is not found."),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON report."),
) -> None:
    """Decode a .kvc file into safetensors: layers.{i}.key / layers.{i}.value, [kv_heads, tokens, head_dim].

    The layout (tensor names, metadata) is documented in kvc.safetensors_io, which also writes it from Python.

    Examples:

      kvc decode essay.kvc -o essay.safetensors

      kvc decode essay.kvc --tokens 0:512 -o head.safetensors

      kvc encode essay.txt -o - | kvc decode - -o - > kv.safetensors
    """
    if output is None:
        raise InputError("say where the tensors go: -o FILE.safetensors (or -o - for stdout)")
    check_output_file(output)
    from kvc.safetensors_io import to_safetensors

    out = Output(json_out, data_on_stdout=output == "-")
    with open_kvc_arg(file, profile) as f:
        window = parse_token_range(tokens, f.num_tokens)
        chosen = level or f.levels[0]
        kv = f.read(chosen, window)
        data = to_safetensors(f, kv, chosen)
        write_output(output, data)
        report = {
            "file": f.name,
            "output": output,
            "level": chosen,
            "tokens": [kv.first_token, kv.first_token + len(kv.token_ids)],
            "layers": len(kv.layers),
            "bytes": len(data),
        }
    out.result(
        report,
        lambda c: c.print(
            f"{report['file']} [{chosen}] tokens {report['tokens'][0]}:{report['tokens'][1]} → "
            f"{'stdout' if output == '-' else output} ({human_bytes(len(data))})",
            markup=False,
            soft_wrap=True,
        ),
    )
