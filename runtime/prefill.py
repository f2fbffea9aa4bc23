"""Run a causal LM over token ids and hand back its KV cache as plain tensors.

Long inputs are prefilled in slices of ``slice_tokens`` against a growing cache (chunked prefill),
so activation memory stays bounded by the slice, not the document. The slice size changes the
floating-point reduction order, so it is recorded in the file: a deep verify repeats it exactly."""

from __future__ import annotations

from collections.abc import Callable

import torch

from kvc.defaults import DEFAULT_SLICE_TOKENS
from kvc.errors import InputError
from kvc.runtime.cache import from_transformers_cache
from kvc.runtime.kv import ContextKV


def tokenize(lm, text: str, max_tokens: int | None = None, add_special_tokens: bool = True) -> list[int]:
    ids = lm.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
    if not ids:
        raise InputError("the document is empty: it has no tokens")
    if max_tokens is not None and len(ids) > max_tokens:
        raise InputError(f"the document has {len(ids)} tokens, over --max-tokens {max_tokens}")
    return ids


def new_cache(config):
    from transformers import DynamicCache

    return DynamicCache(config=config)


@torch.no_grad()
def run_slices(
    model,
    token_ids: list[int],
    cache,
    slice_tokens: int,
    on_progress: Callable[[int], None] | None = None,
    start: int = 0,
):
    """Feed ``token_ids`` (positions ``start..``) into ``cache`` slice by slice; return the last logits."""
    device = next(model.parameters()).device
    logits = None
    for a in range(0, len(token_ids), slice_tokens):
        piece = torch.tensor([token_ids[a : a + slice_tokens]], device=device)
        positions = torch.arange(start + a, start + a + piece.shape[1], device=device)
        out = model(input_ids=piece, past_key_values=cache, use_cache=True, cache_position=positions, logits_to_keep=1)
        logits = out.logits[0, -1]
        if on_progress is not None:
            on_progress(piece.shape[1])
    return logits


def prefill(
    lm, token_ids: list[int], slice_tokens: int = DEFAULT_SLICE_TOKENS, on_progress: Callable[[int], None] | None = None
) -> ContextKV:
    """The model's KV for ``token_ids``: per layer ``[kv_heads, tokens, head_dim]`` in its dtype, on CPU."""
    if not token_ids:
        raise InputError("cannot prefill an empty context")
    if slice_tokens < 1:
        raise InputError("the prefill slice must be at least one token")
    cache = new_cache(lm.model.config)
    run_slices(lm.model, token_ids, cache, slice_tokens, on_progress)
    return from_transformers_cache(cache, token_ids)
