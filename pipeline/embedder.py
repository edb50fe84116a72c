"""Worker-side model: tokenizes a batch of documents, runs one forward pass, builds output rows.

Knows nothing of Beam, so it is tested directly and reused by the benchmark.
"""

import dataclasses
import json
import logging
import typing

import numpy as np

from models.keras2_tokenizer import UNKNOWN_TOKEN
from models.tokenizer import pad_token_ids
from models.truncate import truncate
from pipeline import schema as schema_lib
from pipeline.errors import ExportConfigError
from pipeline.model_source import load_model_source
from pipeline.plan import TEXT_INPUT, text_vectorizer

FAST_PATH_TOLERANCE = 1e-5
# The forward pass of a column stored as token ids: none, the ids are the output.
NO_FORWARD_PASS = "none"


def verification_batch(plan, vocabulary_size, rows=48, seed=0):
    """Random ids of every length from 0 to the input length, per model input.

    Rows alternate between the plan's padding side and the other one, and some
    hold a padding id among their tokens, so that every way the fast path
    handles padding (skipped, run through, masked) is compared with Keras.
    """
    rng = np.random.default_rng(seed)
    batch = {}
    for info in plan.inputs:
        ids = np.zeros((rows, info.length), dtype=np.int32)
        counts = np.linspace(0, info.length, rows).astype(int)
        for row, count in enumerate(counts):
            if not count:
                continue
            tokens = rng.integers(1, max(2, vocabulary_size), count)
            if row % 5 == 4 and count > 2:
                tokens[count // 2] = 0
            pre = (plan.padding == "pre") == (row % 2 == 0)
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


def choose_forward_passes(plan, source):
    """Chooses each column's forward pass at launch, as the workers will: `plan.forward_passes`.

    Builds the worker's `Embedder` (fast path checked against Keras included) on
    the launcher's already loaded model.
    """
    return Embedder(plan, source).forward_pass_records()


def manifest_columns(plan):
    """The manifest's `columns`: each `ColumnInfo` with the forward pass that computes it and why."""
    passes = {column: (kind, reason) for column, kind, reason in plan.forward_passes}
    columns = []
    for column in plan.columns:
        kind, reason = passes.get(column.column, ("", ""))
        columns.append(dict(dataclasses.asdict(column), forward_pass=kind, forward_pass_reason=reason))
    return columns


class TokenIds(str):
    """A corpus field that already holds token ids: its JSON text, with the ids in `ids`.

    It is a string so that everything that handles document texts (dead-letter
    rows, byte counts) handles it too; `Embedder.encode` pads it instead of
    tokenizing it.
    """

    def __new__(cls, ids):
        ids = tuple(int(i) for i in ids)
        token_ids = super().__new__(cls, json.dumps(list(ids)))
        token_ids.ids = ids
        return token_ids

    def __reduce__(self):
        return TokenIds, (self.ids,)


class Document(typing.NamedTuple):
    """A parsed record ready to embed: texts per model input, in `plan.inputs` order."""

    id: str
    texts: tuple
    kept: tuple
    source: str
    position: int


class EncodedInput(typing.NamedTuple):
    """One model input of a batch, encoded: what the model takes and what the rows need."""

    feature: object  # (n, length) int32 ids, or (n,) / (n, 1) strings
    mask: object  # (n, length) bool: real tokens
    counts: object  # (n,) real tokens per document
    oov_counts: object  # (n,) out-of-vocabulary tokens per document
    truncated: object  # (n,) bool: the document was cut to the input's length


class Encoded(typing.NamedTuple):
    """A batch of documents encoded for the model (see `Embedder.encode`)."""

    features: dict  # input name -> int32 ids or strings
    masks: dict  # input name -> bool real-token mask
    nonempty: object  # (n,) bool: any input has a real token
    truncated: int  # documents cut in at least one input
    oov: int  # out-of-vocabulary tokens


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
        source = source or load_model_source(
            plan.model_uri,
            plan.tokenizer_uri or None,
            allow_unsafe_deserialization=plan.allow_unsafe_deserialization,
            padding=plan.padding,
            truncating=plan.truncating,
        )
        if source.model_sha256 != plan.model_sha256:
            raise ExportConfigError(
                f"The model at {plan.model_uri} changed after launch (SHA-256 "
                f"{source.model_sha256}, launch saw {plan.model_sha256}); rerun the export."
            )
        self.tokenizer = source.tokenizer
        self.schema = schema_lib.output_schema(plan)
        # Columns stored as token ids need no forward pass: the ids are the output.
        computed = [
            (spec, column)
            for spec, column in zip(plan.layer_specs, plan.columns, strict=True)
            if column.token_storage != schema_lib.TOKEN_IDS
        ]
        self._table_sizes = {
            column.column: source.model.get_layer(column.layer).input_dim
            for column in plan.columns
            if column.token_storage == schema_lib.TOKEN_IDS
        }
        self._vectorizers = {}  # String input name -> (TextVectorization, unknown id), on first use.
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
        if not computed:
            return
        self.sub_model = truncate(source.model, [spec for spec, _ in computed])
        self._model_inputs = tuple(t.name for t in self.sub_model.inputs)
        signature = [
            {
                i.name: tf.TensorSpec([None] + [1] * (i.rank - 1), tf.string, name=i.name)
                if i.kind == TEXT_INPUT
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
        self._fast = self._choose_fast_path() if plan.fast_path == "auto" else None
        if plan.fast_path != "auto":
            self._keras_only(f"--fast_path {plan.fast_path}")
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
        """Runs the sub-model on {input name: int32 ids}; returns {column: numpy array}.

        Columns stored as token ids are not computed, so they are absent.
        """
        if self._fast is not None:
            return self._fast(self._model_features(features))
        return self.keras_predict(features)

    @property
    def uses_fast_path(self):
        return self._fast is not None

    def _keras_only(self, reason):
        from models.fast_lstm import KERAS, ForwardPass

        self.forward_passes = {
            **self._id_passes,
            **{column: ForwardPass(KERAS, reason) for column in self._computed_columns},
        }

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
        batch = self._model_features(verification_batch(self.plan, fast.vocabulary_size))
        worst = max_difference(fast, self.keras_predict, batch)
        if not worst <= FAST_PATH_TOLERANCE:
            reason = (
                f"the fast path differs from Keras by {worst:.3g} (> {FAST_PATH_TOLERANCE:g}) "
                "on a sample batch"
            )
            logging.warning("Fast path off: %s; using Keras's forward pass.", reason)
            self._keras_only(reason)
            return None
        self.forward_passes = {**self._id_passes, **passes}
        for column, forward_pass in passes.items():
            logging.info("Fast path on for %s: %s: %s.", column, forward_pass.kind, forward_pass.reason)
        logging.info("Fast path checked against Keras on a sample batch: max |diff| %.2g.", worst)
        return fast

    def _check_launch_decision(self):
        """Refuses to run columns with another forward pass than the launcher recorded for the manifest."""
        recorded = {column: kind for column, kind, _ in self.plan.forward_passes}
        mine = {column: forward_pass.kind for column, forward_pass in self.forward_passes.items()}
        if recorded and recorded != mine:
            raise ExportConfigError(
                f"This worker chose the forward passes {mine}, but the launcher chose {recorded} and "
                "the manifest records those; rerun with --fast_path off."
            )

    def forward_pass_records(self):
        """`(column, kind, reason)` per column, as `ExportPlan.forward_passes` and the manifest hold them."""
        return tuple((column, p.kind, p.reason) for column, p in self.forward_passes.items())

    def encode(self, documents):
        """Turns documents into model features.

        Token-id inputs take text, which the tokenizer encodes, or `TokenIds`,
        padded and cut with the plan's `padding` and `truncating`.  Text inputs
        take the strings themselves; their real tokens are where the model's
        TextVectorization layer emits a non-zero id.

        Returns:
            An `Encoded`.
        """
        features, masks = {}, {}
        nonempty = np.zeros(len(documents), dtype=bool)
        # A document counts once as truncated, however many of its inputs were cut.
        cut_any = np.zeros(len(documents), dtype=bool)
        oov = 0
        for position, info in enumerate(self.plan.inputs):
            values = [document.texts[position] for document in documents]
            encode = self._encode_text if info.kind == TEXT_INPUT else self._encode_ids
            encoded = encode(info, values)
            features[info.name], masks[info.name] = encoded.feature, encoded.mask
            nonempty |= encoded.counts > 0
            cut_any |= encoded.truncated
            oov += int(encoded.oov_counts.sum())
        return Encoded(features, masks, nonempty, int(cut_any.sum()), oov)

    def _encode_ids(self, info, values):
        """The `EncodedInput` of one token-id input."""
        id_rows = [row for row, value in enumerate(values) if isinstance(value, TokenIds)]
        id_row_set = set(id_rows)
        if not id_rows:
            ids, counts, oov_counts, cut = self.tokenizer.encode_batch(values, info.length)
            return EncodedInput(ids, ids != 0, counts, oov_counts, cut)
        ids, counts, cut = pad_token_ids(
            [values[row].ids for row in id_rows], info.length, self.plan.padding, self.plan.truncating
        )
        oov_counts = np.zeros(len(values), dtype=np.int32)
        if len(id_rows) < len(values):
            # A corpus may mix text and id lists: tokenize the text rows and interleave.
            text_rows = [row for row in range(len(values)) if row not in id_row_set]
            text_ids, text_counts, text_oov, text_cut = self.tokenizer.encode_batch(
                [values[row] for row in text_rows], info.length
            )
            all_ids = np.zeros((len(values), info.length), dtype=np.int32)
            all_counts = np.zeros(len(values), dtype=np.int32)
            all_cut = np.zeros(len(values), dtype=bool)
            all_ids[id_rows], all_counts[id_rows], all_cut[id_rows] = ids, counts, cut
            all_ids[text_rows], all_counts[text_rows], all_cut[text_rows] = text_ids, text_counts, text_cut
            oov_counts[text_rows] = text_oov
            ids, counts, cut = all_ids, all_counts, all_cut
        return EncodedInput(ids, ids != 0, counts, oov_counts, cut)

    def _encode_text(self, info, values):
        """The `EncodedInput` of one string input.

        TextVectorization cuts long documents silently, so none counts as truncated.
        """
        strings = np.array(values, dtype=object)
        feature = strings.reshape(-1, 1) if info.rank == 2 else strings
        no_cut = np.zeros(len(values), dtype=bool)
        vectorizer, unknown_id = self._text_vectorizer(info)
        if vectorizer is None:
            counts = np.array([1 if value.strip() else 0 for value in values], dtype=np.int32)
            return EncodedInput(
                feature, counts[:, None] > 0, counts, np.zeros(len(values), dtype=np.int32), no_cut
            )
        import tensorflow as tf

        ids = np.asarray(vectorizer(tf.constant(feature, dtype=tf.string)))
        mask = ids != 0
        oov_counts = (ids == unknown_id).sum(axis=1) if unknown_id is not None else np.zeros(len(values))
        return EncodedInput(feature, mask, mask.sum(axis=1), oov_counts.astype(np.int32), no_cut)

    def _text_vectorizer(self, info):
        """The TextVectorization layer whose ids mark `info`'s real tokens, and its unknown-word id."""
        cache = self._vectorizers
        if info.name not in cache:
            vectorizer, unknown_id = None, None
            if info.length:
                tensor = next(t for t in self.sub_model.inputs if t.name == info.name)
                vectorizer = text_vectorizer(self.sub_model, tensor)
                vocabulary = vectorizer.get_vocabulary() if vectorizer is not None else []
                unknown_id = 1 if len(vocabulary) > 1 and vocabulary[1] == UNKNOWN_TOKEN else None
            cache[info.name] = (vectorizer, unknown_id)
        return cache[info.name]

    def embed(self, documents):
        """Embeds `documents`; bad ones become dead-letter rows, never exceptions."""
        plan = self.plan
        features, masks, nonempty, truncated, oov = self.encode(documents)  # an Encoded
        errors = [
            schema_lib.document_error_row(
                d, schema_lib.EMPTY_DOCUMENT, "No tokens in any model input after tokenization."
            )
            for d, keep in zip(documents, nonempty, strict=True)
            if not keep
        ]
        # What the forward pass would fail on for an ids column, and so dead-letter, fails here too.
        outside = self._ids_outside_tables(features, len(documents))
        errors += [
            schema_lib.document_error_row(d, schema_lib.INFERENCE_FAILED, message)
            for d, keep, message in zip(documents, nonempty, outside, strict=True)
            if keep and message
        ]
        nonempty &= np.array([not message for message in outside], dtype=bool)
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
            features = {name: values[good] for name, values in features.items()}
            masks = {name: mask[good] for name, mask in masks.items()}
        kept = {
            name: [document.kept[index] for document in documents]
            for index, name in enumerate(plan.keep_fields)
        }
        fingerprints = [schema_lib.input_fingerprint(d.texts, plan.inputs) for d in documents]
        rows = schema_lib.to_record_batch(
            self.schema,
            plan,
            [document.id for document in documents],
            kept,
            outputs,
            masks,
            features,
            fingerprints,
        )
        return EmbedResult(rows, errors, truncated, oov)

    def _ids_outside_tables(self, features, count):
        """Per document, why an ids column cannot look up its tokens (an id past the table), or ""."""
        messages = [""] * count
        for column in self.plan.columns:
            if column.column not in self._table_sizes:
                continue
            size = self._table_sizes[column.column]
            largest = np.asarray(features[column.source_input]).max(axis=1, initial=0)
            for row in np.flatnonzero(largest >= size):
                messages[row] = messages[row] or (
                    f"Token id {int(largest[row])} of input {column.source_input!r} is outside the "
                    f"{size}-row table of Embedding layer {column.layer!r}."
                )
        return messages

    def _predict_one_by_one(self, documents, features, errors):
        results, good = [], []
        for index, document in enumerate(documents):
            try:
                results.append(self.predict({name: ids[index : index + 1] for name, ids in features.items()}))
                good.append(index)
            except Exception as error:
                errors.append(
                    schema_lib.document_error_row(
                        document, schema_lib.INFERENCE_FAILED, f"{type(error).__name__}: {error}"
                    )
                )
        if not good:
            return {}, good
        outputs = {name: np.concatenate([r[name] for r in results]) for name in results[0]}
        return outputs, good
