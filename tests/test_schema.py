"""`pipeline.writing.schema` as pure functions: column types, pooling, rows to Arrow, dead-letter rows."""

import dataclasses
import io
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.planning.plan import ColumnInfo, ExportPlan, InputInfo
from pipeline.writing import real_tokens, schema


def column(name, layer, call, kind, dim, source_input, pooling):
    return ColumnInfo(
        column=name, layer=layer, call=call, kind=kind, dim=dim, source_input=source_input, pooling=pooling
    )


VECTOR = column("lstm", "lstm_content", 0, "vector", 2, "", "none")
PER_TOKEN = column("emb", "emb", 0, "sequence", 3, "content", "none")
MEAN_TITLE = column("emb_call1", "emb", 1, "sequence", 3, "title", "mean")
INPUTS = (
    InputInfo(name="content", field="body", length=4),
    InputInfo(name="title", field="headline", length=2),
)


def make_plan(columns, dtype="float32", keep_fields=()):
    return ExportPlan(
        model_uri="gs://bucket/bundle",
        tokenizer_uri="",
        model_sha256="a" * 64,
        tokenizer_sha256="b" * 64,
        layer_specs=(),
        inputs=INPUTS,
        columns=tuple(columns),
        input_pattern="corpus.jsonl",
        input_format="jsonl",
        id_field="id",
        keep_fields=tuple(keep_fields),
        output="out",
        dtype=dtype,
        batch_size=8,
        compression="snappy",
        max_record_bytes=1000,
        tf_threads=0,
        padding="pre",
    )


@pytest.mark.parametrize(
    "column, dtype, expected",
    [
        (VECTOR, "float32", pa.list_(pa.float32(), 2)),
        (VECTOR, "float16", pa.list_(pa.float16(), 2)),
        (MEAN_TITLE, "float32", pa.list_(pa.float32(), 3)),
        (PER_TOKEN, "float32", pa.list_(pa.list_(pa.float32(), 3))),
        (PER_TOKEN, "float16", pa.list_(pa.list_(pa.float16(), 3))),
    ],
)
def test_column_type(column, dtype, expected):
    assert schema.column_type(column, dtype) == expected


# Three documents of four positions, two dims. Padding positions hold large values so
# that any leak of padding into a pooled vector shows.
VALUES = np.array(
    [
        [[99.0, 99.0], [99.0, 99.0], [1.0, -4.0], [3.0, -2.0]],  # pre-padded: 2 real tokens
        [[-1.0, 5.0], [2.0, -6.0], [-3.0, 1.0], [99.0, 99.0]],  # post-padded: 3 real tokens
        [[-99.0, -99.0], [99.0, 99.0], [7.0, 7.0], [-7.0, 0.5]],  # no real token
    ],
    dtype=np.float32,
)
MASK = np.array(
    [[False, False, True, True], [True, True, True, False], [False, False, False, False]],
)


@pytest.mark.parametrize(
    "pooling, expected",
    [
        ("mean", [[2.0, -3.0], [-2 / 3, 0.0], [0.0, 0.0]]),
        ("max", [[3.0, -2.0], [2.0, 5.0], [0.0, 0.0]]),
        ("last", [[3.0, -2.0], [-3.0, 1.0], [0.0, 0.0]]),
    ],
)
def test_pool_sequence_uses_real_tokens_only(pooling, expected):
    pooled = real_tokens.pool_sequence(VALUES, MASK, pooling)
    assert pooled.dtype == np.float32
    np.testing.assert_allclose(pooled, np.array(expected, dtype=np.float32), rtol=1e-6, atol=1e-7)
    assert np.isfinite(pooled).all()


def test_pool_sequence_rejects_unknown_pooling():
    with pytest.raises(ValueError, match="Unknown pooling 'sum'; expected mean, max or last"):
        real_tokens.pool_sequence(VALUES, MASK, "sum")


def test_output_schema_names_and_types_with_metadata():
    plan = make_plan([PER_TOKEN, MEAN_TITLE, VECTOR], keep_fields=("kind",))
    output = schema.output_schema(plan)
    assert output.names == ["id", "kind", "emb", "emb_tokens", "emb_call1", "lstm", "input_sha256"]
    assert output.field("id").type == pa.string() and not output.field("id").nullable
    assert output.field("emb_tokens").type == pa.int32()
    metadata = schema.read_export_metadata(output)
    assert metadata["model_uri"] == "gs://bucket/bundle"
    assert metadata["inputs"] == [
        {"name": "content", "field": "body", "length": 4},
        {"name": "title", "field": "headline", "length": 2},
    ]
    assert metadata["columns"][1] == {
        "column": "emb_call1",
        "layer": "emb",
        "call": 1,
        "kind": "sequence",
        "dim": 3,
        "dtype": "float32",
        "pooling": "mean",
        "source_input": "title",
        "token_storage": None,
        "table": None,
    }
    assert (metadata["columns"][0]["token_storage"], metadata["columns"][0]["table"]) == ("vectors", None)
    assert metadata["columns"][2]["pooling"] is None and metadata["columns"][2]["source_input"] is None


def _batch_inputs():
    rng = np.random.default_rng(0)
    content = rng.normal(size=(3, 4, 3)).astype(np.float32)
    title = rng.normal(size=(3, 2, 3)).astype(np.float32)
    lstm = rng.normal(size=(3, 2)).astype(np.float32)
    masks = {
        "content": np.array(
            [[False, True, True, True], [False, False, False, False], [True, True, True, True]]
        ),
        "title": np.array([[True, True], [False, True], [True, False]]),
    }
    return {"emb": content, "emb_call1": title, "lstm": lstm}, masks


def test_to_record_batch_builds_rows_in_document_order():
    plan = make_plan([PER_TOKEN, MEAN_TITLE, VECTOR], keep_fields=("kind",))
    output_schema = schema.output_schema(plan)
    outputs, masks = _batch_inputs()
    ids = ["a", "b", "c"]
    batch = schema.to_record_batch(
        output_schema, plan.columns, plan.dtype, ids, {"kind": ["x", None, "z"]}, outputs, masks
    )
    assert batch.schema == output_schema
    rows = batch.to_pylist()
    assert [row["id"] for row in rows] == ids
    assert [row["kind"] for row in rows] == ["x", None, "z"]
    for index, row in enumerate(rows):
        real = masks["content"][index]
        assert row["emb_tokens"] == int(real.sum())
        np.testing.assert_array_equal(
            np.array(row["emb"], dtype=np.float32).reshape(-1, 3), outputs["emb"][index][real]
        )
        title = masks["title"][index]
        np.testing.assert_allclose(
            row["emb_call1"], outputs["emb_call1"][index][title].mean(axis=0), rtol=1e-6
        )
        np.testing.assert_array_equal(np.float32(row["lstm"]), outputs["lstm"][index])
    assert rows[1]["emb"] == [] and rows[1]["emb_tokens"] == 0


def test_to_record_batch_writes_token_ids_of_the_real_tokens():
    stored = dataclasses.replace(
        PER_TOKEN, token_storage=schema.TOKEN_STORAGE_IDS, table="_tables/emb.parquet"
    )
    plan = make_plan([stored, VECTOR])
    output_schema = schema.output_schema(plan)
    assert output_schema.field("emb").type == pa.list_(pa.int32())
    outputs, masks = _batch_inputs()
    token_ids = {"content": np.array([[0, 7, 3, 9], [0, 0, 0, 0], [4, 4, 1, 2]], dtype=np.int32)}
    masks["content"] = token_ids["content"] != 0
    batch = schema.to_record_batch(
        output_schema,
        plan.columns,
        plan.dtype,
        ["a", "b", "c"],
        {},
        {"lstm": outputs["lstm"]},
        masks,
        token_ids,
    )
    assert batch.column("emb").to_pylist() == [[7, 3, 9], [], [4, 4, 1, 2]]
    assert batch.column("emb_tokens").to_pylist() == [3, 0, 4]
    facts = schema.read_export_metadata(output_schema)["columns"][0]
    assert (facts["token_storage"], facts["table"]) == ("ids", "_tables/emb.parquet")


def test_to_record_batch_round_trips_through_parquet():
    plan = make_plan([PER_TOKEN, MEAN_TITLE, VECTOR])
    output_schema = schema.output_schema(plan)
    outputs, masks = _batch_inputs()
    batch = schema.to_record_batch(
        output_schema, plan.columns, plan.dtype, ["a", "b", "c"], {}, outputs, masks
    )
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_batches([batch]), buffer)
    buffer.seek(0)
    table = pq.read_table(buffer)
    assert table.to_pylist() == batch.to_pylist()
    assert schema.read_export_metadata(table.schema) == schema.read_export_metadata(output_schema)


def test_to_record_batch_float16():
    plan = make_plan([PER_TOKEN, VECTOR], dtype="float16")
    output_schema = schema.output_schema(plan)
    outputs, masks = _batch_inputs()
    batch = schema.to_record_batch(
        output_schema, plan.columns, plan.dtype, ["a", "b", "c"], {}, outputs, masks
    )
    assert batch.schema.field("lstm").type == pa.list_(pa.float16(), 2)
    values = batch.column("lstm").values.to_numpy()
    assert values.dtype == np.float16
    np.testing.assert_allclose(values.reshape(3, 2), outputs["lstm"], rtol=1e-3)
    tokens = batch.column("emb").values.values.to_numpy()
    assert tokens.dtype == np.float16
    np.testing.assert_allclose(tokens.reshape(-1, 3), outputs["emb"][masks["content"]], rtol=1e-3)


def test_error_row_fields_and_limits():
    row = schema.error_row("gs://b/c.jsonl", 7, 42, "malformed_json", "x" * 2000, "y" * 5000, raw_limit=100)
    assert row == {
        "source": "gs://b/c.jsonl",
        "position": 7,
        "id": "42",
        "reason": "malformed_json",
        "message": "x" * 1000,
        "raw": "y" * 100,
    }
    table = pa.Table.from_pylist([row], schema=schema.ERROR_SCHEMA)
    assert table.num_rows == 1


def test_error_row_without_id_position_or_raw():
    row = schema.error_row("f.txt", None, None, "unreadable_file", ValueError("boom"), None)
    assert (row["id"], row["position"], row["raw"], row["message"]) == (None, None, None, "boom")


def test_error_row_keeps_undecodable_bytes_visible():
    row = schema.error_row("f.jsonl", 1, None, "invalid_utf8", "bad", b'{"content": "caf\xe9"}')
    assert row["raw"] == '{"content": "caf\\xe9"}'
    # A long bytes record is cut to the character limit as well.
    assert len(schema.error_row("f", 1, None, "too_large", "m", b"z" * 50, raw_limit=10)["raw"]) == 10


def test_error_row_can_always_be_written_to_parquet():
    """Lone surrogates (a JSON escape, a file name that is not UTF-8) are escaped, not a crash."""
    row = schema.error_row(
        "dir/name-\udcff.jsonl", 3, "id-\ud800", "invalid_utf8", "bad \udfff", "raw \ud800"
    )
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([row], schema=schema.ERROR_SCHEMA), sink)
    (written,) = pq.read_table(sink).to_pylist()
    assert written["source"] == "dir/name-\\udcff.jsonl"
    assert (written["id"], written["message"], written["raw"]) == ("id-\\ud800", "bad \\udfff", "raw \\ud800")


def test_rows_round_trip_exactly_through_numpy_rows():
    """`--reuse` carries earlier rows as `rows_of` dicts; `batch_of_rows` must give the same bits back."""
    import pyarrow as pa

    half = np.array([0.1, 0.2, 0.3], dtype=np.float16)
    table = pa.table(
        {
            "id": ["a", "b", "c", "d"],
            "vector": pa.array([half, half * 2, half * 3, half * 4], type=pa.list_(pa.float16(), 3)),
            "tokens": pa.array(
                [[[1.5, np.nan]], [], [[3.0, -0.0], [5.0, 6.25]], [[1e-30, 7.0]]],
                type=pa.list_(pa.list_(pa.float32(), 2)),
            ),
            "ids": pa.array([[1, 2], [], [3], [2**31 - 1]], type=pa.list_(pa.int32())),
            "count": pa.array([1, 0, 2, 1], pa.int32()),
            "input_sha256": ["x", "y", None, "z"],
        }
    ).slice(1)  # a slice: offsets that do not start at zero
    rows = schema.rows_of(table)
    assert [row["id"] for row in rows] == ["b", "c", "d"]
    back = pa.Table.from_batches([schema.batch_of_rows(rows, table.schema)])
    assert back.schema == table.schema
    for name in ("id", "ids", "count", "input_sha256"):
        assert back.column(name).equals(table.column(name)), name
    # Floats bit for bit: NaN != NaN and -0.0 == 0.0 would hide a change.
    for name, bits in (("vector", np.uint16), ("tokens", np.uint32)):
        expected, actual = table.column(name).combine_chunks(), back.column(name).combine_chunks()
        while pa.types.is_list(expected.type) or pa.types.is_fixed_size_list(expected.type):
            expected, actual = expected.flatten(), actual.flatten()
        assert np.array_equal(expected.to_numpy().view(bits), actual.to_numpy().view(bits)), name


def test_the_summarys_duckdb_line_reads_the_ids_under_a_hive_style_path(tmp_path):
    """Under .../id=v2/ DuckDB took the path's value for every row's id, and added a column."""
    import re

    from pipeline.running.report import ExportSummary, format_summary

    output = tmp_path / "model=lstm" / "id=v2"
    output.mkdir(parents=True)
    pq.write_table(pa.table({"id": ["a", "b"], "x": [1, 2]}), output / "part-00000-of-00001.parquet")
    summary = ExportSummary(str(output), 2, 2, 0, {}, 0, 0, 1.0, 0, "")
    (line,) = [line for line in format_summary(summary).splitlines() if "import duckdb" in line]
    result = _run_read_line(line)
    assert result.returncode == 0, result.stderr[-2000:]
    header = result.stdout.splitlines()[1]
    assert re.findall(r"\w+", header) == ["id", "x"] and "id=v2" not in result.stdout


def test_the_summarys_lines_name_a_relative_output_absolutely(tmp_path, monkeypatch):
    """`--output out` printed `output out` and read lines of "out/part-*.parquet": pasted into a shell
    or notebook in another directory they found no file."""
    from pipeline.running.report import ExportSummary, format_summary

    (tmp_path / "run" / "out").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    pq.write_table(
        pa.table({"id": ["row-a", "row-b"]}), tmp_path / "run" / "out" / "part-00000-of-00001.parquet"
    )
    monkeypatch.chdir(tmp_path / "run")
    text = format_summary(ExportSummary("out", 2, 2, 0, {}, 0, 0, 1.0, 0, ""))
    assert f"  output           {tmp_path / 'run' / 'out'}" in text.splitlines()
    lines = [line for line in text.splitlines() if " -c " in line]
    assert len(lines) == 2
    for line in lines:
        result = _run_read_line(line, cwd=tmp_path / "elsewhere")
        assert result.returncode == 0 and "row-b" in result.stdout, result.stderr[-2000:]


def test_the_summarys_read_lines_call_the_runs_own_python_when_path_has_another(tmp_path, monkeypatch):
    """After the README's `.venv/bin/python -m pipeline.run` (no activated environment), the lines said
    `python -c ...`: pasted, the `python` on PATH, another interpreter without duckdb and pandas, ran
    them and failed with ModuleNotFoundError."""
    import subprocess

    from pipeline.running.report import ExportSummary, format_summary

    output = tmp_path / "out"
    output.mkdir()
    pq.write_table(pa.table({"id": ["row-a", "row-b"]}), output / "part-00000-of-00001.parquet")
    other = tmp_path / "bin"
    other.mkdir()
    (other / "python").write_text("#!/bin/sh\necho 'ModuleNotFoundError: not the run s python' >&2; exit 1\n")
    (other / "python").chmod(0o755)
    path = f"{other}{os.pathsep}/usr/bin{os.pathsep}/bin"
    monkeypatch.setenv("PATH", path)
    lines = format_summary(ExportSummary(str(output), 2, 2, 0, {}, 0, 0, 1.0, 0, "")).splitlines()
    read_lines = [line.split(" with ", 1)[-1].strip().removeprefix("or ") for line in lines if " -c " in line]
    assert len(read_lines) == 2
    for line in read_lines:
        result = subprocess.run(["bash", "-c", line], capture_output=True, text=True, env={"PATH": path})
        assert result.returncode == 0 and "row-b" in result.stdout, (line, result.stderr[-2000:])


def test_the_summary_shows_an_output_name_holding_a_newline_escaped(tmp_path):
    """`--output $'a\\nb'` printed its `output` line over two lines, the second one without its label."""
    from pipeline.running.report import ExportSummary, format_summary

    output = str(tmp_path / "a\nb\tc")
    lines = format_summary(ExportSummary(output, 2, 2, 0, {}, 0, 0, 1.0, 0, "")).splitlines()
    assert f"  output           {output!r}" in lines
    assert not [line for line in lines if line.startswith("b")]


def _run_read_line(line, cwd=None):
    """Runs a summary's `python -c ...` read line as bash runs it, pasted (in `cwd`); the CompletedProcess."""
    import shlex
    import subprocess
    import sys

    # The line calls `python`, or this interpreter's path where that is not it (`.venv/bin/python3`
    # under `.venv/bin/pytest`): either way, this interpreter runs it.
    command = line.split("read it with", 1)[1] if "read it with" in line else line.strip().removeprefix("or ")
    command = f"{shlex.quote(sys.executable)} -c {command.strip().split(' -c ', 1)[1]}"
    return subprocess.run(["bash", "-c", command], capture_output=True, text=True, cwd=cwd)


# (Not a backslash: DuckDB's glob finds no file under a directory whose name holds one.)
@pytest.mark.parametrize("name", ["it's", "v$1", "a`id`b", 'say "hi"', "wow!", "x$(touch pwned)"])
def test_the_summarys_read_lines_run_for_a_path_with_shell_specials(tmp_path, name):
    """`it's/out`: the quote ended the SQL string and the Python one. `v$1/out` in "...": bash
    expanded $1 to nothing, and both lines looked for /tmp/.../v/out."""
    from pipeline.running.report import ExportSummary, format_summary

    output = tmp_path / name / "out"
    output.mkdir(parents=True)
    pq.write_table(pa.table({"id": ["row-a", "row-b"]}), output / "part-00000-of-00001.parquet")
    summary = ExportSummary(str(output), 2, 2, 0, {}, 0, 0, 1.0, 0, "")
    lines = [line for line in format_summary(summary).splitlines() if " -c " in line]
    assert len(lines) == 2
    for line in lines:
        result = _run_read_line(line, cwd=tmp_path)
        assert result.returncode == 0 and "row-b" in result.stdout, result.stderr[-2000:]
    assert sorted(os.listdir(tmp_path)) == [name]  # nothing the path spelled was run
