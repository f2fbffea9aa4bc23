"""Decoded KV as safetensors: the layout `kvc decode` writes and any safetensors reader can load.

Tensors ``layers.{i}.key`` and ``layers.{i}.value``, each ``[kv_heads, tokens, head_dim]`` in the dtype
the cache was stored in (keys as transformers caches them: after the rotary embedding). Metadata, all
strings as safetensors requires:

* ``format``: ``kvc-kv``
* ``level``: the level decoded
* ``first_token``: position of the window's first token (0 unless a token range was asked for)
* ``token_ids``: JSON list of the window's token ids
* ``layer_starts``: JSON list, the absolute position of each layer's first row (sliding-window layers
  keep only their window)
* ``model``: JSON model identity (name, source, config/weights/tokenizer SHA-256, ...)
"""

from __future__ import annotations

import json

FORMAT = "kvc-kv"


def to_safetensors(f, kv, level: str) -> bytes:
    """The safetensors bytes of ``kv`` (a ContextKV read from the opened .kvc ``f`` at ``level``)."""
    from safetensors.torch import save

    tensors = {}
    for i, layer in enumerate(kv.layers):
        tensors[f"layers.{i}.key"] = layer.key.contiguous()
        tensors[f"layers.{i}.value"] = layer.value.contiguous()
    metadata = {
        "format": FORMAT,
        "level": level,
        "first_token": str(kv.first_token),
        "token_ids": json.dumps(kv.token_ids),
        "layer_starts": json.dumps([layer.start for layer in kv.layers]),
        "model": json.dumps(f.model, sort_keys=True),
    }
    return save(tensors, metadata=metadata)
