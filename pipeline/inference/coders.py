"""Coders of the inference step's elements, sized from their arrays without encoding; registered on import."""

from __future__ import annotations

import pickle
from typing import Any

import apache_beam as beam
import pyarrow as pa
from apache_beam.coders.coder_impl import CallbackCoderImpl

from pipeline.inference.embedder import BatchRows
from pipeline.inference.features import Tokenized


class _SizedPickleCoder(beam.coders.coders.FastCoder):
    """Pickles an element, and estimates its size from its arrays without encoding it.

    Beam estimates the encoded size of elements that pass between the steps of a
    fused stage (a metric), by encoding samples of them: with its default coder
    every `Tokenized` document (numpy ids) and each batch's rows (the RecordBatch of
    a per-token column, about 35 MB per 512 real-length documents, twice: as
    `BatchRows` and as the rows) were pickled to be measured.  Where an element
    really crosses a boundary, it is pickled as before.
    """

    def _create_impl(self) -> CallbackCoderImpl:
        return CallbackCoderImpl(
            lambda value: pickle.dumps(value, pickle.HIGHEST_PROTOCOL), pickle.loads, self.estimate_size
        )

    def is_deterministic(self) -> bool:
        return False

    @staticmethod
    def estimate_size(value: Any) -> int:
        raise NotImplementedError


class RecordBatchCoder(_SizedPickleCoder):
    """An Arrow RecordBatch of output rows (`SplitRows`)."""

    @staticmethod
    def estimate_size(value: pa.RecordBatch) -> int:
        return value.nbytes

    def to_type_hint(self) -> type:
        return pa.RecordBatch


class BatchRowsCoder(_SizedPickleCoder):
    """A batch's `embedder.BatchRows` (RunInference's output)."""

    @staticmethod
    def estimate_size(value: BatchRows) -> int:
        batch: pa.RecordBatch | None = value.rows
        rows = batch.nbytes if batch is not None else 0
        return rows + sum(len(str(error)) for error in value.failed)

    def to_type_hint(self) -> type:
        return BatchRows


class TokenizedCoder(_SizedPickleCoder):
    """A `features.Tokenized` document (`TokenizeDocuments`)."""

    @staticmethod
    def estimate_size(value: Tokenized) -> int:
        texts = sum(len(text) for text in value.document.texts)
        return texts + sum(getattr(feature, "nbytes", 0) for feature in value.features)

    def to_type_hint(self) -> type:
        return Tokenized


for _type, _coder in (
    (pa.RecordBatch, RecordBatchCoder),
    (BatchRows, BatchRowsCoder),
    (Tokenized, TokenizedCoder),
):
    beam.coders.registry.register_coder(_type, _coder)
