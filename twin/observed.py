"""Workloads observed in a trace file or in a replay's lake windows, as the search's per-adapter rates and ranks.

The search (``adaptwin recommend``) asks the paper's question: how many adapters *of this traffic* one server should
host. So every adapter seen becomes one rate group (``rates[k]``, ``ranks[k]``), and a candidate with ``served``
adapters gets them round-robin, as the paper's workload does. Rates are *request equivalents*: an adapter's offered
tokens per second divided by the model's mean tokens per request (the twin draws lengths from its ShareGPT table), so
the twin is offered exactly the tokens per second that were observed, whatever the trace's own lengths are.

Trace files are read through ``adaptwin.ingest`` (bad rows skipped, as ingest dead-letters them); lake windows
through its DuckDB catalog. Both imports happen only here, when a command asks for them: the simulator itself reads
no files but profiles.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from adaptwin.twin.config import ConfigError
from adaptwin.twin.lengths import load_lengths

__all__ = ["ObservedWorkload", "from_lake", "from_trace"]


@dataclass(frozen=True)
class ObservedWorkload:
    """Per-adapter rates (request equivalents, req/s) and ranks, busiest adapter first, and where they came from."""

    rates: tuple[float, ...]
    ranks: tuple[int, ...]
    offered_tokens_per_s: float
    span_s: float
    source: str


def _workload(tokens: dict[str, float], ranks: dict[str, int], span_s: float, model: str,
              source: str) -> ObservedWorkload:
    if span_s <= 0 or not tokens or sum(tokens.values()) <= 0:
        raise ConfigError(f"{source}: no traffic to derive a workload from")
    mean = load_lengths(model).mean_total
    order = sorted(tokens, key=lambda a: -tokens[a])
    return ObservedWorkload(tuple(tokens[a] / span_s / mean for a in order), tuple(ranks[a] for a in order),
                            sum(tokens.values()) / span_s, span_s, source)


def from_trace(path: str, model: str, fmt: str | None = None, adapters: int | None = None,
               ranks: tuple[int, ...] = (8,)) -> ObservedWorkload:
    """The workload of a trace file (any ingest format); ``adapters``/``ranks`` as ``adaptwin ingest`` assigns them
    to traces without adapter columns."""
    try:
        from adaptwin.ingest.source import IngestConfig, iter_batches
    except ImportError as err:  # pragma: no cover - ingest ships with adaptwin
        raise ConfigError(f"trace input needs adaptwin.ingest ({err})") from None
    cfg = IngestConfig(trace=path, format=fmt, adapters=adapters, ranks=tuple(ranks), run_id="recommend")
    tokens: dict[str, float] = {}
    rank_of: dict[str, int] = {}
    first = last = None
    for batch in iter_batches(cfg, batch_size=5000):
        for r in batch.requests:
            a = r["adapter_id"]
            tokens[a] = tokens.get(a, 0.0) + r["prompt_tokens"] + r["output_tokens"]
            rank_of.setdefault(a, int(r.get("adapter_rank") or ranks[0]))
            ts = float(r["ts"])
            first = ts if first is None else min(first, ts)
            last = ts if last is None else max(last, ts)
    if first is None:
        raise ConfigError(f"{path}: the trace holds no valid requests")
    return _workload(tokens, rank_of, last - first, model, f"trace {path}")


def from_lake(lake: str | Path, run_id: str, model: str, last_windows: int | None = None,
              ranks: tuple[int, ...] | None = None) -> ObservedWorkload:
    """The workload a replay run was offered, from its per-adapter window records in the lake (all windows, or the
    last ``last_windows``). Window records carry no ranks: the adapters, in name order, get ``ranks`` round-robin
    (default: the run's ``max_lora_rank`` for all, the conservative choice)."""
    from adaptwin.ingest import catalog

    where = "where run_id = ? and scope = 'window'"
    sql = (f"select window_start, window_end, max_lora_rank, a.adapter_id, a.offered_tokens from "
           f"(select *, unnest(adapters) as a from windows {where}) order by window_end")
    rows = catalog.query(lake, sql.replace("?", "'" + run_id.replace("'", "''") + "'")).to_pylist()
    if not rows:
        raise ConfigError(f"the lake {lake} has no windows of run {run_id!r}: check the run id "
                          "(adaptwin query \"select distinct run_id from windows\")")
    ends = sorted({r["window_end"] for r in rows})
    if last_windows is not None:
        keep = set(ends[-last_windows:])
        rows = [r for r in rows if r["window_end"] in keep]
    span = sum(e - s for s, e in {(r["window_start"], r["window_end"]) for r in rows})
    tokens: dict[str, float] = {}
    for r in rows:
        tokens[r["adapter_id"]] = tokens.get(r["adapter_id"], 0.0) + r["offered_tokens"]
    rank_list = ranks or (int(rows[0]["max_lora_rank"]),)
    rank_of = {a: rank_list[i % len(rank_list)] for i, a in enumerate(sorted(tokens))}
    tokens = {a: t for a, t in tokens.items() if t > 0}
    windows = len({r["window_end"] for r in rows})
    return _workload(tokens, rank_of, span, model, f"lake {lake}, run {run_id} ({windows} windows)")
