"""Step features of a simulated run: what the closed-loop fit of the LoRA step-time terms regresses on.

A step's time is linear in the profile's terms (``StepTime.step_ms`` plus adapter loads and scheduler overhead).
Along a fixed trajectory, any weighted mean of the step times is therefore ``Σ_j c_j·F_j``, with ``F_j`` the same
weighted mean of feature ``j`` (decoders, prefill tokens, distinct adapters, …). :class:`GaugeEngine` records two:

* **token-weighted** (``itl``): each decoding request gets one gap per step, so a step with ``N`` decoders counts
  ``N`` times; ``Σ_s N_s·dt_s / Σ_s N_s`` is the run's mean ITL;
* **running-weighted per decode token** (``tau``): ``Σ_s running_s·dt_s / decode tokens`` is the per-token time τ that
  Little's law gives from a run's gauges (mean running × duration / decode tokens), the fit's target.

A regression on a run's *time-averaged* gauges instead of these is biased wherever batch size and step time move
together (busy steps are long and full, so they weigh more): the closed-loop fit
(``benchmarks/twin_fidelity.py --fit --closed-loop``, docs/twin.md §Profiles) uses the simulated trajectory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from adaptwin.twin.engine import Engine
from adaptwin.twin.profile import Profile, price_rank_kernel

__all__ = ["FEATURES", "LORA_FEATURES", "GaugeEngine", "StepFeatures", "StepTermsEngine", "known_ms", "lora_ms"]

#: features of one step; the ``lora_*`` / ``adapters*`` ones are 0 on a step without an adapter
FEATURES = ("one", "n_decode", "n_decode_above_knee", "n_prefill", "context_ktokens", "load_ms", "running",
            "skipped_waiting", "lora", "lora_n_decode", "lora_n_prefill", "adapters", "adapters_ktokens",
            "rank_kernel_ms")
#: the features the LoRA terms multiply, in the order of :data:`adaptwin.twin.profile` 's lora_* terms
LORA_FEATURES = ("lora", "lora_n_decode", "lora_n_prefill", "adapters", "adapters_ktokens")


@dataclass
class StepFeatures:
    """Sums over steps of ``weight·feature`` and of the weight."""

    weight: float = 0.0
    sums: np.ndarray = field(default_factory=lambda: np.zeros(len(FEATURES)))

    def add(self, w: float, vals: np.ndarray) -> None:
        self.weight += w
        self.sums += w * vals

    def mean(self, per: float | None = None) -> dict[str, float]:
        """Each feature's sum divided by ``per`` (default: the summed weight; 0 features when nothing was added)."""
        d = per if per is not None else self.weight
        return {k: float(s / d) if d else 0.0 for k, s in zip(FEATURES, self.sums)}


def known_ms(prof: Profile, f: dict[str, float]) -> float:
    """The part of the step time (mean ``f``) that the calibration fixes: base, decode, prefill, attention, loads and
    scheduler overhead."""
    st = prof.step
    return (st.base_ms * f["one"] + st.decode_ms_per_seq * f["n_decode"]
            + st.decode_ms_per_seq_above_knee * f["n_decode_above_knee"] + st.prefill_ms_per_token * f["n_prefill"]
            + st.kv_read_ms_per_ktoken * f["context_ktokens"] + f["load_ms"] + prof.sched_base_ms * f["one"]
            + prof.sched_ms_per_running * f["running"] + prof.sched_ms_per_waiting_skipped * f["skipped_waiting"]
            + f["rank_kernel_ms"])


def lora_ms(prof: Profile, f: dict[str, float], max_lora_rank: int) -> float:
    """The LoRA part of the step time (mean ``f``) for a server started with ``max_lora_rank`` (lora family)."""
    st = prof.step
    c = (st.lora_base_ms, st.lora_ms_per_seq, st.lora_ms_per_prefill_token,
         st.lora_ms_per_adapter * st.adapter_rank_factor(max_lora_rank),
         st.lora_ms_per_adapter_ktoken)
    return st.rank_factor(max_lora_rank) * sum(ci * f[k] for ci, k in zip(c, LORA_FEATURES))


class StepTermsEngine(Engine):
    """An :class:`Engine` that tells, per accounted step, the adapter-load time charged since the last step
    (:meth:`_take_load_ms`); the engine passes each exact step's prefill tokens to ``_account``. The base of the
    diagnostic engines (slower: never the product path)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self._pending_load_ms = 0.0

    def _adapter_in(self, a: int) -> float:
        ms = super()._adapter_in(a)
        self._pending_load_ms += ms
        return ms

    def _take_load_ms(self) -> float:
        load_ms, self._pending_load_ms = self._pending_load_ms, 0.0
        return load_ms


class GaugeEngine(StepTermsEngine):
    """A :class:`StepTermsEngine` that records the token-weighted (``itl``) and running-weighted (``tau``) sums of
    its step features, and the summed gaps time (``itl_gap_s``) to check the first against the result's ITL."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.itl, self.tau = StepFeatures(), StepFeatures()
        self.itl_gap_s = 0.0
        self.steps = 0

    def _account(self, dt: float, steps: int, prefill_tokens: int = 0) -> None:
        super()._account(dt, steps, prefill_tokens)
        self.steps += steps
        load_ms = self._take_load_ms()
        n_run = len(self.running)
        if n_run == 0:
            return
        n_dec, a = self.n_decode, self.n_adapters
        lora = 1.0 if a else 0.0
        n_pre = prefill_tokens
        skipped = (self.n_waiting - self._w_in_batch) if a >= self.config.max_loras else 0
        # context tokens the decoders attend to, mean over the steps (it grows by n_dec a step), thousands
        ctx = (self._off_sum + n_dec * (self.step + 1 + (steps - 1) / 2)) * 1e-3
        rk = price_rank_kernel(self._rk, n_dec + n_pre, a) if a and self._rk_on else 0.0
        vals = np.array((1.0, n_dec, max(0.0, n_dec - self._knee), n_pre, ctx, load_ms / steps, n_run, skipped,
                         lora, lora * n_dec, lora * n_pre, a, a * (n_dec + n_pre) * 1e-3, rk))
        self.tau.add(n_run * steps, vals)
        if n_dec:
            self.itl.add(n_dec * steps, vals)
            self.itl_gap_s += n_dec * dt
