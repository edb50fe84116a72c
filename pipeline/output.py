"""The output directory's life cycle: lock, stage, commit atomically, write the manifest last.

Layout of a finished export::

    OUTPUT/part-SSSSS-of-NNNNN.parquet          the rows
    OUTPUT/errors/part-SSSSS-of-NNNNN.parquet   the dead letters
    OUTPUT/_tables/LAYER.parquet                --token_storage ids: each Embedding's table, once
    OUTPUT/_index/COLUMN.*                      `pipeline.analyze OUT index`: an ANN index, added later
    OUTPUT/_MANIFEST.json                       written last: marks success

Readers of the rows use `OUTPUT/part-*.parquet` (DuckDB, polars, BigQuery) or
`pd.read_parquet(OUTPUT, ignore_prefixes=READER_IGNORE_PREFIXES)`, since a
plain recursive read would also pick up `errors/`.

While a run is in flight it holds `OUTPUT/_LOCK` (see `OutputLock`) and its
files live under `OUTPUT/_staging/RUN_ID/`, which readers skip (pyarrow.dataset
ignores names starting with "_"; a `OUTPUT/*.parquet` glob does not descend
into it).  Only after the pipeline succeeded are the shards renamed into place
and the manifest written.  A directory with our files but no manifest is the
leftover of a run that died; the next run removes it.

Nothing here ever deletes a file this project did not write: a directory that
holds anything else is "foreign" and refused, `--overwrite` or not.
"""

import json
import logging
import os
import posixpath
import re
import socket
import threading
import time
import uuid

import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from models.bundle import sha256_file
from pipeline.errors import ExportConfigError, OutputBusyError
from pipeline.model_source import is_local

MANIFEST = "_MANIFEST.json"
LOCK = "_LOCK"
# pyarrow.dataset (and so pandas) reads directories recursively: these prefixes
# keep the dead letters and the staging area out of a read of the rows.
READER_IGNORE_PREFIXES = ["_", ".", "errors"]
STAGING = "_staging"
ERRORS_DIR = "errors"
# "_" keeps the tables out of a read of the directory, as for the staging area.
TABLES_DIR = "_tables"
# `python -m pipeline.analyze OUT index`: tied to the manifest, so replacing the export drops or outdates it.
INDEX_DIR = "_index"
SHARD_PREFIX = "part-"
# Beam's default shard names: part-00000-of-00004.parquet.
_SHARD_NAME = re.compile(r"part-\d{5,}-of-\d{5,}\.parquet")
# A lock on object storage is a lease: its holder rewrites it every
# LEASE_RENEW_SECONDS, and one not rewritten for LEASE_SECONDS belongs to a dead run.
LEASE_SECONDS = 300
LEASE_RENEW_SECONDS = 60


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


def _iter_relatives(directory):
    """Paths under `directory` relative to it; lazily, so a huge foreign directory is not walked whole."""
    if is_local(directory):
        for root, _, names in os.walk(directory):
            for name in names:
                yield os.path.relpath(os.path.join(root, name), directory).replace(os.sep, "/")
        return
    for path in _list(directory):
        yield _relative(directory, path)


def _relative(directory, path):
    base = directory.rstrip("/")
    return path[len(base) + 1 :] if path.startswith(base + "/") else posixpath.basename(path)


def _ours(relative):
    """Whether a path relative to the output directory is one this project writes."""
    return (
        relative in (MANIFEST, MANIFEST + ".tmp", LOCK)
        or relative.startswith(STAGING + "/")
        or bool(_SHARD_NAME.fullmatch(relative))
        or (relative.startswith(TABLES_DIR + "/") and relative.endswith(".parquet"))
        or bool(re.fullmatch(INDEX_DIR + r"/([^/]+\.(usearch|json)(\.tmp)?)?", relative))
        or (
            relative.startswith(ERRORS_DIR + "/")
            and bool(_SHARD_NAME.fullmatch(relative[len(ERRORS_DIR) + 1 :]))
        )
    )


def is_regular_file(path):
    """Whether `path` names a file (not a directory, nor an object-store prefix)."""
    if is_local(path):
        return os.path.isfile(path)
    return FileSystems.exists(path)


def output_state(directory):
    """ "empty", "finished" (manifest present), "unfinished" (only leftovers of ours) or "foreign"."""
    relatives = []
    for relative in _iter_relatives(directory):
        if not _ours(relative):
            return "foreign"
        # The lock is the live run's (ours, once we hold it), not a leftover.
        if relative != LOCK:
            relatives.append(relative)
    if not relatives:
        # A run killed before writing any file leaves only its staging directory.
        return "unfinished" if FileSystems.exists(join(directory, STAGING)) else "empty"
    return "finished" if MANIFEST in relatives else "unfinished"


def foreign_files(directory, limit=5):
    """A few of the files in `directory` that no export wrote, for error messages."""
    found = []
    for relative in _iter_relatives(directory):
        if not _ours(relative):
            found.append(relative)
            if len(found) == limit:
                break
    return sorted(found)


def _delete(paths):
    if paths:
        FileSystems.delete(paths)


def check_output_state(directory, overwrite):
    """Refuses an output that holds foreign files, or a finished export without `overwrite`.

    Raises:
        ExportConfigError: saying what is there and what to do.
    """
    state = output_state(directory)
    if state == "foreign":
        raise ExportConfigError(
            f"--output {directory!r} holds files that no export wrote (e.g. "
            f"{', '.join(foreign_files(directory))}). An export only ever replaces its own "
            "files, so it will not write there, --overwrite or not: choose a new or empty directory."
        )
    if state == "finished" and not overwrite:
        raise ExportConfigError(
            f"--output {directory!r} already holds a finished export. Pass --overwrite to "
            "replace it, or choose another --output."
        )
    return state


def prepare(directory, overwrite):
    """Checks the output again under the lock and removes what dead runs left; returns a run id.

    Call it while holding `OutputLock(directory)`: then no other live run uses
    the directory, so every staging directory and every unfinished file in it
    belongs to a run that died.  A finished export is kept until `commit`
    replaces it, so a failed `--overwrite` run does not destroy the previous result.

    Raises:
        ExportConfigError: foreign files, or a finished export without `overwrite`
            (another run may have finished there since the launch-time check).
    """
    state = check_output_state(directory, overwrite)
    if state == "unfinished":
        leftovers = [p for p in _list(directory) if _relative(directory, p) != LOCK]
        logging.warning(
            "Removing %d files left in %s by a run that did not finish.", len(leftovers), directory
        )
        _delete(leftovers)
    remove_staging(directory)
    return new_run_id()


def new_run_id():
    """A fresh id naming a run's staging directory."""
    return uuid.uuid4().hex[:12]


def _remove_tree(directory):
    """Deletes the files under `directory` and, locally, the emptied directories."""
    _delete(_list(directory))
    if FileSystems.exists(directory):
        FileSystems.delete([directory])


def remove_staging(directory, run_id=None):
    """Deletes one run's staging directory, or (`run_id` None) the whole staging area."""
    _remove_tree(join(directory, STAGING, run_id) if run_id else join(directory, STAGING))
    if run_id and not _list(join(directory, STAGING)) and FileSystems.exists(join(directory, STAGING)):
        FileSystems.delete([join(directory, STAGING)])


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


def commit(directory, run_id, staged, manifest):
    """Moves the run's shards and tables into place and writes the manifest last.

    Args:
        directory: the output directory.
        run_id: this run's id; only its staging directory is removed.
        staged: `staged_shards(directory, run_id)`.
        manifest: facts of the run (options, counts, ...); shard and table lists are added.

    Returns:
        The manifest dict as written.
    """
    old = [
        p
        for p in _list(directory)
        if _ours(_relative(directory, p))
        and _relative(directory, p) != LOCK
        and not _relative(directory, p).startswith(STAGING + "/")
    ]
    old_manifest = [p for p in old if _relative(directory, p) == MANIFEST]
    # The manifest goes first so a reader never sees it over a mix of shards.
    _delete(old_manifest)
    _delete([p for p in old if p not in old_manifest])
    places = {"rows": directory, "errors": join(directory, ERRORS_DIR), "tables": join(directory, TABLES_DIR)}
    sources, targets, shards = [], [], {role: [] for role in places}
    for role, target_dir in places.items():
        for path, rows in staged.get(role, []):
            target = join(target_dir, posixpath.basename(path))
            sources.append(path)
            targets.append(target)
            shards[role].append({"file": _relative(directory, target), "rows": rows})
        if role != "rows" and staged.get(role) and not FileSystems.exists(target_dir):
            FileSystems.mkdirs(target_dir)
    FileSystems.rename(sources, targets)
    for entry in shards["rows"] + shards["errors"] + shards["tables"]:
        entry.update(file_digest(join(directory, entry["file"])))
    remove_staging(directory, run_id)
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


class OutputLock:
    """Holds an output directory for one run, so two runs never write into one directory.

    Locally the lock is `fcntl.flock` on `OUTPUT/_LOCK`: the kernel releases it
    when the holder exits, however it exits (SIGKILL and power loss included),
    so a killed run never leaves the directory stuck.  Object stores have no
    locks, so there `_LOCK` is a lease: the holder rewrites it every
    LEASE_RENEW_SECONDS and a lease not renewed for LEASE_SECONDS is taken over.
    Two runs starting within the same second on object storage can still both
    pass; the check after writing narrows that window but cannot close it.

    Use as a context manager; raises `OutputBusyError` when another live run holds it.
    """

    def __init__(self, directory, run_label=None):
        self.directory = directory
        self.path = join(directory, LOCK)
        self.holder = {
            "run": run_label or new_run_id(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.time(),
        }
        self._fd = None
        self._created_directory = False
        self._stop = threading.Event()
        self._renewer = None

    def __enter__(self):
        if is_local(self.directory):
            self._acquire_local()
        else:
            self._acquire_lease()
        return self

    def __exit__(self, *exc_info):
        self.release()
        return False

    def _busy(self, holder):
        who = (
            f"run {holder.get('run')} (pid {holder.get('pid')} on {holder.get('host')}, started "
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder.get('started', 0)))})"
            if holder
            else "another run"
        )
        return OutputBusyError(
            f"--output {self.directory!r} is in use by {who}. Wait for it to finish, or choose "
            "another --output; two runs must never write one directory."
        )

    def _acquire_local(self):
        import fcntl

        if not os.path.isdir(self.directory):
            os.makedirs(self.directory)
            self._created_directory = True
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_json_fd(fd)
                os.close(fd)
                raise self._busy(holder) from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            # The holder released and unlinked the file between our open and our
            # flock: the lock we got is on a dead inode, so start again.
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(self.holder).encode("utf-8"))
        self._fd = fd

    def _write_lease(self):
        with FileSystems.create(self.path) as handle:
            handle.write(json.dumps(dict(self.holder, renewed=time.time())).encode("utf-8"))

    def _read_lease(self):
        if not FileSystems.exists(self.path):
            return None
        with FileSystems.open(self.path) as handle:
            try:
                return json.loads(handle.read().decode("utf-8"))
            except ValueError:
                return None

    def _acquire_lease(self, settle_seconds=1.0):
        holder = self._read_lease()
        if holder and time.time() - holder.get("renewed", 0) < LEASE_SECONDS:
            raise self._busy(holder)
        self._write_lease()
        time.sleep(settle_seconds)
        holder = self._read_lease()
        if not holder or holder.get("run") != self.holder["run"]:
            raise self._busy(holder)
        self._renewer = threading.Thread(target=self._renew, name="OutputLockRenewer", daemon=True)
        self._renewer.start()

    def _renew(self):
        while not self._stop.wait(LEASE_RENEW_SECONDS):
            try:
                self._write_lease()
            except Exception as error:  # A missed renewal is retried; the lease lasts 5 of them.
                logging.warning("Could not renew the lock %s: %s", self.path, error)

    def release(self):
        """Gives the directory up (idempotent); removes the lock file and an empty directory we made."""
        if self._fd is not None:
            # Unlink before unlocking: a waiter that opened the old file sees a
            # different inode after its flock and starts again.
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            os.close(self._fd)
            self._fd = None
            if self._created_directory and os.path.isdir(self.directory) and not os.listdir(self.directory):
                os.rmdir(self.directory)
        elif self._renewer is not None:
            self._stop.set()
            self._renewer.join()
            self._renewer = None
            holder = self._read_lease()
            if holder and holder.get("run") == self.holder["run"]:
                _delete([self.path])


def _read_json_fd(fd):
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return json.loads(os.read(fd, 1 << 16).decode("utf-8"))
    except (OSError, ValueError):
        return None
