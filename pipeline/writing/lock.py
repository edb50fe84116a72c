"""Holds an output directory for one run: a kernel lock locally, a renewed lease on object storage."""

import contextlib
import errno
import json
import logging
import os
import socket
import threading
import time
from typing import Any, Literal, Self, TypedDict

from apache_beam.io.filesystems import FileSystems

from pipeline.errors import (
    ExportConfigError,
    LockLostError,
    LockUnavailableError,
    OutputBusyError,
    OutputWriteError,
)
from pipeline.held_logs import HeldErrorLogs
from pipeline.uris import is_local
from pipeline.writing.files import JsonObject, delete_files, join
from pipeline.writing.layout import LOCK, lock_clock_probe, new_run_id

# A lock on object storage is a lease: its holder rewrites it every
# LEASE_RENEW_SECONDS, and one not rewritten for LEASE_SECONDS belongs to a dead run.
LEASE_SECONDS = 300
LEASE_RENEW_SECONDS = 60
# What `OutputLock.lost` names when no other run's lease says who took the output over.
_GONE = "unknown (this run's lease is gone)"
_LAPSED = "unknown (this run did not renew its lease for a whole lease)"


class LockHolder(TypedDict):
    """Who holds the lock, as `_LOCK` says it (a lease adds when it was last "renewed")."""

    run: str
    host: str
    pid: int
    started: float


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

    def __init__(self, directory: str, run_label: str | None = None) -> None:
        self.directory: str = directory
        self.path: str = join(directory, LOCK)
        self.holder: LockHolder = {
            "run": run_label or new_run_id(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.time(),
        }
        self._fd: int | None = None
        self._created_directory: bool = False
        self._stop: threading.Event = threading.Event()
        self._renewer: threading.Thread | None = None
        # The lease's holder that took it over from this run (object storage), or None.
        self.lost: JsonObject | None = None
        # When this run last wrote its lease (object storage).
        self._renewed: float = 0.0

    def __enter__(self) -> Self:
        if is_local(self.directory):
            self._acquire_local()
            return self
        # Beam's object-store clients log each failed upload with its traceback.
        with HeldErrorLogs() as held:
            try:
                self._acquire_lease()
            except OutputBusyError:
                held.drop()
                raise
            except Exception as error:  # No such bucket, no permission to write, no endpoint, ...
                held.drop()
                first_line = str(error).splitlines()[0][:300] if str(error) else ""
                raise ExportConfigError(
                    f"--output {self.directory!r} cannot be written: writing its lock {self.path} "
                    f"failed ({type(error).__name__}: {first_line}). "
                    "Check that the bucket exists and that these credentials may write to it."
                ) from None
        return self

    def __exit__(self, *exc_info: object) -> Literal[False]:
        self.release()
        return False

    @staticmethod
    def _who(holder: JsonObject | None) -> str:
        """The run a lock names, in words: its id, pid, host and start where it says them."""
        if holder and "pid" in holder:
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
            where = f"pid {holder.get('pid')} on {holder.get('host')}, started {started}"
            return f"run {holder.get('run')} ({where})"
        return f"run {holder.get('run')}" if holder else "another run"

    def _busy(self, holder: JsonObject | None) -> OutputBusyError:
        who = self._who(holder)
        return OutputBusyError(
            f"--output {self.directory!r} is in use by {who}. Wait for it to finish, or choose "
            "another --output; two runs must never write one directory.",
            who,
        )

    def _lost_error(self, lost: JsonObject) -> LockLostError:
        """The output is no longer this run's (object storage): how it lost its lease, and what to do."""
        run = str(lost.get("run"))
        if run == _GONE:
            how = "its lease is gone (deleted by hand, or released by a run that took it over and finished)"
        elif run == _LAPSED:
            how = (
                f"its lease went {LEASE_SECONDS // 60} minutes without renewal (the process was stopped "
                "or the machine asleep), so another run may have taken the output over"
            )
        else:
            how = f"{self._who(lost)} took it over, after this run's lease went unrenewed"
        return LockLostError(
            f"This run lost its lock on --output {self.directory!r}: {how}.",
            "It commits nothing more. Check what the output holds (its _MANIFEST.json), then rerun the "
            "same command if it should hold this run's export.",
        )

    def _acquire_local(self) -> None:
        try:
            while True:
                self._make_directory()
                try:
                    if self._try_local():
                        break
                except FileNotFoundError:
                    if os.path.isdir(self.directory):
                        raise
                    # A run started at once made the directory, failed and removed it again, empty.
        except OSError as error:
            if error.errno == errno.ENOSPC:
                if self._created_directory:
                    with contextlib.suppress(OSError):
                        os.rmdir(self.directory)
                raise OutputWriteError(
                    f"--output {self.directory!r} ran out of space (no space left on device) as this run "
                    f"wrote its lock {self.path}: nothing was written. Free space or choose another "
                    "--output, then rerun."
                ) from None
            if isinstance(error, PermissionError) and os.path.lexists(self.path):
                # A dead run's _LOCK this user may neither open nor replace (a sudo run's, in root's folder).
                reason = (
                    f"it holds {self.path}, a lock file that this user may not open or replace (left by a "
                    "run of another user, such as one started with sudo)"
                )
                raise LockUnavailableError(
                    f"--output {self.directory!r} cannot be used: {reason}. If no run uses the output, "
                    "remove that file as its owner, then rerun.",
                    reason,
                ) from None
            # Below a file, on a read-only filesystem, a _LOCK that is a symbolic link, ...
            reason = f"{error.strerror or error} ({error.filename or self.path})"
            raise LockUnavailableError(
                f"--output {self.directory!r} cannot be written: {reason}. Choose a writable --output; an "
                "export never writes through a symbolic link.",
                reason,
            ) from None

    def _make_directory(self) -> None:
        """Makes the output directory if it does not exist (a run started at once may make it first)."""
        if os.path.isdir(self.directory):
            return
        try:
            os.makedirs(self.directory)
            self._created_directory = True
        except FileExistsError:
            if not os.path.isdir(self.directory):  # A file: no directory to lock.
                raise

    def _try_local(self) -> bool:
        """Takes the flock on `_LOCK`; False when the file was replaced meanwhile (try again)."""
        import fcntl

        try:
            # O_NOFOLLOW: a _LOCK that is a link would have us truncate the file it points to.
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except PermissionError:
            if not os.path.lexists(self.path):  # The directory itself is not writable.
                raise
            # A dead run's _LOCK left read-only (copied from a read-only place) or another user's (a sudo
            # run's): replaced where no process holds it, as the run's own would have been removed.
            with contextlib.suppress(FileNotFoundError):  # Released by its holder meanwhile: try again.
                self._replace_unwritable_lock()
            return False
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
        try:
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(self.holder).encode("utf-8"))
        except OSError:  # A full disk: the lock file we made is ours to remove (we hold it).
            os.unlink(self.path)
            os.close(fd)
            raise
        self._fd = fd
        return True

    def _replace_unwritable_lock(self) -> None:
        """Removes a `_LOCK` this user may not write but no process holds (a dead run's).

        Raises:
            OutputBusyError: a live run holds it.
            PermissionError: it cannot be opened to be checked, or removed.
        """
        import fcntl

        fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise self._busy(_read_json_fd(fd)) from None
            # Removed while locked: a run that opened it meanwhile finds another file there once it has
            # the flock (`_try_local`), and starts again.
            if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                os.unlink(self.path)
        finally:
            os.close(fd)

    def _write_lease(self) -> None:
        with FileSystems.create(self.path) as handle:
            handle.write(json.dumps(dict(self.holder, renewed=time.time())).encode("utf-8"))
        self._renewed = _lease_clock()

    def _lease_age(self, holder: JsonObject) -> float:
        """Seconds since the lease was last written: by the holder's clock, or the store's if later.

        A holder whose clock runs slow writes old times into a live lease; the
        store's own time of the write (the object's modification time) is not its clock.
        """
        written = float(holder.get("renewed", 0) or 0)
        try:
            written = max(written, _modified(self.path))
        except Exception:  # No modification time from this store: the holder's word only.
            pass
        return time.time() - written

    def _read_lease(self) -> JsonObject | None:
        if not FileSystems.exists(self.path):
            return None
        with FileSystems.open(self.path) as handle:
            try:
                return json.loads(handle.read().decode("utf-8"))
            except ValueError:
                return None

    def _store_age(self) -> float:
        """Seconds since the lease was written, by the store's own clock (inf where it gives no times).

        This host's clock may run fast, which would make a live lease look old:
        the store's modification time of a probe it writes now is its "now".
        """
        probe = join(self.directory, lock_clock_probe(self.holder["run"]))
        try:
            with FileSystems.create(probe) as handle:
                handle.write(b"clock")  # Not empty: S3 refuses an upload of no parts.
            try:
                now, written = _modified(probe), _modified(self.path)
            finally:
                delete_files([probe])
        except Exception:  # No modification times from this store: this host's clock only.
            return float("inf")
        return float(now - written)

    def _acquire_lease(self, settle_seconds: float = 1.0) -> None:
        holder = self._read_lease()
        if holder and min(self._lease_age(holder), self._store_age()) < LEASE_SECONDS:
            raise self._busy(holder)
        self._write_lease()
        try:
            time.sleep(settle_seconds)
            holder = self._read_lease()
            if not holder or holder.get("run") != self.holder["run"]:
                raise self._busy(holder)
        except BaseException:
            # A signal (Ctrl-C, SIGTERM) or a failed read while taking the lease: the context
            # manager's exit never runs, so the lease written is taken back here, if still ours.
            with contextlib.suppress(Exception):
                holder = self._read_lease()
                if holder and holder.get("run") == self.holder["run"]:
                    delete_files([self.path])
            raise
        self._renewer = threading.Thread(target=self._renew, name="OutputLockRenewer", daemon=True)
        self._renewer.start()

    def _renew(self) -> None:
        while not self._stop.wait(LEASE_RENEW_SECONDS):
            try:
                holder = self._read_lease()
                if self._lapsed() or not holder or holder.get("run") != self.holder["run"]:
                    # Not renewed for a whole lease (a sleeping laptop), taken over, or gone (deleted
                    # by hand, or released by a run that took it over and finished): another run may
                    # hold the output or have committed to it; writing ours back would have two runs hold it.
                    self.lost = holder or {"run": _GONE}
                    logging.error("The lock %s was lost: not renewed for a whole lease, or taken.", self.path)
                    return
                self._write_lease()
            except Exception as error:  # A missed renewal is retried; the lease lasts 5 of them.
                logging.warning("Could not renew the lock %s: %s", self.path, error)

    def _lapsed(self) -> bool:
        """Whether this run's lease went a whole lease without renewal: another run may have taken it."""
        return _lease_clock() - self._renewed >= LEASE_SECONDS

    def check_held(self) -> None:
        """Raises unless this run still holds the output, as it must before it commits.

        On object storage the lease is read again: another run may have taken it
        over since the renewer last looked. Locally, `OUTPUT/_LOCK` must still be
        the file this run locked: a `_LOCK` deleted (a "stale lock" cleared by
        hand), an output directory moved or replaced, or a link to it switched,
        would have this run commit where another run may be, or into a directory
        it never checked.

        Raises:
            LockLostError: another run took the lease over (naming it), or the output's `_LOCK`
                is no longer the one this run locked.
        """
        if self._fd is not None:
            if not self._holds_path():
                raise LockLostError(
                    f"--output {self.directory!r} changed while this run worked: its {LOCK} is not the one "
                    "this run locked (it was deleted, or the directory was moved or replaced, or a link to "
                    "it now points elsewhere).",
                    "Nothing was committed; check what is at --output, then rerun.",
                )
            return
        if self.lost is None and self._renewer is not None:
            if self._lapsed():
                self.lost = {"run": _LAPSED}
            else:
                holder = self._read_lease()
                if not holder or holder.get("run") != self.holder["run"]:
                    self.lost = holder or {"run": _GONE}
        if self.lost is not None:
            raise self._lost_error(self.lost)

    def _holds_path(self) -> bool:
        """Whether `OUTPUT/_LOCK` is still the file this run locked (local locks)."""
        assert self._fd is not None
        held = os.fstat(self._fd)
        try:
            current = os.lstat(self.path)
        except OSError:  # Gone, or the directory with it.
            return False
        return (current.st_dev, current.st_ino) == (held.st_dev, held.st_ino)

    def release(self) -> None:
        """Gives the directory up (idempotent); removes the lock file and an empty directory we made."""
        if self._fd is not None:
            # Unlink before unlocking: a waiter that opened the old file sees a
            # different inode after its flock and starts again.  Only our own file:
            # after ours was deleted by hand, `_LOCK` may be another run's.
            if self._holds_path():
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
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


def is_stale_local_lock(directory: str) -> bool:
    """Whether `directory` (local) holds a `_LOCK` that no process holds: left by a run or an index
    build that was killed (the kernel released its flock). A link, or one that cannot be opened, is
    not one (it stays a reason to refuse)."""
    import fcntl

    try:
        fd = os.open(os.path.join(directory, LOCK), os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:  # Held: a live run or index build.
        return False
    finally:
        os.close(fd)  # Closing releases our own probe.
    return True


def _modified(path: str) -> float:
    """The store's own time of the last write of `path` (raises where it gives none)."""
    return float(FileSystems.match([path])[0].metadata_list[0].last_updated_in_seconds)


def _lease_clock() -> float:
    """Seconds on this host's clock for a lease's age: one a wall-clock step does not move and
    that goes on while the machine sleeps (Linux's CLOCK_BOOTTIME; `monotonic` stops in a suspend)."""
    boottime = getattr(time, "CLOCK_BOOTTIME", None)
    return time.clock_gettime(boottime) if boottime is not None else time.monotonic()


def _read_json_fd(fd: int) -> Any:
    """The JSON value in the open file `fd` (a lock's holder), or None where it is not JSON."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return json.loads(os.read(fd, 1 << 16).decode("utf-8"))
    except (OSError, ValueError):
        return None
