"""The shard writer encodes and writes each row group on a thread of its own while the next one arrives.

Real rows of the tiny bundle (tokenizer, forward pass, Arrow rows), real Parquet
files, a real Beam pipeline: the thread must lose, reorder or duplicate no row,
put the same row groups in the same files, and raise its errors in the step.
"""

import errno
import glob
import os
import threading

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing import test_pipeline
from pipeline_fixtures import write_jsonl

from pipeline.inference.embedder import Embedder
from pipeline.inference.features import DocumentTokenizer
from pipeline.planning.build import build_plan
from pipeline.planning.options import ExportOptions
from pipeline.reading.documents import Document
from pipeline.writing import shards as shards_lib

BATCH = 16


@pytest.fixture(scope="module")
def plan_and_batches(tiny_bundle, tmp_path_factory):
    """A `--pooling none` plan of the tiny bundle and 24 batches of its real rows (384 documents)."""
    directory = tmp_path_factory.mktemp("write_behind")
    corpus = write_jsonl(directory / "c.jsonl", [{"id": "a", "content": "word1", "title": "word2"}])
    plan, model_source = build_plan(
        ExportOptions(
            ["--model", tiny_bundle[0], "--input", str(corpus), "--output", str(directory / "unused")]
            + ["--pooling", "none"]
        )
    )
    embedder = Embedder(plan, model_source)
    tokenizer = DocumentTokenizer(plan, model_source.tokenizer)
    batches = []
    for start in range(0, 24 * BATCH, BATCH):
        documents = [
            Document(
                f"d{i:04d}",
                (" ".join(f"word{(i + k) % 40}" for k in range(1 + i % 9)), f"word{i % 7}"),
                (),
                "c",
                i,
            )
            for i in range(start, start + BATCH)
        ]
        batches.append(embedder.batch_rows(embedder.run([tokenizer.tokenize(d) for d in documents])).rows)
    return plan, batches


def _read(paths):
    return pa.concat_tables([pq.read_table(path) for path in paths])


def _through_python_files(monkeypatch):
    """Local row files written through `_CountingFile` (a Python file): a test can hold or fail its writes."""

    def python_file(path):
        return shards_lib._CountingFile(open(path, "wb"))

    monkeypatch.setattr(shards_lib, "_open_row_file", python_file)


def _writer(plan, directory, shard_bytes=1 << 30):
    fn = shards_lib.WriteShardsFn(plan, str(directory), shard_bytes)
    fn.setup()
    fn.start_bundle()
    return fn


def test_a_row_group_is_written_while_the_step_takes_the_next_batches(
    plan_and_batches, tmp_path, monkeypatch
):
    plan, batches = plan_and_batches
    monkeypatch.setattr(shards_lib, "ROW_GROUP_ROWS", 4 * BATCH)
    released, writing = threading.Event(), threading.Event()
    write = shards_lib._CountingFile.write

    def held(self, data):
        writing.set()
        assert released.wait(60), "the test never released the write"
        return write(self, data)

    monkeypatch.setattr(shards_lib._CountingFile, "write", held)
    _through_python_files(monkeypatch)
    fn = _writer(plan, tmp_path)

    def take(count):
        for batch in batches[:count]:
            fn.process(batch)

    # The 4th batch fills a row group, whose write then hangs in the file; the step goes on.
    step = threading.Thread(target=take, args=(6,), daemon=True)
    step.start()
    step.join(30)
    try:
        assert not step.is_alive(), "the step waited for the row group's write"
        assert writing.wait(30), "the row group was not being written"
    finally:
        released.set()
        step.join(60)
    for batch in batches[6:]:
        fn.process(batch)
    paths = [value.value for value in fn.finish_bundle()]
    fn.teardown()
    assert len(paths) == 1
    table = _read(paths)
    assert table.equals(pa.Table.from_batches(batches, schema=table.schema))
    assert pq.ParquetFile(paths[0]).metadata.num_row_groups == 6


def _write_all(plan, batches, directory, shard_bytes):
    """The paths of the files one bundle of `batches` closed."""
    fn = _writer(plan, directory, shard_bytes)
    for batch in batches:
        fn.process(batch)
    paths = [value.value for value in fn.finish_bundle()]
    fn.teardown()
    return paths


def test_rows_keep_their_order_and_files_their_row_groups_across_many_files(plan_and_batches, tmp_path):
    """Small shards: a file closes after every few row groups, each close on the writing thread."""
    plan, batches = plan_and_batches
    whole = pa.Table.from_batches(batches)
    paths = _write_all(plan, batches, tmp_path, shard_bytes=max(1, whole.nbytes // 6))
    assert len(paths) > 3
    assert sorted(paths) == sorted(glob.glob(os.path.join(tmp_path, "*.parquet")))
    table = _read(paths)
    assert table.equals(pa.Table.from_batches(batches, schema=table.schema))
    for path in paths[:-1]:
        assert os.path.getsize(path) >= max(1, whole.nbytes // 6) * 0.5


def test_local_row_files_are_native_files_fsynced_when_closed(plan_and_batches, tmp_path, monkeypatch):
    """The writing thread writes a local file without Python file objects, and each closed file is fsynced."""
    plan, batches = plan_and_batches
    synced = []
    fsync = os.fsync

    def recorded(descriptor):
        synced.append(os.readlink(f"/proc/self/fd/{descriptor}"))
        return fsync(descriptor)

    monkeypatch.setattr(shards_lib.os, "fsync", recorded)
    streams = []
    open_row_file = shards_lib._open_row_file

    def opened(path):
        row_file = open_row_file(path)
        streams.append(row_file.stream)
        return row_file

    monkeypatch.setattr(shards_lib, "_open_row_file", opened)
    third = max(1, pa.Table.from_batches(batches).nbytes // 3)
    paths = _write_all(plan, batches, tmp_path, shard_bytes=third)
    assert len(paths) > 1 and all(isinstance(stream, pa.OSFile) for stream in streams)
    assert sorted(synced) == sorted(os.path.realpath(path) for path in paths)
    assert _read(paths).equals(pa.Table.from_batches(batches, schema=_read(paths).schema))


def test_a_full_disk_in_the_writing_thread_is_raised_by_the_step(plan_and_batches, tmp_path, monkeypatch):
    plan, batches = plan_and_batches
    error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def full(self, data):
        raise error

    monkeypatch.setattr(shards_lib._CountingFile, "write", full)
    _through_python_files(monkeypatch)
    fn = _writer(plan, tmp_path)
    with pytest.raises(OSError) as raised:
        for batch in batches:
            fn.process(batch)
        list(fn.finish_bundle())
    assert raised.value is error
    fn.teardown()


def test_a_beam_pipeline_writes_every_row_once_in_order(plan_and_batches, tmp_path):
    plan, batches = plan_and_batches
    prefix = str(tmp_path / "rows" / "part")
    whole = pa.Table.from_batches(batches)
    with test_pipeline.TestPipeline() as pipeline:
        _ = (
            pipeline
            | beam.Create(batches, reshuffle=False).with_output_types(pa.RecordBatch)
            | shards_lib.WriteEmbeddings(plan, prefix, shard_bytes=max(1, whole.nbytes // 4))
        )
    paths = sorted(glob.glob(prefix + "-*.parquet"))
    table = _read(paths)
    assert table.num_rows == whole.num_rows
    assert table.sort_by("id").equals(pa.Table.from_batches(batches, schema=table.schema).sort_by("id"))
