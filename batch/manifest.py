"""The batch manifest: one JSON line per document, next to the outputs (``kvc-manifest.jsonl``).

Fields: source, output, content_sha256, key (what decides whether a finished output can be reused:
content, levels, model and encode settings), status (``ok`` encoded now, ``unchanged`` reused from an
earlier run, ``duplicate`` same content as ``duplicate_of`` and written from its encoding,
``failed``), error, tokens, bytes, level_bytes, seconds. A local manifest grows a line per finished
document while the batch runs (a killed batch keeps its record) and is rewritten in plan order at the
end; on object storage it is written whole at the end."""

from __future__ import annotations

import json

from kvc.batch import storage

NAME = "kvc-manifest.jsonl"
DONE = ("ok", "unchanged", "duplicate")


def path_for(out_dir: str) -> str:
    return storage.join(out_dir, NAME)


def read(out_dir: str) -> dict[str, dict]:
    """The last row per output of an existing manifest (none if there is none or it is unreadable)."""
    path = path_for(out_dir)
    try:
        text = storage.read_bytes(path).decode("utf-8", "replace")
    except (OSError, Exception):  # missing or unreadable: nothing to resume from
        return {}
    rows = {}
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut by a crash
        if isinstance(row, dict) and isinstance(row.get("output"), str):
            rows[row["output"]] = row
    return rows


def line(row: dict) -> str:
    return json.dumps(row, ensure_ascii=False, sort_keys=False) + "\n"


class Writer:
    """Appends rows as they finish (local folders) and writes the whole, ordered manifest at the end."""

    def __init__(self, out_dir: str):
        self.path = path_for(out_dir)
        self._local = not storage.is_url(out_dir)
        self._handle = None

    def add(self, row: dict) -> None:
        if not self._local:
            return
        if self._handle is None:
            from pathlib import Path

            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self._handle = open(self.path, "a", encoding="utf-8")
        self._handle.write(line(row))
        self._handle.flush()

    def finish(self, rows: list[dict]) -> None:
        self.close()
        storage.write_bytes(self.path, "".join(line(r) for r in rows).encode("utf-8"))

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
