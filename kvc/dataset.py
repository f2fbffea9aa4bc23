"""Documents from a local `datasets` corpus: a jsonl/json/csv/parquet file or a saved dataset folder."""

from __future__ import annotations

from pathlib import Path

from kvc.errors import InputError

_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def load_rows(spec: str, split: str = "train"):
    """A `datasets.Dataset` from a local file or folder; never from a hub."""
    import datasets

    path = Path(spec)
    if not path.exists():
        raise InputError(f"no such dataset file or folder: {spec}")
    datasets.disable_progress_bars()
    try:
        if path.is_dir():
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise InputError(f"dataset {spec} has no split {split!r} (it has {', '.join(loaded)})")
                loaded = loaded[split]
            return loaded
        builder = _BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise InputError(f"unsupported dataset file {spec}: use .jsonl, .json, .csv or .parquet")
        return datasets.load_dataset(builder, data_files={split: str(path)}, split=split)
    except InputError:
        raise
    except Exception as exc:  # datasets raises many types for unreadable files
        raise InputError(
            f"cannot read dataset {spec}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from exc


def load_texts(spec: str, field: str = "text", split: str = "train", limit: int | None = None) -> list[str]:
    rows = load_rows(spec, split)
    if field not in rows.column_names:
        raise InputError(f"dataset {spec} has no column {field!r} (it has {', '.join(rows.column_names)})")
    texts = rows[field][: limit if limit is not None else len(rows)]
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"dataset {spec} row {i}: {field!r} is not a non-empty string")
    return texts
