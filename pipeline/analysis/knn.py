"""The k-nearest-neighbour label agreement of a vector column against chance, and its report.

On a sample (every pair compared in memory) or on every labelled row through
the column's index (`knn-score --all`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from pipeline.analysis.dataset import (
    DEFAULT_SAMPLE,
    DEFAULT_SEED,
    AnalysisError,
    VectorDataset,
    check_label_column,
    sample_vectors,
    unit_rows,
)
from pipeline.analysis.exact import rounded_scores
from pipeline.analysis.index_search import LoadedIndex
from pipeline.analysis.neighbors import DEFAULT_K, SCORE_NAMES, printable

# Rows of the sample compared with all others at once by knn-score: 512 x 20k float32 scores, 40 MB.
KNN_CHUNK_ROWS = 512
# Candidates beyond the k nearest that float32 picks for float64 to rank (`_nearest_rows`).
KNN_WINDOW = 16


@dataclasses.dataclass(frozen=True)
class KnnScore:
    """The result of `score_label_agreement` and `knn_score_indexed`."""

    agreement: float
    chance: float
    rows: int
    k: int
    # label -> (rows, mean agreement)
    per_class: dict[str, tuple[int, float]]


def score_label_agreement(
    vectors: np.ndarray,
    labels: Sequence[str | None] | np.ndarray,
    k: int = DEFAULT_K,
    chunk_rows: int = KNN_CHUNK_ROWS,
    keys: Sequence[str] | None = None,
) -> KnnScore:
    """k-nearest-neighbour label agreement of `vectors` (cosine similarity) against chance.

    Agreement is the fraction of each row's `k` nearest other rows that share its
    label, averaged over rows.  Chance is the sum of the squared class
    frequencies: the agreement of neighbours drawn at random.  Of the rows tied
    with a row's k-th nearest, those with the smallest `keys` count (by position
    without keys), as `neighbors` and the index (`knn-score --all`) break ties.

    Returns:
        A `KnnScore`.
    """
    labels = np.asarray(labels, dtype=object)
    rows = len(labels)
    if k < 1:
        raise AnalysisError(f"-k must be at least 1, received {k}.")
    if rows <= k:
        raise too_few_labelled(k, rows)
    # float64, rounded (`rounded_scores`), as `neighbors` and the index score: equal up to rounding is a tie.
    unit = unit_rows(np.asarray(vectors, dtype=np.float64))
    single = unit.astype(np.float32)
    classes, codes = np.unique(labels.astype(str), return_inverse=True)
    # Each row's place in key order (by position without keys): what breaks ties between equal similarities.
    ranks = (
        np.unique(np.asarray(keys, dtype=str), return_inverse=True)[1].reshape(-1)
        if keys is not None
        else np.arange(rows)
    )
    hits = np.empty(rows)
    for start in range(0, rows, chunk_rows):
        stop = min(start + chunk_rows, rows)
        nearest = _nearest_rows(unit, single, np.arange(start, stop), k, ranks)
        hits[start:stop] = (codes[nearest] == codes[start:stop, None]).mean(axis=1)
    frequencies = np.bincount(codes) / rows
    per_class = {
        str(name): (int((codes == index).sum()), float(hits[codes == index].mean()))
        for index, name in enumerate(classes)
    }
    return KnnScore(float(hits.mean()), float((frequencies**2).sum()), rows, k, per_class)


def too_few_labelled(k: int, rows: int) -> AnalysisError:
    """The error for `rows` labelled rows, too few to score on `k` neighbours each: lower -k where it can
    go lower; with fewer than 2 rows no -k helps (-k 1 is the least), the rows need labels."""
    if rows >= 2:
        return AnalysisError(
            f"knn-score needs more than k={k} labelled rows; received {rows}. Lower -k to at most {rows - 1}."
        )
    return AnalysisError(
        f"knn-score needs at least 2 labelled rows with a finite vector (each is scored on its nearest "
        f"others); received {rows}. Export more documents with the label field (--keep_fields), or score "
        "another --label."
    )


def _nearest_rows(
    unit: np.ndarray, single: np.ndarray, rows: np.ndarray, k: int, ranks: np.ndarray
) -> np.ndarray:
    """The columns of the k nearest other rows of each of `rows` (`unit` vectors, float64, and `single`,
    the same in float32): `_nearest` of
    their rounded float64 similarities to every row, computed only where float32 cannot tell.

    A float64 product of every pair costs three times a float32 one and its rounding as much again:
    float32 picks each row's k + KNN_WINDOW best candidates, and where the worst of them is below the
    k-th by more than float32's error (`_float32_margin`), no row outside can reach the k-th place, so
    the candidates alone are scored in float64; the other rows (a tie, a zero vector) are scored whole.
    """
    total = len(unit)
    nearest = np.empty((len(rows), k), dtype=np.int64)
    safe = np.zeros(len(rows), dtype=bool)
    window = k + KNN_WINDOW
    if window < total:
        approx = single[rows] @ single.T
        approx[np.arange(len(rows)), rows] = -np.inf
        candidates = np.argpartition(-approx, window - 1, axis=1)[:, :window]
        candidate_approx = np.take_along_axis(approx, candidates, axis=1)
        kth = -np.partition(-candidate_approx, k - 1, axis=1)[:, k - 1]
        safe = candidate_approx.min(axis=1) < kth - _float32_margin(unit.shape[1])
    if safe.any():
        picked = candidates[safe]
        exact = rounded_scores(np.einsum("rwd,rd->rw", unit[picked], unit[rows[safe]]))
        exact[picked == rows[safe, None]] = -np.inf
        chosen = _nearest(exact, k, ranks[picked])
        nearest[safe] = np.take_along_axis(picked, chosen, axis=1)
    whole = np.flatnonzero(~safe)
    if len(whole):
        similarities = rounded_scores(unit[rows[whole]] @ unit.T)
        similarities[np.arange(len(whole)), rows[whole]] = -np.inf
        nearest[whole] = _nearest(similarities, k, ranks)
    return nearest


def _float32_margin(dim: int) -> float:
    """How far apart two float32 similarities of unit vectors must be for their float64 ones, rounded
    (`rounded_scores`), to keep their order: twice the error of a float32 dot product of `dim` terms and
    of the vectors' own rounding to float32 (each (dim + 2) 2^-24 of |a||b| = 1), and a rounding step."""
    return (2 * dim + 8) * 2.0**-24


def _nearest(similarities: np.ndarray, k: int, ranks: np.ndarray, block: int = 256) -> np.ndarray:
    """Per row of `similarities`, the columns of its k most similar, in no order; of the columns tied with
    the k-th, those first in key order (`ranks`: each column's place in it; 2-D, one row of places per
    row of `similarities`, where each row has columns of its own).  Duplicate documents (equal
    vectors, other labels) must not count by whichever order argpartition leaves them in.

    Vectorised, as every row may tie (a model that maps many documents to one vector): the columns
    above the k-th are among argpartition's k, and the tied ones with the smallest ranks fill the rest.
    """
    nearest = np.argpartition(-similarities, k - 1, axis=1)[:, :k]
    kth = np.take_along_axis(similarities, nearest, axis=1).min(axis=1)
    tied = np.flatnonzero((similarities >= kth[:, None]).sum(axis=1) > k)
    for start in range(0, len(tied), block):
        rows = tied[start : start + block]
        boundary = kth[rows][:, None]
        chosen = nearest[rows]
        above = np.take_along_axis(similarities[rows], chosen, axis=1) > boundary
        # Tied columns by rank; the others last.
        row_ranks = ranks[rows] if ranks.ndim == 2 else ranks[None, :]
        tie_ranks = np.where(similarities[rows] == boundary, row_ranks, int(ranks.max()) + 1)
        ties = np.argpartition(tie_ranks, k - 1, axis=1)[:, :k]
        ties = np.take_along_axis(
            ties, np.argsort(np.take_along_axis(tie_ranks, ties, axis=1), axis=1), axis=1
        )
        # The columns above first, then the tied ones in rank order: the first k of those.
        columns = np.concatenate([chosen, ties], axis=1)
        order = np.concatenate([np.where(above, -1, k), np.broadcast_to(np.arange(k), ties.shape)], axis=1)
        nearest[rows] = np.take_along_axis(columns, np.argsort(order, axis=1, kind="stable")[:, :k], axis=1)
    return nearest


def knn_score(
    data: VectorDataset,
    column: str | None,
    label: str,
    k: int = DEFAULT_K,
    sample: int = DEFAULT_SAMPLE,
    seed: int = DEFAULT_SEED,
) -> tuple[KnnScore, int]:
    """Samples labelled rows and scores `column`'s neighbours on `label`.

    Returns:
        `(KnnScore, total labelled rows)`.
    """
    drawn = sample_vectors(data, column, label, sample, seed, labelled_only=True)
    assert drawn.labels is not None  # a label was asked for
    drawn_rows = len(drawn.labels)
    if k >= 1 and drawn_rows <= k < drawn.total:
        # The sample is what is short, not the export: say so, or "lower -k" is the only advice.
        raise AnalysisError(
            f"knn-score needs more than k={k} labelled rows; the sample holds {drawn_rows} of the "
            f"{drawn.total} labelled rows. Raise --sample above {k} (or lower -k)."
        )
    return score_label_agreement(drawn.vectors, drawn.labels, k, keys=drawn.keys), drawn.total


def knn_score_indexed(
    data: VectorDataset, loaded: LoadedIndex, label: str, k: int = DEFAULT_K, chunk_rows: int = 4096
) -> KnnScore:
    """kNN label agreement over every indexed row with a label, its neighbours found through the index.

    Neighbours without a label are passed over, as the sampled score leaves
    unlabelled rows out of its pool.
    """
    if k < 1:
        raise AnalysisError(f"-k must be at least 1, received {k}.")
    label = check_label_column(data, label)
    values = data.dataset.to_table(columns=[label])[label]
    classes, codes = np.unique(
        np.asarray(values.fill_null("").to_pylist(), dtype=object).astype(str), return_inverse=True
    )
    labelled = np.asarray(values.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    codes = np.where(labelled, codes, -1)
    keys = np.sort(np.asarray(loaded.index.keys, dtype=np.int64))
    keys = keys[labelled[keys]]
    if len(keys) <= k:
        raise too_few_labelled(k, len(keys))
    hits = np.empty(len(keys))
    for start in range(0, len(keys), chunk_rows):
        chunk = keys[start : start + chunk_rows]
        neighbour_codes = _labelled_neighbour_codes(loaded, chunk, codes, k, int((~labelled).sum()))
        hits[start : start + len(chunk)] = (neighbour_codes == codes[chunk][:, None]).mean(axis=1)
    kept_codes = codes[keys]
    frequencies = np.bincount(kept_codes, minlength=len(classes)) / len(keys)
    per_class = {
        str(name): (int((kept_codes == index).sum()), float(hits[kept_codes == index].mean()))
        for index, name in enumerate(classes)
        if (kept_codes == index).any()
    }
    return KnnScore(float(hits.mean()), float((frequencies**2).sum()), len(keys), k, per_class)


def _labelled_neighbour_codes(
    loaded: LoadedIndex, rows: np.ndarray, codes: np.ndarray, k: int, unlabelled: int
) -> np.ndarray:
    """The label codes of the `k` nearest labelled rows of each of `rows` (positions), through the index.

    Unlabelled neighbours are passed over; a row that did not get `k` labelled ones
    is searched again with four times the count, until it has them or every indexed
    row was asked for, so each row is scored on `k` neighbours as in the sampled score.
    """
    result = np.full((len(rows), k), -1, dtype=np.int64)
    indexed = len(loaded.index)
    count = min(k + min(unlabelled, k), indexed)
    pending = np.arange(len(rows))
    while len(pending):
        asked = rows[pending]
        positions, _ = loaded.search(loaded.vectors(asked), count, exclude=[{int(p)} for p in asked])
        found = np.where(positions >= 0, codes[np.maximum(positions, 0)], -1)
        short: list[int] = []
        for at, row in enumerate(pending):
            chosen = found[at][found[at] >= 0][:k]
            if len(chosen) < k and count < indexed:
                short.append(int(row))
            else:
                result[row, : len(chosen)] = chosen
        pending = np.asarray(short, dtype=np.int64)
        count = min(count * 4, indexed)
    return result


def format_knn_score(column: str, label: str, score: KnnScore, total: int, metric: str = "cos") -> str:
    """The kNN score, chance level and per-class agreement as text; `metric` is what the neighbours were
    found by (an index's, with --all), named unless it is cosine similarity, which the sampled score uses."""
    scored = (
        f"{score.rows} rows"
        if score.rows == total
        else f"a random sample of {score.rows} of the {total} labelled rows"
    )
    lift = score.agreement / score.chance if score.chance else float("nan")
    by = "" if metric == "cos" else f", neighbours by the index's {SCORE_NAMES[metric]}"
    lines = [
        f"kNN label agreement of {column} on {label} (k={score.k}, {scored}, "
        f"{len(score.per_class)} classes{by})",
        f"  agreement  {score.agreement:.4f}  "
        f"(mean share of the {score.k} nearest neighbours with the same {label})",
        f"  chance     {score.chance:.4f}  (sum of squared class frequencies)",
        f"  lift       {lift:.2f}x",
        "  per class:",
    ]
    # A label holding a newline or a tab would break the table's lines.
    shown = {name: printable(name) for name in score.per_class}
    width = max(len(text) for text in shown.values())
    for name, (rows, agreement) in sorted(score.per_class.items(), key=lambda item: -item[1][0]):
        lines.append(f"    {shown[name].ljust(width)}  {rows:6d} rows  agreement {agreement:.4f}")
    return "\n".join(lines)
