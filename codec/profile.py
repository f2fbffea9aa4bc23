"""The per-model profile: everything the lossy codec learns once, offline, from calibration text.

For each (layer, K/V, head) it holds a PCA basis and mean (fitted on pre-rotary keys and on
values), each coefficient's calibration std, the pooled shape of the standardised coefficients
per (layer, K/V) (a CDF on a fixed grid), and the model's own sensitivity to noise in that head,
from which the base quantiser steps are derived. A file refers to its profile by sha256; the
profile records the fingerprints of the model it was fitted for and refuses any other.

Byte format (docs/PROFILE.md): ``magic(8) | version u16 | reserved u16 | header_len u32 |
header JSON (utf-8) | tensor blob | sha256(everything before)(32)``. No pickle anywhere.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from kvc.errors import FormatError, ProfileError, VersionError

MAGIC = b"KVCPROF\x00"
VERSION = 5  # the newest profile version this kvc reads (fit_profile writes 2 or 3; 4 with mix=True; 5: add_chain)
MAX_HEADER = 1 << 20
MAX_FILE = 256 << 20
MAX_LAYERS, MAX_HEADS, MAX_DIM, MAX_SINKS = 1024, 1024, 1024, 1 << 16
SINKS = 4
GRID = (-16.0, 16.0, 513)  # standardised-coefficient grid of the shape CDFs
_DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2")}
_FIELDS_V1 = {  # name -> dtype; shapes come from the header
    "mean": "float32", "basis": "float16", "sigma": "float32", "cdf": "float32",
    "base_step": "float32", "sensitivity": "float32",
}
_FIELDS = {**_FIELDS_V1, "step": "float32"}  # version 2: one base step per (layer, kind, head, coefficient)
_FIELDS_V4 = {**_FIELDS, "mix": "float16"}  # version 4: one rotation across the heads of each (layer, kind)
_FIELDS_V5 = {**_FIELDS_V4, "chain": "float32"}  # version 5: each layer predicted from the one before (add_chain)
FISHER_SAMPLES = 8  # sampled continuations per sensitivity text for the per-coefficient sensitivity
IDENTITY_KEYS = ("config_sha256", "weights_sha256", "tokenizer_sha256")


@dataclass
class Profile:
    """Arrays are indexed ``[layer, kind(0=key, 1=value), head, ...]``."""

    identity: dict  # name + the three fingerprints of the model it was fitted for
    layers: int
    heads: int
    key_dim: int
    value_dim: int
    rotary: dict | None  # {"theta": float, "dim": int[, "layer_theta": [float] * layers]} when keys are un-rotated
    sinks: int
    arrays: dict[str, np.ndarray]
    fit: dict = field(default_factory=dict)  # how it was fitted (texts, tokens, timings): informative only
    # {"ids": [token ids], "shift": s}: tokens the model is far more sensitive to than to others (e.g.
    # SmolLM2's " the", an attention sink), which kvq levels quantise 2**s times finer. The encoder's
    # choice only: a file's segments carry their own fine rows, so decoding never needs it.
    fine_tokens: dict | None = None
    _bytes: bytes | None = field(default=None, repr=False)
    _sha256: str | None = field(default=None, repr=False)

    @property
    def version(self) -> int:
        """4 when coefficients are mixed across heads (``mix``; ``rotary.layer_theta`` optional), 3 when keys
        are un-rotated with a base per layer (``rotary.layer_theta``; it holds ``step`` too), 2 when the
        profile holds per-coefficient steps (``step``), else 1. Each version is the oldest that can describe
        the profile, so profiles that need nothing new keep the version older kvc reads. 5 when each layer's
        step-scaled coefficients are predicted from the layer before's reconstruction (``chain``, with ``mix``)."""
        if "chain" in self.arrays:
            return 5
        if "mix" in self.arrays:
            return 4
        if self.rotary is not None and self.rotary.get("layer_theta") is not None:
            return 3
        return 2 if "step" in self.arrays else 1

    @property
    def mixed(self) -> bool:
        """Whether the coded coefficients are the per-head PCA coefficients over their steps, rotated
        across the heads of their (layer, kind) by ``mix`` (version 4; CODEC.md step 3b)."""
        return "mix" in self.arrays

    @property
    def chained(self) -> bool:
        """Whether each layer's step-scaled coefficients are predicted from the previous layer's reconstructed
        keys and values, and ``mix`` rotates the residual (version 5; CODEC.md step 3c)."""
        return "chain" in self.arrays

    def chain_matrix(self, layer: int, k: int) -> np.ndarray:
        """The float32 predictor ``[H·Dk + H·Dv, H·dim]`` of (layer, kind) from the layer before: rows are the
        previous layer's reconstructed step-scaled keys (``h·Dk + d``) then values (``H·Dk + h·Dv + d``), columns
        this kind's (``h·dim + d``); the used block of ``chain[layer, k]``."""
        return self.arrays["chain"][layer, k][np.ix_(_chain_rows(self.heads, self.key_dim, self.value_dim),
                                                     _chain_cols(self.heads, self.key_dim if k == 0 else self.value_dim,
                                                                 max(self.key_dim, self.value_dim)))]

    def coded_steps(self, layer: int | None = None, k: int | None = None) -> np.ndarray:
        """float64 base steps of the coefficients the coder sees, shaped as :meth:`component_steps`: the
        per-coefficient steps, or in a mixed profile 1 (its coefficients are already divided by their
        steps before mixing)."""
        st = self.component_steps(layer, k)
        return np.ones_like(st) if self.mixed else st

    def rotary_theta(self, layer: int) -> float:
        """The rotary base keys of ``layer`` are un-rotated with (the profile must have ``rotary``)."""
        return layer_theta(self.rotary, layer)

    def component_steps(self, layer: int | None = None, k: int | None = None) -> np.ndarray:
        """float64 base steps per coefficient, ``[L, 2, H, D]`` (or ``[H, D]`` for one (layer, kind)): version 2's
        ``step``; version 1's per-head ``base_step`` repeated over each head's coefficients."""
        if "step" in self.arrays:
            st = self.arrays["step"].astype(np.float64)
        else:
            b = self.arrays["base_step"].astype(np.float64)
            st = np.broadcast_to(b[..., None], b.shape + (self.arrays["sigma"].shape[-1],))
        return np.array(st if layer is None else st[layer, k])

    def with_fine_tokens(self, fine: dict | None) -> Profile:
        """This profile with other fine tokens (a new profile: new bytes, new hash)."""
        fine = None if fine is None else check_fine_tokens(fine, ProfileError)
        return Profile(identity=self.identity, layers=self.layers, heads=self.heads, key_dim=self.key_dim,
                       value_dim=self.value_dim, rotary=self.rotary, sinks=self.sinks, arrays=self.arrays,
                       fit=dict(self.fit), fine_tokens=fine)

    # ---- serialisation ----
    def to_bytes(self) -> bytes:
        if self._bytes is not None:
            return self._bytes
        version = self.version
        tensors, blob, offset = [], bytearray(), 0
        if version >= 3 and "step" not in self.arrays:
            raise ProfileError("a profile with per-layer rotary bases needs per-coefficient steps (version 3)")
        if self.rotary is not None:  # never write what no reader would take back
            self.rotary = check_rotary(self.rotary, self.layers, self.key_dim, version, ProfileError)
        for name, dtype in _fields(version).items():
            arr = np.ascontiguousarray(self.arrays[name], dtype=_DTYPES[dtype])
            data = arr.tobytes()
            tensors.append({"name": name, "dtype": dtype, "shape": list(arr.shape), "offset": offset,
                            "nbytes": len(data)})
            blob += data
            offset += len(data)
        header = {
            "format": "kvc-profile", "version": version, "identity": self.identity, "layers": self.layers,
            "heads": self.heads, "key_dim": self.key_dim, "value_dim": self.value_dim, "rotary": self.rotary,
            "sinks": self.sinks, "grid": list(GRID), "fit": self.fit, "tensors": tensors,
        }
        if self.fine_tokens is not None:  # absent otherwise, so profiles without it keep their bytes (and hash)
            header["fine_tokens"] = check_fine_tokens(self.fine_tokens, ProfileError)
        hjson = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        body = MAGIC + struct.pack("<HHI", version, 0, len(hjson)) + hjson + bytes(blob)
        self._bytes = body + hashlib.sha256(body).digest()
        return self._bytes

    @property
    def sha256(self) -> str:
        # Asked several times per read (level checks, table caches); the bytes are cached, so is this.
        if self._sha256 is None:
            self._sha256 = hashlib.sha256(self.to_bytes()).hexdigest()
        return self._sha256

    @classmethod
    def from_bytes(cls, data: bytes) -> Profile:
        """A profile from its file bytes, checked in order: size, magic, checksum, version, header length,
        strict JSON (formats.header.parse_json), every header field typed and ranged, every tensor entry
        against the shapes the dimensions imply and against the blob, then the values. Nothing is
        allocated from a number before it is checked against the bytes that back it."""
        data = bytes(data)
        if len(data) > MAX_FILE:
            raise ProfileError("profile file is implausibly large")
        if len(data) < len(MAGIC) + 8 + 32 or data[: len(MAGIC)] != MAGIC:
            raise ProfileError("not a kvc profile (bad magic or truncated)")
        body, digest = data[:-32], data[-32:]
        if hashlib.sha256(body).digest() != digest:
            raise ProfileError("profile checksum mismatch: the file is corrupt")
        version, _reserved, hlen = struct.unpack_from("<HHI", body, len(MAGIC))
        if version > VERSION:
            raise VersionError(f"profile format version {version} is newer than this kvc understands")
        if version < 1:
            raise ProfileError("profile format version 0 does not exist")
        start = len(MAGIC) + 8
        if hlen > MAX_HEADER or start + hlen > len(body):
            raise ProfileError("profile header length out of bounds")
        from kvc.formats.header import parse_json

        header = parse_json(body[start : start + hlen], "profile header", ProfileError)
        return cls._from_header(header, body[start + hlen :], data, version)

    @classmethod
    def _from_header(cls, header, blob: bytes, raw: bytes, version: int) -> Profile:
        def need(condition: bool, message: str) -> None:
            if not condition:
                raise ProfileError(f"profile header is malformed: {message}")

        def integer(key: str, low: int, high: int) -> int:
            value = header.get(key)
            need(type(value) is int and low <= value <= high, f"{key} must be an integer in [{low}, {high}]")
            return value

        need(type(header) is dict, "not a JSON object")
        if header.get("format") != "kvc-profile":
            raise ProfileError("not a kvc profile header")
        if header.get("grid") != list(GRID):
            raise ProfileError("profile uses an unknown shape grid")
        L = integer("layers", 1, MAX_LAYERS)
        H = integer("heads", 1, MAX_HEADS)
        kd = integer("key_dim", 1, MAX_DIM)
        vd = integer("value_dim", 1, MAX_DIM)
        sinks = integer("sinks", 0, MAX_SINKS)
        identity = header.get("identity")
        need(type(identity) is dict, "identity must be an object")
        need(all(type(v) in (str, type(None)) for v in identity.values()), "identity values must be strings")
        need(type(header.get("fit", {})) in (dict, type(None)), "fit must be an object")
        D = max(kd, vd)
        fields = _fields(version)
        expect = {"mean": (L, 2, H, D), "basis": (L, 2, H, D, D), "sigma": (L, 2, H, D), "mix": (L, 2, H * D, H * D),
                  "cdf": (L, 2, GRID[2]), "base_step": (L, 2, H), "sensitivity": (L, 2, H), "step": (L, 2, H, D),
                  "chain": (L, 2, 2 * H * D, H * D)}
        expect = {name: expect[name] for name in fields}
        # Python integers: no overflow, and the whole blob must back every tensor before any is read.
        needed = sum(math.prod(shape) * _DTYPES[fields[name]].itemsize for name, shape in expect.items())
        if needed > len(blob):
            raise ProfileError(f"profile tensors need {needed} bytes, the file holds {len(blob)}")
        tensors = header.get("tensors")
        need(type(tensors) is list and len(tensors) == len(fields), f"tensors must list the {len(fields)} tensors")
        arrays = {}
        for t in tensors:
            need(type(t) is dict, "a tensor entry is not an object")
            name = t.get("name")
            if type(name) is not str or name not in fields or name in arrays:
                raise ProfileError(f"profile tensor {str(name)[:40]!r} is unknown or repeated")
            if t.get("dtype") != fields[name] or t.get("shape") != list(expect[name]):
                raise ProfileError(f"profile tensor {name!r} has an unexpected dtype or shape")
            dt = _DTYPES[fields[name]]
            n = math.prod(expect[name])
            off, nbytes = t.get("offset"), t.get("nbytes")
            if type(off) is not int or type(nbytes) is not int or nbytes != n * dt.itemsize or not (
                0 <= off <= len(blob) - nbytes
            ):
                raise ProfileError(f"profile tensor {name!r} lies outside the file")
            arrays[name] = np.frombuffer(blob, dtype=dt, count=n, offset=off).reshape(expect[name]).copy()
        for name, arr in arrays.items():
            if not np.all(np.isfinite(arr)):
                raise ProfileError(f"profile tensor {name!r} holds non-finite values")
        if np.any(arrays["base_step"] <= 0) or np.any(arrays["sigma"] < 0) or np.any(arrays.get("step", 1.0) <= 0):
            raise ProfileError("profile steps must be positive")
        for name in ("basis", "mix"):  # the codec inverts them: they must be (float16-rounded) rotations
            if name in arrays and not _orthonormal(arrays[name]):
                raise ProfileError(f"profile tensor {name!r} is not orthonormal: the file is corrupt")
        if "chain" in arrays:
            _check_chain(arrays["chain"], H, kd, vd)
        need(header.get("version") == version, "the header's version differs from the file's")
        rotary = header.get("rotary")
        if rotary is not None:
            rotary = check_rotary(rotary, L, kd, version, lambda m: ProfileError(f"profile header is malformed: {m}"))
        elif version == 3:
            raise ProfileError("profile header is malformed: version 3 needs rotary.layer_theta")
        fine = header.get("fine_tokens")
        if fine is not None:
            fine = check_fine_tokens(fine, lambda m: ProfileError(f"profile header is malformed: {m}"))
        prof = cls(identity=dict(identity), layers=L, heads=H, key_dim=kd, value_dim=vd, rotary=rotary,
                   sinks=sinks, arrays=arrays, fit=dict(header.get("fit") or {}), fine_tokens=fine)
        prof._bytes = raw
        return prof

    def check_layout(self, layers: list[dict]) -> None:
        """Refuse (FormatError) a profile that does not describe a file's layout (``layout.layers``): a
        lossy level's tables are sized by the profile, so it must be the file's own shape."""
        if len(layers) != self.layers or any(
            (spec["kv_heads"], spec["key_dim"], spec["value_dim"]) != (self.heads, self.key_dim, self.value_dim)
            for spec in layers
        ):
            raise FormatError(
                f"the file's layout ({len(layers)} layers) does not match its profile {self.sha256[:16]}… "
                f"({self.layers} layers × {self.heads} heads × {self.key_dim}/{self.value_dim})"
            )

    def coding_table_bytes(self, scale: float, layers: list[int]) -> int:
        """Memory the kvq (version 1) decoder's coding tables take for ``layers`` at step ``scale``: each
        channel has an alphabet of 2R+1 symbols, R = clip(ceil(10·sigma/step) + 1, 1, 4096)
        (docs/CODEC.md step 5); ~48 bytes per symbol (float64 probabilities, constriction's table and
        the transients of building them) and ~320 bytes per channel."""
        if not layers:
            return 0
        idx = np.asarray(sorted(set(layers)), dtype=np.int64)
        total = 0
        steps = self.coded_steps()
        for k, dim in ((0, self.key_dim), (1, self.value_dim)):
            sigma = self.arrays["sigma"][idx, k, :, :dim].astype(np.float64)  # [l, H, dim]
            step = steps[idx, k, :, :dim] * float(scale)
            radius = np.clip(np.ceil(10.0 * sigma / step) + 1, 1, 4096)
            total += int(48 * (2 * radius + 1).sum()) + 320 * radius.size
        return total

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_bytes(self.to_bytes())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Profile:
        p = Path(path)
        if not p.is_file():
            raise ProfileError(f"no profile at {p}")
        if p.stat().st_size > MAX_FILE:
            raise ProfileError(f"{p} is too large to be a profile")
        return cls.from_bytes(p.read_bytes())

    # ---- model binding ----
    def matches(self, identity: dict) -> bool:
        return all(self.identity.get(k) == identity.get(k) for k in IDENTITY_KEYS)

    def check_model(self, identity: dict) -> None:
        for key in IDENTITY_KEYS:
            if self.identity.get(key) != identity.get(key):
                raise ProfileError(
                    f"profile {self.sha256[:16]}… was fitted for {self.identity.get('name')}, not for "
                    f"{identity.get('name')} (its {key.removesuffix('_sha256')} differs)")


def _fields(version: int) -> dict[str, str]:
    """The tensors (name -> dtype) a profile of ``version`` holds, in the order they are written."""
    return _FIELDS_V5 if version >= 5 else _FIELDS_V4 if version >= 4 else _FIELDS if version >= 2 else _FIELDS_V1


def _chain_rows(H: int, kd: int, vd: int) -> np.ndarray:
    """Rows of a ``chain`` matrix ``[2·H·D, H·D]`` the codec reads: the previous layer's keys ``h·D + d`` (d < kd),
    then its values ``H·D + h·D + d`` (d < vd), D = max(kd, vd)."""
    D = max(kd, vd)
    keys = (np.arange(H)[:, None] * D + np.arange(kd)[None, :]).ravel()
    values = H * D + (np.arange(H)[:, None] * D + np.arange(vd)[None, :]).ravel()
    return np.concatenate([keys, values])


def _chain_cols(H: int, dim: int, D: int) -> np.ndarray:
    """Columns of a ``chain`` matrix the codec reads for a kind of ``dim``: ``h·D + d``, d < dim."""
    return (np.arange(H)[:, None] * D + np.arange(dim)[None, :]).ravel()


def _check_chain(chain: np.ndarray, H: int, kd: int, vd: int) -> None:
    """Version 5's ``chain`` (finite already): layer 0 has no layer before it, so it is all zeros, and so is
    every entry the codec never reads (past a kind's dim); a forged profile is refused, never half-used."""
    if np.any(chain[0] != 0):
        raise ProfileError("profile tensor 'chain' predicts layer 0, which has no layer before it: the file is corrupt")
    used = np.zeros(chain.shape[2:], bool)
    rows = _chain_rows(H, kd, vd)
    for k, dim in ((0, kd), (1, vd)):
        used[:] = False
        used[np.ix_(rows, _chain_cols(H, dim, max(kd, vd)))] = True
        if np.any(chain[:, k][:, ~used] != 0):
            raise ProfileError("profile tensor 'chain' has entries past the coded dims: the file is corrupt")


def shipped_profiles_dir() -> Path:
    return Path(__file__).resolve().parent / "profiles"


def optional_profiles_dir() -> Path:
    """Shipped profiles a user opts into with ``--profile`` (never picked for encoding by themselves),
    e.g. SmolLM2's version-4 profile: files made with one are still decoded by hash without it."""
    return shipped_profiles_dir() / "optional"


def superseded_profiles_dir() -> Path:
    """Shipped profiles a newer one replaced (e.g. SmolLM2's before it had fine tokens): never picked for
    encoding, kept so the files that name them by hash still decode."""
    return shipped_profiles_dir() / "superseded"


def _cache_profiles_dir() -> Path:
    # The same cache the model conversion uses (~/.cache/kvc unless $KVC_CACHE_DIR moves it), so a
    # profile put where the docs say is found with or without the variable. Imported here, not at the
    # top, to keep kvc.codec importable without kvc.runtime.
    from kvc.runtime.loading import cache_dir

    return cache_dir() / "profiles"


def find_profile(identity: dict, path: str | None = None) -> Profile | None:
    """The profile for this model: an explicit path (must match), else a shipped one, else one in
    ``$KVC_CACHE_DIR/profiles/`` (by default ``~/.cache/kvc/profiles/``); None when there is none. Within
    a folder the newest profile version wins (a model may ship its version-1 profile beside its version-2
    one, for files that name it), then the first by name. Corrupt files found while searching are skipped."""
    if path is not None:
        prof = Profile.load(path)
        prof.check_model(identity)
        return prof
    return _search(lambda prof: prof.matches(identity), newest=True)


def find_profile_by_sha(sha256: str, identity: dict | None = None, path: str | None = None) -> Profile | None:
    """The profile a file names by hash (decode side: no model needed when identity is None)."""
    if path is not None:
        prof = Profile.load(path)
        if prof.sha256 != sha256:
            raise ProfileError(f"profile {path} is {prof.sha256[:16]}…, but the file needs {sha256[:16]}…")
        return prof
    return _search(lambda prof: prof.sha256 == sha256, extra=(optional_profiles_dir(), superseded_profiles_dir()))


_FOUND: dict[tuple, Profile | None] = {}  # (path, size, mtime) -> the profile read there (None: unreadable)


def _load_found(path: Path) -> Profile | None:
    """A profile met on the search path, read once per process while the file is unchanged: every
    ``kvc.open`` looks its levels' profiles up, and reading and hashing the shipped ones cost ~11 ms per
    open (5% of a whole 2k-token read, all of it serial). Unreadable or corrupt files give None."""
    try:
        st = path.stat()
    except OSError:
        return None
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _FOUND:
        try:
            prof = Profile.load(path)
        except (ProfileError, FormatError, OSError):
            prof = None
        if len(_FOUND) >= 64:
            _FOUND.clear()
        _FOUND[key] = prof
    return _FOUND[key]


def _search(wanted: Callable[[Profile], bool], newest: bool = False, extra: tuple = ()) -> Profile | None:
    """The first profile on the search path (shipped, then the user's cache) that ``wanted`` accepts —
    with ``newest``, the one of the highest profile version in the first folder holding any, first by name
    among equals; unreadable or corrupt files met on the way are skipped, not fatal."""
    for folder in (shipped_profiles_dir(), _cache_profiles_dir(), *extra):
        if folder is None or not folder.is_dir():
            continue
        best = None
        for candidate in sorted(folder.glob("*.kvcp")):
            prof = _load_found(candidate)
            if prof is not None and wanted(prof):
                if not newest:
                    return prof
                if best is None or prof.version > best.version:
                    best = prof
        if best is not None:
            return best
    return None


# ---------------------------------------------------------------- fitting

def _orthonormal(mats: np.ndarray, tol: float = 0.05) -> bool:
    """Every ``[n, n]`` matrix of ``mats`` (``[..., n, n]``) has ``|MᵀM − I| ≤ tol`` entrywise: a float16
    rounding of a rotation is within ~1e-3, and anything this close is well conditioned (its inverse, the
    analysis matrix, exists and is as accurate)."""
    n = mats.shape[-1]
    m = torch.from_numpy(mats.reshape(-1, n, n).astype(np.float32))
    gram = torch.bmm(m.transpose(1, 2), m) - torch.eye(n)
    return bool(gram.abs().max() <= tol) if len(m) else True


def check_rotary(rotary, layers: int, key_dim: int, version: int, error) -> dict:
    """A profile's ``rotary`` settings, checked field by field (``error(message)`` makes the exception):
    ``{"theta": number in (0, 1e12], "dim": key_dim (even)}``, plus ``"layer_theta"`` — required in version 3,
    allowed in version 4, refused before — one such number per layer, the first equal to ``theta``. Nothing
    else."""
    def need(condition: bool, message: str) -> None:
        if not condition:
            raise error(message)

    def base(value) -> bool:
        return type(value) in (int, float) and 0.0 < value <= 1e12

    need(type(rotary) is dict, "rotary must be an object or null")
    need(set(rotary) <= {"theta", "dim", "layer_theta"}, "rotary holds an unknown field")
    theta, dim = rotary.get("theta"), rotary.get("dim")
    need(type(theta) in (int, float) and type(dim) is int, "rotary needs a numeric theta and an integer dim")
    need(dim == key_dim and dim % 2 == 0 and base(theta), "rotary parameters are inconsistent")
    out = {"theta": float(theta), "dim": dim}
    thetas = rotary.get("layer_theta")
    if version == 3 or (version >= 4 and thetas is not None):  # version 3 is exactly "a base per layer"
        need(type(thetas) is list and len(thetas) == layers, "rotary.layer_theta must list one base per layer")
        need(all(base(t) for t in thetas), "rotary.layer_theta values must be numbers in (0, 1e12]")
        need(float(thetas[0]) == out["theta"], "rotary.theta must equal rotary.layer_theta[0]")
        out["layer_theta"] = [float(t) for t in thetas]
    else:
        need(thetas is None, "rotary.layer_theta needs profile version 3")
    return out


MAX_FINE_TOKENS = 4096


def check_fine_tokens(fine, error) -> dict:
    """A profile's ``fine_tokens`` (or a kvq level's ``fine_tokens`` and ``fine_shift``, kvc.codec.kvq):
    ``{"ids": [1..4096 distinct token ids, increasing], "shift": 1..4}``."""
    from kvc.codec.kvq_segment import MAX_FINE_SHIFT  # the shifts a segment can carry

    ok = (type(fine) is dict and set(fine) == {"ids", "shift"} and type(fine["ids"]) is list
          and 0 < len(fine["ids"]) <= MAX_FINE_TOKENS and all(type(i) is int and 0 <= i < 1 << 31 for i in fine["ids"])
          and all(a < b for a, b in zip(fine["ids"], fine["ids"][1:]))
          and type(fine["shift"]) is int and 1 <= fine["shift"] <= MAX_FINE_SHIFT)  # fmt: skip
    if not ok:
        raise error(f"fine_tokens must be {{ids: 1 to {MAX_FINE_TOKENS} increasing token ids, shift: 1 to "
                    f"{MAX_FINE_SHIFT}}}")
    return {"ids": list(fine["ids"]), "shift": fine["shift"]}


def layer_theta(rotary: dict, layer: int) -> float:
    """The rotary base of ``layer`` under a profile's ``rotary`` settings: its own (``layer_theta``,
    version 3) or the one shared base."""
    thetas = rotary.get("layer_theta")
    return float(thetas[layer]) if thetas is not None else float(rotary["theta"])


def _pre_frame(tensor: torch.Tensor, kind: str, layer: int, start: int, rotary: dict | None) -> torch.Tensor:
    from kvc.codec.transforms import rope_inv_freq, unrotate_keys

    x = tensor.double()
    if kind == "key" and rotary is not None:
        x = unrotate_keys(x, start, rope_inv_freq(layer_theta(rotary, layer), rotary["dim"]))
    return x


def rotary_plan(lm) -> tuple[dict | None, str | None]:
    """``(rotary, reason)``: the settings with which keys are un-rotated before coding, or None and, when
    the keys do carry a rotary embedding that kvq cannot undo exactly, why (one line). kvq un-rotates
    with one plain (``default``) rope over the whole head, with one base for every layer or, when layers
    differ (Gemma 3), each layer's own (``layer_theta``, a version-3 profile; transforms.py); anything
    else is coded post-rotary, which is correct but compresses less."""
    from kvc.runtime.identity import rope_info, rope_layers

    config = lm.model.config
    info = rope_info(config)
    if not info.get("keys_post_rotary"):
        return None, None
    text = config.get_text_config(decoder=True)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    layers = rope_layers(config) or []
    partial = getattr(text, "partial_rotary_factor", None)
    for entry in layers:  # transformers 5 may keep it beside the rope type
        partial = entry.get("partial_rotary_factor", partial)
    if not layers or all(e.get("rope_theta") is None for e in layers):
        return None, "the config names no rotary base (rope_theta): keys are coded with the rotary embedding in them"
    thetas = sorted({float(e["rope_theta"]) for e in layers if e.get("rope_theta") is not None})
    types = sorted({str(e.get("rope_type", "default")) for e in layers})
    if types != ["default"]:
        return None, (f"rotary type {'/'.join(types)} (scaled rope) is not undone by kvq: keys are coded with the "
                      f"rotary embedding in them")
    if partial not in (None, 1, 1.0):
        return None, f"rotary covers {partial:g} of each head (partial rotary): keys are coded with it in them"
    if head_dim % 2:
        return None, f"odd head dim {head_dim}: keys are coded with the rotary embedding in them"
    if len(thetas) > 1:  # e.g. Gemma 3: local layers at 1e4, global ones at 1e6 (profile version 3)
        if len(layers) != getattr(text, "num_hidden_layers", None) or any(e.get("rope_theta") is None for e in layers):
            return None, ("the config does not give every layer its rotary base: keys are coded with the rotary "
                          "embedding in them")
        first = float(layers[0]["rope_theta"])
        return {"theta": first, "dim": int(head_dim), "layer_theta": [float(e["rope_theta"]) for e in layers]}, None
    return {"theta": thetas[0], "dim": int(head_dim)}, None


def rotary_for(lm) -> dict | None:
    """Un-rotate keys only for plain default rope over the whole head (what transforms.py implements)."""
    return rotary_plan(lm)[0]


def fit_profile(lm, texts: list[str], tokens: int = 2048, sensitivity_texts: int = 2,
                sensitivity_tokens: int = 1024, continuation: int = 64, sinks: int = SINKS, seed: int = 0,
                fisher_samples: int = FISHER_SAMPLES, fisher_continuation: int = 128,
                on_progress: Callable[[str, int, int], None] | None = None, mix: bool = False,
                fine: bool = True) -> Profile:
    """Fit a profile for ``lm`` on calibration ``texts`` (each cut to ``tokens``).

    PCA bases, coefficient stds and shapes come from every text; sensitivities from the first
    ``sensitivity_texts`` texts long enough for a ``sensitivity_tokens`` context plus a continuation; the
    per-coefficient sensitivity (version 2's ``step``) from as many texts, with contexts of up to ``tokens``
    and ``fisher_continuation`` continuation tokens. With ``mix`` (version 4; off by default: it costs H× the
    decode synthesis) a second PCA over all heads of
    each (layer, kind), of the coefficients divided by their steps, gives ``mix``; ``sigma`` and ``cdf``
    then describe the mixed coefficients the coder sees (PROFILE.md, fitting step 8). With ``fine`` the token
    ids the model is far more sensitive to than to others become the profile's fine tokens (PROFILE.md,
    fitting step 9; kvc.codec.fine_tokens), measured on up to FINE_TEXTS texts."""
    from kvc.codec.transforms import pca_forward
    from kvc.runtime.identity import model_identity
    from kvc.runtime.prefill import prefill, tokenize

    if not texts:
        raise ProfileError("fitting a profile needs at least one calibration text")
    progress = on_progress or (lambda stage, done, total: None)
    identity = model_identity(lm)
    rotary, rotary_reason = rotary_plan(lm)
    warnings = [f"rotary: {rotary_reason}"] if rotary_reason else []
    kvs = []
    for i, text in enumerate(texts):
        ids = tokenize(lm, text)
        kvs.append((ids, prefill(lm, ids[:tokens])))
        progress("prefill", i + 1, len(texts))
    first = kvs[0][1]
    L = len(first.layers)
    H = first.layers[0].key.shape[0]
    kd, vd = first.layers[0].key.shape[2], first.layers[0].value.shape[2]
    D = max(kd, vd)
    if any(layer.key.shape[0] != H or layer.key.shape[2] != kd or layer.value.shape[2] != vd for layer in first.layers):
        raise ProfileError("layers with differing head counts or dims are not supported by the lossy codec")

    mean = np.zeros((L, 2, H, D), np.float32)
    basis = np.zeros((L, 2, H, D, D), np.float16)
    sigma = np.zeros((L, 2, H, D), np.float32)
    n_grid = GRID[2]
    grid = np.linspace(GRID[0], GRID[1], n_grid)
    cdf = np.zeros((L, 2, n_grid), np.float32)
    for layer in range(L):
        for k, kind in enumerate(("key", "value")):
            dim = kd if kind == "key" else vd
            x = _calibration_frame(kvs, layer, kind, rotary, sinks)  # [H, N, dim]
            mu = x.mean(1)
            xc = x - mu[:, None]
            cov = torch.bmm(xc.transpose(1, 2), xc) / max(1, x.shape[1] - 1)
            b16 = _signed_eigh(cov).numpy().astype(np.float16)
            from kvc.codec.transforms import analysis_matrix

            ana = torch.from_numpy(analysis_matrix(b16))
            coef = pca_forward(x, mu, ana)  # [H, N, dim]
            sd = coef.std(1).numpy()
            mean[layer, k, :, :dim] = mu.numpy()
            basis[layer, k, :, :dim, :dim] = b16
            sigma[layer, k, :, :dim] = sd
            cdf[layer, k] = _pooled_cdf(coef.numpy(), sd, grid)
        progress("pca", layer + 1, L)
    for layer in range(L):  # unused dims of the smaller kind stay an identity basis (never read)
        for k, dim in ((0, kd), (1, vd)):
            for h in range(H):
                basis[layer, k, h, dim:, dim:] = np.eye(D - dim, dtype=np.float16)

    sens, sens_warnings = _sensitivity(lm, kvs, sensitivity_texts, sensitivity_tokens, continuation, sinks, seed,
                                       progress)
    warnings += sens_warnings
    base = 1.0 / np.sqrt(np.maximum(sens, 1e-12 * max(float(sens.max()), 1e-30)))
    base = base / math.exp(float(np.log(base).mean()))  # geometric mean 1: levels scale it
    fisher, fisher_warnings = _fisher(lm, kvs, basis, rotary, sensitivity_texts, tokens, continuation,
                                      fisher_continuation, sinks, fisher_samples, seed, progress)
    warnings += fisher_warnings
    step = _component_steps(fisher, base, kd, vd)
    arrays = {"mean": mean, "basis": basis, "sigma": sigma, "cdf": cdf, "base_step": base.astype(np.float32),
              "sensitivity": sens.astype(np.float32), "step": step}
    if mix:
        arrays.update(_fit_mix(kvs, arrays, rotary, sinks, kd, vd, grid, progress))
    fit = {"texts": len(texts), "tokens": tokens, "sensitivity_texts": sensitivity_texts,
           "sensitivity_tokens": sensitivity_tokens, "continuation": continuation, "seed": seed,
           "fisher_samples": fisher_samples, "fisher_continuation": fisher_continuation,
           "sliding_layers": [i for i, lay in enumerate(first.layers) if lay.start > 0],
           "warnings": warnings}
    ident = {"name": identity.get("name"), **{k: identity[k] for k in IDENTITY_KEYS}}
    prof = Profile(identity=ident, layers=L, heads=H, key_dim=kd, value_dim=vd, rotary=rotary, sinks=sinks,
                   arrays=arrays, fit=fit)
    return add_fine_tokens(prof, lm, texts, tokens, seed=seed, on_progress=progress) if fine else prof


FINE_TEXTS = 3  # calibration texts the fine tokens are measured on (about a minute each for SmolLM2 on 2 cores)


def add_fine_tokens(profile: Profile, lm, texts: list[str], tokens: int = 2048, seed: int = 0,
                    on_progress=None) -> Profile:
    """``profile`` with the fine tokens measured on the first FINE_TEXTS long enough ``texts`` (what fit_profile does
    as its last step, so the same texts give the same bytes); its ``fit`` records what was measured."""
    from kvc.codec.fine_tokens import fit_fine_tokens

    fine, stats, used = fit_fine_tokens(lm, profile, texts, tokens, seed=seed, max_texts=FINE_TEXTS,
                                        on_progress=on_progress)
    out = profile.with_fine_tokens(fine)
    out.fit["fine_tokens"] = {"texts": used, "most_concentrated": stats}
    return out


def add_mix(profile: Profile, lm, texts: list[str], tokens: int = 2048, on_progress=None) -> Profile:
    """``profile`` (version 2 or 3, fitted on ``texts`` for ``lm``) made version 4: its mix, sigma and cdf
    exactly as ``fit_profile(..., mix=True)`` would fit them on the same texts, without refitting the rest
    (the mix depends only on the PCA, the steps and the calibration caches)."""
    from kvc.runtime.identity import model_identity
    from kvc.runtime.prefill import prefill, tokenize

    if profile.mixed or "step" not in profile.arrays:
        raise ProfileError("add_mix needs a version-2 or 3 profile")
    profile.check_model(model_identity(lm))
    kvs = []
    for text in texts:
        ids = tokenize(lm, text)
        kvs.append((ids, prefill(lm, ids[:tokens])))
    grid = np.linspace(GRID[0], GRID[1], GRID[2])
    arrays = dict(profile.arrays)
    arrays.update(_fit_mix(kvs, arrays, profile.rotary, profile.sinks, profile.key_dim, profile.value_dim, grid,
                           on_progress or (lambda stage, done, total: None)))
    return Profile(identity=profile.identity, layers=profile.layers, heads=profile.heads, key_dim=profile.key_dim,
                   value_dim=profile.value_dim, rotary=profile.rotary, sinks=profile.sinks, arrays=arrays,
                   fit=dict(profile.fit, mix=True), fine_tokens=profile.fine_tokens)


CHAIN_RIDGE = 1e-6  # the chain's least squares: ridge λ = CHAIN_RIDGE · mean diagonal of XᵀX (dead directions)


def add_chain(profile: Profile, lm, texts: list[str], tokens: int = 2048, scale: float | None = None,
              on_progress=None) -> Profile:
    """``profile`` (version 2, 3 or 4, fitted for ``lm``; its PCA, steps and fine tokens are kept) made version 5:
    each layer's step-scaled coefficients predicted from the previous layer's reconstructed keys and values
    (``chain``), ``mix`` the PCA of the prediction residual, ``sigma``/``cdf`` the rotated residual's, all fitted
    closed loop at step ``scale`` (default: the ``balanced`` level's for this profile) on ``texts`` cut to
    ``tokens`` (PROFILE.md, fitting step 10). Every layer must keep every token (no sliding-window layers)."""
    from kvc.codec.levels import level_scale
    from kvc.runtime.identity import model_identity
    from kvc.runtime.prefill import prefill, tokenize

    if "step" not in profile.arrays or profile.chained:
        raise ProfileError("add_chain needs a version-2, 3 or 4 profile")
    profile.check_model(model_identity(lm))
    if scale is None:
        scale = level_scale("balanced", profile)
    kvs = []
    for text in texts:
        ids = tokenize(lm, text)
        kvs.append((ids, prefill(lm, ids[:tokens])))
    if any(lay.start != 0 for _, kv in kvs for lay in kv.layers):
        raise ProfileError("the chain needs every layer to keep every token (this model has sliding-window layers)")
    grid = np.linspace(GRID[0], GRID[1], GRID[2])
    arrays = dict(profile.arrays)
    arrays.update(_fit_chain(kvs, arrays, profile.rotary, profile.sinks, profile.key_dim, profile.value_dim, grid,
                             float(scale), on_progress or (lambda stage, done, total: None)))
    fit = dict(profile.fit, mix=True, chain={"scale": float(scale), "texts": len(texts), "tokens": tokens,
                                             "ridge": CHAIN_RIDGE})
    return Profile(identity=profile.identity, layers=profile.layers, heads=profile.heads, key_dim=profile.key_dim,
                   value_dim=profile.value_dim, rotary=profile.rotary, sinks=profile.sinks, arrays=arrays,
                   fit=fit, fine_tokens=profile.fine_tokens)


def _fit_chain(kvs, arrays: dict, rotary, sinks: int, kd: int, vd: int, grid: np.ndarray, scale: float,
               progress) -> dict:
    """Version 5's ``chain``, ``mix`` and the ``sigma``/``cdf`` of the coded residual, layer after layer. Per
    (layer, kind): ``w [N, H·dim]`` the calibration coefficients over their steps (as ``_fit_mix``); ``X`` the
    previous layer's reconstructions ``[N, H·kd + H·vd]`` (keys then values; none for layer 0); the predictor
    ``C`` = ridge least squares of ``w`` on ``X`` (float32); the residual ``e = w − X·C``; ``R`` its PCA (float16);
    the coded coefficients ``y = e @ inv(Rᵀ)`` give ``sigma`` and ``cdf``; and the reconstruction the next layer
    is fitted on is ``X·C + round(y / scale)·scale @ Rᵀ``, what the codec rebuilds at that scale (closed loop;
    fine rows, which the codec rebuilds finer, are not singled out)."""
    from kvc.codec.transforms import analysis_matrix

    L, _, H, D = arrays["mean"].shape
    mix = np.zeros((L, 2, H * D, H * D), np.float16)
    chain = np.zeros((L, 2, 2 * H * D, H * D), np.float32)
    sigma = arrays["sigma"].copy()
    cdf = arrays["cdf"].copy()
    rows = _chain_rows(H, kd, vd)
    prev = None  # [N, H·kd + H·vd] float64: the previous layer's reconstructed keys then values
    for layer in range(L):
        recon = []
        for k in (0, 1):
            dim = kd if k == 0 else vd
            n = H * dim
            w = _weighted_coefficients(kvs, arrays, layer, k, dim, rotary, sinks).numpy()  # [N, H·dim]
            pred = np.zeros_like(w)
            if prev is not None:
                gram = prev.T @ prev
                gram[np.diag_indices_from(gram)] += CHAIN_RIDGE * max(float(np.trace(gram)) / len(gram), 1e-30)
                c32 = np.linalg.solve(gram, prev.T @ w).astype(np.float32)
                chain[layer, k][np.ix_(rows, _chain_cols(H, dim, D))] = c32
                pred = prev @ c32.astype(np.float64)
            e = w - pred
            r16 = _signed_eigh(torch.from_numpy(e.T @ e / max(1, len(e) - 1))).numpy().astype(np.float16)
            y = e @ analysis_matrix(r16[None])[0]  # as the codec's analysis
            sd = y.std(0)
            mix[layer, k, :n, :n] = r16
            mix[layer, k, n:, n:] = np.eye(H * D - n, dtype=np.float16)  # never read
            sigma[layer, k, :, :dim] = sd.reshape(H, dim)
            cdf[layer, k] = _pooled_cdf(y, sd, grid)
            recon.append(pred + (np.round(y / scale) * scale) @ r16.astype(np.float64).T)
        prev = np.concatenate(recon, axis=1)
        progress("chain", layer + 1, L)
    return {"chain": chain, "mix": mix, "sigma": sigma, "cdf": cdf}


def _weighted_coefficients(kvs, arrays: dict, layer: int, k: int, dim: int, rotary: dict | None,
                           sinks: int) -> torch.Tensor:
    """The calibration tokens of one (layer, kind) as the coder of a version-4 or 5 profile sees them before
    its rotation: each head's PCA coefficients over their steps, heads side by side, float64 ``[N, H·dim]``
    (channel h·dim + d), whose squared error is the sensitivity-weighted error."""
    from kvc.codec.transforms import analysis_matrix, pca_forward

    x = _calibration_frame(kvs, layer, ("key", "value")[k], rotary, sinks)
    ana = torch.from_numpy(analysis_matrix(arrays["basis"][layer, k, :, :dim, :dim]))
    coef = pca_forward(x, torch.from_numpy(arrays["mean"][layer, k, :, :dim].astype(np.float64)), ana)
    coef /= torch.from_numpy(arrays["step"][layer, k, :, :dim].astype(np.float64))[:, None, :]
    return coef.permute(1, 0, 2).reshape(-1, x.shape[0] * dim)


def _calibration_frame(kvs, layer: int, kind: str, rotary: dict | None, sinks: int) -> torch.Tensor:
    """Every calibration token of one (layer, kind) past the sinks, keys un-rotated: float64 ``[H, N, dim]``."""
    xs = []
    for _, kv in kvs:
        lay = kv.layers[layer]
        x = _pre_frame(getattr(lay, kind), kind, layer, lay.start, rotary)
        skip = max(0, sinks - lay.start)  # sinks are stored raw, never through the model
        if x.shape[1] > skip:
            xs.append(x[:, skip:])
    if not xs:
        raise ProfileError("calibration texts are too short to fit a profile")
    return torch.cat(xs, dim=1)


def _pooled_cdf(coef: np.ndarray, sd: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """The empirical CDF at ``grid`` of every live channel's coefficients over its std (``coef [..., N, C]``,
    ``sd [..., C]``, channels last)."""
    u = coef / np.maximum(sd, 1e-12)[..., None, :]
    live = sd > 1e-6 * max(float(sd.max()), 1e-30)
    u = u[np.broadcast_to(live[..., None, :], u.shape)]
    u.sort()
    return np.searchsorted(u, grid, side="right") / max(1, len(u)) if len(u) else (grid >= 0)


def _signed_eigh(cov: torch.Tensor) -> torch.Tensor:
    """Eigenvectors (columns) of ``cov``, largest eigenvalue first, each signed so that its
    largest-magnitude entry is positive (deterministic)."""
    _, vecs = torch.linalg.eigh(cov)
    vecs = vecs.flip(-1)
    idx = vecs.abs().argmax(-2, keepdim=True)
    return vecs * torch.sign(torch.gather(vecs, -2, idx))


def _fit_mix(kvs, arrays: dict, rotary, sinks: int, kd: int, vd: int, grid: np.ndarray, progress) -> dict:
    """Version 4's ``mix`` and the ``sigma``/``cdf`` of the mixed coefficients. Per (layer, kind): the
    calibration coefficients divided by their steps, ``w [N, H·dim]`` (channel h·dim + d), whose squared
    error is the sensitivity-weighted error; their PCA ``R`` (float16) decorrelates the heads
    (bench/decorrelation.py: 14.7% fewer bits at equal KL on SmolLM2). The coded coefficients are
    ``y = w @ inv(Rᵀ)``; ``sigma`` holds their stds ``[H, dim]`` in channel order, ``cdf`` their pooled shape."""
    from kvc.codec.transforms import analysis_matrix

    L, _, H, D = arrays["mean"].shape
    mix = np.zeros((L, 2, H * D, H * D), np.float16)
    sigma = arrays["sigma"].copy()
    cdf = arrays["cdf"].copy()
    for layer in range(L):
        for k in (0, 1):
            dim = kd if k == 0 else vd
            n = H * dim
            w = _weighted_coefficients(kvs, arrays, layer, k, dim, rotary, sinks)  # [N, H·dim]
            r16 = _signed_eigh(w.T @ w / max(1, len(w) - 1)).numpy().astype(np.float16)
            y = (w @ torch.from_numpy(analysis_matrix(r16[None])[0])).numpy()  # as the codec's _mixing
            sd = y.std(0)
            mix[layer, k, :n, :n] = r16
            mix[layer, k, n:, n:] = np.eye(H * D - n, dtype=np.float16)  # never read
            sigma[layer, k, :, :dim] = sd.reshape(H, dim)
            cdf[layer, k] = _pooled_cdf(y, sd, grid)
        progress("mix", layer + 1, L)
    return {"mix": mix, "sigma": sigma, "cdf": cdf}


def _component_steps(fisher: np.ndarray | None, base: np.ndarray, kd: int, vd: int) -> np.ndarray:
    """Version 2's ``step`` ``[L, 2, H, D]`` (float32) from the per-coefficient sensitivity ``s`` (``_fisher``):
    ``s^-1/2`` (floored at 1e-6 of the largest ``s``), times the one constant that gives it the KL the per-head
    ``base`` steps predict, ``Σ s·step² = Σ s·base²`` over every coefficient, so a level's scale means about
    what it meant with version-1 steps. Without a measured ``s``, each head's ``base`` for all its coefficients.
    Coefficients past a kind's dim are never coded: 1."""
    L, _, H = base.shape
    D = max(kd, vd)
    step = np.ones((L, 2, H, D))
    for k, dim in ((0, kd), (1, vd)):
        step[:, k, :, :dim] = base[:, k, :, None]
    if fisher is None:
        return step.astype(np.float32)
    live = np.zeros((L, 2, H, D), bool)
    live[:, 0, :, :kd] = True
    live[:, 1, :, :vd] = True
    s = np.maximum(fisher, 1e-6 * max(float(fisher[live].max()), 1e-30))
    raw = 1.0 / np.sqrt(s)
    c = math.sqrt(float((s * step**2)[live].sum()) / float((s * raw**2)[live].sum()))
    return np.where(live, c * raw, 1.0).astype(np.float32)


def _fisher(lm, kvs, basis, rotary, n_texts, ctx_tokens, short, continuation, sinks, samples, seed,
            progress) -> tuple[np.ndarray | None, list[str]]:
    """Per-coefficient sensitivity ``s[l, k, h, d]`` (float64, ``[L, 2, H, D]``): the diagonal of the KL's Hessian
    in PCA coordinates, summed over the context's tokens, so that noise of variance ``v_d`` on coefficient ``d``
    of every token costs KL ≈ ½·Σ_d s_d·v_d. On the texts the per-head sensitivity uses (the first ``n_texts``
    with at least 32 + ``short`` tokens), with ``n = min(continuation, length − 32)`` continuation tokens after a
    context of ``min(ctx_tokens, length − n)`` tokens, ``samples`` times:
    continuation tokens are drawn from the model's own next-token distributions (teacher-forced on
    the real continuation), and the gradient ``g`` of their summed log-probability with respect to the cache
    (keys un-rotated, projected on the basis: ``∂/∂c = ∂/∂x · B``) gives ``s += g²`` (Fisher identity: its
    expectation is the Hessian). Tokens at positions < ``sinks`` are left out (stored raw)."""
    from kvc.runtime.prefill import prefill

    L, _, H, D = basis.shape[:4]
    chosen = [ids for ids, _ in kvs if len(ids) >= 32 + short][:n_texts]
    if not chosen or samples < 1:  # (no text: _sensitivity has said so, and every step is the same)
        return None, []
    s = np.zeros((L, 2, H, D))
    gen = torch.Generator().manual_seed(seed)
    total, done = len(chosen) * samples, 0
    progress("fisher", 0, total)  # the stage shows at once: its first step (a prefill and a backward) is long
    for ids in chosen:
        n_cont = min(continuation, len(ids) - 32)
        n_ctx = min(ctx_tokens, len(ids) - n_cont)
        ctx = prefill(lm, ids[:n_ctx])
        for sample in coefficient_gradients(lm, ctx, ids[n_ctx : n_ctx + n_cont], basis, rotary, sinks, samples,
                                            gen):  # fmt: skip
            for layer, k, _, gc in sample:
                s[layer, k, :, : gc.shape[2]] += gc.pow(2).sum(1).numpy() / (samples * len(chosen))
            done += 1
            progress("fisher", done, total)
    return s, []


def coefficient_gradients(lm, ctx, cont: list[int], basis: np.ndarray, rotary: dict | None, sinks: int,
                          samples: int, generator: torch.Generator):
    """For each of ``samples`` continuations of the cache ``ctx`` (the real ``cont`` tokens fed, the
    scored tokens drawn from the model's own next-token distributions with ``generator``), the gradient of
    their summed log-probability with respect to the cache's PCA coefficients: a list of ``(layer, kind,
    first position, ∂/∂c [H, T, dim] float64)`` per (layer, kind) with tokens at positions ≥ ``sinks``
    (keys un-rotated: ``∂/∂c = Rᵀ ∂/∂x · B``). What the per-coefficient sensitivity (``_fisher``) and the
    fine tokens' position weights (kvc.codec.fine_tokens) are both made of."""
    from kvc.codec.transforms import rope_inv_freq, unrotate_keys
    from kvc.runtime.cache import to_transformers_cache

    L = len(ctx.layers)
    inv_freqs = [rope_inv_freq(layer_theta(rotary, i), rotary["dim"]) if rotary else None for i in range(L)]
    n_ctx = len(ctx.token_ids)
    leaves = []
    for lay in ctx.layers:
        lay.key = lay.key.detach().float().clone().requires_grad_(True)
        lay.value = lay.value.detach().float().clone().requires_grad_(True)
        leaves += [lay.key, lay.value]
    ids_t = torch.tensor([cont], device=lm.device)
    positions = torch.arange(n_ctx, n_ctx + len(cont), device=lm.device)
    for _ in range(samples):
        cache = to_transformers_cache(ctx, lm.model.config, device=lm.device)
        with torch.enable_grad():
            logits = lm.model(input_ids=ids_t, past_key_values=cache, use_cache=True,
                              cache_position=positions).logits[0].float()
            logp = torch.log_softmax(logits, dim=-1)
            drawn = torch.multinomial(logp.detach().exp().cpu(), 1, generator=generator)[:, 0].to(logp.device)
            total_logp = logp[torch.arange(len(drawn), device=logp.device), drawn].sum()
            grads = torch.autograd.grad(total_logp, leaves, allow_unused=True)
        out = []
        for layer, lay in enumerate(ctx.layers):
            skip = max(0, sinks - lay.start)
            for k in (0, 1):
                g = grads[2 * layer + k]
                if g is None or g.shape[1] <= skip:
                    continue
                g = g[:, skip:].detach().cpu().double()  # [H, T, dim]
                if k == 0 and inv_freqs[layer] is not None:  # the gradient of the pre-rotary keys: R^T g
                    g = unrotate_keys(g, lay.start + skip, inv_freqs[layer])
                dim = g.shape[2]
                b = torch.from_numpy(basis[layer, k, :, :dim, :dim].astype(np.float64))
                out.append((layer, k, lay.start + skip, torch.bmm(g, b)))
        yield out


def _sensitivity(lm, kvs, n_texts, ctx_tokens, continuation, sinks, seed, progress) -> tuple[np.ndarray, list[str]]:
    """KL per unit noise variance for each (layer, kind, head): the model's own sensitivity, and the
    warnings of any part that could not be measured (it then falls back to uniform, and says so).

    Each chosen text's first ``ctx_tokens`` tokens are prefilled afresh, so every layer holds what it
    would for that context: all of it, or, for a sliding-window layer, the suffix it keeps. Gaussian
    noise of std 0.1·rms of the head is added to every kept non-sink token of one head at a time;
    KL(ref‖perturbed) over a continuation, divided by the noise variance, is the slope in the
    small-noise (quadratic) regime where quantisation operates."""
    from kvc.evaluation.quality import compare, continuation_logprobs
    from kvc.runtime.prefill import prefill

    L = len(kvs[0][1].layers)
    H = kvs[0][1].layers[0].key.shape[0]
    chosen = [ids for ids, _ in kvs if len(ids) >= 32 + continuation][:n_texts]
    if not chosen:
        longest = max(len(ids) for ids, _ in kvs)
        return np.ones((L, 2, H)), [
            f"sensitivity: no calibration text has the {32 + continuation} tokens a context and its continuation "
            f"need (the longest has {longest}): every head gets the same step"]
    sens = np.zeros((L, 2, H))
    counts = np.zeros((L, 2, H))
    gen = torch.Generator().manual_seed(seed)
    total = len(chosen) * L * 2 * H
    done = 0
    progress("sensitivity", 0, total)
    for ids in chosen:
        n_ctx = min(ctx_tokens, len(ids) - continuation)
        cont = ids[n_ctx : n_ctx + continuation]
        ctx = prefill(lm, ids[:n_ctx])
        ref = continuation_logprobs(lm, ctx, cont)
        for layer in range(L):
            lay = ctx.layers[layer]
            skip = max(0, sinks - lay.start)  # sinks are stored raw: never perturbed
            for k, kind in enumerate(("key", "value")):
                orig = getattr(lay, kind)
                for h in range(H):
                    done += 1
                    progress("sensitivity", done, total)
                    if orig.shape[1] <= skip:
                        continue
                    rms = float(orig[h, skip:].float().pow(2).mean().sqrt())
                    eps = 0.1 * rms if rms > 0 else 1e-3
                    noisy = orig.clone()
                    noise = torch.randn(noisy[h, skip:].shape, generator=gen, dtype=torch.float32) * eps
                    noisy[h, skip:] += noise.to(noisy.dtype)
                    setattr(lay, kind, noisy)
                    kl = compare(ref, continuation_logprobs(lm, ctx, cont), cont).kl
                    setattr(lay, kind, orig)
                    sens[layer, k, h] += max(kl, 1e-12) / (eps * eps)
                    counts[layer, k, h] += 1
        progress("sensitivity", done, total)
    measured = counts > 0
    sens = np.where(measured, sens / np.maximum(counts, 1), 0.0)
    warnings = []
    if not measured.all():
        missing = sorted({int(i) for i in np.argwhere(~measured)[:, 0]})
        fill = float(np.exp(np.log(sens[measured]).mean())) if measured.any() else 1.0
        sens[~measured] = fill
        warnings.append(f"sensitivity: layers {missing} keep no codable tokens in the calibration context; "
                        f"their heads get the geometric-mean sensitivity")
    return sens, warnings


def default_progress() -> Callable[[str, int, int], None] | None:
    """A rich progress bar on stderr when it is a terminal, else nothing."""
    if not sys.stderr.isatty():
        return None
    from rich.progress import Progress

    bar = Progress(transient=True)
    bar.start()
    tasks: dict[str, int] = {}

    def update(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = bar.add_task(stage, total=total)
        bar.update(tasks[stage], completed=done)
        if all(t.finished for t in bar.tasks) and stage == "sensitivity" and done == total:
            bar.stop()

    return update
