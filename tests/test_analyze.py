"""Tests of `pipeline.vocabulary` and `pipeline.analyze` on a real export of the sample corpus."""

import glob
import json
import os
import re
import shlex
import struct

import duckdb
import keras
import matplotlib.image
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from doc_pages import REPOSITORY, marked_blocks, read
from pipeline_fixtures import snapshot

from models.bundle import DEFAULT_BUNDLE, load_bundle, save_bundle
from models.tokenizer import Tokenizer
from pipeline import analyze, vocabulary
from pipeline.analysis import knn as knn_module
from pipeline.analysis.dataset import (
    BATCH_ROWS,
    AnalysisError,
    check_vector_column,
    open_documents,
    open_vocabulary,
    sample_rows,
    vectors_to_numpy,
)
from pipeline.analysis.knn import knn_score, score_label_agreement
from pipeline.analysis.neighbors import find_neighbors
from pipeline.analysis.plot import project_pca
from pipeline.errors import ExportConfigError
from pipeline.running.export import run_export
from pipeline.writing.schema import ERROR_SCHEMA, read_export_metadata

# The paths the documentation's examples use, replaced by the fixtures' directories.
README_EXPORT = "output/my_export"
README_VOCABULARY = "output/vocabulary"
VECTOR_COLUMNS = ("lstm_content", "lstm_title", "emb")
QUERY_IDS = ("json.dumps", "socket.create_server", "threading.Barrier")
QUERY_WORDS = ("thread", "socket", "the")
# Similarities closer than this count as ties, whose order may differ from the reference.
TIE = 1e-6


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    """A real export of the sample corpus with the bundled model's default layers and labels."""
    output = str(tmp_path_factory.mktemp("analysis") / "export")
    summary = run_export(["--output", output, "--keep_fields", "kind,topic"])
    assert summary.exit_code == 0, summary.message
    return output


@pytest.fixture(scope="module")
def documents(export_dir):
    """The export's rows read with pandas: the reference the engine's answers are checked against."""
    files = sorted(glob.glob(os.path.join(export_dir, "part-*.parquet")))
    return pd.concat([pd.read_parquet(path) for path in files], ignore_index=True)


@pytest.fixture(scope="module")
def bundle():
    return load_bundle(DEFAULT_BUNDLE)


@pytest.fixture(scope="module")
def vocabulary_dir(tmp_path_factory):
    output = str(tmp_path_factory.mktemp("analysis") / "vocabulary")
    vocabulary.export_vocabulary(DEFAULT_BUNDLE, None, "emb", output)
    return output


def brute_force_neighbors(keys, vectors, query_key, k):
    """Reference: (key, cosine similarity) of the k best rows, by numpy over all rows at once."""
    vectors = np.asarray(vectors, dtype=np.float64)
    query = vectors[list(keys).index(query_key)]
    similarities = vectors @ query / (np.linalg.norm(vectors, axis=1) * np.linalg.norm(query))
    ranked = sorted((-s, key) for key, s in zip(keys, similarities, strict=True) if key != query_key)
    return [(key, -negative) for negative, key in ranked[:k]], dict(zip(keys, similarities, strict=True))


def assert_same_neighbors(neighbors, expected, true_similarity):
    """Same length, same similarities rank by rank, and the same keys except among ties."""
    assert len(neighbors) == len(expected)
    assert len({n.key for n in neighbors}) == len(neighbors)
    for neighbor, (expected_key, expected_similarity) in zip(neighbors, expected, strict=True):
        assert neighbor.similarity == pytest.approx(expected_similarity, abs=TIE)
        assert neighbor.similarity == pytest.approx(true_similarity[neighbor.key], abs=TIE)
        if neighbor.key != expected_key:
            assert true_similarity[expected_key] == pytest.approx(true_similarity[neighbor.key], abs=TIE)


# --- python -m pipeline.vocabulary -------------------------------------------------------------


def test_vocabulary_export_equals_embedding_weights(vocabulary_dir, bundle):
    table = pq.read_table(os.path.join(vocabulary_dir, vocabulary.VOCABULARY_FILE))
    weights = bundle.model.get_layer("emb").get_weights()[0]

    assert table.num_rows == weights.shape[0]
    assert table.schema.field("token_id").type == pa.int32()
    assert table.schema.field("token").type == pa.string()
    assert table.schema.field("vector").type == pa.list_(pa.float32(), weights.shape[1])
    np.testing.assert_array_equal(table["token_id"].to_numpy(), np.arange(weights.shape[0]))
    np.testing.assert_array_equal(vectors_to_numpy(table["vector"]), weights)
    tokens = table["token"].to_pylist()
    assert tokens[:2] == ["<pad>", "<oov>"]
    assert tokens[2:] == bundle.tokenizer.vocabulary[: weights.shape[0] - 2]
    # Every token maps back to its row through the tokenizer itself.
    for token_id in (2, 3, 500, weights.shape[0] - 1):
        assert bundle.tokenizer.token_ids(tokens[token_id]) == [token_id]
    metadata = read_export_metadata(table.schema)
    assert metadata["layer"] == "emb"
    assert metadata["model_uri"] == DEFAULT_BUNDLE
    assert metadata["model_sha256"] == bundle.manifest["sha256"]["model.keras"]


def build_two_table_model():
    """An untrained functional model with two Embedding layers: 'emb' (50 x 8) and 'title_emb' (30 x 4)."""
    content = keras.Input(shape=(6,), dtype="int32", name="content")
    title = keras.Input(shape=(3,), dtype="int32", name="title")
    content_vector = keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(50, 8, name="emb")(content))
    title_vector = keras.layers.GlobalAveragePooling1D()(
        keras.layers.Embedding(30, 4, name="title_emb")(title)
    )
    output = keras.layers.Dense(1, name="out")(keras.layers.Concatenate()([content_vector, title_vector]))
    return keras.Model([content, title], output)


@pytest.mark.parametrize("words", [40, 60], ids=["table_larger_than_vocabulary", "table_smaller"])
def test_vocabulary_rows_follow_the_table_size(tmp_path, words):
    keras.utils.set_random_seed(0)
    model = build_two_table_model()
    bundle_dir = str(tmp_path / "bundle")
    tokenizer = Tokenizer([f"word{i}" for i in range(words)])
    save_bundle(bundle_dir, model, tokenizer, {"content": "content", "title": "title"})
    with pytest.raises(ExportConfigError, match=r"2 Embedding layers \('emb', 'title_emb'\); pass --layer"):
        vocabulary.export_vocabulary(bundle_dir, None, None, str(tmp_path / "out"))
    path, rows = vocabulary.export_vocabulary(bundle_dir, None, "emb", str(tmp_path / "out"))

    table = pq.read_table(path)
    weights = model.get_layer("emb").get_weights()[0]
    assert rows == table.num_rows == weights.shape[0] == 50
    np.testing.assert_array_equal(vectors_to_numpy(table["vector"]), weights)
    expected = ["<pad>", "<oov>"] + [f"word{i}" for i in range(min(words, 48))] + [None] * max(48 - words, 0)
    assert table["token"].to_pylist() == expected


@pytest.mark.parametrize("oov_token", [None, "<OOV>"], ids=["unknown_words_dropped", "oov_token"])
def test_vocabulary_metadata_names_an_oov_id_only_where_the_tokenizer_has_one(tmp_path, oov_token):
    """A Keras 2 Tokenizer without oov_token (the tutorial's) drops unknown words and gives id 1 to its
    most frequent word, yet the metadata said "oov_id": 1, the id a reader leaves out as unknown."""
    model_path = str(tmp_path / "model.keras")
    build_two_table_model().save(model_path)
    words = [*([oov_token] if oov_token else []), "the", "is", "to"]
    word_index = {word: index for index, word in enumerate(words, 1)}
    config = {"word_index": json.dumps(word_index), "num_words": None, "oov_token": oov_token}
    tokenizer_path = tmp_path / "tokenizer.json"
    tokenizer_path.write_text(json.dumps({"class_name": "Tokenizer", "config": config}), encoding="utf-8")
    path, _ = vocabulary.export_vocabulary(model_path, str(tokenizer_path), "emb", str(tmp_path / "out"))
    table = pq.read_table(path)
    assert table["token"].to_pylist()[:3] == ["<pad>", oov_token or "the", "is" if not oov_token else "the"]
    assert read_export_metadata(table.schema)["oov_id"] == (1 if oov_token else None)


def test_vocabulary_refuses_a_layer_that_is_not_an_embedding(bundle):
    with pytest.raises(ValueError, match=r"'lstm_title' is a LSTM, not an Embedding.*layers are: 'emb'"):
        vocabulary.embedding_table(bundle.model, "lstm_title")
    with pytest.raises(ValueError, match=r"no layer named 'embedding'.*'emb'"):
        vocabulary.embedding_table(bundle.model, "embedding")
    # An export's spelling of the title call: "no layer named 'emb:1'", though emb is the Embedding.
    with pytest.raises(
        ValueError, match=r"names call 1 of the layer 'emb'.*same for every call: pass --layer emb\.$"
    ):
        vocabulary.embedding_table(bundle.model, "emb:1")


def test_vocabulary_overwrite_never_removes_a_directory_or_writes_into_a_file(tmp_path, capsys):
    precious = tmp_path / "out" / vocabulary.VOCABULARY_FILE / "thesis.txt"
    precious.parent.mkdir(parents=True)
    precious.write_text("mine")
    argv = ["--layer", "emb", "--output", str(tmp_path / "out"), "--overwrite"]
    assert vocabulary.main(argv) == vocabulary.EXIT_CONFIG_ERROR
    assert "is a directory or a link" in capsys.readouterr().err and precious.read_text() == "mine"
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("{}\n")
    assert vocabulary.main(["--layer", "emb", "--output", str(corpus)]) == vocabulary.EXIT_CONFIG_ERROR
    assert "is a file" in capsys.readouterr().err and corpus.read_text() == "{}\n"


def test_vocabulary_command_keeps_an_existing_file(vocabulary_dir, capsys):
    before = os.path.getmtime(os.path.join(vocabulary_dir, vocabulary.VOCABULARY_FILE))
    assert vocabulary.main(["--layer", "emb", "--output", vocabulary_dir]) == vocabulary.EXIT_CONFIG_ERROR
    assert "--overwrite" in capsys.readouterr().err
    assert os.path.getmtime(os.path.join(vocabulary_dir, vocabulary.VOCABULARY_FILE)) == before


def test_vocabulary_command_names_the_embedding_layers(tmp_path):
    with pytest.raises(ExportConfigError, match="not an Embedding"):
        vocabulary.export_vocabulary(DEFAULT_BUNDLE, None, "lstm_title", str(tmp_path))
    assert not os.listdir(tmp_path)


# --- neighbors ---------------------------------------------------------------------------------


@pytest.mark.parametrize("column", VECTOR_COLUMNS)
@pytest.mark.parametrize("batch_rows", [BATCH_ROWS, 97], ids=["one_batch", "many_batches"])
def test_document_neighbors_equal_brute_force(export_dir, documents, column, batch_rows):
    data = open_documents(export_dir)
    vectors = np.stack(documents[column].to_numpy())
    for query_id in QUERY_IDS:
        neighbors, compared = find_neighbors(data, query_id, column, k=10, batch_rows=batch_rows)
        expected, true_similarity = brute_force_neighbors(documents["id"].tolist(), vectors, query_id, 10)
        assert compared == len(documents) - 1
        assert_same_neighbors(neighbors, expected, true_similarity)
        row = documents.set_index("id").loc[neighbors[0].key]
        assert neighbors[0].details == {"kind": row["kind"], "topic": row["topic"]}


def test_word_neighbors_equal_brute_force(vocabulary_dir, bundle):
    data = open_vocabulary(vocabulary_dir)
    weights = bundle.model.get_layer("emb").get_weights()[0]
    tokens = ["<pad>", "<oov>", *bundle.tokenizer.vocabulary]
    for word in QUERY_WORDS:
        neighbors, _ = find_neighbors(data, word, "vector", k=15, batch_rows=1000)
        expected, true_similarity = brute_force_neighbors(tokens, weights, word, 15)
        assert_same_neighbors(neighbors, expected, true_similarity)
        assert all(n.details["token_id"] == tokens.index(n.key) for n in neighbors)


def test_neighbors_command_prints_a_table(export_dir, documents, capsys):
    argv = [export_dir, "neighbors", "--id", "json.dumps", "--column", "lstm_title", "-k", "3"]
    assert analyze.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(
        "Nearest neighbours of document 'json.dumps' by cosine similarity of lstm_title"
    )
    assert lines[1].split() == ["rank", "similarity", "id", "kind", "topic"]
    assert len(lines) == 2 + 3
    expected, _ = brute_force_neighbors(
        documents["id"].tolist(), np.stack(documents["lstm_title"].to_numpy()), "json.dumps", 1
    )
    assert lines[2].split()[2] == expected[0][0]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["neighbors", "--id", "json.dumpz"], r"no row .* document id 'json.dumpz'"),
        (["neighbors", "--id", "JSON.DUMP"], r"Ids containing it: 'json.dump', 'json.dumps'"),
        (
            ["neighbors", "--id", "json.dumps", "--column", "lstm"],
            r"no column 'lstm'.*lstm_content, lstm_title, emb",
        ),
        (["neighbors", "--id", "json.dumps", "--column", "topic"], r"'topic' is string, not a vector"),
        (["neighbors", "--id", "json.dumps", "-k", "0"], r"-k must be at least 1"),
        (["neighbors", "--word", "thread"], r"holds no word vectors.*python -m pipeline.vocabulary --model"),
        (
            ["knn-score", "--column", "lstm_title", "--label", "colour"],
            r"no label column 'colour'.*kind, topic",
        ),
        (["knn-score", "--label", "topic", "--sample", "5", "-k", "10"], r"more than k=10 labelled rows"),
        (["plot", "--label", "topic", "--sample", "0"], r"--sample must be at least 1"),
    ],
)
def test_analyze_errors_say_how_to_fix(export_dir, capsys, argv, message):
    assert analyze.main([export_dir, *argv]) == analyze.EXIT_CONFIG_ERROR
    assert re.search(message, capsys.readouterr().err, flags=re.IGNORECASE)


def test_analyze_refuses_missing_and_wrong_directories(tmp_path, vocabulary_dir, capsys):
    assert analyze.main([str(tmp_path / "nothing"), "knn-score", "--label", "topic"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert analyze.main([vocabulary_dir, "neighbors", "--id", "x"]) == 2
    assert "neighbors --word WORD" in capsys.readouterr().err


def _write_shard(directory, table, name="part-00000-of-00001.parquet"):
    os.makedirs(directory, exist_ok=True)
    pq.write_table(table, os.path.join(directory, name))


@pytest.mark.parametrize(
    "vector_type",
    [pa.list_(pa.float16(), 6), pa.list_(pa.float32()), pa.list_(pa.float64(), 6)],
    ids=["float16", "variable_list", "float64"],
)
def test_neighbors_read_other_vector_types_and_skip_dead_letters(tmp_path, vector_type, caplog):
    rng = np.random.default_rng(7)
    vectors = rng.normal(size=(300, 6)).astype(vector_type.value_type.to_pandas_dtype())
    ids = [f"doc{i:03d}" for i in range(300)]
    # pyarrow cannot read back a null fixed-size list from Parquet, so only variable lists get one.
    with_null = not pa.types.is_fixed_size_list(vector_type)
    column = pa.array([None if with_null and i == 0 else v for i, v in enumerate(vectors)], type=vector_type)
    for shard in range(3):
        rows = slice(shard * 100, shard * 100 + 100)
        shard_column = column[rows]
        _write_shard(
            str(tmp_path),
            pa.table({"id": ids[rows], "v": shard_column}),
            f"part-0000{shard}-of-00003.parquet",
        )
    # Dead letters have another schema and must not be read as rows.
    _write_shard(str(tmp_path / "errors"), ERROR_SCHEMA.empty_table())

    data = open_documents(str(tmp_path))
    neighbors, compared = find_neighbors(data, "doc150", "v", k=5, batch_rows=64)
    assert compared == 300 - 1 - with_null  # all rows but the query and a null vector
    keys, kept = ids[with_null:], vectors[with_null:].astype(np.float64)
    expected, true_similarity = brute_force_neighbors(keys, kept, "doc150", 5)
    assert_same_neighbors(neighbors, expected, true_similarity)
    assert "did not finish" in caplog.text  # no _MANIFEST.json


def test_neighbors_refuse_a_column_with_one_vector_per_token(tmp_path):
    per_token = pa.array([[[1.0, 0.0], [0.0, 1.0]]], type=pa.list_(pa.list_(pa.float32(), 2)))
    _write_shard(str(tmp_path), pa.table({"id": ["a"], "emb": per_token, "pooled": pa.array([[1.0, 2.0]])}))
    data = open_documents(str(tmp_path))
    with pytest.raises(AnalysisError, match=r"one vector per token .*--pooling mean"):
        check_vector_column(data, "emb")


# --- sampling, PCA, plot ----------------------------------------------------------------------


def test_sample_rows_is_a_bounded_seeded_sample(export_dir, documents):
    data = open_documents(export_dir)
    table, total = sample_rows(data, ["id", "topic"], sample=100, seed=3, batch_rows=50)
    again, _ = sample_rows(data, ["id", "topic"], sample=100, seed=3, batch_rows=50)
    other, _ = sample_rows(data, ["id", "topic"], sample=100, seed=4, batch_rows=50)
    ids = table["id"].to_pylist()
    assert total == len(documents)
    assert len(ids) == len(set(ids)) == 100
    assert set(ids) <= set(documents["id"])
    assert ids == again["id"].to_pylist()
    assert ids != other["id"].to_pylist()
    everything, total = sample_rows(data, ["id"], sample=10**6)
    assert everything["id"].to_pylist() == documents["id"].tolist() and total == len(documents)


def test_pca_matches_an_svd_of_the_centred_data():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(400, 12)) * np.linspace(5, 0.5, 12)
    points, explained = project_pca(vectors)
    centred = vectors - vectors.mean(axis=0)
    _, singular, right = np.linalg.svd(centred, full_matrices=False)
    reference = centred @ right[:2].T
    np.testing.assert_allclose(np.abs(points), np.abs(reference), atol=1e-8)
    np.testing.assert_allclose(explained, singular[:2] ** 2 / (singular**2).sum())


def _png_size(path):
    with open(path, "rb") as handle:
        header = handle.read(24)
    assert header[:8] == b"\x89PNG\r\n\x1a\n" and header[12:16] == b"IHDR"
    return struct.unpack(">II", header[16:24])


def test_an_out_file_never_replaces_an_export_file_a_directory_or_without_overwrite(
    export_dir, tmp_path, capsys
):
    before = snapshot(export_dir)
    plot = [export_dir, "plot", "--column", "lstm_title", "--label", "topic"]
    for inside in ("part-00000-of-00001.parquet", "_MANIFEST.json", "errors/answers.parquet", "new.png"):
        assert analyze.main([*plot, "--out", os.path.join(export_dir, inside), "--overwrite"]) == 2
        assert "an export or vocabulary directory" in capsys.readouterr().err
    assert snapshot(export_dir) == before
    mine = tmp_path / "precious.png"
    mine.write_text("mine")
    assert analyze.main([*plot, "--out", str(mine)]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err and mine.read_text() == "mine"
    assert analyze.main([*plot, "--out", str(tmp_path)]) == 2
    assert "is a directory, not a regular file" in capsys.readouterr().err
    # Said as what they are: /dev/null was "a directory or a link", an empty path "names a directory".
    assert analyze.main([*plot, "--out", os.devnull]) == 2
    assert "'/dev/null' is a device, not a regular file" in capsys.readouterr().err
    assert analyze.main([*plot, "--out", ""]) == 2
    assert "--out '' is an empty path" in capsys.readouterr().err
    assert analyze.main([*plot, "--out", str(tmp_path / "plot.usearch")]) == 2
    assert "matplotlib cannot write 'usearch' images" in capsys.readouterr().err
    np.save(tmp_path / "words.npy", np.array(["a", "b"]))
    queries = [export_dir, "neighbors", "--queries", str(tmp_path / "words.npy"), "--column", "lstm_title"]
    assert analyze.main([*queries, "--out", str(tmp_path / "answers.parquet")]) == 2
    assert "values, not numbers" in capsys.readouterr().err
    assert analyze.main([*plot, "--out", str(mine), "--overwrite"]) == 0
    assert _png_size(str(mine)) == (1000, 700)


def test_a_file_that_is_not_parquet_and_an_export_without_rows_are_one_error_line(tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"id": "a", "content": "word", "title": "word"}\n')
    assert analyze.main([str(corpus), "neighbors", "--id", "a"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "is not Parquet this tool wrote" in err and "Traceback" not in err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert run_export(["--input", str(empty), "--output", str(tmp_path / "out")]).exit_code == 0
    assert analyze.main([str(tmp_path / "out"), "neighbors", "--id", "a"]) == 2
    assert "is an export with no rows" in capsys.readouterr().err


def _edited_copy(export_dir, directory, edit):
    """A copy of the export's rows whose `lstm_title` vectors (n, dim) and rows `edit` changes."""
    directory.mkdir()
    (path,) = glob.glob(os.path.join(export_dir, "part-*.parquet"))
    table = pq.read_table(path)
    vectors = np.stack(table["lstm_title"].to_numpy(zero_copy_only=False)).astype(np.float32)
    vectors, keep = edit(vectors)
    field = table.schema.field("lstm_title")
    column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel(), pa.float32()), vectors.shape[1])
    table = table.set_column(table.schema.get_field_index("lstm_title"), field, column.cast(field.type))
    pq.write_table(table.filter(pa.array(keep)), directory / os.path.basename(path))
    return str(directory)


def test_rows_with_nan_or_inf_are_left_out_of_a_sample(export_dir, tmp_path, capsys, caplog):
    def poisoned(vectors):
        vectors[0], vectors[1, 3] = np.nan, np.inf
        return vectors, np.ones(len(vectors), bool)

    def without(vectors):
        return vectors, np.arange(len(vectors)) >= 2

    bad = _edited_copy(export_dir, tmp_path / "bad", poisoned)
    clean = _edited_copy(export_dir, tmp_path / "clean", without)
    rows = pq.read_metadata(glob.glob(os.path.join(bad, "part-*.parquet"))[0]).num_rows
    score, _ = knn_score(open_documents(bad), "lstm_title", "topic", k=5, sample=10_000)
    expected, _ = knn_score(open_documents(clean), "lstm_title", "topic", k=5, sample=10_000)
    assert score.agreement == expected.agreement and np.isfinite(score.agreement)
    assert "2 rows of 'lstm_title' have a NaN or infinite value; they are left out" in caplog.text
    argv = [bad, "plot", "--column", "lstm_title", "--label", "topic", "--out", str(tmp_path / "p.png")]
    assert analyze.main([*argv, "--sample", "10000"]) == 0
    out = capsys.readouterr().out
    assert f"PCA of {rows - 2} of {rows - 2} rows" in out and "0.0% + 0.0%" not in out


def test_a_sample_is_drawn_from_the_rows_with_finite_vectors(tmp_path, capsys):
    """The sample was drawn first and its NaN rows dropped after: with half the rows unusable,
    --sample 100 drew "PCA of 54 of 400 rows" though 200 usable rows were there."""
    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(400, 4)).astype(np.float32)
    vectors[::2, 0] = np.nan
    directory = tmp_path / "half"
    directory.mkdir()
    columns = {
        "id": [f"d{i:03d}" for i in range(400)],
        "v": pa.array(list(vectors), pa.list_(pa.float32(), 4)),
    }
    _write_shard(directory, pa.table(columns))
    assert analyze.main([str(directory), "plot", "--sample", "100", "--out", str(tmp_path / "p.png")]) == 0
    assert "PCA of 100 of 200 rows" in capsys.readouterr().out


def test_plot_writes_a_png_coloured_by_label(export_dir, tmp_path):
    path = str(tmp_path / "plot.png")
    argv = [export_dir, "plot", "--column", "lstm_title", "--label", "topic", "--out", path]
    assert analyze.main(argv) == 0

    width, height = _png_size(path)
    assert (width, height) == (1000, 700)
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[:2] == (height, width)
    # Nine topic colours and text on white: far more than a blank or one-colour image.
    colours = np.unique((pixels[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) > 100
    assert os.path.getsize(path) > 20_000


# --- knn-score --------------------------------------------------------------------------------


def test_knn_agreement_equals_brute_force():
    rng = np.random.default_rng(1)
    labels = rng.choice(["a", "b", "c"], size=300, p=[0.5, 0.3, 0.2])
    centres = dict(zip("abc", rng.normal(size=(3, 8)), strict=True))
    vectors = rng.normal(size=(300, 8)) + np.stack([centres[label] for label in labels])
    score = score_label_agreement(vectors, labels, k=7, chunk_rows=64)

    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    similarities = unit @ unit.T
    np.fill_diagonal(similarities, -np.inf)
    nearest = np.argsort(-similarities, axis=1)[:, :7]
    agreement = (labels[nearest] == labels[:, None]).mean(axis=1)
    frequencies = np.unique(labels, return_counts=True)[1] / len(labels)
    assert score.agreement == pytest.approx(agreement.mean())
    assert score.chance == pytest.approx((frequencies**2).sum())
    assert score.per_class["a"] == (
        int((labels == "a").sum()),
        pytest.approx(agreement[labels == "a"].mean()),
    )


def test_knn_agreement_scores_in_float64_only_the_pairs_float32_cannot_order(monkeypatch):
    """Every pair was scored in float64 and rounded: three times a float32 product, a third more time for
    the default 20,000-row sample. float32 now picks the candidates, and the neighbours are the same."""
    rng = np.random.default_rng(4)
    vectors = rng.normal(size=(600, 16))
    vectors[:40] = vectors[0]  # duplicates: a tie float32 cannot break, scored whole
    vectors[40] = 0  # a zero vector: similarity 0 to all, scored whole
    labels = rng.choice(["a", "b"], size=600)
    keys = [f"k{i:03d}" for i in rng.permutation(600)]
    scored = []
    original = knn_module.rounded_scores
    monkeypatch.setattr(
        knn_module, "rounded_scores", lambda values: scored.append(values.size) or original(values)
    )
    score = score_label_agreement(vectors, labels, k=5, chunk_rows=128, keys=keys)
    assert sum(scored) < 600 * 600 / 4

    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-300)
    similarities = original(unit @ unit.T)
    np.fill_diagonal(similarities, -np.inf)
    nearest = [sorted(range(600), key=lambda j: (-similarities[i, j], keys[j]))[:5] for i in range(600)]
    agreement = (labels[np.asarray(nearest)] == labels[:, None]).mean(axis=1)
    assert score.agreement == pytest.approx(agreement.mean(), abs=1e-12)
    assert score.per_class["a"][1] == pytest.approx(agreement[labels == "a"].mean(), abs=1e-12)


def test_knn_score_of_lstm_title_on_topic_beats_chance(export_dir, capsys):
    data = open_documents(export_dir)
    score, total = knn_score(data, "lstm_title", "topic", k=10)
    print(f"lstm_title/topic: agreement {score.agreement:.4f}, chance {score.chance:.4f}")
    assert total == score.rows == 2048
    assert score.chance == pytest.approx(0.1184, abs=1e-4)  # the sample corpus's topic mix
    assert score.agreement > 3 * score.chance

    assert analyze.main([export_dir, "knn-score", "--column", "lstm_title", "--label", "topic"]) == 0
    out = capsys.readouterr().out
    assert f"agreement  {score.agreement:.4f}" in out and f"chance     {score.chance:.4f}" in out


def test_knn_score_on_a_sample(export_dir):
    data = open_documents(export_dir)
    score, total = knn_score(data, "lstm_content", "kind", k=5, sample=500, seed=0)
    assert (score.rows, total) == (500, 2048)
    assert score.agreement > score.chance


# --- README and docs/ ---------------------------------------------------------------------------


def test_readme_examples_run(export_dir, vocabulary_dir, tmp_path, monkeypatch, capsys):
    """Every block marked `<!-- runnable -->` in the README and docs/, in page order."""
    blocks = marked_blocks("runnable")
    languages = [language for _, language, _ in blocks]
    assert languages.count("sql") >= 2 and languages.count("python") >= 2 and "bash" in languages
    assert {page for page, _, _ in blocks} >= {"README.md", os.path.join("docs", "analysis.md")}
    monkeypatch.chdir(tmp_path)
    for page, language, code in blocks:
        code = code.replace(README_EXPORT, export_dir).replace(README_VOCABULARY, vocabulary_dir)
        if language == "sql":
            rows = duckdb.sql(code).fetchall()
            assert rows, code
        elif language == "python":
            exec(compile(code, page, "exec"), {"__name__": "readme_example"})
        elif language == "bash":
            for line in code.strip().splitlines():
                python, flag, module, *argv = shlex.split(line)
                assert (python, flag, module) == ("python", "-m", "pipeline.analyze"), line
                assert analyze.main(argv) == 0, line
        else:
            raise AssertionError(f"{page}: a block in {language!r} is marked runnable but cannot be run")
    out = capsys.readouterr().out
    assert "Nearest neighbours of word 'thread'" in out
    # The plot command's picture (its contents are checked by test_plot_writes_a_png_coloured_by_label).
    assert _png_size(tmp_path / "plot.png") == (1000, 700)


def test_the_documented_bigquery_schema_lists_every_column_of_the_export(export_dir):
    """The BigQuery table of docs/analysis.md left out input_sha256, which every export has: a table
    made by hand from it (bq mk --schema) refuses the load."""
    page = read(os.path.join(REPOSITORY, "docs", "analysis.md"))
    table = page[page.index("The resulting table schema") : page.index("BigQuery has no arrays")]
    documented = dict(re.findall(r"^\| `(\w+)` \| [^|]+ \| (\w+) \|$", table, flags=re.MULTILINE))
    schema = pq.read_schema(sorted(glob.glob(os.path.join(export_dir, "part-*.parquet")))[0])
    # A vector is REPEATED whatever its nullability; the other columns are REQUIRED when not nullable.
    expected = {
        field.name: "REPEATED"
        if pa.types.is_fixed_size_list(field.type)
        else ("NULLABLE" if field.nullable else "REQUIRED")
        for field in schema
    }
    assert documented == expected


def test_readme_neighbour_sql_agrees_with_analyze(export_dir):
    """The documented DuckDB cosine query and `analyze neighbors` rank the same documents."""
    sql = next(
        code for _, language, code in marked_blocks("runnable") if language == "sql" and "json.dumps" in code
    )
    rows = duckdb.sql(sql.replace(README_EXPORT, export_dir)).fetchall()
    neighbors, _ = find_neighbors(open_documents(export_dir), "json.dumps", "lstm_title", k=10)
    assert [row[-1] for row in rows] == pytest.approx([n.similarity for n in neighbors], abs=1e-5)
    assert [row[0] for row in rows[:3]] == [n.key for n in neighbors[:3]]


def test_readme_neighbour_sql_leaves_out_rows_without_a_similarity(tmp_path, monkeypatch):
    """An all-zero or NaN vector's list_cosine_similarity is NaN, which DuckDB sorts above every
    number: the documented query listed such rows first, as the nearest."""
    sql = next(
        code for _, language, code in marked_blocks("runnable") if language == "sql" and "json.dumps" in code
    )
    rng = np.random.default_rng(0)
    titles = rng.normal(size=(40, 4)).astype(np.float32)
    titles[5], titles[6] = 0, np.nan
    ids = ["json.dumps", *[f"d{i:02d}" for i in range(1, 40)]]
    export = tmp_path / README_EXPORT
    export.mkdir(parents=True)
    columns = {
        "id": ids,
        "topic": ["t"] * 40,
        "lstm_title": pa.array(list(titles), pa.list_(pa.float32(), 4)),
    }
    pq.write_table(pa.table(columns), export / "part-00000-of-00001.parquet")
    monkeypatch.chdir(tmp_path)
    rows = duckdb.sql(sql).fetchall()
    with np.errstate(invalid="ignore"):
        unit = titles.astype(np.float64) / np.linalg.norm(titles.astype(np.float64), axis=1, keepdims=True)
        similarities = unit[1:] @ unit[0]
    expected = [ids[1 + i] for i in np.argsort(-np.nan_to_num(similarities, nan=-2))[:10]]
    assert [row[0] for row in rows] == expected
