"""Encode a planned batch on one machine: tokenise, prefill and write overlap, one document's failure
is recorded and the batch goes on.

Three stages joined by small bounded queues (so memory holds a few documents, never the corpus):
a thread tokenises units in plan order; the calling thread prefills them, short ones together in
padded batches (lossy level sets only: see runtime.prefill.prefill_batch); a thread encodes each
cache chunk group by chunk group into a spool and writes every output of the unit atomically. The
grouping into prefill batches depends only on the plan and the token counts, never on timing, so
any worker that runs the same groups (kvc.batch.ray) writes the same bytes."""

from __future__ import annotations

import hashlib
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator

from kvc.batch import storage
from kvc.batch.plan import Plan, Unit, unit_text
from kvc.errors import KvcError

DEFAULT_BATCH_TOKENS = 4096  # padded tokens per batched prefill
MAX_BATCH_DOCS = 32
_END = object()


def settings_dict(**kwargs) -> dict:
    from kvc.defaults import DEFAULT_CHUNK_TOKENS, DEFAULT_MAX_TOKENS, DEFAULT_SLICE_TOKENS

    out = {"model": None, "device": "auto", "dtype": "auto", "levels": None, "chunk_tokens": DEFAULT_CHUNK_TOKENS,
           "slice_tokens": DEFAULT_SLICE_TOKENS, "max_tokens": DEFAULT_MAX_TOKENS, "truncate": False, "profile": None,
           "embed_profile": False, "batch_tokens": DEFAULT_BATCH_TOKENS}  # fmt: skip
    unknown = set(kwargs) - set(out)
    if unknown:
        raise TypeError(f"unknown settings: {', '.join(sorted(unknown))}")
    out.update({k: v for k, v in kwargs.items() if v is not None or k in ("levels", "profile")})
    return out


def model_key(settings: dict, folder=None) -> str:
    """The model as the resume check sees it, without loading it: its folder (``folder``, else the one
    the model setting names), that folder's files, and the dtype setting."""
    from pathlib import Path

    from kvc.runtime.identity import _folder_key
    from kvc.runtime.loading import parse_dtype, resolve_model

    folder = Path(folder) if folder is not None else resolve_model(settings["model"])[0]
    return f"{folder.resolve()}:{_folder_key(folder, parse_dtype(settings['dtype']))}"


class Encoder:
    """One loaded model and everything needed to turn token ids into written .kvc files. A Ray actor
    holds one (kvc.batch.ray); the local engine holds one."""

    def __init__(self, settings: dict, lm=None):
        from kvc.api import default_levels
        from kvc.runtime.identity import model_identity
        from kvc.runtime.loading import load_model
        from kvc.runtime.prefill import can_batch

        self.settings = settings
        self.lm = lm or load_model(settings["model"], device=settings["device"], dtype=settings["dtype"])
        self.levels = list(settings["levels"] or default_levels(self.lm, settings["profile"]))
        self.identity = model_identity(self.lm)
        from kvc.api import _resolve_profile

        # a missing profile is the batch's error (exit 7 before anything is written), not each document's
        settings = dict(settings, profile=_resolve_profile(self.levels, self.identity, settings["profile"]))
        self.settings = settings
        self.batchable = "lossless" not in self.levels and settings["batch_tokens"] > 0 and can_batch(self.lm)

    def tokens(self, text: str) -> list[int]:
        from kvc.runtime.prefill import check_context, tokenize

        s = self.settings
        ids = tokenize(self.lm, text, max_tokens=None if s["truncate"] else s["max_tokens"])[: s["max_tokens"]]
        return check_context(self.lm, ids)

    def groups(self, items: Iterable[tuple]) -> Iterator[list[tuple]]:
        """Prefill groups from (unit, ids, ...) tuples in order: consecutive short documents share a batch
        while it holds at most batch_tokens padded tokens; the rest go alone."""
        s, group, longest = self.settings, [], 0
        for item in items:
            ids = item[1]
            short = self.batchable and ids is not None and len(ids) <= s["slice_tokens"]
            if group and (not short or max(longest, len(ids)) * (len(group) + 1) > s["batch_tokens"]
                          or len(group) >= MAX_BATCH_DOCS):  # fmt: skip
                yield group
                group, longest = [], 0
            if short:
                group.append(item)
                longest = max(longest, len(ids))
            else:
                yield [item]
        if group:
            yield group

    def prefill(self, group: list[tuple]) -> list[tuple]:
        """(kv, prefill record, seconds) per item of a group."""
        from kvc.api import prefill_record
        from kvc.runtime.prefill import prefill, prefill_batch

        s = self.settings
        started = time.perf_counter()
        if len(group) == 1:
            kvs, info = [prefill(self.lm, group[0][1], s["slice_tokens"])], prefill_record(self.lm, s["slice_tokens"])
        else:
            kvs = prefill_batch(self.lm, [item[1] for item in group])
            info = prefill_record(self.lm, s["slice_tokens"], batch=len(group))
        share = (time.perf_counter() - started) / len(group)
        return [(kv, info, share) for kv in kvs]

    def write(self, key: str, content_sha256: str, sources: list[str], outputs: list[str], kv, info,
              seconds: float) -> list[dict]:  # fmt: skip
        """Encode ``kv`` once and write it to every output (each under its own source name)."""
        from kvc.api import encode_kv_spool

        s = self.settings
        started = time.perf_counter()
        context = {"add_special_tokens": True, "content_sha256": content_sha256, "batch_key": key}
        spool, header, attachments = encode_kv_spool(kv, self.identity, self.levels, s["chunk_tokens"], s["profile"],
                                                     context, info, s["embed_profile"])  # fmt: skip
        rows = []
        try:
            for n, (source, output) in enumerate(zip(sources, outputs)):
                head = dict(header, context=dict(header["context"], source=source))
                with storage.atomic_writer(output) as f:
                    size = spool.write_to(f, head, attachments)
                full = spool.index(head, attachments)
                level_bytes = {lv: 0 for lv in self.levels}
                for chunk in full["chunks"]:
                    for enc in chunk["encodings"]:
                        level_bytes[enc["level"]] += enc["length"]
                took = time.perf_counter() - started
                rows.append(row(source, output, content_sha256, key, "duplicate" if n else "ok", tokens=kv.num_tokens,
                                nbytes=size, level_bytes=level_bytes, seconds=seconds + took if n == 0 else took,
                                duplicate_of=sources[0] if n else None))  # fmt: skip
                started = time.perf_counter()
        finally:
            spool.close()
        return rows


def row(source, output, content_sha256, key, status, error=None, tokens=None, nbytes=None, level_bytes=None,
        seconds=0.0, duplicate_of=None) -> dict:  # fmt: skip
    out = {"source": source, "output": output, "content_sha256": content_sha256, "key": key, "status": status,
           "error": error, "tokens": tokens, "bytes": nbytes, "level_bytes": level_bytes,
           "seconds": round(seconds, 4)}  # fmt: skip
    if duplicate_of:
        out["duplicate_of"] = duplicate_of
    return out


def failed_rows(unit: Unit, error: str) -> list[dict]:
    return [row(d.source, d.output, unit.content_sha256, unit.key, "failed", error=error) for d in unit.docs]


def _message(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, KvcError) else f"{type(exc).__name__}: {exc}"


def run_local(plan: Plan, encoder: Encoder, on_row: Callable[[dict], None]) -> None:
    """Encode every unit of ``plan``; ``on_row`` gets each finished document's manifest row (any order)."""
    tokenized: queue.Queue = queue.Queue(maxsize=2 * MAX_BATCH_DOCS)
    encoded: queue.Queue = queue.Queue(maxsize=2)
    stop = threading.Event()
    errors: list[BaseException] = []

    def put(q: queue.Queue, item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def tokenize_all() -> None:
        try:
            for unit in plan.units:
                try:
                    ids, err = encoder.tokens(unit_text(unit)), None
                except (KvcError, OSError, UnicodeDecodeError) as exc:
                    ids, err = None, _message(exc)
                if not put(tokenized, (unit, ids, err)):
                    return
        except BaseException as exc:  # a bug: end the batch with it
            errors.append(exc)
        put(tokenized, _END)

    def write_all() -> None:
        try:
            while True:
                try:
                    item = encoded.get(timeout=0.2)
                except queue.Empty:
                    if stop.is_set():
                        return
                    continue
                if item is _END:
                    return
                unit, kv, info, seconds = item
                try:
                    rows = encoder.write(unit.key, unit.content_sha256, [d.source for d in unit.docs],
                                         [d.output for d in unit.docs], kv, info, seconds)  # fmt: skip
                except (KvcError, OSError, ValueError, RuntimeError) as exc:
                    rows = failed_rows(unit, _message(exc))
                for r in rows:
                    on_row(r)
                if stop.is_set():
                    return
        except BaseException as exc:
            errors.append(exc)
            stop.set()

    def stream() -> Iterator[tuple]:
        while True:
            item = tokenized.get()
            if item is _END:
                return
            unit, ids, err = item
            if err is not None:
                for r in failed_rows(unit, err):
                    on_row(r)
                continue
            yield item

    reader = threading.Thread(target=tokenize_all, name="kvc-tokenize", daemon=True)
    writer = threading.Thread(target=write_all, name="kvc-write", daemon=True)
    reader.start()
    writer.start()
    finished = False
    try:
        for group in encoder.groups(stream()):
            if stop.is_set():
                break
            try:
                results = encoder.prefill(group)
            except (KvcError, RuntimeError, ValueError) as exc:
                for unit, *_ in group:
                    for r in failed_rows(unit, _message(exc)):
                        on_row(r)
                continue
            for (unit, *_), (kv, info, seconds) in zip(group, results):
                put(encoded, (unit, kv, info, seconds))
        finished = put(encoded, _END)
    finally:
        if not finished:  # interrupted: the writer ends the document it is writing, the rest are dropped
            stop.set()
        writer.join()
        stop.set()
        reader.join(timeout=5)
    if errors:
        raise errors[0]


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
