"""Replay one context in every mode and score each against the model's own cache.

Modes, side by side in one run:

* ``text``  the context re-read from its token ids (one cache-free forward for quality, a chunked
  prefill for time): the time reference and the quality baseline,
* ``exact`` the model's own KV from a fresh prefill, held in memory, never serialised: the quality
  reference every other mode is compared with,
* one mode per level stored in the .kvc (lossless included), decoded through the same path an
  application takes: bytes → ``kvc.open`` → ``read(level)`` → transformers cache → forward,
* optional *transforms*: functions of the exact KV (a damaged cache, a quantiser being tried out).

Quality is scored by :mod:`kvc.evaluation.quality` (teacher-forced continuation); time by
:mod:`kvc.evaluation.timing`."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kvc.defaults import DEFAULT_CONTINUATION_TOKENS
from kvc.errors import InputError
from kvc.evaluation.quality import QualityScores, compare, continuation_logprobs, text_logprobs
from kvc.evaluation.timing import TOKEN_ID_BYTES, Breakdown, Stopwatch, median_breakdown
from kvc.runtime.cache import to_transformers_cache
from kvc.runtime.kv import ContextKV, LayerKV
from kvc.runtime.prefill import DEFAULT_SLICE_TOKENS, new_cache, prefill, run_slices

Transform = Callable[[ContextKV], ContextKV]


@dataclass
class ModeResult:
    mode: str  # "text", "exact", a level name, or a transform's name
    kind: str  # "text" | "exact" | "level" | "transform"
    transfer_bytes: int  # what has to move to use this mode: stored payload, token ids, or raw tensors
    bits_per_element: float  # transfer_bytes * 8 per cached K/V element
    scores: QualityScores
    timing: Breakdown

    def ttft_at(self, gbit_per_s: float) -> float:
        return self.timing.at_bandwidth(self.transfer_bytes, gbit_per_s)

    def as_dict(self, bandwidths: Sequence[float] = ()) -> dict:
        s = self.scores
        return {
            "mode": self.mode,
            "kind": self.kind,
            "bytes": self.transfer_bytes,
            "bits_per_element": self.bits_per_element,
            "perplexity_ratio": s.perplexity_ratio,
            "kl": s.kl,
            "top1_agreement": s.top1_agreement,
            "nll": s.nll,
            "perplexity": _exp(s.nll),
            "ttft": self.timing.as_dict(),
            "ttft_at_bandwidth": {f"{b:g}": self.ttft_at(b) for b in bandwidths},
        }


@dataclass
class ContextResult:
    name: str
    tokens: int  # context tokens the cache holds
    continuation_tokens: int
    continuation_source: str  # "file", "document", "held-out" or "given"
    elements: int  # K/V elements in the exact cache
    modes: list[ModeResult] = field(default_factory=list)

    def mode(self, name: str) -> ModeResult:
        for m in self.modes:
            if m.mode == name:
                return m
        raise KeyError(name)

    def as_dict(self, bandwidths: Sequence[float] = ()) -> dict:
        return {
            "context": self.name,
            "tokens": self.tokens,
            "continuation_tokens": self.continuation_tokens,
            "continuation_source": self.continuation_source,
            "elements": self.elements,
            "modes": [m.as_dict(bandwidths) for m in self.modes],
        }


def _exp(x: float) -> float:
    import math

    return math.exp(min(x, 700.0))


def prefix_kv(kv: ContextKV, tokens: int) -> ContextKV:
    """The cache of the first ``tokens`` tokens, cut from a longer one (valid: a causal model's KV at a
    position depends only on what precedes it). A sliding-window layer has dropped positions that a
    shorter context would still keep, so a cache with one cannot be cut."""
    if tokens == kv.num_tokens:
        return kv
    if any(layer.start != 0 for layer in kv.layers):
        raise InputError(
            "this model has sliding-window layers, so the continuation cannot be held out "
            "of the stored tokens: pass --continuation FILE"
        )
    layers = [LayerKV(key=layer.key[:, :tokens], value=layer.value[:, :tokens], start=0) for layer in kv.layers]
    return ContextKV(token_ids=kv.token_ids[:tokens], layers=layers)


def kv_elements(kv: ContextKV) -> int:
    return sum(layer.key.numel() + layer.value.numel() for layer in kv.layers)


def zero_values(layers: Sequence[int]) -> Transform:
    """A deliberately damaged cache: the values of ``layers`` zeroed. Metrics that cannot tell this
    from the exact cache are broken; the tests use it."""

    def damage(kv: ContextKV) -> ContextKV:
        out = []
        for i, layer in enumerate(kv.layers):
            value = torch.zeros_like(layer.value) if i in layers else layer.value
            out.append(LayerKV(key=layer.key, value=value, start=layer.start))
        return ContextKV(token_ids=list(kv.token_ids), layers=out)

    return damage


@torch.inference_mode()
def first_token(lm, cache, next_id: int, position: int) -> int:
    """One forward of ``next_id`` at ``position`` over ``cache``: the argmax is the first generated token."""
    ids = torch.tensor([[next_id]], device=lm.device)
    pos = torch.tensor([position], device=lm.device)
    logits = lm.model(input_ids=ids, past_key_values=cache, use_cache=True, cache_position=pos, logits_to_keep=1).logits
    return int(logits[0, -1].argmax())


@dataclass
class StoredLevels:
    """Where a context's stored levels come from: a .kvc file on disk (its bytes re-read each repeat,
    so ``read`` is measured) and which of its levels to evaluate."""

    path: Path
    levels: list[str]
    level_bytes: dict[str, int]
    stored_tokens: int  # tokens the file holds; the evaluated context may be a prefix of them
    profile: object = None  # a Profile or a path, for lossy levels whose profile is not found on its own


def _timed_text(lm, ids: list[int], next_id: int) -> dict:
    watch = Stopwatch(lm.device)
    cache = new_cache(lm.model.config)
    watch.step("build", run_slices, lm.model, ids, cache, DEFAULT_SLICE_TOKENS)
    watch.step("first", first_token, lm, cache, next_id, len(ids))
    return watch.laps


def _timed_memory(lm, kv: ContextKV, next_id: int) -> dict:
    watch = Stopwatch(lm.device)
    cache = watch.step("build", to_transformers_cache, kv, lm.model.config, device=lm.device)
    watch.step("first", first_token, lm, cache, next_id, kv.num_tokens)
    return watch.laps


def _decode_level(data: bytes, level: str, tokens: int, profile=None) -> ContextKV:
    import kvc

    with kvc.open(data, profile=profile) as f:
        if tokens == f.num_tokens:
            return f.read(level)
        # Only the chunks covering the context are decoded, as an application reading a prefix would;
        # sliding-window layers come back starting where the file's window starts, which prefix_kv refuses.
        return _whole_prefix(f.read(level, tokens=(0, tokens)), tokens)


def _whole_prefix(kv: ContextKV, tokens: int) -> ContextKV:
    if any(layer.start != 0 for layer in kv.layers):
        raise InputError(
            "this model has sliding-window layers, so the continuation cannot be held out "
            "of the stored tokens: pass --continuation FILE"
        )
    return kv


def _timed_level(lm, stored: StoredLevels, level: str, tokens: int, next_id: int) -> dict:
    watch = Stopwatch(lm.device)
    data = watch.step("read", stored.path.read_bytes)
    kv = watch.step("decode", _decode_level, data, level, tokens, stored.profile)
    cache = watch.step("build", to_transformers_cache, kv, lm.model.config, device=lm.device)
    watch.step("first", first_token, lm, cache, next_id, kv.num_tokens)
    return watch.laps


def evaluate_context(
    lm,
    context_ids: list[int],
    continuation_ids: list[int],
    *,
    stored: StoredLevels | None = None,
    transforms: dict[str, Transform] | None = None,
    repeat: int = 3,
    name: str = "context",
    continuation_source: str = "given",
    on_step: Callable[[str], None] | None = None,
) -> ContextResult:
    """Score and time every mode for one context. ``continuation_ids`` must have at least 2 tokens
    (row i of the scores predicts token i + 1)."""
    if len(continuation_ids) < 2:
        raise InputError("the continuation needs at least 2 tokens to score")
    if repeat < 1:
        raise InputError("--repeat must be at least 1")
    tick = on_step or (lambda _label: None)
    context_ids, continuation_ids = list(context_ids), list(continuation_ids)
    exact_kv = prefill(lm, context_ids)
    reference = continuation_logprobs(lm, exact_kv, continuation_ids)
    elements = kv_elements(exact_kv)
    next_id = continuation_ids[0]
    tick("exact")

    # Quality first (deterministic, once), then timing (repeated, interleaved so drift hits all modes alike).
    entries: list[tuple[str, str, int, QualityScores]] = [
        (
            "text",
            "text",
            len(context_ids) * TOKEN_ID_BYTES,
            compare(reference, text_logprobs(lm, context_ids, continuation_ids), continuation_ids),
        ),
        ("exact", "exact", exact_kv.nbytes(), compare(reference, reference, continuation_ids)),
    ]
    tick("text")
    level_kvs: dict[str, ContextKV] = {}
    if stored is not None:
        data = stored.path.read_bytes()
        for level in stored.levels:
            kv = _decode_level(data, level, len(context_ids), stored.profile)
            level_kvs[level] = kv
            entries.append(
                (
                    level,
                    "level",
                    stored.level_bytes[level],
                    compare(reference, continuation_logprobs(lm, kv, continuation_ids), continuation_ids),
                )
            )
            tick(level)
    transformed: dict[str, ContextKV] = {}
    for tname, fn in (transforms or {}).items():
        kv = transformed[tname] = fn(exact_kv)
        entries.append(
            (
                tname,
                "transform",
                kv.nbytes(),
                compare(reference, continuation_logprobs(lm, kv, continuation_ids), continuation_ids),
            )
        )
        tick(tname)

    runs: dict[str, list[dict]] = {e[0]: [] for e in entries}
    for _ in range(repeat):
        runs["text"].append(_timed_text(lm, context_ids, next_id))
        runs["exact"].append(_timed_memory(lm, exact_kv, next_id))
        for level in level_kvs:
            runs[level].append(_timed_level(lm, stored, level, len(context_ids), next_id))
        for tname, kv in transformed.items():
            runs[tname].append(_timed_memory(lm, kv, next_id))
        tick("timing")

    result = ContextResult(
        name=name,
        tokens=len(context_ids),
        continuation_tokens=len(continuation_ids),
        continuation_source=continuation_source,
        elements=elements,
    )
    for mode, kind, nbytes, scores in entries:
        bits = nbytes * 8 / max(elements, 1)
        result.modes.append(
            ModeResult(
                mode=mode,
                kind=kind,
                transfer_bytes=nbytes,
                bits_per_element=bits,
                scores=scores,
                timing=median_breakdown(runs[mode]),
            )
        )
    return result


def _select_levels(available: list[str], wanted: Sequence[str] | None) -> list[str]:
    if not wanted:
        return list(available)
    missing = [w for w in wanted if w not in available]
    if missing:
        raise InputError(f"level {', '.join(missing)} is not stored in the file (it has: {', '.join(available)})")
    return [a for a in available if a in wanted]


def continuation_from_text(lm, text: str, tokens: int | None = None) -> list[int]:
    """A continuation file's text as token ids, without special tokens (it follows the context)."""
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[:tokens] if tokens else ids


def evaluate_file(
    path: str | Path,
    lm=None,
    *,
    levels: Sequence[str] | None = None,
    continuation_ids: list[int] | None = None,
    continuation_tokens: int = DEFAULT_CONTINUATION_TOKENS,
    transforms: dict[str, Transform] | None = None,
    repeat: int = 3,
    device: str = "auto",
    on_step: Callable[[str], None] | None = None,
    profile=None,
) -> ContextResult:
    """Replay a .kvc file in every mode. Without ``continuation_ids`` the last ``continuation_tokens``
    of the stored context are held out as the continuation and the rest is the context. ``profile``
    (a Profile or a path) serves lossy levels whose profile is neither embedded nor installed."""
    import kvc

    path = Path(path)
    if not path.is_file():
        raise InputError(f"no such file: {path}")
    f = kvc.open(path.read_bytes(), profile=profile)
    if lm is None:
        lm = load_for_file(f, None, device)
    f.check_model(lm)
    stored_ids = list(f.token_ids)
    following = None if continuation_ids is not None else document_continuation(f, lm, continuation_tokens)
    if continuation_ids is not None:
        context_ids, cont, source = stored_ids, list(continuation_ids), "file"
    elif following is not None:
        context_ids, cont, source = stored_ids, following, "document"
    else:
        if len(stored_ids) < continuation_tokens + 1 or continuation_tokens < 2:
            raise InputError(
                f"{path.name} holds {len(stored_ids)} tokens, too few to hold out a "
                f"{continuation_tokens}-token continuation: pass --continuation FILE or a smaller "
                "--continuation-tokens"
            )
        context_ids, cont, source = stored_ids[:-continuation_tokens], stored_ids[-continuation_tokens:], "held-out"
    chosen = _select_levels(list(f.levels), levels)
    stored = StoredLevels(
        path=path,
        levels=chosen,
        level_bytes={lv: f.level_bytes(lv, (0, len(context_ids))) for lv in chosen},
        stored_tokens=len(stored_ids),
        profile=profile,
    )
    return evaluate_context(
        lm,
        context_ids,
        cont,
        stored=stored,
        transforms=transforms,
        repeat=repeat,
        name=path.name,
        continuation_source=source,
        on_step=on_step,
    )


def document_continuation(f, lm, tokens: int) -> list[int] | None:
    """The tokens that follow the encoded context in the document it was encoded from, when the file
    names that document (``context.source``), it is still readable and it still starts with the stored
    tokens (a truncated encode, ``--max-tokens``); else None."""
    context = f.header.get("context", {})
    source = context.get("source")
    if not source or not Path(source).is_file() or tokens < 2:
        return None
    try:
        text = Path(source).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    ids = lm.tokenizer(text, add_special_tokens=context.get("add_special_tokens", True))["input_ids"]
    stored = list(f.token_ids)
    if ids[: len(stored)] != stored or len(ids) < len(stored) + 2:
        return None
    return ids[len(stored) : len(stored) + tokens]


def evaluate_tokens(
    lm,
    context_ids: list[int],
    continuation_ids: list[int],
    *,
    levels: Sequence[str] = ("lossless",),
    transforms: dict[str, Transform] | None = None,
    repeat: int = 3,
    name: str = "context",
    workdir: str | Path | None = None,
    on_step: Callable[[str], None] | None = None,
    profile=None,
) -> ContextResult:
    """Encode ``context_ids`` at ``levels`` into a temporary .kvc file and replay it: the benchmark's
    path, and the way to evaluate text that has no file yet. ``profile`` (a Profile or a path) encodes
    the lossy levels with it instead of the one kvc finds for the model (it must be findable by hash
    when the file is read back, as the shipped optional profiles are, or be passed to reads too)."""
    import kvc

    data = kvc.encode_tokens(lm, list(context_ids), levels=tuple(levels), profile=profile)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        path = Path(tmp) / f"{Path(name).stem}.kvc"
        kvc.save(path, data)
        f = kvc.open(data)
        stored = StoredLevels(
            path=path,
            levels=list(f.levels),
            level_bytes={lv: f.level_bytes(lv) for lv in f.levels},
            stored_tokens=len(context_ids),
        )
        return evaluate_context(
            lm,
            context_ids,
            continuation_ids,
            stored=stored,
            transforms=transforms,
            repeat=repeat,
            name=name,
            continuation_source="document",
            on_step=on_step,
        )


def load_for_file(f, model: str | None, device: str = "auto", dtype: str | None = None):
    """The model a file names (``f.model["source"]``) or ``model``, in the dtype the file was prefilled in
    unless ``dtype`` says otherwise; refused if it is not the file's."""
    from kvc.runtime.loading import load_for_file as load

    return load(f, model, device=device, dtype=dtype)
