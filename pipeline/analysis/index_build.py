"""Building a column's index: stream the vectors into usearch, measure recall@k, write it next to the export.

The build streams the Parquet files in record batches, so its memory is the
index itself plus one batch.  It is written to a local temporary file, then
copied to `_index/COLUMN.usearch.tmp` and renamed (on object storage uploaded:
a PUT is atomic).  Its metadata is written first as `COLUMN.json.tmp` and
last as `COLUMN.json` (locally renamed into place; on object storage uploaded,
then the `.tmp` deleted), so whatever the build leaves, killed or out of space,
is named by metadata of ours; nothing is written through a symbolic link.  A reader sees the old index,
none, or the new one, and an index whose file does not match its metadata's
SHA-256 is refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import posixpath
import resource
import time
import uuid
from typing import TYPE_CHECKING

import numpy as np
import pyarrow.fs as pafs

from models.digest import sha256_file
from pipeline.analysis.dataset import (
    BATCH_ROWS,
    DEFAULT_SEED,
    AnalysisError,
    VectorDataset,
    check_vector_column,
    token_table_count,
)
from pipeline.analysis.exact import (
    DEFAULT_METRIC,
    exact_top_k,
    iter_vector_batches,
    recall_at_k,
    row_count,
    score_scales,
)
from pipeline.analysis.index_search import search_index
from pipeline.analysis.index_store import (
    INDEX_SUFFIX,
    IndexMetadata,
    RecallReport,
    index_paths,
    is_local,
    read_bytes,
    source_identity,
    usearch_index_class,
)
from pipeline.errors import ExportConfigError, OutputWriteError
from pipeline.scratch import held_scratch_directory
from pipeline.writing.files import fsync_directory
from pipeline.writing.layout import ASIDE_HEX_DIGITS, INDEX_DIR, TABLES_DIR, index_files
from pipeline.writing.lock import OutputLock

if TYPE_CHECKING:
    from usearch.index import Index

# Our metric names -> usearch's; usearch's "l2sq" is the squared Euclidean distance.
METRICS = {"cos": "cos", "l2": "l2sq", "ip": "ip"}
# HNSW parameters, chosen on the 1M-vector benchmark (benchmarks/index.py): recall@10 >= 0.95.
DEFAULT_CONNECTIVITY = 32
DEFAULT_EXPANSION_ADD = 128
DEFAULT_EXPANSION_SEARCH = 512
DEFAULT_RECALL_QUERIES = 1000
DEFAULT_RECALL_K = 10
# Upper bounds: beyond them usearch allocates per node or per thread until memory runs out.
MAX_CONNECTIVITY = 1024
MAX_EXPANSION = 65_536
MAX_THREADS = 1024


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

    def check(self) -> IndexSettings:
        """Returns self; raises AnalysisError for a value that cannot work."""
        if self.metric not in METRICS:
            raise AnalysisError(f"--metric must be one of {', '.join(METRICS)}; received {self.metric!r}.")
        for name, low, high in (
            ("connectivity", 2, MAX_CONNECTIVITY),
            ("expansion_add", 1, MAX_EXPANSION),
            ("expansion_search", 1, MAX_EXPANSION),
            ("recall_queries", 0, None),
            ("recall_k", 1, None),
            ("seed", 0, None),
            ("threads", 0, MAX_THREADS),
            ("batch_rows", 1, None),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise AnalysisError(f"--{name} must be an integer of at least {low}; received {value!r}.")
            if high is not None and value > high:
                raise AnalysisError(f"--{name} must be at most {high}; received {value}.")
        return self


def _search_excluding(
    index: Index, metric: str, queries: np.ndarray, k: int, exclude: np.ndarray, threads: int
) -> tuple[np.ndarray, np.ndarray]:
    """The index's k neighbours of each query other than its `exclude` position, searched as
    `neighbors` searches (`search_index`), so the recall measured is that of its answers."""
    # A tie cache: the recall's queries of one duplicated vector scan a tie too long for a search once.
    return search_index(index, metric, queries, k, [{int(e)} for e in exclude], threads=threads, tie_cache={})


def measure_recall(
    index: Index, data: VectorDataset, column: str, settings: IndexSettings, keys: np.ndarray
) -> RecallReport:
    """recall@k of `index` against `exact_top_k` on a random sample of the indexed rows as queries.

    Each query is an indexed row's vector and its own row is excluded from both
    answers, so no query finds itself.
    """
    count = min(settings.recall_queries, len(keys))
    # A query's own row is excluded, so at most len(keys) - 1 neighbours exist.
    k = max(1, min(settings.recall_k, len(keys) - 1))
    if count == 0:
        return {"queries": 0, "k": k, "recall": None}
    if len(keys) < 2:
        # One row: no query has a neighbour to find, so nothing can be measured (not a recall of 1).
        return {"queries": 0, "k": k, "recall": None, "unmeasured": "one row: no neighbours to find"}
    rng = np.random.default_rng(settings.seed)
    chosen = np.sort(rng.choice(keys, size=count, replace=False)).astype(np.int64)
    queries = np.asarray(index.get(chosen.astype(np.uint64)), dtype=np.float32).reshape(count, -1)
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
        "recall": recall_at_k(
            found_scores,
            exact_scores,
            found_positions,
            exact_positions,
            score_scales(settings.metric, queries),
        ),
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


def _upload(local_path: str, filesystem: pafs.FileSystem, target: str) -> None:
    """Copies a local file to `target`: locally under a temporary name, then renamed into place.

    An object store's PUT is already atomic (readers see the old object or the
    new one), and pyarrow's move and delete there leave directory-marker objects
    (`DIR/`) that the export would take for foreign files, so there it writes
    the target directly.
    """
    temporary = target + ".tmp" if is_local(filesystem) else target
    try:
        with open(local_path, "rb") as source, filesystem.open_output_stream(temporary) as sink:
            for chunk in iter(lambda: source.read(8 << 20), b""):
                sink.write(chunk)
    except BaseException:
        if temporary != target:
            # A copy cut short (a full disk) is of no use, and may be gigabytes of the disk it filled.
            with contextlib.suppress(OSError):
                filesystem.delete_file(temporary)
        raise
    if temporary != target:
        _flush_to_disk(temporary)
        filesystem.move(temporary, target)


def _flush_to_disk(path: str) -> None:
    """Flushes the local file `path` to disk before it is renamed into place: after a power loss the
    name must not lead to an empty file (an empty `COLUMN.json` names nothing, so the export would
    look foreign to `--overwrite`), as the export's own commit flushes its files."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _metadata_bytes(value: IndexMetadata) -> bytes:
    return json.dumps(value, indent=2, ensure_ascii=False).encode("utf-8")


def _write_bytes(filesystem: pafs.FileSystem, target: str, data: bytes) -> None:
    """Writes `data` to `target` as it is (locally not atomic: callers write a .tmp name and move it)."""
    with filesystem.open_output_stream(target) as sink:
        sink.write(data)


# An index's metadata is a few KiB (a vocabulary's lists a digest per file): a larger file is not one.
MAX_METADATA_BYTES = 16 << 20


def check_replaceable(filesystem: pafs.FileSystem, directory: str, column: str) -> None:
    """Refuses a build that would replace a file under `_index/` that no index build of ours wrote.

    The build writes `COLUMN.json`, `COLUMN.usearch` and their `.tmp` names; each one
    there must be named by metadata of ours (`layout.index_files` of `COLUMN.json` or
    `COLUMN.json.tmp`, judged by content, as an `--overwrite` judges them): a user's own
    index or notes under those names are theirs, never deleted or replaced.

    Raises:
        AnalysisError: naming the file, before anything is written.
    """
    index_path, metadata_path = index_paths(directory, column)
    relative = {
        path: posixpath.join(INDEX_DIR, posixpath.basename(path)) for path in (index_path, metadata_path)
    }
    owned: set[str] = set()
    for path in (metadata_path, metadata_path + ".tmp"):
        info = filesystem.get_file_info(path)
        if info.type != pafs.FileType.File or (info.size or 0) > MAX_METADATA_BYTES:
            continue
        try:
            metadata = json.loads((read_bytes(filesystem, path) or b"").decode("utf-8"))
        except ValueError:  # Not JSON or not UTF-8: nothing shows it is ours.
            continue
        suffix = ".tmp" if path.endswith(".tmp") else ""
        owned |= index_files(relative[metadata_path] + suffix, metadata)
    for path, name in _written_paths(directory, column):
        if filesystem.get_file_info(name).type == pafs.FileType.NotFound:
            continue
        mine = relative[path] + name[len(path) :]
        if mine not in owned:
            raise AnalysisError(
                f"{name} is not an index this command built (no index metadata of ours names it), so "
                f"building the index of {column!r} would replace it: move it out of {INDEX_DIR}/ "
                "(or rename it), then build again. Nothing was written."
            )


def _written_paths(directory: str, column: str) -> list[tuple[str, str]]:
    """The files an index build of `column` writes or replaces, each as (its final path, the path):
    the metadata and the index, and the `.tmp` name of each."""
    index_path, metadata_path = index_paths(directory, column)
    return [(path, name) for path in (metadata_path, index_path) for name in (path, path + ".tmp")]


def check_one_token_table(location: str) -> None:
    """Refuses to index the token tables of an export that holds several: a table's index is the
    export's `_index/vector.*`, one name for one table (`neighbors --word` looks there).

    Raises:
        AnalysisError: saying so, and that `neighbors --word` on a table file scans it.
    """
    tables = token_table_count(location)
    if tables > 1:
        raise AnalysisError(
            f"{location!r} holds {tables} token tables ({TABLES_DIR}/), and a table's index is the "
            f"export's {INDEX_DIR}/vector.*, which has room for one: none of them can be indexed. "
            f"`neighbors --word WORD` on a table file ({location}/{TABLES_DIR}/LAYER.parquet) scans "
            "it without an index."
        )


def _write_new_file(filesystem: pafs.FileSystem, target: str, data: bytes) -> None:
    """Writes `data` to the local `target` whole or not at all: aside under a name of its own, then
    renamed over it. A write cut short (a full disk) leaves `target` as it was (an earlier build's
    metadata naming the files it left), never an empty or half file that names nothing: a file under
    `_index/` that no metadata of ours names is a user's, for which `--overwrite` refuses the export."""
    aside = f"{target}.{uuid.uuid4().hex[:ASIDE_HEX_DIGITS]}"
    try:
        _write_bytes(filesystem, aside, data)
        # A stop signal (Ctrl-C, SIGTERM) while the disk takes it in leaves nothing either.
        _flush_to_disk(aside)
        filesystem.move(aside, target)
    except BaseException:
        with contextlib.suppress(OSError):
            filesystem.delete_file(aside)
        raise


def _refuse_links(directory: str, column: str) -> None:
    """Refuses a local `_index` or index file of `column` that is a symbolic link: the build would write
    or delete where it points, outside the export (an export never writes through a link either).

    Raises:
        AnalysisError: naming the link.
    """
    written = [name for _, name in _written_paths(directory, column)]
    for path in [posixpath.join(directory, INDEX_DIR), *written]:
        if os.path.islink(path):
            raise AnalysisError(
                f"{path} is a symbolic link (to {os.readlink(path)!r}); an index build never writes or "
                "deletes through one. Remove the link, then build the index again."
            )


def _local_lock(data: VectorDataset) -> OutputLock | None:
    """The directory's OutputLock where it is local (no export, nor another index build, runs while
    we write into it; a vocabulary's directory too), else None."""
    filesystem, directory = data.filesystem_and_directory()
    if not isinstance(filesystem, pafs.LocalFileSystem):
        return None
    return OutputLock(directory, run_label="index")


def build_index(data: VectorDataset, column: str | None, settings: IndexSettings) -> IndexMetadata:
    """Builds, measures and writes the index of `column`; returns its metadata as written.

    Raises:
        AnalysisError: bad settings, an unfinished export, a run in progress, no usable rows,
            or the export replaced while the index was built.
    """
    settings = settings.check()
    column = check_vector_column(data, column)
    index_class = usearch_index_class()
    filesystem, directory = data.filesystem_and_directory()
    if filesystem.get_file_info(directory).type != pafs.FileType.Directory:
        parent = posixpath.dirname(data.location.rstrip("/")) or "."
        if posixpath.basename(parent) == TABLES_DIR:
            # A token table: its index lives with the export, where `neighbors --word` looks for it.
            parent = posixpath.dirname(parent) or "."
            check_one_token_table(parent)
        raise AnalysisError(
            f"{data.location!r} is a file; pass the directory it is in, where the index can live: {parent}"
        )
    index_paths(directory, column)  # refuses a column name unfit for a file name, before any work
    with contextlib.ExitStack() as stack:
        lock = _local_lock(data)
        if lock is not None:
            try:
                stack.enter_context(lock)
            except ExportConfigError as error:
                raise AnalysisError(f"Cannot index it now: {error}") from None
            except OutputWriteError:  # The lock's own few bytes found the disk full.
                raise AnalysisError(
                    f"Cannot index {data.location!r}: its disk is full (no space left to write its lock "
                    f"{lock.path}); nothing was written. Free space there, then build the index again."
                ) from None
            _refuse_links(directory, column)
        try:
            return _build_and_write(data, column, settings, index_class, filesystem, directory)
        except AnalysisError:
            raise
        except (OSError, RuntimeError, ValueError, MemoryError) as error:
            # A full disk, a lost connection, usearch failing to save or to allocate ("Out of memory!"
            # is its ValueError): nothing half-written is used.
            raise AnalysisError(f"Could not build or write the index of {column!r}: {error}") from None


def _build_and_write(
    data: VectorDataset,
    column: str,
    settings: IndexSettings,
    index_class: type[Index],
    filesystem: pafs.FileSystem,
    directory: str,
) -> IndexMetadata:
    """The body of `build_index`, under the export's lock."""
    index_path, metadata_path = index_paths(directory, column)
    # Before any work: what the build would replace must be ours (checked again before writing).
    check_replaceable(filesystem, directory, column)
    identity = source_identity(data)
    # The process's memory before the build (Python, Arrow, Beam): the build's own share is above it.
    start_rss = current_rss_bytes()
    started = time.perf_counter()
    index = None
    added = skipped_null = skipped_non_finite = skipped_no_key = 0
    all_keys: list[np.ndarray] = []
    # Rows of a vector an earlier row has (duplicate documents, zero vectors) go in after every other:
    # inserted among them, hundreds of one vector fill each other's links, and the other rows' searches
    # miss their true neighbours (recall@10 0.41 for the others beside 4,500 duplicates; 1.0 so).
    repeated = _repeated_positions(data, column, settings.batch_rows)
    for batch in iter_vector_batches(data, column, settings.batch_rows):
        skipped_null += batch.skipped_null
        skipped_non_finite += batch.skipped_non_finite
        skipped_no_key += batch.skipped_no_key
        if len(batch.positions) == 0:
            continue
        if index is None:
            index = index_class(
                ndim=batch.vectors.shape[1],
                metric=METRICS[settings.metric],
                dtype="f32",
                connectivity=settings.connectivity,
                expansion_add=settings.expansion_add,
                expansion_search=settings.expansion_search,
            )
        if batch.vectors.shape[1] != index.ndim:
            raise AnalysisError(
                f"The {column!r} vectors have different lengths ({index.ndim} and "
                f"{batch.vectors.shape[1]}); cannot index them together."
            )
        first = ~_is_in_sorted(batch.positions, repeated)
        if first.any():
            index.add(
                batch.positions[first].astype(np.uint64), batch.vectors[first], threads=settings.threads
            )
        all_keys.append(batch.positions)
        added += len(batch.positions)
    if index is not None and len(repeated):
        for batch in iter_vector_batches(data, column, settings.batch_rows):
            again = _is_in_sorted(batch.positions, repeated)
            if again.any():
                positions = batch.positions[again].astype(np.uint64)
                index.add(positions, batch.vectors[again], threads=settings.threads)
    rows = row_count(data)
    if index is None:
        raise AnalysisError(f"{data.location!r} has no row with a usable {column!r} vector to index.")
    build_seconds = time.perf_counter() - started
    keys = np.concatenate(all_keys)
    del all_keys
    recall = measure_recall(index, data, column, settings, keys)
    del keys
    memory = peak_rss_bytes()
    with held_scratch_directory("embexport-index-") as scratch:
        local = os.path.join(scratch, column + INDEX_SUFFIX)
        index.save(local)
        size = os.path.getsize(local)
        digest = sha256_file(local)
        if source_identity(data) != identity:
            raise AnalysisError(
                f"{data.location!r} was replaced while its index was built; nothing was written. "
                "Build the index again."
            )
        # Object storage has no lock: a file put there while the index was built is refused too.
        check_replaceable(filesystem, directory, column)
        metadata: IndexMetadata = {
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
            "skipped_no_key": skipped_no_key,
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
        # The new metadata is written first, as COLUMN.json.tmp: wherever the build dies from here,
        # the files it leaves are named by metadata of ours, and an export's --overwrite may
        # replace them (only files that metadata names are ours under _index/; layout.index_files).
        staged_metadata = metadata_path + ".tmp"
        if not is_local(filesystem):
            # A PUT is atomic. The old metadata stays until the new one replaces it; a reader in
            # between finds the new file's SHA-256 differs from it, and refuses the index.
            _write_bytes(filesystem, staged_metadata, _metadata_bytes(metadata))
            _upload(local, filesystem, index_path)
            _write_bytes(filesystem, metadata_path, _metadata_bytes(metadata))
            with contextlib.suppress(OSError):  # The index is in place; a .tmp left is named by itself.
                filesystem.delete_file(staged_metadata)
            return metadata
        filesystem.create_dir(posixpath.join(directory, INDEX_DIR), recursive=True)
        _write_new_file(filesystem, staged_metadata, _metadata_bytes(metadata))
        # Old metadata goes next: a reader then sees no index, not old metadata over a new file.
        if filesystem.get_file_info(metadata_path).type == pafs.FileType.File:
            filesystem.delete_file(metadata_path)
        _upload(local, filesystem, index_path)
    filesystem.move(staged_metadata, metadata_path)
    fsync_directory(posixpath.join(directory, INDEX_DIR))  # The renames, before the command says done.
    return metadata


def _row_hashes(vectors: np.ndarray) -> np.ndarray:
    """A 64-bit hash of each row's float32 bits: rows of one vector hash alike (two other rows rarely do,
    and then only the order they are inserted in changes)."""
    words = np.ascontiguousarray(vectors, dtype=np.float32).view(np.uint32).astype(np.uint64)
    multipliers = (
        np.arange(1, words.shape[1] + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    ) | np.uint64(1)
    with np.errstate(over="ignore"):
        return (words * multipliers[None, :]).sum(axis=1, dtype=np.uint64)


def _repeated_positions(data: VectorDataset, column: str, batch_rows: int) -> np.ndarray:
    """The positions (sorted) of the usable rows whose vector an earlier row has, in one streaming pass."""
    positions: list[np.ndarray] = []
    hashes: list[np.ndarray] = []
    for batch in iter_vector_batches(data, column, batch_rows):
        if len(batch.positions):
            positions.append(batch.positions)
            hashes.append(_row_hashes(batch.vectors))
    if not positions:
        return np.empty(0, dtype=np.int64)
    every = np.concatenate(positions)
    _, first = np.unique(np.concatenate(hashes), return_index=True)
    return np.setdiff1d(every, every[first])


def _is_in_sorted(positions: np.ndarray, sorted_positions: np.ndarray) -> np.ndarray:
    """Whether each of `positions` is in `sorted_positions` (sorted ascending)."""
    if len(sorted_positions) == 0:
        return np.zeros(len(positions), dtype=bool)
    at = np.minimum(np.searchsorted(sorted_positions, positions), len(sorted_positions) - 1)
    return np.asarray(sorted_positions[at] == positions, dtype=bool)


def _usearch_version() -> str:
    import usearch

    return usearch.__version__


def format_build(metadata: IndexMetadata, location: str) -> str:
    """The build's report: rows, recall, time, size, memory."""
    recall = metadata["recall"]
    recall_text = (
        f"recall@{recall['k']} {recall['recall']:.4f} against the exact scan on {recall['queries']} "
        f"random rows as queries (seed {recall['seed']})"
        if recall["recall"] is not None
        else f"recall not measured ({recall.get('unmeasured', '--recall_queries 0')})"
    )
    # A vocabulary's rows past its tokenizer have a finite vector but no token: said apart.
    no_key = metadata.get("skipped_no_key", 0)
    without_vector = metadata["skipped_null"] - no_key + metadata["skipped_non_finite"]
    skipped = "; ".join(
        [
            *([f"{no_key} rows without a token (past the tokenizer's vocabulary)"] if no_key else []),
            *([f"{without_vector} rows without a finite vector"] if without_vector else []),
        ]
    )
    return "\n".join(
        [
            f"Indexed {metadata['indexed']} of {metadata['rows']} rows of {metadata['column']} "
            f"({metadata['dim']} dims, metric {metadata['metric']}) into {location}/{metadata['file']}"
            + (f"; skipped: {skipped}" if skipped else ""),
            f"  {recall_text}",
            f"  build {metadata['build_seconds']:.1f} s, index {metadata['bytes'] / 2**20:.1f} MiB "
            f"(the Parquet files: {metadata['parquet_bytes'] / 2**20:.1f} MiB), peak RSS "
            f"{metadata['peak_rss_bytes'] / 2**20:.0f} MiB ({metadata['start_rss_bytes'] / 2**20:.0f} MiB "
            "before the build)",
            f"  HNSW connectivity {metadata['connectivity']}, expansion_add {metadata['expansion_add']}, "
            f"expansion_search {metadata['expansion_search']}; sha256 {metadata['sha256']}",
        ]
    )
