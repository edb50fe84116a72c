"""`ReadCorpus` and its second pass: each range's records as unique Documents and dead letters."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.metrics import Metrics
from apache_beam.runners.sdf_utils import RestrictionTrackerView

from pipeline.planning.plan import ExportPlan
from pipeline.reading import corpus, listing
from pipeline.reading.documents import DeadLetter, Document, blank_error, duplicate_id_error, is_blank
from pipeline.reading.ids import (
    DOCUMENT_IDS,
    NEWLINES,
    ORDERS,
    FirstPlace,
    LineIndex,
    Place,
    ScanDocumentIdsFn,
    build_line_index,
    find_duplicates,
    limit_cutoff,
    line_number,
    within_cutoff,
)
from pipeline.reading.ranges import (
    DEFAULT_SPLIT_BYTES,
    RANGE_TRACKER,
    FileRange,
    RangeReader,
    RangeReadingFn,
    SplitFilesFn,
    path_key,
)
from pipeline.running import counters
from pipeline.writing import schema as schema_lib

# The outputs of `ReadDocumentsFn` and `ReadCorpus`: documents (main) and dead letters.
DOCUMENTS = "documents"
ERRORS = "errors"


class ReadDocumentsFn(RangeReadingFn):
    """The second pass: each record of a range as a `Document` or a dead letter, with exact line numbers.

    Records after the --limit cut-off are not read; a blank record (`is_blank`) is an
    `empty_document` dead letter; a later record of an id already used (`duplicates`,
    from the id scan) is a `duplicate_id` dead letter.
    """

    def __init__(self, plan: ExportPlan, progress_dir: str | None = None):
        super().__init__(plan, progress_dir)
        self._read = Metrics.counter(counters.NAMESPACE, counters.RECORDS_READ)
        self._broken = Metrics.counter(counters.NAMESPACE, counters.FILES_BROKEN)
        self._ranges = Metrics.counter(counters.NAMESPACE, counters.RANGES_READ)

    def process(
        self,
        file_range: FileRange,
        line_indexes: Mapping[bytes, LineIndex],
        duplicates: Mapping[Place, FirstPlace],
        cutoff: Sequence[Any] | None,
        # Beam's marker for an SDF's tracker, which Beam replaces with the tracker's view.
        tracker: RestrictionTrackerView = RANGE_TRACKER,  # type: ignore[assignment]
    ) -> Iterator[Document | beam.pvalue.TaggedOutput]:
        path = path_key(file_range.path)
        reader = RangeReader(self._plan, file_range, tracker, self._progress)
        if cutoff is not None and path > cutoff[0]:
            reader.finish()
            reader.report_bytes(done=True)
            return
        self._ranges.inc()
        index = line_indexes.get(path)
        count = 0
        for order, item in reader.records(lines_before=index.lines_before if index else None):
            if not within_cutoff((path, order), cutoff):
                break
            count += 1
            self._read.inc()
            if isinstance(item, corpus.Document):
                if is_blank(item):
                    # Never a Document: no later step may meet two records of one id (see is_blank).
                    yield beam.pvalue.TaggedOutput(ERRORS, blank_error(item))
                elif (first := duplicates.get((path, order))) is None:
                    yield item
                else:
                    where = self._place(first, line_indexes)
                    yield beam.pvalue.TaggedOutput(ERRORS, duplicate_id_error(item, where))
            else:
                if item["reason"] in schema_lib.FILE_REASONS:
                    self._broken.inc()
                yield beam.pvalue.TaggedOutput(ERRORS, item)
            if count % 256 == 0:
                self._progress.add(records=256)
                reader.report_bytes()
        self._progress.add(records=count % 256)
        reader.finish()
        reader.report_bytes(done=True)

    def _place(self, first: FirstPlace, line_indexes: Mapping[bytes, LineIndex]) -> str:
        """`FILE:POSITION` of the kept record of an id (its line number looked up if the scan had none)."""
        key, order, position = first
        source = key.decode("utf-8", "surrogateescape")
        if position is None and self._plan.input_format == "parquet":
            position = order  # A Parquet record's order is its row number.
        if position is None:
            index = line_indexes.get(key)
            try:
                position = line_number(source, order, index) if index else None
            except Exception:  # The file went away: name the byte instead.
                position = None
        return f"{source}:{position}" if position is not None else f"byte {order} of {source}"


class ReadCorpus(beam.PTransform):
    """Reads the files of the launch listing (`plan.input_files`) into unique Documents and dead letters.

    Each file is checked to be as listed (size, modification time) before and
    after each range of it is read (`listing.check_unchanged`): one that
    changed, vanished or ends early is an `unreadable_file` or `read_error`
    dead letter where reading stopped, counted in `files_broken`.

    Two passes over the corpus, and no document ever goes through a shuffle:

    1. `ScanDocumentIds` reads each range and emits only (id, (file, order)) keys, the
       newline counts of the line index and, with `limit`, every record's place;
       grouping the keys by id finds the later records of an id (usually none).
    2. `ReadRecords` reads the ranges again and yields the documents, minus
       those duplicates (dead letters) and the records after the `limit`-th,
       straight into inference: read, embed and write are one fused stage.

    The ids' shuffle costs bytes per id (id, file path and offset), not per
    document. Files are cut into ranges of about `split_bytes` (`SplitFilesFn`),
    which a Reshuffle of the (small) ranges spreads over the workers.
    """

    def __init__(
        self,
        plan: ExportPlan,
        split_bytes: int = DEFAULT_SPLIT_BYTES,
        limit: int | None = None,
        progress_dir: str | None = None,
    ):
        super().__init__()
        # The listing goes into the graph once, not into every DoFn that holds the plan.
        self._files = plan.input_files
        self._plan = dataclasses.replace(plan, input_files=())
        self._split_bytes = split_bytes
        self._index_block = min(corpus.INDEX_BLOCK, split_bytes)
        self._limit = limit
        self._progress_dir = progress_dir

    def expand(
        self, pipeline: beam.Pipeline
    ) -> tuple[beam.PCollection[Document], beam.PCollection[DeadLetter]]:
        plan = self._plan
        if self._files:
            listed = pipeline | "ListedFiles" >> beam.Create(self._files)
        else:  # Not listed at launch (a --dry_run of an object-store pattern): list when run.
            listed = (
                pipeline
                | "MatchFiles" >> fileio.MatchFiles(plan.input_pattern)
                | "AsInputFiles"
                >> beam.Map(lambda m: listing.InputFile(m.path, m.size_in_bytes, m.last_updated_in_seconds))
            )
        ranges = (
            listed
            | "SplitFiles" >> beam.ParDo(SplitFilesFn(plan, self._split_bytes))
            | "ReshuffleRanges" >> beam.Reshuffle()
        )
        scan = ranges | "ScanDocumentIds" >> beam.ParDo(
            ScanDocumentIdsFn(plan, self._index_block, self._limit, self._progress_dir)
        ).with_outputs(NEWLINES, ORDERS, main=DOCUMENT_IDS)
        duplicates = (
            scan[DOCUMENT_IDS]
            | "GroupPlacesById" >> beam.GroupByKey()
            | "FindDuplicates" >> beam.FlatMap(find_duplicates)
        )
        line_indexes = (
            scan[NEWLINES]
            | "SumNewlines" >> beam.CombinePerKey(sum)
            | "KeyByFile" >> beam.Map(lambda item: (item[0][0], (item[0][1], item[1])))
            | "GroupBlocks" >> beam.GroupByKey()
            | "BuildLineIndex" >> beam.Map(build_line_index, self._index_block)
        )
        if self._limit:
            cutoff = (
                scan[ORDERS]
                | "FirstRecords" >> beam.combiners.Top.Smallest(self._limit)
                | "CutOff" >> beam.Map(limit_cutoff, self._limit)
            )
            cutoff = beam.pvalue.AsSingleton(cutoff)
        else:
            cutoff = beam.pvalue.AsSingleton(pipeline | "NoCutOff" >> beam.Create([None]))
        results = ranges | "ReadRecords" >> beam.ParDo(
            ReadDocumentsFn(plan, self._progress_dir),
            beam.pvalue.AsDict(line_indexes),
            beam.pvalue.AsDict(duplicates),
            cutoff,
        ).with_outputs(ERRORS, main=DOCUMENTS)
        return results[DOCUMENTS], results[ERRORS]
