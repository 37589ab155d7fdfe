"""Azure LLM inference trace 2023 (``TIMESTAMP,ContextTokens,GeneratedTokens``).

TIMESTAMP is wall clock with 7 fractional digits; ts becomes seconds since the first accepted row.
"""

from __future__ import annotations

from pathlib import Path

from adaptwin.ingest.readers.base import ReaderOptions, TsUnit
from adaptwin.ingest.readers.generic_csv import CsvReader

HEADER = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
COLUMNS = {"ts": "TIMESTAMP", "prompt_tokens": "ContextTokens", "output_tokens": "GeneratedTokens"}


def looks_like(header: list[str]) -> bool:
    return tuple(header[:3]) == HEADER


class AzureReader(CsvReader):
    """An Azure trace: the generic CSV reader with the Azure columns and wall-clock timestamps."""

    def __init__(self, path: Path, options: ReaderOptions):
        super().__init__(path, options, columns=COLUMNS, ts_unit=TsUnit.DATETIME,
                         expected="the Azure header TIMESTAMP,ContextTokens,GeneratedTokens")
