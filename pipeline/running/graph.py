"""Builds the export's Beam graph on a given pipeline; does not run it."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, TypedDict

import apache_beam as beam
import pyarrow as pa

from pipeline.inference.skip_kept import CountKeptDocuments
from pipeline.inference.transforms import EmbedDocuments
from pipeline.planning.plan import ExportPlan
from pipeline.reading.ranges import DEFAULT_SPLIT_BYTES
from pipeline.reading.transforms import ReadCorpus
from pipeline.running.portable import AnnounceWorker
from pipeline.writing.dead_letters import WriteDeadLetters, count_errors
from pipeline.writing.reuse import ReuseEarlierRows
from pipeline.writing.shards import DEFAULT_CHECKPOINT_SECONDS, DEFAULT_SHARD_BYTES, WriteEmbeddings


class ExportCollections(TypedDict):
    """The PCollections `build_pipeline` returns."""

    # Arrow record batches of output rows: embedded and, with `plan.reuse`, reused.
    rows: beam.PCollection[pa.RecordBatch]
    # Dead letters: a dict per record that was not embedded, with the error table's columns.
    errors: beam.PCollection[dict[str, Any]]


def build_pipeline(
    pipeline: beam.Pipeline,
    plan: ExportPlan,
    rows_prefix: str,
    errors_prefix: str,
    *,
    split_bytes: int = DEFAULT_SPLIT_BYTES,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    limit: int | None = None,
    progress_dir: str | None = None,
    checkpoint_seconds: float = DEFAULT_CHECKPOINT_SECONDS,
    kept_ids_path: str | None = None,
    kept_files: Sequence[str] = (),
    workers_dir: str | None = None,
) -> ExportCollections:
    """Adds read -> embed -> write to `pipeline`.

    Args:
        pipeline: a `beam.Pipeline` (tests pass a `TestPipeline`).
        plan: the validated `ExportPlan`.
        rows_prefix: file prefix of the row shards (under the staging directory).
        errors_prefix: file prefix of the dead-letter shards.
        split_bytes: files are read in ranges of about this many bytes.
        shard_bytes: row shards are closed once they reach this size.
        limit: read only the first `limit` records (by file, then position).
        progress_dir: a local directory where workers count their progress (local runs).
        checkpoint_seconds: a row file is closed once it has held rows this long.
        kept_ids_path: a resumed run: the Parquet file of the ids whose rows it kept,
            which are not embedded (or reused) again (`pipeline.writing.resume`).
        kept_files: a resumed run: the complete row files it kept, named with the new ones.
        workers_dir: where a worker leaves a file once it runs the job (portable runners,
            whose launcher watches for it: see `pipeline.running.portable.wait_for_job`).

    Returns:
        The rows and the dead letters (see `ExportCollections`).
    """
    if workers_dir:
        # Added first, so that runners which order independent roots run it first.
        pipeline | "AnnounceWorker" >> AnnounceWorker(workers_dir)
    documents, read_errors = pipeline | "ReadCorpus" >> ReadCorpus(plan, split_bytes, limit, progress_dir)
    # Only ReadCorpus needs the launch listing; the other DoFns pickle the plan without it.
    plan = dataclasses.replace(plan, input_files=())
    if kept_ids_path:
        documents | "CountKeptDocuments" >> CountKeptDocuments(kept_ids_path)
    if plan.reuse:
        documents, reused, reuse_errors = documents | "ReuseEarlierRows" >> ReuseEarlierRows(
            plan, kept_ids_path, progress_dir
        )
    rows, embed_errors = documents | "EmbedDocuments" >> EmbedDocuments(plan, kept_ids_path, progress_dir)
    written = (rows, reused) if plan.reuse else rows
    written | "WriteEmbeddings" >> WriteEmbeddings(
        plan, rows_prefix, shard_bytes, progress_dir, checkpoint_seconds, kept_files
    )
    if plan.reuse:
        rows = (rows, reused) | "CollectRows" >> beam.Flatten()
    all_errors = (read_errors, embed_errors, reuse_errors) if plan.reuse else (read_errors, embed_errors)
    errors = all_errors | "CollectErrors" >> beam.Flatten()
    count_errors(errors, progress_dir) | "WriteDeadLetters" >> WriteDeadLetters(plan, errors_prefix)
    return {"rows": rows, "errors": errors}
