"""Plan a batch: which documents there are, where each one's .kvc goes, and which need encoding.

Documents come from files, folders (recursively, by glob) or a datasets file, local or by URL. A
document's bytes are read and hashed here, once; unreadable or non-UTF-8 documents are not errors
of the batch but failed documents, recorded by name. Each document gets a *key*: a hash of its
content, the level set, the model (its folder's files by name, size and mtime, and the dtype) and
every setting that changes the bytes written. An output whose manifest row (or, failing that, its
own header) carries the same key is reused; identical documents form one *unit*, encoded once."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from kvc.batch import manifest, storage
from kvc.errors import InputError

TEXT_CACHE_BYTES = 256 << 20  # texts kept from planning for encoding; past this they are read again


@dataclass
class Document:
    source: str  # the name people and the manifest see: a path, a URL or dataset[i]
    output: str  # where its .kvc goes: a path or a URL
    text: str | None = None  # known text (dataset rows); files are read by planning
    content_sha256: str | None = None
    error: str | None = None  # why it cannot be encoded (unreadable, not UTF-8, not a string)


@dataclass
class Unit:
    """One encoding: identical documents share it; the first names the work, the rest are duplicates."""

    key: str
    content_sha256: str
    docs: list[Document]
    text: str | None = None
    order: int = 0

    def to_row(self) -> dict:
        """A plain dict (what Ray Data carries between workers)."""
        return {"key": self.key, "content_sha256": self.content_sha256, "text": self.text, "order": self.order,
                "sources": [d.source for d in self.docs], "outputs": [d.output for d in self.docs]}  # fmt: skip


@dataclass
class Plan:
    documents: list[Document]
    units: list[Unit] = field(default_factory=list)  # what needs encoding
    reused: list[tuple[Document, dict]] = field(default_factory=list)  # (doc, previous manifest row)
    failed: list[Document] = field(default_factory=list)


def documents_from_paths(inputs: list[str], out_dir: str, glob: str | list[str]) -> list[Document]:
    """``glob``: a pattern or several (a file is taken if any matches)."""
    patterns = [glob] if isinstance(glob, str) else list(glob)
    docs, seen = [], {}
    for item in inputs:
        if storage.is_dir(item):
            # a batch's own products are never its input: a re-run with --out-dir inside the folder
            # (and a broad --glob) would otherwise encode the manifest and the caches themselves
            files = [(path, rel) for path, rel in storage.list_files(item, patterns)
                     if not _is_output(path, out_dir)]  # fmt: skip
            if not files:
                raise InputError(f"folder {item} has no files matching {' or '.join(map(repr, patterns))}")
        elif storage.exists(item):
            files = [(item, item.rstrip("/").replace("\\", "/").rsplit("/", 1)[-1])]
        else:
            raise InputError(f"no such file or folder: {item}")
        for path, rel in files:
            target = storage.join(out_dir, str(PurePosixPath(rel.replace("\\", "/")).with_suffix(".kvc")))
            if target in seen:
                raise InputError(f"two documents would both be written to {target}: {seen[target]} and {path}")
            seen[target] = path
            docs.append(Document(source=_source_name(path), output=target))
    return docs


def _is_output(path: str, out_dir: str) -> bool:
    """A .kvc, a manifest, or anything under the output folder."""
    name = path.rstrip("/").replace("\\", "/").rsplit("/", 1)[-1]
    if name.endswith(".kvc") or name == manifest.NAME:
        return True
    if storage.is_url(path) or storage.is_url(out_dir):
        root = out_dir.rstrip("/") + "/"
        return path.startswith(root)
    from pathlib import Path

    return Path(path).resolve().is_relative_to(Path(out_dir).resolve())


def _source_name(path: str) -> str:
    if storage.is_url(path):
        return path
    from pathlib import Path

    return str(Path(path).resolve())


def documents_from_dataset(spec: str, field_name: str, split: str, out_dir: str, limit: int | None) -> list[Document]:
    from kvc.dataset import load_rows

    rows = storage.fetch_to_local(spec, lambda local: load_rows(local, split))
    if field_name not in rows.column_names:
        raise InputError(f"dataset {spec} has no column {field_name!r} (it has {', '.join(rows.column_names)})")
    texts = rows[field_name][: limit if limit is not None else len(rows)]
    stem = PurePosixPath(spec.rstrip("/")).stem
    docs = []
    for i, text in enumerate(texts):
        doc = Document(source=f"{spec}[{i}]", output=storage.join(out_dir, f"{stem}-{i:06d}.kvc"))
        if isinstance(text, str):
            doc.text = text
        else:
            doc.error = f"row {i}: {field_name!r} is not a string"
        docs.append(doc)
    return docs


def settings_key(settings: dict, model_key: str) -> str:
    """What, besides the content, decides an output's bytes."""
    keep = {k: settings.get(k) for k in ("levels", "dtype", "chunk_tokens", "slice_tokens", "max_tokens", "truncate",
                                         "profile", "embed_profile", "batch_tokens")}  # fmt: skip
    return hashlib.sha256(json.dumps([keep, model_key], sort_keys=True, default=str).encode()).hexdigest()


def doc_key(content_sha256: str, settings_hash: str) -> str:
    return hashlib.sha256(f"{content_sha256}:{settings_hash}".encode()).hexdigest()


def make_plan(docs: list[Document], settings_hash: str, previous: dict[str, dict], overwrite: bool,
              present: dict[str, int]) -> Plan:  # fmt: skip
    """Read and hash every document; decide reuse, duplicates and failures.

    ``previous``: the last manifest's rows by output; ``present``: the files now in the output folder
    with their sizes (one listing)."""
    plan = Plan(documents=docs)
    by_key: dict[str, Unit] = {}
    kept = 0
    for doc in docs:
        in_memory = doc.text is not None  # a dataset row: there is no file to read it again from
        if doc.error is None and doc.text is None:
            try:
                data = storage.read_bytes(doc.source)
            except (OSError, InputError) as exc:
                doc.error = f"cannot read: {getattr(exc, 'strerror', None) or exc}"
            else:
                try:
                    doc.text = data.decode("utf-8")
                except UnicodeDecodeError:
                    doc.error = "not UTF-8 text (binary?)"
        if doc.error is not None:
            plan.failed.append(doc)
            continue
        raw = doc.text.encode("utf-8", "surrogatepass")
        doc.content_sha256 = hashlib.sha256(raw).hexdigest()
        key = doc_key(doc.content_sha256, settings_hash)
        before = previous.get(doc.output)
        if before is None and not overwrite and doc.output in present:
            before = _row_from_header(doc, present[doc.output])
        if not overwrite and before is not None and before.get("key") == key and before.get("status") in (
            "ok", "unchanged", "duplicate") and present.get(doc.output) == before.get("bytes"):  # fmt: skip
            plan.reused.append((doc, before))
            doc.text = None
            continue
        unit = by_key.get(key)
        if unit is None:
            unit = by_key[key] = Unit(key=key, content_sha256=doc.content_sha256, docs=[], order=len(by_key))
            plan.units.append(unit)
            if in_memory or kept + len(raw) <= TEXT_CACHE_BYTES:
                unit.text, kept = doc.text, kept + len(raw)
        unit.docs.append(doc)
        doc.text = None
    return plan


def _row_from_header(doc: Document, size: int) -> dict | None:
    """A manifest row rebuilt from an output's own header (a batch killed before its manifest was
    written): the header's context records the key it was made under."""
    from kvc.formats.container import open_container

    try:
        container = open_container(doc.output)
    except Exception:  # unreadable or not a .kvc: encode it again
        return None
    try:
        context = container.header.get("context", {})
        return {"key": context.get("batch_key"), "status": "unchanged", "bytes": size,
                "tokens": context.get("num_tokens")}  # fmt: skip
    finally:
        container.close()


def unit_text(unit: Unit) -> str:
    if unit.text is not None:
        return unit.text
    first = unit.docs[0]
    return storage.read_bytes(first.source).decode("utf-8")
