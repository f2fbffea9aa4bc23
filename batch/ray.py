"""Encode a planned batch on a Ray cluster with Ray Data (``kvc encode ... --ray ADDRESS``).

The vLLM pattern: a class that loads the model once in ``__init__`` and encodes a batch in
``__call__``, handed to ``Dataset.map_batches(cls, concurrency=N, num_gpus=1)``; Ray does the
sharding, scheduling, retries and placement. The driver plans (hash, resume, duplicates) and groups
the units into prefill groups exactly as the local engine would, so every output and manifest row is
what a single-process run writes (seconds apart). Actors write their outputs themselves (an object
store URL, or a folder every node sees) and hand back only manifest rows, as JSON text."""

from __future__ import annotations

import json
from collections.abc import Callable

from kvc.batch.engine import Encoder, failed_rows
from kvc.batch.plan import Document, Plan, unit_text
from kvc.errors import InputError, KvcError


def _ray():
    try:
        import ray
    except ModuleNotFoundError as exc:
        raise InputError("--ray needs Ray: pip install 'kvc[ray]'") from exc
    return ray


def connect(address: str | None = None, num_cpus: int | None = None):
    """Join the cluster at ``address`` ('auto': the running one), or start a local one (None)."""
    ray = _ray()
    if not ray.is_initialized():
        kwargs = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
        if address is None:
            kwargs["num_cpus"] = num_cpus
        ray.init(address=address, **kwargs)
    import logging

    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # kvc draws its own bar
    for name in ("ray.data", "ray.data._internal"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return ray


class EncodeActor:
    """One model per actor; one prefill group (JSON: units with their token ids) per row."""

    def __init__(self, settings: str):
        self.encoder = Encoder(json.loads(settings))

    def __call__(self, batch: dict) -> dict:
        out = []
        for text in batch["group"]:
            group = [(unit, ids) for unit, ids in json.loads(text)]
            rows: list[dict] = []
            try:
                results = self.encoder.prefill(group)
            except (KvcError, RuntimeError, ValueError) as exc:
                results = None
                for unit, _ in group:
                    rows += _failed(unit, str(exc))
            for (unit, _), result in zip(group, results or []):
                kv, info, seconds = result
                try:
                    rows += self.encoder.write(unit["key"], unit["content_sha256"], unit["sources"], unit["outputs"],
                                               kv, info, seconds)  # fmt: skip
                except (KvcError, OSError, ValueError, RuntimeError) as exc:
                    rows += _failed(unit, str(exc))
            out.append(json.dumps(rows))
        return {"rows": out}


def _failed(unit: dict, error: str) -> list[dict]:
    from kvc.batch.engine import row

    return [row(s, o, unit["content_sha256"], unit["key"], "failed", error=error)
            for s, o in zip(unit["sources"], unit["outputs"])]  # fmt: skip


def run_ray(plan: Plan, settings: dict, record: Callable[[dict], None], address: str | None = None,
            workers: int | None = None) -> None:  # fmt: skip
    """Encode ``plan``'s units on Ray; ``record`` gets every document's row as actors finish."""
    ray = connect(address)
    encoder = Encoder(settings)  # on the driver: tokenises and groups exactly as the local engine does
    items = []
    for unit in plan.units:
        try:
            items.append((unit, encoder.tokens(unit_text(unit))))
        except (KvcError, OSError, UnicodeDecodeError) as exc:
            for r in failed_rows(unit, str(exc)):
                record(r)
    groups = [json.dumps([(_unit_row(u), ids) for u, ids in group]) for group in encoder.groups(items)]
    if not groups:
        return
    gpus = int(ray.cluster_resources().get("GPU", 0))
    workers = workers or gpus or 2
    ds = ray.data.from_items([{"group": g} for g in groups], override_num_blocks=min(len(groups), 4 * workers))
    clean = dict(settings, profile=settings["profile"] if isinstance(settings["profile"], (str, type(None))) else None)
    result = ds.map_batches(
        EncodeActor,
        fn_constructor_kwargs={"settings": json.dumps(clean)},
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_gpus=1 if gpus else 0,
        num_cpus=1,
    )
    for out in result.iter_rows():
        for r in json.loads(out["rows"]):
            record(r)


def _unit_row(unit) -> dict:
    return {"key": unit.key, "content_sha256": unit.content_sha256, "sources": [d.source for d in unit.docs],
            "outputs": [d.output for d in unit.docs]}  # fmt: skip


def encode_ray_dataset(ds, out_dir: str, text_column: str = "text", source_column: str | None = None,
                       address: str | None = None, **kwargs):  # fmt: skip
    """Encode the texts of a Ray Dataset into ``out_dir`` on the cluster; returns kvc.batch.Summary.

    Rows name their output by ``source_column`` (its last path part, ``.kvc``) or else by row number
    (``doc-000000.kvc``). Planning (hashing, resume) runs on the driver, which takes the text column."""
    from kvc.batch import encode_documents, storage

    connect(address)
    docs, seen = [], set()
    columns = [text_column] + ([source_column] if source_column else [])
    for i, r in enumerate(ds.select_columns(columns).iter_rows()):
        source = str(r[source_column]) if source_column else f"row {i}"
        stem = source.rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0] if source_column else f"doc-{i:06d}"
        name = stem if stem not in seen else f"{stem}-{i:06d}"
        seen.add(name)
        text = r[text_column]
        doc = Document(source=source, output=storage.join(out_dir, f"{name}.kvc"),
                       text=text if isinstance(text, str) else None)  # fmt: skip
        if not isinstance(text, str):
            doc.error = f"{text_column!r} is not a string"
        docs.append(doc)
    return encode_documents(docs, out_dir, ray=address or True, **kwargs)
