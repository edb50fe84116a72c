"""Reads Parquet corpora: one record per row, by row number; a byte range reads its row groups."""

from __future__ import annotations

import contextlib
import gzip
import shutil
import tempfile
import typing
from collections.abc import Iterator

import pyarrow.parquet as pq

from pipeline.reading.documents import Record, ambiguous_fields, guarded, read_fields, to_document
from pipeline.reading.text_lines import ByteStream, Claim
from pipeline.writing import schema as schema_lib
from pipeline.writing.schema import AMBIGUOUS_HEADER

if typing.TYPE_CHECKING:
    from pipeline.planning.plan import ExportPlan


def parquet_records(
    plan: ExportPlan, source: str, stream: ByteStream, start: int = 0, claim: Claim | None = None
) -> Iterator[tuple[int, Record]]:
    """Parquet rows, ordered by row number; with `claim`, those of the row groups starting at `start` on.

    A compressed file is first spooled to disk, as Parquet needs to seek, and
    read whole.
    """
    with contextlib.ExitStack() as stack:
        readable: typing.IO[bytes] | ByteStream = stream
        if isinstance(stream, gzip.GzipFile):
            readable = stack.enter_context(tempfile.TemporaryFile())
            shutil.copyfileobj(stream, readable)
            readable.seek(0)
            start, claim = 0, None
        yield from _rows(plan, source, pq.ParquetFile(readable), start, claim)


def row_group_offset(row_group: pq.RowGroupMetaData) -> int:
    """The byte offset where a row group's data starts (its first column chunk)."""
    chunk = row_group.column(0)
    offsets = [chunk.data_page_offset]
    if chunk.has_dictionary_page and chunk.dictionary_page_offset:
        offsets.append(chunk.dictionary_page_offset)
    return min(offsets)


def _rows(
    plan: ExportPlan, source: str, parquet: pq.ParquetFile, start: int, claim: Claim | None
) -> Iterator[tuple[int, Record]]:
    wanted = read_fields(plan)
    names = parquet.schema_arrow.names
    # Only the columns the export reads; all of them when none is there, so each row is a missing_id.
    columns = [name for name in names if name in wanted] or None
    ambiguous = ambiguous_fields(plan, names, "The file's columns name")
    metadata = parquet.metadata
    number = 0
    for group in range(metadata.num_row_groups):
        if claim is not None and metadata.num_columns:
            offset = row_group_offset(metadata.row_group(group))
            if offset < start:  # Read by the range before.
                number += metadata.row_group(group).num_rows
                continue
            if not claim(offset):
                return
        if ambiguous:
            for _ in range(metadata.row_group(group).num_rows):
                number += 1
                yield number, schema_lib.error_row(source, number, None, AMBIGUOUS_HEADER, ambiguous, None)
            continue
        for batch in parquet.iter_batches(batch_size=1024, columns=columns, row_groups=[group]):
            for record in batch.to_pylist():
                number += 1
                yield number, guarded(to_document, plan, source, number, record, None)
