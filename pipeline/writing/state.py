"""What an output directory holds, the checks that refuse one a run must not write into, and `prepare`.

An output holds nothing, a finished export (a manifest, or a commit to
finish), the leftovers of runs that died ("unfinished"), or something this
project did not write ("foreign"): a directory that holds anything else (a
file, a symbolic link, an unknown empty directory) is refused, `--overwrite`
or not, since an export never deletes what it did not write.
"""

import contextlib
import logging
import os
import posixpath
from collections.abc import Callable
from typing import Literal

import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from pipeline.errors import ExportConfigError
from pipeline.uris import is_local
from pipeline.writing.commit import owned_index_files, recover_interrupted_commit
from pipeline.writing.files import (
    EntryKind,
    JsonObject,
    delete_files,
    exists,
    iter_entries,
    join,
    list_files,
    read_json,
    relative_to,
)
from pipeline.writing.layout import (
    ERRORS_DIR,
    FAILED_DIR,
    INDEX_FILE,
    JOURNAL,
    KNOWN_DIRECTORY,
    LOCK,
    MANIFEST,
    STAGING,
    is_lock_clock_probe,
    is_ours,
    is_shard,
    new_run_id,
)
from pipeline.writing.schema import ERROR_SCHEMA, METADATA_KEY
from pipeline.writing.staging import remove_staging, staging_runs

OutputState = Literal["empty", "finished", "unfinished", "foreign"]
# How many foreign entries an error names; finding that many ends the look.
FOREIGN_EXAMPLES = 5


def _entry_is_ours(relative: str, kind: EntryKind, owned_index: frozenset[str] = frozenset()) -> bool:
    if kind == "file":
        return is_ours(relative, owned_index)
    # An empty directory is ours only where a run makes one; no link ever is.
    return kind == "directory" and bool(KNOWN_DIRECTORY.fullmatch(relative))


def _is_leftover(relative: str, kind: EntryKind) -> bool:
    """Whether a dead run of ours may have left an entry: its staging area, the lock, a manifest in writing.

    The commit keeps its journal from its first step to its last, so an export's
    files (`part-*.parquet`, `errors/`, `_tables/`, ...) without a manifest or a
    journal beside them were not left by a run of ours: another job's output
    (Beam names its shards the same way), or an export whose manifest was removed.
    """
    if kind == "file":
        return (
            relative in (LOCK, MANIFEST + ".tmp")
            or is_lock_clock_probe(relative)
            or relative.startswith(STAGING + "/")
        )
    return kind == "directory" and bool(KNOWN_DIRECTORY.fullmatch(relative))


def _manifest_shards(directory: str) -> tuple[bool, frozenset[str] | None]:
    """(whether `directory`'s manifest is one an export wrote, the shards it lists or None).

    Another tool's `_MANIFEST.json` (JSON without an export's `status` and
    `shards`) does not make the directory an export, nor its files ours.  A
    manifest that does not parse is a damaged one of ours (an `--overwrite`
    replaces it), which lists nothing: its Parquet files are told by their footers.
    """
    try:
        manifest = read_json(join(directory, MANIFEST))
    except Exception:  # Damaged: not JSON, not UTF-8, unreadable.
        return True, None
    if not isinstance(manifest, dict):  # Damaged: an export's manifest is an object.
        return True, None
    if not {"status", "shards"} <= manifest.keys():
        return False, None
    try:
        shards = manifest["shards"]
        listed = frozenset(entry["file"] for role in ("rows", "errors") for entry in shards.get(role, []))
    except Exception:  # Ours, but damaged inside.
        return True, None
    return True, listed


def _foreign_entries(directory: str) -> tuple[list[tuple[str, EntryKind]], list[str]]:
    """(the entries no export of ours explains, the relative paths of the others but the lock).

    The lock is the live run's (ours, once we hold it), not a leftover.  In a
    finished export, a file named like a shard that its manifest does not list
    is not the export's (a user's, or another job's): it is foreign.
    """
    journal = _is_file(directory, JOURNAL)
    manifest_ours, listed = _manifest_shards(directory) if _is_file(directory, MANIFEST) else (False, None)
    finished = journal or manifest_ours

    damaged = manifest_ours and listed is None and not journal
    owned_index = owned_index_files(directory) | (_journal_index_files(directory) if journal else frozenset())

    def explains(relative: str, kind: EntryKind) -> bool:
        if not finished:
            return _is_leftover(relative, kind)
        if not journal and listed is not None and kind == "file" and is_shard(relative):
            return relative in listed
        if damaged and kind == "file" and relative.endswith(".parquet") and _entry_is_ours(relative, kind):
            # A damaged manifest lists nothing: a Parquet file named as ours is ours only if its
            # footer says so (another tool's part files and manifest look damaged to us).
            return _footer_is_ours(directory, relative)
        return _entry_is_ours(relative, kind, owned_index)

    foreign: list[tuple[str, EntryKind]] = []
    ours: list[str] = []
    for relative, kind in iter_entries(directory):
        if not explains(relative, kind):
            foreign.append((relative, kind))
            if len(foreign) == FOREIGN_EXAMPLES:  # Foreign already: a tree like / is not walked whole.
                break
        elif relative != LOCK:
            ours.append(relative)
    return foreign, ours


def _journal_index_files(directory: str) -> frozenset[str]:
    """The index files an interrupted commit's journal deletes: judged ours when it was written, their
    metadata may be gone already."""
    try:
        delete = read_json(join(directory, JOURNAL))["delete"]
        return frozenset(r for r in delete if isinstance(r, str) and INDEX_FILE.fullmatch(r))
    except Exception:  # A damaged journal explains nothing; recovering the commit refuses it.
        return frozenset()


def _is_file(directory: str, relative: str) -> bool:
    """Whether `relative` is a regular file under `directory` (locally: not a link)."""
    if not is_local(directory):
        return exists(directory, relative)
    path = os.path.join(directory, relative)
    return os.path.isfile(path) and not os.path.islink(path)


def _footer_is_ours(directory: str, relative: str) -> bool:
    """Whether a Parquet file's footer is one an export writes: our metadata, or the dead letters' schema."""
    try:
        with FileSystems.open(join(directory, relative), compression_type="uncompressed") as handle:
            schema = pq.read_schema(handle)
    except Exception:  # Not Parquet, truncated, unreadable: nothing shows it is ours.
        return False
    if ERRORS_DIR in relative.split("/")[:-1]:  # errors/ or a failed run's _failed/RUN/errors/
        return schema.remove_metadata().equals(ERROR_SCHEMA)
    return METADATA_KEY in (schema.metadata or {})


def _describe(relative: str, kind: EntryKind) -> str:
    if kind == "link":
        return f"{relative} (a symbolic link)"
    if kind == "directory":
        return f"{relative}/ (an empty directory)"
    if kind == "other":
        return f"{relative} (not a regular file)"
    return relative


def _state(foreign: list[tuple[str, EntryKind]], ours: list[str]) -> OutputState:
    if foreign:
        return "foreign"
    if not ours:
        return "empty"
    return "finished" if MANIFEST in ours or JOURNAL in ours else "unfinished"


def output_state(directory: str) -> OutputState:
    """ "empty", "finished" (a manifest or a commit to finish), "unfinished" (our leftovers) or "foreign"."""
    return _state(*_foreign_entries(directory))


def _examples(foreign: list[tuple[str, EntryKind]], limit: int = FOREIGN_EXAMPLES) -> list[str]:
    return sorted(_describe(relative, kind) for relative, kind in foreign[:limit])


def foreign_files(directory: str, limit: int = FOREIGN_EXAMPLES) -> list[str]:
    """A few of the entries in `directory` that no export wrote, for error messages."""
    return _examples(_foreign_entries(directory)[0], limit)


def check_output_state(directory: str, overwrite: bool) -> OutputState:
    """Refuses an output that holds foreign files, or a finished export without `overwrite`.

    Raises:
        ExportConfigError: saying what is there and what to do.
    """
    foreign, ours = _foreign_entries(directory)
    state = _state(foreign, ours)
    if state == "foreign":
        raise ExportConfigError(
            f"--output {directory!r} holds files that no export wrote (e.g. "
            f"{', '.join(_examples(foreign))}; files named like an export's without its "
            f"{MANIFEST} are not one). An export only ever replaces its own files, so it will not "
            "write there, --overwrite or not: choose a new or empty directory."
        )
    if state == "finished" and not overwrite:
        raise ExportConfigError(
            f"--output {directory!r} already holds a finished export. Pass --overwrite to "
            "replace it, or choose another --output."
        )
    return state


def _parents(directory: str) -> list[str]:
    """The directories above `directory`, nearest first: locally in absolute form, up to a URI's bucket."""
    if is_local(directory):
        parents: list[str] = []
        # Through a symbolic link the directory is also below where the link points.
        for path in dict.fromkeys((os.path.abspath(directory), os.path.realpath(directory))):
            while os.path.dirname(path) != path:
                path = os.path.dirname(path)
                parents.append(path)
        return list(dict.fromkeys(parents))
    scheme, _, rest = directory.rstrip("/").partition("://")
    parts = rest.split("/")
    return [f"{scheme}://{'/'.join(parts[:end])}" for end in range(len(parts) - 1, 0, -1)]


def check_not_inside_an_export(directory: str) -> None:
    """Refuses an output inside another export, or below a `_staging/` directory.

    An export inside another one is read as part of it (a recursive read of
    the outer one returns both), keeps `--overwrite` of the outer one refused,
    and one below an output's `_staging/` is what a later run there removes as
    the leftovers of dead runs.

    Raises:
        ExportConfigError: naming the enclosing export or staging directory.
    """
    parents = _parents(directory)
    # Through a symbolic link, the directory it names counts too (a link to X/_staging).
    itself = [directory.rstrip("/")] + ([os.path.realpath(directory)] if is_local(directory) else [])
    for candidate in [*itself, *parents]:
        if posixpath.basename(candidate) == STAGING:
            where = (
                "is"
                if candidate == directory.rstrip("/")
                else f"leads to {candidate!r},"
                if candidate in itself
                else f"is below {candidate!r},"
            )
            raise ExportConfigError(
                f"--output {directory!r} {where} a directory named {STAGING}: exports stage their "
                "files there, and the next export in the directory above removes it whole. Choose "
                "an --output outside it."
            )
    for parent in parents:
        marker = next((name for name in (MANIFEST, JOURNAL, LOCK) if exists(parent, name)), None)
        if marker:
            raise ExportConfigError(
                f"--output {directory!r} is inside {parent!r}, an export's directory (it holds "
                f"{marker}): a read of that export would take this one's files as its own. Choose an "
                "--output outside it."
            )


def _check_no_climb_out_of_a_missing_directory(directory: str) -> None:
    """Refuses a local --output that goes up ('..') out of a directory that does not exist (`x/../out`).

    The system reaches such a path only once that directory exists: making the output would
    make it first, a directory outside the output that nothing removes.

    Raises:
        ExportConfigError: naming the missing directory and the --output meant.
    """
    parts = directory.split("/")
    for index, part in enumerate(parts):
        above = "/".join(parts[:index]) or "/"
        if part == ".." and index and not os.path.isdir(above):
            raise ExportConfigError(
                f"--output {directory!r} goes up ('..') out of {above!r}, which is no directory: it would "
                f"be made, outside the output, to reach the path. Give --output without it, such as "
                f"{os.path.normpath(directory)!r}."
            )


def check_writable(directory: str) -> None:
    """Refuses a local --output that cannot be made: below a file, on a read-only path, or through a
    directory that does not exist and that '..' leaves (it would be made outside the output).

    Raises:
        ExportConfigError: naming the file, the read-only or the missing directory.
    """
    if not is_local(directory):
        return
    _check_no_climb_out_of_a_missing_directory(directory)
    existing = os.path.abspath(directory)
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if os.path.islink(existing) and not os.path.exists(existing):
        raise ExportConfigError(
            f"--output {directory!r} leads through {existing!r}, a symbolic link to "
            f"{os.readlink(existing)!r}, which does not exist; create that directory or choose "
            "another --output."
        )
    if not os.path.isdir(existing):
        where = "is" if existing == os.path.abspath(directory) else f"is below {existing!r}, which is"
        raise ExportConfigError(
            f"--output {directory!r} {where} a file, not a directory; "
            "choose an --output whose parent is a directory."
        )
    read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
    if read_only or not os.access(existing, os.W_OK | os.X_OK):
        raise ExportConfigError(
            f"--output {directory!r} cannot be written: {existing!r} is "
            f"{'on a read-only filesystem' if read_only else 'not writable by this user'}. "
            "Choose a writable --output."
        )


def prepare(
    directory: str, overwrite: bool, find_resumable: Callable[[str], str | None] | None = None
) -> tuple[str, str | None]:
    """Checks the output again under the lock and removes what dead runs left.

    Call it while holding `OutputLock(directory)`: then no other live launcher uses
    the directory, so every staging directory and every unfinished file in it
    belongs to a run whose launcher died (its job may live on: a portable runner's,
    Dataflow's).  A finished export is kept until `commit` replaces it, so a failed
    `--overwrite` run does not destroy the previous result.
    `find_resumable(directory)` may name one dead run's staging directory to keep
    (`pipeline.writing.resume`); the new run continues it under its own run id.

    Returns:
        (the new run's id, the id of the dead run it continues or None).

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
            if relative_to(directory, p) != LOCK and not relative_to(directory, p).startswith(STAGING + "/")
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
    else:
        remove_staging(directory)
    if state == "finished":  # Only a succeeded export has failed runs set aside beside it.
        _remove_unfinished_set_asides(directory)
    return new_run_id(), resumed


def _remove_unfinished_set_asides(directory: str) -> None:
    """Removes each `_failed/RUN/` without a whole `_MANIFEST.json`: a failed run's set-aside cut short.

    `commit.set_aside_failed_run` writes the manifest after moving the dead letters
    there; killed in between, the folder's dead letters belong to no record of a run
    (the rerun makes them again, in a `_failed/` folder of its own, or commits them).
    A disk that fills as the manifest is written (or a SIGKILL during the write)
    leaves one empty or cut short: no record either.
    """
    by_run: dict[str, list[str]] = {}
    for path in list_files(join(directory, FAILED_DIR)):
        parts = relative_to(directory, path).split("/")
        if len(parts) > 2:
            by_run.setdefault(parts[1], []).append(path)
    failed_root = os.path.join(directory, FAILED_DIR)
    if is_local(directory) and os.path.isdir(failed_root) and not os.path.islink(failed_root):
        # Killed right after making `_failed/RUN/errors/`, it left folders and no file (object
        # stores have no folders).
        for run_id in os.listdir(failed_root):
            if os.path.isdir(os.path.join(failed_root, run_id)):
                by_run.setdefault(run_id, [])
    for run_id, paths in by_run.items():
        folder = join(directory, FAILED_DIR, run_id)
        if join(folder, MANIFEST) in paths and _is_whole_manifest(join(folder, MANIFEST)):
            continue
        logging.warning(
            "Removing %s: the dead letters of a failed run cut short (killed, out of space) as it set "
            "them aside.",
            folder,
        )
        delete_files(paths)
        if is_local(directory):
            for empty in (join(folder, ERRORS_DIR), folder):
                with contextlib.suppress(OSError):  # Not empty: kept.
                    os.rmdir(empty)


def _is_whole_manifest(path: str) -> bool:
    """Whether the manifest at `path` is the JSON object a run wrote, not one cut short."""
    try:
        return isinstance(read_json(path), dict)
    except ValueError:  # Empty, truncated, not UTF-8.
        return False


def read_manifest(directory: str) -> JsonObject | None:
    """The manifest of a finished export, or None.

    Raises:
        ExportConfigError: the manifest is damaged (not a JSON object: truncated, edited).
    """
    path = join(directory, MANIFEST)
    if not FileSystems.exists(path):
        return None
    try:
        manifest = read_json(path)
    except ValueError as error:  # Not UTF-8 or not JSON.
        manifest = error
    if not isinstance(manifest, dict):
        raise ExportConfigError(
            f"{path!r} is damaged: not the JSON object an export writes "
            f"({type(manifest).__name__}: {str(manifest)[:80]})."
        )
    return manifest
