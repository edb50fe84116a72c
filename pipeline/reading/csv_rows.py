"""Reads CSV corpora: a header, then one record per row (lines inside quotes included), by row number.

Quotes are read strictly and each record is measured line by line, so an
oversized record is skipped while reading goes on and a quote that never
closes costs one dead letter, not the rest of the file.
"""

from __future__ import annotations

import collections
import csv
import io
import typing
from collections.abc import Iterator, Sequence

from pipeline.reading.documents import (
    SURROGATE,
    DeadLetter,
    Record,
    ambiguous_fields,
    guarded,
    near_misses,
    read_fields,
    to_document,
    too_large,
    with_note,
)
from pipeline.reading.text_lines import (
    SKIP_CHUNK,
    ByteStream,
    control_bytes,
    wide_line_row,
    without_joining_marks,
)
from pipeline.writing import schema as schema_lib
from pipeline.writing.schema import (
    AMBIGUOUS_HEADER,
    EMPTY_RECORD,
    INVALID_UTF8,
    MALFORMED_CSV,
    MISSING_ID,
    REPEATED_HEADER,
    WRONG_FIELD_COUNT,
)

if typing.TYPE_CHECKING:
    from pipeline.planning.plan import ExportPlan


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

    size: int
    quotes: int
    # The record's control bytes (`text_lines.wide_line_row`).
    controls: int
    raw: str
    lines: list[str]
    # Set when the data ended inside the record: `csv.reader` only asks for
    # another line mid-record while a quoted field is open.
    ended_inside: bool

    def __init__(self, text: typing.TextIO, limit: int) -> None:
        self._text = text
        self._limit = limit
        self._pending: collections.deque[str] = collections.deque()
        self._line = ""
        self.start_record()

    def start_record(self) -> None:
        self.size = 0
        self.quotes = 0
        self.controls = 0
        self.raw = ""
        self._line = ""
        self.lines = []
        self.ended_inside = False

    def __iter__(self) -> _CsvLines:
        return self

    def __next__(self) -> str:
        queued = bool(self._pending)
        line = self._pending.popleft() if queued else self._text.readline(self._limit + 2)
        if not line:
            self.ended_inside = True
            raise StopIteration
        if not self.lines and line.startswith(("\ufeff", "\x1a")):
            # A byte-order mark or DOS's Ctrl-Z starting a record is a joined file's (`cat a.csv b.csv`,
            # `copy /b a.csv+b.csv`; `text_lines.without_joining_marks`), no part of it: left there it would
            # start the id ("\ufeffb1"), which then no other record of b1 matches, or b's header ("\x1aid").
            data = line.encode("utf-8", "surrogateescape")
            kept = without_joining_marks(data)
            if len(kept) < len(data):
                marks = len(line) - len(kept.decode("utf-8", "surrogateescape"))
                line = line[marks:]
                if not queued and not line.endswith("\n"):  # The marks took characters of the read's room.
                    line += self._text.readline(marks)
        if line.endswith("\x1a") and len(line) < self._limit + 2 and line.strip("\x1a"):
            # DOS's end-of-file mark right after the last record, which no line end follows (a line the read
            # limit cut would be longer): no part of it (`text_lines.DOS_END_OF_FILE`).
            line = line.rstrip("\x1a")
        self._line = line
        self.lines.append(line)
        self.quotes += line.count('"')
        if len(self.raw) < schema_lib.RAW_LIMIT:
            self.raw += line[: schema_lib.RAW_LIMIT - len(self.raw)]
        encoded = line.encode("utf-8", "surrogateescape")
        size = len(encoded)
        self.controls += control_bytes(encoded)
        terminator = len(line) - len(line.rstrip("\r\n"))
        self.size += size
        # The record's last line ending is not part of it; a line cut by the read limit has none.
        if self.size - terminator > self._limit:
            raise RecordTooLarge
        return line

    def reread_after_first(self) -> None:
        """Queues the record's lines after its first to be read again, as records of their own."""
        self._pending.extendleft(reversed(self.lines[1:]))

    def skip_record(self) -> None:
        """Reads past the rest of the current record: its line, and more lines while a quote is open.

        Raises:
            UnclosedQuote: the data ended with the quote still open; the lines
                skipped were not kept, so they cannot be read as records again.
        """
        line = self._line
        while not (line.endswith(("\n", "\r")) and self.quotes % 2 == 0):
            line = self._pending.popleft() if self._pending else self._text.readline(SKIP_CHUNK)
            if not line:
                if self.quotes % 2:
                    raise UnclosedQuote(
                        f"a quoted field over --max_record_bytes={self._limit} is never closed; the "
                        f"{self.size} bytes after it up to the end of the file were not read as records"
                    )
                break
            self.quotes += line.count('"')
            self.size += len(line.encode("utf-8", "surrogateescape"))
        # The record's size is without its line ending.
        self.size -= len(line) - len(line.rstrip("\r\n"))
        if line.endswith("\r"):
            self._take_newline_after_cr()

    def _take_newline_after_cr(self) -> None:
        """After a line that ends with "\r": reads the "\n" of a "\r\n" that a length-limited read cut.

        Left there, the "\n" would be read as an empty record of its own. Anything
        else after the "\r" (a file with "\r" line endings) is the next line: it is
        read whole and queued.
        """
        if self._pending:
            return  # Queued lines are whole lines.
        after = self._text.read(1)
        if after and after != "\n":
            self._pending.append(after + self._text.readline(self._limit + 1))


def _blank(values: Sequence[str]) -> bool:
    """Whether a CSV line read as `values` is blank: no field, or one of nothing but whitespace."""
    return len(values) <= 1 and not "".join(values).strip()


def _malformed(source: str, number: int, lines: _CsvLines, error: csv.Error) -> DeadLetter:
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


def csv_records(plan: ExportPlan, source: str, stream: ByteStream) -> Iterator[tuple[int, Record]]:
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
        while header is not None and _blank(header):  # Blank lines before it: pandas and R skip them too.
            lines.start_record()
            header = next(reader, None)
    except csv.Error as error:
        raise UnclosedQuote(
            f"the header's quotes are malformed ({error}), so no row can be told apart"
        ) from None
    except RecordTooLarge:
        raise RecordTooLarge(
            f"the header is over --max_record_bytes={limit} bytes, so no row can be read by its "
            "column names; raise --max_record_bytes above the header's size"
        ) from None
    if header is None:
        return
    ambiguous = ambiguous_fields(plan, header, "The header names")
    separated = _other_separator(plan, header)
    note = near_misses(plan, header)
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
            yield number, too_large(source, number, lines.size, limit, lines.raw)
            continue
        except csv.Error as error:
            number += 1
            yield number, _malformed(source, number, lines, error)
            lines.reread_after_first()
            reader = csv.reader(lines, strict=True)  # A fresh parser, at the start of a record.
            continue
        number += 1
        # The record's bytes, for a UTF-16 test that only a record holding a control byte needs.
        data = "".join(lines.lines).encode("utf-8", "surrogateescape") if lines.controls else b""
        wide = wide_line_row(source, number, lines.controls, lines.size, lines.raw, data.rstrip(b"\r\n"))
        if wide is not None:  # UTF-16 past a UTF-8 start: ids and text of garbage.
            yield number, wide
            continue
        if _blank(values):  # Often a file's last line: what JSONL calls it, not a row of 0 fields.
            message = "Blank line where a CSV row was expected."
            yield number, schema_lib.error_row(source, number, None, EMPTY_RECORD, message, lines.raw)
            continue
        joined = _joined_header(plan, header, values)
        if joined is not None:
            # A joined file's header: its rows follow it, each field read from its own column.
            header, message = joined
            ambiguous = ambiguous_fields(plan, header, "The header names")
            separated = _other_separator(plan, header)
            note = near_misses(plan, header)
            yield number, schema_lib.error_row(source, number, None, REPEATED_HEADER, message, lines.raw)
            continue
        if separated:
            yield number, schema_lib.error_row(source, number, None, MISSING_ID, separated, lines.raw)
            continue
        record = guarded(parse_csv_row, plan, source, number, header, values, lines.raw, ambiguous)
        yield number, with_note(record, note)


_JOINED = "files joined with their headers (cat a.csv b.csv)? It is no record"


def _joined_header(
    plan: ExportPlan, header: Sequence[str], values: Sequence[str]
) -> tuple[list[str], str] | None:
    """The header a row is, and its dead letter's message, when it is the header of a file joined after the
    first (`cat a.csv b.csv`); None for a record.

    Such a row is the header again in any order, or spelt otherwise (case, spaces: "ID, Content") or with
    other columns, naming the fields of the id and of a model input: a record holds those names as its
    values by no chance, unless it has as many fields as the header and its id is no column's name
    (`_names_in_id_column`). Read as a record, it was a row whose id is the id column's name (or, with another
    column count, every row of that file a `wrong_field_count`). The rows after it are read by its names,
    each spelt as the header in force spells it, so that each field comes from its own column.
    """
    if len(values) == len(header) and values == header:  # Both lists, as `csv.reader` makes them.
        return list(header), (
            f"The row repeats the header: {_JOINED}; join them without the later headers (e.g. csvstack, or "
            "tail -n +2)."
        )
    if len(values) == len(header) and sorted(values) == sorted(header):
        spelt: list[str] | None = list(values)  # The header again in another order.
    else:
        spelt = _spelt_as(plan, header, values)
    if spelt is None:
        return None
    if spelt == list(header):
        how = "spelt otherwise"
    elif sorted(spelt) == sorted(header):
        how = "in another order"
    elif len(values) == len(header) and not _names_in_id_column(plan, header, values):
        return None  # A record that holds those names as values: its id is no column's name.
    else:
        how = f"with other columns ({len(values)}; the header before it has {len(header)})"
    return spelt, (
        f"The row repeats the header {how}: {_JOINED}, and the rows after it are read by its order; join the "
        "files with a tool that matches columns by name (e.g. csvstack)."
    )


def _names_in_id_column(plan: ExportPlan, header: Sequence[str], values: Sequence[str]) -> bool:
    """Whether a row of as many fields as `header` holds a column's name (the header's, or a field the export
    reads; case and spaces aside) in the id's column, as a header with other columns does.

    A record holding the id field's and a model input's names as its values (`b,id,content` under
    `id,f1,content`) has its own id there: read as a header, it would give every later row a wrong id.
    """
    if plan.id_field not in header:
        return True  # No row of this header has an id: nothing is misread by taking it for one.
    value = values[list(header).index(plan.id_field)].strip().casefold()
    return value in {name.strip().casefold() for name in (*header, *read_fields(plan))}


def _spelt_as(plan: ExportPlan, header: Sequence[str], values: Sequence[str]) -> list[str] | None:
    """A row's values as the names of a header spelt otherwise or with other columns (see `_joined_header`),
    each spelt as `header` spells it; None when they are no header's."""
    id_key = plan.id_field.strip().casefold()
    longest = len(id_key) + 8  # The id field's name with a few spaces about it, at most.
    for value in values:  # The one test most records need: no value is the id field's name.
        if len(value) < longest and value.strip().casefold() == id_key:
            break
    else:
        return None
    spelling = {name.strip().casefold(): name for name in reversed(header)}
    spelt = [spelling.get(value.strip().casefold(), value) for value in values]
    if (
        len(set(spelt)) != len(spelt)
        or plan.id_field not in spelt
        or not any(info.field in spelt for info in plan.inputs)
    ):
        return None
    return spelt


# Separators of files that are CSV but for the comma (Excel's ";" in many locales, TSV), and how
# csvkit's csvformat rewrites each with commas.
OTHER_SEPARATORS = (("\t", "tab", "-t"), (";", "';'", "-d ';'"), ("|", "'|'", "-d '|'"))


def _other_separator(plan: ExportPlan, header: Sequence[str]) -> str | None:
    """The message of every row of a file whose header is one column that another separator would split
    into the fields the export reads (`id;content`), else None.

    Read with commas, each of its rows was a `missing_id` saying only that the id is
    missing, though the header plainly starts with it; the rows stay `missing_id`, saying why.
    """
    wanted = read_fields(plan)
    if len(header) != 1 or header[0] in wanted:
        return None
    for separator, name, option in OTHER_SEPARATORS:
        if separator in header[0] and wanted & {field.strip() for field in header[0].split(separator)}:
            return (
                f"Field {plan.id_field!r} is missing: the header is one column, {header[0][:200]!r}, "
                f"separated by {name}; the reader takes comma-separated values. Convert the file, e.g. "
                f"csvformat {option} FILE > FILE.csv (csvkit)."
            )
    return None


def parse_csv_row(
    plan: ExportPlan,
    source: str,
    number: int,
    header: Sequence[str],
    values: Sequence[str],
    raw: str,
    ambiguous: str | None = None,
) -> Record:
    """One CSV row (its values and raw text) -> `Document` or dead-letter row."""
    if ambiguous:
        return schema_lib.error_row(source, number, None, AMBIGUOUS_HEADER, ambiguous, raw)
    if any(SURROGATE.search(value) for value in values):
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
