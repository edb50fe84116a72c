"""Cuts a trained model down to a sub-model whose outputs are chosen layers.

This is the tutorial's `Model(inputs=model.input, outputs=model.get_layer('emb').output)`
made safe: a layer called several times (a shared embedding) has one output per
call and the caller picks which; and the sub-model takes only the inputs its
outputs depend on, so exporting `lstm_content` does not need a `title` field.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Collection, Sequence

import keras

from models import keras_graph
from models.keras2_config import renamed_layers

_COLUMN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# CALL is ASCII digits: `\d` and str.isdigit() also take other scripts' digits (١, ², ...).
_SPEC = re.compile(r"^(?:(?P<column>[A-Za-z_][A-Za-z0-9_]*)=)?(?P<layer>[^=:]+?)(?::(?P<call>[0-9]+))?$")


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """One exported layer: output column name, layer name, and which call of it."""

    column: str
    layer: str
    call: int = 0


def parse_layer_spec(text: str, layer_names: Collection[str] = ()) -> LayerSpec:
    """Parses `[COLUMN=]LAYER[:CALL]` into a `LayerSpec`.

    The column defaults to the layer name (characters other than letters, digits
    and `_` made `_`), with `_callK` appended for K > 0.  Given the model's
    `layer_names`, a name that itself holds `:` or `=` (Keras allows both) is
    read whole: a spec equal to a layer's name selects it, and `:CALL` and
    `COLUMN=` are split off only where what remains is a layer's name.
    """
    stripped = text.strip()
    for column, rest in _column_splits(stripped):
        if rest in layer_names:
            return _spec(column, rest, 0)
        layer, colon, call = rest.rpartition(":")
        if colon and call.isascii() and call.isdigit() and layer in layer_names:
            return _spec(column, layer, int(call))
    match = _SPEC.match(stripped)
    if not match:
        raise ValueError(
            f"Invalid layer spec {text!r}: expected [COLUMN=]LAYER[:CALL], e.g. "
            "'emb', 'emb:1' or 'title_tokens=emb:1'."
        )
    return _spec(match["column"], match["layer"], int(match["call"] or 0))


def _column_splits(text: str) -> list[tuple[str | None, str]]:
    """`(column, rest)` readings of a spec: no column, then a leading `COLUMN=` if it has one."""
    readings: list[tuple[str | None, str]] = [(None, text)]
    column, equals, rest = text.partition("=")
    if equals and _COLUMN.fullmatch(column):
        readings.append((column, rest))
    return readings


def _spec(column: str | None, layer: str, call: int) -> LayerSpec:
    """A `LayerSpec` with the default column name where `column` is None."""
    if column is None:
        base = re.sub(r"[^A-Za-z0-9_]", "_", layer)
        column = base if call == 0 else f"{base}_call{call}"
    return LayerSpec(column=column, layer=layer, call=call)


def spec_text(layer: str, call: int, layer_names: Collection[str]) -> str | None:
    """The `--layer` text that selects call `call` of `layer` (`parse_layer_spec` reads it back), or None.

    None where no text can: call K of a layer "L" when another layer is named "L:K",
    which the spec "L:K" selects instead.
    """
    text = layer if call == 0 else f"{layer}:{call}"
    if call and text in layer_names:
        return None
    return text


def layer_calls(model: keras.Model) -> dict[str, list[keras.KerasTensor | list[keras.KerasTensor]]]:
    """Maps each layer name to the output tensor of each of its calls in `model`.

    Only calls that belong to `model`'s own graph count: a layer shared with
    another model built in the same process keeps those other calls to itself.
    """
    calls: dict[str, list[keras.KerasTensor | list[keras.KerasTensor]]] = {}
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        tensors: list[keras.KerasTensor | list[keras.KerasTensor]] = []
        for node in keras_graph.model_nodes(model, layer):
            outputs = keras_graph.node_outputs(node)
            tensors.append(outputs[0] if len(outputs) == 1 else outputs)
        calls[layer.name] = tensors
    return calls


def describe_layers(model: keras.Model) -> str:
    """One line per layer: its name and how many calls it has."""
    return ", ".join(
        f"{name} ({len(tensors)} call{'s' * (len(tensors) != 1)})"
        for name, tensors in layer_calls(model).items()
    )


def nested_holder(model: keras.Model, name: str) -> str | None:
    """The name of the top-level layer of `model` that holds a layer `name` in a nested model, or None."""
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            inner = [candidate.name for candidate in layer.layers]
            if name in inner or any(
                nested_holder(candidate, name)
                for candidate in layer.layers
                if isinstance(candidate, keras.Model)
            ):
                return layer.name
    return None


def resolve_layer(
    model: keras.Model,
    spec: LayerSpec,
    calls: dict[str, list[keras.KerasTensor | list[keras.KerasTensor]]] | None = None,
) -> keras.KerasTensor:
    """Returns the output tensor that `spec` selects; raises ValueError if none."""
    calls = layer_calls(model) if calls is None else calls
    if spec.layer not in calls:
        holder = nested_holder(model, spec.layer)
        if holder is not None:
            raise ValueError(
                f"Layer {spec.layer!r} is inside the nested model {holder!r}, and only the layers of "
                f"the model itself can be exported: pass --layer {holder} for the nested model's output, "
                "or rebuild the model with its layers at the top level (a functional model) and copy "
                "the weights."
            )
        renamed = renamed_layers(model).get(spec.layer)
        if renamed is not None:  # The close matches would offer another layer (`a_b` beside `a/b`).
            call = f":{spec.call}" if spec.call else ""
            raise ValueError(
                f"Layer {spec.layer!r} of the model file is called {renamed!r} here, as Keras 3 does not "
                f"allow '/' in layer names: pass --layer {renamed}{call}."
            )
        close = difflib.get_close_matches(spec.layer, list(calls), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(name) for name in close)}?" if close else ""
        raise ValueError(
            f"The model has no layer named {spec.layer!r}.{hint} Its layers are: "
            f"{describe_layers(model)}. Pass --layer with one of these names "
            "(`python -m pipeline.inspect MODEL` shows each call's shape and inputs)."
        )
    tensors = calls[spec.layer]
    if not 0 <= spec.call < len(tensors):
        raise ValueError(
            f"Layer {spec.layer!r} has {len(tensors)} call(s) in this model, so call "
            f"{spec.call} does not exist; use {spec.layer}:0"
            + (f" .. {spec.layer}:{len(tensors) - 1}." if len(tensors) > 1 else ".")
        )
    tensor = tensors[spec.call]
    if isinstance(tensor, (list, tuple)):
        raise ValueError(
            f"Layer {spec.layer!r} returns {len(tensor)} tensors per call; only layers "
            "with one output tensor can be exported. To export one of them, add a layer that reads it to "
            "the model (keras.layers.Identity(name='NAME')(tensor); for a Bidirectional(merge_mode=None), "
            "keras.layers.Concatenate(name='NAME')(outputs)), save the model and pass --layer NAME."
        )
    return tensor


def truncate(model: keras.Model, specs: Sequence[LayerSpec]) -> keras.Model:
    """Builds one sub-model that computes every requested layer in one forward pass.

    Args:
        model: a functional Keras model.
        specs: `LayerSpec`s with distinct column names.

    Returns:
        A `keras.Model` whose inputs are a dict of only the needed inputs (keyed by
        input name, in the model's order) and whose outputs are a dict keyed by
        column name.
    """
    if not specs:
        raise ValueError("No layers to export: pass at least one --layer.")
    columns = [spec.column for spec in specs]
    duplicates = sorted({column for column in columns if columns.count(column) > 1})
    if duplicates:
        raise ValueError(
            f"Two --layer specs write the same column {duplicates}; name them apart with COLUMN=LAYER[:CALL]."
        )
    calls = layer_calls(model)
    outputs = {spec.column: resolve_layer(model, spec, calls) for spec in specs}
    needed: set[str] = set()
    for tensor in outputs.values():
        needed.update(keras_graph.input_dependencies(model, tensor))
    inputs = {t.name: t for t in model.inputs if t.name in needed}
    return keras.Model(inputs=inputs, outputs=outputs, name=f"{model.name}_truncated")
