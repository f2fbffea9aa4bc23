"""kvc: precompute, compress and verify the KV caches of language-model contexts.

import kvc
lm = kvc.load_model()                       # the embedded SmolLM2-135M-Instruct
data = kvc.encode_text(lm, "a long document ...")
kvc.save("doc.kvc", data)
with kvc.open("doc.kvc") as f:
    kv = f.read(tokens=(0, 256))            # reads only the chunks it needs
    cache = f.to_cache(lm)                  # for model.generate(..., past_key_values=cache)
"""

__version__ = "0.1.0"

# Names resolve on first use (PEP 562): `import kvc` stays cheap, and commands that only read a
# header (inspect, verify) never pay for torch, numba or transformers.
_LAZY = {
    "KvcFile": "kvc.api", "encode_kv": "kvc.api", "encode_text": "kvc.api", "encode_tokens": "kvc.api",
    "open": "kvc.api", "save": "kvc.api", "to_transformers_cache": "kvc.runtime.cache",
    "ContextKV": "kvc.runtime.kv", "LayerKV": "kvc.runtime.kv", "load_model": "kvc.runtime.loading",
    "prefill": "kvc.runtime.prefill", "tokenize": "kvc.runtime.prefill",
}  # fmt: skip


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kvc' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "ContextKV",
    "KvcFile",
    "LayerKV",
    "encode_kv",
    "encode_text",
    "encode_tokens",
    "load_model",
    "open",
    "prefill",
    "save",
    "to_transformers_cache",
    "tokenize",
]
