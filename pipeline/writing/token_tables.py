"""`--token_storage ids`: which per-token columns qualify, their tables, and reading vectors back.

An `Embedding` layer's output for a token depends on nothing but the token's id,
so a per-token column of one can be stored as the real tokens' ids, with the
layer's table written once as `OUTPUT/_tables/LAYER.parquet` in the format of
`python -m pipeline.vocabulary` (`token_id`, `token`, `vector`).  Row `i` of the
table is the layer's output for id `i`, so `table[ids]` is exactly what
`--token_storage vectors` writes.  Any other per-token layer (everything after
the embedding, a subclass that adds positions, an embedding of something other
than a token-id input) depends on more than the id and is refused.
"""

from __future__ import annotations

import dataclasses
import posixpath
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.errors import ExportConfigError
from pipeline.writing.layout import TABLES_DIR
from pipeline.writing.schema import TOKEN_STORAGE_IDS, VECTOR_COLUMN, is_per_token
from pipeline.writing.vocabulary_table import vocabulary_metadata, vocabulary_table

if TYPE_CHECKING:
    import keras

    from models.truncate import LayerSpec
    from pipeline.planning.model_source import ModelSource
    from pipeline.planning.plan import ColumnInfo, ExportPlan

VECTORS = "vectors"


def table_file(layer: str) -> str:
    """The table of Embedding `layer`, relative to the output directory (POSIX separators)."""
    return posixpath.join(TABLES_DIR, f"{layer}.parquet")


def _embedding_names(model: keras.Model) -> list[str]:
    """Names of the model's top-level Embedding layers, for error messages."""
    import keras

    return [layer.name for layer in model.layers if isinstance(layer, keras.layers.Embedding)]


def check_ids_column(model: keras.Model, spec: LayerSpec) -> None:
    """Raises ExportConfigError unless `spec`'s output is an Embedding lookup of a token-id model input.

    Args:
        model: the full model.
        spec: the column's `LayerSpec`.
    """
    import keras

    from models import keras_graph
    from models.truncate import resolve_layer

    tensor = resolve_layer(model, spec)
    layer, node = keras_graph.producer(tensor)
    listed = ", ".join(repr(name) for name in _embedding_names(model)) or "none"
    fix = (
        f"Store {spec.layer!r} with --token_storage vectors, or export one of the model's Embedding "
        f"layers ({listed}) with ids."
    )
    if not isinstance(layer, keras.layers.Embedding):
        raise ExportConfigError(
            f"--token_storage ids needs each per-token column to be an Embedding layer's output, but "
            f"{spec.layer!r} is a {type(layer).__name__}. Only an Embedding's output for a token is a "
            "function of the token id alone; a layer after it also depends on the other tokens, their "
            f"positions or a mask, so ids and a table cannot reproduce it. {fix}"
        )
    if type(layer).call is not keras.layers.Embedding.call:
        raise ExportConfigError(
            f"--token_storage ids cannot store {spec.layer!r}: it is a {type(layer).__name__}, a subclass "
            "of Embedding with its own call(), which may add positions or other inputs, so its output "
            f"need not be a function of the token id alone. {fix}"
        )
    looked_up = keras_graph.node_inputs(node)[0]
    if not any(looked_up is model_input for model_input in model.inputs):
        parent = keras_graph.producing_call(looked_up)[0]
        raise ExportConfigError(
            f"--token_storage ids cannot store {spec.layer!r} (call {spec.call}): it looks up the output "
            f"of layer {parent.name!r} ({type(parent).__name__}), not a token-id input of the model, so "
            f"the ids the pipeline computes are not the ones the table is indexed by. {fix}"
        )


def apply_token_storage(
    model: keras.Model,
    specs: Sequence[LayerSpec],
    columns: list[ColumnInfo],
    token_storage: str,
    pooling: str,
) -> list[ColumnInfo]:
    """The plan's columns with `--token_storage` applied.

    With "ids", every per-token column (a sequence with `--pooling none`) must
    qualify (`check_ids_column`) and is stored as ids; columns of one vector per
    document are unaffected.

    Args:
        model: the full model.
        specs: the `LayerSpec`s, aligned with `columns`.
        columns: the `plan.ColumnInfo`s.
        token_storage: "vectors" or "ids".
        pooling: the --pooling flag.

    Raises:
        ExportConfigError: ids without --pooling none, without a per-token column,
            or with a per-token column that is not an Embedding lookup.
    """
    if token_storage == VECTORS:
        return columns
    if pooling != "none":
        raise ExportConfigError(
            f"--token_storage ids stores one token id per real token instead of its vector, so it "
            f"needs --pooling none (received --pooling {pooling}). Pass --pooling none, or drop "
            "--token_storage for pooled vectors."
        )
    if not any(is_per_token(column) for column in columns):
        names = ", ".join(column.column for column in columns)
        raise ExportConfigError(
            f"--token_storage ids applies to per-token columns, but every exported column ({names}) "
            "holds one vector per document. Export an Embedding layer (e.g. --layer emb) or drop "
            "--token_storage."
        )
    stored: list[ColumnInfo] = []
    for spec, column in zip(specs, columns, strict=True):
        if is_per_token(column):
            check_ids_column(model, spec)
            column = dataclasses.replace(
                column, token_storage=TOKEN_STORAGE_IDS, table=table_file(column.layer)
            )
        stored.append(column)
    return stored


def layer_table(model: keras.Model, layer_name: str) -> np.ndarray:
    """The Embedding's output for every token id, as a (table size, dim) float32 matrix.

    The layer itself computes it, so the rows are what the forward pass looks
    up, whatever the layer's dtype policy.
    """
    import keras

    layer = model.get_layer(layer_name)
    ids = np.arange(layer.input_dim, dtype=np.int32)
    return np.asarray(keras.ops.convert_to_numpy(layer(ids)), dtype=np.float32)


def token_tables(columns: Sequence[ColumnInfo]) -> dict[str, tuple[str, list[str]]]:
    """{table file: (layer, [columns])} of the `ColumnInfo`s stored as ids."""
    tables: dict[str, tuple[str, list[str]]] = {}
    for column in columns:
        if column.table:
            tables.setdefault(column.table, (column.layer, []))[1].append(column.column)
    return tables


def write_token_tables(plan: ExportPlan, model_source: ModelSource, directory: str) -> list[str]:
    """Writes the table of each Embedding layer stored as ids into `directory`, once per layer.

    Args:
        plan: the `ExportPlan`.
        model_source: the launcher's `ModelSource` of `plan.model_uri`.
        directory: the run's staging directory for tables (`output.staging_tables_dir`).

    Returns:
        The paths written.
    """
    from apache_beam.io.filesystems import FileSystems

    paths: list[str] = []
    for relative, (layer_name, columns) in token_tables(plan.columns).items():
        table = layer_table(model_source.model, layer_name)
        metadata = dict(vocabulary_metadata(plan.model_uri, model_source, layer_name, table), columns=columns)
        id_to_token = model_source.tokenizer.id_to_token() if model_source.tokenizer is not None else {}
        arrow_table = vocabulary_table(table, id_to_token, metadata)
        path = FileSystems.join(directory, posixpath.basename(relative))
        with FileSystems.create(path) as handle:
            pq.write_table(arrow_table, handle, compression=plan.compression)
        paths.append(path)
    return paths


def read_table_vectors(path: str, filesystem: pafs.FileSystem | None = None) -> np.ndarray:
    """The `vector` column of a table file as a (table size, dim) float32 matrix, row i = token id i."""
    vectors = pq.read_table(path, columns=[VECTOR_COLUMN], filesystem=filesystem)[VECTOR_COLUMN]
    vectors = vectors.combine_chunks()
    return vectors.flatten().to_numpy().reshape(len(vectors), vectors.type.list_size)


def vectors_from_ids(ids: pa.Array | pa.ChunkedArray, table: np.ndarray) -> pa.ListArray:
    """A `list<int32>` array of token ids -> the `list<fixed_size_list<float32>>` array of their vectors.

    Args:
        ids: a pyarrow (chunked) list array, as an ids column is stored.
        table: the (table size, dim) matrix of `read_table_vectors`.
    """
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks()
    counts = pc.fill_null(pc.list_value_length(ids), 0).to_numpy(zero_copy_only=False)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    flat = ids.flatten().to_numpy(zero_copy_only=False)
    values = pa.array(np.ascontiguousarray(table[flat]).reshape(-1), type=pa.float32())
    return pa.ListArray.from_arrays(
        pa.array(offsets), pa.FixedSizeListArray.from_arrays(values, table.shape[1]), mask=ids.is_null()
    )
