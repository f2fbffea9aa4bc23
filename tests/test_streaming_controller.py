"""The controller's choices from given throughputs (no clocks involved): what it fetches, what it
recomputes, and what each mode trades."""

from __future__ import annotations

import pytest

from kvc.streaming.controller import ChunkInfo, Controller, Estimates, Ewma, Policy, Snapshot, level_infos

LEVELS = {"lossless": {"codec": "lossless"}, "high": {"codec": "kvq"}, "compact": {"codec": "kvq"}}
# 8 chunks of 256 tokens; 1e6 elements each; bytes per chunk as a 4-level ladder would store them.
SIZES = {"lossless": 3_500_000, "high": 450_000, "compact": 150_000}


def setup(link_bytes_per_s: float, policy: Policy, prefill_s_per_token=3e-3, decode=None) -> Controller:
    chunks = [ChunkInfo(i, 256 * i, 256 * (i + 1), 1_000_000, dict(SIZES)) for i in range(8)]
    header = {"levels": LEVELS}
    decode = decode or {"lossless": 15e-9, "high": 40e-9, "compact": 35e-9}
    est = Estimates(link_bytes_per_s=Ewma(link_bytes_per_s, 1), latency_s=Ewma(1e-3, 1),
                    prefill_s_per_token=Ewma(prefill_s_per_token, 1),
                    decode_s_per_element={k: Ewma(v, 1) for k, v in decode.items()},
                    first_token_s=Ewma(0.1, 1), cold_s={k: Ewma(0.0) for k in LEVELS})
    ctl = Controller(chunks, level_infos(header, chunks), policy, est)
    ctl.warm = set(LEVELS)
    return ctl


def start() -> Snapshot:
    return Snapshot(now=0.01, front=0, back=7)


def test_a_fast_link_fetches_everything_at_the_fastest_decoding_level():
    plan = setup(1.25e9, Policy()).choose(start())  # 10 Gbit/s
    assert (plan.fetch, plan.level) == (8, "lossless")


def test_a_slow_link_recomputes_some_chunks_and_fetches_the_smallest():
    plan = setup(3.75e5, Policy()).choose(start())  # 3 Mbit/s: compact chunks take 0.4 s, prefill 0.77 s
    assert plan.level == "compact" and 0 < plan.fetch < 8
    text_only = setup(3.75e5, Policy()).plans(start())[0]
    assert plan.ttft < text_only.ttft


def test_a_dead_slow_link_recomputes_everything():
    plan = setup(1e3, Policy()).choose(start())  # 1 kB/s
    assert plan.fetch == 0 and plan.level is None


def test_fastest_plan_is_never_predicted_slower_than_text():
    for rate in (1e3, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10):
        ctl = setup(rate, Policy())
        plans = ctl.plans(start())
        assert ctl.choose(start()).ttft <= plans[0].ttft * 1.011


def test_slo_takes_the_best_quality_that_fits_and_says_when_none_does():
    fast = setup(1.25e9, Policy.make(slo=10.0)).choose(start())
    assert fast.meets_slo and fast.distortion == 0.0  # lossless or text: exact chunks only
    tight = setup(1.25e7, Policy.make(slo=1.2)).choose(start())  # 100 Mbit/s, 1.2 s
    assert tight.meets_slo and tight.ttft <= 1.2
    assert tight.level in ("high", "compact")
    fastest = setup(1.25e7, Policy()).choose(start())
    assert tight.distortion <= fastest.distortion
    impossible = setup(1e3, Policy.make(slo=0.05)).choose(start())
    assert impossible.meets_slo is False and impossible.fetch == 0


def test_quality_floor_excludes_worse_levels():
    ctl = setup(1.25e6, Policy.make(min_level="high"))
    assert ctl.allowed == ["lossless", "high"]
    assert ctl.choose(start()).level in (None, "lossless", "high")
    with pytest.raises(ValueError):
        setup(1.25e6, Policy.make(min_level="nonsense"))


def test_a_cold_level_pays_its_table_cost_once():
    ctl = setup(1.25e8, Policy(), decode={"lossless": 40e-9, "high": 30e-9, "compact": 30e-9})
    ctl.est.cold_s["compact"] = Ewma(5.0, 1)
    ctl.warm = {"lossless", "high"}
    assert ctl.choose(start()).level != "compact"
    ctl.warm.add("compact")
    assert ctl.decode_cost(ctl.chunks[0], "compact") == pytest.approx(0.03)


def test_forced_modes():
    assert setup(1e3, Policy.make(level="high")).choose(start()).fetch == 8
    assert setup(1e10, Policy.make(level="text")).choose(start()).fetch == 0


def test_one_stalled_fetch_does_not_make_a_measured_link_look_slow():
    # A fetch that shows 1/20 of the link's measured rate (the process descheduled for a moment on a shared
    # machine) counts as one more sample of the average: the plan stays with the fastest-decoding level.
    ctl = setup(3.75e8, Policy())  # 3 Gbit/s, measured (one sample)
    assert ctl.choose(start()).level == "lossless"
    stalled = 3.75e8 / 20
    assert ctl.est.link_rate_with(stalled) == pytest.approx((3.75e8 + stalled) / 2)
    ctl.est.observe_partial(int(stalled * 0.1), 0.1)
    assert ctl.choose(start()).level == "lossless"
    # The same rate shown while the link is known only by its optimistic prior replaces the prior.
    prior = setup(3.75e8, Policy())
    prior.est.link_bytes_per_s = Ewma(3.75e8)
    assert prior.est.link_rate_with(stalled) == stalled
    prior.est.observe_partial(int(stalled * 0.1), 0.1)
    assert prior.choose(start()).level != "lossless"
    # A rate above the estimate changes nothing (a partial fetch cannot tell a faster link).
    assert ctl.est.link_rate_with(1e12) == ctl.est.link_bytes_per_s.value


def test_with_nothing_left_to_decide_the_plan_is_to_finish_what_is_under_way():
    # Chunk 7 is on a slow link (arrives in 2.6 s), chunks 0..6 are decided: keeping the fetch means waiting
    # for it. Dropping it (chunk 7 undecided again, the link free) lets a small level bring it far sooner.
    ctl = setup(3.75e6, Policy())  # 30 Mbit/s
    keep = ctl.choose(Snapshot(now=0.05, front=7, back=6, busy=0.5, inflight_arrival=2.6, inflight_decode=0.015))
    assert keep.fetch == 0 and keep.ttft == pytest.approx(0.05 + 2.6 + 0.015 + 0.1)
    drop = ctl.choose(Snapshot(now=0.05, front=7, back=7, busy=0.5))
    assert drop.level in ("high", "compact") and drop.ttft < keep.ttft - 1.0
    slo = setup(3.75e6, Policy.make(slo=1.0))
    assert slo.choose(Snapshot(now=0.05, front=7, back=6, busy=0.5, inflight_arrival=2.6)).meets_slo is False
    assert slo.choose(Snapshot(now=0.05, front=7, back=7, busy=0.5)).meets_slo is True


def test_the_first_partial_measurement_replaces_the_prior_and_counts_as_a_sample():
    ctl = setup(1.25e9, Policy())
    ctl.est.link_bytes_per_s = Ewma(1.25e9)  # the optimistic prior, nothing timed
    ctl.est.observe_partial(131_072, 0.1)
    assert ctl.est.link_bytes_per_s.value == pytest.approx(1_310_720) and ctl.est.link_bytes_per_s.samples == 1


def test_an_all_fetch_plan_is_predicted_without_any_text_penalty():
    # Prefill costs whose sum does not round back to 0 when taken away one by one (0.1 + 0.2 + ... in floats).
    for prefill in (3e-3, 8.967493394774907e-3, 1.1e-3 / 3):
        ctl = setup(1.25e9, Policy(), prefill_s_per_token=prefill)
        snap = Snapshot(now=0.0, front=0, back=7)
        plan = next(p for p in ctl.plans(snap) if p.fetch == 8 and p.level == "lossless")
        arrival = 8 * (1e-3 + SIZES["lossless"] / 1.25e9)
        decode = 8 * 1_000_000 * 15e-9
        # the link brings chunk 1 before chunk 0 is decoded: the decodes are the critical path after the first arrival
        expected = max(arrival + 15e-3, (1e-3 + SIZES["lossless"] / 1.25e9) + decode) + 0.1
        assert plan.ttft == pytest.approx(expected, rel=1e-6)


def test_compute_speeds_are_the_median_of_recent_samples_and_carry_over_to_the_next_load():
    from kvc.streaming import controller

    levels = {"high": {"codec": "kvq"}}
    key = ("test-weights", "cpu")
    controller._REMEMBERED.pop((*key, "prefill"), None)
    est = Estimates.seed("test-weights", "cpu", 135_000_000, levels, 1e9, 1e-3)
    assert est.prefill_s_per_token.value == pytest.approx(2 * 135e6 / 5e10)  # the nominal prior
    for seconds in (1.0, 1.1, 0.9, 5.0):  # 256-token chunks; one recomputed while the machine was busy
        est.observe_prefill(256, seconds)
    assert est.prefill_s_per_token.value == pytest.approx(1.05 / 256)
    for seconds in (0.1, 0.1, 0.1, 0.6):  # one decode five times slower than the others
        est.observe_decode("high", 1_000_000, seconds)
    assert est.decode_s_per_element["high"].value == pytest.approx(0.1 / 1e6)
    est.remember()
    again = Estimates.seed("test-weights", "cpu", 135_000_000, levels, 1e9, 1e-3)
    assert again.prefill_s_per_token.value == pytest.approx(1.05 / 256)
    assert again.decode_s_per_element["high"].value == pytest.approx(0.1 / 1e6)
    assert again.prefill_s_per_token.samples == 0  # this load has measured nothing yet
    controller._REMEMBERED.pop((*key, "prefill"), None)
    controller._REMEMBERED.pop((*again.level_keys["high"], "decode"), None)


def test_a_payload_whose_transfer_looks_instant_does_not_make_the_link_look_fast():
    ctl = setup(1.25e8, Policy())  # 1 Gbit/s measured, 1 ms usual latency
    # 425 KB whose first byte was seen 15 ms after the request and the rest "0.3 ms" later: the reading
    # thread was held up while the bytes arrived. Its time counts from the request, less the usual latency.
    ctl.est.observe_fetch(425_000, 0.015, 0.0003)
    assert ctl.est.link_bytes_per_s.value == pytest.approx((1.25e8 + 425_000 / (0.0153 - 1e-3)) / 2)
    assert ctl.est.link_bytes_per_s.value < 1.25e8
    # A normal fetch: its transfer time is what counts.
    fresh = setup(1.25e8, Policy())
    fresh.est.observe_fetch(10_000_000, 0.001, 0.08)
    assert fresh.est.link_bytes_per_s.value == pytest.approx((1.25e8 + 10_000_000 / 0.08) / 2)


def test_before_the_link_is_measured_the_first_choice_holds_up_at_slower_links():
    """Unmeasured, the link is only its optimistic prior: taken at its word, the first chunks would come
    at lossless (right at 10 Gbit/s, far from it at 1). The choice is the plan least worse than the
    best at every rate from the prior down to 1/100 of it; once a fetch is timed, the rate decides."""
    ctl = setup(1.25e9, Policy())
    ctl.est.link_bytes_per_s = Ewma(1.25e9)  # the prior alone: no sample
    plan = ctl.choose(start())
    assert plan.level != "lossless"
    worst = {}  # per plan: how many times the best plan's time it takes, at its worst over those rates
    for scale in (1.0, 0.1, 0.01):
        at = ctl.plans(start(), 1.25e9 * scale)
        best = min(x.ttft for x in at) - 0.01
        for x in at:
            worst[(x.fetch, x.level)] = max(worst.get((x.fetch, x.level), 1.0), (x.ttft - 0.01) / best)
    assert worst[(plan.fetch, plan.level)] == pytest.approx(min(worst.values()), abs=0.01)
    assert worst[(plan.fetch, plan.level)] < 2 < worst[(8, "lossless")]
    measured = setup(1.25e9, Policy()).choose(start())  # the same rate, measured: lossless as before
    assert (measured.fetch, measured.level) == (8, "lossless")
