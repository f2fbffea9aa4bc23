"""The library surface: encode a context into .kvc bytes, open a .kvc, read KV back.

Data flows one way: text -> token ids -> prefill -> ContextKV -> codec segments -> container
bytes, and back. The CLI is a thin shell over these functions."""

from __future__ import annotations

import io
import platform
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

import kvc
from kvc.codec.base import Segment
from kvc.codec.registry import LOSSLESS, build_codec, level_entry, level_names
from kvc.defaults import DEFAULT_CHUNK_TOKENS, DEFAULT_SLICE_TOKENS
from kvc.errors import FormatError, InputError, LimitError, ProfileError
from kvc.formats.container import PayloadSpool, write_atomic
from kvc.index import KvcIndex
from kvc.runtime.identity import check_same_model, model_identity
from kvc.runtime.kernels import kernel_fingerprint
from kvc.runtime.kv import ContextKV, LayerKV
from kvc.runtime.prefill import check_context, prefill, tokenize

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
    level_entries: dict[str, dict] | None = None,
) -> bytes:
    """Container bytes for an already computed KV cache (encode_kv_to into memory: the same file)."""
    out = io.BytesIO()
    encode_kv_to(out, kv, model, levels, chunk_tokens, profile, context, prefill_info, embed_profile,
                 level_entries=level_entries)
    if on_chunk is not None:
        for start in range(0, kv.num_tokens, chunk_tokens):
            on_chunk(min(chunk_tokens, kv.num_tokens - start))
    return out.getvalue()


def encode_kv_to(
    out,
    kv: ContextKV,
    model: dict,
    levels: Iterable[str] = (LOSSLESS,),
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    profile=None,
    context: dict | None = None,
    prefill_info: dict | None = None,
    embed_profile: bool = False,
    group_layers: int | None = None,
    level_entries: dict[str, dict] | None = None,
) -> dict:
    """Encode like :func:`encode_kv`, streaming: payloads go to a temporary spool file as each group of
    (layer, kind) tensors is coded, then the container is written to ``out`` (a binary file object, or
    a list of file objects that all get the same file). Memory beyond ``kv`` is a few layers'
    encoded bytes, never the whole container. Returns the complete header written.

    ``group_layers`` (layer, kind) tensors are coded per codec call (default: two per pool thread,
    which keeps every thread busy)."""
    spool, header, attachments = encode_kv_spool(kv, model, levels, chunk_tokens, profile, context, prefill_info,
                                                 embed_profile, group_layers, level_entries)  # fmt: skip
    try:
        for target in out if isinstance(out, list) else [out]:
            spool.write_to(target, header, attachments)
        return spool.index(header, attachments)
    finally:
        spool.close()


def encode_kv_spool(
    kv: ContextKV,
    model: dict,
    levels: Iterable[str] = (LOSSLESS,),
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    profile=None,
    context: dict | None = None,
    prefill_info: dict | None = None,
    embed_profile: bool = False,
    group_layers: int | None = None,
    level_entries: dict[str, dict] | None = None,
) -> tuple[PayloadSpool, dict, dict | None]:
    """The encoded payloads of ``kv`` in a :class:`PayloadSpool`, with the header and attachments that
    complete the container (``spool.write_to(f, header, attachments)``; the caller closes the spool).
    ``level_entries`` replaces the header entries of the named levels (a level retuned per file by
    kvc.codec.targeting: its own scale and a ``target`` record)."""
    from kvc.runtime.memory import freed_memory_returned

    # a layer's working tensors, freed, go back to the system (runtime/memory.py)
    with freed_memory_returned():
        return _encode_kv_spool(kv, model, levels, chunk_tokens, profile, context, prefill_info, embed_profile,
                                group_layers, level_entries)  # fmt: skip


def _encode_kv_spool(kv, model, levels, chunk_tokens, profile, context, prefill_info, embed_profile, group_layers,
                     level_entries) -> tuple[PayloadSpool, dict, dict | None]:  # fmt: skip
    from kvc.workers import default_threads

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
    entries = {name: (level_entries or {}).get(name) or level_entry(name, profile) for name in levels}
    dtype = kv.layers[0].key.dtype
    bounds = [(a, min(a + chunk_tokens, kv.num_tokens)) for a in range(0, kv.num_tokens, chunk_tokens)]
    size = group_layers or 2 * default_threads()
    spool = PayloadSpool(bounds, levels, 2 * len(kv.layers))
    try:
        for name, entry in entries.items():
            codec = build_codec(entry, profile)
            if hasattr(codec, "bind_tokens"):  # kvq levels with fine tokens find their positions by token id
                codec.bind_tokens(kv.token_ids)
            # a chained (version-5) level's reconstructions belong to this encode, carried over its batches
            chain = codec.new_chain() if hasattr(codec, "new_chain") else None
            extra = {"chain": chain} if chain is not None else {}
            slots = list(_slot_groups(kv, bounds, dtype))
            for g in range(0, len(slots), size):
                batch = slots[g : g + size]
                work = [(tensor, segs) for _, tensor, segs, _ in batch if segs]
                if hasattr(codec, "encode_many"):
                    results = iter(codec.encode_many(work, **extra))
                else:
                    results = iter([[codec.encode(t[:, a : a + s.shape[1]], s) for s, a in zip(segs, _offsets(segs))]
                                    for t, segs in work])  # fmt: skip
                for slot, _, segs, cs in batch:
                    blobs = dict(zip(cs, next(results))) if segs else {}
                    for c in range(len(bounds)):
                        spool.put(c, name, slot, blobs.get(c, b""))
    except BaseException:
        spool.close()
        raise
    header = _container_header(kv, model, dtype, chunk_tokens, entries, context, prefill_info)
    attachments = {"profile": profile.to_bytes()} if embed_profile and profile is not None else None
    return spool, header, attachments


def _container_header(kv, model, dtype, chunk_tokens, entries, context, prefill_info) -> dict:
    """What encode_kv puts in a header before build() adds the index (kept identical to it)."""
    return {
        "created_by": f"kvc {kvc.__version__}",
        "model": model,
        "dtype": str(dtype).removeprefix("torch."),
        "layout": {
            "layers": [
                {"kv_heads": layer.key.shape[0], "key_dim": layer.key.shape[2], "value_dim": layer.value.shape[2],
                 "start": layer.start}
                for layer in kv.layers
            ]
        },  # fmt: skip
        "context": {"num_tokens": kv.num_tokens, "token_ids": list(kv.token_ids), **(context or {})},
        "prefill": prefill_info or {},
        "chunk_tokens": chunk_tokens,
        "levels": entries,
    }


def _slot_groups(kv: ContextKV, bounds: list[tuple[int, int]], dtype):
    """(slot, tensor, segments, chunk indices) for every (layer, kind), in slot order (2 × layer + kind)."""
    for i, layer in enumerate(kv.layers):
        for kind, tensor in zip((0, 1), (layer.key, layer.value)):
            segs, cs = [], []
            for c, (start, end) in enumerate(bounds):
                lo = max(start, layer.start)
                count = max(0, end - lo)
                if count:
                    segs.append(Segment(layer=i, kind=KINDS[kind], start=lo, shape=(tensor.shape[0], count,
                                        tensor.shape[2]), dtype=dtype))  # fmt: skip
                    cs.append(c)
            first = segs[0].start - layer.start if segs else 0
            yield 2 * i + kind, tensor[:, first : first + sum(s.shape[1] for s in segs)], segs, cs


def _offsets(segs: list[Segment]) -> list[int]:
    out, at = [], 0
    for s in segs:
        out.append(at)
        at += s.shape[1]
    return out


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
    target_kl: float | None = None,
    max_bytes: int | None = None,
    ratio: float | None = None,
) -> bytes:
    """Prefill ``token_ids`` with ``lm`` and return the .kvc bytes holding its cache.

    ``target_kl`` (nats/token), ``max_bytes`` or ``ratio`` (× smaller than fp16) retune the one lossy
    level in ``levels`` for this file: its kvq scale is chosen with the model (kvc.codec.targeting) and
    the header's level entry records the target and what was measured."""
    kv = prefill(lm, check_context(lm, token_ids), slice_tokens, on_progress)
    info = prefill_record(lm, slice_tokens)
    entries = None
    if target_kl is not None or max_bytes is not None or ratio is not None:
        from kvc.codec.targeting import targeted_entries

        entries = targeted_entries(lm, kv, list(levels), chunk_tokens, profile, target_kl=target_kl,
                                   max_bytes=max_bytes, ratio=ratio)
    return encode_kv(kv, model_identity(lm), levels, chunk_tokens, profile, context, info, embed_profile,
                     level_entries=entries)


def prefill_record(lm, slice_tokens: int, batch: int | None = None) -> dict:
    """The header's ``prefill`` field: how the cache was computed, so a deep verify can repeat it.
    ``batch`` is set when the cache came from a padded batch of documents (kvc.batch, lossy levels)."""
    info = {
        "slice_tokens": slice_tokens,
        "dtype": str(lm.dtype).removeprefix("torch."),  # what a deep verify or eval loads the model in
        "device": lm.device.type,
        "torch": torch.__version__.split("+")[0],
        "transformers": _transformers_version(),
        "machine": platform.machine(),
        # which arithmetic the kernels did: a deep verify asks for exact bytes only where it matches
        "kernels": kernel_fingerprint(lm.dtype, lm.device),
    }
    if batch is not None:
        info["batch"] = batch
    return info


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
    header: dict, codec, chunk_index: int, enc: dict, payload: bytes, dtype: torch.dtype, device=None,
    threads: int | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One chunk's checked payload at one level, decoded: per layer (key, value), each
    ``[kv_heads, tokens, dim]`` for the positions the layer keeps in that chunk (FORMAT.md: from
    ``max(chunk start, layer start)`` to the chunk's end; empty where a sliding window starts later).
    Decodes as KvcFile.read does (every segment at once, on ``device`` when the codec can)."""
    chunk = header["chunks"][chunk_index]
    device = torch.device(device) if device is not None else torch.device("cpu")
    target = device if device.type == "cpu" or getattr(codec, "decodes_on_gpu", False) else torch.device("cpu")
    tensors: list[torch.Tensor] = []  # key, value, key, value, ...
    groups = []
    view, offset = memoryview(payload), 0
    for s, length in enumerate(enc["segments"]):
        layer, kind = divmod(s, 2)
        spec = header["layout"]["layers"][layer]
        lo = max(chunk["start"], spec["start"])
        count = max(0, chunk["end"] - lo)
        shape = (spec["kv_heads"], count, spec["value_dim"] if kind else spec["key_dim"])
        data = view[offset : offset + length]
        offset += length
        tensor = torch.empty(shape, dtype=dtype, device=target)
        if count == 0:
            if length:
                raise FormatError(f"chunk {chunk_index} stores bytes for a layer with no tokens there")
        else:
            seg = Segment(layer=layer, kind=KINDS[kind], start=lo, shape=shape, dtype=dtype)
            groups.append(([(data, seg)], tensor))
        tensors.append(tensor)
    _decode_groups(codec, groups, f"chunk {chunk_index}", threads)
    if target != device:
        tensors = [t.to(device) for t in tensors]
    return list(zip(tensors[0::2], tensors[1::2]))


class KvcFile(KvcIndex):
    """An opened .kvc file. Cheap to open: payloads are read (and checked) only when asked for."""

    def __init__(self, source, profile=None, max_decoded_bytes: int | None = None):
        super().__init__(source)
        self._profile_hint = profile
        self._profiles: dict[str, object] = {}
        self.max_decoded_bytes = max_decoded_bytes

    def __enter__(self) -> KvcFile:
        return self

    @property
    def dtype(self) -> torch.dtype:
        return _TORCH_DTYPES[self.header["dtype"]]

    def check_model(self, lm) -> None:
        """Refuse a model other than the file's (ModelMismatchError), then token ids the model's
        tokenizer does not have (FormatError: the header says the fingerprints match, so the ids are forged)."""
        check_same_model(self.model, model_identity(lm))
        check_token_ids(self.token_ids, lm, self.name)

    def _codec(self, level: str):
        entry = self.header["levels"][level]
        return build_codec(entry, self._profile_for(entry))

    def _profile_for(self, entry: dict):
        """The profile a level names by hash: the embedded one if its recorded hash is that one (checked
        against its bytes, and only then parsed), else the one given to open(), else one found by hash.
        Whichever it is must describe this file's layout, since the codec sizes its tables from it."""
        wanted = entry.get("profile")
        if not wanted:
            return None
        if wanted not in self._profiles:
            from kvc.codec.profile import Profile, find_profile_by_sha

            candidate = None
            embedded = self._container.attachment("profile", sha256=wanted)
            if embedded is not None:
                try:
                    candidate = Profile.from_bytes(embedded)
                except ProfileError as exc:
                    raise FormatError(f"{self.name}: the embedded profile is invalid: {exc}") from None
            if candidate is None:
                hint = self._profile_hint
                candidate = (
                    hint
                    if hint is not None and not isinstance(hint, (str, Path))
                    else find_profile_by_sha(wanted, self.model, str(hint) if hint is not None else None)
                )
            if candidate is None or candidate.sha256 != wanted:
                raise ProfileError(f"this file needs profile {wanted[:16]}…, which was not found: pass --profile")
            candidate.check_layout(self.header["layout"]["layers"])
            self._profiles[wanted] = candidate
        return self._profiles[wanted]

    def check_payloads(self, level: str) -> int:
        """Check every payload of ``level`` against every checksum its index entry carries (a read
        checks only the fastest); returns how many payloads. Raises FormatError on a mismatch."""
        chunks = [i for i, c in enumerate(self.header["chunks"]) if any(e["level"] == level for e in c["encodings"])]
        self._container.payloads(chunks, level, thorough=True)
        return len(chunks)

    def read(self, level: str | None = None, tokens: tuple[int, int] | None = None, device=None,
             threads: int | None = None) -> ContextKV:
        """Decoded KV for tokens ``a:b`` (default: all) at ``level`` (default: the first stored level), on
        ``device`` (default: the CPU).

        Only the chunks covering ``a:b`` are read; each is checked against its checksum first. Codecs that
        decode on a GPU (kvq) write straight into tensors on a CUDA ``device``; the others decode on the
        CPU and are copied over. ``threads`` caps the CPU decoder's threads (default: every core this
        process may use). Refused (LimitError) before anything is decoded when it would take more
        memory than ``max_decoded_bytes`` (see _check_decoded_size)."""
        _check_decoded_size(self, level or self.levels[0], tokens)

        level = level or self.levels[0]
        if level not in self.header["levels"]:
            raise InputError(f"{self.name} holds no level {level!r} (it has: {', '.join(self.levels)})")
        a, b = tokens if tokens is not None else (0, self.num_tokens)
        if not 0 <= a < b <= self.num_tokens:
            raise InputError(f"token range {a}:{b} is outside the context's 0:{self.num_tokens}")
        codec = self._codec(level)
        device = torch.device(device) if device is not None else torch.device("cpu")
        target = device if device.type == "cpu" or getattr(codec, "decodes_on_gpu", False) else torch.device("cpu")
        layout_layers = self.header["layout"]["layers"]
        chunks = [i for i, c in enumerate(self.header["chunks"]) if c["start"] < b and c["end"] > a]
        span_lo, span_hi = self.header["chunks"][chunks[0]]["start"], self.header["chunks"][chunks[-1]]["end"]
        # every (layer, kind) decodes into one tensor spanning the chunks read: [H, kept tokens, dim]
        outs, groups = [], []
        for spec in layout_layers:
            lo = max(span_lo, spec["start"])
            kept = max(0, span_hi - lo)
            pair = []
            for kind in (0, 1):
                dim = spec["value_dim"] if kind else spec["key_dim"]
                pair.append(torch.empty((spec["kv_heads"], kept, dim), dtype=self.dtype, device=target))
                groups.append(([], pair[-1]))
            outs.append((lo, pair))
        for index, (enc, payload) in zip(chunks, self._container.payloads(chunks, level, threads)):
            chunk = self.header["chunks"][index]
            view, offset = memoryview(payload), 0
            for s, length in enumerate(enc["segments"]):
                layer, kind = divmod(s, 2)
                spec = layout_layers[layer]
                lo = max(chunk["start"], spec["start"])
                count = max(0, chunk["end"] - lo)
                data = view[offset : offset + length]
                offset += length
                if count == 0:
                    if length:
                        raise FormatError(f"{self.name}: chunk {index} stores bytes for a layer with no tokens there")
                    continue
                shape = (spec["kv_heads"], count, spec["value_dim"] if kind else spec["key_dim"])
                groups[s][0].append((data, Segment(layer=layer, kind=KINDS[kind], start=lo, shape=shape,
                                                   dtype=self.dtype)))
        _decode_groups(codec, [g for g in groups if g[0]], self.name, threads)
        layers = []
        if target != device:
            outs = [(lo, [t.to(device) for t in pair]) for lo, pair in outs]
        for spec, (lo, (key, value)) in zip(layout_layers, outs):
            start = max(a, spec["start"])
            layers.append(LayerKV(key=_window(key, lo, start, b), value=_window(value, lo, start, b), start=start))
        return ContextKV(token_ids=self.token_ids[a:b], layers=layers, first_token=a)

    def to_cache(self, lm, level: str | None = None):
        """A transformers DynamicCache of the whole context, on ``lm``'s device, ready for ``generate``."""
        from kvc.runtime.cache import to_transformers_cache

        self.check_model(lm)
        return to_transformers_cache(self.read(level, device=lm.device), lm.model.config, device=lm.device)


def _decode_groups(codec, groups: list, name: str, threads: int | None = None) -> None:
    """Decode each (layer, kind)'s segments into its output tensor: in one parallel call when the codec
    can (kvq), else segment by segment."""
    if hasattr(codec, "decode_many"):
        codec.decode_many(groups, threads=threads)
        return
    for parts, out in groups:
        at = 0
        for data, seg in parts:
            tensor = codec.decode(bytes(data), seg)
            if tuple(tensor.shape) != seg.shape or tensor.dtype != seg.dtype:
                raise FormatError(f"{name}: layer {seg.layer} {seg.kind} decoded to the wrong shape")
            out[:, at : at + seg.shape[1]] = tensor
            at += seg.shape[1]


def _window(t: torch.Tensor, lo: int, start: int, end: int) -> torch.Tensor:
    """Tokens ``start..end`` of a tensor holding tokens from ``lo``; whole tensors are returned as they are."""
    if start >= end:
        return t[:, :0]
    if start == lo and end - lo == t.shape[1]:
        return t
    return t[:, start - lo : end - lo].contiguous()


DEFAULT_DECODE_FLOOR = 512 << 20
DEFAULT_DECODE_FACTOR = 1024
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_byte_size(text: str, what: str = "KVC_MAX_DECODED_BYTES") -> int:
    """``"1073741824"``, ``"512M"``, ``"4GiB"``, ``"2G"`` → bytes (binary units)."""
    import re

    m = re.fullmatch(r"\s*(\d{1,15})\s*([KMGT]?)(?:i?B)?\s*", text, flags=re.IGNORECASE)
    if m is None:
        raise InputError(f"{what} must be a byte count such as 4294967296, 512M or 4GiB, got {text!r}")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def decode_limit(max_decoded_bytes: int | None, stored_bytes: int) -> tuple[int, str]:
    """The memory a read may take and where that limit comes from: the ``max_decoded_bytes`` argument,
    else ``$KVC_MAX_DECODED_BYTES``, else 512 MiB + 1024 × the payload bytes the read fetches (no
    genuine kvc level comes near 1024×: lossless stores ~1/2 to 1/1 of the output, `tiny` ~1/50)."""
    import os

    if max_decoded_bytes is not None:
        if not isinstance(max_decoded_bytes, int) or max_decoded_bytes < 0:
            raise InputError("max_decoded_bytes must be a non-negative number of bytes")
        return max_decoded_bytes, "max_decoded_bytes"
    env = os.environ.get("KVC_MAX_DECODED_BYTES")
    if env:
        return parse_byte_size(env), "KVC_MAX_DECODED_BYTES"
    return DEFAULT_DECODE_FLOOR + DEFAULT_DECODE_FACTOR * stored_bytes, "the default limit (set KVC_MAX_DECODED_BYTES)"


def _codec_table_bytes(codec, layers: list[int]) -> int:
    """Memory a codec's decoder builds from its parameters and profile rather than from the payload."""
    own = getattr(codec, "table_bytes", None)
    if own is not None:
        return int(own(layers))
    profile, scale = getattr(codec, "profile", None), getattr(codec, "scale", None)
    if getattr(codec, "codec_id", None) == "kvq" and profile is not None and scale is not None:
        return profile.coding_table_bytes(scale, layers)  # kvq version 1's per-channel tables
    return 0


def _check_decoded_size(f: KvcFile, level: str, tokens: tuple[int, int] | None) -> None:
    """Before a read decodes anything: every segment it will decode must be long enough for its shape
    at the codec's best possible rate (``codec.min_segment_bytes``, else 1 byte), and the memory it
    will take (the decoded chunks plus the codec's tables) must be within ``decode_limit``. Leaves
    unknown levels and bad ranges to read()'s own messages."""
    header = f.header
    if level not in header["levels"]:
        return
    a, b = tokens if tokens is not None else (0, f.num_tokens)
    if not (isinstance(a, int) and isinstance(b, int) and 0 <= a < b <= f.num_tokens):
        return
    codec = f._codec(level)
    min_bytes = getattr(codec, "min_segment_bytes", None)
    itemsize = f.dtype.itemsize
    specs = header["layout"]["layers"]
    decoded = stored = 0
    touched: set[int] = set()
    for index, chunk in enumerate(header["chunks"]):
        if chunk["end"] <= a or chunk["start"] >= b:
            continue
        enc = next((e for e in chunk["encodings"] if e["level"] == level), None)
        if enc is None:
            continue  # read() names the missing encoding
        stored += enc["length"]
        for s, length in enumerate(enc["segments"]):
            layer, kind = divmod(s, 2)
            spec = specs[layer]
            lo = max(chunk["start"], spec["start"])
            count = max(0, chunk["end"] - lo)
            if count == 0:
                continue
            shape = (spec["kv_heads"], count, spec["value_dim"] if kind else spec["key_dim"])
            decoded += shape[0] * shape[1] * shape[2] * itemsize
            touched.add(layer)
            need = (
                min_bytes(Segment(layer=layer, kind=KINDS[kind], start=lo, shape=shape, dtype=f.dtype))
                if (min_bytes is not None)
                else 1
            )
            if length < need:
                raise FormatError(
                    f"{f.name}: chunk {index} layer {layer} {KINDS[kind]}: {length} bytes cannot encode a "
                    f"{list(shape)} tensor at level {level!r} (at least {need} needed)"
                )
    total = decoded + _codec_table_bytes(codec, sorted(touched))
    limit, source = decode_limit(f.max_decoded_bytes, stored)
    if total > limit:
        raise LimitError(
            f"{f.name}: reading level {level!r} tokens {a}:{b} would take {total:,} bytes of memory "
            f"(from {stored:,} stored), over {limit:,} allowed by {source}"
        )


def check_token_ids(token_ids: list[int], lm, name: str = "the file") -> None:
    """Every id must index the model's tokenizer and embedding (FormatError otherwise)."""
    vocab = len(lm.tokenizer)
    embeddings = lm.model.get_input_embeddings() if hasattr(lm.model, "get_input_embeddings") else None
    rows = getattr(embeddings, "num_embeddings", None)
    limit = min(vocab, rows) if rows else vocab
    bad = next((i for i, t in enumerate(token_ids) if not 0 <= t < limit), None)
    if bad is not None:
        raise FormatError(f"{name}: token {bad} has id {token_ids[bad]}, outside the model's vocabulary of {limit} ids")




def open(source, profile=None, max_decoded_bytes: int | None = None) -> KvcFile:  # noqa: A001 - as kvc.open
    """Open a .kvc file from a path or bytes. ``max_decoded_bytes`` caps the memory any one read may
    take (default: ``$KVC_MAX_DECODED_BYTES``, else 512 MiB + 1024 × the bytes the read fetches)."""
    return KvcFile(source, profile, max_decoded_bytes)
