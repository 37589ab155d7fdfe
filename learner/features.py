"""Feature vectors for the learner: one candidate configuration under one adapter workload.

A :class:`Scenario` is what an operator knows *before* a run: the model, the adapter workload (request rates and
ranks per adapter group) and the candidate configuration (served adapters = ``--max-cpu-loras``, adapter slots =
``--max-loras``, ``--max-lora-rank``). Outcomes (throughput, starvation, latencies) are never features.

The strongest fact about throughput is that it cannot exceed the offered load. :func:`ideal_throughput` computes it
from the workload alone (Σ per-adapter rates × the model's mean tokens per request), and the learner predicts the
*ratio* of throughput to it (see :mod:`adaptwin.learner.models`). The second fact is that it cannot exceed what the
server completes when saturated: :func:`saturated_capacity` is a closed-form estimate of that from the configuration
(KV-limited batch, step time of that batch), so that a run's throughput is about ``min(offered, capacity)``.

Workloads are held as groups: ``rates[i]`` req/s for ``rate_counts[i]`` adapters, and ``ranks[j]`` for
``rank_counts[j]`` adapters. The paper's round-robin rule (adapter k gets ``rates[k mod len]``) gives the counts of
a scenario CSV row; the ML grid file lists them itself (``rate_counts``/``size_counts``).

>>> s = Scenario.round_robin("llama-3.1-8b-instruct", [0.1, 0.05, 0.025], [8, 16], served=128, max_loras=64)
>>> s.rate_counts, s.rank_counts, s.max_lora_rank
((43, 43, 42), (64, 64), 16)
>>> round(s.total_rate, 3)
7.5
>>> x = features(s)
>>> round(x["log_ideal"], 3), x["served"], x["max_loras"]
(8.055, 128.0, 64.0)
>>> saturated_capacity(s) > 3 * ideal_throughput(s)  # tokens/s when saturated: far above the load offered here
True
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Sequence

__all__ = ["ModelFacts", "Scenario", "features", "ideal_throughput", "model_facts", "saturated_capacity",
           "CapacityTerms", "FEATURE_NAMES"]


@dataclass(frozen=True)
class ModelFacts:
    """What the learner needs to know about a model: its request lengths and its KV capacity law."""

    model: str
    mean_prompt: float
    """Mean prompt tokens per request of the model's ShareGPT length table."""
    mean_output: float
    """Mean output tokens (``max_tokens``) per request."""
    kv_table: dict
    """(max_loras, max_lora_rank) -> measured KV cache tokens."""
    kv_intercept: float
    kv_per_slot_rank: float
    """Linear law for unmeasured entries: tokens = intercept - per_slot_rank · max_loras · max_lora_rank."""
    source: str = "profile"

    @property
    def mean_tokens(self) -> float:
        return self.mean_prompt + self.mean_output

    def kv_tokens(self, max_loras: int, max_lora_rank: int) -> float:
        """KV cache tokens vLLM reports at start-up (measured entry, else the linear law; at least one block)."""
        key = (int(max_loras), int(max_lora_rank))
        if key in self.kv_table:
            return float(self.kv_table[key])
        return max(16.0, self.kv_intercept - self.kv_per_slot_rank * max_loras * max_lora_rank)


# Fallbacks when the twin package (profiles, length tables) cannot be read: the paper's pool means
# (paper-digest §1.2) and the linear KV laws of data/calibration/estimator_constants.json (kv_capacity_linear_fit_here).
_FALLBACK = {
    "llama-3.1-8b-instruct": (419.97, 307158.31, 47.978193),
    "qwen-2.5-7b-instruct": (422.47, 702342.24, 88.039044),
}


@functools.lru_cache(maxsize=None)
def model_facts(model: str) -> ModelFacts:
    """Facts for ``model`` from the twin's shipped profile and length table; the documented fallback otherwise.

    Raises ValueError naming the known models when neither source knows ``model``.
    """
    try:
        from adaptwin.twin.lengths import load_lengths
        from adaptwin.twin.profile import load_profile

        prof = load_profile(model)
        lengths = load_lengths(model)
        return ModelFacts(model, lengths.mean_prompt, lengths.mean_output, dict(prof.kv_table),
                          prof.kv_intercept, prof.kv_per_slot_rank, "profile")
    except Exception as err:  # noqa: BLE001 - any failure of the twin's data falls back to the constants
        if model not in _FALLBACK:
            raise ValueError(f"unknown model {model!r}: no twin profile/length table ({err}) and no built-in "
                             f"constants (known: {', '.join(sorted(_FALLBACK))})") from None
        tokens, icpt, slope = _FALLBACK[model]
        # Split of the mean into prompt/output only matters for two features; ShareGPT is about 53/47.
        return ModelFacts(model, 0.53 * tokens, 0.47 * tokens, {}, icpt, slope, "fallback")


@dataclass(frozen=True)
class Scenario:
    """One candidate configuration under one workload (inputs only)."""

    model: str
    rates: tuple[float, ...]
    """Request rate (req/s) of one adapter of each group."""
    rate_counts: tuple[int, ...]
    """Adapters in each rate group (sums to ``served``)."""
    ranks: tuple[int, ...]
    rank_counts: tuple[int, ...]
    served: int
    """Adapters deployed and receiving traffic (vLLM ``--max-cpu-loras``)."""
    max_loras: int
    """Adapter slots (vLLM ``--max-loras``)."""
    max_lora_rank: int
    duration_s: float = 3600.0

    def __post_init__(self) -> None:
        if self.served < 1 or self.max_loras < 1:
            raise ValueError(f"served and max_loras must be >= 1, got {self.served} and {self.max_loras}")
        if len(self.rates) != len(self.rate_counts) or len(self.ranks) != len(self.rank_counts):
            raise ValueError("rates/ranks and their counts must have the same length")
        if not self.rates or not self.ranks:
            raise ValueError("rates and ranks must not be empty")
        if any((not math.isfinite(r)) or r < 0 for r in self.rates):
            raise ValueError(f"rates must be finite and >= 0 req/s, got {list(self.rates)}")
        if any(r < 1 for r in self.ranks):
            raise ValueError(f"ranks must be >= 1, got {list(self.ranks)}")
        if sum(self.rate_counts) != self.served:
            raise ValueError(f"rate counts {list(self.rate_counts)} do not sum to served={self.served}")
        if not math.isfinite(self.duration_s) or self.duration_s <= 0:
            raise ValueError(f"duration_s must be a positive number of seconds, got {self.duration_s}")

    @classmethod
    def round_robin(cls, model: str, rates: Sequence[float], ranks: Sequence[int], served: int, max_loras: int,
                    max_lora_rank: int | None = None, duration_s: float = 3600.0) -> "Scenario":
        """The paper's assignment: adapter k gets ``rates[k mod len]`` and ``ranks[k mod len]``."""
        served = int(served)
        rates = tuple(float(r) for r in rates)
        ranks = tuple(int(r) for r in ranks)
        if not rates or not ranks:
            raise ValueError("rates and ranks must not be empty")
        rc = tuple(served // len(rates) + (1 if i < served % len(rates) else 0) for i in range(len(rates)))
        kc = tuple(served // len(ranks) + (1 if i < served % len(ranks) else 0) for i in range(len(ranks)))
        mlr = int(max_lora_rank) if max_lora_rank else max(r for r, c in zip(ranks, kc) if c > 0)
        return cls(model, rates, rc, ranks, kc, served, int(max_loras), mlr, float(duration_s))

    @property
    def total_rate(self) -> float:
        """Σ over served adapters of their request rate (req/s)."""
        return sum(r * c for r, c in zip(self.rates, self.rate_counts))


def ideal_throughput(s: Scenario) -> float:
    """Offered load in tokens/s: Σ rates × mean (prompt + output) tokens per request of the model's length table."""
    return s.total_rate * model_facts(s.model).mean_tokens


@dataclass(frozen=True)
class CapacityTerms:
    """Step-time terms (ms) of the closed-form capacity: vLLM's step = base + per decode token + per prefill token
    + LoRA terms + scheduler work (the twin's :class:`~adaptwin.twin.profile.StepTimeModel` without its state)."""

    base_ms: float
    decode_ms_per_seq: float
    prefill_ms_per_token: float
    lora_base_ms: float
    lora_ms_per_seq: float
    lora_ms_per_adapter: float
    sched_ms_per_running: float = 0.0033831879
    sched_ms_per_waiting_skipped: float = 0.00023762347
    max_waiting: int = 25500
    """Waiting requests a saturated server holds (the paper client's cap): what the scheduler scans and skips."""
    max_num_seqs: int = 2048


# Fitted by `adaptwin twin fit` on data/calibration alone (profiler.fit.fit_profile without --real-params): the
# shipped profiles' LoRA terms were refitted on the 294 real runs, and a feature must not carry their outcomes.
_CALIBRATION_TERMS = {
    "llama-3.1-8b-instruct": CapacityTerms(10.541757, 0.043799381, 0.026517997, 6.710266, 0.037637110, 0.35712733),
    "qwen-2.5-7b-instruct": CapacityTerms(10.616814, 0.048944844, 0.023435697, 6.714441, 0.030254079, 0.35290936),
}


@functools.lru_cache(maxsize=None)
def _capacity_terms(model: str) -> CapacityTerms:
    if model in _CALIBRATION_TERMS:
        return _CALIBRATION_TERMS[model]
    from adaptwin.twin.profile import load_profile  # another model: its own profile (ValueError if none)

    p = load_profile(model)
    st = p.step
    return CapacityTerms(st.base_ms, st.decode_ms_per_seq, st.prefill_ms_per_token, st.lora_base_ms,
                         st.lora_ms_per_seq, st.lora_ms_per_adapter, p.sched_ms_per_running,
                         p.sched_ms_per_waiting_skipped, p.client_max_waiting or 25500)


def saturated_capacity(s: Scenario) -> float:
    """Closed-form tokens/s (input + output) of the configuration under a saturating load.

    The batch holds as many requests as the KV cache fits at their mean resident size (prompt + half the output +
    half a block), at most ``max_num_seqs``; every step decodes one token of each and prefills the prompts of the
    requests that replace finished ones (B·prompt/output tokens); with ``min(max_loras, served)`` adapters in the
    batch, and, when slots are fewer than adapters, the scheduler scanning the waiting queue. Throughput is then
    B/output requests per step × (prompt + output) tokens / step time. An estimate (the learner learns its error
    per configuration), built from inputs and calibration only.
    """
    facts = model_facts(s.model)
    t = _capacity_terms(s.model)
    prompt, output = facts.mean_prompt, facts.mean_output
    batch = min(float(t.max_num_seqs), facts.kv_tokens(s.max_loras, s.max_lora_rank) / (prompt + output / 2 + 8))
    prefill = batch * prompt / output
    adapters = min(s.max_loras, s.served)
    step_ms = (t.base_ms + t.decode_ms_per_seq * batch + t.prefill_ms_per_token * prefill + t.lora_base_ms
               + t.lora_ms_per_seq * batch + t.lora_ms_per_adapter * adapters + t.sched_ms_per_running * batch)
    if s.max_loras < s.served:
        step_ms += t.sched_ms_per_waiting_skipped * t.max_waiting * (1 - s.max_loras / s.served)
    return batch / output * (prompt + output) / (step_ms / 1000.0)


def _moments(values: Sequence[float], counts: Sequence[int]) -> tuple[float, float, float, float]:
    """Count-weighted (max, min, mean, std) over groups with a positive count."""
    pairs = [(v, c) for v, c in zip(values, counts) if c > 0]
    n = sum(c for _, c in pairs)
    mean = sum(v * c for v, c in pairs) / n
    var = sum(c * (v - mean) ** 2 for v, c in pairs) / n
    return max(v for v, _ in pairs), min(v for v, _ in pairs), mean, math.sqrt(var)


FEATURE_NAMES = (
    "is_qwen", "served", "max_loras", "log2_served", "log2_max_loras", "slots_over_served", "max_lora_rank",
    "log_ideal", "log_total_rate", "rate_max", "rate_min", "rate_mean", "rate_cv", "top_share", "hot_adapters",
    "rank_mean", "rank_max", "rank32_share", "mean_prompt", "mean_output", "kv_k", "kv_requests",
    "log_kv_load", "rate_per_slot", "log_cap", "cap_gap",
)


def features(s: Scenario, twin_throughput: float | None = None) -> dict[str, float]:
    """The feature dict of one scenario (small on purpose: river is pure Python and every key costs time).

    Workload: total and per-adapter rate statistics, popularity skew (coefficient of variation, the share of the
    offered requests carried by the busiest group, adapters needed to carry half the traffic), rank statistics,
    mean token lengths, the offered load. Candidate: served, max_loras, max_lora_rank and their ratio.
    Derived: the KV cache capacity (tokens, and requests of mean length it holds) and the offered load per KV slot;
    the saturated capacity (log) and its margin over the offered load (``cap_gap`` = log capacity − log offered:
    negative means the configuration is predicted to starve).

    ``twin_throughput``: the twin's total throughput for this very scenario (a simulation of the inputs, e.g.
    :func:`~adaptwin.learner.warmstart.twin_predictions`), added as ``twin_gap`` = log(twin / offered), ≤ 0.
    """
    facts = model_facts(s.model)
    rmax, rmin, rmean, rstd = _moments(s.rates, s.rate_counts)
    kmax, _kmin, kmean, _kstd = _moments(s.ranks, s.rank_counts)
    total = s.total_rate
    ideal = total * facts.mean_tokens
    # popularity: groups sorted by per-adapter rate, busiest first
    groups = sorted(((r, c) for r, c in zip(s.rates, s.rate_counts) if c > 0), reverse=True)
    top_share = groups[0][0] * groups[0][1] / total if total > 0 else 0.0
    half, acc, hot = 0.5 * total, 0.0, 0
    for r, c in groups:
        if r <= 0:
            break
        need = math.ceil((half - acc) / r) if acc < half else 0
        take = min(c, need)
        hot += take
        acc += take * r
        if acc >= half:
            break
    kv = facts.kv_tokens(s.max_loras, s.max_lora_rank)
    kv_requests = kv / facts.mean_tokens
    log_cap = math.log(max(saturated_capacity(s), 1e-3))
    out = {
        "is_qwen": 1.0 if s.model.startswith("qwen") else 0.0,
        "served": float(s.served),
        "max_loras": float(s.max_loras),
        "log2_served": math.log2(s.served),
        "log2_max_loras": math.log2(s.max_loras),
        "slots_over_served": min(1.0, s.max_loras / s.served),
        "max_lora_rank": float(s.max_lora_rank),
        "log_ideal": math.log(max(ideal, 1e-3)),
        "log_total_rate": math.log(max(total, 1e-6)),
        "rate_max": rmax,
        "rate_min": rmin,
        "rate_mean": rmean,
        "rate_cv": rstd / rmean if rmean > 0 else 0.0,
        "top_share": top_share,
        "hot_adapters": float(hot),
        "rank_mean": kmean,
        "rank_max": float(kmax),
        "rank32_share": sum(c for r, c in zip(s.ranks, s.rank_counts) if r >= 32) / s.served,
        "mean_prompt": facts.mean_prompt,
        "mean_output": facts.mean_output,
        "kv_k": kv / 1000.0,
        "kv_requests": kv_requests,
        # offered tokens/s per KV-resident request: how hard the cache is pressed
        "log_kv_load": math.log(max(ideal, 1e-3) / kv_requests),
        "rate_per_slot": total / min(s.max_loras, s.served),
        "log_cap": log_cap,
        "cap_gap": log_cap - math.log(max(ideal, 1e-3)),
    }
    if twin_throughput is not None and twin_throughput > 0 and ideal > 0:
        out["twin_gap"] = min(0.0, math.log(twin_throughput / ideal))
    return out
