"""Translates Keras 2 (tf_keras) layer and model configs into their Keras 3 equivalents.

Keras 3 refuses most configs written by Keras 2: they carry arguments it no
longer accepts (an LSTM's `time_major`, an Embedding's `input_length`, ...).
Only arguments that do not change the computation are dropped or renamed;
anything else raises `LegacyModelError` with the reason and the fix.
`models.legacy` loads files with these translations.
"""

from __future__ import annotations

import copy
import typing
import weakref
from collections.abc import Iterator

# A layer or model config as Keras serialises it to JSON (class_name, config, ...).
Config = dict[str, typing.Any]

# Keras 2 layer types whose `.h5` configs are translated and whose outputs are
# checked against tf_keras in tests/test_byo_model.py.  Layers not listed here
# still load when their Keras 2 config is also valid in Keras 3 (most built-in
# layers); those that need translation and are not listed raise LegacyModelError.
SUPPORTED_LAYERS = (
    "InputLayer",
    "Embedding",
    "LSTM",
    "GRU",
    "SimpleRNN",
    "Bidirectional",
    "TimeDistributed",
    "Dense",
    "Dropout",
    "SpatialDropout1D",
    "Activation",
    "Conv1D",
    "SeparableConv1D",
    "DepthwiseConv1D",
    "MaxPooling1D",
    "GlobalAveragePooling1D",
    "GlobalMaxPooling1D",
    "BatchNormalization",
    "LayerNormalization",
    "Attention",
    "AdditiveAttention",
    "MultiHeadAttention",
    "RNN",
    "Add",
    "Subtract",
    "Concatenate",
    "Average",
    "Multiply",
    "Maximum",
    "Minimum",
    "Masking",
    "Identity",
    "Rescaling",
    "Normalization",
    "ThresholdedReLU",
    "Flatten",
    "Reshape",
    "Lambda",
    "Functional",
    "Sequential",
)

# Keras 2 layers that record a TensorFlow op by name rather than a layer (what
# `x + y` or `tf.reduce_mean(x)` on Keras 2 tensors becomes); Keras 3 has no
# equivalent.
TF_OP_LAYERS = (
    "TFOpLambda",
    "SlicingOpLambda",
    "TensorFlowOpLayer",
    "InstanceProperty",
    "InstanceMethod",
    "ClassMethod",
)

RNN_LAYERS = ("LSTM", "GRU", "SimpleRNN", "RNN", "ConvLSTM1D", "ConvLSTM2D", "ConvLSTM3D")
WRAPPERS = ("Bidirectional", "TimeDistributed")
MODELS = ("Functional", "Model", "Sequential")
LAMBDA = "Lambda"

# Keras 2 BatchNormalization arguments that Keras 3 lacks, with the value that
# makes them a no-op at inference.
_BATCH_NORM_DEFAULTS = {"fused": None, "virtual_batch_size": None, "adjustment": None}
# What Keras 2's MultiHeadAttention recorded of the shapes it was built with; Keras 3 builds it
# from its call instead.
_ATTENTION_BUILD_SHAPES = ("query_shape", "key_shape", "value_shape")
_SEPARABLE_CONVOLUTIONS = ("SeparableConv1D", "SeparableConv2D", "DepthwiseConv1D", "DepthwiseConv2D")
_LAMBDA_LEGACY_KEYS = (
    "module",
    "function_type",
    "output_shape_type",
    "output_shape_module",
    "mask_type",
    "mask_module",
)


# Keras 2's hard_sigmoid is clip(0.2 x + 0.5, 0, 1), Keras 3's clip(x / 6 + 0.5, 0, 1): the name
# alone would load the Keras 3 function. It is the LSTM/GRU recurrent activation of TF 1.x models.
KERAS2_HARD_SIGMOID = "keras2_hard_sigmoid"
_KERAS2_HARD_SIGMOID_CONFIG = {
    "module": "builtins",
    "class_name": "function",
    "config": f"embexport>{KERAS2_HARD_SIGMOID}",
    "registered_name": "function",
}
_ACTIVATION_KEYS = ("activation", "recurrent_activation")

# Keras 2 merge layers whose masks Keras 3 computes otherwise; a translated config names the class of
# `models.keras2_layers` that computes as Keras 2 did, registered in this package.
KERAS2_MERGE_LAYERS = ("Add", "Subtract", "Average", "Multiply", "Maximum", "Minimum", "Concatenate")
# Keras 2 layers that passed no mask on, where Keras 3's namesakes do (a pooling after them read the
# padding in Keras 2), and Keras 2's ThresholdedReLU, which Keras 3 lacks: each is built as the
# class of `models.keras2_layers` that computes as Keras 2 did.
KERAS2_UNMASKED_LAYERS = ("Identity", "Rescaling", "Normalization")
KERAS2_ONLY_LAYERS = ("ThresholdedReLU",)
KERAS2_LAYERS_PACKAGE = "embexport_keras2"


class LegacyModelError(ValueError):
    """A model file cannot be loaded into Keras 3, with the reason and the fix."""


def _walk_layers(config: Config) -> Iterator[Config]:
    """Yields every layer config in `config`, nested models and wrapped layers included."""
    yield config
    inner = config.get("config", {})
    if not isinstance(inner, dict):
        return
    if config.get("class_name") in MODELS or isinstance(inner.get("layers"), list):
        for layer in inner.get("layers", []):
            yield from _walk_layers(layer)
    for key in ("layer", "backward_layer", "cell"):
        if isinstance(inner.get(key), dict) and "class_name" in inner[key]:
            yield from _walk_layers(inner[key])
    for cell in inner.get("cells", []) if isinstance(inner.get("cells"), list) else []:
        if isinstance(cell, dict) and "class_name" in cell:
            yield from _walk_layers(cell)


def lambda_layer_names(config: Config) -> list[str]:
    """Names of the `Lambda` layers anywhere in a model config."""
    return [
        layer["config"].get("name", "?")
        for layer in _walk_layers(config)
        if layer.get("class_name") == LAMBDA
    ]


def _activation_name(value: object) -> str | None:
    # A name ("relu"), or a function as Keras 2 serialises one: {"class_name": "function", "config": NAME}.
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("config"), str):
        return value["config"]
    return None


def activation_names(config: Config) -> list[tuple[str, str]]:
    """(layer name, activation name) of every activation a model config names."""
    found = []
    for layer in _walk_layers(config):
        inner = layer.get("config")
        if not isinstance(inner, dict):
            continue
        for key in _ACTIVATION_KEYS:
            name = _activation_name(inner.get(key))
            if name is not None:
                found.append((inner.get("name", "?"), name))
    return found


def _policy_name(dtype: str | Config | None) -> str | Config | None:
    # tf_keras >= 2.13 stores {"class_name": "Policy", "config": {"name": "float32"}}.
    if isinstance(dtype, dict) and dtype.get("class_name") in ("Policy", "DTypePolicy"):
        return dtype.get("config", {}).get("name", "float32")
    return dtype


def _translate_lambda(layer_config: Config, config: Config, name: str) -> None:
    for key in _LAMBDA_LEGACY_KEYS:
        config.pop(key, None)
    for key in ("function", "output_shape", "mask"):
        value = config.get(key)
        if isinstance(value, list) and len(value) == 3 and isinstance(value[0], str):
            # Keras 2 stores (marshalled code, defaults, closure) as a list.
            config[key] = {
                "class_name": "__lambda__",
                "config": {"code": value[0], "defaults": value[1], "closure": value[2]},
            }
        elif key != "output_shape" and isinstance(value, str):
            role = "calls" if key == "function" else "computes its mask with"
            raise LegacyModelError(
                f"Lambda layer {name!r} {role} the named Python function {value!r}, which the "
                "file does not contain. Rebuild the model with that function replaced by a "
                "lambda or a built-in layer."
            )
    if config.get("mask") is not None:
        # `Lambda(f, mask=lambda inputs, mask: mask)`, which keeps the mask on: Keras 3's Lambda
        # builds the function and output shape from such a config but not the mask.
        _keras2_class(layer_config, LAMBDA)
    if isinstance(config.get("output_shape"), list):
        config["output_shape"] = [None if d is None else int(d) for d in config["output_shape"]]


def _is_node_reference(value: object) -> typing.TypeGuard[list[typing.Any]]:
    return (
        isinstance(value, list)
        and len(value) in (3, 4)
        and isinstance(value[0], str)
        and isinstance(value[1], int)
        and isinstance(value[2], int)
    )


def _renumber_nested_model_nodes(model_config: Config) -> None:
    """Shifts references to the calls of nested models down by one, in place.

    A Keras 2 model built on an Input has a node 0 of its own (its inputs to its
    outputs), so when it is used as a layer its first call is node 1.  Keras 3
    has no such node: the first call is node 0.
    """
    shifted: set[str] = set()
    for layer in model_config.get("layers", []):
        inner = layer.get("config", {})
        if layer.get("class_name") in ("Model", "Sequential") and (
            layer["class_name"] == "Model"
            or (inner.get("layers") and inner["layers"][0].get("class_name") == "InputLayer")
        ):
            shifted.add(inner.get("name", layer.get("name")))
    if not shifted:
        return

    def renumber(reference: list[typing.Any]) -> None:
        if reference[0] in shifted:
            reference[1] -= 1

    for layer in model_config.get("layers", []):
        for node in layer.get("inbound_nodes", []):
            for reference in node if isinstance(node, list) else []:
                if _is_node_reference(reference):
                    renumber(reference)
                    if len(reference) == 4:
                        for inner in _node_references(reference[3]):
                            renumber(inner)
    for key in ("input_layers", "output_layers"):
        references = model_config.get(key)
        if _is_node_reference(references):
            renumber(references)
        elif isinstance(references, list):
            for reference in references:
                if _is_node_reference(reference):
                    renumber(reference)


def _node_references(value: object) -> list[list[typing.Any]]:
    """The `[layer, node, tensor]` references in a Keras 2 call's keyword arguments, at any depth."""
    if _is_node_reference(value) and len(value) == 3:
        return [value]
    if isinstance(value, list):
        return [reference for item in value for reference in _node_references(item)]
    if isinstance(value, dict):
        return [reference for item in value.values() for reference in _node_references(item)]
    return []


def _revived(value: typing.Any, layer_names: set[str]) -> typing.Any:
    """A Keras 2 call argument with each reference to a layer's output as Keras 3 writes a tensor."""
    if _is_node_reference(value) and len(value) == 3 and value[0] in layer_names:
        # Keras 3 swaps this placeholder for the output of that call (its shape is not read).
        return {
            "class_name": "__keras_tensor__",
            "config": {"shape": [], "dtype": "float32", "keras_history": list(value)},
        }
    if isinstance(value, list):
        return [_revived(item, layer_names) for item in value]
    if isinstance(value, dict):
        return {key: _revived(item, layer_names) for key, item in value.items()}
    return value


def _revive_call_tensors(model_config: Config) -> None:
    """Rewrites, in place, the Keras 2 calls that pass layer outputs other than as the inputs.

    Keras 2 writes a call as `[[layer, node, tensor, kwargs], ...]`, a tensor in
    `kwargs` as another `[layer, node, tensor]`; Keras 3 reads that format but
    passes `kwargs` on as they are, so `MultiHeadAttention()(query, value=value)`
    got a list for its value. And Keras 2 lists a recurrent layer's
    `initial_state` among its inputs (an encoder's states starting a decoder),
    which Keras 3 took as more inputs than the layer has. Such calls are written in
    Keras 3's own format instead.
    """
    names = {
        layer["config"]["name"]
        for layer in model_config.get("layers", [])
        if isinstance(layer.get("config"), dict) and isinstance(layer["config"].get("name"), str)
    }
    for layer in model_config.get("layers", []):
        nodes = layer.get("inbound_nodes", [])
        recurrent = layer.get("class_name") in (*RNN_LAYERS, "Bidirectional")
        for index, node in enumerate(nodes):
            if not isinstance(node, list) or not node or not all(_is_node_reference(r) for r in node):
                continue
            kwargs = node[0][3] if len(node[0]) == 4 else {}
            with_states = recurrent and len(node) > 1
            if not with_states and not any(reference[0] in names for reference in _node_references(kwargs)):
                continue
            inputs = [_revived(list(reference[:3]), names) for reference in node]
            kwargs = _revived(kwargs, names)
            if with_states:
                # Keras 2 records a Bidirectional's call with `constants`, which Keras 3's lacks.
                kwargs = {
                    key: value for key, value in kwargs.items() if key != "constants" or value is not None
                }
                inputs, kwargs = inputs[:1], {**kwargs, "initial_state": inputs[1:]}
            nodes[index] = {"args": [inputs[0] if len(inputs) == 1 else inputs], "kwargs": kwargs}


def _spell_out_backward_layer(class_name: str, config: Config) -> None:
    """Gives a Keras 2 Bidirectional of a `go_backwards=True` layer its backward layer, in place.

    Keras 2 makes the backward copy read the other way than the layer it wraps,
    so a wrapped layer with `go_backwards=True` gets a copy reading forwards;
    Keras 3 always makes it read backwards, and then refuses two layers reading
    the same way. Spelling the copy out keeps Keras 2's directions.
    """
    layer = config.get("layer")
    if class_name != "Bidirectional" or config.get("backward_layer") or not isinstance(layer, dict):
        return
    inner = layer.get("config")
    if not isinstance(inner, dict) or not inner.get("go_backwards"):
        return
    backward = copy.deepcopy(layer)
    backward["config"]["go_backwards"] = False
    name = str(inner.get("name", ""))
    backward["config"]["name"] = "backward_" + name.removeprefix("forward_")
    config["backward_layer"] = backward


def _keras2_class(layer_config: Config, class_name: str) -> None:
    """Makes a layer config name the class of `models.keras2_layers` that computes as Keras 2's did."""
    layer_config["module"] = None
    layer_config["registered_name"] = f"{KERAS2_LAYERS_PACKAGE}>{class_name}"


def translate_layer_config(layer_config: Config) -> Config:
    """Rewrites one Keras 2 layer config (and the layers nested in it) for Keras 3, in place.

    Raises:
        LegacyModelError: the layer has no Keras 3 equivalent that computes the same numbers.
    """
    class_name = layer_config.get("class_name")
    config = layer_config.get("config")
    if not isinstance(config, dict):
        return layer_config
    name = config.get("name", "?")
    if class_name in TF_OP_LAYERS:
        raise LegacyModelError(
            f"Layer {name!r} is a Keras 2 {class_name}: a TensorFlow operation applied directly "
            f"to Keras tensors (e.g. `x + y` or `tf.reduce_mean(x)`), recorded as "
            f"{config.get('function', '?')!r}. Keras 3 cannot rebuild these. Re-save the model "
            "with the operation as a layer (keras.layers.Add, Lambda, ...)."
        )
    if "dtype" in config:
        config["dtype"] = _policy_name(config["dtype"])
    for key in _ACTIVATION_KEYS:
        if _activation_name(config.get(key)) == "hard_sigmoid":
            config[key] = copy.deepcopy(_KERAS2_HARD_SIGMOID_CONFIG)
    if class_name == "InputLayer":
        if "batch_input_shape" in config:
            config["batch_shape"] = config.pop("batch_input_shape")
        return layer_config
    # Only the first layer of a Keras 2 Sequential records the input shape; the
    # translated model gets it from its InputLayer or its inputs instead.
    for key in ("batch_input_shape", "input_shape", "batch_size"):
        config.pop(key, None)
    if class_name in MODELS:
        # Keras 3 finds models by public module; `keras.Model.from_config` builds
        # functional configs too.
        layer_config["module"] = "keras"
        layer_config["class_name"] = "Sequential" if class_name == "Sequential" else "Model"
        for layer in config.get("layers", []):
            translate_layer_config(layer)
        _renumber_nested_model_nodes(config)
        _revive_call_tensors(config)
    elif class_name in RNN_LAYERS:
        if config.pop("time_major", False):
            raise LegacyModelError(
                f"Layer {name!r} ({class_name}) was built with time_major=True, which Keras 3 does "
                "not support. Rebuild it with time_major=False (the default)."
            )
        cell = config.get("cell")
        if isinstance(cell, dict):
            translate_layer_config(cell)
            # The cells of `RNN([GRUCell(...), LSTMCell(...)])`.
            for inner in (
                cell.get("config", {}).get("cells", []) if isinstance(cell.get("config"), dict) else []
            ):
                if isinstance(inner, dict):
                    translate_layer_config(inner)
    elif class_name in WRAPPERS:
        _spell_out_backward_layer(class_name, config)
        for key in ("layer", "backward_layer"):
            if isinstance(config.get(key), dict):
                translate_layer_config(config[key])
    elif isinstance(class_name, str) and class_name.startswith("SpatialDropout"):
        # Keras 2 recorded a noise_shape it never let callers set; Keras 3's
        # constructor also rejects `trainable` (meaningless for a layer without weights).
        config.pop("noise_shape", None)
        config.pop("trainable", None)
    elif class_name == "Embedding":
        config.pop("input_length", None)
    elif class_name in _SEPARABLE_CONVOLUTIONS:
        # Keras 2 records its base convolution's arguments, which a depthwise or separable one never
        # uses (its kernels are depthwise_* and pointwise_*); Keras 3 refuses them.
        if config.pop("groups", 1) != 1:
            raise LegacyModelError(f"{class_name} {name!r} sets groups, which Keras 3's {class_name} lacks.")
        for key in ("kernel_initializer", "kernel_regularizer", "kernel_constraint"):
            config.pop(key, None)
    elif class_name == "BatchNormalization":
        axis = config.get("axis")
        if isinstance(axis, list):
            if len(axis) != 1:
                raise LegacyModelError(
                    f"BatchNormalization {name!r} normalises over several axes {axis}; Keras 3 takes one."
                )
            config["axis"] = int(axis[0])
        if config.get("renorm"):
            raise LegacyModelError(
                f"BatchNormalization {name!r} uses renorm=True, which this loader does not translate."
            )
        for key, neutral in _BATCH_NORM_DEFAULTS.items():
            value = config.pop(key, neutral)
            if key != "fused" and value != neutral:
                raise LegacyModelError(
                    f"BatchNormalization {name!r} sets {key}={value!r}, which Keras 3 lacks."
                )
    elif class_name in ("Attention", "AdditiveAttention"):
        # Keras 3 reads a config without "module" with its legacy loader, which turns any string
        # naming a function of keras.layers into that function: Attention's default
        # score_mode="dot" became keras.layers.dot, and Keras 3 then refused it.
        layer_config["module"] = "keras.layers"
        if config.pop("causal", False):
            raise LegacyModelError(
                f"{class_name} {name!r} was built with causal=True, which Keras 3 takes as a call "
                "argument (use_causal_mask=True), not a layer setting. Rebuild the model with "
                "use_causal_mask=True in the layer's call and copy the weights."
            )
    elif class_name == "MultiHeadAttention":
        for key in _ATTENTION_BUILD_SHAPES:
            config.pop(key, None)
        # Dropout does nothing at inference, but with it Keras 3 takes a path whose softmax zeroes a
        # query step that sees no unmasked key (a padding step), where Keras 2 attends uniformly.
        config["dropout"] = 0.0
        # Keras 3's deletes its inputs' masks, and gives a padding query step no attention weights.
        _keras2_class(layer_config, class_name)
        if config.pop("softmax_robust_masking", False):
            raise LegacyModelError(
                f"MultiHeadAttention {name!r} uses softmax_robust_masking=True, which Keras 3 lacks."
            )
    elif class_name == LAMBDA:
        _translate_lambda(layer_config, config, name)
    elif class_name in KERAS2_MERGE_LAYERS:
        # Keras 3 gives a merge of masked sequences the OR of the masks (none where an input has
        # none), Keras 2 the AND: a pooling or LSTM after a residual Add read the padding.
        _keras2_class(layer_config, class_name)
    elif class_name in KERAS2_UNMASKED_LAYERS or class_name in KERAS2_ONLY_LAYERS:
        _keras2_class(layer_config, class_name)
    if isinstance(config.get("axis"), list) and len(config["axis"]) > 1 and class_name not in MODELS:
        # Keras 3's legacy loader keeps an axis only when it is one number: LayerNormalization(axis=[1, 2])
        # fell back to axis=-1, silently where the layer has no weights (UnitNormalization, Softmax).
        layer_config["module"] = "keras.layers"
    return layer_config


def _replace_strings(value: typing.Any, renames: dict[str, str]) -> typing.Any:
    """`value` (a JSON-like config) with every string that is a key of `renames` replaced."""
    if isinstance(value, str):
        return renames.get(value, value)
    if isinstance(value, list):
        return [_replace_strings(item, renames) for item in value]
    if isinstance(value, dict):
        return {key: _replace_strings(item, renames) for key, item in value.items()}
    return value


def rename_slashed_layers(model_config: Config) -> tuple[Config, dict[str, str]]:
    """`(config, {new name: Keras 2 name})`: layers whose names hold a `/` renamed with `_` for it.

    Keras 2 accepts `Embedding(..., name="encoder/emb")` (TensorFlow scope names
    allow `/`); Keras 3 refuses `/` in a layer name. The name is replaced wherever
    the config uses it (the layer, the calls that read it, the model's inputs and
    outputs), by the name with `_` for each `/`, made unique with trailing `_`s.
    """
    names = {
        layer["config"]["name"]
        for layer in _walk_layers(model_config)
        if isinstance(layer.get("config"), dict) and isinstance(layer["config"].get("name"), str)
    }
    renames: dict[str, str] = {}
    for name in sorted(name for name in names if "/" in name):
        new = name.replace("/", "_")
        while new in names or new in renames.values():
            new += "_"
        renames[name] = new
    if not renames:
        return model_config, {}
    return _replace_strings(model_config, renames), {new: old for old, new in renames.items()}


# Each model built from a config `rename_slashed_layers` renamed: {name in the file: name in the model}.
_RENAMED: weakref.WeakKeyDictionary[typing.Any, dict[str, str]] = weakref.WeakKeyDictionary()


def note_renamed_layers(model: typing.Any, renames: dict[str, str]) -> None:
    """Remembers, for as long as `model` lives, the layers it was built with under other names."""
    if renames:
        _RENAMED[model] = dict(renames)


def renamed_layers(model: typing.Any) -> dict[str, str]:
    """`{name in the file: name in the model}` of `model`'s renamed layers (`note_renamed_layers`)."""
    return _RENAMED.get(model, {})


def translate_model_config(model_config: Config) -> Config:
    """A Keras 3 version of a Keras 2 model config (the input is not modified)."""
    translated = copy.deepcopy(model_config)
    translate_layer_config(translated)
    return translated
