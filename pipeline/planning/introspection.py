"""Reads the model to export: the sub-model's inputs and the output columns of its layers.

The launch describes each input as an `InputInfo` (token ids of a fixed
length, or strings) and each `--layer` as a `ColumnInfo` (a vector per
document, or a vector per token), and refuses what cannot be exported.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import keras

from models import keras_graph
from models.truncate import LayerSpec, parse_layer_spec, spec_text, truncate
from pipeline.errors import ExportConfigError
from pipeline.planning.plan import IDS_INPUT, SEQUENCE, TEXT_INPUT, VECTOR, ColumnInfo, InputInfo

# {token-id input name: (smallest input_dim of the Embeddings it feeds, that layer's name)}.
EmbeddingLimits = dict[str, tuple[int, str]]


def reads_directly(layer: keras.layers.Layer, tensor: keras.KerasTensor) -> bool:
    """Whether some call of `layer` reads `tensor` itself."""
    nodes = keras_graph.layer_nodes(layer)
    return any(any(read is tensor for read in keras_graph.node_inputs(node)) for node in nodes)


def _pads_to_fixed_length(layer: keras.layers.TextVectorization) -> bool:
    config = layer.get_config()
    return config.get("output_mode") == "int" and bool(config.get("output_sequence_length"))


def text_vectorizer(
    model: keras.Model, input_tensor: keras.KerasTensor
) -> keras.layers.TextVectorization | None:
    """The TextVectorization layer of `model` whose ids mark `input_tensor`'s real tokens, or None.

    The first one applied directly to the input that emits ids of a fixed length,
    else the first one applied to it at all.
    """
    readers = [
        layer
        for layer in model.layers
        if isinstance(layer, keras.layers.TextVectorization) and reads_directly(layer, input_tensor)
    ]
    fixed = [layer for layer in readers if _pads_to_fixed_length(layer)]
    return (fixed or readers or [None])[0]


def batch_padded_vectorizers(
    model: keras.Model, input_tensor: keras.KerasTensor
) -> list[keras.layers.TextVectorization] | None:
    """The layers reading the string input `input_tensor` that pad each batch to its longest text.

    A TextVectorization with output_mode "int" and no output_sequence_length
    pads a batch to its longest document, so what follows it (a recurrent layer
    or a pooling without a mask) sees a padding that depends on the batch. Run
    a batch in groups of documents of one token count per such layer, and each
    document is padded as it is alone. None: a layer other than a
    TextVectorization reads the input, whose padding cannot be known, so each
    document must run alone.
    """
    padded: list[keras.layers.TextVectorization] = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer) or not reads_directly(layer, input_tensor):
            continue
        if not isinstance(layer, keras.layers.TextVectorization):
            return None
        config = layer.get_config()
        if config.get("output_mode") == "int" and not config.get("output_sequence_length"):
            if config.get("ragged"):
                continue  # a ragged tensor has no padding
            padded.append(layer)
    # A plain op (not a layer) reading the input is no layer of `model.layers`.
    operations = getattr(model, "operations", model.layers)
    if any(
        not isinstance(operation, keras.layers.Layer) and reads_directly(operation, input_tensor)
        for operation in operations
    ):
        return None
    return padded


def text_input_info(tensor: keras.KerasTensor, model: keras.Model, field: str) -> InputInfo:
    """InputInfo for a string input; see `InputInfo` for what `length` means here."""
    shape = tuple(tensor.shape)
    if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)):
        raise ExportConfigError(
            f"Model input {tensor.name!r} takes strings of shape {shape}; text inputs need the "
            "shape (batch,) or (batch, 1), one document per row."
        )
    length = 0
    vectorizer = text_vectorizer(model, tensor)
    if vectorizer is not None and _pads_to_fixed_length(vectorizer):
        length = int(vectorizer.get_config()["output_sequence_length"])
    return InputInfo(tensor.name, field, length, TEXT_INPUT, len(shape))


def default_layer_names(model: keras.Model) -> list[str]:
    """The `--layer` of each layer call whose output feeds the output layers (the penultimate vectors).

    A shared layer feeding them from several calls (a siamese tower) gives one
    `--layer` per call: `dense` and `dense:1`.
    """
    output_layers = {keras_graph.producing_call(t)[0].name for t in model.outputs}
    layer_names = {layer.name for layer in model.layers}
    specs: list[str] = []
    for tensor in model.outputs:
        _, node = keras_graph.producing_call(tensor)
        for parent in keras_graph.node_inputs(node):
            layer, parent_node = keras_graph.producing_call(parent)
            # Masks and other plain ops (not_equal, ...) are not layers one can export.
            if layer.name in output_layers or layer.name not in layer_names:
                continue
            call = keras_graph.model_nodes(model, layer).index(parent_node)
            text = spec_text(layer.name, call, layer_names)
            if text is not None and text not in specs:
                specs.append(text)
    return specs


def cut_model(model: keras.Model, layer_texts: Sequence[str]) -> tuple[list[LayerSpec], keras.Model]:
    """`(specs, sub_model)`: the parsed --layer specs and the model cut down to them."""
    try:
        # The model's names first: a layer named "pool:1" or "a=b" is selected by its name.
        names = {layer.name for layer in model.layers}
        specs = [parse_layer_spec(text, names) for text in layer_texts]
        return specs, truncate(model, specs)
    except ValueError as error:
        raise ExportConfigError(str(error)) from None


def describe_input(tensor: keras.KerasTensor, model: keras.Model, field: str) -> InputInfo:
    """The `InputInfo` of one input of `model`, read from corpus field `field`.

    Raises:
        ExportConfigError: the input is neither token ids of a fixed length nor strings, with the fix.
    """
    if str(tensor.dtype) == "string":
        return text_input_info(tensor, model, field)
    if len(tensor.shape) != 2 or tensor.shape[1] is None:
        raise ExportConfigError(
            f"Model input {tensor.name!r} has shape {tuple(tensor.shape)}; token-id inputs need the "
            "shape (batch, length) with a fixed length, the length the documents were padded to in "
            "training. Rebuild the model with Input(shape=(N,)) (or Embedding(..., input_length=N) in "
            "Keras 2) at that length, copy the weights (new.set_weights(old.get_weights())) and save "
            "it again."
        )
    return InputInfo(tensor.name, field, int(tensor.shape[1]))


def describe_inputs(sub_model: keras.Model, mapping: Mapping[str, str]) -> tuple[InputInfo, ...]:
    """An `InputInfo` per input of the sub-model: token ids of a fixed length, or strings."""
    return tuple(describe_input(tensor, sub_model, mapping[tensor.name]) for tensor in sub_model.inputs)


def column_kind(
    shape: Sequence[int | None],
    dependencies: Sequence[str],
    lengths: Mapping[str, int],
    text_inputs: Collection[str] = (),
) -> str | None:
    """VECTOR for (batch, dim); SEQUENCE for (batch, tokens, dim) aligned with its one input; else None.

    A dim that is not fixed (None) is neither: its rows would not form one column.
    (batch, 1, dim) computed from string inputs is one vector per document too, unless
    a vectorizer pads the input to 1 token: Keras gives a TextVectorization of counts
    or one-hot vectors (multi_hot, tf_idf) on a (batch, 1) input that shape, though it
    computes (batch, dim), also where another vectorizer of the input pads it to a
    length (a wide and deep model), and a StringLookup then Embedding of a (batch, 1)
    input looks up one token per document.

    Args:
        shape: the layer output's shape.
        dependencies: the model inputs it is computed from.
        lengths: model input name -> its length (tokens; 0 for a string input without one).
        text_inputs: the names of the model's string inputs.
    """
    if len(shape) == 2:
        return VECTOR if shape[1] is not None else None
    if len(shape) == 3 and len(dependencies) == 1 and shape[1] == lengths.get(dependencies[0]):
        return SEQUENCE
    one_per_document = all(name in text_inputs for name in dependencies)
    if len(shape) == 3 and shape[1] == 1 and shape[2] is not None and dependencies and one_per_document:
        return VECTOR
    return None


def _nested_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The layers of `model` and of the models nested in it, at any depth, but not the layers a
    wrapper holds (a Bidirectional's backward layer reads backwards; the wrapper turns it back)."""
    layers = []
    for layer in model.layers:
        layers.append(layer)
        if isinstance(layer, keras.Model):
            layers += _nested_layers(layer)
    return layers


def _is_stateful(layer: object) -> bool:
    inner = [layer, getattr(layer, "forward_layer", None), getattr(layer, "backward_layer", None)]
    return any(getattr(candidate, "stateful", False) for candidate in inner)


def check_computed_per_document(spec: LayerSpec, tensor: keras.KerasTensor, kind: str | None) -> None:
    """Refuses a column that does not depend on its document alone, or whose tokens are out of order.

    A stateful recurrent layer carries its state from one batch to the next, so a
    document's vector would depend on the documents before it. A recurrent layer
    with `go_backwards=True` (outside a Bidirectional, which turns them back)
    returns its sequence last step first, so per-token values would be matched
    to the wrong tokens.

    Raises:
        ExportConfigError: naming the layer and what to do instead.
    """
    layers = keras_graph.upstream_operations(tensor)
    # A nested model (an encoder) is one operation of the graph: its own layers count too.
    layers += [inner for layer in layers if isinstance(layer, keras.Model) for inner in _nested_layers(layer)]
    stateful = [layer.name for layer in layers if _is_stateful(layer)]
    if stateful:
        raise ExportConfigError(
            f"Layer {stateful[0]!r} (under --layer {spec.layer!r}) is stateful (stateful=True): it "
            "carries its state from one batch to the next, so a document's vector would depend on the "
            "documents exported before it. Rebuild the model with stateful=False, load its weights "
            "(model.set_weights(stateful_model.get_weights())) and export that model."
        )
    uneven = [
        layer.name
        for layer in layers
        if isinstance(layer, keras.layers.Bidirectional)
        and getattr(layer.forward_layer, "units", None) != getattr(layer.backward_layer, "units", None)
    ]
    if uneven:
        raise ExportConfigError(
            f"Bidirectional layer {uneven[0]!r} (under --layer {spec.layer!r}) has a backward layer of "
            "another width than its forward one: Keras 3 computes its output shape as if both were "
            "the forward one's, so the export would plan columns of the wrong width. Give both "
            "directions the same units."
        )
    backwards = [
        layer.name
        for layer in layers
        if isinstance(layer, keras.layers.RNN) and layer.go_backwards and layer.return_sequences
    ]
    if kind == SEQUENCE and backwards:
        raise ExportConfigError(
            f"Layer {backwards[0]!r} reads its sequence backwards (go_backwards=True) and returns its "
            f"outputs last step first, so the per-token values of --layer {spec.layer!r} cannot be "
            "matched to the document's tokens (nor pooled over them). Export a vector layer, or a "
            "Bidirectional layer (which returns its backward outputs in token order)."
        )


def check_one_vectorizer(
    sub_model: keras.Model, spec: LayerSpec, tensor: keras.KerasTensor, input_name: str
) -> None:
    """Refuses a per-token column of a string input whose tokens are not those that mark its real tokens.

    The real tokens of a string input are where `text_vectorizer` emits a
    non-zero id; a column computed through another TextVectorization of that
    input (words and characters), or through several, has other tokens.

    Raises:
        ExportConfigError: naming the vectorizers and what to export instead.
    """
    input_tensor = next(t for t in sub_model.inputs if t.name == input_name)
    marker = text_vectorizer(sub_model, input_tensor)
    readers = [
        operation.name
        for operation in keras_graph.upstream_operations(tensor)
        if isinstance(operation, keras.layers.TextVectorization) and reads_directly(operation, input_tensor)
    ]
    if marker is not None and readers == [marker.name]:
        return
    where = (
        f"Layer {spec.layer!r} (call {spec.call}) outputs one vector per token of the string input "
        f"{input_name!r}"
    )
    if len(readers) > 1:
        raise ExportConfigError(
            f"{where} but is computed from {len(readers)} TextVectorization layers of it "
            f"({', '.join(sorted(readers))}), so its tokens are no one vectorizer's tokens and cannot be "
            "told from padding. Export a vector layer (e.g. a pooling or LSTM layer) instead."
        )
    if not readers or marker is None:
        raise ExportConfigError(
            f"{where} but is computed through no TextVectorization layer that reads that input, so its "
            "real tokens cannot be told from padding. Export a vector layer (e.g. a pooling or LSTM "
            "layer) instead."
        )
    raise ExportConfigError(
        f"{where} through TextVectorization {readers[0]!r}, but the export marks that input's real tokens "
        f"with TextVectorization {marker.name!r}, which the other --layer values also read. Export the "
        f"per-token layers of {readers[0]!r} in a run of their own (e.g. --layer {spec.layer} alone)."
    )


def describe_columns(
    sub_model: keras.Model, specs: Sequence[LayerSpec], inputs: Sequence[InputInfo], pooling: str
) -> list[ColumnInfo]:
    """A `ColumnInfo` per --layer; refuses outputs that are neither vectors nor per-token sequences."""
    lengths = {info.name: info.length for info in inputs}
    text_inputs = {info.name for info in inputs if info.takes == TEXT_INPUT}
    outputs = sub_model.output if isinstance(sub_model.output, dict) else {specs[0].column: sub_model.output}
    columns = []
    for spec in specs:
        tensor = outputs[spec.column]
        shape = tensor.shape
        dependencies = keras_graph.input_dependencies(sub_model, tensor)
        kind = column_kind(shape, dependencies, lengths, text_inputs)
        check_computed_per_document(spec, tensor, kind)
        if kind == SEQUENCE and dependencies[0] in text_inputs:
            check_one_vectorizer(sub_model, spec, tensor, dependencies[0])
        if kind == VECTOR:
            columns.append(ColumnInfo(spec.column, spec.layer, spec.call, VECTOR, int(shape[-1]), "", "none"))
        elif kind == SEQUENCE:
            columns.append(
                ColumnInfo(
                    spec.column, spec.layer, spec.call, SEQUENCE, int(shape[2]), dependencies[0], pooling
                )
            )
        elif len(shape) == 2:
            raise ExportConfigError(
                f"Layer {spec.layer!r} (call {spec.call}) outputs shape {tuple(shape)}: its width depends "
                "on the document (such as the ids of a TextVectorization without a fixed "
                "output_sequence_length), so its rows cannot form one column. Pick another --layer."
            )
        elif len(shape) == 3 and len(dependencies) == 1 and dependencies[0] in text_inputs:
            # Per-token through another vectorizer (of another length) than the input's marker.
            check_one_vectorizer(sub_model, spec, tensor, dependencies[0])
            raise ExportConfigError(
                f"Layer {spec.layer!r} (call {spec.call}) outputs one vector per token of the string "
                f"input {dependencies[0]!r}, but that input feeds no TextVectorization layer with "
                "output_mode='int' and a fixed output_sequence_length (of "
                f"{shape[1]} tokens), so its real tokens cannot be told from padding. Export a "
                "vector layer (e.g. a pooling or LSTM layer) instead."
            )
        else:
            raise ExportConfigError(
                f"Layer {spec.layer!r} (call {spec.call}) outputs shape {tuple(shape)}; only "
                "vectors (batch, dim) and per-token sequences (batch, tokens, dim) aligned with "
                "one model input can be exported. Pick another --layer."
            )
    return columns


def embedding_reads(model: keras.Model) -> list[tuple[keras.layers.Embedding, keras.KerasTensor]]:
    """`(Embedding, model input)` for each call of an Embedding that reads an input of `model` as ids.

    The Embedding reads the input directly or through dtype casts only, in
    `model` or in a model nested in it (at any depth), fed by that nested
    model's call. An Embedding behind a layer that remaps ids (`Hashing`,
    `IntegerLookup`) does not read the input's ids, so it does not limit them.
    """
    inputs = {id(tensor): tensor for tensor in model.inputs}
    reads: list[tuple[keras.layers.Embedding, keras.KerasTensor]] = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.Embedding):
            for node in keras_graph.model_nodes(model, layer):
                source = keras_graph.through_casts(keras_graph.node_inputs(node)[0])
                if id(source) in inputs:
                    reads.append((layer, inputs[id(source)]))
        elif isinstance(layer, keras.Model):
            inner = embedding_reads(layer)
            positions = {id(tensor): position for position, tensor in enumerate(layer.inputs)}
            for node in keras_graph.model_nodes(model, layer):
                arguments = keras_graph.node_inputs(node)
                if len(arguments) != len(layer.inputs):
                    continue  # inputs given in a structure whose order is not the model's
                for embedding, inner_input in inner:
                    source = keras_graph.through_casts(arguments[positions[id(inner_input)]])
                    if id(source) in inputs:
                        reads.append((embedding, inputs[id(source)]))
    return reads


def embedding_limits(sub_model: keras.Model, inputs: Sequence[InputInfo]) -> EmbeddingLimits:
    """{token-id input name: (smallest input_dim of the Embeddings reading its ids, that layer's name)}."""
    token_inputs = {info.name for info in inputs if info.takes == IDS_INPUT}
    limits: EmbeddingLimits = {}
    for layer, tensor in embedding_reads(sub_model):
        name = tensor.name
        if name in token_inputs and (name not in limits or layer.input_dim < limits[name][0]):
            limits[name] = (layer.input_dim, layer.name)
    return limits


def embedding_fed_inputs(model: keras.Model) -> set[str]:
    """The names of the inputs of `model` that an Embedding's ids are computed from."""
    # An Embedding behind a layer that remaps ids (Hashing) is fed them too; one inside a nested
    # model (an encoder) is fed by the inputs of that model's calls.
    fed: set[str] = set()
    for layer in model.layers:
        if isinstance(layer, keras.layers.Embedding):
            for node in keras_graph.model_nodes(model, layer):
                fed.update(keras_graph.input_dependencies(model, keras_graph.node_outputs(node)[0]))
        if isinstance(layer, keras.Model) and any(
            isinstance(inner, keras.layers.Embedding) for inner in _nested_layers(layer)
        ):
            for node in keras_graph.model_nodes(model, layer):
                for tensor in keras_graph.node_inputs(node):
                    fed.update(keras_graph.input_dependencies(model, tensor))
    return fed


def check_float_inputs_feed_an_embedding(
    sub_model: keras.Model, inputs: Sequence[InputInfo], limits: EmbeddingLimits
) -> None:
    """Refuses a float input that reaches no Embedding: numeric features, not token ids.

    Keras 2's `Input(shape=(n,))` is float32 and feeds an Embedding token ids as
    floats; a float input that feeds no Embedding (a Dense of numeric features)
    would be fed the document's token ids as if they were its features.

    Raises:
        ExportConfigError: naming the input.
    """
    fed = set(limits) | embedding_fed_inputs(sub_model)
    dtypes = {tensor.name: str(tensor.dtype) for tensor in sub_model.inputs}
    for info in inputs:
        if info.takes == IDS_INPUT and "float" in dtypes[info.name] and info.name not in fed:
            raise ExportConfigError(
                f"Model input {info.name!r} takes {dtypes[info.name]} values and feeds no Embedding "
                "layer, so it holds numeric features, not token ids: the export feeds text (or token "
                "ids) only. Export a layer that does not depend on it."
            )


def input_refusals(model: keras.Model) -> dict[str, str]:
    """{model input name: why an export refuses to feed it}, by the checks a run makes of a sub-model.

    An input that is neither strings nor token ids of a fixed length (an image), or a float input
    that feeds no Embedding (numeric features), is refused; an export may still read the others.
    """
    refusals: dict[str, str] = {}
    for tensor in model.inputs:
        try:
            info = describe_input(tensor, model, tensor.name)
            check_float_inputs_feed_an_embedding(model, [info], embedding_limits(model, [info]))
        except ExportConfigError as error:
            refusals[tensor.name] = str(error)
    return refusals
