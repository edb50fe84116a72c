"""Turns one parsed record (field -> value) into a `Document`, or into the dead letter saying what is wrong.

Every record format (`text_lines`, `csv_rows`, `parquet_rows`) ends here, so the
rules a record must meet (an id, each model input's field, text that is text,
token ids that fit the model) are written once.
"""

from __future__ import annotations

import base64
import decimal
import json
import re
import typing
from collections.abc import Callable, Mapping, Sequence

from pipeline.planning.plan import IDS_INPUT
from pipeline.writing import schema as schema_lib

# The dead-letter reasons live beside ERROR_SCHEMA; the reader uses these.
from pipeline.writing.schema import (
    BAD_ID,
    BAD_TOKEN_ID,
    DUPLICATE_ID,
    EMPTY_DOCUMENT,
    INVALID_UTF8,
    MISSING_FIELD,
    MISSING_ID,
    PARSE_FAILED,
    TOO_LARGE,
    WRONG_TYPE,
)

if typing.TYPE_CHECKING:
    from pipeline.planning.plan import ExportPlan

# A row of `schema.ERROR_SCHEMA` as `schema.error_row` builds it (column -> value).
DeadLetter = dict[str, typing.Any]

# How to fix float ids: pandas stores an integer column holding a null (NaN) as float64, and so writes it.
FLOAT_ID_FIX = (
    "write the ids as integers or strings (pandas turns an integer column holding a null into float64: "
    "df[{0!r}] = df[{0!r}].astype('Int64') before to_parquet or to_json)."
)
# Token ids feed int32 model inputs.
TOKEN_ID_LIMIT = 2**31
# Lone surrogates come from JSON escapes ("\ud800") or from bytes decoded with
# surrogateescape; Parquet (UTF-8) cannot store them.
SURROGATE = re.compile("[\ud800-\udfff]")


class TokenIds(str):
    """A corpus field that already holds token ids: its JSON text, with the ids in `ids`.

    It is a string so that everything that handles document texts (dead-letter
    rows, byte counts) handles it too; `DocumentTokenizer` pads it instead of
    tokenizing it (see `pipeline.inference.features`).
    """

    ids: tuple[int, ...]

    def __new__(cls, ids: Sequence[int]) -> TokenIds:
        values = tuple(int(i) for i in ids)
        token_ids = super().__new__(cls, json.dumps(list(values)))
        token_ids.ids = values
        return token_ids

    def __reduce__(self) -> tuple[type[TokenIds], tuple[tuple[int, ...]]]:
        return TokenIds, (self.ids,)


class Document(typing.NamedTuple):
    """A parsed record ready to embed: texts per model input, in `plan.inputs` order."""

    id: str
    # Per model input: the text, or the corpus's own `TokenIds`.
    texts: tuple[str, ...]
    # Per --keep_fields name: the value as text (JSON for non-strings), None where absent.
    kept: tuple[str | None, ...]
    source: str
    position: int


# What a reader yields per record.
Record = Document | DeadLetter


def is_blank(document: Document) -> bool:
    """Whether no input of `document` holds anything: every text empty or whitespace (`str.strip`), every
    token-id list empty or all 0.

    Such a record is an `empty_document` dead letter, decided by the read (`blank_error`)
    whatever the tokenizer would make of its whitespace (a Keras 2 `oov_token`, a
    character-level tokenizer or a string model splitting characters give it tokens):
    then the id scan, a resumed run's skip, the --reuse join and inference all see the
    same records, and a blank record never holds its id.
    """
    return all(
        not any(text.ids) if isinstance(text, TokenIds) else not text.strip() for text in document.texts
    )


def blank_error(document: Document) -> DeadLetter:
    """The `empty_document` dead letter of a blank record (`is_blank`)."""
    return schema_lib.document_error_row(
        document,
        EMPTY_DOCUMENT,
        "Every model input is empty or whitespace (or token ids that are all 0): a blank record is "
        "never embedded, whatever the tokenizer.",
    )


def duplicate_id_error(document: Document, where: str) -> DeadLetter:
    """The `duplicate_id` dead letter of a later record of an id, whose kept record is at `where`."""
    return schema_lib.document_error_row(
        document, DUPLICATE_ID, f"Id {document.id!r} was already used by {where}."
    )


def guarded(
    parse: Callable[..., Record], plan: ExportPlan, source: str, number: int, *args: typing.Any
) -> Record:
    """`parse(plan, source, number, *args)`, with any failure a dead letter of that record only."""
    try:
        return parse(plan, source, number, *args)
    except Exception as error:
        return schema_lib.error_row(
            source, number, None, PARSE_FAILED, f"{type(error).__name__}: {error}", None
        )


def read_fields(plan: ExportPlan) -> set[str]:
    """The record fields the export reads: the id, the kept fields and each model input's field."""
    return {plan.id_field, *plan.keep_fields, *(info.field for info in plan.inputs)}


def ambiguous_fields(plan: ExportPlan, names: Sequence[str], where: str) -> str | None:
    """A message if `names` (a CSV header, a Parquet file's columns) repeat a field the export reads.

    Every record of such a file is an `ambiguous_header` dead letter: which of the
    columns to read would be a guess.
    """
    wanted = read_fields(plan)
    repeated = sorted({name for name in names if name in wanted and names.count(name) > 1})
    if not repeated:
        return None
    columns = "; ".join(
        f"{name!r} in columns {', '.join(str(i) for i, h in enumerate(names, start=1) if h == name)}"
        for name in repeated
    )
    return f"{where} {columns}: which one to read is ambiguous. Rename the columns."


def near_misses(plan: ExportPlan, names: Sequence[str]) -> str:
    """What to add to a missing field's dead letter when a column of `names` (a CSV header, a Parquet
    file's columns) is that field but for case or surrounding spaces (`ID`, ` content` after "id, ").

    Empty when none is: the field is plainly missing.
    """
    notes = []
    for field in sorted(read_fields(plan) - set(names)):
        close = [name for name in names if name.strip().casefold() == field.strip().casefold()]
        if close:
            notes.append(f"{field!r} is no column, but {close[0]!r} is")
    if not notes:
        return ""
    return (
        f" {'; '.join(notes)}: rename the column, or name it as it is spelt (--id_field, --input_map, "
        "--keep_fields)."
    )


def with_note(record: Record, note: str) -> Record:
    """`record` with `note` (`near_misses`) added to its message if it is a missing id or field."""
    if note and not isinstance(record, Document) and record["reason"] in (MISSING_ID, MISSING_FIELD):
        record["message"] = schema_lib.writable_text(record["message"] + note)[:1000]
    return record


def too_large(source: str, number: int, size: int, limit: int, raw: str | bytes) -> DeadLetter:
    """The dead letter of a record of `size` bytes, over --max_record_bytes=`limit`."""
    return schema_lib.error_row(
        source,
        number,
        None,
        TOO_LARGE,
        f"Record of {size} bytes exceeds --max_record_bytes={limit}.",
        raw,
    )


def _bytes_as_text(value: bytes) -> str:
    """Bytes of a kept field as text: UTF-8 when they are, else standard base64 (no repr `b'...'`)."""
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return base64.b64encode(value).decode("ascii")


def _json_default(value: object) -> str:
    return _bytes_as_text(value) if isinstance(value, bytes) else str(value)


def _kept_value(value: object) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return _bytes_as_text(value)
    return json.dumps(value, ensure_ascii=False, default=_json_default)


def to_document(
    plan: ExportPlan,
    source: str,
    number: int,
    record: Mapping[str, typing.Any],
    raw: str | bytes | None = None,
) -> Record:
    """A record (field -> value) -> `Document`, or a dead-letter row saying what is wrong with it.

    Args:
        raw: the record's text for dead letters; None makes it from `record` when needed.
    """
    document_id = record.get(plan.id_field)
    if document_id is None or document_id == "":
        return _reject(source, number, None, record, raw)(
            MISSING_ID, f"Field {plan.id_field!r} is missing or null."
        )
    if isinstance(document_id, decimal.Decimal) and document_id.is_finite():
        # A Parquet decimal is exact: an integral one is an integer id, whatever the column's scale
        # (Snowflake's NUMBER(38,0), BigQuery's NUMERIC as decimal(38,9): "7.000000000" is 7).
        if document_id != document_id.to_integral_value():
            return _reject(source, number, None, record, raw)(
                BAD_ID,
                f"Field {plan.id_field!r} must be a string or integer, found the decimal {document_id} "
                "(a fraction).",
            )
        document_id = int(document_id)
    if isinstance(document_id, float):
        # A float id is inexact past 2**53, so never an id; most are integers that pandas made floats.
        return _reject(source, number, None, record, raw)(
            BAD_ID,
            f"Field {plan.id_field!r} must be a string or integer, found the float {document_id!r}: "
            + FLOAT_ID_FIX.format(plan.id_field),
        )
    if not isinstance(document_id, (str, int)) or isinstance(document_id, bool):
        return _reject(source, number, None, record, raw)(
            BAD_ID,
            f"Field {plan.id_field!r} must be a string or integer, found {type(document_id).__name__}.",
        )
    return fields_to_document(plan, source, number, str(document_id), record, raw)


def _reject(
    source: str,
    number: int,
    document_id: str | None,
    record: Mapping[str, typing.Any],
    raw: str | bytes | None,
) -> Callable[[str, str], DeadLetter]:
    """A function (reason, message) -> dead-letter row of this record."""

    def reject(reason: str, message: str) -> DeadLetter:
        text = raw if raw is not None else json.dumps(record, ensure_ascii=False, default=str)
        return schema_lib.error_row(source, number, document_id, reason, message, text)

    return reject


def fields_to_document(
    plan: ExportPlan,
    source: str,
    number: int,
    document_id: str,
    record: Mapping[str, typing.Any],
    raw: str | bytes | None,
) -> Record:
    """A record whose id is `document_id` -> `Document`, or the dead letter of its first bad field."""
    reject = _reject(source, number, document_id, record, raw)
    if SURROGATE.search(document_id):
        return reject(INVALID_UTF8, f"The id {document_id!r} holds a lone surrogate, which is not text.")
    texts: list[str] = []
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
        elif SURROGATE.search(value):
            return reject(INVALID_UTF8, f"Field {info.field!r} holds a lone surrogate, which is not text.")
        texts.append(value)
    kept = tuple(_kept_value(record.get(name)) for name in plan.keep_fields)
    for name, kept_value in zip(plan.keep_fields, kept, strict=True):
        if kept_value is not None and SURROGATE.search(kept_value):
            return reject(INVALID_UTF8, f"Field {name!r} holds a lone surrogate, which is not text.")
    return Document(document_id, tuple(texts), kept, source, number)
