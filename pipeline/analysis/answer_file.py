"""Writing a command's answer file (`--out`), only once the rows it came from are checked unchanged."""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import re
import stat
from collections.abc import Callable
from typing import BinaryIO

from pipeline.analysis.dataset import AnalysisError, check_read_unchanged, uri_filesystem
from pipeline.uris import is_local
from pipeline.writing.files import write_whole_local

# The random part of `tempfile.mkstemp`'s names: `write_whole_local` writes `.NAME.XXXXXXXX.tmp`.
_TEMPORARY_PART = r"[a-z0-9_]{8}"


def write_answer(path: str, write: Callable[[BinaryIO], None], overwrite: bool = True) -> None:
    """Writes `path` by `write(handle)`; a reader sees the old file or the whole new one.

    The data read is checked unchanged (`dataset.check_read_unchanged`) after
    the answer is written out and before it is put in place, so an answer
    refused as mixing two exports' rows neither creates nor replaces `path`.
    Locally through a new file of its own renamed into place
    (`files.write_whole_local`, which never replaces a file that appeared
    meanwhile without `overwrite`), held (flock) while it is written, so the
    next answer to `path` removes the ones a killed command left
    (`remove_dead_answer_files`); on object storage rendered in memory, then
    uploaded in one PUT, which is atomic.

    Raises:
        AnalysisError: the data changed while it was read; nothing was written.
    """
    if not is_local(path):
        buffer = io.BytesIO()
        write(buffer)
        check_read_unchanged()
        filesystem, where = uri_filesystem(path)
        with filesystem.open_output_stream(where) as sink:
            sink.write(buffer.getvalue())
        return

    def write_then_check(handle: BinaryIO) -> None:
        _hold(handle, path)
        write(handle)
        check_read_unchanged()

    remove_dead_answer_files(path)
    write_whole_local(path, write_then_check, replace=overwrite)


def _hold(handle: BinaryIO, path: str) -> None:
    """Takes the flock of the temporary file `handle` is: while it is held, no command takes the file for
    one a killed command left. The file a command removed before it was held is said, not written."""
    with contextlib.suppress(OSError):  # No locks there (NFS without its lock daemon): left unheld.
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
    if os.fstat(handle.fileno()).st_nlink == 0:
        raise AnalysisError(
            f"--out {path!r}: another command writing the same --out at the same moment removed this "
            "one's temporary file; run the command again once the other is done."
        )


def remove_dead_answer_files(path: str) -> list[str]:
    """Removes the temporary files (`.NAME.XXXXXXXX.tmp` beside `path`) of answers to `path` whose command
    died while writing them (a SIGKILL, the OOM killer); returns them.

    A file is removed only if it is a regular file of this user with that name and nobody holds its
    flock: a live command's is held (`_hold`), a user's own file of another name is never looked at.
    """
    directory, name = os.path.split(path)
    pattern = re.compile(rf"\.{re.escape(name)}\.{_TEMPORARY_PART}\.tmp")
    try:
        entries = [entry for entry in os.listdir(directory or ".") if pattern.fullmatch(entry)]
    except OSError:  # Unreadable: nothing of ours can be told there.
        return []
    removed = []
    for entry in entries:
        temporary = os.path.join(directory, entry)
        try:
            status = os.lstat(temporary)
            if not stat.S_ISREG(status.st_mode) or status.st_uid != os.geteuid():
                continue
            descriptor = os.open(temporary, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:  # Gone meanwhile, or a link: not one to remove.
            continue
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # Still the file that was locked (not one put in its place meanwhile): a dead command's.
            if os.fstat(descriptor).st_ino == os.lstat(temporary).st_ino:
                os.unlink(temporary)
                removed.append(temporary)
        except OSError:  # Held by a live command, or no locks there: left alone.
            continue
        finally:
            os.close(descriptor)
    return removed
