"""Loads model files into Keras 3: `.keras` as is, Keras 2 (tf_keras) `.h5` by translating layer configs.

Keras 3 refuses most `.h5` files written by Keras 2: their layer configs carry
arguments it no longer accepts (an LSTM's `time_major`, an Embedding's
`input_length`, ...).  `load_h5_model` reads the file's `model_config` JSON,
rewrites each layer's config to its Keras 3 equivalent (`models.keras2_config`:
only arguments that do not change the computation are dropped or renamed),
rebuilds the model with `keras.saving.deserialize_keras_object`, and copies the
weights from the file's `model_weights` group layer by layer, matched by name.

`Lambda` layers hold Python bytecode that runs when the model is loaded, so any
model with one is refused unless the caller opts in (`allow_unsafe=True`, the
`--allow_unsafe_deserialization` flag).
"""

from __future__ import annotations

import json
import logging
import re
import typing
import zipfile
from collections.abc import Mapping, Sequence

import keras
import numpy as np

import models.keras2_layers  # noqa: F401  (registers the layers that translated configs name)
from models import keras_graph
from models.keras2_config import (
    KERAS2_HARD_SIGMOID,
    SUPPORTED_LAYERS,
    Config,
    LegacyModelError,
    activation_names,
    lambda_layer_names,
    note_renamed_layers,
    rename_slashed_layers,
    translate_model_config,
)

if typing.TYPE_CHECKING:
    import h5py


@keras.saving.register_keras_serializable(package="embexport", name=KERAS2_HARD_SIGMOID)
def keras2_hard_sigmoid(x: typing.Any) -> typing.Any:
    """Keras 2's hard_sigmoid, `clip(0.2 x + 0.5, 0, 1)`, which translated Keras 2 configs name."""
    return keras.ops.clip(0.2 * x + 0.5, 0.0, 1.0)


def _is_keras_activation(name: str) -> bool:
    try:
        keras.activations.get(name)
    except ValueError:  # Not one of Keras's: a function of the script that saved the model.
        return False
    return True


class UnsafeModelError(LegacyModelError):
    """The model holds `Lambda` layers, whose loading runs Python code from the file."""


class CustomClassError(LegacyModelError):
    """The model uses a class (a custom layer, a subclassed Model) that Keras cannot import here."""


def custom_class_error(path: str, config: Config, error: Exception) -> CustomClassError | None:
    """The `CustomClassError` for Keras's "Could not locate class" failure to load `path`, else None."""
    found = re.search(r"Could not locate (class|function) '([^']+)'", str(error))
    if found is None:
        return None
    kind, name = found.groups()
    if kind == "function":
        return _custom_function_error(path, config, name)
    registered = [
        str(item.get("registered_name"))
        for item in _config_dicts(config)
        if item.get("class_name") == name and item.get("registered_name")
    ]
    return _custom_class(path, registered[0] if registered else name)


def _custom_class(path: str, label: str) -> CustomClassError:
    """The error for a Keras 3 model file that uses the class `label` of the code that trained it."""
    return CustomClassError(
        f"{path} uses the custom class {label!r} (a layer or a subclassed Model defined in the code that "
        "trained it), which Keras cannot rebuild without that code. Rebuild the model from built-in "
        "Keras layers as a functional model, copy the weights (new.set_weights(old.get_weights())) "
        "and save it again."
    )


def _custom_function_error(path: str, config: Config, name: str) -> CustomClassError:
    """The error for a registered function (`name`) of the training code that a layer's argument names.

    The Keras text-classification tutorial's `TextVectorization(standardize=custom_standardization)`
    is the common case: the vectorizer's vocabulary is no weight, so `set_weights` would not carry it.
    """
    uses = [
        (str(item.get("class_name")), str(item["config"].get("name")), argument)
        for item in _config_dicts(config)
        if isinstance(item.get("config"), dict)
        for argument, value in item["config"].items()
        if isinstance(value, dict) and value.get("class_name") == "function" and value.get("config") == name
    ]
    where = f" as the {uses[0][2]} of the {uses[0][0]} layer {uses[0][1]!r}" if uses else ""
    cannot = (
        f"{path} uses the custom function {name.rpartition('>')[2]!r} (registered as {name!r}){where}, "
        "which Keras cannot rebuild without the code that defined it."
    )
    if uses and uses[0][0] == "TextVectorization" and uses[0][2] in ("standardize", "split"):
        # Its vocabulary is no weight: the copy gets it as a list, the other layers their weights.
        copy = (
            "Save a copy of the model whose TextVectorization has standardize=None and the same "
            "vocabulary (vocabulary=old_layer.get_vocabulary()), the other layers' weights copied, and "
            "apply your function to the corpus texts before the export."
            if uses[0][2] == "standardize"
            else "Save a copy of the model whose TextVectorization has a built-in split ('whitespace' or "
            "'character') that gives the same tokens and the same vocabulary "
            "(vocabulary=old_layer.get_vocabulary()), the other layers' weights copied."
        )
        return CustomClassError(f"{cannot} {copy}")
    return CustomClassError(
        f"{cannot} Rebuild that layer with a built-in Keras function (or a layer computing the same), "
        "copy the weights (new.set_weights(old.get_weights())) and save the model again."
    )


def _config_dicts(config: typing.Any) -> list[dict[str, typing.Any]]:
    """Every dict nested in a model config, at any depth."""
    found: list[dict[str, typing.Any]] = []
    stack = [config]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            found.append(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return found


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


def unsafe_error(names: Sequence[str]) -> UnsafeModelError:
    """The error for a model with Lambda layers loaded without the opt-in."""
    return UnsafeModelError(
        f"The model contains Lambda layer(s) {names}. A Lambda layer is stored as Python "
        "bytecode, and loading it runs that code: a model file from an untrusted source could "
        "run anything on this machine and on every worker. If you trust the file, pass "
        "--allow_unsafe_deserialization. (Or rebuild the model without Lambda: e.g. "
        "keras.layers.Add() instead of Lambda(lambda x: x[0] + x[1]).)"
    )


def _weight_values(group: h5py.Group, layer_name: str) -> tuple[list[str], list[np.ndarray]]:
    layer_group = group[layer_name]
    names = [
        n.decode("utf-8") if isinstance(n, bytes) else str(n)
        for n in layer_group.attrs.get("weight_names", [])
    ]
    return names, [np.asarray(layer_group[name]) for name in names]


def load_h5_weights(path: str, model: keras.Model, saved_names: Mapping[str, str] | None = None) -> None:
    """Copies the weights of `path`'s `model_weights` group into `model`, layer by layer, by name.

    Within a layer, weights go in Keras's legacy order (trainable, then
    non-trainable), which is the order Keras 2 wrote them in. `saved_names`
    maps a layer renamed on loading to its name in the file.

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
            saved_name = (saved_names or {}).get(layer.name, layer.name)
            if saved_name not in saved:
                raise LegacyModelError(
                    f"{path} has no weights for layer {saved_name!r}; the file's weight groups are "
                    f"{sorted(saved)}. The file is incomplete or was not written by model.save()."
                )
            names, values = _weight_values(group, saved_name)
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


def _deserialization_cause(error: Exception) -> str:
    """Why Keras could not build a config, in one line, without the config dumps.

    Keras nests its reasons ("... config={...}. Exception encountered: Error when
    deserializing class 'Dense' using config={...}. Exception encountered: ..."),
    one per level of the model; the innermost one is the cause.
    """
    text = str(error)
    parts = [" ".join(part.split()).rstrip(".") for part in text.split("Exception encountered:")]
    classes = re.findall(r"Error when deserializing class '([^']+)'", text)
    if len(parts) > 1 and classes:
        return f"building a {classes[-1]}: {parts[-1]}"
    return f"{type(error).__name__}: {parts[-1]}"


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
        try:
            model = keras.saving.load_model(path, compile=False, safe_mode=not allow_unsafe)
        except ValueError as error:
            refusal = _keras3_operation_error(path, error)
            unknown_class = _UNKNOWN_LAYER.search(str(error))
            if refusal is None and unknown_class is not None:
                # Keras's own words were "Please ensure you are using a keras.utils.custom_object_scope".
                refusal = _custom_class(path, unknown_class.group(1))
            if refusal is None:
                raise
            raise refusal from None
        check_vocabularies(
            path, model, "Save the model as .keras (model.save('model.keras')) and pass that file."
        )
        return model
    for layer, name in activation_names(config):
        if not _is_keras_activation(name):
            raise LegacyModelError(
                f"Layer {layer!r} uses the activation {name!r}, a function of the script that saved "
                "the model, which Keras 3 cannot rebuild from the file. Save the model with a Keras "
                "activation, or an Activation layer computing the same, and export that file."
            )
    translated, saved_names = rename_slashed_layers(translate_model_config(config))
    for name, saved_name in saved_names.items():
        logging.warning(
            "Layer %r of %s is called %r here (and in --layer): Keras 3 does not allow '/' in layer names.",
            saved_name,
            path,
            name,
        )
    _reserve_layer_names(translated)
    try:
        model = keras.saving.deserialize_keras_object(translated, safe_mode=not allow_unsafe)
    except LegacyModelError:
        raise
    except Exception as error:  # Keras raises TypeError/ValueError/KeyError for configs it cannot build.
        unknown = _unknown_layer_error(path, error)
        if unknown is not None:
            raise unknown from None
        hint = ""
        if lambdas:
            hint = (
                " Lambda layers are stored as Python bytecode: they load only on the Python version "
                "that saved them, and run only on their arguments (a lambda that names the saving "
                "script's `tf` or `np` fails here); replace the Lambda by a Keras layer."
            )
        raise LegacyModelError(
            f"Keras 3 could not rebuild the Keras {version or '2'} model in {path}: "
            f"{_deserialization_cause(error)}.{hint} Translated layer types: "
            f"{', '.join(SUPPORTED_LAYERS)}."
        ) from None
    _check_started_recurrent_layers_keep_masks(path, model)
    load_h5_weights(path, model, saved_names)
    check_vocabularies(
        path,
        model,
        "tf_keras writes a vocabulary to .h5 only where the layer was given it as a list: build the model "
        "with the layer made as TextVectorization(..., vocabulary=old_layer.get_vocabulary()), copy the "
        "weights, save it as .h5 and pass that file.",
    )
    note_renamed_layers(model, {saved_name: name for name, saved_name in saved_names.items()})
    return model


# How Keras names a layer class it cannot find (a custom one, or one Keras 3 removed) in its error.
_UNKNOWN_LAYER = re.compile(r"Unknown layer: '([^']+)'")


def _unknown_layer_error(path: str, error: Exception) -> CustomClassError | None:
    """The error for a Keras 2 file naming a layer class Keras 3 does not have, else None.

    Keras says "Unknown layer: 'NAME'. Please ensure you are using a
    `keras.utils.custom_object_scope` ...": advice about code the export cannot be given.
    """
    found = _UNKNOWN_LAYER.search(str(error))
    if found is None:
        return None
    name = found.group(1)
    label = f"{name.rpartition('>')[2]!r} (registered as {name!r})" if ">" in name else repr(name)
    return CustomClassError(
        f"{path} uses the layer class {label}, which Keras 3 does not have: a custom layer of the code "
        "that trained the model, or a Keras 2 layer that Keras 3 removed (LocallyConnected1D, ...). "
        "Rebuild the model in tf_keras from layers Keras 3 has (built-in layers, or a Lambda, computing "
        "the same), copy the weights (new.set_weights(old.get_weights())) and save it as .h5 again."
    )


def _keras3_operation_error(path: str, error: ValueError) -> LegacyModelError | None:
    """The error for a Keras 3 `.h5` file holding an operation its own `.h5` reader cannot rebuild, else None.

    Keras 3 writes the mask of an `Embedding(mask_zero=True)` (or `Masking`) into
    the graph as a `keras.ops.not_equal` operation, and its `.h5` reader looks
    that up among the layers: "Unknown layer: 'NotEqual'", with advice about
    custom objects that the model does not have.
    """
    found = re.search(r"Unknown layer: '(\w+)'", str(error))
    if found is None:
        return None
    function = re.sub(r"(?<!^)(?=[A-Z])", "_", found.group(1)).lower()
    if not callable(getattr(keras.ops, function, None)):
        return None
    return LegacyModelError(
        f"{path} was written by Keras 3 as .h5 with the operation keras.ops.{function} in its graph (the "
        "mask of an Embedding(mask_zero=True) or a Masking layer is one), which Keras 3 cannot read back "
        "from .h5. Save the model as .keras (model.save('model.keras')) and pass that file."
    )


# The largest name count `_reserve_layer_names` moves a count past.
_NAME_COUNT_LIMIT = 10_000


def _reserve_layer_names(config: Config) -> None:
    """Keeps Keras from giving an operation it names itself the name of one of the model's layers.

    Keras 3 names the operations that compute a mask after their function, in a
    count of its own (`concatenate`, then `concatenate_1`, ... for a Concatenate's
    mask), and refuses a model where two operations share a name: a fresh process
    refused a tf_keras model whose first Concatenate, named `concatenate`, joins
    masked sequences ("The name "concatenate" is used 2 times in the model").
    Each count is moved past the names the model's layers already use.
    """
    names = {str(item["name"]) for item in _config_dicts(config) if isinstance(item.get("name"), str)}
    for name in names:
        base, _, number = name.rpartition("_")
        used = int(number) if base and number.isdigit() else -1
        # A count reaches N only after N names made from it in this process: one of a name like
        # `block_20240101` (a date) is never reached, and counting up to it would take minutes.
        for prefix, last in ((name, 0), (base, used if used < _NAME_COUNT_LIMIT else -1)):
            # keras.backend.get_uid counts up and returns the count; the next name made from
            # `prefix` is `prefix_COUNT`.
            while last >= 0 and keras.backend.get_uid(prefix) <= last:
                pass


def _check_started_recurrent_layers_keep_masks(path: str, model: keras.Model) -> None:
    """Refuses a recurrent layer given `initial_state` on a masked sequence, whose mask Keras 3 drops.

    Keras 2 skips the masked steps (`mask_zero=True`, `Masking`) of a layer started
    from another's states (a decoder); Keras 3 passes a layer its input's mask only
    when that input is its one tensor argument, so the rebuilt layer would read the
    padding and give other vectors.

    Raises:
        LegacyModelError: naming the layer and how to keep its mask.
    """
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            _check_started_recurrent_layers_keep_masks(path, layer)
        if not isinstance(layer, (keras.layers.RNN, keras.layers.Bidirectional)):
            continue
        for node in keras_graph.layer_nodes(layer):
            kwargs, args = keras_graph.call_kwargs(node), keras_graph.call_args(node)
            if (
                kwargs.get("initial_state") is not None
                and kwargs.get("mask") is None
                and args
                and keras_graph.tensor_mask(args[0]) is not None
            ):
                raise LegacyModelError(
                    f"{type(layer).__name__} layer {layer.name!r} of {path} starts from initial_state and "
                    "reads a masked sequence (mask_zero=True or Masking): Keras 2 skips its masked steps, "
                    "but Keras 3 drops the mask of a layer given initial_state, so its vectors would "
                    "differ. Rebuild the model in Keras 3 with the mask passed to that call "
                    "(layer(x, initial_state=..., mask=...)), copy the weights and save it as .keras."
                )


def _lookup_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The TextVectorization, StringLookup and IntegerLookup layers of `model` and of its nested models."""
    found = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            found += _lookup_layers(layer)
        elif isinstance(
            layer, (keras.layers.TextVectorization, keras.layers.StringLookup, keras.layers.IntegerLookup)
        ):
            found.append(layer)
    return found


def _has_no_vocabulary(layer: keras.layers.Layer) -> bool:
    """Whether a lookup layer knows no token but its padding and out-of-vocabulary ones."""
    if isinstance(layer, keras.layers.TextVectorization):
        return set(layer.get_vocabulary()) <= {"", "[UNK]"}
    return layer.vocabulary_size() <= layer.num_oov_indices + (layer.mask_token is not None)


def check_vocabularies(path: str, model: keras.Model, advice: str) -> None:
    """Refuses an `.h5` model whose lookup layers came back without their vocabulary.

    An `.h5` file holds a TextVectorization's (or StringLookup's) vocabulary only
    where it was given as a list in the layer's arguments: one learnt by `adapt()`
    lives in a lookup table, which Keras 3 writes to `.keras` files only (its
    `.h5` save drops it without a word; `tf_keras`'s raises, leaving the file
    without it). Such a layer fails on every text ("Table not initialized").

    Args:
        path: the model file, for the message.
        model: the model loaded from it.
        advice: how to save a file that keeps the vocabulary (it depends on the saving Keras).

    Raises:
        LegacyModelError: naming the layer and how to save the model so that it keeps it.
    """
    empty = [layer for layer in _lookup_layers(model) if _has_no_vocabulary(layer)]
    if empty:
        raise LegacyModelError(
            f"{path} holds the {type(empty[0]).__name__} layer {empty[0].name!r} without its vocabulary: "
            "an .h5 file does not keep a vocabulary learnt by adapt(), so the layer fails on every text. "
            f"{advice}"
        )


def load_model_file(path: str, allow_unsafe: bool = False) -> keras.Model:
    """Loads a local `.keras` or `.h5`/`.hdf5` model file, uncompiled.

    Raises:
        UnsafeModelError, LegacyModelError: see `load_h5_model`.
    """
    if not zipfile.is_zipfile(path):
        return load_h5_model(path, allow_unsafe=allow_unsafe)
    config, version = read_model_config(path)
    if version.startswith("2."):
        raise LegacyModelError(
            f"{path} is a .keras file written by Keras {version} (tf_keras), whose classes Keras 3 "
            "cannot rebuild from it. Save the model as .h5 in tf_keras (model.save('model.h5')), "
            "which this tool translates, and pass that file."
        )
    lambdas = lambda_layer_names(config)
    if lambdas and not allow_unsafe:
        raise unsafe_error(lambdas)
    try:
        return keras.saving.load_model(path, compile=False, safe_mode=not allow_unsafe)
    except Exception as error:  # Keras wraps a missing class in a TypeError with a config dump.
        custom = custom_class_error(path, config, error)
        if custom is None:
            raise
        raise custom from None
