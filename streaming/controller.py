"""The per-chunk choice: which stored level each chunk comes at, or text (recomputed by the model).

The loader runs two things at once: the *model* recomputes chunks from their token ids starting at
the front of the context, and the *link* brings stored chunks starting at the back; each fetched
chunk is decoded as soon as it arrives. Where the two meet, and at which level the fetched chunks
come, is this module's decision. It is re-made every time the link is about to start a chunk and
every time the model is about to start one, with throughputs measured while loading:

* ``link``: bytes per second of the link and the latency of one request (from each fetch's
  first-byte and last-byte times), and the seconds per byte of checking a payload (its XXH3-128, or
  SHA-256 for files before format 1.3, on the link thread before the next request),
* ``decode``: seconds per cached element, per level (each chunk decoded is a sample), plus the
  one-time cost of a level's first decode in a process (its coding tables are built then),
* ``prefill``: seconds per token of this model on this device (each chunk recomputed is a sample).

They start from priors (:class:`Estimates`): the link is taken to be fast (10 Gbit/s; the header's own
request is too small to tell a fast link from a slow one) until a payload has been timed, or the rate
fitted over this origin's remembered fetches of different sizes (:func:`fetch_fit`, with a per-fetch
overhead), or, for a load with a budget and no such fit, what the last load from the same origin in this
process measured; and
the loader abandons a fetch that runs far slower than planned when re-planning without it is
predicted sooner, so a slow link costs one abandoned
fetch of a few tens of ms; prefill comes from the model's size (2 FLOPs per parameter per token at a nominal
device speed), decode from a nominal per-codec speed. After that the link's rate is the bytes over the seconds of
recent fetches, each weighted by its duration (:class:`LinkRate`), its latency (and a
level's one-time cost) exponentially weighted moving averages, and the compute speeds (prefill,
decode, first token, checking) the median of their recent samples (:class:`Recent`); the compute
speeds are remembered per (model, device, level) for the next load in the same process (a link per
origin, as the prior of the next load with a budget).

A *plan* for the chunks nobody has started yet, ``front..back``, is "fetch the last ``n`` of them
at level L (from the back), recompute the rest from text". Its predicted finish is

    max(compute, link tail)
    compute   = work in progress + queued decodes + Σ prefill(text chunks) + Σ decode(fetched chunks)
    link tail = max over fetched chunks t of (arrival_t + Σ decodes of the chunks arriving from t on)
    arrival_t = arrival_(t-1) + latency + overhead + bytes_t / rate + bytes_t × check

(a two-machine flow shop whose idle time the text chunks fill). Modes pick among plans:

* ``fastest``: the smallest predicted time to first token (ties within 1% go to higher quality);
* ``slo``: the highest quality predicted to meet ``slo`` seconds with a margin on the time still to go:
  2% (+5 ms) to start at a level, none (−2 ms) to stay with it or go down, 5% (+10 ms) to go up; else the
  fastest plan
  (and the report says the budget could not be met);
* ``min_level``: ``fastest`` among the levels at least as good as the floor (text always qualifies).

Quality of a plan is a distortion proxy: 0 for text and lossless chunks, ``4**-bits`` per element
for a lossy level stored at ``bits`` bits per element (a uniform quantiser's error power falls 4×
per bit), summed over elements. It orders levels by what they cost in bits, which is what a
stored ladder is built on; it is not the KL itself."""

from __future__ import annotations

import collections
import math
import statistics
import threading
from dataclasses import dataclass, field

TEXT = "text"
SLO_MARGIN = 0.95  # a plan meets the budget when the time it predicts still to go, over 95%, fits what is left
SLO_SLACK_S = 0.01  # and 10 ms more
SLO_START_MARGIN = 0.98  # starting at a level (nothing claimed yet): 98% of what is left
SLO_START_SLACK_S = 0.005  # and 5 ms
SLO_STAY_MARGIN = 1.0  # staying at the level the load is being fetched at, or going down: what is left
SLO_STAY_SLACK_S = 0.002  # less 2 ms
TIE = 0.01  # fastest mode: plans within 1% (of the time still to go) of the fastest count as equally fast
PROBE_RATES = (1.0, 0.1, 0.01)  # before the link is measured: links of the prior's rate down to 1/100 of it
REMEMBERED_PROBE_RATES = (2.0, 1.0, 0.5)  # ... or around the rate this origin's fetches of different sizes showed

# Nominal speeds for the priors (replaced by measurements as soon as there are any).
_FLOPS = {"cpu": 5e10, "cuda": 2e13, "mps": 3e12}
_DECODE_S_PER_ELEMENT = {"lossless": 15e-9}
_DEFAULT_DECODE_S_PER_ELEMENT = 40e-9
# Checking a payload on the link thread, before it is queued: SHA-256's ~650 MB/s. Files of format 1.3 are
# checked by their faster XXH3-128, so for them this is a conservative prior until one is measured.
_CHECK_S_PER_BYTE = 1.5e-9
OPTIMISTIC_LINK_BYTES_PER_S = 1.25e9  # 10 Gbit/s: the link's prior, until a payload has been timed
_COLD_S = 0.3  # a lossy level's first decode in a process builds its coding tables
_ALPHA = 0.5  # EWMA weight of a new sample: few samples per load, so follow them quickly
# The link's rate is bytes over seconds of the recent fetches, a fetch's weight decaying by e per LINK_TAU_S of
# transfer after it: a 40 ms lossless fetch outweighs ten 2 ms ones, whose times are mostly a thread's wake-up.
LINK_TAU_S = 0.1
REMEMBERED_LINK_WEIGHT_S = 0.02  # a link remembered from the last load counts as 20 ms of transfer at its rate
FETCH_SAMPLES = 64  # fetches (bytes, seconds) remembered per origin, for the per-fetch overhead
OVERHEAD_SPREAD = 4.0  # the overhead is fitted only from fetches whose sizes differ by this factor or more

_REMEMBERED: dict[tuple, float] = {}
_REMEMBERED_LOCK = threading.Lock()


@dataclass
class ChunkInfo:
    index: int
    start: int
    end: int
    elements: int  # cached K and V elements the chunk holds over all layers
    sizes: dict[str, int]  # level -> payload bytes

    @property
    def tokens(self) -> int:
        return self.end - self.start


@dataclass
class LevelInfo:
    name: str
    codec: str
    bits_per_element: float
    distortion: float  # per element: 0 for exact levels

    @property
    def exact(self) -> bool:
        return self.distortion == 0.0


def level_infos(header: dict, chunks: list[ChunkInfo]) -> dict[str, LevelInfo]:
    out = {}
    for name, entry in header["levels"].items():
        nbytes = sum(c.sizes.get(name, 0) for c in chunks)
        elements = sum(c.elements for c in chunks if name in c.sizes)
        bits = 8 * nbytes / max(elements, 1)
        exact = entry.get("codec") == "lossless"
        out[name] = LevelInfo(name, entry.get("codec", "?"), bits, 0.0 if exact else 4.0 ** (-bits))
    return out


class Recent:
    """The median of the last ``size`` samples, this load's and the earlier loads' in this process (the
    prior until there is one). For compute speeds on a machine shared with other work: one chunk decoded
    while the process was descheduled is an outlier, not the new speed. An exponential average with weight
    ½ followed the last two samples, so on a loaded 2-core machine the estimates of two levels that decode
    alike differed 3× from load to load, and the controller's choices between them with them."""

    def __init__(self, prior: float, history=(), size: int = 16):
        self.history = collections.deque(history, maxlen=size)
        self.samples = 0  # this load's
        self.value = statistics.median(self.history) if self.history else prior

    def add(self, sample: float) -> None:
        if not math.isfinite(sample) or sample <= 0:
            return
        self.history.append(sample)
        self.samples += 1
        self.value = statistics.median(self.history)


class LinkRate:
    """The link's rate in bytes/s: the bytes of recent fetches over their seconds, each fetch's weight falling
    by e for every ``LINK_TAU_S`` of transfer timed after it. Weighing fetches by their duration, not one
    sample each, is what keeps small payloads from deciding the rate: at 3 Gbit/s on the 2-core machine a
    360 KB chunk's time is mostly how soon the reading thread gets the interpreter (compact chunks at 0.54
    to 1.37 Gbit/s, lossless ones at 2.04 to 2.35, on one 3 Gbit/s link in bench/stream.py), and one slow
    one in a moving average of weight ½ could halve the estimate and turn the next chunks from lossless to
    compact. A prior counts as
    ``weight_s`` seconds of transfer at its rate (0: the first fetch timed replaces it); ``samples``
    counts the fetches timed in this load."""

    def __init__(self, value: float, samples: int = 0, weight_s: float = 0.0):
        self.value, self.samples = value, samples
        weight = weight_s if weight_s > 0 else (LINK_TAU_S if samples else 0.0)
        self._bytes, self._seconds = value * weight, weight

    def add_fetch(self, nbytes: float, seconds: float) -> None:
        if not (nbytes > 0 and seconds > 0 and math.isfinite(seconds) and math.isfinite(nbytes)):
            return
        keep = math.exp(-seconds / LINK_TAU_S)
        self._bytes = self._bytes * keep + nbytes
        self._seconds = self._seconds * keep + seconds
        self.value = self._bytes / self._seconds
        self.samples += 1

    @property
    def weight_s(self) -> float:
        return self._seconds

    def set(self, value: float, weight_s: float) -> None:
        """The rate is ``value`` from now on, as if measured over ``weight_s`` seconds of transfer."""
        self.value = value
        self._bytes, self._seconds = value * weight_s, weight_s


def fetch_fit(samples) -> tuple[float, float] | None:
    """(overhead seconds, rate bytes/s): a fetch's cost beyond its first byte's latency is ``seconds = overhead
    + bytes / rate``, fitted over ``samples`` of (bytes, seconds) by Theil–Sen (the median of the slopes of
    pairs whose sizes differ by ``OVERHEAD_SPREAD``× or more, then the median of ``seconds − slope·bytes``),
    so a stalled fetch or two do not move it. None when the sizes do not spread enough to tell an overhead
    from a rate (every fetch at one level), or the fit is not a positive rate.

    Why: on the 2-core machine a fetch's bytes take a few ms more than the link's rate says, however small it
    is (the reading thread waiting for the interpreter). At 3 Gbit/s 360 KB compact chunks showed 0.35-1.48
    Gbit/s and 10 MB lossless ones 2.08-2.28 (bench/stream.py's JSON), so a load whose last fetches were small
    remembered a link too slow for lossless, and a budget that lossless met was loaded at compact (--slo)."""
    pts = [(float(b), float(t)) for b, t in samples if b > 0 and t > 0 and math.isfinite(t)]
    if len(pts) < 4:
        return None
    slopes = [(t2 - t1) / (b2 - b1) for i, (b1, t1) in enumerate(pts) for b2, t2 in pts[i + 1:]
              if max(b1, b2) >= OVERHEAD_SPREAD * min(b1, b2)]
    if len(slopes) < 4:
        return None
    slope = statistics.median(slopes)
    if not slope > 0:
        return None
    intercept = statistics.median(t - slope * b for b, t in pts)
    return min(max(intercept, 0.0), 0.9 * min(t for _, t in pts)), 1.0 / slope


class Ewma:
    def __init__(self, value: float, samples: int = 0):
        self.value, self.samples = value, samples

    def add(self, sample: float) -> None:
        if not math.isfinite(sample) or sample <= 0:
            return
        self.value = sample if self.samples == 0 else (1 - _ALPHA) * self.value + _ALPHA * sample
        self.samples += 1


@dataclass
class Estimates:
    """What the controller believes about this link, model and device; updated as chunks complete."""

    link_bytes_per_s: LinkRate
    latency_s: Ewma
    prefill_s_per_token: Ewma | Recent
    decode_s_per_element: dict[str, Ewma | Recent]
    first_token_s: Ewma | Recent
    cold_s: dict[str, Ewma] = field(default_factory=dict)  # one-time cost of a level's first decode in a process
    # checking a payload (XXH3-128, or SHA-256 for files before format 1.3), on the link thread after its
    # last byte and before the next request
    check_s_per_byte: Ewma | Recent = field(default_factory=lambda: Recent(_CHECK_S_PER_BYTE))
    key: tuple = ()
    level_keys: dict[str, tuple] = field(default_factory=dict)
    origin: str | None = None  # where the bytes come from (scheme://host:port), for the next load from there
    link_remembered: bool = False  # the link's prior is what this origin showed (its fit, or the last load's rate)
    # seconds each fetch costs beyond latency + bytes/rate (fetch_fit of this origin's remembered fetches;
    # 0 without a budget or until fetches of different sizes have been timed there)
    overhead_s: float = 0.0
    fetches: list = field(default_factory=list)  # this load's (bytes, seconds), for the origin's memory

    @classmethod
    def seed(cls, model_key: str, device: str, params: int, levels: dict[str, dict],
             link_bytes_per_s: float, latency_s: float, origin: str | None = None,
             link_memory: bool = False, fitted_only: bool = False) -> Estimates:
        """Priors: remembered measurements for this model/device/level if any, else nominal ones. The link's
        measurements are kept per ``origin``, and with ``link_memory`` the link's prior is what this origin
        showed: the rate and overhead fitted over its remembered fetches of different sizes (:func:`fetch_fit`),
        else (unless ``fitted_only``: a load without a budget) the last load's rate."""
        device = device.split(":")[0]
        flops = _FLOPS.get(device, _FLOPS["cpu"])
        key = (model_key, device)
        with _REMEMBERED_LOCK:
            link = _REMEMBERED.get(("link", origin)) if origin and link_memory else None
            fit = fetch_fit(_REMEMBERED.get(("fetches", origin), ())) if origin and link_memory else None
            check = Recent(_CHECK_S_PER_BYTE, _REMEMBERED.get((device, "check"), ()))
            prefill = Recent(2.0 * params / flops, _REMEMBERED.get((*key, "prefill"), ()))
            first = Recent(0.02 + 2.0 * params / flops * 4, _REMEMBERED.get((*key, "first"), ()), size=8)
            level_keys = {name: (device, repr(sorted(entry.items()))) for name, entry in levels.items()}
            decode, cold = {}, {}
            for name, entry in levels.items():
                prior = _DECODE_S_PER_ELEMENT.get(entry.get("codec"), _DEFAULT_DECODE_S_PER_ELEMENT)
                decode[name] = Recent(prior, _REMEMBERED.get((*level_keys[name], "decode"), ()))
                cold_prior = 0.0 if entry.get("codec") == "lossless" else _COLD_S * (1 if device == "cpu" else 0.2)
                cold[name] = Ewma(_REMEMBERED.get((*level_keys[name], "cold"), cold_prior))
        overhead = 0.0
        if link is not None and fit is not None:  # the rate of the origin's recent fetches, their overhead apart
            link, overhead = (fit[1], link[1]), fit[0]
        elif fitted_only:
            link = None
        remembered = link is not None
        if link is None:
            # Until a payload is timed the link is taken to be fast (the first fetch is a probe: on a slow link it
            # is abandoned within ~10 ms of its transfer and re-planned at the rate it showed) ...
            link = (max(link_bytes_per_s, OPTIMISTIC_LINK_BYTES_PER_S), max(latency_s, 0.0))
        # ... or, from an origin this process has loaded from, to be what the last load measured there. Either is
        # a prior, not a sample: the first payload timed replaces it.
        return cls(
            link_bytes_per_s=LinkRate(link[0], weight_s=REMEMBERED_LINK_WEIGHT_S if remembered else 0.0),
            latency_s=Ewma(link[1]),
            prefill_s_per_token=prefill,
            decode_s_per_element=decode,
            first_token_s=first,
            cold_s=cold,
            check_s_per_byte=check,
            key=key,
            level_keys=level_keys,
            origin=origin,
            link_remembered=remembered,
            overhead_s=overhead,
        )

    @property
    def fixed_fetch_s(self) -> float:
        """What a fetch costs whatever its size: its request's latency and the per-fetch overhead."""
        return self.latency_s.value + self.overhead_s

    def observe_fetch(self, nbytes: int, latency: float, transfer: float) -> None:
        """One payload fetched: ``latency`` from the request to its first byte, ``transfer`` from there to
        the last. The rate is taken over ``max(transfer, latency + transfer - usual latency)``: when the
        thread that reads the bytes is held up (another thread holding the interpreter, the process
        descheduled) a whole payload can be sitting in the socket by the time its first byte is seen, and
        its transfer then looks instant: 425 KB "in 0.3 ms" at 1 Gbit/s put the link at 6 Gbit/s, and the
        next chunks were fetched at lossless."""
        usual = self.latency_s.value if self.latency_s.samples else 0.0
        self.latency_s.add(max(latency, 1e-6))
        seconds = max(transfer, latency + transfer - usual)
        if nbytes >= 4096 and seconds > 0:
            self.fetches.append((nbytes, seconds))
            # The fixed part of a fetch is not the link's: a small payload would otherwise make it look slow.
            self.link_bytes_per_s.add_fetch(nbytes, max(seconds - self.overhead_s, 0.25 * seconds))

    def link_rate_with(self, rate: float) -> float:
        """The link estimate if a fetch that shows ``rate`` (lower than believed) were taken into account.

        Before any payload was timed the estimate is only the optimistic prior: the rate shown replaces
        it. Once fetches have been timed it is one more sample of the moving average, so one fetch
        stalled for a moment (on a shared machine, the process descheduled) does not make the link look
        slow for the rest of the load."""
        ewma = self.link_bytes_per_s
        if not (rate > 0 and math.isfinite(rate)) or rate >= ewma.value:
            return ewma.value
        if ewma.samples == 0:
            return rate
        return (1 - _ALPHA) * ewma.value + _ALPHA * rate

    def observe_partial(self, nbytes: int, elapsed: float) -> None:
        """A fetch given up (or still under way): the rate it showed, if lower than believed, taken into
        account as :meth:`link_rate_with` says."""
        if nbytes > 0 and elapsed > 0:
            link = self.link_bytes_per_s
            if link.samples == 0:  # a measurement now: it replaces the prior
                link.set(min(nbytes / elapsed, link.value), elapsed)
                link.samples = 1
            else:
                link.set(self.link_rate_with(nbytes / elapsed), link.weight_s)

    def observe_decode(self, level: str, elements: int, seconds: float, cold: bool = False) -> None:
        """One chunk decoded. The first decode of a level in a process also builds its tables: that
        sample teaches the one-time cost, not the speed."""
        if not elements:
            return
        if cold:
            warm = elements * self.decode_s_per_element[level].value
            self.cold_s[level].add(max(seconds - warm, 1e-4))
        else:
            self.decode_s_per_element[level].add(seconds / elements)

    def observe_check(self, nbytes: int, seconds: float) -> None:
        if nbytes >= 65536:
            self.check_s_per_byte.add(seconds / nbytes)

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        if tokens:
            self.prefill_s_per_token.add(seconds / tokens)

    def observe_first_token(self, seconds: float) -> None:
        self.first_token_s.add(seconds)

    def remember(self) -> None:
        """Keep the compute speeds measured in this load for the next one in this process."""
        def kept(est):  # the samples behind a Recent estimate; a lone value otherwise
            return list(est.history) if isinstance(est, Recent) else [est.value]

        with _REMEMBERED_LOCK:
            if self.prefill_s_per_token.samples:
                _REMEMBERED[(*self.key, "prefill")] = kept(self.prefill_s_per_token)
            if self.first_token_s.samples:
                _REMEMBERED[(*self.key, "first")] = kept(self.first_token_s)
            for name, ewma in self.decode_s_per_element.items():
                if ewma.samples:
                    _REMEMBERED[(*self.level_keys[name], "decode")] = kept(ewma)
            for name, ewma in self.cold_s.items():
                if ewma.samples:
                    _REMEMBERED[(*self.level_keys[name], "cold")] = ewma.value
            if self.check_s_per_byte.samples:
                _REMEMBERED[(self.key[1] if self.key else "cpu", "check")] = kept(self.check_s_per_byte)
            if self.origin is not None and self.link_bytes_per_s.samples:
                _REMEMBERED[("link", self.origin)] = (self.link_bytes_per_s.value, self.latency_s.value)
            if self.origin is not None and self.fetches:
                kept_fetches = collections.deque(_REMEMBERED.get(("fetches", self.origin), ()), maxlen=FETCH_SAMPLES)
                kept_fetches.extend(self.fetches)
                _REMEMBERED[("fetches", self.origin)] = list(kept_fetches)
                self.fetches = []  # remembered once, however often this is called

    def as_dict(self) -> dict:
        return {
            "link_gbit_per_s": self.link_bytes_per_s.value * 8 / 1e9,
            "latency_ms": self.latency_s.value * 1e3,
            "prefill_ms_per_token": self.prefill_s_per_token.value * 1e3,
            "decode_ns_per_element": {k: v.value * 1e9 for k, v in self.decode_s_per_element.items()},
            "first_token_ms": self.first_token_s.value * 1e3,
            "check_ns_per_byte": self.check_s_per_byte.value * 1e9,
            "link_remembered": self.link_remembered,
            "fetch_overhead_ms": self.overhead_s * 1e3,
        }



@dataclass
class Policy:
    """What the user asked for: ``mode`` is ``fastest``, ``slo``, ``level`` (one forced level) or ``text``."""

    mode: str = "fastest"
    slo: float | None = None  # seconds, for mode "slo"
    level: str | None = None  # for mode "level"
    min_level: str | None = None  # quality floor for "fastest" and "slo"

    @classmethod
    def make(cls, level: str | None = None, slo: float | None = None, min_level: str | None = None) -> Policy:
        if level == TEXT:
            return cls(mode="text")
        if level is not None:
            return cls(mode="level", level=level)
        if slo is not None:
            return cls(mode="slo", slo=slo, min_level=min_level)
        return cls(mode="fastest", min_level=min_level)


@dataclass
class Snapshot:
    """The loader's state when a decision is due. Times in seconds from now; ``now`` from the load's start."""

    now: float
    front: int  # first chunk not yet recomputed (or being recomputed)
    back: int  # last chunk not yet claimed by the link; chunks front..back are undecided
    busy: float = 0.0  # what is left of the model's current step
    queued_decode: float = 0.0  # decodes of chunks that arrived and wait
    inflight_arrival: float | None = None  # when the chunk on the link will have arrived; None: nothing in flight
    inflight_decode: float = 0.0
    last_level: str | None = None  # the level of the last chunk the link claimed: the plan being carried out


@dataclass
class Plan:
    fetch: int  # how many undecided chunks to fetch, counted from the back
    level: str | None  # their level (None when fetch == 0)
    ttft: float  # predicted, seconds from the load's start (first token included)
    distortion: float
    meets_slo: bool | None = None


class Controller:
    def __init__(self, chunks: list[ChunkInfo], levels: dict[str, LevelInfo], policy: Policy, estimates: Estimates):
        self.chunks, self.levels, self.policy, self.est = chunks, levels, policy, estimates
        if policy.min_level is not None and policy.min_level not in levels and policy.min_level != TEXT:
            raise ValueError(policy.min_level)
        floor = math.inf if policy.min_level is None else (
            0.0 if policy.min_level == TEXT else levels[policy.min_level].distortion)
        self.allowed = [name for name, info in levels.items() if info.distortion <= floor]
        self.warm: set[str] = set()  # levels already decoded once in this process (their tables built)

    def decode_cost(self, chunk: ChunkInfo, level: str) -> float:
        cold = 0.0 if level in self.warm else self.est.cold_s[level].value
        return chunk.elements * self.est.decode_s_per_element[level].value + cold

    def plans(self, s: Snapshot, rate: float | None = None) -> list[Plan]:
        """Every plan of the family for the undecided chunks ``s.front..s.back`` (at the link rate
        believed, or at ``rate``), always in the same order."""
        est = self.est
        rate = est.link_bytes_per_s.value if rate is None else rate
        fixed = est.fixed_fetch_s
        check = est.check_s_per_byte.value
        prefill = est.prefill_s_per_token.value
        order = [self.chunks[k] for k in range(s.back, s.front - 1, -1)]  # fetch order: back first (may be empty)
        text_costs = [c.tokens * prefill for c in order]
        text_total = sum(text_costs)
        mean_text = text_total / len(order) if order else 0.0
        busy = s.busy + s.queued_decode  # compute already owed before any decision takes effect
        first = est.first_token_s.value

        def finish(work: float, tail: float, text_left: float, fetched: bool) -> float:
            # A text chunk is not interrupted: the last arrival may wait for the one under way.
            penalty = 0.5 * mean_text if (fetched and text_left > 0) else 0.0
            return max(work, tail + penalty)

        inflight = s.inflight_arrival is not None
        arrival0 = s.inflight_arrival if inflight else 0.0
        gap0 = max(busy, arrival0) if inflight else busy  # max over arrivals t of (arrival_t - decodes before t)
        decoded0 = s.inflight_decode if inflight else 0.0
        out = [Plan(0, None, s.now + finish(busy + decoded0 + text_total, gap0 + decoded0, text_total, False)
                    + first, 0.0)]
        for name in self.allowed:
            info = self.levels[name]
            per_element = est.decode_s_per_element[name].value
            arrival, gap, decoded = arrival0, gap0, decoded0
            if name not in self.warm:
                decoded += est.cold_s[name].value
            text_left, distortion = text_total, 0.0
            for n, chunk in enumerate(order, start=1):
                size = chunk.sizes.get(name)
                if size is None:
                    break
                arrival += fixed + size / rate + size * check
                gap = max(gap, arrival - decoded)
                decoded += chunk.elements * per_element
                # Exactly 0 once every chunk is fetched: a rounding remainder would count as a text chunk
                # still to recompute and add the half-chunk penalty to every all-fetch plan.
                text_left = max(text_left - text_costs[n - 1], 0.0) if n < len(order) else 0.0
                distortion += chunk.elements * info.distortion
                t = finish(busy + text_left + decoded, gap + decoded, text_left, True)
                out.append(Plan(n, name, s.now + t + first, distortion))
        return out

    def choose(self, s: Snapshot, measured: bool = False) -> Plan:
        """The plan for the undecided chunks. ``measured``: the link's rate is one a fetch is showing now (a probe
        being weighed), so it is planned on as measured, not hedged as the prior is."""
        p = self.policy
        if p.mode == "text":
            return Plan(0, None, math.nan, 0.0)
        if p.mode == "level":
            return Plan(max(s.back - s.front + 1, 0), p.level, math.nan, 0.0)
        # With nothing undecided the one plan is to finish what is under way (the step, the queue, the fetch
        # in flight): what keeping a slow fetch is weighed against when nothing else is left to decide.
        plans = self.plans(s)
        fastest = min(plans, key=lambda x: x.ttft)
        if p.mode == "slo" and p.slo is not None:
            return self._within_budget(s, plans, fastest, p.slo)
        if self.est.link_bytes_per_s.samples == 0 and not measured:
            return self._least_regret(s, plans)
        slack = TIE * max(fastest.ttft - s.now, 0.0) + 1e-4
        close = [x for x in plans if x.ttft <= fastest.ttft + slack]
        return min(close, key=lambda x: (x.distortion, x.ttft))

    def _within_budget(self, s: Snapshot, plans: list[Plan], fastest: Plan, slo: float) -> Plan:
        """``slo`` mode: the best quality among the plans predicted to meet the budget; the fastest if none is.

        Each plan is the whole rest of the load (one level for the chunks fetched, text for the others), and
        the chosen one decides the next chunk only. A margin on the time still to go absorbs what a prediction
        can get wrong: 5% of it and 10 ms to take up a plan at another level, 2% and 5 ms to start at one,
        none (the budget less 2 ms) to stay with the level the link is fetching at or go down. Predictions
        move by a few per cent from chunk to chunk on a shared machine, and with one margin for both the load
        went down a level on one pessimistic prediction and up on the next; a chunk one level down costs far more
        (KL 4-13× per level on the bench's ladder) than
        one a level up saves, so such a mix was worse than the uniform level it hovered around (bench/stream.py
        at 0.3 Gbit/s: high, balanced and compact chunks, KL 0.021, where balanced alone gave 0.0098). Slack
        left near the end is spent naturally: the fewer chunks remain, the sooner all of them fit a level up,
        and a level up is taken only with the wider margin. Staying needs no margin: the start's margin already
        covers the prediction's error once, and a chunk taken lower saves little time (bench/stream.py --slo: 9
        of 13 with a margin to stay and the link remembered from small fetches, 12-14 of 14 without either)."""

        def fits(x: Plan, margin: float, slack_s: float) -> bool:
            return s.now + (x.ttft - s.now) / margin + slack_s <= slo

        def no_better(x: Plan) -> bool:  # than the level the load is at (any level before it has claimed a chunk)
            if s.last_level is None:
                return True
            return x.level is not None and self.levels[x.level].distortion >= self.levels[s.last_level].distortion

        if s.last_level is None:
            lower = (SLO_START_MARGIN, SLO_START_SLACK_S)
        else:
            lower = (SLO_STAY_MARGIN, SLO_STAY_SLACK_S)
        feasible = [x for x in plans if fits(x, SLO_MARGIN, SLO_SLACK_S) or (no_better(x) and fits(x, *lower))]
        if feasible:
            best = min(feasible, key=lambda x: (x.distortion, x.ttft))
            best.meets_slo = True
            return best
        fastest.meets_slo = False
        return fastest

    def drop_is_better(self, keep: Plan, drop: Plan, index: int, level: str, now: float, probe: bool = False) -> bool:
        """Whether to give up the fetch of chunk ``index`` at ``level`` that is in flight: ``keep`` is the plan
        chosen with it kept, ``drop`` the one chosen with its chunk undecided again and the link free.

        Without a budget: when dropping is predicted clearly sooner (5% of the time left and 10 ms). With one:
        the plan that meets it, and when both do, the better quality, the chunk in flight counted in both:
        keeping a fetch that meets the budget only by bringing the rest a level or two lower is worse than
        dropping it (a first fetch at lossless, planned on a link nobody had measured, kept on a link that
        affords balanced: lossless 4 + compact 4, KL 0.009-0.015 where balanced alone gave 0.0098).

        A ``probe`` (the first fetch, planned on a link nobody had measured) is given up when dropping it is
        predicted sooner by 1% and 5 ms: its level was a hedge, not a plan, and what it showed is the first
        measurement. With the wider margin a first fetch at balanced on a 0.03 Gbit/s link was kept for
        0.2 s where compact would have taken 0.1 s (adaptive 1.11× the best single option)."""
        if self.policy.mode == "slo":
            if keep.meets_slo and drop.meets_slo:
                return drop.distortion < (keep.distortion + self.chunk_distortion(index, level)) * (1 - 1e-9)
            if keep.meets_slo or drop.meets_slo:
                return bool(drop.meets_slo)
        if probe:
            return drop.ttft < keep.ttft - 0.01 * max(keep.ttft - now, 0.0) - 0.005
        return drop.ttft < keep.ttft - 0.05 * max(keep.ttft - now, 0.0) - 0.01

    def chunk_distortion(self, index: int, level: str | None) -> float:
        """The quality proxy of one chunk at ``level`` (0 for text)."""
        if level is None or level == TEXT:
            return 0.0
        return self.chunks[index].elements * self.levels[level].distortion

    def _least_regret(self, s: Snapshot, plans: list[Plan]) -> Plan:
        """Before the link is measured (the first fetch is its probe): the plan whose predicted time is
        the least worse than the best plan's, at its worst over links of the prior's rate down to a
        hundredth of it. Taking the prior at its word fetched the first chunks at lossless, right at
        10 Gbit/s but 10–15% slower than the fastest option at 1–3 Gbit/s (bench/stream.py); a middle
        level costs a few per cent at 10 Gbit/s and is close to the best at every rate. A link fitted from this
        origin's fetches (``link_remembered``) is hedged over half to twice its rate only: on it the wide hedge's
        compact first chunk cost 14% at 10 Gbit/s, where lossless decodes fastest."""
        worst = [1.0] * len(plans)
        for scale in (REMEMBERED_PROBE_RATES if self.est.link_remembered else PROBE_RATES):
            at = plans if scale == 1.0 else self.plans(s, self.est.link_bytes_per_s.value * scale)
            best = max(min(x.ttft for x in at) - s.now, 1e-6)
            worst = [max(w, (x.ttft - s.now) / best) for w, x in zip(worst, at)]
        return min(zip(worst, plans), key=lambda wp: (round(wp[0], 2), wp[1].distortion, wp[1].ttft))[1]
