"""Needle retrieval: a short fact hidden at a chosen depth of real long text, asked for from the cache.

For each (length, depth) a haystack of ``length`` tokens is cut from the evaluation essays (or any
folder of .txt files), the needle ``The secret code for <thing> is <4 digits>.`` is inserted at the
sentence boundary nearest ``depth`` of the text, the haystack is encoded as the cached context (inside
the chat template, see :mod:`kvc.evaluation.qa`) and the question is asked after it. The answer is
generated greedily, so everything is deterministic. A cell is correct when the first number in the
answer is exactly the code (so ``"The code is 4172."`` is right and ``"417"`` or ``"41723"`` are not)."""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kvc.errors import InputError
from kvc.evaluation.qa import build_prompt, generate, mode_caches
from kvc.runtime.kv import ContextKV

DEFAULT_DEPTHS = (0.1, 0.5, 0.9)
DEFAULT_LENGTHS = (1024, 2048)
_THINGS = (
    "the blue door",
    "the north gate",
    "the old library",
    "the red boat",
    "the glass tower",
    "the night train",
    "the copper vault",
    "the river house",
)


def haystack_text(folder: str | Path | None = None) -> str:
    """The essays held out for evaluation (or every .txt under ``folder``), joined in name order."""
    if folder is None:
        from kvc.samples import essay_text, evaluation_essays

        return "\n\n".join(essay_text(name) for name in evaluation_essays())
    folder = Path(folder)
    files = sorted(folder.rglob("*.txt")) if folder.is_dir() else []
    if not files:
        raise InputError(f"--haystack {folder} holds no .txt files")
    return "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in files)


@dataclass
class Needle:
    thing: str
    code: str

    @property
    def sentence(self) -> str:
        return f"The secret code for {self.thing} is {self.code}."

    @property
    def question(self) -> str:
        return f"What is the secret code for {self.thing}? Answer with the number only."


def make_needle(length: int, depth: float, seed: int = 0) -> Needle:
    rng = random.Random(f"{seed}:{length}:{depth:.4f}")  # same cell, same needle, every run
    return Needle(thing=rng.choice(_THINGS), code=str(rng.randint(1000, 9999)))


def insert_needle(text: str, needle: Needle, depth: float) -> str:
    """``text`` with the needle after the sentence end nearest ``depth`` of its characters."""
    target = int(len(text) * depth)
    ends = [m.end() for m in re.finditer(r"[.!?]\s+", text)]
    cut = min(ends, key=lambda e: abs(e - target)) if ends else target
    return text[:cut] + needle.sentence + " " + text[cut:]


def build_haystack(lm, source: str, length: int, depth: float, needle: Needle) -> tuple[list[int], list[int]]:
    """(context_ids, question_ids) with the context close to ``length`` tokens, needle included."""
    if not 0.0 <= depth <= 1.0:
        raise InputError(f"needle depth {depth} is outside 0..1")
    budget = length - len(lm.tokenizer(needle.sentence, add_special_tokens=False)["input_ids"]) - 1
    overhead = len(build_prompt(lm, "", needle.question)[0])  # template head tokens
    enc = lm.tokenizer(source, add_special_tokens=False, return_offsets_mapping=True)
    if len(enc["input_ids"]) < budget - overhead:
        raise InputError(f"the haystack text has {len(enc['input_ids'])} tokens, fewer than --lengths {length}")
    end_char = enc["offset_mapping"][max(budget - overhead, 1) - 1][1]
    return build_prompt(lm, insert_needle(source[:end_char], needle, depth), needle.question)


def answer_correct(answer: str, code: str) -> bool:
    found = re.search(r"\d+", answer)
    return found is not None and found.group(0) == code


@dataclass
class NeedleCell:
    length: int  # asked-for length
    tokens: int  # context tokens actually cached
    depth: float
    code: str
    answers: dict[str, str] = field(default_factory=dict)  # mode -> generated answer

    def correct(self, mode: str) -> bool:
        return answer_correct(self.answers[mode], self.code)


@dataclass
class NeedleResult:
    cells: list[NeedleCell] = field(default_factory=list)

    def modes(self) -> list[str]:
        return list(dict.fromkeys(m for c in self.cells for m in c.answers))

    def summary(self) -> dict:
        def acc(cells):
            out = {}
            for mode in self.modes():
                hits = [c.correct(mode) for c in cells if mode in c.answers]
                out[mode] = {"accuracy": sum(hits) / max(len(hits), 1), "correct": sum(hits), "total": len(hits)}
            return out

        return {
            "modes": acc(self.cells),
            "cells": {f"{c.length}@{c.depth:g}": acc([c]) for c in self.cells},
            "by_length": {
                str(n): acc([c for c in self.cells if c.length == n])
                for n in dict.fromkeys(c.length for c in self.cells)
            },
            "by_depth": {
                f"{d:g}": acc([c for c in self.cells if c.depth == d])
                for d in dict.fromkeys(c.depth for c in self.cells)
            },
        }

    def as_dict(self) -> dict:
        return {
            "summary": self.summary(),
            "cells": [
                {
                    "length": c.length,
                    "tokens": c.tokens,
                    "depth": c.depth,
                    "code": c.code,
                    "answers": c.answers,
                    "correct": {m: c.correct(m) for m in c.answers},
                }
                for c in self.cells
            ],
        }


def evaluate_needle(
    lm,
    *,
    depths: Sequence[float] = DEFAULT_DEPTHS,
    lengths: Sequence[int] = DEFAULT_LENGTHS,
    levels: Sequence[str] = ("lossless",),
    haystack: str | Path | None = None,
    transforms: dict[str, Callable[[ContextKV], ContextKV]] | None = None,
    max_new_tokens: int = 24,
    seed: int = 0,
    on_cell: Callable[[int], None] | None = None,
    profile=None,
) -> NeedleResult:
    """Retrieve a needle at every (length, depth) in every mode: text, exact, each level, each transform.
    ``profile`` (a Profile or a path) serves lossy levels whose profile is not found on its own."""
    source = haystack_text(haystack)
    result = NeedleResult()
    for length in lengths:
        for depth in depths:
            needle = make_needle(length, depth, seed)
            context_ids, question_ids = build_haystack(lm, source, length, depth, needle)
            cell = NeedleCell(length=length, tokens=len(context_ids), depth=depth, code=needle.code)
            cell.answers["text"] = generate(lm, context_ids, question_ids, None, max_new_tokens)
            for mode, kv in mode_caches(lm, context_ids, levels, None, transforms, profile):
                cell.answers[mode] = generate(lm, context_ids, question_ids, kv, max_new_tokens)
            result.cells.append(cell)
            if on_cell is not None:
                on_cell(1)
    return result
