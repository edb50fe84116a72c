"""The fast path's TensorFlow loops: a batch dealt into lanes, each direction's loop, the hybrid pass."""

from __future__ import annotations

import functools
import typing
from collections.abc import Callable, Mapping, Sequence

import keras
import numpy as np
import tensorflow as tf

from models import keras_graph
from models.fast_path.analysis import HYBRID, KERAS, Analysis, ForwardPass
from models.fast_path.buckets import bucket_arrays
from models.fast_path.cells import (
    Direction,
    FastEmbedding,
    FastRecurrent,
    Unsupported,
    is_numeric_ids,
)
from models.fast_path.plans import (
    PREFIX,
    Lane,
    ReadingPlan,
    Restore,
    TracedArguments,
    deal_lanes,
    index_map,
    plan_key,
    reading_plan,
)

# Lanes of rows run as independent loops in parallel; fewer, fuller lanes for small batches.
MAX_LANES = 4
MIN_LANE_ROWS = 128


class FastPath:
    """Computes a sub-model's outputs: fast recurrent chains, then Keras layers on their outputs."""

    _outputs: dict[str, keras.KerasTensor]
    _inputs: dict[str, keras.KerasTensor]
    forward_passes: dict[str, ForwardPass]  # column -> which forward pass computes it, and why
    # The fast recurrent tensors Keras layers (or a column) read, by `id(tensor)`, and their layers.
    _cuts: dict[int, FastRecurrent]
    _cut_tensors: dict[int, keras.KerasTensor]
    _embeddings: dict[str, FastEmbedding]  # columns that are an Embedding's lookup
    _recurrents: list[FastRecurrent]
    _sources: list[FastEmbedding | FastRecurrent]
    _real_token_columns: dict[str, FastRecurrent]
    # The traced function per (lanes, columns, real_tokens).
    _runs: dict[tuple[int, tuple[str, ...], bool], Callable[..., dict[str, tf.Tensor]]]

    def __init__(self, sub_model: keras.Model) -> None:
        for tensor in sub_model.inputs:
            if not is_numeric_ids(tensor):
                raise Unsupported(f"input {tensor.name!r} is not fixed-length token ids ({tensor.dtype})")
        if not isinstance(sub_model.output, dict):
            raise Unsupported("the sub-model's outputs are not a dict of columns (see models.truncate)")
        outputs = sub_model.output
        self._outputs = outputs
        self._inputs = {t.name: t for t in sub_model.inputs}
        analysis = Analysis()
        self.forward_passes = {}
        cuts: dict[int, keras.KerasTensor] = {}
        hybrid_inputs: set[int] = set()
        for column, tensor in outputs.items():
            self.forward_passes[column], needed = analysis.describe(tensor)
            cuts.update((id(t), t) for t in needed)
            if self.forward_passes[column].engine == HYBRID:
                hybrid_inputs.update(id(t) for t in needed)
        fast_columns = {c for c, p in self.forward_passes.items() if p.engine != KERAS}
        if not cuts and fast_columns != set(outputs):
            raise Unsupported("; ".join(dict.fromkeys(p.reason for p in self.forward_passes.values())))
        # `describe` cuts the graph only at tensors of fast recurrent layers.
        self._cuts = {key: typing.cast(FastRecurrent, analysis.fast(tensor)) for key, tensor in cuts.items()}
        self._cut_tensors = cuts
        self._embeddings = {
            column: fast
            for column, tensor in outputs.items()
            if isinstance(fast := analysis.fast(tensor), FastEmbedding)
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
            column: recurrent
            for column, tensor in outputs.items()
            if isinstance(recurrent := analysis.fast(tensor), FastRecurrent)
            and recurrent.return_sequences
            and id(tensor) not in hybrid_inputs
            and not any(r.source is recurrent for r in self._recurrents)
        }
        self._runs = {}

    def _add_recurrent(self, fast: FastRecurrent) -> None:
        if any(fast is known for known in self._recurrents):
            return
        if isinstance(fast.source, FastRecurrent):
            self._add_recurrent(fast.source)
        self._recurrents.append(fast)

    @property
    def vocabulary_size(self) -> int:
        """Rows of the smallest embedding table used: token ids must stay below it."""
        sizes = [source.layer.input_dim for source in self._sources if isinstance(source, FastEmbedding)]
        return min(sizes) if sizes else 2

    def _plans(self, features: Mapping[str, np.ndarray], rows: np.ndarray, real_tokens: bool) -> Lane:
        """The numpy side of one lane: reading plans and index maps for every direction.

        With `real_tokens`, the index maps of the real-token columns' layers keep
        only the real (non-zero id) positions, row after row.
        """
        plans: dict[str, ReadingPlan] = {}
        maps: dict[str, np.ndarray] = {}
        ragged = {id(fast) for fast in self._real_token_columns.values()} if real_tokens else set()
        for recurrent in self._recurrents:
            ids = features[recurrent.input_name][rows]
            for direction in recurrent.directions:
                key = plan_key(recurrent, direction)
                if key not in plans:
                    plans[key] = reading_plan(ids, direction.reverse, direction.mode)
                if recurrent.return_sequences:
                    zero_fill = direction.zero_output_for_mask
                    map_key = f"{key}|{int(zero_fill)}|{int(id(recurrent) in ragged)}"
                    if map_key not in maps:
                        index = index_map(
                            plans[key], recurrent.length, direction.reverse, direction.mode, zero_fill
                        )
                        maps[map_key] = index[ids != 0] if id(recurrent) in ragged else index
        buckets: dict[str, dict[str, np.ndarray]] = {}
        for recurrent in self._recurrents:
            for group in recurrent.bucketed:
                keys = [plan_key(recurrent, direction) for direction in group.directions]
                buckets["+".join(keys)] = bucket_arrays([plans[key] for key in keys], recurrent.length)
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

    def _run_direction(
        self,
        direction: Direction,
        plan: ReadingPlan,
        want_sequence: bool,
        table: tf.Tensor | None = None,
        lower: tf.Tensor | None = None,
    ) -> tuple[tf.Tensor, tf.Tensor | None]:
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

        def body(
            step: tf.Tensor, h: tf.Tensor, c: tf.Tensor, written: tf.TensorArray
        ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.TensorArray]:
            k = active[step]
            x = tf.gather(table, steps[:k, step])
            if project:
                x = direction.project(x)
            h_new, c_new = direction.step(x, h[:k], c[:k])
            h = tf.concat([h_new, h[k:]], axis=0)
            c = tf.concat([c_new, c[k:]], axis=0)
            if want_sequence:
                written = written.write(step, h_new)
            return step + 1, h, c, written

        # An explicit loop: the traced function needs no AutoGraph conversion (`_traced`).
        _, h, c, written = tf.while_loop(
            lambda step, *_: step < count,
            body,
            (tf.constant(0), h, c, written),
            shape_invariants=(
                tf.TensorShape([]),
                tf.TensorShape([None, direction.units]),
                tf.TensorShape([None, direction.carry_width()]),
                tf.TensorShape(None),
            ),
            maximum_iterations=count,
        )
        return h, written.concat() if want_sequence else None

    def _run_bucketed(self, recurrent: FastRecurrent, lane: Lane) -> list[tf.Tensor]:
        """Final outputs of each direction of a bucketed layer over one lane, in the lane's row order."""
        results = []
        for group in recurrent.bucketed:
            keys = [plan_key(recurrent, direction) for direction in group.directions]
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

    def _lane(self, lane: Lane, ragged: set[int]) -> dict[int, tf.Tensor]:
        """Values of every fast recurrent layer for one lane, in the lane's row order.

        The layers in `ragged` (ids) give their real tokens' outputs only, (tokens, dim).
        """
        values: dict[int, tf.Tensor] = {}
        for recurrent in self._recurrents:
            if isinstance(recurrent.source, FastRecurrent):
                source = {"lower": tf.reshape(values[id(recurrent.source)], (-1, recurrent.source.dim))}
            else:
                source = {"table": recurrent.source.table_tensor}
            if recurrent.bucketed:
                values[id(recurrent)] = recurrent.merge(self._run_bucketed(recurrent, lane))
                continue
            results = []
            for direction in recurrent.directions:
                key = plan_key(recurrent, direction)
                plan = lane["plans"][key]
                final, written = self._run_direction(direction, plan, recurrent.return_sequences, **source)
                if recurrent.return_sequences:
                    pad = (
                        direction.pad_h[1:]
                        if direction.mode == PREFIX and direction.pad_h is not None
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

    def _forward(
        self,
        raw: Mapping[str, np.ndarray],
        lanes: Sequence[Lane],
        restore: Restore,
        columns: tuple[str, ...],
        real_tokens: bool,
    ) -> dict[str, tf.Tensor]:
        """The traced computation of `columns`: fast lanes, then the model's Keras layers on their outputs."""
        ragged = {id(fast) for fast in self._real_token_columns.values()} if real_tokens else set()
        lane_values = [self._lane(lane, ragged) for lane in lanes]
        known: dict[int, tf.Tensor] = {}
        for key, fast in self._cuts.items():
            order = restore["tokens"][fast.input_name] if id(fast) in ragged else restore["rows"]
            value = tf.gather(tf.concat([values[id(fast)] for values in lane_values], axis=0), order)
            known[key] = value if id(fast) in ragged else _with_static_shape(value, self._cut_tensors[key])
        for name, tensor in self._inputs.items():
            known[id(tensor)] = _with_static_shape(tf.cast(raw[name], tensor.dtype), tensor)
        results = {}
        for column in columns:
            tensor = self._outputs[column]
            if column in self._embeddings:
                embedding = self._embeddings[column]
                results[column] = tf.gather(embedding.table_tensor, raw[embedding.input_name])
            else:
                results[column] = _keras_value(tensor, known)
        return results

    def _traced(
        self, arguments: TracedArguments, columns: tuple[str, ...], real_tokens: bool
    ) -> Callable[..., dict[str, tf.Tensor]]:
        """The traced function for this many lanes and these columns: traced once, for every batch.

        `arguments` are the ones it will be called with, `(raw, lanes, restore)`.
        """
        key = (len(arguments[1]), columns, real_tokens)
        if key not in self._runs:
            signature = tf.nest.map_structure(
                lambda array: tf.TensorSpec([None] * array.ndim, tf.int32), arguments
            )
            forward = functools.partial(self._forward, columns=columns, real_tokens=real_tokens)
            # Its loops are explicit `tf.while_loop`s: converting the Python code with AutoGraph
            # would only cost seconds of every process's start.
            self._runs[key] = tf.function(forward, input_signature=signature, autograph=False)
        return self._runs[key]

    def embedding_tables(self) -> dict[str, tuple[str, np.ndarray]]:
        """{column: (model input name, table)} of the columns that are an Embedding's lookup.

        Such a column's output at a token is its table's row at the token's id, so
        a caller can take the real tokens' rows itself (`__call__(..., columns)`
        without it) instead of the padded (n, length, dim) lookup.
        """
        return {column: (fast.input_name, fast.table) for column, fast in self._embeddings.items()}

    def real_token_columns(self) -> dict[str, str]:
        """{column: its model input}: the columns `__call__(..., real_tokens=True)` gives at real tokens.

        Each is a recurrent layer's `return_sequences` output that no other layer
        reads, whose padding positions would be computed for nothing.
        """
        return {column: fast.input_name for column, fast in self._real_token_columns.items()}

    def __call__(
        self,
        features: Mapping[str, np.ndarray],
        columns: Sequence[str] | None = None,
        real_tokens: bool = False,
    ) -> dict[str, np.ndarray]:
        """{input name: int ids (n, length)} -> {column: numpy array}, as the sub-model would give.

        Rows are sorted by length and cut into runs, up to `MAX_LANES` lanes of at
        least `MIN_LANE_ROWS` (`plans.deal_lanes`).  A row's result does not depend
        on which rows share its lane or batch (checked against Keras at load).

        Args:
            features: the sub-model's inputs.
            columns: the output columns to compute (default: all).
            real_tokens: give each of `real_token_columns` as (real tokens, dim): the
                outputs at the non-zero ids of its input, row after row, in position
                order; exactly those rows of the (n, length, dim) output.
        """
        return self._call(features, columns, real_tokens, traced_lanes=MAX_LANES)

    def _call(
        self,
        features: Mapping[str, np.ndarray],
        columns: Sequence[str] | None,
        real_tokens: bool,
        traced_lanes: int | None,
    ) -> dict[str, np.ndarray]:
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
        rows = deal_lanes(features, self._recurrents, count)
        lanes = [self._plans(features, lane_rows, real_tokens) for lane_rows in rows]
        restore: Restore = {"rows": np.argsort(np.concatenate(rows)).astype(np.int32), "tokens": {}}
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
        traced = self._traced((features, lanes, restore), columns, real_tokens)
        outputs = traced(features, lanes, restore)
        return {column: value.numpy() for column, value in outputs.items()}


def _with_static_shape(value: tf.Tensor, tensor: keras.KerasTensor) -> tf.Tensor:
    """`value` with the static shape of the symbolic `tensor` it stands for (all but the batch axis).

    The lanes' loops and the traced inputs leave the time axis unknown, and some
    Keras layers read it from the static shape: `TimeDistributed` would loop over
    the batch size instead (wrong shapes, or a crash on every batch whose size is
    not the input length), `LSTM(unroll=True)` could not be built.
    """
    return tf.ensure_shape(value, [None, *tensor.shape[1:]])


def _keras_value(tensor: keras.KerasTensor, known: dict[int, tf.Tensor]) -> tf.Tensor:
    """Computes `tensor` by calling the model's own layers on already known values."""
    if id(tensor) in known:
        return known[id(tensor)]
    operation, node = keras_graph.producing_call(tensor)
    for parent in keras_graph.node_inputs(node):
        _keras_value(parent, known)
    args, kwargs = keras_graph.call_arguments(node, known)
    if keras_graph.takes_training(operation):
        kwargs["training"] = False
    outputs = operation(*args, **kwargs)
    for symbolic, value in zip(node.outputs, tf.nest.flatten(outputs), strict=True):
        known[id(symbolic)] = value
    return known[id(tensor)]
