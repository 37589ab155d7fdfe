"""Generate a synthetic telemetry lake of N rows (for query and dashboard benchmarks)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pyarrow as pa

from adaptwin import schemas
from adaptwin.ingest import lake


def telemetry_table(rng: np.random.Generator, n: int, run: str, first_id: int, adapter_ids: np.ndarray,
                    ts: np.ndarray, served: int = 128, max_loras: int = 32, max_output: int = 1024) -> pa.Table:
    """``n`` synthetic telemetry rows of ``run`` (request ids from ``first_id``), in the lake's schema."""
    ttft = rng.gamma(2.0, 60.0, n)
    out = rng.integers(4, max_output, n).astype(np.int32)
    cols = {
        "v": pa.array(np.ones(n, np.int16)),
        "request_id": pa.array([f"{run}-{first_id + i}" for i in range(n)]),
        "run_id": pa.array([run] * n),
        "backend": pa.array(["twin"] * n),
        "served": pa.array(np.full(n, served, np.int32)),
        "max_loras": pa.array(np.full(n, max_loras, np.int32)),
        "adapter_id": pa.array([f"lora-{a}" for a in adapter_ids]),
        "ts": pa.array(ts),
        "prompt_tokens": pa.array(rng.integers(4, 1024, n).astype(np.int32)),
        "output_tokens": pa.array(out),
        "ttft_ms": pa.array(ttft),
        "itl_ms": pa.array(rng.gamma(4.0, 5.0, n)),
        "e2e_ms": pa.array(ttft + out * 20.0),
        "finished": pa.array(rng.random(n) < 0.97),
        "preempted": pa.array(np.zeros(n, np.int32)),
        "error": pa.nulls(n, pa.string()),
    }
    return pa.table(cols).cast(schemas.TELEMETRY)


def telemetry_lake(root: Path, rows: int, file_rows: int = 500_000, runs: int = 4, adapters: int = 256,
                   seed: int = 0) -> int:
    """Write ``rows`` telemetry rows under ``root`` in files of ``file_rows``; returns the file count."""
    rng = np.random.default_rng(seed)
    today = dt.date.today()
    n_files = 0
    for start in range(0, rows, file_rows):
        n = min(file_rows, rows - start)
        run = f"bench-{n_files % runs}"
        table = telemetry_table(rng, n, run, start, rng.zipf(1.3, n) % adapters, np.sort(rng.uniform(0, 3600, n)))
        lake.write_atomic(table, lake.file_path(root, "telemetry", run, today, n_files % 4, start, start + n - 1))
        n_files += 1
    return n_files
