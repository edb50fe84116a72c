"""Embeds a batch of tokenized documents: real-token masks, the forward pass, and its Arrow rows.

`Embedder.run` stacks a batch of tokenized documents and runs one forward pass
(`pipeline.inference.forward_pass`), retrying one by one to find the documents
the model fails on; `Embedder.batch_rows` turns its outputs into one Arrow
RecordBatch (`pipeline.writing.schema`). Tokenizing (`pipeline.inference.features`)
is a step of its own. Knows nothing of Beam, so it is tested directly and reused
by the benchmark.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping, Sequence

import keras
import numpy as np
import pyarrow as pa

from models.fast_path import ForwardPass
from pipeline.inference.features import stack_features
from pipeline.inference.forward_pass import (
    NO_FORWARD_PASS,
    ForwardPassRecords,
    Outputs,
    Predictor,
    fast_path_environment,
    onednn_enabled,
)
from pipeline.inference.sub_model import Features, SubModel
from pipeline.inference.text_tokens import TextTokens
from pipeline.planning.plan import SEQUENCE, TEXT_INPUT
from pipeline.writing import schema as schema_lib
from pipeline.writing.real_tokens import RealTokens, concatenate_real_tokens
from pipeline.writing.schema import ErrorRow

if typing.TYPE_CHECKING:
    from pipeline.inference.features import Tokenized
    from pipeline.planning.model_source import ModelSource
    from pipeline.planning.plan import ColumnInfo, ExportPlan
    from pipeline.reading.documents import Document

# The launcher's `Embedder` and its plan, which a worker in the launcher's own process (the
# in-memory runner) reuses: one model load, fast path and check per process.
_LAUNCHED: list[tuple[ExportPlan, Embedder]] = []
# The plan fields that neither the sub-model nor its forward passes read (`SubModel`,
# `Predictor`, `TextTokens`): where, what and how the run reads and writes.
_RUN_FIELDS = (
    "tokenizer_uri",
    "tokenizer_sha256",
    "input_pattern",
    "input_format",
    "id_field",
    "keep_fields",
    "output",
    "dtype",
    "batch_size",
    "compression",
    "max_record_bytes",
    "package_version",
    "truncating",
    "reuse",
    "reuse_files",
    "reuse_digests",
    "input_bytes",
    "input_listing_sha256",
    "input_files",
)


def forward_pass_key(plan: ExportPlan) -> ExportPlan:
    """`plan` without the fields a forward pass does not depend on (`_RUN_FIELDS`, blanked).

    Two launches with the same key (the same model file by its SHA-256, the same
    columns, inputs and forward pass flags) make the same sub-model and choose the
    same forward passes.
    """
    return dataclasses.replace(plan, **{name: type(getattr(plan, name))() for name in _RUN_FIELDS})


def choose_forward_passes(plan: ExportPlan, model_source: ModelSource) -> ExportPlan:
    """The plan with each column's forward pass chosen at launch, as the workers will use it.

    Builds the worker's `Embedder` (fast path checked against Keras included) on
    the launcher's already loaded model.  The returned plan carries the choice
    (`forward_passes`) and where it was checked (`fast_path_checked_on`), so
    workers in the same environment do not check again; a worker of this very
    process gets this `Embedder` itself (`worker_embedder`).  A second launch in
    the same process with the same `forward_pass_key` (another corpus or output,
    the same model) takes the previous launch's checked forward passes instead of
    loading, tracing and checking again.
    """
    key = forward_pass_key(plan)
    same_model = next((e for launched, e in _LAUNCHED if forward_pass_key(_unchosen(launched)) == key), None)
    embedder = Embedder(plan, model_source, same_model=same_model)
    records = embedder.forward_pass_records()
    chosen = dataclasses.replace(
        plan,
        forward_passes=records,
        fast_path_checked_on=fast_path_environment(),
        # Columns stored as token ids (no forward pass) have no last bits for oneDNN to change: an export
        # of those only is not bound to the setting (None: not compared by --reuse, resume or the workers).
        onednn=onednn_enabled() if any(engine != NO_FORWARD_PASS for _, engine, _ in records) else None,
    )
    embedder.plan = chosen
    _LAUNCHED[:] = [(chosen, embedder)]
    return chosen


def _unchosen(plan: ExportPlan) -> ExportPlan:
    """A launched plan as it was before `choose_forward_passes`."""
    return dataclasses.replace(plan, forward_passes=(), fast_path_checked_on="", onednn=None)


def worker_embedder(plan: ExportPlan) -> Embedder:
    """A worker's `Embedder` of `plan`: the launcher's when this process launched it, else loaded.

    The graph hands the workers the plan without its launch listing (only the
    reader needs it), so the plans are compared without it.
    """
    for launched, embedder in _LAUNCHED:
        if _without_listing(launched) == _without_listing(plan):
            return embedder
    return Embedder(plan)


def _without_listing(plan: ExportPlan) -> ExportPlan:
    return dataclasses.replace(plan, input_files=())


def manifest_columns(
    columns: Sequence[ColumnInfo], forward_passes: ForwardPassRecords
) -> list[dict[str, typing.Any]]:
    """The manifest's `columns`: each `ColumnInfo` with the forward pass that computes it and why.

    `forward_passes` holds `(column, engine, reason)`, as `ExportPlan.forward_passes`.
    """
    passes = {column: (engine, reason) for column, engine, reason in forward_passes}
    records = []
    for column in columns:
        engine, reason = passes.get(column.column, ("", ""))
        record = dataclasses.asdict(column)
        # As the Parquet metadata says them: a vector column has no pooling nor token storage.
        record["pooling"] = column.pooling if column.kind == SEQUENCE else None
        record["token_storage"] = column.token_storage if schema_lib.is_per_token(column) else None
        records.append(dict(record, forward_pass=engine, forward_pass_reason=reason))
    return records


class BatchRows(typing.NamedTuple):
    """A batch's output rows and dead letters (see `Embedder.batch_rows`)."""

    rows: pa.RecordBatch | None  # None when no document of the batch has outputs
    failed: list[ErrorRow]  # dead-letter rows
    oov_tokens: int  # unknown words of text inputs


class Embedded(typing.NamedTuple):
    """One RunInference batch after the forward pass (see `Embedder.run`)."""

    documents: list[Document]  # the documents that have outputs, in row order
    features: dict[str, np.ndarray]  # input name -> the stacked features of those documents
    masks: dict[str, np.ndarray]  # input name -> (n, length) bool: real tokens
    outputs: Outputs  # column -> numpy array or `RealTokens`, rows aligned with `documents`
    failed: list[ErrorRow]  # dead-letter rows of the batch's documents that have none
    oov_tokens: int  # unknown words of text inputs (token-id inputs count theirs when tokenized)


class Embedder:
    """Embeds batches of `Document`s with the plan's model, loaded once: rows and dead letters.

    Args:
        plan: the `ExportPlan` built at launch.
        model_source: an already loaded `ModelSource` (the launcher's); loaded from
            `plan.model_uri` when None, as on a worker.
        same_model: an earlier launch's `Embedder` of the same `forward_pass_key`, whose
            sub-model and checked forward passes this one takes as they are.
    """

    plan: ExportPlan
    schema: pa.Schema  # of the output rows
    model: SubModel
    predictor: Predictor  # the forward pass chosen for each column
    text_tokens: TextTokens

    def __init__(
        self, plan: ExportPlan, model_source: ModelSource | None = None, same_model: Embedder | None = None
    ) -> None:
        self.plan = plan
        self.schema = schema_lib.output_schema(plan)
        if same_model is not None:  # an `Embedder` of the same `forward_pass_key`: its model and choice
            self.model, self.predictor = same_model.model, same_model.predictor
            self.text_tokens = same_model.text_tokens
            return
        self.model = SubModel(plan, model_source)
        self.predictor = Predictor(plan, self.model)
        self.text_tokens = TextTokens(self.model.keras_model)

    @property
    def sub_model(self) -> keras.Model | None:
        """The truncated `keras.Model` of the computed columns (None: every column is token ids)."""
        return self.model.keras_model

    @property
    def forward_passes(self) -> dict[str, ForwardPass]:
        """Column -> which forward pass computes it, and why."""
        return self.predictor.forward_passes

    @property
    def uses_fast_path(self) -> bool:
        """Whether the fast path computes some column."""
        return self.predictor.uses_fast_path

    def forward_pass_records(self) -> ForwardPassRecords:
        """`(column, engine, reason)` per column, as `plan.forward_passes` and the manifest hold them."""
        return self.predictor.records()

    def keras_predict(self, features: Features) -> dict[str, np.ndarray]:
        """The sub-model's own forward pass: {input name: ids} -> {column: numpy array}."""
        return self.model.keras_predict(features)

    def predict(self, features: Features) -> Outputs:
        """The chosen forward pass: {input name: int32 ids} -> {column: numpy array or RealTokens}."""
        return self.predictor.predict(features)

    def run(self, batch: Sequence[Tokenized]) -> Embedded:
        """Stacks a batch of `features.Tokenized` and runs the forward pass: an `Embedded`.

        Documents whose text inputs hold no token the model's TextVectorization
        knows are `empty_document`; documents the model fails on are
        `inference_failed` (the batch is retried one by one to find them).
        Neither raises.
        """
        documents = [tokenized.document for tokenized in batch]
        features = stack_features(self.plan.inputs, batch)
        masks: dict[str, np.ndarray] = {}
        oov = 0
        for info in self.plan.inputs:
            if info.takes == TEXT_INPUT:
                masks[info.name], unknown = self.text_tokens.real_tokens(info, features[info.name])
                oov += unknown
            else:
                masks[info.name] = features[info.name] != 0
        failed: list[ErrorRow] = []
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

    def batch_rows(self, embedded: Embedded) -> BatchRows:
        """The output rows of an `Embedded` batch as one Arrow RecordBatch: a `BatchRows`.

        A document holding a value that `--dtype float16` cannot store (beyond
        ±65,504) is a `float16_overflow` dead letter instead of a row of infinities.
        """
        while True:
            if not embedded.documents:
                return BatchRows(None, embedded.failed, embedded.oov_tokens)
            try:
                return BatchRows(self._record_batch(embedded), embedded.failed, embedded.oov_tokens)
            except schema_lib.Float16Overflow as overflow:
                failed = embedded.failed + [
                    schema_lib.document_error_row(
                        document, schema_lib.FLOAT16_OVERFLOW, overflow.message(row)
                    )
                    for row, document in enumerate(embedded.documents)
                    if overflow.rows[row]
                ]
                embedded = _select(embedded, np.flatnonzero(~overflow.rows))._replace(failed=failed)

    def _record_batch(self, embedded: Embedded) -> pa.RecordBatch:
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
        return rows

    def _predict_one_by_one(
        self, documents: Sequence[Document], features: Features, failed: list[ErrorRow]
    ) -> tuple[Outputs, list[int]]:
        """Outputs of the documents the model can embed, and their rows; the others join `failed`."""
        results: list[Outputs] = []
        good: list[int] = []
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


def _concatenate(parts: Sequence[np.ndarray | RealTokens]) -> np.ndarray | RealTokens:
    """One batch's outputs of a column from those of its documents (arrays or `RealTokens`)."""
    if isinstance(parts[0], RealTokens):
        return concatenate_real_tokens(typing.cast(Sequence[RealTokens], parts))
    return np.concatenate(typing.cast(Sequence[np.ndarray], parts))


def _select(embedded: Embedded, rows: np.ndarray) -> Embedded:
    """The `rows` (ascending) of an `Embedded` batch: documents, features, masks and outputs."""
    documents, features, masks = _rows(rows, embedded.documents, embedded.features, embedded.masks)
    outputs: Outputs = {}
    for name, values in embedded.outputs.items():
        if isinstance(values, RealTokens):
            tokens_of = np.repeat(np.arange(len(values.counts)), values.counts)
            values = RealTokens(values.rows, values.row_index[np.isin(tokens_of, rows)], values.counts[rows])
        else:
            values = values[rows]
        outputs[name] = values
    return embedded._replace(documents=documents, features=features, masks=masks, outputs=outputs)


def _rows(
    rows: Sequence[int] | np.ndarray,
    documents: Sequence[Document],
    features: Features,
    masks: Mapping[str, np.ndarray],
) -> tuple[list[Document], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The `rows` of a batch: its documents, features and masks."""
    return (
        [documents[row] for row in rows],
        {name: values[rows] for name, values in features.items()},
        {name: mask[rows] for name, mask in masks.items()},
    )
