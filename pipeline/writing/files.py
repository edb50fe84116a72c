"""File primitives for the output, local or on object storage, that never delete or write through a link.

The steps the commit takes (delete, write, rename or copy, make a directory)
each call `step` first, so that a test can kill or fail the commit at exactly
that step (`step_hook`).
"""

import contextlib
import errno
import hashlib
import json
import os
import posixpath
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from typing import Any, BinaryIO, Literal, TypedDict

from apache_beam.io.filesystems import FileSystems

from pipeline.errors import ExportConfigError
from pipeline.uris import is_local

# A parsed JSON object (a manifest, a journal, a lock's holder): its values are whatever its writer put there.
JsonObject = dict[str, Any]
# What `iter_entries` reports: a regular file, a symbolic link (to anything), something
# else that is not a directory (a pipe, a socket, a device) or an empty directory.
EntryKind = Literal["file", "link", "other", "directory"]

# Tests set this to a callable(action, relative path) that the commit calls before
# each filesystem step ("hash", "write", "rename", "copy", "delete", "mkdir"), to
# kill or fail it at exactly that step.
step_hook: Callable[[str, str], None] | None = None
# Set by the commit (`guarded_steps`) to what raises once the run no longer holds the output
# (`OutputLock.check_held`): called at each step right before its change to the output.
step_guard: Callable[[], None] | None = None


class FileDigest(TypedDict):
    """A file's size and content hash, as the manifest and the commit journal record them."""

    bytes: int
    sha256: str


def step(action: str, relative: str) -> None:
    """Before a commit step on `relative`: the test hook, then the guard, each if one is set."""
    if step_hook is not None:
        step_hook(action, relative)
    if step_guard is not None:
        step_guard()


@contextlib.contextmanager
def guarded_steps(guard: Callable[[], None]) -> Iterator[None]:
    """Has every commit step check `guard` first, as near its change as can be, while in the block."""
    global step_guard
    step_guard = guard
    try:
        yield
    finally:
        step_guard = None


def join(base: str, *parts: str) -> str:
    """Joins path parts for local paths and URIs alike."""
    return FileSystems.join(base, *parts)


def list_files(directory: str) -> list[str]:
    """Paths of the files under `directory` (empty if it does not exist); locally never through a link.

    On object storage a folder marker (an empty `DIR/` object, as consoles make) is not a file.
    """
    if is_local(directory):
        return [
            os.path.join(directory, relative) for relative, kind in iter_entries(directory) if kind == "file"
        ]
    return [path for path in _objects(directory) if not path.endswith("/")]


def _objects(directory: str) -> list[str]:
    """Paths of every object under the prefix `directory` on object storage, folder markers included."""
    try:
        result = FileSystems.match([join(directory, "**")])[0]
    except Exception:  # Match on a missing directory raises on some Beam versions.
        return []
    return [metadata.path for metadata in result.metadata_list]


def iter_entries(directory: str) -> Iterator[tuple[str, EntryKind]]:
    """(path relative to `directory`, kind) of what is under it, lazily, never following a link.

    Kinds: "file", "link" (a symbolic link, to anything), "other" (a pipe, a
    socket, a device) and "directory" (an empty one).  On object storage only files exist.
    """
    if not is_local(directory):
        for path in _objects(directory):
            relative = relative_to(directory, path)
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
            try:
                mode = os.lstat(path).st_mode
            except FileNotFoundError:  # Gone since the listing (a process's /proc entry, ...).
                continue
            kind: EntryKind = "link" if stat.S_ISLNK(mode) else "file" if stat.S_ISREG(mode) else "other"
            yield _local_relative(directory, path), kind
        if not directories and not names and root != directory:
            yield _local_relative(directory, root), "directory"


def _local_relative(directory: str, path: str) -> str:
    return os.path.relpath(path, directory).replace(os.sep, "/")


def iter_relative_files(directory: str) -> Iterator[str]:
    """Paths of the files under `directory`, relative to it; lazily (a huge foreign one is not walked)."""
    for relative, kind in iter_entries(directory):
        if kind == "file":
            yield relative


def relative_to(directory: str, path: str) -> str:
    """`path` relative to `directory` ("/"-separated), or its base name when it is not below it."""
    base = directory.rstrip("/")
    return path[len(base) + 1 :] if path.startswith(base + "/") else posixpath.basename(path)


def is_regular_file(path: str) -> bool:
    """Whether `path` names a file (not a directory, nor an object-store prefix).

    On object storage `DIR/` names a folder marker (an empty object that consoles
    make for "Create folder"), which is a directory, not a file.
    """
    if is_local(path):
        return os.path.isfile(path)
    return not path.endswith("/") and FileSystems.exists(path)


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


def delete_files(paths: Iterable[str]) -> None:
    """Deletes files (object storage or local, never through a link); missing ones are skipped."""
    for path in paths:
        if is_local(path):
            if os.path.islink(path):
                raise ExportConfigError(f"{path!r} is a symbolic link; an export never deletes through one.")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        else:
            _delete_object(path)


def _delete_object(path: str) -> None:
    """Deletes one object; never a path ending in "/", which Beam's S3 and GCS filesystems
    take for a whole prefix to delete (a folder marker would take the output with it)."""
    if path.endswith("/"):
        raise ExportConfigError(f"Refusing to delete {path!r}: on object storage that is a whole prefix.")
    if FileSystems.exists(path):
        FileSystems.delete([path])


def delete_relative(directory: str, relative: str) -> None:
    """Deletes the file `relative` under `directory` (a commit step); a missing one is skipped."""
    step("delete", relative)
    if is_local(directory):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(_refuse_links(directory, relative))
    else:
        _delete_object(join(directory, relative))


def file_digest(path: str) -> FileDigest:
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
        with FileSystems.open(path, compression_type="uncompressed") as remote:
            for chunk in iter(lambda: remote.read(1 << 20), b""):
                digest.update(chunk)
                size += len(chunk)
    return {"bytes": size, "sha256": digest.hexdigest()}


def fsync_directory(directory: str) -> None:
    """Locally, flushes `directory`'s entries to disk, so its renames survive a power loss."""
    if is_local(directory):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_json(directory: str, relative: str, value: object) -> None:
    """Writes `value` as JSON at `relative` (a commit step; locally flushed to disk before it returns)."""
    step("write", relative)
    data = json.dumps(value, indent=2, ensure_ascii=False).encode("utf-8")
    if is_local(directory):
        path = _refuse_links(directory, relative)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        return
    with FileSystems.create(join(directory, relative)) as remote:
        remote.write(data)


def read_json(path: str) -> Any:
    """The JSON value in the file at `path`, local or on object storage (unchecked: any JSON value)."""
    with FileSystems.open(path, compression_type="uncompressed") as handle:
        return json.loads(handle.read().decode("utf-8"))


def move(directory: str, source: str, target: str) -> None:
    """Moves `source` over `target` (relative paths): a rename locally, copy then delete on object storage."""
    if is_local(directory):
        step("rename", target)
        os.replace(_refuse_links(directory, source), _refuse_links(directory, target))
        return
    step("copy", target)
    FileSystems.copy([join(directory, source)], [join(directory, target)])
    delete_relative(directory, source)


def make_directory(directory: str, relative: str) -> None:
    """Locally, makes the directory `relative` under `directory` (a commit step); object stores have none."""
    if is_local(directory):
        step("mkdir", relative)
        os.makedirs(_refuse_links(directory, relative), exist_ok=True)


def exists(directory: str, relative: str) -> bool:
    """Whether `relative` exists under `directory` (locally a link counts, whatever it points to)."""
    if is_local(directory):
        return os.path.lexists(os.path.join(directory, relative))
    return FileSystems.exists(join(directory, relative))


def _replaced_mode(path: str) -> int:
    """The permission bits for a new `path`: those of the regular file there, else 0666 less the umask."""
    with contextlib.suppress(OSError):
        there = os.lstat(path)
        if stat.S_ISREG(there.st_mode):
            return stat.S_IMODE(there.st_mode)
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def write_whole_local(path: str, write: Callable[[BinaryIO], None], replace: bool = True) -> None:
    """Writes the local file `path` by `write(handle)`: a reader sees the old file or the whole new one.

    Through a new temporary file beside `path`, created exclusively (never a file
    or link already there, so nothing of the user's is overwritten or written
    through), flushed to disk, then renamed over `path`; removed if anything fails.
    It gets the mode of the file it replaces, else the one a plain `open` gives (0666
    less the umask), not mkstemp's private 0600.  Without `replace` (no --overwrite),
    a file that appeared at `path` meanwhile (the same command run twice at once) is
    not replaced: the new file is linked in only where none is (FileExistsError).
    """
    directory, name = os.path.split(path)
    mode = _replaced_mode(path)
    descriptor, temporary = tempfile.mkstemp(dir=directory or ".", prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            write(handle)
            os.fchmod(handle.fileno(), mode)
            handle.flush()
            os.fsync(handle.fileno())
        if replace:
            os.replace(temporary, path)
        else:
            try:
                os.link(temporary, path)
            except FileExistsError:
                raise FileExistsError(
                    errno.EEXIST,
                    "it appeared while this command ran (another one wrote it); it was not replaced: "
                    "pass --overwrite to replace it",
                    path,
                ) from None
            os.unlink(temporary)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
