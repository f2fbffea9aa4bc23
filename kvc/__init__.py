"""kvc: precompute, compress and verify the KV caches of language-model contexts."""

__version__ = "0.1.0"
