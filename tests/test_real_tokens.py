"""Embedding columns are computed from the table at the real tokens only, and stay exact.

On the fast path an Embedding's column is its table's rows at the real tokens'
ids (`RealTokens`): pooled (mean, max, last) and per-token (`--pooling
none`) rows are compared, for Keras 2 `.h5` models as the tutorial writes them
(float32 `Input(shape=(n,))`), masked and not, pre- and post-padded, and both
calls of a shared embedding, with the rows the padded computation gives (Keras's
own `predict` of the layer, pooled over the real positions as the export did
before) for equality, and with `predict` pooled in float64 to 1e-6.
"""

import collections
import dataclasses
import pickle
import tracemalloc
import types

import keras
import numpy as np
import pyarrow.parquet as pq
import pytest
from pipeline_fixtures import build_keras2_models, read_rows, row_files, write_jsonl

from models.tokenizer import pad_token_ids
from models.truncate import layer_calls
from pipeline.inference.embedder import Embedder
from pipeline.inference.features import DocumentTokenizer
from pipeline.planning.build import build_plan
from pipeline.planning.options import ExportOptions
from pipeline.reading.documents import Document, TokenIds
from pipeline.running.export import run_export
from pipeline.writing import real_tokens, schema

VOCABULARY = 60
LENGTH = 30
POOLINGS = ("mean", "max", "last", "none")

# Runs under tf_keras (Keras 2) in its own process, as a user of the tutorial saves a model.
KERAS2_MODELS = r"""
import json, os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
import numpy as np
import tf_keras
from tf_keras.layers import (Input, Embedding, LSTM, GRU, Bidirectional, Dense, Add, Concatenate,
    GlobalAveragePooling1D)
from tf_keras.models import Model

out, LENGTH, VOCABULARY = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
tf_keras.utils.set_random_seed(0)
rng = np.random.default_rng(0)
info = {}

def save(name, model, embedding):
    model.set_weights([rng.normal(0, 0.4, w.shape) for w in model.get_weights()])
    model.save(os.path.join(out, name + ".h5"))
    info[name] = {"embedding": embedding.name, "inputs": [t.name.split(":")[0] for t in model.inputs]}

for masked in (False, True):
    inputs = Input(shape=(LENGTH,))
    embedding = Embedding(VOCABULARY, 12, mask_zero=masked)
    save("tutorial_masked" if masked else "tutorial",
         Model(inputs, Dense(1, activation="sigmoid")(LSTM(8)(embedding(inputs)))), embedding)

# Per-token recurrent outputs: two that only the export reads, one that a stacked layer reads.
for masked in (False, True):
    inputs = Input(shape=(LENGTH,))
    embedding = Embedding(VOCABULARY, 12, mask_zero=masked)
    embedded = embedding(inputs)
    sequence = LSTM(6, return_sequences=True, name="lstm_seq")(embedded)
    both = Bidirectional(GRU(4, return_sequences=True), merge_mode="concat", name="bigru_seq")(embedded)
    lower = LSTM(5, return_sequences=True, name="lower_seq")(embedded)
    top = LSTM(3, name="top")(lower)
    merged = Concatenate()([GlobalAveragePooling1D()(sequence), GlobalAveragePooling1D()(both), top])
    save("sequences_masked" if masked else "sequences", Model(inputs, Dense(1)(merged)), embedding)

content, title = Input(shape=(LENGTH,)), Input(shape=(LENGTH // 3,))
shared = Embedding(VOCABULARY, 12)
added = Add()([LSTM(8)(shared(content)), LSTM(8)(shared(title))])
save("shared", Model([content, title], Dense(1, activation="sigmoid")(added)), shared)

with open(os.path.join(out, "info.json"), "w") as handle:
    json.dump(info, handle)
"""


@pytest.fixture(scope="module")
def keras2_models(tmp_path_factory):
    """Directory of tf_keras `.h5` models and {name: {embedding, inputs}}."""
    directory = tmp_path_factory.mktemp("keras2_real_tokens")
    return build_keras2_models(directory, KERAS2_MODELS, LENGTH, VOCABULARY)


def _documents(inputs, count=37, seed=1):
    """Id lists of every length, empty ones included, some longer than the input (truncated)."""
    rng = np.random.default_rng(seed)
    documents = []
    for index in range(count):
        texts = []
        for position, length in enumerate(inputs.values()):
            # The first document has no content tokens; every fifth no title tokens.
            empty = (index == 0 and position == 0) or (index % 5 == 4 and position == 1)
            size = 0 if empty else int(rng.integers(1, 2 * length))
            texts.append(TokenIds([int(i) for i in rng.integers(1, VOCABULARY, size)]))
        if not any(text.ids for text in texts):
            texts[-1] = TokenIds([3])
        documents.append(Document(f"d{index}", tuple(texts), (), "corpus.jsonl", index + 1))
    return documents


def _padded_rows(values, mask, pooling):
    """One column's rows from padded (n, length, dim) values as the export computed them before.

    Pooling sums each padded position weighted by the mask, in position order;
    per-token keeps the masked positions.
    """
    if pooling == "none":
        return [row[real] for row, real in zip(values, mask, strict=True)]
    empty = ~mask.any(axis=1)[:, None]
    if pooling == "mean":
        weights = mask[:, :, None].astype(values.dtype)
        return list((values * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1))
    if pooling == "max":
        pooled = np.where(mask[:, :, None], values, -np.inf).max(axis=1).astype(values.dtype)
    else:
        last = np.where(mask, np.arange(mask.shape[1])[None, :], -1).max(axis=1)
        pooled = values[np.arange(len(values)), np.maximum(last, 0)]
    return list(np.where(empty, 0, pooled).astype(values.dtype))


def _float64_rows(values, mask, pooling):
    """The same pooled in float64 from Keras's values: the reference to 1e-6."""
    rows = []
    for row, real in zip(values.astype(np.float64), mask, strict=True):
        tokens = row[real]
        if pooling == "none":
            rows.append(tokens)
        elif not len(tokens):
            rows.append(np.zeros(row.shape[1]))
        else:
            rows.append({"mean": tokens.mean(axis=0), "max": tokens.max(axis=0), "last": tokens[-1]}[pooling])
    return rows


def _plan(model_path, corpus, output, padding, layers):
    return build_plan(
        ExportOptions(
            [
                "--model",
                str(model_path),
                "--input",
                str(corpus),
                "--output",
                str(output),
                "--tokenizer",
                "none",
                "--padding",
                padding,
                "--truncating",
                padding,
                *[f"--layer={layer}" for layer in layers],
            ]
        )
    )


@pytest.mark.parametrize("padding", ["pre", "post"])
@pytest.mark.parametrize("name", ["tutorial", "tutorial_masked", "shared"])
def test_embedding_columns_from_real_tokens_equal_the_padded_computation(
    keras2_models, tmp_path, name, padding
):
    directory, info = keras2_models
    embedding, input_names = info[name]["embedding"], info[name]["inputs"]
    layers = [f"{embedding}:0"] + ([f"{embedding}:1"] if name == "shared" else [])
    corpus = write_jsonl(tmp_path / "ids.jsonl", [{"id": "x", **{i: [1] for i in input_names}}])
    plan, model_source = _plan(directory / f"{name}.h5", corpus, tmp_path / "out", padding, layers)
    assert [str(model_source.model.inputs[0].dtype)] == ["float32"]  # the tutorial's Input(shape=(n,))
    embedder = Embedder(plan, model_source)
    assert embedder.uses_fast_path
    lengths = {info.name: info.length for info in plan.inputs}
    tokenizer = DocumentTokenizer(plan, None)
    embedded = embedder.run([tokenizer.tokenize(document) for document in _documents(lengths)])
    assert not embedded.failed and len(embedded.documents) == 37
    for column in plan.columns:
        # The columns never went through a padded (n, length, dim) lookup.
        assert isinstance(embedded.outputs[column.column], real_tokens.RealTokens)

    # Keras's own forward pass of each call of the layer, on the same ids as float32 (the model's input).
    features = {
        i: pad_token_ids(
            [list(d.texts[index].ids) for d in embedded.documents], lengths[i], padding, padding
        )[0]
        for index, i in enumerate(input_names)
    }
    calls = layer_calls(model_source.model)[embedding]
    expected = keras.Model(model_source.model.inputs, [calls[call] for call in range(len(layers))]).predict(
        {i: value.astype(np.float32) for i, value in features.items()}, verbose=0
    )
    expected = expected if isinstance(expected, list) else [expected]
    for pooling in POOLINGS:
        for dtype in ("float32", "float16"):
            columns = tuple(dataclasses.replace(c, pooling=pooling) for c in plan.columns)
            variant = dataclasses.replace(plan, columns=columns, dtype=dtype)
            batch = schema.to_record_batch(
                schema.output_schema(variant),
                columns,
                dtype,
                document_ids=[d.id for d in embedded.documents],
                kept={},
                outputs=embedded.outputs,
                masks=embedded.masks,
            )
            for column, values in zip(columns, expected, strict=True):
                mask = features[column.source_input] != 0
                actual = batch.column(column.column).to_pylist()
                padded = _padded_rows(values, mask, pooling)
                reference = _float64_rows(values, mask, pooling)
                for row, (got, old, exact) in enumerate(zip(actual, padded, reference, strict=True)):
                    got = np.asarray(got, dtype=dtype).reshape(np.shape(old))
                    message = f"{name} {padding} {column.column} {pooling} {dtype} row {row}"
                    np.testing.assert_array_equal(got, np.asarray(old).astype(dtype), err_msg=message)
                    if dtype == "float32":
                        np.testing.assert_allclose(got, exact, atol=1e-6, rtol=0, err_msg=message)
                if pooling == "none":
                    counts = batch.column(column.column + schema.TOKENS_SUFFIX).to_pylist()
                    assert counts == list(mask.sum(axis=1))


@pytest.mark.parametrize("padding", ["pre", "post"])
@pytest.mark.parametrize("name", ["sequences", "sequences_masked"])
def test_per_token_recurrent_columns_at_real_tokens_equal_the_padded_outputs(
    keras2_models, tmp_path, name, padding
):
    directory, _ = keras2_models
    layers = ["lstm_seq", "bigru_seq", "lower_seq", "top"]
    corpus = write_jsonl(tmp_path / "ids.jsonl", [{"id": "x", "input_1": [1]}])
    plan, model_source = _plan(directory / f"{name}.h5", corpus, tmp_path / "out", padding, layers)
    embedder = Embedder(plan, model_source)
    assert embedder.uses_fast_path
    lengths = {info.name: info.length for info in plan.inputs}
    embedded = embedder.run([DocumentTokenizer(plan, None).tokenize(d) for d in _documents(lengths)])
    (input_name,) = lengths
    features = np.stack([tokenized for tokenized in embedded.features[input_name]])
    mask = features != 0
    # The fast path's own padded outputs (what the export pooled before) and Keras's.
    padded = embedder.predictor.fast_path({input_name: features})
    expected = keras.Model(
        model_source.model.inputs, [model_source.model.get_layer(layer).output for layer in layers]
    ).predict(features.astype(np.float32), verbose=0)
    for pooling in POOLINGS:
        columns = tuple(dataclasses.replace(c, pooling=pooling) for c in plan.columns)
        batch = schema.to_record_batch(
            schema.output_schema(dataclasses.replace(plan, columns=columns)),
            columns,
            "float32",
            document_ids=[d.id for d in embedded.documents],
            kept={},
            outputs=embedded.outputs,
            masks=embedded.masks,
        )
        for column, keras_values in zip(columns, expected, strict=True):
            actual = batch.column(column.column).to_pylist()
            if column.kind == "vector":
                np.testing.assert_array_equal(np.array(actual, np.float32), padded[column.column])
                continue
            # `lower_seq` feeds the stacked `top`, so it stays whole; the other two are real tokens only.
            stays_whole = column.column == "lower_seq"
            assert isinstance(embedded.outputs[column.column], real_tokens.RealTokens) != stays_whole
            before = _padded_rows(padded[column.column], mask, pooling)
            reference = _float64_rows(keras_values, mask, pooling)
            for row, (got, old, exact) in enumerate(zip(actual, before, reference, strict=True)):
                got = np.asarray(got, dtype=np.float32).reshape(np.shape(old))
                message = f"{name} {padding} {column.column} {pooling} row {row}"
                np.testing.assert_array_equal(got, old, err_msg=message)
                np.testing.assert_allclose(got, exact, atol=1e-5, rtol=0, err_msg=message)


def test_pooled_embedding_of_real_length_documents_never_holds_the_padded_lookup(tmp_path):
    """Memory of one batch of the default model's mean-pooled `emb`: the real tokens', not the padding's.

    The bundled model's content input is 300 ids and its table 300 wide, so a
    padded lookup of 64 documents is 64 x 300 x 300 float32, 23 MB, whatever
    their length; 64 documents of at most 40 tokens hold at most 3 MB of vectors.
    """
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": "x", "content": "a", "title": "b"}])
    plan, model_source = build_plan(
        ExportOptions(
            ["--input", str(corpus), "--output", str(tmp_path / "o"), "--layer=emb", "--pooling=mean"]
        )
    )
    embedder = Embedder(plan, model_source)
    rng = np.random.default_rng(0)
    documents = [
        Document(f"d{i}", (TokenIds([int(t) for t in rng.integers(1, 4000, 40)]),), (), "c.jsonl", i)
        for i in range(64)
    ]
    tokenizer = DocumentTokenizer(plan, None)
    batch = [tokenizer.tokenize(document) for document in documents]
    embedder.batch_rows(embedder.run(batch))  # traced once before measuring
    tracemalloc.start()
    try:
        rows = embedder.batch_rows(embedder.run(batch)).rows
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    padded = 64 * 300 * 300 * 4
    assert rows.num_rows == 64
    assert peak < padded / 4, f"peak {peak:,} bytes for a padded lookup of {padded:,}"


def test_real_tokens_pool_exactly_as_the_padded_sum_on_a_large_table():
    """Bit for bit on realistic sizes (the padded sum's order is what the real tokens' sum keeps)."""
    rng = np.random.default_rng(0)
    table = rng.standard_normal((4000, 300)).astype(np.float32)
    ids = np.zeros((200, 300), np.int32)
    for row in range(200):
        count = int(rng.integers(0, 300)) if row % 9 else 0
        tokens = rng.integers(1, 4000, count)
        if row % 2:
            ids[row, 300 - count :] = tokens
        else:
            ids[row, :count] = tokens
    mask = ids != 0
    for pooling in ("mean", "max", "last"):
        pooled = real_tokens.pool_real_tokens(real_tokens.RealTokens.lookup(table, ids), pooling)
        np.testing.assert_array_equal(pooled, np.stack(_padded_rows(table[ids], mask, pooling)))


def test_real_tokens_refuse_ids_outside_the_table():
    table = np.zeros((5, 2), np.float32)
    with pytest.raises(IndexError, match=r"token ids must be in \[0, 5\); received 1..5"):
        real_tokens.RealTokens.lookup(table, np.array([[0, 1, 5]]))
    with pytest.raises(IndexError, match=r"received -1..2"):
        real_tokens.RealTokens.lookup(table, np.array([[-1, 2]]))


def test_concatenated_real_tokens_keep_each_documents_tokens():
    first = real_tokens.RealTokens.of_padded(
        np.arange(12.0).reshape(2, 3, 2), np.array([[1, 0, 1], [0, 0, 0]], bool)
    )
    second = real_tokens.RealTokens.of_padded(
        np.arange(6.0).reshape(1, 3, 2) + 100, np.array([[0, 1, 1]], bool)
    )
    joined = real_tokens.concatenate_real_tokens([first, second])
    assert list(joined.counts) == [2, 0, 2]
    np.testing.assert_array_equal(joined.vectors(), [[0, 1], [4, 5], [102, 103], [104, 105]])
    table = np.arange(10.0).reshape(5, 2)
    lookups = [
        real_tokens.RealTokens.lookup(table, np.array([[0, 3]])),
        real_tokens.RealTokens.lookup(table, np.array([[4, 1]])),
    ]
    joined = real_tokens.concatenate_real_tokens(lookups)
    assert joined.rows is table
    np.testing.assert_array_equal(joined.vectors(), table[[3, 4, 1]])


def test_row_files_store_vectors_without_dictionaries_or_statistics(tmp_path):
    """Float vectors are written plain (dictionaries, min/max of floats only cost time); the rest keep both.

    The rows read back are the ones made in memory, bit for bit.
    """
    corpus = write_jsonl(
        tmp_path / "c.jsonl",
        [
            {"id": f"d{i}", "content": "alpha beta gamma " * (i + 1), "title": "t", "kind": "k"}
            for i in range(5)
        ],
    )
    output = tmp_path / "o"
    run_export(
        ["--input", str(corpus), "--output", str(output), "--pooling", "none", "--keep_fields", "kind"]
    )
    metadata = pq.ParquetFile(row_files(output)[0]).metadata
    chunks = {
        chunk.path_in_schema: chunk
        for chunk in (metadata.row_group(0).column(i) for i in range(metadata.num_columns))
    }
    vectors = {"lstm_content.list.item", "lstm_title.list.item", "emb.list.item.list.item"}
    assert vectors < set(chunks), sorted(chunks)
    for path, chunk in chunks.items():
        dictionary = any("DICTIONARY" in encoding for encoding in chunk.encodings)
        assert dictionary == chunk.is_stats_set == (path not in vectors), (path, chunk.encodings)
    table = read_rows(output)
    plan, model_source = build_plan(
        ExportOptions(["--input", str(corpus), "--output", str(tmp_path / "x"), "--pooling", "none"])
    )
    embedder = Embedder(plan, model_source)
    tokenizer = DocumentTokenizer(plan, model_source.tokenizer)
    records = [row for row in table.select(["id"]).to_pylist()]
    documents = [
        Document(r["id"], ("alpha beta gamma " * (int(r["id"][1:]) + 1), "t"), (), str(corpus), n + 1)
        for n, r in enumerate(records)
    ]
    made = embedder.batch_rows(embedder.run([tokenizer.tokenize(d) for d in documents])).rows
    for name in ("lstm_content", "lstm_title", "emb", "emb_tokens"):
        assert table.column(name).combine_chunks().equals(made.column(name)), name


def test_an_export_never_pickles_documents_or_rows_to_measure_them(tmp_path, monkeypatch):
    """Beam samples element sizes inside the fused stage; ours are measured by their arrays, not pickled.

    The rows of 512 real-length documents with a per-token `emb` are about 35 MB:
    Beam's default coder pickled them (twice per batch) and every tokenized
    document only to count bytes.
    """
    from apache_beam.coders import coders

    pickled = collections.Counter()

    def counting_dumps(value, *args, **kwargs):
        pickled[type(value).__name__] += 1
        return pickle.dumps(value, *args, **kwargs)

    monkeypatch.setattr(coders, "pickle", types.SimpleNamespace(**{**vars(pickle), "dumps": counting_dumps}))
    corpus = write_jsonl(
        tmp_path / "c.jsonl",
        [{"id": f"d{i}", "content": "alpha beta gamma " * (i + 1), "title": "t"} for i in range(40)],
    )
    summary = run_export(
        ["--input", str(corpus), "--output", str(tmp_path / "o"), "--pooling", "none", "--batch_size", "8"]
    )
    assert summary.rows_written == 40
    measured = {name: pickled[name] for name in ("RecordBatch", "BatchRows", "Tokenized")}
    assert measured == {"RecordBatch": 0, "BatchRows": 0, "Tokenized": 0}, pickled


def test_the_element_coders_encode_and_decode_like_any_beam_coder():
    """`beam.Create(...)` and other direct users call `coder.encode`, not only the runner's impl."""
    import apache_beam as beam
    import pyarrow as pa

    from pipeline.inference.coders import RecordBatchCoder

    batch = pa.RecordBatch.from_pydict({"id": ["a", "b"], "v": pa.array([[1.0, 2.0], [3.0, 4.0]])})
    coder = beam.coders.registry.get_coder(pa.RecordBatch)
    assert isinstance(coder, RecordBatchCoder)
    assert coder.decode(coder.encode(batch)).equals(batch)
    assert coder.estimate_size(batch) == batch.nbytes
