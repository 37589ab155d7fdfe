"""Token-weighted step features of a simulated run: what a closed-loop fit of the step-time terms regresses on.

vLLM's mean ITL is token-weighted: every decoding request gets one gap per step, so a step with ``N`` decoders
counts ``N`` times. The mean ITL of a run is therefore ``Σ_s N_s·dt_s / Σ_s N_s`` — and, the step time being linear
in its terms, ``Σ_j c_j·F_j`` with ``F_j = Σ_s N_s·f_j(s) / Σ_s N_s`` the token-weighted mean of feature ``j``
(decoders, prefill tokens, distinct adapters, …). A regression on a run's *time*-averaged gauges (mean running
requests) instead of ``F`` is biased wherever the batch size and the step time move together (busy steps are long
and full, so they weigh more): :class:`GaugeEngine` records ``F`` so that the fit can use the simulated trajectory
(``benchmarks/twin_fidelity.py --fit``, docs/twin.md §Profiles).
"""

from __future__ import annotations

from dataclasses import dataclass

from adaptwin.twin.engine import Engine

__all__ = ["GaugeEngine", "StepTermsEngine", "StepFeatures", "FEATURES"]

#: features of one step, in the order :meth:`StepFeatures.weighted` returns them
FEATURES = ("one", "n_decode", "n_prefill", "adapters", "adapters_ktokens", "running", "skipped_waiting",
            "load_ms", "lora", "context_ktokens")


@dataclass
class StepFeatures:
    """Sums over steps of ``gaps·feature`` (gaps = decoders in the step) and the step count / time."""

    gaps: float = 0.0
    sums: list | None = None
    steps: int = 0
    busy_s: float = 0.0
    itl_gap_s: float = 0.0  # Σ gaps·dt, to check the token-weighted ITL against the result's

    def weighted(self) -> dict[str, float]:
        """Token-weighted mean of each feature (0 when the run had no decode gap)."""
        g = self.gaps or 1.0
        return {k: s / g for k, s in zip(FEATURES, self.sums or [0.0] * len(FEATURES))}


class StepTermsEngine(Engine):
    """An :class:`Engine` that tells, per accounted step, what its step-time terms were: the adapter-load time
    charged since the last step (:meth:`_take_load_ms`) and the prefill tokens of an exact step
    (:meth:`_prefill_tokens`). The base of the diagnostic engines (slower: never the product path)."""

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

    def _prefill_tokens(self, per_step_ms: float, steps: int, load_ms: float) -> float:
        """Prefill tokens of the step: what is left of its time after the terms that do not depend on them (0 for a
        jump of several identical decode steps, which prefill nothing)."""
        if steps != 1:
            return 0.0
        n_dec, a = self.n_decode, self.n_adapters
        lora = 1.0 if a else 0.0
        known = (self._c_base + self._c_dec * n_dec + load_ms + self._sched_ms() + self._kv_read_ms()
                 + lora * (self._l_base + self._l_dec * n_dec + a * (self._l_ad + self._l_adk * n_dec)))
        per_tok = self._c_pre + lora * (self._l_pre + a * self._l_adk)
        return max(0.0, (per_step_ms - known) / per_tok) if per_tok > 0 else 0.0


class GaugeEngine(StepTermsEngine):
    """A :class:`StepTermsEngine` that records the token-weighted features of its steps."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.features = StepFeatures(sums=[0.0] * len(FEATURES))

    def _account(self, dt: float, steps: int) -> None:
        super()._account(dt, steps)
        n_dec = self.n_decode
        gaps = n_dec * steps
        f = self.features
        f.steps += steps
        f.busy_s += dt
        load_ms = self._take_load_ms()
        if gaps == 0:
            return
        a = self.n_adapters
        lora = 1.0 if a else 0.0
        n_pre = self._prefill_tokens(dt * 1e3 / steps, steps, load_ms)
        skipped = (self.n_waiting - self._w_in_batch) if a >= self.config.max_loras else 0
        # context tokens the decoders attend to, mean over the steps (it grows by n_dec a step), thousands
        ctx = (self._off_sum + n_dec * (self.step + 1 + (steps - 1) / 2)) * 1e-3
        vals = (1.0, n_dec, n_pre, a, a * (n_dec + n_pre) * 1e-3, len(self.running), skipped, load_ms / steps,
                lora, ctx)
        s = f.sums
        for j, v in enumerate(vals):
            s[j] += gaps * v
        f.gaps += gaps
        f.itl_gap_s += gaps * dt / steps
