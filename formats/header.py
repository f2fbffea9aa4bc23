"""Validation of a parsed .kvc header: every field a reader relies on, checked before it is used.

A header that passes describes a file whose chunks tile the context without gaps, whose
payloads lie inside the data section and whose segment lengths add up, so later reads can
trust offsets and shapes without re-checking them."""

from __future__ import annotations

import re

from kvc.errors import FormatError
from kvc.formats import layout

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_DTYPES = ("float32", "float16", "bfloat16", "float64")


def _need(condition: bool, message: str) -> None:
    if not condition:
        raise FormatError(f"invalid header: {message}")


def _int(value, low: int, high: int, what: str) -> int:
    _need(
        isinstance(value, int) and not isinstance(value, bool) and low <= value <= high,
        f"{what} must be an integer in [{low}, {high}], got {value!r}",
    )
    return value


def validate(header: dict, data_bytes: int) -> None:
    _need(isinstance(header, dict), "not a JSON object")
    for key, kind in (("model", dict), ("layout", dict), ("context", dict), ("levels", dict), ("chunks", list)):
        _need(isinstance(header.get(key), kind), f"missing or mistyped field {key!r}")
    _need(header.get("dtype") in _DTYPES, f"unsupported dtype {header.get('dtype')!r}")
    _int(header.get("data_length"), data_bytes, data_bytes, "data_length (the bytes after the header)")

    context = header["context"]
    tokens = context.get("token_ids")
    _need(isinstance(tokens, list), "context.token_ids must be a list")
    num_tokens = _int(context.get("num_tokens"), 1, layout.MAX_TOKENS, "context.num_tokens")
    _need(len(tokens) == num_tokens, "context.token_ids does not hold num_tokens ids")
    _need(
        all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 1 << 31 for t in tokens),
        "context.token_ids must be non-negative 31-bit integers",
    )

    layers = header["layout"].get("layers")
    _need(isinstance(layers, list) and 1 <= len(layers) <= layout.MAX_LAYERS, "layout.layers must list 1..1024 layers")
    for i, layer in enumerate(layers):
        _need(isinstance(layer, dict), f"layout.layers[{i}] must be an object")
        _int(layer.get("kv_heads"), 1, layout.MAX_HEADS, f"layers[{i}].kv_heads")
        _int(layer.get("key_dim"), 1, layout.MAX_HEAD_DIM, f"layers[{i}].key_dim")
        _int(layer.get("value_dim"), 1, layout.MAX_HEAD_DIM, f"layers[{i}].value_dim")
        _int(layer.get("start"), 0, num_tokens, f"layers[{i}].start")

    for name, entry in header["levels"].items():
        _need(isinstance(entry, dict) and isinstance(entry.get("codec"), str), f"level {name!r} names no codec")
        _need(
            entry.get("profile") is None or (isinstance(entry["profile"], str) and _SHA256.match(entry["profile"])),
            f"level {name!r} has a malformed profile hash",
        )

    chunk_tokens = _int(header.get("chunk_tokens"), 1, layout.MAX_CHUNK_TOKENS, "chunk_tokens")
    position = 0
    _need(len(header["chunks"]) >= 1, "no chunks")
    for c, chunk in enumerate(header["chunks"]):
        _need(isinstance(chunk, dict), f"chunks[{c}] must be an object")
        start = _int(chunk.get("start"), position, position, f"chunks[{c}].start (chunks must tile the context)")
        end = _int(chunk.get("end"), start + 1, min(start + chunk_tokens, num_tokens), f"chunks[{c}].end")
        position = end
        encodings = chunk.get("encodings")
        _need(isinstance(encodings, list) and encodings, f"chunks[{c}] has no encodings")
        seen = set()
        for e, enc in enumerate(encodings):
            where = f"chunks[{c}].encodings[{e}]"
            _need(isinstance(enc, dict) and enc.get("level") in header["levels"], f"{where} names an unknown level")
            _need(enc["level"] not in seen, f"{where} repeats level {enc['level']!r}")
            seen.add(enc["level"])
            offset = _int(enc.get("offset"), 0, data_bytes, f"{where}.offset")
            length = _int(enc.get("length"), 0, data_bytes - offset, f"{where}.length (past the end of the file)")
            _need(isinstance(enc.get("sha256"), str) and _SHA256.match(enc["sha256"]), f"{where}.sha256 malformed")
            segments = enc.get("segments")
            _need(
                isinstance(segments, list) and len(segments) == 2 * len(layers), f"{where}.segments needs 2 per layer"
            )
            for s in segments:
                _int(s, 0, length, f"{where}.segments entry")
            _need(sum(segments) == length, f"{where}.segments do not add up to its length")
    _need(position == num_tokens, "chunks do not cover the whole context")

    for a, att in enumerate(header.get("attachments", [])):
        _need(isinstance(att, dict) and isinstance(att.get("name"), str), f"attachments[{a}] malformed")
        offset = _int(att.get("offset"), 0, data_bytes, f"attachments[{a}].offset")
        _int(att.get("length"), 0, data_bytes - offset, f"attachments[{a}].length")
        _need(isinstance(att.get("sha256"), str) and _SHA256.match(att["sha256"]), f"attachments[{a}].sha256 malformed")
