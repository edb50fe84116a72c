"""Tests for models.architectures: the three topologies, their compilation and save/load."""

import os

import keras
import numpy as np
import pytest
from sizes import LENGTHS, SIZES

from models import architectures
from models.bundle import MODEL_FILE, load_bundle, save_bundle
from models.tokenizer import Tokenizer

EXPECTED = {
    "single_input": {
        "layers": ["content", "emb", "lstm_content", "output"],
        "inputs": ["content"],
        "outputs": ["output"],
    },
    "two_inputs_one_output": {
        "layers": [
            "content",
            "title",
            "emb",
            "lstm_content",
            "lstm_title",
            "add",
            "output",
        ],
        "inputs": ["content", "title"],
        "outputs": ["output"],
    },
    "two_inputs_two_outputs": {
        "layers": [
            "content",
            "title",
            "emb",
            "lstm_content",
            "lstm_title",
            "out_content",
            "out_title",
        ],
        "inputs": ["content", "title"],
        "outputs": ["out_content", "out_title"],
    },
}


def _predict(model, inputs):
    return model.predict(inputs, batch_size=16, verbose=0)


def _assert_same_predictions(expected, actual):
    if isinstance(expected, dict):
        assert sorted(actual) == sorted(expected)
        for name in expected:
            np.testing.assert_array_equal(actual[name], expected[name])
    else:
        np.testing.assert_array_equal(actual, expected)


def test_every_topology_is_covered():
    assert set(architectures.TOPOLOGIES) == set(EXPECTED)


@pytest.mark.parametrize("topology", architectures.TOPOLOGIES)
def test_build_model_layer_names_and_shapes(topology):
    model = architectures.build_model(topology, **SIZES)
    expected = EXPECTED[topology]
    assert model.name == topology
    assert [layer.name for layer in model.layers] == expected["layers"]
    assert [tensor.name for tensor in model.inputs] == expected["inputs"]
    assert model.output_names == expected["outputs"]
    for tensor in model.inputs:
        assert tuple(tensor.shape) == (None, LENGTHS[tensor.name])
        assert tensor.dtype == "int32"
    assert model.get_layer("emb").input_dim == SIZES["vocabulary_size"]
    assert model.get_layer("emb").output_dim == SIZES["embedding_dim"]
    assert model.get_layer("lstm_content").units == SIZES["lstm_units"]


def test_two_input_topologies_share_one_embedding():
    model = architectures.build_model("two_inputs_one_output", **SIZES)
    embedding = model.get_layer("emb")
    assert model.get_layer("lstm_content").input is embedding.output
    assert len([layer for layer in model.layers if isinstance(layer, keras.layers.Embedding)]) == 1
    # The title branch reads the same table: its LSTM input is the embedding of `title`.
    title = np.arange(3, 3 + LENGTHS["title"], dtype=np.int32)[None]
    content = np.zeros((1, LENGTHS["content"]), dtype=np.int32)
    title_vectors = keras.Model(model.inputs, model.get_layer("lstm_title").input).predict(
        {"content": content, "title": title}, verbose=0
    )
    np.testing.assert_array_equal(title_vectors[0], embedding.get_weights()[0][title[0]])


def test_two_output_model_has_the_requested_title_classes():
    model = architectures.build_model("two_inputs_two_outputs", **{**SIZES, "num_title_classes": 7})
    assert model.get_layer("out_title").units == 7
    assert model.get_layer("out_content").units == 1


@pytest.mark.parametrize("topology", architectures.TOPOLOGIES)
def test_train_save_load_reproduces_predictions(topology, train_tiny_model, tmp_path):
    initial = architectures.build_model(topology, **SIZES)
    model, inputs = train_tiny_model(topology)
    assert int(model.optimizer.iterations.numpy()) == 4
    assert not all(
        np.array_equal(before, after)
        for before, after in zip(initial.get_weights(), model.get_weights(), strict=True)
    )
    expected = _predict(model, inputs)

    input_fields = {name: name for name in EXPECTED[topology]["inputs"]}
    save_bundle(str(tmp_path), model, Tokenizer(["a", "b"]), input_fields)
    bundle = load_bundle(str(tmp_path))

    assert [layer.name for layer in bundle.model.layers] == EXPECTED[topology]["layers"]
    for saved, loaded in zip(model.get_weights(), bundle.model.get_weights(), strict=True):
        np.testing.assert_array_equal(loaded, saved)
    _assert_same_predictions(expected, _predict(bundle.model, inputs))


@pytest.mark.parametrize("topology", ["single_input", "two_inputs_one_output"])
def test_one_output_models_compile_with_binary_crossentropy_and_accuracy(topology, train_tiny_model):
    model, inputs = train_tiny_model(topology)
    batch = (
        inputs[:10] if topology == "single_input" else {name: value[:10] for name, value in inputs.items()}
    )
    binary = np.random.default_rng(1).integers(0, 2, (10, 1)).astype("float32")
    predictions = model.predict(batch, verbose=0)
    results = model.evaluate(batch, binary, batch_size=10, verbose=0, return_dict=True)
    reference = keras.losses.binary_crossentropy(binary, predictions).numpy().mean()
    np.testing.assert_allclose(results["loss"], reference, rtol=1e-5)
    np.testing.assert_allclose(results["accuracy"], ((predictions > 0.5) == binary).mean(), rtol=1e-6)


def test_two_output_loss_weights_are_the_tutorials(train_tiny_model):
    model, inputs = train_tiny_model("two_inputs_two_outputs")
    rng = np.random.default_rng(2)
    binary = rng.integers(0, 2, (10, 1)).astype("float32")
    classes = keras.utils.to_categorical(
        rng.integers(0, SIZES["num_title_classes"], 10), SIZES["num_title_classes"]
    )
    batch = {name: value[:10] for name, value in inputs.items()}
    predictions = model.predict(batch, verbose=0)
    results = model.evaluate(
        batch,
        {"out_content": binary, "out_title": classes},
        batch_size=10,
        verbose=0,
        return_dict=True,
    )

    content_loss = keras.losses.binary_crossentropy(binary, predictions["out_content"]).numpy().mean()
    title_loss = keras.losses.categorical_crossentropy(classes, predictions["out_title"]).numpy().mean()
    np.testing.assert_allclose(results["out_content_loss"], content_loss, rtol=1e-5)
    np.testing.assert_allclose(results["out_title_loss"], title_loss, rtol=1e-5)
    np.testing.assert_allclose(results["loss"], 0.8 * content_loss + 0.3 * title_loss, rtol=1e-5)
    assert {"out_content_accuracy", "out_title_accuracy"} <= set(results)


@pytest.mark.parametrize("topology", architectures.TOPOLOGIES)
def test_saved_model_loads_in_safe_mode(topology, tmp_path):
    model = architectures.build_model(topology, **SIZES)
    path = os.path.join(tmp_path, MODEL_FILE)
    model.save(path)
    loaded = keras.saving.load_model(path, compile=False, safe_mode=True)
    assert [layer.name for layer in loaded.layers] == EXPECTED[topology]["layers"]
    assert not any(isinstance(layer, keras.layers.Lambda) for layer in loaded.layers)


def test_safe_mode_would_reject_a_lambda_layer(tmp_path):
    # Shows the safe-mode check above can fail: a Lambda layer does not load in safe mode.
    inputs = keras.Input(shape=(3,))
    model = keras.Model(inputs, keras.layers.Lambda(lambda tensor: tensor * 2)(inputs))
    path = os.path.join(tmp_path, "lambda.keras")
    model.save(path)
    with pytest.raises(ValueError, match="safe_mode"):
        keras.saving.load_model(path, safe_mode=True)


def test_unknown_topology_names_the_valid_ones():
    with pytest.raises(ValueError, match="Unknown topology 'three_towers'") as error:
        architectures.build_model("three_towers", **SIZES)
    for topology in architectures.TOPOLOGIES:
        assert topology in str(error.value)
