"""The exact k nearest rows of many queries in one streaming pass: the reference an index is measured by.

The export's Parquet files are streamed in record batches (`iter_batches`), so
memory is one batch and the running top k of each query.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.analysis.dataset import (
    BATCH_ROWS,
    VectorDataset,
    different_lengths,
    unit_rows,
    vectors_to_numpy,
)

# The metric an index is built with unless told otherwise: what `neighbors` ranks by.
DEFAULT_METRIC = "cos"
# Queries scored against a batch at once by the exact scan: 256 x 16k float32 scores are 16 MB.
EXACT_QUERY_CHUNK = 256
# Scores this close to the k-th exact one count as ties, relative to the scores' scale (`score_scales`).
TIE_TOLERANCE = 1e-5


@dataclasses.dataclass(frozen=True)
class VectorBatch:
    """The valid rows of one record batch: their positions in the export and their vectors."""

    positions: np.ndarray  # int64
    vectors: np.ndarray  # (rows, dim) float32
    skipped_null: int  # null vectors, and rows with a null key (`skipped_no_key` of them)
    skipped_non_finite: int
    keys: np.ndarray  # (rows,) object: each row's key, which breaks ties between equal scores
    skipped_no_key: int = 0  # rows with a vector but a null key: a vocabulary's rows past its tokenizer


def iter_vector_batches(
    data: VectorDataset, column: str, batch_rows: int = BATCH_ROWS
) -> Iterator[VectorBatch]:
    """The export's rows of `column` in position order, one record batch at a time.

    Null vectors and vectors with NaN or infinite values are skipped (and
    counted): they have no place in a ranking.  So are rows with a null key (a
    vocabulary's rows past its tokenizer), which the exact scan of `neighbors`
    never returns either; they count as null.
    """
    filesystem = data.dataset.filesystem
    start = 0
    for path in data.dataset.files:
        with filesystem.open_input_file(path) as handle:
            batches = pq.ParquetFile(handle).iter_batches(
                batch_size=batch_rows, columns=[column, data.key_column]
            )
            for batch in batches:
                array = batch.column(column)
                has_vector = np.asarray(array.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
                has_key = np.asarray(
                    batch.column(data.key_column).is_valid().to_numpy(zero_copy_only=False), dtype=bool
                )
                valid = has_vector & has_key
                positions = start + np.flatnonzero(valid)
                mask = pa.array(valid)
                vectors = vectors_to_numpy(array.filter(mask)).astype(np.float32, copy=False)
                finite = np.isfinite(vectors).all(axis=1) if len(vectors) else np.ones(0, dtype=bool)
                keys = batch.column(data.key_column).filter(mask).to_numpy(zero_copy_only=False)
                start += batch.num_rows
                yield VectorBatch(
                    positions[finite].astype(np.int64),
                    np.ascontiguousarray(vectors[finite]),
                    int((~valid).sum()),
                    int((~finite).sum()),
                    np.asarray(keys, dtype=object)[finite],
                    int((has_vector & ~has_key).sum()),
                )


def row_count(data: VectorDataset) -> int:
    """Rows of the export, from the Parquet footers."""
    filesystem = data.dataset.filesystem
    total = 0
    for path in data.dataset.files:
        with filesystem.open_input_file(path) as handle:
            total += pq.ParquetFile(handle).metadata.num_rows
    return total


def scores(metric: str, queries: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """(queries, rows) scores, higher is nearer: cosine similarity, dot product or -squared L2 distance.

    In float64, as the single-query scan: a finite float32 vector's squared norm
    (or dot product) overflows float32 from values of about 2e19, which would
    turn its similarities to 0.
    """
    queries = np.asarray(queries, dtype=np.float64)
    vectors = np.asarray(vectors, dtype=np.float64)
    if metric == "cos":
        # Zero vectors stay zero: similarity 0 to everything, as in the exact scan.
        return rounded_scores(unit_rows(queries) @ unit_rows(vectors).T)
    if metric == "ip":
        return rounded_scores(queries @ vectors.T)
    return rounded_scores(
        -((queries**2).sum(axis=1)[:, None] - 2 * (queries @ vectors.T) + (vectors**2).sum(axis=1)[None, :])
    )


def pair_scores(metric: str, queries: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """`scores` of each query with the vector in the same row only: (rows,), for the rows an index found."""
    queries = np.asarray(queries, dtype=np.float64)
    vectors = np.asarray(vectors, dtype=np.float64)
    if metric == "cos":
        return rounded_scores(np.einsum("ij,ij->i", unit_rows(queries), unit_rows(vectors)))
    if metric == "ip":
        return rounded_scores(np.einsum("ij,ij->i", queries, vectors))
    return rounded_scores(-((queries - vectors) ** 2).sum(axis=1))


def rounded_scores(values: np.ndarray) -> np.ndarray:
    """Scores rounded to float32's precision (24 significant bits; float64's range kept), as they are ranked.

    The vectors are float32: scores that differ below that precision differ by
    the rounding of the arithmetic alone (vectors pointing the same way, [1, 1]
    and [3e38, 3e38], get cosines 1 and 0.9999999999999998, which the order of a
    sum or float32 arithmetic in the index would flip).  Rounded, they are equal,
    and ties are broken by key in every mode, as the docs promise.
    """
    rounded = np.array(values, dtype=np.float64)
    finite = np.isfinite(rounded)
    # On the bits (frexp and ldexp take 20 times as long): float64 has 52 bits after the point,
    # float32 23, so half of the 29 dropped bits is added and the 29 are cleared, a carry going into
    # the exponent as rounding up does. In place and on every value (a masked `where=` is slower, and
    # knn-score rounds a score per pair); infinities and NaN are put back after.
    bits = rounded.view(np.uint64)
    bits += np.uint64(1 << 28)
    bits &= np.uint64(~((1 << 29) - 1) & (2**64 - 1))
    if not finite.all():
        np.copyto(rounded, values, where=~finite, casting="unsafe")
    return rounded


def exact_top_k(
    data: VectorDataset,
    column: str,
    queries: np.ndarray,
    k: int,
    metric: str = DEFAULT_METRIC,
    exclude: np.ndarray | None = None,
    batch_rows: int = BATCH_ROWS,
) -> tuple[np.ndarray, np.ndarray]:
    """The exact `k` nearest rows of each query, streaming the export once (the index's reference).

    Args:
        exclude: per query, a position not to return (the query's own row), or -1; or per query a row
            of such positions (every row of the query's key), padded with -1.

    Returns:
        `(positions, scores)`, each (queries, min(k, rows)), best first; -1 / -inf where fewer
        rows have a vector.
    """
    queries = np.asarray(queries, dtype=np.float32)
    count = len(queries)
    # More neighbours than rows cannot be found; a huge k must not size the arrays.
    k = max(1, min(k, row_count(data)))
    best_positions = np.full((count, k), -1, dtype=np.int64)
    best_scores = np.full((count, k), -np.inf)
    best_keys = np.full((count, k), "", dtype=object)
    exclude = np.full(count, -1, dtype=np.int64) if exclude is None else np.asarray(exclude, dtype=np.int64)
    exclude = exclude.reshape(count, -1)
    for batch in iter_vector_batches(data, column, batch_rows):
        if len(batch.positions) == 0:
            continue
        if batch.vectors.shape[1] != queries.shape[1]:
            raise different_lengths(column, queries.shape[1], batch.vectors.shape[1])
        # Queries in chunks keep the (queries, rows) score matrix small whatever the batch of queries.
        for start in range(0, count, EXACT_QUERY_CHUNK):
            stop = min(start + EXACT_QUERY_CHUNK, count)
            chunk_scores = scores(metric, queries[start:stop], batch.vectors)
            for own in exclude[start:stop].T:
                chunk_scores[batch.positions[None, :] == own[:, None]] = -np.inf
            chosen = _chosen(chunk_scores, batch.keys, k)
            merged_scores = np.concatenate(
                [best_scores[start:stop], np.take_along_axis(chunk_scores, chosen, axis=1)], axis=1
            )
            merged_positions = np.concatenate([best_positions[start:stop], batch.positions[chosen]], axis=1)
            merged_keys = np.concatenate([best_keys[start:stop], batch.keys[chosen]], axis=1)
            order = _best_first(merged_scores, merged_positions, merged_keys, k)
            best_scores[start:stop] = np.take_along_axis(merged_scores, order, axis=1)
            best_positions[start:stop] = np.take_along_axis(merged_positions, order, axis=1)
            best_keys[start:stop] = np.take_along_axis(merged_keys, order, axis=1)
    best_positions[~np.isfinite(best_scores)] = -1
    return best_positions, best_scores


def _best_first(scores: np.ndarray, positions: np.ndarray, keys: np.ndarray, k: int) -> np.ndarray:
    """Per row, the columns of its k best scores, best first; equal scores by key (as `neighbors --id`
    and the index break ties), so the answer depends neither on the batches nor on where a row is.

    Sorted by position first (numbers sort fast); only a row with a tie among its
    first k + 1 is sorted again by key.
    """
    order = np.lexsort((positions, -scores), axis=1)
    window = np.take_along_axis(scores, order[:, : k + 1], axis=1)
    tied = ((window[:, 1:] == window[:, :-1]) & np.isfinite(window[:, 1:])).any(axis=1)
    for row in np.flatnonzero(tied):
        order[row] = np.lexsort((keys[row], -scores[row]))
    return order[:, :k]


def _chosen(chunk_scores: np.ndarray, keys: np.ndarray, k: int) -> np.ndarray:
    """Per query, the columns of `chunk_scores` of its k best rows; of rows tied with the k-th best,
    those with the smallest keys, so ties are broken by key and not by the rows' order."""
    columns = chunk_scores.shape[1]
    if columns <= k:
        return np.broadcast_to(np.arange(columns), chunk_scores.shape)
    chosen = np.argpartition(-chunk_scores, k - 1, axis=1)[:, :k]
    kth = np.take_along_axis(chunk_scores, chosen, axis=1).min(axis=1)
    # Only a query with more rows at or above its k-th score than k pays for the sort by key.
    for row in np.flatnonzero((chunk_scores >= kth[:, None]).sum(axis=1) > k):
        if not np.isfinite(kth[row]):
            continue
        candidates = np.flatnonzero(chunk_scores[row] >= kth[row])
        order = np.lexsort((keys[candidates], -chunk_scores[row, candidates]))[:k]
        chosen[row] = candidates[order]
    return chosen


def score_scales(metric: str, queries: np.ndarray) -> np.ndarray:
    """Per query, the scale of its scores, which a tie tolerance is relative to: 1 for cosine similarity;
    the query's squared norm for the dot product and the squared L2 distance, whose scores scale with the
    vectors' (an absolute tolerance would take every row of vectors of 1e-4 for a tie, and be below the
    rounding of the expanded L2 distance, about 1e-14 |q|^2, for vectors of 1e5)."""
    if metric == "cos":
        return np.ones(len(queries))
    return (np.asarray(queries, dtype=np.float64) ** 2).sum(axis=1)


def recall_at_k(
    found_scores: np.ndarray,
    exact_scores: np.ndarray,
    found_positions: np.ndarray,
    exact_positions: np.ndarray,
    scales: np.ndarray | None = None,
) -> float:
    """Mean share of each query's exact top k that the search found; ties with the k-th count as found.

    A found row counts when it is one of the exact top k, or when its score
    equals (to TIE_TOLERANCE of the query's `scales`, `score_scales`; 1 without
    them, cosine similarity's) the k-th exact score: rows tied at the boundary
    are equally right answers.
    """
    hits: list[float] = []
    if scales is None:
        scales = np.ones(len(exact_scores))
    for found_p, found_s, exact_p, exact_s, scale in zip(
        found_positions, found_scores, exact_positions, exact_scores, scales, strict=True
    ):
        wanted = exact_p[exact_p >= 0]
        if len(wanted) == 0:
            continue
        boundary = exact_s[len(wanted) - 1]
        tolerance = TIE_TOLERANCE * max(float(scale), abs(boundary))
        good = set(wanted.tolist())
        right = sum(
            1
            for p, s in zip(found_p, found_s, strict=True)
            if p >= 0 and (p in good or s >= boundary - tolerance)
        )
        hits.append(min(right, len(wanted)) / len(wanted))
    return float(np.mean(hits)) if hits else 1.0
