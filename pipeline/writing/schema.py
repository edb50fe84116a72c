"""The Arrow schemas of the output and dead-letter datasets, and rows-to-Arrow conversion.

This module is the one place that decides column names, types and Parquet
metadata; the writer, the tests and the README examples all use it.
"""

from __future__ import annotations

import hashlib
import json
import typing
from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa

from pipeline.writing.real_tokens import RealTokens, pool_real_tokens

if typing.TYPE_CHECKING:
    from pipeline.planning.plan import ColumnInfo, ExportPlan, InputInfo
    from pipeline.reading.documents import Document

ID_COLUMN = "id"
# SHA-256 of exactly what the model saw of the document (see `input_fingerprint`):
# `--reuse` copies a row from an earlier export only when it is unchanged.
FINGERPRINT_COLUMN = "input_sha256"
TOKENS_SUFFIX = "_tokens"
# The `--token_storage` (`ColumnInfo.token_storage`) where a per-token column holds the real tokens'
# ids and its vectors are in a table (not `plan.IDS_INPUT`, a model input that takes ids).
TOKEN_STORAGE_IDS = "ids"
TOKEN_ID_TYPE = pa.int32()
METADATA_KEY = b"embexport"
# Characters of a bad record that its dead letter keeps in `raw`.
RAW_LIMIT = 4096

# Dead-letter reason codes (the `reason` column of ERROR_SCHEMA), all of them; the
# README's "Nothing lost" table explains each.
TOO_LARGE = "too_large"
INVALID_UTF8 = "invalid_utf8"
MALFORMED_JSON = "malformed_json"
NOT_AN_OBJECT = "not_an_object"
WRONG_FIELD_COUNT = "wrong_field_count"
MALFORMED_CSV = "malformed_csv"
AMBIGUOUS_HEADER = "ambiguous_header"
REPEATED_HEADER = "repeated_header"
MISSING_ID = "missing_id"
BAD_ID = "bad_id"
MISSING_FIELD = "missing_field"
WRONG_TYPE = "wrong_type"
BAD_TOKEN_ID = "bad_token_id"
EMPTY_RECORD = "empty_record"
DUPLICATE_ID = "duplicate_id"
PARSE_FAILED = "parse_failed"
UNREADABLE_FILE = "unreadable_file"
READ_ERROR = "read_error"
EMPTY_DOCUMENT = "empty_document"
INFERENCE_FAILED = "inference_failed"
FLOAT16_OVERFLOW = "float16_overflow"
# A dead letter with one of these reasons stands for an unknown number of records.
FILE_REASONS = (UNREADABLE_FILE, READ_ERROR)

# A row of ERROR_SCHEMA (`error_row`): column -> value.
ErrorRow = dict[str, str | int | None]

ERROR_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string()),
        pa.field("position", pa.int64()),
        pa.field("id", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("message", pa.string()),
        pa.field("raw", pa.string()),
    ]
)


def _value_type(dtype: str) -> pa.DataType:
    return pa.float16() if dtype == "float16" else pa.float32()


def is_per_token(column: ColumnInfo) -> bool:
    """Whether `column` (a `plan.ColumnInfo`) holds one value per real token (`--pooling none`)."""
    return column.kind == "sequence" and column.pooling == "none"


def column_type(column: ColumnInfo, dtype: str) -> pa.DataType:
    """Arrow type of an exported layer column (see `plan.ColumnInfo`)."""
    vector = pa.list_(_value_type(dtype), column.dim)
    if is_per_token(column) and column.token_storage == TOKEN_STORAGE_IDS:
        return pa.list_(TOKEN_ID_TYPE)
    if is_per_token(column):
        return pa.list_(vector)
    return vector


def output_schema(plan: ExportPlan) -> pa.Schema:
    """The output dataset's schema, with the export's facts as Parquet key-value metadata."""
    fields = [pa.field(ID_COLUMN, pa.string(), nullable=False)]
    fields += [pa.field(name, pa.string()) for name in plan.keep_fields]
    for column in plan.columns:
        fields.append(pa.field(column.column, column_type(column, plan.dtype)))
        if is_per_token(column):
            fields.append(pa.field(column.column + TOKENS_SUFFIX, pa.int32()))
    fields.append(pa.field(FINGERPRINT_COLUMN, pa.string()))
    metadata = {
        "model_uri": plan.model_uri,
        "model_sha256": plan.model_sha256,
        "tokenizer_sha256": plan.tokenizer_sha256,
        "package_version": plan.package_version,
        "dtype": plan.dtype,
        "inputs": [{"name": i.name, "field": i.field, "length": i.length} for i in plan.inputs],
        "columns": [
            {
                "column": c.column,
                "layer": c.layer,
                "call": c.call,
                "kind": c.kind,
                "dim": c.dim,
                "dtype": plan.dtype,
                "pooling": c.pooling if c.kind == "sequence" else None,
                "source_input": c.source_input or None,
                "token_storage": c.token_storage if is_per_token(c) else None,
                # --token_storage ids: the table's path relative to the output directory.
                "table": c.table or None,
            }
            for c in plan.columns
        ],
    }
    return pa.schema(fields, metadata={METADATA_KEY: json.dumps(metadata).encode("utf-8")})


def _leaf_path(field: pa.Field) -> tuple[str, pa.DataType]:
    """The Parquet column path of `field`'s values, as written with `use_compliant_nested_type=False`."""
    path, arrow_type = field.name, field.type
    while pa.types.is_list(arrow_type) or pa.types.is_fixed_size_list(arrow_type):
        path, arrow_type = path + ".list.item", arrow_type.value_type
    return path, arrow_type


def parquet_writer_options(schema: pa.Schema) -> dict[str, typing.Any]:
    """Keyword arguments of `pq.ParquetWriter` for rows of `schema` (the output rows).

    Vector values (float leaves) get neither a dictionary nor min/max statistics:
    the encoder hashes every float into a dictionary that it abandons once the
    dictionary outgrows a page (vectors barely repeat), and a float's min/max
    prunes nothing; together they cost about a third of the time of writing
    per-token rows.  The values written, and so the rows read back, are the same.
    Ids, kept fields, token counts and token ids keep both.  Every page carries
    its CRC-32, which a resumed run checks before it keeps a staged file (a page
    damaged on disk between the kill and the rerun is not committed as rows).
    """
    keep = [path for path, leaf in map(_leaf_path, schema) if not pa.types.is_floating(leaf)]
    return {
        "use_compliant_nested_type": False,
        "use_dictionary": keep,
        "write_statistics": keep,
        "write_page_checksum": True,
    }


# The embedding table (`python -m pipeline.vocabulary`, and `_tables/` of a
# `--token_storage ids` export): one row per token id.
VOCABULARY_FILE = "vocabulary.parquet"
TOKEN_ID_COLUMN = "token_id"
TOKEN_COLUMN = "token"
VECTOR_COLUMN = "vector"


def vocabulary_schema(dim: int, metadata: Mapping[str, typing.Any]) -> pa.Schema:
    """The embedding table's schema: token id, token, vector, and `metadata` as JSON."""
    fields = [
        pa.field(TOKEN_ID_COLUMN, pa.int32(), nullable=False),
        pa.field(TOKEN_COLUMN, pa.string()),
        pa.field(VECTOR_COLUMN, pa.list_(pa.float32(), dim), nullable=False),
    ]
    return pa.schema(fields, metadata={METADATA_KEY: json.dumps(metadata).encode("utf-8")})


def read_export_metadata(schema: pa.Schema) -> dict[str, typing.Any]:
    """The metadata dict stored by `output_schema` or `vocabulary_schema`, from a Parquet file's schema."""
    return json.loads(schema.metadata[METADATA_KEY])


def _fixed_size(matrix: np.ndarray, value_type: pa.DataType) -> pa.FixedSizeListArray:
    """(n, dim) array -> FixedSizeListArray without a per-row Python loop."""
    flat = pa.array(np.ascontiguousarray(matrix).reshape(-1), type=value_type)
    return pa.FixedSizeListArray.from_arrays(flat, matrix.shape[1])


def input_fingerprint(texts: Sequence[str], inputs: Sequence[InputInfo]) -> str:
    """Hex SHA-256 of what the model sees of a document: each input's text or token ids.

    Args:
        texts: the document's values in `inputs` order (strings, or `TokenIds`,
            which carry `.ids`).
        inputs: the plan's `InputInfo`s.
    """
    parts = [
        [info.name, "ids", list(text.ids)] if hasattr(text, "ids") else [info.name, "text", text]
        for info, text in zip(inputs, texts, strict=True)
    ]
    # ensure_ascii escapes lone surrogates, which UTF-8 cannot encode.
    return hashlib.sha256(json.dumps(parts, ensure_ascii=True).encode("ascii")).hexdigest()


class Float16Overflow(ValueError):
    """Rows holding a finite value float16 cannot hold (beyond ±65,504): stored, it would be infinite."""

    def __init__(self, column: str, values: np.ndarray) -> None:
        self.column = column
        self.values = values  # (documents,): each row's first such value, NaN for a row without one
        self.rows = ~np.isnan(values)  # (documents,) bool: the rows holding such a value
        super().__init__(self.message(int(np.flatnonzero(self.rows)[0])))

    def message(self, row: int) -> str:
        """What is wrong with row `row` (one of `rows`), and what to do."""
        return (
            f"{self.column} holds {self.values[row]:.7g}, beyond float16's range (±65,504): --dtype "
            "float16 would store it as infinity. Export with --dtype float32."
        )


def _to_float(
    values: np.ndarray, numpy_type: type[np.floating], column: str, counts: np.ndarray | None = None
) -> np.ndarray:
    """`values` in the stored dtype; raises `Float16Overflow` where a finite value would become infinite.

    `counts`: the real tokens per document of per-token `values` (tokens, dim); else one row per document.
    """
    with np.errstate(over="ignore"):  # Found below, and said in the dead letter.
        stored = np.asarray(values).astype(numpy_type, copy=False)
    if numpy_type is np.float32:
        return stored
    overflowed = np.isinf(stored) & np.isfinite(values)
    if overflowed.any():
        flat = overflowed.reshape(len(overflowed), -1)
        firsts = np.asarray(values, np.float64).reshape(len(flat), -1)[
            np.arange(len(flat)), flat.argmax(axis=1)
        ]
        firsts[~flat.any(axis=1)] = np.nan
        if counts is not None:  # Tokens to their documents; a document's first token wins.
            documents = np.full(len(counts), np.nan)
            tokens = np.flatnonzero(~np.isnan(firsts))[::-1]
            documents[np.repeat(np.arange(len(counts)), counts)[tokens]] = firsts[tokens]
            firsts = documents
        raise Float16Overflow(column, firsts)
    return stored


def to_record_batch(
    schema: pa.Schema,
    columns: Sequence[ColumnInfo],
    dtype: str,
    document_ids: Sequence[str],
    kept: Mapping[str, Sequence[str | None]],
    outputs: Mapping[str, np.ndarray | RealTokens],
    masks: Mapping[str, np.ndarray],
    token_ids: Mapping[str, np.ndarray] | None = None,
    fingerprints: Sequence[str | None] | None = None,
) -> pa.RecordBatch:
    """Builds the output rows of one batch as an Arrow RecordBatch.

    Args:
        schema: `output_schema(plan)`.
        columns: the plan's `ColumnInfo`s.
        dtype: the plan's "float32" or "float16".
        document_ids: the documents' ids (strings).
        kept: field name -> list of values (strings or None), in `plan.keep_fields` order.
        outputs: column name -> numpy array from the sub-model, rows aligned with
            `document_ids`, or a per-token column's `RealTokens` (not needed for
            columns stored as token ids).
        masks: model input name -> boolean (n, length) array of real-token positions.
        token_ids: model input name -> (n, length) int32 token ids (for columns
            stored as token ids).
        fingerprints: `input_fingerprint` per row (None: left null).

    Returns:
        A `pyarrow.RecordBatch` with `schema`.

    Raises:
        Float16Overflow: with `dtype` float16, a column's value beyond its range (the
            caller dead-letters those rows and builds the batch again without them).
    """
    value_type = _value_type(dtype)
    numpy_type = np.float16 if dtype == "float16" else np.float32
    arrays = [pa.array(document_ids, type=pa.string())]
    arrays += [pa.array(values, type=pa.string()) for values in kept.values()]
    for column in columns:
        if is_per_token(column) and column.token_storage == TOKEN_STORAGE_IDS:
            if token_ids is None:
                raise ValueError(f"Column {column.column!r} is stored as token ids; pass `token_ids`.")
            mask = masks[column.source_input]
            tokens = np.asarray(token_ids[column.source_input])[mask].astype(np.int32)
            counts = mask.sum(axis=1).astype(np.int32)
            offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
            arrays.append(pa.ListArray.from_arrays(pa.array(offsets), pa.array(tokens, type=TOKEN_ID_TYPE)))
            arrays.append(pa.array(counts, type=pa.int32()))
            continue
        values = outputs[column.column]
        if column.kind == "vector":
            # A (batch, 1, dim) output of one vector per document (`column_kind`) is a row's vector too.
            matrix = np.asarray(values).reshape(len(document_ids), -1)
            arrays.append(_fixed_size(_to_float(matrix, numpy_type, column.column), value_type))
            continue
        if not isinstance(values, RealTokens):
            values = RealTokens.of_padded(values, masks[column.source_input])
        if column.pooling != "none":
            pooled = _to_float(pool_real_tokens(values, column.pooling), numpy_type, column.column)
            arrays.append(_fixed_size(pooled, value_type))
            continue
        # Real tokens are consecutive per document and in document order: the offsets are the running counts.
        counts = np.asarray(values.counts, dtype=np.int32)
        tokens = _to_float(values.vectors(), numpy_type, column.column, counts)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
        arrays.append(pa.ListArray.from_arrays(pa.array(offsets), _fixed_size(tokens, value_type)))
        arrays.append(pa.array(counts, type=pa.int32()))
    arrays.append(pa.array(fingerprints or [None] * len(document_ids), type=pa.string()))
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def rows_of(table: pa.Table) -> list[dict[str, typing.Any]]:
    """An Arrow table's rows as dicts; list columns as numpy arrays (exact, and quick to pickle).

    The inverse of `batch_of_rows`: `--reuse` carries an earlier export's rows
    through a join this way, so its vectors come back bit for bit.
    """
    columns = {}
    for name, column in zip(table.column_names, table.columns, strict=True):
        column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        arrow_type = column.type
        if pa.types.is_fixed_size_list(arrow_type):
            values = (
                column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), arrow_type.list_size)
            )
            columns[name] = list(values)
        elif pa.types.is_list(arrow_type):
            offsets = column.offsets.to_numpy()
            inner = column.flatten()
            if pa.types.is_fixed_size_list(inner.type):
                flat = (
                    inner.flatten().to_numpy(zero_copy_only=False).reshape(len(inner), inner.type.list_size)
                )
            else:
                flat = inner.to_numpy(zero_copy_only=False)
            start = offsets[0]
            columns[name] = [
                flat[a - start : b - start] for a, b in zip(offsets[:-1], offsets[1:], strict=True)
            ]
        else:
            columns[name] = column.to_pylist()
    names = list(columns)
    return [dict(zip(names, values, strict=True)) for values in zip(*columns.values(), strict=True)]


def batch_of_rows(rows: Sequence[Mapping[str, typing.Any]], schema: pa.Schema) -> pa.RecordBatch:
    """A RecordBatch of `schema` from row dicts as `rows_of` makes them (numpy list values)."""
    arrays = []
    for field in schema:
        values = [row[field.name] for row in rows]
        arrow_type = field.type
        if pa.types.is_fixed_size_list(arrow_type):
            matrix = np.stack(values) if values else np.zeros((0, arrow_type.list_size))
            arrays.append(
                _fixed_size(matrix.astype(arrow_type.value_type.to_pandas_dtype()), arrow_type.value_type)
            )
        elif pa.types.is_list(arrow_type):
            counts = np.array([len(value) for value in values], dtype=np.int64)
            offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
            inner_type = arrow_type.value_type
            if pa.types.is_fixed_size_list(inner_type):
                flat = np.concatenate(values) if values else np.zeros((0, inner_type.list_size))
                inner = _fixed_size(
                    flat.astype(inner_type.value_type.to_pandas_dtype()), inner_type.value_type
                )
            else:
                flat = np.concatenate(values) if values else np.zeros(0)
                inner = pa.array(flat, type=inner_type)
            arrays.append(pa.ListArray.from_arrays(offsets, inner))
        else:
            arrays.append(pa.array(values, type=arrow_type))
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def writable_text(text: str) -> str:
    """`text` as Parquet (UTF-8) can store it: lone surrogates become backslash escapes.

    Lone surrogates come from a JSON escape such as "\\ud800" or from bytes
    decoded with surrogateescape (a file name that is not UTF-8).
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def document_error_row(document: Document, reason: str, message: str) -> ErrorRow:
    """The dead-letter row of a parsed `Document`: its file, position and id, its texts as `raw`."""
    return error_row(
        document.source, document.position, document.id, reason, message, " | ".join(document.texts)
    )


def error_row(
    source: str | None,
    position: int | None,
    document_id: str | None,
    reason: str,
    message: str,
    raw: str | bytes | None,
    raw_limit: int = RAW_LIMIT,
) -> ErrorRow:
    """One dead-letter row; `raw` is cut to `raw_limit` characters. Every value can be written."""
    if isinstance(raw, bytes):
        raw = raw[: raw_limit * 4].decode("utf-8", errors="backslashreplace")
    raw = None if raw is None else writable_text(str(raw)[:raw_limit])
    return {
        "source": None if source is None else writable_text(str(source)),
        "position": position,
        "id": None if document_id is None else writable_text(str(document_id)),
        "reason": reason,
        "message": writable_text(str(message)[:1000]),
        "raw": raw,
    }
