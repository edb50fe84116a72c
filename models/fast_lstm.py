"""An exact fast forward pass for the Embedding -> recurrent parts of a Keras text model.

The parts it runs itself are chains that start at an `Embedding` of a model
input (int ids, or float ids as Keras 2's `Input(shape=(n,))` gives, below 2^24
where float32 is exact) and go through `LSTM`, `GRU`, `SimpleRNN` or
`Bidirectional` layers (stacked through `return_sequences=True`; masked or not).
Everything downstream of them (`Dense`, `Add`, `Lambda`, ...) is called as the
model's own Keras layers on their outputs, in the same traced function: the
hybrid pass.  Each recurrent direction is computed with these exact rewrites:

1. Folding: an input projection `E[id] @ W + b` is a row of the table
   `E @ W + b`, computed once per model load; a step is a row lookup plus the
   recurrent matmul.
2. Skipping padding: without a mask, padding that a direction reads *first*
   (pre-padding read forwards, post-padding read backwards) is the same for
   every document, so the state after k padding steps is computed once per k
   and each document starts there.  Padding read *last* depends on the state
   the document left, so it is run (with folded inputs).  With a mask
   (`mask_zero=True`) masked steps carry the state, so each document runs only
   its real tokens, in either direction, wherever the padding is.
3. Length sorting: documents are sorted by where they start and run together;
   at each step only the documents that have started move (a prefix of the
   batch), so the work is the sum of the steps each document needs.
4. Lanes: a batch is dealt into a few lanes (runs of similar length, about the
   same tokens each) run as independent loops in one traced function, so
   TensorFlow runs them on several cores at once.
5. Buckets: a layer returning only its final state from folded inputs runs in
   XLA-compiled loops of fixed shape over buckets of `BUCKET_ROWS` sorted rows
   (see `_Bucketed`).

Per-token outputs (`return_sequences=True`) are rebuilt at every position as
Keras gives them: at skipped padding the padding outputs, at masked steps the
carried output (zeros inside `Bidirectional`, which forces it).

`build_fast_path` says, per output column, which forward pass computes it and
why the fast one does not where it declines.  The caller checks the result
against Keras on a sample batch before trusting it.
"""

import dataclasses
import functools

import keras
import numpy as np
import tensorflow as tf

from models import keras_graph

# Lanes of rows run as independent loops in parallel; fewer, fuller lanes for small batches.
MAX_LANES = 4
MIN_LANE_ROWS = 128
# float32 represents every integer up to 2^24 exactly, so float token ids below it are exact.
FLOAT_EXACT_IDS = 2**24
# Directions returning only their final state run in XLA-compiled loops over buckets of this many
# rows of similar length (fixed shapes: one compilation per model).
BUCKET_ROWS = 16
# A folded table (vocabulary x gates) above this size is not built; inputs are projected per step.
MAX_FOLDED_BYTES = 512 << 20

FAST = "fast"
HYBRID = "hybrid"
KERAS = "keras"

# How a recurrent direction treats the padding it reads (see the module docstring).
MASKED = "masked"  # only real tokens run, from the zero state
PREFIX = "prefix"  # leading padding skipped from precomputed states
FULL = "full"  # every step runs

RECURRENT_TYPES = (keras.layers.LSTM, keras.layers.GRU, keras.layers.SimpleRNN)
MERGE_MODES = ("concat", "sum", "ave", "mul")


class Unsupported(Exception):
    """The layer has a feature the fast path does not reproduce exactly."""


@dataclasses.dataclass(frozen=True)
class ForwardPass:
    """Which forward pass computes an output column, and why.

    `engine` is FAST (the fast path alone), HYBRID (Keras layers on fast-path
    outputs) or KERAS (Keras's own forward pass); `reason` says what runs, or
    why the fast path declined.
    """

    engine: str
    reason: str


_producer = keras_graph.producer
_is_input = keras_graph.is_input


def _is_numeric_ids(tensor):
    dtype = str(tensor.dtype)
    return len(tensor.shape) == 2 and tensor.shape[1] is not None and ("int" in dtype or "float" in dtype)


def _extra_call_arguments(node):
    """Call arguments beyond the input and the mask Keras passes along with it."""
    inputs = keras_graph.node_inputs(node)
    own_mask = keras_graph.tensor_mask(inputs[0]) if inputs else None
    return sorted(
        key
        for key, value in keras_graph.call_kwargs(node).items()
        if key != "training" and value is not None and not (key == "mask" and value is own_mask)
    )


class _Embedding:
    """An Embedding that reads a model input directly."""

    def __init__(self, layer, node):
        if type(layer) is not keras.layers.Embedding:
            raise Unsupported(f"layer {layer.name!r} is a {type(layer).__name__}, not an Embedding")
        if layer.compute_dtype != "float32":
            raise Unsupported(f"embedding {layer.name!r} computes in {layer.compute_dtype}")
        if len(layer.weights) != 1:
            raise Unsupported(f"embedding {layer.name!r} has extra weights (LoRA or quantized)")
        if _extra_call_arguments(node):
            raise Unsupported(f"embedding {layer.name!r} is called with {_extra_call_arguments(node)}")
        tensor = keras_graph.node_inputs(node)[0]
        if not _is_input(tensor):
            raise Unsupported(f"embedding {layer.name!r} does not read a model input directly")
        if not _is_numeric_ids(tensor):
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

    def pad_inputs(self, reverse):
        """Row-independent values at the leading padding positions a direction reads, or None."""
        return np.broadcast_to(self.table[0], (self.length, self.dim))


def _check_rnn(layer, role):
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


class _Direction:
    """One recurrent layer read in one direction, with its weights and padding states."""

    def __init__(self, layer, source, reverse):
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
        if isinstance(source, _Embedding) and source.table.shape[0] * gates * 4 <= MAX_FOLDED_BYTES:
            self.projection = tf.constant(source.table @ kernel + input_bias)
        pad_inputs = None if self.masked else source.pad_inputs(reverse)
        self.mode = MASKED if self.masked else (PREFIX if pad_inputs is not None else FULL)
        self.pad_h = self.pad_c = None
        if self.mode == PREFIX:
            self.pad_h, self.pad_c = self._padding_states(pad_inputs)

    def project(self, inputs):
        return tf.matmul(inputs, self.kernel) + self.input_bias

    def step(self, x, h, c):
        """One step from projected inputs `x`; `c` is the LSTM carry (an empty tensor otherwise)."""
        if self.cell == "LSTM":
            z = x + tf.matmul(h, self.recurrent)
            i, f, g, o = tf.split(z, 4, axis=1)
            sigma = self.recurrent_activation
            c = sigma(f) * c + sigma(i) * self.activation(g)
            return sigma(o) * self.activation(c), c
        if self.cell == "GRU":
            units = self.units
            x_z, x_r, x_h = tf.split(x, 3, axis=1)
            sigma = self.recurrent_activation
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

    def carry_width(self):
        return self.units if self.cell == "LSTM" else 0

    def _padding_states(self, pad_inputs):
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


class _Bucketed:
    """Directions returning only their final state, run in XLA-compiled loops over buckets of rows.

    A bucket is `BUCKET_ROWS` rows of similar length (the lane's sorted rows,
    cut in runs), so each compiled loop has fixed shapes and runs from the
    bucket's earliest start to the end; a row's state stays as it is until its
    own start step (`tf.where`), so a row's result does not depend on the other
    rows of its bucket.  Both directions of a masked Bidirectional have the same
    sorted rows, so they share one loop.
    """

    def __init__(self, directions):
        self.directions = directions
        self.units = directions[0].units
        self.run = tf.function(self._run, jit_compile=True)

    def _run(self, ids, starts):
        """ids (directions, rows, length), starts (directions, rows) -> final h (directions, rows, units)."""
        states = []
        for index, direction in enumerate(self.directions):
            if direction.mode == PREFIX:
                states.append(
                    (tf.gather(direction.pad_h, starts[index]), tf.gather(direction.pad_c, starts[index]))
                )
            else:
                rows = tf.shape(ids)[1]
                states.append((tf.zeros((rows, direction.units)), tf.zeros((rows, direction.carry_width()))))
        length = tf.shape(ids)[2]

        def body(step, states):
            moved = []
            for index, (direction, (h, c)) in enumerate(zip(self.directions, states, strict=True)):
                h_new, c_new = direction.step(tf.gather(direction.projection, ids[index, :, step]), h, c)
                running = (starts[index] <= step)[:, None]
                moved.append((tf.where(running, h_new, h), tf.where(running, c_new, c)))
            return step + 1, moved

        _, states = tf.while_loop(lambda step, _: step < length, body, (tf.reduce_min(starts), states))
        return tf.stack([h for h, _ in states])


def _bucketed_groups(recurrent):
    """The `_Bucketed` groups of a layer, or [] if it runs as plain loops."""
    directions = recurrent.directions
    if recurrent.return_sequences or any(d.projection is None for d in directions):
        return []
    if len(directions) == 2 and directions[0].mode == directions[1].mode and directions[0].mode != PREFIX:
        return [_Bucketed(directions)]
    return [_Bucketed([direction]) for direction in directions]


class _Recurrent:
    """A recurrent layer (or Bidirectional) reading a fast sequence: an embedding or a stacked layer."""

    def __init__(self, layer, node, source):
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
        self.directions = [_Direction(inner, source, reverse) for inner, reverse in layers]
        self.bucketed = _bucketed_groups(self)
        units = self.directions[0].units
        self.dim = 2 * units if self.merge_mode == "concat" else units

    def pad_inputs(self, reverse):
        """What a stacked layer reads at its leading padding: this layer's padding outputs."""
        if len(self.directions) != 1 or self.directions[0].reverse != reverse:
            return None
        direction = self.directions[0]
        return None if direction.pad_h is None else direction.pad_h[1:].numpy()

    def merge(self, values):
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


class _Analysis:
    """Classifies the tensors of a model: fast (embedding or recurrent), or computed by Keras."""

    def __init__(self):
        self._fast = {}
        self.reasons = {}

    def fast(self, tensor):
        """The `_Embedding`/`_Recurrent` that computes `tensor`, or None (reason in `reasons`)."""
        key = id(tensor)
        if key not in self._fast:
            try:
                self._fast[key] = self._build(tensor)
            except Unsupported as reason:
                self._fast[key] = None
                self.reasons[key] = str(reason)
        return self._fast[key]

    def _build(self, tensor):
        layer, node = _producer(tensor)
        if layer is None or isinstance(layer, keras.layers.InputLayer):
            return None
        if isinstance(layer, keras.layers.Embedding):
            return _Embedding(layer, node)
        if isinstance(layer, (keras.layers.RNN, keras.layers.Bidirectional)):
            parent = (keras_graph.node_inputs(node) or [None])[0]
            source = self.fast(parent) if parent is not None else None
            if source is None:
                below = self.reasons.get(id(parent)) if parent is not None else None
                raise Unsupported(
                    f"{type(layer).__name__} {layer.name!r} does not read an Embedding of a model input "
                    "or a fast recurrent sequence" + (f" ({below})" if below else "")
                )
            if isinstance(source, _Recurrent) and not source.return_sequences:
                raise Unsupported(f"{layer.name!r} reads {source.name!r}, which returns no sequence")
            return _Recurrent(layer, node, source)
        return None

    def describe(self, tensor):
        """The `ForwardPass` of one tensor, and the fast recurrent tensors it needs."""
        fast = self.fast(tensor)
        if fast is not None:
            return ForwardPass(FAST, _describe_fast(fast)), [tensor] if isinstance(fast, _Recurrent) else []
        keras_layers, cuts, reasons, seen = [], [], [], set()
        stack = [tensor]
        while stack:
            current = stack.pop()
            if id(current) in seen:
                continue
            seen.add(id(current))
            layer, node = _producer(current)
            if layer is None:
                continue
            if isinstance(layer, keras.layers.InputLayer):
                if not _is_numeric_ids(current):
                    reasons.append(f"input {current.name!r} is not fixed-length token ids ({current.dtype})")
                continue
            if current is not tensor and isinstance(self.fast(current), _Recurrent):
                cuts.append(current)
                continue
            self.fast(current)
            if id(current) in self.reasons:
                reasons.append(self.reasons[id(current)])
            if isinstance(layer, keras.layers.Layer):
                keras_layers.append(layer.name)
            stack.extend(keras_graph.node_inputs(node))
        reasons = list(dict.fromkeys(reasons))
        if cuts:
            names = sorted({_producer(t)[0].name for t in cuts})
            text = f"Keras layers {sorted(set(keras_layers))} on fast-path outputs of {names}"
            return ForwardPass(HYBRID, text + "".join(f"; {reason}" for reason in reasons)), cuts
        layer = _producer(tensor)[0]
        text = "; ".join(reasons) or (
            f"{type(layer).__name__} {layer.name!r} reads no Embedding -> LSTM/GRU/SimpleRNN chain"
        )
        return ForwardPass(KERAS, text), []


def _describe_fast(fast):
    if isinstance(fast, _Embedding):
        return f"embedding {fast.name!r}: table lookup"
    modes = {
        MASKED: "masked steps skipped",
        PREFIX: "padding it reads first skipped",
        FULL: "every step run (padding read last)",
    }
    directions = "; ".join(
        f"{'backward' if d.reverse else 'forward'} {d.cell}: {modes[d.mode]}"
        + (", inputs folded into the embedding table" if d.projection is not None else "")
        for d in fast.directions
    )
    return f"{type(fast.layer).__name__} {fast.name!r}: {directions}"


def describe_forward_passes(tensors):
    """{key: ForwardPass} for output tensors {key: KerasTensor}, from the layers alone (no check)."""
    analysis = _Analysis()
    return {key: analysis.describe(tensor)[0] for key, tensor in tensors.items()}


def _plan_key(recurrent, direction):
    return f"{recurrent.input_name}|{int(direction.reverse)}|{direction.mode}"


def _buckets(plans, length):
    """Bucket arrays of a `_Bucketed` group: ids (buckets, directions, rows, length), starts (.., rows).

    Rows are in the plans' (shared) sorted order; the last bucket is filled with
    rows that never start.
    """
    count = len(plans[0]["order"])
    fill = (-count) % BUCKET_ROWS
    ids = np.stack([np.pad(plan["every_id"], ((0, fill), (0, 0))) for plan in plans])
    starts = np.stack([np.pad(plan["starts"], (0, fill), constant_values=length) for plan in plans])
    width = len(plans)
    ids = ids.reshape(width, -1, BUCKET_ROWS, length).transpose(1, 0, 2, 3)
    starts = starts.reshape(width, -1, BUCKET_ROWS).transpose(1, 0, 2)
    return {"ids": ids.astype(np.int32), "starts": starts.astype(np.int32)}


def _reading_plan(ids, reverse, mode):
    """How one lane's rows run one direction: sorted order, active counts, and step inputs.

    Rows are sorted by the step at which they start, so the rows that have started
    form a prefix; `steps` holds, for each sorted row and step, the original
    position read (valid where the row is active).
    """
    n, length = ids.shape
    read = ids[:, ::-1] if reverse else ids
    real = read != 0
    positions = np.broadcast_to(np.arange(length), (n, length))
    if mode == MASKED:
        starts = length - real.sum(axis=1)
        real_first = np.argsort(~real, axis=1, kind="stable")
        shift = np.arange(length)[None, :] - starts[:, None]
        positions = np.take_along_axis(real_first, np.clip(shift, 0, length - 1), axis=1)
    elif mode == PREFIX:
        starts = np.where(real.any(axis=1), real.argmax(axis=1), length)
    else:
        starts = np.zeros(n, dtype=np.int64)
    order = np.argsort(starts, kind="stable")
    starts = starts[order]
    # At least one step, so that every loop writes an output (of no rows if all are padding).
    first = min(int(starts[0]), length - 1)
    active = np.searchsorted(starts, np.arange(first, length), side="right")
    reading = positions[order, first:]
    original = length - 1 - reading if reverse else reading
    rows = order[:, None]
    every = positions[order]
    return {
        "every_id": ids[rows, length - 1 - every if reverse else every].astype(np.int32),
        "order": order,
        "starts": starts,
        "active": active,
        "reading": reading,
        "ids": ids[rows, original].astype(np.int32),
        "flat": (rows * length + original).astype(np.int32),
    }


def _index_map(plan, length, reverse, mode, zero_fill):
    """Where each (row, position) output lives in [outputs written per step; padding outputs; zero].

    Rows and positions are the lane's own (unsorted, original order).
    """
    active, reading, order = plan["active"], plan["reading"], plan["order"]
    n = len(order)
    offsets = np.concatenate([[0], np.cumsum(active)[:-1]])
    written = int(active.sum())
    zero_row = written + length
    by_reading = np.full((n, length), -1, dtype=np.int64)
    rows, steps = np.nonzero(np.arange(n)[:, None] < active[None, :])
    by_reading[rows, reading[rows, steps]] = offsets[steps] + rows
    missing = by_reading < 0
    if mode == PREFIX:
        by_reading = np.where(missing, written + np.arange(length)[None, :], by_reading)
    elif mode == MASKED and zero_fill:
        by_reading = np.where(missing, zero_row, by_reading)
    elif mode == MASKED:
        # A masked step repeats the last output (zeros before the first real token).
        last = np.maximum.accumulate(np.where(missing, -1, np.arange(length)[None, :]), axis=1)
        carried = np.take_along_axis(by_reading, np.maximum(last, 0), axis=1)
        by_reading = np.where(missing, np.where(last >= 0, carried, zero_row), by_reading)
    by_position = by_reading[:, ::-1] if reverse else by_reading
    index = np.empty_like(by_position)
    index[order] = by_position
    return index.astype(np.int32)


class FastPath:
    """Computes a sub-model's outputs: fast recurrent chains, then Keras layers on their outputs."""

    def __init__(self, sub_model):
        for tensor in sub_model.inputs:
            if not _is_numeric_ids(tensor):
                raise Unsupported(f"input {tensor.name!r} is not fixed-length token ids ({tensor.dtype})")
        if not isinstance(sub_model.output, dict):
            raise Unsupported("the sub-model's outputs are not a dict of columns (see models.truncate)")
        outputs = sub_model.output
        self._outputs = outputs
        self._inputs = {t.name: t for t in sub_model.inputs}
        analysis = _Analysis()
        self.forward_passes, cuts, hybrid_inputs = {}, {}, set()
        for column, tensor in outputs.items():
            self.forward_passes[column], needed = analysis.describe(tensor)
            cuts.update((id(t), t) for t in needed)
            if self.forward_passes[column].engine == HYBRID:
                hybrid_inputs.update(id(t) for t in needed)
        fast_columns = {c for c, p in self.forward_passes.items() if p.engine != KERAS}
        if not cuts and fast_columns != set(outputs):
            raise Unsupported("; ".join(dict.fromkeys(p.reason for p in self.forward_passes.values())))
        self._cuts = {key: analysis.fast(tensor) for key, tensor in cuts.items()}
        self._cut_tensors = cuts
        self._embeddings = {
            column: analysis.fast(tensor)
            for column, tensor in outputs.items()
            if isinstance(analysis.fast(tensor), _Embedding)
        }
        # Every fast recurrent layer needed, lower layers before the ones they feed.
        self._recurrents = []
        for fast in self._cuts.values():
            self._add_recurrent(fast)
        self._sources = [r.source for r in self._recurrents] + list(self._embeddings.values())
        # Per-token columns of a recurrent layer that nothing else reads (no layer stacked on
        # it, no Keras layer of a hybrid column): `__call__(..., real_tokens=True)` computes
        # them at the real tokens only.
        self._real_token_columns = {
            column: analysis.fast(tensor)
            for column, tensor in outputs.items()
            if isinstance(analysis.fast(tensor), _Recurrent)
            and analysis.fast(tensor).return_sequences
            and id(tensor) not in hybrid_inputs
            and not any(r.source is analysis.fast(tensor) for r in self._recurrents)
        }
        self._runs = {}

    def _add_recurrent(self, fast):
        if any(fast is known for known in self._recurrents):
            return
        if isinstance(fast.source, _Recurrent):
            self._add_recurrent(fast.source)
        self._recurrents.append(fast)

    @property
    def vocabulary_size(self):
        """Rows of the smallest embedding table used: token ids must stay below it."""
        sizes = [source.layer.input_dim for source in self._sources if isinstance(source, _Embedding)]
        return min(sizes) if sizes else 2

    def _plans(self, features, rows, real_tokens):
        """The numpy side of one lane: reading plans and index maps for every direction.

        With `real_tokens`, the index maps of the real-token columns' layers keep
        only the real (non-zero id) positions, row after row.
        """
        plans, maps = {}, {}
        ragged = {id(fast) for fast in self._real_token_columns.values()} if real_tokens else set()
        for recurrent in self._recurrents:
            ids = features[recurrent.input_name][rows]
            for direction in recurrent.directions:
                key = _plan_key(recurrent, direction)
                if key not in plans:
                    plans[key] = _reading_plan(ids, direction.reverse, direction.mode)
                if recurrent.return_sequences:
                    zero_fill = direction.zero_output_for_mask
                    map_key = f"{key}|{int(zero_fill)}|{int(id(recurrent) in ragged)}"
                    if map_key not in maps:
                        index = _index_map(
                            plans[key], recurrent.length, direction.reverse, direction.mode, zero_fill
                        )
                        maps[map_key] = index[ids != 0] if id(recurrent) in ragged else index
        buckets = {}
        for recurrent in self._recurrents:
            for group in recurrent.bucketed:
                keys = [_plan_key(recurrent, direction) for direction in group.directions]
                buckets["+".join(keys)] = _buckets([plans[key] for key in keys], recurrent.length)
        arrays = {
            key: {
                "inverse": np.argsort(plan["order"]).astype(np.int32),
                **{
                    name: plan[name].astype(np.int32) for name in ("order", "starts", "active", "ids", "flat")
                },
            }
            for key, plan in plans.items()
        }
        return {"plans": arrays, "maps": maps, "buckets": buckets}

    def _run_direction(self, direction, plan, want_sequence, table=None, lower=None):
        """Runs one direction over one lane: (final output per sorted row, outputs written per step).

        The direction reads either the rows of its Embedding's `table` (indexed by
        token id) or `lower`, the stacked outputs of the recurrent layer below it.
        """
        n = tf.shape(plan["order"])[0]
        if direction.mode == PREFIX:
            h = tf.gather(direction.pad_h, plan["starts"])
            c = tf.gather(direction.pad_c, plan["starts"])
        else:
            h = tf.zeros((n, direction.units))
            c = tf.zeros((n, direction.carry_width()))
        if direction.projection is not None:
            table, steps, project = direction.projection, plan["ids"], False
        elif table is not None:
            steps, project = plan["ids"], True
        else:
            table, steps, project = lower, plan["flat"], True
        active = plan["active"]
        count = tf.shape(active)[0]
        written = tf.TensorArray(
            tf.float32, size=count, infer_shape=False, element_shape=tf.TensorShape([None, direction.units])
        )
        for step in tf.range(count):
            tf.autograph.experimental.set_loop_options(
                shape_invariants=[
                    (h, tf.TensorShape([None, direction.units])),
                    (c, tf.TensorShape([None, direction.carry_width()])),
                ]
            )
            k = active[step]
            x = tf.gather(table, steps[:k, step])
            if project:
                x = direction.project(x)
            h_new, c_new = direction.step(x, h[:k], c[:k])
            h = tf.concat([h_new, h[k:]], axis=0)
            c = tf.concat([c_new, c[k:]], axis=0)
            if want_sequence:
                written = written.write(step, h_new)
        return h, written.concat() if want_sequence else None

    def _run_bucketed(self, recurrent, lane):
        """Final outputs of each direction of a bucketed layer over one lane, in the lane's row order."""
        results = []
        for group in recurrent.bucketed:
            keys = [_plan_key(recurrent, direction) for direction in group.directions]
            buckets = lane["buckets"]["+".join(keys)]
            width = len(group.directions)
            finals = tf.map_fn(
                lambda bucket, group=group: group.run(*bucket),
                (buckets["ids"], buckets["starts"]),
                fn_output_signature=tf.TensorSpec([width, None, group.units], tf.float32),
            )
            finals = tf.reshape(tf.transpose(finals, [1, 0, 2, 3]), (width, -1, group.units))
            for index, key in enumerate(keys):
                results.append(tf.gather(finals[index], lane["plans"][key]["inverse"]))
        return results

    def _lane(self, lane, ragged):
        """Values of every fast recurrent layer for one lane, in the lane's row order.

        The layers in `ragged` (ids) give their real tokens' outputs only, (tokens, dim).
        """
        values = {}
        for recurrent in self._recurrents:
            if isinstance(recurrent.source, _Recurrent):
                source = {"lower": tf.reshape(values[id(recurrent.source)], (-1, recurrent.source.dim))}
            else:
                source = {"table": recurrent.source.table_tensor}
            if recurrent.bucketed:
                values[id(recurrent)] = recurrent.merge(self._run_bucketed(recurrent, lane))
                continue
            results = []
            for direction in recurrent.directions:
                key = _plan_key(recurrent, direction)
                plan = lane["plans"][key]
                final, written = self._run_direction(direction, plan, recurrent.return_sequences, **source)
                if recurrent.return_sequences:
                    pad = (
                        direction.pad_h[1:]
                        if direction.mode == PREFIX
                        else tf.zeros((recurrent.length, direction.units))
                    )
                    combined = tf.concat([written, pad, tf.zeros((1, direction.units))], axis=0)
                    index = lane["maps"][
                        f"{key}|{int(direction.zero_output_for_mask)}|{int(id(recurrent) in ragged)}"
                    ]
                    results.append(tf.gather(combined, index))
                else:
                    results.append(tf.gather(final, plan["inverse"]))
            values[id(recurrent)] = recurrent.merge(results)
        return values

    def _deal(self, features, count):
        """Rows of each lane: runs of similar length, each lane about the same number of tokens.

        A lane's loop runs as many steps as its longest row needs, so grouping
        long rows together saves the steps where a lane would compute a few rows.
        """
        n = len(next(iter(features.values())))
        if count == 1:
            return [np.arange(n)]
        names = sorted({recurrent.input_name for recurrent in self._recurrents})
        tokens = sum(np.count_nonzero(features[name], axis=1) for name in names) + 1
        order = np.argsort(tokens, kind="stable")
        total = np.cumsum(tokens[order])
        cuts = np.searchsorted(total, total[-1] * np.arange(1, count) / count, side="right")
        cuts = np.unique(np.clip(cuts, 1, n - 1))
        return [np.sort(lane) for lane in np.split(order, cuts)]

    def _forward(self, raw, lanes, restore, columns, real_tokens):
        """The traced computation of `columns`: fast lanes, then the model's Keras layers on their outputs."""
        ragged = {id(fast) for fast in self._real_token_columns.values()} if real_tokens else set()
        lane_values = [self._lane(lane, ragged) for lane in lanes]
        known = {}
        for key, fast in self._cuts.items():
            order = restore["tokens"][fast.input_name] if id(fast) in ragged else restore["rows"]
            known[key] = tf.gather(tf.concat([values[id(fast)] for values in lane_values], axis=0), order)
        for name, tensor in self._inputs.items():
            known[id(tensor)] = tf.cast(raw[name], tensor.dtype)
        results = {}
        for column in columns:
            tensor = self._outputs[column]
            if column in self._embeddings:
                embedding = self._embeddings[column]
                results[column] = tf.gather(embedding.table_tensor, raw[embedding.input_name])
            else:
                results[column] = _keras_value(tensor, known)
        return results

    def _traced(self, raw, lanes, restore, columns, real_tokens):
        """The traced function for this many lanes and these columns: traced once, for every batch."""
        key = (len(lanes), columns, real_tokens)
        if key not in self._runs:
            signature = tf.nest.map_structure(
                lambda array: tf.TensorSpec([None] * array.ndim, tf.int32), (raw, lanes, restore)
            )
            forward = functools.partial(self._forward, columns=columns, real_tokens=real_tokens)
            self._runs[key] = tf.function(forward, input_signature=signature)
        return self._runs[key]

    def embedding_tables(self):
        """{column: (model input name, table)} of the columns that are an Embedding's lookup.

        Such a column's output at a token is its table's row at the token's id, so
        a caller can take the real tokens' rows itself (`__call__(..., columns)`
        without it) instead of the padded (n, length, dim) lookup.
        """
        return {column: (fast.input_name, fast.table) for column, fast in self._embeddings.items()}

    def real_token_columns(self):
        """{column: its model input}: the columns `__call__(..., real_tokens=True)` gives at real tokens.

        Each is a recurrent layer's `return_sequences` output that no other layer
        reads, whose padding positions would be computed for nothing.
        """
        return {column: fast.input_name for column, fast in self._real_token_columns.items()}

    def __call__(self, features, columns=None, real_tokens=False):
        """{input name: int ids (n, length)} -> {column: numpy array}, as the sub-model would give.

        Rows are dealt round-robin into up to `MAX_LANES` lanes of at least
        `MIN_LANE_ROWS`.  A row's result does not depend on which rows share
        its lane or batch (checked against Keras at load).

        Args:
            features: the sub-model's inputs.
            columns: the output columns to compute (default: all).
            real_tokens: give each of `real_token_columns` as (real tokens, dim): the
                outputs at the non-zero ids of its input, row after row, in position
                order; exactly those rows of the (n, length, dim) output.
        """
        return self._call(features, columns, real_tokens, traced_lanes=MAX_LANES)

    def _call(self, features, columns, real_tokens, traced_lanes):
        """`__call__`, its batch dealt into as many lanes as it fills, then padded to `traced_lanes`.

        The padding lanes each hold a copy of the batch's shortest row, and their
        outputs are dropped: the dealt lanes compute exactly what they did alone,
        and every batch (a short last one, the check's, one document retried)
        runs the one function traced for `traced_lanes` lanes (None: one trace
        per lane count).
        """
        columns = tuple(self._outputs) if columns is None else tuple(columns)
        features = {name: np.asarray(features[name], dtype=np.int32) for name in self._inputs}
        n = len(next(iter(features.values())))
        if n == 0 or not columns:
            shapes = {column: self._outputs[column].shape[1:] for column in columns}
            if real_tokens:
                shapes.update({column: shapes[column][-1:] for column in self._real_token_columns})
            return {column: np.zeros((0, *shapes[column]), np.float32) for column in columns}
        count = max(1, min(MAX_LANES, n // MIN_LANE_ROWS)) if self._recurrents else 1
        rows = self._deal(features, count)
        lanes = [self._plans(features, lane_rows, real_tokens) for lane_rows in rows]
        restore = {"rows": np.argsort(np.concatenate(rows)).astype(np.int32), "tokens": {}}
        if real_tokens:
            for name in {fast.input_name for fast in self._real_token_columns.values()}:
                real = features[name] != 0
                # Each lane's real tokens come row after row; this puts them back in batch order.
                numbers = np.full(real.shape, -1, dtype=np.int64)
                numbers[real] = np.arange(int(real.sum()))
                lane_order = np.concatenate([numbers[lane][real[lane]] for lane in rows])
                restore["tokens"][name] = np.argsort(lane_order).astype(np.int32)
        if self._recurrents and traced_lanes and len(lanes) < traced_lanes:
            # After the dealt lanes, so `restore` (which reads only those) is unchanged.
            names = sorted({recurrent.input_name for recurrent in self._recurrents})
            shortest = np.argmin(sum(np.count_nonzero(features[name], axis=1) for name in names))
            spare = self._plans(features, np.array([shortest]), real_tokens)
            lanes += [spare] * (traced_lanes - len(lanes))
        traced = self._traced(features, lanes, restore, columns, real_tokens)
        outputs = traced(features, lanes, restore)
        return {column: value.numpy() for column, value in outputs.items()}


def _keras_value(tensor, known):
    """Computes `tensor` by calling the model's own layers on already known values."""
    if id(tensor) in known:
        return known[id(tensor)]
    operation, node = _producer(tensor)
    for parent in keras_graph.node_inputs(node):
        _keras_value(parent, known)
    args, kwargs = keras_graph.call_arguments(node, known)
    if keras_graph.takes_training(operation):
        kwargs["training"] = False
    outputs = operation(*args, **kwargs)
    for symbolic, value in zip(node.outputs, tf.nest.flatten(outputs), strict=True):
        known[id(symbolic)] = value
    return known[id(tensor)]


def build_fast_path(sub_model):
    """Returns `(FastPath, {column: ForwardPass})`, or `(None, reason)` when nothing qualifies."""
    try:
        fast = FastPath(sub_model)
    except Unsupported as reason:
        return None, str(reason)
    return fast, fast.forward_passes
