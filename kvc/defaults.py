"""Defaults every entry point shares (library, CLI, benchmarks), in a module with no heavy imports so
`kvc --help` can show them without loading torch."""

DEFAULT_CHUNK_TOKENS = 256  # tokens per chunk: the unit of random access in a .kvc file
DEFAULT_SLICE_TOKENS = 512  # tokens per prefill step: bounds activation memory on long documents
DEFAULT_MAX_TOKENS = 131072  # `kvc encode` refuses longer documents unless told to --truncate
DEFAULT_CONTINUATION_TOKENS = 256  # tokens `kvc eval` scores after the cached context
