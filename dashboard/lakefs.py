"""What the file system says about the lake: size, file counts and freshness per table (no DuckDB)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from adaptwin.ingest import lake


@dataclass(frozen=True)
class TableFiles:
    table: str
    files: int
    bytes: int
    runs: int
    newest_mtime: float | None  # unix time of the newest published file
    temp_files: int  # *.parquet.tmp: a sink writing now, or left by one that died

    @property
    def age_s(self) -> float | None:
        return None if self.newest_mtime is None else max(0.0, time.time() - self.newest_mtime)


def scan(root: Path) -> list[TableFiles]:
    out = []
    for table in lake.TABLES:
        base = root / table
        files = size = temps = 0
        newest: float | None = None
        runs = set()
        for path in base.glob("run_id=*/date=*/*.parquet*"):
            try:
                st = path.stat()
            except FileNotFoundError:  # renamed or compacted while we looked
                continue
            if path.name.endswith(".parquet"):
                files += 1
                size += st.st_size
                runs.add(path.parent.parent.name)
                newest = st.st_mtime if newest is None else max(newest, st.st_mtime)
            elif path.name.endswith(".parquet.tmp"):
                temps += 1
        out.append(TableFiles(table, files, size, len(runs), newest, temps))
    return out


def newest_per_run(root: Path, tables: tuple[str, ...] = ("telemetry", "windows")) -> dict[str, float]:
    """run_id -> newest file mtime among ``tables`` (run directories are ``run_id=<id>``)."""
    newest: dict[str, float] = {}
    for table in tables:
        for run_dir in (root / table).glob("run_id=*"):
            for path in run_dir.glob("date=*/*.parquet"):
                try:
                    m = path.stat().st_mtime
                except FileNotFoundError:
                    continue
                run = run_dir.name.split("=", 1)[1]
                newest[run] = max(newest.get(run, 0.0), m)
    return newest


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:,.0f} {unit}" if unit == "B" else f"{size:,.1f} {unit}"
        size /= 1024
    return f"{n} B"
