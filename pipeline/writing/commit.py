"""The journaled, crash-safe commit of a run's staged export into the output, and its recovery.

The commit is a journaled roll-forward (`commit`).  First, touching nothing of
the old export, it does everything that needs space or may fail slowly: it
hashes every staged file, stages the new manifest and writes the journal
`OUTPUT/_COMMIT.json` (old files to delete, each staged -> final rename with
its size and SHA-256, the run's signature).  Once the journal is in place the commit only deletes
and renames (no space needed), each step idempotent: the old manifest goes
first, then the old files the new ones do not replace, then each rename, then
the manifest's, then the staging directory and the journal.  Whatever ends the
process, the directory holds the old export (no journal yet) or a journal from
which `recover_interrupted_commit` finishes the new one; every command that
opens an output does so first.

A failed run that must not replace a succeeded export is not committed:
`set_aside_failed_run` keeps its dead letters and manifest in `_failed/RUN/`.
"""

import concurrent.futures
import contextlib
import errno
import logging
import os
import posixpath
from collections.abc import Callable
from typing import Any, Literal, NotRequired, TypedDict

from pipeline.errors import ExportConfigError, LockLostError, OutputWriteError
from pipeline.uris import is_local
from pipeline.writing.commit_phase import committing, note_recovered
from pipeline.writing.files import (
    FileDigest,
    JsonObject,
    delete_relative,
    exists,
    file_digest,
    fsync_directory,
    guarded_steps,
    iter_relative_files,
    join,
    list_files,
    make_directory,
    move,
    read_json,
    relative_to,
    step,
    write_json,
)
from pipeline.writing.layout import (
    ERRORS_DIR,
    FAILED_DIR,
    INDEX_DIR,
    INDEX_FILE,
    JOURNAL,
    KNOWN_DIRECTORY,
    LOCK,
    MANIFEST,
    STAGING,
    TABLES_DIR,
    index_files,
    is_index_metadata_name,
    is_ours,
)
from pipeline.writing.lock import OutputLock
from pipeline.writing.staging import StagedShards, remove_staging

# The roles of a run's staged files, the keys of `StagedShards`.
Role = Literal["rows", "errors", "tables"]
ROLES: tuple[Role, ...] = ("rows", "errors", "tables")
# One staged -> final rename of the journal, with the staged file's digest ("from" is a keyword).
Rename = TypedDict("Rename", {"from": str, "to": str, "bytes": int, "sha256": str})
# Staged files hashed at once: reading and hashing one uses about one core (local) or waits on
# the network (object storage).
HASH_THREADS = 4
# Raises unless this run still holds the output (`OutputLock.check_held`). The commit calls it
# before its commit point and before each step that changes the output: a run stopped longer
# than its lease (object storage) must change nothing of what the run that took it over made.
Guard = Callable[[], None]


def unguarded() -> None:
    """The guard of a replay whose caller checked the lock itself (it holds it from the start)."""


class Journal(TypedDict):
    """`_COMMIT.json`: what a commit deletes, makes and renames once it is past its commit point."""

    run: str
    manifest: str
    delete: list[str]
    directories: list[str]
    renames: list[Rename]
    # The run's signature (`pipeline.writing.resume.run_signature`), kept here as well as in its
    # `_RUN.json`: the replay removes the staging directory before the journal, and a retry of the
    # same command told by it ends at the recovered export (`pipeline.running.export`).
    signature: NotRequired[object]


class ShardEntry(FileDigest):
    """A committed file as the manifest lists it: where it is, its rows, its size and SHA-256."""

    file: str
    rows: int


def _safe_relative(relative: object) -> bool:
    """Whether `relative` is a relative path that stays inside the output (no "..", not absolute)."""
    return (
        isinstance(relative, str)
        and bool(relative)
        and not relative.startswith("/")
        and "\\" not in relative
        and all(part not in ("", ".", "..") for part in relative.split("/"))
    )


def _commit_targets(role: Role, path: str) -> str:
    """Where a staged file goes: rows at the top, dead letters in errors/, token tables in _tables/."""
    folder = {"rows": "", "errors": ERRORS_DIR, "tables": TABLES_DIR}[role]
    return posixpath.join(folder, posixpath.basename(path)) if folder else posixpath.basename(path)


def commit(
    directory: str,
    run_id: str,
    staged: StagedShards,
    manifest: JsonObject,
    held: Guard = unguarded,
) -> JsonObject:
    """Replaces whatever export `directory` holds by the run's staged one, crash-safely (see the module doc).

    Args:
        directory: the output directory (hold its `OutputLock`).
        run_id: this run's id; only its staging directory is removed.
        staged: `pipeline.writing.staging.staged_shards(directory, run_id)`.
        manifest: facts of the run (options, counts, ...); shard and table lists are added.
        held: raises unless this run still holds the output's lock (`OutputLock.check_held`);
            called before the commit point and before each change to the output.

    Returns:
        The manifest dict as written.

    Raises:
        OutputWriteError: the commit could not start (the old export is untouched and
            this run's staging directory removed) or could not finish (the journal stays
            and the next command on the output finishes it).
        LockLostError: `held` found the lock lost; this run changes nothing more (past the commit
            point, the message names the directory that holds the journal).
    """
    staging = posixpath.join(STAGING, run_id)
    # Where the journal goes, named for a run that loses the output part-way (locally through a
    # link that may be switched meanwhile: the directory it points to now).
    locked = os.path.realpath(directory) if is_local(directory) else directory
    past_commit_point = False
    with committing(done_phase="committed"):
        try:
            journal, manifest = _prepare_commit(directory, run_id, staged, manifest)
            # Hashing a large export takes minutes: from the commit point on, each step first
            # reads the lease again.
            with guarded_steps(held):
                # The commit point: once the journal is in place the new export is the one that survives.
                move(directory, posixpath.join(staging, JOURNAL), JOURNAL)
                past_commit_point = True
                fsync_directory(directory)
                _replay(directory, journal)
        except LockLostError as error:
            if not past_commit_point:
                raise
            # Not "nothing was committed": the journal is in place and some files may be renamed in.
            raise LockLostError(
                error.reason,
                f"It stopped its commit part-way, past its commit point, and changes nothing more: "
                f"{locked!r} holds the commit's journal {JOURNAL} and part of the new export (and no "
                f"{MANIFEST}); the next run on that directory (or `python -m pipeline.analyze` of it) "
                "finishes the commit. Check what it holds then.",
            ) from None
        except OSError as error:
            if journal_written(directory):
                raise OutputWriteError(
                    f"The commit to --output {directory!r} stopped part-way: {_reason(error)}. Its "
                    f"journal {JOURNAL} keeps the new export recoverable: once the cause is fixed, the "
                    "next run on this output (or `python -m pipeline.analyze` of it) finishes the commit."
                ) from error
            # Nothing of the old export was touched. The staged export is kept: the rerun
            # resumes it (a run that did not reach its journal is resumed) rather than embed again.
            raise OutputWriteError(
                f"Could not commit to --output {directory!r}: {_reason(error)}. The earlier content of "
                f"the output is untouched; this run's staged files are kept in {join(directory, staging)}/: "
                "fix the cause, then rerun the same command to commit them without embedding again."
            ) from error
    return manifest


def journal_written(directory: str) -> bool:
    """Whether the journal is in place (the commit got past its commit point); if that cannot be told,
    assume so (never delete the staged export, nor tell a half commit as one that did not start)."""
    try:
        return has_pending_commit(directory)
    except Exception:
        return True


def _reason(error: BaseException) -> str:
    """What stopped the commit, in words for its error message."""
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return "the disk is full (no space left on device)"
    return str(error) or type(error).__name__


def finish_failure(error: OSError, directory: str = "the output") -> str:
    """Why finishing an interrupted commit failed and what to do first, for a message's
    "finishing it failed: ..., then rerun"; `directory`: how the message names the export's."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return "the disk is full (no space left on device). Its journal keeps it recoverable: free space"
    if error.errno in (errno.EEXIST, errno.ENOTDIR) and error.filename:
        return (
            f"{error.filename} is not a folder, where the commit puts its files in one (something other "
            f"than an export put it there). Move it out of {directory}"
        )
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        where = f" ({error.filename})" if error.filename else ""
        return f"{error.strerror}{where}. Make {directory} writable by this user"
    return f"{error.strerror or error}. Its journal keeps it recoverable: fix the cause"


# An index's metadata is a few KiB (a vocabulary's lists a digest per file): a larger file is not one.
MAX_INDEX_METADATA_BYTES = 16 << 20


def owned_index_files(directory: str) -> frozenset[str]:
    """The files under `directory`'s `_index/` that an index build of ours wrote, told by their metadata's
    content (`layout.index_files`), relative to `directory`; a linked `_index` holds none."""
    index_directory = join(directory, INDEX_DIR)
    if is_local(directory) and os.path.islink(index_directory):
        return frozenset()
    owned: set[str] = set()
    for path in list_files(index_directory):
        relative = relative_to(directory, path)
        if not is_index_metadata_name(relative):
            continue
        try:
            if is_local(path) and os.path.getsize(path) > MAX_INDEX_METADATA_BYTES:
                continue
            metadata = read_json(path)
        except Exception:  # Not JSON, not UTF-8, unreadable: nothing shows it is ours.
            continue
        owned |= index_files(relative, metadata)
    return frozenset(owned)


def _prepare_commit(
    directory: str, run_id: str, staged: StagedShards, manifest: JsonObject
) -> tuple[Journal, JsonObject]:
    """Hashes the staged files, stages the manifest and the journal; touches nothing outside the staging."""
    staging = posixpath.join(STAGING, run_id)
    renames: list[Rename] = []
    shards: dict[Role, list[ShardEntry]] = {role: [] for role in ROLES}
    files = [(role, path, rows) for role in shards for path, rows in staged.get(role, [])]
    # Hashing only reads (and flushes) staged files, so they are hashed a few at a time
    # (hashlib and the reads release the GIL); each "hash" step still comes in order.
    with concurrent.futures.ThreadPoolExecutor(max_workers=HASH_THREADS) as pool:
        digests = pool.map(file_digest, [path for _, path, _ in files])
        for (role, path, rows), digest in zip(files, digests, strict=True):
            source = relative_to(directory, path)
            target = _commit_targets(role, path)
            step("hash", source)
            renames.append({"from": source, "to": target, **digest})
            shards[role].append({"file": target, "rows": rows, **digest})
    targets = {rename["to"] for rename in renames}
    owned_index = owned_index_files(directory)
    old = sorted(
        relative
        for relative in iter_relative_files(directory)
        if is_ours(relative, owned_index)
        and relative not in (LOCK, JOURNAL, MANIFEST)
        and not relative.startswith(STAGING + "/")
        and relative not in targets
    )
    tables = shards.pop("tables")
    manifest = dict(manifest, shards=shards, tables=tables)
    staged_manifest = posixpath.join(staging, MANIFEST)
    write_json(directory, staged_manifest, manifest)
    journal: Journal = {
        "run": run_id,
        "manifest": staged_manifest,
        "delete": old,
        "directories": sorted({posixpath.dirname(r["to"]) for r in renames} - {""}),
        "renames": renames,
    }
    signature = _run_signature(directory, run_id)
    if signature is not None:
        journal["signature"] = signature
    write_json(directory, posixpath.join(staging, JOURNAL), journal)
    return journal, manifest


def _check_journal(directory: str, journal: Any) -> Journal:
    """The journal, after checking it only names our files inside the output.

    `journal` is the file's JSON as read, unchecked: any JSON value until this returns.

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
                # An index file was judged ours by its metadata when the journal was written; a
                # replay may find that metadata already deleted.
                and (is_ours(r) or bool(INDEX_FILE.fullmatch(r)))
                and not r.startswith(STAGING + "/")
                and r not in (LOCK, JOURNAL)
                for r in journal["delete"]
            )
            and all(_safe_relative(d) and KNOWN_DIRECTORY.fullmatch(d) for d in journal["directories"])
            and all(
                _safe_relative(r["from"])
                and r["from"].startswith(staging)
                and _safe_relative(r["to"])
                and is_ours(r["to"])
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


def _replay(directory: str, journal: Journal) -> None:
    """Carries out a commit's journal; every step is idempotent, so a replay after any crash finishes it.

    In `commit`, each step first checks that the run still holds the output
    (`files.guarded_steps`): a run that lost its lease while stopped in its replay
    leaves the rest to the run that took it over (which finishes the journal, or
    has already replaced it by its own export).
    """
    staging = posixpath.join(STAGING, journal["run"])
    if exists(directory, journal["manifest"]):
        # Old manifest first: from here a reader sees no manifest over a mix of shards.
        delete_relative(directory, MANIFEST)
        for relative in journal["delete"]:
            delete_relative(directory, relative)
        for relative in journal["directories"]:
            make_directory(directory, relative)
        for rename in journal["renames"]:
            if exists(directory, rename["from"]):
                move(directory, rename["from"], rename["to"])
            else:
                _check_moved(directory, rename)
        # The renames into errors/ and _tables/ are durable before the manifest that lists them.
        for relative in journal["directories"]:
            fsync_directory(join(directory, relative))
        move(directory, journal["manifest"], MANIFEST)
        fsync_directory(directory)
    elif not exists(directory, MANIFEST):
        raise ExportConfigError(
            f"The interrupted commit in {directory!r} cannot be finished: neither its staged manifest "
            f"({journal['manifest']}) nor {MANIFEST} exists. Something other than an export changed the "
            "output; remove it and export again."
        )
    step("delete", staging + "/")
    remove_staging(directory, journal["run"])
    _remove_empty_directories(directory)
    delete_relative(directory, JOURNAL)
    fsync_directory(directory)


def _check_moved(directory: str, rename: Rename) -> None:
    """Checks that a rename whose source is gone did happen: its target has the journaled size and hash."""
    target = join(directory, rename["to"])
    if not exists(directory, rename["to"]) or file_digest(target) != {
        "bytes": rename["bytes"],
        "sha256": rename["sha256"],
    }:
        raise ExportConfigError(
            f"The interrupted commit in {directory!r} cannot be finished: {rename['from']} is gone and "
            f"{rename['to']} is {'not the staged file' if exists(directory, rename['to']) else 'missing'}. "
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
    return exists(directory, JOURNAL)


def recover_interrupted_commit(directory: str) -> bool:
    """Finishes a commit that a crash or kill cut short, from its journal; call it holding the lock.

    Returns:
        Whether there was one.

    Raises:
        ExportConfigError: a damaged journal, or one whose files were changed by hand.
    """
    if not has_pending_commit(directory):
        return False
    journal = _check_journal(directory, read_json(join(directory, JOURNAL)))
    logging.warning(
        "Finishing the commit of run %s into %s, which was interrupted (journal %s).",
        journal["run"],
        directory,
        JOURNAL,
    )
    # What the run was: a rerun of that same export need not embed again. The journal says it (the replay
    # removes the staging directory, and its `_RUN.json`, before the journal); one of an earlier version only
    # in the run's `_RUN.json`.
    signature = journal.get("signature")
    if signature is None:
        signature = _run_signature(directory, journal["run"])
    with committing():
        _replay(directory, journal)
        manifest = None
        with contextlib.suppress(Exception):  # Unreadable: the rerun does its work again.
            manifest = read_json(join(directory, MANIFEST))
        note_recovered(directory, signature, manifest)
    return True


def _run_signature(directory: str, run_id: str) -> object:
    """The signature in a run's `_RUN.json` (`pipeline.writing.resume`), or None where it cannot be read."""
    from pipeline.writing.resume import RUN_FILE

    try:
        run = read_json(join(directory, STAGING, run_id, RUN_FILE))
        return run.get("signature") if isinstance(run, dict) else None
    except Exception:  # Missing, truncated: unknown.
        return None


def finish_interrupted_commit(directory: str) -> bool:
    """`recover_interrupted_commit` for a command that does not hold the lock: takes it for the while.

    Raises:
        OutputBusyError: a live run holds the output (and is committing into it).
    """
    if not has_pending_commit(directory):
        return False
    with OutputLock(directory):
        return recover_interrupted_commit(directory)


def set_aside_failed_run(directory: str, run_id: str, staged: StagedShards, manifest: JsonObject) -> str:
    """Keeps a failed run's dead letters and manifest in `_failed/RUN/`, drops its rows; returns that folder.

    For a run that must not replace the succeeded export already in `directory`
    (see `pipeline.running.export`): the export is left as it was.
    """
    failed = posixpath.join(FAILED_DIR, run_id)
    errors: list[dict[str, str | int]] = []
    # It changes the output as a commit does: a stop signal waits for it (a SIGKILL part-way leaves
    # `_failed/RUN/` without its manifest, which the rerun removes: `state.prepare`).
    with committing(done_phase="committed"):
        make_directory(directory, posixpath.join(failed, ERRORS_DIR))
        for path, rows in staged.get("errors", []):
            target = posixpath.join(failed, ERRORS_DIR, posixpath.basename(path))
            move(directory, relative_to(directory, path), target)
            errors.append({"file": target, "rows": rows})
        manifest = dict(manifest, committed=False, shards={"rows": [], "errors": errors}, tables=[])
        write_json(directory, posixpath.join(failed, MANIFEST), manifest)
        remove_staging(directory, run_id)
    return join(directory, failed)
