"""Keras 3 layers that compute what their Keras 2 namesakes computed, where Keras 3 changed it.

A translated Keras 2 (tf_keras) `.h5` model (`models.legacy`) is built with
these in place of Keras 3's own merge layers. Keras 2 gave a merge (`Add`,
`Concatenate`, ...) of masked sequences the AND of the masks its inputs carry,
an unmasked input counting as all true, and merged the values as they are;
Keras 3 takes the OR, drops the mask when one input has none (`Concatenate`
keeps a step any input keeps), and its `Multiply`, `Maximum` and `Minimum`
rewrite the values at masked steps. So a `GlobalAveragePooling1D` or an `LSTM`
after a residual `Add([embedded, Conv1D(embedded)])` would read the padding that
Keras 2 skips.
"""

from __future__ import annotations

import typing

import keras
from keras import ops

from models import keras_graph
from models.keras2_config import KERAS2_LAYERS_PACKAGE as PACKAGE


def _and_of_masks(masks: typing.Sequence[typing.Any]) -> typing.Any:
    """Keras 2's mask of a merge: the AND of the masks there are, or None where there is none."""
    present = [mask for mask in masks if mask is not None]
    if not present:
        return None
    merged = present[0]
    for mask in present[1:]:
        merged = ops.logical_and(merged, mask)
    return merged


def _folded(
    operation: typing.Callable[[typing.Any, typing.Any], typing.Any], inputs: typing.Sequence[typing.Any]
) -> typing.Any:
    """`operation` applied from the left over every input, at every step (masked ones too, as in Keras 2)."""
    output = inputs[0]
    for value in inputs[1:]:
        output = operation(output, value)
    return output


class _Keras2Merge:
    """Keras 2's masking for an elementwise merge layer (mixed into Keras 3's layer class)."""

    def compute_mask(self, inputs: typing.Any, mask: typing.Any = None) -> typing.Any:
        if mask is None:
            return None
        return _and_of_masks(list(mask))


@keras.saving.register_keras_serializable(package=PACKAGE, name="Add")
class Add(_Keras2Merge, keras.layers.Add):
    """`keras.layers.Add` with Keras 2's output mask."""


@keras.saving.register_keras_serializable(package=PACKAGE, name="Subtract")
class Subtract(_Keras2Merge, keras.layers.Subtract):
    """`keras.layers.Subtract` with Keras 2's output mask."""


@keras.saving.register_keras_serializable(package=PACKAGE, name="Average")
class Average(_Keras2Merge, keras.layers.Average):
    """`keras.layers.Average` with Keras 2's output mask."""


@keras.saving.register_keras_serializable(package=PACKAGE, name="Multiply")
class Multiply(_Keras2Merge, keras.layers.Multiply):
    """`keras.layers.Multiply` with Keras 2's output mask and values (the product at masked steps too)."""

    def _merge_function(self, inputs: typing.Sequence[typing.Any]) -> typing.Any:
        return _folded(ops.multiply, inputs)


@keras.saving.register_keras_serializable(package=PACKAGE, name="Maximum")
class Maximum(_Keras2Merge, keras.layers.Maximum):
    """`keras.layers.Maximum` with Keras 2's output mask and values (the maximum at masked steps too)."""

    def _merge_function(self, inputs: typing.Sequence[typing.Any]) -> typing.Any:
        return _folded(ops.maximum, inputs)


@keras.saving.register_keras_serializable(package=PACKAGE, name="Minimum")
class Minimum(_Keras2Merge, keras.layers.Minimum):
    """`keras.layers.Minimum` with Keras 2's output mask and values (the minimum at masked steps too)."""

    def _merge_function(self, inputs: typing.Sequence[typing.Any]) -> typing.Any:
        return _folded(ops.minimum, inputs)


@keras.saving.register_keras_serializable(package=PACKAGE, name="Concatenate")
class Concatenate(keras.layers.Concatenate):
    """`keras.layers.Concatenate` with Keras 2's output mask: a step is kept where every input keeps it."""

    def compute_mask(self, inputs: typing.Any, mask: typing.Any = None) -> typing.Any:
        if mask is None or all(each is None for each in mask):
            return None
        masks = []
        for value, each in zip(inputs, mask, strict=True):
            if each is None:
                masks.append(ops.ones_like(value, dtype="bool"))
            elif len(each.shape) < len(value.shape):
                # Broadcast to the input's shape, as Keras 3 does, so that inputs concatenated
                # along the steps may have other widths.
                expanded = ops.expand_dims(each, axis=-1)
                masks.append(ops.logical_or(expanded, ops.zeros_like(value, dtype="bool")))
            else:
                masks.append(each)
        return ops.all(ops.concatenate(masks, axis=self.axis), axis=-1)


@keras.saving.register_keras_serializable(package=PACKAGE, name="MultiHeadAttention")
class MultiHeadAttention(keras.layers.MultiHeadAttention):
    """`keras.layers.MultiHeadAttention` with Keras 2's masks and its softmax over masked keys.

    Keras 3's call deletes the Keras mask of the query, value and key tensors it is given: every
    other layer that reads them afterwards (an `Attention`, a pooling of the same masked
    `Embedding`) then read the padding that Keras 2 skips, and which layers did depended on the
    order Keras ran them in, so on the other columns of an export. And where a query step sees
    no unmasked key (a padding step), Keras 3's softmax gives it no weight at all, Keras 2's the
    same weight on every key: its attention scores and output there differed.
    """

    def call(
        self,
        query: typing.Any,
        value: typing.Any,
        key: typing.Any = None,
        query_mask: typing.Any = None,
        value_mask: typing.Any = None,
        key_mask: typing.Any = None,
        attention_mask: typing.Any = None,
        return_attention_scores: bool = False,
        training: typing.Any = None,
        use_causal_mask: bool = False,
    ) -> typing.Any:
        # The signature is Keras 3's own: Keras passes the `*_mask` arguments by their names.
        tensors = [tensor for tensor in (query, value, key) if tensor is not None]
        masks = [keras_graph.tensor_mask(tensor) for tensor in tensors]
        try:
            return super().call(
                query,
                value,
                key=key,
                query_mask=query_mask,
                value_mask=value_mask,
                key_mask=key_mask,
                attention_mask=attention_mask,
                return_attention_scores=return_attention_scores,
                training=training,
                use_causal_mask=use_causal_mask,
            )
        finally:
            for tensor, mask in zip(tensors, masks, strict=True):
                keras_graph.set_tensor_mask(tensor, mask)

    def _masked_softmax(self, attention_scores: typing.Any, attention_mask: typing.Any = None) -> typing.Any:
        if attention_mask is None:
            return super()._masked_softmax(attention_scores, attention_mask)
        # Keras 2's Softmax: a large negative number added at the masked keys, nothing zeroed after.
        expansion_axis = -len(self._attention_axes) * 2 - 1
        for _ in range(len(attention_scores.shape) - len(attention_mask.shape)):
            attention_mask = ops.expand_dims(attention_mask, axis=expansion_axis)
        dtype = attention_scores.dtype
        large_negative = -32752.0 if keras.backend.standardize_dtype(dtype) == "float16" else -1e9
        adder = (1.0 - ops.cast(attention_mask, dtype)) * ops.cast(large_negative, dtype)
        return self._softmax(attention_scores + adder)


class _WithoutMask:
    """Keras 2's layer of this name passed no mask on (Keras 3's does): a later pooling reads every step."""

    def __init__(self, *args: typing.Any, **kwargs: typing.Any) -> None:
        super().__init__(*args, **kwargs)
        self.supports_masking = False

    def compute_mask(self, inputs: typing.Any, mask: typing.Any = None) -> typing.Any:
        return None


@keras.saving.register_keras_serializable(package=PACKAGE, name="Identity")
class Identity(_WithoutMask, keras.layers.Identity):
    """`keras.layers.Identity` without the mask of its input, as in Keras 2."""

    def call(self, inputs: typing.Any) -> typing.Any:
        # A new tensor: Keras 3's returns its input itself, and with it the mask that input carries.
        return keras.tree.map_structure(ops.copy, inputs)


@keras.saving.register_keras_serializable(package=PACKAGE, name="Rescaling")
class Rescaling(_WithoutMask, keras.layers.Rescaling):
    """`keras.layers.Rescaling` without the mask of its input, as in Keras 2."""


@keras.saving.register_keras_serializable(package=PACKAGE, name="Normalization")
class Normalization(_WithoutMask, keras.layers.Normalization):
    """`keras.layers.Normalization` without the mask of its input, as in Keras 2."""


@keras.saving.register_keras_serializable(package=PACKAGE, name="ThresholdedReLU")
class ThresholdedReLU(keras.layers.Layer):
    """Keras 2's `ThresholdedReLU` (`x` where `x > theta`, else 0), which Keras 3 no longer has."""

    def __init__(self, theta: float = 1.0, **kwargs: typing.Any) -> None:
        super().__init__(**kwargs)
        self.supports_masking = True
        self.theta = float(theta)

    def call(self, inputs: typing.Any) -> typing.Any:
        return inputs * ops.cast(ops.greater(inputs, self.theta), inputs.dtype)

    def compute_output_shape(self, input_shape: typing.Any) -> typing.Any:
        return input_shape

    def get_config(self) -> dict[str, typing.Any]:
        return {**super().get_config(), "theta": self.theta}


@keras.saving.register_keras_serializable(package=PACKAGE, name="Lambda")
class Lambda(keras.layers.Lambda):
    """`keras.layers.Lambda` that also builds a mask function given as a Python lambda (Keras 2's `mask=`)."""

    @classmethod
    def from_config(
        cls, config: dict[str, typing.Any], custom_objects: typing.Any = None, safe_mode: bool | None = None
    ) -> Lambda:
        mask = config.get("mask")
        if isinstance(mask, dict):
            # Keras 3's own loader, with its safe-mode check, builds the mask function as a layer's function.
            config = {
                **config,
                "mask": keras.layers.Lambda.from_config({"function": mask}, safe_mode=safe_mode).function,
            }
        return typing.cast(
            Lambda, super().from_config(config, custom_objects=custom_objects, safe_mode=safe_mode)
        )
