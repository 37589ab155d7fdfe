"""What a simulation returns: the ``--json`` summary, per-request and per-window Arrow tables."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from adaptwin.twin.engine import FINISHED, REJECTED, Engine

__all__ = ["SimResult", "STARVATION_THRESHOLD"]

STARVATION_THRESHOLD = 0.1  # starved <=> 1 - completed/offered >= 0.1 (paper §1.3)


@dataclass
class SimResult:
    """Outcome of one run over ``[0, duration)``; arrays are per request in arrival order."""

    config: Any
    duration: float
    window_s: float
    req: dict[str, np.ndarray]
    windows_acc: list
    adapter_loads: int
    preemptions: int
    steps: int
    wall_s: float = 0.0
    kv_capacity_tokens: int = 0
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_engine(cls, eng: Engine, duration: float, wall_s: float = 0.0) -> "SimResult":
        return cls(eng.config, float(duration), eng.window_s, eng.request_arrays(), eng.windows, eng.adapter_loads,
                   eng.preemption_count, eng.step, wall_s, eng.kv_capacity_tokens)

    # ---- masks --------------------------------------------------------------------------------------------
    @property
    def _arrived(self) -> np.ndarray:
        return self.req["arrival"] < self.duration

    @property
    def finished_mask(self) -> np.ndarray:
        """Requests that arrived and finished inside the window."""
        r = self.req
        return self._arrived & (r["status"] == FINISHED) & (r["finish_time"] <= self.duration)

    # ---- summary ------------------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """The ``--json`` object of DESIGN.md §CLI contract."""
        r, T = self.req, self.duration
        arrived, fin = self._arrived, self.finished_mask
        tokens = r["prompt"] + r["output"]
        total = float(tokens[fin].sum()) / T
        ideal = float(tokens[arrived].sum()) / T
        starved = int(ideal > 0 and 1.0 - total / ideal >= STARVATION_THRESHOLD)
        gaps = (r["output"][fin] - 1).sum()
        itl = float((r["last_token"][fin] - r["first_token"][fin]).sum() / gaps * 1000.0) if gaps > 0 else 0.0
        ttft = float(np.mean(r["first_token"][fin] - r["arrival"][fin]) * 1000.0) if fin.any() else 0.0
        return {
            "total_throughput": round(total, 4), "ideal_total_throughput": round(ideal, 4), "starved": starved,
            "arrivals": int(arrived.sum()), "finished": int(fin.sum()), "mean_ttft_ms": round(ttft, 4),
            "mean_itl_ms": round(itl, 4), "adapter_loads": int(self.adapter_loads), "wall_s": round(self.wall_s, 4),
        }

    # ---- tables -------------------------------------------------------------------------------------------
    @property
    def requests(self):
        """One row per request: timings (ms), tokens, finished, preempted (pyarrow Table)."""
        import pyarrow as pa

        r = self.req
        fin = self.finished_mask
        with np.errstate(invalid="ignore", divide="ignore"):
            ttft = (r["first_token"] - r["arrival"]) * 1000.0
            itl = np.where(r["generated"] > 1, (r["last_token"] - r["first_token"]) / (r["generated"] - 1) * 1000.0,
                           np.nan)
            e2e = np.where(fin, (r["finish_time"] - r["arrival"]) * 1000.0, np.nan)
        ttft = np.where(r["first_token"] <= self.duration, ttft, np.nan)
        state = np.array(["pending", "waiting", "running", "finished", "rejected"])[r["status"]]
        return pa.table({
            "request": np.arange(r["arrival"].size, dtype=np.int64), "ts": r["arrival"],
            "adapter": r["adapter"], "prompt_tokens": r["prompt"], "output_tokens": r["output"],
            "generated_tokens": r["generated"], "ttft_ms": pa.array(ttft, from_pandas=True),
            "itl_ms": pa.array(itl, from_pandas=True), "e2e_ms": pa.array(e2e, from_pandas=True),
            "finished": fin, "preempted": r["preemptions"].astype(np.int32),
            "rejected": r["status"] == REJECTED, "state": state,
        })

    @property
    def windows(self):
        """One row per window: offered/completed tokens, throughput, starvation, gauges, per-adapter starvation."""
        import pyarrow as pa

        r, W, T = self.req, self.window_s, self.duration
        nw = max(1, int(np.ceil(T / W)))
        arrived, fin = self._arrived, self.finished_mask
        tokens = r["prompt"] + r["output"]
        aw = np.minimum((r["arrival"][arrived] // W).astype(np.int64), nw - 1)
        fw = np.minimum((r["finish_time"][fin] // W).astype(np.int64), nw - 1)
        offered = np.bincount(aw, weights=tokens[arrived], minlength=nw)[:nw]
        completed = np.bincount(fw, weights=tokens[fin], minlength=nw)[:nw]
        n_arr = np.bincount(aw, minlength=nw)[:nw]
        n_fin = np.bincount(fw, minlength=nw)[:nw]
        n_ad = self.config.served
        off_a = np.bincount(aw * n_ad + r["adapter"][arrived], weights=tokens[arrived], minlength=nw * n_ad)[: nw * n_ad].reshape(nw, n_ad)
        com_a = np.bincount(fw * n_ad + r["adapter"][fin], weights=tokens[fin], minlength=nw * n_ad)[: nw * n_ad].reshape(nw, n_ad)
        ttft_w = np.bincount(fw, weights=(r["first_token"] - r["arrival"])[fin], minlength=nw)[:nw]
        gaps_w = np.bincount(fw, weights=(r["output"] - 1)[fin], minlength=nw)[:nw]
        span_w = np.bincount(fw, weights=(r["last_token"] - r["first_token"])[fin], minlength=nw)[:nw]
        rows = []
        for w in range(nw):
            acc = self.windows_acc[w] if w < len(self.windows_acc) else None
            span = min(W, T - w * W)
            ratio = 1.0 - completed[w] / offered[w] if offered[w] > 0 else 0.0
            per = []
            for a in np.nonzero(off_a[w] + com_a[w])[0]:
                o, c = off_a[w, a], com_a[w, a]
                per.append({"adapter_id": f"lora-{a}", "offered_tokens": int(o), "completed_tokens": int(c),
                            "starvation_ratio": float(1.0 - c / o) if o > 0 else 0.0})
            rows.append({
                "window_start": w * W, "window_end": w * W + span, "arrivals": int(n_arr[w]), "finished": int(n_fin[w]),
                "offered_tokens": int(offered[w]), "completed_tokens": int(completed[w]),
                "throughput": float(completed[w] / span), "starvation_ratio": float(ratio),
                "starved": int(ratio >= STARVATION_THRESHOLD),
                "running": (acc.running_s / span) if acc else 0.0, "waiting": (acc.waiting_s / span) if acc else 0.0,
                "kv_usage": (acc.kv_s / span) if acc else 0.0, "adapter_loads": acc.loads if acc else 0,
                "preemptions": acc.preemptions if acc else 0, "steps": acc.steps if acc else 0,
                "mean_ttft_ms": float(ttft_w[w] / n_fin[w] * 1000) if n_fin[w] else None,
                "mean_itl_ms": float(span_w[w] / gaps_w[w] * 1000) if gaps_w[w] else None,
                "adapters": per,
            })
        return pa.Table.from_pylist(rows)
