"""The streaming learner's logic, without Kafka: one WINDOW record in, RECOMMENDATION (and drift) records out.

:class:`StreamLearner` holds everything that must survive a restart (models, drift detector, per-run policy and
recent windows, counters) and nothing that must not (timings live in :class:`Timings`, outside the checkpoint), so
that a learner restored from a checkpoint and fed the same windows publishes the very same records.

Per window (``scope="window"``; run records are counted, never learned — they repeat the windows' data):

1. the observed scenario (:func:`~adaptwin.learner.workload.observed`) is predicted, scored, and learned by every
   candidate model (prequential);
2. the chosen model's absolute log residual feeds the drift detector; on drift the models adapt and a ``drift``
   record is emitted;
3. the policy scores candidate configurations under the run's recent traffic and emits a ``recommendation``.

>>> win = {"v": 1, "run_id": "r", "backend": "twin", "scope": "window", "window_start": 0.0, "window_end": 60.0,
...        "served": 16, "max_loras": 8, "max_lora_rank": 16, "arrivals": 120, "finished": 118,
...        "offered_tokens": 50_400, "completed_tokens": 49_900, "throughput": 831.7, "starvation_ratio": 0.01,
...        "starved": 0, "adapters": [{"adapter_id": f"lora-{k}", "offered_tokens": 3150} for k in range(16)]}
>>> sl = StreamLearner(StreamConfig(models=("linear",), policy=PolicyConfig(grid=(8, 16, 32))))
>>> [r["kind"] for r in sl.process(win)]
['recommendation']
>>> sl.windows_learned, sl.recommendations
(1, 1)
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

from adaptwin.learner.dataset import Run
from adaptwin.learner.drift import DriftConfig, DriftMonitor
from adaptwin.learner.features import features
from adaptwin.learner.online import STREAM_CANDIDATES, OnlineModel
from adaptwin.learner.policy import Policy, PolicyConfig, TwinAnswer, twin_what_if
from adaptwin.learner.workload import Workload, check_window, observed
from adaptwin.schemas import SCHEMA_VERSION

__all__ = ["STATE_FORMAT", "StreamConfig", "StreamLearner", "Timings"]

log = logging.getLogger("adaptwin.learner.stream")


@dataclass(frozen=True)
class StreamConfig:
    model: str = "llama-3.1-8b-instruct"
    """The served base model (window records do not name it)."""
    ranks: tuple[int, ...] | None = None
    """Adapter k has ranks[k mod len] (None: every adapter has the window's max_lora_rank)."""
    models: tuple[str, ...] = STREAM_CANDIDATES
    run_id: str | None = None
    """Learn only the windows of this replay run (None: every run; one model, a policy per run)."""
    output_run_id: str | None = None
    """run_id written on the published records (None: the window's own run id, which the dashboard joins on)."""
    workload_windows: int = 3
    """Recent windows whose traffic the policy plans for."""
    seed: int = 0
    alpha: float = 0.1
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    drift: DriftConfig = field(default_factory=DriftConfig)

    def fingerprint(self) -> dict:
        """What a checkpoint must agree on to be resumed with these options."""
        return {"model": self.model, "models": list(self.models), "run_id": self.run_id,
                "output_run_id": self.output_run_id}


@dataclass
class Timings:
    """Time per window (not checkpointed: it differs from run to run). ``clock`` is wall time by default; the
    benchmark passes ``time.thread_time`` (CPU time: what the learner costs, not how busy a shared machine is)."""

    predict_s: float = 0.0
    learn_s: float = 0.0
    decide_s: float = 0.0
    windows: int = 0
    clock: Callable[[], float] = time.perf_counter

    def summary(self) -> dict:
        n = max(1, self.windows)
        return {"predict_ms": 1e3 * self.predict_s / n, "learn_ms": 1e3 * self.learn_s / n,
                "decide_ms": 1e3 * self.decide_s / n}


@dataclass
class _RunState:
    recent: collections.deque
    policy: Policy


STATE_FORMAT = 2
"""Layout of the checkpointed state (2: the policy keeps twin verdicts per workload signature)."""


class StreamLearner:
    def __init__(self, config: StreamConfig = StreamConfig()) -> None:
        self.state_format = STATE_FORMAT
        self.config = config
        self.model = OnlineModel(config.models, seed=config.seed, alpha=config.alpha)
        self.drift = DriftMonitor(config.drift)
        self.runs: dict[str, _RunState] = {}
        self.windows_learned = 0
        self.windows_skipped = 0  # run records, other runs, windows with no traffic for the served adapters
        self.recommendations = 0
        self.drifts = 0
        self.warm_sources: list[str] = []
        self.twin_warm_pending: float | None = None  # --warm-start twin: budget (s), spent once traffic is known
        self.offsets: dict[int, int] = {}  # partition -> next offset to read (set by the consumer)

    # ---- warm start ---------------------------------------------------------------------------------------------
    def warm(self, runs: list[Run], label: str) -> int:
        n = self.model.warm(runs)
        self.warm_sources.append(f"{label}:{n}")
        log.info("warm start from %s: %d runs", label, n)
        return n

    def _twin_warm(self, st: "_RunState", workload: Workload, budget_s: float, ask_twin) -> None:
        """``--warm-start twin``: the budget goes to the starvation boundary of the observed traffic (per max_loras,
        a bisection over served), whose answers both train the models and stand as the policy's twin verdicts."""
        if ask_twin is None:  # --no-twin forbids per-window questions, not the warm start the user asked for
            seed = self.config.seed
            ask_twin = lambda wl, s, m, d: twin_what_if(wl, s, m, d, seed=seed)  # noqa: E731
        st.policy.book.observe(workload)
        before = self.model.n_warm
        runs = st.policy.explore(self.model, ask_twin, budget_s)
        self.warm_sources.append(f"twin:{self.model.n_warm - before}")
        log.info("twin warm start: %d boundary runs on the observed traffic", runs)

    # ---- one window ---------------------------------------------------------------------------------------------
    def _run(self, run_id: str) -> _RunState:
        st = self.runs.get(run_id)
        if st is None:
            st = self.runs[run_id] = _RunState(collections.deque(maxlen=self.config.workload_windows),
                                               Policy(self.config.policy))
        return st

    def wants(self, w: dict) -> bool:
        return w.get("scope") == "window" and (self.config.run_id is None or w.get("run_id") == self.config.run_id)

    def process(self, w: dict, ask_twin: Callable[..., TwinAnswer | None] | None = None,
                timings: Timings | None = None) -> list[dict]:
        """Learn one schema-valid WINDOW record; returns the records to publish. Raises
        :class:`~adaptwin.learner.workload.WindowError` for a record that makes no sense (dead letter)."""
        if not self.wants(w):
            self.windows_skipped += 1
            return []
        check_window(w)
        cfg = self.config
        t = timings or Timings()
        st = self._run(w["run_id"])
        st.recent.append(w)
        workload = Workload.from_windows(list(st.recent), cfg.model, cfg.ranks)
        # the first window of a replay is its ramp-up: wait for `workload_windows` windows of traffic to explore
        if self.twin_warm_pending is not None and workload.active and len(st.recent) >= cfg.workload_windows:
            self._twin_warm(st, workload, self.twin_warm_pending, ask_twin)
            self.twin_warm_pending = None
        out: list[dict] = []
        obs = observed(w, cfg.model, cfg.ranks)
        if obs is not None:
            x = features(obs.scenario)
            t0 = t.clock()
            self.model.predict(x)  # what a live caller pays per window (timed; learn() re-predicts to score)
            t1 = t.clock()
            residual = self.model.learn(x, obs.throughput, obs.starved)
            t2 = t.clock()
            t.predict_s += t1 - t0
            t.learn_s += t2 - t1
            t.windows += 1
            self.windows_learned += 1
            if self.drift.update(abs(residual)):
                self.model.adapt()
                self.drifts += 1
                out.append(self._drift_record(w, residual))
        else:
            self.windows_skipped += 1
        if workload.active:
            t0 = t.clock()
            d = st.policy.decide(self.model, workload, w, ask_twin)
            t.decide_s += t.clock() - t0
            p = d.prediction
            out.append({"v": SCHEMA_VERSION, "run_id": self._out_id(w), "kind": "recommendation",
                        "window_end": float(w["window_end"]), "served": d.served, "max_loras": d.max_loras,
                        "predicted_throughput": p.throughput, "interval_low": p.low, "interval_high": p.high,
                        "starvation_prob": p.starvation_prob, "model": self.model.chosen,
                        "model_version": self.model.version, "changed": d.changed, "asked_twin": d.asked_twin,
                        "reason": d.reason})
            self.recommendations += 1
        return out

    def _out_id(self, w: dict) -> str:
        return self.config.output_run_id or w["run_id"]

    def _drift_record(self, w: dict, residual: float) -> dict:
        return {"v": SCHEMA_VERSION, "run_id": self._out_id(w), "kind": "drift", "window_end": float(w["window_end"]),
                "served": int(w["served"]), "max_loras": int(w["max_loras"]), "predicted_throughput": None,
                "interval_low": None, "interval_high": None, "starvation_prob": None, "model": self.model.chosen,
                "model_version": self.model.version, "changed": False, "asked_twin": False,
                "reason": (f"prediction error rose ({self.config.drift.method}): last |log residual| "
                           f"{abs(residual):.3f}; models adapted (residual corrector, interval and model choice "
                           f"restarted), version {self.model.version}")}

    def summary(self) -> dict:
        cur = {rid: st.policy.current for rid, st in self.runs.items()}
        return {"windows": self.windows_learned, "windows_learned": self.windows_learned,
                "windows_skipped": self.windows_skipped,
                "recommendations": self.recommendations, "drifts": self.drifts, "model": self.model.chosen,
                "model_version": self.model.version, "warm_start": ",".join(self.warm_sources) or None,
                "twin_asks": sum(st.policy.twin_asks for st in self.runs.values()),
                "recommended": {rid: list(c) if c else None for rid, c in cur.items()}}
