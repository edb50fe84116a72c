"""Pins the Keras internals `models.keras_graph` relies on: if a Keras upgrade changes them, this fails first.

Truncation, the fast path, the plan's checks and the token tables all walk the
functional graph through that one module; each assertion here names the
private attribute or format behind one of its functions.
"""

import keras
import numpy as np

from models import keras_graph


def _shared_embedding_model():
    content = keras.Input(shape=(5,), dtype="int32", name="content")
    title = keras.Input(shape=(3,), dtype="int32", name="title")
    emb = keras.layers.Embedding(20, 4, mask_zero=True, name="emb")
    lstm = keras.layers.LSTM(2, name="lstm")
    content_vector = lstm(emb(content))
    title_vector = keras.layers.GRU(2, name="gru")(emb(title), training=False)
    added = keras.layers.Add(name="add")([content_vector, title_vector])
    return keras.Model([content, title], keras.layers.Dense(1, name="out")(added)), emb


def test_producer_nodes_and_call_arguments():
    model, emb = _shared_embedding_model()
    # `_keras_history` (operation, node_index) and `_inbound_nodes`: the call that made a tensor.
    add, node = keras_graph.producer(model.get_layer("out").input)
    assert add is model.get_layer("add")
    lstm_output, gru_output = keras_graph.node_inputs(node)
    assert keras_graph.producer(lstm_output)[0].name == "lstm"
    assert keras_graph.node_outputs(node)[0] is model.get_layer("out").input
    # `node.arguments`: positional and keyword arguments of a call.
    gru, gru_node = keras_graph.producer(gru_output)
    assert len(keras_graph.call_args(gru_node)) == 1
    assert keras_graph.call_kwargs(gru_node)["training"] is False
    assert keras_graph.takes_training(gru) and not keras_graph.takes_training(add)
    # `_keras_mask`: the mask travels with the embedding's symbolic output.
    embedded = keras_graph.node_inputs(gru_node)[0]
    assert keras_graph.producer(embedded)[0] is emb
    mask = keras_graph.tensor_mask(embedded)
    assert tuple(mask.shape) == (None, 3) and mask.dtype == "bool"
    # `arguments.fill_in`: replays a call on known values.
    value = np.ones((1, 3, 4), "float32")
    args, _ = keras_graph.call_arguments(gru_node, {id(embedded): value})
    assert args[0] is value
    assert keras_graph.producer(np.zeros(1)) == (None, None)
    assert keras_graph.is_input(model.inputs[0]) and not keras_graph.is_input(embedded)


def test_model_nodes_keep_only_the_models_own_calls():
    model, emb = _shared_embedding_model()
    assert len(keras_graph.model_nodes(model, emb)) == 2
    # A second model reusing the layer adds a call that the first model must not see
    # (the `f"{id(layer)}_ib-{index}"` keys of `model._nodes`).
    other = keras.Input(shape=(7,), dtype="int32")
    keras.Model(other, emb(other))
    assert len(keras_graph.layer_nodes(emb)) == 3
    assert len(keras_graph.model_nodes(model, emb)) == 2
    assert [tuple(keras_graph.node_outputs(n)[0].shape) for n in keras_graph.model_nodes(model, emb)] == [
        (None, 5, 4),
        (None, 3, 4),
    ]


def test_input_dependencies_follow_the_graph_to_the_inputs():
    model, _ = _shared_embedding_model()
    lstm_output = model.get_layer("lstm").output
    assert keras_graph.input_dependencies(model, lstm_output) == ["content"]
    assert keras_graph.input_dependencies(model, model.outputs[0]) == ["content", "title"]
