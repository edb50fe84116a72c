"""End-to-end exports with real TensorFlow, Beam and Parquet, checked against the Keras reference.

Every topology is trained once (tiny sizes, random labels) and each distinct set of
flags is exported once per module; the tests then read the Parquet output back and
compare it with `keras.Model(model.inputs, tensor).predict(token_ids)` on token ids
encoded here with the bundle's tokenizer.
"""

import hashlib
import os

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pa_dataset
import pyarrow.parquet as pq
import pytest
from pipeline_fixtures import (
    BAD_LINES,
    DEFAULT_LAYERS,
    Reference,
    export_args,
    manifest_of,
    pool,
    read_errors,
    read_rows,
    row_files,
    rows_by_id,
    sample_documents,
    write_jsonl,
)
from sizes import LENGTHS, SIZES

import models
from models.architectures import TOPOLOGIES
from pipeline.running.export import run_export
from pipeline.writing.layout import READER_IGNORE_PREFIXES
from pipeline.writing.schema import read_export_metadata

ATOL = 1e-5
# A document whose content has no token at all (only punctuation) but whose title has:
# the two-input topologies embed it, the single-input one dead-letters it.
EMPTY_CONTENT = {
    "id": "empty-content",
    "title": "Return the number of items in a container.",
    "content": " ... !!! ",
    "kind": "function",
    "topic": "data",
}
# (column, layer, call, source input) of the per-token layers; vectors separately.
SEQUENCES = {
    "single_input": [("emb", "emb", 0, "content")],
    "two_inputs_one_output": [("emb", "emb", 0, "content"), ("emb_call1", "emb", 1, "title")],
    "two_inputs_two_outputs": [("emb", "emb", 0, "content"), ("emb_call1", "emb", 1, "title")],
}
VECTORS = {
    "single_input": ["lstm_content"],
    "two_inputs_one_output": ["lstm_content", "lstm_title", "add"],
    "two_inputs_two_outputs": ["lstm_content", "lstm_title"],
}
KEEP = "--keep_fields=kind,topic"
# The widths of the Embedding and LSTM columns.
EMB_DIM, LSTM_DIM = SIZES["embedding_dim"], SIZES["lstm_units"]


def layer_flags(topology):
    layers = [f"{layer}:{call}" for _, layer, call, _ in SEQUENCES[topology]]
    return [f"--layer={layer}" for layer in layers + VECTORS[topology]]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(path, good documents): 40 sample documents, one without content tokens, three bad lines."""
    documents = sample_documents(seed=1) + [EMPTY_CONTENT]
    path = write_jsonl(tmp_path_factory.mktemp("corpus") / "corpus.jsonl", documents, BAD_LINES)
    return path, documents


def embedded_documents(topology, documents):
    """The documents a topology writes rows for: the single-input one has no title to embed."""
    if topology == "single_input":
        return [d for d in documents if d is not EMPTY_CONTENT]
    return documents


@pytest.fixture(scope="module")
def reference(shared_bundle, corpus):
    cache = {}

    def get(topology):
        if topology not in cache:
            documents = embedded_documents(topology, corpus[1])
            cache[topology] = Reference(shared_bundle(topology), documents)
        return cache[topology]

    return get


@pytest.fixture(scope="module")
def export(tmp_path_factory, shared_bundle, corpus):
    """export(topology, *flags) -> (output directory, ExportSummary), run once per flag set."""
    cache = {}

    def run(topology, *flags):
        key = (topology, flags)
        if key not in cache:
            output = tmp_path_factory.mktemp("export") / "out"
            bundle = shared_bundle(topology)
            summary = run_export(export_args(bundle, corpus[0], output, *flags))
            assert summary.exit_code == 0, summary.message
            cache[key] = (str(output), summary)
        return cache[key]

    return run


def unpooled(topology, export):
    return export(topology, *layer_flags(topology), "--pooling=none")


def pooled(topology, export, pooling="mean", *flags):
    return export(topology, *layer_flags(topology), f"--pooling={pooling}", KEEP, *flags)


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_unpooled_embedding_calls_match_keras_per_token(topology, export, reference):
    output, _ = unpooled(topology, export)
    ref = reference(topology)
    rows = rows_by_id(read_rows(output))
    assert sorted(rows) == sorted(ref.ids)
    weights = ref.model.get_layer("emb").embeddings.numpy()
    dim = weights.shape[1]
    for column, layer, call, source in SEQUENCES[topology]:
        expected = ref.predict(layer, call)
        mask = ref.mask(source)
        ids = ref.token_ids[source]
        for index, document_id in enumerate(ref.ids):
            row = rows[document_id]
            real = mask[index]
            assert row[f"{column}_tokens"] == int(real.sum()), (column, document_id)
            values = np.array(row[column], dtype=np.float32).reshape(-1, dim)
            np.testing.assert_allclose(values, expected[index][real], atol=ATOL, rtol=0)
            # Independent of which inbound node is which: call 0 embeds content, call 1 title.
            np.testing.assert_allclose(values, weights[ids[index][real]], atol=ATOL, rtol=0)
    if topology != "single_input":
        assert rows["empty-content"]["emb_tokens"] == 0
        assert rows["empty-content"]["emb"] == []


VECTOR_CASES = [(topology, pooling) for pooling in ("none", "mean") for topology in TOPOLOGIES] + [
    # Keras's own forward pass rather than the exact Embedding->LSTM fast path.
    ("two_inputs_one_output", "none-fast_path-off"),
]


@pytest.mark.parametrize("topology, pooling", VECTOR_CASES)
def test_vector_layers_match_keras(topology, pooling, export, reference):
    if pooling == "none":
        output, _ = unpooled(topology, export)
    elif pooling == "mean":
        output, _ = pooled(topology, export)
    else:
        output, _ = export(topology, *layer_flags(topology), "--pooling=none", "--fast_path=off")
    ref = reference(topology)
    rows = rows_by_id(read_rows(output))
    for layer in VECTORS[topology]:
        expected = ref.predict(layer)
        actual = np.array([rows[document_id][layer] for document_id in ref.ids], dtype=np.float32)
        assert actual.shape == expected.shape
        np.testing.assert_allclose(actual, expected, atol=ATOL, rtol=0)


POOLED_CASES = [(topology, "mean") for topology in TOPOLOGIES] + [
    ("two_inputs_one_output", "max"),
    ("two_inputs_one_output", "last"),
]


@pytest.mark.parametrize("topology, pooling", POOLED_CASES)
def test_pooled_embedding_calls_match_keras(topology, pooling, export, reference):
    output, _ = pooled(topology, export, pooling)
    ref = reference(topology)
    rows = rows_by_id(read_rows(output))
    for column, layer, call, source in SEQUENCES[topology]:
        expected = ref.predict(layer, call)
        mask = ref.mask(source)
        for index, document_id in enumerate(ref.ids):
            value = rows[document_id][column]
            if not mask[index].any():
                # Nothing to pool: zeros, as an empty mean, never -inf (max) or padding (last).
                assert value == [0.0] * len(value), (column, document_id, value)
                continue
            want = pool(expected[index], mask[index], pooling)
            np.testing.assert_allclose(np.array(value, dtype=np.float32), want, atol=ATOL, rtol=0)
    assert f"{SEQUENCES[topology][0][0]}_tokens" not in rows[ref.ids[0]]


def test_float16_output_is_close_to_keras(export, reference):
    topology = "two_inputs_two_outputs"
    output, _ = pooled(topology, export, "mean", "--dtype=float16")
    ref = reference(topology)
    table = read_rows(output)
    assert table.schema.field("lstm_content").type == pa.list_(pa.float16(), LSTM_DIM)
    assert table.schema.field("emb_call1").type == pa.list_(pa.float16(), EMB_DIM)
    rows = rows_by_id(table)
    checks = [(layer, ref.predict(layer)) for layer in VECTORS[topology]]
    mask = ref.mask("title")
    checks.append(
        (
            "emb_call1",
            np.stack([pool(v, m, "mean") for v, m in zip(ref.predict("emb", 1), mask, strict=True)]),
        )
    )
    for column, expected in checks:
        actual = np.stack([np.asarray(rows[i][column], dtype=np.float32) for i in ref.ids])
        assert table.column(column).combine_chunks().values.to_numpy().dtype == np.float16
        # float16 keeps 11 significant bits: relative error <= 2**-11 above its subnormals.
        np.testing.assert_allclose(actual, expected, rtol=1e-3, atol=1e-6)
    assert read_export_metadata(table.schema)["dtype"] == "float16"


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_counts_add_up_and_bad_records_are_dead_lettered(topology, export, reference, corpus):
    output, summary = unpooled(topology, export)
    ref = reference(topology)
    written = len(ref.ids)
    dead = len(corpus[1]) + len(BAD_LINES) - written
    counts = manifest_of(output)["counts"]
    assert counts["records_read"] == len(corpus[1]) + len(BAD_LINES)
    assert counts["rows_written"] == written == read_rows(output).num_rows
    assert counts["dead_letters"] == dead
    assert counts["records_read"] == counts["rows_written"] + counts["dead_letters"]
    assert (summary.records_read, summary.rows_written, summary.dead_letters) == (
        counts["records_read"],
        written,
        dead,
    )
    errors = read_errors(output)
    reasons = dict(zip(errors.column("id").to_pylist(), errors.column("reason").to_pylist(), strict=True))
    expected_reasons = {None: "missing_id", "null-content": "missing_field"}
    if topology == "single_input":
        expected_reasons["empty-content"] = "empty_document"
    assert sorted(errors.column("reason").to_pylist()) == sorted(
        ["malformed_json", *expected_reasons.values()]
    )
    assert {key: reasons[key] for key in expected_reasons if key is not None} == {
        key: value for key, value in expected_reasons.items() if key is not None
    }
    assert counts["dead_letters_by_reason"] == {reason: 1 for reason in errors.column("reason").to_pylist()}
    # A document counts once however many of its inputs were cut.
    cut = np.zeros(written, dtype=bool)
    for name, length in LENGTHS.items():
        if name in ref.token_ids:
            cut |= ref.tokenizer.encode_batch([d[name] for d in ref.documents], length)[3]
    assert summary.truncated == counts["documents_truncated"] == int(cut.sum())
    assert 0 < summary.truncated <= written


def test_output_reads_back_with_pyarrow_pandas_and_duckdb(export, corpus):
    output, _ = pooled("two_inputs_two_outputs", export)
    files = row_files(output)
    schema = pq.read_schema(files[0])
    assert schema.field("id").type == pa.string()
    dims = {"emb": EMB_DIM, "emb_call1": EMB_DIM, "lstm_content": LSTM_DIM, "lstm_title": LSTM_DIM}
    for column, dim in dims.items():
        assert schema.field(column).type == pa.list_(pa.float32(), dim), column
    assert schema.field("kind").type == pa.string()
    expected = rows_by_id(read_rows(output))

    # A read of the whole directory, skipping the dead letters as the output documents.
    dataset = pa_dataset.dataset(output, format="parquet", ignore_prefixes=READER_IGNORE_PREFIXES)
    assert dataset.schema.remove_metadata() == schema.remove_metadata()
    assert dataset.count_rows() == len(expected)

    frame = pd.read_parquet(output, ignore_prefixes=READER_IGNORE_PREFIXES)
    assert len(frame) == len(expected)
    assert set(frame.columns) == {
        "id",
        "kind",
        "topic",
        "emb",
        "emb_call1",
        "lstm_content",
        "lstm_title",
        "input_sha256",
    }
    for record in frame.itertuples(index=False):
        assert isinstance(record.lstm_content, np.ndarray) and record.lstm_content.shape == (LSTM_DIM,)
        assert record.emb.shape == (EMB_DIM,)
        np.testing.assert_array_equal(record.lstm_content, np.float32(expected[record.id]["lstm_content"]))

    pattern = os.path.join(output, "*.parquet")
    result = duckdb.sql(
        f"SELECT id, len(lstm_content) AS n, len(emb_call1) AS m, lstm_content, topic FROM '{pattern}'"
    ).fetchall()
    assert len(result) == len(expected)
    for document_id, n, m, vector, topic in result:
        assert (n, m) == (LSTM_DIM, EMB_DIM)
        np.testing.assert_array_equal(np.float32(vector), np.float32(expected[document_id]["lstm_content"]))
        assert topic == expected[document_id]["topic"]


def test_keep_fields_are_copied_through(export, corpus):
    output, _ = pooled("two_inputs_two_outputs", export)
    rows = rows_by_id(read_rows(output))
    for document in corpus[1]:
        assert rows[document["id"]]["kind"] == document["kind"]
        assert rows[document["id"]]["topic"] == document["topic"]


def sha256(path):
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def test_parquet_metadata_records_the_export(export, shared_bundle):
    output, _ = pooled("two_inputs_two_outputs", export)
    bundle = shared_bundle("two_inputs_two_outputs")
    for path in row_files(output):
        metadata = read_export_metadata(pq.read_schema(path))
        assert metadata["model_uri"] == bundle
        assert metadata["model_sha256"] == sha256(os.path.join(bundle, "model.keras"))
        assert metadata["tokenizer_sha256"] == sha256(os.path.join(bundle, "tokenizer.json"))
        assert metadata["package_version"] == models.__version__
        columns = {c["column"]: c for c in metadata["columns"]}
        assert list(columns) == ["emb", "emb_call1", "lstm_content", "lstm_title"]
        assert {k: columns["emb_call1"][k] for k in ("layer", "call", "dim", "dtype", "pooling")} == {
            "layer": "emb",
            "call": 1,
            "dim": EMB_DIM,
            "dtype": "float32",
            "pooling": "mean",
        }
        assert columns["emb"]["call"] == 0 and columns["emb"]["source_input"] == "content"
        assert columns["emb_call1"]["source_input"] == "title"
        assert {k: columns["lstm_title"][k] for k in ("layer", "call", "dim", "dtype")} == {
            "layer": "lstm_title",
            "call": 0,
            "dim": LSTM_DIM,
            "dtype": "float32",
        }
    manifest = manifest_of(output)
    assert manifest["model_sha256"] == sha256(os.path.join(bundle, "model.keras"))


def test_default_flags_export_the_bundles_default_layers_mean_pooled(export, reference):
    topology = "two_inputs_one_output"
    output, _ = export(topology)
    ref = reference(topology)
    table = read_rows(output)
    assert table.column_names == ["id", *DEFAULT_LAYERS[topology], "input_sha256"]
    rows = rows_by_id(table)
    for layer in VECTORS[topology]:
        actual = np.array([rows[document_id][layer] for document_id in ref.ids], dtype=np.float32)
        np.testing.assert_allclose(actual, ref.predict(layer), atol=ATOL, rtol=0)
    # A bare layer name is its first call: the content's embedding, mean-pooled over its real tokens.
    mask = ref.mask("content")
    for index, document_id in enumerate(ref.ids):
        if mask[index].any():
            want = pool(ref.predict("emb")[index], mask[index], "mean")
        else:  # EMPTY_CONTENT: nothing to pool.
            want = np.zeros(ref.predict("emb").shape[-1], np.float32)
        np.testing.assert_allclose(np.float32(rows[document_id]["emb"]), want, atol=ATOL, rtol=0)
