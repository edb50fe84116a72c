"""Puts a finished bundle directory in place of another whole, and repairs a swap that a kill cut short.

A bundle `B` is written in a sibling `.B.writing-XXXX` and swapped in. Where the
kernel and filesystem offer it, the swap is one `renameat2(RENAME_EXCHANGE)`, so
`B` is the old bundle or the new one at every instant. Elsewhere it is two renames
(`B` to `.B.replaced-XXXX`, then the new one to `B`); a kill between them leaves
no `B`, and `recover` (run under the same lock before every swap, and by
`models.train` before it checks its --output) renames the old bundle back.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import re
import shlex
import shutil
from collections.abc import Iterator

WRITING = ".writing-"
MANIFEST_FILE = "manifest.json"  # as models.bundle names it (which imports this module)
REPLACED = ".replaced-"
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def staging_prefix(directory: str) -> str:
    """The name prefix of `directory`'s staging siblings (for `tempfile.mkdtemp`)."""
    return f".{os.path.basename(os.path.abspath(directory))}{WRITING}"


def _siblings(directory: str, marker: str) -> list[str]:
    """`directory`'s siblings named `.NAME{marker}XXXX` (mkdtemp's suffix: no dot, so not those of
    a bundle whose own name merely starts with NAME.replaced-)."""
    absolute = os.path.abspath(directory)
    parent = os.path.dirname(absolute)
    pattern = re.compile(re.escape(f".{os.path.basename(absolute)}{marker}") + r"\w+")
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    return sorted(os.path.join(parent, name) for name in names if pattern.fullmatch(name))


def leftovers(directory: str) -> list[str]:
    """The old bundles a cut-short swap of `directory` left aside (`.B.replaced-*`).

    Only real directories holding a bundle manifest: a link, a file, or a directory of
    someone else's that happens to bear the name is never moved or removed.
    """
    return [
        path
        for path in _siblings(directory, REPLACED)
        if not os.path.islink(path) and os.path.isfile(os.path.join(path, MANIFEST_FILE))
    ]


@contextlib.contextmanager
def held(path: str, blocking: bool = True) -> Iterator[bool]:
    """Holds an exclusive flock on the directory `path` while the block runs; yields whether it got it.

    The lock goes with the process: a writer killed at any point leaves nothing locked, which is
    how a stale staging directory is told from one another run is still writing.
    """
    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(descriptor)


def recover(directory: str) -> list[str]:
    """Repairs what a killed swap or a killed writer left beside `directory`; returns what it did.

    The caller holds the lock on the parent directory, so no swap is between its renames now:
    an old bundle set aside while `directory` is missing is put back; one set aside while
    `directory` exists is the leftover of a finished swap and is removed, as are staging
    directories whose writer is gone (no one holds their lock).
    """
    done: list[str] = []
    for staging in _siblings(directory, WRITING):
        if os.path.islink(staging):
            continue
        with contextlib.suppress(OSError), held(staging, blocking=False) as free:
            if free:
                shutil.rmtree(staging, ignore_errors=True)
                done.append(f"removed {staging}, left by a writer that was stopped")
    aside = leftovers(directory)
    if aside and not os.path.lexists(directory):
        # The most recent one is the bundle that stood at `directory` last.
        newest = max(aside, key=os.path.getmtime)
        os.rename(newest, directory)
        done.append(f"restored {directory} from {newest}, set aside by a swap that was stopped")
        aside.remove(newest)
    if os.path.lexists(directory):
        for path in aside:
            shutil.rmtree(path, ignore_errors=True)
            done.append(f"removed {path}, an old bundle already replaced")
    return done


def repair(directory: str) -> list[str]:
    """`recover` under the parent directory's lock (nothing to do where the parent does not exist)."""
    parent = os.path.dirname(os.path.abspath(directory))
    if not os.path.isdir(parent):
        return []
    with held(parent):
        return recover(directory)


def stopped_swap_note(directory: str) -> str | None:
    """What to tell a user whose bundle `directory` is missing because a swap was stopped, else None."""
    aside = leftovers(directory)
    if not aside or os.path.lexists(directory):
        return None
    return (
        f"a `models.train --overwrite` was stopped while it swapped bundles, and the old one is in "
        f"{aside[-1]!r}. Put it back with `mv {shlex.quote(aside[-1])} {shlex.quote(directory)}`, or rerun "
        "that models.train (it puts it back first)."
    )


def _exchange(first: str, second: str) -> bool:
    """Swaps two paths in one step (Linux renameat2); returns False where that is not available."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EPERM):
        return False  # the filesystem or kernel does not offer it
    raise OSError(code, os.strerror(code), first, None, second)


def swap_in(staging: str, directory: str) -> None:
    """Puts the finished directory `staging` at `directory`, in place of an empty one or an earlier bundle."""
    parent = os.path.dirname(os.path.abspath(directory))
    with held(parent):
        recover(directory)
        if not os.path.lexists(directory) or not os.listdir(directory):
            # rename() replaces a missing or empty directory atomically.
            os.rename(staging, directory)
            return
        if _exchange(staging, directory):
            shutil.rmtree(staging, ignore_errors=True)  # now the old bundle
            return
        aside = staging.replace(WRITING, REPLACED, 1)
        os.rename(directory, aside)
        try:
            os.rename(staging, directory)
        except BaseException:
            os.rename(aside, directory)
            raise
        shutil.rmtree(aside, ignore_errors=True)
