"""The pipeline's transforms: read the corpus, embed documents, write rows and dead letters."""

import collections
import dataclasses
import json
import math
import os
import pickle
import time
import typing
import uuid

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.coders.coder_impl import CallbackCoderImpl
from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.parquetio import ReadAllFromParquetBatched, WriteToParquet
from apache_beam.io.restriction_trackers import OffsetRange, OffsetRestrictionTracker
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler, RunInference
from apache_beam.transforms.core import RestrictionProvider
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils import shared
from apache_beam.utils.windowed_value import WindowedValue

from pipeline.inference.embedder import BatchRows, worker_embedder
from pipeline.inference.features import DocumentTokenizer, Tokenized
from pipeline.planning.model_source import load_plan_tokenizer
from pipeline.reading import corpus, listing
from pipeline.running import progress as progress_lib
from pipeline.writing import schema as schema_lib

NAMESPACE = "embexport"
ERRORS = "errors"
DOCUMENTS = "documents"
ROWS = "rows"
DOCUMENT_IDS = "document_ids"
NEWLINES = "newlines"
ORDERS = "orders"
# Counter of the file ranges read by the second pass (more than one per big file).
RANGES_READ = "ranges_read"
# Ranges of a file read by one worker; Dataflow splits them further while they are read.
DEFAULT_SPLIT_BYTES = 64 << 20
# Output shards are closed once they reach this size (--shard_mb).
DEFAULT_SHARD_BYTES = 256 << 20
# A row file is closed once it has held rows this long (--checkpoint_seconds), so they are durable.
DEFAULT_CHECKPOINT_SECONDS = 60.0
# Row files are written under `<rows prefix>WRITING_SUFFIX/` and named at the end of the run.
WRITING_SUFFIX = "-writing"
# Counter of the documents (and --reuse rows) skipped because a resumed run kept their rows.
ROWS_KEPT = "rows_kept"
# Counter of files that could not be read to the end: an unknown number of records is missing.
FILES_BROKEN = "files_broken"
# Key of a row file's Parquet footer metadata: JSON of what the tokenizer counted for the file's rows
# (`TOKENIZER_COUNTS`), so a resumed run adds them back instead of tokenizing those documents again.
TOKENIZER_COUNTS_KEY = b"embexport.tokenizer_counts"
TOKENIZER_COUNTS = ("documents_truncated", "oov_tokens")

# Row groups this large keep Parquet readers fast; one forward pass is smaller.
ROW_GROUP_ROWS = 8192
ROW_GROUP_BYTES = 64 << 20


class FileRange(typing.NamedTuple):
    """A byte range [start, stop) of one corpus file: what one reader reads."""

    path: str
    size: int
    start: int
    stop: int
    # False for files read whole by one reader (CSV, .gz): then the range is [0, 1).
    splittable: bool
    # The launch listing's modification time and, for a link to nothing, its target.
    mtime: float | None = None
    link_target: str | None = None

    @property
    def listed(self) -> listing.InputFile:
        """The file as the launch listed it, which the reader checks it still is."""
        return listing.InputFile(self.path, self.size, self.mtime, self.link_target)


class SplitFilesFn(beam.DoFn):
    """Cuts each matched file into `FileRange`s of about `split_bytes`, so many workers read one file."""

    def __init__(self, plan, split_bytes):
        self._plan = plan
        self._split_bytes = split_bytes

    def process(self, listed: listing.InputFile):
        path, size = listed.path, listed.size
        # A link to nothing is read whole, so that reading it makes its dead letter.
        if listed.link_target is not None or not corpus.is_splittable(self._plan.input_format, path):
            yield FileRange(path, size, 0, 1, False, listed.mtime, listed.link_target)
            return
        pieces = max(1, -(-size // self._split_bytes))
        bounds = [size * piece // pieces for piece in range(pieces + 1)]
        for start, stop in zip(bounds, bounds[1:], strict=False):
            yield FileRange(path, size, start, stop, True, listed.mtime)


class FileRangeRestrictions(RestrictionProvider):
    """Offset restrictions over a `FileRange`: Dataflow may split them further while they are read."""

    def initial_restriction(self, file_range):
        return OffsetRange(file_range.start, file_range.stop)

    def create_tracker(self, restriction):
        return OffsetRestrictionTracker(restriction)

    def split(self, file_range, restriction):
        yield restriction  # SplitFilesFn has split already; a Reshuffle spreads the ranges.

    def restriction_size(self, file_range, restriction):
        return restriction.size() if file_range.splittable else file_range.size


# The SDF restriction parameter both passes declare (Beam reads it from the default).
_RANGE_TRACKER = beam.DoFn.RestrictionParam(FileRangeRestrictions())


class _RangeReader:
    """Reads the records of one `FileRange` under an SDF restriction tracker.

    A splittable range claims the byte offset of each line (or row group)
    before reading it, so the tracker knows where to split it; a whole-file
    range claims offset 0 and reads everything.
    """

    def __init__(self, plan, file_range, tracker, progress=None, progress_key="read_bytes"):
        self._plan = plan
        self._progress_key = progress_key
        self._range = file_range
        self._tracker = tracker
        self._refused = False
        self._progress = progress
        self._handle = None
        self._reported = 0

    def _claim(self, offset):
        if self._tracker.try_claim(offset):
            return True
        self._refused = True
        return False

    def _open(self):
        self._handle = FileSystems.open(self._range.path, compression_type=CompressionTypes.UNCOMPRESSED)
        return self._handle

    def records(self, lines_before=None, on_newline=None):
        """Yields `(order, item)` as `corpus.read_records` does, for this range only."""
        if self._range.splittable:
            start, claim = self._tracker.current_restriction().start, self._claim
        else:
            if not self._claim(0):
                return
            start, claim = 0, None
        # Compressed files are decompressed by `corpus`, with Python's gzip,
        # which (unlike Beam's reader) raises on a truncated file.
        yield from corpus.read_records(
            self._plan,
            self._range.path,
            self._open,
            start,
            claim,
            lines_before,
            on_newline,
            verify=self._verify,
            size=self._range.size,
        )

    def _verify(self):
        """Raises `listing.InputChanged` unless the file is still as the launch listed it."""
        listing.check_unchanged(self._range.listed)

    def report_bytes(self, done=False):
        """Adds the bytes read since the last report to the progress counts."""
        if self._progress is None:
            return
        restriction = self._tracker.current_restriction()
        total = restriction.size() if self._range.splittable else self._range.size
        if done:
            consumed = total
        else:
            try:
                position = self._handle.tell() if self._handle is not None else 0
            except Exception:  # A stream without tell(): report at the end only.
                return
            start = restriction.start if self._range.splittable else 0
            consumed = min(total, max(0, position - start))
        if consumed > self._reported:
            self._progress.add(**{self._progress_key: consumed - self._reported})
            self._reported = consumed

    def finish(self):
        """Marks the rest of the range as done: its last record was read, or it was cut short (--limit)."""
        if not self._refused:
            # Claiming the end fails, and so tells the tracker that nothing is left.
            self._tracker.try_claim(self._tracker.current_restriction().stop)


class ScanDocumentIdsFn(beam.DoFn):
    """The first, light pass: each record's id and (file, order), never the document.

    Outputs (id, (source, order)) per document (main; none for text files, whose
    ids FILE:LINE are unique), ((source, block), newlines) for the line index
    (`NEWLINES`) and, with a limit, (source, order) of every record (`ORDERS`).
    With a limit only the first `limit` records of a range are scanned: no
    record after them can be among the first `limit` of the corpus.
    """

    def __init__(self, plan, index_block, limit=None, progress_dir=None):
        self._plan = plan
        self._index_block = index_block
        self._limit = limit
        self._progress_dir = progress_dir

    def setup(self):
        self._progress = progress_lib.recorder(self._progress_dir)

    def finish_bundle(self):
        self._progress.flush()

    def process(self, file_range, tracker=_RANGE_TRACKER):
        reader = _RangeReader(self._plan, file_range, tracker, self._progress, "scanned_bytes")
        block_size = self._index_block
        newlines = collections.Counter()
        line_file = file_range.splittable and self._plan.input_format in corpus.LINE_FORMATS
        on_newline = (lambda offset: newlines.update((offset // block_size,))) if line_file else None
        keyed = self._plan.input_format != "text"
        path = path_key(file_range.path)
        # Line numbers are exact from the start of a file; a later range knows only byte offsets.
        numbered = not file_range.splittable or not tracker.current_restriction().start
        for count, (order, item) in enumerate(reader.records(on_newline=on_newline), start=1):
            if keyed and isinstance(item, corpus.Document):
                yield item.id, (path, order, item.position if numbered else None)
            if self._limit:
                yield beam.pvalue.TaggedOutput(ORDERS, (path, order))
                if count >= self._limit:
                    break
            if count % 1024 == 0:
                reader.report_bytes()
        reader.finish()
        reader.report_bytes(done=True)
        for block, lines in newlines.items():
            yield beam.pvalue.TaggedOutput(NEWLINES, ((path, block), lines))


class LineIndex:
    """Newlines before each block of `block_size` bytes of one file: `lines_before(offset)` for `corpus`."""

    def __init__(self, counts, block_size):
        self._block_size = block_size
        blocks = max(counts, default=-1) + 1
        self._before = [0] * (blocks + 1)
        for block in range(blocks):
            self._before[block + 1] = self._before[block] + counts.get(block, 0)

    def lines_before(self, offset):
        block = min(offset // self._block_size, len(self._before) - 1)
        return block * self._block_size, self._before[block]


def _line_index(element, block_size):
    path, blocks = element
    return path, LineIndex(dict(blocks), block_size)


def _duplicates(element):
    """(loser's (source, order), winner's (source, order, position)) for each later record of an id."""
    _, places = element
    places = sorted(places, key=lambda place: (place[0], place[1]))
    for place in places[1:]:
        yield (place[0], place[1]), tuple(places[0])


def _cutoff(smallest, limit):
    """The (source, order) of the limit-th record, or None when the corpus has no more records."""
    return tuple(smallest[-1]) if len(smallest) >= limit else None


def path_key(path):
    """A path as bytes for keys and places: Beam encodes strings as UTF-8, which a file name
    that is not UTF-8 (held with surrogate escapes) cannot be; bytes sort as the code points do."""
    return path.encode("utf-8", "surrogateescape")


def _within(place, cutoff):
    return cutoff is None or tuple(place) <= tuple(cutoff)


class ReadDocumentsFn(beam.DoFn):
    """The second pass: each record of a range as a `Document` or a dead letter, with exact line numbers.

    Records after the --limit cut-off are not read; a later record of an id
    already used (`duplicates`, from the id scan) is a `duplicate_id` dead letter.
    """

    def __init__(self, plan, progress_dir=None):
        self._plan = plan
        self._progress_dir = progress_dir
        self._read = Metrics.counter(NAMESPACE, "records_read")
        self._broken = Metrics.counter(NAMESPACE, FILES_BROKEN)
        self._ranges = Metrics.counter(NAMESPACE, RANGES_READ)

    def setup(self):
        self._progress = progress_lib.recorder(self._progress_dir)

    def finish_bundle(self):
        self._progress.flush()

    def process(
        self,
        file_range,
        line_indexes,
        duplicates,
        cutoff,
        tracker=_RANGE_TRACKER,
    ):
        path = path_key(file_range.path)
        reader = _RangeReader(self._plan, file_range, tracker, self._progress)
        if cutoff is not None and path > cutoff[0]:
            reader.finish()
            reader.report_bytes(done=True)
            return
        self._ranges.inc()
        index = line_indexes.get(path)
        count = 0
        for order, item in reader.records(lines_before=index.lines_before if index else None):
            if not _within((path, order), cutoff):
                break
            count += 1
            self._read.inc()
            if isinstance(item, corpus.Document):
                first = duplicates.get((path, order))
                if first is None:
                    yield item
                else:
                    where = self._place(first, line_indexes)
                    yield beam.pvalue.TaggedOutput(ERRORS, _duplicate_error(item, where))
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

    def _place(self, first, line_indexes):
        """`FILE:POSITION` of the kept record of an id (its line number looked up if the scan had none)."""
        key, order, position = first
        source = key.decode("utf-8", "surrogateescape")
        if position is None:
            index = line_indexes.get(key)
            try:
                position = line_number(source, order, index) if index else None
            except Exception:  # The file went away: name the byte instead.
                position = None
        return f"{source}:{position}" if position is not None else f"byte {order} of {source}"


def line_number(path, offset, index):
    """The line number of the line starting at byte `offset` of an uncompressed file, from its `LineIndex`."""
    block_start, before = index.lines_before(offset)
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        handle.seek(block_start)
        return before + handle.read(offset - block_start).count(b"\n") + 1


def _duplicate_error(document, where):
    return schema_lib.document_error_row(
        document, schema_lib.DUPLICATE_ID, f"Id {document.id!r} was already used by {where}."
    )


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

    def __init__(self, plan, split_bytes=DEFAULT_SPLIT_BYTES, limit=None, progress_dir=None):
        super().__init__()
        # The listing goes into the graph once, not into every DoFn that holds the plan.
        self._files = plan.input_files
        self._plan = dataclasses.replace(plan, input_files=())
        self._split_bytes = split_bytes
        self._index_block = min(corpus.INDEX_BLOCK, split_bytes)
        self._limit = limit
        self._progress_dir = progress_dir

    def expand(self, pipeline):
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
            | "FindDuplicates" >> beam.FlatMap(_duplicates)
        )
        line_indexes = (
            scan[NEWLINES]
            | "SumNewlines" >> beam.CombinePerKey(sum)
            | "KeyByFile" >> beam.Map(lambda item: (item[0][0], (item[0][1], item[1])))
            | "GroupBlocks" >> beam.GroupByKey()
            | "BuildLineIndex" >> beam.Map(_line_index, self._index_block)
        )
        if self._limit:
            cutoff = (
                scan[ORDERS]
                | "FirstRecords" >> beam.combiners.Top.Smallest(self._limit)
                | "CutOff" >> beam.Map(_cutoff, self._limit)
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


class _SizedPickleCoder(beam.coders.Coder):
    """Pickles an element, and estimates its size from its arrays without encoding it.

    Beam estimates the encoded size of elements that pass between the steps of a
    fused stage (a metric), by encoding samples of them: with its default coder
    every `Tokenized` document (numpy ids) and each batch's rows (the RecordBatch of
    a per-token column, about 35 MB per 512 real-length documents, twice: as
    `BatchRows` and as the rows) were pickled to be measured.  Where an element
    really crosses a boundary, it is pickled as before.
    """

    def _create_impl(self):
        return CallbackCoderImpl(
            lambda value: pickle.dumps(value, pickle.HIGHEST_PROTOCOL), pickle.loads, self.estimate_size
        )

    def is_deterministic(self) -> bool:
        return False

    @staticmethod
    def estimate_size(value) -> int:
        raise NotImplementedError


class RecordBatchCoder(_SizedPickleCoder):
    """An Arrow RecordBatch of output rows (`SplitRows`)."""

    @staticmethod
    def estimate_size(value: pa.RecordBatch) -> int:
        return value.nbytes

    def to_type_hint(self):
        return pa.RecordBatch


class BatchRowsCoder(_SizedPickleCoder):
    """A batch's `embedder.BatchRows` (RunInference's output)."""

    @staticmethod
    def estimate_size(value: BatchRows) -> int:
        rows = value.rows.nbytes if value.rows is not None else 0
        return rows + sum(len(str(error)) for error in value.failed)

    def to_type_hint(self):
        return BatchRows


class TokenizedCoder(_SizedPickleCoder):
    """A `features.Tokenized` document (`TokenizeDocuments`)."""

    @staticmethod
    def estimate_size(value: Tokenized) -> int:
        texts = sum(len(text) for text in value.document.texts)
        return texts + sum(getattr(feature, "nbytes", 0) for feature in value.features)

    def to_type_hint(self):
        return Tokenized


for _type, _coder in (
    (pa.RecordBatch, RecordBatchCoder),
    (BatchRows, BatchRowsCoder),
    (Tokenized, TokenizedCoder),
):
    beam.coders.registry.register_coder(_type, _coder)


class TokenizeDocumentsFn(beam.DoFn):
    """`Document` -> `features.Tokenized` (main) or a dead letter (`errors`); loads only the tokenizer."""

    def __init__(self, plan):
        self._plan = plan
        self._truncated = Metrics.counter(NAMESPACE, "documents_truncated")
        self._oov = Metrics.counter(NAMESPACE, "oov_tokens")

    def setup(self):
        self._tokenizer = DocumentTokenizer(self._plan, load_plan_tokenizer(self._plan))

    def process(self, document):
        tokenized = self._tokenizer.tokenize(document)
        if not isinstance(tokenized, Tokenized):
            yield beam.pvalue.TaggedOutput(ERRORS, tokenized)
            return
        self._truncated.inc(int(tokenized.truncated))
        self._oov.inc(tokenized.oov_tokens)
        yield tokenized


def _with_tokenizer_counts(batch_rows, batch: list):
    """`batch_rows` with the tokenizer's counts of the documents that made rows in its schema metadata.

    `WriteShardsFn` sums them into each row file's footer (`TOKENIZER_COUNTS_KEY`).
    """
    if batch_rows.rows is None:
        return batch_rows
    made_rows = set(batch_rows.rows.column(schema_lib.ID_COLUMN).to_pylist())
    truncated = oov = 0
    for tokenized in batch:
        if tokenized.document.id in made_rows:
            truncated += int(tokenized.truncated)
            oov += tokenized.oov_tokens
    counts = dict(zip(TOKENIZER_COUNTS, (truncated, oov), strict=True))
    metadata = {**(batch_rows.rows.schema.metadata or {}), TOKENIZER_COUNTS_KEY: json.dumps(counts)}
    return batch_rows._replace(rows=batch_rows.rows.replace_schema_metadata(metadata))


def _tokenizer_counts(batch: pa.RecordBatch) -> dict | None:
    """The tokenizer's counts a batch of rows carries (`_with_tokenizer_counts`); None for reused rows."""
    value = (batch.schema.metadata or {}).get(TOKENIZER_COUNTS_KEY)
    return json.loads(value) if value is not None else None


class EmbeddingModelHandler(ModelHandler):
    """RunInference handler: stacks a batch of `Tokenized` documents, runs the forward pass, makes its rows.

    `load_model` builds an `Embedder` once per worker process, from
    `plan.model_uri` (in the launcher's own process, the in-memory runner, it is
    the launcher's: `embedder.worker_embedder`). `run_inference` returns one `embedder.BatchRows` per batch
    (an Arrow RecordBatch of its rows, and its dead letters) rather than one
    `PredictionResult` per document, for two measured reasons:

    - RunInference's output crosses a stage boundary, where Beam pickles it. The
      raw outputs of a per-token layer are large (the default export's mean-pooled
      `emb`: 512 x 300 x 300 floats a batch, 1.5 GB pickled for 4,096 documents,
      against 9.5 MB of Arrow rows); returning raw outputs made that export
      25-35 % slower.
    - Built per document, the same rows take 4.2x as long for a vector column and
      2.3x for a per-token one
      (`python -m benchmarks.export --contenders arrow_rows --documents 1024`).
    """

    def __init__(self, plan):
        super().__init__(min_batch_size=plan.batch_size, max_batch_size=plan.batch_size)
        self._plan = plan

    def load_model(self):
        return worker_embedder(self._plan)

    def run_inference(self, batch, model, inference_args=None):
        return [_with_tokenizer_counts(model.batch_rows(model.run(batch)), batch)]

    def get_num_bytes(self, batch):
        # Beam's default pickles the whole batch just to measure it.
        return sum(len(text) for tokenized in batch for text in tokenized.document.texts)

    def get_metrics_namespace(self):
        return NAMESPACE


class SplitRowsFn(beam.DoFn):
    """`BatchRows` -> its RecordBatch (main) and its dead letters (`errors`), counted."""

    def __init__(self):
        self._written = Metrics.counter(NAMESPACE, "rows_embedded")
        self._oov = Metrics.counter(NAMESPACE, "oov_tokens")

    def process(self, batch_rows):
        self._oov.inc(batch_rows.oov_tokens)
        for error in batch_rows.failed:
            yield beam.pvalue.TaggedOutput(ERRORS, error)
        if batch_rows.rows is not None:
            self._written.inc(batch_rows.rows.num_rows)
            yield batch_rows.rows


class _KeptIds:
    """The ids whose rows a resumed run kept, all and those whose tokenizer counts it kept too.

    A class, since `shared.Shared` holds weak references.
    """

    def __init__(self, path: str):
        with FileSystems.open(path) as handle:
            table = pq.read_table(handle, columns=[schema_lib.ID_COLUMN, KEPT_COUNTED_COLUMN])
        self.ids = frozenset(table.column(0).to_pylist())
        self.counted = frozenset(table.filter(table.column(1)).column(0).to_pylist())


# One copy of the kept ids per worker process, however many threads and DoFns use it.
_KEPT_IDS = shared.Shared()
# Column of the kept ids file (`pipeline.resume`): whether the tokenizer's counts of the id's row were kept.
KEPT_COUNTED_COLUMN = "counted"
# Which kept ids a `SkipKeptFn` drops.
SKIP_ALL, SKIP_COUNTED, SKIP_UNCOUNTED = "all", "counted", "uncounted"


def _document_id(document):
    return document.id


def _tokenized_id(tokenized):
    return tokenized.document.id


def _row_id(row):
    return row[schema_lib.ID_COLUMN]


class SkipKeptFn(beam.DoFn):
    """Drops the elements whose id a resumed run kept a row of (`pipeline.writing.resume`), counting them.

    The ids are read once per worker process from `kept_ids_path`, the Parquet
    file of ids the launcher wrote, not sent as a side input. `which` says which
    kept ids this step drops: all, only those whose tokenizer counts were kept
    (dropped before tokenization), or only the others (dropped after it, so that
    the tokenizer counts them again).
    """

    def __init__(self, kept_ids_path: str, element_id, which: str = SKIP_ALL):
        self._path = kept_ids_path
        self._element_id = element_id
        self._which = which
        self._kept = Metrics.counter(NAMESPACE, ROWS_KEPT)

    def setup(self):
        kept = _KEPT_IDS.acquire(lambda: _KeptIds(self._path), tag=self._path)
        if self._which == SKIP_COUNTED:
            self._ids = kept.counted
        elif self._which == SKIP_UNCOUNTED:
            self._ids = kept.ids - kept.counted
        else:
            self._ids = kept.ids

    def process(self, element):
        if self._element_id(element) in self._ids:
            self._kept.inc()
            return
        yield element


class EmbedDocuments(beam.PTransform):
    """Documents -> Arrow RecordBatches of output rows (main) and dead letters (`errors`).

    Tokenize each document (only the tokenizer loaded), then run the model on
    batches (RunInference), each batch giving one RecordBatch of rows. With
    `kept_ids_path` (a resumed run) the documents whose rows were kept are
    dropped before tokenization: the tokenizer's counts of their rows were kept
    with them (`TOKENIZER_COUNTS_KEY`) and the launcher adds them. Only the
    documents of a kept file without those counts (one a resume rewrote) are
    tokenized again, and dropped after it, so that the counts still cover every document.
    """

    def __init__(self, plan, kept_ids_path=None):
        super().__init__()
        self._plan = plan
        self._kept_ids_path = kept_ids_path

    def expand(self, documents):
        if self._kept_ids_path:
            documents = documents | "SkipKeptDocuments" >> beam.ParDo(
                SkipKeptFn(self._kept_ids_path, _document_id, SKIP_COUNTED)
            )
        # Typed, so that Beam measures them with the coders above.
        tokenized = documents | "TokenizeDocuments" >> beam.ParDo(
            TokenizeDocumentsFn(self._plan)
        ).with_output_types(Tokenized).with_outputs(ERRORS, main=DOCUMENTS)
        to_embed = tokenized[DOCUMENTS]
        if self._kept_ids_path:
            to_embed = to_embed | "SkipKeptTokenized" >> beam.ParDo(
                SkipKeptFn(self._kept_ids_path, _tokenized_id, SKIP_UNCOUNTED)
            )
        rows = (
            to_embed
            | "RunInference" >> RunInference(EmbeddingModelHandler(self._plan)).with_output_types(BatchRows)
            | "SplitRows"
            >> beam.ParDo(SplitRowsFn()).with_output_types(pa.RecordBatch).with_outputs(ERRORS, main=ROWS)
        )
        errors = (tokenized[ERRORS], rows[ERRORS]) | "CollectEmbedErrors" >> beam.Flatten()
        return rows[ROWS], errors


class _CountingFile:
    """A binary file that counts the bytes written through it, so a shard knows its size."""

    def __init__(self, handle):
        self._handle = handle
        self.written = 0
        self.closed = False

    def write(self, data):
        self.written += len(data)
        return self._handle.write(data)

    def tell(self):
        return self.written

    def flush(self):
        self._handle.flush()

    def close(self):
        if not self.closed:
            self._handle.flush()
            # A closed row file is a checkpoint a resume keeps: on local disk, make it
            # survive a power cut too (object stores publish an object only once it is whole).
            try:
                descriptor = self._handle.fileno()
            except (AttributeError, OSError):  # An object-store upload (io.UnsupportedOperation).
                descriptor = None
            if descriptor is not None:
                os.fsync(descriptor)
            self._handle.close()
            self.closed = True


class WriteShardsFn(beam.DoFn):
    """Writes row batches into Parquet files of about `shard_bytes`, under `temp_dir`.

    Batches are coalesced into row groups of up to ROW_GROUP_ROWS rows or
    ROW_GROUP_BYTES (less for small shards); a file is closed once it reaches
    `shard_bytes`, so it exceeds the target by less than one row group, or once
    its oldest row is `checkpoint_seconds` old, so that a killed run loses at
    most that much of each worker's work (a closed file is what a resume keeps).
    Outputs the paths of the files it closed; only the files of successful
    bundles reach `NameShardsFn`, so a retried bundle leaves no rows twice.
    """

    def __init__(self, plan, temp_dir, shard_bytes, progress_dir=None, checkpoint_seconds=math.inf):
        self._plan = plan
        self._temp_dir = temp_dir
        self._shard_bytes = shard_bytes
        self._group_bytes = min(ROW_GROUP_BYTES, max(1, shard_bytes // 2))
        self._progress_dir = progress_dir
        self._checkpoint_seconds = checkpoint_seconds

    def setup(self):
        self._schema = schema_lib.output_schema(self._plan)
        self._progress = progress_lib.recorder(self._progress_dir)

    def start_bundle(self):
        self._buffer, self._rows, self._bytes = [], 0, 0
        self._writer = self._file = self._path = None
        self._closed = []
        # When the oldest row not yet in a closed file arrived (monotonic clock), or None.
        self._pending_since = None
        # The tokenizer's counts of the rows buffered, and of those in the open file.
        self._buffer_counts = collections.Counter()
        self._file_counts = collections.Counter()

    def process(self, batch):
        if self._pending_since is None:
            self._pending_since = time.monotonic()
        self._buffer_counts.update(_tokenizer_counts(batch) or {})
        self._buffer.append(batch)
        self._rows += batch.num_rows
        self._bytes += batch.nbytes
        if self._rows >= ROW_GROUP_ROWS or self._bytes >= self._group_bytes:
            self._write_group()
        pending = time.monotonic() - self._pending_since if self._pending_since is not None else 0.0
        if pending >= self._checkpoint_seconds:
            if self._buffer:
                self._write_group()
            if self._writer is not None:
                self._close_file()

    def _write_group(self):
        table = pa.Table.from_batches(self._buffer, schema=self._schema)
        self._buffer, self._rows, self._bytes = [], 0, 0
        self._file_counts.update(self._buffer_counts)
        self._buffer_counts = collections.Counter()
        if self._writer is None:
            self._path = FileSystems.join(self._temp_dir, f"{uuid.uuid4().hex}.parquet")
            self._file = _CountingFile(FileSystems.create(self._path))
            self._writer = pq.ParquetWriter(
                self._file,
                self._schema,
                compression=self._plan.compression,
                **schema_lib.parquet_writer_options(self._schema),
            )
        self._writer.write_table(table, row_group_size=table.num_rows)
        self._progress.add(rows=table.num_rows)
        if self._file.written >= self._shard_bytes:
            self._close_file()

    def _close_file(self):
        counts = {name: self._file_counts[name] for name in TOKENIZER_COUNTS}
        self._writer.add_key_value_metadata({TOKENIZER_COUNTS_KEY: json.dumps(counts)})
        self._file_counts = collections.Counter()
        self._writer.close()
        self._file.close()
        self._closed.append(self._path)
        self._writer = self._file = self._path = None
        self._pending_since = time.monotonic() if self._buffer else None

    def finish_bundle(self):
        if self._buffer:
            self._write_group()
        if self._writer is not None:
            self._close_file()
        self._progress.flush()
        for path in self._closed:
            yield WindowedValue(path, GlobalWindow().max_timestamp(), [GlobalWindow()])


class NameShardsFn(beam.DoFn):
    """Renames the written files to `<prefix>-SSSSS-of-NNNNN.parquet`, in one place after all were written."""

    def __init__(self, prefix):
        self._prefix = prefix

    def process(self, paths):
        paths = sorted(paths)
        targets = [f"{self._prefix}-{index:05d}-of-{len(paths):05d}.parquet" for index in range(len(paths))]
        pending = [
            (path, target) for path, target in zip(paths, targets, strict=True) if FileSystems.exists(path)
        ]
        if pending:
            FileSystems.rename([path for path, _ in pending], [target for _, target in pending])
        yield from targets


class CountErrorsFn(beam.DoFn):
    """Counts dead letters by reason as Beam metrics (and in the run's progress)."""

    def __init__(self, progress_dir=None):
        self._progress_dir = progress_dir

    def setup(self):
        self._progress = progress_lib.recorder(self._progress_dir)

    def finish_bundle(self):
        self._progress.flush()

    def process(self, row):
        Metrics.counter(NAMESPACE, f"failed_{row['reason']}").inc()
        self._progress.add(dead_letters=1)
        yield row


def count_errors(errors, progress_dir=None):
    """Counts dead letters by reason as Beam metrics."""
    return errors | "CountErrors" >> beam.ParDo(CountErrorsFn(progress_dir))


class WriteEmbeddings(beam.PTransform):
    """Writes row batches as Parquet shards of about `shard_bytes`: `<prefix>-SSSSS-of-NNNNN.parquet`.

    Applied to one PCollection of RecordBatches, or to a tuple of them: each is
    written by its own writer, so none waits for a Flatten that the local runner
    would materialize (a `--reuse` run's embedded rows would then only be
    written, and durable, once all were made). `kept_files` (a resumed run) are
    complete row files of the interrupted run, already in the writing
    directory: they are named with the new ones.
    """

    def __init__(
        self,
        plan,
        prefix,
        shard_bytes=DEFAULT_SHARD_BYTES,
        progress_dir=None,
        checkpoint_seconds=DEFAULT_CHECKPOINT_SECONDS,
        kept_files=(),
    ):
        super().__init__()
        self._plan = plan
        self._prefix = prefix
        self._shard_bytes = shard_bytes
        self._progress_dir = progress_dir
        self._checkpoint_seconds = checkpoint_seconds
        self._kept_files = tuple(kept_files)

    def expand(self, batches):
        temp_dir = self._prefix + WRITING_SUFFIX
        sources = batches if isinstance(batches, tuple) else (batches,)
        written = [
            source
            | ("WriteShards" if index == 0 else f"WriteShards{index}")
            >> beam.ParDo(
                WriteShardsFn(
                    self._plan, temp_dir, self._shard_bytes, self._progress_dir, self._checkpoint_seconds
                )
            )
            for index, source in enumerate(sources)
        ]
        if self._kept_files:
            written.append(sources[0].pipeline | "KeptShards" >> beam.Create(self._kept_files))
        if len(written) > 1:
            written = tuple(written) | "AddShards" >> beam.Flatten()
        else:
            written = written[0]
        return (
            written
            | "CollectShards" >> beam.combiners.ToList()
            | "NameShards" >> beam.ParDo(NameShardsFn(self._prefix))
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

    def __init__(self, plan, kept_ids_path=None):
        super().__init__()
        self._plan = plan
        self._kept_ids_path = kept_ids_path

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
        reused = results[REUSED]
        if self._kept_ids_path:
            # Counted as reused above, as in the run that was interrupted; written once, by it.
            reused = reused | "SkipKeptRows" >> beam.ParDo(SkipKeptFn(self._kept_ids_path, _row_id))
        reused = (
            reused
            | "BatchReusedRows" >> beam.BatchElements(min_batch_size=256, max_batch_size=ROW_GROUP_ROWS)
            | "ReusedRowsToArrow" >> beam.ParDo(RowsToBatchFn(plan))
        )
        return results[DOCUMENTS], reused


def shard_prefix(directory):
    return os.path.join(directory, "part") if "://" not in directory else directory.rstrip("/") + "/part"
