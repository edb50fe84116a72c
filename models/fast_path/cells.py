"""The layers the fast path runs itself: an Embedding of a model input, recurrent layers and their directions.

Each class takes its Keras layer apart (weights, settings, padding states) and
raises `Unsupported` for whatever it does not reproduce exactly.
"""

from __future__ import annotations

import typing
from collections.abc import Callable, Sequence

import keras
import numpy as np
import tensorflow as tf

from models import keras_graph
from models.fast_path.buckets import Bucketed, bucketed_groups
from models.fast_path.plans import FULL, MASKED, PREFIX

if typing.TYPE_CHECKING:
    from keras.src.ops.node import Node

# float32 represents every integer up to 2^24 exactly, so float token ids below it are exact.
FLOAT_EXACT_IDS = 2**24
# A folded table (vocabulary x gates) above this size is not built; inputs are projected per step.
MAX_FOLDED_BYTES = 512 << 20

RECURRENT_TYPES = (keras.layers.LSTM, keras.layers.GRU, keras.layers.SimpleRNN)
MERGE_MODES = ("concat", "sum", "ave", "mul")


class Unsupported(Exception):
    """The layer has a feature the fast path does not reproduce exactly."""


def is_numeric_ids(tensor: keras.KerasTensor) -> bool:
    """Whether `tensor` is fixed-length ids: (batch, length), int or float."""
    dtype = str(tensor.dtype)
    return len(tensor.shape) == 2 and tensor.shape[1] is not None and ("int" in dtype or "float" in dtype)


def _extra_call_arguments(node: Node) -> list[str]:
    """Call arguments beyond the input and the mask Keras passes along with it."""
    inputs = keras_graph.node_inputs(node)
    own_mask = keras_graph.tensor_mask(inputs[0]) if inputs else None
    return sorted(
        key
        for key, value in keras_graph.call_kwargs(node).items()
        if key != "training"
        and value is not None
        and not (key == "mask" and keras_graph.same_computation(value, own_mask))
    )


class FastEmbedding:
    """An Embedding that reads a model input directly."""

    layer: keras.layers.Embedding
    name: str
    input_name: str
    length: int
    masked: bool
    dim: int
    table: np.ndarray
    table_tensor: tf.Tensor

    def __init__(self, layer: keras.layers.Layer, node: Node) -> None:
        if type(layer) is not keras.layers.Embedding:
            raise Unsupported(f"layer {layer.name!r} is a {type(layer).__name__}, not an Embedding")
        if layer.compute_dtype != "float32":
            raise Unsupported(f"embedding {layer.name!r} computes in {layer.compute_dtype}")
        if len(layer.weights) != 1:
            raise Unsupported(f"embedding {layer.name!r} has extra weights (LoRA or quantized)")
        if _extra_call_arguments(node):
            raise Unsupported(f"embedding {layer.name!r} is called with {_extra_call_arguments(node)}")
        tensor = keras_graph.node_inputs(node)[0]
        if not keras_graph.is_input(tensor):
            raise Unsupported(f"embedding {layer.name!r} does not read a model input directly")
        if not is_numeric_ids(tensor):
            raise Unsupported(f"input {tensor.name!r} is not fixed-length token ids ({tensor.dtype})")
        if "float" in str(tensor.dtype) and layer.input_dim > FLOAT_EXACT_IDS:
            raise Unsupported(
                f"input {tensor.name!r} is {tensor.dtype} and embedding {layer.name!r} has "
                f"{layer.input_dim} rows, more than the 2^24 ids float32 holds exactly"
            )
        self.layer = layer
        self.name = layer.name
        self.input_name = tensor.name
        self.length = int(tensor.shape[1])
        self.masked = bool(layer.mask_zero)
        self.dim = layer.output_dim
        self.table = layer.get_weights()[0].astype(np.float32)
        self.table_tensor = tf.constant(self.table)

    def pad_inputs(self, reverse: bool) -> np.ndarray | None:
        """Row-independent values at the leading padding positions a direction reads, or None."""
        return np.broadcast_to(self.table[0], (self.length, self.dim))


def _check_rnn(layer: keras.layers.Layer, role: str) -> None:
    if type(layer) not in RECURRENT_TYPES:
        raise Unsupported(f"{role} {layer.name!r} is a {type(layer).__name__}, not an LSTM, GRU or SimpleRNN")
    problems = [flag for flag in ("return_state", "stateful") if getattr(layer, flag)]
    if layer.go_backwards and layer.return_sequences and role == "layer":
        problems.append("go_backwards with return_sequences")
    if layer.zero_output_for_mask and not layer.return_sequences:
        problems.append("zero_output_for_mask")
    if layer.compute_dtype != "float32":
        problems.append(f"dtype {layer.compute_dtype}")
    if problems:
        raise Unsupported(f"{type(layer).__name__} {layer.name!r} uses {', '.join(problems)}")


class Direction:
    """One recurrent layer read in one direction, with its weights and padding states."""

    cell: str  # "LSTM", "GRU" or "SimpleRNN"
    name: str
    units: int
    reverse: bool
    activation: Callable[[tf.Tensor], tf.Tensor]
    recurrent_activation: Callable[[tf.Tensor], tf.Tensor] | None
    reset_after: bool
    zero_output_for_mask: bool
    kernel: tf.Tensor
    input_bias: tf.Tensor
    recurrent: tf.Tensor
    recurrent_bias: tf.Tensor
    masked: bool
    # The input projection folded into the embedding table, (vocabulary, gates), or None.
    projection: tf.Tensor | None
    mode: str  # MASKED, PREFIX or FULL
    # States after k = 0..length padding steps (PREFIX only).
    pad_h: tf.Tensor | None
    pad_c: tf.Tensor | None

    def __init__(
        self, layer: keras.layers.Layer, source: FastEmbedding | FastRecurrent, reverse: bool
    ) -> None:
        cell = layer.cell
        self.cell = type(layer).__name__
        self.name = layer.name
        self.units = cell.units
        self.reverse = reverse
        self.activation = cell.activation
        self.recurrent_activation = getattr(cell, "recurrent_activation", None)
        self.reset_after = getattr(cell, "reset_after", True)
        self.zero_output_for_mask = bool(layer.zero_output_for_mask)
        kernel = cell.kernel.numpy()
        recurrent = cell.recurrent_kernel.numpy()
        gates = kernel.shape[1]
        input_bias = np.zeros(gates, np.float32)
        recurrent_bias = np.zeros(gates, np.float32)
        if cell.use_bias:
            bias = cell.bias.numpy()
            if self.cell == "GRU" and self.reset_after:
                input_bias, recurrent_bias = bias[0], bias[1]
            else:
                input_bias = bias
        self.kernel = tf.constant(kernel)
        self.input_bias = tf.constant(input_bias)
        self.recurrent = tf.constant(recurrent)
        self.recurrent_bias = tf.constant(recurrent_bias)
        self.masked = source.masked
        self.projection = None
        if isinstance(source, FastEmbedding) and source.table.shape[0] * gates * 4 <= MAX_FOLDED_BYTES:
            self.projection = tf.constant(source.table @ kernel + input_bias)
        pad_inputs = None if self.masked else source.pad_inputs(reverse)
        self.mode = MASKED if self.masked else (PREFIX if pad_inputs is not None else FULL)
        self.pad_h = self.pad_c = None
        if self.mode == PREFIX:
            assert pad_inputs is not None  # PREFIX is the mode of a direction with padding inputs
            self.pad_h, self.pad_c = self._padding_states(pad_inputs)

    def project(self, inputs: tf.Tensor) -> tf.Tensor:
        """The input projection `inputs @ W + b` of one step."""
        return tf.matmul(inputs, self.kernel) + self.input_bias

    def step(self, x: tf.Tensor, h: tf.Tensor, c: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """One step from projected inputs `x`; `c` is the LSTM carry (an empty tensor otherwise)."""
        if self.cell == "LSTM":
            z = x + tf.matmul(h, self.recurrent)
            i, f, g, o = tf.split(z, 4, axis=1)
            sigma = self.recurrent_activation
            assert sigma is not None  # every LSTM cell has one
            c = sigma(f) * c + sigma(i) * self.activation(g)
            return sigma(o) * self.activation(c), c
        if self.cell == "GRU":
            units = self.units
            x_z, x_r, x_h = tf.split(x, 3, axis=1)
            sigma = self.recurrent_activation
            assert sigma is not None  # every GRU cell has one
            if self.reset_after:
                inner = tf.matmul(h, self.recurrent) + self.recurrent_bias
                z = sigma(x_z + inner[:, :units])
                r = sigma(x_r + inner[:, units : 2 * units])
                candidate = self.activation(x_h + r * inner[:, 2 * units :])
            else:
                inner = tf.matmul(h, self.recurrent[:, : 2 * units])
                z = sigma(x_z + inner[:, :units])
                r = sigma(x_r + inner[:, units:])
                candidate = self.activation(x_h + tf.matmul(r * h, self.recurrent[:, 2 * units :]))
            return z * h + (1 - z) * candidate, c
        return self.activation(x + tf.matmul(h, self.recurrent)), c

    def carry_width(self) -> int:
        """Width of the carry `c`: the units of an LSTM, 0 for the others."""
        return self.units if self.cell == "LSTM" else 0

    def _padding_states(self, pad_inputs: np.ndarray) -> tuple[tf.Tensor, tf.Tensor]:
        """States after k = 0..length padding steps from the zero state."""
        projected = self.project(tf.constant(np.ascontiguousarray(pad_inputs, np.float32)))
        h = tf.zeros((1, self.units))
        c = tf.zeros((1, self.carry_width()))
        states_h, states_c = [h], [c]
        for position in range(pad_inputs.shape[0]):
            h, c = self.step(projected[position : position + 1], h, c)
            states_h.append(h)
            states_c.append(c)
        return tf.concat(states_h, axis=0), tf.concat(states_c, axis=0)


class FastRecurrent:
    """A recurrent layer (or Bidirectional) reading a fast sequence: an embedding or a stacked layer."""

    merge_mode: str | None  # a Bidirectional's, None for a single direction
    layer: keras.layers.Layer
    name: str
    source: FastEmbedding | FastRecurrent
    input_name: str
    length: int
    masked: bool
    return_sequences: bool
    directions: list[Direction]
    bucketed: list[Bucketed]
    dim: int

    def __init__(self, layer: keras.layers.Layer, node: Node, source: FastEmbedding | FastRecurrent) -> None:
        if _extra_call_arguments(node) or len(keras_graph.call_args(node)) != 1:
            raise Unsupported(
                f"{type(layer).__name__} {layer.name!r} is called with initial states or a mask"
            )
        if type(layer) is keras.layers.Bidirectional:
            if layer.merge_mode not in MERGE_MODES:
                raise Unsupported(f"Bidirectional {layer.name!r} has merge_mode {layer.merge_mode!r}")
            if layer.return_state:
                raise Unsupported(f"Bidirectional {layer.name!r} uses return_state")
            _check_rnn(layer.forward_layer, "forward layer")
            _check_rnn(layer.backward_layer, "backward layer")
            if layer.forward_layer.go_backwards or not layer.backward_layer.go_backwards:
                raise Unsupported(f"Bidirectional {layer.name!r} has unusual go_backwards settings")
            layers = [(layer.forward_layer, False), (layer.backward_layer, True)]
            self.merge_mode = layer.merge_mode
        else:
            _check_rnn(layer, "layer")
            layers = [(layer, layer.go_backwards)]
            self.merge_mode = None
        self.layer = layer
        self.name = layer.name
        self.source = source
        self.input_name = source.input_name
        self.length = source.length
        self.masked = source.masked
        self.return_sequences = bool(layers[0][0].return_sequences)
        self.directions = [Direction(inner, source, reverse) for inner, reverse in layers]
        self.bucketed = bucketed_groups(self)
        units = self.directions[0].units
        self.dim = 2 * units if self.merge_mode == "concat" else units

    def pad_inputs(self, reverse: bool) -> np.ndarray | None:
        """What a stacked layer reads at its leading padding: this layer's padding outputs."""
        if len(self.directions) != 1 or self.directions[0].reverse != reverse:
            return None
        direction = self.directions[0]
        return None if direction.pad_h is None else direction.pad_h[1:].numpy()

    def merge(self, values: Sequence[tf.Tensor]) -> tf.Tensor:
        """The layer's output from its directions' outputs, as its Bidirectional merges them."""
        if self.merge_mode is None:
            return values[0]
        forward, backward = values
        if self.merge_mode == "concat":
            return tf.concat([forward, backward], axis=-1)
        if self.merge_mode == "sum":
            return forward + backward
        if self.merge_mode == "ave":
            return (forward + backward) / 2
        return forward * backward
