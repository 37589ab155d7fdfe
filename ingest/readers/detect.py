"""Pick the reader for a trace: the ``--format`` given, or one detected from the file itself."""

from __future__ import annotations

from pathlib import Path

from adaptwin.cliutil import UserError
from adaptwin.ingest.readers import azure
from adaptwin.ingest.readers.azure import AzureReader
from adaptwin.ingest.readers.base import FORMATS, REQUIRED_FIELDS, ReaderOptions, TraceFormatError, TraceReader
from adaptwin.ingest.readers.generic_csv import CsvReader, read_header
from adaptwin.ingest.readers.lines import first_lines, sniff
from adaptwin.ingest.readers.mooncake import MooncakeReader
from adaptwin.ingest.readers.parquet import ParquetReader
from adaptwin.ingest.readers.servegen import ServeGenReader, parse_window

READERS = {"azure": AzureReader, "mooncake": MooncakeReader, "servegen": ServeGenReader,
           "parquet": ParquetReader, "csv": CsvReader}


def open_reader(path: Path, fmt: str | None, options: ReaderOptions) -> TraceReader:
    """The reader for ``path``; TraceFormatError (one line, no traceback) when it is not a trace."""
    if fmt is not None:
        if fmt not in READERS:
            raise UserError(f"unknown trace format {fmt!r}; choose one of {', '.join(FORMATS)}")
        if fmt != "servegen" and path.is_dir():
            raise TraceFormatError(path, "is a directory", f"a {fmt} file")
        return READERS[fmt](path, options)
    return READERS[detect_format(path, options)](path, options)


def detect_format(path: Path, options: ReaderOptions) -> str:
    """The format of ``path`` from its extension and first lines."""
    if not path.exists():
        raise UserError(f"{path}: no such file or directory")
    if path.is_dir():
        return "servegen"
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        return "parquet"
    try:
        head = sniff(path)
    except TraceFormatError:
        with open(path, "rb") as f:
            if f.read(4) == b"PAR1":
                return "parquet"
        raise
    if suffix in (".jsonl", ".json", ".ndjson") or head.lstrip().startswith((b"{", b"[")):
        return "mooncake"
    header = read_header(path, options.max_line_bytes)
    if azure.looks_like(header):
        return "azure"
    columns = options.columns
    if all(columns.get(f, f) in header for f in REQUIRED_FIELDS):
        return "csv"
    lines = first_lines(path, 1, options.max_line_bytes)
    try:
        parse_window(lines[0])
        return "servegen"
    except (ValueError, IndexError):
        pass
    raise TraceFormatError(
        path, f"its first line {','.join(header)[:120]!r} matches no trace format",
        "an Azure header (TIMESTAMP,ContextTokens,GeneratedTokens), a CSV header with "
        "ts,prompt_tokens,output_tokens (or a --columns mapping), Mooncake JSON lines or ServeGen windows")
