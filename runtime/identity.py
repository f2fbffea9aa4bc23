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


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        text = backend.to_str()
    else:  # slow tokenizers: the vocabulary and special tokens decide the ids
        text = json.dumps([sorted(tokenizer.get_vocab().items()), tokenizer.all_special_tokens])
    return hashlib.sha256(text.encode()).hexdigest()


def rope_info(config) -> dict:
    """Whether cached keys carry rotary position embedding, and its base, as far as the config says."""
    text = config.get_text_config(decoder=True)
    rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
    theta = (rope or {}).get("rope_theta", getattr(text, "rope_theta", None))
    if theta is None and getattr(text, "model_type", "") in ("gpt2", "opt", "bloom"):
        return {"position_encoding": "learned" if text.model_type != "bloom" else "alibi", "keys_post_rotary": False}
    return {
        "position_encoding": "rotary",
        "keys_post_rotary": True,
        "rope_theta": theta,
        "rope_type": (rope or {}).get("rope_type", "default"),
    }


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
        "weights_sha256": weights_fingerprint(lm.model),
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
