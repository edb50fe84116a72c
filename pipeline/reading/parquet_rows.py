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

from pipeline.reading.documents import (
    Record,
    ambiguous_fields,
    guarded,
    near_misses,
    read_fields,
    to_document,
    too_large,
    with_note,
)
from pipeline.reading.text_lines import ByteStream, Claim
from pipeline.writing import schema as schema_lib
from pipeline.writing.schema import AMBIGUOUS_HEADER, INVALID_UTF8, PARSE_FAILED

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
    """The byte offset where a row group's data starts (its first column chunk).

    An offset of 0 is no place for data (the file starts with its magic); some
    writers leave it so: the other page's offset, else the chunk's file offset, stands in.
    """
    chunk = row_group.column(0)
    offsets = [chunk.data_page_offset]
    if chunk.has_dictionary_page:
        offsets.append(chunk.dictionary_page_offset)
    return min((offset for offset in offsets if offset), default=chunk.file_offset)


_BYTES_TYPES = (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary, pa.types.is_large_binary)
# View types (pyarrow >= 16 writes them back as they were): measured as their plain equivalents.
_PLAIN_OF_VIEW = ((pa.types.is_string_view, pa.large_string()), (pa.types.is_binary_view, pa.large_binary()))
_LIST_TYPES = (pa.types.is_list, pa.types.is_large_list, pa.types.is_fixed_size_list)
_LIST_VIEW_TYPES = (pa.types.is_list_view, pa.types.is_large_list_view)


def _list_bounds(column: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Each list's first and past-the-last index into `column.values` (a null list: empty)."""
    kind = column.type
    if pa.types.is_fixed_size_list(kind):
        starts = (np.arange(len(column)) + column.offset) * kind.list_size
        ends = starts + kind.list_size
    elif any(is_kind(kind) for is_kind in _LIST_VIEW_TYPES):
        starts = column.offsets.to_numpy(zero_copy_only=False).astype(np.int64)
        ends = starts + column.sizes.to_numpy(zero_copy_only=False).astype(np.int64)
    else:
        offsets = column.offsets.to_numpy(zero_copy_only=False).astype(np.int64)
        starts, ends = offsets[:-1], offsets[1:]
    valid = column.is_valid().to_numpy(zero_copy_only=False)
    return np.where(valid, starts, 0), np.where(valid, ends, 0)


def _sizes(column: pa.Array, in_list: bool = False) -> np.ndarray:
    """Each value's bytes: text and binary their own, a list or struct the sum of its values'.

    A number counts 8 bytes at the top of a row and its width inside a list
    (token ids: 4 or 8); anything else 8.
    """
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    for is_view, plain in _PLAIN_OF_VIEW:
        if is_view(column.type):
            column = column.cast(plain)
    kind = column.type
    if any(is_kind(kind) for is_kind in _BYTES_TYPES):
        return pc.fill_null(pc.binary_length(column), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    if any(is_kind(kind) for is_kind in _LIST_TYPES + _LIST_VIEW_TYPES):
        values = column.values
        starts, ends = _list_bounds(column)
        value_sizes = _sizes(values, in_list=True)
        totals = np.concatenate(([0], np.cumsum(value_sizes)))
        return totals[ends] - totals[starts]
    if pa.types.is_struct(kind):
        sizes = np.zeros(len(column), dtype=np.int64)
        for index in range(kind.num_fields):
            sizes += _sizes(column.field(index), in_list)
        return sizes
    width = 8
    if in_list:
        try:
            width = max(1, kind.bit_width // 8)
        except ValueError:  # Without a width (null, ...): 8 bytes a value.
            pass
    return np.full(len(column), width, dtype=np.int64)


def record_sizes(batch: pa.RecordBatch) -> np.ndarray:
    """Each row's size in bytes, as --max_record_bytes counts it: its text's UTF-8 bytes, 4 per token id.

    Strings and binaries (view types included) count their bytes, lists and
    structs their values' (token ids at their width: 4 or 8), anything else 8
    bytes; what a row of the columns read holds.
    """
    sizes = np.zeros(batch.num_rows, dtype=np.int64)
    for column in batch.columns:
        sizes += _sizes(column)
    return sizes


class UnconvertibleRow(typing.NamedTuple):
    """A row Python cannot hold: a string column's bytes that are not UTF-8, a date out of range."""

    column: str
    error: Exception


def _row_or_failure(row: pa.RecordBatch) -> dict[str, typing.Any] | UnconvertibleRow:
    """One row (a batch of one) as a dict, or the first of its columns that cannot be converted."""
    try:
        return row.to_pylist()[0]
    except Exception:
        for name, column in zip(row.schema.names, row.columns, strict=True):
            try:
                column.to_pylist()
            except Exception as error:
                return UnconvertibleRow(name, error)
        raise


def _small_rows(batch: pa.RecordBatch, big: np.ndarray) -> Iterator[dict[str, typing.Any] | UnconvertibleRow]:
    """The rows of `batch` not `big`, as dicts: oversized rows are never made Python objects.

    Slices, not `filter`: Arrow has no take kernel for view types (string_view). A run
    of rows that fails to convert as a whole (one value that is not UTF-8, written by a
    writer that did not check) is converted row by row, so only its bad rows fail.
    """
    small = np.flatnonzero(~big)
    # Runs of consecutive small rows: where the next index is not one more.
    breaks = np.flatnonzero(np.diff(small) != 1) + 1
    for run in np.split(small, breaks):
        if not len(run):
            continue
        rows = batch.slice(int(run[0]), len(run))
        try:
            yield from rows.to_pylist()
        except Exception:
            yield from (_row_or_failure(rows.slice(index, 1)) for index in range(len(run)))


def _unconvertible(source: str, number: int, failure: UnconvertibleRow) -> Record:
    """The dead letter of a row with a value Python cannot hold (see `UnconvertibleRow`)."""
    if isinstance(failure.error, UnicodeDecodeError):
        return schema_lib.error_row(
            source,
            number,
            None,
            INVALID_UTF8,
            f"Column {failure.column!r} holds bytes that are not UTF-8 ({failure.error}).",
            None,
        )
    return schema_lib.error_row(
        source,
        number,
        None,
        PARSE_FAILED,
        f"Column {failure.column!r} holds a value Python cannot read: {type(failure.error).__name__}: "
        f"{failure.error}.",
        None,
    )


def _rows(
    plan: ExportPlan, source: str, parquet: pq.ParquetFile, start: int, claim: Claim | None
) -> Iterator[tuple[int, Record]]:
    wanted = read_fields(plan)
    names = parquet.schema_arrow.names
    # Only the columns the export reads; all of them when none is there, so each row is a missing_id.
    columns = [name for name in names if name in wanted] or None
    ambiguous = ambiguous_fields(plan, names, "The file's columns name")
    note = near_misses(plan, names)
    metadata = parquet.metadata
    number = 0
    for group in range(metadata.num_row_groups):
        if not metadata.row_group(group).num_rows:
            # An empty row group (a writer given an empty batch) has no data to claim; its offsets are 0.
            continue
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
            records = _small_rows(batch, big)
            for index in range(batch.num_rows):
                number += 1
                if big[index]:
                    yield number, too_large(source, number, int(sizes[index]), plan.max_record_bytes, "")
                    continue
                row = next(records)
                if isinstance(row, UnconvertibleRow):
                    yield number, _unconvertible(source, number, row)
                    continue
                yield number, with_note(guarded(to_document, plan, source, number, row, None), note)
