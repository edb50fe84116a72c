"""Writes row batches as Parquet row files that become durable as they close, named as shards at the end."""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import json
import math
import os
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import BinaryIO

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.windowed_value import WindowedValue

from pipeline.planning.plan import ExportPlan
from pipeline.running import counters
from pipeline.running import progress as progress_lib
from pipeline.uris import is_local
from pipeline.writing import schema as schema_lib

# Output shards are closed once they reach this size (--shard_mb).
DEFAULT_SHARD_BYTES = 256 << 20
# A row file is closed once it has held rows this long (--checkpoint_seconds), so they are durable.
DEFAULT_CHECKPOINT_SECONDS = 60.0
# Row files are written under `<rows prefix>WRITING_SUFFIX/` and named at the end of the run.
WRITING_SUFFIX = "-writing"
# Key of a row file's Parquet footer metadata: JSON of what the tokenizer counted for the file's rows
# (`counters.TOKENIZER_COUNTS`), so a resumed run adds them back instead of tokenizing those documents again.
TOKENIZER_COUNTS_KEY = b"embexport.tokenizer_counts"

# Row groups this large keep Parquet readers fast; one forward pass is smaller.
ROW_GROUP_ROWS = 8192
ROW_GROUP_BYTES = 64 << 20


def _tokenizer_counts(batch: pa.RecordBatch) -> dict[str, int] | None:
    """The tokenizer's counts a batch of rows carries (`EmbedDocuments`); None for reused rows."""
    value = (batch.schema.metadata or {}).get(TOKENIZER_COUNTS_KEY)
    return json.loads(value) if value is not None else None


class _CountingFile:
    """A row file written through Beam (an object-store upload), counting its bytes: a shard's size."""

    def __init__(self, handle: BinaryIO):
        self._handle = handle
        self.written = 0
        self.closed = False

    @property
    def stream(self) -> _CountingFile:
        return self

    def write(self, data: bytes) -> int:
        self.written += len(data)
        return self._handle.write(data)

    def tell(self) -> int:
        return self.written

    def flush(self) -> None:
        self._handle.flush()

    def close(self) -> None:
        if not self.closed:
            self._handle.flush()
            # An object store publishes an object only once it is whole; a file system's file is fsynced.
            try:
                descriptor = self._handle.fileno()
            except (AttributeError, OSError):  # An object-store upload (io.UnsupportedOperation).
                descriptor = None
            if descriptor is not None:
                os.fsync(descriptor)
            self._handle.close()
            self.closed = True


class _LocalFile:
    """A row file on local disk, written through a native pyarrow file and fsynced when closed.

    The writing thread (`_WriteBehind`) then takes the GIL only to start and end
    a row group: through a Python file object it took it for every write of
    every page, and waited for it each time while the step ran Python (up to the
    interpreter's 5 ms switch interval a write), which made it about ten times
    slower whenever the step was busy.
    """

    def __init__(self, path: str) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self._path = path
        self.stream = pa.OSFile(path, "wb")
        self.closed = False

    @property
    def written(self) -> int:
        return self.stream.tell()

    def close(self) -> None:
        if not self.closed:
            self.stream.close()
            # A closed row file is a checkpoint a resume keeps: make it survive a power cut too
            # (fsync writes out the file's data whichever descriptor asks).
            descriptor = os.open(self._path, os.O_RDONLY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
            self.closed = True


def _open_row_file(path: str) -> _LocalFile | _CountingFile:
    return _LocalFile(path) if is_local(path) else _CountingFile(FileSystems.create(path))


class _WriteBehind:
    """Runs the writes of one `WriteShardsFn`, one at a time, on a thread of its own.

    pyarrow encodes a row group without the GIL, so the forward pass of the next
    batches goes on meanwhile. At most one write is in flight: `wait` returns its
    result or raises its exception (a full disk, an I/O error) in the caller's
    thread, the exception the write raised, as if it had run there.
    """

    def __init__(self) -> None:
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._pending: concurrent.futures.Future[bool] | None = None

    def submit(self, write: Callable[[], bool]) -> None:
        if self._pending is not None:
            raise RuntimeError("a write is already in flight; wait for it first")
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="WriteShards")
        self._pending = self._executor.submit(write)

    def wait(self) -> bool:
        """The result of the write in flight (False when none), once it is done; raises what it raised."""
        pending, self._pending = self._pending, None
        return pending.result() if pending is not None else False

    def abandon(self) -> None:
        """Waits for the write of an abandoned bundle; its error was the bundle's, or is moot now."""
        try:
            self.wait()
        except Exception:
            pass

    def shutdown(self) -> None:
        self.abandon()
        if self._executor is not None:
            self._executor.shutdown()
            self._executor = None


class WriteShardsFn(beam.DoFn):
    """Writes row batches into Parquet files of about `shard_bytes`, under `temp_dir`.

    Batches are coalesced into row groups of up to ROW_GROUP_ROWS rows or
    ROW_GROUP_BYTES (less for small shards); a file is closed once it reaches
    `shard_bytes`, so it exceeds the target by less than one row group, or once
    its oldest row is `checkpoint_seconds` old, so that a killed run loses at
    most that much of each worker's work (a closed file is what a resume keeps).
    Outputs the paths of the files it closed; only the files of successful
    bundles reach `NameShardsFn`, so a retried bundle leaves no rows twice.

    A row group is encoded and written (and its file closed, if full) on a
    thread of its own (`_WriteBehind`) while the next one is gathered: the
    same row groups in the same files, in the same order, as if written here.
    """

    def __init__(
        self,
        plan: ExportPlan,
        temp_dir: str,
        shard_bytes: int,
        progress_dir: str | None = None,
        checkpoint_seconds: float = math.inf,
    ):
        self._plan = plan
        self._temp_dir = temp_dir
        self._shard_bytes = shard_bytes
        self._group_bytes = min(ROW_GROUP_BYTES, max(1, shard_bytes // 2))
        self._progress_dir = progress_dir
        self._checkpoint_seconds = checkpoint_seconds

    def setup(self) -> None:
        self._schema = schema_lib.output_schema(self._plan)
        self._progress = progress_lib.recorder(self._progress_dir)
        self._behind = _WriteBehind()

    def start_bundle(self) -> None:
        # A failed bundle's write may still be running: it must not touch this bundle's state.
        self._behind.abandon()
        self._buffer: list[pa.RecordBatch] = []
        self._rows, self._bytes = 0, 0
        self._writer: pq.ParquetWriter | None = None
        self._file: _LocalFile | _CountingFile | None = None
        self._path: str | None = None
        self._closed: list[str] = []
        # When the oldest row not yet in a closed file arrived (monotonic clock), or None;
        # and the oldest row in the buffer, which that becomes once the open file closes.
        self._pending_since: float | None = None
        self._buffer_since: float | None = None
        # The tokenizer's counts of the rows buffered, and of those in the open file.
        self._buffer_counts: collections.Counter[str] = collections.Counter()
        self._file_counts: collections.Counter[str] = collections.Counter()

    def teardown(self) -> None:
        if hasattr(self, "_behind"):
            self._behind.shutdown()

    def process(self, batch: pa.RecordBatch) -> None:
        now = time.monotonic()
        if self._pending_since is None:
            self._pending_since = now
        if self._buffer_since is None:
            self._buffer_since = now
        self._buffer_counts.update(_tokenizer_counts(batch) or {})
        self._buffer.append(batch)
        self._rows += batch.num_rows
        self._bytes += batch.nbytes
        if self._rows >= ROW_GROUP_ROWS or self._bytes >= self._group_bytes:
            self._write_group()
        if self._checkpoint_due():
            # The write in flight may have closed its file, making its rows durable already.
            self._settle()
        if self._checkpoint_due():
            self._close_all()

    def _close_all(self) -> None:
        """Writes the buffered rows and closes the open file: every row taken so far becomes durable."""
        if self._buffer:
            self._write_group()
        self._settle()
        if self._writer is not None:
            self._close_file()
        self._pending_since = None

    def _checkpoint_due(self) -> bool:
        since = self._pending_since
        return since is not None and time.monotonic() - since >= self._checkpoint_seconds

    def _settle(self) -> None:
        """Waits for the write in flight; if it closed its file, the buffer holds the oldest pending rows."""
        if self._behind.wait():
            self._pending_since = self._buffer_since

    def _write_group(self) -> None:
        # Every file state below is the writing thread's until the write in flight is done.
        self._settle()
        table = pa.Table.from_batches(self._buffer, schema=self._schema)
        self._buffer, self._rows, self._bytes, self._buffer_since = [], 0, 0, None
        self._file_counts.update(self._buffer_counts)
        self._buffer_counts = collections.Counter()
        self._behind.submit(functools.partial(self._write_table, table))

    def _write_table(self, table: pa.Table) -> bool:
        """Writes one row group, opening a file first if none is open; True if it then closed the file."""
        if self._writer is None:
            self._path = FileSystems.join(self._temp_dir, f"{uuid.uuid4().hex}.parquet")
            self._file = _open_row_file(self._path)
            self._writer = pq.ParquetWriter(
                self._file.stream,
                self._schema,
                compression=self._plan.compression,
                **schema_lib.parquet_writer_options(self._schema),
            )
        self._writer.write_table(table, row_group_size=table.num_rows)
        self._progress.add(rows=table.num_rows)
        if self._file is not None and self._file.written >= self._shard_bytes:
            self._close_file()
            return True
        return False

    def _close_file(self) -> None:
        assert self._writer is not None and self._file is not None and self._path is not None
        counts = {name: self._file_counts[name] for name in counters.TOKENIZER_COUNTS}
        self._writer.add_key_value_metadata({TOKENIZER_COUNTS_KEY: json.dumps(counts)})
        self._file_counts = collections.Counter()
        self._writer.close()
        self._file.close()
        self._closed.append(self._path)
        self._writer = self._file = self._path = None

    def finish_bundle(self) -> Iterator[WindowedValue]:
        self._close_all()
        self._progress.flush()
        for path in self._closed:
            yield WindowedValue(path, GlobalWindow().max_timestamp(), (GlobalWindow(),))


def write_empty_shard(path: str, plan: ExportPlan) -> None:
    """Writes a row file of no rows with the export's schema (durable as any row file)."""
    schema = schema_lib.output_schema(plan)
    handle = _open_row_file(path)
    with pq.ParquetWriter(
        handle.stream, schema, compression=plan.compression, **schema_lib.parquet_writer_options(schema)
    ):
        pass
    handle.close()


class NameShardsFn(beam.DoFn):
    """Renames the written files to `<prefix>-SSSSS-of-NNNNN.parquet`, in one place after all were written.

    An export without rows (every record a dead letter, an empty corpus) gets one
    shard of no rows: readers of `part-*.parquet` (DuckDB, polars) fail on a
    pattern that matches nothing, and pandas reads no columns.
    """

    def __init__(self, prefix: str, plan: ExportPlan):
        self._prefix = prefix
        self._plan = plan

    def process(self, paths: Sequence[str]) -> Iterator[str]:
        if not paths:
            empty = f"{self._prefix}-{0:05d}-of-{1:05d}.parquet"
            write_empty_shard(empty, self._plan)
            yield empty
            return
        paths = sorted(paths)
        targets = [f"{self._prefix}-{index:05d}-of-{len(paths):05d}.parquet" for index in range(len(paths))]
        pending = [
            (path, target) for path, target in zip(paths, targets, strict=True) if FileSystems.exists(path)
        ]
        if pending:
            FileSystems.rename([path for path, _ in pending], [target for _, target in pending])
        yield from targets


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
        plan: ExportPlan,
        prefix: str,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
        progress_dir: str | None = None,
        checkpoint_seconds: float = DEFAULT_CHECKPOINT_SECONDS,
        kept_files: Sequence[str] = (),
    ):
        super().__init__()
        self._plan = plan
        self._prefix = prefix
        self._shard_bytes = shard_bytes
        self._progress_dir = progress_dir
        self._checkpoint_seconds = checkpoint_seconds
        self._kept_files = tuple(kept_files)

    def expand(
        self,
        batches: beam.PCollection[pa.RecordBatch] | tuple[beam.PCollection[pa.RecordBatch], ...],
    ) -> beam.PCollection[str]:
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
            paths = tuple(written) | "AddShards" >> beam.Flatten()
        else:
            paths = written[0]
        return (
            paths
            | "CollectShards" >> beam.combiners.ToList()
            | "NameShards" >> beam.ParDo(NameShardsFn(self._prefix, self._plan))
        )
