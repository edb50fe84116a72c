"""Batch mode of `neighbors`: read many queries from a file, answer them all, write one Parquet file."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from typing import NamedTuple, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.analysis.answer_file import write_answer
from pipeline.analysis.dataset import (
    AnalysisError,
    VectorDataset,
    is_vector_type,
    uri_filesystem,
    vectors_to_numpy,
)
from pipeline.analysis.exact import DEFAULT_METRIC, exact_top_k, row_count
from pipeline.analysis.index_search import LoadedIndex, positions_by_key
from pipeline.analysis.neighbors import DEFAULT_K, display_score
from pipeline.uris import is_local
from pipeline.writing.schema import ID_COLUMN, TOKEN_COLUMN, VECTOR_COLUMN

# The largest finite float32: a query value beyond it cannot be compared with the vectors.
FLOAT32_MAX = float(np.finfo(np.float32).max)


class Queries(NamedTuple):
    """The queries of a batch file: a label for each, and either their ids or their vectors."""

    labels: Sequence[str | None]
    ids: Sequence[str | None] | None  # a null id (of a .parquet file) has no row
    vectors: np.ndarray | None


class BatchAnswer(NamedTuple):
    """What a batch wrote: its queries, those with no neighbour (a `problem` row), and those answered
    with fewer neighbours than asked (an index that could not reach them; their rows say so too)."""

    queries: int
    unanswered: int
    short: int


class _Lookup(Protocol):
    """What batch mode needs of the rows, from the index (`LoadedIndex`) or from the export itself."""

    @property
    def dim(self) -> int: ...

    def first_positions(self, keys: Sequence[str | None]) -> list[int]: ...

    def positions_by_key(self, keys: Sequence[str | None]) -> dict[str, np.ndarray]: ...

    def vectors(self, positions: np.ndarray) -> np.ndarray: ...

    def take(self, positions: np.ndarray) -> pa.Table: ...


def read_queries(path: str, data: VectorDataset, column: str) -> Queries:
    """The queries of a batch file.

    `.txt`: one id (or word) per line.  `.npy`: an (n, dim) array of vectors.
    `.parquet`: vectors in `column` (or `vector`), labelled by an `id` column
    when there is one; else ids in the `id` (or `token`) column.
    """
    source = _query_source(path)
    # As --input_format auto reads extensions: IDS.TXT (a Windows tool's name) is a .txt file.
    extension = os.path.splitext(path)[1].lower()
    if extension == ".txt":
        try:
            # utf-8-sig: a file saved as "UTF-8 with BOM" (Notepad, Excel) starts with one, which
            # would stay in the first id (as corpus files drop it).
            with (
                open(source, encoding="utf-8-sig")
                if isinstance(source, str)
                else io.TextIOWrapper(source, encoding="utf-8-sig")
            ) as handle:
                ids = [line.rstrip("\r\n") for line in handle if line.strip()]
        except UnicodeDecodeError as error:
            raise AnalysisError(
                f"--queries {path!r} is not UTF-8 text ({error}); save it as UTF-8, one id or word a line."
            ) from None
        except OSError as error:
            raise AnalysisError(f"--queries {path!r} cannot be read: {error}") from None
        return Queries(ids, ids, None)
    if extension == ".npy":
        try:
            vectors = np.load(source, allow_pickle=False)
        except (ValueError, OSError, EOFError) as error:
            raise AnalysisError(f"--queries {path!r} is not a numeric .npy array: {error}") from None
        if not isinstance(vectors, np.ndarray):
            # np.load reads an .npz archive (np.savez) whatever the file is called: several arrays.
            vectors.close()
            raise AnalysisError(
                f"--queries {path!r} is an .npz archive of arrays, not one array: save the (n, dim) "
                "array of query vectors alone with np.save."
            )
        if np.iscomplexobj(vectors) or not (
            np.issubdtype(vectors.dtype, np.number) or vectors.dtype == np.bool_
        ):
            raise AnalysisError(
                f"--queries {path!r} holds {vectors.dtype} values, not numbers: vector queries are an "
                "(n, dim) array of floats (ids or words go in a .txt file, one a line)."
            )
        # float64: a finite value beyond float32's range is a query's problem, not an overflow warning.
        vectors = np.asarray(vectors, dtype=np.float64)
        if vectors.ndim != 2:
            raise AnalysisError(
                f"--queries {path!r} must hold an (n, dim) array; it has shape {vectors.shape}."
            )
        return Queries([str(i) for i in range(len(vectors))], None, vectors)
    if extension == ".parquet":
        try:
            table = pq.read_table(source)
        except (pa.ArrowException, OSError) as error:
            raise AnalysisError(f"--queries {path!r} is not a readable Parquet file: {error}") from None
        for name in (column, VECTOR_COLUMN):
            # Integers are vectors too (a pandas frame of [1, 0] lists is written as list<int64>).
            if name in table.column_names and _is_number_list(table.schema.field(name).type):
                if table[name].null_count:
                    raise AnalysisError(f"--queries {path!r} has null vectors in {name!r}.")
                labels = (
                    _texts(path, ID_COLUMN, table[ID_COLUMN])
                    if ID_COLUMN in table.column_names
                    else [str(i) for i in range(table.num_rows)]
                )
                return Queries(labels, None, _query_vectors(path, name, table[name]))
        for name in (ID_COLUMN, TOKEN_COLUMN):
            if name in table.column_names:
                keys = _texts(path, name, table[name])
                return Queries(keys, keys, None)
        found = [
            f"{name!r} is {table.schema.field(name).type}"
            for name in dict.fromkeys((column, VECTOR_COLUMN))
            if name in table.column_names
        ]
        raise AnalysisError(
            f"--queries {path!r} has neither a vector column ({column!r} or {VECTOR_COLUMN!r}: a list of "
            f"numbers per row) nor an {ID_COLUMN!r} column"
            + (f" ({'; '.join(found)}, not a list of numbers)." if found else ".")
        )
    raise AnalysisError(f"--queries {path!r}: use a .txt file of ids, a .parquet file or a .npy array.")


def _is_number_list(arrow_type: pa.DataType) -> bool:
    """Whether `arrow_type` is a list of floats or integers: one query vector per row."""
    return is_vector_type(arrow_type) or (
        (
            pa.types.is_list(arrow_type)
            or pa.types.is_large_list(arrow_type)
            or pa.types.is_fixed_size_list(arrow_type)
        )
        and pa.types.is_integer(arrow_type.value_type)
    )


def _query_vectors(path: str, name: str, array: pa.ChunkedArray) -> np.ndarray:
    """The (n, dim) float64 vectors of a .parquet queries file's column `name`, of one length."""
    try:
        return vectors_to_numpy(array).astype(np.float64)
    except AnalysisError:
        lengths = sorted(set(pc.list_value_length(array).to_pylist()))
        raise AnalysisError(
            f"--queries {path!r}: its {name!r} vectors have different lengths {lengths}; give every query "
            "as many values as the column searched has."
        ) from None


def _texts(path: str, name: str, array: pa.ChunkedArray) -> list[str | None]:
    """Ids of a .parquet queries file as text; a null stays null (`str` would make it the id 'None').

    Bytes (a BINARY column: Hive, Impala and older Spark write strings so) are UTF-8 text, as
    `pipeline.run` reads such ids; `str` would make them "b'...'", which no row has.

    Raises:
        AnalysisError: bytes that are not UTF-8.
    """
    texts: list[str | None] = []
    for value in array.to_pylist():
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError:
                raise AnalysisError(
                    f"--queries {path!r}: its {name!r} column holds bytes that are not UTF-8 text "
                    f"({value[:20]!r}); write the ids as UTF-8 strings."
                ) from None
        texts.append(None if value is None else str(value))
    return texts


def _query_source(path: str) -> str | io.BytesIO:
    """The queries file to read: a local path, or the bytes of an object on gs:// or s3:// (read whole,
    through the same filesystems as the export).

    Raises:
        AnalysisError: there is no such file.
    """
    if is_local(path):
        if not os.path.isfile(path):
            raise AnalysisError(f"--queries {path!r} is not a file.")
        return path
    try:
        # The key as typed, as the export is read (pyarrow's URI parser decodes %XX, refuses a space).
        filesystem, where = uri_filesystem(path)
        if filesystem.get_file_info(where).type != pafs.FileType.File:
            raise AnalysisError(f"--queries {path!r} is not a file.")
        with filesystem.open_input_stream(where) as handle:
            return io.BytesIO(handle.read())
    except (pa.ArrowException, OSError) as error:
        raise AnalysisError(f"--queries {path!r} cannot be read: {error}") from None


def batch_neighbors(
    data: VectorDataset,
    column: str,
    queries_path: str,
    out_path: str,
    k: int = DEFAULT_K,
    loaded: LoadedIndex | None = None,
    overwrite: bool = True,
    metric: str = DEFAULT_METRIC,
) -> BatchAnswer:
    """Answers every query of `queries_path` and writes them to the Parquet file `out_path`.

    One row per (query, rank); a query whose id is not in the export, or whose
    vector is unusable, or that has no neighbour, gets one row with null
    neighbour columns and the `problem`.  Through `loaded` (an index, by its
    metric) when given, else by one exact scan by `metric` for all queries; a query the index answers
    with fewer neighbours than asked (and than it holds) has the shortfall as
    the `problem` of each of its rows, as single mode says it.
    """
    if k < 1:
        raise AnalysisError(f"-k must be at least 1, received {k}.")
    labels, ids, vectors = read_queries(queries_path, data, column)
    metric = loaded.metric if loaded is not None else metric
    lookup: _Lookup = loaded if loaded is not None else _ExactLookup(data, column)
    # No query has more neighbours than there are rows: a huge -k allocates nothing for it.
    k = max(1, min(k, loaded.metadata["indexed"] if loaded is not None else row_count(data)))
    problems: list[str | None] = [None] * len(labels)
    # Per query, the rows of its own key: every one of them, as `neighbors --id` skips them (an export
    # of another tool can hold two rows of one id).
    own: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * len(labels)
    if ids is not None:
        first = np.asarray(lookup.first_positions(ids), dtype=np.int64)
        usable = np.flatnonzero(first >= 0)
        vectors = np.full((len(ids), lookup.dim), np.nan, dtype=np.float32)
        vectors[usable] = lookup.vectors(first[usable])
        by_key = lookup.positions_by_key([ids[place] for place in usable.tolist()])
        for place in usable.tolist():
            own[place] = by_key[str(ids[place])]
        for missing in np.flatnonzero(first < 0):
            key = ids[int(missing)]
            problems[missing] = "its id is null" if key is None else f"no row has the key {key!r}"
    assert vectors is not None  # a file holds ids or vectors; ids were turned into vectors above
    dim = vectors.shape[1]
    expected = lookup.dim
    # No query has no length to compare (an empty .parquet list column reads as 0 values a row): the
    # answer is empty, as for an empty .npy or .txt file.
    if ids is None and dim != expected and len(vectors):
        raise AnalysisError(f"--queries {queries_path!r} holds {dim}-dim vectors; {column!r} has {expected}.")
    for i in range(len(labels)):
        if problems[i] is None and metric == "cos" and not np.any(vectors[i]):
            problems[i] = "its vector is all zeros, so its cosine similarity is undefined"
        if problems[i] is None and not np.isfinite(vectors[i]).all():
            problems[i] = "its vector is null or has NaN or infinite values"
        if problems[i] is None and np.abs(vectors[i]).max(initial=0) > FLOAT32_MAX:
            problems[i] = (
                "its vector has values beyond float32's range (3.4e38), the type of the vectors searched: "
                "scale it down" + (" (its cosine similarities do not change)" if metric == "cos" else "")
            )
    with np.errstate(over="ignore"):
        # Those beyond float32 are problems above; they are searched for by none.
        vectors = vectors.astype(np.float32)
    good = np.asarray([i for i, p in enumerate(problems) if p is None], dtype=np.int64)
    positions = np.full((len(labels), k), -1, dtype=np.int64)
    found = np.full((len(labels), k), -np.inf)
    if len(good):
        if loaded is not None:
            excluded = [set(own[place].tolist()) for place in good.tolist()]
            positions[good], found[good] = loaded.search(vectors[good], k, exclude=excluded)
        else:
            widest = max(1, *(len(own[place]) for place in good.tolist()))
            exclude = np.full((len(good), widest), -1, dtype=np.int64)
            for row, place in enumerate(good.tolist()):
                exclude[row, : len(own[place])] = own[place]
            positions[good], found[good] = exact_top_k(
                data, column, vectors[good], k, metric, exclude=exclude
            )
    score_name = {"cos": "similarity", "ip": "dot_product", "l2": "distance"}[metric]
    out: dict[str, list[str | int | float | None]] = {
        "query": [],
        "rank": [],
        data.key_column: [],
        score_name: [],
        "problem": [],
    }
    details: dict[str, list[str | int | None]] = {c: [] for c in data.detail_columns}
    neighbor_rows = lookup.take(positions[positions >= 0]).to_pylist()
    taken = iter(neighbor_rows)
    unanswered = short = 0
    for i, label in enumerate(labels):
        valid = np.flatnonzero(positions[i] >= 0)
        if problems[i] is not None or len(valid) == 0:
            unanswered += 1
            for name, value in (
                ("query", label),
                ("rank", None),
                (data.key_column, None),
                (score_name, None),
                ("problem", problems[i] or "no neighbours"),
            ):
                out[name].append(value)
            for c in details:
                details[c].append(None)
            continue
        shortfall = _shortfall(loaded, k, len(valid), own[i])
        short += shortfall is not None
        for rank, j in enumerate(valid, 1):
            row = next(taken)
            out["query"].append(label)
            out["rank"].append(rank)
            out[data.key_column].append(row[data.key_column])
            out[score_name].append(display_score(metric, found[i, j]))
            out["problem"].append(shortfall)
            for c in details:
                details[c].append(row[c])
    columns = {
        "query": pa.array(out["query"], pa.string()),
        "rank": pa.array(out["rank"], pa.int32()),
        data.key_column: pa.array(out[data.key_column], data.schema.field(data.key_column).type),
        score_name: pa.array(out[score_name], pa.float64()),
    }
    names = detail_column_names(list(details), {*columns, "problem"})
    for c, values in details.items():
        # Kept fields keep their own type and never take the place of a fixed column.
        columns[names[c]] = pa.array(values, data.schema.field(c).type)
    columns["problem"] = pa.array(out["problem"], pa.string())
    write_parquet_atomically(pa.table(columns), out_path, overwrite)
    return BatchAnswer(len(labels), unanswered, short)


def _shortfall(loaded: LoadedIndex | None, k: int, found: int, own: np.ndarray) -> str | None:
    """The `problem` of a query the index answered with fewer than the k neighbours it holds (less the
    rows of its own key, `own`), else None.

    An approximate graph can leave rows unreachable; a short list must not pass
    for the top k.  The exact scan finds every row with a vector, so it is never short.
    """
    if loaded is None:
        return None
    available = int(loaded.metadata["indexed"]) - sum(1 for p in own.tolist() if loaded.contains(p))
    wanted = min(k, available)
    if found >= wanted:
        return None
    return (
        f"the index found {found} of the {wanted} neighbours asked for; --exact finds them all "
        "(or rebuild it with higher --connectivity / --expansion_search)"
    )


def detail_column_names(names: list[str], fixed: set[str]) -> dict[str, str]:
    """The answer file's name for each kept field: itself, or where a fixed column (query, rank, the
    key, the score, problem) has that name, `field.NAME` (with as many `field.` as it takes to name
    no other column: a kept field may be called `field.query` itself)."""
    taken = fixed | {name for name in names if name not in fixed}
    renamed: dict[str, str] = {}
    for name in names:
        if name not in fixed:
            renamed[name] = name
            continue
        new = f"field.{name}"
        while new in taken:
            new = f"field.{new}"
        taken.add(new)
        renamed[name] = new
    return renamed


def write_parquet_atomically(table: pa.Table, path: str, overwrite: bool = True) -> None:
    """Writes `table` to `path` as `answer_file.write_answer` does: whole or not at all, and only
    once the rows it was read from are checked unchanged."""
    write_answer(path, lambda sink: pq.write_table(table, sink), overwrite)


class _ExactLookup:
    """What batch mode needs of the export without an index: positions, vectors and rows by position."""

    data: VectorDataset
    column: str
    dim: int

    def __init__(self, data: VectorDataset, column: str) -> None:
        self.data, self.column = data, column
        arrow_type = data.schema.field(column).type
        if pa.types.is_fixed_size_list(arrow_type):
            self.dim = arrow_type.list_size
        else:
            # The first row with a vector: a null first row has no length.
            first = data.dataset.head(1, columns=[column], filter=pc.field(column).is_valid())[column]
            self.dim = int(vectors_to_numpy(first).shape[1]) if len(first) else 0

    def first_positions(self, keys: Sequence[str | None]) -> list[int]:
        table = self.data.dataset.to_table(columns=[self.data.key_column]).column(0)
        # skip_nulls: a null key (of a .parquet file) is no row's, not a vocabulary's null-token row.
        found = pc.index_in(pa.array(keys, pa.string()), value_set=table, skip_nulls=True)
        return [-1 if p is None else int(p) for p in found.to_pylist()]

    def positions_by_key(self, keys: Sequence[str | None]) -> dict[str, np.ndarray]:
        return positions_by_key(self.data.dataset.to_table(columns=[self.data.key_column]).column(0), keys)

    def vectors(self, positions: np.ndarray) -> np.ndarray:
        if len(positions) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        column = self.data.dataset.take(pa.array(positions), columns=[self.column])[self.column]
        if column.null_count:
            # Null vectors become NaN rows, reported as a problem of their query.
            filled = [v if v is not None else [np.nan] * self.dim for v in column.to_pylist()]
            return np.asarray(filled, dtype=np.float32)
        return vectors_to_numpy(column).astype(np.float32)

    def take(self, positions: np.ndarray) -> pa.Table:

        columns = [self.data.key_column, *self.data.detail_columns]
        return self.data.dataset.take(pa.array(np.asarray(positions, dtype=np.int64)), columns=columns)
