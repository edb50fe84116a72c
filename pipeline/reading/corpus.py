"""Reads one corpus file, or a byte range of one, into `Document`s and dead letters at their positions.

Knows nothing of Beam: `read_file` and `read_records` take a function that
opens the file as binary, so every reader is tested on plain bytes. Positions
are line numbers for text and JSONL, data-row numbers (header excluded) for CSV
and Parquet; each format has its module (`text_lines`, `csv_rows`, `parquet_rows`),
and every record becomes a `Document` or a dead letter in `documents`.

`read_records` also reads part of a file: the records starting in a byte range
of an uncompressed text or JSONL file (lines), or the row groups starting in it
(Parquet). Each record comes with its `order`, which sorts the records of a file
in file order: the byte offset of a line (in the decompressed bytes for .gz), the
row number in CSV and Parquet. A range that starts past the beginning of a file
learns its first line number from `lines_before`, an index of newline counts per
block of bytes (at most `INDEX_BLOCK`) built while scanning the ids (see
`pipeline.reading.transforms.ReadCorpus`).
"""

from __future__ import annotations

import contextlib
import gzip
import io
import typing
import zlib
from collections.abc import Callable, Iterator

from pipeline.reading.csv_rows import csv_records
from pipeline.reading.documents import Document, Record
from pipeline.reading.parquet_rows import parquet_records
from pipeline.reading.text_lines import (
    PARQUET_MAGIC,
    ByteStream,
    Claim,
    InputShorter,
    LineRange,
    LinesBefore,
    check_start,
    file_tail,
    line_records,
)
from pipeline.writing import schema as schema_lib
from pipeline.writing.schema import READ_ERROR, UNREADABLE_FILE

if typing.TYPE_CHECKING:
    from pipeline.planning.plan import ExportPlan

# Uncompressed files of these formats are read in byte ranges, by many workers at once.
# CSV is not: a quoted field may hold newlines, so a reader starting in the middle
# of a file cannot tell a record's start from a line inside a quoted field.
SPLIT_FORMATS = ("text", "jsonl", "parquet")
LINE_FORMATS = ("text", "jsonl")
# Line numbers of a range come from the newlines counted per block of this many bytes
# at most; never more than the split size (`pipeline.reading.transforms.ReadCorpus`), so that a
# range skips less than one range of bytes to find its first line number.
INDEX_BLOCK = 4 << 20
# The order of a record standing for a whole file (unreadable_file): before its records.
FILE_ORDER = -1

# Compressions the reader does not take: one clear dead letter beats records of garbage.
OTHER_COMPRESSIONS = (
    *(".bz2", ".deflate", ".lzma", ".xz", ".zst", ".zstd", ".zip", ".7z"),
    *(".lz4", ".lz", ".z"),  # lz4, lzip, Unix compress (.Z)
)
# Tar archives: their member headers would be read as text (.tar.gz is gzip, so read without this).
TAR_SUFFIXES = (".tar", ".tgz", ".tar.gz", ".taz", ".tbz", ".tbz2", ".txz", ".tzst")

# Opens a corpus file as binary (seekable where a range starts past 0).
OpenFile = Callable[[], contextlib.AbstractContextManager[typing.BinaryIO]]


def is_compressed(path: str) -> bool:
    """Whether `path` is read through gzip (the only compression the reader takes)."""
    return path.lower().endswith(".gz")


def is_splittable(input_format: str, path: str) -> bool:
    """Whether `path`, of `input_format`, can be read in byte ranges (uncompressed text, JSONL or Parquet)."""
    lower = path.lower()
    return (
        input_format in SPLIT_FORMATS
        and not is_compressed(path)
        and not lower.endswith(OTHER_COMPRESSIONS + TAR_SUFFIXES)
    )


def read_file(plan: ExportPlan, path: str, open_file: OpenFile) -> Iterator[Record]:
    """Yields the `Document`s and dead-letter rows of one corpus file, one per record, in order.

    See `read_records`, of which this is the whole-file case without the orders.
    """
    for _, item in read_records(plan, path, open_file):
        yield item


class _ListedBytes(io.RawIOBase):
    """The first `size` bytes of a stream: the end of the file as the launch listed it.

    A file read whole (CSV, gzip) appended to while it is read would otherwise yield
    records the launch never listed, which the id scan never saw (their duplicate ids
    included). The check after the read (`verify`) then finds the file changed. Data that
    ends before `size` (a file cut while it is read) raises `InputShorter` there, so the
    record it cut is the read error's, not a row of part of it.
    """

    def __init__(self, stream: typing.BinaryIO, size: int) -> None:
        super().__init__()
        self._stream, self._size, self._position = stream, size, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: typing.Any) -> int:
        remaining = self._size - self._position
        if remaining <= 0:
            return 0
        data = self._stream.read(min(len(buffer), remaining))
        if not data:
            # Cut while it was read: the record being read is not whole, so no row may be made of it.
            raise InputShorter(
                f"the data ends at byte {self._position}, but the launch listed {self._size} bytes"
            )
        buffer[: len(data)] = data
        self._position += len(data)
        return len(data)


class EmptyGzip(Exception):
    """A `.gz` file of 0 bytes: no gzip data (what a writer killed before its first flush leaves)."""


def _check_head(path: str, raw_stream: typing.BinaryIO) -> None:
    """Raises for data no record reader takes, by its first bytes: UTF-16/32, a tar archive, an empty `.gz`,
    compressed data in a file not named `.gz`.

    Reads them from the file's own handle, then seeks it back: a stream that
    cannot seek is left to the readers (which still find a UTF-16 text or JSONL
    file by its first line). Data that does not decompress is the readers' to report.
    """
    if not raw_stream.seekable():
        return
    position = raw_stream.tell()
    if is_compressed(path) and not raw_stream.read(1):
        # Python's gzip reads no bytes as no data; gzip itself says "unexpected end of file".
        raise EmptyGzip(
            "the file is empty, which is no gzip data (not even an empty file's): it was cut before its "
            "first byte was written; write it again, or remove it if it holds nothing."
        )
    raw_stream.seek(position)
    try:
        stream: ByteStream = (
            gzip.GzipFile(fileobj=raw_stream, mode="rb") if is_compressed(path) else raw_stream
        )
        head = b""
        while len(head) < 512 and (chunk := stream.read(512 - len(head))):
            head += chunk
    except (EOFError, OSError, zlib.error):
        return
    finally:
        raw_stream.seek(position)
    if is_compressed(path):  # Data compressed again inside the gzip is no text either.
        check_start(head, gunzipped=True)
    else:  # Data named as uncompressed must not be compressed (nor be Parquet, nor a tar archive).
        check_start(head, file_tail(raw_stream) if head.startswith(PARQUET_MAGIC) else b"")


def read_records(
    plan: ExportPlan,
    path: str,
    open_file: OpenFile,
    start: int = 0,
    claim: Claim | None = None,
    lines_before: LinesBefore | None = None,
    on_newline: Callable[[int], None] | None = None,
    verify: Callable[[], None] | None = None,
    size: int | None = None,
) -> Iterator[tuple[int, Record]]:
    """Yields `(order, item)` for each record of a file (or of a byte range of it), in file order.

    `item` is a `Document` or a dead-letter row. A bad record is a dead letter
    and reading goes on. A file that cannot be read to its end (truncated .gz,
    corrupt data, read error) ends with one dead letter: `unreadable_file` when
    no record was read, else `read_error` at the position of the first record
    not read. Either way the number of records lost is unknown.

    Args:
        plan: the `ExportPlan` (format, fields, limits).
        path: the file's path or URI, for dead letters and text-line ids.
        open_file: a function returning the file's bytes as a binary stream
            (seekable when `start` is not 0).
        start: for a file that `is_splittable`, the byte offset where the range
            starts: the first record read is the first that starts at or after it.
        claim: for a splittable file, a function `claim(offset)` called with the
            byte offset of each line or row group before it is read; False stops
            reading (the record belongs to the next range).
        lines_before: a function `offset -> (block start, newlines before it)`
            numbering the lines of a range that starts past 0; without it such
            a range numbers its first line 1 (enough for the id scan).
        on_newline: called with the offset of the newline ending each line read
            (the id scan counts them into the line index).
        verify: called before the file is opened and after its last record
            was read; raises if the file is not as the launch listed it (the
            dead letter then says so, where reading stopped).
        size: the file's size as listed at launch: a text or JSONL file or
            range that reaches the end of the data before it raises
            `text_lines.InputShorter` (the file was cut while it was read); a
            file read whole is read to that size only (appended records were
            never listed, and `verify` finds the file changed).
    """
    read = 0
    last_position, last_order = 0, FILE_ORDER
    if path.lower().endswith(OTHER_COMPRESSIONS):
        message = (
            f"{path} is compressed in a format the reader does not take; gzip it (.gz) or decompress it."
        )
        yield FILE_ORDER, schema_lib.error_row(path, None, None, UNREADABLE_FILE, message, None)
        return
    if path.lower().endswith(TAR_SUFFIXES):
        message = f"{path} is a tar archive; extract it (tar -xf FILE) and read its files."
        yield FILE_ORDER, schema_lib.error_row(path, None, None, UNREADABLE_FILE, message, None)
        return
    try:
        if verify is not None:
            verify()
        with open_file() as raw_stream:
            if not start and plan.input_format != "parquet":
                _check_head(path, raw_stream)
            if size is not None and not start and claim is None and plan.input_format != "parquet":
                raw_stream = io.BufferedReader(_ListedBytes(raw_stream, size))
            stream: ByteStream = (
                gzip.GzipFile(fileobj=raw_stream, mode="rb") if is_compressed(path) else raw_stream
            )
            records: Iterator[tuple[int, Record]]
            if plan.input_format == "parquet":
                records = parquet_records(plan, path, stream, start, claim)
            elif plan.input_format == "csv":
                records = csv_records(plan, path, stream)
            else:
                end = size if size is not None and not is_compressed(path) else None
                lines = LineRange(start, claim, lines_before, on_newline, end)
                records = line_records(plan, path, stream, lines)
            for order, item in records:
                read += 1
                last_order = order
                last_position = item.position if isinstance(item, Document) else item["position"]
                yield order, item
        if verify is not None:
            verify()
    except Exception as error:
        message = f"{type(error).__name__}: {error}"
        if not read and not start:
            yield FILE_ORDER, schema_lib.error_row(path, None, None, UNREADABLE_FILE, message, None)
            return
        if not read:
            yield (
                start,
                schema_lib.error_row(
                    path,
                    None,
                    None,
                    READ_ERROR,
                    f"Reading stopped at byte {start}: {message}. Records from there on, if any, "
                    "are missing from the output.",
                    None,
                ),
            )
            return
        yield (
            last_order + 1,
            schema_lib.error_row(
                path,
                last_position + 1,
                None,
                READ_ERROR,
                f"Reading stopped after record {last_position}: {message}. Records from here on, if any, "
                "are missing from the output.",
                None,
            ),
        )
