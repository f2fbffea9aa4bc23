"""The lossy level ladder and codec registration (imported by kvc.codec.registry).

Every kvq level is one global step scale over the profile's sensitivity-derived steps (per
coefficient from profile version 2 on, per head in version 1; version 4 divides its coefficients by
them before mixing, so the scale is the step); the rate–quality points below are measured by
``bench/codec.py`` on held-out essays (SmolLM2-135M, 2,048-token contexts; docs/CODEC.md has the table):

* ``high``     — near-lossless: KL ≈ 1e-3 or less;
* ``balanced`` — the default: the smallest level with KL ≤ 0.01;
* ``compact``  — KL ≤ 0.05;
* ``tiny``     — the smallest usable files, visibly lossy.
"""

from __future__ import annotations

from kvc.codec.registry import register_codec, register_level
from kvc.errors import ProfileError

DEFAULT_LEVEL = "balanced"

# level name -> global step scale (multiplies the profile's steps: version 2's per-coefficient `step`, or version
# 1's per-head `base_step`, geometric mean 1), for a profile with fine tokens. Chosen on SmolLM2's (2026-12-07):
# balanced so that code, legal and technical text keep the mean KL the scales before fine tokens gave them,
# the others moved by the same factor (docs/BENCHMARKS.md, "Fine tokens").
LEVEL_SCALES: dict[str, float] = {
    "high": 0.22,
    "balanced": 0.66,
    "compact": 1.33,
    "tiny": 2.9,
}
# ... and for a profile without fine tokens (fitted before them, on short texts, or for a model where none
# stands out): the scales chosen on SmolLM2's version-2 profile before fine tokens existed, which finer
# steps for fine rows are what pays for coarsening (0.22, 0.62, 1.4, 2.5 before per-coefficient steps).
PLAIN_LEVEL_SCALES: dict[str, float] = {
    "high": 0.19,
    "balanced": 0.57,
    "compact": 1.15,
    "tiny": 2.5,
}

# level name -> the mean KL it gave on the held-out essays (docs/CODEC.md's table): where
# `--target-kl` starts its search (kvc.codec.targeting), not a promise
LEVEL_KL: dict[str, float] = {
    "high": 0.00076,
    "balanced": 0.0077,
    "compact": 0.045,
    "tiny": 0.18,
}
PLAIN_LEVEL_KL: dict[str, float] = {
    "high": 0.00074,
    "balanced": 0.0087,
    "compact": 0.041,
    "tiny": 0.16,
}


def level_scale(name: str, profile) -> float:
    """The kvq scale of level ``name`` for ``profile`` (with or without fine tokens)."""
    fine = getattr(profile, "fine_tokens", None) is not None
    return (LEVEL_SCALES if fine else PLAIN_LEVEL_SCALES)[name]


def level_kl(name: str, profile) -> float:
    """The mean KL level ``name`` gave on the held-out essays with such a profile (targeting's first guess)."""
    fine = getattr(profile, "fine_tokens", None) is not None
    return (LEVEL_KL if fine else PLAIN_LEVEL_KL)[name]


def _kvq_factory(params: dict, profile):
    from kvc.codec.kvq import KvqCodec

    return KvqCodec(params, profile)


def _cachegen_factory(params: dict, profile):
    from kvc.codec.cachegen import CacheGenCodec

    return CacheGenCodec(params)


def _kvq_level(name: str):
    def build(profile) -> dict:
        if profile is None:
            raise ProfileError(f"level {name!r} needs a fitted profile for this model (see `kvc profile`)")
        sha = profile.sha256
        params = {"scale": level_scale(name, profile), "profile": sha}
        if profile.fine_tokens is not None:  # the encoder's choice, recorded so a re-encode (verify) repeats it
            params.update(fine_tokens=profile.fine_tokens["ids"], fine_shift=profile.fine_tokens["shift"])
        return {"codec": "kvq", "params": params, "profile": sha}

    return build


def _cachegen_level(profile) -> dict:
    from kvc.codec.cachegen import default_params

    if profile is None:
        raise ProfileError("level 'cachegen' needs the model's profile (for its layer count)")
    return {"codec": "cachegen", "params": default_params(profile.layers), "profile": None}


register_codec("kvq", _kvq_factory)
register_codec("cachegen", _cachegen_factory)
for _name in LEVEL_SCALES:
    register_level(_name, _kvq_level(_name))
register_level("cachegen", _cachegen_level)
