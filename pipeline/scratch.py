"""The commands' temporary folders outside the output: held while in use, and removed by a later command
once the process that made one died without removing it (a SIGKILL, the OOM killer, a lost machine)."""

import contextlib
import fcntl
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator

# Every temporary folder of ours starts with this, then its use: "embexport-progress-", ...
PREFIX = "embexport-"
# The file in a folder whose flock the process using the folder holds: the kernel releases it however
# the process ends, so a folder whose flock can be taken is a dead process's. It is given this name
# only once locked, so a folder being made is never taken for a dead one. It names the machine that made
# it (`_host`): a flock over NFS may hold on that machine alone.
HOLD_FILE = ".held"


@contextlib.contextmanager
def held_scratch_directory(prefix: str) -> Iterator[str]:
    """A new folder in the temporary directory, held (see `HOLD_FILE`) until the block ends, then removed.

    First removes the folders that dead processes left (`remove_dead_scratch_directories`).

    Args:
        prefix: the folder's name starts with it; it starts with `PREFIX`.
    """
    remove_dead_scratch_directories()
    directory = tempfile.mkdtemp(prefix=prefix)
    try:
        taking = os.path.join(directory, HOLD_FILE + ".taking")
        descriptor = os.open(taking, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            with contextlib.suppress(OSError):  # A full disk: unnamed, as the version before wrote it.
                os.write(descriptor, _host())
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX)
            except OSError:
                # No locks there (NFS whose lock daemon does not answer: ENOLCK): used unheld, so no
                # command takes it for a dead one's; a SIGKILL leaves it behind, as before there were holds.
                os.unlink(taking)
            else:
                os.rename(taking, os.path.join(directory, HOLD_FILE))
            yield directory
        finally:
            os.close(descriptor)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def remove_dead_scratch_directories(parent: str | None = None) -> list[str]:
    """Removes this user's temporary folders of ours (in `parent`, default the temporary directory) whose
    process died; returns them.

    A folder is removed only if it holds `HOLD_FILE` and no process holds its flock: a live command's
    folder, one being made, one of a version that held none, a link, another user's are all left alone,
    and so is one another machine made (a `parent` shared over NFS, whose locks may not reach this one).
    """
    parent = parent or tempfile.gettempdir()
    try:
        names = [name for name in os.listdir(parent) if name.startswith(PREFIX)]
    except OSError:  # Unreadable: nothing of ours can be told there.
        return []
    removed = []
    for name in names:
        directory = os.path.join(parent, name)
        try:
            status = os.lstat(directory)
            if not stat.S_ISDIR(status.st_mode) or status.st_uid != os.geteuid():
                continue
            descriptor = os.open(os.path.join(directory, HOLD_FILE), os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:  # Gone meanwhile, no hold file, a link: not one to remove.
            continue
        try:
            host = os.read(descriptor, 1024)
            if host and host != _host():  # Another machine's: only it can tell whether it is dead.
                continue
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # Held: a live command's.
            continue
        else:
            # Removed while this process holds the flock: a dead folder is never revived.
            shutil.rmtree(directory, ignore_errors=True)
            removed.append(directory)
        finally:
            os.close(descriptor)
    return removed


def _host() -> bytes:
    """This machine, as a hold file records it (empty in those of the version before it): the running
    kernel's boot id where Linux gives one, since a flock holds for every process of one kernel (the
    containers of one machine included) and no further; else the machine's name."""
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as handle:
            boot = handle.read().strip()
    except OSError:
        boot = b""
    return boot or socket.gethostname().encode("utf-8", "replace") or b"?"
