"""Documents -> model features, one document at a time, without the model.

The `TokenizeDocuments` step of the pipeline runs `DocumentTokenizer.tokenize`
before RunInference, so the model handler only stacks features and runs the
forward pass. Knows nothing of Beam.

A token-id input gets the tokenizer's ids of its text, or the corpus's own
`TokenIds`, padded and cut with the plan's `padding` and `truncating`. A text
input (a model with its own TextVectorization) gets the string itself: only the
model can tell its real tokens, so the handler decides whether such a document
is empty.
"""

from __future__ import annotations

import typing
from collections.abc import Sequence

import numpy as np

from models.tokenizer import TextTokenizer, pad_one
from pipeline.planning.plan import TEXT_INPUT
from pipeline.reading.documents import DeadLetter, Document, TokenIds
from pipeline.writing import schema as schema_lib

if typing.TYPE_CHECKING:
    from pipeline.planning.plan import ExportPlan, InputInfo


class Tokenized(typing.NamedTuple):
    """A `Document` ready for the model."""

    document: Document
    # Per plan input: (length,) int32 token ids, or the text for a text input.
    features: tuple[np.ndarray | str, ...]
    # Some input was cut to its length.
    truncated: bool
    # Out-of-vocabulary words over all inputs.
    oov_tokens: int


class DocumentTokenizer:
    """Turns a `Document` into `Tokenized`, or into a dead-letter row with the reason.

    Args:
        plan: the `ExportPlan` (its inputs, padding and truncating).
        tokenizer: the plan's tokenizer; None with `--tokenizer none` or a model
            that takes text.
    """

    def __init__(self, plan: ExportPlan, tokenizer: TextTokenizer | None) -> None:
        self._inputs = plan.inputs
        self._padding, self._truncating = plan.padding, plan.truncating
        self._tokenizer = tokenizer
        # With a text input only the model knows whether a document is empty.
        self._decides_empty = all(info.takes != TEXT_INPUT for info in plan.inputs)

    def tokenize(self, document: Document) -> Tokenized | DeadLetter:
        """`Tokenized`, or the dead letter of a document with no token in any input."""
        features: list[np.ndarray | str] = []
        truncated, oov, real_tokens = False, 0, 0
        for info, value in zip(self._inputs, document.texts, strict=True):
            if info.takes == TEXT_INPUT:
                features.append(value)
                continue
            if isinstance(value, TokenIds):
                ids, _, cut = pad_one(value.ids, info.length, self._padding, self._truncating)
                # An id of 0 in the list is padding, not a token (the masks take only non-zero ids).
                count, unknown = int(np.count_nonzero(ids)), 0
            elif self._tokenizer is None:
                # The corpus refuses text for an id input under --tokenizer none.
                raise ValueError(f"Input {info.name!r} holds text, but the export has no tokenizer.")
            else:
                ids, count, unknown, cut = self._tokenizer.encode_one(value, info.length)
            # Every id fits the Embedding: the corpus refuses id lists past `info.id_limit`
            # when it parses them, the launch a tokenizer whose ids would not fit.
            features.append(ids)
            truncated |= cut
            oov += unknown
            real_tokens += count
        if self._decides_empty and not real_tokens:
            return schema_lib.document_error_row(
                document, schema_lib.EMPTY_DOCUMENT, "No tokens in any model input after tokenization."
            )
        return Tokenized(document, tuple(features), truncated, oov)


def stack_features(inputs: Sequence[InputInfo], batch: Sequence[Tokenized]) -> dict[str, np.ndarray]:
    """{input name: the batch's features}: (n, length) int32 ids, or texts shaped as the input takes them."""
    stacked = {}
    for position, info in enumerate(inputs):
        values = [tokenized.features[position] for tokenized in batch]
        if info.takes == TEXT_INPUT:
            texts = np.array(values, dtype=object)
            stacked[info.name] = texts.reshape(-1, 1) if info.rank == 2 else texts
        else:
            stacked[info.name] = np.stack(values) if values else np.zeros((0, info.length), np.int32)
    return stacked
