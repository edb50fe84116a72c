"""The approximate-nearest-neighbour index of an export's vector column: build, measure recall, load, search.

Layout, next to the export it indexes::

    OUTPUT/_index/COLUMN.usearch   the usearch HNSW graph and the vectors (float32)
    OUTPUT/_index/COLUMN.json      written last: SHA-256 and size of the index file, the
                                   export's identity (its _MANIFEST.json's SHA-256),
                                   settings, recall@k, build time, peak RSS

A key of the index is the row's position in the export: the rows of its
`part-*` files in name order, each file in row order.  The index is tied to the
export through the manifest's SHA-256 (a vocabulary's files' SHA-256): once the
export is replaced, loading it is refused, never silently used.

The build streams the Parquet files in record batches (`iter_batches`), so its
memory is the index itself plus one batch.  It is written to a local temporary
file, then copied to `_index/COLUMN.usearch.tmp` and renamed (on object storage
uploaded: a PUT is atomic), and the metadata goes last: a reader sees the old
index, none, or the new one, and an index whose file does not match its
metadata's SHA-256 is refused.
"""

import contextlib
import dataclasses
import hashlib
import json
import os
import posixpath
import re
import resource
import tempfile
import time
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.errors import ExportConfigError
from pipeline.writing.output import INDEX_DIR, MANIFEST, OutputLock

INDEX_SUFFIX = ".usearch"
METADATA_SUFFIX = ".json"
INSTALL_HINT = "pip install 'embexport[index]'"
# Our metric names -> usearch's; usearch's "l2sq" is the squared Euclidean distance.
METRICS = {"cos": "cos", "l2": "l2sq", "ip": "ip"}
DEFAULT_METRIC = "cos"
# HNSW parameters, chosen on the 1M-vector benchmark (benchmarks/index.py): recall@10 >= 0.95.
DEFAULT_CONNECTIVITY = 32
DEFAULT_EXPANSION_ADD = 128
DEFAULT_EXPANSION_SEARCH = 512
DEFAULT_RECALL_QUERIES = 1000
DEFAULT_RECALL_K = 10
DEFAULT_SEED = 0
# 16k rows of 300 float32 values are about 20 MB.
BATCH_ROWS = 16_384
# Queries scored against a batch at once by the exact scan: 256 x 16k float32 scores are 16 MB.
EXACT_QUERY_CHUNK = 256
# Similarities this close to the k-th exact one count as ties (float32 rounding of the distances).
TIE_TOLERANCE = 1e-5
_COLUMN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.=-]*")


def _analysis_error(message: str) -> Exception:
    # analyze imports this module; importing AnalysisError lazily avoids the cycle.
    from pipeline.analyze import AnalysisError

    return AnalysisError(message)


def usearch_index_class():
    """usearch's `Index` class; raises AnalysisError naming the extra when usearch is not installed."""
    try:
        from usearch.index import Index
    except ImportError:
        raise _analysis_error(
            f"The nearest-neighbour index needs the usearch package: {INSTALL_HINT} (or pass --exact "
            "to scan every row instead)."
        ) from None
    return Index


@dataclasses.dataclass(frozen=True)
class IndexSettings:
    """How to build an index (HNSW parameters, recall measurement)."""

    metric: str = DEFAULT_METRIC
    connectivity: int = DEFAULT_CONNECTIVITY
    expansion_add: int = DEFAULT_EXPANSION_ADD
    expansion_search: int = DEFAULT_EXPANSION_SEARCH
    recall_queries: int = DEFAULT_RECALL_QUERIES
    recall_k: int = DEFAULT_RECALL_K
    seed: int = DEFAULT_SEED
    threads: int = 0  # 0: all cores
    batch_rows: int = BATCH_ROWS

    def check(self) -> "IndexSettings":
        """Returns self; raises AnalysisError for a value that cannot work."""
        if self.metric not in METRICS:
            raise _analysis_error(f"--metric must be one of {', '.join(METRICS)}; received {self.metric!r}.")
        for name, low in (
            ("connectivity", 2),
            ("expansion_add", 1),
            ("expansion_search", 1),
            ("recall_queries", 0),
            ("recall_k", 1),
            ("threads", 0),
            ("batch_rows", 1),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise _analysis_error(f"--{name} must be an integer of at least {low}; received {value!r}.")
        return self


@dataclasses.dataclass(frozen=True)
class VectorBatch:
    """The valid rows of one record batch: their positions in the export and their vectors."""

    positions: np.ndarray  # int64
    vectors: np.ndarray  # (rows, dim) float32
    skipped_null: int
    skipped_non_finite: int


def index_paths(directory: str, column: str) -> tuple[str, str]:
    """(index file, metadata file) of `column`'s index in `directory` (a filesystem path)."""
    if not _COLUMN_NAME.fullmatch(column):
        raise _analysis_error(f"Cannot name an index file after the column {column!r}.")
    base = posixpath.join(directory, INDEX_DIR, column)
    return base + INDEX_SUFFIX, base + METADATA_SUFFIX


def _read_bytes(filesystem: pafs.FileSystem, path: str) -> bytes | None:
    try:
        with filesystem.open_input_stream(path) as handle:
            return handle.read()
    except FileNotFoundError:
        return None
    except OSError as error:
        if filesystem.get_file_info(path).type == pafs.FileType.NotFound:
            return None
        raise _analysis_error(f"Cannot read {path}: {error}") from None


def source_identity(data) -> dict:
    """What ties an index to its data: the manifest's SHA-256, or each vocabulary file's SHA-256.

    Raises:
        AnalysisError: an export directory without `_MANIFEST.json` (unfinished or in flight).
    """
    filesystem, directory = data.filesystem_and_directory()
    if data.holds == "documents":
        manifest = _read_bytes(filesystem, posixpath.join(directory, MANIFEST))
        if manifest is None:
            raise _analysis_error(
                f"{data.location!r} has no {MANIFEST}: the export did not finish (or is still running), "
                "so an index of it could not be tied to it. Index a finished export."
            )
        return {"manifest": MANIFEST, "manifest_sha256": hashlib.sha256(manifest).hexdigest()}
    files = []
    for path in data.dataset.files:
        digest = hashlib.sha256(_read_bytes(filesystem, path) or b"").hexdigest()
        files.append({"file": posixpath.relpath(path, directory), "sha256": digest})
    return {"files": files}


def iter_vector_batches(data, column: str, batch_rows: int = BATCH_ROWS) -> Iterator[VectorBatch]:
    """The export's rows of `column` in position order, one record batch at a time.

    Null vectors and vectors with NaN or infinite values are skipped (and
    counted): they have no place in a ranking.
    """
    from pipeline.analyze import vectors_to_numpy

    filesystem = data.dataset.filesystem
    start = 0
    for path in data.dataset.files:
        with filesystem.open_input_file(path) as handle:
            for batch in pq.ParquetFile(handle).iter_batches(batch_size=batch_rows, columns=[column]):
                array = batch.column(0)
                valid = np.asarray(array.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
                positions = start + np.flatnonzero(valid)
                vectors = vectors_to_numpy(array.filter(pa.array(valid))).astype(np.float32, copy=False)
                finite = np.isfinite(vectors).all(axis=1) if len(vectors) else np.ones(0, dtype=bool)
                start += batch.num_rows
                yield VectorBatch(
                    positions[finite].astype(np.int64),
                    np.ascontiguousarray(vectors[finite]),
                    int((~valid).sum()),
                    int((~finite).sum()),
                )


def row_count(data) -> int:
    """Rows of the export, from the Parquet footers."""
    filesystem = data.dataset.filesystem
    total = 0
    for path in data.dataset.files:
        with filesystem.open_input_file(path) as handle:
            total += pq.ParquetFile(handle).metadata.num_rows
    return total


def scores(metric: str, queries: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """(queries, rows) scores, higher is nearer: cosine similarity, dot product or -squared L2 distance."""
    queries = np.asarray(queries, dtype=np.float32)
    vectors = np.asarray(vectors, dtype=np.float32)
    if metric == "cos":
        # Zero vectors stay zero: similarity 0 to everything, as in the exact scan.
        q_norms = np.linalg.norm(queries, axis=1, keepdims=True)
        v_norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return (queries / np.where(q_norms == 0, 1, q_norms)) @ (
            vectors / np.where(v_norms == 0, 1, v_norms)
        ).T
    if metric == "ip":
        return queries @ vectors.T
    return -(
        (queries**2).sum(axis=1)[:, None] - 2 * (queries @ vectors.T) + (vectors**2).sum(axis=1)[None, :]
    )


def score_from_distance(metric: str, distances: np.ndarray) -> np.ndarray:
    """usearch's distances as `scores`: cos and ip distances are 1 - similarity, l2sq is the squared L2."""
    distances = np.asarray(distances, dtype=np.float64)
    return -distances if metric == "l2" else 1.0 - distances


def exact_top_k(
    data,
    column: str,
    queries: np.ndarray,
    k: int,
    metric: str = DEFAULT_METRIC,
    exclude: np.ndarray | None = None,
    batch_rows: int = BATCH_ROWS,
) -> tuple[np.ndarray, np.ndarray]:
    """The exact `k` nearest rows of each query, streaming the export once (the index's reference).

    Args:
        exclude: per query, a position not to return (the query's own row), or -1.

    Returns:
        `(positions, scores)`, each (queries, k), best first; -1 / -inf where fewer rows exist.
    """
    queries = np.asarray(queries, dtype=np.float32)
    count = len(queries)
    best_positions = np.full((count, k), -1, dtype=np.int64)
    best_scores = np.full((count, k), -np.inf)
    exclude = np.full(count, -1, dtype=np.int64) if exclude is None else np.asarray(exclude, dtype=np.int64)
    for batch in iter_vector_batches(data, column, batch_rows):
        if len(batch.positions) == 0:
            continue
        # Queries in chunks keep the (queries, rows) score matrix small whatever the batch of queries.
        for start in range(0, count, EXACT_QUERY_CHUNK):
            stop = min(start + EXACT_QUERY_CHUNK, count)
            chunk_scores = scores(metric, queries[start:stop], batch.vectors)
            chunk_scores[batch.positions[None, :] == exclude[start:stop, None]] = -np.inf
            if chunk_scores.shape[1] > k:
                chosen = np.argpartition(-chunk_scores, k - 1, axis=1)[:, :k]
            else:
                chosen = np.broadcast_to(np.arange(chunk_scores.shape[1]), chunk_scores.shape)
            merged_scores = np.concatenate(
                [best_scores[start:stop], np.take_along_axis(chunk_scores, chosen, axis=1)], axis=1
            )
            merged_positions = np.concatenate([best_positions[start:stop], batch.positions[chosen]], axis=1)
            # Best first; equal scores by position, so the answer does not depend on the batches.
            order = np.lexsort((merged_positions, -merged_scores), axis=1)[:, :k]
            best_scores[start:stop] = np.take_along_axis(merged_scores, order, axis=1)
            best_positions[start:stop] = np.take_along_axis(merged_positions, order, axis=1)
    best_positions[~np.isfinite(best_scores)] = -1
    return best_positions, best_scores


def recall_at_k(
    found_scores: np.ndarray, exact_scores: np.ndarray, found_positions, exact_positions
) -> float:
    """Mean share of each query's exact top k that the search found; ties with the k-th count as found.

    A found row counts when it is one of the exact top k, or when its score
    equals (to TIE_TOLERANCE) the k-th exact score: rows tied at the boundary are
    equally right answers.
    """
    hits = []
    for found_p, found_s, exact_p, exact_s in zip(
        found_positions, found_scores, exact_positions, exact_scores, strict=True
    ):
        wanted = exact_p[exact_p >= 0]
        if len(wanted) == 0:
            continue
        boundary = exact_s[len(wanted) - 1]
        tolerance = TIE_TOLERANCE * max(1.0, abs(boundary))
        good = set(wanted.tolist())
        right = sum(
            1
            for p, s in zip(found_p, found_s, strict=True)
            if p >= 0 and (p in good or s >= boundary - tolerance)
        )
        hits.append(min(right, len(wanted)) / len(wanted))
    return float(np.mean(hits)) if hits else 1.0


def _raw_search(index, queries: np.ndarray, count: int, threads: int = 0):
    """(keys, distances, counts) of usearch's search, always 2-D (it returns 1-D for one query)."""
    matches = index.search(queries, count, threads=threads)
    keys = np.asarray(matches.keys, dtype=np.int64).reshape(len(queries), -1)
    distances = np.asarray(matches.distances, dtype=np.float64).reshape(len(queries), -1)
    if hasattr(matches, "counts"):
        counts = np.asarray(matches.counts).reshape(-1)
    else:
        counts = np.asarray([len(matches.keys)])
    return keys, distances, counts


def _search_excluding(index, metric: str, queries: np.ndarray, k: int, exclude: np.ndarray, threads: int):
    """usearch search for k neighbours of each query other than its `exclude` position."""
    keys, distances, counts = _raw_search(index, queries, k + 1, threads)
    positions = np.full((len(queries), k), -1, dtype=np.int64)
    found = np.full((len(queries), k), -np.inf)
    for row in range(len(queries)):
        valid = np.arange(keys.shape[1]) < counts[row]
        keep = valid & (keys[row] != exclude[row])
        chosen_keys, chosen = keys[row][keep][:k], score_from_distance(metric, distances[row][keep][:k])
        positions[row, : len(chosen_keys)] = chosen_keys
        found[row, : len(chosen)] = chosen
    return positions, found


def measure_recall(index, data, column: str, settings: IndexSettings, keys: np.ndarray) -> dict:
    """recall@k of `index` against `exact_top_k` on a random sample of the indexed rows as queries.

    Each query is an indexed row's vector and its own row is excluded from both
    answers, so no query finds itself.
    """
    count = min(settings.recall_queries, len(keys))
    if count == 0:
        return {"queries": 0, "k": settings.recall_k, "recall": None}
    rng = np.random.default_rng(settings.seed)
    chosen = np.sort(rng.choice(keys, size=count, replace=False)).astype(np.int64)
    queries = np.asarray(index.get(chosen.astype(np.uint64)), dtype=np.float32).reshape(count, -1)
    k = settings.recall_k
    started = time.perf_counter()
    exact_positions, exact_scores = exact_top_k(
        data, column, queries, k, settings.metric, exclude=chosen, batch_rows=settings.batch_rows
    )
    exact_seconds = time.perf_counter() - started
    started = time.perf_counter()
    found_positions, found_scores = _search_excluding(
        index, settings.metric, queries, k, chosen, settings.threads
    )
    search_seconds = time.perf_counter() - started
    return {
        "queries": count,
        "k": k,
        "recall": recall_at_k(found_scores, exact_scores, found_positions, exact_positions),
        "seed": settings.seed,
        "exact_seconds": round(exact_seconds, 3),
        "index_seconds": round(search_seconds, 3),
    }


def current_rss_bytes() -> int:
    """This process's resident memory now (Linux /proc; 0 where it is not readable)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _sha256_local(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _is_local(filesystem: pafs.FileSystem) -> bool:
    return isinstance(filesystem, pafs.LocalFileSystem)


def _upload(local_path: str, filesystem: pafs.FileSystem, target: str) -> None:
    """Copies a local file to `target`: locally under a temporary name, then renamed into place.

    An object store's PUT is already atomic (readers see the old object or the
    new one), and pyarrow's move and delete there leave directory-marker objects
    (`DIR/`) that the export would take for foreign files, so there it writes
    the target directly.
    """
    temporary = target + ".tmp" if _is_local(filesystem) else target
    with open(local_path, "rb") as source, filesystem.open_output_stream(temporary) as sink:
        for chunk in iter(lambda: source.read(8 << 20), b""):
            sink.write(chunk)
    if temporary != target:
        filesystem.move(temporary, target)


def _write_json(filesystem: pafs.FileSystem, target: str, value: dict) -> None:
    """Writes `value` as JSON to `target`, atomically as `_upload` does."""
    temporary = target + ".tmp" if _is_local(filesystem) else target
    with filesystem.open_output_stream(temporary) as sink:
        sink.write(json.dumps(value, indent=2, ensure_ascii=False).encode("utf-8"))
    if temporary != target:
        filesystem.move(temporary, target)


def _local_lock(data):
    """The export's OutputLock for a local export (no export runs while we write into it), else None."""
    filesystem, directory = data.filesystem_and_directory()
    if data.holds != "documents" or not isinstance(filesystem, pafs.LocalFileSystem):
        return None
    return OutputLock(directory, run_label="index")


def build_index(data, column: str, settings: IndexSettings) -> dict:
    """Builds, measures and writes the index of `column`; returns its metadata as written.

    Raises:
        AnalysisError: bad settings, an unfinished export, a run in progress, no usable rows,
            or the export replaced while the index was built.
    """
    from pipeline.analyze import check_vector_column

    settings = settings.check()
    column = check_vector_column(data, column)
    Index = usearch_index_class()
    filesystem, directory = data.filesystem_and_directory()
    if filesystem.get_file_info(directory).type != pafs.FileType.Directory:
        raise _analysis_error(
            f"{data.location!r} is a file; pass the directory it is in, where the index can live."
        )
    index_paths(directory, column)  # refuses a column name unfit for a file name, before any work
    with contextlib.ExitStack() as stack:
        lock = _local_lock(data)
        if lock is not None:
            try:
                stack.enter_context(lock)
            except ExportConfigError as error:
                raise _analysis_error(f"Cannot index it now: {error}") from None
        try:
            return _build_and_write(data, column, settings, Index, filesystem, directory)
        except (OSError, RuntimeError) as error:
            # A full disk, a lost connection, usearch failing to save: nothing half-written is used.
            raise _analysis_error(f"Could not build or write the index of {column!r}: {error}") from None


def _build_and_write(data, column, settings, Index, filesystem, directory) -> dict:
    """The body of `build_index`, under the export's lock."""
    index_path, metadata_path = index_paths(directory, column)
    identity = source_identity(data)
    # The process's memory before the build (Python, Arrow, Beam): the build's own share is above it.
    start_rss = current_rss_bytes()
    started = time.perf_counter()
    index = None
    added = skipped_null = skipped_non_finite = 0
    all_keys = []
    for batch in iter_vector_batches(data, column, settings.batch_rows):
        skipped_null += batch.skipped_null
        skipped_non_finite += batch.skipped_non_finite
        if len(batch.positions) == 0:
            continue
        if index is None:
            index = Index(
                ndim=batch.vectors.shape[1],
                metric=METRICS[settings.metric],
                dtype="f32",
                connectivity=settings.connectivity,
                expansion_add=settings.expansion_add,
                expansion_search=settings.expansion_search,
            )
        if batch.vectors.shape[1] != index.ndim:
            raise _analysis_error(
                f"The {column!r} vectors have different lengths ({index.ndim} and "
                f"{batch.vectors.shape[1]}); cannot index them together."
            )
        index.add(batch.positions.astype(np.uint64), batch.vectors, threads=settings.threads)
        all_keys.append(batch.positions)
        added += len(batch.positions)
    rows = row_count(data)
    if index is None:
        raise _analysis_error(f"{data.location!r} has no row with a usable {column!r} vector to index.")
    build_seconds = time.perf_counter() - started
    keys = np.concatenate(all_keys)
    del all_keys
    recall = measure_recall(index, data, column, settings, keys)
    del keys
    memory = peak_rss_bytes()
    with tempfile.TemporaryDirectory(prefix="embexport-index-") as scratch:
        local = os.path.join(scratch, column + INDEX_SUFFIX)
        index.save(local)
        size = os.path.getsize(local)
        digest = _sha256_local(local)
        if source_identity(data) != identity:
            raise _analysis_error(
                f"{data.location!r} was replaced while its index was built; nothing was written. "
                "Build the index again."
            )
        metadata = {
            "format": "usearch",
            "usearch_version": _usearch_version(),
            "column": column,
            "holds": data.holds,
            "file": posixpath.join(INDEX_DIR, column + INDEX_SUFFIX),
            "sha256": digest,
            "bytes": size,
            "source": identity,
            "rows": rows,
            "indexed": added,
            "skipped_null": skipped_null,
            "skipped_non_finite": skipped_non_finite,
            "dim": int(index.ndim),
            "metric": settings.metric,
            "connectivity": settings.connectivity,
            "expansion_add": settings.expansion_add,
            "expansion_search": settings.expansion_search,
            "recall": recall,
            "build_seconds": round(build_seconds, 3),
            "peak_rss_bytes": memory,
            "start_rss_bytes": start_rss,
            "parquet_bytes": sum(filesystem.get_file_info(p).size for p in data.dataset.files),
            "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        if _is_local(filesystem):
            filesystem.create_dir(posixpath.join(directory, INDEX_DIR), recursive=True)
            # Old metadata goes first: a reader then sees no index, not old metadata over a new file.
            if filesystem.get_file_info(metadata_path).type == pafs.FileType.File:
                filesystem.delete_file(metadata_path)
        # On object storage the old metadata stays until the new one replaces it; a reader in
        # between finds the new file's SHA-256 differs from it, and refuses the index.
        _upload(local, filesystem, index_path)
    _write_json(filesystem, metadata_path, metadata)
    return metadata


def _usearch_version() -> str:
    import usearch

    return usearch.__version__


@dataclasses.dataclass
class LoadedIndex:
    """An index checked against its export, with the export's keys and details in position order."""

    index: object
    metadata: dict
    keys: pa.Table  # the key column and the detail columns, one row per export row

    @property
    def metric(self) -> str:
        return self.metadata["metric"]

    def search(
        self, queries: np.ndarray, k: int, exclude: list | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(positions, scores), each (queries, k), best first; `exclude[i]` is a set of positions to skip."""
        queries = np.asarray(queries, dtype=np.float32).reshape(len(queries), -1)
        extra = max((len(e) for e in exclude), default=0) if exclude else 0
        keys, distances, counts = _raw_search(self.index, queries, k + extra)
        found = score_from_distance(self.metric, distances)
        found[np.arange(keys.shape[1])[None, :] >= counts[:, None]] = -np.inf
        if extra:
            excluded = np.full((len(queries), extra), -1, dtype=np.int64)
            for row, positions in enumerate(exclude):
                excluded[row, : len(positions)] = sorted(positions)
            found[(keys[:, :, None] == excluded[:, None, :]).any(axis=2)] = -np.inf
        order = np.lexsort((keys, -found), axis=1)[:, :k]
        positions = np.take_along_axis(keys, order, axis=1)
        found = np.take_along_axis(found, order, axis=1)
        positions[~np.isfinite(found)] = -1
        # Equal scores go by key, as the exact scan breaks its ties; only rows with a tie pay for it.
        key_names = self.keys.column(0)
        for row in np.flatnonzero((np.diff(found, axis=1) == 0).any(axis=1)):
            valid = int((positions[row] >= 0).sum())  # the found rows come first
            names = key_names.take(pa.array(positions[row, :valid])).to_pylist()
            ranked = sorted(range(valid), key=lambda i: (-found[row, i], str(names[i])))
            positions[row, :valid], found[row, :valid] = positions[row, ranked], found[row, ranked]
        if positions.shape[1] < k:
            pad = k - positions.shape[1]
            positions = np.pad(positions, ((0, 0), (0, pad)), constant_values=-1)
            found = np.pad(found, ((0, 0), (0, pad)), constant_values=-np.inf)
        return positions, found

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

    def first_positions(self, keys: list[str]) -> list[int]:
        """The first position of each key, -1 for a key no row has."""
        found = pc.index_in(pa.array(keys, pa.string()), value_set=self.keys.column(0))
        return [-1 if p is None else int(p) for p in found.to_pylist()]

    def take(self, positions: np.ndarray) -> pa.Table:
        """The key and detail columns of the rows at `positions`."""
        return self.keys.take(pa.array(np.asarray(positions, dtype=np.int64)))


def read_metadata(data, column: str) -> dict | None:
    """The metadata of `column`'s index, or None when there is none."""
    filesystem, directory = data.filesystem_and_directory()
    if filesystem.get_file_info(directory).type != pafs.FileType.Directory:
        return None
    _, metadata_path = index_paths(directory, column)
    raw = _read_bytes(filesystem, metadata_path)
    if raw is None:
        return None
    try:
        return json.loads(raw.decode("utf-8"))
    except ValueError:
        raise _analysis_error(
            f"{metadata_path} is not valid JSON; rebuild the index with `python -m pipeline.analyze "
            f"{data.location} index --column {column}`, or pass --exact."
        ) from None


def load_index(data, column: str, key_columns: list[str]) -> LoadedIndex | None:
    """`column`'s index of `data` if there is one, checked against the export; None if there is none.

    Raises:
        AnalysisError: the index belongs to an export that has since been
            replaced, its file does not match its recorded SHA-256, or usearch
            is not installed.
    """
    metadata = read_metadata(data, column)
    if metadata is None:
        return None
    rebuild = (
        f"Rebuild it with `python -m pipeline.analyze {data.location} index --column {column}`, "
        "or pass --exact to scan every row."
    )
    current = source_identity(data)
    what, changed = ("export", MANIFEST) if data.holds == "documents" else ("vocabulary", "file's SHA-256")
    if metadata.get("source") != current:
        raise _analysis_error(
            f"The index {metadata.get('file')} of {data.location!r} was built for another version of "
            f"this {what} (its {changed} changed since: it was replaced), so its answers would be "
            f"wrong. {rebuild}"
        )
    Index = usearch_index_class()
    filesystem, directory = data.filesystem_and_directory()
    index_path, _ = index_paths(directory, column)
    with tempfile.TemporaryDirectory(prefix="embexport-index-") as scratch:
        if _is_local(filesystem):
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
            or _sha256_local(local) != metadata.get("sha256")
        )
        if damaged:
            raise _analysis_error(
                f"The index file {index_path} is missing or does not match the SHA-256 in its metadata "
                f"(damaged or partly written). {rebuild}"
            )
        index = Index.restore(local, view=False)
    if index is None or int(index.ndim) != metadata.get("dim"):
        raise _analysis_error(f"The index file {index_path} cannot be read by usearch. {rebuild}")
    # usearch does not store the search-time expansion; the build chose it for the recall it measured.
    index.expansion_search = int(metadata["expansion_search"])
    keys = data.dataset.to_table(columns=key_columns)
    if keys.num_rows != metadata.get("rows"):
        raise _analysis_error(
            f"The index has {metadata.get('rows')} rows, the export {keys.num_rows}. {rebuild}"
        )
    return LoadedIndex(index, metadata, keys)


def format_build(metadata: dict, location: str) -> str:
    """The build's report: rows, recall, time, size, memory."""
    recall = metadata["recall"]
    recall_text = (
        f"recall@{recall['k']} {recall['recall']:.4f} against the exact scan on {recall['queries']} "
        f"random rows as queries (seed {recall['seed']})"
        if recall["recall"] is not None
        else "recall not measured (--recall_queries 0)"
    )
    skipped = metadata["skipped_null"] + metadata["skipped_non_finite"]
    return "\n".join(
        [
            f"Indexed {metadata['indexed']} of {metadata['rows']} rows of {metadata['column']} "
            f"({metadata['dim']} dims, metric {metadata['metric']}) into {location}/{metadata['file']}"
            + (f"; {skipped} rows without a finite vector skipped" if skipped else ""),
            f"  {recall_text}",
            f"  build {metadata['build_seconds']:.1f} s, index {metadata['bytes'] / 2**20:.1f} MiB "
            f"(the Parquet files: {metadata['parquet_bytes'] / 2**20:.1f} MiB), peak RSS "
            f"{metadata['peak_rss_bytes'] / 2**20:.0f} MiB ({metadata['start_rss_bytes'] / 2**20:.0f} MiB "
            "before the build)",
            f"  HNSW connectivity {metadata['connectivity']}, expansion_add {metadata['expansion_add']}, "
            f"expansion_search {metadata['expansion_search']}; sha256 {metadata['sha256']}",
        ]
    )
