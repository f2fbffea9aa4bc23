"""The library surface: encode a context into .kvc bytes, open a .kvc, read KV back.

Data flows one way: text -> token ids -> prefill -> ContextKV -> codec segments -> container
bytes, and back. The CLI is a thin shell over these functions."""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

import kvc
from kvc.codec.base import Segment
from kvc.codec.registry import LOSSLESS, build_codec, level_entry, level_names
from kvc.errors import FormatError, InputError, ProfileError
from kvc.formats.container import EncodedChunk, build, open_container, write_atomic
from kvc.runtime.identity import check_same_model, model_identity
from kvc.runtime.kv import ContextKV, LayerKV
from kvc.runtime.prefill import DEFAULT_SLICE_TOKENS, prefill, tokenize

DEFAULT_CHUNK_TOKENS = 256
KINDS = ("key", "value")
_TORCH_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


def _resolve_profile(levels: Iterable[str], identity: dict, profile):
    """The profile lossy levels need: the one given (object or path), else the one found for the model."""
    if all(name == LOSSLESS for name in levels):
        return None
    if profile is not None and not isinstance(profile, (str, Path)):
        return profile
    try:
        from kvc.codec.profile import find_profile
    except ModuleNotFoundError as exc:
        raise ProfileError("this kvc has no lossy codec installed") from exc
    found = find_profile(identity, str(profile) if profile is not None else None)
    if found is None:
        raise ProfileError(
            f"no profile for model {identity.get('name')}: fit one with `kvc profile` "
            f"and pass --profile, or use --level lossless"
        )
    return found


def default_levels(lm, profile=None) -> list[str]:
    """The default of `kvc encode`: the default lossy level when a profile for the model is at hand,
    else lossless (a model nobody has profiled still gets a correct, if larger, file)."""
    try:
        from kvc.codec.levels import DEFAULT_LEVEL
        from kvc.codec.profile import find_profile
    except ModuleNotFoundError:
        return [LOSSLESS]
    if profile is not None or find_profile(model_identity(lm), None) is not None:
        return [DEFAULT_LEVEL]
    return [LOSSLESS]


def encode_kv(
    kv: ContextKV,
    model: dict,
    levels: Iterable[str] = (LOSSLESS,),
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    profile=None,
    context: dict | None = None,
    prefill_info: dict | None = None,
    embed_profile: bool = False,
    on_chunk: Callable[[int], None] | None = None,
) -> bytes:
    """Container bytes for an already computed KV cache."""
    levels = list(dict.fromkeys(levels))
    if not levels:
        raise InputError("give at least one level")
    unknown = [name for name in levels if name not in level_names()]
    if unknown:
        raise InputError(f"unknown level {unknown[0]!r}: choose from {', '.join(level_names())}")
    if not 1 <= chunk_tokens <= 65536:
        raise InputError("--chunk-tokens must be between 1 and 65536")
    if kv.first_token != 0:
        raise InputError("only a whole context (from token 0) can be encoded")
    profile = _resolve_profile(levels, model, profile)
    entries = {name: level_entry(name, profile) for name in levels}
    codecs = {name: build_codec(entry, profile) for name, entry in entries.items()}
    dtype = kv.layers[0].key.dtype
    chunks = []
    for start in range(0, kv.num_tokens, chunk_tokens):
        end = min(start + chunk_tokens, kv.num_tokens)
        encodings = {}
        for name, codec in codecs.items():
            segments = []
            for i, layer in enumerate(kv.layers):
                lo = max(start, layer.start)
                for kind, tensor in zip(KINDS, (layer.key, layer.value)):
                    piece = tensor[:, max(0, lo - layer.start) : max(0, end - layer.start)]
                    seg = Segment(layer=i, kind=kind, start=lo, shape=tuple(piece.shape), dtype=dtype)
                    segments.append(codec.encode(piece, seg) if piece.shape[1] else b"")
            encodings[name] = segments
        chunks.append(EncodedChunk(start=start, end=end, encodings=encodings))
        if on_chunk is not None:
            on_chunk(end - start)
    header = {
        "created_by": f"kvc {kvc.__version__}",
        "model": model,
        "dtype": str(dtype).removeprefix("torch."),
        "layout": {
            "layers": [
                {
                    "kv_heads": layer.key.shape[0],
                    "key_dim": layer.key.shape[2],
                    "value_dim": layer.value.shape[2],
                    "start": layer.start,
                }
                for layer in kv.layers
            ]
        },
        "context": {"num_tokens": kv.num_tokens, "token_ids": list(kv.token_ids), **(context or {})},
        "prefill": prefill_info or {},
        "chunk_tokens": chunk_tokens,
        "levels": entries,
    }
    attachments = {"profile": profile.to_bytes()} if embed_profile and profile is not None else None
    return build(header, chunks, attachments)


def encode_tokens(
    lm,
    token_ids: list[int],
    levels: Iterable[str] = (LOSSLESS,),
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    slice_tokens: int = DEFAULT_SLICE_TOKENS,
    profile=None,
    context: dict | None = None,
    embed_profile: bool = False,
    on_progress: Callable[[int], None] | None = None,
) -> bytes:
    """Prefill ``token_ids`` with ``lm`` and return the .kvc bytes holding its cache."""
    kv = prefill(lm, token_ids, slice_tokens, on_progress)
    info = {
        "slice_tokens": slice_tokens,
        "device": lm.device.type,
        "torch": torch.__version__.split("+")[0],
        "transformers": _transformers_version(),
        "machine": platform.machine(),
    }
    return encode_kv(kv, model_identity(lm), levels, chunk_tokens, profile, context, info, embed_profile)


def encode_text(
    lm,
    text: str,
    levels: Iterable[str] = (LOSSLESS,),
    max_tokens: int | None = None,
    source: str | None = None,
    **kwargs,
) -> bytes:
    """Tokenize ``text`` (with the tokenizer's special tokens) and encode it; see encode_tokens."""
    ids = tokenize(lm, text, max_tokens=max_tokens)
    context = {"add_special_tokens": True, **({"source": source} if source else {})}
    return encode_tokens(lm, ids, levels, context=context, **kwargs)


def save(path: str | Path, data: bytes) -> None:
    """Write container bytes to ``path`` atomically."""
    write_atomic(path, data)


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def decode_chunk(
    header: dict, codec, chunk_index: int, enc: dict, payload: bytes, dtype: torch.dtype
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One chunk's checked payload at one level, decoded: per layer (key, value), each
    ``[kv_heads, tokens, dim]`` for the positions the layer keeps in that chunk (FORMAT.md: from
    ``max(chunk start, layer start)`` to the chunk's end; empty where a sliding window starts later)."""
    chunk = header["chunks"][chunk_index]
    layout_layers = header["layout"]["layers"]
    out: list[tuple[torch.Tensor, torch.Tensor]] = []
    pair: list[torch.Tensor] = []
    offset = 0
    for s, length in enumerate(enc["segments"]):
        layer, kind = divmod(s, 2)
        spec = layout_layers[layer]
        lo = max(chunk["start"], spec["start"])
        count = max(0, chunk["end"] - lo)
        shape = (spec["kv_heads"], count, spec["value_dim"] if kind else spec["key_dim"])
        data = payload[offset : offset + length]
        offset += length
        if count == 0:
            if length:
                raise FormatError(f"chunk {chunk_index} stores bytes for a layer with no tokens there")
            pair.append(torch.empty(shape, dtype=dtype))
        else:
            seg = Segment(layer=layer, kind=KINDS[kind], start=lo, shape=shape, dtype=dtype)
            tensor = codec.decode(data, seg)
            if tuple(tensor.shape) != shape or tensor.dtype != dtype:
                raise FormatError(f"chunk {chunk_index} layer {layer} decoded to the wrong shape")
            pair.append(tensor)
        if kind:
            out.append((pair[0], pair[1]))
            pair = []
    return out


class KvcFile:
    """An opened .kvc file. Cheap to open: payloads are read (and checked) only when asked for."""

    def __init__(self, source, profile=None):
        self._container = open_container(source)
        self.header = self._container.header
        self.name = self._container.name
        self._profile_hint = profile
        self._profiles: dict[str, object] = {}

    def __enter__(self) -> KvcFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._container.close()

    @property
    def model(self) -> dict:
        return self.header["model"]

    @property
    def token_ids(self) -> list[int]:
        return self.header["context"]["token_ids"]

    @property
    def num_tokens(self) -> int:
        return self.header["context"]["num_tokens"]

    @property
    def levels(self) -> list[str]:
        return list(self.header["levels"])

    @property
    def dtype(self) -> torch.dtype:
        return _TORCH_DTYPES[self.header["dtype"]]

    @property
    def version(self) -> tuple[int, int]:
        return self._container.version

    def level_bytes(self, level: str, tokens: tuple[int, int] | None = None) -> int:
        """Payload bytes stored for ``level``, or the bytes a reader fetches for tokens ``a:b`` (whole chunks)."""
        a, b = tokens if tokens is not None else (0, self.num_tokens)
        return sum(
            e["length"]
            for c in self.header["chunks"]
            if c["start"] < b and c["end"] > a
            for e in c["encodings"]
            if e["level"] == level
        )

    def fp16_bytes(self) -> int:
        """What the stored KV would take as raw fp16: the yardstick every ratio is quoted against."""
        total = 0
        for spec in self.header["layout"]["layers"]:
            kept = self.num_tokens - spec["start"]
            total += 2 * spec["kv_heads"] * kept * (spec["key_dim"] + spec["value_dim"])
        return total

    def elements(self) -> int:
        return self.fp16_bytes() // 2

    def layer_bytes(self, level: str) -> list[tuple[int, int]]:
        """Bytes per layer at ``level``: (key, value) pairs."""
        layers = len(self.header["layout"]["layers"])
        totals = [[0, 0] for _ in range(layers)]
        for chunk in self.header["chunks"]:
            for enc in chunk["encodings"]:
                if enc["level"] == level:
                    for s, length in enumerate(enc["segments"]):
                        totals[s // 2][s % 2] += length
        return [tuple(t) for t in totals]

    def check_model(self, lm) -> None:
        check_same_model(self.model, model_identity(lm))

    def _codec(self, level: str):
        entry = self.header["levels"][level]
        return build_codec(entry, self._profile_for(entry))

    def _profile_for(self, entry: dict):
        wanted = entry.get("profile")
        if not wanted:
            return None
        if wanted not in self._profiles:
            from kvc.codec.profile import Profile, find_profile_by_sha

            embedded = self._container.attachment("profile")
            candidate = Profile.from_bytes(embedded) if embedded is not None else None
            if candidate is None or candidate.sha256 != wanted:
                hint = self._profile_hint
                candidate = (
                    hint
                    if hint is not None and not isinstance(hint, (str, Path))
                    else find_profile_by_sha(wanted, self.model, str(hint) if hint is not None else None)
                )
            if candidate is None or candidate.sha256 != wanted:
                raise ProfileError(f"this file needs profile {wanted[:16]}…, which was not found: pass --profile")
            self._profiles[wanted] = candidate
        return self._profiles[wanted]

    def read(self, level: str | None = None, tokens: tuple[int, int] | None = None) -> ContextKV:
        """Decoded KV for tokens ``a:b`` (default: all) at ``level`` (default: the first stored level).

        Only the chunks covering ``a:b`` are read; each is checked against its SHA-256 first."""
        level = level or self.levels[0]
        if level not in self.header["levels"]:
            raise InputError(f"{self.name} holds no level {level!r} (it has: {', '.join(self.levels)})")
        a, b = tokens if tokens is not None else (0, self.num_tokens)
        if not 0 <= a < b <= self.num_tokens:
            raise InputError(f"token range {a}:{b} is outside the context's 0:{self.num_tokens}")
        codec = self._codec(level)
        layout_layers = self.header["layout"]["layers"]
        pieces: list[list[list[tuple[int, torch.Tensor]]]] = [[[], []] for _ in layout_layers]
        for index, chunk in enumerate(self.header["chunks"]):
            if chunk["end"] <= a or chunk["start"] >= b:
                continue
            enc, payload = self._container.payload(index, level)
            try:
                decoded = decode_chunk(self.header, codec, index, enc, payload, self.dtype)
            except FormatError as exc:
                raise FormatError(f"{self.name}: {exc}") from exc
            for layer, (spec, pair) in enumerate(zip(layout_layers, decoded)):
                lo = max(chunk["start"], spec["start"])
                for kind, tensor in enumerate(pair):
                    if tensor.shape[1]:
                        pieces[layer][kind].append((lo, tensor))
        layers = []
        for spec, (keys, values) in zip(layout_layers, pieces):
            start = max(a, spec["start"])
            layers.append(
                LayerKV(
                    key=_window(keys, spec, "key_dim", start, b, self.dtype),
                    value=_window(values, spec, "value_dim", start, b, self.dtype),
                    start=start,
                )
            )
        return ContextKV(token_ids=self.token_ids[a:b], layers=layers, first_token=a)

    def to_cache(self, lm, level: str | None = None):
        """A transformers DynamicCache of the whole context, on ``lm``'s device, ready for ``generate``."""
        from kvc.runtime.cache import to_transformers_cache

        self.check_model(lm)
        return to_transformers_cache(self.read(level), lm.model.config, device=lm.device)


def _window(
    parts: list[tuple[int, torch.Tensor]], spec: dict, dim_key: str, start: int, end: int, dtype: torch.dtype
) -> torch.Tensor:
    if not parts or start >= end:
        return torch.empty((spec["kv_heads"], 0, spec[dim_key]), dtype=dtype)
    first = parts[0][0]
    joined = torch.cat([t for _, t in parts], dim=1)
    return joined[:, start - first : end - first].contiguous()


def open(source, profile=None) -> KvcFile:  # noqa: A001 - mirrors the builtin on purpose, as kvc.open
    """Open a .kvc file from a path or bytes."""
    return KvcFile(source, profile)
