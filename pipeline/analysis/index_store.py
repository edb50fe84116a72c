"""Where a column's index lives next to its export, what ties it to the export, and its metadata.

Layout, next to the export it indexes::

    OUTPUT/_index/COLUMN.usearch   the usearch HNSW graph and the vectors (float32)
    OUTPUT/_index/COLUMN.json      written last: SHA-256 and size of the index file, the
                                   export's identity (its _MANIFEST.json's SHA-256),
                                   settings, recall@k, build time, peak RSS

A key of the index is the row's position in the export: the rows of its
`part-*` files in name order, each file in row order.  The index is tied to the
export through the manifest's SHA-256 and its row files' names, sizes and
modification times (a vocabulary's files' SHA-256): once the export is replaced
or a row file rewritten, loading it is refused, never silently used.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
from typing import TYPE_CHECKING, NotRequired, TypedDict

import pyarrow.fs as pafs

from pipeline.analysis.dataset import AnalysisError, FileStamp, VectorDataset, row_file_stamps
from pipeline.writing.layout import INDEX_DIR, MANIFEST

if TYPE_CHECKING:
    from usearch.index import Index

INDEX_SUFFIX = ".usearch"
METADATA_SUFFIX = ".json"
INSTALL_HINT = "pip install 'embexport[index]'"
_COLUMN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.=-]*")


class FileDigest(TypedDict):
    """One file of a vocabulary and its SHA-256."""

    file: str
    sha256: str


class SourceIdentity(TypedDict, total=False):
    """What ties an index to its data: an export's manifest digest, or a vocabulary's file digests."""

    manifest: str
    manifest_sha256: str
    row_files: list[FileStamp]
    files: list[FileDigest]


class RecallReport(TypedDict):
    """recall@k of an index against the exact scan, as `measure_recall` measured it at build."""

    queries: int
    k: int
    recall: float | None
    seed: NotRequired[int]
    exact_seconds: NotRequired[float]
    index_seconds: NotRequired[float]
    unmeasured: NotRequired[str]  # why recall is None other than --recall_queries 0


class IndexMetadata(TypedDict):
    """The `COLUMN.json` written next to an index: what it indexes, how, and how well."""

    format: str
    usearch_version: str
    column: str
    holds: str
    file: str
    sha256: str
    bytes: int
    source: SourceIdentity
    rows: int
    indexed: int
    skipped_null: int  # null vectors and null keys (`skipped_no_key` of them)
    skipped_non_finite: int
    skipped_no_key: NotRequired[int]
    dim: int
    metric: str
    connectivity: int
    expansion_add: int
    expansion_search: int
    recall: RecallReport
    build_seconds: float
    peak_rss_bytes: int
    start_rss_bytes: int
    parquet_bytes: int
    built: str


# What loading and using an index reads of its metadata, and the type each must have.
REQUIRED_METADATA: dict[str, type | tuple[type, ...]] = {
    "format": str,
    "column": str,
    "file": str,
    "sha256": str,
    "bytes": int,
    "source": dict,
    "rows": int,
    "indexed": int,
    "dim": int,
    "metric": str,
    "expansion_search": int,
    "recall": dict,
}
METRIC_NAMES = ("cos", "ip", "l2")


def _metadata_problem(metadata: object) -> str | None:
    """What makes a JSON value not an index's metadata (a list, a key missing or of another type), or None."""
    if not isinstance(metadata, dict):
        return f"it holds a JSON {type(metadata).__name__}, not an object"
    missing = sorted(REQUIRED_METADATA.keys() - metadata.keys())
    if missing:
        return f"it lacks {', '.join(missing)}"
    wrong = sorted(
        key
        for key, kind in REQUIRED_METADATA.items()
        if not isinstance(metadata[key], kind) or (kind is int and isinstance(metadata[key], bool))
    )
    if wrong:
        return f"its {', '.join(wrong)} have the wrong type"
    if metadata["metric"] not in METRIC_NAMES:
        return f"its metric {metadata['metric']!r} is not one of {', '.join(METRIC_NAMES)}"
    return None


def usearch_index_class() -> type[Index]:
    """usearch's `Index` class; raises AnalysisError naming the extra when usearch is not installed."""
    try:
        from usearch.index import Index
    except ImportError:
        raise AnalysisError(
            f"The nearest-neighbour index needs the usearch package: {INSTALL_HINT} (or pass --exact "
            "to scan every row instead)."
        ) from None
    return Index


def can_be_indexed(column: str) -> bool:
    """Whether an index file can be named after `column` (so whether it can have an index)."""
    return bool(_COLUMN_NAME.fullmatch(column))


def index_paths(directory: str, column: str) -> tuple[str, str]:
    """(index file, metadata file) of `column`'s index in `directory` (a filesystem path)."""
    if not can_be_indexed(column):
        raise AnalysisError(
            f"Cannot name an index file after the column {column!r}: index files are named after their "
            "column, which must be ASCII letters, digits, '_', '.', '=' and '-' (not starting with '.', "
            "'=' or '-'). Rename the column to index it; `neighbors`, `knn-score` and `plot` read it as "
            "it is, without an index."
        )
    base = posixpath.join(directory, INDEX_DIR, column)
    return base + INDEX_SUFFIX, base + METADATA_SUFFIX


def read_bytes(filesystem: pafs.FileSystem, path: str) -> bytes | None:
    """The bytes of the file at `path`, or None when there is none."""
    try:
        with filesystem.open_input_stream(path) as handle:
            return handle.read()
    except FileNotFoundError:
        return None
    except OSError as error:
        if filesystem.get_file_info(path).type == pafs.FileType.NotFound:
            return None
        raise AnalysisError(f"Cannot read {path}: {error}") from None


def source_identity(data: VectorDataset) -> SourceIdentity:
    """What ties an index to its data: the manifest's SHA-256 and each row file's size and modification
    time, or each vocabulary file's SHA-256.

    Raises:
        AnalysisError: an export directory without `_MANIFEST.json` (unfinished or in flight).
    """
    filesystem, directory = data.filesystem_and_directory()
    if data.holds == "documents":
        manifest = read_bytes(filesystem, posixpath.join(directory, MANIFEST))
        if manifest is None:
            raise AnalysisError(
                f"{data.location!r} has no {MANIFEST}: the export did not finish (or is still running), "
                "so an index of it could not be tied to it. Index a finished export."
            )
        return {
            "manifest": MANIFEST,
            "manifest_sha256": hashlib.sha256(manifest).hexdigest(),
            # A row file rewritten in place leaves the manifest as it was; its size or time changes.
            "row_files": row_file_stamps(filesystem, data.dataset.files),
        }
    files: list[FileDigest] = []
    for path in data.dataset.files:
        digest = hashlib.sha256(read_bytes(filesystem, path) or b"").hexdigest()
        files.append({"file": posixpath.relpath(path, directory), "sha256": digest})
    return {"files": files}


def is_local(filesystem: pafs.FileSystem) -> bool:
    """Whether `filesystem` is the local disk (not object storage)."""
    return isinstance(filesystem, pafs.LocalFileSystem)


def read_metadata(data: VectorDataset, column: str) -> IndexMetadata | None:
    """The metadata of `column`'s index, or None when there is none."""
    filesystem, directory = data.filesystem_and_directory()
    if not can_be_indexed(column) or filesystem.get_file_info(directory).type != pafs.FileType.Directory:
        # A column no index file can be named after has none (`index` refuses to build one).
        return None
    _, metadata_path = index_paths(directory, column)
    raw = read_bytes(filesystem, metadata_path)
    if raw is None:
        return None
    rebuild = (
        f"rebuild the index with `python -m pipeline.analyze {data.location} index --column {column}`, "
        "or pass --exact."
    )
    try:
        metadata = json.loads(raw.decode("utf-8"))
    except ValueError:
        raise AnalysisError(f"{metadata_path} is not valid JSON; {rebuild}") from None
    # Valid JSON is not yet an index's metadata: `[]`, or an object without the keys loading reads.
    problem = _metadata_problem(metadata)
    if problem:
        raise AnalysisError(f"{metadata_path} is not an index's metadata ({problem}); {rebuild}")
    checked: IndexMetadata = metadata
    return checked
