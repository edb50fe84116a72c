"""The pipeline's transforms: read the corpus, embed documents, write rows and dead letters."""

import os
import re

import apache_beam as beam
import pyarrow as pa
from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes, FileMetadata
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.parquetio import ReadAllFromParquetBatched, WriteToParquet, WriteToParquetBatched
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler, RunInference
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.windowed_value import WindowedValue

from pipeline import corpus
from pipeline import schema as schema_lib
from pipeline.embedder import Document, Embedder

NAMESPACE = "embexport"
ERRORS = "errors"
DOCUMENTS = "documents"
ROWS = "rows"
# Counter of files that could not be read to the end: an unknown number of records is missing.
FILES_BROKEN = "files_broken"

# Row groups this large keep Parquet readers fast; one forward pass is smaller.
ROW_GROUP_ROWS = 8192
ROW_GROUP_BYTES = 64 << 20


class ReadCorpusFn(beam.DoFn):
    """Turns one corpus file into `Document`s, and bad records into dead letters.

    Reading whole files (rather than byte ranges) gives every record its exact
    line or row number for the dead-letter table. The parsing is `corpus.read_file`;
    this counts what it yields, and the files it could not read to the end.
    """

    def __init__(self, plan):
        self._plan = plan
        self._read = Metrics.counter(NAMESPACE, "records_read")
        self._broken = Metrics.counter(NAMESPACE, FILES_BROKEN)

    def process(self, readable_file):
        path = readable_file.metadata.path

        def open_file():
            # Compressed files are decompressed by `corpus`, with Python's gzip,
            # which (unlike Beam's reader) raises on a truncated file.
            return readable_file.open(compression_type=CompressionTypes.UNCOMPRESSED)

        for item in corpus.read_file(self._plan, path, open_file):
            self._read.inc()
            if isinstance(item, Document):
                yield item
                continue
            if item["reason"] in corpus.FILE_REASONS:
                self._broken.inc()
            yield beam.pvalue.TaggedOutput(ERRORS, item)


def broken_links(pattern):
    """Local paths matching `pattern` that are symbolic links to nothing.

    Beam's listing skips them silently; each is a file of the corpus that
    cannot be read, so it must be a dead letter.
    """
    if "://" in pattern:  # Object stores have no symbolic links.
        return []
    if pattern.endswith(os.sep):
        pattern += "*"
    prefix = re.match(r"^[^[*?]*", pattern).group(0)
    if prefix == pattern:
        return [pattern] if os.path.islink(pattern) and not os.path.exists(pattern) else []
    links = []
    for directory, _, names in os.walk(os.path.dirname(prefix) or os.curdir):
        paths = (os.path.join(directory, name) for name in names)
        links += [
            FileMetadata(path, 0) for path in paths if os.path.islink(path) and not os.path.exists(path)
        ]
    return [metadata.path for metadata in FileSystems.get_filesystem(pattern).match_files(links, pattern)]


class BrokenLinksFn(beam.DoFn):
    """Dead-letters the broken symbolic links that match the input pattern (see `broken_links`)."""

    def __init__(self):
        self._read = Metrics.counter(NAMESPACE, "records_read")
        self._broken = Metrics.counter(NAMESPACE, FILES_BROKEN)

    def process(self, pattern):
        for path in broken_links(pattern):
            self._read.inc()
            self._broken.inc()
            yield schema_lib.error_row(
                path,
                None,
                None,
                corpus.UNREADABLE_FILE,
                f"Symbolic link to {os.readlink(path)!r}, which does not exist.",
                None,
            )


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
        broken = (
            pipeline
            | "InputPattern" >> beam.Create([self._plan.input_pattern])
            | "FindBrokenLinks" >> beam.ParDo(BrokenLinksFn())
        )
        # Grouping by id finds duplicates and, like a Reshuffle, spreads the
        # documents of one file over all workers.
        unique = (
            results[DOCUMENTS]
            | "KeyById" >> beam.Map(lambda document: (document.id, document))
            | "GroupById" >> beam.GroupByKey()
            | "DropDuplicateIds" >> beam.ParDo(DropDuplicateIdsFn()).with_outputs(ERRORS, main=DOCUMENTS)
        )
        errors = (results[ERRORS], broken, unique[ERRORS]) | "CollectReadErrors" >> beam.Flatten()
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
                    corpus.DUPLICATE_ID,
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
    for row in schema_lib.rows_of(table):
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
        yield schema_lib.batch_of_rows(rows, self._schema)


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
