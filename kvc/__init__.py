"""kvc: precompute, compress and verify the KV caches of language-model contexts.

import kvc
lm = kvc.load_model()                       # the embedded SmolLM2-135M-Instruct
data = kvc.encode_text(lm, "a long document ...")
kvc.save("doc.kvc", data)
with kvc.open("doc.kvc") as f:
    kv = f.read(tokens=(0, 256))            # reads only the chunks it needs
    cache = f.to_cache(lm)                  # for model.generate(..., past_key_values=cache)
cache, report = kvc.load_cache("http://127.0.0.1:8000/doc.kvc", lm)   # streamed: level or text per chunk
"""

__version__ = "0.1.0"

from kvc.api import KvcFile, encode_kv, encode_text, encode_tokens, open, save  # noqa: E402,A004
from kvc.runtime.cache import to_transformers_cache  # noqa: E402
from kvc.runtime.kv import ContextKV, LayerKV  # noqa: E402
from kvc.runtime.loading import load_model  # noqa: E402
from kvc.runtime.prefill import prefill, tokenize  # noqa: E402
from kvc.streaming.loader import load_cache, open_stream  # noqa: E402

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
    "to_transformers_cache",
    "tokenize",
]
