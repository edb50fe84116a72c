"""Models whose outputs a plain export would get silently wrong: float16 values, beyond its range or summed.

Each case is a small Keras model saved as a user would, exported through the
real pipeline and compared with what Keras itself gives.
"""

import shutil

import keras
import numpy as np
import pytest
from pipeline_fixtures import (
    build_keras2_models,
    export_args,
    manifest_of,
    read_errors,
    read_rows,
    rows_by_id,
    write_jsonl,
)

from models.fast_path import FastPath
from pipeline.errors import ExportConfigError
from pipeline.inference import embedder
from pipeline.running.export import run_export

# Token 1's embedding is beyond float16's range (65,504) on its own, and still is averaged over 3 tokens.
BIG = 3e5


@pytest.fixture(scope="module")
def big_values_model(tmp_path_factory):
    directory = tmp_path_factory.mktemp("big")
    inputs = keras.Input(shape=(4,), dtype="int32", name="content")
    embedded = keras.layers.Embedding(10, 3, name="emb")(inputs)
    outputs = keras.layers.Dense(1, name="out")(keras.layers.GlobalAveragePooling1D(name="pool")(embedded))
    model = keras.Model(inputs, outputs)
    table = np.tile(np.array([[0.5, -0.25, 2.0]], np.float32), (10, 1)) * np.arange(10)[:, None]
    table[1] = [BIG, 1.0, -BIG]
    model.get_layer("emb").set_weights([table])
    path = directory / "big.keras"
    model.save(path)
    return path, table


@pytest.mark.parametrize("pooling", ["mean", "none"])
def test_values_beyond_float16_are_dead_letters_not_infinities(big_values_model, tmp_path, pooling):
    path, table = big_values_model
    documents = [{"id": f"d{index}", "content": [2 + index, 3]} for index in range(6)]
    documents += [{"id": "big_mean", "content": [1, 2, 3]}, {"id": "big_one", "content": [4, 1]}]
    corpus = write_jsonl(tmp_path / "ids.jsonl", documents)
    output = tmp_path / "out"
    flags = ["--tokenizer", "none", "--layer", "emb", "--pooling", pooling, "--dtype", "float16"]
    summary = run_export(export_args(path, corpus, output, *flags))
    assert summary.exit_code == 0, summary.message
    errors = read_errors(output).to_pylist()
    assert sorted(e["id"] for e in errors) == ["big_mean", "big_one"]
    assert {e["reason"] for e in errors} == {"float16_overflow"}
    assert "--dtype float32" in errors[0]["message"]
    # Each document's own value: the mean of its tokens, or its token's.
    messages = {e["id"]: e["message"] for e in errors}
    expected = {"big_mean": "100000.8", "big_one": "150001"} if pooling == "mean" else {"big_mean": "300000"}
    for document_id, value in expected.items():
        assert f"emb holds {value}, beyond" in messages[document_id], messages[document_id]
    rows = rows_by_id(read_rows(output))
    assert sorted(rows) == [f"d{index}" for index in range(6)]
    for index in range(6):
        tokens = table[[2 + index, 3]]
        expected = tokens.mean(axis=0) if pooling == "mean" else tokens
        actual = np.asarray(rows[f"d{index}"]["emb"], np.float32).reshape(expected.shape)
        assert np.isfinite(actual).all()
        np.testing.assert_allclose(actual, expected.astype(np.float16), rtol=0, atol=0)
    counts = manifest_of(output)["counts"]
    assert counts["records_read"] == counts["rows_written"] + counts["dead_letters"] == 8


def test_a_mixed_precision_models_tokens_are_pooled_in_float32(tmp_path):
    """float16 per-token values (`mixed_float16`) summed in float16 overflow: 150 tokens of 1,000."""
    inputs = keras.Input(shape=(300,), dtype="int32", name="content")
    embedded = keras.layers.Embedding(50, 4, name="emb", dtype="mixed_float16")(inputs)
    pooled = keras.layers.GlobalAveragePooling1D(name="pool")(embedded)
    model = keras.Model(inputs, keras.layers.Dense(1, name="out", dtype="float32")(pooled))
    table = np.random.default_rng(0).normal(0, 1, (50, 4)).astype(np.float32)
    table[7] = 1000.0
    model.get_layer("emb").set_weights([table])
    path = tmp_path / "mixed.keras"
    model.save(path)
    documents = [{"id": "big", "content": [7] * 150}, {"id": "small", "content": list(range(1, 50))}]
    corpus = write_jsonl(tmp_path / "ids.jsonl", documents)
    output = tmp_path / "out"
    summary = run_export(export_args(path, corpus, output, "--tokenizer", "none", "--layer", "emb"))
    assert summary.exit_code == 0, summary.message
    rows = rows_by_id(read_rows(output))
    sub_model = keras.Model(inputs, model.get_layer("emb").output)
    for document in documents:
        ids = np.zeros((1, 300), np.int32)
        ids[0, 300 - len(document["content"]) :] = document["content"]
        values = sub_model.predict(ids, verbose=0)[0, 300 - len(document["content"]) :]
        expected = values.astype(np.float32).mean(axis=0)
        actual = np.asarray(rows[document["id"]]["emb"], np.float32)
        np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-5)


def _recurrent_model(path, **settings):
    inputs = keras.Input(
        shape=(10,), batch_size=4 if settings.get("stateful") else None, dtype="int32", name="content"
    )
    embedded = keras.layers.Embedding(50, 4, name="emb")(inputs)
    sequence = keras.layers.LSTM(3, return_sequences=True, name="rnn", **settings)(embedded)
    last = keras.layers.LSTM(3, name="last")(sequence)
    keras.Model(inputs, keras.layers.Dense(1, name="out")(last)).save(path)
    return path


@pytest.mark.parametrize(
    "settings, layer, pattern",
    [
        ({"stateful": True}, "last", "'rnn' .* is stateful"),
        ({"stateful": True}, "rnn", "'rnn' .* is stateful"),
        ({"go_backwards": True}, "rnn", "'rnn' reads its sequence backwards"),
    ],
    ids=["stateful_below", "stateful", "go_backwards_per_token"],
)
def test_columns_that_depend_on_batching_or_come_last_token_first_are_refused(
    settings, layer, pattern, tmp_path
):
    """A stateful layer's vectors depend on the batch before; a backwards sequence's tokens are reversed."""
    path = _recurrent_model(tmp_path / "model.keras", **settings)
    corpus = write_jsonl(tmp_path / "ids.jsonl", [{"id": "d0", "content": [5, 6, 7]}])
    output = tmp_path / "out"
    flags = ["--tokenizer", "none", "--layer", layer]
    with pytest.raises(ExportConfigError, match=pattern):
        run_export(export_args(path, corpus, output, *flags))
    assert not output.exists()


def test_a_stateful_layer_inside_a_nested_encoder_is_refused(tmp_path):
    inputs = keras.Input(shape=(10,), batch_size=4, dtype="int32", name="content")
    encoder = keras.Sequential(
        [keras.layers.Embedding(50, 4), keras.layers.LSTM(3, stateful=True, name="inner_lstm")],
        name="encoder",
    )
    vector = encoder(inputs)
    path = tmp_path / "nested.keras"
    keras.Model(inputs, keras.layers.Dense(1, name="out")(vector)).save(path)
    corpus = write_jsonl(tmp_path / "ids.jsonl", [{"id": "d0", "content": [5, 6, 7]}])
    with pytest.raises(ExportConfigError, match="'inner_lstm' .* is stateful"):
        run_export(export_args(path, corpus, tmp_path / "out", "--tokenizer", "none", "--layer", "encoder"))


def test_a_backwards_layers_final_vector_is_exported(tmp_path):
    """go_backwards without a per-token column is fine: its last layer's vector is Keras's."""
    path = _recurrent_model(tmp_path / "model.keras", go_backwards=True)
    corpus = write_jsonl(tmp_path / "ids.jsonl", [{"id": "d0", "content": [5, 6, 7]}])
    output = tmp_path / "out"
    summary = run_export(export_args(path, corpus, output, "--tokenizer", "none", "--layer", "last"))
    assert summary.exit_code == 0, summary.message
    model = keras.models.load_model(path)
    ids = np.array([[0] * 7 + [5, 6, 7]], np.int32)
    expected = keras.Model(model.inputs, model.get_layer("last").output).predict(ids, verbose=0)[0]
    actual = np.asarray(read_rows(output).column("last")[0].as_py(), np.float32)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-5)


# A Keras 2 TimeDistributed over a masked LSTM: Keras 3 rebuilds it with a mask the hybrid pass cannot feed.
TIME_DISTRIBUTED_KERAS2 = r"""
import json, os, sys
import numpy as np
import tf_keras
out = sys.argv[1]
inputs = tf_keras.Input(shape=(12,))
embedded = tf_keras.layers.Embedding(50, 6, mask_zero=True, name="emb")(inputs)
sequence = tf_keras.layers.LSTM(5, return_sequences=True, name="lstm")(embedded)
timed = tf_keras.layers.TimeDistributed(tf_keras.layers.Dense(4), name="td")(sequence)
model = tf_keras.Model(inputs, tf_keras.layers.GlobalAveragePooling1D()(timed))
model.save(os.path.join(out, "timed.h5"))
ids = np.array([[0] * (11 - n) + list(range(1, 2 + n)) for n in range(6)], np.float32)
values = tf_keras.Model(inputs, timed).predict(ids, verbose=0)
# Keras 2 masks the padding: the real tokens' mean is the column's value.
np.save(os.path.join(out, "expected.npy"), np.stack([v[11 - n :].mean(axis=0) for n, v in enumerate(values)]))
# The usual Keras 2 Lambda: it names the script's global `tf`, which Keras 3 cannot give it.
import tensorflow as tf
mean = tf_keras.layers.Lambda(lambda t: tf.reduce_mean(t, axis=1), output_shape=(5,), name="avg")
averaged = mean(tf_keras.layers.LSTM(5, return_sequences=True)(tf_keras.layers.Embedding(50, 6)(inputs)))
tf_keras.Model(inputs, tf_keras.layers.Dense(1)(averaged)).save(os.path.join(out, "lambda_tf.h5"))
# A Dense whose activation is a function of the saving script.
def doubled(x):
    return x * 2
head = tf_keras.layers.Dense(2, activation=doubled, name="head")(tf_keras.layers.LSTM(3)(embedded))
tf_keras.Model(inputs, head).save(os.path.join(out, "own_activation.h5"))
json.dump({}, open(os.path.join(out, "info.json"), "w"))
"""


@pytest.fixture(scope="module")
def keras2_failing(tmp_path_factory):
    return build_keras2_models(tmp_path_factory.mktemp("failing"), TIME_DISTRIBUTED_KERAS2)[0]


def _export_timed(directory, tmp_path):
    """Exports `td` of the TimeDistributed model; returns its manifest column after checking the rows."""
    documents = [{"id": f"d{index}", "content": list(range(1, 2 + index))} for index in range(6)]
    corpus = write_jsonl(tmp_path / "ids.jsonl", documents)
    output = tmp_path / "out"
    flags = ["--tokenizer", "none", "--layer", "td", "--input_map", "input_1=content"]
    summary = run_export(export_args(directory / "timed.h5", corpus, output, *flags))
    assert summary.exit_code == 0, summary.message
    rows = rows_by_id(read_rows(output))
    expected = np.load(directory / "expected.npy")
    for index, document in enumerate(documents):
        np.testing.assert_allclose(rows[document["id"]]["td"], expected[index], rtol=0, atol=1e-5)
    (column,) = manifest_of(output)["columns"]
    return column


def test_a_fast_path_that_fails_on_the_sample_batch_is_declined(keras2_failing, tmp_path, monkeypatch):
    """The check's candidate raised (a TensorFlow traceback, exit 1); Keras's own pass exports it."""

    def failing(*args, **kwargs):
        raise ValueError("a layer the hybrid pass cannot feed")

    monkeypatch.setattr(FastPath, "_call", failing)
    # This process keeps the launch's choice for later launches of the same plan: not this one's.
    monkeypatch.setattr(embedder, "_LAUNCHED", [])
    column = _export_timed(keras2_failing, tmp_path)
    assert column["forward_pass"] == "keras"
    assert "fails on a sample batch (ValueError: a layer the hybrid pass" in column["forward_pass_reason"]


def test_a_time_distributed_layer_after_a_fast_lstm_runs_on_the_hybrid_pass(keras2_failing, tmp_path):
    """It got no static time length there and looped over the batch: the check failed (keras)."""
    column = _export_timed(keras2_failing, tmp_path)
    assert column["forward_pass"] == "hybrid", column["forward_pass_reason"]


def test_a_model_that_fails_on_the_sample_batch_is_one_error_naming_the_cause(keras2_failing, tmp_path):
    corpus = write_jsonl(tmp_path / "ids.jsonl", [{"id": "d0", "content": [1, 2]}])
    flags = ["--tokenizer", "none", "--layer", "avg", "--input_map", "input_1=content"]
    flags.append("--allow_unsafe_deserialization")
    with pytest.raises(ExportConfigError, match="fails on a sample batch .*name 'tf' is not defined"):
        run_export(export_args(keras2_failing / "lambda_tf.h5", corpus, tmp_path / "out", *flags))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fast_path", ["auto", "off"])
def test_a_layer_name_tensorflow_cannot_run_is_refused_at_launch(fast_path, tmp_path):
    """Keras allows `:` in a name, TensorFlow's predict refuses it: with the fast path off
    every record was a dead letter (exit 4, the output made); now one line at launch."""
    inputs = keras.Input((10,), dtype="int32", name="content")
    embedded = keras.layers.Embedding(30, 4, name="emb")(inputs)
    vector = keras.layers.LSTM(3, name="a:b")(embedded)
    path = tmp_path / "model.keras"
    keras.Model(inputs, keras.layers.Dense(1)(vector)).save(path)
    corpus = write_jsonl(tmp_path / "ids.jsonl", [{"id": "d0", "content": [1, 2]}])
    flags = ["--tokenizer", "none", "--layer", "a:b", "--fast_path", fast_path]
    with pytest.raises(ExportConfigError, match="not a valid scope name.*rename the layer"):
        run_export(export_args(path, corpus, tmp_path / "out", *flags))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["file", "bundle"])
def test_a_model_rewritten_while_it_loads_is_refused(kind, big_values_model, tmp_path, monkeypatch):
    """A checkpoint callback saving over the file: the manifest named the new file, the rows the old."""
    from models import bundle as bundle_lib
    from models.bundle import DEFAULT_BUNDLE
    from pipeline.planning import model_source

    if kind == "file":
        model = tmp_path / "model.keras"
        model.write_bytes(big_values_model[0].read_bytes())
        loader, module = "load_model_file", model_source
        flags = ["--tokenizer", "none", "--layer", "emb"]
    else:
        model = tmp_path / "bundle"
        shutil.copytree(DEFAULT_BUNDLE, model)
        loader, module = "load_model", bundle_lib.keras.saving
        flags = ["--layer", "lstm_content"]
    load = getattr(module, loader)

    def load_then_rewrite(path, *args, **kwargs):
        loaded = load(path, *args, **kwargs)
        with open(path, "ab") as handle:
            handle.write(b"\0")
        return loaded

    monkeypatch.setattr(module, loader, load_then_rewrite)
    corpus = write_jsonl(tmp_path / "ids.jsonl", [{"id": "d0", "content": [2, 3], "title": "x"}])
    with pytest.raises(ExportConfigError, match="changed while it was loaded"):
        run_export(export_args(model, corpus, tmp_path / "out", *flags))
    assert not (tmp_path / "out").exists()


def test_a_float_input_that_feeds_no_embedding_is_refused(tmp_path):
    """Numeric features: the export fed the text's first token ids into the Dense as if they were them."""
    text = keras.Input(shape=(8,), name="text")  # Keras 2's float32 Input(shape=(n,)) of token ids
    features = keras.Input(shape=(3,), name="features")
    vector = keras.layers.LSTM(4, name="lstm")(keras.layers.Embedding(50, 4, name="emb")(text))
    dense = keras.layers.Dense(2, name="feat_dense")(features)
    model = keras.Model([text, features], keras.layers.Concatenate()([vector, dense]))
    path = tmp_path / "mixed_inputs.keras"
    model.save(path)
    corpus = write_jsonl(tmp_path / "ids.jsonl", [{"id": "d0", "text": [1, 2, 3], "features": [0.5, 1, 2]}])
    flags = ["--tokenizer", "none", "--layer", "feat_dense", "--input_map", "features=text"]
    with pytest.raises(ExportConfigError, match="'features' takes float32 values and feeds no Embedding"):
        run_export(export_args(path, corpus, tmp_path / "out", *flags))
    # The float32 token-id input that feeds the Embedding is the tutorial's: exported.
    summary = run_export(
        export_args(path, corpus, tmp_path / "lstm", "--tokenizer", "none", "--layer", "lstm")
    )
    assert summary.exit_code == 0, summary.message


def test_a_bidirectional_layer_of_two_widths_is_refused(tmp_path):
    """Keras 3 plans it 16 wide; it computes 14: the run died mid-way on a pyarrow type error."""
    inputs = keras.Input(shape=(10,), dtype="int32", name="content")
    embedded = keras.layers.Embedding(50, 4, name="emb")(inputs)
    backward = keras.layers.GRU(6, go_backwards=True)
    both = keras.layers.Bidirectional(keras.layers.LSTM(8), backward_layer=backward, name="bi")(embedded)
    path = tmp_path / "uneven.keras"
    keras.Model(inputs, keras.layers.Dense(1)(both)).save(path)
    corpus = write_jsonl(tmp_path / "ids.jsonl", [{"id": "d0", "content": [5, 6, 7]}])
    with pytest.raises(ExportConfigError, match="'bi' .* another width"):
        run_export(export_args(path, corpus, tmp_path / "out", "--tokenizer", "none", "--layer", "bi"))


def test_a_keras2_dot_keras_file_says_to_save_it_as_h5(tmp_path):
    """tf_keras writes .keras archives too; Keras 3's message was 3,571 characters about custom classes."""
    import json
    import zipfile

    from models.keras2_config import LegacyModelError
    from models.legacy import load_model_file

    path = tmp_path / "model.keras"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("config.json", json.dumps({"class_name": "Functional", "config": {"layers": []}}))
        archive.writestr("metadata.json", json.dumps({"keras_version": "2.21.0"}))
    with pytest.raises(
        LegacyModelError, match=r"written by Keras 2\.21\.0 \(tf_keras\).*model\.save\('model\.h5'\)"
    ):
        load_model_file(str(path))


def test_a_keras2_activation_of_the_saving_script_is_named(keras2_failing):
    """It was Keras 3's "could not be deserialized properly" over 7 lines, the name far down."""
    from models.keras2_config import LegacyModelError
    from models.legacy import load_model_file

    with pytest.raises(LegacyModelError, match="Layer 'head' uses the activation 'doubled', a function"):
        load_model_file(str(keras2_failing / "own_activation.h5"))


@pytest.mark.parametrize("shape", [(6,), (8, 8, 3)], ids=["numeric features", "image"])
def test_a_model_that_reads_no_text_is_refused_as_such_and_inspect_marks_its_layers(shape, tmp_path, capsys):
    """Without --tokenizer it was refused for the missing tokenizer, a dead end: with one came a second
    refusal; inspect listed the numeric model's layers as exportable ("vector"), which run refused."""
    from pipeline.inspect import main as inspect_main

    features = keras.Input(shape=shape, name="features")
    hidden = keras.layers.Dense(4, name="hidden")(keras.layers.Flatten()(features))
    path = tmp_path / "no_text.keras"
    keras.Model(features, keras.layers.Dense(2, name="out")(hidden)).save(path)
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": "d0", "features": "a b"}])
    for flags in ([], ["--tokenizer", "none"]):
        with pytest.raises(
            ExportConfigError, match=f"reads no text: its input.s. 'features' float32 .None, {shape[0]}"
        ):
            run_export(export_args(path, corpus, tmp_path / "out", *flags))
    assert not (tmp_path / "out").exists()
    assert inspect_main([str(path)]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert "- (input features refused)" in rows["hidden"], rows


def test_nested_encoders_are_followed_for_the_launch_refusals(tmp_path):
    """A Bidirectional in a nested encoder is no go_backwards layer; an Embedding two models deep is fed;
    numeric features beside a nested text encoder are still refused."""
    text = keras.Input(shape=(10,), name="content")  # float32, as Keras 2's Input(shape=(n,))
    features = keras.Input(shape=(3,), name="feats")
    embed_block = keras.Sequential(
        [keras.Input(shape=(10,)), keras.layers.Embedding(50, 4)], name="embed_block"
    )
    inner = keras.Input(shape=(10,))
    bidirectional = keras.layers.Bidirectional(keras.layers.LSTM(3, return_sequences=True), name="bi")
    encoder = keras.Model(inner, bidirectional(embed_block(inner)), name="encoder")
    tokens = encoder(text)
    merged = keras.layers.Concatenate()(
        [keras.layers.GlobalAveragePooling1D()(tokens), keras.layers.Dense(2, name="feat_dense")(features)]
    )
    path = tmp_path / "nested.keras"
    keras.Model([text, features], keras.layers.Dense(1, name="out")(merged)).save(path)
    corpus = write_jsonl(tmp_path / "ids.jsonl", [{"id": "d0", "content": [5, 6, 7], "feats": [1, 2, 3]}])
    summary = run_export(
        export_args(
            path,
            corpus,
            tmp_path / "tokens",
            "--tokenizer",
            "none",
            "--layer",
            "encoder",
            "--pooling",
            "none",
        )
    )
    assert summary.exit_code == 0, summary.message
    flags = ["--tokenizer", "none", "--layer", "feat_dense", "--input_map", "feats=content"]
    with pytest.raises(ExportConfigError, match="'feats' takes float32 values and feeds no Embedding"):
        run_export(export_args(path, corpus, tmp_path / "features", *flags))


def test_the_launch_check_draws_each_inputs_ids_below_its_own_embedding(tmp_path):
    """A title Embedding(20) beside a content Embedding(1000): ids up to 999 failed Keras's own pass."""
    content = keras.Input(shape=(12,), dtype="int32", name="content")
    title = keras.Input(shape=(6,), dtype="int32", name="title")
    lstm = keras.layers.LSTM(4, name="lstm")(keras.layers.Embedding(1000, 4, name="emb_c")(content))
    convolved = keras.layers.Conv1D(3, 2, name="conv")(keras.layers.Embedding(20, 4, name="emb_t")(title))
    pooled = keras.layers.GlobalMaxPooling1D(name="pool")(convolved)
    merged = keras.layers.Concatenate()([lstm, pooled])
    path = tmp_path / "two_tables.keras"
    keras.Model([content, title], keras.layers.Dense(1, name="out")(merged)).save(path)
    documents = [
        {"id": "d0", "content": [500, 6, 7], "title": [3, 4]},
        {"id": "d1", "content": [9], "title": [19]},
    ]
    corpus = write_jsonl(tmp_path / "ids.jsonl", documents)
    flags = ["--tokenizer", "none", "--layer", "lstm", "--layer", "pool"]
    summary = run_export(export_args(path, corpus, tmp_path / "out", *flags))
    assert summary.exit_code == 0 and summary.rows_written == 2, summary.message


def _vocabulary_file(path, size):
    """A vocabulary tokenizer file of `size` ids (TextVectorization's layout: padding, [UNK], words)."""
    path.write_text("\n".join(["", "[UNK]"] + [f"w{i}" for i in range(size - 2)]) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("nested", [False, True])
def test_an_embeddings_id_limit_is_checked_inside_nested_models(tmp_path, nested):
    ids = keras.Input((6,), dtype="int32", name="content")
    layers = [keras.layers.Embedding(50, 4, name="emb"), keras.layers.LSTM(3, name="lstm")]
    encoded = keras.Sequential(layers, name="encoder")(ids) if nested else layers[1](layers[0](ids))
    path = tmp_path / "model.keras"
    keras.Model(ids, keras.layers.Dense(2, name="out")(encoded)).save(path)
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": "d", "content": "w1 w70"}])
    tokenizer = _vocabulary_file(tmp_path / "vocabulary.txt", 100)
    flags = ("--tokenizer", str(tokenizer), "--layer", "out")
    with pytest.raises(ExportConfigError, match="ids up to 99, but Embedding layer 'emb'.*input_dim=50"):
        run_export(export_args(path, corpus, tmp_path / "refused", *flags))
    # Token ids given as lists: an id beyond the table is the document's own dead letter, named so.
    lists = write_jsonl(
        tmp_path / "ids.jsonl", [{"id": "ok", "content": [3, 4]}, {"id": "bad", "content": [60]}]
    )
    output = tmp_path / "out"
    flags = ("--tokenizer", "none", "--layer", "out", "--max_error_fraction", "1")
    assert run_export(export_args(path, lists, output, *flags)).exit_code == 0
    assert sorted(rows_by_id(read_rows(output))) == ["ok"]
    assert [(e["id"], e["reason"]) for e in read_errors(output).to_pylist()] == [("bad", "bad_token_id")]


@pytest.mark.parametrize("remap", ["hashing", "lookup"])
def test_ids_remapped_before_the_embedding_are_not_limited_by_it(tmp_path, remap):
    keras.utils.set_random_seed(3)
    ids = keras.Input((5,), dtype="int64", name="content")
    if remap == "hashing":
        remapped = keras.layers.Hashing(num_bins=50, name="remap")(ids)
    else:
        remapped = keras.layers.IntegerLookup(vocabulary=list(range(1, 40)), name="remap")(ids)
    embedded = keras.layers.Embedding(50, 4, name="emb")(remapped)
    model = keras.Model(ids, keras.layers.LSTM(3, name="lstm")(embedded))
    path = tmp_path / "model.keras"
    model.save(path)
    rows = [[0, 0, 3, 77, 99], [1, 2, 3, 4, 5], [0, 0, 0, 0, 98]]
    documents = [{"id": f"d{i}", "content": row} for i, row in enumerate(rows)]
    output = tmp_path / "out"
    flags = ("--tokenizer", "none", "--layer", "lstm", "--padding", "pre")
    summary = run_export(export_args(path, write_jsonl(tmp_path / "ids.jsonl", documents), output, *flags))
    assert summary.exit_code == 0, summary.message
    exported = rows_by_id(read_rows(output))
    reference = model.predict(np.array(rows, np.int64), verbose=0)
    for index in range(len(rows)):
        np.testing.assert_allclose(exported[f"d{index}"]["lstm"], reference[index], atol=1e-5, rtol=0)
    # A tokenizer of more ids than the Embedding has rows is fine: the layer in between maps them.
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": "t", "content": "w1 w70 w97"}])
    tokenizer = _vocabulary_file(tmp_path / "vocabulary.txt", 100)
    flags = ("--tokenizer", str(tokenizer), "--layer", "lstm")
    assert run_export(export_args(path, corpus, tmp_path / "tokenized", *flags)).exit_code == 0


def test_default_layers_take_every_call_of_a_shared_layer_feeding_the_outputs(tmp_path):
    keras.utils.set_random_seed(4)
    content = keras.Input((8,), dtype="int32", name="content")
    title = keras.Input((5,), dtype="int32", name="title")
    embedding = keras.layers.Embedding(40, 6, name="emb")
    lstm, dense = keras.layers.LSTM(4, name="lstm"), keras.layers.Dense(3, name="dense")
    towers = [dense(lstm(embedding(content))), dense(lstm(embedding(title)))]
    model = keras.Model([content, title], keras.layers.Concatenate(name="cat")(towers))
    path = tmp_path / "model.keras"
    model.save(path)
    rows = [([0, 0, 0, 0, 0, 1, 2, 3 + i], [0, 0, 0, 7, 8 + i]) for i in range(4)]
    documents = [{"id": f"d{i}", "content": c, "title": t} for i, (c, t) in enumerate(rows)]
    output = tmp_path / "out"
    summary = run_export(
        export_args(path, write_jsonl(tmp_path / "ids.jsonl", documents), output, "--tokenizer=none")
    )
    assert summary.exit_code == 0, summary.message
    exported = rows_by_id(read_rows(output))
    features = [np.array([row[0] for row in rows]), np.array([row[1] for row in rows])]
    for column, tower in (("dense", towers[0]), ("dense_call1", towers[1])):
        reference = keras.Model(model.inputs, tower).predict(features, verbose=0)
        for index in range(len(rows)):
            np.testing.assert_allclose(exported[f"d{index}"][column], reference[index], atol=1e-5, rtol=0)


# Saves, in its own process, a model with a registered custom layer and a subclassed Model, as
# the code that trained them would; the test's process does not know their classes. argv: directory.
CUSTOM_CLASSES_SCRIPT = r"""
import json, sys
import keras

@keras.saving.register_keras_serializable(package="my")
class Scale(keras.layers.Layer):
    def call(self, x):
        return x * 2.0

class Sub(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.emb = keras.layers.Embedding(40, 5)
        self.lstm = keras.layers.LSTM(4)

    def call(self, x):
        return self.lstm(self.emb(x))

ids = keras.Input((8,), dtype="int32", name="content")
scaled = Scale(name="scale")(keras.layers.Embedding(40, 5, name="emb")(ids))
custom = keras.Model(ids, keras.layers.LSTM(4, name="lstm")(scaled))
custom.save(sys.argv[1] + "/custom.keras")
custom.save(sys.argv[1] + "/custom.h5")
sub = Sub()
sub(keras.ops.ones((1, 8), "int32"))
sub.save(sys.argv[1] + "/subclassed.keras")

# The Keras text-classification tutorial's vectorizer, and a function as a Dense layer's activation.
@keras.saving.register_keras_serializable()
def custom_standardization(text):
    return keras.ops.convert_to_tensor(text)

@keras.saving.register_keras_serializable(package="my")
def doubled(x):
    return x * 2.0

vectorizer = keras.layers.TextVectorization(
    output_sequence_length=4, standardize=custom_standardization, vocabulary=["a", "b"], name="vec"
)
text = keras.Input((1,), dtype="string", name="text")
pooled = keras.layers.GlobalAveragePooling1D(name="pool")(keras.layers.Embedding(4, 3)(vectorizer(text)))
keras.Model(text, pooled).save(sys.argv[1] + "/standardize.keras")
numbers = keras.Input((8,), name="numbers")
dense = keras.layers.Dense(2, activation=doubled, name="lstm")
keras.Model(numbers, dense(numbers)).save(sys.argv[1] + "/activation.keras")
json.dump({}, open(sys.argv[1] + "/info.json", "w"))
"""


@pytest.fixture(scope="module")
def custom_class_models(tmp_path_factory):
    """The models of CUSTOM_CLASSES_SCRIPT, saved once by its own process (the tests only read them)."""
    return build_keras2_models(tmp_path_factory.mktemp("custom_classes"), CUSTOM_CLASSES_SCRIPT)[0]


# The .h5 file was refused with Keras's "Unknown layer: 'my>Scale'. Please ensure you are using a
# keras.utils.custom_object_scope ...".
@pytest.mark.parametrize(
    ("file", "label"),
    [("custom.keras", "'my>Scale'"), ("custom.h5", "'my>Scale'"), ("subclassed.keras", "'Sub'")],
)
def test_a_model_of_custom_classes_is_one_error_saying_to_rebuild_it(
    custom_class_models, tmp_path, file, label
):
    directory = custom_class_models
    corpus = write_jsonl(tmp_path / "ids.jsonl", [{"id": "d", "content": [1, 2, 3]}])
    flags = ("--tokenizer", "none", "--layer", "lstm")
    with pytest.raises(ExportConfigError) as refusal:
        run_export(export_args(directory / file, corpus, tmp_path / "out", *flags))
    message = str(refusal.value)
    assert f"uses the custom class {label}" in message and "built-in Keras layers" in message
    assert "\n" not in message and "complete" not in message


@pytest.mark.parametrize(
    ("file", "names", "advice"),
    [
        (
            "standardize.keras",
            "'custom_standardization' (registered as 'Custom>custom_standardization') as the standardize "
            "of the TextVectorization layer 'vec'",
            "vocabulary=old_layer.get_vocabulary()",
        ),
        (
            "activation.keras",
            "'doubled' (registered as 'my>doubled') as the activation of the Dense layer 'lstm'",
            "built-in",
        ),
    ],
)
def test_a_model_naming_a_function_of_its_training_code_is_one_error_saying_which_and_where(
    custom_class_models, tmp_path, file, names, advice
):
    directory = custom_class_models
    corpus = write_jsonl(tmp_path / "ids.jsonl", [{"id": "d", "content": [1, 2, 3], "text": "a b"}])
    with pytest.raises(ExportConfigError) as refusal:
        run_export(export_args(directory / file, corpus, tmp_path / "out", "--tokenizer", "none"))
    message = str(refusal.value)
    assert f"uses the custom function {names}" in message and advice in message
    assert "custom class" not in message and "\n" not in message


def test_a_layer_inside_a_nested_model_is_named_with_its_holder(tmp_path):
    ids = keras.Input((6,), dtype="int32", name="content")
    inner = [keras.layers.Embedding(20, 4, name="emb"), keras.layers.LSTM(3, name="inner_lstm")]
    model = keras.Model(ids, keras.layers.Dense(2, name="out")(keras.Sequential(inner, name="encoder")(ids)))
    path = tmp_path / "model.keras"
    model.save(path)
    corpus = write_jsonl(tmp_path / "ids.jsonl", [{"id": "d", "content": [1, 2]}])
    flags = ("--tokenizer", "none", "--layer", "inner_lstm")
    with pytest.raises(ExportConfigError, match="inside the nested model 'encoder'.*--layer encoder"):
        run_export(export_args(path, corpus, tmp_path / "out", *flags))


def test_a_tensorflow_saved_model_directory_is_named_so(tmp_path):
    import tensorflow as tf

    corpus = write_jsonl(tmp_path / "ids.jsonl", [{"id": "d", "content": [1, 2]}])
    module = tf.Module()
    module.scale = tf.Variable(2.0)
    tf.saved_model.save(module, str(tmp_path / "saved"))
    # tf_keras's model.save("dir") writes its layers to keras_metadata.pb beside the graph (saving a
    # real one takes tf_keras ~10 s); only that file tells the directory apart.
    (tmp_path / "saved" / "keras_metadata.pb").write_bytes(b"")
    with pytest.raises(ExportConfigError, match="SavedModel directory .Keras 2.*save it as .h5"):
        run_export(export_args(tmp_path / "saved", corpus, tmp_path / "out", "--tokenizer", "none"))
    # Keras 3's model.export() writes functions for serving, which tf_keras cannot turn into a model.
    ids = keras.Input((4,), dtype="int32", name="content")
    keras.Model(ids, keras.layers.LSTM(2)(keras.layers.Embedding(10, 3)(ids))).export(
        str(tmp_path / "served")
    )
    with pytest.raises(ExportConfigError) as refusal:
        run_export(export_args(tmp_path / "served", corpus, tmp_path / "out", "--tokenizer", "none"))
    message = str(refusal.value)
    assert "SavedModel for serving" in message and "model.save('model.keras')" in message
    assert "tf_keras.models.load_model" not in message


def test_an_explicit_mask_whose_mean_over_padding_is_nan_keeps_the_fast_path(tmp_path):
    # A masked mean over a row of padding only is 0/0: NaN in Keras and in the fast path alike.
    keras.utils.set_random_seed(1)
    ids = keras.Input((8,), dtype="int32", name="content")
    mask = keras.ops.not_equal(ids, 0)
    sequence = keras.layers.LSTM(4, return_sequences=True, name="lstm")(keras.layers.Embedding(30, 4)(ids))
    pooled = keras.layers.GlobalAveragePooling1D(name="pool")(sequence, mask=mask)
    model = keras.Model(ids, keras.layers.Dense(2, name="out")(pooled))
    path = tmp_path / "model.keras"
    model.save(path)
    rows = [[0] * (7 - i) + list(range(1, 2 + i)) for i in range(6)]
    documents = [{"id": f"d{i}", "content": row} for i, row in enumerate(rows)]
    output = tmp_path / "out"
    corpus = write_jsonl(tmp_path / "ids.jsonl", documents)
    summary = run_export(export_args(path, corpus, output, "--tokenizer", "none", "--layer", "pool"))
    assert summary.exit_code == 0, summary.message
    (column,) = manifest_of(output)["columns"]
    assert column["forward_pass"] == "hybrid", column["forward_pass_reason"]
    exported = rows_by_id(read_rows(output))
    reference = keras.Model(ids, pooled).predict(np.array(rows, np.int32), verbose=0)
    for index in range(len(rows)):
        np.testing.assert_allclose(exported[f"d{index}"]["pool"], reference[index], atol=1e-5, rtol=0)
