"""What `kvc inspect` shows, as plain data: model, context, levels, sizes, per-layer bytes."""

from __future__ import annotations


def describe(f, with_chunks: bool = False) -> dict:
    header = f.header
    fp16 = f.fp16_bytes()
    elements = f.elements()
    levels = []
    for name, entry in header["levels"].items():
        stored = f.level_bytes(name)
        levels.append(
            {
                "name": name,
                "codec": entry["codec"],
                "profile": entry.get("profile"),
                "bytes": stored,
                "ratio_vs_fp16": round(fp16 / stored, 3) if stored else None,
                "bits_per_element": round(8 * stored / elements, 4) if elements else None,
                "layer_bytes": [{"layer": i, "key": k, "value": v} for i, (k, v) in enumerate(f.layer_bytes(name))],
            }
        )
    layers = header["layout"]["layers"]
    out = {
        "file": f.name,
        "format_version": "{}.{}".format(*f.version),
        "created_by": header.get("created_by"),
        "model": {
            k: header["model"].get(k)
            for k in (
                "name",
                "source",
                "architecture",
                "model_type",
                "dtype",
                "position_encoding",
                "keys_post_rotary",
                "config_sha256",
                "weights_sha256",
                "tokenizer_sha256",
            )
        },
        "tokens": f.num_tokens,
        "source": header["context"].get("source"),
        "layers": len(layers),
        "kv_heads": sorted({spec["kv_heads"] for spec in layers}),
        "head_dim": sorted({spec["key_dim"] for spec in layers}),
        "sliding_layers": [i for i, spec in enumerate(layers) if spec["start"] > 0],
        "dtype": header["dtype"],
        "chunk_tokens": header["chunk_tokens"],
        "chunks": len(header["chunks"]),
        "fp16_bytes": fp16,
        "levels": levels,
        "prefill": header.get("prefill", {}),
    }
    if with_chunks:
        out["chunk_index"] = [
            {"start": c["start"], "end": c["end"], "encodings": {e["level"]: e["length"] for e in c["encodings"]}}
            for c in header["chunks"]
        ]
    return out
