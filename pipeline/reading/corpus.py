"""Parses corpus files into `Document`s and dead letters, each record at its exact position.

Knows nothing of Beam: `read_file` and `read_records` take a function that
opens the file as binary, so every reader is tested on plain bytes. Positions
are line numbers for text and JSONL, data-row numbers (header excluded) for CSV
and Parquet.

`read_records` also reads part of a file: the records starting in a byte range
of an uncompressed text or JSONL file (lines), or the row groups starting in it
(Parquet). Each record comes with its `order`, which sorts the records of a file
in file order: the byte offset of a line (in the decompressed bytes for .gz), the
row number in CSV and Parquet. A range that starts past the beginning of a file
learns its first line number from `lines_before`, an index of newline counts per
block of bytes (at most `INDEX_BLOCK`) built while scanning the ids (see
`pipeline.transforms.ReadCorpus`).
"""

import collections
import csv
import gzip
import io
import json
import re
import shutil
import tempfile
import typing

import pyarrow.parquet as pq

from pipeline.planning.plan import IDS_INPUT
from pipeline.writing import schema as schema_lib

# The dead-letter reasons live beside ERROR_SCHEMA; the reader uses these.
from pipeline.writing.schema import (
    AMBIGUOUS_HEADER,
    BAD_ID,
    BAD_TOKEN_ID,
    EMPTY_RECORD,
    INVALID_UTF8,
    MALFORMED_CSV,
    MALFORMED_JSON,
    MISSING_FIELD,
    MISSING_ID,
    NOT_AN_OBJECT,
    PARSE_FAILED,
    READ_ERROR,
    TOO_LARGE,
    UNREADABLE_FILE,
    WRONG_FIELD_COUNT,
    WRONG_TYPE,
)


class TokenIds(str):
    """A corpus field that already holds token ids: its JSON text, with the ids in `ids`.

    It is a string so that everything that handles document texts (dead-letter
    rows, byte counts) handles it too; `DocumentTokenizer` pads it instead of
    tokenizing it (see `pipeline.inference.features`).
    """

    def __new__(cls, ids):
        ids = tuple(int(i) for i in ids)
        token_ids = super().__new__(cls, json.dumps(list(ids)))
        token_ids.ids = ids
        return token_ids

    def __reduce__(self):
        return TokenIds, (self.ids,)


class Document(typing.NamedTuple):
    """A parsed record ready to embed: texts per model input, in `plan.inputs` order."""

    id: str
    texts: tuple
    kept: tuple
    source: str
    position: int


BOM = b"\xef\xbb\xbf"
# Token ids feed int32 model inputs.
TOKEN_ID_LIMIT = 2**31
# Lone surrogates come from JSON escapes ("\ud800") or from bytes decoded with
# surrogateescape; Parquet (UTF-8) cannot store them.
_SURROGATE = re.compile("[\ud800-\udfff]")
_SKIP_CHUNK = 1 << 20


# Uncompressed files of these formats are read in byte ranges, by many workers at once.
# CSV is not: a quoted field may hold newlines, so a reader starting in the middle
# of a file cannot tell a record's start from a line inside a quoted field.
SPLIT_FORMATS = ("text", "jsonl", "parquet")
LINE_FORMATS = ("text", "jsonl")
# Line numbers of a range come from the newlines counted per block of this many bytes
# at most; never more than the split size (`pipeline.transforms.ReadCorpus`), so that a
# range skips less than one range of bytes to find its first line number.
INDEX_BLOCK = 4 << 20
# The order of a record standing for a whole file (unreadable_file): before its records.
FILE_ORDER = -1

# Compressions the reader does not take: one clear dead letter beats records of garbage.
OTHER_COMPRESSIONS = (".bz2", ".deflate", ".lzma", ".xz", ".zst", ".zstd", ".zip", ".7z")


def is_compressed(path):
    """Whether `path` is read through gzip (the only compression the reader takes)."""
    return path.lower().endswith(".gz")


def is_splittable(input_format, path):
    """Whether `path`, of `input_format`, can be read in byte ranges (uncompressed text, JSONL or Parquet)."""
    lower = path.lower()
    return (
        input_format in SPLIT_FORMATS and not is_compressed(path) and not lower.endswith(OTHER_COMPRESSIONS)
    )


def read_file(plan, path, open_file):
    """Yields the `Document`s and dead-letter rows of one corpus file, one per record, in order.

    See `read_records`, of which this is the whole-file case without the orders.
    """
    for _, item in read_records(plan, path, open_file):
        yield item


class InputShorter(Exception):
    """A file, or range of one, ended before the size the launch listed: it was cut while it was read."""


def read_records(
    plan,
    path,
    open_file,
    start=0,
    claim=None,
    lines_before=None,
    on_newline=None,
    verify=None,
    size=None,
):
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
            `InputShorter` (the file was cut while it was read).
    """
    read = 0
    last_position, last_order = 0, FILE_ORDER
    if path.lower().endswith(OTHER_COMPRESSIONS):
        message = (
            f"{path} is compressed in a format the reader does not take; gzip it (.gz) or decompress it."
        )
        yield FILE_ORDER, schema_lib.error_row(path, None, None, UNREADABLE_FILE, message, None)
        return
    try:
        if verify is not None:
            verify()
        with open_file() as raw_stream:
            stream = gzip.GzipFile(fileobj=raw_stream, mode="rb") if is_compressed(path) else raw_stream
            if plan.input_format == "parquet":
                records = parquet_records(plan, path, stream, start, claim)
            elif plan.input_format == "csv":
                records = csv_records(plan, path, stream)
            else:
                end = size if size is not None and not is_compressed(path) else None
                records = line_records(plan, path, stream, start, claim, lines_before, on_newline, end)
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


def _guarded(parse, plan, source, number, *args):
    """`parse(plan, source, number, *args)`, with any failure a dead letter of that record only."""
    try:
        return parse(plan, source, number, *args)
    except Exception as error:
        return schema_lib.error_row(
            source, number, None, PARSE_FAILED, f"{type(error).__name__}: {error}", None
        )


def _too_large(source, number, size, limit, raw):
    return schema_lib.error_row(
        source,
        number,
        None,
        TOO_LARGE,
        f"Record of {size} bytes exceeds --max_record_bytes={limit}.",
        raw,
    )


def _skip_line(stream):
    """Reads to the end of the current line without keeping it: (bytes skipped, last chunk read)."""
    skipped, chunk = 0, b""
    while chunk := stream.readline(_SKIP_CHUNK):
        skipped += len(chunk)
        if chunk.endswith(b"\n"):
            break
    return skipped, chunk


def _align(stream, start, lines_before):
    """Moves `stream` to the first line starting at or after `start` > 0: (its offset, lines before it)."""
    block_start, newlines = lines_before(start - 1) if lines_before else (start - 1, 0)
    stream.seek(block_start)
    remaining = start - 1 - block_start
    while remaining > 0:
        chunk = stream.read(min(remaining, _SKIP_CHUNK))
        if not chunk:
            break
        newlines += chunk.count(b"\n")
        remaining -= len(chunk)
    # The line holding byte start - 1 belongs to the range before (a newline there: to nobody).
    skipped, end = _skip_line(stream)
    return start - 1 + skipped, newlines + end.endswith(b"\n")


def line_records(
    plan, source, stream, start=0, claim=None, lines_before=None, on_newline=None, listed_size=None
):
    """Text or JSONL: one record per line, ordered by byte offset.

    Lines over --max_record_bytes are skipped, never held. With `listed_size`
    (the size the launch listed), data that ends before it raises `InputShorter`.
    """
    limit = plan.max_record_bytes
    offset, number = (0, 0) if not start else _align(stream, start, lines_before)
    # Room for the record and its "\r\n": a longer read means a longer line.
    while line := stream.readline(limit + 2):
        if claim is not None and not claim(offset):
            return
        number += 1
        cut = len(line) == limit + 2 and not line.endswith(b"\n")
        consumed = len(line)
        if offset == 0 and line.startswith(BOM):
            line = line[len(BOM) :]
        size, end = len(line), line
        if cut:
            skipped, end = _skip_line(stream)
            size += skipped
            consumed += skipped
        size -= len(end) - len(end.rstrip(b"\r\n"))
        if on_newline is not None and end.endswith(b"\n"):
            on_newline(offset + consumed - 1)
        if size > limit:
            item = _too_large(source, number, size, limit, line[: schema_lib.RAW_LIMIT * 4])
        else:
            item = _guarded(parse_line, plan, source, number, line.rstrip(b"\r\n"))
        yield offset, item
        offset += consumed
    if listed_size is not None and offset < listed_size:
        raise InputShorter(f"the data ends at byte {offset}, but the launch listed {listed_size} bytes")


def parse_line(plan, source, number, line):
    """One text or JSONL line (bytes, no line terminator) -> `Document` or dead-letter row."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as error:
        return schema_lib.error_row(source, number, None, INVALID_UTF8, str(error), line)
    if plan.input_format == "text":
        fields = {plan.inputs[0].field: text} if plan.inputs else {}
        return _to_document(plan, source, number, f"{source}:{number}", fields, text)
    if not text.strip():
        return schema_lib.error_row(
            source, number, None, EMPTY_RECORD, "Blank line where a JSON object was expected.", text
        )
    try:
        record = json.loads(text)
    except RecursionError:
        return schema_lib.error_row(
            source, number, None, MALFORMED_JSON, "JSON nested too deeply to parse.", text
        )
    except ValueError as error:  # JSONDecodeError, or an integer of too many digits.
        return schema_lib.error_row(source, number, None, MALFORMED_JSON, str(error), text)
    if not isinstance(record, dict):
        return schema_lib.error_row(
            source,
            number,
            None,
            NOT_AN_OBJECT,
            f"Expected a JSON object, found {type(record).__name__}.",
            text,
        )
    return to_document(plan, source, number, record, text)


class RecordTooLarge(Exception):
    """Raised into `csv.reader` when the record it is reading passes --max_record_bytes."""


class UnclosedQuote(Exception):
    """A CSV quote that cannot be set aside with its record alone (in the header, or in a skipped record)."""


class _CsvLines:
    """Feeds `csv.reader` one physical line at a time, measuring the record being read.

    `csv.reader` keeps a whole record in memory and has its own field limit;
    reading here lines of at most --max_record_bytes keeps memory bounded and
    lets an oversized record be skipped, following its quotes, while reading
    goes on. The lines of the record being read are kept (at most
    --max_record_bytes of them), so that a record whose quote never closes can
    be set aside and its later lines read again as records (`reread_after_first`).
    """

    def __init__(self, text, limit):
        self._text = text
        self._limit = limit
        self._pending = collections.deque()
        self.start_record()

    def start_record(self):
        self.size = 0
        self.quotes = 0
        self.raw = ""
        self._line = ""
        self.lines = []
        # Set when the data ended inside the record: `csv.reader` only asks for
        # another line mid-record while a quoted field is open.
        self.ended_inside = False

    def __iter__(self):
        return self

    def __next__(self):
        line = self._pending.popleft() if self._pending else self._text.readline(self._limit + 2)
        if not line:
            self.ended_inside = True
            raise StopIteration
        self._line = line
        self.lines.append(line)
        self.quotes += line.count('"')
        if len(self.raw) < schema_lib.RAW_LIMIT:
            self.raw += line[: schema_lib.RAW_LIMIT - len(self.raw)]
        size = len(line.encode("utf-8", "surrogateescape"))
        terminator = len(line) - len(line.rstrip("\r\n"))
        self.size += size
        # The record's last line ending is not part of it; a line cut by the read limit has none.
        if self.size - terminator > self._limit:
            raise RecordTooLarge
        return line

    def reread_after_first(self):
        """Queues the record's lines after its first to be read again, as records of their own."""
        self._pending.extendleft(reversed(self.lines[1:]))

    def skip_record(self):
        """Reads past the rest of the current record: its line, and more lines while a quote is open.

        Raises:
            UnclosedQuote: the data ended with the quote still open; the lines
                skipped were not kept, so they cannot be read as records again.
        """
        line = self._line
        while not (line.endswith(("\n", "\r")) and self.quotes % 2 == 0):
            line = self._pending.popleft() if self._pending else self._text.readline(_SKIP_CHUNK)
            if not line:
                if self.quotes % 2:
                    raise UnclosedQuote(
                        f"a quoted field over --max_record_bytes={self._limit} is never closed; the "
                        f"{self.size} bytes after it up to the end of the file were not read as records"
                    )
                break
            self.quotes += line.count('"')
            self.size += len(line.encode("utf-8", "surrogateescape"))


def _malformed(source, number, lines, error):
    """The dead letter of a record `csv.reader` (strict) refused: a quote never closed, or text after one."""
    if lines.ended_inside:
        message = (
            f"A quoted field of this row is never closed before the end of the file (it would run "
            f"over {len(lines.lines)} lines)."
        )
    else:
        message = f"The row's quotes are malformed ({error})."
    if len(lines.lines) > 1:
        message += (
            f" The row is set aside and its {len(lines.lines) - 1} later line(s) are read again as rows."
        )
    return schema_lib.error_row(
        source, number, None, MALFORMED_CSV, message, lines.lines[0][: schema_lib.RAW_LIMIT]
    )


def csv_records(plan, source, stream):
    """CSV with a header row; a record may span lines inside quotes. Ordered by row number.

    Quotes are read strictly: a record whose quoted field is still open at the
    end of the data, or is followed by text before the next comma, is a
    `malformed_csv` dead letter, and the lines after its first are read again
    as records. So no row is made of text past a quote that never closes, and
    every line is in a row or a dead letter.
    """
    limit = plan.max_record_bytes
    # Records over `limit` are stopped by _CsvLines first; csv's own limit
    # (128 KiB by default, process-wide) must not cut records under it.
    csv.field_size_limit(max(csv.field_size_limit(), limit + 1))
    # utf-8-sig drops a byte-order mark; surrogateescape keeps undecodable bytes
    # visible per row instead of failing the rest of the file.
    text = io.TextIOWrapper(stream, encoding="utf-8-sig", errors="surrogateescape", newline="")
    lines = _CsvLines(text, limit)
    reader = csv.reader(lines, strict=True)
    try:
        header = next(reader, None)
    except csv.Error as error:
        raise UnclosedQuote(
            f"the header's quotes are malformed ({error}), so no row can be told apart"
        ) from None
    if header is None:
        return
    ambiguous = _ambiguous_header(plan, header)
    number = 0
    while True:
        lines.start_record()
        try:
            values = next(reader)
        except StopIteration:
            return
        except RecordTooLarge:
            number += 1
            lines.skip_record()
            yield number, _too_large(source, number, lines.size, limit, lines.raw)
            continue
        except csv.Error as error:
            number += 1
            yield number, _malformed(source, number, lines, error)
            lines.reread_after_first()
            reader = csv.reader(lines, strict=True)  # A fresh parser, at the start of a record.
            continue
        number += 1
        yield number, _guarded(parse_csv_row, plan, source, number, header, values, lines.raw, ambiguous)


def _ambiguous_header(plan, header):
    """A message if the header names a field the export reads more than once, else None."""
    wanted = {plan.id_field, *plan.keep_fields, *(info.field for info in plan.inputs)}
    repeated = sorted({name for name in header if name in wanted and header.count(name) > 1})
    if not repeated:
        return None
    columns = "; ".join(
        f"{name!r} in columns {', '.join(str(i) for i, h in enumerate(header, start=1) if h == name)}"
        for name in repeated
    )
    return f"The header names {columns}: which one to read is ambiguous. Rename the columns."


def parse_csv_row(plan, source, number, header, values, raw, ambiguous=None):
    """One CSV row (its values and raw text) -> `Document` or dead-letter row."""
    if ambiguous:
        return schema_lib.error_row(source, number, None, AMBIGUOUS_HEADER, ambiguous, raw)
    if any(_SURROGATE.search(value) for value in values):
        return schema_lib.error_row(
            source,
            number,
            None,
            INVALID_UTF8,
            "Row holds bytes that are not UTF-8.",
            raw.encode("utf-8", "surrogateescape"),
        )
    if len(values) != len(header):
        return schema_lib.error_row(
            source,
            number,
            None,
            WRONG_FIELD_COUNT,
            f"Row has {len(values)} fields; the header has {len(header)}.",
            raw,
        )
    return to_document(plan, source, number, dict(zip(header, values, strict=True)), raw)


def parquet_records(plan, source, stream, start=0, claim=None):
    """Parquet rows, ordered by row number.

    A compressed file is first spooled to disk, as Parquet needs to seek.
    """
    if isinstance(stream, gzip.GzipFile):
        with tempfile.TemporaryFile() as spool:
            shutil.copyfileobj(stream, spool)
            spool.seek(0)
            yield from _parquet_rows(plan, source, spool)
    else:
        yield from _parquet_rows(plan, source, stream, start, claim)


def row_group_offset(row_group):
    """The byte offset where a row group's data starts (its first column chunk)."""
    chunk = row_group.column(0)
    offsets = [chunk.data_page_offset]
    if chunk.has_dictionary_page and chunk.dictionary_page_offset:
        offsets.append(chunk.dictionary_page_offset)
    return min(offsets)


def _parquet_rows(plan, source, stream, start=0, claim=None):
    parquet = pq.ParquetFile(stream)
    wanted = {plan.id_field, *plan.keep_fields, *(info.field for info in plan.inputs)}
    # Only the columns the export reads; all of them when none is there, so each row is a missing_id.
    columns = [name for name in parquet.schema_arrow.names if name in wanted] or None
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
        for batch in parquet.iter_batches(batch_size=1024, columns=columns, row_groups=[group]):
            for record in batch.to_pylist():
                number += 1
                yield number, _guarded(to_document, plan, source, number, record, None)


def _kept_value(value):
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, default=str)


def to_document(plan, source, number, record, raw=None):
    """A record (field -> value) -> `Document`, or a dead-letter row saying what is wrong with it.

    Args:
        raw: the record's text for dead letters; None makes it from `record` when needed.
    """
    document_id = record.get(plan.id_field)
    if document_id is None or document_id == "":
        return _reject(source, number, None, record, raw)(
            MISSING_ID, f"Field {plan.id_field!r} is missing or null."
        )
    if not isinstance(document_id, (str, int)) or isinstance(document_id, bool):
        return _reject(source, number, None, record, raw)(
            BAD_ID,
            f"Field {plan.id_field!r} must be a string or integer, found {type(document_id).__name__}.",
        )
    return _to_document(plan, source, number, str(document_id), record, raw)


def _reject(source, number, document_id, record, raw):
    """A function (reason, message) -> dead-letter row of this record."""

    def reject(reason, message):
        text = raw if raw is not None else json.dumps(record, ensure_ascii=False, default=str)
        return schema_lib.error_row(source, number, document_id, reason, message, text)

    return reject


def _to_document(plan, source, number, document_id, record, raw):
    reject = _reject(source, number, document_id, record, raw)
    if _SURROGATE.search(document_id):
        return reject(INVALID_UTF8, f"The id {document_id!r} holds a lone surrogate, which is not text.")
    texts = []
    for info in plan.inputs:
        value = record.get(info.field)
        if value is None:
            return reject(
                MISSING_FIELD, f"Field {info.field!r} (model input {info.name!r}) is missing or null."
            )
        if isinstance(value, list) and info.takes == IDS_INPUT:
            # A list of token ids skips the tokenizer (a corpus tokenized elsewhere).
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
                return reject(WRONG_TYPE, f"Field {info.field!r} is a list, but not of integer token ids.")
            limit = info.id_limit or TOKEN_ID_LIMIT
            bad = next((i for i in value if not 0 <= i < limit), None)
            if bad is not None:
                why = (
                    f"the model's Embedding has input_dim={limit}"
                    if info.id_limit
                    else "the model takes int32"
                )
                return reject(
                    BAD_TOKEN_ID,
                    f"Field {info.field!r} holds token id {bad}; token ids are 0 to {limit - 1} ({why}).",
                )
            value = TokenIds(value)
        elif not isinstance(value, str):
            expected = "a string or a list of token ids" if info.takes == IDS_INPUT else "a string"
            return reject(
                WRONG_TYPE, f"Field {info.field!r} must be {expected}, found {type(value).__name__}."
            )
        elif info.takes == IDS_INPUT and not plan.tokenizes:
            return reject(
                WRONG_TYPE, f"Field {info.field!r} holds text, but --tokenizer none expects token id lists."
            )
        elif _SURROGATE.search(value):
            return reject(INVALID_UTF8, f"Field {info.field!r} holds a lone surrogate, which is not text.")
        texts.append(value)
    kept = tuple(_kept_value(record.get(name)) for name in plan.keep_fields)
    for name, value in zip(plan.keep_fields, kept, strict=True):
        if value is not None and _SURROGATE.search(value):
            return reject(INVALID_UTF8, f"Field {name!r} holds a lone surrogate, which is not text.")
    return Document(document_id, tuple(texts), kept, source, number)
