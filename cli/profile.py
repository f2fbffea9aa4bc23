"""kvc profile: fit the lossy codec's per-model profile on calibration text."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.markup import escape

from kvc.cli._io import write_output
from kvc.cli._output import Output, human_bytes
from kvc.errors import InputError


def profile_command(
    texts: list[str] = typer.Argument(..., help="Calibration text files (plain UTF-8)."),
    output: str = typer.Option(..., "-o", "--output", help="Where to write the profile (.kvcp)."),
    model: str = typer.Option(
        None, "--model", "-m", help="Model: a local folder or .gguf (default: embedded SmolLM2)."
    ),
    tokens: int = typer.Option(2048, "--tokens", help="Tokens of each text used for fitting."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    dtype: str = typer.Option(
        "auto",
        "--dtype",
        help="Model dtype: auto (the checkpoint's; float32 for a GGUF), float32/fp32, bfloat16/bf16 or "
        "float16/fp16. A profile serves files prefilled in the same dtype.",
    ),
    mix: bool = typer.Option(
        False,
        "--mix/--no-mix",
        help="Rotate each layer's coefficients across its KV heads (profile version 4: 11-18% smaller on SmolLM2 "
        "at the same quality; decoding does H times the synthesis work, H = KV heads: about 30% slower "
        "on a CPU for SmolLM2).",
    ),
    chain: bool = typer.Option(
        False,
        "--chain",
        help="Also predict each layer from the one before (profile version 5, mixed across heads: on SmolLM2 "
        "about a third fewer bytes than the default profile at the same KL; decoding about 2.3x slower on a "
        "CPU; a second pass over the texts). Not for models with sliding-window layers.",
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Fit a profile (PCA bases, coefficient statistics, per-head sensitivity) for the lossy levels.

    Examples:

      kvc profile --model ./my-model essays/*.txt -o my-model.kvcp

    A part of the fit that cannot be done for this model (keys whose rotary embedding kvq cannot undo,
    heads whose sensitivity cannot be measured) prints one warning line each and is recorded in the
    profile (fit.warnings); the profile still works, with less compression at a given quality.

    Put the result in $KVC_CACHE_DIR/profiles/ (by default ~/.cache/kvc/profiles/) to have it found
    automatically, or pass --profile to encode, decode, verify and eval.
    """
    from kvc.codec.profile import add_chain, fit_profile
    from kvc.runtime.loading import load_model, parse_dtype
    from kvc.runtime.prefill import keeps_every_token

    if tokens < 8:
        raise InputError("--tokens must be at least 8")
    if output == "-":
        raise InputError("-o needs a file name: a profile is not written to stdout")
    dtype = parse_dtype(dtype)
    bodies = []
    for name in texts:
        path = Path(name)
        if not path.is_file():
            raise InputError(f"no calibration text at {name}")
        try:
            bodies.append(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read {name} as UTF-8 text: {exc}") from None
    if not any(b.strip() for b in bodies):
        raise InputError("the calibration texts are empty")
    out = Output(json_out)
    started = time.perf_counter()
    lm = load_model(model, device=device, dtype=dtype)
    if chain and not keeps_every_token(lm):  # said before the fit, not after minutes of it
        raise InputError(f"--chain needs every layer to keep every token; {lm.name} has sliding-window layers "
                         "(use --mix)")
    calibration = [b for b in bodies if b.strip()]
    with out.progress("fitting") as bar:
        prof = fit_profile(lm, calibration, tokens=tokens, on_progress=bar.stage, mix=mix and not chain)
        if chain:  # version 5 replaces version 4's rotation with the residual's, so --mix adds nothing
            prof = add_chain(prof, lm, calibration, tokens=tokens, on_progress=bar.stage)
    data = prof.to_bytes()
    write_output(output, data)  # atomic: an interrupted run leaves no half-written profile
    result = {
        "profile": output,
        "sha256": prof.sha256,
        "bytes": len(data),
        "model": lm.name,
        "dtype": str(lm.dtype).removeprefix("torch."),
        "texts": len(bodies),
        "seconds": round(time.perf_counter() - started, 1),
        "rotary": prof.rotary,
        "version": prof.version,
        "warnings": list(prof.fit.get("warnings") or []),
    }
    for line in result["warnings"]:  # a profile that could not do part of its job says so, one line each
        out.err.print(f"[yellow]warning:[/yellow] {escape('profile: ' + line)}", soft_wrap=True)
    out.result(
        result,
        lambda c: c.print(
            f"wrote {output}: {human_bytes(len(data))}, sha256 {prof.sha256[:16]}… "
            f"({lm.name}, {result['dtype']}; {result['texts']} texts, {result['seconds']} s)",
            markup=False,
            soft_wrap=True,
        ),
    )
