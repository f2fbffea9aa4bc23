"""Reading inputs and writing outputs the way every command does: paths or '-' for stdin/stdout."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from kvc.cli._output import write_all
from kvc.errors import InputError
from kvc.formats.container import write_atomic


def read_input_bytes(path: str) -> bytes:
    if path == "-":
        if sys.stdin.isatty():
            raise InputError("reading from stdin, but stdin is a terminal: pipe a file in or give a path")
        return sys.stdin.buffer.read()
    p = Path(path)
    if not p.exists():
        raise InputError(f"no such file: {path}")
    if p.is_dir():
        raise InputError(f"{path} is a folder, not a file")
    try:
        return p.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from exc


def open_kvc_arg(path: str, profile: str | None = None, header_only: bool = False):
    """A KvcFile from a path or '-' (stdin, read whole); a torch-free KvcIndex when ``header_only``."""
    source = read_input_bytes("-") if path == "-" else path
    if header_only:
        from kvc.index import open_index

        return open_index(source)
    import kvc

    return kvc.open(source, profile=profile)


def check_output_file(path: str) -> None:
    """InputError when ``path`` ('-' aside) names a folder: an existing one, or one by its trailing
    separator (written as a file, 'new/' would become a file called 'new'). Commands call it before
    their work as well, so the mistake costs no prefill."""
    if path == "-":
        return
    if Path(path).is_dir():
        raise InputError(f"{path} is a folder: give a file name")
    if path.endswith(("/", os.sep)):
        raise InputError(f"{path} names a folder: give a file name")


def write_output(path: str, data: bytes) -> None:
    """``data`` to stdout ('-') or atomically to a file, with the permissions any new file gets
    (0666 less the umask), so a shared cache folder stays readable by a serving process."""
    if path == "-":
        if sys.stdout.isatty():
            raise InputError("refusing to write binary data to a terminal: redirect stdout or give -o FILE")
        write_all(sys.stdout, data)
        return
    check_output_file(path)
    p = Path(path)
    if not p.parent.exists():
        raise InputError(f"folder {p.parent} does not exist")
    try:
        write_atomic(p, data)
    except OSError as exc:
        raise InputError(f"cannot write {path}: {exc.strerror}") from exc


def parse_token_range(text: str | None, num_tokens: int) -> tuple[int, int] | None:
    """'A:B', 'A:' or ':B' -> (a, b) within the context, Python-slice style (no negatives)."""
    if text is None:
        return None
    a, sep, b = text.partition(":")
    if not sep:
        raise InputError(f"--tokens takes A:B, got {text!r}")
    try:
        start = int(a) if a else 0
        end = int(b) if b else num_tokens
    except ValueError as exc:
        raise InputError(f"--tokens takes integers A:B, got {text!r}") from exc
    if not 0 <= start < end <= num_tokens:
        raise InputError(f"--tokens {text} is outside the context's 0:{num_tokens}")
    return start, end
