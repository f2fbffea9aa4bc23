"""Fine tokens: the token ids whose cache the model is far more sensitive to than to the others.

Some tokens act as attention sinks well past the first few positions: in SmolLM2, " the". Measured
with the model's own gradients on the calibration essays, its positions weigh 20× the mean position
and hold 51% of the KL a uniform quantiser would cause (PROFILE.md, fitting step 9). kvq levels
quantise the positions of fine tokens with a step ``2**shift`` times finer (each segment lists those
rows, CODEC.md step 4b): on held-out essays that cost 0.036 bits per element at one scale and cut the
KL by a third (BENCHMARKS.md, "Fine tokens").

Which ids those are is a property of the model, fitted once here and kept in its profile
(``Profile.fine_tokens``): per calibration text and sampled continuation, the gradient of the
continuation's log-likelihood with respect to the cache gives each position a weight
``w_t = Σ_{l,k,h,d} (∂/∂c_{t,d})² · step²_{l,k,h,d}`` (its share of the KL a uniform quantiser at the
profile's steps causes); positions in the last quarter of the context (what the next tokens read most,
for any token) and the sinks are left out. An id is fine when it occurs at least ``MIN_COUNT`` times
and in two texts (a word one essay is about is no property of the model),
its positions' mean weight is at least ``MIN_CONCENTRATION`` times the mean position's (what refining
it buys per bit it costs) and they hold at least ``MIN_SHARE`` of all the weight. The mean, not the
median: only some occurrences of " the" are sinks (its median position weighs little more than a typical
one), and the quantiser cannot tell which, so it refines them all and the mean is what that buys.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

MIN_COUNT = 8  # occurrences in the calibration contexts before an id can be judged
MIN_CONCENTRATION = 4.0  # mean weight of its positions over the mean position's
MIN_SHARE = 0.01  # of all the (far) positions' weight
MAX_IDS = 64
SHIFT = 1  # fine rows get half the step: measured on SmolLM2 like 1/4 (bench/rd_levers.py), and cheaper
SAMPLES = 4  # sampled continuations per text


def position_weights(lm, profile, ids: list[int], tokens: int, continuation: int, samples: int,
                     generator: torch.Generator) -> np.ndarray:
    """``w_t`` for the body positions (past the sinks) of the context ``ids[:tokens]``, summed over
    ``samples`` continuations of ``continuation`` tokens drawn from the model after it."""
    from kvc.codec.profile import coefficient_gradients
    from kvc.runtime.prefill import prefill

    n_ctx = min(tokens, len(ids) - continuation)
    ctx = prefill(lm, ids[:n_ctx])
    steps = profile.component_steps()  # [L, 2, H, D]
    S = profile.sinks
    w = np.zeros(max(0, n_ctx - S))
    for sample in coefficient_gradients(lm, ctx, ids[n_ctx : n_ctx + continuation], profile.arrays["basis"],
                                        profile.rotary, S, samples, generator):  # fmt: skip
        for layer, k, first, gc in sample:
            gc2 = gc.pow(2).numpy()  # [H, T, dim]
            at = first - S  # body index of this layer's first kept position
            w[at : at + gc2.shape[1]] += (gc2 * steps[layer, k, :, None, : gc2.shape[2]] ** 2).sum((0, 2))
    return w


def fit_fine_tokens(lm, profile, texts: list[str], tokens: int = 2048, continuation: int = 128,
                    samples: int = SAMPLES, seed: int = 0, max_texts: int = 3,
                    on_progress: Callable[[str, int, int], None] | None = None) -> tuple[dict | None, dict, int]:
    """(``{"ids": [...], "shift": SHIFT}`` or None when no id qualifies, the statistics behind it: for
    the 16 most concentrated ids their count, concentration and share, the number of texts measured) from
    the first ``max_texts`` calibration ``texts`` of at least ``4 · continuation`` tokens. Each text's
    weights are divided by its own median position's, so every text counts alike."""
    from kvc.runtime.prefill import tokenize

    progress = on_progress or (lambda stage, done, total: None)
    generator = torch.Generator().manual_seed(seed)
    chosen = [ids for ids in (tokenize(lm, t) for t in texts) if len(ids) >= 4 * continuation][:max_texts]
    ratios: dict[int, list[float]] = {}
    seen_in: dict[int, set[int]] = {}  # id -> the texts it occurs in
    if not chosen:  # texts too short to tell a sink from the context's end
        return None, {}, 0
    progress("fine", 0, len(chosen))
    for i, ids in enumerate(chosen):
        w = position_weights(lm, profile, ids, tokens, continuation, samples, generator)
        n = len(w)
        far = np.arange(n) < n - n // 4  # the last quarter is what any next token reads most: left out
        median = float(np.median(w[far])) if far.any() else 0.0
        if median > 0:
            body = ids[profile.sinks : profile.sinks + n]
            for t in np.flatnonzero(far):
                ratios.setdefault(int(body[t]), []).append(float(w[t] / median))
                seen_in.setdefault(int(body[t]), set()).add(i)
        progress("fine", i + 1, len(chosen))
    n_all = sum(len(r) for r in ratios.values())
    total = sum(sum(r) for r in ratios.values())
    stats = {tid: (len(r), sum(r) / len(r) / (total / n_all), sum(r) / total)  # count, concentration, share
             for tid, r in ratios.items() if len(r) >= MIN_COUNT} if total > 0 else {}  # fmt: skip
    # a property of the model, not of one text's topic: an id must occur in two texts when there are two
    spread = min(2, len(chosen))
    picked = sorted((tid for tid, (n, c, share) in stats.items()
                     if c >= MIN_CONCENTRATION and share >= MIN_SHARE and len(seen_in[tid]) >= spread),
                    key=lambda tid: -stats[tid][1])[:MAX_IDS]  # fmt: skip
    report = {str(tid): {"count": n, "concentration": round(c, 2), "share": round(share, 4)}
              for tid, (n, c, share) in sorted(stats.items(), key=lambda kv: -kv[1][1])[:16]}  # fmt: skip
    return ({"ids": sorted(picked), "shift": SHIFT} if picked else None), report, len(chosen)
