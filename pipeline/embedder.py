"""Worker-side model: tokenizes a batch of documents, runs one forward pass, builds output rows.

Knows nothing of Beam, so it is tested directly and reused by the benchmark.
"""

import logging
import typing

import numpy as np

from models.truncate import truncate
from pipeline import schema as schema_lib
from pipeline.model_source import ExportConfigError, load_model_source

EMPTY_DOCUMENT = "empty_document"
INFERENCE_FAILED = "inference_failed"


FAST_PATH_TOLERANCE = 1e-5


def verification_batch(plan, vocabulary_size, rows=48, seed=0):
    """Pre-padded random ids of every length from 0 to the input length, per model input."""
    rng = np.random.default_rng(seed)
    batch = {}
    for info in plan.inputs:
        ids = np.zeros((rows, info.length), dtype=np.int32)
        counts = np.linspace(0, info.length, rows).astype(int)
        for row, count in enumerate(counts):
            if count:
                ids[row, info.length - count :] = rng.integers(1, max(2, vocabulary_size), count)
        batch[info.name] = ids
    return batch


class Document(typing.NamedTuple):
    """A parsed record ready to embed: texts per model input, in `plan.inputs` order."""

    id: str
    texts: tuple
    kept: tuple
    source: str
    position: int


class EmbedResult(typing.NamedTuple):
    """What one batch produced: output rows, dead-letter rows and counters."""

    rows: object  # pyarrow.RecordBatch, or None when no document survived
    errors: list
    truncated: int
    oov_tokens: int


def configure_threads(threads):
    """Sets TensorFlow's thread pools; a no-op once TensorFlow has started."""
    if not threads:
        return
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(max(1, threads // 2))
    except RuntimeError:
        logging.info("TensorFlow already initialised; keeping its thread settings.")


class Embedder:
    """Loads the plan's model once and embeds batches of `Document`s.

    Args:
        plan: the `ExportPlan` built at launch.
        source: an already loaded `ModelSource` (the launcher's); loaded from
            `plan.model_uri` when None, as on a worker.
    """

    def __init__(self, plan, source=None):
        import tensorflow as tf

        configure_threads(plan.tf_threads)
        self.plan = plan
        source = source or load_model_source(plan.model_uri, plan.tokenizer_uri or None)
        if source.model_sha256 != plan.model_sha256:
            raise ExportConfigError(
                f"The model at {plan.model_uri} changed after launch (SHA-256 "
                f"{source.model_sha256}, launch saw {plan.model_sha256}); rerun the export."
            )
        self.tokenizer = source.tokenizer
        self.sub_model = truncate(source.model, list(plan.layer_specs))
        self.schema = schema_lib.output_schema(plan)
        signature = [{i.name: tf.TensorSpec([None, i.length], tf.int32, name=i.name) for i in plan.inputs}]
        model = self.sub_model

        # One traced graph for every batch size: no retracing per batch.
        @tf.function(input_signature=signature, reduce_retracing=True)
        def forward(features):
            outputs = model(features, training=False)
            if not isinstance(outputs, dict):
                outputs = {plan.columns[0].column: outputs}
            return outputs

        self._forward = forward
        self._fast = self._choose_fast_path() if getattr(plan, "fast_path", "auto") == "auto" else None

    def keras_predict(self, features):
        """The sub-model's own forward pass: {input name: ids} -> {column: numpy array}."""
        return {name: value.numpy() for name, value in self._forward(features).items()}

    def predict(self, features):
        """Runs the sub-model on {input name: int32 ids}; returns {column: numpy array}."""
        if self._fast is not None:
            return self._fast(features)
        return self.keras_predict(features)

    @property
    def uses_fast_path(self):
        return self._fast is not None

    def _choose_fast_path(self):
        """The exact fast path if the model qualifies and matches Keras on a sample batch."""
        from models.fast_lstm import build_fast_path

        fast, reason = build_fast_path(self.sub_model, self.plan.padding)
        if fast is None:
            logging.info("Fast path off (%s); using Keras's forward pass.", reason)
            return None
        sample = verification_batch(self.plan, self.tokenizer.size)
        expected = self.keras_predict(sample)
        actual = fast(sample)
        worst = max(float(np.abs(expected[name] - actual[name]).max()) for name in expected)
        if not worst <= FAST_PATH_TOLERANCE:
            logging.warning(
                "Fast path off: it differs from Keras by %.3g (> %g) on a sample batch; using "
                "Keras's forward pass.", worst, FAST_PATH_TOLERANCE,
            )
            return None
        logging.info("Fast path on: folded LSTM inputs, padding skipped (max |diff| vs Keras %.2g).", worst)
        return fast

    def encode(self, documents):
        """Turns documents into model features.

        Returns:
            `(features, masks, nonempty, truncated, oov)`: {input name: int32 ids},
            {input name: bool real-token mask}, a bool per document saying whether
            any input has a real token, and the truncated-document and
            out-of-vocabulary-token counts.
        """
        features, masks = {}, {}
        nonempty = np.zeros(len(documents), dtype=bool)
        # A document counts once as truncated, however many of its inputs were cut.
        cut_any = np.zeros(len(documents), dtype=bool)
        oov = 0
        for position, info in enumerate(self.plan.inputs):
            ids, counts, oov_counts, cut = self.tokenizer.encode_batch(
                [document.texts[position] for document in documents], info.length
            )
            features[info.name] = ids
            masks[info.name] = ids != 0
            nonempty |= counts > 0
            cut_any |= cut
            oov += int(oov_counts.sum())
        return features, masks, nonempty, int(cut_any.sum()), oov

    def embed(self, documents):
        """Embeds `documents`; bad ones become dead-letter rows, never exceptions."""
        plan = self.plan
        features, masks, nonempty, truncated, oov = self.encode(documents)
        errors = [
            schema_lib.error_row(
                d.source, d.position, d.id, EMPTY_DOCUMENT,
                "No tokens in any model input after tokenization.", " | ".join(d.texts),
            )
            for d, keep in zip(documents, nonempty) if not keep
        ]
        keep_rows = np.flatnonzero(nonempty)
        if len(keep_rows) < len(documents):
            features = {name: ids[keep_rows] for name, ids in features.items()}
            masks = {name: mask[keep_rows] for name, mask in masks.items()}
            documents = [documents[index] for index in keep_rows]
        if not documents:
            return EmbedResult(None, errors, truncated, oov)
        try:
            outputs = self.predict(features)
        except Exception:  # Retry one by one so only the bad documents are dead-lettered.
            outputs, good = self._predict_one_by_one(documents, features, errors)
            if not good:
                return EmbedResult(None, errors, truncated, oov)
            documents = [documents[index] for index in good]
            masks = {name: mask[good] for name, mask in masks.items()}
        kept = {
            name: [document.kept[index] for document in documents]
            for index, name in enumerate(plan.keep_fields)
        }
        rows = schema_lib.to_record_batch(
            self.schema, plan, [document.id for document in documents], kept, outputs, masks
        )
        return EmbedResult(rows, errors, truncated, oov)

    def _predict_one_by_one(self, documents, features, errors):
        results, good = [], []
        for index, document in enumerate(documents):
            try:
                results.append(self.predict({name: ids[index : index + 1] for name, ids in features.items()}))
                good.append(index)
            except Exception as error:
                errors.append(
                    schema_lib.error_row(
                        document.source, document.position, document.id, INFERENCE_FAILED,
                        f"{type(error).__name__}: {error}", " | ".join(document.texts),
                    )
                )
        if not good:
            return {}, good
        outputs = {name: np.concatenate([r[name] for r in results]) for name in results[0]}
        return outputs, good
