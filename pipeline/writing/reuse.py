"""The --reuse join: a corpus's documents against an earlier export's rows, reusing the unchanged ones."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystem import BeamIOError, CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from pipeline.errors import ExportConfigError
from pipeline.inference.skip_kept import SkipKeptFn, output_row_key, row_id
from pipeline.planning.plan import ExportPlan
from pipeline.reading.documents import DeadLetter, Document, duplicate_id_error
from pipeline.reading.ranges import path_key
from pipeline.running import counters
from pipeline.writing import schema as schema_lib
from pipeline.writing.shards import ROW_GROUP_ROWS

# The outputs of `ReuseEarlierRowsFn`: documents still to embed (main), reused rows and dead letters.
DOCUMENTS = "documents"
REUSED = "reused"
ERRORS = "errors"

# An output row as a dict of its columns (`schema.rows_of`).
Row = dict[str, Any]


def _earlier_rows(table: pa.Table) -> Iterator[tuple[str, Row]]:
    """(id, row) for each row of an earlier export's row group; `row` lacks the id."""
    for row in schema_lib.rows_of(table):
        yield row.pop(schema_lib.ID_COLUMN), row


class ReadEarlierShardFn(beam.DoFn):
    """(path, recorded digest) of a --reuse shard -> its row groups (`columns` only), read as checked.

    The launch checked each shard against the earlier export's manifest, but the
    rows are read later, by name: had that export been replaced since (an
    `--overwrite` of it, a copy over it), its new shards, of the same names, would
    join this export under the old signature. So the shard is read whole into
    memory (a shard is about --shard_mb of the earlier run), its bytes checked
    against the launch's digest (SHA-256; an object store's checksum is asked
    again after the read, since it cannot be computed from the bytes), and only
    those bytes parsed.

    Raises:
        ExportConfigError: the shard is no longer what the launch checked.
    """

    def __init__(self, columns: Sequence[str]):
        self._columns = list(columns)

    def process(self, shard: tuple[str, str]) -> Iterator[pa.Table]:
        path, digest = shard
        try:
            with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
                data = handle.read()
        except (OSError, BeamIOError) as error:  # Gone: an --overwrite of it renamed or removed its shards.
            raise ExportConfigError(
                f"--reuse shard {path!r} cannot be read any more ({type(error).__name__}): the earlier "
                "export was replaced or removed while this run read it. Rerun the export."
            ) from None
        kind, _, recorded = digest.partition(":")
        found = hashlib.sha256(data).hexdigest() if kind == "sha256" else FileSystems.checksum(path)
        if found != recorded:
            raise ExportConfigError(
                f"--reuse shard {path!r} changed after launch (its {kind} is {found}, the launch checked "
                f"{recorded}): the earlier export was replaced while this run read it. Rerun the export."
            )
        parquet = pq.ParquetFile(pa.BufferReader(data))
        for group in range(parquet.metadata.num_row_groups):
            yield parquet.read_row_group(group, columns=self._columns)


class ReuseEarlierRowsFn(beam.DoFn):
    """Joins a document with the earlier export's row of its id: reused row, or document to embed.

    Input: (id, {"documents": [Document], "earlier": [row]}), at most one of
    each since ids are unique in a finished export and after de-duplication.
    A row is reused only if its `input_sha256` equals the document's
    fingerprint; kept fields always come from the new corpus. Should the read
    ever pass on two documents of an id, the first by (file, position) is joined
    and each other one is a `duplicate_id` dead letter (`ERRORS`): none is dropped.
    """

    def __init__(self, plan: ExportPlan):
        self._plan = plan
        self._reused = Metrics.counter(counters.NAMESPACE, counters.ROWS_REUSED)
        self._changed = Metrics.counter(counters.NAMESPACE, counters.EARLIER_ROWS_CHANGED)
        self._dropped = Metrics.counter(counters.NAMESPACE, counters.EARLIER_ROWS_DROPPED)

    def process(
        self, element: tuple[str, Mapping[str, Iterable[Any]]]
    ) -> Iterator[Document | beam.pvalue.TaggedOutput]:
        document_id, groups = element
        documents, earlier = list(groups["documents"]), list(groups["earlier"])
        if not documents:
            self._dropped.inc(len(earlier))
            return
        # The group's order is the shuffle's: the read's rule (first by file, then position) picks.
        document, *later = sorted(documents, key=lambda d: (path_key(d.source), d.position))
        for other in later:
            yield beam.pvalue.TaggedOutput(
                ERRORS, duplicate_id_error(other, f"{document.source}:{document.position}")
            )
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

    def __init__(self, plan: ExportPlan):
        self._plan = plan

    def setup(self) -> None:
        self._schema = schema_lib.output_schema(self._plan)

    def process(self, rows: Sequence[Row]) -> Iterator[pa.RecordBatch]:
        yield schema_lib.batch_of_rows(rows, self._schema)


class ReuseEarlierRows(beam.PTransform):
    """Documents -> documents still to embed, reused row batches and dead letters (see `ReuseEarlierRowsFn`).

    A join by id of the corpus with the earlier export (`plan.reuse_files`),
    reading only the columns a row needs: a CoGroupByKey, so neither side is
    held in memory whole, on Dataflow or locally.
    """

    def __init__(self, plan: ExportPlan, kept_ids_path: str | None = None, progress_dir: str | None = None):
        super().__init__()
        self._plan = plan
        self._kept_ids_path = kept_ids_path
        self._progress_dir = progress_dir

    def expand(
        self, documents: beam.PCollection[Document]
    ) -> tuple[beam.PCollection[Document], beam.PCollection[pa.RecordBatch], beam.PCollection[DeadLetter]]:
        plan = self._plan
        columns = [
            name
            for name in schema_lib.output_schema(plan).names
            if name not in plan.keep_fields  # Kept fields come from the new corpus.
        ]
        earlier = (
            documents.pipeline
            | "EarlierShards" >> beam.Create(list(zip(plan.reuse_files, plan.reuse_digests, strict=True)))
            | "ReadEarlierShards" >> beam.ParDo(ReadEarlierShardFn(columns))
            | "KeyEarlierRows" >> beam.FlatMap(_earlier_rows)
        )
        keyed = documents | "KeyDocumentsById" >> beam.Map(lambda document: (document.id, document))
        results = (
            {"documents": keyed, "earlier": earlier}
            | "JoinWithEarlier" >> beam.CoGroupByKey()
            | "ReuseUnchanged"
            >> beam.ParDo(ReuseEarlierRowsFn(plan)).with_outputs(REUSED, ERRORS, main=DOCUMENTS)
        )
        reused = results[REUSED]
        if self._kept_ids_path:
            # Counted as reused above, as in the run that was interrupted; written once, by it.
            reused = reused | "SkipKeptRows" >> beam.ParDo(
                SkipKeptFn(
                    self._kept_ids_path,
                    row_id,
                    functools.partial(output_row_key, plan.keep_fields),
                    progress_dir=self._progress_dir,
                )
            )
        reused = (
            reused
            | "BatchReusedRows" >> beam.BatchElements(min_batch_size=256, max_batch_size=ROW_GROUP_ROWS)
            | "ReusedRowsToArrow" >> beam.ParDo(RowsToBatchFn(plan))
        )
        return results[DOCUMENTS], reused, results[ERRORS]
