"""What binds a .kvc file to the model that made it.

Two models whose configs, weights or tokenizers differ produce different caches for the same text,
so a file records fingerprints of all three and a reader refuses a model that differs in any."""

from __future__ import annotations

import hashlib
import json

import torch

from kvc.errors import ModelMismatchError

# Config keys that say where or how a model was loaded, not what it computes.
_VOLATILE_CONFIG_KEYS = {
    "_name_or_path",
    "name_or_path",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "_attn_implementation",
    "_attn_implementation_autoset",
    "_commit_hash",
    "use_cache",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "architectures",
}


def config_fingerprint(config) -> str:
    data = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over every parameter's name, dtype, shape and bytes (~0.3 s for 135M parameters)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


_WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def _folder_key(folder, dtype: str) -> str | None:
    """A key that changes whenever a weight file in ``folder`` (or the load dtype) does: names, sizes
    and modification times, the way make decides what is stale. None if there is nothing to key."""
    from pathlib import Path

    files = sorted(p for p in Path(folder).iterdir() if p.is_file() and p.name.endswith((*_WEIGHT_FILES, ".json")))
    stats = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files if not p.name.startswith("kvc-")]
    if not any(name.endswith(_WEIGHT_FILES) for name, _, _ in stats):
        return None
    return hashlib.sha256(json.dumps([dtype, stats]).encode()).hexdigest()


def _fingerprint_file(folder):
    """Where a folder's weights fingerprint is kept: beside a converted model (kvc's own cache folder),
    else under the kvc cache (a user's model folder is never written to)."""
    from pathlib import Path

    from kvc.runtime.loading import cache_dir

    folder = Path(folder).resolve()
    root = cache_dir().resolve()
    if root in folder.parents:
        return folder / "kvc-weights-sha256.json"
    return root / "fingerprints" / (hashlib.sha256(str(folder).encode()).hexdigest()[:24] + ".json")


def cached_weights_fingerprint(model: torch.nn.Module, folder) -> str:
    """weights_fingerprint(model), remembered on disk for the folder it was loaded from, keyed by the
    weight files' names, sizes and mtimes and the load dtype: a batch worker or a new `kvc` process
    skips the ~0.7 s hash. Falls back to hashing when the folder is unknown or the cache unwritable."""
    import os
    import tempfile

    if folder is None:
        return weights_fingerprint(model)
    try:
        key = _folder_key(folder, str(next(model.parameters()).dtype))
    except (OSError, StopIteration):
        key = None
    if key is None:
        return weights_fingerprint(model)
    store = _fingerprint_file(folder)
    try:
        known = json.loads(store.read_text())
        if known.get("key") == key and isinstance(known.get("weights_sha256"), str):
            return known["weights_sha256"]
    except (OSError, ValueError, AttributeError):
        pass
    digest = weights_fingerprint(model)
    try:
        store.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".fp-", dir=store.parent)
        with os.fdopen(fd, "w") as f:
            json.dump({"key": key, "weights_sha256": digest}, f)
        os.replace(tmp, store)
    except OSError:
        pass  # a read-only cache only costs the hash next time
    return digest


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        text = backend.to_str()
    else:  # slow tokenizers: the vocabulary and special tokens decide the ids
        text = json.dumps([sorted(tokenizer.get_vocab().items()), tokenizer.all_special_tokens])
    return hashlib.sha256(text.encode()).hexdigest()


def _rope_dict(value) -> dict:
    """A rope settings object (dict, or a config-like object) as a plain dict."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return dict(value)
    to_dict = getattr(value, "to_dict", None)
    return dict(to_dict()) if callable(to_dict) else {}


def rope_layers(config) -> list[dict] | None:
    """Each decoder layer's rotary settings ``{"rope_type", "rope_theta", ...}`` as the config states
    them, wherever it states them: a text sub-config, ``rope_parameters`` (transformers 5), possibly one
    entry per layer type (``{"sliding_attention": {...}, "full_attention": {...}}`` with
    ``layer_types``), or the older ``rope_scaling`` plus a top-level ``rope_theta``. None when the
    config names no rotary base at all."""
    text = config.get_text_config(decoder=True)
    layers = int(getattr(text, "num_hidden_layers", 0) or 0)
    layer_types = list(getattr(text, "layer_types", None) or [])
    params = _rope_dict(getattr(text, "rope_parameters", None))
    scaling = _rope_dict(getattr(text, "rope_scaling", None))
    top_theta = getattr(text, "rope_theta", None)

    def settings(entry: dict) -> dict:
        entry = dict(entry)
        if "type" in entry and "rope_type" not in entry:  # transformers 4's older spelling
            entry["rope_type"] = entry.pop("type")
        entry.setdefault("rope_type", "default")
        if entry.get("rope_theta") is None:
            entry["rope_theta"] = top_theta
        return entry

    if params and layer_types and all(isinstance(params.get(t), dict) for t in set(layer_types)):
        per_type = {t: settings(params[t]) for t in set(layer_types)}
        out = [per_type[t] for t in layer_types]
    else:
        base = params if params and not any(isinstance(v, dict) for v in params.values()) else scaling
        out = [settings(base)] * max(layers, 1)
    if all(e.get("rope_theta") is None for e in out):
        return None
    return out


def rope_info(config) -> dict:
    """Whether cached keys carry rotary position embedding, and its base, as far as the config says.
    ``rope_theta``/``rope_type`` are the model's when every layer shares them; when layers differ
    (e.g. Gemma 3: one base for sliding-window layers, another for global ones) ``rope_type`` is
    ``"per-layer"``, ``rope_theta`` is null and ``rope_layer_types`` holds each layer type's settings."""
    text = config.get_text_config(decoder=True)
    layers = rope_layers(config)
    if layers is None:
        if getattr(text, "model_type", "") in ("gpt2", "opt", "bloom"):
            return {"position_encoding": "learned" if text.model_type != "bloom" else "alibi",
                    "keys_post_rotary": False}
        return {"position_encoding": "rotary", "keys_post_rotary": True, "rope_theta": None, "rope_type": "default"}
    info = {"position_encoding": "rotary", "keys_post_rotary": True}
    distinct = {json.dumps(e, sort_keys=True, default=str) for e in layers}
    if len(distinct) == 1:
        info["rope_theta"] = layers[0]["rope_theta"]
        info["rope_type"] = layers[0]["rope_type"]
    else:
        info["rope_theta"] = None
        info["rope_type"] = "per-layer"
        types = list(getattr(text, "layer_types", None) or [])
        info["rope_layer_types"] = {t: {"rope_type": e["rope_type"], "rope_theta": e["rope_theta"]}
                                    for t, e in zip(types, layers)}
    return info


def model_identity(lm) -> dict:
    config = lm.model.config
    cached = getattr(lm, "_identity", None)
    if cached is not None:
        return cached
    identity = {
        "name": lm.name,
        "source": lm.source,
        "architecture": (config.architectures or [type(lm.model).__name__])[0],
        "model_type": config.model_type,
        "config_sha256": config_fingerprint(config),
        "weights_sha256": cached_weights_fingerprint(lm.model, getattr(lm, "folder", None)),
        "tokenizer_sha256": tokenizer_fingerprint(lm.tokenizer),
        "dtype": str(lm.dtype).removeprefix("torch."),
        **rope_info(config),
    }
    lm._identity = identity
    return identity


def check_same_model(stored: dict, offered: dict) -> None:
    """Raise ModelMismatchError naming the first fingerprint that differs."""
    for key, what in (("config_sha256", "config"), ("weights_sha256", "weights"), ("tokenizer_sha256", "tokenizer")):
        if stored.get(key) != offered.get(key):
            if key == "weights_sha256" and stored.get("dtype") and stored.get("dtype") != offered.get("dtype"):
                raise ModelMismatchError(
                    f"model mismatch: the file was made with {stored.get('name')} in {stored.get('dtype')}, "
                    f"the offered model is loaded in {offered.get('dtype')}: pass --dtype {stored.get('dtype')}"
                )
            raise ModelMismatchError(
                f"model mismatch: the file was made with {stored.get('name')} ({stored.get('source')}); "
                f"the offered model {offered.get('name')} has a different {what}"
            )
