"""Parquet traces, columns chosen by the same mapping as CSV; "line" is the 1-based row number.

Timestamp columns become epoch seconds (rebased to the first row like Azure's); numeric ``ts`` is
seconds since the trace start; string ``ts`` is read like CSV (seconds or a datetime).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from adaptwin.ingest.readers.base import (
    OPTIONAL_FIELDS, REQUIRED_FIELDS, RawRow, ReaderOptions, TraceFormatError, TsUnit, present_fields,
)

_BATCH_ROWS = 65_536


class ParquetReader:
    adapter_names = None

    def __init__(self, path: Path, options: ReaderOptions):
        self.path = path
        try:
            self.file = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as err:
            raise TraceFormatError(path, f"is not a readable Parquet file ({str(err)[:120]})") from None
        schema = self.file.schema_arrow
        mapping = options.columns
        missing = [repr(mapping.get(name, name)) for name in REQUIRED_FIELDS + OPTIONAL_FIELDS
                   if mapping.get(name, name) not in schema.names and (name in REQUIRED_FIELDS or name in mapping)]
        if missing:
            raise TraceFormatError(path, f"missing column(s) {', '.join(missing)}; its columns are "
                                   f"{', '.join(schema.names)[:200]}", "a --columns mapping such as "
                                   "ts=arrival_s,prompt_tokens=in,output_tokens=out")
        self.columns = {name: mapping.get(name, name)
                        for name in present_fields(lambda name: mapping.get(name, name) in schema.names)}
        ts_type = schema.field(self.columns["ts"]).type
        self.ts_is_timestamp = pa.types.is_timestamp(ts_type) or pa.types.is_date(ts_type)
        self.ts_unit = TsUnit.DATETIME if self.ts_is_timestamp else TsUnit.AUTO
        self.has_adapters = "adapter_id" in self.columns

    def rows(self) -> Iterator[RawRow]:
        names = list(self.columns)
        row = 0
        for batch in self.file.iter_batches(batch_size=_BATCH_ROWS, columns=list(self.columns.values())):
            columns = []
            for name, array in zip(names, batch.columns):
                if name == "ts" and self.ts_is_timestamp:  # epoch seconds, to the microsecond
                    array = pc.divide(pc.cast(pc.cast(array, pa.timestamp("us")), pa.int64()).cast(pa.float64()), 1e6)
                columns.append(array.to_pylist())
            for values in zip(*columns):
                row += 1
                yield RawRow(row, None, values)
