"""An exact fast forward pass for Embedding -> LSTM sub-models (the tutorial's models).

Three exact rewrites of what Keras computes, chosen automatically when the layer
configuration allows them:

1. Folding: an LSTM step's input projection `E[id] @ W + b` is a row of the table
   `E @ W + b`, computed once per model load; each step is then a row lookup
   plus the recurrent matmul.
2. Padding skip: with pre-padding and no masking, every document first runs the
   same padding tokens from the zero state, so the state after k padding steps
   is the same for every document.  It is computed once per k; each document
   then starts from that state and only its last steps are run.
3. Length sorting: documents are sorted longest first and run together; at each
   step only the documents that have started move (a prefix of the batch), so
   the work is the sum of the real lengths, not batch size times input length.
4. Lanes: a batch is dealt into a few lanes run as independent loops in one
   traced function, so TensorFlow runs them on several cores at once (each
   step's matmul is too small to spread over cores by itself).

`build_fast_path` says why when a model does not qualify; the caller then
keeps Keras's own forward pass.  The caller also checks the result against
Keras on a sample batch before trusting it.
"""

import keras
import numpy as np
import tensorflow as tf

# Lanes of rows run as independent loops in parallel; fewer, fuller lanes for small batches.
MAX_LANES = 4
MIN_LANE_ROWS = 128


class Unsupported(Exception):
    """The sub-model has a feature the fast path does not reproduce exactly."""


def _producer(tensor):
    history = tensor._keras_history
    operation = history.operation
    return operation, operation._inbound_nodes[history.node_index]


def _input_name(tensor, input_names):
    if tensor.name in input_names and isinstance(_producer(tensor)[0], keras.layers.InputLayer):
        return tensor.name
    raise Unsupported("the embedding does not read a model input directly")


def _check_embedding(layer):
    if type(layer) is not keras.layers.Embedding:
        raise Unsupported(f"layer {layer.name!r} is a {type(layer).__name__}, not an Embedding")
    if layer.mask_zero:
        raise Unsupported(f"embedding {layer.name!r} uses mask_zero (masking)")
    if layer.compute_dtype != "float32":
        raise Unsupported(f"embedding {layer.name!r} computes in {layer.compute_dtype}")


def _check_lstm(layer):
    if type(layer) is not keras.layers.LSTM:
        raise Unsupported(f"layer {layer.name!r} is a {type(layer).__name__}, not a plain LSTM")
    config = layer.get_config()
    problems = []
    if config.get("activation") != "tanh":
        problems.append(f"activation {config.get('activation')!r}")
    if config.get("recurrent_activation") != "sigmoid":
        problems.append(f"recurrent_activation {config.get('recurrent_activation')!r}")
    for flag in ("return_sequences", "return_state", "go_backwards", "stateful"):
        if config.get(flag):
            problems.append(flag)
    if layer.compute_dtype != "float32":
        problems.append(f"dtype {layer.compute_dtype}")
    if problems:
        raise Unsupported(f"LSTM {layer.name!r} uses {', '.join(problems)}")


def _plan_output(tensor, input_names):
    """Describes how to compute one requested output, or raises Unsupported."""
    layer, node = _producer(tensor)
    if isinstance(layer, keras.layers.Embedding):
        _check_embedding(layer)
        return ("embedding", layer, _input_name(node.input_tensors[0], input_names))
    if isinstance(layer, keras.layers.LSTM) or type(layer).__name__ in (
        "GRU",
        "Bidirectional",
        "SimpleRNN",
        "RNN",
    ):
        _check_lstm(layer)
        embedding, embedding_node = _producer(node.input_tensors[0])
        _check_embedding(embedding)
        if len(node.input_tensors) != 1:
            raise Unsupported(f"LSTM {layer.name!r} is called with initial states or a mask")
        return ("lstm", layer, embedding, _input_name(embedding_node.input_tensors[0], input_names))
    if type(layer) is keras.layers.Add:
        parts = [_plan_output(parent, input_names) for parent in node.input_tensors]
        if any(part[0] != "lstm" for part in parts):
            raise Unsupported(f"Add layer {layer.name!r} adds something other than LSTM outputs")
        return ("add", layer, parts)
    raise Unsupported(f"output layer {layer.name!r} is a {type(layer).__name__}")


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _padding_states(pad_projection, recurrent, length):
    units = recurrent.shape[0]
    h = np.zeros(units, np.float32)
    c = np.zeros(units, np.float32)
    states_h, states_c = [h], [c]
    for _ in range(length):
        i, f, g, o = np.split(pad_projection + h @ recurrent, 4)
        c = (_sigmoid(f) * c + _sigmoid(i) * np.tanh(g)).astype(np.float32)
        h = (_sigmoid(o) * np.tanh(c)).astype(np.float32)
        states_h.append(h)
        states_c.append(c)
    return np.stack(states_h), np.stack(states_c)


class _FoldedLstm:
    """One LSTM reading one embedding, folded and with precomputed padding states."""

    def __init__(self, lstm, embedding, length):
        weights = lstm.get_weights()
        kernel, recurrent = weights[0], weights[1]
        bias = weights[2] if len(weights) > 2 else np.zeros(kernel.shape[1], np.float32)
        table = embedding.get_weights()[0]
        self.units = recurrent.shape[0]
        self.length = length
        self.projection = tf.constant(table @ kernel + bias, dtype=tf.float32)
        self.recurrent = tf.constant(recurrent, dtype=tf.float32)
        self._runs = {}
        # State after k padding tokens from the zero state, for k = 0..length: one
        # row of work per step, so plain numpy is quick enough.
        self.pad_h, self.pad_c = _padding_states(table[0] @ kernel + bias, recurrent, length)

    def _steps(self, ids, active, h, c):
        """Runs `ids`' columns as steps; at step t only the first `active[t]` rows move.

        Rows are sorted longest first, so the rows that have started form a
        prefix; the others keep their padding state until their turn.
        """
        for step in tf.range(tf.shape(ids)[1]):
            k = active[step]
            z = tf.gather(self.projection, ids[:k, step]) + tf.matmul(h[:k], self.recurrent)
            i, f, g, o = tf.split(z, 4, axis=1)
            c_new = tf.sigmoid(f) * c[:k] + tf.sigmoid(i) * tf.tanh(g)
            h_new = tf.sigmoid(o) * tf.tanh(c_new)
            h = tf.concat([h_new, h[k:]], axis=0)
            c = tf.concat([c_new, c[k:]], axis=0)
        return h, c

    def _parallel_run(self, lanes):
        """One traced function running `lanes` independent loops, which TensorFlow's
        inter-op threads execute side by side (small matmuls use one core each)."""
        if lanes not in self._runs:
            signature = [
                tf.TensorSpec([None, None], tf.int32),
                tf.TensorSpec([None], tf.int32),
                tf.TensorSpec([None, self.units], tf.float32),
                tf.TensorSpec([None, self.units], tf.float32),
            ]

            def run(*arguments):
                return [self._steps(*arguments[4 * lane : 4 * lane + 4])[0] for lane in range(lanes)]

            self._runs[lanes] = tf.function(run, input_signature=signature * lanes)
        return self._runs[lanes]

    def _prepare(self, ids):
        """Sorts rows longest first; returns (order, loop arguments) or (order, None) if all padding."""
        length = ids.shape[1]
        nonzero = ids != 0
        starts = np.where(nonzero.any(axis=1), nonzero.argmax(axis=1), length)
        order = np.argsort(starts, kind="stable")
        starts = starts[order]
        first = int(starts[0])
        if first == length:
            return order, None
        # Each row waits at the state reached after its own padding.
        active = np.searchsorted(starts, np.arange(first, length), side="right").astype(np.int32)
        return order, (ids[order, first:], active, self.pad_h[starts], self.pad_c[starts])

    def __call__(self, ids):
        """Final hidden state for each row of pre-padded `ids` (n, length).

        Rows are dealt round-robin into up to `MAX_LANES` lanes of at least
        `MIN_LANE_ROWS`, each run by its own loop.  A row's result does not depend
        on which rows share its lane (checked against Keras at load).
        """
        n, length = ids.shape
        result = np.empty((n, self.units), dtype=np.float32)
        if n == 0:
            return result
        lanes = max(1, min(MAX_LANES, n // MIN_LANE_ROWS))
        rows = [np.arange(lane, n, lanes) for lane in range(lanes)]
        prepared = [self._prepare(ids[lane_rows]) for lane_rows in rows]
        running = []
        for lane_rows, (order, arguments) in zip(rows, prepared, strict=True):
            if arguments is None:
                result[lane_rows] = self.pad_h[length]
            else:
                running.append((lane_rows, order, arguments))
        if running:
            outputs = self._parallel_run(len(running))(*[x for _, _, arguments in running for x in arguments])
            for (lane_rows, order, _), output in zip(running, outputs, strict=True):
                result[lane_rows[order]] = output.numpy()
        return result


class FastPath:
    """Computes a sub-model's outputs with folded, padding-skipping LSTMs."""

    def __init__(self, sub_model, padding):
        if padding != "pre":
            raise Unsupported(f"padding is {padding!r}; skipping padding exactly needs pre-padding")
        for tensor in sub_model.inputs:
            if len(tensor.shape) != 2 or tensor.shape[1] is None or "int" not in str(tensor.dtype):
                raise Unsupported(f"input {tensor.name!r} is not fixed-length token ids ({tensor.dtype})")
        input_names = {t.name for t in sub_model.inputs}
        lengths = {t.name: int(t.shape[1]) for t in sub_model.inputs}
        outputs = sub_model.output if isinstance(sub_model.output, dict) else {"output": sub_model.output}
        self._plans = {column: _plan_output(tensor, input_names) for column, tensor in outputs.items()}
        self._lstms = {}
        self._tables = {}
        self._embeddings = []
        for plan in self._plans.values():
            parts = plan[2] if plan[0] == "add" else [plan]
            for part in parts:
                self._embeddings.append(part[2] if part[0] == "lstm" else part[1])
                if part[0] == "lstm" and part[1].name not in self._lstms:
                    self._lstms[part[1].name] = _FoldedLstm(part[1], part[2], lengths[part[3]])
                if part[0] == "embedding":
                    self._tables[part[1].name] = part[1].get_weights()[0]

    @property
    def vocabulary_size(self):
        """Rows of the smallest embedding table used: token ids must stay below it."""
        sizes = [part.input_dim for part in self._embeddings]
        return min(sizes) if sizes else 2

    def _lstm(self, part, features):
        return self._lstms[part[1].name](features[part[3]])

    def __call__(self, features):
        """{input name: int32 ids} -> {column: numpy array}, as the sub-model would give."""
        results, cache = {}, {}
        for column, plan in self._plans.items():
            if plan[0] == "embedding":
                results[column] = self._tables[plan[1].name][features[plan[2]]]
                continue
            parts = plan[2] if plan[0] == "add" else [plan]
            values = []
            for part in parts:
                key = (part[1].name, part[3])
                if key not in cache:
                    cache[key] = self._lstm(part, features)
                values.append(cache[key])
            results[column] = values[0] if len(values) == 1 else np.sum(values, axis=0, dtype=np.float32)
        return results


def build_fast_path(sub_model, padding):
    """Returns `(FastPath, None)`, or `(None, reason)` when the model does not qualify."""
    try:
        return FastPath(sub_model, padding), None
    except Unsupported as reason:
        return None, str(reason)
