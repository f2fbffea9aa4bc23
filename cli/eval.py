"""`kvc eval`: does the model answer as well from a compressed cache as from the text, and sooner?"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kvc.cli._output import Output
from kvc.defaults import DEFAULT_CONTINUATION_TOKENS
from kvc.errors import InputError

HELP = """Evaluate caches on your own model and data: quality and time to first token, per level.

Every run compares, side by side: text (prefill from the token ids: the time reference),
exact (the model's own cache, never serialised: the quality reference) and each level
stored in the file (lossless included), decoded exactly as an application would.

\b
Examples:
  kvc eval doc.kvc                                  # replay: perplexity ratio, KL, top-1, TTFT
  kvc eval a.kvc b.kvc --level lossless --repeat 5 --bandwidth 0.1,1,10
  kvc eval doc.kvc --continuation rest.txt --json   # score a given continuation, JSON on stdout
  kvc eval --needle --depths 0.1,0.5,0.9 --lengths 1024,2048
  kvc eval --needle --haystack my_texts/ --model ./my-model
  kvc eval --qa data.jsonl --context-field context --question-field question --answers-field answers
  kvc eval doc.kvc --needle --plot eval.png         # several evaluations in one run
  kvc eval mine.kvc --profile my-model.kvcp         # levels made with your own profile
  kvc eval doc.kvc --link 0.01,0.1,1,10 --plot e.png # TTFT measured through the loader over a local link

The replay table fits 100 columns: quality, size and time to first token per mode, then TTFT at
each --bandwidth. --wide adds the TTFT breakdown (read, decode, build, first token) in one table;
--json has everything. Metrics are explained in docs/EVAL.md."""


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise InputError(f"{what} must be comma-separated numbers, got {text!r}") from exc


def _encode_levels(lm, profile: str | None) -> list[str]:
    """What needle and QA runs encode when --level is not given: lossless, plus the default lossy level
    when the model has a profile (what `kvc encode` would write)."""
    from kvc.api import default_levels

    return list(dict.fromkeys(["lossless", *default_levels(lm, profile)]))


def eval_command(
    files: Annotated[
        list[str] | None,
        typer.Argument(
            help="Encoded .kvc files (paths or URLs such as s3://bucket/a.kvc) to replay (quality and time per level).",
            show_default=False,
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="Model: 'smollm2', a folder or a .gguf. Default: the model the file names; "
            "--needle/--qa without files: smollm2. Refused if it is not the file's model.",
        ),
    ] = None,
    level: Annotated[
        str | None,
        typer.Option(
            "--level",
            "-l",
            help="Only these stored levels, comma-separated (default: every level in the file; "
            "for --needle/--qa: lossless).",
        ),
    ] = None,
    continuation: Annotated[
        Path | None,
        typer.Option(
            "--continuation",
            help="Text that follows the context, scored after the cache. Default: the rest of "
            "the source document when the file names it, else the last --continuation-tokens of the stored "
            "context.",
        ),
    ] = None,
    continuation_tokens: Annotated[
        int, typer.Option("--continuation-tokens", help="Continuation length in tokens.")
    ] = DEFAULT_CONTINUATION_TOKENS,
    needle: Annotated[bool, typer.Option("--needle", help="Run needle retrieval on real long text.")] = False,
    haystack: Annotated[
        Path | None,
        typer.Option(
            "--haystack", help="Folder of .txt files for the needle haystack (default: the held-out evaluation essays)."
        ),
    ] = None,
    depths: Annotated[str, typer.Option("--depths", help="Needle depths, fractions of the context.")] = "0.1,0.5,0.9",
    lengths: Annotated[str, typer.Option("--lengths", help="Needle haystack lengths in tokens.")] = "1024,2048",
    qa: Annotated[
        Path | None, typer.Option("--qa", help="QA dataset: a local .jsonl/.json/.parquet/.csv file.")
    ] = None,
    context_field: Annotated[
        str, typer.Option("--context-field", help="QA field holding the context text (or the path of a .kvc file).")
    ] = "context",
    question_field: Annotated[
        str, typer.Option("--question-field", help="QA field holding the question.")
    ] = "question",
    answers_field: Annotated[
        str, typer.Option("--answers-field", help="QA field holding the answer(s): a string, a list, or {text: [...]}.")
    ] = "answers",
    limit: Annotated[int | None, typer.Option("--limit", help="Only the first N QA examples.")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Answer length cap for --needle/--qa.")] = 32,
    repeat: Annotated[int, typer.Option("--repeat", help="Timing repeats; medians are reported.")] = 3,
    bandwidth: Annotated[
        str, typer.Option("--bandwidth", help="Modelled network bandwidths in Gbit/s, comma-separated ('' for none).")
    ] = "0.1,1,10",
    link: Annotated[str | None, typer.Option(
        "--link", help="Also measure TTFT for real through the streaming loader over a rate-limited local link "
        "(kvc serve), at these rates in Gbit/s, comma-separated: text, each level and adaptive (docs/STREAMING.md)."
        )] = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print one JSON document on stdout instead of tables.")
    ] = False,
    plot: Annotated[
        Path | None, typer.Option("--plot", help="Write rate-quality and TTFT-vs-bandwidth plots (PNG).")
    ] = None,
    wide: Annotated[
        bool, typer.Option("--wide", help="One replay table with every column (about 170 columns wide).")
    ] = False,
    profile: Annotated[
        str | None,
        typer.Option("--profile", help="Profile file for lossy levels, if a level's profile is not found on its own."),
    ] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")] = "auto",
    dtype: Annotated[
        str | None,
        typer.Option(
            "--dtype",
            help="Model dtype (float32/fp32, bfloat16/bf16, float16/fp16, auto). "
            "Default: the dtype the (first) file was prefilled in; auto without files.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Evaluate caches: quality (perplexity, KL, top-1, needle, QA) and time to first token, per level."""
    import kvc
    from kvc.evaluation import needle as needle_mod
    from kvc.evaluation import qa as qa_mod
    from kvc.evaluation import replay, report
    from kvc.evaluation.timing import parse_bandwidths
    from kvc.runtime.loading import load_for_file, parse_dtype

    files = _local_files(list(files or []))
    if not files and not needle and qa is None:
        raise InputError("nothing to evaluate: give .kvc files, --needle or --qa (see kvc eval --help)")
    if repeat < 1:
        raise InputError("--repeat must be at least 1")
    try:
        bandwidths = parse_bandwidths(bandwidth)
    except ValueError as exc:
        raise InputError(f"--bandwidth: {exc}") from exc
    levels = [v.strip() for v in level.split(",") if v.strip()] if level else None
    if plot is not None and not files:
        raise InputError("--plot draws the replay of .kvc files: give at least one file")
    if dtype is not None:
        dtype = parse_dtype(dtype)
    out = Output(json_out)

    # One model for the whole run: the first file's (in the dtype it was prefilled in), unless
    # --model / --dtype say otherwise; every file must have been made with it.
    opened = []
    for path in files:
        if not path.is_file():
            raise InputError(f"no such file: {path}")
        opened.append(kvc.open(path.read_bytes(), profile=profile))
    if opened:
        lm = load_for_file(opened[0], model, device=device, dtype=dtype)
    else:
        lm = kvc.load_model(model, device=device, dtype=dtype or "auto")
    for f in opened:
        f.check_model(lm)

    cont_ids = None
    if continuation is not None:
        if not continuation.is_file():
            raise InputError(f"no such continuation file: {continuation}")
        cont_ids = replay.continuation_from_text(lm, continuation.read_text(encoding="utf-8"), continuation_tokens)

    # evaluate_file ticks once for exact, once for text, once per level and once per timing repeat.
    steps = sum(2 + len(levels or f.levels) + repeat for f in opened)
    results = []
    with out.progress("replay", steps) as tick:
        for path in files:
            results.append(
                replay.evaluate_file(
                    path,
                    lm,
                    levels=levels,
                    continuation_ids=cont_ids,
                    continuation_tokens=continuation_tokens,
                    repeat=repeat,
                    on_step=tick,
                    profile=profile,
                )
            )
    needle_result = None
    if needle:
        d, n = _floats(depths, "--depths"), [int(v) for v in _floats(lengths, "--lengths")]
        with out.progress("needle", len(d) * len(n)) as tick:
            needle_result = needle_mod.evaluate_needle(
                lm,
                depths=d,
                lengths=n,
                levels=levels or _encode_levels(lm, profile),
                haystack=haystack,
                max_new_tokens=max_new_tokens,
                on_cell=tick,
                profile=profile,
            )
    qa_result = None
    if qa is not None:
        examples = qa_mod.load_examples(qa, context_field, question_field, answers_field, limit)
        with out.progress("qa", len(examples)) as tick:
            qa_result = qa_mod.evaluate_qa(
                lm,
                examples,
                levels=levels or _encode_levels(lm, profile),
                max_new_tokens=max_new_tokens,
                dataset=qa.name,
                on_example=tick,
                profile=profile,
            )

    streamed = []
    if link:
        from kvc.evaluation import streamed as streamed_mod

        rates = _floats(link, "--link")
        if not files or not rates or any(r <= 0 for r in rates):
            raise InputError("--link needs .kvc files and positive rates in Gbit/s, e.g. --link 0.01,0.1,1,10")
        with out.progress("link", len(files) * len(rates) * (2 + len(levels or opened[0].levels))) as tick:
            streamed = [streamed_mod.streamed_ttft(path, lm, rates, levels=levels, repeat=repeat,
                                                   on_step=lambda _s: tick()) for path in files]
        if plot is not None:
            for s_result in streamed:
                streamed_mod.plot(plot.with_name(f"{plot.stem}-link-{Path(s_result.name).stem}.png"), s_result)

    if plot is not None:
        report.plot(plot, results, bandwidths)
    doc = report.to_json(
        results,
        bandwidths,
        needle_result,
        qa_result,
        model={"name": lm.name, "source": lm.source, "device": str(lm.device), "dtype": str(lm.dtype)[6:]},
    )
    if streamed:
        doc["streamed"] = streamed_mod.to_json(streamed)

    def render(console):
        if results:
            for table in report.replay_tables(results, bandwidths, wide=wide):
                console.print(table)
        if needle_result is not None:
            console.print(report.needle_table(needle_result))
        if qa_result is not None:
            console.print(report.qa_table(qa_result))
        for s_result in streamed:
            console.print(streamed_mod.table(s_result))
        if plot is not None:
            console.print(f"plot written to {plot}")

    out.result(doc, render)


eval_command.__doc__ = HELP


def _local_files(names: list[str]) -> list[Path]:
    """Paths for the files to replay: URLs (s3://, gs://, memory://, ...) are fetched once into a
    temporary folder that lives as long as the process (replay times its own local read)."""
    import atexit
    import shutil
    import tempfile

    from kvc.batch.storage import is_url, read_bytes

    out, tmp = [], None
    for name in names:
        if not is_url(name):
            out.append(Path(name))
            continue
        if tmp is None:
            tmp = Path(tempfile.mkdtemp(prefix="kvc-eval-"))
            atexit.register(shutil.rmtree, tmp, True)
        local = tmp / f"{len(out)}-{name.rstrip('/').rsplit('/', 1)[-1]}"
        local.write_bytes(read_bytes(name))
        out.append(local)
    return out
