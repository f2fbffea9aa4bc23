"""The streaming loader: a .kvc from any source into a model's cache, chunk by chunk.

    cache, report = kvc.load_cache("http://127.0.0.1:8080/doc.kvc", lm)          # adaptive
    cache, report = kvc.load_cache("s3://bucket/doc.kvc", lm, slo=1.5)           # best quality within 1.5 s
    cache, report = kvc.load_cache("doc.kvc", lm, level="balanced")              # one level
    out = lm.model.generate(torch.tensor([report.token_ids + question]), past_key_values=cache)

Opening reads the header first (one request: the first 16 KiB, then the rest of the header if it
is longer). Loading then runs two threads:

* the *link* thread fetches the payload of one chunk at a time, at the level the controller
  picked, checks its checksum and queues it (at most ``prefetch`` payloads wait, so memory stays
  bounded by a few chunks plus the cache itself);
* the *model* thread decodes queued chunks into the cache as they come (chunk k while chunk k+1 is
  in flight) and, when the controller says so, recomputes chunks from their token ids, from the
  front, on top of the ones before them.

Adaptive loads fetch from the back and recompute from the front until the two meet (see
controller.py); a forced level fetches front to back; a non-seekable stream is read in file
order at one level and never read past the last byte that level needs."""

from __future__ import annotations

import collections
import hashlib
import json
import math
import threading
import time
from dataclasses import asdict, dataclass, field

import torch

from kvc.errors import FormatError, InputError, ProfileError
from kvc.formats import layout
from kvc.formats.container import read_head
from kvc.formats.digests import payload_intact
from kvc.streaming.cache import IncrementalCache
from kvc.streaming.controller import TEXT, ChunkInfo, Controller, Estimates, Policy, Snapshot, level_infos
from kvc.streaming.sources import RangeSource, SourceChangedError, SourceError, open_source

HEADER_PREFIX_BYTES = 16 * 1024
DEFAULT_PREFETCH = 4  # payloads waiting to be decoded, at most (a recompute leaves the link busy meanwhile)
DEFAULT_STALL_TIMEOUT_S = 60.0
_WAKE_S = 0.02  # how often an idle thread re-plans when nothing happens
PROBE_WAIT_S = 0.15  # at most this long the model thread waits for the link's first measurement
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                 "float64": torch.float64}

_CODEC_CACHE: dict[tuple, object] = {}  # warm codecs (their coding tables) for the next load in this process
_WARM: set[tuple] = set()  # codec keys that have decoded a chunk in this process
_PROFILE_CACHE: dict[str, object] = {}
_CACHE_LOCK = threading.Lock()


@dataclass
class ChunkRecord:
    """What happened to one chunk. Times in seconds; ``done_s`` counts from the start of the open."""

    index: int
    start: int
    end: int
    choice: str = ""  # a level name, or "text"
    bytes: int = 0  # payload bytes fetched for it (0 for text)
    latency_s: float = 0.0  # request sent → first byte
    transfer_s: float = 0.0  # first byte → last byte
    wait_s: float = 0.0  # the model thread idle, waiting for this chunk's bytes
    decode_s: float = 0.0  # payload → tensors in the cache
    prefill_s: float = 0.0  # recomputed from text
    done_s: float = 0.0
    abandoned_bytes: int = 0  # bytes of an earlier fetch of this chunk that was given up


@dataclass
class LoadReport:
    """Per-chunk choices and timings of one load, and the time to first token split into its parts:

    ``ttft_s = header_s + setup_s + wait_s + decode_s + prefill_s + other_s + first_token_s``,
    the model thread's critical path. ``transfer_s`` (the link's busy time) overlaps it and is
    not part of the sum."""

    source: str
    mode: str
    tokens: int
    chunk_tokens: int
    level: str | None = None
    slo_s: float | None = None
    min_level: str | None = None
    header_bytes: int = 0
    header_s: float = 0.0
    setup_s: float = 0.0
    wait_s: float = 0.0
    decode_s: float = 0.0
    prefill_s: float = 0.0
    other_s: float = 0.0
    ready_s: float = 0.0  # the cache complete, from the start of the open
    first_token_s: float | None = None  # set by whoever runs the first token (kvc ask, the benchmark)
    bytes: int = 0  # payload bytes fetched
    wasted_bytes: int = 0  # payload bytes fetched and not used (abandoned or recomputed instead)
    transfer_s: float = 0.0
    predicted_ttft_s: float | None = None  # the controller's first prediction
    slo_met: bool | None = None
    fell_back_to_text: bool = False
    notes: list[str] = field(default_factory=list)
    chunks: list[ChunkRecord] = field(default_factory=list)
    estimates: dict = field(default_factory=dict)  # the controller's final beliefs
    initial_estimates: dict = field(default_factory=dict)
    token_ids: list[int] = field(default_factory=list, repr=False)
    _est: Estimates | None = field(default=None, repr=False)

    @property
    def ttft_s(self) -> float:
        return self.ready_s + (self.first_token_s or 0.0)

    @property
    def link_gbit_per_s(self) -> float | None:
        """The link's rate while it was sending chunk payloads (first byte to last byte)."""
        seconds = sum(c.transfer_s for c in self.chunks)
        return sum(c.bytes for c in self.chunks) * 8 / seconds / 1e9 if seconds > 0 else None

    def choices(self) -> dict[str, int]:
        return dict(collections.Counter(c.choice for c in self.chunks))

    def record_first_token(self, seconds: float) -> None:
        """Set the time of the first token (after the cache was ready) and let the controller learn it."""
        self.first_token_s = seconds
        if self.slo_s is not None:
            self.slo_met = self.ttft_s <= self.slo_s
        if self._est is not None:
            self._est.observe_first_token(seconds)
            self._est.remember()

    def as_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if not k.startswith("_") and k not in ("token_ids", "chunks")}
        out["ttft_s"] = self.ttft_s
        out["link_gbit_per_s"] = self.link_gbit_per_s
        out["choices"] = self.choices()
        out["chunks"] = [asdict(c) for c in self.chunks]
        return out


class Stream:
    """An opened .kvc source: its header read and checked, nothing else fetched yet."""

    def __init__(self, source, profile=None, **source_options):
        started = time.perf_counter()
        self.source: RangeSource = open_source(source, **source_options)
        self.name = self.source.name
        self._profile_hint = profile
        try:
            prefix = self.source.prefix(HEADER_PREFIX_BYTES)
            extra = [0]
            size = self.source.size

            def read(offset: int, length: int, what: str) -> bytes:
                # Bytes past the prefix (a header over 16 KiB) are fetched with the 32-byte header digest that
                # follows them, so that a long header costs one more request, not two (a round trip each). Never
                # past the digest: on a pipe, the data after it is read once, by the chunks.
                nonlocal prefix
                if offset + length > len(prefix) and offset <= len(prefix):
                    want = offset + length - len(prefix) + layout.DIGEST_BYTES
                    if size is not None:
                        want = min(want, size - len(prefix))
                    want = max(want, offset + length - len(prefix))
                    prefix = prefix + self.source.read(len(prefix), want, what)
                if offset + length <= len(prefix):
                    return prefix[offset : offset + length]
                extra[0] += length
                return self.source.read(offset, length, what)

            if not self.source.seekable and len(prefix) < HEADER_PREFIX_BYTES:
                size = len(prefix)  # the whole stream fit in the prefix: its size is known after all
            head = read_head(read, size, self.name)
        except BaseException:
            self.source.close()
            raise
        finished = time.perf_counter()
        self.header, self.version, self.data_start = head.header, head.version, head.data_start
        self.header_bytes = min(len(prefix), head.data_start) + extra[0]
        self.header_s = finished - started
        first = self.source.prefix_first_byte
        self.header_latency_s = (first - started) if first is not None else 0.0
        self._transfer_s = max(finished - (first if first is not None else started), 1e-6)

    # ---- what the header says
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
    def model(self) -> dict:
        return self.header["model"]

    @property
    def dtype(self) -> torch.dtype:
        return _TORCH_DTYPES[self.header["dtype"]]

    def level_bytes(self, level: str) -> int:
        return sum(e["length"] for c in self.header["chunks"] for e in c["encodings"] if e["level"] == level)

    def close(self) -> None:
        self.source.close()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- codecs
    def _local_profile(self, wanted: str):
        """The profile ``wanted`` from this process, the hint or the search path; None if none has it."""
        with _CACHE_LOCK:
            if wanted in _PROFILE_CACHE:
                return _PROFILE_CACHE[wanted]
        from kvc.codec.profile import find_profile_by_sha

        hint = self._profile_hint
        if hint is not None and not isinstance(hint, str) and not hasattr(hint, "__fspath__"):
            found = hint
        else:
            found = find_profile_by_sha(wanted, self.model, str(hint) if hint is not None else None)
        if found is None or found.sha256 != wanted:
            return None
        with _CACHE_LOCK:
            _PROFILE_CACHE[wanted] = found
        return found

    def _embedded_profile(self) -> dict | None:
        att = next((a for a in self.header.get("attachments", []) if a["name"] == "profile"), None)
        return att if att is not None and self.source.seekable else None

    def can_decode(self, level: str) -> bool:
        """Whether ``level``'s profile (if it needs one) is at hand locally or embedded in the file."""
        wanted = self.header["levels"][level].get("profile")
        return not wanted or self._local_profile(wanted) is not None or self._embedded_profile() is not None

    def _profile(self, wanted: str):
        from kvc.codec.profile import Profile

        found = self._local_profile(wanted)
        if found is None and (att := self._embedded_profile()) is not None:
            # Fetched only now, when a chunk at a level that needs it is to be decoded.
            blob = self.source.read(self.data_start + att["offset"], att["length"], "the embedded profile")
            if hashlib.sha256(blob).hexdigest() != att["sha256"]:
                raise FormatError(f"{self.name}: attachment profile checksum mismatch (the file is corrupt)")
            found = Profile.from_bytes(blob)
        if found is None or found.sha256 != wanted:
            raise ProfileError(f"this file needs profile {wanted[:16]}…, which was not found: pass --profile")
        with _CACHE_LOCK:
            _PROFILE_CACHE[wanted] = found
        return found

    def codec_key(self, level: str) -> tuple:
        entry = self.header["levels"][level]
        return (json.dumps(entry, sort_keys=True), entry.get("profile"))

    def codec(self, level: str):
        from kvc.codec.registry import build_codec

        entry = self.header["levels"][level]
        wanted = entry.get("profile")
        key = self.codec_key(level)
        with _CACHE_LOCK:
            cached = _CODEC_CACHE.get(key)
        if cached is not None:
            return cached
        codec = build_codec(entry, self._profile(wanted) if wanted else None)
        with _CACHE_LOCK:
            if len(_CODEC_CACHE) >= 16:
                _CODEC_CACHE.pop(next(iter(_CODEC_CACHE)))
            _CODEC_CACHE[key] = codec
        return codec

    # ---- loading
    def load(self, lm, *, level: str | None = None, slo: float | None = None, min_level: str | None = None,
             prefetch: int = DEFAULT_PREFETCH, overlap: bool = True,
             stall_timeout: float = DEFAULT_STALL_TIMEOUT_S) -> tuple[object, LoadReport]:
        """Stream the context into ``lm``'s cache; returns ``(DynamicCache, LoadReport)``.

        ``level``: one stored level for every chunk, or ``"text"`` to recompute everything; default
        adaptive. ``slo``: seconds to first token to meet at the best quality that fits. ``min_level``:
        a quality floor for adaptive loads. ``overlap=False`` fetches every chunk before decoding any
        (one after the other: the comparison the benchmark makes)."""
        from kvc.runtime.identity import check_same_model, model_identity

        check_same_model(self.model, model_identity(lm))
        if level is not None and level != TEXT and level not in self.header["levels"]:
            raise InputError(f"{self.name} holds no level {level!r} (it has: {', '.join(self.levels)}, or text)")
        if min_level is not None and min_level != TEXT and min_level not in self.header["levels"]:
            raise InputError(
                f"--min-level {min_level!r} is not stored in {self.name} (it has: {', '.join(self.levels)})"
            )
        if slo is not None and not (slo > 0 and math.isfinite(slo)):
            raise InputError("--slo must be a positive number of seconds")
        if prefetch < 1:
            raise InputError("prefetch must be at least 1")
        return _Load(self, lm, Policy.make(level, slo, min_level), prefetch, overlap, stall_timeout).run()


def open_stream(source, profile=None, **source_options) -> Stream:
    """Open a .kvc from a path, ``http(s)://`` URL, fsspec URL, ``-`` (stdin), a file object or bytes;
    reads and checks the header only."""
    return Stream(source, profile, **source_options)


def load_cache(source, lm, *, level: str | None = None, slo: float | None = None, min_level: str | None = None,
               profile=None, prefetch: int = DEFAULT_PREFETCH, **source_options) -> tuple[object, LoadReport]:
    """One call: open ``source``, stream its context into ``lm``'s cache, close. Returns a transformers
    ``DynamicCache`` (use it with ``generate`` exactly like ``KvcFile.to_cache``) and the LoadReport
    (``report.token_ids`` are the context's ids to put in front of the new ones)."""
    with open_stream(source, profile, **source_options) as stream:
        return stream.load(lm, level=level, slo=slo, min_level=min_level, prefetch=prefetch)


def _model_params(lm) -> int:
    cached = getattr(lm, "_kvc_params", None)
    if cached is None:
        cached = sum(p.numel() for p in lm.model.parameters())
        try:
            lm._kvc_params = cached
        except AttributeError:
            pass
    return cached


@dataclass
class _Inflight:
    index: int
    level: str
    size: int
    started: float
    cancel: threading.Event
    got: int = 0
    first: float | None = None
    planned_s: float = 0.0  # the transfer time the plan assumed
    abandoned: bool = False
    checked: float = 0.0  # when the fetch was last weighed against dropping it


class _Load:
    """One load: the shared state of the link thread and the model thread, guarded by one condition."""

    def __init__(self, stream: Stream, lm, policy: Policy, prefetch: int, overlap: bool, stall_timeout: float):
        self.stream, self.lm, self.policy = stream, lm, policy
        self.prefetch, self.overlap, self.stall_timeout = prefetch, overlap, stall_timeout
        self.header = stream.header
        self.t0 = time.perf_counter() - stream.header_s  # the clock starts when the open did
        self.cond = threading.Condition()
        self.notes: list[str] = []

    def now(self) -> float:
        return time.perf_counter() - self.t0

    # ---- set-up
    def _chunk_infos(self) -> list[ChunkInfo]:
        layers = self.header["layout"]["layers"]
        out = []
        for i, chunk in enumerate(self.header["chunks"]):
            elements = sum(
                spec["kv_heads"] * max(0, chunk["end"] - max(chunk["start"], spec["start"]))
                * (spec["key_dim"] + spec["value_dim"])
                for spec in layers
            )
            out.append(ChunkInfo(i, chunk["start"], chunk["end"], elements,
                                 {e["level"]: e["length"] for e in chunk["encodings"]}))
        return out

    def run(self):
        stream, header, policy = self.stream, self.header, self.policy
        setup_start = time.perf_counter()
        chunks = self._chunk_infos()
        self.chunks = chunks
        n = len(chunks)
        if not stream.source.seekable and policy.mode in ("fastest", "slo"):
            first = min(stream.levels, key=lambda lv: min((e["offset"] for c in header["chunks"]
                                                           for e in c["encodings"] if e["level"] == lv), default=0))
            self.notes.append(f"{stream.name} is a stream: it is read in file order at one level ({first}); "
                              "choose another with --level")
            policy = self.policy = Policy.make(first)
        if policy.mode == "level":
            missing = [c.index for c in chunks if policy.level not in c.sizes]
            if missing:
                raise InputError(f"chunk {missing[0]} of {stream.name} has no level {policy.level!r}")
        identity_key = stream.model.get("weights_sha256", "")
        rate = max(stream.header_bytes, 1) / stream._transfer_s
        self.est = Estimates.seed(identity_key, str(self.lm.device), _model_params(self.lm), header["levels"],
                                  rate, stream.header_latency_s, origin=stream.source.origin,
                                  link_memory=policy.mode in ("slo", "fastest"),
                                  fitted_only=policy.mode == "fastest")
        self.levels = level_infos(header, chunks)
        self.controller = Controller(chunks, self.levels, policy, self.est)
        self.codecs: dict[str, object] = {}
        if policy.mode == "level":
            self.codecs[policy.level] = stream.codec(policy.level)  # a missing profile fails here, before any fetch
        elif policy.mode != "text":
            # Adaptive: a level whose profile is nowhere to be had is left out; codecs are built when first used
            # (an embedded profile is fetched only if a chunk at such a level is).
            unusable = [name for name in self.controller.allowed if not stream.can_decode(name)]
            if unusable:
                self.controller.allowed = [name for name in self.controller.allowed if name not in unusable]
                self.notes.append(f"level {', '.join(unusable)} left out: its profile was not found (pass --profile)")
        with _CACHE_LOCK:
            self.controller.warm = {name for name in self.levels if stream.codec_key(name) in _WARM}
        self.builder = IncrementalCache(self.lm, header, stream.dtype)
        self.report = LoadReport(
            source=stream.name, mode=policy.mode, tokens=stream.num_tokens, chunk_tokens=header["chunk_tokens"],
            level=policy.level, slo_s=policy.slo, min_level=policy.min_level, header_bytes=stream.header_bytes,
            header_s=stream.header_s, chunks=[ChunkRecord(c.index, c.start, c.end) for c in chunks],
            token_ids=list(stream.token_ids), initial_estimates=self.est.as_dict(), _est=self.est,
        )
        # Shared state (under self.cond).
        self.claims: list[str | None] = [None] * n
        self.front, self.back = 0, n - 1  # undecided chunks: front..back
        self.next_in_order = 0  # fetch order front-to-back (forced level, streams)
        self.queue: collections.deque = collections.deque()
        self.inflight: _Inflight | None = None
        self.link_done = policy.mode == "text"
        self.error: BaseException | None = None
        self.stop = False
        self.busy: tuple[float, float] | None = None  # (started, predicted seconds) of the model's step
        self.done = 0
        self.last_progress = 0.0  # perf_counter() of the last bytes the link brought
        self.report.setup_s = time.perf_counter() - setup_start
        if policy.mode in ("fastest", "slo"):
            first_plan = self.controller.choose(self._snapshot())
            self.report.predicted_ttft_s = first_plan.ttft

        link = None
        if not self.link_done:
            link = threading.Thread(target=self._link_thread, name="kvc-link", daemon=True)
            link.start()
        try:
            self._model_thread()
        finally:
            with self.cond:
                self.stop = True
                if self.inflight is not None:
                    self.inflight.cancel.set()
                self.cond.notify_all()
            if link is not None:
                # A fetch given up in flight ends at its next piece; one still waiting for its response
                # is not waited for (the thread is a daemon and ends when the source closes).
                link.join(timeout=1.0)
        cache = self.builder.finish()
        return cache, self._finish_report()

    def _finish_report(self) -> LoadReport:
        r = self.report
        r.ready_s = self.ready_s
        r.wait_s = sum(c.wait_s for c in r.chunks)
        r.decode_s = sum(c.decode_s for c in r.chunks)
        r.prefill_s = sum(c.prefill_s for c in r.chunks)
        r.transfer_s = sum(c.latency_s + c.transfer_s for c in r.chunks)
        r.bytes = sum(c.bytes for c in r.chunks) + r.wasted_bytes
        r.other_s = max(0.0, r.ready_s - r.header_s - r.setup_s - r.wait_s - r.decode_s - r.prefill_s)
        texts = sum(1 for c in r.chunks if c.choice == TEXT)
        if self.policy.mode in ("fastest", "slo") and texts:
            r.notes.append(f"{texts} of {len(r.chunks)} chunks recomputed from text (the link was too slow to "
                           f"bring them sooner)" if texts < len(r.chunks) else
                           "every chunk recomputed from text: the link was too slow to bring any chunk sooner")
            r.fell_back_to_text = texts == len(r.chunks)
        if self.policy.mode == "slo" and self._slo_infeasible:
            r.notes.append(f"the {self.policy.slo:g} s budget cannot be met at the measured link "
                               f"({self.est.link_bytes_per_s.value * 8 / 1e9:.3g} Gbit/s): loaded as fast as "
                               "possible instead")
        r.notes = self.notes + r.notes
        r.estimates = self.est.as_dict()
        self.est.remember()
        return r

    _slo_infeasible = False

    # ---- the controller's view
    def _decode_cost(self, index: int, level: str) -> float:
        return self.controller.decode_cost(self.chunks[index], level)

    def _snapshot(self) -> Snapshot:
        now = self.now()
        busy = 0.0
        if self.busy is not None:
            busy = max(0.0, self.busy[0] + self.busy[1] - time.perf_counter())
        queued = sum(self._decode_cost(item[0], item[1]) for item in self.queue)
        arrival = decode = None
        if self.inflight is not None:
            f = self.inflight
            rate = self.est.link_bytes_per_s.value
            receiving = time.perf_counter() - (f.first or f.started)
            if f.got and receiving > self._probe_s():  # the rate this fetch shows, once it can be told
                rate = min(rate, f.got / receiving)
            arrival = ((0.0 if f.first else self.est.fixed_fetch_s) + (f.size - f.got) / rate
                       + f.size * self.est.check_s_per_byte.value)
            decode = self._decode_cost(f.index, f.level)
        last = self.claims[self.back + 1] if self.back + 1 < len(self.chunks) else None
        return Snapshot(now=now, front=self.front, back=self.back, busy=busy, queued_decode=queued,
                        inflight_arrival=arrival, inflight_decode=decode or 0.0,
                        last_level=last if last != TEXT else None)

    def _worth_abandoning(self, flight: _Inflight, rate: float, probe: bool = False) -> bool:
        """Under the lock: whether dropping the fetch in flight (its chunk undecided again) and re-planning
        at ``rate`` is predicted clearly sooner (or, with a budget, meets it where keeping does not)."""
        if self.inflight is not flight or self.claims[flight.index] != flight.level:
            return False
        saved, back = self.est.link_bytes_per_s.value, self.back
        # The fetch in flight is projected at the rate it shows (_snapshot); the chunks after it at the
        # estimate that rate would leave (the rate itself only while the link is known by its prior alone).
        self.est.link_bytes_per_s.value = self.est.link_rate_with(rate)
        # Weighed on the rate the fetch shows, not hedged down from it as the prior is: hedged to a hundredth of
        # an already slow link, keeping and dropping both planned nearly all text and looked alike, and a first
        # fetch at high on a 0.03 Gbit/s link was kept to its end (bench/stream.py: 1.20x the best option).
        try:
            keep = self.controller.choose(self._snapshot(), measured=True)
            self.inflight, self.back = None, max(self.back, flight.index)
            drop = self.controller.choose(self._snapshot(), measured=True)
        finally:
            self.inflight, self.back = flight, back
            self.est.link_bytes_per_s.value = saved
        return self.controller.drop_is_better(keep, drop, flight.index, flight.level, self.now(), probe=probe)

    # ---- the link thread
    def _link_thread(self) -> None:
        try:
            while True:
                with self.cond:
                    pick = self._next_fetch()
                    if pick is None:
                        self.link_done = True
                        self.cond.notify_all()
                        return
                    index, level, planned = pick
                    enc = next(e for e in self.header["chunks"][index]["encodings"] if e["level"] == level)
                    flight = self.inflight = _Inflight(index, level, enc["length"], time.perf_counter(),
                                                       threading.Event(), planned_s=planned)
                self._fetch(flight, enc)
        except BaseException as exc:  # handed to the model thread, which raises it
            with self.cond:
                self.error = exc
                self.link_done = True
                self.inflight = None
                self.cond.notify_all()

    def _next_fetch(self) -> tuple[int, str, float] | None:
        """Under the lock: wait until a chunk should be fetched and claim it; None when none will be."""
        policy = self.policy
        while True:
            if self.stop:
                return None
            if policy.mode == "level":
                if self.next_in_order >= len(self.chunks):
                    return None
                if not self.overlap or len(self.queue) < self.prefetch:
                    index = self.next_in_order
                    self.next_in_order += 1
                    self.claims[index] = policy.level
                    return index, policy.level, 0.0
            else:
                if self.back < self.front:
                    return None
                if len(self.queue) < self.prefetch:
                    plan = self.controller.choose(self._snapshot())
                    if policy.mode == "slo":
                        self._slo_infeasible = plan.meets_slo is False
                    level = plan.level if plan.fetch >= 1 else None
                    if level is not None:
                        index = self.back
                        self.back -= 1
                        self.claims[index] = level
                        size = self.chunks[index].sizes[level]
                        planned = self.est.fixed_fetch_s + size / self.est.link_bytes_per_s.value
                        return index, level, planned
            self.cond.wait(_WAKE_S)

    def _fetch(self, flight: _Inflight, enc: dict) -> None:
        stream = self.stream
        offset = stream.data_start + enc["offset"]
        what = f"chunk {flight.index} ({flight.level})"

        def progress(n: int) -> None:
            now = time.perf_counter()
            if flight.first is None:
                flight.first = now
            flight.got += n
            self.last_progress = now
            # A fetch that runs far slower than planned (the link got slower, or the estimate was too kind):
            # once 30 ms of its transfer have been seen (10 ms for the first fetch, a probe), and at most every
            # 20 ms, re-plan at the rate it shows with and without it, and give it up if dropping it is predicted
            # clearly sooner.
            receiving = now - flight.first
            if (self.policy.mode in ("fastest", "slo") and receiving > self._probe_s() and flight.got < flight.size
                    and now - flight.checked > 0.02):
                unmeasured = self.est.link_bytes_per_s.samples == 0  # this fetch was planned on the prior alone
                probe = unmeasured and not flight.checked
                flight.checked = now
                projected = (flight.first - flight.started) + receiving * flight.size / flight.got
                # With a budget, a fetch is weighed sooner (a few ms of it can decide whether the budget is met),
                # and the first one always: it was planned on a link nobody had measured.
                late = (projected > 1.2 * flight.planned_s + 0.005 if self.policy.mode == "slo"
                        else projected > 1.5 * flight.planned_s + 0.02)
                if late or (probe and self.policy.mode == "slo"):
                    with self.cond:
                        if self._worth_abandoning(flight, flight.got / receiving, probe=unmeasured):
                            flight.abandoned = True
                            flight.cancel.set()

        fetched = stream.source.fetch(offset, enc["length"], what, cancel=flight.cancel, progress=progress)
        with self.cond:
            self.inflight = None
            if fetched is None:  # cancelled: recomputed by the model thread, or abandoned as too slow
                elapsed = time.perf_counter() - flight.started
                self.report.wasted_bytes += flight.got
                if flight.abandoned and self.claims[flight.index] == flight.level:
                    self.est.observe_partial(flight.got, elapsed)
                    self.claims[flight.index] = None
                    self.back = max(self.back, flight.index)
                    self.report.chunks[flight.index].abandoned_bytes += flight.got
                    self.notes.append(f"chunk {flight.index}: the {flight.level} fetch ran far slower than planned "
                                      f"and was given up after {flight.got} bytes")
                self.cond.notify_all()
                return
        check_started = time.perf_counter()
        if not payload_intact(enc, fetched.data):
            raise SourceChangedError(
                f"{stream.name}: {what} checksum mismatch: the file changed while being read, or is corrupt"
            )
        checked = time.perf_counter() - check_started
        with self.cond:
            latency, transfer = fetched.first - fetched.started, fetched.done - fetched.first
            self.est.observe_fetch(len(fetched.data), latency, transfer)
            self.est.observe_check(len(fetched.data), checked)
            rec = self.report.chunks[flight.index]
            rec.latency_s, rec.transfer_s, rec.bytes = latency, transfer, len(fetched.data)
            if self.claims[flight.index] == flight.level:
                self.queue.append((flight.index, flight.level, fetched.data, enc))
            else:  # recomputed meanwhile
                self.report.wasted_bytes += len(fetched.data)
                rec.bytes = 0
            self.cond.notify_all()

    # ---- the model thread
    def _model_thread(self) -> None:
        n = len(self.chunks)
        last_event = time.perf_counter()
        while True:
            with self.cond:
                idle_from = None
                while True:
                    if self.error is not None:
                        raise self.error
                    if self.done == n:
                        self.ready_s = self.now()
                        return
                    action = self._next_step()
                    if action is not None:
                        break
                    t = time.perf_counter()
                    if idle_from is None:
                        idle_from = t
                    if t - max(last_event, self.last_progress) > self.stall_timeout:
                        raise SourceError(f"{self.stream.name}: no progress for {self.stall_timeout:g} s")
                    self.cond.wait(_WAKE_S)
                wait = time.perf_counter() - idle_from if idle_from is not None else 0.0
                kind, index = action[0], action[1]
                rec = self.report.chunks[index]
                rec.wait_s += wait
                cost = (self._decode_cost(index, action[2]) if kind == "decode"
                        else self.chunks[index].tokens * self.est.prefill_s_per_token.value)
                self.busy = (time.perf_counter(), cost)
            started = time.perf_counter()
            if kind == "decode":
                self._decode(index, action[2], action[3], action[4])
            else:
                self._prefill(index)
            spent = time.perf_counter() - started
            last_event = time.perf_counter()
            with self.cond:
                chunk = self.chunks[index]
                if kind == "decode":
                    rec.decode_s += spent
                    level = action[2]
                    self.est.observe_decode(level, chunk.elements, spent, cold=level not in self.controller.warm)
                    self.controller.warm.add(level)
                    with _CACHE_LOCK:
                        _WARM.add(self.stream.codec_key(level))
                else:
                    rec.prefill_s += spent
                    self.est.observe_prefill(chunk.tokens, spent)
                rec.done_s = self.now()
                self.busy = None
                self.done += 1
                self.cond.notify_all()

    def _next_step(self):
        """Under the lock: the model thread's next step, or None to wait."""
        if self.queue and (self.overlap or self.link_done):
            index, level, payload, enc = self.queue.popleft()
            self.report.chunks[index].choice = level
            return ("decode", index, level, payload, enc)
        mode = self.policy.mode
        if mode == "level":
            return None
        if mode == "text":
            return self._take_text(self._advance_front())
        if self.front <= self.back:  # the front chunk is undecided
            if self.link_done:
                return self._take_text(self._advance_front())
            if self._probing():
                return None
            plan = self.controller.choose(self._snapshot())
            if self.policy.mode == "slo":
                self._slo_infeasible = plan.meets_slo is False
            undecided = self.back - self.front + 1
            if plan.fetch < undecided:
                return self._take_text(self._advance_front())
            return None
        f = self.inflight
        if f is not None and f.index == self.front and self.claims[f.index] == f.level:
            # The link is still bringing the chunk the model would do next: recompute it instead if
            # that is predicted to be sooner than waiting for its bytes and decoding them.
            snap = self._snapshot()
            prefill = self.chunks[f.index].tokens * self.est.prefill_s_per_token.value
            if snap.inflight_arrival + snap.inflight_decode > 1.1 * prefill:
                f.cancel.set()
                self.back = min(self.back, f.index - 1)
                return self._take_text(self._advance_front())
        return None

    def _probe_s(self) -> float:
        """Seconds of a fetch's transfer after which the rate it shows is believed: 30 ms once the link has
        been measured (shorter stalls are noise), 10 ms while it is known only by its optimistic prior (the
        first fetch is then a probe, and on a slow link each ms of it is wasted)."""
        return 0.03 if self.est.link_bytes_per_s.samples else 0.01

    def _probing(self) -> bool:
        """Under the lock: whether the link is still known only by its optimistic prior while its first fetch
        is under way and not yet weighed (its first 10 ms of transfer). The model thread does not commit a
        chunk to text before that: the prior says the fetch will soon land, and if the link turns out slow
        the fetch is dropped for a smaller level, not for a text chunk decided on a rate nobody measured."""
        f = self.inflight
        return (self.est.link_bytes_per_s.samples == 0 and f is not None and not f.checked
                and time.perf_counter() - f.started < PROBE_WAIT_S)

    def _advance_front(self) -> int:
        index = self.front
        self.front += 1
        return index

    def _take_text(self, index: int):
        self.claims[index] = TEXT
        self.report.chunks[index].choice = TEXT
        return ("text", index)

    def _decode(self, index: int, level: str, payload: bytes, enc: dict) -> None:
        from kvc.api import decode_chunk

        try:
            codec = self.codecs.get(level)
            if codec is None:
                codec = self.codecs[level] = self.stream.codec(level)
            decoded = decode_chunk(self.header, codec, index, enc, payload, self.stream.dtype)
        except FormatError as exc:
            raise FormatError(f"{self.stream.name}: {exc}") from exc
        chunk = self.chunks[index]
        self.builder.put(chunk.start, chunk.end, decoded)

    def _prefill(self, index: int) -> None:
        chunk = self.chunks[index]
        self.builder.prefill(chunk.start, chunk.end)
