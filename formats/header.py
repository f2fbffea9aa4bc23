"""Strict JSON and validation of a parsed .kvc header: every field a reader relies on, typed and
ranged before it is used.

A header that passes describes a file whose chunks tile the context without gaps, whose payloads
lie inside the data section, whose segment lengths add up and whose every number is bounded
(docs/FORMAT.md, "Bounds a reader enforces"), so later reads can trust offsets and shapes without
re-checking them. The file is assumed hostile: its author may have recomputed every checksum.

``parse_json`` is shared with the profile reader: no NaN/Infinity, no non-finite floats, integers
within int64, no duplicate keys, nesting at most ``MAX_JSON_DEPTH``, no lone surrogates or control
characters in strings. Whatever passes can be printed, dumped back to JSON and converted with
``float()``/``int()`` without an exception that is not kvc's own."""

from __future__ import annotations

import json
import re

from kvc.errors import FormatError
from kvc.formats import layout

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_XXH3_128 = re.compile(r"^[0-9a-f]{32}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")  # level names and codec ids
_DTYPES = ("float32", "float16", "bfloat16", "float64")
# Codecs whose decoders work in float32 and cannot produce float64 output (docs/FORMAT.md).
_CODEC_DTYPES = {"kvq": ("float32", "float16", "bfloat16")}

MAX_JSON_DEPTH = 32
_INT64 = 1 << 63
# Escapes that can put a control character or a lone surrogate into a parsed string; when the raw
# text holds none of them (every header kvc writes), the per-string check is skipped.
_RISKY_ESCAPE = re.compile(rb"\\[bfnrt]|\\u00[01][0-9a-fA-F]|\\u007[fF]|\\u[dD][89a-fA-F]")
_BAD_CHARS = re.compile("[\x00-\x1f\x7f\ud800-\udfff]")
# An integer outside int64 needs 19 digits or more; without such a run the parser needs no hook. A
# JSON number starts after one of `[,:` or whitespace (or its `-`), never after a letter, digit, dot
# or quote, so runs inside hex digests and fractions are not counted (a false hit only costs speed).
_LONG_DIGITS = re.compile(rb'(?<![0-9A-Za-z."])[0-9]{19}')
_SCALARS = {int, float, bool, str, type(None)}
_MODEL_STRINGS = ("name", "source", "architecture", "model_type", "dtype", "position_encoding", "rope_type")
_MODEL_HASHES = ("config_sha256", "weights_sha256", "tokenizer_sha256")


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"number {text[:32]} is out of range")
    return value


def _int64(text: str) -> int:
    if len(text) > 20:
        raise ValueError(f"integer {text[:24]}… is out of range")
    value = int(text)
    if not -_INT64 <= value < _INT64:
        raise ValueError(f"integer {text} is out of range")
    return value


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate key {key!r}")
            seen.add(key)
    return out


def parse_json(raw: bytes, what: str, error: type[Exception] = FormatError):
    """``raw`` (UTF-8 JSON) parsed strictly, or ``error(f"{what} ...")``; see the module docstring."""
    try:
        value = json.loads(
            raw.decode("utf-8"),
            parse_constant=_refuse_constant,
            parse_float=_finite_float,
            parse_int=_int64 if _LONG_DIGITS.search(raw) else None,
            object_pairs_hook=_unique_keys,
        )
    except RecursionError:
        raise error(f"{what} is nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise error(f"{what} is not valid JSON ({_one_line(str(exc))})") from None
    _check_tree(value, what, error, check_strings=_RISKY_ESCAPE.search(raw) is not None)
    return value


def _one_line(text: str, limit: int = 160) -> str:
    text = _BAD_CHARS.sub("?", text)
    return text if len(text) <= limit else text[:limit] + "…"


def _check_tree(value, what: str, error: type[Exception], check_strings: bool) -> None:
    """Nesting depth (iteratively, so no recursion on hostile input) and, when the raw text had risky
    escapes, strings free of control characters and lone surrogates."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise error(f"{what} is nested more than {MAX_JSON_DEPTH} levels deep")
        if type(node) is dict:
            items = node.items()
            if check_strings:
                for key in node:
                    if _BAD_CHARS.search(key):
                        raise error(f"{what} holds a string with a control character or a lone surrogate")
            children = (v for _, v in items)
        elif type(node) is list:
            kinds = set(map(type, node))  # one pass in C: most lists (token ids) hold only numbers
            if kinds <= _SCALARS and not (check_strings and str in kinds):
                continue
            children = node
        else:
            if check_strings and type(node) is str and _BAD_CHARS.search(node):
                raise error(f"{what} holds a string with a control character or a lone surrogate")
            continue
        for child in children:
            kind = type(child)
            if kind is dict or kind is list or (check_strings and kind is str):
                stack.append((child, depth + 1))


def _need(condition: bool, message: str) -> None:
    if not condition:
        raise FormatError(f"invalid header: {message}")


def _is_int(value) -> bool:
    return type(value) is int


def _int(value, low: int, high: int, what: str) -> int:
    _need(
        _is_int(value) and low <= value <= high,
        f"{what} must be an integer in [{low}, {high}], got {_one_line(repr(value), 40)}",
    )
    return value


def _optional(mapping: dict, key: str, kinds: tuple[type, ...], what: str, nullable: bool = False) -> None:
    """A field that may be absent; when present it has one of ``kinds`` (or is null, if ``nullable``)."""
    if key in mapping and not (nullable and mapping[key] is None):
        _need(type(mapping[key]) in kinds, f"{what}.{key} has the wrong type")


def _sha(value, what: str) -> None:
    _need(type(value) is str and _SHA256.match(value) is not None, f"{what} must be 64 lowercase hex digits")


_TARGET_KINDS = ("kl", "bytes", "ratio")


def _number(value, low: float, high: float) -> bool:
    return type(value) in (int, float) and low <= value <= high


def _target(target, name: str) -> None:
    """A level's optional ``target`` (format 1.2: what the level was tuned for in this file, informative)."""
    where = f"level {name!r} target"
    _need(type(target) is dict, f"{where} must be an object")
    _need(target.get("kind") in _TARGET_KINDS, f"{where}.kind must be one of {', '.join(_TARGET_KINDS)}")
    _need(_number(target.get("value"), 0, 1e18) and target["value"] > 0, f"{where}.value must be a positive number")
    for key, high in (("estimate", 1e6), ("aim", 1e6)):
        if target.get(key) is not None:
            _need(_number(target[key], 0, high), f"{where}.{key} must be a non-negative number")
    for key in ("tail_tokens", "tries", "bytes"):
        if target.get(key) is not None:
            _int(target[key], 0, _INT64 - 1, f"{where}.{key}")


def validate(header: dict, data_bytes: int) -> None:
    """Raise FormatError unless ``header`` satisfies every rule of docs/FORMAT.md for a data section of
    ``data_bytes`` bytes."""
    _need(type(header) is dict, "not a JSON object")
    for key, kind in (("model", dict), ("layout", dict), ("context", dict), ("levels", dict), ("chunks", list)):
        _need(type(header.get(key)) is kind, f"missing or mistyped field {key!r}")
    dtype = header.get("dtype")
    _need(type(dtype) is str and dtype in _DTYPES, f"unsupported dtype {_one_line(repr(dtype), 40)}")
    _int(header.get("data_length"), data_bytes, data_bytes, "data_length (the bytes after the header)")
    _optional(header, "created_by", (str,), "header")
    _need(type(header.get("prefill", {})) is dict, "prefill must be an object")

    model = header["model"]
    for key in _MODEL_STRINGS:
        _optional(model, key, (str,), "model", nullable=True)
    for key in _MODEL_HASHES:
        if model.get(key) is not None:
            _sha(model[key], f"model.{key}")
    _optional(model, "keys_post_rotary", (bool,), "model", nullable=True)
    _optional(model, "rope_theta", (int, float), "model", nullable=True)

    prefill = header.get("prefill", {})
    if "slice_tokens" in prefill:  # verify --deep repeats the prefill with it
        _int(prefill["slice_tokens"], 1, layout.MAX_TOKENS, "prefill.slice_tokens")
    for key in ("dtype", "device", "torch", "transformers", "machine", "kernels"):
        _optional(prefill, key, (str,), "prefill")

    context = header["context"]
    num_tokens = _int(context.get("num_tokens"), 1, layout.MAX_TOKENS, "context.num_tokens")
    tokens = context.get("token_ids")
    _need(type(tokens) is list, "context.token_ids must be a list")
    _need(len(tokens) == num_tokens, "context.token_ids does not hold num_tokens ids")
    _need(
        all(type(t) is int and 0 <= t < layout.MAX_TOKEN_ID for t in tokens),
        "context.token_ids must be non-negative 31-bit integers",
    )
    _optional(context, "add_special_tokens", (bool,), "context")
    _optional(context, "source", (str,), "context")

    layers = header["layout"].get("layers")
    _need(type(layers) is list and 1 <= len(layers) <= layout.MAX_LAYERS, "layout.layers must list 1..1024 layers")
    for i, layer in enumerate(layers):
        _need(type(layer) is dict, f"layout.layers[{i}] must be an object")
        _int(layer.get("kv_heads"), 1, layout.MAX_HEADS, f"layers[{i}].kv_heads")
        _int(layer.get("key_dim"), 1, layout.MAX_HEAD_DIM, f"layers[{i}].key_dim")
        _int(layer.get("value_dim"), 1, layout.MAX_HEAD_DIM, f"layers[{i}].value_dim")
        # Every layer keeps at least its last token (transformers' sliding windows keep window - 1 >= 1).
        _int(layer.get("start"), 0, num_tokens - 1, f"layers[{i}].start")

    levels = header["levels"]
    _need(1 <= len(levels) <= layout.MAX_LEVELS, f"levels must name 1..{layout.MAX_LEVELS} levels")
    for name, entry in levels.items():
        _need(_NAME.match(name) is not None, f"level name {_one_line(repr(name), 40)} is not a plain identifier")
        _need(type(entry) is dict, f"level {name!r} must be an object")
        codec = entry.get("codec")
        _need(type(codec) is str and _NAME.match(codec) is not None, f"level {name!r} names no valid codec id")
        _need(type(entry.get("params", {})) is dict, f"level {name!r}: params must be an object")
        if entry.get("profile") is not None:
            _sha(entry["profile"], f"level {name!r} profile")
        _need(dtype in _CODEC_DTYPES.get(codec, _DTYPES), f"level {name!r}: codec {codec!r} cannot decode {dtype}")
        if "target" in entry:
            _target(entry["target"], name)

    chunk_tokens = _int(header.get("chunk_tokens"), 1, layout.MAX_CHUNK_TOKENS, "chunk_tokens")
    starts = [layer["start"] for layer in layers]
    stored = dict.fromkeys(levels, 0)
    position = 0
    _need(len(header["chunks"]) >= 1, "no chunks")
    for c, chunk in enumerate(header["chunks"]):
        _need(type(chunk) is dict, f"chunks[{c}] must be an object")
        start = _int(chunk.get("start"), position, position, f"chunks[{c}].start (chunks must tile the context)")
        _need(start < num_tokens, f"chunks[{c}] starts past the end of the context")
        end = _int(chunk.get("end"), start + 1, min(start + chunk_tokens, num_tokens), f"chunks[{c}].end")
        position = end
        # Tokens each layer keeps in this chunk: its segments decode to [heads, count, dim].
        counts = [max(0, end - max(start, s)) for s in starts]
        encodings = chunk.get("encodings")
        _need(type(encodings) is list and 1 <= len(encodings) <= len(levels), f"chunks[{c}] has no valid encodings")
        seen = set()
        for e, enc in enumerate(encodings):
            where = f"chunks[{c}].encodings[{e}]"
            _need(type(enc) is dict, f"{where} must be an object")
            level = enc.get("level")
            _need(type(level) is str and level in levels, f"{where} names an unknown level")
            _need(level not in seen, f"{where} repeats level {level!r}")
            seen.add(level)
            offset = _int(enc.get("offset"), 0, data_bytes, f"{where}.offset")
            length = _int(enc.get("length"), 0, data_bytes - offset, f"{where}.length (past the end of the file)")
            _sha(enc.get("sha256"), f"{where}.sha256")
            if "xxh3_128" in enc:  # format 1.3 (kvc.formats.digests)
                _need(type(enc["xxh3_128"]) is str and _XXH3_128.match(enc["xxh3_128"]) is not None,
                      f"{where}.xxh3_128 must be 32 lowercase hex digits")
            segments = enc.get("segments")
            _need(type(segments) is list and len(segments) == 2 * len(layers), f"{where}.segments needs 2 per layer")
            total = 0
            for s, size in enumerate(segments):
                _int(size, 0, length, f"{where}.segments[{s}]")
                if counts[s // 2]:
                    _need(size > 0, f"{where}.segments[{s}] is empty but its layer keeps tokens there")
                else:
                    _need(size == 0, f"{where}.segments[{s}] stores bytes for a layer with no tokens there")
                total += size
            _need(total == length, f"{where}.segments do not add up to its length")
            stored[level] += length
    _need(position == num_tokens, "chunks do not cover the whole context")
    for name, nbytes in stored.items():
        _need(nbytes > 0, f"level {name!r} stores no data in any chunk")

    attachments = header.get("attachments", [])
    _need(type(attachments) is list and len(attachments) <= layout.MAX_ATTACHMENTS, "attachments must be a list")
    names = set()
    for a, att in enumerate(attachments):
        _need(type(att) is dict and type(att.get("name")) is str, f"attachments[{a}] malformed")
        _need(_NAME.match(att["name"]) is not None, f"attachments[{a}].name is not a plain identifier")
        _need(att["name"] not in names, f"attachments[{a}] repeats the name {att['name']!r}")
        names.add(att["name"])
        offset = _int(att.get("offset"), 0, data_bytes, f"attachments[{a}].offset")
        _int(att.get("length"), 0, data_bytes - offset, f"attachments[{a}].length")
        _sha(att.get("sha256"), f"attachments[{a}].sha256")
