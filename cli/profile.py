"""kvc profile: fit the lossy codec's per-model profile on calibration text."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import typer

from kvc.errors import InputError


def profile_command(
    texts: list[str] = typer.Argument(..., help="Calibration text files (plain UTF-8)."),  # noqa: B008
    output: str = typer.Option(..., "-o", "--output", help="Where to write the profile (.kvcp)."),
    model: str = typer.Option(None, "--model", help="Model: a local folder or .gguf (default: embedded SmolLM2)."),
    tokens: int = typer.Option(2048, "--tokens", help="Tokens of each text used for fitting."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Fit a profile (PCA bases, coefficient statistics, per-head sensitivity) for the lossy levels.

    Examples:

      kvc profile --model ./my-model essays/*.txt -o my-model.kvcp

    Put the result in $KVC_CACHE_DIR/profiles/ to have it found automatically, or pass --profile.
    """
    from kvc.codec.profile import default_progress, fit_profile
    from kvc.runtime.loading import load_model

    if tokens < 8:
        raise InputError("--tokens must be at least 8")
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
    started = time.perf_counter()
    lm = load_model(model, device=device)
    prof = fit_profile(lm, [b for b in bodies if b.strip()], tokens=tokens, on_progress=default_progress())
    try:
        prof.save(output)
    except OSError as exc:
        raise InputError(f"cannot write {output}: {exc}") from None
    result = {"profile": output, "sha256": prof.sha256, "bytes": len(prof.to_bytes()), "model": lm.name,
              "texts": len(bodies), "seconds": round(time.perf_counter() - started, 1)}
    if json_out:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
    else:
        sys.stdout.write(f"wrote {output}: {result['bytes']} bytes, sha256 {prof.sha256[:16]}… "
                         f"({result['texts']} texts, {result['seconds']} s)\n")
