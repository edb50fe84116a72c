"""Loading a column's index checked against its export, and searching it.

The index file must match the SHA-256 its metadata records, and the metadata the
export as it is now; otherwise loading is refused, never silently used.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from models.digest import sha256_file
from pipeline.analysis.dataset import AnalysisError, VectorDataset
from pipeline.analysis.exact import pair_scores, score_scales
from pipeline.analysis.index_store import (
    INDEX_SUFFIX,
    METADATA_SUFFIX,
    IndexMetadata,
    SourceIdentity,
    index_paths,
    is_local,
    read_metadata,
    source_identity,
    usearch_index_class,
)
from pipeline.scratch import held_scratch_directory
from pipeline.writing.layout import INDEX_DIR, MANIFEST

if TYPE_CHECKING:
    from usearch.index import Index


# How far a search widens to find every row tied with the k-th (see `LoadedIndex.search`).
TIE_SEARCH_ROWS = 4096
# How far (relative) usearch's float32 distances can be from the exact scores: rows this close to the
# k-th may come back in any order, so a search is widened past them (see `search_index`).
SEARCH_ROUNDING = 1e-5
# Rows of one score in an answer from which HNSW may have missed more of them: its search reaches a few
# hundred duplicates and returns lower rows in place of the rest, so a tie above the k-th place can look
# whole and is not. From this many on (half of a node's links at the default connectivity), the answer is
# checked by usearch's exhaustive search; below, an answer of -k 10 never pays for it.
LONG_TIE_ROWS = 32


class Matches(NamedTuple):
    """usearch's answer to a batch of queries, always 2-D: the keys (queries, found) and how many each got.

    Its distances are not read: the rows found are scored again as the exact scan scores them (`_found`).
    """

    keys: np.ndarray
    counts: np.ndarray


def raw_search(
    index: Index, queries: np.ndarray, count: int, threads: int = 0, exhaustive: bool = False
) -> Matches:
    """(keys, counts) of usearch's search (with `exhaustive`, of every row rather than along the
    graph), always 2-D (it returns 1-D for one query)."""
    matches = index.search(queries, count, threads=threads, exact=exhaustive)
    keys = np.asarray(matches.keys, dtype=np.int64).reshape(len(queries), -1)
    if hasattr(matches, "counts"):
        counts = np.asarray(matches.counts).reshape(-1)
    else:
        counts = np.asarray([len(matches.keys)])
    if keys.shape[1] < count:
        # One query's answer holds only the rows its graph search reached (a batch's is `count` wide):
        # padded, so that an answer is `count` wide whatever the number of queries (a tie's wider search
        # then fits in it).
        keys = np.pad(keys, ((0, 0), (0, count - keys.shape[1])), constant_values=-1)
    return Matches(keys, counts)


@dataclasses.dataclass
class LoadedIndex:
    """An index checked against its export, with the export's keys and details in position order."""

    index: Index
    metadata: IndexMetadata
    keys: pa.Table  # the key column and the detail columns, one row per export row
    # The rows of each tie too long for a search, by query vector (`search_index`'s tie_cache).
    tie_rows: dict[bytes, tuple[np.ndarray, np.ndarray]] = dataclasses.field(default_factory=dict)
    # Each row's place in key order (`key_order`), made at the first search that needs it.
    _key_ranks: np.ndarray | None = dataclasses.field(default=None, repr=False)

    @property
    def metric(self) -> str:
        return self.metadata["metric"]

    @property
    def key_ranks(self) -> np.ndarray:
        """Each row's place in key order (`key_order`), which breaks ties between equal scores."""
        if self._key_ranks is None:
            self._key_ranks = key_order(self.keys.column(0))
        return self._key_ranks

    def search(
        self, queries: np.ndarray, k: int, exclude: list[set[int]] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(positions, scores), each (queries, min(k, indexed rows)), best first; `exclude[i]` is a set of
        positions to skip.  Equal scores go by key (`search_index`)."""
        return search_index(
            self.index, self.metric, queries, k, exclude, lambda: self.key_ranks, tie_cache=self.tie_rows
        )

    def positions_of(self, key: str) -> np.ndarray:
        """Positions of the rows whose key is `key`."""
        return np.flatnonzero(
            np.asarray(pc.equal(self.keys.column(0), key).to_numpy(zero_copy_only=False), dtype=bool)
        )

    @property
    def dim(self) -> int:
        return int(self.metadata["dim"])

    def contains(self, position: int) -> bool:
        """Whether the row at `position` is indexed (its vector was neither null nor non-finite)."""
        return bool(self.index.contains(int(position)))

    def vectors(self, positions: np.ndarray) -> np.ndarray:
        """The indexed vectors at `positions` (float32, as stored); NaN rows for rows not indexed."""
        positions = np.asarray(positions, dtype=np.int64)
        result = np.full((len(positions), self.dim), np.nan, dtype=np.float32)
        present = np.asarray([self.index.contains(int(p)) for p in positions], dtype=bool)
        if present.any():
            stored = self.index.get(positions[present].astype(np.uint64))
            result[present] = np.asarray(stored, dtype=np.float32).reshape(int(present.sum()), -1)
        return result

    def first_positions(self, keys: Sequence[str | None]) -> list[int]:
        """The first position of each key, -1 for a key no row has (and for a null key: `skip_nulls`, or
        a null would be found at a vocabulary's first row past its tokenizer, whose token is null)."""
        found = pc.index_in(pa.array(keys, pa.string()), value_set=self.keys.column(0), skip_nulls=True)
        return [-1 if p is None else int(p) for p in found.to_pylist()]

    def positions_by_key(self, keys: Sequence[str | None]) -> dict[str, np.ndarray]:
        """Every position of each of `keys` (a key two rows share has both)."""
        return positions_by_key(self.keys.column(0), keys)

    def take(self, positions: np.ndarray) -> pa.Table:
        """The key and detail columns of the rows at `positions`."""
        return self.keys.take(pa.array(np.asarray(positions, dtype=np.int64)))


def positions_by_key(key_column: pa.ChunkedArray, keys: Sequence[str | None]) -> dict[str, np.ndarray]:
    """Every position of `key_column` holding each of `keys` (nulls left out), in position order."""
    wanted = pa.array([key for key in dict.fromkeys(keys) if key is not None], pa.string())
    mask = pc.is_in(key_column, value_set=wanted, skip_nulls=True).fill_null(False)
    positions = np.flatnonzero(np.asarray(mask.to_numpy(zero_copy_only=False), dtype=bool))
    found: dict[str, list[int]] = {key: [] for key in wanted.to_pylist()}
    keys_found = key_column.take(pa.array(positions, pa.int64())).to_pylist()
    for position, key in zip(positions.tolist(), keys_found, strict=True):
        found[str(key)].append(position)
    return {key: np.asarray(places, dtype=np.int64) for key, places in found.items()}


def key_order(keys: pa.ChunkedArray) -> np.ndarray:
    """Each position's place among `keys` sorted (Arrow sorts strings by their UTF-8 bytes: code point
    order, as Python's `sorted` does; rows of one key by position): ranking a tie by these numbers is a
    numpy sort, where ranking it by the keys themselves took a Python sort of every tied row per query."""
    if pa.types.is_dictionary(keys.type):
        keys = keys.cast(keys.type.value_type)
    order = np.asarray(pc.sort_indices(keys).to_numpy(zero_copy_only=False), dtype=np.int64)
    ranks = np.empty(len(order), dtype=np.int64)
    ranks[order] = np.arange(len(order))
    return ranks


def search_index(
    index: Index,
    metric: str,
    queries: np.ndarray,
    k: int,
    exclude: list[set[int]] | None = None,
    key_ranks: Callable[[], np.ndarray] | None = None,
    threads: int = 0,
    tie_cache: dict[bytes, tuple[np.ndarray, np.ndarray]] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(positions, scores) of `index`'s k nearest rows to each query, each (queries, min(k, indexed rows)),
    best first; `exclude[i]` is a set of positions to skip.

    Equal scores go by key (`key_ranks()`: each position's place in key order,
    `key_order`; by position without it), as the exact scans break their ties: of the rows tied with the k-th,
    those with the smallest keys make the cut, so a query whose k-th row ties past
    the rows found is searched again, wider, until the tie ends or TIE_SEARCH_ROWS
    rows are found (only queries with a tie pay for it); a tie still running there
    has every indexed row scored (`_rows_at_least`; `tie_cache` keeps that for
    the other queries of the same vector, the duplicates' own).  The build measures its
    recall through this same function, so the recall is that of these answers.
    """
    queries = np.asarray(queries, dtype=np.float32).reshape(len(queries), -1)
    total = len(index)
    # More neighbours than indexed rows cannot be found; a huge k must not size the arrays.
    k = max(1, min(k, total))
    exclude = exclude or [set() for _ in range(len(queries))]
    extra = max((len(e) for e in exclude), default=0)
    # k, the rows a query excludes, and one more, where a row tied with the k-th beyond the cut shows.
    count = min(k + extra + 1, total)
    widest = min(total, max(TIE_SEARCH_ROWS, count))
    keys, found, returned = _found(index, metric, queries, count, exclude, threads)
    order = np.lexsort((keys, -found), axis=1)
    keys, found = np.take_along_axis(keys, order, axis=1), np.take_along_axis(found, order, axis=1)
    positions, best = keys[:, :k].copy(), found[:, :k].copy()
    window = found[:, : k + 1]
    tied = ((window[:, 1:] == window[:, :-1]) & np.isfinite(window[:, 1:])).any(axis=1)
    # usearch returns rows whose float32 distances differ by its rounding alone in any order: a row
    # that the exact scores tie with the k-th can come back past the rows found while rows scored a
    # little lower came back. So a search whose last row scores that close to the k-th goes on too.
    kth_scores = best[:, -1]
    # Relative to what usearch's rounding is relative to: 1 for cosines, |q|^2 for dot products, the
    # squared L2 distance itself (a difference of float32 values close together is exact). An absolute
    # slack took every row of small vectors for a near tie, and searched each query wide, then exhaustively.
    scales = score_scales(metric, queries) if metric != "l2" else np.zeros(len(queries))
    slack = SEARCH_ROUNDING * np.maximum(scales, np.abs(np.where(np.isfinite(kth_scores), kth_scores, 0.0)))
    lowest = np.where(np.isfinite(found), found, np.inf).min(axis=1)
    near = np.isfinite(kth_scores) & (returned == count) & (lowest >= kth_scores - slack)
    # An all-zero query's answer is set apart below (`_rank_zero_queries`): its ties need no search.
    zero_queries = ~queries.any(axis=1) if metric == "cos" else np.zeros(len(queries), dtype=bool)
    for row in np.flatnonzero((tied | near) & ~zero_queries):
        row_keys, row_found, row_count = keys[row], found[row], count
        kth = best[row, -1]
        floor = kth - slack[row]
        if tie_cache is not None and _tie_name(queries[row], floor) in tie_cache:
            # Another query of this vector (a duplicate's) found the tie too long for any search: its
            # scan holds every row this one can rank, so neither the wider searches nor usearch's
            # exhaustive one (each over every row) is made again.
            row_keys, row_found = _rows_at_least(index, metric, queries[row], floor, exclude[row], tie_cache)
        else:
            row_keys, row_found = _search_tie(
                index,
                metric,
                queries,
                int(row),
                (row_keys, row_found, row_count),
                kth,
                floor,
                widest,
                returned,
                exclude,
                threads,
                tie_cache,
                _longest_tie(window[row]) >= LONG_TIE_ROWS,
            )
        valid = np.flatnonzero(np.isfinite(row_found))
        places = key_ranks()[row_keys[valid]] if key_ranks is not None else row_keys[valid]
        ranked = np.lexsort((places, -row_found[valid]))[:k]
        positions[row], best[row] = -1, -np.inf
        positions[row, : len(ranked)] = row_keys[valid[ranked]]
        best[row, : len(ranked)] = row_found[valid[ranked]]
    positions[~np.isfinite(best)] = -1
    if positions.shape[1] < k:
        pad = k - positions.shape[1]
        positions = np.pad(positions, ((0, 0), (0, pad)), constant_values=-1)
        best = np.pad(best, ((0, 0), (0, pad)), constant_values=-np.inf)
    zero = np.flatnonzero(zero_queries)
    if len(zero):
        _rank_zero_queries(index, zero, k, exclude, key_ranks, positions, best)
    return positions, best


def _search_tie(
    index: Index,
    metric: str,
    queries: np.ndarray,
    row: int,
    first: tuple[np.ndarray, np.ndarray, int],
    kth: float,
    floor: float,
    widest: int,
    returned: np.ndarray,
    exclude: list[set[int]],
    threads: int,
    tie_cache: dict[bytes, tuple[np.ndarray, np.ndarray]] | None,
    long_tie: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """(keys, scores) holding every row of query `row` tied with (or, by usearch's rounding, near) its k-th
    score `kth`: `first`, its first search's (keys, scores, rows asked for), searched wider while its last
    row is at or above `floor`, up to `widest` rows; then exhaustively, and past `widest` every row scored.

    Thousands of identical vectors (duplicate documents) would make every one of their queries a search of
    them all: past TIE_SEARCH_ROWS the rows are scored once (`_rows_at_least`, kept in `tie_cache`).
    `long_tie`: the first answer holds LONG_TIE_ROWS rows of one score above the k-th, which HNSW may have
    cut short; the exhaustive search finds the rest.
    """
    total = len(index)
    row_keys, row_found, row_count = first
    searched = _searched_whole(tie_cache, queries[row], widest)
    tie_past_the_end = False
    # Checked at the widest search too: a first search already TIE_SEARCH_ROWS wide (-k of 4,095 or
    # more) has a tie past its end that no wider search follows, and the exhaustive search must.
    while (
        searched is None
        and row_count < total
        and returned[row] == row_count
        and row_found[np.isfinite(row_found)].min() >= floor
    ):
        tie_past_the_end |= bool(row_found[np.isfinite(row_found)].min() == kth)
        if row_count >= widest:
            break
        row_count = min(2 * row_count, widest)
        wider = _found(index, metric, queries[row : row + 1], row_count, exclude[row : row + 1], threads)
        row_keys, row_found, returned[row] = wider[0][0], wider[1][0], wider[2][0]
    if searched is not None or tie_past_the_end or long_tie or returned[row] < min(row_count, total):
        # Hundreds of rows of one score (duplicate documents) are where HNSW fails: its search
        # reaches a few hundred of them and returns rows of lower scores in place of the rest (or
        # fewer rows than asked), as if the tie had ended. usearch's exhaustive search finds them.
        if searched is None:
            # Searched without the exclusions: the duplicates' own queries, each excluding its own row,
            # share one exhaustive search (`tie_cache`), as they share one scan past TIE_SEARCH_ROWS.
            wider = _found(index, metric, queries[row : row + 1], widest, [set()], threads, exhaustive=True)
            searched = (wider[0][0], wider[1][0], int(wider[2][0]))
            _remember(tie_cache, _whole_name(queries[row], widest), searched[0], searched[1])
        row_keys, row_found, returned[row] = searched[0], searched[1].copy(), searched[2]
        if exclude[row]:
            row_found[np.isin(row_keys, list(exclude[row]))] = -np.inf
        last = row_found[np.isfinite(row_found)]
        if returned[row] == widest < total and len(last) and last.min() >= floor:
            # Still tied at the end of TIE_SEARCH_ROWS rows (thousands of duplicates): which of the
            # tied rows usearch returned is its own order, not the keys'. Every row is scored.
            row_keys, row_found = _rows_at_least(index, metric, queries[row], floor, exclude[row], tie_cache)
    return row_keys, row_found


def _longest_tie(scores: np.ndarray) -> int:
    """The most rows of one finite score in `scores` (sorted, best first)."""
    finite = scores[np.isfinite(scores)]
    if len(finite) == 0:
        return 0
    starts = np.flatnonzero(np.concatenate([[True], finite[1:] != finite[:-1], [True]]))
    return int(np.diff(starts).max())


# Answers kept in a `tie_cache` at most: an exhaustive search's is TIE_SEARCH_ROWS keys and scores (64 KiB),
# and knn-score --all asks for every row's; the oldest go first.
TIE_CACHE_ENTRIES = 1024


def _whole_name(query: np.ndarray, rows: int) -> bytes:
    """The `tie_cache` key of the exhaustive search of `rows` rows for `query`."""
    return b"whole" + np.asarray(query, dtype=np.float32).tobytes() + np.int64(rows).tobytes()


def _searched_whole(
    cache: dict[bytes, tuple[np.ndarray, np.ndarray]] | None, query: np.ndarray, rows: int
) -> tuple[np.ndarray, np.ndarray, int] | None:
    """The exhaustive search of `rows` rows for `query` that `cache` holds (keys, scores, rows returned)."""
    if cache is None:
        return None
    found = cache.get(_whole_name(query, rows))
    # The slots past what usearch returned score -inf (`_found`); no exclusion was applied to it.
    return None if found is None else (found[0], found[1], int(np.isfinite(found[1]).sum()))


def _remember(
    cache: dict[bytes, tuple[np.ndarray, np.ndarray]] | None,
    name: bytes,
    keys: np.ndarray,
    scores: np.ndarray,
) -> None:
    """Keeps `keys` and `scores` in `cache` under `name`, dropping the oldest past TIE_CACHE_ENTRIES."""
    if cache is None:
        return
    while len(cache) >= TIE_CACHE_ENTRIES:
        del cache[next(iter(cache))]
    cache[name] = (keys, scores)


def _tie_name(query: np.ndarray, floor: float) -> bytes:
    """The `tie_cache` key of the rows scoring at least `floor` against `query`."""
    return np.asarray(query, dtype=np.float32).tobytes() + np.float64(floor).tobytes()


# Indexed vectors scored at once when a tie runs past TIE_SEARCH_ROWS: 4k x 1024 float64 is 32 MB, and
# scoring holds a few such arrays (the query broadcast to float64, the unit rows of both).
TIE_SCAN_ROWS = 4096


def _rows_at_least(
    index: Index,
    metric: str,
    query: np.ndarray,
    floor: float,
    exclude: set[int],
    cache: dict[bytes, tuple[np.ndarray, np.ndarray]] | None,
) -> tuple[np.ndarray, np.ndarray]:
    """(keys, scores) of every indexed row scoring at least `floor` against `query` (scored as `_found`
    scores), -inf for those in `exclude`: the whole of a tie too long for any search.  `cache`, by query
    vector and floor, spares the other tied rows' queries (of the same vector) the scan."""
    name = _tie_name(query, floor)
    if cache is None or name not in cache:
        every = np.asarray(index.keys, dtype=np.int64)
        kept_keys, kept_scores = [], []
        for start in range(0, len(every), TIE_SCAN_ROWS):
            chunk = every[start : start + TIE_SCAN_ROWS]
            stored = np.asarray(index.get(chunk.astype(np.uint64)), dtype=np.float32).reshape(len(chunk), -1)
            scored = pair_scores(metric, np.broadcast_to(query, stored.shape), stored)
            at_least = scored >= floor
            kept_keys.append(chunk[at_least])
            kept_scores.append(scored[at_least])
        found = (np.concatenate(kept_keys), np.concatenate(kept_scores))
        _remember(cache, name, *found)
    else:
        found = cache[name]
    keys, scores = found[0], found[1].copy()
    if exclude:
        scores[np.isin(keys, list(exclude))] = -np.inf
    return keys, scores


def _rank_zero_queries(
    index: Index,
    zero: np.ndarray,
    k: int,
    exclude: list[set[int]],
    key_ranks: Callable[[], np.ndarray] | None,
    positions: np.ndarray,
    best: np.ndarray,
) -> None:
    """Answers the all-zero queries (`zero`, rows of `positions` and `best`, filled in place) as the
    exact scan does: an all-zero vector's cosine similarity is 0 to every row, so its k nearest are the
    first rows in key order.  usearch's cosine distance of two zero vectors is 0 (similarity 1), which
    would rank the other zero rows first."""
    indexed = np.asarray(index.keys, dtype=np.int64)
    indexed = (
        indexed[np.argsort(key_ranks()[indexed], kind="stable")]
        if key_ranks is not None
        else np.sort(indexed)
    )
    for row in zero:
        skipped = exclude[row]
        chosen = [p for p in indexed[: k + len(skipped)].tolist() if p not in skipped][:k]
        positions[row], best[row] = -1, -np.inf
        positions[row, : len(chosen)] = chosen
        best[row, : len(chosen)] = 0.0


def _found(
    index: Index,
    metric: str,
    queries: np.ndarray,
    count: int,
    exclude: list[set[int]],
    threads: int,
    exhaustive: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(keys, scores, how many usearch returned) of a search for `count` rows; -inf for the rows in
    `exclude` and the slots past what it returned."""
    keys, counts = raw_search(index, queries, count, threads, exhaustive)
    returned = np.arange(keys.shape[1])[None, :] < counts[:, None]
    found = np.full(keys.shape, -np.inf)
    if returned.any():
        # usearch's float32 distances rank rows that tie (vectors pointing the same way) by its rounding:
        # the rows found are scored again as the exact scan scores them, so equal is equal in every mode.
        rows, slots = np.nonzero(returned)
        stored = np.asarray(index.get(keys[rows, slots].astype(np.uint64)), dtype=np.float32)
        found[rows, slots] = pair_scores(metric, queries[rows], stored.reshape(len(rows), -1))
    for row, skipped in enumerate(exclude):
        if skipped:
            found[row, np.isin(keys[row], list(skipped))] = -np.inf
    return keys, found, np.asarray(counts, dtype=np.int64).copy()


def _only_times_differ(recorded: object, current: SourceIdentity) -> bool:
    """Whether an export's identity at build and now differ only in the row files' modification times."""
    if not isinstance(recorded, dict) or "row_files" not in current:
        return False

    def untimed(identity: Mapping[str, object]) -> object:
        files = identity.get("row_files")
        names = (
            [(f.get("file"), f.get("bytes")) for f in files if isinstance(f, dict)]
            if isinstance(files, list)
            else files
        )
        return identity.get("manifest_sha256"), names

    return untimed(recorded) == untimed(current)


def load_index(data: VectorDataset, column: str, key_columns: list[str]) -> LoadedIndex | None:
    """`column`'s index of `data` if there is one, checked against the export; None if there is none.

    Raises:
        AnalysisError: the index belongs to an export that has since been
            replaced, its file does not match its recorded SHA-256, or usearch
            is not installed.
    """
    metadata = read_metadata(data, column)
    if metadata is None:
        return None
    if metadata.get("holds", data.holds) != data.holds:
        # The index of the other data at this name: an export of token ids whose rows have a column
        # named `vector`, beside its token table's `vector`. It is not this data's index.
        return None
    rebuild = (
        f"Rebuild it with `python -m pipeline.analyze {data.location} index --column {column}`, "
        "or pass --exact to scan every row."
    )
    if metadata["column"] != column or metadata["file"] != posixpath.join(INDEX_DIR, column + INDEX_SUFFIX):
        # Index files copied or renamed: their SHA-256 still matches, but they index another column.
        named = posixpath.join(INDEX_DIR, column)
        raise AnalysisError(
            f"The index metadata {named}{METADATA_SUFFIX} of {data.location!r} is that of "
            f"{metadata['column']!r} ({metadata['file']}), not of {column!r} (index files copied or "
            f"renamed), so its answers would be another column's. Delete {named}{METADATA_SUFFIX} and "
            f"{named}{INDEX_SUFFIX}, then build the index with `python -m pipeline.analyze "
            f"{data.location} index --column {column}`, or pass --exact to scan every row."
        )
    current = source_identity(data)
    what, changed = (
        ("export", f"{MANIFEST} or one of its row files")
        if data.holds == "documents"
        else ("vocabulary", "file's SHA-256")
    )
    if metadata.get("source") != current:
        if _only_times_differ(metadata.get("source"), current):
            # Same manifest, row files of the same names and sizes: copied without their times, or
            # touched. A rewrite of the same size looks the same, so the index is not trusted.
            raise AnalysisError(
                f"The index {metadata.get('file')} of {data.location!r} was built when its row files "
                "had other modification times (its manifest, their names and sizes are unchanged: copied "
                "without keeping the times, e.g. `cp -r` instead of `cp -a`, or touched), and a row file "
                f"rewritten in place looks the same, so it is not used. {rebuild}"
            )
        raise AnalysisError(
            f"The index {metadata.get('file')} of {data.location!r} was built for another version of "
            f"this {what} (its {changed} changed since: it was replaced), so its answers would be "
            f"wrong. {rebuild}"
        )
    index_class = usearch_index_class()
    filesystem, directory = data.filesystem_and_directory()
    index_path, _ = index_paths(directory, column)
    with held_scratch_directory("embexport-index-") as scratch:
        local: str | None
        if is_local(filesystem):
            local = index_path
        else:
            # Object storage: download once, then usearch loads it into memory.
            local = os.path.join(scratch, column + INDEX_SUFFIX)
            try:
                pafs.copy_files(index_path, local, source_filesystem=filesystem)
            except (FileNotFoundError, OSError):
                local = None
        damaged = (
            local is None
            or not os.path.isfile(local)
            or os.path.getsize(local) != metadata.get("bytes")
            or sha256_file(local) != metadata.get("sha256")
        )
        if local is None or damaged:
            raise AnalysisError(
                f"The index file {index_path} is missing or does not match the SHA-256 in its metadata "
                f"(damaged or partly written). {rebuild}"
            )
        index = index_class.restore(local, view=False)
    if index is None or int(index.ndim) != metadata.get("dim"):
        raise AnalysisError(f"The index file {index_path} cannot be read by usearch. {rebuild}")
    # usearch does not store the search-time expansion; the build chose it for the recall it measured.
    # usearch defines this property's setter apart from its getter, which mypy reads as read-only;
    # unused-ignore: where usearch is not installed the checker sees Any here.
    index.expansion_search = int(metadata["expansion_search"])  # type: ignore[misc, unused-ignore]
    keys = data.dataset.to_table(columns=key_columns)
    if keys.num_rows != metadata.get("rows"):
        raise AnalysisError(
            f"The index has {metadata.get('rows')} rows, the export {keys.num_rows}. {rebuild}"
        )
    return LoadedIndex(index, metadata, keys)
