"""Nearest neighbours of one row: by an exact streaming scan or through the index, and as a text table.

The exact scan keeps a running top-k, so it never holds more than one batch of
vectors whatever the size of the export.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.analysis.dataset import (
    BATCH_ROWS,
    AnalysisError,
    VectorDataset,
    check_vector_column,
    different_lengths,
    vectors_to_numpy,
)
from pipeline.analysis.exact import DEFAULT_METRIC, scores
from pipeline.analysis.index_search import LoadedIndex, load_index
from pipeline.analysis.index_store import read_metadata

DEFAULT_K = 10
# How each metric's score is named in a sentence.
SCORE_NAMES = {"cos": "cosine similarity", "ip": "dot product", "l2": "L2 distance"}


@dataclasses.dataclass(frozen=True)
class Neighbor:
    """One nearest neighbour: its key, its score (cosine similarity by default) and detail column values."""

    key: str
    similarity: float
    details: dict[str, str | int | None]


def suggest_keys(data: VectorDataset, key: str) -> str:
    """A sentence naming up to 5 keys that contain `key`, ignoring case."""
    expression = pc.match_substring(pc.field(data.key_column), key, ignore_case=True)
    close = data.dataset.head(5, columns=[data.key_column], filter=expression)[data.key_column].to_pylist()
    noun = "Ids" if data.holds == "documents" else "Words"
    return f" {noun} containing it: {', '.join(map(repr, close))}." if close else ""


def query_vector(data: VectorDataset, key: str, column: str, metric: str = DEFAULT_METRIC) -> np.ndarray:
    """The vector of the row whose key is `key`.

    Raises:
        AnalysisError: no row has that key, or its vector is missing, not finite, or (for cosine
            similarity, which it leaves undefined) all zeros.
    """
    found = data.dataset.to_table(columns=[column], filter=pc.field(data.key_column) == key)
    noun = "document id" if data.holds == "documents" else "word"
    if found.num_rows == 0:
        raise AnalysisError(f"No row of {data.location!r} has the {noun} {key!r}.{suggest_keys(data, key)}")
    if found.num_rows > 1:
        logging.warning("%d rows have the %s %r; using the first.", found.num_rows, noun, key)
    if not found[column][0].is_valid:
        raise AnalysisError(f"The {noun} {key!r} has no {column!r} vector (it is null).")
    vector = vectors_to_numpy(found[column].slice(0, 1))[0].astype(np.float64)
    if not np.isfinite(vector).all():
        raise AnalysisError(f"The {noun} {key!r} has NaN or infinite values in its {column!r} vector.")
    if metric == "cos" and not np.any(vector):
        raise AnalysisError(
            f"The {noun} {key!r} has an all-zero {column!r} vector, so its cosine similarity is undefined."
        )
    return vector


def find_neighbors(
    data: VectorDataset,
    key: str,
    column: str | None,
    k: int = DEFAULT_K,
    batch_rows: int = BATCH_ROWS,
    metric: str = DEFAULT_METRIC,
) -> tuple[list[Neighbor], int]:
    """The `k` rows nearest to row `key` in `column` by `metric` (cosine similarity, dot product or L2
    distance, as an index of that metric ranks them), best first.

    Streams the dataset in batches of at most `batch_rows` rows and keeps a
    running top-k, so memory does not grow with the dataset.  Rows with the
    query's own key, a null key or a null vector are skipped; ties are broken by
    key.

    Returns:
        `(neighbors, compared)`: a list of `Neighbor`s and how many rows were compared.
    """
    if k < 1:
        raise AnalysisError(f"-k must be at least 1, received {k}.")
    column = check_vector_column(data, column)
    query = query_vector(data, key, column, metric)
    scanner = data.dataset.scanner(
        columns=[data.key_column, column, *data.detail_columns],
        filter=(pc.field(data.key_column) != key) & pc.field(column).is_valid(),
        batch_size=batch_rows,
        batch_readahead=2,
        fragment_readahead=1,
    )
    best_similarities = np.empty(0)
    best_keys: list[str] = []
    best_details: list[dict[str, str | int | None]] = []
    compared = 0
    for batch in scanner.to_batches():
        if batch.num_rows == 0:
            continue
        vectors = vectors_to_numpy(batch.column(column)).astype(np.float64)
        if vectors.shape[1] != len(query):
            raise different_lengths(column, len(query), vectors.shape[1])
        # A vector with NaN or infinite values has no similarity; left in, NaN would break the ranking.
        finite = np.asarray(np.isfinite(vectors).all(axis=1))
        compared += int(finite.sum())
        # Rounded as every mode ranks them (`rounded_scores`): equal up to rounding is a tie, broken by key.
        similarities = np.where(
            finite, scores(metric, query[None, :], np.where(finite[:, None], vectors, 0))[0], -np.inf
        )
        # Every row tied with the k-th best goes on, so the key breaks ties, not the scan order.
        if len(similarities) > k:
            threshold = np.partition(similarities, len(similarities) - k)[len(similarities) - k]
            chosen = np.flatnonzero((similarities >= threshold) & finite)
        else:
            chosen = np.flatnonzero(finite)
        indices = pa.array(chosen)
        keys = best_keys + batch.column(data.key_column).take(indices).to_pylist()
        details = best_details + batch.select(list(data.detail_columns)).take(indices).to_pylist()
        similarities = np.concatenate([best_similarities, similarities[chosen]])
        order = sorted(range(len(keys)), key=lambda i: (-similarities[i], keys[i]))[:k]
        best_similarities = similarities[order]
        best_keys = [keys[i] for i in order]
        best_details = [details[i] for i in order]
    ranked = zip(best_keys, best_similarities, best_details, strict=True)
    # Ranked by score (higher is nearer); an L2 score is shown as the distance.
    neighbors = [Neighbor(name, display_score(metric, s), details) for name, s, details in ranked]
    return neighbors, compared


def display_score(metric: str, score: float) -> float:
    """An index score as shown: the similarity or dot product, or the (positive) L2 distance."""
    return float(np.sqrt(max(-score, 0.0))) if metric == "l2" else float(score)


def _neighbors_at(
    data: VectorDataset, loaded: LoadedIndex, positions: np.ndarray, found: np.ndarray
) -> list[Neighbor]:
    """`Neighbor`s of one query from positions and scores of `LoadedIndex.search` or `exact_top_k`."""
    valid = positions >= 0
    rows = loaded.take(positions[valid]).to_pylist() if valid.any() else []
    return [
        Neighbor(
            row[data.key_column],
            display_score(loaded.metric, score),
            {c: row[c] for c in data.detail_columns},
        )
        for row, score in zip(rows, found[valid], strict=True)
    ]


def index_metric(data: VectorDataset, column: str) -> str | None:
    """The metric of `column`'s index of `data` as its metadata records it (not checked against the
    export: --exact asks the same question without it), or None where there is no readable one."""
    try:
        metadata = read_metadata(data, column)
    except AnalysisError:
        return None
    if metadata is None or metadata.get("holds", data.holds) != data.holds:
        return None
    return metadata["metric"]


def open_index(data: VectorDataset, column: str, exact: bool = False) -> LoadedIndex | None:
    """The checked index of `column`, or None with `exact` or when there is none (see `load_index`)."""
    if exact:
        return None
    return load_index(data, column, [data.key_column, *data.detail_columns])


def indexed_neighbors(
    data: VectorDataset, loaded: LoadedIndex, key: str, k: int = DEFAULT_K
) -> tuple[list[Neighbor], int]:
    """The `k` nearest rows to row `key` through the index, best first (its own rows excluded).

    Returns:
        `(neighbors, indexed rows)`.
    """
    if k < 1:
        raise AnalysisError(f"-k must be at least 1, received {k}.")
    positions = loaded.positions_of(key)
    noun = "document id" if data.holds == "documents" else "word"
    if len(positions) == 0:
        raise AnalysisError(f"No row of {data.location!r} has the {noun} {key!r}.{suggest_keys(data, key)}")
    indexed = [p for p in positions if loaded.contains(p)]
    if not indexed:
        # Not indexed: its vector is null or not finite; the row says which (as the exact scan does).
        column = loaded.metadata["column"]
        stored = data.dataset.take(pa.array(positions[:1]), columns=[column])[column][0]
        why = "it is null" if not stored.is_valid else "it has NaN or infinite values"
        raise AnalysisError(f"The {noun} {key!r} has no usable {column!r} vector ({why}).")
    query = loaded.vectors(np.asarray(indexed[:1]))
    if loaded.metric == "cos" and not np.any(query):
        raise AnalysisError(
            f"The {noun} {key!r} has an all-zero vector, so its cosine similarity is undefined."
        )
    found_positions, found = loaded.search(query, k, exclude=[set(positions.tolist())])
    return _neighbors_at(data, loaded, found_positions[0], found[0]), loaded.metadata["indexed"]


def printable(text: str) -> str:
    """`text` for one cell of a text table: a newline, a tab or another character that is not printed
    as itself (a kept title holding "\\n") shown escaped, so each row stays one line."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


def shown_score(score: float) -> str:
    """A score for the table: 4 decimals, or 4 significant digits in exponent form from 1e6 on (an L2
    distance or a dot product of vectors of 1e19 would be a 40-digit number)."""
    return f"{score:.4f}" if abs(score) < 1e6 else f"{score:.4e}"


def format_neighbors(
    data: VectorDataset,
    key: str,
    column: str,
    neighbors: list[Neighbor],
    compared: int,
    metric: str = "cos",
    indexed: bool = False,
) -> str:
    """The neighbours as a text table."""
    noun = "document" if data.holds == "documents" else "word"
    score_header = {"cos": "similarity", "ip": "dot", "l2": "distance"}[metric]
    headers = ["rank", score_header, data.key_column, *data.detail_columns]
    rows = [
        [
            str(rank),
            shown_score(n.similarity),
            printable(str(n.key)),
            *(printable(str(n.details.get(c))) for c in data.detail_columns),
        ]
        for rank, n in enumerate(neighbors, 1)
    ]
    widths = [max(len(cell) for cell in cells) for cells in zip(headers, *rows, strict=True)]
    lines = [
        f"Nearest neighbours of {noun} {key!r} by {SCORE_NAMES[metric]} of {column} "
        + (f"(index of {compared} rows)" if indexed else f"({compared} rows compared)")
    ]
    if not rows and (not indexed or compared <= 1):
        # A lone header would read as an answer cut short (an index that reached none says so itself).
        lines.append(
            f"  No other {noun} has a usable {column} vector (null, NaN or infinite ones are left out)."
        )
        return "\n".join(lines)
    for cells in [headers, *rows]:
        # Rank and similarity are right-aligned numbers; keys and details left-aligned text.
        padded = [
            c.rjust(w) if i < 2 else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        lines.append("  " + "  ".join(padded).rstrip())
    return "\n".join(lines)


def describe_index(
    loaded: LoadedIndex, data: VectorDataset, instead: str = "--exact scans every row instead"
) -> str:
    """The line saying that the answer came through the index, how good the index is, and `instead`:
    how to do without it (`knn-score` has no --exact)."""
    recall = loaded.metadata["recall"]
    measured = (
        f"recall@{recall['k']} {recall['recall']:.4f} measured at build"
        if recall.get("recall") is not None
        else "recall not measured"
    )
    return (
        f"Using the index {data.location}/{loaded.metadata['file']} ({loaded.metadata['metric']}, "
        f"{loaded.metadata['indexed']} rows, {measured}); {instead}."
    )
