"""Table files for `trimflow predict`: csv, jsonl and parquet, read and written in chunks.

The format follows the suffix: `.csv`, `.jsonl` (or `.json`, one object a line), `.parquet`.
Rows are numbered from 1 over the data rows (csv rows after the header, jsonl lines, parquet
rows); a chunk's frame index is the row number - 1. csv cells are read as text, verbatim (a
blank line is a row of empty cells). A jsonl line that is blank or not a JSON object is a row
without values, with the reason, so that the rows after it keep their numbers; a jsonl file's
columns are the keys of its first chunk.
"""

from __future__ import annotations

import contextlib
import itertools
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from trimflow.data.errors import DataError
from trimflow.utils.atomic import atomic_file

FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}


def table_format(path: Path) -> str:
    """csv, jsonl or parquet, from `path`'s suffix; `DataError` naming the file for others."""
    try:
        return FORMATS[path.suffix.lower()]
    except KeyError:
        raise DataError(
            f"{path}: unknown file format {path.suffix!r}; "
            "use .csv, .jsonl (or .json, one object a line) or .parquet"
        ) from None


@dataclass
class Chunk:
    """Consecutive rows of a table file."""

    frame: pd.DataFrame  # indexed by row number - 1
    unreadable: dict[int, str] = field(default_factory=dict)  # index -> why it has no values


def row_count(path: Path) -> int | None:
    """The rows of a parquet file (from its footer) or a jsonl file (its lines); None for a
    csv file, whose quoted cells may span lines."""
    kind = table_format(path)
    if kind == "parquet":
        return pq.ParquetFile(path).metadata.num_rows
    if kind == "jsonl":
        with open(path, "rb") as lines:
            return sum(1 for _ in lines)
    return None


def read_chunks(path: Path, rows: int) -> Iterator[Chunk]:
    """`path`'s rows, `rows` at a time; `DataError` naming the file if it cannot be parsed."""
    readers = {"csv": _csv_chunks, "jsonl": _jsonl_chunks, "parquet": _parquet_chunks}
    try:
        yield from readers[table_format(path)](path, rows)
    except DataError:
        raise
    except ValueError as error:  # pandas' and pyarrow's parse errors, bad UTF-8
        raise DataError(f"{path}: cannot be read as {table_format(path)}: {error}") from error


def _csv_chunks(path: Path, rows: int) -> Iterator[Chunk]:
    with pd.read_csv(
        path, chunksize=rows, dtype=str, keep_default_na=False, skip_blank_lines=False
    ) as reader:
        for frame in reader:
            yield Chunk(frame)


def _parquet_chunks(path: Path, rows: int) -> Iterator[Chunk]:
    start = 0
    with pq.ParquetFile(path) as parquet:
        for batch in parquet.iter_batches(batch_size=rows):
            frame = batch.to_pandas(types_mapper=pd.ArrowDtype, ignore_metadata=True)
            yield Chunk(frame.set_axis(range(start, start + len(frame))))
            start += len(frame)


def _jsonl_chunks(path: Path, rows: int) -> Iterator[Chunk]:
    columns: list[str] | None = None
    start = 0
    with open(path, "rb") as file:
        while lines := list(itertools.islice(file, rows)):
            records, unreadable = [], {}
            for index, line in enumerate(lines, start):
                record, problem = _json_record(line)
                records.append(record)
                if problem is not None:
                    unreadable[index] = problem
            index = range(start, start + len(lines))
            frame = pd.DataFrame(records, index=index, dtype=object)
            if columns is None:
                columns = list(frame.columns)
            elif new := [name for name in frame.columns if name not in columns]:
                raise DataError(
                    f"{path}: rows {start + 1}-{start + len(lines)} have keys that no row of "
                    f"the first {rows} has: {', '.join(new)}"
                )
            yield Chunk(frame.reindex(columns=columns, fill_value=None), unreadable)
            start += len(lines)


def _json_record(line: bytes) -> tuple[dict, str | None]:
    """(the object of a jsonl line, None), or ({}, why it is not one)."""
    line = line.strip()
    if not line:
        return {}, "line is blank"
    try:
        record = json.loads(line)
    except ValueError as error:
        return {}, f"line is not valid JSON: {error}"
    if not isinstance(record, dict):
        return {}, f"line is a JSON {type(record).__name__}, not an object"
    return record, None


@contextlib.contextmanager
def table_writer(
    path: Path, types: pa.Schema | None = None
) -> Iterator[Callable[[pd.DataFrame], None]]:
    """`write(frame)`, appending frames to a temporary sibling of `path` that replaces it when
    the block completes (and is removed if it fails). `types`: the parquet types of some
    columns, which the first frame may not show (a column of nulls)."""
    kind = table_format(path)
    with atomic_file(path, "wb" if kind == "parquet" else "w") as handle:
        if kind == "parquet":
            with ParquetAppender(handle, path, types or pa.schema([])) as appender:
                yield appender.write
        else:
            yield lambda frame: _write_text(handle, frame, kind)


def _write_text(handle: IO[str], frame: pd.DataFrame, kind: str) -> None:
    if kind == "csv":
        frame.map(_json_if_nested).to_csv(handle, header=handle.tell() == 0, index=False)
    else:
        handle.write(
            frame.to_json(orient="records", lines=True, double_precision=15, force_ascii=False)
        )


def _json_if_nested(value: Any) -> Any:
    """A list or dict (a csv cell holds text) as JSON; any other value as it is."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    return json.dumps(value) if isinstance(value, list | dict) else value


class ParquetAppender:
    """Frames written as row groups of one parquet file, with the columns and types of the
    first frame (`types` where given)."""

    def __init__(self, handle: IO[bytes], path: Path, types: pa.Schema) -> None:
        self.handle, self.path, self.types = handle, path, types
        self.writer: pq.ParquetWriter | None = None

    def __enter__(self) -> ParquetAppender:
        return self

    def __exit__(self, *exc_info) -> None:
        if self.writer is not None:
            self.writer.close()

    def write(self, frame: pd.DataFrame) -> None:
        """Append `frame`; `DataError` naming its rows if they do not fit the columns' types."""
        try:
            if self.writer is None:
                schema = pa.Schema.from_pandas(frame, preserve_index=False).remove_metadata()
                for typed in self.types:
                    schema = schema.set(schema.get_field_index(typed.name), typed)
                self.writer = pq.ParquetWriter(self.handle, schema)
            table = pa.Table.from_pandas(frame, schema=self.writer.schema, preserve_index=False)
        except pa.ArrowException as error:
            rows = f"rows {frame.index[0] + 1}-{frame.index[-1] + 1}"
            raise DataError(
                f"{self.path}: {rows} do not fit the column types of the first rows ({error}); "
                "write .jsonl or .csv instead"
            ) from error
        self.writer.write_table(table)
