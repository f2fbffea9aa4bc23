"""kvc: precompute, compress and verify the KV caches of language-model contexts.

import kvc
lm = kvc.load_model()                       # the embedded SmolLM2-135M-Instruct
data = kvc.encode_text(lm, "a long document ...")
kvc.save("doc.kvc", data)
with kvc.open("doc.kvc") as f:
    kv = f.read(tokens=(0, 256))            # reads only the chunks it needs
    cache = f.to_cache(lm)                  # for model.generate(..., past_key_values=cache)
cache, report = kvc.load_cache("http://127.0.0.1:8000/doc.kvc", lm)   # streamed: level or text per chunk

The names below are imported on first use, so `import kvc` (and the `kvc` command's start-up,
`kvc --help`, `kvc inspect`) costs no torch or transformers import until one is needed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what static tools see; at run time __getattr__ below imports on first use
    from kvc.api import KvcFile, encode_kv, encode_text, encode_tokens, open, save  # noqa: A004
    from kvc.runtime.cache import to_transformers_cache
    from kvc.runtime.kv import ContextKV, LayerKV
    from kvc.runtime.loading import load_model
    from kvc.runtime.prefill import prefill, tokenize
    from kvc.safetensors_io import to_safetensors
    from kvc.streaming.loader import load_cache, open_stream

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "KvcFile": "kvc.api",
    "encode_kv": "kvc.api",
    "encode_text": "kvc.api",
    "encode_tokens": "kvc.api",
    "open": "kvc.api",
    "save": "kvc.api",
    "to_transformers_cache": "kvc.runtime.cache",
    "ContextKV": "kvc.runtime.kv",
    "LayerKV": "kvc.runtime.kv",
    "load_model": "kvc.runtime.loading",
    "prefill": "kvc.runtime.prefill",
    "tokenize": "kvc.runtime.prefill",
    "to_safetensors": "kvc.safetensors_io",
    "load_cache": "kvc.streaming.loader",
    "open_stream": "kvc.streaming.loader",
}

__all__ = [
    "ContextKV",
    "KvcFile",
    "LayerKV",
    "encode_kv",
    "encode_text",
    "encode_tokens",
    "load_cache",
    "load_model",
    "open",
    "open_stream",
    "prefill",
    "save",
    "to_safetensors",
    "to_transformers_cache",
    "tokenize",
]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module), name)
    else:  # a submodule used as an attribute after `import kvc` (kvc.api, kvc.codec, ...)
        try:
            value = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module 'kvc' has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
