"""Precompute the caches of a corpus: plan documents -> outputs, encode, record (kvc.batch).

    from kvc.batch import encode_corpus
    summary = encode_corpus(["docs/"], "s3://bucket/caches", glob="*.md", levels=["balanced"])

Each document's outcome is a row of ``kvc-manifest.jsonl`` beside the outputs (kvc.batch.manifest);
a failed document is recorded and the batch goes on; a re-run reuses every output whose key still
matches (kvc.batch.plan); ``ray=`` runs the encoding on a Ray cluster (kvc.batch.ray). docs/BATCH.md
tells the whole story."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from kvc.batch import manifest, storage
from kvc.batch.plan import Document, Plan, documents_from_dataset, documents_from_paths, make_plan, settings_key

__all__ = ["Document", "Summary", "encode_corpus", "encode_documents", "documents_from_dataset",
           "documents_from_paths"]  # fmt: skip


@dataclass
class Summary:
    documents: int = 0
    encoded: int = 0
    unchanged: int = 0
    duplicates: int = 0
    failed: int = 0
    tokens: int = 0
    bytes: int = 0
    seconds: float = 0.0
    manifest: str = ""
    failures: list[dict] = field(default_factory=list)  # {"source", "error"} for each failed document
    rows: list[dict] = field(default_factory=list)

    def to_dict(self, rows: bool = False) -> dict:
        out = {k: getattr(self, k) for k in ("documents", "encoded", "unchanged", "duplicates", "failed", "tokens",
                                             "bytes", "seconds", "manifest", "failures")}  # fmt: skip
        out["tokens_per_second"] = round(self.tokens / self.seconds, 1) if self.seconds else None
        if rows:
            out["rows"] = self.rows
        return out


def encode_corpus(
    inputs: list[str] | None = None,
    out_dir: str = ".",
    *,
    glob: str | list[str] = "*.txt",
    dataset: str | None = None,
    text_field: str = "text",
    split: str = "train",
    limit: int | None = None,
    **kwargs,
) -> Summary:
    """Encode files, folders (local or URLs) or a datasets file into ``out_dir`` (a folder or URL);
    see :func:`encode_documents` for the rest."""
    if dataset is not None:
        docs = documents_from_dataset(dataset, text_field, split, out_dir, limit)
    else:
        docs = documents_from_paths(list(inputs or []), out_dir, glob)
    return encode_documents(docs, out_dir, **kwargs)


def encode_documents(
    docs: list[Document],
    out_dir: str,
    *,
    overwrite: bool = False,
    lm=None,
    ray: str | bool | None = None,
    ray_workers: int | None = None,
    on_row: Callable[[dict], None] | None = None,
    on_plan: Callable[[Plan], None] | None = None,
    **settings,
) -> Summary:
    """Encode ``docs``: reuse what a previous run finished, encode the rest once per distinct content,
    record every document in the manifest and return the summary.

    ``settings``: model, device, dtype, levels, chunk_tokens, slice_tokens, max_tokens, truncate,
    profile, embed_profile, batch_tokens (kvc.batch.engine.settings_dict). ``lm`` reuses a loaded
    model. ``ray``: True (a local cluster, or the one ``ray.init()`` finds) or a cluster address."""
    from kvc.batch.engine import Encoder, row, run_local, settings_dict

    started = time.perf_counter()
    s = settings_dict(**settings)
    from kvc.batch.engine import model_key

    if lm is not None:  # the same key a run naming that model's folder gets, so either reuses the other's work
        mkey = model_key(s, lm.folder) if lm.folder else f"{lm.name}:{lm.source}"
    else:
        mkey = model_key(s)
    storage.check_folder(out_dir)
    earlier = manifest.read(out_dir)
    previous = {} if overwrite else earlier
    present = {} if overwrite else storage.sizes(out_dir)
    plan = make_plan(docs, settings_key(s, mkey), previous, overwrite, present)
    if on_plan is not None:
        on_plan(plan)
    rows: dict[str, dict] = {}
    writer = manifest.Writer(out_dir)

    def record(r: dict) -> None:
        if r["status"] == "failed" and earlier.get(r["output"], {}).get("status") in manifest.DONE:
            # the document changed and now fails: its old cache no longer matches it, and a reader
            # must not take it for the document's (only outputs an earlier batch wrote are removed)
            try:
                storage.remove(r["output"])
            except OSError:
                pass  # the row says failed either way
        rows[r["output"]] = r
        writer.add(r)
        if on_row is not None:
            on_row(r)

    for doc in plan.failed:
        record(row(doc.source, doc.output, doc.content_sha256, None, "failed", error=doc.error))
    for doc, before in plan.reused:
        record(row(doc.source, doc.output, doc.content_sha256, before.get("key"), "unchanged",
                   tokens=before.get("tokens"), nbytes=before.get("bytes"),
                   level_bytes=before.get("level_bytes")))  # fmt: skip
    try:
        if plan.units:
            if ray:
                from kvc.batch.ray import run_ray

                run_ray(plan, s, record, address=None if ray is True else ray, workers=ray_workers)
            else:
                run_local(plan, Encoder(s, lm), record)
    finally:
        ordered = [rows[d.output] for d in docs if d.output in rows]
        writer.finish(ordered)
    summary = Summary(documents=len(docs), manifest=manifest.path_for(out_dir), rows=ordered)
    for r in ordered:
        status = r["status"]
        summary.encoded += status == "ok"
        summary.unchanged += status == "unchanged"
        summary.duplicates += status == "duplicate"
        summary.failed += status == "failed"
        if status == "failed":
            summary.failures.append({"source": r["source"], "error": r["error"]})
        if status in ("ok", "duplicate"):
            summary.tokens += r["tokens"] or 0
        summary.bytes += r["bytes"] or 0
    summary.seconds = round(time.perf_counter() - started, 3)
    return summary
