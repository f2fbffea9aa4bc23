"""kvc's rANS: the table rule, the executable spec, and every fast path bit-exact against it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvc.codec.rans import BAD_FINAL_STATE, EXHAUSTED, MAX_EXCESS, OK, cpu, reference
from kvc.codec.rans.tables import M, build_bank, quantize_frequencies, quantize_many

REPO = Path(__file__).resolve().parents[1]


def test_table_rule_golden():
    # Worked by hand in docs/CODEC.md ("Integer tables"): a file depends on these exact integers.
    assert quantize_frequencies(np.array([1e-6, 0.1, 0.25, 0.3, 0.25, 0.1, 1e-6])).tolist() == [
        1, 6554, 16383, 19660, 16383, 6554, 1]  # fmt: skip
    assert quantize_frequencies(np.ones(3)).tolist() == [21846, 21845, 21845]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(1e-30, 1e6), min_size=2, max_size=400))
def test_table_rule_properties(weights):
    f = quantize_frequencies(np.array(weights))
    assert f.sum() == M and f.min() >= 1 and len(f) == len(weights)


def test_vectorised_tables_equal_the_rule():
    rng = np.random.default_rng(1)
    ws = [rng.random(int(rng.integers(2, 700))) ** 4 + 1e-9 for _ in range(300)] + [np.ones(8193)]
    assert all(np.array_equal(a, b) for a, b in zip(quantize_many(ws), [quantize_frequencies(w) for w in ws]))


def _bank(rng, models=7, max_radius=60):
    freqs = []
    for _ in range(models):
        R = int(rng.integers(1, max_radius))
        w = np.exp(-0.5 * ((np.arange(2 * R + 1) - R) / max(R / 4, 0.3)) ** 2) + 2**-20
        freqs.append(quantize_frequencies(w))
    return build_bank(freqs)


def _values(rng, bank, model, tokens):
    R = (int(bank.alphabet[model]) - 1) // 2
    v = np.round(rng.standard_t(3, tokens) * R / 4).astype(np.int64)
    if tokens > 3:  # escapes: far, at the cap, and negative
        v[rng.integers(tokens)] = R + int(rng.integers(0, 1 << 20))
        v[rng.integers(tokens)] = -(R + MAX_EXCESS)
        v[rng.integers(tokens)] = -R
    return v


def _job(lanes_channels, tokens):
    """Job arrays for lanes listed as [[model, ...], ...], each channel of lane i ``tokens[i]`` long
    (``tokens`` may be one count for all), laid out channel after channel in the values buffer."""
    per_lane = np.broadcast_to(np.asarray(tokens, np.int64), (len(lanes_channels),))
    models = [m for lane in lanes_channels for m in lane]
    counts = np.array([t for lane, t in zip(lanes_channels, per_lane) for _ in lane], np.int64)
    bounds = np.cumsum([0] + [len(lane) for lane in lanes_channels])
    return {
        "ch_lo": bounds[:-1].astype(np.int64), "ch_hi": bounds[1:].astype(np.int64),
        "ch_model": np.array(models, np.int64), "ch_out": np.concatenate([[0], np.cumsum(counts)[:-1]]),
        "ch_tokens": counts, "ch_stride": np.ones(len(models), np.int64),
    }  # fmt: skip


def _with_words(job, lanes):
    ends = np.cumsum([len(w) for w in lanes]).astype(np.int64)
    return {**job, "words": np.concatenate(lanes).astype(np.uint16), "word_lo": ends - [len(w) for w in lanes],
            "word_hi": ends}  # fmt: skip


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), n_lanes=st.integers(1, 11), tokens=st.integers(1, 40),
       mixed=st.booleans())
def test_cpu_kernels_equal_the_reference(seed, n_lanes, tokens, mixed):
    rng = np.random.default_rng(seed)
    bank = _bank(rng)
    lanes_channels = [list(rng.integers(0, bank.models, int(rng.integers(1, 6)))) for _ in range(n_lanes)]
    # mixed: lanes of different token counts (a segment with sinks has fewer), run in one lockstep four
    per_lane = rng.integers(max(1, tokens - 4), tokens + 1, n_lanes) if mixed else np.full(n_lanes, tokens)
    job = _job(lanes_channels, per_lane)
    values = np.concatenate([_values(rng, bank, int(m), int(t)) for m, t in zip(job["ch_model"], job["ch_tokens"])])
    words, status = cpu.encode(job, bank, values)
    assert not status.any()
    chans = [values[o : o + t] for o, t in zip(job["ch_out"], job["ch_tokens"])]
    for i, (lane, w) in enumerate(zip(lanes_channels, words)):
        first = int(job["ch_lo"][i])
        ref = reference.encode_lane(bank, [int(m) for m in lane], chans[first : first + len(lane)])
        assert np.array_equal(ref, w)  # the fast encoder writes the spec's words
        st_ref, dec = reference.decode_lane(bank, ref, [int(m) for m in lane], int(per_lane[i]))
        assert st_ref == OK and all(np.array_equal(a, b) for a, b in zip(dec, chans[first : first + len(lane)]))
    full = _with_words(job, words)
    for threads in (1, 2, 3):  # four-lane lockstep, single lanes and thread shares all agree
        out = np.zeros(len(values), np.int64)
        assert (cpu.decode(full, bank, out, threads) == OK).all()
        assert np.array_equal(out, values)


def test_damaged_lanes_are_reported_never_crash():
    rng = np.random.default_rng(5)
    bank = _bank(rng)
    lanes_channels = [[1, 2, 3], [4, 5, 6], [0, 1, 2], [3, 4, 5], [6]]
    job = _job(lanes_channels, 30)
    values = np.concatenate([_values(rng, bank, int(m), 30) for m in job["ch_model"]])
    words, _ = cpu.encode(job, bank, values)
    short = [w[:-1] if i == 1 else w for i, w in enumerate(words)]
    long = [np.append(w, 7) if i == 2 else w for i, w in enumerate(words)]
    out = np.zeros(len(values), np.int64)
    st_short = cpu.decode(_with_words(job, short), bank, out)
    st_long = cpu.decode(_with_words(job, long), bank, out)
    assert st_short[1] in (EXHAUSTED, BAD_FINAL_STATE) and st_short[[0, 2, 3, 4]].tolist() == [OK] * 4
    assert st_long[2] == BAD_FINAL_STATE and st_long[[0, 1, 3, 4]].tolist() == [OK] * 4
    garbage = [rng.integers(0, 1 << 16, len(w)).astype(np.uint16) for w in words]
    for _ in range(20):  # random words: every lane ends with a status, nothing is written out of place
        st_g = cpu.decode(_with_words(job, garbage), bank, out)
        assert set(st_g.tolist()) <= {0, 1, 2, 3, 4}
        garbage = [rng.integers(0, 1 << 16, max(0, len(w) + int(rng.integers(-3, 3)))).astype(np.uint16)
                   for w in words]  # fmt: skip


def test_gpu_kernel_is_bit_exact_in_the_cuda_simulator(tmp_path):
    """The CUDA kernel, run by numba's simulator, against the CPU kernel on intact and damaged lanes."""
    rng = np.random.default_rng(11)
    bank = _bank(rng, models=5, max_radius=20)
    lanes_channels = [list(rng.integers(0, bank.models, int(rng.integers(1, 4)))) for _ in range(9)]
    job = _job(lanes_channels, 12)
    values = np.concatenate([_values(rng, bank, int(m), 12) for m in job["ch_model"]])
    words, _ = cpu.encode(job, bank, values)
    words[3] = words[3][:-2]  # one damaged lane
    full = _with_words(job, words)
    np.savez(tmp_path / "job.npz", **full, cum=bank.cum, start=bank.start, alphabet=bank.alphabet, lut=bank.lut)
    out = np.zeros(len(values), np.float32)
    status = cpu.decode(full, bank, out)
    np.save(tmp_path / "cpu_out.npy", out)
    np.save(tmp_path / "cpu_status.npy", status)
    script = textwrap.dedent(f"""
        import numpy as np
        from numba import cuda
        from kvc.codec.rans import gpu
        from kvc.codec.rans.tables import TableBank
        assert cuda.simulator_enabled if hasattr(cuda, "simulator_enabled") else True
        d = dict(np.load({str(tmp_path / "job.npz")!r}))
        bank = TableBank(cum=d.pop("cum"), start=d.pop("start"), alphabet=d.pop("alphabet"), lut=d.pop("lut"))
        out = np.zeros(len(np.load({str(tmp_path / "cpu_out.npy")!r})), np.float32)
        status = gpu.decode(d, bank, out)
        assert np.array_equal(status, np.load({str(tmp_path / "cpu_status.npy")!r})), status
        assert np.array_equal(out, np.load({str(tmp_path / "cpu_out.npy")!r}))
        print("bit-exact", status.tolist())
    """)
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1"}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300,
                         cwd=REPO)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert "bit-exact" in run.stdout and status[3] != OK


@pytest.mark.parametrize("fixture", ["v2-tiny-llama", "s3-tiny-llama"])
def test_gpu_read_path_matches_cpu_in_the_cuda_simulator(fixture):
    """The batched GPU read (every lane of every group in one launch, then synthesis per group) decodes the
    v2 fixture, and the version-3 one with fine rows, to exactly what the CPU path gives; run on host
    tensors under numba's simulator."""
    script = textwrap.dedent("""
        import torch, kvc
        f = kvc.open("tests/data/fixtures/FIXTURE.kvc")
        codec = f._codec("balanced")
        expected = f.read("balanced")
        groups = []  # the same groups read() builds, decoded through the GPU path
        layers = f.header["layout"]["layers"]
        payloads = [f._container.payload(i, "balanced") for i in range(len(f.header["chunks"]))]
        from kvc.codec.base import Segment
        for s in range(2 * len(layers)):
            layer, kind = divmod(s, 2)
            spec = layers[layer]
            parts = []
            for (enc, data), chunk in zip(payloads, f.header["chunks"]):
                off = sum(enc["segments"][:s])
                lo = max(chunk["start"], spec["start"])
                shape = (spec["kv_heads"], chunk["end"] - lo, spec["value_dim" if kind else "key_dim"])
                seg = Segment(layer, ("key", "value")[kind], lo, shape, f.dtype)
                parts.append((data[off : off + enc["segments"][s]], seg))
            out = torch.empty((shape[0], f.num_tokens, shape[2]), dtype=f.dtype)
            groups.append((parts, out))
        codec._decode_on_gpu(groups)
        for (parts, out), s in zip(groups, range(len(groups))):
            ref = expected.layers[s // 2].value if s % 2 else expected.layers[s // 2].key
            assert torch.equal(out, ref), s
        print("gpu path bit-exact")
    """).replace("FIXTURE", fixture)
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1"}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "gpu path bit-exact" in run.stdout
