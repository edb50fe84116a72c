"""A run's staging directory, `OUTPUT/_staging/RUN_ID/`: where its files go, what it holds, its removal.

A run writes its rows under `data/`, its dead letters under `errors/` and its
token tables under `_tables/` there; the commit (`pipeline.writing.commit`)
moves them into the output.  Readers never see the staging area (its name
starts with "_").
"""

import os
import posixpath
import shutil
import sys
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import TypedDict

import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from pipeline.errors import ExportConfigError
from pipeline.uris import is_local
from pipeline.writing.files import delete_files, iter_entries, join, list_files
from pipeline.writing.layout import ERRORS_DIR, SHARD_PREFIX, STAGING, TABLES_DIR

# What `sys.exc_info()` returns, as `shutil.rmtree` hands it to its error handler.
ExcInfo = tuple[type[BaseException], BaseException, TracebackType]


class StagedShards(TypedDict):
    """A run's staged files by role, each as (path, rows), sorted by path."""

    rows: list[tuple[str, int]]
    errors: list[tuple[str, int]]
    tables: list[tuple[str, int]]


def staging_runs(directory: str) -> list[str]:
    """The run ids that have a staging directory (locally, an empty one too)."""
    staging = join(directory, STAGING)
    if is_local(directory):
        return sorted(os.listdir(staging)) if os.path.isdir(staging) else []
    prefix = staging.rstrip("/") + "/"
    return sorted({p[len(prefix) :].split("/", 1)[0] for p in list_files(staging) if p.startswith(prefix)})


def _remove_tree(directory: str) -> None:
    """Deletes the files under `directory` and, locally, the emptied directories; never through a link."""
    if is_local(directory):
        if os.path.islink(directory):
            raise ExportConfigError(f"{directory!r} is a symbolic link; an export never deletes through one.")
        if not os.path.isdir(directory):
            return
        links = [relative for relative, kind in iter_entries(directory) if kind == "link"]
        if links:
            raise ExportConfigError(
                f"{directory!r} holds a symbolic link ({links[0]!r}); an export never deletes through one."
            )
        # Python 3.12 renamed the error handler (`onerror` is deprecated there).
        if sys.version_info >= (3, 12):
            shutil.rmtree(directory, onexc=_raise_naming_the_path)
        else:
            shutil.rmtree(directory, onerror=_raise_naming_the_path)
        return
    delete_files(list_files(directory))


def _raise_naming_the_path(
    function: Callable[..., object], path: str, failure: BaseException | ExcInfo
) -> None:
    """`shutil.rmtree`'s error handler: its OSError names the entry alone (`_RUN.json`), this the path.

    `failure` is the exception (`onexc`, Python 3.12) or `sys.exc_info()` (`onerror`).
    """
    error = failure[1] if isinstance(failure, tuple) else failure
    if isinstance(error, OSError) and error.errno is not None:
        raise OSError(error.errno, error.strerror, path) from error
    raise error


def remove_staging(directory: str, run_id: str | None = None) -> None:
    """Deletes one run's staging directory, or (`run_id` None) the whole staging area."""
    staging = join(directory, STAGING)
    _remove_tree(join(staging, run_id) if run_id else staging)
    if run_id and is_local(staging) and os.path.isdir(staging) and not os.listdir(staging):
        os.rmdir(staging)


def staging_prefixes(directory: str, run_id: str) -> tuple[str, str]:
    """(rows prefix, dead-letters prefix) for a run's shards."""
    staging = join(directory, STAGING, run_id)
    return join(staging, "data", "part"), join(staging, ERRORS_DIR, "part")


def staging_tables_dir(directory: str, run_id: str) -> str:
    """Where a run stages its token tables (`--token_storage ids`) until the commit."""
    return join(directory, STAGING, run_id, TABLES_DIR)


def staged_bytes(directory: str, run_id: str | None = None) -> int:
    """How many bytes one run's staging directory (or the whole staging area) holds."""
    root = join(directory, STAGING, run_id) if run_id else join(directory, STAGING)
    if is_local(root):
        return sum(
            os.lstat(os.path.join(root, relative)).st_size
            for relative, kind in iter_entries(root)
            if kind == "file"
        )
    try:
        return sum(m.size_in_bytes for m in FileSystems.match([join(root, "**")])[0].metadata_list)
    except Exception:  # Nothing staged.
        return 0


def holds_durable_rows(directory: str, run_id: str) -> bool:
    """Whether the run's staging directory holds a complete row file (its Parquet footer written).

    What a rerun would continue from: a file cut by a full disk or a kill has no
    footer, and dead letters and the run's own records are never kept.
    """
    try:
        paths = list_files(posixpath.dirname(staging_prefixes(directory, run_id)[0]))
    except Exception:  # Nothing staged, or the store cannot be listed: nothing to promise.
        return False
    for path in paths:
        if not path.endswith(".parquet"):
            continue
        try:
            with FileSystems.open(path) as handle:
                pq.ParquetFile(handle)
        except Exception:  # No footer: a file its writer never closed.
            continue
        return True
    return False


def _row_count(path: str) -> int:
    with FileSystems.open(path) as handle:
        return pq.ParquetFile(handle).metadata.num_rows


def staged_shards(directory: str, run_id: str) -> StagedShards:
    """The run's staged shards with their row counts, read once from the Parquet footers."""
    paths = sorted(list_files(join(directory, STAGING, run_id)))
    shards: dict[str, list[tuple[str, int]]] = {}
    for role, folder in (("rows", "data"), ("errors", ERRORS_DIR)):
        prefix = join(directory, STAGING, run_id, folder) + "/"
        shards[role] = [
            (path, _row_count(path))
            for path in paths
            if path.startswith(prefix)
            and posixpath.basename(path).startswith(SHARD_PREFIX)
            and path.endswith(".parquet")
        ]
    prefix = staging_tables_dir(directory, run_id) + "/"
    tables = [
        (path, _row_count(path)) for path in paths if path.startswith(prefix) and path.endswith(".parquet")
    ]
    return {"rows": shards["rows"], "errors": shards["errors"], "tables": tables}


def null_counts(paths: Sequence[str], columns: Sequence[str]) -> dict[str, int]:
    """How many rows of the row files `paths` hold a null in each of `columns`, from their footers.

    A kept field (`--keep_fields`) null in every row was in no record: most likely misspelled.
    """
    counts = dict.fromkeys(columns, 0)
    for path in paths if columns else ():
        with FileSystems.open(path) as handle:
            parquet = pq.ParquetFile(handle)
            metadata, names = parquet.metadata, parquet.schema_arrow.names
            for column in columns:
                index = names.index(column)
                for group in range(metadata.num_row_groups):
                    statistics = metadata.row_group(group).column(index).statistics
                    if statistics is not None and statistics.has_null_count:
                        counts[column] += statistics.null_count
                    else:  # A writer without statistics: count them.
                        values = parquet.read_row_group(group, columns=[column]).column(0)
                        counts[column] += values.null_count
    return counts
