"""Builds the export's Beam graph on a given pipeline; does not run it."""

import apache_beam as beam

from pipeline.transforms import (
    EmbedDocuments,
    ReadCorpus,
    ReuseEarlierRows,
    WriteDeadLetters,
    WriteEmbeddings,
    count_errors,
)


def build_pipeline(pipeline, plan, rows_prefix, errors_prefix):
    """Adds read -> embed -> write to `pipeline`.

    Args:
        pipeline: a `beam.Pipeline` (tests pass a `TestPipeline`).
        plan: the validated `ExportPlan`.
        rows_prefix: file prefix of the row shards (under the staging directory).
        errors_prefix: file prefix of the dead-letter shards.

    Returns:
        A dict with the PCollections "rows" (Arrow RecordBatches, embedded and,
        with `plan.reuse`, reused) and "errors" (dead-letter dicts).
    """
    documents, read_errors = pipeline | "ReadCorpus" >> ReadCorpus(plan)
    if plan.reuse:
        documents, reused = documents | "ReuseEarlierRows" >> ReuseEarlierRows(plan)
    rows, embed_errors = documents | "EmbedDocuments" >> EmbedDocuments(plan)
    if plan.reuse:
        rows = (rows, reused) | "CollectRows" >> beam.Flatten()
    rows | "WriteEmbeddings" >> WriteEmbeddings(plan, rows_prefix)
    errors = (read_errors, embed_errors) | "CollectErrors" >> beam.Flatten()
    count_errors(errors) | "WriteDeadLetters" >> WriteDeadLetters(plan, errors_prefix)
    return {"rows": rows, "errors": errors}
