"""The rows and metadata of a vocabulary-format table (`token_id`, `token`, `vector`), one row per token id.

`python -m pipeline.vocabulary` writes it as `OUTPUT/vocabulary.parquet`, and
`--token_storage ids` as `OUTPUT/_tables/LAYER.parquet`: row `i` is token id
`i`, id 0 padding ("<pad>"), id 1 out-of-vocabulary ("<oov>").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from models import __version__
from models.tokenizer import OOV_ID, PADDING_ID
from pipeline.writing.schema import vocabulary_schema

if TYPE_CHECKING:
    from pipeline.planning.model_source import ModelSource

PADDING_TOKEN = "<pad>"
OOV_TOKEN = "<oov>"
# The facts a table file stores as JSON key-value metadata (token_tables adds its `columns`).
TableMetadata = Mapping[str, str | int | list[str] | None]


def token_strings(id_to_token: Mapping[int, str], table_size: int) -> list[str | None]:
    """The token of each id 0 .. table_size - 1.

    Args:
        id_to_token: the tokenizer's `id_to_token()`.  Id 0 is always padding
            ("<pad>", also where a vocabulary file's line 0 is the empty
            token); id 1 is the tokenizer's own out-of-vocabulary token (a Keras
            2 `oov_token`, a vocabulary file's "[UNK]", else "<oov>"), or a
            word where a Keras 2 tokenizer without `oov_token` gives id 1 one;
            ids beyond the vocabulary are None.
    """
    tokens: list[str | None] = [None] * table_size
    for token_id, token in id_to_token.items():
        if PADDING_ID < token_id < table_size:
            tokens[token_id] = token
    for token_id, token in ((PADDING_ID, PADDING_TOKEN), (OOV_ID, OOV_TOKEN)):
        if token_id < table_size and tokens[token_id] is None:
            tokens[token_id] = token
    return tokens


def vocabulary_table(table: np.ndarray, id_to_token: Mapping[int, str], metadata: TableMetadata) -> pa.Table:
    """Builds the vocabulary rows as an Arrow table.

    Args:
        table: (table size, dim) embedding weights; row `i` is token id `i`.
        id_to_token: the tokenizer's id -> token mapping (see `token_strings`).
        metadata: facts stored as the file's key-value metadata.

    Returns:
        A `pyarrow.Table` with `vocabulary_schema`, one row per table row.
    """
    table = np.ascontiguousarray(table, dtype=np.float32)
    size, dim = table.shape
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(table.reshape(-1), type=pa.float32()), dim)
    columns = [
        pa.array(np.arange(size, dtype=np.int32), type=pa.int32()),
        pa.array(token_strings(id_to_token, size), type=pa.string()),
        vectors,
    ]
    return pa.Table.from_arrays(columns, schema=vocabulary_schema(dim, metadata))


def vocabulary_metadata(
    model_uri: str, model_source: ModelSource, layer_name: str, table: np.ndarray
) -> dict[str, str | int | None]:
    """The facts a vocabulary file stores as key-value metadata.

    Args:
        model_uri: where the model was loaded from.
        model_source: its `ModelSource` (hashes and tokenizer; the tokenizer may be None).
        layer_name: the Embedding layer.
        table: its (table size, dim) matrix.
    """
    id_to_token = model_source.tokenizer.id_to_token() if model_source.tokenizer is not None else {}
    return {
        "kind": "vocabulary",
        "model_uri": model_uri,
        "model_sha256": model_source.model_sha256,
        "tokenizer_sha256": model_source.tokenizer_sha256,
        "layer": layer_name,
        "table_size": int(table.shape[0]),
        "dim": int(table.shape[1]),
        "vocabulary_size": max([OOV_ID, *id_to_token]) + 1,
        "padding_id": PADDING_ID,
        # None where the tokenizer drops unknown words: its id 1 is a word (`_ListTokenizer.oov_id`).
        "oov_id": getattr(model_source.tokenizer, "oov_id", OOV_ID),
        "package_version": __version__,
    }
