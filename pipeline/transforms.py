"""The pipeline's transforms: read the corpus, embed documents, write rows and dead letters."""

import csv
import io
import json
import os

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.parquetio import ReadAllFromParquetBatched, WriteToParquet, WriteToParquetBatched
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler, RunInference
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.windowed_value import WindowedValue

from pipeline import schema as schema_lib
from pipeline.embedder import Document, Embedder, TokenIds
from pipeline.plan import IDS_INPUT

NAMESPACE = "embexport"
ERRORS = "errors"
DOCUMENTS = "documents"
ROWS = "rows"

# Dead-letter reason codes (the `reason` column of errors/).
TOO_LARGE = "too_large"
INVALID_UTF8 = "invalid_utf8"
MALFORMED_JSON = "malformed_json"
NOT_AN_OBJECT = "not_an_object"
WRONG_FIELD_COUNT = "wrong_field_count"
MISSING_ID = "missing_id"
BAD_ID = "bad_id"
MISSING_FIELD = "missing_field"
WRONG_TYPE = "wrong_type"
UNREADABLE_FILE = "unreadable_file"
EMPTY_RECORD = "empty_record"
DUPLICATE_ID = "duplicate_id"

# Row groups this large keep Parquet readers fast; one forward pass is smaller.
ROW_GROUP_ROWS = 8192
ROW_GROUP_BYTES = 64 << 20


def _kept_value(value):
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, default=str)


class ReadCorpusFn(beam.DoFn):
    """Turns one corpus file into `Document`s, and bad records into dead letters.

    Reading whole files (rather than byte ranges) gives every record its exact
    line or row number for the dead-letter table.
    """

    def __init__(self, plan):
        self._plan = plan
        self._read = Metrics.counter(NAMESPACE, "records_read")

    def process(self, readable_file):
        path = readable_file.metadata.path
        fmt = self._plan.input_format
        try:
            handle = readable_file.open(compression_type=CompressionTypes.AUTO)
            if fmt == "parquet":
                records = self._parquet_records(path, handle)
            elif fmt == "csv":
                records = self._csv_records(path, handle)
            else:
                records = self._line_records(path, handle, fmt)
            for record in records:
                self._read.inc()
                yield record
        except Exception as error:  # A file that cannot be read at all is one dead letter.
            self._read.inc()
            yield beam.pvalue.TaggedOutput(
                ERRORS,
                schema_lib.error_row(
                    path, None, None, UNREADABLE_FILE, f"{type(error).__name__}: {error}", None
                ),
            )

    def _error(self, path, position, document_id, reason, message, raw):
        return beam.pvalue.TaggedOutput(
            ERRORS, schema_lib.error_row(path, position, document_id, reason, message, raw)
        )

    def _line_records(self, path, handle, fmt):
        limit = self._plan.max_record_bytes
        for number, line in enumerate(handle, start=1):
            if len(line) > limit:
                yield self._error(
                    path,
                    number,
                    None,
                    TOO_LARGE,
                    f"Record of {len(line)} bytes exceeds --max_record_bytes={limit}.",
                    line,
                )
                continue
            try:
                text = line.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as error:
                yield self._error(path, number, None, INVALID_UTF8, str(error), line)
                continue
            if fmt == "text":
                fields = {self._plan.inputs[0].field: text} if self._plan.inputs else {}
                yield self._document(path, number, f"{path}:{number}", fields, text)
                continue
            if not text.strip():
                yield self._error(
                    path, number, None, EMPTY_RECORD, "Blank line where a JSON object was expected.", text
                )
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as error:
                yield self._error(path, number, None, MALFORMED_JSON, str(error), text)
                continue
            if not isinstance(record, dict):
                yield self._error(
                    path,
                    number,
                    None,
                    NOT_AN_OBJECT,
                    f"Expected a JSON object, found {type(record).__name__}.",
                    text,
                )
                continue
            yield self._record(path, number, record, text)

    def _csv_records(self, path, handle):
        # surrogateescape keeps undecodable bytes visible per row instead of
        # failing the rest of the file.
        text = io.TextIOWrapper(handle, encoding="utf-8", errors="surrogateescape", newline="")
        reader = csv.reader(text)
        header = next(reader, None)
        if header is None:
            return
        limit = self._plan.max_record_bytes
        for number, values in enumerate(reader, start=1):
            raw = ",".join(values)
            if len(raw) > limit:
                yield self._error(
                    path,
                    number,
                    None,
                    TOO_LARGE,
                    f"Row of {len(raw)} characters exceeds --max_record_bytes={limit}.",
                    raw,
                )
                continue
            if any("\udc80" <= ch <= "\udcff" for value in values for ch in value):
                yield self._error(
                    path,
                    number,
                    None,
                    INVALID_UTF8,
                    "Row holds bytes that are not UTF-8.",
                    raw.encode("utf-8", "surrogateescape"),
                )
                continue
            if len(values) != len(header):
                yield self._error(
                    path,
                    number,
                    None,
                    WRONG_FIELD_COUNT,
                    f"Row has {len(values)} fields; the header has {len(header)}.",
                    raw,
                )
                continue
            yield self._record(path, number, dict(zip(header, values, strict=True)), raw)

    def _parquet_records(self, path, handle):
        number = 0
        for batch in pq.ParquetFile(handle).iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                number += 1
                yield self._record(path, number, record, None)

    def _record(self, path, number, record, raw):
        plan = self._plan
        raw = raw if raw is not None else json.dumps(record, ensure_ascii=False, default=str)
        document_id = record.get(plan.id_field)
        if document_id is None or document_id == "":
            return self._error(
                path, number, None, MISSING_ID, f"Field {plan.id_field!r} is missing or null.", raw
            )
        if isinstance(document_id, (dict, list, bool, float)):
            return self._error(
                path,
                number,
                None,
                BAD_ID,
                f"Field {plan.id_field!r} must be a string or integer, found {type(document_id).__name__}.",
                raw,
            )
        return self._document(path, number, str(document_id), record, raw)

    def _document(self, path, number, document_id, record, raw):
        texts = []
        for info in self._plan.inputs:
            value = record.get(info.field)
            if value is None:
                return self._error(
                    path,
                    number,
                    document_id,
                    MISSING_FIELD,
                    f"Field {info.field!r} (model input {info.name!r}) is missing or null.",
                    raw,
                )
            problem = None
            if isinstance(value, list) and info.kind == IDS_INPUT:
                # A list of token ids skips the tokenizer (a corpus tokenized elsewhere).
                if all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value):
                    value = TokenIds(value)
                else:
                    problem = f"Field {info.field!r} is a list, but not of non-negative integer token ids."
            elif not isinstance(value, str):
                expected = "a string or a list of token ids" if info.kind == IDS_INPUT else "a string"
                problem = f"Field {info.field!r} must be {expected}, found {type(value).__name__}."
            elif info.kind == IDS_INPUT and not self._plan.tokenizes:
                problem = f"Field {info.field!r} holds text, but --tokenizer none expects token id lists."
            if problem:
                return self._error(path, number, document_id, WRONG_TYPE, problem, raw)
            texts.append(value)
        kept = tuple(_kept_value(record.get(name)) for name in self._plan.keep_fields)
        return Document(document_id, tuple(texts), kept, path, number)


class ReadCorpus(beam.PTransform):
    """Reads `plan.input_pattern` into Documents (main output) and dead letters (`errors`)."""

    def __init__(self, plan):
        super().__init__()
        self._plan = plan

    def expand(self, pipeline):
        results = (
            pipeline
            | "MatchFiles" >> fileio.MatchFiles(self._plan.input_pattern)
            | "ReadMatches" >> fileio.ReadMatches()
            # Files are read whole; spread their records over workers before inference.
            | "ReshuffleFiles" >> beam.Reshuffle()
            | "ParseRecords" >> beam.ParDo(ReadCorpusFn(self._plan)).with_outputs(ERRORS, main=DOCUMENTS)
        )
        # Grouping by id finds duplicates and, like a Reshuffle, spreads the
        # documents of one file over all workers.
        unique = (
            results[DOCUMENTS]
            | "KeyById" >> beam.Map(lambda document: (document.id, document))
            | "GroupById" >> beam.GroupByKey()
            | "DropDuplicateIds" >> beam.ParDo(DropDuplicateIdsFn()).with_outputs(ERRORS, main=DOCUMENTS)
        )
        errors = (results[ERRORS], unique[ERRORS]) | "CollectReadErrors" >> beam.Flatten()
        return unique[DOCUMENTS], errors


class DropDuplicateIdsFn(beam.DoFn):
    """Keeps the first record of each id (by file, then position); dead-letters the others.

    "First" is by source path and record number, not by arrival, so reruns keep
    the same record whatever order the workers read in.
    """

    def process(self, element):
        _, documents = element
        documents = sorted(documents, key=lambda d: (d.source, d.position))
        yield documents[0]
        for duplicate in documents[1:]:
            first = documents[0]
            yield beam.pvalue.TaggedOutput(
                ERRORS,
                schema_lib.error_row(
                    duplicate.source,
                    duplicate.position,
                    duplicate.id,
                    DUPLICATE_ID,
                    f"Id {duplicate.id!r} was already used by {first.source}:{first.position}.",
                    " | ".join(duplicate.texts),
                ),
            )


class EmbeddingModelHandler(ModelHandler):
    """RunInference handler: `load_model` builds an `Embedder`, `run_inference` embeds a batch.

    The constructor only stores the plan; the model is loaded on the worker,
    once per process, from `plan.model_uri`.
    """

    def __init__(self, plan):
        super().__init__(min_batch_size=plan.batch_size, max_batch_size=plan.batch_size)
        self._plan = plan

    def load_model(self):
        return Embedder(self._plan)

    def run_inference(self, batch, model, inference_args=None):
        return [model.embed(list(batch))]

    def get_num_bytes(self, batch):
        # Beam's default pickles the whole batch just to measure it.
        return sum(len(text) for document in batch for text in document.texts)

    def get_metrics_namespace(self):
        return NAMESPACE


class SplitResultsFn(beam.DoFn):
    """Unpacks `EmbedResult`s into row batches and dead letters, counting both."""

    def __init__(self):
        self._written = Metrics.counter(NAMESPACE, "rows_embedded")
        self._truncated = Metrics.counter(NAMESPACE, "documents_truncated")
        self._oov = Metrics.counter(NAMESPACE, "oov_tokens")

    def process(self, result):
        self._truncated.inc(result.truncated)
        self._oov.inc(result.oov_tokens)
        if result.rows is not None and result.rows.num_rows:
            self._written.inc(result.rows.num_rows)
            yield result.rows
        for error in result.errors:
            yield beam.pvalue.TaggedOutput(ERRORS, error)


class EmbedDocuments(beam.PTransform):
    """Documents -> Arrow RecordBatches of output rows (main) and dead letters (`errors`)."""

    def __init__(self, plan):
        super().__init__()
        self._plan = plan

    def expand(self, documents):
        results = (
            documents
            | "RunInference" >> RunInference(EmbeddingModelHandler(self._plan))
            | "SplitResults" >> beam.ParDo(SplitResultsFn()).with_outputs(ERRORS, main=ROWS)
        )
        return results[ROWS], results[ERRORS]


class CoalesceBatchesFn(beam.DoFn):
    """Merges small RecordBatches into Tables big enough to be good Parquet row groups."""

    def start_bundle(self):
        self._buffer = []
        self._rows = 0
        self._bytes = 0

    def process(self, batch):
        self._buffer.append(batch)
        self._rows += batch.num_rows
        self._bytes += batch.nbytes
        if self._rows >= ROW_GROUP_ROWS or self._bytes >= ROW_GROUP_BYTES:
            yield self._flush()

    def finish_bundle(self):
        if self._buffer:
            yield WindowedValue(self._flush(), GlobalWindow().max_timestamp(), [GlobalWindow()])

    def _flush(self):
        table = pa.Table.from_batches(self._buffer)
        self.start_bundle()
        return table


def count_errors(errors):
    """Counts dead letters by reason as Beam metrics."""

    def count(row):
        Metrics.counter(NAMESPACE, f"failed_{row['reason']}").inc()
        return row

    return errors | "CountErrors" >> beam.Map(count)


class WriteEmbeddings(beam.PTransform):
    """Writes row batches as sharded Parquet files `<prefix>-SSSSS-of-NNNNN.parquet`."""

    def __init__(self, plan, prefix):
        super().__init__()
        self._plan = plan
        self._prefix = prefix

    def expand(self, batches):
        return (
            batches
            | "CoalesceBatches" >> beam.ParDo(CoalesceBatchesFn())
            | "WriteParquet"
            >> WriteToParquetBatched(
                self._prefix,
                schema=schema_lib.output_schema(self._plan),
                codec=self._plan.compression,
                file_name_suffix=".parquet",
            )
        )


class WriteDeadLetters(beam.PTransform):
    """Writes dead-letter rows as Parquet with `schema.ERROR_SCHEMA`."""

    def __init__(self, plan, prefix):
        super().__init__()
        self._plan = plan
        self._prefix = prefix

    def expand(self, errors):
        return errors | "WriteParquet" >> WriteToParquet(
            self._prefix,
            schema=schema_lib.ERROR_SCHEMA,
            codec=self._plan.compression,
            file_name_suffix=".parquet",
        )


REUSED = "reused"


def _earlier_rows(table):
    """(id, row) for each row of an earlier export's row group; `row` lacks the id."""
    for row in table.to_pylist():
        yield row.pop(schema_lib.ID_COLUMN), row


class ReuseEarlierRowsFn(beam.DoFn):
    """Joins a document with the earlier export's row of its id: reused row, or document to embed.

    Input: (id, {"documents": [Document], "earlier": [row]}), at most one of
    each since ids are unique in a finished export and after de-duplication.
    A row is reused only if its `input_sha256` equals the document's
    fingerprint; kept fields always come from the new corpus.
    """

    def __init__(self, plan):
        self._plan = plan
        self._reused = Metrics.counter(NAMESPACE, "rows_reused")
        self._changed = Metrics.counter(NAMESPACE, "earlier_rows_changed")
        self._dropped = Metrics.counter(NAMESPACE, "earlier_rows_dropped")

    def process(self, element):
        document_id, groups = element
        documents, earlier = list(groups["documents"]), list(groups["earlier"])
        if not documents:
            self._dropped.inc(len(earlier))
            return
        document = documents[0]
        fingerprint = schema_lib.input_fingerprint(document.texts, self._plan.inputs)
        if earlier and earlier[0][schema_lib.FINGERPRINT_COLUMN] == fingerprint:
            row = dict(earlier[0], id=document_id)
            row.update(zip(self._plan.keep_fields, document.kept, strict=True))
            self._reused.inc()
            yield beam.pvalue.TaggedOutput(REUSED, row)
            return
        if earlier:
            self._changed.inc()
        yield document


class RowsToBatchFn(beam.DoFn):
    """Turns a list of row dicts into one Arrow RecordBatch of the output schema."""

    def __init__(self, plan):
        self._plan = plan

    def setup(self):
        self._schema = schema_lib.output_schema(self._plan)

    def process(self, rows):
        yield pa.RecordBatch.from_pylist(rows, schema=self._schema)


class ReuseEarlierRows(beam.PTransform):
    """Documents -> documents still to embed (main) and reused row batches (`reused`).

    A join by id of the corpus with the earlier export (`plan.reuse_files`),
    reading only the columns a row needs: a CoGroupByKey, so neither side is
    held in memory whole, on Dataflow or locally.
    """

    def __init__(self, plan):
        super().__init__()
        self._plan = plan

    def expand(self, documents):
        plan = self._plan
        columns = [
            name
            for name in schema_lib.output_schema(plan).names
            if name not in plan.keep_fields  # Kept fields come from the new corpus.
        ]
        earlier = (
            documents.pipeline
            | "EarlierShards" >> beam.Create(list(plan.reuse_files))
            | "ReadEarlierShards" >> ReadAllFromParquetBatched(columns=columns)
            | "KeyEarlierRows" >> beam.FlatMap(_earlier_rows)
        )
        keyed = documents | "KeyDocumentsById" >> beam.Map(lambda document: (document.id, document))
        results = (
            {"documents": keyed, "earlier": earlier}
            | "JoinWithEarlier" >> beam.CoGroupByKey()
            | "ReuseUnchanged" >> beam.ParDo(ReuseEarlierRowsFn(plan)).with_outputs(REUSED, main=DOCUMENTS)
        )
        reused = (
            results[REUSED]
            | "BatchReusedRows" >> beam.BatchElements(min_batch_size=256, max_batch_size=ROW_GROUP_ROWS)
            | "ReusedRowsToArrow" >> beam.ParDo(RowsToBatchFn(plan))
        )
        return results[DOCUMENTS], reused


def shard_prefix(directory):
    return os.path.join(directory, "part") if "://" not in directory else directory.rstrip("/") + "/part"
