"""The synthetic generator: spec grammar, Poisson statistics, determinism, the seeded shuffle."""

from __future__ import annotations

import numpy as np
import pytest

from adaptwin.cliutil import UserError
from adaptwin.ingest.popularity import AdapterAssigner, AdapterSet, Popularity
from adaptwin.ingest.readers.shipped import TraceLengths, trace_lengths
from adaptwin.ingest.source import IngestConfig
from adaptwin.ingest.synthetic import SyntheticSpec, generate

PAPER = "paper:rates=0.1,0.05,0.025;ranks=8,16,32;adapters=96;duration=3600;model=llama-3.1-8b-instruct;seed=0"


class FixedLengths:
    """A tiny stand-in length table for pure logic tests (the real one is tested below)."""

    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        return np.full(n, 100), np.full(n, 10)


def test_spec_grammar():
    spec = SyntheticSpec.parse(PAPER)
    assert (spec.kind, spec.rates, spec.ranks, spec.adapters, spec.duration, spec.seed) == (
        "paper", (0.1, 0.05, 0.025), (8, 16, 32), 96, 3600.0, 0)
    assert spec.length_source == "sharegpt"
    assert SyntheticSpec.parse("bursty").length_source == "azure-conv"
    for bad, why in [("poisson:rate=1", "unknown kind"), ("paper:rate=1", "not KEY=VALUE with a key of paper"),
                     ("paper:adapters=x", "not a int"), ("diurnal:amplitude=2", "amplitude"),
                     ("bursty:popularity=zipf:0", "Zipf exponent"), ("paper:rates=0.1;;adapters=0", "adapters")]:
        with pytest.raises(UserError, match=why):
            SyntheticSpec.parse(bad)


def test_paper_poisson_rates_per_adapter():
    spec = SyntheticSpec.parse("paper:rates=0.4,0.2,0.1;ranks=8,16,32;adapters=30;duration=20000;seed=1")
    w = generate(spec, FixedLengths())
    assert np.all(np.diff(w.ts) >= 0) and w.ts[0] > 0 and w.ts[-1] < 20000
    counts = np.bincount(w.adapter, minlength=30)
    observed = counts / spec.duration
    # each adapter's rate within 5 sigma of its Poisson count
    sigma = np.sqrt(w.rates * spec.duration) / spec.duration
    assert np.all(np.abs(observed - w.rates) < 5 * sigma)
    # ten adapters per rate, and the rank travels with the rate (round-robin pairs, shuffled together)
    assert sorted(w.rates.tolist()) == sorted([0.4, 0.2, 0.1] * 10)
    pair = {0.4: 8, 0.2: 16, 0.1: 32}
    assert all(pair[r] == k for r, k in zip(w.rates.tolist(), w.adapters.ranks))
    # exponential gaps: coefficient of variation 1
    gaps = np.diff(w.ts[w.adapter == int(np.argmax(w.rates))])
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.1)


def test_paper_is_deterministic_and_seed_shuffles():
    a = generate(SyntheticSpec.parse(PAPER), FixedLengths())
    b = generate(SyntheticSpec.parse(PAPER), FixedLengths())
    c = generate(SyntheticSpec.parse(PAPER.replace("seed=0", "seed=1")), FixedLengths())
    assert np.array_equal(a.ts, b.ts) and np.array_equal(a.adapter, b.adapter)
    assert not np.array_equal(a.rates, c.rates)  # which adapter carries which rate changes with the seed
    assert sorted(a.rates.tolist()) == sorted(c.rates.tolist())
    assert len(a.ts) == pytest.approx(32 * (0.1 + 0.05 + 0.025) * 3600, rel=0.05)


def test_other_kinds_rates_and_shapes():
    lengths = trace_lengths("azure-conv")
    T = 20_000
    bursty = generate(SyntheticSpec.parse(f"bursty:rate=5;burst=8;on=20;off=80;duration={T};seed=2"), lengths)
    assert len(bursty.ts) / T == pytest.approx(5, rel=0.15)
    per_second = np.bincount(bursty.ts.astype(int), minlength=T)
    assert per_second.var() / per_second.mean() > 3  # overdispersed, unlike Poisson (1)
    diurnal = generate(SyntheticSpec.parse(f"diurnal:rate=5;amplitude=0.8;duration={T};seed=2"), lengths)
    first, second = np.histogram(diurnal.ts, bins=2, range=(0, T))[0]
    # one sine period: the first half carries (1 + 2A/pi), the second (1 - 2A/pi) of the mean rate
    assert first / second == pytest.approx((1 + 0.8 * 2 / np.pi) / (1 - 0.8 * 2 / np.pi), rel=0.1)
    shifting = generate(SyntheticSpec.parse(f"shifting:rate=5;adapters=8;shift=1000;duration={T};seed=2"), lengths)
    top = [np.bincount(shifting.adapter[(shifting.ts >= e * 1000) & (shifting.ts < (e + 1) * 1000)],
                       minlength=8).argmax() for e in range(5)]
    assert top == [0, 1, 2, 3, 4]  # the most popular adapter moves one step per shift
    # lengths drawn from the Azure conv trace (pairs from the file, never synthetic values)
    pairs = set(zip(lengths.prompt.tolist(), lengths.output.tolist()))
    assert set(zip(bursty.prompt_tokens[:500].tolist(), bursty.output_tokens[:500].tolist())) <= pairs


def test_synthetic_through_source(ingest):
    spec = "paper:rates=0.5;adapters=4;duration=100;lengths=azure-code;seed=5"
    run = ingest(IngestConfig(synthetic=spec, run_id="syn"), batch_size=64)
    assert run.dead == [] and run.stats.accepted == len(run.requests) > 100
    assert all(len(b.requests) <= 64 for b in run.batches)
    assert run.requests[0]["source"] == "synthetic:paper:1"
    looped = ingest(IngestConfig(synthetic=spec, run_id="syn", loop=3, max_rows=2 * len(run.requests) + 5))
    assert len(looped.requests) == 2 * len(run.requests) + 5
    assert len({r["request_id"] for r in looped.requests}) == len(looped.requests)
    assert looped.requests[len(run.requests)]["ts"] == pytest.approx(run.requests[0]["ts"] + 100)


def test_sharegpt_lengths_from_the_twin(ingest):
    """Uses the twin's real ShareGPT length table (adaptwin.twin.lengths)."""
    from adaptwin.twin.lengths import load_lengths

    table = load_lengths("llama-3.1-8b-instruct")
    run = ingest(IngestConfig(synthetic=PAPER))
    assert len(run.requests) == pytest.approx(20_160, rel=0.05)
    pairs = set(zip(np.asarray(table.prompt).tolist(), np.asarray(table.output).tolist()))
    assert all((r["prompt_tokens"], r["output_tokens"]) in pairs for r in run.requests[:1000])
    assert {r["adapter_rank"] for r in run.requests} == {8, 16, 32}


def test_trace_lengths_sample_pairs():
    pool = TraceLengths(prompt=np.array([1, 2, 3]), output=np.array([10, 20, 30]))
    p, o = pool.sample(np.random.default_rng(0), 100)
    assert np.array_equal(o, p * 10)


def test_zipf_skew_and_assignment():
    w = Popularity.parse("zipf:1.1").weights(10)
    assert np.all(np.diff(w) < 0) and w.sum() == pytest.approx(1)
    assert Popularity.parse("zipf:2").weights(10)[0] > w[0]  # a larger exponent is more skewed
    assert np.allclose(Popularity.parse("uniform").weights(4), 0.25)
    sg = Popularity.parse("servegen").weights(10)
    assert np.all(np.diff(sg) <= 0) and sg[0] > 0.3
    with pytest.raises(UserError, match="fewer than the 100 adapters"):
        Popularity.parse("servegen:m-small").weights(100)
    assigner = AdapterAssigner(AdapterSet.round_robin(10, (8, 16, 32)), w, np.random.default_rng(0), ranks=(8, 16, 32))
    drawn = [assigner.next()[0] for _ in range(20_000)]
    counts = [drawn.count(f"lora-{k}") for k in range(10)]
    assert counts == sorted(counts, reverse=True) or all(a >= b * 0.9 for a, b in zip(counts, counts[1:]))
    assert counts[0] / 20_000 == pytest.approx(w[0], abs=0.02)
    assert assigner.rank_of("lora-4") == 16 and assigner.rank_of("lora-14") == 32


def test_popularity_through_source_is_seeded(ingest):
    a = ingest(IngestConfig(trace="azure-code", adapters=8, popularity="zipf:1.5", seed=1))
    b = ingest(IngestConfig(trace="azure-code", adapters=8, popularity="zipf:1.5", seed=1))
    c = ingest(IngestConfig(trace="azure-code", adapters=8, popularity="zipf:1.5", seed=2))
    ids = [r["adapter_id"] for r in a.requests]
    assert ids == [r["adapter_id"] for r in b.requests] != [r["adapter_id"] for r in c.requests]
    counts = [ids.count(f"lora-{k}") for k in range(8)]
    assert counts[0] > counts[1] > counts[3] > counts[7]
