"""Tests for models.truncate: layer specs and sub-models that match the Keras reference."""

import keras
import numpy as np
import pytest
from sizes import SIZES

from models import architectures
from models.bundle import load_bundle
from models.truncate import LayerSpec, layer_calls, parse_layer_spec, resolve_layer, truncate


@pytest.fixture(scope="module", params=["in_memory", "loaded"])
def trained(request, tiny_bundle):
    """`(model, inputs)`: the tiny trained two-output model, as trained or as loaded from its bundle."""
    directory, model, inputs = tiny_bundle
    if request.param == "loaded":
        model = load_bundle(directory).model
    return model, inputs


def _reference(model, tensor, inputs):
    """The tutorial's truncation: `Model(model.inputs, tensor).predict`."""
    return keras.Model(model.inputs, tensor).predict(inputs, verbose=0)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("emb", LayerSpec(column="emb", layer="emb", call=0)),
        ("emb:0", LayerSpec(column="emb", layer="emb", call=0)),
        ("emb:1", LayerSpec(column="emb_call1", layer="emb", call=1)),
        ("x=emb:1", LayerSpec(column="x", layer="emb", call=1)),
        ("title_tokens=emb", LayerSpec(column="title_tokens", layer="emb", call=0)),
        ("  lstm_title  ", LayerSpec(column="lstm_title", layer="lstm_title", call=0)),
    ],
)
def test_parse_layer_spec(text, expected):
    assert parse_layer_spec(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "emb:",
        "emb:a",
        "emb:-1",
        "emb:1:2",
        "=emb",
        "1x=emb",
        "a=b=c",
        "x=:1",
    ],
)
def test_parse_layer_spec_rejects_invalid_specs(text):
    with pytest.raises(ValueError, match=r"Invalid layer spec .* expected \[COLUMN=\]LAYER\[:CALL\]"):
        parse_layer_spec(text)


@pytest.mark.parametrize("text", ["emb:²", "emb:١", "x=emb:١"])
def test_a_call_in_other_digits_than_ascii_is_an_invalid_spec(text):
    """`emb:²` ended in Python's "invalid literal for int() with base 10: '²'"; `emb:١` (Arabic-Indic
    one) was silently call 1, in a column named emb_call1."""
    with pytest.raises(ValueError, match=r"Invalid layer spec .* expected \[COLUMN=\]LAYER\[:CALL\]"):
        parse_layer_spec(text, ["emb"])


def test_layer_calls_counts_the_shared_embedding_twice(trained):
    model, _ = trained
    counts = {name: len(tensors) for name, tensors in layer_calls(model).items()}
    assert counts == {
        "emb": 2,
        "lstm_content": 1,
        "lstm_title": 1,
        "out_content": 1,
        "out_title": 1,
    }


@pytest.mark.parametrize(
    "spec, inputs",
    [
        ("lstm_content", ["content"]),
        ("emb", ["content"]),
        ("emb:1", ["title"]),
        ("lstm_title", ["title"]),
        ("out_title", ["title"]),
    ],
)
def test_truncate_keeps_only_the_needed_inputs(trained, spec, inputs):
    model, _ = trained
    submodel = truncate(model, [parse_layer_spec(spec)])
    assert [tensor.name for tensor in submodel.inputs] == inputs


def test_truncate_keeps_both_inputs_when_both_are_needed(trained):
    model, _ = trained
    submodel = truncate(model, [parse_layer_spec("lstm_title"), parse_layer_spec("lstm_content")])
    assert [tensor.name for tensor in submodel.inputs] == ["content", "title"]


def test_truncate_of_the_add_layer_needs_both_inputs():
    model = architectures.build_model("two_inputs_one_output", **SIZES)
    submodel = truncate(model, [parse_layer_spec("add")])
    assert [tensor.name for tensor in submodel.inputs] == ["content", "title"]


def test_truncate_matches_the_keras_reference(trained):
    model, inputs = trained
    specs = [parse_layer_spec(text) for text in ("emb", "emb:1", "lstm_title", "lstm_content")]
    submodel = truncate(model, specs)
    outputs = submodel.predict(inputs, verbose=0)
    assert sorted(outputs) == ["emb", "emb_call1", "lstm_content", "lstm_title"]

    embedding = model.get_layer("emb")
    # Keras's `layer.output` is the first call's; the title embedding is what `lstm_title` reads.
    references = {
        "emb": _reference(model, embedding.output, inputs),
        "emb_call1": _reference(model, model.get_layer("lstm_title").input, inputs),
        "lstm_title": _reference(model, model.get_layer("lstm_title").output, inputs),
        "lstm_content": _reference(model, model.get_layer("lstm_content").output, inputs),
    }
    for column, reference in references.items():
        np.testing.assert_allclose(outputs[column], reference, atol=1e-6, err_msg=column)

    table = embedding.get_weights()[0]
    np.testing.assert_array_equal(outputs["emb"], table[inputs["content"]])
    np.testing.assert_array_equal(outputs["emb_call1"], table[inputs["title"]])
    assert outputs["lstm_title"].shape == (len(inputs["title"]), SIZES["lstm_units"])


def test_truncate_with_only_the_title_input(trained):
    model, inputs = trained
    submodel = truncate(model, [parse_layer_spec("title_vectors=lstm_title")])
    outputs = submodel.predict({"title": inputs["title"]}, verbose=0)
    reference = _reference(model, model.get_layer("lstm_title").output, inputs)
    np.testing.assert_allclose(outputs["title_vectors"], reference, atol=1e-6)


def test_misspelled_layer_suggests_the_close_name_and_lists_the_layers(trained):
    model, _ = trained
    with pytest.raises(ValueError) as error:
        truncate(model, [parse_layer_spec("lstm_titel")])
    message = str(error.value)
    assert "no layer named 'lstm_titel'" in message
    assert "Did you mean 'lstm_title'" in message
    for described in (
        "emb (2 calls)",
        "lstm_content (1 call)",
        "lstm_title (1 call)",
        "out_title (1 call)",
    ):
        assert described in message


def test_unrelated_layer_name_lists_the_layers_without_a_guess(trained):
    model, _ = trained
    with pytest.raises(ValueError) as error:
        truncate(model, [parse_layer_spec("zzzzzz")])
    message = str(error.value)
    assert "Did you mean" not in message
    assert "emb (2 calls)" in message


@pytest.mark.parametrize(
    "spec, expected",
    [
        (
            "emb:2",
            "Layer 'emb' has 2 call(s) in this model, so call 2 does not exist; use emb:0 .. emb:1.",
        ),
        (
            "lstm_title:1",
            "Layer 'lstm_title' has 1 call(s) in this model, so call 1 does not exist; use lstm_title:0.",
        ),
    ],
)
def test_call_index_out_of_range(trained, spec, expected):
    model, _ = trained
    with pytest.raises(ValueError) as error:
        truncate(model, [parse_layer_spec(spec)])
    assert str(error.value) == expected


def test_calls_from_another_model_do_not_count():
    model = architectures.build_model("two_inputs_two_outputs", **SIZES)
    # Calling the shared embedding outside `model` adds a third call to the layer, not to `model`.
    model.get_layer("emb")(keras.Input(shape=(4,), dtype="int32"))
    assert len(layer_calls(model)["emb"]) == 2
    with pytest.raises(ValueError, match="has 2 call"):
        truncate(model, [parse_layer_spec("emb:2")])


def test_a_loaded_sequential_models_layers_have_one_call_each(tmp_path):
    """Keras 3 rebuilds a Sequential when it loads: the nodes of those builds were listed as calls."""
    model = keras.Sequential(
        [keras.Input((5,)), keras.layers.Embedding(10, 3, name="emb"), keras.layers.LSTM(2, name="lstm")]
    )
    model.save(tmp_path / "sequential.keras")
    loaded = keras.saving.load_model(tmp_path / "sequential.keras")
    assert {name: len(calls) for name, calls in layer_calls(loaded).items()} == {"emb": 1, "lstm": 1}
    with pytest.raises(ValueError, match="call"):
        truncate(loaded, [parse_layer_spec("emb:1")])


def test_duplicate_column_names_are_an_error(trained):
    model, _ = trained
    with pytest.raises(ValueError, match=r"same column \['emb'\]"):
        truncate(model, [parse_layer_spec("emb"), parse_layer_spec("emb=lstm_title")])


def test_no_specs_is_an_error(trained):
    model, _ = trained
    with pytest.raises(ValueError, match="at least one --layer"):
        truncate(model, [])


def _model_with_colon_and_equals_names():
    """Layers named "pool:1" and "a=b" (Keras allows both), and "emb" called twice."""
    content = keras.Input((6,), dtype="int32", name="content")
    title = keras.Input((3,), dtype="int32", name="title")
    embedding = keras.layers.Embedding(30, 4, name="emb")
    pooled = keras.layers.GlobalAveragePooling1D(name="pool:1")(embedding(content))
    title_pooled = keras.layers.GlobalAveragePooling1D(name="title_pool")(embedding(title))
    return keras.Model([content, title], [keras.layers.Dense(2, name="a=b")(pooled), title_pooled])


@pytest.mark.parametrize(
    "text, expected",
    [
        ("pool:1", LayerSpec(column="pool_1", layer="pool:1", call=0)),
        ("pool:1:0", LayerSpec(column="pool_1", layer="pool:1", call=0)),
        ("a=b", LayerSpec(column="a_b", layer="a=b", call=0)),
        ("col=a=b", LayerSpec(column="col", layer="a=b", call=0)),
        ("col=pool:1", LayerSpec(column="col", layer="pool:1", call=0)),
        ("emb:1", LayerSpec(column="emb_call1", layer="emb", call=1)),
    ],
)
def test_a_layer_named_with_a_colon_or_equals_sign_is_selected_by_its_name(text, expected):
    model = _model_with_colon_and_equals_names()
    names = {layer.name for layer in model.layers}
    spec = parse_layer_spec(text, names)
    assert spec == expected
    tensor = layer_calls(model)[spec.layer][spec.call]
    assert tensor is resolve_layer(model, spec)
