"""Lists the corpus files an --input pattern matches, once at launch, and checks a file is still as listed.

The launch listing is the corpus of the run: workers read exactly these files
(no second listing at run time), and before and after reading a file or range
of it they check that it still has the listed size and modification time (and,
locally, status change time), so a file truncated, replaced, rewritten or deleted
after launch becomes a dead letter instead of silently missing or mixed records.

Local patterns follow symbolic links to directories, as the shell and Python's
`glob` do, with Beam's pattern meaning (`*` stays in a directory, `**` spans
directories); a link back to a directory being walked is not followed twice.
A `**/` also matches no directory at all, as in the shell, Python and Spark, so
`DIR/**/*.jsonl` lists the files directly in DIR too. A directory under the
pattern that cannot be read refuses the listing (its records would be missing
without a trace). A pattern that matches nothing but names an existing file
(`data[1].jsonl`) is that file. Object-store folder markers (keys ending in
`/`) are not files.
"""

import errno
import itertools
import logging
import os
import re
import stat
import typing
import warnings

from apache_beam.io.filesystem import FileSystem
from apache_beam.io.filesystems import FileSystems

from models.paths import file_kind
from pipeline.uris import is_local

_LOGGER = logging.getLogger(__name__)
_GLOB = re.compile(r"[*?\[]")
# Runs of slashes: one slash in a local path ("$DIR/*.jsonl" with DIR ending in "/").
_SLASHES = re.compile(r"/{2,}")


class InputFile(typing.NamedTuple):
    """One file of the launch listing: what a worker checks the file against before reading it."""

    path: str
    size: int
    # Modification time in seconds (local mtime; object stores: the object's last update,
    # which every new generation (gs://) or PUT (s3://) changes); None where none is given.
    mtime: float | None
    # A path that cannot be opened (a symbolic link to nothing, a loop, no permission): where it
    # points, and why (the file is dead-lettered as unreadable).
    link_target: str | None = None
    problem: str = "which does not exist"
    # A local file's status change time (st_ctime_ns), which the kernel sets on every write, rename,
    # utime and chmod: a rewrite that keeps the size and modification time (cp -p, rsync -t, touch -r)
    # changes it. None on object stores, whose last update time is per write.
    changed_ns: int | None = None


class UnreadableDirectory(OSError):
    """Directories under an --input pattern that cannot be listed: their files would go missing unseen."""


class NonRegularFile(typing.NamedTuple):
    """A matched path that is not a regular file (named pipe, socket, device): never read."""

    path: str
    kind: str


class AmbiguousPattern(ValueError):
    """A pattern naming an existing file whose "[...]", read as a class, matches other files instead."""

    def __init__(self, pattern: str, matched: typing.Sequence[str]):
        escaped = pattern.replace("[", "[[]")
        super().__init__(
            f"--input {pattern!r} names an existing file, but as a pattern ('[...]' matches one of the "
            f"characters inside) it matches {len(matched)} other file(s), such as {matched[0]!r}: which is "
            f"meant is ambiguous. For that file alone write each '[' as '[[]' ({escaped!r}); for the "
            "pattern's files, rename that file."
        )


class InputChanged(Exception):
    """The file is not what the launch listed: gone, another size or modification time, not a file."""


def _could_hold_matches(directory: str, pattern: str) -> bool:
    """Whether files matching `pattern` could lie under `directory` (a directory the walk reached).

    A directory beside the pattern's path (`in/b` for `in/a*/*.jsonl`, a mount's
    `lost+found`) holds none of its files, so not reading it loses nothing.
    """
    depth = len(directory.split("/"))
    leading = pattern.split("/")[:depth]
    if any("**" in part for part in leading):
        return True
    return bool(re.match(FileSystem.translate_pattern("/".join(leading)), directory))


def _walk(root: str, max_depth: int | None, pattern: str) -> typing.Iterator[str]:
    """Paths of the non-directory entries under `root`, following links to directories.

    Raises `UnreadableDirectory`, after the walk, naming the directories that
    could not be listed (no permission, I/O error) and could hold files that
    `pattern` matches; a missing `root` is no match.

    Without a depth bound (a `**` pattern), a directory whose (device, inode)
    is already on the path from `root` is a loop (a link to an ancestor): it is
    skipped with a warning, since its files are listed through the ancestor. A
    bounded walk follows it like the shell does, as deep as the pattern goes.
    """
    # (directory, its depth, the (device, inode) of the directories on the path to it)
    stack: list[tuple[str, int, frozenset[tuple[int, int]]]] = [(root, 0, frozenset())]
    unreadable: list[str] = []
    while stack:
        directory, depth, ancestors = stack.pop()
        try:
            status = os.stat(directory or os.curdir)
            entries = sorted(os.scandir(directory or os.curdir), key=lambda entry: entry.name)
        except OSError as error:
            # A directory gone since its parent was listed holds no files; any other failure hides files.
            if error.errno not in (errno.ENOENT, errno.ENOTDIR) and _could_hold_matches(directory, pattern):
                unreadable.append(f"{directory or os.curdir!r} ({error.strerror})")
            continue
        key = (status.st_dev, status.st_ino)
        if max_depth is None and key in ancestors:
            _LOGGER.warning("Not following %r: it links back to a directory it is in (a loop).", directory)
            continue
        ancestors = ancestors | {key}
        for entry in entries:
            path = os.path.join(directory, entry.name) if directory else entry.name
            try:
                is_directory = entry.is_dir(follow_symlinks=True)
            except OSError:  # A link loop: not a directory, listed as a link that cannot be read.
                is_directory = False
            if not is_directory:
                yield path
            elif max_depth is None or depth < max_depth:
                stack.append((path, depth + 1, ancestors))
    if unreadable:
        raise UnreadableDirectory(
            f"{len(unreadable)} directory(ies) under the pattern cannot be read, so their files cannot be "
            f"listed: {', '.join(unreadable[:3])}{', ...' if len(unreadable) > 3 else ''}; give the run "
            "read access to them or narrow the pattern."
        )


def _local_entry(path: str) -> InputFile | NonRegularFile:
    try:
        status = os.stat(path)
    except OSError as error:
        target = os.readlink(path) if os.path.islink(path) else path
        problem = "which does not exist" if error.errno == errno.ENOENT else f"which fails: {error.strerror}"
        return InputFile(path, 0, None, target, problem)
    if not stat.S_ISREG(status.st_mode):
        return NonRegularFile(path, file_kind(status.st_mode))
    return InputFile(path, status.st_size, status.st_mtime, changed_ns=status.st_ctime_ns)


def _zero_directory_variants(pattern: str) -> list[str]:
    """`pattern` with each `**/` kept or dropped: Beam's `**/` needs a directory or more, the shell's none."""
    parts = pattern.split("**/")
    variants = []
    for kept in itertools.product(("**/", ""), repeat=len(parts) - 1):
        variants.append(parts[0] + "".join(glue + part for glue, part in zip(kept, parts[1:], strict=True)))
    return variants


def _list_local(pattern: str) -> list[InputFile | NonRegularFile]:
    """Beam's local matching (the same paths, the same pattern meaning), following directory links."""
    if pattern.endswith(os.sep):
        pattern += "*"
    first_glob = _GLOB.search(pattern)
    if not first_glob:
        return [_local_entry(pattern)] if os.path.lexists(pattern) else []
    root = os.path.dirname(pattern[: first_glob.start()])
    # Without `**` a match is exactly as deep as the pattern: no need to walk further.
    depth = None if "**" in pattern else pattern[len(root) :].lstrip("/").count("/")
    # Every variant's fixed prefix starts with `root`'s: one walk serves them all.
    variants = _zero_directory_variants(pattern)
    # One regex for all variants (Beam's each start with the global flags "(?ms)": kept once).
    flags = "(?ms)"
    translated = [FileSystem.translate_pattern(each).removeprefix(flags) for each in variants]
    with warnings.catch_warnings():
        # "[[]", the way to write a literal "[", is a class holding "[": no nested set, as re warns.
        warnings.simplefilter("ignore", FutureWarning)
        regex = re.compile(flags + "|".join(f"(?:{each})" for each in translated))
    matched = [_local_entry(path) for path in _walk(root, depth, pattern) if regex.match(path)]
    if os.path.lexists(pattern) and all(entry.path != pattern for entry in matched):
        # `[` starts a glob class, but a user naming an existing `data[1].jsonl` means that file;
        # if the class matches other files (`data1.jsonl`), reading either would be a guess.
        if matched:
            raise AmbiguousPattern(pattern, [entry.path for entry in matched])
        return [_local_entry(pattern)]
    return matched


def list_input(pattern: str) -> tuple[list[InputFile], list[NonRegularFile]]:
    """The files `pattern` matches now, and the matched paths that are not regular files.

    Raises:
        AmbiguousPattern: a pattern names an existing file (or object) but matches others.
        Whatever Beam's filesystem raises when it cannot list (no credentials, ...).
    """
    if is_local(pattern):
        entries = _list_local(_SLASHES.sub("/", pattern))
        files = [entry for entry in entries if isinstance(entry, InputFile)]
        return files, [entry for entry in entries if isinstance(entry, NonRegularFile)]
    variants = _zero_directory_variants(pattern)
    by_path = {
        metadata.path: metadata
        for result in FileSystems.match(variants)
        for metadata in result.metadata_list
        # A key ending in "/" is a folder marker (the S3 console's "Create folder"), not a file.
        if not metadata.path.endswith("/")
    }
    if _GLOB.search(pattern) and not pattern.endswith("/") and pattern not in by_path:
        # As locally: a user naming an existing `data[1].jsonl` object means that object; if the
        # pattern also matches other objects (`data1.jsonl`), reading either would be a guess.
        try:
            literal = FileSystems.get_filesystem(pattern).metadata(pattern)
        except Exception:  # No such object: the pattern is a pattern.
            literal = None
        if literal is not None:
            if by_path:
                raise AmbiguousPattern(pattern, sorted(by_path))
            by_path[literal.path] = literal
    return [
        InputFile(m.path, m.size_in_bytes, m.last_updated_in_seconds) for _, m in sorted(by_path.items())
    ], []


def _describe(size: int, mtime: float | None) -> str:
    return f"{size} bytes" + (f", modified at {mtime:.6f}" if mtime is not None else "")


def check_unchanged(listed: InputFile) -> None:
    """Raises `InputChanged` unless the file is still a regular file of the listed size and time.

    Local files are checked with one `stat` (their status change time too: a rewrite that
    kept the size and modification time would have the scan and the read see two files);
    object stores with one metadata request (size and last update time, which a new
    generation changes).
    """
    if listed.link_target is not None:
        raise InputChanged(f"Symbolic link to {listed.link_target!r}, {listed.problem}.")
    if is_local(listed.path):
        try:
            status = os.stat(listed.path)
        except FileNotFoundError:
            raise InputChanged(f"{listed.path} was listed at launch but no longer exists.") from None
        if not stat.S_ISREG(status.st_mode):
            raise InputChanged(f"{listed.path} is now {file_kind(status.st_mode)}, no longer a regular file.")
        size, mtime = status.st_size, status.st_mtime
        if (
            size == listed.size
            and mtime == listed.mtime
            and listed.changed_ns not in (None, status.st_ctime_ns)
        ):
            raise InputChanged(
                f"{listed.path} changed after the launch listed it: its size and modification time are as "
                "listed, but its status change time is not (rewritten with its time kept, as cp -p, rsync -t "
                "or touch -r do, or its permissions or links changed); rerun to read it as it is now."
            )
    else:
        try:
            metadata = FileSystems.get_filesystem(listed.path).metadata(listed.path)
        except Exception as error:  # Beam raises BeamIOError for a missing object.
            raise InputChanged(f"{listed.path} was listed at launch but is not found now: {error}") from None
        size, mtime = metadata.size_in_bytes, metadata.last_updated_in_seconds
    if size != listed.size or (listed.mtime is not None and mtime != listed.mtime):
        raise InputChanged(
            f"{listed.path} changed after the launch listed it: listed "
            f"{_describe(listed.size, listed.mtime)}, now {_describe(size, mtime)}."
        )
