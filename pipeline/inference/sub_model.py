"""The worker's sub-model: the plan's model loaded once and checked, cut to its columns, traced for Keras.

Columns stored as token ids need no model, so the sub-model holds only the
columns a forward pass computes (`computed_columns`).
"""

from __future__ import annotations

import logging
import typing
from collections.abc import Callable, Mapping

import keras
import numpy as np

from models.truncate import truncate
from pipeline.errors import ExportConfigError
from pipeline.planning.introspection import batch_padded_vectorizers
from pipeline.planning.model_source import load_model_source
from pipeline.planning.plan import NO_TOKENIZER, TEXT_INPUT
from pipeline.writing import schema as schema_lib

if typing.TYPE_CHECKING:
    import tensorflow as tf

    from pipeline.planning.model_source import ModelSource
    from pipeline.planning.plan import ExportPlan

# Model input name -> a batch's values: int32 ids (n, length), or texts for a text input.
Features = Mapping[str, np.ndarray]
# Keras's forward pass runs batches of a multiple of this many rows (`SubModel._whole_blocks_forward`):
# a row's bits are then the same whatever the batch's size (TensorFlow's kernels take pairs of rows; 8
# leaves room for wider ones).
KERAS_BLOCK_ROWS = 8


def configure_threads(threads: int) -> None:
    """Sets TensorFlow's thread pools; a no-op once TensorFlow has started."""
    if not threads:
        return
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(max(1, threads // 2))
    except RuntimeError:
        logging.info("TensorFlow already initialised; keeping its thread settings.")


def _whole_blocks_forward(
    forward: Callable[[dict[str, tf.Tensor]], dict[str, tf.Tensor]], features: Features
) -> dict[str, np.ndarray]:
    """`forward` (the traced sub-model) over a batch padded to whole blocks of `KERAS_BLOCK_ROWS` rows.

    TensorFlow's CPU kernels compute the last row of a batch of odd size by a remainder
    path, whose sums differ in the last bits: unpadded, a document's row would depend on
    how many documents share its batch (which a --reuse or a resumed run changes). The
    spare rows are copies of the last one (valid inputs of every model); their outputs
    are dropped.
    """
    count = len(next(iter(features.values())))
    spare = -count % KERAS_BLOCK_ROWS
    padded = {
        name: np.concatenate([values, np.repeat(values[-1:], spare, axis=0)]) if spare else values
        for name, values in features.items()
    }
    return {name: value.numpy()[:count] for name, value in forward(padded).items()}


class SubModel:
    """The plan's model, SHA-256 checked, truncated to the columns a forward pass computes, and traced.

    Args:
        plan: the `ExportPlan` built at launch.
        model_source: an already loaded `ModelSource` (the launcher's); loaded from
            `plan.model_uri` when None, as on a worker.
    """

    # The columns a forward pass computes, in plan order (not those stored as token ids).
    computed_columns: list[str]
    # The truncated `keras.Model` with one output per computed column; None when there is none.
    keras_model: keras.Model | None
    input_names: tuple[str, ...]  # the keras model's inputs
    # Keras's own forward pass, traced once: {input name: tensor} -> {column: tensor}.
    _forward: Callable[[dict[str, tf.Tensor]], dict[str, tf.Tensor]] | None
    # Text input -> its TextVectorization layers that pad a batch to its longest text (None: an
    # unknown layer reads it); a batch runs in groups that pad each document as it is alone.
    _padded_by_batch: dict[str, list[keras.layers.TextVectorization] | None]

    def __init__(self, plan: ExportPlan, model_source: ModelSource | None = None) -> None:
        import tensorflow as tf

        configure_threads(plan.tf_threads)
        # The worker's model only: `TokenizeDocuments` loads the tokenizer.
        model_source = model_source or load_model_source(
            plan.model_uri,
            NO_TOKENIZER,
            allow_unsafe_deserialization=plan.allow_unsafe_deserialization,
        )
        if model_source.model_sha256 != plan.model_sha256:
            raise ExportConfigError(
                f"The model at {plan.model_uri} changed after launch (SHA-256 "
                f"{model_source.model_sha256}, launch saw {plan.model_sha256}); rerun the export."
            )
        # Columns stored as token ids need no forward pass: the ids are the output.
        computed = [
            (spec, column)
            for spec, column in zip(plan.layer_specs, plan.columns, strict=True)
            if column.token_storage != schema_lib.TOKEN_STORAGE_IDS
        ]
        self.computed_columns = [column.column for _, column in computed]
        self.keras_model, self._forward, self.input_names = None, None, ()
        self._padded_by_batch = {}
        if not computed:
            return
        self.keras_model = truncate(model_source.model, [spec for spec, _ in computed])
        self.input_names = tuple(t.name for t in self.keras_model.inputs)
        signature = [
            {
                i.name: tf.TensorSpec([None] + [1] * (i.rank - 1), tf.string, name=i.name)
                if i.takes == TEXT_INPUT
                else tf.TensorSpec([None, i.length], tf.int32, name=i.name)
                for i in plan.inputs
                if i.name in self.input_names
            }
        ]
        model = self.keras_model
        for tensor in model.inputs:
            if str(tensor.dtype) == "string":
                padded = batch_padded_vectorizers(model, tensor)
                if padded is None or padded:
                    self._padded_by_batch[tensor.name] = padded
        first_column = computed[0][1].column

        # One traced graph for every batch size: no retracing per batch. Without autograph, which has no
        # tensor-dependent Python here to convert (Keras's own code it never converts) but writes its
        # converted source to $TMPDIR, left there by every worker a stop signal SIGKILLs.
        @tf.function(input_signature=signature, reduce_retracing=True, autograph=False)
        def forward(features: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
            outputs = model(features, training=False)
            if not isinstance(outputs, dict):
                outputs = {first_column: outputs}
            return outputs

        self._forward = forward

    def model_features(self, features: Features) -> dict[str, np.ndarray]:
        """`features` restricted to the sub-model's inputs (ids columns may need more inputs)."""
        return {name: features[name] for name in self.input_names}

    def keras_predict(self, features: Features) -> dict[str, np.ndarray]:
        """The sub-model's own forward pass: {input name: ids} -> {column: numpy array}."""
        forward = self._forward
        if forward is None:
            return {}
        features = self.model_features(features)
        groups = self._same_padding_groups(features)
        if groups is None:
            return _whole_blocks_forward(forward, features)
        outputs: dict[str, np.ndarray] = {}
        count = sum(len(rows) for rows in groups)
        for rows in groups:
            part = _whole_blocks_forward(forward, {name: values[rows] for name, values in features.items()})
            for name, array in part.items():
                if name not in outputs:
                    outputs[name] = np.empty((count, *array.shape[1:]), array.dtype)
                outputs[name][rows] = array
        return outputs

    def _same_padding_groups(self, features: Features) -> list[np.ndarray] | None:
        """The batch's rows in groups whose documents each vectorizer pads alike (None: one group).

        Within a group, every batch-padding TextVectorization sees documents of
        one token count, so each is padded to its own length, as when alone.
        """
        if not self._padded_by_batch:
            return None
        import tensorflow as tf

        keys: list[np.ndarray] = []
        for name, vectorizers in self._padded_by_batch.items():
            texts = np.asarray(features[name])
            if vectorizers is None:
                keys.append(np.arange(len(texts)))
                continue
            for vectorizer in vectorizers:
                # Id 0 is only padding: a real token, known or not, has an id of 1 or more.
                ids = np.asarray(vectorizer(tf.constant(texts, dtype=tf.string)))
                keys.append((ids != 0).reshape(len(texts), -1).sum(axis=1))
        _, group_of = np.unique(np.stack(keys, axis=1), axis=0, return_inverse=True)
        group_of = group_of.reshape(-1)
        if group_of.max(initial=0) == 0:
            return None
        return [np.flatnonzero(group_of == group) for group in range(group_of.max() + 1)]
