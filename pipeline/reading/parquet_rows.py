"""Reads Parquet corpora: one record per row, by row number; a byte range reads its row groups."""

from __future__ import annotations

import contextlib
import gzip
import shutil
import tempfile
import typing
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.reading.documents import Record, ambiguous_fields, guarded, read_fields, to_document, too_large
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


_BYTES_TYPES = (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary, pa.types.is_large_binary)


def _list_sizes(column: pa.Array) -> pa.Array:
    """Each list's bytes: its values at their width (4 or 8 per token id), or their own bytes (strings)."""
    values = column.flatten()
    if pa.types.is_dictionary(values.type):
        values = values.dictionary_decode()
    if any(is_kind(values.type) for is_kind in _BYTES_TYPES):
        parents = pc.list_parent_indices(column).to_numpy(zero_copy_only=False)
        weights = pc.fill_null(pc.binary_length(values), 0).to_numpy(zero_copy_only=False)
        return pa.array(np.bincount(parents, weights=weights, minlength=len(column)).astype(np.int64))
    try:
        width = max(1, values.type.bit_width // 8)
    except ValueError:  # Nested or otherwise without a width: count 8 bytes a value.
        width = 8
    return pc.multiply(pc.list_value_length(column), width)


def record_sizes(batch: pa.RecordBatch) -> np.ndarray:
    """Each row's size in bytes, as --max_record_bytes counts it: its text's UTF-8 bytes, 4 per token id.

    Strings and binaries count their bytes, lists their values at their width
    (token ids: 4 or 8), anything else 8 bytes; what a row of the columns read holds.
    """
    sizes = np.zeros(batch.num_rows, dtype=np.int64)
    for column in batch.columns:
        if pa.types.is_dictionary(column.type):
            column = column.dictionary_decode()
        kind = column.type
        if any(is_kind(kind) for is_kind in _BYTES_TYPES):
            lengths = pc.binary_length(column)
        elif pa.types.is_list(kind) or pa.types.is_large_list(kind):
            lengths = _list_sizes(column)
        else:
            sizes += 8
            continue
        sizes += pc.fill_null(lengths, 0).to_numpy(zero_copy_only=False).astype(np.int64)
    return sizes


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
            sizes = record_sizes(batch)
            big = sizes > plan.max_record_bytes
            # Oversized rows are never made Python objects.
            records = iter((batch.filter(pa.array(~big)) if big.any() else batch).to_pylist())
            for index in range(batch.num_rows):
                number += 1
                if big[index]:
                    yield number, too_large(source, number, int(sizes[index]), plan.max_record_bytes, "")
                    continue
                yield number, guarded(to_document, plan, source, number, next(records), None)
