"""Turn an ingest trace (any format ``adaptwin.ingest`` reads) into twin :class:`Arrivals`.

Adapters are numbered in order of first appearance; adapter k's rank comes from the trace's ``adapter_rank``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from adaptwin.twin.config import Arrivals, ConfigError

__all__ = ["load_trace", "records_to_arrivals"]


def records_to_arrivals(records, served: int | None = None) -> tuple[Arrivals, list[int], int]:
    """REQUEST records (dicts with ts, adapter_id, adapter_rank, prompt_tokens, output_tokens) into arrivals."""
    index: dict[str, int] = {}
    ranks: list[int] = []
    ts, ad, pr, out = [], [], [], []
    for r in records:
        a = index.get(r["adapter_id"])
        if a is None:
            a = index[r["adapter_id"]] = len(ranks)
            ranks.append(int(r.get("adapter_rank") or 8))
        ts.append(float(r["ts"])); ad.append(a); pr.append(int(r["prompt_tokens"])); out.append(int(r["output_tokens"]))
    if not ts:
        raise ConfigError("the trace holds no valid requests")
    n_ad = len(ranks)
    if served is not None and served < n_ad:
        raise ConfigError(f"the trace uses {n_ad} adapters but --served is {served}; raise --served to >= {n_ad}")
    total = max(served or n_ad, n_ad)
    ranks += [ranks[k % n_ad] for k in range(total - n_ad)]
    t = np.array(ts)
    t -= t.min()
    return Arrivals(t, np.array(ad), np.array(pr), np.array(out)), ranks, total


def load_trace(path: str, fmt: str | None = None, served: int | None = None,
               ranks: Sequence[int] = (8,)) -> tuple[Arrivals, list[int], int]:
    """Read ``path`` through ``adaptwin.ingest`` (bad rows are skipped, as the ingest dead-letters them)."""
    try:
        from adaptwin.ingest.source import IngestConfig, iter_batches
    except ImportError as err:  # pragma: no cover - ingest ships with adaptwin
        raise ConfigError(f"trace input needs adaptwin.ingest ({err})") from None
    cfg = IngestConfig(trace=path, format=fmt, adapters=served, ranks=tuple(int(r) for r in ranks), run_id="twin")
    records = (r for batch in iter_batches(cfg, batch_size=5000) for r in batch.requests)
    return records_to_arrivals(records, served)
