"""The output directory's life cycle: lock, stage, a journaled crash-safe commit, the manifest; what is ours.

Layout of a finished export::

    OUTPUT/part-SSSSS-of-NNNNN.parquet          the rows
    OUTPUT/errors/part-SSSSS-of-NNNNN.parquet   the dead letters
    OUTPUT/_tables/LAYER.parquet                --token_storage ids: each Embedding's table, once
    OUTPUT/_index/COLUMN.*                      `pipeline.analyze OUT index`: an ANN index, added later
    OUTPUT/_MANIFEST.json                       marks success: counts, shards with sizes and SHA-256
    OUTPUT/_failed/RUN/                         a failed --overwrite run that kept the earlier export:
                                                its _MANIFEST.json and errors/ (dead letters)

Readers of the rows use `OUTPUT/part-*.parquet` (DuckDB, polars, BigQuery) or
`pd.read_parquet(OUTPUT, ignore_prefixes=READER_IGNORE_PREFIXES)`, since a
plain recursive read would also pick up `errors/`.

While a run is in flight it holds `OUTPUT/_LOCK` (see `OutputLock`) and its
files live under `OUTPUT/_staging/RUN_ID/`, which readers skip (pyarrow.dataset
ignores names starting with "_"; a `OUTPUT/*.parquet` glob does not descend
into it).

The commit is a journaled roll-forward (`commit`).  First, touching nothing of
the old export, it does everything that needs space or may fail slowly: it
hashes every staged file, stages the new manifest and writes the journal
`OUTPUT/_COMMIT.json` (old files to delete, each staged -> final rename with
its size and SHA-256).  Once the journal is in place the commit only deletes
and renames (no space needed), each step idempotent: the old manifest goes
first, then the old files the new ones do not replace, then each rename, then
the manifest's, then the staging directory and the journal.  Whatever ends the
process, the directory holds the old export (no journal yet) or a journal from
which `recover_interrupted_commit` finishes the new one; every command that
opens an output does so first.

Nothing here ever deletes a file this project did not write, nor anything
through a symbolic link: a directory that holds anything else (a file, a
symbolic link, an unknown empty directory) is "foreign" and refused,
`--overwrite` or not.
"""

import contextlib
import errno
import hashlib
import json
import logging
import os
import posixpath
import re
import shutil
import signal
import socket
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from pipeline.errors import ExportConfigError, OutputBusyError, OutputWriteError
from pipeline.uris import is_local

MANIFEST = "_MANIFEST.json"
LOCK = "_LOCK"
# The commit's journal: present only while a commit is between its first and last step.
JOURNAL = "_COMMIT.json"
# pyarrow.dataset (and so pandas) reads directories recursively: these prefixes
# keep the dead letters and the staging area out of a read of the rows.
READER_IGNORE_PREFIXES = ["_", ".", "errors"]
STAGING = "_staging"
ERRORS_DIR = "errors"
# "_" keeps the tables out of a read of the directory, as for the staging area.
TABLES_DIR = "_tables"
# Failed --overwrite runs that kept a succeeded export: _failed/RUN/{_MANIFEST.json,errors/}.
FAILED_DIR = "_failed"
# `python -m pipeline.analyze OUT index`: tied to the manifest, so replacing the export drops or outdates it.
INDEX_DIR = "_index"
SHARD_PREFIX = "part-"
# Beam's default shard names: part-00000-of-00004.parquet.
SHARD_NAME = re.compile(r"part-\d{5,}-of-\d{5,}\.parquet")
_RUN_ID = r"[0-9A-Za-z_-]+"
_FAILED_FILE = re.compile(
    rf"{FAILED_DIR}/{_RUN_ID}/({re.escape(MANIFEST)}|{ERRORS_DIR}/part-\d{{5,}}-of-\d{{5,}}\.parquet)"
)
_KNOWN_DIRECTORY = re.compile(
    rf"({ERRORS_DIR}|{TABLES_DIR}|{INDEX_DIR}|{STAGING}(/.*)?|{FAILED_DIR}(/{_RUN_ID}(/{ERRORS_DIR})?)?)"
)
# A lock on object storage is a lease: its holder rewrites it every
# LEASE_RENEW_SECONDS, and one not rewritten for LEASE_SECONDS belongs to a dead run.
LEASE_SECONDS = 300
LEASE_RENEW_SECONDS = 60

# Tests set this to a callable(action, relative path) that the commit calls before
# each filesystem step ("hash", "write", "rename", "copy", "delete", "mkdir"), to
# kill or fail it at exactly that step.
step_hook: Callable[[str, str], None] | None = None

# Where the commit of this process stands, for the signal handlers of `pipeline.run`:
# "idle" (nothing of the output touched yet), "committing" (SIGINT and SIGTERM must
# wait) or "committed".
_commit_phase = "idle"


def commit_phase() -> str:
    """ "idle", "committing" or "committed": whether an interrupt now would cut a commit short."""
    return _commit_phase


def reset_commit_phase() -> None:
    """Marks the start of a new run in this process (tests run several)."""
    global _commit_phase
    _commit_phase = "idle"
    _deferred_signals.clear()


# Signals that arrived while a commit was in flight, for `_committing` to deliver after it.
_deferred_signals: list[int] = []


def defer_signal(signum: int) -> None:
    """Called by a signal handler that found a commit in flight: the signal is delivered after it."""
    _deferred_signals.append(signum)


@contextlib.contextmanager
def _committing(done_phase: str | None = None) -> Iterator[None]:
    """Marks a commit in flight; afterwards the phase is `done_phase` on success, else what it was.

    A signal deferred meanwhile is raised again once the phase is back to
    "idle" (a recovery before a run: the run itself stops now); after a commit
    ("committed") the handler that deferred it reports it.
    """
    global _commit_phase
    before = _commit_phase
    _commit_phase = "committing"
    try:
        yield
    except BaseException:
        _commit_phase = before
        raise
    _commit_phase = done_phase or before
    if _commit_phase == "idle" and _deferred_signals:
        signal.raise_signal(_deferred_signals.pop())


def _step(action: str, relative: str) -> None:
    if step_hook is not None:
        step_hook(action, relative)


def join(base, *parts):
    """Joins path parts for local paths and URIs alike."""
    return FileSystems.join(base, *parts)


def list_files(directory):
    """Paths of the files under `directory` (empty if it does not exist); locally never through a link."""
    if is_local(directory):
        return [os.path.join(directory, relative) for relative, kind in _entries(directory) if kind == "file"]
    try:
        result = FileSystems.match([join(directory, "**")])[0]
    except Exception:  # Match on a missing directory raises on some Beam versions.
        return []
    return [metadata.path for metadata in result.metadata_list]


def _entries(directory: str) -> Iterator[tuple[str, str]]:
    """(path relative to `directory`, kind) of what is under it, lazily, never following a link.

    Kinds: "file", "link" (a symbolic link, to anything), "other" (a pipe, a
    socket, a device) and "directory" (an empty one).  On object storage only files exist.
    """
    if not is_local(directory):
        for path in list_files(directory):
            relative = _relative(directory, path)
            if path.endswith("/"):
                # A folder marker (an empty "DIR/" object, as consoles and some tools make): the
                # output's own is nothing, others are directories, ours only where a run makes one.
                if relative.rstrip("/"):
                    yield relative.rstrip("/"), "directory"
                continue
            yield relative, "file"
        return
    # The output itself may be a link the user made; nothing below it is followed.
    directory = os.path.realpath(directory)
    if not os.path.isdir(directory):
        return
    for root, directories, names in os.walk(directory):
        for name in list(directories):
            if os.path.islink(os.path.join(root, name)):
                # os.walk does not descend into it; reporting it keeps it from being "empty".
                yield _local_relative(directory, os.path.join(root, name)), "link"
        for name in names:
            path = os.path.join(root, name)
            mode = os.lstat(path).st_mode
            kind = "link" if stat.S_ISLNK(mode) else "file" if stat.S_ISREG(mode) else "other"
            yield _local_relative(directory, path), kind
        if not directories and not names and root != directory:
            yield _local_relative(directory, root), "directory"


def _local_relative(directory, path):
    return os.path.relpath(path, directory).replace(os.sep, "/")


def _iter_relatives(directory):
    """Paths of the files under `directory`, relative to it; lazily (a huge foreign one is not walked)."""
    for relative, kind in _entries(directory):
        if kind == "file":
            yield relative


def _relative(directory, path):
    base = directory.rstrip("/")
    return path[len(base) + 1 :] if path.startswith(base + "/") else posixpath.basename(path)


def _ours(relative):
    """Whether a file's path relative to the output directory is one this project writes."""
    return (
        relative in (MANIFEST, MANIFEST + ".tmp", LOCK, JOURNAL)
        or relative.startswith(STAGING + "/")
        or bool(SHARD_NAME.fullmatch(relative))
        or (relative.startswith(TABLES_DIR + "/") and relative.endswith(".parquet"))
        or bool(re.fullmatch(INDEX_DIR + r"/([^/]+\.(usearch|json)(\.tmp)?)?", relative))
        or (
            relative.startswith(ERRORS_DIR + "/")
            and bool(SHARD_NAME.fullmatch(relative[len(ERRORS_DIR) + 1 :]))
        )
        or bool(_FAILED_FILE.fullmatch(relative))
    )


def _entry_is_ours(relative: str, kind: str) -> bool:
    if kind == "file":
        return _ours(relative)
    # An empty directory is ours only where a run makes one; no link ever is.
    return kind == "directory" and bool(_KNOWN_DIRECTORY.fullmatch(relative))


def _describe(relative: str, kind: str) -> str:
    if kind == "link":
        return f"{relative} (a symbolic link)"
    if kind == "directory":
        return f"{relative}/ (an empty directory)"
    if kind == "other":
        return f"{relative} (not a regular file)"
    return relative


def is_regular_file(path):
    """Whether `path` names a file (not a directory, nor an object-store prefix)."""
    if is_local(path):
        return os.path.isfile(path)
    return FileSystems.exists(path)


def output_state(directory):
    """ "empty", "finished" (a manifest or a commit to finish), "unfinished" (our leftovers) or "foreign"."""
    relatives = []
    for relative, kind in _entries(directory):
        if not _entry_is_ours(relative, kind):
            return "foreign"
        # The lock is the live run's (ours, once we hold it), not a leftover.
        if relative != LOCK:
            relatives.append(relative)
    if not relatives:
        return "empty"
    return "finished" if MANIFEST in relatives or JOURNAL in relatives else "unfinished"


def foreign_files(directory, limit=5):
    """A few of the entries in `directory` that no export wrote, for error messages."""
    found = []
    for relative, kind in _entries(directory):
        if not _entry_is_ours(relative, kind):
            found.append(_describe(relative, kind))
            if len(found) == limit:
                break
    return sorted(found)


def _refuse_links(directory: str, relative: str) -> str:
    """The local path of `relative` under `directory`, after checking that no part of it is a link.

    Raises:
        ExportConfigError: naming the link, so nothing is ever deleted or moved through one.
    """
    path = directory
    for part in relative.split("/"):
        path = os.path.join(path, part)
        if os.path.islink(path):
            raise ExportConfigError(
                f"--output {directory!r} holds a symbolic link, {_local_relative(directory, path)!r}; "
                "an export never deletes or writes through one. Remove the link or choose another --output."
            )
    return path


def delete_files(paths):
    """Deletes files (object storage or local, never through a link); missing ones are skipped."""
    for path in paths:
        if is_local(path):
            if os.path.islink(path):
                raise ExportConfigError(f"{path!r} is a symbolic link; an export never deletes through one.")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        elif FileSystems.exists(path):
            FileSystems.delete([path])


def _delete_relative(directory: str, relative: str) -> None:
    _step("delete", relative)
    if is_local(directory):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(_refuse_links(directory, relative))
    else:
        path = join(directory, relative)
        if FileSystems.exists(path):
            FileSystems.delete([path])


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


def check_writable(directory: str) -> None:
    """Refuses a local --output that cannot be made: below a file, or on a read-only path.

    Raises:
        ExportConfigError: naming the file or the read-only directory.
    """
    if not is_local(directory):
        return
    existing = os.path.abspath(directory)
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ExportConfigError(
            f"--output {directory!r} is below {existing!r}, which is a file, not a directory; "
            "choose an --output whose parent is a directory."
        )
    read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
    if read_only or not os.access(existing, os.W_OK | os.X_OK):
        raise ExportConfigError(
            f"--output {directory!r} cannot be written: {existing!r} is "
            f"{'on a read-only filesystem' if read_only else 'not writable by this user'}. "
            "Choose a writable --output."
        )


def prepare(directory, overwrite, find_resumable=None):
    """Checks the output again under the lock and removes what dead runs left; returns a run id.

    Call it while holding `OutputLock(directory)`: then no other live run uses
    the directory, so every staging directory and every unfinished file in it
    belongs to a run that died.  A finished export is kept until `commit`
    replaces it, so a failed `--overwrite` run does not destroy the previous result.
    `find_resumable(directory)` may name one dead run's staging directory to
    keep (`pipeline.writing.resume`); its id is then returned instead of a new one.

    Raises:
        ExportConfigError: foreign files, or a finished export without `overwrite`
            (another run may have finished there since the launch-time check).
    """
    # An interrupted commit is finished first: its staging directory is the new export.
    recover_interrupted_commit(directory)
    state = check_output_state(directory, overwrite)
    resumed = find_resumable(directory) if find_resumable else None
    if state == "unfinished":
        leftovers = [
            p
            for p in list_files(directory)
            if _relative(directory, p) != LOCK and not _relative(directory, p).startswith(STAGING + "/")
        ]
        if leftovers:
            logging.warning(
                "Removing %d files left in %s by a run that did not finish.", len(leftovers), directory
            )
        delete_files(leftovers)
    if resumed:
        for run_id in staging_runs(directory):
            if run_id != resumed:
                remove_staging(directory, run_id)
        return resumed
    remove_staging(directory)
    return new_run_id()


def staging_runs(directory):
    """The run ids that have a staging directory (locally, an empty one too)."""
    staging = join(directory, STAGING)
    if is_local(directory):
        return sorted(os.listdir(staging)) if os.path.isdir(staging) else []
    prefix = staging.rstrip("/") + "/"
    return sorted({p[len(prefix) :].split("/", 1)[0] for p in list_files(staging) if p.startswith(prefix)})


def new_run_id():
    """A fresh id naming a run's staging directory."""
    return uuid.uuid4().hex[:12]


def _remove_tree(directory):
    """Deletes the files under `directory` and, locally, the emptied directories; never through a link."""
    if is_local(directory):
        if os.path.islink(directory):
            raise ExportConfigError(f"{directory!r} is a symbolic link; an export never deletes through one.")
        if not os.path.isdir(directory):
            return
        links = [relative for relative, kind in _entries(directory) if kind == "link"]
        if links:
            raise ExportConfigError(
                f"{directory!r} holds a symbolic link ({links[0]!r}); an export never deletes through one."
            )
        shutil.rmtree(directory)
        return
    delete_files(list_files(directory))


def remove_staging(directory, run_id=None):
    """Deletes one run's staging directory, or (`run_id` None) the whole staging area."""
    staging = join(directory, STAGING)
    _remove_tree(join(staging, run_id) if run_id else staging)
    if run_id and is_local(staging) and os.path.isdir(staging) and not os.listdir(staging):
        os.rmdir(staging)


def staging_prefixes(directory, run_id):
    """(rows prefix, dead-letters prefix) for a run's shards."""
    staging = join(directory, STAGING, run_id)
    return join(staging, "data", "part"), join(staging, ERRORS_DIR, "part")


def staging_tables_dir(directory, run_id):
    """Where a run stages its token tables (`--token_storage ids`) until the commit."""
    return join(directory, STAGING, run_id, TABLES_DIR)


def staged_bytes(directory, run_id=None):
    """How many bytes one run's staging directory (or the whole staging area) holds."""
    root = join(directory, STAGING, run_id) if run_id else join(directory, STAGING)
    if is_local(root):
        return sum(
            os.lstat(os.path.join(root, relative)).st_size
            for relative, kind in _entries(root)
            if kind == "file"
        )
    try:
        return sum(m.size_in_bytes for m in FileSystems.match([join(root, "**")])[0].metadata_list)
    except Exception:  # Nothing staged.
        return 0


def _row_count(path):
    with FileSystems.open(path) as handle:
        return pq.ParquetFile(handle).metadata.num_rows


def staged_shards(directory, run_id):
    """The run's staged shards with their row counts, read once from the Parquet footers.

    Returns:
        {"rows": [(path, rows), ...], "errors": [...], "tables": [...]}, sorted by path.
    """
    paths = sorted(list_files(join(directory, STAGING, run_id)))
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


def file_digest(path: str) -> dict:
    """{"bytes": size, "sha256": hex} of a file, local or on object storage (which it reads once).

    Locally the file is also flushed to disk (fsync), since the commit journal
    about to name it must not outlive its contents on a power loss.
    """
    digest = hashlib.sha256()
    size = 0
    if is_local(path):
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
                size += len(chunk)
            os.fsync(handle.fileno())
    else:
        with FileSystems.open(path, compression_type="uncompressed") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
                size += len(chunk)
    return {"bytes": size, "sha256": digest.hexdigest()}


def _fsync_directory(directory: str) -> None:
    if is_local(directory):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_json(directory: str, relative: str, value: dict) -> None:
    """Writes `value` as JSON at `relative` (locally flushed to disk before it returns)."""
    _step("write", relative)
    data = json.dumps(value, indent=2, ensure_ascii=False).encode("utf-8")
    if is_local(directory):
        path = _refuse_links(directory, relative)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        return
    with FileSystems.create(join(directory, relative)) as handle:
        handle.write(data)


def _read_json(path: str) -> dict:
    with FileSystems.open(path, compression_type="uncompressed") as handle:
        return json.loads(handle.read().decode("utf-8"))


def _move(directory: str, source: str, target: str) -> None:
    """Moves `source` over `target` (relative paths): a rename locally, copy then delete on object storage."""
    if is_local(directory):
        _step("rename", target)
        os.replace(_refuse_links(directory, source), _refuse_links(directory, target))
        return
    _step("copy", target)
    FileSystems.copy([join(directory, source)], [join(directory, target)])
    _delete_relative(directory, source)


def _mkdir(directory: str, relative: str) -> None:
    if is_local(directory):
        _step("mkdir", relative)
        os.makedirs(_refuse_links(directory, relative), exist_ok=True)


def _exists(directory: str, relative: str) -> bool:
    if is_local(directory):
        return os.path.lexists(os.path.join(directory, relative))
    return FileSystems.exists(join(directory, relative))


def _safe_relative(relative: object) -> bool:
    return (
        isinstance(relative, str)
        and bool(relative)
        and not relative.startswith("/")
        and "\\" not in relative
        and all(part not in ("", ".", "..") for part in relative.split("/"))
    )


def _commit_targets(role: str, path: str) -> str:
    folder = {"rows": "", "errors": ERRORS_DIR, "tables": TABLES_DIR}[role]
    return posixpath.join(folder, posixpath.basename(path)) if folder else posixpath.basename(path)


def commit(directory, run_id, staged, manifest):
    """Replaces whatever export `directory` holds by the run's staged one, crash-safely (see the module doc).

    Args:
        directory: the output directory (hold its `OutputLock`).
        run_id: this run's id; only its staging directory is removed.
        staged: `staged_shards(directory, run_id)`.
        manifest: facts of the run (options, counts, ...); shard and table lists are added.

    Returns:
        The manifest dict as written.

    Raises:
        OutputWriteError: the commit could not start (the old export is untouched and
            this run's staging directory removed) or could not finish (the journal stays
            and the next command on the output finishes it).
    """
    staging = posixpath.join(STAGING, run_id)
    with _committing(done_phase="committed"):
        try:
            journal, manifest = _prepare_commit(directory, run_id, staged, manifest)
            # The commit point: once the journal is in place the new export is the one that survives.
            _move(directory, posixpath.join(staging, JOURNAL), JOURNAL)
            _fsync_directory(directory)
            _replay(directory, journal)
        except OSError as error:
            if _journal_written(directory):
                raise OutputWriteError(
                    f"The commit to --output {directory!r} stopped part-way: {_reason(error)}. Its "
                    f"journal {JOURNAL} keeps the new export recoverable: once the cause is fixed, the "
                    "next run on this output (or `python -m pipeline.analyze` of it) finishes the commit."
                ) from error
            # Nothing of the old export was touched; free what this run staged.
            with contextlib.suppress(Exception):
                remove_staging(directory, run_id)
            raise OutputWriteError(
                f"Could not commit to --output {directory!r}: {_reason(error)}. The earlier content of "
                f"the output is untouched; this run's staged files ({staging}/) were removed. Fix the "
                "cause and rerun."
            ) from error
    return manifest


def _journal_written(directory: str) -> bool:
    """Whether the journal is in place; if that cannot be told, assume so (never delete the staged export)."""
    try:
        return has_pending_commit(directory)
    except Exception:
        return True


def _reason(error: BaseException) -> str:
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return "the disk is full (no space left on device)"
    return str(error) or type(error).__name__


def _prepare_commit(directory, run_id, staged, manifest):
    """Hashes the staged files, stages the manifest and the journal; touches nothing outside the staging."""
    staging = posixpath.join(STAGING, run_id)
    renames, shards = [], {role: [] for role in ("rows", "errors", "tables")}
    for role in shards:
        for path, rows in staged.get(role, []):
            source = _relative(directory, path)
            target = _commit_targets(role, path)
            _step("hash", source)
            digest = file_digest(path)
            renames.append({"from": source, "to": target, **digest})
            shards[role].append({"file": target, "rows": rows, **digest})
    targets = {rename["to"] for rename in renames}
    old = sorted(
        relative
        for relative in _iter_relatives(directory)
        if _ours(relative)
        and relative not in (LOCK, JOURNAL, MANIFEST)
        and not relative.startswith(STAGING + "/")
        and relative not in targets
    )
    tables = shards.pop("tables")
    manifest = dict(manifest, shards=shards, tables=tables)
    staged_manifest = posixpath.join(staging, MANIFEST)
    _write_json(directory, staged_manifest, manifest)
    journal = {
        "run": run_id,
        "manifest": staged_manifest,
        "delete": old,
        "directories": sorted({posixpath.dirname(r["to"]) for r in renames} - {""}),
        "renames": renames,
    }
    _write_json(directory, posixpath.join(staging, JOURNAL), journal)
    return journal, manifest


def _check_journal(directory: str, journal: object) -> dict:
    """The journal, after checking it only names our files inside the output.

    Raises:
        ExportConfigError: a journal that is damaged or names other files.
    """
    try:
        run = journal["run"]
        staging = posixpath.join(STAGING, run) + "/"
        good = (
            _safe_relative(run)
            and "/" not in run
            and journal["manifest"] == staging + MANIFEST
            and all(
                _safe_relative(r)
                and _ours(r)
                and not r.startswith(STAGING + "/")
                and r not in (LOCK, JOURNAL)
                for r in journal["delete"]
            )
            and all(_safe_relative(d) and _KNOWN_DIRECTORY.fullmatch(d) for d in journal["directories"])
            and all(
                _safe_relative(r["from"])
                and r["from"].startswith(staging)
                and _safe_relative(r["to"])
                and _ours(r["to"])
                and not r["to"].startswith((STAGING + "/", FAILED_DIR + "/"))
                and r["to"] not in (LOCK, JOURNAL, MANIFEST)
                and isinstance(r["bytes"], int)
                and isinstance(r["sha256"], str)
                for r in journal["renames"]
            )
        )
    except (KeyError, TypeError, AttributeError):
        good = False
    if not good:
        raise ExportConfigError(
            f"{join(directory, JOURNAL)} is damaged or names files that are not this export's, so the "
            "interrupted commit it describes cannot be finished safely. Move the output's files away "
            "by hand (the staged export is under _staging/) and rerun."
        )
    return journal


def _replay(directory: str, journal: dict) -> None:
    """Carries out a commit's journal; every step is idempotent, so a replay after any crash finishes it."""
    staging = posixpath.join(STAGING, journal["run"])
    if _exists(directory, journal["manifest"]):
        # Old manifest first: from here a reader sees no manifest over a mix of shards.
        _delete_relative(directory, MANIFEST)
        for relative in journal["delete"]:
            _delete_relative(directory, relative)
        for relative in journal["directories"]:
            _mkdir(directory, relative)
        for rename in journal["renames"]:
            if _exists(directory, rename["from"]):
                _move(directory, rename["from"], rename["to"])
            else:
                _check_moved(directory, rename)
        _move(directory, journal["manifest"], MANIFEST)
        _fsync_directory(directory)
    elif not _exists(directory, MANIFEST):
        raise ExportConfigError(
            f"The interrupted commit in {directory!r} cannot be finished: neither its staged manifest "
            f"({journal['manifest']}) nor {MANIFEST} exists. Something other than an export changed the "
            "output; remove it and export again."
        )
    _step("delete", staging + "/")
    remove_staging(directory, journal["run"])
    _remove_empty_directories(directory)
    _delete_relative(directory, JOURNAL)
    _fsync_directory(directory)


def _check_moved(directory: str, rename: dict) -> None:
    """Checks that a rename whose source is gone did happen: its target has the journaled size and hash."""
    target = join(directory, rename["to"])
    if not _exists(directory, rename["to"]) or file_digest(target) != {
        "bytes": rename["bytes"],
        "sha256": rename["sha256"],
    }:
        raise ExportConfigError(
            f"The interrupted commit in {directory!r} cannot be finished: {rename['from']} is gone and "
            f"{rename['to']} is {'not the staged file' if _exists(directory, rename['to']) else 'missing'}. "
            "Something other than an export changed the output; remove it and export again."
        )


def _remove_empty_directories(directory: str) -> None:
    """Locally, removes the directories (errors/, _tables/, _failed/) that the new export left empty."""
    if not is_local(directory):
        return
    for relative in (ERRORS_DIR, TABLES_DIR, FAILED_DIR):
        path = os.path.join(directory, relative)
        if os.path.isdir(path) and not os.path.islink(path):
            for root, _, _ in sorted(os.walk(path), key=lambda entry: -len(entry[0])):
                with contextlib.suppress(OSError):  # Not empty: kept.
                    os.rmdir(root)


def has_pending_commit(directory: str) -> bool:
    """Whether a commit into `directory` was interrupted (or is in flight) and must be finished."""
    return _exists(directory, JOURNAL)


def recover_interrupted_commit(directory: str) -> bool:
    """Finishes a commit that a crash or kill cut short, from its journal; call it holding the lock.

    Returns:
        Whether there was one.

    Raises:
        ExportConfigError: a damaged journal, or one whose files were changed by hand.
    """
    if not has_pending_commit(directory):
        return False
    journal = _check_journal(directory, _read_json(join(directory, JOURNAL)))
    logging.warning(
        "Finishing the commit of run %s into %s, which was interrupted (journal %s).",
        journal["run"],
        directory,
        JOURNAL,
    )
    with _committing():
        _replay(directory, journal)
    return True


def finish_interrupted_commit(directory: str) -> bool:
    """`recover_interrupted_commit` for a command that does not hold the lock: takes it for the while.

    Raises:
        OutputBusyError: a live run holds the output (and is committing into it).
    """
    if not has_pending_commit(directory):
        return False
    with OutputLock(directory):
        return recover_interrupted_commit(directory)


def set_aside_failed_run(directory: str, run_id: str, staged: dict, manifest: dict) -> str:
    """Keeps a failed run's dead letters and manifest in `_failed/RUN/`, drops its rows; returns that folder.

    For a run that must not replace the succeeded export already in `directory`
    (see `pipeline.running.export`): the export is left as it was.
    """
    failed = posixpath.join(FAILED_DIR, run_id)
    errors = []
    _mkdir(directory, posixpath.join(failed, ERRORS_DIR))
    for path, rows in staged.get("errors", []):
        target = posixpath.join(failed, ERRORS_DIR, posixpath.basename(path))
        _move(directory, _relative(directory, path), target)
        errors.append({"file": target, "rows": rows})
    manifest = dict(manifest, committed=False, shards={"rows": [], "errors": errors}, tables=[])
    _write_json(directory, posixpath.join(failed, MANIFEST), manifest)
    remove_staging(directory, run_id)
    return join(directory, failed)


def read_manifest(directory):
    """The manifest of a finished export, or None."""
    path = join(directory, MANIFEST)
    if not FileSystems.exists(path):
        return None
    return _read_json(path)


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
        try:
            if not os.path.isdir(self.directory):
                os.makedirs(self.directory)
                self._created_directory = True
            while not self._try_local():
                pass
        except OSError as error:
            # Below a file, on a read-only filesystem, a _LOCK that is a symbolic link, ...
            raise ExportConfigError(
                f"--output {self.directory!r} cannot be written: {error.strerror or error} "
                f"({error.filename or self.path}). Choose a writable --output; an export never "
                "writes through a symbolic link."
            ) from None

    def _try_local(self):
        """Takes the flock on `_LOCK`; False when the file was replaced meanwhile (try again)."""
        import fcntl

        # O_NOFOLLOW: a _LOCK that is a link would have us truncate the file it points to.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
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
        if not same:
            # The holder released and unlinked the file between our open and our
            # flock: the lock we got is on a dead inode, so start again.
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(self.holder).encode("utf-8"))
        self._fd = fd
        return True

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
                delete_files([self.path])


def _read_json_fd(fd):
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return json.loads(os.read(fd, 1 << 16).decode("utf-8"))
    except (OSError, ValueError):
        return None
