"""The inference step: `EmbedDocuments` tokenizes documents and runs the model on batches into Arrow rows."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import apache_beam as beam
import pyarrow as pa
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler, RunInference

# Registers the coders of `Tokenized`, `BatchRows` and RecordBatches, which the steps below declare.
from pipeline.inference import coders as _coders  # noqa: F401
from pipeline.inference.embedder import BatchRows, Embedder, worker_embedder
from pipeline.inference.features import DocumentTokenizer, Tokenized
from pipeline.inference.skip_kept import (
    SKIP_COUNTED,
    SKIP_UNCOUNTED,
    SkipKeptFn,
    document_id,
    document_key,
    tokenized_id,
    tokenized_key,
)
from pipeline.planning.model_source import load_plan_tokenizer
from pipeline.planning.plan import ExportPlan
from pipeline.reading.documents import DeadLetter, Document
from pipeline.running import counters
from pipeline.writing import schema as schema_lib
from pipeline.writing.shards import TOKENIZER_COUNTS_KEY

# The outputs of the steps below: tokenized documents, row batches, and dead letters.
TOKENIZED = "tokenized"
ROWS = "rows"
ERRORS = "errors"

# What `EmbedDocuments` returns: the row batches and the dead letters.
EmbedOutputs = tuple[beam.PCollection[pa.RecordBatch], beam.PCollection[DeadLetter]]


class TokenizeDocumentsFn(beam.DoFn):
    """`Document` -> `features.Tokenized` (main) or a dead letter (`errors`); loads only the tokenizer."""

    def __init__(self, plan: ExportPlan):
        self._plan = plan
        self._truncated = Metrics.counter(counters.NAMESPACE, counters.DOCUMENTS_TRUNCATED)
        self._oov = Metrics.counter(counters.NAMESPACE, counters.OOV_TOKENS)

    def setup(self) -> None:
        self._tokenizer = DocumentTokenizer(self._plan, load_plan_tokenizer(self._plan))

    def process(self, document: Document) -> Iterator[Tokenized | beam.pvalue.TaggedOutput]:
        tokenized = self._tokenizer.tokenize(document)
        if not isinstance(tokenized, Tokenized):
            yield beam.pvalue.TaggedOutput(ERRORS, tokenized)
            return
        self._truncated.inc(int(tokenized.truncated))
        self._oov.inc(tokenized.oov_tokens)
        yield tokenized


def _with_tokenizer_counts(batch_rows: BatchRows, batch: Sequence[Tokenized]) -> BatchRows:
    """`batch_rows` with the tokenizer's counts of the documents that made rows in its schema metadata.

    `WriteShardsFn` sums them into each row file's footer (`TOKENIZER_COUNTS_KEY`).
    """
    rows: pa.RecordBatch | None = batch_rows.rows
    if rows is None:
        return batch_rows
    made_rows = set(rows.column(schema_lib.ID_COLUMN).to_pylist())
    truncated = oov = 0
    for tokenized in batch:
        if tokenized.document.id in made_rows:
            truncated += int(tokenized.truncated)
            oov += tokenized.oov_tokens
    counts = dict(zip(counters.TOKENIZER_COUNTS, (truncated, oov), strict=True))
    metadata = {**(rows.schema.metadata or {}), TOKENIZER_COUNTS_KEY: json.dumps(counts)}
    return batch_rows._replace(rows=rows.replace_schema_metadata(metadata))


class EmbeddingModelHandler(ModelHandler[Tokenized, BatchRows, Embedder]):
    """RunInference handler: stacks a batch of `Tokenized` documents, runs the forward pass, makes its rows.

    `load_model` builds an `Embedder` once per worker process, from
    `plan.model_uri` (in the launcher's own process, the in-memory runner, it is
    the launcher's: `embedder.worker_embedder`). `run_inference` returns one `embedder.BatchRows` per batch
    (an Arrow RecordBatch of its rows, and its dead letters) rather than one
    `PredictionResult` per document, for two measured reasons:

    - RunInference's output crosses a stage boundary, where Beam pickles it. The
      raw outputs of a per-token layer are large (the default export's mean-pooled
      `emb`: 512 x 300 x 300 floats a batch, 1.5 GB pickled for 4,096 documents,
      against 9.5 MB of Arrow rows); returning raw outputs made that export
      25-35 % slower.
    - Built per document, the same rows take 4.2x as long for a vector column and
      2.3x for a per-token one
      (`python -m benchmarks.export --contenders arrow_rows --documents 1024`).
    """

    def __init__(self, plan: ExportPlan):
        super().__init__(min_batch_size=plan.batch_size, max_batch_size=plan.batch_size)
        self._plan = plan

    def load_model(self) -> Embedder:
        return worker_embedder(self._plan)

    def run_inference(
        self,
        batch: Sequence[Tokenized],
        model: Embedder,
        inference_args: dict[str, Any] | None = None,
    ) -> Iterable[BatchRows]:
        return [_with_tokenizer_counts(model.batch_rows(model.run(batch)), batch)]

    def get_num_bytes(self, batch: Sequence[Tokenized]) -> int:
        # Beam's default pickles the whole batch just to measure it.
        return sum(len(text) for tokenized in batch for text in tokenized.document.texts)

    def get_metrics_namespace(self) -> str:
        return counters.NAMESPACE


class SplitRowsFn(beam.DoFn):
    """`BatchRows` -> its RecordBatch (main) and its dead letters (`errors`), counted."""

    def __init__(self) -> None:
        self._written = Metrics.counter(counters.NAMESPACE, counters.ROWS_EMBEDDED)
        self._oov = Metrics.counter(counters.NAMESPACE, counters.OOV_TOKENS)

    def process(self, batch_rows: BatchRows) -> Iterator[pa.RecordBatch | beam.pvalue.TaggedOutput]:
        self._oov.inc(batch_rows.oov_tokens)
        for error in batch_rows.failed:
            yield beam.pvalue.TaggedOutput(ERRORS, error)
        rows: pa.RecordBatch | None = batch_rows.rows
        if rows is not None:
            self._written.inc(rows.num_rows)
            yield rows


class EmbedDocuments(beam.PTransform):
    """Documents -> Arrow RecordBatches of output rows (main) and dead letters (`errors`).

    Tokenize each document (only the tokenizer loaded), then run the model on
    batches (RunInference), each batch giving one RecordBatch of rows. With
    `kept_ids_path` (a resumed run) the documents whose rows were kept are
    dropped before tokenization: the tokenizer's counts of their rows were kept
    with them (`TOKENIZER_COUNTS_KEY`) and the launcher adds them. Only the
    documents of a kept file without those counts (one a resume rewrote) are
    tokenized again, and dropped after it, so that the counts still cover every document.
    """

    def __init__(self, plan: ExportPlan, kept_ids_path: str | None = None, progress_dir: str | None = None):
        super().__init__()
        self._plan = plan
        self._kept_ids_path = kept_ids_path
        self._progress_dir = progress_dir

    def expand(self, documents: beam.PCollection[Document]) -> EmbedOutputs:
        if self._kept_ids_path:
            documents = documents | "SkipKeptDocuments" >> beam.ParDo(
                SkipKeptFn(
                    self._kept_ids_path,
                    document_id,
                    functools.partial(document_key, self._plan.inputs),
                    SKIP_COUNTED,
                    self._progress_dir,
                )
            )
        # Typed, so that Beam measures them with the coders of `pipeline.inference.coders`.
        tokenized = documents | "TokenizeDocuments" >> beam.ParDo(
            TokenizeDocumentsFn(self._plan)
        ).with_output_types(Tokenized).with_outputs(ERRORS, main=TOKENIZED)
        to_embed = tokenized[TOKENIZED]
        if self._kept_ids_path:
            to_embed = to_embed | "SkipKeptTokenized" >> beam.ParDo(
                SkipKeptFn(
                    self._kept_ids_path,
                    tokenized_id,
                    functools.partial(tokenized_key, self._plan.inputs),
                    SKIP_UNCOUNTED,
                    self._progress_dir,
                )
            )
        rows = (
            to_embed
            | "RunInference" >> RunInference(EmbeddingModelHandler(self._plan)).with_output_types(BatchRows)
            | "SplitRows"
            >> beam.ParDo(SplitRowsFn()).with_output_types(pa.RecordBatch).with_outputs(ERRORS, main=ROWS)
        )
        errors = (tokenized[ERRORS], rows[ERRORS]) | "CollectEmbedErrors" >> beam.Flatten()
        return rows[ROWS], errors
