"""Convert between plain ContextKV tensors and transformers' DynamicCache (batch of one)."""

from __future__ import annotations

import torch

from kvc.runtime.kv import ContextKV, LayerKV


def from_transformers_cache(cache, token_ids: list[int]) -> ContextKV:
    layers = []
    for layer in cache.layers:
        key, value = layer.keys[0].detach().to("cpu"), layer.values[0].detach().to("cpu")
        # A sliding-window layer keeps the last few tokens: they end where the context ends.
        layers.append(LayerKV(key=key.contiguous(), value=value.contiguous(), start=len(token_ids) - key.shape[1]))
    return ContextKV(token_ids=list(token_ids), layers=layers)


def to_transformers_cache(kv: ContextKV, config, device: torch.device | str = "cpu", dtype: torch.dtype | None = None):
    """A DynamicCache holding ``kv``, ready for ``model(..., past_key_values=)`` or ``generate``.

    The cache is built from the model's config so sliding-window layers get their own layer type and
    keep trimming their window as generation goes on, exactly as after a fresh prefill."""
    from transformers import DynamicCache

    if kv.first_token != 0:
        raise ValueError("a transformers cache must start at the context's first token; read the file from token 0")
    cache = DynamicCache(config=config)
    if len(cache.layers) != len(kv.layers):
        raise ValueError(f"the cache has {len(kv.layers)} layers, the model {len(cache.layers)}")
    for slot, layer in zip(cache.layers, kv.layers):
        key = layer.key.unsqueeze(0).to(device=device, dtype=dtype or layer.key.dtype)
        value = layer.value.unsqueeze(0).to(device=device, dtype=dtype or layer.value.dtype)
        slot.lazy_initialization(key, value)
        slot.keys, slot.values = key, value
        if hasattr(slot, "cumulative_length"):
            slot.cumulative_length = kv.num_tokens
    return cache
