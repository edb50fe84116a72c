"""`pipeline.running.graph.build_pipeline` on a `TestPipeline`, checked with `assert_that`."""

import glob
import json

import pyarrow.parquet as pq


def test_build_pipeline_on_a_test_pipeline_reads_embeds_and_writes(tmp_path, tiny_bundle):
    import apache_beam as beam
    from apache_beam.testing.test_pipeline import TestPipeline
    from apache_beam.testing.util import assert_that, equal_to

    from pipeline.planning.build import build_plan
    from pipeline.planning.options import ExportOptions
    from pipeline.running.graph import build_pipeline

    directory, _, _ = tiny_bundle
    corpus = tmp_path / "c.jsonl"
    lines = [
        json.dumps({"id": "a", "content": "word1 word2", "title": "word3"}),
        "not json",
        json.dumps({"id": "b", "content": "", "title": ""}),
        json.dumps({"id": "a", "content": "word4", "title": "word5"}),
        json.dumps({"id": "c", "content": "word6", "title": "word7"}),
    ]
    corpus.write_text("\n".join(lines) + "\n")
    flags = ["--model", directory, "--input", str(corpus), "--output", str(tmp_path / "o")]
    plan, _ = build_plan(ExportOptions([*flags, "--layer", "lstm_content", "--layer", "lstm_title"]))
    with TestPipeline() as pipeline:
        outputs = build_pipeline(
            pipeline, plan, str(tmp_path / "rows" / "part"), str(tmp_path / "errors" / "part")
        )
        ids = outputs["rows"] | beam.FlatMap(lambda batch: batch.column("id").to_pylist())
        assert_that(ids, equal_to(["a", "c"]), label="RowIds")
        errors = outputs["errors"] | beam.Map(lambda row: (row["position"], row["id"], row["reason"]))
        expected = [(2, None, "malformed_json"), (3, "b", "empty_document"), (4, "a", "duplicate_id")]
        assert_that(errors, equal_to(expected), label="DeadLetters")
    # What the graph wrote: the same rows and dead letters, as Parquet.
    rows = [r for path in glob.glob(str(tmp_path / "rows" / "*")) for r in pq.read_table(path).to_pylist()]
    assert sorted(row["id"] for row in rows) == ["a", "c"]
    assert all(len(row["lstm_content"]) == len(row["lstm_title"]) > 0 for row in rows)
    errors = [
        r for path in glob.glob(str(tmp_path / "errors" / "*")) for r in pq.read_table(path).to_pylist()
    ]
    assert sorted(row["reason"] for row in errors) == ["duplicate_id", "empty_document", "malformed_json"]
