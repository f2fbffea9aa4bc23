#!/usr/bin/env python3
"""Fuzz kvc with hostile files: forged headers and payloads whose checksums are all valid.

Each case is one file made from a genuine fixture (a tiny Llama from tests/tiny_models.py, so a
prefill takes milliseconds; fixtures: lossless, high, balanced, compact, tiny, cachegen, a multi-level
file, an embedded-profile file, a Gemma-2 file with sliding-window layers, a file embedding a version-4
profile (coefficients mixed across heads) and a Gemma-3 file embedding a version-3 profile (a rotary
base per layer); the profile family forges the profile each file was encoded with) by mutations an
attacker would make, with the header digest, every payload's digests (SHA-256 and XXH3-128), every
attachment SHA-256 and the embedded profile's own digest recomputed afterwards. The generator knows the
container and JSON, not the codecs' internals: it mutates bytes, zstd frames, u32 length fields and
whole segments, so a new codec version (kvq v2) is covered unchanged.

    .venv/bin/python bench/fuzz.py --cases 100000 --seed 1 --json bench/results/fuzz.json
    .venv/bin/python bench/fuzz.py --seed 1234 --cases 1 --replay     # one case in process, with traceback
    .venv/bin/python bench/fuzz.py --seed 1234 --dump case.kvc         # write that case's file

Case ``i`` of a run has seed ``--seed + i``; ``--seed S --cases 1`` replays it exactly (same fixtures,
same machine). A case runs in a worker process: `kvc inspect` through the CLI code (in process, human
and JSON), open, read every level whole and one token window, turn a decoded level into safetensors
as `kvc decode` does, and, when anything decoded, `verify --deep` against the tiny model. It fails on
any exception that is not kvc's own (KvcError), a KvcError whose message is not one line, running over
--timeout seconds (the worker is killed), a worker crash, a MemoryError, a peak RSS over
4 × (file bytes + decoded bytes) + 200 MB, or forged data that verify --deep passes.

Memory: before each case the worker returns freed memory to the OS (malloc_trim), resets its peak-RSS
mark (/proc/self/clear_refs = 5) and caps its address space (RLIMIT_AS) at its current size + 4 × (file
+ 4 × cap) + 712 MB, so a runaway allocation becomes a MemoryError, never an OOM kill; the case's peak
is VmHWM − VmRSS(before). Reads are capped at --max-decoded-bytes (64 MiB) so cases stay cheap; the
default limit is the same code with another number.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import hashlib
import io
import json
import math
import os
import random
import re
import resource
import selectors
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

FIXTURE_VERSION = "kvc-fuzz-fixtures-4"
TEXT = "KV caches let a model skip re-reading a long context. Compression makes them cheap to store. " * 6
CONTEXT_TOKENS = 72
CHUNK_TOKENS = 16
FIXTURES = {  # name -> (tiny model, levels, embed the profile)
    "lossless": ("llama", ["lossless"], False),
    "high": ("llama", ["high"], False),
    "balanced": ("llama", ["balanced"], False),
    "compact": ("llama", ["compact"], False),
    "tiny": ("llama", ["tiny"], False),
    "cachegen": ("llama", ["cachegen"], False),
    "multi": ("llama", ["lossless", "balanced", "cachegen"], False),
    "embedded": ("llama", ["compact"], True),
    "sliding": ("gemma2", ["lossless"], False),
    "mixed": ("llama", ["balanced"], True),  # a version-4 profile (coefficients mixed across heads), embedded
    "layer-theta": ("gemma3", ["balanced"], True),  # a version-3 profile (a rotary base per layer), embedded
    "fine": ("llama", ["balanced"], True),  # a profile with fine tokens: kvq segment version 3, embedded
    "chain": ("llama", ["balanced"], True),  # a version-5 profile (each layer predicted from the one before)
}
# The profile each fixture is encoded with (default "llama", version 2): profile files in the fixture folder.
FIXTURE_PROFILES = {"mixed": "llama-mix", "layer-theta": "gemma3", "fine": "llama-fine", "chain": "llama-chain"}
ARCHS = ("llama", "gemma2", "gemma3")
MAGIC = b"\x89KVC\r\n\x1a\n"
MB = 1 << 20
DEFAULT_CAP = 64 * MB
SLACK = 200 * MB
FAMILIES = {"header": 40, "smart-header": 12, "payload": 30, "profile": 9, "bomb": 3, "container": 3, "combo": 3}
HEADER_FAMILIES = ("header", "smart-header", "container", "bomb", "combo")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- fixtures


def build_fixtures(folder: Path, model_dirs: dict[str, Path] | None = None) -> Path:
    """Build (once; deterministic on one machine) the tiny models, the profile and the genuine files.
    ``model_dirs`` may name already built tiny models (arch -> folder) to link instead of building."""
    folder = Path(folder)
    done = folder / "DONE"
    stamp = fixture_stamp()
    if done.exists() and done.read_text() == stamp:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for arch, path in (model_dirs or {}).items():
        if not (folder / arch).exists():
            (folder / arch).symlink_to(Path(path).resolve(), target_is_directory=True)
    import torch

    # Built with the one torch thread the workers run (worker_main): the files then record the workers'
    # kernel fingerprint, and verify --deep holds them to exact bytes there.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _build(folder)
    finally:
        torch.set_num_threads(threads)
    done.write_text(stamp)
    return folder


def _build(folder: Path) -> None:
    import kvc
    from kvc.codec.profile import add_chain, add_mix, fit_profile
    from kvc.runtime.loading import load_model
    from tests.tiny_models import build_tiny_model

    models = {}
    for arch in ARCHS:
        path = folder / arch
        if not (path / "config.json").exists():
            with contextlib.redirect_stderr(io.StringIO()):
                build_tiny_model(arch, path)
        models[arch] = load_model(str(path), device="cpu")
    texts, fit = [TEXT, TEXT[::-1]], dict(tokens=64, sensitivity_tokens=40, continuation=8)
    profiles = {"llama": fit_profile(models["llama"], texts, **fit)}
    profiles["llama-mix"] = add_mix(profiles["llama"], models["llama"], texts, tokens=64)
    profiles["gemma3"] = fit_profile(models["gemma3"], texts, **fit)
    profiles["llama-chain"] = add_chain(profiles["llama-mix"], models["llama"], texts, tokens=64)
    ids = kvc.tokenize(models["llama"], TEXT)[:CONTEXT_TOKENS]  # its two most frequent tokens are fine ones
    profiles["llama-fine"] = profiles["llama"].with_fine_tokens(
        {"ids": sorted(sorted(set(ids), key=lambda i: (-ids.count(i), i))[:2]), "shift": 1})
    assert [profiles[n].version for n in ("llama", "llama-mix", "gemma3", "llama-chain")] == [2, 4, 3, 5]
    for name, profile in profiles.items():
        profile.save(folder / f"{name}.kvcp")
    for name, (arch, levels, embed) in FIXTURES.items():
        lm = models[arch]
        ids = kvc.tokenize(lm, TEXT)[:CONTEXT_TOKENS]
        profile = profiles[FIXTURE_PROFILES.get(name, "llama")]
        data = kvc.encode_tokens(
            lm, ids, levels=levels, chunk_tokens=CHUNK_TOKENS, profile=profile, embed_profile=embed
        )
        (folder / f"{name}.kvc").write_bytes(data)


def fixture_stamp() -> str:
    """What the fixtures depend on: a change of codec version or library rebuilds them."""
    from importlib.metadata import version

    from kvc.codec import cachegen, kvq

    libs = ",".join(f"{p}={version(p)}" for p in ("torch", "transformers", "constriction", "zstandard"))
    return f"{FIXTURE_VERSION};kvq={kvq.SEGMENT_VERSION};cachegen={cachegen.VERSION};{libs}"


def default_fixture_dir() -> Path:
    return Path(tempfile.gettempdir()) / f"{FIXTURE_VERSION}-{os.getuid()}"


def kv_digest(kv) -> str:
    import torch

    h = hashlib.sha256(json.dumps([kv.token_ids, kv.first_token, [la.start for la in kv.layers]]).encode())
    for layer in kv.layers:
        for t in (layer.key, layer.value):
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass
class Fixtures:
    folder: Path
    files: dict[str, bytes]
    profile: object  # the llama's version-2 profile: what a case is opened with, as a user's --profile
    models: dict[str, object]
    profiles: dict[str, object] = field(default_factory=dict)  # fixture name -> the profile it was encoded with
    genuine: set[str] = field(default_factory=set)  # digests of every genuine decode
    kv: dict[tuple[str, str], object] = field(default_factory=dict)  # (fixture, level) -> genuine ContextKV
    codecs: dict[tuple[str, str], object] = field(default_factory=dict)
    truth: dict[tuple, object] = field(default_factory=dict)  # (token ids, slice, weights) -> exact KV
    scratch: Path | None = None

    @classmethod
    def load(cls, folder: Path) -> Fixtures:
        import kvc
        from kvc.codec.profile import Profile
        from kvc.runtime.loading import load_model

        folder = build_fixtures(folder)
        fx = cls(
            folder=folder,
            files={name: (folder / f"{name}.kvc").read_bytes() for name in FIXTURES},
            profile=Profile.load(folder / "llama.kvcp"),
            models={arch: load_model(str(folder / arch), device="cpu") for arch in ARCHS},
        )
        loaded = {name: Profile.load(folder / f"{name}.kvcp") for name in {"llama", *FIXTURE_PROFILES.values()}}
        fx.profiles = {name: loaded[FIXTURE_PROFILES.get(name, "llama")] for name in FIXTURES}
        for name, data in fx.files.items():
            f = kvc.open(data, profile=fx.profile)
            fx.truth_for(f)
            for level in f.levels:
                kv = f.read(level)
                fx.kv[(name, level)] = kv
                fx.genuine.add(kv_digest(kv))
                codec = fx.codecs[(name, level)] = f._codec(level)
                if hasattr(codec, "bind_tokens"):  # a level with fine tokens encodes by the file's token ids
                    codec.bind_tokens(f.token_ids)
        fx.scratch = Path(tempfile.mkdtemp(prefix="kvc-fuzz-"))
        return fx

    def truth_for(self, f):
        """The model's exact KV for the tokens ``f`` declares, prefilled the way it says (cached)."""
        import kvc
        from kvc.api import check_token_ids
        from kvc.errors import KvcError

        try:
            check_token_ids(f.token_ids, self.model_for(f.model))
        except KvcError:
            return None  # ids the model does not have: no true KV exists
        slice_tokens = f.header.get("prefill", {}).get("slice_tokens", 512)
        key = (tuple(f.token_ids), slice_tokens, f.model.get("weights_sha256"))
        if key not in self.truth:
            if len(self.truth) > 64:
                self.truth.clear()
            self.truth[key] = kvc.prefill(self.model_for(f.model), list(f.token_ids), slice_tokens)
        return self.truth[key]

    def model_for(self, identity: dict):
        from kvc.runtime.identity import model_identity

        for lm in self.models.values():
            if model_identity(lm).get("weights_sha256") == identity.get("weights_sha256"):
                return lm
        return self.models["llama"]

    @property
    def vocab(self) -> int:
        return len(self.models["llama"].tokenizer)


# ---------------------------------------------------------------- the file as parts


@dataclass
class Parts:
    version: tuple[int, int]
    header: dict
    payloads: dict[tuple[int, str], list[bytes]]  # (chunk index, level) -> segments
    attachments: dict[str, bytes]


def split(data: bytes) -> Parts:
    _, major, minor, hlen = struct.unpack_from("<8sHHI", data, 0)
    header = json.loads(data[16 : 16 + hlen])
    base = 48 + hlen
    payloads = {}
    for c, chunk in enumerate(header["chunks"]):
        for enc in chunk["encodings"]:
            blob = data[base + enc["offset"] : base + enc["offset"] + enc["length"]]
            segs, pos = [], 0
            for n in enc["segments"]:
                segs.append(blob[pos : pos + n])
                pos += n
            payloads[(c, enc["level"])] = segs
    attachments = {
        a["name"]: data[base + a["offset"] : base + a["offset"] + a["length"]] for a in header.get("attachments", [])
    }
    return Parts((major, minor), header, payloads, attachments)


def index(parts: Parts) -> tuple[dict, bytes]:
    """A header whose index (offsets, lengths, checksums, segment lengths, attachments, data_length)
    matches the parts, and the data section."""
    from kvc.formats.digests import payload_digests

    header = copy.deepcopy(parts.header)
    data = bytearray()
    for c, chunk in enumerate(header["chunks"]):
        for enc in chunk["encodings"]:
            segs = parts.payloads.get((c, enc["level"]), [])
            blob = b"".join(segs)
            enc.update(offset=len(data), length=len(blob), **payload_digests(blob), segments=[len(s) for s in segs])
            data += blob
    atts = []
    for name, blob in parts.attachments.items():
        atts.append({"name": name, "offset": len(data), "length": len(blob), "sha256": sha(blob)})
        data += blob
    header.pop("attachments", None)
    if atts:
        header["attachments"] = atts
    header["data_length"] = len(data)
    return header, bytes(data)


class RawText:
    """Sentinel strings replaced by raw JSON text after json.dumps: NaN literals, deep nesting, huge
    numbers written as text, duplicate keys."""

    _TOKEN = re.compile(r'"@@(raw|key)#(\d+)"')

    def __init__(self):
        self.texts: list[str] = []

    def raw(self, text: str) -> str:
        self.texts.append(text)
        return f"@@raw#{len(self.texts) - 1}"

    def key(self, name: str) -> str:
        self.texts.append(json.dumps(name))
        return f"@@key#{len(self.texts) - 1}"

    def expand(self, text: str) -> str:
        return self._TOKEN.sub(lambda m: self.texts[int(m.group(2))], text)


def serialize(header, data: bytes, raw: RawText | None = None, version=(1, 0), edits=()) -> bytes:
    text = json.dumps(header, separators=(",", ":"), allow_nan=True)
    if raw is not None:
        text = raw.expand(text)
    body = text.encode("utf-8", "surrogatepass")
    for edit in edits:
        body = edit(body)
    head = struct.pack("<8sHHI", MAGIC, version[0], version[1], len(body)) + body
    return head + hashlib.sha256(head).digest() + data


# ---------------------------------------------------------------- JSON mutations (headers, profiles)


class JsonMutator:
    """Structural mutations of a JSON document: type swaps, huge/negative/non-finite numbers, deep
    nesting, missing keys, duplicated entries and keys, swapped and copied subtrees."""

    def __init__(self, rng: random.Random, raw: RawText):
        self.rng, self.raw = rng, raw

    def deep(self):
        n = self.rng.choice([31, 33, 64, 500, 999, 1001, 5000, 100000])
        if self.rng.random() < 0.5:
            return self.raw.raw("[" * n + "0" + "]" * n)
        return self.raw.raw('{"a":' * n + "0" + "}" * n)

    def hostile(self, old, root=None):
        r = self.rng
        options = [
            lambda: None,
            lambda: r.choice([True, False]),
            lambda: r.choice([0, -1, 1, 2, 3, 7, 255, 256, 65535, 65536, 1 << 24]),
            lambda: r.choice([2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, -(2**63), 2**64, 10**30, -(10**30)]),
            lambda: self.raw.raw(r.choice(["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "-0", "1E400"])),
            lambda: self.raw.raw("9" * r.choice([19, 20, 25, 400, 5000])),
            lambda: r.choice([0.5, -0.0, 1e308, 5e-324, 1.0, 2.0**31, 1e-6, 1e6, -1.5]),
            lambda: r.choice(["", "x", "lossless", "kvq", "cachegen", "float64", "float16", "int8", "profile"]),
            lambda: r.choice(["0" * 64, "F" * 64, "a" * r.choice([100, 10000, 300000]), "\x00", "\ud800", "a\nb"]),
            lambda: r.choice(["é", "../../etc/passwd", "NaN", "\u202e", "1", "null"]),
            lambda: [],
            lambda: {},
            lambda: [copy.deepcopy(old)],
            lambda: {"x": copy.deepcopy(old)},
            lambda: self.deep(),
            lambda: [0] * r.choice([10, 1000, 100000]),
            lambda: [r.randrange(-5, 1 << 33) for _ in range(r.choice([1, 3, 64]))],
        ]
        if root is not None:
            options.append(lambda: copy.deepcopy(self.any_node(root)))
        return r.choice(options)()

    def nudge(self, old):
        r = self.rng
        if type(old) not in (int, float):
            return self.hostile(old)
        cands = [old + 1, old - 1, old * 2, -old, 0, old * 1024, old + 2**31, old * 10**6, float(old) + 0.5]
        if type(old) is int:
            cands += [old // 2, old + 2**32, 2**63 - 1 - old]
        return r.choice(cands)

    def any_node(self, root):
        node = root
        for _ in range(self.rng.randrange(1, 6)):
            if isinstance(node, dict) and node:
                node = node[self.rng.choice(list(node))]
            elif isinstance(node, list) and node:
                node = self.rng.choice(node)
            else:
                break
        return node

    def target(self, root, weights: dict[str, float] | None = None):
        """A (container, key) somewhere in ``root``; key None for an empty container."""
        node = root
        first = True
        while True:
            keys = list(node) if isinstance(node, dict) else list(range(len(node)))
            if not keys:
                return node, None
            if first and weights and isinstance(node, dict):
                w = [weights.get(k, 0.3) for k in keys]
                k = self.rng.choices(keys, w)[0]
            else:
                k = self.rng.choice(keys)
            first = False
            child = node[k]
            if isinstance(child, (dict, list)) and child and self.rng.random() < 0.7:
                node = child
                continue
            return node, k

    def mutate(self, root, weights=None) -> str:
        parent, key = self.target(root, weights)
        r = self.rng
        op = r.choices(
            ["replace", "nudge", "delete", "duplicate", "insert", "swap", "retype", "deep", "copy"],
            [40, 20, 8, 8, 5, 7, 4, 4, 4],
        )[0]
        if key is None:
            op = "insert"
        if op == "replace":
            parent[key] = self.hostile(parent[key], root)
        elif op == "nudge":
            parent[key] = self.nudge(parent[key])
        elif op == "delete":
            del parent[key]
        elif op == "duplicate":
            if isinstance(parent, list):
                parent.insert(r.randrange(len(parent) + 1), copy.deepcopy(parent[key]))
            else:
                parent[self.raw.key(key)] = copy.deepcopy(parent[key]) if r.random() < 0.5 else self.hostile(None)
        elif op == "insert":
            value = self.hostile(None, root)
            if isinstance(parent, list):
                parent.insert(r.randrange(len(parent) + 1), value)
            else:
                parent[r.choice(["extra", "level", "codec", "params", "profile", "x" * 40, ""])] = value
        elif op == "swap":
            keys = list(parent) if isinstance(parent, dict) else list(range(len(parent)))
            other = r.choice(keys)
            parent[key], parent[other] = parent[other], parent[key]
        elif op == "retype":
            old = parent[key]
            if isinstance(old, list):
                parent[key] = {str(i): v for i, v in enumerate(old)}
            elif isinstance(old, dict):
                parent[key] = list(old.values())
            else:
                parent[key] = [old] if r.random() < 0.5 else str(old)
        elif op == "deep":
            parent[key] = self.deep()
        else:
            parent[key] = copy.deepcopy(self.any_node(root))
        return op


HEADER_WEIGHTS = {
    "chunks": 3,
    "levels": 2,
    "layout": 2,
    "context": 2,
    "attachments": 1,
    "model": 1,
    "prefill": 0.5,
    "dtype": 1,
    "data_length": 0.5,
    "chunk_tokens": 0.7,
    "created_by": 0.2,
}


# ---------------------------------------------------------------- zstd and payload forgeries


def zstd_frame(
    content: int,
    blocks: list[tuple[int, int, bytes]],
    single: bool = True,
    fcs_bytes: int = 8,
    window_log: int = 20,
    checksum: bool = False,
    dict_id: bool = False,
    reserved: bool = False,
) -> bytes:
    """A zstd frame built by hand: ``blocks`` are (type 0 raw | 1 rle | 2 compressed | 3 reserved,
    size field, body); the last block gets the last-block bit."""
    fcs_flag = {0: 0, 1: 0, 2: 1, 4: 2, 8: 3}[fcs_bytes]
    fhd = (fcs_flag << 6) | (int(single) << 5) | (int(reserved) << 3) | (int(checksum) << 2) | int(dict_id)
    out = bytearray(b"\x28\xb5\x2f\xfd") + bytes([fhd])
    if not single:
        out.append((max(0, window_log - 10) & 31) << 3)
    if dict_id:
        out.append(7)
    if fcs_bytes == 2:
        out += struct.pack("<H", max(0, content - 256) & 0xFFFF)
    elif fcs_bytes:
        out += (content & ((1 << (8 * fcs_bytes)) - 1)).to_bytes(fcs_bytes, "little")
    for i, (kind, size, body) in enumerate(blocks):
        last = i == len(blocks) - 1
        out += ((size << 3) | (kind << 1) | int(last)).to_bytes(3, "little") + body
    if checksum:
        out += b"\0\0\0\0"
    return bytes(out)


def rle_frame(content: int, byte: int = 0) -> bytes:
    """A valid frame of ``content`` bytes all equal to ``byte``: ~4 bytes per 128 KiB (zstd's densest)."""
    blocks = []
    left = content
    while left > 0:
        n = min(left, 128 << 10)
        blocks.append((1, n, bytes([byte])))
        left -= n
    return zstd_frame(content, blocks or [(0, 0, b"")])


def hostile_zstd(rng: random.Random, expected: int) -> bytes:
    """A zstd frame for a segment meant to hold ``expected`` bytes: often valid but different data,
    often lying about its size, its window, its blocks or what follows it."""
    import zstandard

    size = rng.choice([expected, expected, expected + 1, max(0, expected - 1), 1 << 35, 2**64 - 1, 0, 1 << 20])
    kind = rng.randrange(12)
    if kind == 0:
        return rle_frame(expected, rng.randrange(256))
    if kind == 1:  # a genuine frame of other (random) content of the right size
        return zstandard.ZstdCompressor(level=1, write_content_size=True).compress(rng.randbytes(expected))
    if kind == 2:  # claims a huge size, holds a few blocks
        return zstd_frame(size, [(1, 1 << 17, b"\0")] * rng.randrange(1, 4), fcs_bytes=8)
    if kind == 3:  # no content size
        return zstd_frame(expected, [(0, 4, b"abcd")], single=False, fcs_bytes=0)
    if kind == 4:  # window too large for anyone
        return zstd_frame(
            expected, [(1, min(expected, 1 << 17), b"\0")], single=False, window_log=rng.choice([28, 31, 41])
        )
    if kind == 5:  # reserved block type, or a block larger than allowed
        return zstd_frame(expected, [(rng.choice([3, 1, 0]), rng.choice([1 << 18, (1 << 21) - 1, 5]), b"\0" * 5)])
    if kind == 6:  # never sets the last-block bit (truncated)
        return rle_frame(expected)[:-1] if expected else b"\x28\xb5\x2f\xfd"
    if kind == 7:  # a second frame, a skippable frame, trailing garbage
        frame = rle_frame(expected)
        extra = rng.choice([frame, b"\x50\x2a\x4d\x18\x04\x00\x00\x00abcd", rng.randbytes(7)])
        return frame + extra if rng.random() < 0.7 else extra + frame
    if kind == 8:  # checksum flag with a wrong checksum, or a dictionary id
        blocks = [(1, expected, b"\0")] if expected <= 1 << 17 else [(1, 1 << 17, b"\0")]
        return zstd_frame(expected, blocks, checksum=rng.random() < 0.5, dict_id=rng.random() < 0.5)
    if kind == 9:  # a compressed block of garbage
        return zstd_frame(expected, [(2, 64, rng.randbytes(64))])
    if kind == 10:  # 2-byte / 4-byte size fields and reserved bits
        return zstd_frame(size, [(1, min(max(size, 1), 1 << 17), b"\0")], fcs_bytes=rng.choice([2, 4]), reserved=True)
    return zstd_frame(size, [(0, min(64, max(size, 0)), rng.randbytes(min(64, max(size, 0))))])


U32_EXTREMES = [0, 1, 2, 3, 4, 255, 65535, 1 << 20, (1 << 31) - 1, 1 << 31, (1 << 32) - 1]


def codec_of(header: dict, level: str) -> str:
    entry = header.get("levels", {}).get(level, {})
    return entry.get("codec") if isinstance(entry, dict) else None


def segment_shape(header: dict, c: int, s: int) -> tuple[int, int, int, int]:
    """(heads, count, dim, absolute start) of segment ``s`` in chunk ``c``."""
    spec = header["layout"]["layers"][s // 2]
    chunk = header["chunks"][c]
    lo = max(chunk["start"], spec["start"])
    return spec["kv_heads"], max(0, chunk["end"] - lo), spec["value_dim"] if s % 2 else spec["key_dim"], lo


def u32_fields(codec: str, seg: bytes, shape) -> list[int]:
    """Offsets of the u32 length fields of a segment, as far as the layout (CODEC.md) can be followed;
    an empty list when it cannot (the generic mutations then do the work)."""
    H, T, D, start = shape
    try:
        if codec == "cachegen":
            pos = 3 + 2 * T
            tlen = struct.unpack_from("<I", seg, pos)[0]
            na = struct.unpack_from("<I", seg, pos + 4 + tlen)[0]
            return [pos, pos + 4 + tlen, pos + 8 + tlen + 4 * na]
        if codec == "kvq" and seg[0] == 1:
            pos = 4
            n_sink = max(0, min(T, 4 - start))
            if n_sink:
                pos = 5 + H * n_sink * D * (2 if seg[4] == 0 else 4)
            if n_sink == T:
                return []
            pos += (H * D + 7) // 8
            n_esc = struct.unpack_from("<I", seg, pos)[0]
            return [pos, pos + 4 + 4 * n_esc]
    except (struct.error, IndexError):
        return []
    return []


def forge_cachegen_tables(rng: random.Random, seg: bytes, shape) -> bytes:
    """Decompress a cachegen segment's tables, forge them (lo, K, counts, channel count, trailing bytes),
    recompress and fix the length field: the tables decode, the data they describe is wrong."""
    import zstandard

    H, T, D, _ = shape
    pos = 3 + 2 * T
    tlen = struct.unpack_from("<I", seg, pos)[0]
    tables = bytearray(zstandard.ZstdDecompressor().decompress(seg[pos + 4 : pos + 4 + tlen]))
    body = 4
    op = rng.randrange(6)
    if op == 0 and len(tables) > body + 6:  # lo of a channel
        struct.pack_into("<i", tables, body, rng.choice([-(2**31), 2**31 - 1, -1, 1 << 20]))
    elif op == 1 and len(tables) > body + 6:  # K of a channel
        struct.pack_into("<H", tables, body + 4, rng.choice([0, 1, 65535, 2]))
    elif op == 2:  # zero all counts
        tables[body:] = bytes(len(tables) - body)
    elif op == 3:  # drop or add bytes at the end
        tables = tables[: rng.randrange(len(tables) + 1)] if rng.random() < 0.5 else tables + rng.randbytes(8)
    elif op == 4:  # anchor-table length
        struct.pack_into("<I", tables, 0, rng.choice(U32_EXTREMES))
    else:
        i = rng.randrange(len(tables))
        tables[i] ^= 1 << rng.randrange(8)
    packed = zstandard.ZstdCompressor(level=1).compress(bytes(tables))
    return seg[:pos] + struct.pack("<I", len(packed)) + packed + seg[pos + 4 + tlen :]


def reencoded(rng: random.Random, fx: Fixtures, fixture: str, level: str, header: dict, c: int, s: int):
    """A valid encoding, by the level's own codec, of the genuine segment slightly changed: decodes fine,
    to data that is not the file's (verify --deep must say so)."""
    import torch

    from kvc.codec.base import Segment

    kv = fx.kv.get((fixture, level))
    codec = fx.codecs.get((fixture, level))
    if kv is None or codec is None:
        return None
    H, T, D, lo = segment_shape(header, c, s)
    layer = kv.layers[s // 2]
    tensor = layer.value if s % 2 else layer.key
    piece = tensor[:, lo - layer.start : lo - layer.start + T].clone()
    if piece.numel() == 0:
        return None
    flat = piece.view(-1)
    i = rng.randrange(flat.numel())
    mode = rng.randrange(3)
    if mode == 0:
        flat[i] += float(flat[i].abs()) * 2.0 ** -rng.randrange(1, 24) + 10.0 ** -rng.randrange(0, 8)
    elif mode == 1:
        flat[i] = rng.choice([0.0, 1e4, -1e4, float("nan"), float("inf")])
    else:
        piece += torch.randn(piece.shape, generator=torch.Generator().manual_seed(rng.randrange(1 << 30))) * 0.1
    seg = Segment(layer=s // 2, kind="value" if s % 2 else "key", start=lo, shape=(H, T, D), dtype=piece.dtype)
    chain = codec.new_chain() if hasattr(codec, "new_chain") else None
    if chain is None:
        return codec.encode(piece.contiguous(), seg)
    for before in range(s - s % 2):  # a chained level: the chunk's layers before it, genuine, into this encode's state
        h, t, d, at = segment_shape(header, c, before)
        prev = kv.layers[before // 2]
        x = (prev.value if before % 2 else prev.key)[:, at - prev.start : at - prev.start + t].contiguous()
        codec.encode(x, Segment(before // 2, "value" if before % 2 else "key", at, (h, t, d), x.dtype), chain=chain)
    return codec.encode(piece.contiguous(), seg, chain=chain)


def mutate_bytes(rng: random.Random, seg: bytes, others: list[bytes]) -> bytes:
    b = bytearray(seg)
    op = rng.randrange(11)
    if op == 0 and b:
        for _ in range(rng.randrange(1, 9)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
    elif op == 1 and b:
        for _ in range(rng.randrange(1, 5)):
            b[rng.randrange(len(b))] = rng.choice([0, 255, rng.randrange(256)])
    elif op == 2:
        i = rng.randrange(len(b) + 1)
        b[i:i] = rng.randbytes(rng.choice([1, 4, 64]))
    elif op == 3 and b:
        i = rng.randrange(len(b))
        del b[i : i + rng.choice([1, 4, 64])]
    elif op == 4:
        b = b[: rng.randrange(len(b) + 1)]
    elif op == 5:
        b += rng.choice([bytes(rng.choice([1, 4, 4096])), rng.randbytes(rng.choice([1, 4, 100]))])
    elif op == 6:
        b = bytearray()
    elif op == 7:
        b = bytearray(rng.randbytes(rng.randrange(0, 2 * len(b) + 16)))
    elif op == 8 and others:
        src = rng.choice(others)
        b = bytearray(src) if rng.random() < 0.5 else b[: len(b) // 2] + src[len(src) // 2 :]
    elif op == 9 and len(b) >= 4:  # a u32 somewhere
        i = rng.randrange(len(b) - 3)
        struct.pack_into("<I", b, i, rng.choice(U32_EXTREMES))
    else:  # the tail (where entropy-coded words live) replaced
        cut = rng.randrange(len(b) + 1)
        b = b[:cut] + bytearray(
            rng.choice([bytes(len(b) - cut), b"\xff" * (len(b) - cut), rng.randbytes(len(b) - cut)])
        )
    return bytes(b)


# ---------------------------------------------------------------- case families


@dataclass
class Case:
    seed: int
    family: str
    fixture: str
    what: str
    data: bytes
    forged_payload: bool = False


def forge_payload(rng: random.Random, parts: Parts, fx: Fixtures, fixture: str) -> str:
    """One payload forgery on a random segment of a random encoding (or on every segment of one)."""
    keys = [k for k, segs in parts.payloads.items() if any(segs)]
    c, level = rng.choice(keys)
    segs = parts.payloads[(c, level)]
    s = rng.choice([i for i, seg in enumerate(segs) if seg])
    codec = codec_of(parts.header, level)
    shape = segment_shape(parts.header, c, s)
    seg = segs[s]
    others = [x for segs2 in parts.payloads.values() for x in segs2 if x]
    ops = ["bytes", "bytes", "swap", "fields", "reencode", "reencode"]
    if codec == "lossless":
        ops += ["zstd", "zstd", "zstd"]
    if codec == "cachegen":
        ops += ["tables", "tables"]
    op = rng.choice(ops)
    if op == "swap":
        t = rng.choice(others)
        segs[s] = t
    elif op == "fields":
        fields = u32_fields(codec, seg, shape)
        if fields:
            b = bytearray(seg)
            struct.pack_into("<I", b, rng.choice(fields), rng.choice(U32_EXTREMES + [len(seg) // 4, len(seg)]))
            segs[s] = bytes(b)
        else:
            segs[s] = mutate_bytes(rng, seg, others)
    elif op == "reencode":
        new = reencoded(rng, fx, fixture, level, parts.header, c, s)
        segs[s] = new if new is not None else mutate_bytes(rng, seg, others)
    elif op == "zstd":
        H, T, D, _ = shape
        itemsize = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}[parts.header["dtype"]]
        segs[s] = hostile_zstd(rng, H * T * D * itemsize)
    elif op == "tables":
        try:
            segs[s] = forge_cachegen_tables(rng, seg, shape)
        except Exception:
            segs[s] = mutate_bytes(rng, seg, others)
    else:
        segs[s] = mutate_bytes(rng, seg, others)
    return f"{op} chunk {c} {level} segment {s}"


def forge_smart_header(rng: random.Random, header: dict, fx: Fixtures, raw: RawText) -> str:
    """Mutations that keep the header plausible, so forged values reach the decoders."""
    layers = header["layout"]["layers"]
    chunks = header["chunks"]
    kind = rng.randrange(8)
    if kind == 0:  # shapes and windows
        spec = rng.choice(layers)
        key = rng.choice(["kv_heads", "key_dim", "value_dim", "start"])
        spec[key] = rng.choice([1, 2, 3, 4, 15, 16, 17, 64, 1024, 4096, 1025, 4097, 0, -1, spec[key] + 1])
        return f"layout {key}={spec[key]}"
    if kind == 1:  # dtype
        header["dtype"] = rng.choice(["float64", "float16", "bfloat16", "float32", "int8", "float8"])
        return f"dtype {header['dtype']}"
    if kind == 2:  # token ids
        ids = header["context"]["token_ids"]
        i = rng.randrange(len(ids))
        ids[i] = rng.choice([fx.vocab - 1, fx.vocab, fx.vocab + 1, 49151, 2**31 - 1, 2**31, -1, 0])
        if rng.random() < 0.2:
            ids.append(ids[-1])
            header["context"]["num_tokens"] = len(ids) + rng.choice([0, 0, -1])
        return f"token id {ids[i]}"
    if kind == 3:  # level parameters and codecs
        name = rng.choice(list(header["levels"]))
        entry = header["levels"][name]
        params = entry.setdefault("params", {})
        what = rng.randrange(6)
        if what == 0:
            entry["codec"] = rng.choice(["lossless", "kvq", "cachegen", "kvq2", "zstd"])
        elif what == 1:
            params["scale"] = rng.choice([1e-6, 1e-3, 0.01, 0.22, 2.5, 1e6, 0, -1, "0.5", [0.5], 1e-7])
        elif what == 2:
            params[rng.choice(["group", "anchor_bits"])] = rng.choice([0, 1, 2, 16, 17, 4096, 4097, 10**9, 2.5])
        elif what == 3:
            bits = params.get("delta_bits") if isinstance(params.get("delta_bits"), list) else [6, 5, 4]
            params["delta_bits"] = rng.choice([bits[:1], bits + bits, [1] * len(bits), [17] * len(bits), [], None])
        elif what == 4:
            value = rng.choice([None, "0" * 64, sha(b"x"), fx.profile.sha256])
            entry["profile"] = value
            if rng.random() < 0.5:
                params["profile"] = value
        else:
            params[rng.choice(["transform", "zstd_level"])] = rng.choice(["none", "xor", -8, 23, 22, -7, "3"])
        return f"level {name} {what}"
    if kind == 4:  # an encoding pointed at another payload (with that payload's checksum): valid index
        src = rng.choice([e for ch in chunks for e in ch["encodings"]])
        dst = rng.choice(rng.choice(chunks)["encodings"])
        for key in rng.choice([("offset", "length", "sha256", "xxh3_128", "segments"),
                               ("offset", "length", "sha256", "xxh3_128")]):
            if key in src:
                dst[key] = copy.deepcopy(src[key])
        return "encoding points at another payload"
    if kind == 5:  # chunk boundaries
        c = rng.randrange(len(chunks))
        op = rng.randrange(4)
        if op == 0:
            chunks[c]["end"] += rng.choice([-1, 1])
            if c + 1 < len(chunks):
                chunks[c + 1]["start"] = chunks[c]["end"]
        elif op == 1 and len(chunks) > 1:
            chunks.pop(c)
        elif op == 2:
            chunks.insert(c, copy.deepcopy(chunks[c]))
        else:
            header["chunk_tokens"] = rng.choice([1, 8, 15, 65536, 65537, 0])
        return f"chunks {op}"
    if kind == 6:  # attachments
        atts = header.setdefault("attachments", [])
        op = rng.randrange(4)
        if op == 0 and atts:
            atts.append(copy.deepcopy(atts[0]))
        elif op == 1:
            enc = chunks[0]["encodings"][0]
            atts.append({"name": "profile", "offset": enc["offset"], "length": enc["length"], "sha256": enc["sha256"]})
        elif op == 2 and atts:
            atts[0]["name"] = rng.choice(["profile ", "Profile", "", "x" * 100])
        else:
            header["attachments"] = rng.choice([None, 5, {}, [None], "profile"])
        return f"attachments {op}"
    # layers added or removed (segment lists left as they are, or padded)
    if rng.random() < 0.5 and len(layers) > 1:
        layers.pop()
    else:
        layers.append(copy.deepcopy(layers[-1]))
    if rng.random() < 0.5:
        for ch in chunks:
            for e in ch["encodings"]:
                e["segments"] = (e["segments"] + [0, 0])[: 2 * len(layers)]
    return f"{len(layers)} layers"


def forge_bomb(rng: random.Random, parts: Parts, cap: int) -> str:
    """A valid lossless file whose layout and zstd frames claim a large output (the "33 KB file that
    decodes to 1 GiB"): the frames are genuine RLE frames, so only the limit stops it."""
    h = parts.header
    keep = [name for name, e in h["levels"].items() if e.get("codec") == "lossless"]
    if not keep:
        return "no lossless level"
    h["levels"] = {name: h["levels"][name] for name in keep}
    dtype = rng.choice(["float32", "float16", "bfloat16", "float64"])
    h["dtype"] = dtype
    itemsize = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}[dtype]
    T = h["context"]["num_tokens"]
    target = int(2 ** rng.uniform(10, math.log2(4 * cap)))
    L = rng.choice([1, 2, 3])
    per = max(1, target // (2 * L * T * itemsize))  # heads × dim per layer
    heads = min(1024, max(1, 2 ** rng.randrange(0, 11)))
    dim = max(1, min(4096, per // heads))
    h["layout"]["layers"] = [{"kv_heads": heads, "key_dim": dim, "value_dim": dim, "start": 0} for _ in range(L)]
    byte = rng.choice([0, 0x3C, rng.randrange(256)])
    for c, chunk in enumerate(h["chunks"]):
        chunk["encodings"] = [e for e in chunk["encodings"] if e["level"] in keep]
        count = chunk["end"] - chunk["start"]
        for e in chunk["encodings"]:
            parts.payloads[(c, e["level"])] = [rle_frame(heads * count * dim * itemsize, byte) for _ in range(2 * L)]
    return f"{L}x[{heads},{T},{dim}] {dtype} ≈ {2 * L * heads * T * dim * itemsize >> 10} KiB"


def forge_profile(rng: random.Random, parts: Parts, fx: Fixtures, raw: RawText, fixture: str) -> str:
    """An embedded profile forged (its own digest recomputed) and named by the kvq levels' hash, or
    left unnamed (it must then never be parsed)."""
    import numpy as np

    from kvc.codec.profile import Profile

    h = parts.header
    kvq = [name for name, e in h["levels"].items() if e.get("codec") == "kvq"]
    own = fx.profiles[fixture]  # version 2, 3 (layer_theta) or 4 (mix), as the fixture was encoded
    genuine = own.to_bytes()
    kind = rng.randrange(5)
    what = ""
    if kind == 0:  # the header JSON, structurally
        body = genuine[:-32]
        hlen = struct.unpack_from("<I", body, 12)[0]
        doc = json.loads(body[16 : 16 + hlen])
        mut = JsonMutator(rng, raw)
        weights = {"layers": 2, "heads": 2, "key_dim": 2, "value_dim": 2, "sinks": 2, "tensors": 3, "rotary": 1}
        ops = [mut.mutate(doc, weights) for _ in range(rng.randrange(1, 3))]
        if rng.random() < 0.1:
            doc = rng.choice([[doc], "profile", 1, None])
        text = raw.expand(json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=True)).encode(
            "utf-8", "surrogatepass"
        )
        body = body[:12] + struct.pack("<I", len(text)) + text + body[16 + hlen :]
        blob = body + hashlib.sha256(body).digest()
        what = "header " + ",".join(ops)
    elif kind == 1:  # values: huge sigma (tables explode), tiny or bad steps, NaN
        arrays = {k: v.copy() for k, v in own.arrays.items()}
        name = rng.choice([n for n in ("sigma", "base_step", "mean", "basis", "cdf", "step", "mix", "mix")
                           if n in arrays])  # fmt: skip
        arrays[name].reshape(-1)[rng.randrange(arrays[name].size)] = rng.choice([1e30, 1e-30, 0.0, -1.0, np.nan, 1e6])
        if rng.random() < 0.5:
            arrays["sigma"] *= rng.choice([1e3, 1e6])
        prof = Profile(**{**_profile_fields(own), "arrays": arrays})
        blob = prof.to_bytes()
        what = f"values {name}"
    elif kind == 2:  # a valid profile of another (larger) shape, and the file's layout forged to match it
        heads = rng.choice([1, 2, 8, 64])
        dim = rng.choice([2, 16, 64, 128])
        L = rng.choice([1, own.layers])
        prof = _shaped_profile(own, L, heads, dim, sigma=rng.choice([1.0, 1e3, 1e6]))
        blob = prof.to_bytes()
        h["layout"]["layers"] = [{"kv_heads": heads, "key_dim": dim, "value_dim": dim, "start": 0} for _ in range(L)]
        for c, chunk in enumerate(h["chunks"]):
            for e in chunk["encodings"]:
                segs = parts.payloads[(c, e["level"])]
                parts.payloads[(c, e["level"])] = (segs * L)[: 2 * L]
        what = f"shaped {L}x{heads}x{dim}"
    elif kind == 3:  # raw bytes of the profile file (digest left wrong, or recomputed)
        b = bytearray(genuine)
        for _ in range(rng.randrange(1, 6)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        if rng.random() < 0.7:
            b[-32:] = hashlib.sha256(bytes(b[:-32])).digest()
        blob = bytes(b)
        what = "bytes"
    else:  # something else entirely
        blob = rng.choice([b"", b"KVCPROF\x00", rng.randbytes(100), genuine[:100], genuine + b"x"])
        what = "garbage"
    parts.attachments["profile"] = blob
    if kvq and rng.random() < 0.85:
        wanted = sha(blob)
        for name in kvq:
            h["levels"][name]["profile"] = wanted
            if isinstance(h["levels"][name].get("params"), dict):
                h["levels"][name]["params"]["profile"] = wanted
    else:
        what += " (not named)"
    return what


def _profile_fields(p) -> dict:
    return dict(
        identity=p.identity,
        layers=p.layers,
        heads=p.heads,
        key_dim=p.key_dim,
        value_dim=p.value_dim,
        rotary=p.rotary,
        sinks=p.sinks,
        fit=p.fit,
    )


def _shaped_profile(p, layers: int, heads: int, dim: int, sigma: float):
    import numpy as np

    from kvc.codec.profile import GRID, Profile

    arrays = {
        "mean": np.zeros((layers, 2, heads, dim), np.float32),
        "basis": np.broadcast_to(np.eye(dim, dtype=np.float16), (layers, 2, heads, dim, dim)).copy(),
        "sigma": np.full((layers, 2, heads, dim), sigma, np.float32),
        "cdf": np.broadcast_to(p.arrays["cdf"][:1, :1], (layers, 2, GRID[2])).copy(),
        "base_step": np.ones((layers, 2, heads), np.float32),
        "sensitivity": np.ones((layers, 2, heads), np.float32),
    }
    rotary = {"theta": 10000.0, "dim": dim} if p.rotary else None
    fields = {**_profile_fields(p), "layers": layers, "heads": heads, "key_dim": dim, "value_dim": dim}
    return Profile(**{**fields, "rotary": rotary, "arrays": arrays})


def forge_container(rng: random.Random, header: dict, data: bytes, raw: RawText) -> tuple[bytes, str]:
    op = rng.randrange(7)
    genuine = serialize(header, data)
    if op == 0:
        version = rng.choice([(0, 0), (2, 0), (65535, 0), (1, 65535), (1, 1)])
        return serialize(header, data, version=version), f"version {version}"
    if op == 1:  # header length field (digest then covers the wrong bytes)
        b = bytearray(genuine)
        struct.pack_into("<I", b, 12, rng.choice([0, 1, len(genuine), (64 << 20) + 1, (1 << 32) - 1]))
        return bytes(b), "header length"
    if op == 2:
        return genuine[: rng.randrange(len(genuine))], "truncated"
    if op == 3:
        return genuine + rng.randbytes(rng.choice([1, 32, 4096])), "trailing bytes"
    if op == 4:  # bytes of the header text (invalid UTF-8, broken JSON) with a recomputed digest

        def edit(body: bytes) -> bytes:
            b = bytearray(body)
            for _ in range(rng.randrange(1, 4)):
                b[rng.randrange(len(b))] = rng.choice([0xFF, 0xC3, 0x00, ord("{"), ord('"'), ord("]")])
            return bytes(b)

        return serialize(header, data, edits=[edit]), "header bytes"
    if op == 5:  # not an object at all
        doc = rng.choice([[], "kvc", 1, None, [header], {"kvc": header}])
        return serialize(doc, data), "header not an object"
    b = bytearray(genuine)
    b[rng.randrange(8)] ^= 1 << rng.randrange(8)
    return bytes(b), "magic"


def make_case(seed: int, fx: Fixtures, cap: int = DEFAULT_CAP) -> Case:
    rng = random.Random(seed)
    family = rng.choices(list(FAMILIES), list(FAMILIES.values()))[0]
    if family == "profile":
        fixture = rng.choice(["embedded", "embedded", "mixed", "mixed", "layer-theta", "layer-theta", "fine", "fine",
                              "chain", "chain", "balanced", "multi", "tiny", "high", "compact"])  # fmt: skip
    elif family == "bomb":
        fixture = rng.choice(["lossless", "multi", "sliding"])
    else:
        fixture = rng.choice(list(FIXTURES))
    parts = split(fx.files[fixture])
    raw = RawText()
    forged_payload = False
    what = ""
    if family in ("payload", "combo"):
        what = forge_payload(rng, parts, fx, fixture)
        forged_payload = True
    elif family == "bomb":
        what = forge_bomb(rng, parts, cap)
    elif family == "profile":
        what = forge_profile(rng, parts, fx, raw, fixture)
        forged_payload = True
    header, data = index(parts)
    if family in ("header", "combo"):
        mut = JsonMutator(rng, raw)
        what += " " + ",".join(mut.mutate(header, HEADER_WEIGHTS) for _ in range(1 + min(3, int(rng.expovariate(1.5)))))
    elif family == "smart-header":
        what = forge_smart_header(rng, header, fx, raw)
    if family == "container":
        out, what = forge_container(rng, header, data, raw)
    else:
        out = serialize(header, data, raw)
    return Case(seed, family, fixture, what.strip(), out, forged_payload)


# ---------------------------------------------------------------- running one case (worker side)


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM", "VmSize")):
                key, value = line.split(":")
                out[key] = int(value.split()[0]) * 1024
    return out


_LIBC = None


def _trim() -> None:
    global _LIBC
    gc.collect()
    try:
        _LIBC = _LIBC or ctypes.CDLL("libc.so.6")
        _LIBC.malloc_trim(0)
    except OSError:
        pass


_CLI = None


def _cli():
    """The `kvc` click command, built once (typer rebuilds it on every call otherwise)."""
    global _CLI
    if _CLI is None:
        import typer

        from kvc.cli.main import app

        _CLI = typer.main.get_command(app)
    return _CLI


def faithful(f, level: str, kv, truth) -> bool:
    """The oracle: is ``kv`` (level ``level`` of ``f``, decoded whole) exactly what the level's codec, as
    the file declares it, makes of the model's true KV, chunk by chunk? A forged header may declare other
    parameters (a scale, a profile) and still be faithful to them; forged data never is."""
    import torch

    from kvc.codec.base import Segment

    if kv.token_ids != truth.token_ids or len(kv.layers) != len(truth.layers):
        return False
    for got, ref in zip(kv.layers, truth.layers):
        if got.start != ref.start or got.key.shape != ref.key.shape or got.value.shape != ref.value.shape:
            return False
        if got.key.dtype != ref.key.dtype:
            return False
    codec = f._codec(level)
    if hasattr(codec, "bind_tokens"):
        codec.bind_tokens(truth.token_ids)
    chains = (codec.new_chain(), codec.new_chain()) if hasattr(codec, "new_chain") else (None, None)
    enc_extra, dec_extra = ({"chain": c} if c is not None else {} for c in chains)  # a chained level's own
    for chunk in f.header["chunks"]:
        for i, (got, ref) in enumerate(zip(kv.layers, truth.layers)):
            lo, hi = max(chunk["start"], ref.start), chunk["end"]
            for kind in ("key", "value") if hi > lo else ():
                piece = getattr(ref, kind)[:, lo - ref.start : hi - ref.start].contiguous()
                seg = Segment(layer=i, kind=kind, start=lo, shape=tuple(piece.shape), dtype=piece.dtype)
                expect = codec.decode(codec.encode(piece, seg, **enc_extra), seg, **dec_extra)
                stored = getattr(got, kind)[:, lo - got.start : hi - got.start].contiguous()
                if not torch.equal(expect.view(torch.uint8), stored.view(torch.uint8)):
                    return False
    return True


def execute(data: bytes, fx: Fixtures, cap: int, rng: random.Random) -> dict:
    """Everything a user could do with the file; KvcErrors are recorded, anything else propagates."""
    import kvc
    from kvc.errors import KvcError
    from kvc.safetensors_io import to_safetensors
    from kvc.verify import verify

    res = {"refusals": [], "decoded": 0, "differs": False, "verify": None, "output": 0, "unfaithful": None}

    def refused(stage: str, exc: KvcError) -> None:
        res["refusals"].append({"stage": stage, "error": type(exc).__name__, "code": exc.exit_code, "msg": str(exc)})

    path = fx.scratch / "case.kvc"
    path.write_bytes(data)
    for args in (["inspect", str(path)], ["inspect", str(path), "--json", "--layers", "--chunks"]):
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                _cli().main(args, standalone_mode=False)
        except KvcError as exc:
            refused("inspect", exc)
    try:
        f = kvc.open(data, profile=fx.profile, max_decoded_bytes=cap)
    except KvcError as exc:
        refused("open", exc)
        return res
    with f:
        first = True
        for level in f.levels:
            try:
                kv = f.read(level)
            except KvcError as exc:
                refused("read", exc)
                continue
            res["decoded"] += 1
            res["output"] += kv.nbytes()
            if kv_digest(kv) not in fx.genuine:
                res["differs"] = True
                if not res["unfaithful"]:
                    truth = fx.truth_for(f)
                    res["unfaithful"] = truth is None or not faithful(f, level, kv, truth)
            if first:
                to_safetensors(f, kv, level)
                first = False
            del kv
        if f.num_tokens > 1:
            a = rng.randrange(f.num_tokens - 1)
            b = rng.randrange(a + 1, f.num_tokens + 1)
            try:
                f.read(rng.choice(f.levels), (a, b))
            except KvcError as exc:
                refused("window", exc)
        if res["decoded"]:
            try:
                report = verify(f, deep=True, lm=fx.model_for(f.model))
                failed = [c for c in report["checks"] if not c["ok"]]
                res["verify"] = "ok" if not failed else ("6" if failed[0]["check"].startswith("deep") else "3")
                res["same_environment"] = report.get("same_environment")
            except KvcError as exc:
                refused("verify", exc)
                res["verify"] = str(exc.exit_code)
    return res


def run_case(seed: int, fx: Fixtures, cap: int, measure: bool = True) -> dict:
    case = make_case(seed, fx, cap)
    out = {
        "seed": seed,
        "family": case.family,
        "fixture": case.fixture,
        "what": case.what[:200],
        "bytes": len(case.data),
        "forged_payload": case.forged_payload,
        "failure": None,
    }
    if measure:
        _trim()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status()
        budget = 4 * (len(case.data) + 4 * cap) + SLACK + 512 * MB
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (before["VmSize"] + budget, hard))
    t0 = time.perf_counter()
    try:
        res = execute(case.data, fx, cap, random.Random(seed ^ 0x5EED))
    except MemoryError:
        res = {"output": 0}
        out["failure"] = "MemoryError: an allocation above the bound"
    except Exception as exc:  # a bug: report where
        frames = [fr for fr in traceback.extract_tb(exc.__traceback__) if "/site-packages/" not in fr.filename]
        where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
        res = {"output": 0}
        out["failure"] = f"{type(exc).__name__} at {where}: {str(exc)[:200]}"
    finally:
        if measure:
            resource.setrlimit(resource.RLIMIT_AS, (hard, hard))
    out["seconds"] = round(time.perf_counter() - t0, 4)
    out.update({k: v for k, v in res.items() if k != "refusals"})
    refusals = res.get("refusals", [])
    out["refused"] = refusals[0]["error"] if refusals else None
    out["code"] = refusals[0]["code"] if refusals else 0
    bad = [r for r in refusals if "\n" in r["msg"] or "\r" in r["msg"]]
    if bad and out["failure"] is None:
        out["failure"] = f"multi-line error message from {bad[0]['error']}: {bad[0]['msg'][:120]!r}"
    if out.get("verify") == "ok" and out.get("unfaithful") and out["failure"] is None:
        if out.get("same_environment") is False:
            out["other_env"] = True  # the header claims another device/torch: verify's tolerance applies
        else:
            out["failure"] = "forged data passed verify --deep"
    out["bound"] = 4 * (len(case.data) + out.get("output", 0)) + SLACK
    if measure:
        out["peak"] = max(0, _status()["VmHWM"] - before["VmRSS"])
        if out["peak"] > out["bound"] and out["failure"] is None:
            out["failure"] = f"peak RSS {out['peak'] >> 20} MiB over the bound {out['bound'] >> 20} MiB"
    return out


def worker_main(folder: Path, cap: int) -> None:
    import torch

    torch.set_num_threads(1)
    results = os.fdopen(os.dup(1), "w", buffering=1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # stray prints from libraries never reach the result stream
    fx = Fixtures.load(folder)
    os.environ["KVC_MAX_DECODED_BYTES"] = str(cap)
    for name, data in fx.files.items():  # warm up, and prove every genuine fixture passes
        res = execute(data, fx, cap, random.Random(0))
        if res["refusals"] or res["verify"] != "ok" or res["differs"]:
            results.write(json.dumps({"fatal": f"genuine fixture {name} does not verify: {res}"}, default=str) + "\n")
            return
    _trim()
    gc.freeze()  # everything loaded so far is permanent: per-case gc.collect() then costs microseconds
    results.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        results.write(json.dumps(run_case(int(line), fx, cap)) + "\n")


# ---------------------------------------------------------------- the driver


class Worker:
    def __init__(self, folder: Path, cap: int, log: Path):
        env = {**os.environ, "MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        env["KVC_DEBUG"] = ""
        self.log = open(log, "ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "--worker",
                "--fixtures",
                str(folder),
                "--max-decoded-bytes",
                str(cap),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            env=env,
            text=True,
            bufsize=1,
        )
        self.seed: int | None = None
        self.started = 0.0
        line = self.proc.stdout.readline()
        msg = json.loads(line) if line else {"fatal": f"worker exited ({self.proc.poll()}); see {log}"}
        if "ready" not in msg:
            self.kill()
            raise RuntimeError(msg.get("fatal", msg))

    def send(self, seed: int) -> None:
        self.seed, self.started = seed, time.monotonic()
        self.proc.stdin.write(f"{seed}\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                stream.close()
        self.log.close()


def run(
    seed: int,
    cases: int,
    workers: int = 1,
    fixtures: Path | None = None,
    timeout: float = 30.0,
    cap: int = DEFAULT_CAP,
    progress: bool = True,
) -> dict:
    """Run ``cases`` cases (seeds ``seed .. seed + cases - 1``) on ``workers`` processes; the summary."""
    folder = build_fixtures(fixtures or default_fixture_dir())
    log = folder / "workers.log"
    pool = [Worker(folder, cap, log) for _ in range(max(1, min(workers, cases)))]
    sel = selectors.DefaultSelector()
    for w in pool:
        sel.register(w.proc.stdout, selectors.EVENT_READ, w)
    pending = list(range(seed + cases - 1, seed - 1, -1))
    results: list[dict] = []
    t0 = time.monotonic()
    shown = 0

    def replace(w: Worker, failure: str) -> None:
        results.append({"seed": w.seed, "family": "?", "fixture": "?", "failure": failure, "seconds": timeout})
        report_failure(results[-1])
        sel.unregister(w.proc.stdout)
        w.kill()
        fresh = Worker(folder, cap, log)
        pool[pool.index(w)] = fresh
        sel.register(fresh.proc.stdout, selectors.EVENT_READ, fresh)
        if pending:
            fresh.send(pending.pop())

    for w in pool:
        if pending:
            w.send(pending.pop())
    while any(w.seed is not None for w in pool):
        for key, _ in sel.select(timeout=1.0):
            w = key.data
            line = w.proc.stdout.readline()
            if not line:
                replace(w, f"worker crashed (exit {w.proc.poll()}) on this case")
                continue
            res = json.loads(line)
            results.append(res)
            if res["failure"]:
                report_failure(res)
            w.seed = None
            if pending:
                w.send(pending.pop())
        now = time.monotonic()
        for w in list(pool):
            if w.seed is not None and now - w.started > timeout:
                replace(w, f"hang: over {timeout:.0f} s (killed)")
        if progress and len(results) >= shown + 500:
            shown = len(results)
            fails = sum(1 for r in results if r["failure"])
            rate = len(results) / max(1e-9, now - t0)
            print(f"  {len(results)}/{cases} cases, {fails} failures, {rate:.1f} cases/s", file=sys.stderr)
    for w in pool:
        sel.unregister(w.proc.stdout)
        w.kill()
    return summarize(results, seed, cases, time.monotonic() - t0, cap)


def report_failure(res: dict) -> None:
    print(
        f"FAIL seed={res['seed']} [{res.get('family')}/{res.get('fixture')}] {res['failure']}"
        f"  (replay: .venv/bin/python bench/fuzz.py --seed {res['seed']} --cases 1 --replay)",
        file=sys.stderr,
    )


def summarize(results: list[dict], seed: int, cases: int, seconds: float, cap: int) -> dict:
    def group(key):
        rows = defaultdict(list)
        for r in results:
            rows[r.get(key, "?")].append(r)
        return rows

    def row(rs: list[dict]) -> dict:
        peaks = [r.get("peak", 0) for r in rs]
        ratios = [r.get("peak", 0) / r["bound"] for r in rs if r.get("bound")]
        secs = sorted(r.get("seconds", 0) for r in rs)
        codes = Counter(r["code"] for r in rs if r.get("code"))
        return {
            "cases": len(rs),
            "refused": sum(1 for r in rs if not r.get("decoded") and r.get("refused")),
            "exit_codes": dict(sorted(codes.items())),
            "decoded": sum(1 for r in rs if r.get("decoded")),
            "decoded_forged_data": sum(1 for r in rs if r.get("decoded") and r.get("unfaithful")),
            "deep_caught": sum(1 for r in rs if r.get("unfaithful") and r.get("verify") not in (None, "ok")),
            "deep_exit_6": sum(1 for r in rs if r.get("unfaithful") and r.get("verify") == "6"),
            "faithful_other_params": sum(1 for r in rs if r.get("differs") and r.get("unfaithful") is False),
            "passed_claimed_other_env": sum(1 for r in rs if r.get("other_env")),
            "failures": sum(1 for r in rs if r.get("failure")),
            "hangs": sum(1 for r in rs if (r.get("failure") or "").startswith("hang")),
            "crashes": sum(1 for r in rs if (r.get("failure") or "").startswith("worker crashed")),
            "max_peak_mib": round(max(peaks, default=0) / MB, 1),
            "max_peak_over_bound": round(max(ratios, default=0), 3),
            "p99_ms": round(1000 * secs[int(0.99 * (len(secs) - 1))], 1) if secs else 0,
        }

    return {
        "command": f"bench/fuzz.py --seed {seed} --cases {cases} --max-decoded-bytes {cap}",
        "seconds": round(seconds, 1),
        "total": row(results),
        "forged_headers": sum(1 for r in results if r.get("family") in HEADER_FAMILIES),
        "forged_payloads": sum(1 for r in results if r.get("family") in ("payload", "profile")),
        "by_family": {k: row(v) for k, v in sorted(group("family").items())},
        "by_fixture": {k: row(v) for k, v in sorted(group("fixture").items())},
        "failures": [r for r in results if r.get("failure")],
    }


def print_table(summary: dict) -> None:
    cols = [
        ("cases", "cases"),
        ("refused", "refused"),
        ("decoded", "decoded"),
        ("decoded_forged_data", "forged data"),
        ("deep_caught", "deep caught"),
        ("deep_exit_6", "exit 6"),
        ("faithful_other_params", "faithful, other params"),
        ("passed_claimed_other_env", "passed, other env claimed"),
        ("failures", "failures"),
        ("hangs", "hangs"),
        ("crashes", "crashes"),
        ("max_peak_mib", "max peak MiB"),
        ("max_peak_over_bound", "peak/bound"),
        ("p99_ms", "p99 ms"),
    ]
    for title, rows in (("family", summary["by_family"]), ("fixture", summary["by_fixture"])):
        print(f"\n| {title} | " + " | ".join(c[1] for c in cols) + " | exit codes |")
        print("|---|" + "---:|" * len(cols) + "---|")
        for name, r in list(rows.items()) + [("**all**", summary["total"])]:
            codes = " ".join(f"{k}:{v}" for k, v in r["exit_codes"].items())
            print(f"| {name} | " + " | ".join(str(r[c[0]]) for c in cols) + f" | {codes} |")
    print(
        f"\n{summary['total']['cases']} cases ({summary['forged_headers']} forged headers, "
        f"{summary['forged_payloads']} forged payloads) in {summary['seconds']} s; "
        f"{summary['total']['failures']} failures. {summary['command']}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=1, help="seed of the first case (case i has seed + i)")
    ap.add_argument("--cases", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds per case before it counts as a hang")
    ap.add_argument("--max-decoded-bytes", type=int, default=DEFAULT_CAP)
    ap.add_argument("--fixtures", type=Path, default=None, help="fixture folder (built once)")
    ap.add_argument("--json", type=Path, default=None, help="write the summary (and every failure) here")
    ap.add_argument("--replay", action="store_true", help="run the cases in this process, with tracebacks")
    ap.add_argument("--dump", type=Path, default=None, help="write the case's file (with --seed) and exit")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    folder = args.fixtures or default_fixture_dir()
    if args.worker:
        worker_main(folder, args.max_decoded_bytes)
        return 0
    if args.dump or args.replay:
        fx = Fixtures.load(folder)
        if args.dump:
            case = make_case(args.seed, fx, args.max_decoded_bytes)
            args.dump.write_bytes(case.data)
            print(f"seed {args.seed}: {case.family}/{case.fixture}: {case.what} -> {args.dump}")
            return 0
        os.environ["KVC_MAX_DECODED_BYTES"] = str(args.max_decoded_bytes)
        for s in range(args.seed, args.seed + args.cases):
            case = make_case(s, fx, args.max_decoded_bytes)
            print(f"seed {s}: {case.family}/{case.fixture}: {case.what} ({len(case.data)} bytes)")
            res = execute(case.data, fx, args.max_decoded_bytes, random.Random(s ^ 0x5EED))
            print(json.dumps(res, indent=1, default=str))
        return 0
    summary = run(args.seed, args.cases, args.workers, folder, args.timeout, args.max_decoded_bytes)
    print_table(summary)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=1, default=str))
    return 1 if summary["total"]["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
