"""Question answering over a cached context: prompts split at the cache boundary, greedy answers
generated from each mode's cache, scored by LongBench's ``qa_f1`` conventions.

Prompt split. The cached context must be a *prefix* of the prompt, and the same for every question
asked about it. When the tokenizer has a chat template, the prompt is the template rendered for one
user turn ``<context>\\n\\n<question>`` with the generation prompt; it is split where the context
ends: the cache holds ``template head + context`` (system prompt, user-turn opener, document), the
part appended after the cache is ``\\n\\nQuestion … + end of turn + assistant opener``. The head does
not depend on the question, so one cache serves every question, and the model sees exactly the
conversation it was tuned on. A ``.kvc`` context encoded as plain text (``kvc encode doc.txt``) has no
template head: then the whole templated user turn (question only) follows the document. Without a
chat template the question is appended as ``\\n\\nQuestion: …\\nAnswer:``."""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kvc.errors import InputError
from kvc.runtime.cache import to_transformers_cache
from kvc.runtime.kv import ContextKV
from kvc.runtime.prefill import prefill

_SENTINEL = "KVCCONTEXTSENTINEL"
DEFAULT_MAX_NEW_TOKENS = 32


# --- scoring (LongBench qa_f1 / SQuAD normalisation) -----------------------------------------------


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation, drop the articles a/an/the, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(prediction: str, truth: str) -> float:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(truth).split()
    common = Counter(pred) & Counter(gold)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(truth))


def best_f1(prediction: str, answers: Sequence[str]) -> float:
    return max((token_f1(prediction, a) for a in answers), default=0.0)


def best_em(prediction: str, answers: Sequence[str]) -> float:
    return max((exact_match(prediction, a) for a in answers), default=0.0)


# --- prompts ------------------------------------------------------------------------------------------


def _has_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def template_parts(tokenizer, question: str) -> tuple[str, str] | None:
    """``(head, tail)`` of the chat prompt around the context, or None when there is no usable template."""
    if not _has_template(tokenizer):
        return None
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": f"{_SENTINEL}\n\n{question}"}], tokenize=False, add_generation_prompt=True
    )
    if rendered.count(_SENTINEL) != 1:
        return None
    head, tail = rendered.split(_SENTINEL)
    return head, tail


def build_prompt(lm, context: str, question: str) -> tuple[list[int], list[int]]:
    """``(context_ids, question_ids)``: the cached prefix and what is appended after it."""
    parts = template_parts(lm.tokenizer, question)
    if parts is None:
        return lm.tokenizer(context)["input_ids"], _ids(lm.tokenizer, f"\n\nQuestion: {question}\nAnswer:")
    head, tail = parts
    return _ids(lm.tokenizer, head + context), _ids(lm.tokenizer, tail)


def question_after(lm, context_ids: list[int], question: str) -> list[int]:
    """What to append after an existing cache (a .kvc file's tokens) to ask ``question``."""
    parts = template_parts(lm.tokenizer, question)
    if parts is None:
        return _ids(lm.tokenizer, f"\n\nQuestion: {question}\nAnswer:")
    head, tail = parts
    head_ids = _ids(lm.tokenizer, head)
    if head_ids and context_ids[: len(head_ids)] == head_ids:
        return _ids(lm.tokenizer, tail)
    turn = lm.tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    return _ids(lm.tokenizer, "\n\n" + turn)


# --- generation ---------------------------------------------------------------------------------------


@torch.inference_mode()
def generate(
    lm,
    context_ids: list[int],
    question_ids: list[int],
    kv: ContextKV | None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
) -> str:
    """Greedy answer. With ``kv`` the context comes from that cache and only the question is run;
    without, the model reads everything from the token ids (text mode)."""
    ids = torch.tensor([list(context_ids) + list(question_ids)], device=lm.device)
    kwargs = {}
    if kv is not None:
        if kv.num_tokens != len(context_ids):
            raise ValueError("the cache does not hold exactly the context")
        kwargs["past_key_values"] = to_transformers_cache(kv, lm.model.config, device=lm.device)
    eos = lm.tokenizer.eos_token_id
    out = lm.model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        num_beams=1,
        pad_token_id=eos if eos is not None else 0,
        **kwargs,
    )
    return lm.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


# --- datasets -----------------------------------------------------------------------------------------


@dataclass
class Example:
    context: str  # the text, or the path of a .kvc file holding its cache
    question: str
    answers: list[str]
    id: str = ""


_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def load_examples(
    path: str | Path,
    context_field: str = "context",
    question_field: str = "question",
    answers_field: str = "answers",
    limit: int | None = None,
) -> list[Example]:
    """Examples from a local jsonl/json/parquet/csv file through ``datasets`` (never a hub). An answers
    field may be a string, a list of strings, or a SQuAD-style ``{"text": [...]}``."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no such QA file: {path}")
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise InputError(f"{path.name}: QA data must be .jsonl, .json, .parquet or .csv")
    import datasets

    datasets.disable_progress_bars()
    try:
        data = datasets.load_dataset(fmt, data_files=str(path), split="train")
    except Exception as exc:  # datasets raises many types for a malformed file
        raise InputError(f"cannot read {path.name} as {fmt}: {str(exc).splitlines()[0]}") from exc
    for name in (context_field, question_field, answers_field):
        if name not in data.column_names:
            raise InputError(f"{path.name} has no field {name!r} (it has: {', '.join(data.column_names)})")
    examples = []
    for i, row in enumerate(data):
        answers = row[answers_field]
        if isinstance(answers, dict):
            answers = answers.get("text", [])
        if not isinstance(answers, (list, tuple)):
            answers = [answers]
        answers = [str(a) for a in (answers or []) if a is not None]
        if not answers:
            raise InputError(f"{path.name} example {i} has no answer")
        context = row[context_field]
        if isinstance(context, str) and context.endswith(".kvc") and not Path(context).is_absolute():
            context = str((path.parent / context).resolve())  # relative to the data file
        examples.append(
            Example(context=context, question=str(row[question_field]), answers=answers, id=str(row.get("id", i)))
        )
        if limit is not None and len(examples) >= limit:
            break
    if not examples:
        raise InputError(f"{path.name} holds no examples")
    return examples


# --- evaluation ---------------------------------------------------------------------------------------


@dataclass
class Answer:
    mode: str
    text: str
    f1: float
    em: float


@dataclass
class ExampleResult:
    id: str
    question: str
    answers: list[str]
    context_tokens: int
    predictions: list[Answer] = field(default_factory=list)


@dataclass
class QAResult:
    dataset: str
    examples: list[ExampleResult] = field(default_factory=list)

    def summary(self) -> dict:
        out: dict[str, dict] = {}
        for ex in self.examples:
            for a in ex.predictions:
                s = out.setdefault(a.mode, {"f1": 0.0, "em": 0.0, "examples": 0})
                s["f1"] += a.f1
                s["em"] += a.em
                s["examples"] += 1
        for s in out.values():
            s["f1"] /= max(s["examples"], 1)
            s["em"] /= max(s["examples"], 1)
        return out

    def as_dict(self) -> dict:
        return {
            "dataset": self.dataset,
            "summary": self.summary(),
            "examples": [
                {
                    "id": e.id,
                    "question": e.question,
                    "answers": e.answers,
                    "context_tokens": e.context_tokens,
                    "predictions": [{"mode": a.mode, "text": a.text, "f1": a.f1, "em": a.em} for a in e.predictions],
                }
                for e in self.examples
            ],
        }


def mode_caches(
    lm,
    context_ids: list[int],
    levels: Sequence[str],
    file=None,
    transforms: dict[str, Callable[[ContextKV], ContextKV]] | None = None,
    profile=None,
):
    """(mode, kv) for every mode but text: exact, each level decoded from .kvc bytes, each transform.
    Levels come from ``file`` (an opened KvcFile) or from encoding ``context_ids`` now (lossy levels
    with ``profile``, a Profile or a path, when given)."""
    import kvc

    exact = prefill(lm, context_ids)
    yield "exact", exact
    if file is None and levels:
        file = kvc.open(kvc.encode_tokens(lm, context_ids, levels=tuple(levels), profile=profile), profile=profile)
    if file is not None:
        for level in file.levels:
            if not levels or level in levels:
                yield level, file.read(level)
    for name, fn in (transforms or {}).items():
        yield name, fn(exact)


def evaluate_qa(
    lm,
    examples: Sequence[Example],
    *,
    levels: Sequence[str] = ("lossless",),
    transforms: dict[str, Callable[[ContextKV], ContextKV]] | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    dataset: str = "qa",
    on_example: Callable[[int], None] | None = None,
    profile=None,
) -> QAResult:
    """Answer every example in every mode (text, exact, each level, each transform) and score it.
    ``profile`` (a Profile or a path) serves lossy levels whose profile is not found on its own."""
    import kvc

    result = QAResult(dataset=dataset)
    for ex in examples:
        file = None
        if ex.context.endswith(".kvc") and Path(ex.context).is_file():
            file = kvc.open(ex.context, profile=profile)
            file.check_model(lm)
            context_ids = list(file.token_ids)
            question_ids = question_after(lm, context_ids, ex.question)
        else:
            context_ids, question_ids = build_prompt(lm, ex.context, ex.question)
        row = ExampleResult(id=ex.id, question=ex.question, answers=ex.answers, context_tokens=len(context_ids))
        text = generate(lm, context_ids, question_ids, None, max_new_tokens)
        row.predictions.append(Answer("text", text, best_f1(text, ex.answers), best_em(text, ex.answers)))
        for mode, kv in mode_caches(lm, context_ids, levels, file, transforms, profile):
            text = generate(lm, context_ids, question_ids, kv, max_new_tokens)
            row.predictions.append(Answer(mode, text, best_f1(text, ex.answers), best_em(text, ex.answers)))
        result.examples.append(row)
        if on_example is not None:
            on_example(1)
    return result
