"""The in-memory KV cache of one context: plain tensors, no framework objects.

Every layer stores key and value as ``[kv_heads, tokens, head_dim]`` in the model's dtype. A layer
keeps the tokens ``start .. start + tokens`` of the context: ``start`` is 0 for full-attention
layers and the first position still inside the window for sliding-window layers, which keep only
the last ``window - 1`` tokens (what transformers itself keeps)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LayerKV:
    key: torch.Tensor  # [kv_heads, kept_tokens, head_dim]
    value: torch.Tensor  # [kv_heads, kept_tokens, value_dim]
    start: int = 0  # absolute position of key[:, 0]

    @property
    def end(self) -> int:
        return self.start + self.key.shape[1]


@dataclass
class ContextKV:
    token_ids: list[int]  # the tokens at positions first_token .. first_token + len(token_ids)
    layers: list[LayerKV] = field(default_factory=list)
    first_token: int = 0  # non-zero only for a window read out of the middle of a file

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in (layer.key, layer.value))

    def equal(self, other: ContextKV) -> bool:
        """Bit-exact equality (NaN payloads included), the lossless promise."""
        if (self.token_ids, self.first_token) != (other.token_ids, other.first_token) or len(self.layers) != len(
            other.layers
        ):
            return False
        for a, b in zip(self.layers, other.layers):
            if a.start != b.start:
                return False
            for x, y in ((a.key, b.key), (a.value, b.value)):
                if x.shape != y.shape or x.dtype != y.dtype:
                    return False
                if not torch.equal(x.contiguous().view(torch.uint8), y.contiguous().view(torch.uint8)):
                    return False
        return True
