"""The exact fast path equals Keras, and steps aside for everything it does not reproduce."""

import logging

import keras
import numpy as np
import pytest

from models.fast_lstm import build_fast_path
from models.truncate import parse_layer_spec, truncate
from pipeline.embedder import FAST_PATH_TOLERANCE, max_difference

VOCABULARY = 50


def _ids(rows, length, seed=0):
    """Pre-padded ids covering every real length from 0 to `length`, random tokens."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((rows, length), dtype=np.int32)
    for row, count in enumerate(np.linspace(0, length, rows).astype(int)):
        if count:
            ids[row, length - count :] = rng.integers(1, VOCABULARY, count)
    rng.shuffle(ids)
    return ids


def _features(model, rows=40):
    return {t.name: _ids(rows, t.shape[1], seed=index) for index, t in enumerate(model.inputs)}


@pytest.mark.parametrize(
    "topology, layers",
    [
        ("single_input", ["lstm_content", "emb"]),
        ("two_inputs_one_output", ["lstm_content", "lstm_title", "add", "emb", "emb:1"]),
        ("two_inputs_two_outputs", ["lstm_title", "lstm_content"]),
    ],
)
def test_fast_path_equals_keras_predict(train_tiny_model, topology, layers):
    model, _ = train_tiny_model(topology)
    sub_model = truncate(model, [parse_layer_spec(layer) for layer in layers])
    fast, reason = build_fast_path(sub_model, "pre")
    assert fast is not None, reason
    features = _features(sub_model)
    expected = sub_model.predict(features, verbose=0)
    actual = fast(features)
    assert set(actual) == set(expected)
    for column in expected:
        np.testing.assert_allclose(actual[column], expected[column], rtol=0, atol=1e-5, err_msg=column)


def test_fast_path_handles_all_padding_and_full_length_batches(train_tiny_model):
    model, _ = train_tiny_model("single_input")
    sub_model = truncate(model, [parse_layer_spec("lstm_content")])
    fast, _ = build_fast_path(sub_model, "pre")
    length = sub_model.inputs[0].shape[1]
    for ids in (np.zeros((3, length), np.int32), np.ones((3, length), np.int32), _ids(1, length)):
        expected = sub_model.predict({"content": ids}, verbose=0)
        expected = expected["lstm_content"] if isinstance(expected, dict) else expected
        np.testing.assert_allclose(fast({"content": ids})["lstm_content"], expected, atol=1e-5)


def _lstm_model(embedding_kwargs=None, recurrent=None, length=10):
    keras.utils.set_random_seed(1)
    content = keras.Input((length,), dtype="int32", name="content")
    embedded = keras.layers.Embedding(VOCABULARY, 8, name="emb", **(embedding_kwargs or {}))(content)
    vector = (recurrent or keras.layers.LSTM(6, name="lstm_content"))(embedded)
    return keras.Model(content, vector)


@pytest.mark.parametrize(
    "make_model, padding, reason",
    [
        (lambda: _lstm_model({"mask_zero": True}), "pre", "mask_zero"),
        (lambda: _lstm_model(recurrent=keras.layers.GRU(6, name="lstm_content")), "pre", "GRU"),
        (
            lambda: _lstm_model(
                recurrent=keras.layers.Bidirectional(keras.layers.LSTM(6), name="lstm_content")
            ),
            "pre",
            "Bidirectional",
        ),
        (
            lambda: _lstm_model(recurrent=keras.layers.LSTM(6, go_backwards=True, name="lstm_content")),
            "pre",
            "go_backwards",
        ),
        (
            lambda: _lstm_model(recurrent=keras.layers.LSTM(6, activation="relu", name="lstm_content")),
            "pre",
            "activation 'relu'",
        ),
        (
            lambda: _lstm_model(recurrent=keras.layers.LSTM(6, return_sequences=True, name="lstm_content")),
            "pre",
            "return_sequences",
        ),
        (lambda: _lstm_model(), "post", "pre-padding"),
    ],
)
def test_fast_path_refuses_what_it_cannot_reproduce(make_model, padding, reason):
    model = make_model()
    sub_model = truncate(model, [parse_layer_spec("lstm_content")])
    fast, why = build_fast_path(sub_model, padding)
    assert fast is None
    assert reason in why


def test_fast_path_refuses_layers_other_than_embedding_lstm_and_add(train_tiny_model):
    model, _ = train_tiny_model("two_inputs_two_outputs")
    sub_model = truncate(model, [parse_layer_spec("out_title")])
    fast, why = build_fast_path(sub_model, "pre")
    assert fast is None and "Dense" in why


def test_verification_catches_a_fast_path_that_disagrees(train_tiny_model):
    model, _ = train_tiny_model("single_input")
    sub_model = truncate(model, [parse_layer_spec("lstm_content")])
    fast, _ = build_fast_path(sub_model, "pre")
    features = _features(sub_model)

    def keras_forward(batch):
        return {"lstm_content": sub_model.predict(batch, verbose=0)["lstm_content"]}

    assert max_difference(fast, keras_forward, features) <= FAST_PATH_TOLERANCE

    def off_by_a_little(batch):
        return {"lstm_content": keras_forward(batch)["lstm_content"] + 1e-3}

    assert max_difference(off_by_a_little, keras_forward, features) > FAST_PATH_TOLERANCE


def test_pipeline_embedder_falls_back_with_a_log_line(tmp_path, caplog):
    from models.bundle import save_bundle
    from models.tokenizer import Tokenizer
    from pipeline.embedder import Document, Embedder
    from pipeline.options import ExportOptions
    from pipeline.plan import build_plan

    model = _lstm_model({"mask_zero": True})
    bundle = str(tmp_path / "bundle")
    save_bundle(bundle, model, Tokenizer([f"w{i}" for i in range(VOCABULARY - 2)]), {"content": "content"})
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"id": "a", "content": "w1 w2"}\n')
    plan, source = build_plan(
        ExportOptions(["--model", bundle, "--input", str(corpus), "--output", str(tmp_path / "o")])
    )
    with caplog.at_level(logging.INFO):
        embedder = Embedder(plan, source)
    assert not embedder.uses_fast_path
    assert "Fast path off (embedding 'emb' uses mask_zero" in caplog.text
    result = embedder.embed([Document("a", ("w1 w2 w3",), (), "c.jsonl", 1)])
    assert result.rows.num_rows == 1


def test_pipeline_embedder_uses_the_fast_path_for_the_default_bundle(tmp_path, caplog):
    from pipeline.embedder import Embedder
    from pipeline.options import ExportOptions
    from pipeline.plan import build_plan

    plan, source = build_plan(ExportOptions(["--output", str(tmp_path / "o")]))
    with caplog.at_level(logging.INFO):
        embedder = Embedder(plan, source)
    assert embedder.uses_fast_path
    assert "Fast path on" in caplog.text
