"""A transformers cache built chunk by chunk, in any order, on the model's device.

Every layer gets one buffer for the positions the file stores for it (``[1, kv_heads,
tokens - start, dim]``; ``start`` is 0 for full attention and the window's first position for a
sliding-window layer, as in docs/FORMAT.md): the cache's final memory, allocated once. Two kinds
of chunk fill it:

* a *decoded* chunk (``put``) is copied into its rows; it may come before chunks in front of it
  (the loader fetches from the back), and stays invisible to the model until ``finish``;
* a *text* chunk (``prefill``) is run through the model on top of the chunks before it, which must
  all be text chunks too (the loader recomputes from the front), so every layer, sliding windows
  included, holds exactly what a plain prefill would; its new rows are then copied in.

``finish`` hands back a ``DynamicCache`` whose layers are the buffers, exactly the shape
``KvcFile.to_cache`` builds, ready for ``model.generate``."""

from __future__ import annotations

import torch

from kvc.errors import InputError
from kvc.runtime.prefill import DEFAULT_SLICE_TOKENS, new_cache, run_slices


class IncrementalCache:
    def __init__(self, lm, header: dict, dtype: torch.dtype):
        from transformers.cache_utils import DynamicLayer

        self._model = lm.model
        self.device = lm.device
        self.num_tokens = header["context"]["num_tokens"]
        self.token_ids = header["context"]["token_ids"]
        self.cache = new_cache(lm.model.config)
        layers = header["layout"]["layers"]
        if len(self.cache.layers) != len(layers):
            raise InputError(f"the file has {len(layers)} layers, the model's cache {len(self.cache.layers)}")
        if not all(isinstance(slot, DynamicLayer) for slot in self.cache.layers):
            raise InputError("this model's cache has layers the streaming loader cannot fill (not key/value layers)")
        self.starts = [spec["start"] for spec in layers]
        self.buffers = [
            (
                torch.empty((1, spec["kv_heads"], self.num_tokens - spec["start"], spec["key_dim"]),
                            dtype=dtype, device=self.device),
                torch.empty((1, spec["kv_heads"], self.num_tokens - spec["start"], spec["value_dim"]),
                            dtype=dtype, device=self.device),
            )
            for spec in layers
        ]
        self.text_end = 0  # chunks [0, text_end) were recomputed from text

    def put(self, start: int, end: int, decoded: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Copy one decoded chunk ``[start, end)`` (per layer key/value ``[heads, rows, dim]``) into place."""
        for (kbuf, vbuf), first, (key, value) in zip(self.buffers, self.starts, decoded):
            lo = max(start, first)
            rows = end - lo
            if rows <= 0:
                continue
            kbuf[0, :, lo - first : end - first].copy_(key, non_blocking=True)
            vbuf[0, :, lo - first : end - first].copy_(value, non_blocking=True)

    @torch.no_grad()
    def prefill(self, start: int, end: int, slice_tokens: int = DEFAULT_SLICE_TOKENS) -> None:
        """Run the model over tokens ``[start, end)`` on top of the text chunks before them."""
        if start != self.text_end:
            raise AssertionError(f"text chunks must come in order from the front: {start} after {self.text_end}")
        run_slices(self._model, self.token_ids[start:end], self.cache, slice_tokens, start=start)
        for slot, (kbuf, vbuf), first in zip(self.cache.layers, self.buffers, self.starts):
            lo = max(start, first)
            held = slot.keys.shape[-2]  # the slot holds positions [end - held, end)
            if end > lo:
                kbuf[:, :, lo - first : end - first].copy_(slot.keys[:, :, lo - end + held : held])
                vbuf[:, :, lo - first : end - first].copy_(slot.values[:, :, lo - end + held : held])
            if not getattr(slot, "is_sliding", False) and first == 0:
                # Full attention: the slot becomes a view of the buffer, so no second copy is kept.
                slot.keys, slot.values = kbuf[:, :, :end], vbuf[:, :, :end]
        self.text_end = end

    def finish(self):
        """The DynamicCache of the whole context (the buffers become its layers)."""
        for slot, (kbuf, vbuf) in zip(self.cache.layers, self.buffers):
            if not slot.is_initialized:
                slot.lazy_initialization(kbuf, vbuf)
            slot.keys, slot.values = kbuf, vbuf
            if hasattr(slot, "cumulative_length"):
                slot.cumulative_length = self.num_tokens
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return self.cache
