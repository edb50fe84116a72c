"""Reading an export (or a vocabulary) back: open its Parquet files, check its columns, sample its rows.

The files are read with pyarrow.dataset, which reads only the columns and row
groups a query needs and streams record batches.  A commit that a crash cut
short is finished first, so a reader never sees a mix of two exports.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import posixpath
from collections.abc import Callable, Sequence
from typing import NamedTuple, TypedDict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from pipeline.errors import ExportConfigError, LockUnavailableError, OutputBusyError, OutputWriteError
from pipeline.writing.commit import finish_interrupted_commit, has_pending_commit
from pipeline.writing.layout import JOURNAL, MANIFEST, SHARD_PREFIX, STAGING, TABLES_DIR
from pipeline.writing.schema import (
    FINGERPRINT_COLUMN,
    ID_COLUMN,
    TOKEN_COLUMN,
    TOKEN_ID_COLUMN,
    VECTOR_COLUMN,
    VOCABULARY_FILE,
)

DEFAULT_SAMPLE = 20_000
DEFAULT_SEED = 0
# Rows per scanned batch: 16k rows of 300 float32 values are about 20 MB.
BATCH_ROWS = 16_384


class AnalysisError(ValueError):
    """An input directory, column, id or option cannot be analysed; says how to fix it."""


class FileStamp(TypedDict):
    """One row file as its listing describes it: what an index records to notice a rewrite."""

    file: str
    bytes: int
    mtime_ns: int | None


@dataclasses.dataclass(frozen=True)
class VectorDataset:
    """The Parquet files of one export, read as one dataset.

    `key_column` names a row ("id" for documents, "token" for a vocabulary);
    `detail_columns` are shown next to it (kept label fields, token ids).
    """

    location: str
    holds: str  # "documents" (an export) or "vocabulary"
    dataset: ds.Dataset
    key_column: str
    detail_columns: tuple[str, ...]

    @property
    def schema(self) -> pa.Schema:
        return self.dataset.schema

    def filesystem_and_directory(self) -> tuple[pafs.FileSystem, str]:
        """(pyarrow filesystem, path) of `location`, where `_index/` lives."""
        return uri_filesystem(self.location)


# Object stores whose keys are taken as typed: pyarrow's URI parser would decode "%20" in them.
_BUCKET_SCHEMES = ("s3", "gs", "gcs")


def uri_filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path) for a local path or a URI (gs://, s3://, ...).

    An object store's key is kept exactly as typed, as Beam (and so `pipeline.run`)
    writes it: `FileSystem.from_uri` would percent-decode it (`s3://b/x%20y` read as
    the key `x y`, another directory) and refuses a space or a non-ASCII letter.

    Raises:
        AnalysisError: a URI no pyarrow filesystem serves, or a key pyarrow cannot address.
    """
    if "://" not in location:
        return pafs.LocalFileSystem(), os.path.abspath(location)
    scheme, _, rest = location.partition("://")
    try:
        if scheme.lower() not in _BUCKET_SCHEMES:
            return pafs.FileSystem.from_uri(location)
        bucket, _, key = rest.partition("/")
        # The bucket alone goes through the parser (it picks the filesystem and its options).
        filesystem, root = pafs.FileSystem.from_uri(f"{scheme}://{bucket}")
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:
        raise AnalysisError(f"Cannot open {location!r}: {error}") from None
    key = key.rstrip("/")
    if "//" in key or key.startswith("/"):
        raise AnalysisError(
            f'Cannot open {location!r}: its path has an empty part ("//"), which pyarrow\'s '
            f"{scheme}:// filesystem cannot read. Copy the export to a path without one."
        )
    return filesystem, posixpath.join(root, key) if key else root


def _finish_commit(location: str) -> None:
    """Finishes a commit into the export `location` that a crash cut short, so it is read whole.

    Raises:
        AnalysisError: whether a commit is pending cannot be told (object storage
            unreachable, no credentials), or the commit cannot be finished from here
            (another run holds the output, it is read-only, or its journal is damaged).
    """
    try:
        pending = has_pending_commit(location)
    except (ExportConfigError, OSError) as error:
        raise AnalysisError(
            f"Cannot read {location!r} (looking for an unfinished commit, {JOURNAL}): {error} Check the "
            "path and, on object storage, the credentials (for s3://: AWS_ACCESS_KEY_ID, "
            "AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION and, for another endpoint, AWS_ENDPOINT_URL)."
        ) from None
    if not pending:
        return
    try:
        if finish_interrupted_commit(location):
            logging.warning("Finished the interrupted commit of the export in %s first.", location)
    except OutputBusyError as error:  # Not unfinished: a live run is committing into it now.
        raise AnalysisError(
            f"{location!r} is being committed by {error.holder} now (its journal {JOURNAL} is in "
            "place): wait for that run to finish, then rerun this command."
        ) from None
    except LockUnavailableError as error:
        raise AnalysisError(
            f"{location!r} holds a commit that was not finished ({JOURNAL}), and it cannot be finished from "
            f"here: its lock cannot be written ({error.reason}). Rerun this command (or the export) where "
            "the directory is writable; until then its files are a mix of two exports."
        ) from None
    # OutputWriteError: the lock it takes for the while found the disk full.
    except (ExportConfigError, OSError, OutputWriteError) as error:
        raise AnalysisError(
            f"{location!r} holds a commit that was not finished ({JOURNAL}), and it cannot be finished "
            f"from here: {error} Rerun the export (or this command) where the output is writable; "
            "until then its files are a mix of two exports."
        ) from None


class Listing(NamedTuple):
    """The Parquet files of a location as listed, and the stamps of those files and of its manifest then."""

    filesystem: pafs.FileSystem
    files: list[str]
    stamps: list[FileStamp]


# How often a listing is taken again because a commit began while it was taken (see `_listed`).
LISTING_ATTEMPTS = 3


def _listed(location: str, list_files: Callable[[], tuple[pafs.FileSystem, list[str]]]) -> Listing:
    """`list_files()` of `location` with a finished commit, and the stamps of what it listed, taken then.

    A commit that reaches its commit point (the journal) after `_finish_commit`
    looked for one, and before the listing, can be half done when the files are
    listed: part of each export, and no manifest to check them against.  So the
    journal is looked for again once they are listed; if there is one, the commit
    is finished (or refused) and the files listed again.  The stamps are those of
    the listing's moment, so whatever the commit changes after it is caught by
    `check_read_unchanged`.
    """
    for _ in range(LISTING_ATTEMPTS):
        _finish_commit(location)
        filesystem, files = list_files()
        directory = uri_filesystem(location)[1]
        stamps = row_file_stamps(filesystem, [*files, posixpath.join(directory, MANIFEST)])
        if not _commit_pending(location):
            return Listing(filesystem, files, stamps)
    raise AnalysisError(
        f"{location!r} is being replaced by one commit after another (a run's --overwrite): run the "
        "command again once it is done."
    )


def _commit_pending(location: str) -> bool:
    """Whether a commit into `location` is pending, as `_finish_commit` tells it (its errors included)."""
    try:
        return has_pending_commit(location)
    except (ExportConfigError, OSError) as error:
        raise AnalysisError(
            f"Cannot read {location!r} (looking for an unfinished commit, {JOURNAL}): {error}"
        ) from None


def _list_parquet(location: str, wanted: Callable[[str], bool], how_to_make: str) -> Listing:
    """The Parquet files directly in `location` whose name `wanted` accepts, listed as `_listed` lists.

    A path to a single .parquet file is accepted as is.
    """

    def list_files() -> tuple[pafs.FileSystem, list[str]]:
        filesystem, path = uri_filesystem(location)
        info = filesystem.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise AnalysisError(f"{location!r} does not exist; pass the --output directory of {how_to_make}.")
        if info.type == pafs.FileType.File:
            return filesystem, [path]
        # Not recursive: errors/ holds dead letters with another schema, and _staging/ unfinished runs.
        entries = filesystem.get_file_info(pafs.FileSelector(path, recursive=False))
        return filesystem, sorted(
            e.path for e in entries if e.type == pafs.FileType.File and wanted(posixpath.basename(e.path))
        )

    return _listed(location, list_files)


def _parquet_dataset(location: str, filesystem: pafs.FileSystem, files: list[str]) -> ds.Dataset:
    """The dataset of `files`; a file pyarrow cannot read as Parquet is an AnalysisError, not a traceback."""
    try:
        return ds.dataset(files, filesystem=filesystem, format="parquet")
    except (pa.ArrowInvalid, OSError) as error:
        raise AnalysisError(
            f"{location!r} is not Parquet this tool wrote ({error}). Pass the --output directory of "
            "`python -m pipeline.run` or `python -m pipeline.vocabulary`, or one of their Parquet files."
        ) from None


def _is_file(filesystem: pafs.FileSystem, path: str) -> bool:
    return filesystem.get_file_info(path).type == pafs.FileType.File


def open_documents(location: str) -> VectorDataset:
    """Opens the rows (`part-*.parquet`) of a `python -m pipeline.run` export.

    Raises:
        AnalysisError: `location` does not exist or holds no row files.
    """
    listing = _list_parquet(
        location,
        lambda name: name.startswith(SHARD_PREFIX) and name.endswith(".parquet"),
        "`python -m pipeline.run`",
    )
    filesystem, files = listing.filesystem, listing.files
    directory = uri_filesystem(location)[1]
    is_directory = filesystem.get_file_info(directory).type == pafs.FileType.Directory
    if is_directory:
        check_row_files(location, filesystem, directory, files)
    no_rows = AnalysisError(
        f"{location!r} is an export with no rows: every record it read is a dead letter in "
        f"{posixpath.join(location, 'errors')} (or the corpus was empty): nothing to analyze."
    )
    if not files:
        hint = ""
        if _is_file(filesystem, posixpath.join(directory, VOCABULARY_FILE)):
            hint = " It holds a vocabulary export: query it with `neighbors --word WORD`."
        if _is_file(filesystem, posixpath.join(directory, MANIFEST)):
            raise no_rows
        if filesystem.get_file_info(posixpath.join(directory, STAGING)).type != pafs.FileType.NotFound:
            raise AnalysisError(
                f"{location!r} is the --output of a `python -m pipeline.run` that has not finished (it "
                "was stopped or killed, or is still running): rerun the same command to finish it (it "
                "resumes from the rows made durable), then analyze it."
            )
        raise AnalysisError(
            f"{location!r} holds no {SHARD_PREFIX}*.parquet files, so it is not the --output of "
            f"`python -m pipeline.run`.{hint}"
        )
    if is_directory and not _is_file(filesystem, posixpath.join(directory, MANIFEST)):
        logging.warning(
            "%s has no %s: the export did not finish, so results may be partial.", location, MANIFEST
        )
    dataset = _parquet_dataset(location, filesystem, files)
    # An export without rows has one shard of none (its schema, for readers).
    if dataset.count_rows() == 0 and _is_file(filesystem, posixpath.join(directory, MANIFEST)):
        raise no_rows
    if ID_COLUMN not in dataset.schema.names:
        raise AnalysisError(f"{location!r} has no {ID_COLUMN!r} column, so it is not an export of this tool.")
    id_type = dataset.schema.field(ID_COLUMN).type
    if not is_text_type(id_type):
        raise AnalysisError(
            f"{location!r} has an {ID_COLUMN!r} column of type {id_type}; exports of this tool write string "
            f"ids. Rewrite the files with the ids cast to strings (e.g. pyarrow's cast to pa.string())."
        )
    # Kept fields are the details worth showing; the fingerprint is not.
    details = tuple(
        f.name
        for f in dataset.schema
        if f.name not in (ID_COLUMN, FINGERPRINT_COLUMN) and is_label_type(f.type)
    )
    return _opened(VectorDataset(location, "documents", dataset, ID_COLUMN, details), listing.stamps)


def manifest_row_files(filesystem: pafs.FileSystem, directory: str) -> dict[str, int] | None:
    """Row file name -> size in bytes, as the export's `_MANIFEST.json` lists them; None without one."""
    try:
        with filesystem.open_input_stream(posixpath.join(directory, MANIFEST)) as handle:
            manifest = json.loads(handle.read().decode("utf-8"))
    except (FileNotFoundError, ValueError):
        return None
    except OSError as error:
        raise AnalysisError(f"Cannot read {posixpath.join(directory, MANIFEST)}: {error}") from None
    shards = manifest.get("shards") if isinstance(manifest, dict) else None
    rows = shards.get("rows") if isinstance(shards, dict) else None
    if not isinstance(rows, list):
        return None
    return {
        str(entry["file"]): int(entry["bytes"])
        for entry in rows
        if isinstance(entry, dict) and "file" in entry and isinstance(entry.get("bytes"), int)
    }


def row_file_stamps(filesystem: pafs.FileSystem, files: Sequence[str]) -> list[FileStamp]:
    """Each row file's name, size and modification time: cheap to read, and changed by any rewrite."""
    stamps: list[FileStamp] = []
    for info in filesystem.get_file_info(list(files)):
        name, size = posixpath.basename(info.path), int(info.size or 0)
        stamps.append({"file": name, "bytes": size, "mtime_ns": info.mtime_ns})
    return stamps


def check_row_files(location: str, filesystem: pafs.FileSystem, directory: str, files: Sequence[str]) -> None:
    """Refuses row files that are not the ones the export's manifest lists (by name and size).

    A file missing or of another size means rows were lost or replaced since the
    export finished; answering from them would be answering from another export.
    A file the manifest does not list is read, with a warning.

    Raises:
        AnalysisError: naming the first missing or changed file.
    """
    expected = manifest_row_files(filesystem, directory)
    if expected is None:
        return
    listed = {stamp["file"]: stamp["bytes"] for stamp in row_file_stamps(filesystem, files)}
    rerun = "Restore the file, or run the export again (`python -m pipeline.run ... --overwrite`)."
    for name, size in sorted(expected.items()):
        if name not in listed:
            raise AnalysisError(
                f"{location!r} is missing the row file {name}, which its {MANIFEST} lists: its rows are "
                f"lost, so any answer would leave them out. {rerun}"
            )
        if listed[name] != size:
            raise AnalysisError(
                f"{location!r}: the row file {name} has {listed[name]} bytes, but its {MANIFEST} records "
                f"{size}: it was changed or replaced after the export finished. {rerun}"
            )
    extra = sorted(set(listed) - set(expected))
    if extra:
        logging.warning(
            "%s holds row files its %s does not list (%s); they are read as well.",
            location,
            MANIFEST,
            ", ".join(extra),
        )


def _token_tables(location: str) -> Listing:
    """The tables in `location`'s `_tables/` (`--token_storage ids`), listed as `_listed` lists."""

    def list_files() -> tuple[pafs.FileSystem, list[str]]:
        filesystem, directory = uri_filesystem(location)
        tables = posixpath.join(directory, TABLES_DIR)
        if filesystem.get_file_info(tables).type != pafs.FileType.Directory:
            return filesystem, []
        entries = filesystem.get_file_info(pafs.FileSelector(tables, recursive=False))
        return filesystem, sorted(e.path for e in entries if e.path.endswith(".parquet"))

    return _listed(location, list_files)


def open_vocabulary(location: str) -> VectorDataset:
    """Opens the word vectors of `location`: a vocabulary output, a table file, or an export's table.

    `location` is the --output of `python -m pipeline.vocabulary`, a
    vocabulary-format file, or the --output of `python -m pipeline.run
    --token_storage ids` with one table (with several, pass the table file).

    Raises:
        AnalysisError: `location` does not exist or holds no vocabulary file.
    """
    listing = _list_parquet(location, lambda name: name == VOCABULARY_FILE, "`python -m pipeline.vocabulary`")
    if not listing.files:
        listing = _token_tables(location)
        files = listing.files
        if len(files) > 1:
            choices = ", ".join(posixpath.join(location, TABLES_DIR, posixpath.basename(f)) for f in files)
            raise AnalysisError(
                f"{location!r} holds {len(files)} token tables; pass one of them instead: {choices}."
            )
    filesystem, files = listing.filesystem, listing.files
    if not files:
        raise AnalysisError(_no_vocabulary(location, filesystem))
    dataset = _parquet_dataset(location, filesystem, files)
    missing = {TOKEN_ID_COLUMN, TOKEN_COLUMN, VECTOR_COLUMN} - set(dataset.schema.names)
    if missing:
        raise AnalysisError(
            f"{files[0]} lacks the column(s) {sorted(missing)}; rewrite it with "
            "`python -m pipeline.vocabulary`."
        )
    return _opened(
        VectorDataset(location, "vocabulary", dataset, TOKEN_COLUMN, (TOKEN_ID_COLUMN,)), listing.stamps
    )


def _no_vocabulary(location: str, filesystem: pafs.FileSystem) -> str:
    """Why `location` has no word vectors, and the commands that make and query them.

    An export's own directory is refused by `pipeline.vocabulary` (only `pipeline.run` writes
    there), and its model may be any: the vocabulary goes beside it, of the model it records.
    """
    import shlex

    directory = uri_filesystem(location)[1]
    try:
        with filesystem.open_input_stream(posixpath.join(directory, MANIFEST)) as handle:
            manifest = json.loads(handle.read().decode("utf-8"))
    except (OSError, ValueError):  # No export (or an unreadable one): nothing to name.
        manifest = None
    model = manifest.get("model_uri") if isinstance(manifest, dict) else None
    if not isinstance(model, str) or not model:
        return (
            f"{location!r} holds no {VOCABULARY_FILE}: pass the --output of `python -m pipeline.vocabulary`, "
            "or query documents of an export with --id."
        )
    vocabulary = location.rstrip("/") + "_vocabulary"
    return (
        f"{location!r} is an export, which holds no word vectors (only --token_storage ids writes its "
        "table). Write its model's vocabulary beside it, `python -m pipeline.vocabulary --model "
        f"{shlex.quote(model)} --output {shlex.quote(vocabulary)}`, and query that: `python -m "
        f"pipeline.analyze {shlex.quote(vocabulary)} neighbors --word WORD`; or query documents with --id."
    )


# The datasets this process opened, with their files' stamps then (see `check_read_unchanged`).
_OPENED: list[tuple[VectorDataset, list[FileStamp]]] = []


def _stamps(data: VectorDataset) -> list[FileStamp]:
    """Stamps of the dataset's row files and of its manifest (an --overwrite's commit changes both)."""
    filesystem, directory = data.filesystem_and_directory()
    return row_file_stamps(filesystem, [*data.dataset.files, posixpath.join(directory, MANIFEST)])


def _opened(data: VectorDataset, listed: list[FileStamp]) -> VectorDataset:
    """`data`, remembered with the stamps its files had when they were listed (`check_read_unchanged`)."""
    _OPENED.append((data, listed))
    return data


def forget_opened() -> None:
    """Starts a command afresh: only what it opens is checked by `check_read_unchanged`."""
    _OPENED.clear()


def check_read_unchanged() -> None:
    """Refuses answers read from files that changed while they were read.

    A run that commits an `--overwrite` over the export meanwhile renames its own
    files over the ones being read: an answer would then mix two exports' rows.

    Raises:
        AnalysisError: naming the export to read again.
    """
    opened, _OPENED[:] = list(_OPENED), []
    for data, stamps in opened:
        if _stamps(data) != stamps:
            raise AnalysisError(
                f"{data.location!r} changed while it was read (a run committed over it, or its files were "
                "rewritten): the answer would mix two exports' rows, so none is given. Run the command again."
            )


def is_text_type(arrow_type: pa.DataType) -> bool:
    """Whether `arrow_type` holds strings: `string`, or `large_string` (pandas' and polars' Arrow strings)."""
    return pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type)


def is_label_type(arrow_type: pa.DataType) -> bool:
    """Whether `arrow_type` holds labels: strings, or dictionary-encoded strings (a pandas `category`
    column written to Parquet), which read back as the same strings."""
    if pa.types.is_dictionary(arrow_type):
        arrow_type = arrow_type.value_type
    return is_text_type(arrow_type)


def _is_list_type(arrow_type: pa.DataType) -> bool:
    return (
        pa.types.is_fixed_size_list(arrow_type)
        or pa.types.is_list(arrow_type)
        or pa.types.is_large_list(arrow_type)
    )


def is_vector_type(arrow_type: pa.DataType) -> bool:
    """Whether `arrow_type` is a list of floats: one vector."""
    return _is_list_type(arrow_type) and pa.types.is_floating(arrow_type.value_type)


def vector_columns(schema: pa.Schema) -> list[str]:
    """Names of the columns holding one vector (a list of floats) per row."""
    return [field.name for field in schema if is_vector_type(field.type)]


def check_vector_column(data: VectorDataset, column: str | None) -> str:
    """Returns `column`, or the first vector column if it is None; raises AnalysisError if unusable."""
    available = vector_columns(data.schema)
    listed = ", ".join(available) or "none"
    if column is None:
        if not available:
            raise AnalysisError(_no_vector_column(data))
        return available[0]
    if column not in data.schema.names:
        raise AnalysisError(
            f"{data.location!r} has no column {column!r}. Its vector columns are: {listed}; "
            "pass one as --column."
        )
    arrow_type = data.schema.field(column).type
    if _is_list_type(arrow_type) and pa.types.is_integer(arrow_type.value_type):
        raise AnalysisError(
            f"Column {column!r} holds the token ids of each document (exported with --token_storage "
            f"ids), not one vector per row; the vectors of the tokens are in {TABLES_DIR}/. Query "
            f"words with `neighbors --word WORD` on this directory, "
            + (f"pick a vector column ({listed}), " if available else "")
            + "or re-export the layer with --pooling mean."
        )
    if _is_list_type(arrow_type) and is_vector_type(arrow_type.value_type):
        raise AnalysisError(
            f"Column {column!r} holds one vector per token (exported with --pooling none), not one per "
            "row. "
            + (
                f"Pick a pooled column ({listed}) or re-export"
                if available
                else "The export has no pooled column: re-export"
            )
            + " it with --pooling mean (or max, last)."
        )
    if not is_vector_type(arrow_type):
        raise AnalysisError(
            f"Column {column!r} is {arrow_type}, not a vector; its vector columns are: {listed}."
        )
    return column


def _no_vector_column(data: VectorDataset) -> str:
    """Why `data` has no vector column to default to, and what to do: its columns may hold one vector per
    token (--pooling none) or token ids (--token_storage ids), which --column would explain too."""
    per_token = [f.name for f in data.schema if _is_list_type(f.type) and is_vector_type(f.type.value_type)]
    token_ids = [
        f.name for f in data.schema if _is_list_type(f.type) and pa.types.is_integer(f.type.value_type)
    ]
    problem = f"{data.location!r} has no vector column (a list of floats per row)"
    if per_token:
        return (
            f"{problem}: {', '.join(map(repr, per_token))} {_hold(per_token)} one vector per token "
            "(exported with --pooling none), not one per row. Re-export the layer with --pooling mean "
            "(or max, last)."
        )
    if token_ids:
        return (
            f"{problem}: {', '.join(map(repr, token_ids))} {_hold(token_ids)} each document's token ids "
            f"(exported with --token_storage ids), whose vectors are in {TABLES_DIR}/. Query words with "
            "`neighbors --word WORD` on this directory, or re-export the layer with --pooling mean."
        )
    return problem + "."


def _hold(names: list[str]) -> str:
    return "holds" if len(names) == 1 else "hold"


def check_label_column(data: VectorDataset, label: str) -> str:
    """Returns `label`; raises AnalysisError unless it is a string column of `data`."""
    if label in data.schema.names and is_label_type(data.schema.field(label).type):
        return label
    candidates = ", ".join(data.detail_columns) or "none (export with --keep_fields FIELD,...)"
    raise AnalysisError(
        f"{data.location!r} has no label column {label!r}; its label columns are: {candidates}."
    )


def vectors_to_numpy(array: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """An Arrow list-of-floats array (no null rows) as an (n, dim) float numpy array."""
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    rows = len(array)
    if pa.types.is_fixed_size_list(array.type):
        dim = array.type.list_size
    else:
        lengths = np.unique(pc.list_value_length(array).to_numpy(zero_copy_only=False))
        if len(lengths) > 1:
            raise AnalysisError(
                f"The vectors have different lengths {lengths.tolist()}; cannot compare them."
            )
        dim = int(lengths[0]) if rows else 0
    values = array.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(rows, dim)


def different_lengths(column: str, expected: int, found: int) -> AnalysisError:
    """The error for `column` vectors of another length than the query's (list<float> columns of files
    written apart, e.g. two exports' files in one directory)."""
    return AnalysisError(
        f"The {column!r} vectors have different lengths ({expected} and {found}); cannot compare them. "
        "Analyze the files of one length (one export) at a time."
    )


def unit_rows(matrix: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1, in `matrix`'s float type; all-zero rows stay zero (similarity 0 to all).

    The norms are taken in float64: a finite float32 row's squared norm overflows
    float32 from values of about 2e19, which would scale it to all zeros.
    """
    wide = np.asarray(matrix, dtype=np.float64)
    norms = np.linalg.norm(wide, axis=1, keepdims=True)
    return (wide / np.where(norms == 0, 1, norms)).astype(
        np.result_type(matrix.dtype, np.float32), copy=False
    )


def sample_rows(
    data: VectorDataset,
    columns: Sequence[str],
    sample: int = DEFAULT_SAMPLE,
    seed: int = DEFAULT_SEED,
    filter: pc.Expression | None = None,
    batch_rows: int = BATCH_ROWS,
    usable: Callable[[pa.RecordBatch], np.ndarray] | None = None,
) -> tuple[pa.Table, int]:
    """A uniform random sample of at most `sample` rows, streaming the dataset once.

    Each row gets a random priority and the `sample` rows with the lowest are
    kept (bottom-k sampling), so memory is bounded by the sample, not the data.
    `usable(batch)`, a boolean mask, drops rows that no expression can tell
    (vectors with NaN values) before they are drawn, so the sample is of the usable rows.

    Returns:
        `(table, total)`: the sampled rows in scan order, and how many usable rows matched `filter`.
    """
    if sample < 1:
        raise AnalysisError(f"--sample must be at least 1, received {sample}.")
    if seed < 0:
        raise AnalysisError(f"--seed must be at least 0, received {seed}.")
    rng = np.random.default_rng(seed)
    scanner = data.dataset.scanner(
        columns=list(columns), filter=filter, batch_size=batch_rows, batch_readahead=2, fragment_readahead=1
    )
    kept = scanner.projected_schema.empty_table()
    kept_priorities = np.empty(0)
    total = 0
    for batch in scanner.to_batches():
        if usable is not None and batch.num_rows:
            mask = usable(batch)
            if not mask.all():
                batch = batch.filter(pa.array(mask))
        priorities = rng.random(batch.num_rows)
        total += batch.num_rows
        if len(kept_priorities) >= sample:
            # Only rows that beat the worst kept one can enter the sample.
            candidates = np.flatnonzero(priorities < kept_priorities.max())
            batch, priorities = batch.take(pa.array(candidates)), priorities[candidates]
        if batch.num_rows == 0:
            continue
        kept = pa.concat_tables([kept, pa.Table.from_batches([batch])])
        kept_priorities = np.concatenate([kept_priorities, priorities])
        if len(kept_priorities) > sample:
            chosen = np.sort(np.argpartition(kept_priorities, sample - 1)[:sample])
            kept, kept_priorities = kept.take(pa.array(chosen)), kept_priorities[chosen]
    return kept.combine_chunks(), total


class VectorSample(NamedTuple):
    """A random sample of a column's vectors, with each row's key and its label if one was asked for."""

    column: str
    vectors: np.ndarray
    labels: list[str | None] | None
    total: int  # usable rows the sample was drawn from
    keys: list[str]  # each row's key, which breaks ties between equal similarities


def sample_vectors(
    data: VectorDataset,
    column: str | None,
    label: str | None,
    sample: int = DEFAULT_SAMPLE,
    seed: int = DEFAULT_SEED,
    labelled_only: bool = False,
) -> VectorSample:
    """A uniform random sample (`sample_rows`) of the rows with a finite `column` vector, and their `label`.

    `column` None picks the first vector column; with `labelled_only`, rows
    without a label are left out of the sample and of its total.  Rows whose
    vector has a NaN or infinite value are left out before the sample is drawn
    (as `index` and `neighbors` skip them: a NaN would make every PCA axis and
    every similarity NaN), so the sample holds `sample` usable rows where there are as many.
    """
    column = check_vector_column(data, column)
    columns = [column, data.key_column]
    condition = pc.field(column).is_valid()
    if label is not None:
        columns.append(check_label_column(data, label))
        if labelled_only:
            condition = condition & pc.field(label).is_valid()
    non_finite = [0]

    def finite(batch: pa.RecordBatch) -> np.ndarray:
        good = np.isfinite(vectors_to_numpy(batch.column(column))).all(axis=1)
        non_finite[0] += int((~good).sum())
        return np.asarray(good, dtype=bool)

    table, total = sample_rows(
        data, list(dict.fromkeys(columns)), sample, seed, filter=condition, usable=finite
    )
    if non_finite[0]:
        logging.warning(
            "%d rows of %r have a NaN or infinite value; they are left out.", non_finite[0], column
        )
    labels = table[label].to_pylist() if label is not None else None
    keys = [str(key) for key in table[data.key_column].to_pylist()]
    return VectorSample(column, vectors_to_numpy(table[column]), labels, total, keys)


def open_documents_or_vocabulary(directory: str) -> VectorDataset:
    """An export's rows, or a vocabulary when the directory holds no row files."""
    try:
        return open_documents(directory)
    except AnalysisError:
        if _list_parquet(directory, lambda name: name == VOCABULARY_FILE, "").files:
            return open_vocabulary(directory)
        raise


def has_token_tables(location: str) -> bool:
    """Whether the export `location` holds token tables (`_tables/`, written with --token_storage ids)."""
    return bool(_token_tables(location).files)


def token_table_count(location: str) -> int:
    """How many token tables the export `location` holds (`_tables/*.parquet`)."""
    return len(_token_tables(location).files)


def data_is_vocabulary(location: str) -> bool:
    """Whether `location` holds a vocabulary rather than an export's rows, told by the files in it.

    A directory with `vocabulary.parquet` is a vocabulary; one with an export's
    files (a manifest, a commit journal, a staging area, row files) is an export,
    even a damaged or unfinished one, so that `open_documents` says what is wrong
    with it rather than that it holds no vocabulary.  A single file is a
    vocabulary unless it opens as an export's rows.
    """
    filesystem, path = uri_filesystem(location)
    if filesystem.get_file_info(path).type != pafs.FileType.Directory:
        try:
            open_documents(location)
        except AnalysisError:
            return True
        return False
    if _is_file(filesystem, posixpath.join(path, VOCABULARY_FILE)):
        return True
    entries = filesystem.get_file_info(pafs.FileSelector(path, recursive=False))
    names = {posixpath.basename(entry.path) for entry in entries}
    export_files = bool(names & {MANIFEST, JOURNAL, STAGING}) or any(
        name.startswith(SHARD_PREFIX) and name.endswith(".parquet") for name in names
    )
    return not export_files
