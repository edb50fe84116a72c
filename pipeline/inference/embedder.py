"""Worker-side model: the truncated sub-model and its forward pass (fast, hybrid or Keras).

`Embedder.run` stacks a batch of tokenized documents and runs one forward pass;
`Embedder.batch_rows` turns its outputs into one Arrow RecordBatch
(`pipeline.writing.schema`). Tokenizing (`pipeline.inference.features`) is a step of its own.
Knows nothing of Beam, so it is tested directly and reused by the benchmark.
"""

import dataclasses
import logging
import platform
import socket
import typing

import numpy as np

from models.keras2_tokenizer import UNKNOWN_TOKEN
from models.truncate import truncate
from pipeline.errors import ExportConfigError
from pipeline.inference.features import stack_features
from pipeline.planning.introspection import text_vectorizer
from pipeline.planning.model_source import load_model_source
from pipeline.planning.plan import NO_TOKENIZER, TEXT_INPUT
from pipeline.writing import schema as schema_lib

FAST_PATH_TOLERANCE = 1e-5
# The forward pass of a column stored as token ids: none, the ids are the output.
NO_FORWARD_PASS = "none"


def verification_batch(inputs, padding, vocabulary_size, rows=48, seed=0):
    """Random ids of every length from 0 to the input length, per model input (`InputInfo`s).

    Rows alternate between the `padding` side and the other one, and some
    hold a padding id among their tokens, so that every way the fast path
    handles padding (skipped, run through, masked) is compared with Keras.
    """
    rng = np.random.default_rng(seed)
    batch = {}
    for info in inputs:
        ids = np.zeros((rows, info.length), dtype=np.int32)
        counts = np.linspace(0, info.length, rows).astype(int)
        for row, count in enumerate(counts):
            if not count:
                continue
            tokens = rng.integers(1, max(2, vocabulary_size), count)
            if row % 5 == 4 and count > 2:
                tokens[count // 2] = 0
            pre = (padding == "pre") == (row % 2 == 0)
            if pre:
                ids[row, info.length - count :] = tokens
            else:
                ids[row, :count] = tokens
        batch[info.name] = ids
    return batch


def max_difference(candidate, reference, features):
    """Largest absolute difference between two forward passes over `features` (NaN counts as a failure)."""
    expected = reference(features)
    actual = candidate(features)
    worst = 0.0
    for name, value in expected.items():
        difference = np.abs(np.asarray(value, np.float64) - np.asarray(actual[name], np.float64))
        worst = max(worst, float(np.nanmax(difference)) if not np.isnan(difference).any() else float("inf"))
    return worst


# The launcher's `Embedder` and its plan, which a worker in the launcher's own process (the
# in-memory runner) reuses: one model load, fast path and check per process.
_LAUNCHED = []


def fast_path_environment():
    """This host and the versions that compute a forward pass: where a fast path check holds."""
    import keras
    import tensorflow as tf

    return (
        f"{socket.gethostname()} {platform.machine()} tensorflow {tf.__version__} "
        f"keras {keras.__version__} numpy {np.__version__}"
    )


def choose_forward_passes(plan, model_source):
    """The plan with each column's forward pass chosen at launch, as the workers will use it.

    Builds the worker's `Embedder` (fast path checked against Keras included) on
    the launcher's already loaded model.  The returned plan carries the choice
    (`forward_passes`) and where it was checked (`fast_path_checked_on`), so
    workers in the same environment do not check again; a worker of this very
    process gets this `Embedder` itself (`worker_embedder`).
    """
    embedder = Embedder(plan, model_source)
    chosen = dataclasses.replace(
        plan, forward_passes=embedder.forward_pass_records(), fast_path_checked_on=fast_path_environment()
    )
    embedder.plan = chosen
    _LAUNCHED[:] = [(chosen, embedder)]
    return chosen


def worker_embedder(plan):
    """A worker's `Embedder` of `plan`: the launcher's when this process launched it, else loaded."""
    for launched, embedder in _LAUNCHED:
        if launched == plan:
            return embedder
    return Embedder(plan)


def manifest_columns(columns, forward_passes):
    """The manifest's `columns`: each `ColumnInfo` with the forward pass that computes it and why.

    `forward_passes` holds `(column, engine, reason)`, as `ExportPlan.forward_passes`.
    """
    passes = {column: (engine, reason) for column, engine, reason in forward_passes}
    records = []
    for column in columns:
        engine, reason = passes.get(column.column, ("", ""))
        records.append(dict(dataclasses.asdict(column), forward_pass=engine, forward_pass_reason=reason))
    return records


class BatchRows(typing.NamedTuple):
    """A batch's output rows and dead letters (see `Embedder.batch_rows`)."""

    rows: object  # pyarrow.RecordBatch, or None when no document of the batch has outputs
    failed: list  # dead-letter rows
    oov_tokens: int  # unknown words of text inputs


class Embedded(typing.NamedTuple):
    """One RunInference batch after the forward pass (see `Embedder.run`)."""

    documents: list  # the `corpus.Document`s that have outputs, in row order
    features: dict  # input name -> the stacked features of those documents
    masks: dict  # input name -> (n, length) bool: real tokens
    outputs: dict  # column -> numpy array or `schema.RealTokens`, rows aligned with `documents`
    failed: list  # dead-letter rows of the batch's documents that have none
    oov_tokens: int  # unknown words of text inputs (token-id inputs count theirs when tokenized)


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
        model_source: an already loaded `ModelSource` (the launcher's); loaded from
            `plan.model_uri` when None, as on a worker.
    """

    def __init__(self, plan, model_source=None):
        import tensorflow as tf

        configure_threads(plan.tf_threads)
        self.plan = plan
        self.schema = schema_lib.output_schema(plan)
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
            if column.token_storage != schema_lib.TOKEN_IDS
        ]
        self._vectorizers = {}  # Text input name -> (TextVectorization, unknown id), on first use.
        from models.fast_lstm import ForwardPass

        self._id_passes = {
            column.column: ForwardPass(
                NO_FORWARD_PASS, "stored as token ids and a table (--token_storage ids)"
            )
            for column in plan.columns
            if column.token_storage == schema_lib.TOKEN_IDS
        }
        self._computed_columns = [column.column for _, column in computed]
        self.forward_passes = dict(self._id_passes)
        self.sub_model, self._forward, self._fast, self._model_inputs = None, None, None, ()
        # On the fast path: Embedding columns taken from their tables at the real tokens, the rest.
        self._tables, self._dense_columns, self._real_token_inputs = {}, (), {}
        if not computed:
            return
        self.sub_model = truncate(model_source.model, [spec for spec, _ in computed])
        self._model_inputs = tuple(t.name for t in self.sub_model.inputs)
        signature = [
            {
                i.name: tf.TensorSpec([None] + [1] * (i.rank - 1), tf.string, name=i.name)
                if i.takes == TEXT_INPUT
                else tf.TensorSpec([None, i.length], tf.int32, name=i.name)
                for i in plan.inputs
                if i.name in self._model_inputs
            }
        ]
        model = self.sub_model
        first_column = computed[0][1].column

        # One traced graph for every batch size: no retracing per batch.
        @tf.function(input_signature=signature, reduce_retracing=True)
        def forward(features):
            outputs = model(features, training=False)
            if not isinstance(outputs, dict):
                outputs = {first_column: outputs}
            return outputs

        self._forward = forward
        self._fast = None
        if plan.fast_path != "auto":
            self._keras_only(f"--fast_path {plan.fast_path}")
        elif self._launch_checked():
            self._fast = self._follow_launch()
        else:
            self._fast = self._choose_fast_path()
        self._check_launch_decision()

    def _model_features(self, features):
        """`features` restricted to the sub-model's inputs (ids columns may need more inputs)."""
        return {name: features[name] for name in self._model_inputs}

    def keras_predict(self, features):
        """The sub-model's own forward pass: {input name: ids} -> {column: numpy array}."""
        if self._forward is None:
            return {}
        return {name: value.numpy() for name, value in self._forward(self._model_features(features)).items()}

    def predict(self, features):
        """Runs the sub-model on {input name: int32 ids}; returns {column: numpy array or RealTokens}.

        On the fast path an Embedding's column is `schema.RealTokens`: its table
        and the real tokens' ids, never the padded (n, length, dim) lookup.
        Columns stored as token ids are not computed, so they are absent.
        """
        if self._fast is None:
            return self.keras_predict(features)
        return self._fast_outputs(self._fast, self._model_features(features), wrap=True)

    def _fast_outputs(self, fast, features, wrap):
        """The fast path's columns, each per-token one at the real tokens only.

        Embedding columns come from their tables, per-token recurrent columns
        from `real_tokens=True`: as `schema.RealTokens` with `wrap`, else as the
        real tokens' (tokens, dim) values; the others as the sub-model gives them.
        """
        outputs = fast(features, self._dense_columns, real_tokens=True) if self._dense_columns else {}
        for column, input_name in self._real_token_inputs.items():
            if column in outputs and wrap:
                real = features[input_name] != 0
                values = outputs[column]
                outputs[column] = schema_lib.RealTokens(values, np.arange(len(values)), real.sum(axis=1))
        for column, (input_name, table) in self._tables.items():
            ids = features[input_name]
            outputs[column] = schema_lib.RealTokens.lookup(table, ids) if wrap else table[ids[ids != 0]]
        return outputs

    @property
    def uses_fast_path(self):
        return self._fast is not None

    def _keras_only(self, reason):
        from models.fast_lstm import KERAS, ForwardPass

        self.forward_passes = {
            **self._id_passes,
            **{column: ForwardPass(KERAS, reason) for column in self._computed_columns},
        }
        self._tables, self._dense_columns, self._real_token_inputs = {}, (), {}

    def _choose_fast_path(self):
        """The exact fast path if the model qualifies and matches Keras on a sample batch.

        Sets `forward_passes`: for each column, which forward pass computes it and why.
        """
        from models.fast_lstm import build_fast_path

        fast, passes = build_fast_path(self.sub_model)
        if fast is None:
            logging.info("Fast path off (%s); using Keras's forward pass.", passes)
            self._keras_only(passes)
            return None
        batch = self._model_features(
            verification_batch(self.plan.inputs, self.plan.padding, fast.vocabulary_size)
        )
        self._use_fast_path(fast, passes)
        real_token_inputs = {**self._real_token_inputs, **{c: name for c, (name, _) in self._tables.items()}}

        def reference(features):
            # Keras's outputs at the positions the fast path computes: real tokens only for its
            # real-token columns (the rows of a per-token column are only those).
            outputs = self.keras_predict(features)
            for column, name in real_token_inputs.items():
                outputs[column] = outputs[column][features[name] != 0]
            return outputs

        # Traced as the batches will run it: the in-memory runner reuses this trace.
        worst = max_difference(
            lambda features: self._fast_outputs(fast, features, wrap=False), reference, batch
        )
        if not worst <= FAST_PATH_TOLERANCE:
            reason = (
                f"the fast path differs from Keras by {worst:.3g} (> {FAST_PATH_TOLERANCE:g}) "
                "on a sample batch"
            )
            logging.warning("Fast path off: %s; using Keras's forward pass.", reason)
            self._keras_only(reason)
            return None
        for column, forward_pass in passes.items():
            logging.info("Fast path on for %s: %s: %s.", column, forward_pass.engine, forward_pass.reason)
        logging.info("Fast path checked against Keras on a sample batch: max |diff| %.2g.", worst)
        return fast

    def _launch_checked(self):
        """Whether the launch checked the fast path in this environment (same host and versions)."""
        return bool(self.plan.forward_passes) and self.plan.fast_path_checked_on == fast_path_environment()

    def _follow_launch(self):
        """The fast path as the launch chose it, without checking it against Keras again.

        The launch checked this model (same SHA-256) with the same code and
        libraries on this host, so the check would give the same answer.
        """
        from models.fast_lstm import KERAS, ForwardPass, build_fast_path

        recorded = {
            column: ForwardPass(engine, reason) for column, engine, reason in self.plan.forward_passes
        }
        if all(recorded[column].engine == KERAS for column in self._computed_columns if column in recorded):
            self.forward_passes = {**self._id_passes, **recorded}
            return None
        fast, passes = build_fast_path(self.sub_model)
        if fast is None:
            raise ExportConfigError(
                f"The launch chose the fast path, but this worker cannot build it ({passes}); "
                "rerun the export."
            )
        self._use_fast_path(fast, passes)
        return fast

    def _use_fast_path(self, fast, passes):
        self.forward_passes = {**self._id_passes, **passes}
        self._tables = fast.embedding_tables()
        self._real_token_inputs = fast.real_token_columns()
        self._dense_columns = tuple(column for column in self._computed_columns if column not in self._tables)

    def _check_launch_decision(self):
        """Refuses to run columns with another forward pass than the launcher recorded for the manifest."""
        recorded = {column: engine for column, engine, _ in self.plan.forward_passes}
        mine = {column: forward_pass.engine for column, forward_pass in self.forward_passes.items()}
        if recorded and recorded != mine:
            raise ExportConfigError(
                f"This worker chose the forward passes {mine}, but the launcher chose {recorded} and "
                "the manifest records those; rerun with --fast_path off."
            )

    def forward_pass_records(self):
        """`(column, engine, reason)` per column, as `plan.forward_passes` and the manifest hold them."""
        return tuple((column, p.engine, p.reason) for column, p in self.forward_passes.items())

    def run(self, batch):
        """Stacks a batch of `features.Tokenized` and runs the forward pass: an `Embedded`.

        Documents whose text inputs hold no token the model's TextVectorization
        knows are `empty_document`; documents the model fails on are
        `inference_failed` (the batch is retried one by one to find them).
        Neither raises.
        """
        documents = [tokenized.document for tokenized in batch]
        features = stack_features(self.plan.inputs, batch)
        masks, oov = {}, 0
        for info in self.plan.inputs:
            if info.takes == TEXT_INPUT:
                masks[info.name], unknown = self._text_tokens(info, features[info.name])
                oov += unknown
            else:
                masks[info.name] = features[info.name] != 0
        failed = []
        if any(info.takes == TEXT_INPUT for info in self.plan.inputs):
            nonempty = np.any([mask.any(axis=1) for mask in masks.values()], axis=0)
            failed = [
                schema_lib.document_error_row(
                    document, schema_lib.EMPTY_DOCUMENT, "No tokens in any model input after tokenization."
                )
                for document, keep in zip(documents, nonempty, strict=True)
                if not keep
            ]
            if failed:
                documents, features, masks = _rows(np.flatnonzero(nonempty), documents, features, masks)
        if not documents:
            return Embedded([], {}, {}, {}, failed, oov)
        try:
            outputs = self.predict(features)
        except Exception:  # Retry one by one so only the bad documents are dead-lettered.
            outputs, good = self._predict_one_by_one(documents, features, failed)
            documents, features, masks = _rows(good, documents, features, masks)
        return Embedded(documents, features, masks, outputs, failed, oov)

    def batch_rows(self, embedded):
        """The output rows of an `Embedded` batch as one Arrow RecordBatch: a `BatchRows`."""
        if not embedded.documents:
            return BatchRows(None, embedded.failed, embedded.oov_tokens)
        plan, documents = self.plan, embedded.documents
        rows = schema_lib.to_record_batch(
            self.schema,
            plan.columns,
            plan.dtype,
            document_ids=[document.id for document in documents],
            kept={
                name: [document.kept[index] for document in documents]
                for index, name in enumerate(plan.keep_fields)
            },
            outputs=embedded.outputs,
            masks=embedded.masks,
            token_ids=embedded.features,
            fingerprints=[schema_lib.input_fingerprint(d.texts, plan.inputs) for d in documents],
        )
        return BatchRows(rows, embedded.failed, embedded.oov_tokens)

    def _text_tokens(self, info, texts):
        """The real tokens of a text input and how many are unknown words: `(mask, unknown)`.

        The real tokens are where the model's TextVectorization emits a non-zero
        id; with none of fixed length (only vector outputs), a text is one token
        when it is not blank.
        """
        vectorizer, unknown_id = self._text_vectorizer(info)
        if vectorizer is None:
            return np.array([bool(text.strip()) for text in texts.reshape(-1)]).reshape(-1, 1), 0
        import tensorflow as tf

        ids = np.asarray(vectorizer(tf.constant(texts, dtype=tf.string)))
        unknown = int((ids == unknown_id).sum()) if unknown_id is not None else 0
        return ids != 0, unknown

    def _text_vectorizer(self, info):
        """The TextVectorization layer whose ids mark `info`'s real tokens, and its unknown-word id."""
        if info.name not in self._vectorizers:
            vectorizer, unknown_id = None, None
            if info.length:
                tensor = next(t for t in self.sub_model.inputs if t.name == info.name)
                vectorizer = text_vectorizer(self.sub_model, tensor)
                vocabulary = vectorizer.get_vocabulary() if vectorizer is not None else []
                unknown_id = 1 if len(vocabulary) > 1 and vocabulary[1] == UNKNOWN_TOKEN else None
            self._vectorizers[info.name] = (vectorizer, unknown_id)
        return self._vectorizers[info.name]

    def _predict_one_by_one(self, documents, features, failed):
        """Outputs of the documents the model can embed, and their rows; the others join `failed`."""
        results, good = [], []
        for row, document in enumerate(documents):
            try:
                one = {name: values[row : row + 1] for name, values in features.items()}
                results.append(self.predict(one))
                good.append(row)
            except Exception as error:
                failed.append(
                    schema_lib.document_error_row(
                        document, schema_lib.INFERENCE_FAILED, f"{type(error).__name__}: {error}"
                    )
                )
        if not results:
            return {}, good
        return {name: _concatenate([result[name] for result in results]) for name in results[0]}, good


def _concatenate(parts):
    """One batch's outputs of a column from those of its documents (arrays or `RealTokens`)."""
    if isinstance(parts[0], schema_lib.RealTokens):
        return schema_lib.concatenate_real_tokens(parts)
    return np.concatenate(parts)


def _rows(rows, documents, features, masks):
    """The `rows` of a batch: its documents, features and masks."""
    return (
        [documents[row] for row in rows],
        {name: values[rows] for name, values in features.items()},
        {name: mask[rows] for name, mask in masks.items()},
    )
