"""Pick a kvq level's step scale per file so the file keeps a promise: a KL target (``--target-kl``),
a size (``--max-bytes``) or a ratio to fp16 (``--ratio``).

KL: the encoder has the model loaded, so it measures the KL its own compressed cache causes on the
context's own last tokens. The context's final ``tail`` tokens (256, at most a quarter of it) are
held back: the cache of the tokens before them (the *probe prefix*) is encoded at a candidate scale
exactly as the file's chunks are, decoded, and the model scores the held-back tokens teacher-forced
after the exact and after the decoded prefix; the KL between the two next-token distributions,
averaged over those tokens, is the estimate for that scale. KL grows about as scale², so a secant on
log-scale/log-KL (slope clamped to [1, 3], at most ×4 per step, kept inside the bracket of scales
already measured) reaches the aim in 1–4 encodes. The scale whose estimate is nearest the aim is
used for the whole context.

The aim is ``AIM × target`` (1.0). An estimate from the context's own tail is not the KL on the text
that follows it: on three development contexts (argparse.py, the MPL-2.0 text, dpkg's triggers.txt;
not the benchmark's test contexts) the held-out KL over the next 256 tokens was 0.79× the tail
estimate (geometric mean; 0.56–1.14×), which puts an estimate of 1.0 × target at the log-centre of
the band [0.5, 1.3] × target the held-out KL must land in (docs/BENCHMARKS.md has the command).

Size: bytes fall monotonically as the scale grows (about one bit per element per doubling), so the
scale for a byte budget is found by bisection on log-scale over full encodes; the largest-quality
(smallest) scale that fits is kept."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from kvc.errors import InputError

AIM = 1.0  # the estimate is steered to AIM × target (see the module docstring)
TAIL = 256  # tokens of the context's own tail that score a candidate scale
MIN_TOKENS = 32  # shorter contexts leave too few tail tokens to measure anything
MAX_TRIES = 5
# stop once the estimate is within [aim / TOLERANCE_LOW, aim × TOLERANCE_HIGH]: on the development contexts the
# held-out KL was 0.56–1.14× the estimate, so an estimate in [0.9, 1.1]·X keeps it inside [0.5, 1.3]·X
TOLERANCE_LOW = 1 / 0.9
TOLERANCE_HIGH = 1.1
SCALE_RANGE = (0.01, 40.0)
MAX_STEP = 4.0


@dataclass
class Choice:
    scale: float
    estimate: float | None  # the measured KL (nats/token) at ``scale``, or the bytes for a size target
    tokens: int  # tail tokens the KL was measured on (0 for a size target)
    tries: list[tuple[float, float]] = field(default_factory=list)  # (scale, measured) in the order tried

    aim: float = AIM

    def record(self, kind: str, target: float) -> dict:
        """The ``target`` object a level entry carries in the header (docs/FORMAT.md)."""
        out = {"kind": kind, "value": target, "tries": len(self.tries)}
        if kind == "kl":
            out.update({"estimate": self.estimate, "tail_tokens": self.tokens, "aim": self.aim})
        else:
            out["bytes"] = int(self.estimate) if self.estimate is not None else None
        return out


def _probe(lm, kv, tail: int):
    """(probe prefix cache, held-back tail ids): the context minus its last ``tail`` tokens, holding what
    each layer would hold for that shorter context (a sliding-window layer's suffix is recomputed)."""
    from kvc.runtime.kv import ContextKV, LayerKV
    from kvc.runtime.prefill import prefill

    n = kv.num_tokens - tail
    ids = list(kv.token_ids)
    if any(layer.start for layer in kv.layers):
        prefix = prefill(lm, ids[:n])
    else:
        prefix = ContextKV(token_ids=ids[:n], layers=[
            LayerKV(key=lay.key[:, :n], value=lay.value[:, :n], start=0) for lay in kv.layers])
    return prefix, ids[n:]


def _secant(tries: list[tuple[float, float]], aim: float) -> float:
    """The next scale to try: a log-log secant through the two tries nearest the aim (slope clamped to
    [1, 3]; 2 with one try), kept strictly inside the bracket the tries so far establish."""
    ranked = sorted(tries, key=lambda t: abs(math.log(max(t[1], 1e-12) / aim)))
    s1, k1 = ranked[0]
    slope = 2.0
    if len(ranked) > 1:
        s2, k2 = ranked[1]
        if s1 != s2 and k1 > 0 and k2 > 0 and k1 != k2:
            slope = min(3.0, max(1.0, math.log(k1 / k2) / math.log(s1 / s2)))
    # at most ×4 per step: far from the tried scales KL stops following a power law (at coarse scales
    # every coefficient rounds to zero and KL saturates at what the profile's means alone give)
    nxt = s1 * min(MAX_STEP, max(1 / MAX_STEP, (aim / max(k1, 1e-12)) ** (1.0 / slope)))
    below = [s for s, k in tries if k < aim]  # scales known to be too fine
    above = [s for s, k in tries if k >= aim]  # scales known to be too coarse
    lo, hi = (max(below) if below else None), (min(above) if above else None)
    if lo is not None and hi is not None and not lo < nxt < hi:
        nxt = math.sqrt(lo * hi)
    return min(SCALE_RANGE[1], max(SCALE_RANGE[0], nxt))


def choose_scale_for_kl(lm, kv, target: float, measure: Callable[[object, float], object], start: float,
                        tail: int = TAIL, max_tries: int = MAX_TRIES, aim: float = AIM) -> Choice:
    """The scale whose tail-KL estimate is nearest ``AIM × target``. ``measure(prefix_kv, scale)`` returns the
    probe prefix decoded after encoding at ``scale`` (the caller encodes exactly as the file will)."""
    from kvc.evaluation.quality import compare, continuation_logprobs

    if not 0 < target < 10:
        raise InputError("--target-kl must be a KL in nats/token, greater than 0 and below 10")
    if kv.num_tokens < MIN_TOKENS:
        raise InputError(f"--target-kl needs a context of at least {MIN_TOKENS} tokens to measure on "
                         f"(this one has {kv.num_tokens})")
    n_tail = max(8, min(tail, kv.num_tokens // 4))
    prefix, cont = _probe(lm, kv, n_tail)
    reference = continuation_logprobs(lm, prefix, cont)
    aim = aim * target
    tries: list[tuple[float, float]] = []
    scale = min(SCALE_RANGE[1], max(SCALE_RANGE[0], start))
    for _ in range(max_tries):
        decoded = measure(prefix, scale)
        kl = compare(reference, continuation_logprobs(lm, decoded, cont), cont).kl
        tries.append((scale, kl))
        if aim / TOLERANCE_LOW <= kl <= aim * TOLERANCE_HIGH:
            break
        nxt = _secant(tries, aim)
        if any(abs(math.log(nxt / s)) < 1e-3 for s, _ in tries):
            break  # pinned at the end of the range, or converged
        scale = nxt
    best = min(tries, key=lambda t: abs(math.log(max(t[1], 1e-12) / aim)))
    return Choice(scale=best[0], estimate=best[1], tokens=len(cont), tries=tries, aim=aim / target)


def choose_scale_for_bytes(max_bytes: int, size_at: Callable[[float], int], start: float,
                           max_tries: int = 8) -> Choice:
    """The smallest scale (best quality) whose level fits in ``max_bytes``, by bisection on log-scale
    (a secant first: bytes fall about linearly in log-scale). ``size_at(scale)`` encodes and counts."""
    tries: list[tuple[float, float]] = []
    scale = start
    lo = hi = None  # lo: largest scale that is too big; hi: smallest scale that fits
    for _ in range(max_tries):
        size = size_at(scale)
        tries.append((scale, float(size)))
        if size <= max_bytes:
            hi = scale if hi is None else min(hi, scale)
            if size >= 0.97 * max_bytes:
                break
        else:
            lo = scale if lo is None else max(lo, scale)
        if lo is not None and hi is not None:
            if hi / lo < 1.03:
                break
            scale = math.sqrt(lo * hi)
        elif hi is None:
            scale = min(SCALE_RANGE[1], scale * max(1.25, (size / max_bytes) ** 2))
            if scale == SCALE_RANGE[1] and any(s == scale for s, _ in tries):
                break
        else:
            scale = max(SCALE_RANGE[0], scale / max(1.25, (max_bytes / max(size, 1)) ** 2))
            if scale == SCALE_RANGE[0] and any(s == scale for s, _ in tries):
                break
    fits = [(s, b) for s, b in tries if b <= max_bytes]
    if not fits:
        smallest = min(b for _, b in tries)
        raise InputError(f"no kvq scale fits {max_bytes:,} bytes: the coarsest tried still takes {int(smallest):,}")
    best = min(fits, key=lambda t: t[0])
    return Choice(scale=best[0], estimate=best[1], tokens=0, tries=tries)


def _round(scale: float) -> float:
    return float(f"{scale:.4g}")


def targeted_entries(lm, kv, levels: list[str], chunk_tokens: int, profile, target_kl: float | None = None,
                     max_bytes: int | None = None, ratio: float | None = None, aim: float = AIM,
                     tail: int = TAIL) -> dict[str, dict]:
    """``{level: header entry}`` for the one kvq level in ``levels``, its scale chosen for this context so
    it meets exactly one of ``target_kl`` / ``max_bytes`` / ``ratio``, with a ``target`` record
    (docs/FORMAT.md). Other levels (lossless beside it) are left to their defaults."""
    import kvc
    from kvc.api import _resolve_profile, encode_kv
    from kvc.codec.levels import LEVEL_KL, level_kl
    from kvc.codec.registry import level_entry, level_names
    from kvc.runtime.identity import model_identity

    given = [x for x in (target_kl, max_bytes, ratio) if x is not None]
    if len(given) != 1:
        raise InputError("give one of --target-kl, --max-bytes and --ratio")
    unknown = [name for name in levels if name not in level_names()]
    if unknown:
        raise InputError(f"unknown level {unknown[0]!r}: choose from {', '.join(level_names())}")
    model = model_identity(lm)
    prof = _resolve_profile(levels, model, profile)
    lossy = [(name, level_entry(name, prof)) for name in levels if name != "lossless"]
    lossy = [(name, entry) for name, entry in lossy if entry.get("codec") == "kvq"]
    if len(lossy) != 1 or any(name not in ("lossless", lossy[0][0]) for name in levels):
        raise InputError("--target-kl, --max-bytes and --ratio tune one kvq level (e.g. --level balanced), "
                         "optionally beside lossless")
    name, base = lossy[0]
    start = float(base["params"]["scale"])
    if target_kl is not None and name in LEVEL_KL and 0 < target_kl < 10:
        # first guess: the level's scale moved by KL ∝ scale² from the KL it gives on essays
        start *= math.sqrt(aim * target_kl / level_kl(name, prof))

    def entry_at(scale: float) -> dict:
        return {**base, "params": {**base["params"], "scale": _round(scale)}}

    if target_kl is not None:
        def measure(prefix, scale):
            data = encode_kv(prefix, model, [name], chunk_tokens, prof, level_entries={name: entry_at(scale)})
            with kvc.open(data, profile=prof) as f:
                return f.read(name)

        choice = choose_scale_for_kl(lm, kv, float(target_kl), lambda p, s: measure(p, _round(s)), start,
                                     tail=tail, aim=aim)
        record = choice.record("kl", float(target_kl))
    else:
        fp16 = 2 * sum(lay.key.numel() + lay.value.numel() for lay in kv.layers)
        if ratio is not None:
            if not 1 <= ratio <= 1000:
                raise InputError("--ratio must be between 1 and 1000 (times smaller than fp16)")
            budget = int(fp16 / ratio)
        else:
            if max_bytes < 1:
                raise InputError("--max-bytes must be positive")
            budget = int(max_bytes)

        def size_at(scale):
            data = encode_kv(kv, model, [name], chunk_tokens, prof, level_entries={name: entry_at(_round(scale))})
            with kvc.open(data, profile=prof) as f:
                return f.level_bytes(name)

        choice = choose_scale_for_bytes(budget, size_at, start)
        record = choice.record("ratio" if ratio is not None else "bytes", float(ratio) if ratio is not None
                               else int(max_bytes))
    return {name: {**entry_at(choice.scale), "target": record}}
