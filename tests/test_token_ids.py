"""`--token_storage ids`: token ids plus the Embedding's table reproduce the per-token vectors exactly.

The sample corpus is exported twice with the bundled model, once per storage, for
both calls of the shared `emb` (`emb:0` on the content, `emb:1` on the title); the
ids joined with the table written inside the export must give the `vectors`
export bit for bit, in numpy and through the DuckDB, pandas and polars
snippets of docs/token_storage.md.  The vectors themselves are checked against Keras's `predict`.
"""

import hashlib
import json
import os
import sys

import duckdb
import forkserver
import keras
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from doc_pages import marked_blocks
from pipeline_fixtures import (
    REPOSITORY,
    export_args,
    is_empty_or_absent,
    read_errors,
    read_rows,
    write_jsonl,
)
from sizes import LENGTHS, SIZES

from models.bundle import DEFAULT_BUNDLE, load_bundle, save_bundle
from models.tokenizer import Tokenizer
from models.train import SAMPLE_CORPUS
from models.truncate import parse_layer_spec
from pipeline import analyze, vocabulary
from pipeline.analysis.dataset import AnalysisError, check_vector_column, open_documents, open_vocabulary
from pipeline.analysis.neighbors import find_neighbors
from pipeline.errors import ExportConfigError
from pipeline.running.export import run_export
from pipeline.writing import layout as layout_lib
from pipeline.writing import state as state_lib
from pipeline.writing.schema import read_export_metadata, vocabulary_schema
from pipeline.writing.token_tables import check_ids_column, read_table_vectors, vectors_from_ids

README_OUTPUT = "output/tokens"
LAYERS = ("--layer=emb:0", "--layer=emb:1", "--pooling=none")
COLUMNS = {"emb": "content", "emb_call1": "title"}
TABLE = "_tables/emb.parquet"
# The Embedding input_dim of the tiny bundles: ids 0 .. VOCABULARY - 1.
VOCABULARY = SIZES["vocabulary_size"]


def _export(directory, *flags):
    summary = run_export(["--output", str(directory), *LAYERS, *flags])
    assert summary.exit_code == 0, summary.message
    return str(directory)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """{storage: output directory}: the sample corpus exported with the bundled model, both ways."""
    base = tmp_path_factory.mktemp("token_storage")
    return {
        "vectors": _export(base / "vectors"),
        "ids": _export(base / "ids", "--token_storage=ids"),
    }


@pytest.fixture(scope="module")
def rows(exports):
    """{storage: the rows as one Arrow table, sorted by id}."""
    return {storage: read_rows(directory).sort_by("id") for storage, directory in exports.items()}


@pytest.fixture(scope="module")
def table(exports):
    return read_table_vectors(os.path.join(exports["ids"], TABLE))


def _float_bits(array):
    """The float32 values of a list<fixed_size_list<float32>> array, as raw bits."""
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    return np.asarray(array.flatten().flatten().to_numpy(), dtype=np.float32).view(np.uint32)


@pytest.mark.parametrize("column", sorted(COLUMNS))
def test_ids_joined_with_the_table_are_the_vectors_export_bit_for_bit(rows, table, column):
    ids, vectors = rows["ids"], rows["vectors"]
    assert ids.schema.field(column).type == pa.list_(pa.int32())
    assert ids["id"].equals(vectors["id"])
    assert ids.num_rows == 2048
    assert ids[f"{column}_tokens"].equals(vectors[f"{column}_tokens"])
    joined = vectors_from_ids(ids[column], table)
    assert joined.type == vectors.schema.field(column).type
    np.testing.assert_array_equal(
        pa.compute.list_value_length(joined).to_numpy(),
        pa.compute.list_value_length(vectors[column].combine_chunks()).to_numpy(),
    )
    np.testing.assert_array_equal(_float_bits(joined), _float_bits(vectors[column]))
    assert joined.equals(vectors[column].combine_chunks())


def test_ids_are_the_tokenizer_ids_and_the_vectors_are_keras_predict(rows, table):
    bundle = load_bundle(DEFAULT_BUNDLE)
    with open(SAMPLE_CORPUS, encoding="utf-8") as handle:
        documents = {d["id"]: d for d in map(json.loads, handle)}
    ids = rows["ids"].slice(0, 96).to_pydict()
    inputs = {t.name: t for t in bundle.model.inputs}
    lengths = {name: int(tensor.shape[1]) for name, tensor in inputs.items()}
    features = {
        name: bundle.tokenizer.encode_batch([documents[i][name] for i in ids["id"]], lengths[name])[0]
        for name in inputs
    }
    emb = bundle.model.get_layer("emb")
    for call, (column, source_input) in enumerate(COLUMNS.items()):
        reference = keras.Model(bundle.model.inputs, emb._inbound_nodes[call].output_tensors[0])
        predicted = reference.predict([features[t.name] for t in bundle.model.inputs], verbose=0)
        for row, token_ids in enumerate(ids[column]):
            real = features[source_input][row][features[source_input][row] != 0]
            assert token_ids == real.tolist(), ids["id"][row]
            np.testing.assert_allclose(
                table[token_ids], predicted[row][features[source_input][row] != 0], atol=1e-5, rtol=0
            )


def test_manifest_and_metadata_link_the_columns_to_the_table(exports, rows, table):
    directory = exports["ids"]
    manifest = state_lib.read_manifest(directory)
    for entry in manifest["columns"]:
        assert (entry["token_storage"], entry["table"]) == ("ids", TABLE)
    (listed,) = manifest["tables"]
    with open(os.path.join(directory, TABLE), "rb") as handle:
        data = handle.read()
    assert listed == {
        "file": TABLE,
        "rows": 4000,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    facts = read_export_metadata(pq.read_schema(read_rows_files(directory)[0]))
    assert {c["column"]: (c["token_storage"], c["table"]) for c in facts["columns"]} == {
        "emb": ("ids", TABLE),
        "emb_call1": ("ids", TABLE),
    }
    # The vectors export records its storage too, and has no table.
    vector_facts = read_export_metadata(pq.read_schema(read_rows_files(exports["vectors"])[0]))
    assert {c["token_storage"] for c in vector_facts["columns"]} == {"vectors"}
    assert state_lib.read_manifest(exports["vectors"])["tables"] == []
    # The table has the format of `python -m pipeline.vocabulary`, with its columns named.
    written = pq.read_table(os.path.join(directory, TABLE))
    assert written.schema.remove_metadata().equals(vocabulary_schema(300, {}).remove_metadata())
    metadata = read_export_metadata(written.schema)
    assert metadata["layer"] == "emb" and metadata["columns"] == ["emb", "emb_call1"]
    assert metadata["model_sha256"] == manifest["model_sha256"]
    bundle = load_bundle(DEFAULT_BUNDLE)
    np.testing.assert_array_equal(table, bundle.model.get_layer("emb").get_weights()[0])
    assert written["token"].to_pylist()[:3] == ["<pad>", "<oov>", bundle.tokenizer.vocabulary[0]]


def read_rows_files(directory):
    return sorted(os.path.join(directory, n) for n in os.listdir(directory) if n.startswith("part-"))


def test_the_table_is_ours_and_out_of_a_read_of_the_rows(exports, rows, tmp_path):
    directory = exports["ids"]
    assert state_lib.output_state(directory) == "finished"
    frame = pd.read_parquet(directory, ignore_prefixes=layout_lib.READER_IGNORE_PREFIXES)
    assert len(frame) == rows["ids"].num_rows and "vector" not in frame.columns
    # A table without a manifest or a commit journal beside it is no run's leftover: kept, refused.
    leftover = tmp_path / "leftover"
    os.makedirs(leftover / layout_lib.TABLES_DIR)
    pq.write_table(pq.read_table(os.path.join(directory, TABLE)), leftover / TABLE)
    assert state_lib.output_state(str(leftover)) == "foreign"
    with pytest.raises(ExportConfigError, match="no export wrote"):
        state_lib.prepare(str(leftover), overwrite=True)
    assert os.path.exists(leftover / TABLE)
    # A finished export is replaced only with --overwrite, and then without its old table.
    with pytest.raises(ExportConfigError, match="already holds a finished export"):
        run_export(["--output", directory, *LAYERS, "--token_storage=ids"])


@pytest.fixture(scope="module")
def readme_blocks(exports):
    """(language, code) of the blocks marked `<!-- token-ids -->` (README, docs/), reading the ids export."""
    blocks = marked_blocks("token-ids")
    assert [language for _, language, _ in blocks] == ["sql", "python", "python"]
    return [(language, code.replace(README_OUTPUT, exports["ids"])) for _, language, code in blocks]


def _expected_tokens(vectors, column="emb"):
    """(ids, positions, (tokens, dim) float32) of the vectors export, one entry per real token."""
    counts = pa.compute.list_value_length(vectors[column].combine_chunks()).to_numpy()
    ids = np.repeat(np.array(vectors["id"].to_pylist(), dtype=object), counts)
    positions = np.concatenate([np.arange(count) for count in counts])
    values = _float_bits(vectors[column]).view(np.float32).reshape(-1, 300)
    return ids, positions, values


def test_readme_duckdb_join_gives_the_vectors_export(readme_blocks, rows):
    sql = readme_blocks[0][1]
    result = duckdb.connect().sql(sql).arrow().read_all()
    ids, positions, values = _expected_tokens(rows["vectors"])
    assert result.num_rows == len(values)
    assert result["id"].to_pylist() == ids.tolist()
    np.testing.assert_array_equal(result["position"].to_numpy(), positions)
    got = np.asarray(result["vector"].combine_chunks().flatten().to_numpy(), dtype=np.float32)
    np.testing.assert_array_equal(got.view(np.uint32), values.reshape(-1).view(np.uint32))


def test_readme_pandas_and_polars_snippets_give_the_vectors_export(readme_blocks, rows):
    ids, positions, values = _expected_tokens(rows["vectors"])
    pandas_code, polars_code = readme_blocks[1][1], readme_blocks[2][1]
    namespace = {"__name__": "readme_example"}
    exec(compile(pandas_code, "docs/token_storage.md", "exec"), namespace)
    order = np.argsort(np.array(namespace["rows"]["id"].tolist(), dtype=object), kind="stable")
    vectors = np.concatenate([namespace["vectors"][index] for index in order]).reshape(-1, 300)
    np.testing.assert_array_equal(vectors.view(np.uint32), values.view(np.uint32))
    namespace = {"__name__": "readme_example"}
    exec(compile(polars_code, "docs/token_storage.md", "exec"), namespace)
    tokens = namespace["tokens"]
    by_document = {}
    for document_id, vector in zip(tokens["id"].to_list(), tokens["vector"].to_numpy(), strict=True):
        by_document.setdefault(document_id, []).append(vector)
    joined = np.concatenate([np.stack(by_document[i]) for i in dict.fromkeys(ids.tolist())])
    np.testing.assert_array_equal(joined.view(np.uint32), values.view(np.uint32))


def test_analyze_queries_words_in_the_table_and_explains_the_ids_column(exports, tmp_path):
    words = open_vocabulary(exports["ids"])
    vocabulary_dir = str(tmp_path / "vocabulary")
    vocabulary.export_vocabulary(DEFAULT_BUNDLE, None, "emb", vocabulary_dir)
    reference = open_vocabulary(vocabulary_dir)
    got, compared = find_neighbors(words, "thread", "vector", k=10)
    expected, expected_compared = find_neighbors(reference, "thread", "vector", k=10)
    assert compared == expected_compared == 3999
    assert [(n.key, n.similarity) for n in got] == [(n.key, n.similarity) for n in expected]
    documents = open_documents(exports["ids"])
    with pytest.raises(AnalysisError, match=r"holds the token ids .*--word WORD"):
        check_vector_column(documents, "emb")
    assert analyze.main([exports["ids"], "neighbors", "--word", "socket", "-k", "3"]) == 0


# --- refusals and dead letters, on small models -------------------------------------------------


@pytest.fixture(scope="module")
def sample_bundle(shared_bundle):
    """The two-output bundle fit on sample documents (conftest's `tiny_bundle` is fit on random ids)."""
    return shared_bundle("two_inputs_two_outputs")


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    documents = [
        {"id": "a", "content": "return the value of the thread", "title": "the thread"},
        {"id": "b", "content": [4, 5, 6], "title": "a socket"},
        {"id": "c", "content": [4, 10_000, 6], "title": "past the table"},
        {"id": "d", "content": "open a socket", "title": [7, VOCABULARY - 1]},
    ]
    return write_jsonl(tmp_path_factory.mktemp("tiny") / "corpus.jsonl", documents)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--layer=emb", "--token_storage=ids"], r"needs --pooling none \(received --pooling mean\)"),
        (
            ["--layer=lstm_content", "--pooling=none", "--token_storage=ids"],
            r"every exported column \(lstm_content\) holds one vector per document",
        ),
    ],
    ids=["pooled", "no_per_token_column"],
)
def test_ids_refused_without_a_per_token_column(sample_bundle, tiny_corpus, tmp_path, flags, message):
    out = tmp_path / "out"
    with pytest.raises(ExportConfigError, match=message):
        run_export(export_args(sample_bundle, tiny_corpus, out, *flags))
    assert is_empty_or_absent(out)


def test_ids_and_vectors_dead_letter_the_same_documents(sample_bundle, tiny_corpus, tmp_path):
    """An id past the table is a bad_token_id dead letter in both storage modes, before any forward pass."""
    runs = {}
    for storage in ("vectors", "ids"):
        out = tmp_path / storage
        summary = run_export(
            export_args(sample_bundle, tiny_corpus, out, "--layer=emb", "--layer=emb:1", "--pooling=none")
            + [f"--token_storage={storage}"]
        )
        assert (summary.rows_written, summary.dead_letters) == (3, 1), summary
        runs[storage] = read_rows(out).sort_by("id"), read_errors(out)
    for _, errors in runs.values():
        assert errors.select(["id", "reason"]).to_pylist() == [{"id": "c", "reason": "bad_token_id"}]
    ids_rows, vector_rows = runs["ids"][0], runs["vectors"][0]
    table = read_table_vectors(str(tmp_path / "ids" / TABLE))
    for column in COLUMNS:
        assert vectors_from_ids(ids_rows[column], table).equals(vector_rows[column].combine_chunks())
    assert ids_rows["emb"].to_pylist()[1] == [4, 5, 6]


def _per_token_model():
    """Token-level layers after an Embedding, an Embedding of another layer's output, a masking one."""
    content = keras.Input(shape=(LENGTHS["content"],), dtype="int32", name="content")
    title = keras.Input(shape=(LENGTHS["title"],), dtype="int32", name="title")
    embedded = keras.layers.Embedding(VOCABULARY, 8, name="emb")(content)
    dense = keras.layers.Dense(4, name="token_dense")(embedded)
    masked = keras.layers.Masking(name="masked")(embedded)
    copied = keras.layers.Identity(name="content_copy")(content)
    copy_embedded = keras.layers.Embedding(VOCABULARY, 4, name="copy_emb")(copied)
    title_embedded = keras.layers.Embedding(VOCABULARY, 4, mask_zero=True, name="title_emb")(title)
    pooled = [
        keras.layers.GlobalAveragePooling1D()(x) for x in (dense, masked, copy_embedded, title_embedded)
    ]
    output = keras.layers.Dense(1, name="out")(keras.layers.Concatenate()(pooled))
    return keras.Model([content, title], output)


@pytest.fixture(scope="module")
def per_token_bundle(tmp_path_factory):
    keras.utils.set_random_seed(0)
    directory = str(tmp_path_factory.mktemp("per_token_bundle"))
    tokenizer = Tokenizer([f"word{i}" for i in range(VOCABULARY - 2)])
    save_bundle(directory, _per_token_model(), tokenizer, {"content": "content", "title": "title"})
    return directory


@pytest.mark.parametrize(
    "layer, message",
    [
        ("token_dense", r"'token_dense' is a Dense\. Only an Embedding's output .* function of the token id"),
        ("masked", r"'masked' is a Masking\..*their positions or a mask"),
        ("copy_emb", r"looks up the output of layer 'content_copy' \(Identity\), not a token-id input"),
    ],
)
def test_ids_refused_for_a_layer_that_is_not_an_embedding_lookup(
    per_token_bundle, tiny_corpus, tmp_path, layer, message
):
    out = tmp_path / "out"
    flags = [f"--layer={layer}", "--layer=emb", "--pooling=none", "--token_storage=ids"]
    with pytest.raises(ExportConfigError, match=message) as caught:
        run_export(export_args(per_token_bundle, tiny_corpus, out, *flags))
    assert "--token_storage vectors" in str(caught.value) and "'emb'" in str(caught.value)
    assert is_empty_or_absent(out)


def test_ids_of_a_masking_embedding_are_accepted(per_token_bundle, tiny_corpus, tmp_path):
    """mask_zero only tells later layers to skip id 0, the padding, which is never exported."""
    exported = {}
    for storage in ("vectors", "ids"):
        out = tmp_path / storage
        flags = ["--layer=title_emb", "--pooling=none", f"--token_storage={storage}"]
        summary = run_export(export_args(per_token_bundle, tiny_corpus, out, *flags))
        assert (summary.exit_code, summary.rows_written) == (0, 4), summary
        exported[storage] = read_rows(out).sort_by("id")["title_emb"]
    table = read_table_vectors(str(tmp_path / "ids" / "_tables" / "title_emb.parquet"))
    assert vectors_from_ids(exported["ids"], table).equals(exported["vectors"].combine_chunks())


def test_ids_refused_for_an_embedding_subclass_with_its_own_call():
    class PositionalEmbedding(keras.layers.Embedding):
        def call(self, inputs):
            positions = keras.ops.arange(keras.ops.shape(inputs)[-1])
            return super().call(inputs) + super().call(positions)

    tokens = keras.Input(shape=(5,), dtype="int32", name="content")
    embedded = PositionalEmbedding(20, 3, name="positional")(tokens)
    model = keras.Model(tokens, keras.layers.GlobalAveragePooling1D()(embedded))
    with pytest.raises(ExportConfigError, match=r"PositionalEmbedding, a subclass of Embedding with its own"):
        check_ids_column(model, parse_layer_spec("positional"))


def test_cli_refuses_ids_with_pooling_and_exits_2(sample_bundle, tiny_corpus, tmp_path):
    out = tmp_path / "out"
    environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [REPOSITORY, os.environ.get("PYTHONPATH")]))
    result = forkserver.run(
        [sys.executable, "-m", "pipeline.run", *export_args(sample_bundle, tiny_corpus, out, "--layer=emb")]
        + ["--token_storage", "ids"],
        cwd=REPOSITORY,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [
        "error: --token_storage ids stores one token id per real token instead of its vector, so it "
        "needs --pooling none (received --pooling mean). Pass --pooling none, or drop --token_storage "
        "for pooled vectors."
    ]
    assert is_empty_or_absent(out)
