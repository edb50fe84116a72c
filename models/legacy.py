"""Loads model files into Keras 3: `.keras` as is, Keras 2 (tf_keras) `.h5` by translating layer configs.

Keras 3 refuses most `.h5` files written by Keras 2: their layer configs carry
arguments it no longer accepts (an LSTM's `time_major`, an Embedding's
`input_length`, ...).  `load_h5_model` reads the file's `model_config` JSON,
rewrites each layer's config to its Keras 3 equivalent (only arguments that do
not change the computation are dropped or renamed; anything else is refused),
rebuilds the model with `keras.saving.deserialize_keras_object`, and copies the
weights from the file's `model_weights` group layer by layer, matched by name.

`Lambda` layers hold Python bytecode that runs when the model is loaded, so any
model with one is refused unless the caller opts in (`allow_unsafe=True`, the
`--allow_unsafe_deserialization` flag).
"""

from __future__ import annotations

import copy
import json
import typing
import zipfile
from collections.abc import Iterator, Sequence

import keras
import numpy as np

if typing.TYPE_CHECKING:
    import h5py

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
    "MaxPooling1D",
    "GlobalAveragePooling1D",
    "GlobalMaxPooling1D",
    "BatchNormalization",
    "LayerNormalization",
    "Add",
    "Concatenate",
    "Average",
    "Multiply",
    "Masking",
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

RNN_LAYERS = ("LSTM", "GRU", "SimpleRNN", "ConvLSTM1D", "ConvLSTM2D", "ConvLSTM3D")
WRAPPERS = ("Bidirectional", "TimeDistributed")
MODELS = ("Functional", "Model", "Sequential")
LAMBDA = "Lambda"

# Keras 2 BatchNormalization arguments that Keras 3 lacks, with the value that
# makes them a no-op at inference.
_BATCH_NORM_DEFAULTS = {"fused": None, "virtual_batch_size": None, "adjustment": None}
_LAMBDA_LEGACY_KEYS = ("module", "function_type", "output_shape_type", "output_shape_module")


class LegacyModelError(ValueError):
    """A model file cannot be loaded into Keras 3, with the reason and the fix."""


class UnsafeModelError(LegacyModelError):
    """The model holds `Lambda` layers, whose loading runs Python code from the file."""


def read_model_config(path: str) -> tuple[Config, str]:
    """The model's config dict, read without building the model.

    Args:
        path: a local `.keras` (zip with `config.json`) or `.h5`/`.hdf5` file.

    Returns:
        `(config, keras_version)`; `keras_version` is the saving Keras version
        ("" when the file does not record it).
    """
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            config = json.loads(archive.read("config.json"))
            try:
                metadata = json.loads(archive.read("metadata.json"))
            except KeyError:
                metadata = {}
        return config, str(metadata.get("keras_version", ""))
    import h5py

    try:
        with h5py.File(path, "r") as handle:
            raw = handle.attrs.get("model_config")
            version = handle.attrs.get("keras_version", "")
    except OSError as error:
        raise LegacyModelError(f"{path} is neither a .keras archive nor an HDF5 file ({error}).") from None
    if raw is None:
        raise LegacyModelError(
            f"{path} holds no model_config: it was written by `save_weights`, not `model.save`, "
            "so it has weights but no architecture. Save the whole model with model.save(...)."
        )
    return json.loads(_as_text(raw)), _as_text(version)


def _as_text(value: bytes | str) -> str:
    """An HDF5 attribute as text (h5py returns bytes or str depending on how it was written)."""
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


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


def lambda_layer_names(config: Config) -> list[str]:
    """Names of the `Lambda` layers anywhere in a model config."""
    return [
        layer["config"].get("name", "?")
        for layer in _walk_layers(config)
        if layer.get("class_name") == LAMBDA
    ]


def unsafe_error(names: Sequence[str]) -> UnsafeModelError:
    """The error for a model with Lambda layers loaded without the opt-in."""
    return UnsafeModelError(
        f"The model contains Lambda layer(s) {names}. A Lambda layer is stored as Python "
        "bytecode, and loading it runs that code: a model file from an untrusted source could "
        "run anything on this machine and on every worker. If you trust the file, pass "
        "--allow_unsafe_deserialization. (Or rebuild the model without Lambda: e.g. "
        "keras.layers.Add() instead of Lambda(lambda x: x[0] + x[1]).)"
    )


def _policy_name(dtype: str | Config | None) -> str | Config | None:
    # tf_keras >= 2.13 stores {"class_name": "Policy", "config": {"name": "float32"}}.
    if isinstance(dtype, dict) and dtype.get("class_name") in ("Policy", "DTypePolicy"):
        return dtype.get("config", {}).get("name", "float32")
    return dtype


def _translate_lambda(config: Config, name: str) -> None:
    for key in _LAMBDA_LEGACY_KEYS:
        config.pop(key, None)
    for key in ("function", "output_shape"):
        value = config.get(key)
        if isinstance(value, list) and len(value) == 3 and isinstance(value[0], str):
            # Keras 2 stores (marshalled code, defaults, closure) as a list.
            config[key] = {
                "class_name": "__lambda__",
                "config": {"code": value[0], "defaults": value[1], "closure": value[2]},
            }
        elif key == "function" and isinstance(value, str):
            raise LegacyModelError(
                f"Lambda layer {name!r} calls the named Python function {value!r}, which the "
                "file does not contain. Rebuild the model with that function replaced by a "
                "lambda or a built-in layer."
            )
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
    for key in ("input_layers", "output_layers"):
        references = model_config.get(key)
        if _is_node_reference(references):
            renumber(references)
        elif isinstance(references, list):
            for reference in references:
                if _is_node_reference(reference):
                    renumber(reference)


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
    elif class_name in RNN_LAYERS:
        if config.pop("time_major", False):
            raise LegacyModelError(
                f"Layer {name!r} ({class_name}) was built with time_major=True, which Keras 3 does "
                "not support. Rebuild it with time_major=False (the default)."
            )
        if isinstance(config.get("cell"), dict):
            translate_layer_config(config["cell"])
    elif class_name in WRAPPERS:
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
    elif class_name == LAMBDA:
        _translate_lambda(config, name)
    return layer_config


def translate_model_config(model_config: Config) -> Config:
    """A Keras 3 version of a Keras 2 model config (the input is not modified)."""
    translated = copy.deepcopy(model_config)
    translate_layer_config(translated)
    return translated


def _weight_values(group: h5py.Group, layer_name: str) -> tuple[list[str], list[np.ndarray]]:
    layer_group = group[layer_name]
    names = [
        n.decode("utf-8") if isinstance(n, bytes) else str(n)
        for n in layer_group.attrs.get("weight_names", [])
    ]
    return names, [np.asarray(layer_group[name]) for name in names]


def load_h5_weights(path: str, model: keras.Model) -> None:
    """Copies the weights of `path`'s `model_weights` group into `model`, layer by layer, by name.

    Within a layer, weights go in Keras's legacy order (trainable, then
    non-trainable), which is the order Keras 2 wrote them in.

    Raises:
        LegacyModelError: a layer with weights is missing from the file, or a
            weight count or shape differs.
    """
    import h5py

    with h5py.File(path, "r") as handle:
        group = handle.get("model_weights", handle)
        saved = {
            n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in group.attrs.get("layer_names", [])
        }
        for layer in model.layers:
            targets = list(layer.trainable_weights) + list(layer.non_trainable_weights)
            if not targets:
                continue
            if layer.name not in saved:
                raise LegacyModelError(
                    f"{path} has no weights for layer {layer.name!r}; the file's weight groups are "
                    f"{sorted(saved)}. The file is incomplete or was not written by model.save()."
                )
            names, values = _weight_values(group, layer.name)
            if len(values) != len(targets):
                raise LegacyModelError(
                    f"Layer {layer.name!r} ({type(layer).__name__}) has {len(targets)} weights in "
                    f"Keras 3 but {len(values)} in {path} ({names}); this layer type is not "
                    "translated faithfully."
                )
            for target, name, value in zip(targets, names, values, strict=True):
                if tuple(target.shape) != value.shape:
                    raise LegacyModelError(
                        f"Weight {name!r} of layer {layer.name!r} has shape {value.shape} in {path}, "
                        f"but the rebuilt layer expects {tuple(target.shape)}."
                    )
                target.assign(value)


def load_h5_model(path: str, allow_unsafe: bool = False) -> keras.Model:
    """Loads a `.h5`/`.hdf5` model written by Keras 2 (tf_keras) or Keras 3.

    Args:
        path: local file.
        allow_unsafe: allow `Lambda` layers (their code runs while loading).

    Returns:
        An uncompiled `keras.Model` that computes what the saved model computed.

    Raises:
        UnsafeModelError: the model has Lambda layers and `allow_unsafe` is False.
        LegacyModelError: anything else that prevents a faithful load.
    """
    config, version = read_model_config(path)
    lambdas = lambda_layer_names(config)
    if lambdas and not allow_unsafe:
        raise unsafe_error(lambdas)
    if version.startswith("3."):
        # Keras 3 reads its own legacy-format files.
        return keras.saving.load_model(path, compile=False, safe_mode=not allow_unsafe)
    translated = translate_model_config(config)
    try:
        model = keras.saving.deserialize_keras_object(translated, safe_mode=not allow_unsafe)
    except LegacyModelError:
        raise
    except Exception as error:  # Keras raises TypeError/ValueError/KeyError for configs it cannot build.
        hint = ""
        if lambdas:
            hint = (
                " Lambda layers are stored as bytecode of the Python version that saved them; load "
                "the file with that Python version."
            )
        raise LegacyModelError(
            f"Keras 3 could not rebuild the Keras {version or '2'} model in {path}: "
            f"{type(error).__name__}: {error}.{hint} Translated layer types: "
            f"{', '.join(SUPPORTED_LAYERS)}."
        ) from None
    load_h5_weights(path, model)
    return model


def load_model_file(path: str, allow_unsafe: bool = False) -> keras.Model:
    """Loads a local `.keras` or `.h5`/`.hdf5` model file, uncompiled.

    Raises:
        UnsafeModelError, LegacyModelError: see `load_h5_model`.
    """
    if not zipfile.is_zipfile(path):
        return load_h5_model(path, allow_unsafe=allow_unsafe)
    config, _ = read_model_config(path)
    lambdas = lambda_layer_names(config)
    if lambdas and not allow_unsafe:
        raise unsafe_error(lambdas)
    return keras.saving.load_model(path, compile=False, safe_mode=not allow_unsafe)
