"""The output directory's life cycle: stage, commit atomically, write the manifest last.

Layout of a finished export::

    OUTPUT/part-SSSSS-of-NNNNN.parquet          the rows
    OUTPUT/errors/part-SSSSS-of-NNNNN.parquet   the dead letters
    OUTPUT/_tables/LAYER.parquet                --token_storage ids: each Embedding's table, once
    OUTPUT/_MANIFEST.json                       written last: marks success

Readers of the rows use `OUTPUT/part-*.parquet` (DuckDB, polars, BigQuery) or
`pd.read_parquet(OUTPUT, ignore_prefixes=READER_IGNORE_PREFIXES)`, since a
plain recursive read would also pick up `errors/`.

While a run is in flight its files live under `OUTPUT/_staging/RUN_ID/`, which
readers skip (pyarrow.dataset ignores names starting with "_"; a
`OUTPUT/*.parquet` glob does not descend into it).  Only after the pipeline
succeeded are the shards renamed into place and the manifest written.  A
directory with our files but no manifest is the leftover of a run that died;
the next run removes it.
"""

import json
import logging
import posixpath
import uuid

import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from models.bundle import sha256_file

MANIFEST = "_MANIFEST.json"
# pyarrow.dataset (and so pandas) reads directories recursively: these prefixes
# keep the dead letters and the staging area out of a read of the rows.
READER_IGNORE_PREFIXES = ["_", ".", "errors"]
STAGING = "_staging"
ERRORS_DIR = "errors"
# "_" keeps the tables out of a read of the directory, as for the staging area.
TABLES_DIR = "_tables"
SHARD_PREFIX = "part-"


def join(base, *parts):
    """Joins path parts for local paths and URIs alike."""
    return FileSystems.join(base, *parts)


def _list(directory):
    """Paths directly or indirectly under `directory` (empty if it does not exist)."""
    try:
        result = FileSystems.match([join(directory, "**")])[0]
    except Exception:  # Local match on a missing directory raises on some Beam versions.
        return []
    return [metadata.path for metadata in result.metadata_list]


def _relative(directory, path):
    base = directory.rstrip("/")
    return path[len(base) + 1 :] if path.startswith(base + "/") else posixpath.basename(path)


def _ours(relative):
    return (
        relative in (MANIFEST, MANIFEST + ".tmp")
        or relative.startswith(STAGING + "/")
        or (relative.startswith(SHARD_PREFIX) and relative.endswith(".parquet"))
        or (relative.startswith(ERRORS_DIR + "/" + SHARD_PREFIX) and relative.endswith(".parquet"))
        or (relative.startswith(TABLES_DIR + "/") and relative.endswith(".parquet"))
    )


def output_state(directory):
    """ "empty", "finished" (manifest present), "unfinished" (only leftovers of ours) or "foreign"."""
    relatives = [_relative(directory, path) for path in _list(directory)]
    if not relatives:
        # A run killed before writing any file leaves only its staging directory.
        return "unfinished" if FileSystems.exists(join(directory, STAGING)) else "empty"
    if MANIFEST in relatives:
        return "finished" if all(_ours(r) for r in relatives) else "foreign"
    return "unfinished" if all(_ours(r) for r in relatives) else "foreign"


def _delete(paths):
    if paths:
        FileSystems.delete(paths)


def prepare(directory, overwrite):
    """Removes what a dead run left (and, with `overwrite`, foreign files); returns a run id.

    A finished export is kept until `commit` replaces it, so a failed
    `--overwrite` run does not destroy the previous result.
    """
    state = output_state(directory)
    paths = _list(directory)
    if state == "unfinished":
        logging.warning("Removing %d files left in %s by a run that did not finish.", len(paths), directory)
        _delete(paths)
        remove_staging(directory)
    elif state == "foreign" and overwrite:
        logging.warning("--overwrite: removing %d files from %s.", len(paths), directory)
        _delete(paths)
    elif state == "finished":
        remove_staging(directory)
    return new_run_id()


def new_run_id():
    """A fresh id naming a run's staging directory."""
    return uuid.uuid4().hex[:12]


def remove_staging(directory):
    """Deletes the staging area (files and, locally, the emptied directories)."""
    staging = join(directory, STAGING)
    _delete(_list(staging))
    if FileSystems.exists(staging):
        FileSystems.delete([staging])


def staging_prefixes(directory, run_id):
    """(rows prefix, dead-letters prefix) for a run's shards."""
    staging = join(directory, STAGING, run_id)
    return join(staging, "data", "part"), join(staging, ERRORS_DIR, "part")


def staging_tables_dir(directory, run_id):
    """Where a run stages its token tables (`--token_storage ids`) until the commit."""
    return join(directory, STAGING, run_id, TABLES_DIR)


def _row_count(path):
    with FileSystems.open(path) as handle:
        return pq.ParquetFile(handle).metadata.num_rows


def staged_shards(directory, run_id):
    """The run's staged shards with their row counts, read once from the Parquet footers.

    Returns:
        {"rows": [(path, rows), ...], "errors": [...], "tables": [...]}, sorted by path.
    """
    paths = sorted(_list(join(directory, STAGING, run_id)))
    shards = {}
    for kind, folder in (("rows", "data"), ("errors", ERRORS_DIR)):
        prefix = join(directory, STAGING, run_id, folder) + "/"
        shards[kind] = [
            (path, _row_count(path))
            for path in paths
            if path.startswith(prefix)
            and posixpath.basename(path).startswith(SHARD_PREFIX)
            and path.endswith(".parquet")
        ]
    prefix = staging_tables_dir(directory, run_id) + "/"
    shards["tables"] = [
        (path, _row_count(path)) for path in paths if path.startswith(prefix) and path.endswith(".parquet")
    ]
    return shards


def file_digest(path):
    """{"sha256": hex} for a local file; the filesystem's own checksum for object storage.

    Object stores keep a checksum per object (GCS: CRC32C/MD5, S3: ETag), which
    costs nothing to read, while hashing would download every shard.
    """
    if FileSystems.get_scheme(path) in (None, "file"):
        return {"sha256": sha256_file(path)}
    return {"checksum": FileSystems.checksum(path)}


def commit(directory, staged, manifest):
    """Moves the run's shards and tables into place and writes the manifest last.

    Args:
        directory: the output directory.
        staged: `staged_shards(directory, run_id)`.
        manifest: facts of the run (options, counts, ...); shard and table lists are added.

    Returns:
        The manifest dict as written.
    """
    old = [p for p in _list(directory) if not _relative(directory, p).startswith(STAGING + "/")]
    old_manifest = [p for p in old if _relative(directory, p) == MANIFEST]
    # The manifest goes first so a reader never sees it over a mix of shards.
    _delete(old_manifest)
    _delete([p for p in old if p not in old_manifest])
    places = {"rows": directory, "errors": join(directory, ERRORS_DIR), "tables": join(directory, TABLES_DIR)}
    sources, targets, shards = [], [], {kind: [] for kind in places}
    for kind, target_dir in places.items():
        for path, rows in staged.get(kind, []):
            target = join(target_dir, posixpath.basename(path))
            sources.append(path)
            targets.append(target)
            shards[kind].append({"file": _relative(directory, target), "rows": rows})
        if kind != "rows" and staged.get(kind) and not FileSystems.exists(target_dir):
            FileSystems.mkdirs(target_dir)
    FileSystems.rename(sources, targets)
    for entry in shards["rows"] + shards["errors"] + shards["tables"]:
        entry.update(file_digest(join(directory, entry["file"])))
    remove_staging(directory)
    tables = shards.pop("tables")
    manifest = dict(manifest, shards=shards, tables=tables)
    temporary = join(directory, MANIFEST + ".tmp")
    with FileSystems.create(temporary) as handle:
        handle.write(json.dumps(manifest, indent=2, ensure_ascii=False).encode("utf-8"))
    FileSystems.rename([temporary], [join(directory, MANIFEST)])
    return manifest


def read_manifest(directory):
    """The manifest of a finished export, or None."""
    path = join(directory, MANIFEST)
    if not FileSystems.exists(path):
        return None
    with FileSystems.open(path) as handle:
        return json.loads(handle.read().decode("utf-8"))
