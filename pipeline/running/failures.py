"""Failures of a running export told in one line: a full disk, and Beam's error logs held back meanwhile."""

import contextlib
import errno
import os
import shutil
import signal
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

from pipeline.errors import ExportConfigError, OutputWriteError, WorkerDiedError
from pipeline.held_logs import HeldErrorLogs
from pipeline.running import local_workers
from pipeline.running import progress as progress_lib
from pipeline.running.advice import rerun_to_finish
from pipeline.uris import is_local
from pipeline.writing.files import join
from pipeline.writing.layout import STAGING, TABLES_DIR
from pipeline.writing.staging import holds_durable_rows, staged_bytes


@contextlib.contextmanager
def beam_errors_held(resume: str = "auto") -> Iterator[None]:
    """Lets Beam's error logs of a failed local run through only if the failure is not one we explain.

    A full disk is reported as one `error:` line (see `out_of_space`); Beam would
    first log the same OSError with its traceback from inside the transform.
    """
    # Beam's threads that talk to a worker process print their tracebacks when it dies.
    thread_errors: list[threading.ExceptHookArgs] = []
    print_thread_error = threading.excepthook
    threading.excepthook = thread_errors.append
    local_workers.hold_tracebacks()
    waiting = [True]
    previous = _wake_on_worker_failure(waiting)
    try:
        with HeldErrorLogs("apache_beam") as held:
            try:
                yield
            except BaseException as error:
                waiting[0] = False
                explained = (
                    is_disk_full(error) or is_file_too_large(error) or isinstance(error, KeyboardInterrupt)
                )
                told = None if explained else _told_in_one_line(error, resume)
                if explained or told is not None:
                    held.drop()
                    thread_errors.clear()
                    local_workers.drop_held_tracebacks()
                if told is not None:
                    raise told from None
                raise
    finally:
        waiting[0] = False
        # No wake from here on (a late one would meet the restored handler: SIG_DFL ends the process).
        local_workers.wake_on_failure(None)
        if previous is not None:
            signal.signal(WAKE_SIGNAL, previous)
        threading.excepthook = print_thread_error
        for args in thread_errors:
            print_thread_error(args)
        local_workers.let_held_tracebacks_through()


# Sent to the launcher's main thread when a worker failed (`local_workers.on_failure`).
WAKE_SIGNAL = signal.SIGUSR1


def _wake_on_worker_failure(waiting: list[bool]) -> Any:
    """Makes a worker's failure end the main thread's wait in Beam; returns the signal's previous handler.

    Beam's wait for a bundle does not always end when the worker running it dies (it
    hung forever for a worker out of memory).  `local_workers` then stops the other
    workers and calls `on_failure`, which signals the main thread: its handler raises
    `local_workers.WorkerFailedError` there, told in one line like any failed run.
    """
    if threading.current_thread() is not threading.main_thread():
        return None
    main = threading.main_thread().ident
    previous = signal.getsignal(WAKE_SIGNAL)

    def raise_failure(signum: int, frame: FrameType | None) -> None:
        # Not once the run's own error is being told, nor for a SIGUSR1 from elsewhere (a host
        # process's): only a worker's failure ends the wait.  Lock-free: the handler runs in the
        # main thread, which may hold `local_workers`' lock as the signal lands.
        if waiting[0] and local_workers.any_failed():
            waiting[0] = False
            raise local_workers.WorkerFailedError(local_workers.WORKER_FAILED)
        if callable(previous):
            # A host's own handler (gunicorn and uwsgi reopen their logs on SIGUSR1) still gets its
            # signals; the default action (ending the process) and an ignored signal stay unused.
            previous(signum, frame)

    signal.signal(WAKE_SIGNAL, raise_failure)
    local_workers.wake_on_failure(lambda: signal.pthread_kill(main, WAKE_SIGNAL) if main else None)
    return previous


def _told_in_one_line(error: BaseException, resume: str = "auto") -> Exception | None:
    """The one-line error a failed local run becomes (a worker's refusal, out of memory, killed), or None."""
    refusal = worker_refusal(error)
    if refusal is not None:  # A worker's ExportConfigError: its one line says it all.
        return ExportConfigError(refusal)
    stall = local_workers.stall()
    if stall is not None:  # Its workers were killed for it: their deaths are no story of their own.
        local_workers.killed_by()
        blocked = f": {'; '.join(stall.workers)}" if stall.workers else ""
        return WorkerDiedError(
            f"the run made no progress for {progress_lib.duration_text(stall.seconds)} (--stall_timeout "
            f"{stall.limit:g} s){blocked}. Its worker processes were killed and nothing was committed: "
            f"free what held them, then {rerun_to_finish(resume)}; raise --stall_timeout (0 waits "
            "forever) if the run may rightly stand still that long."
        )
    signals = local_workers.killed_by()
    failed = local_workers.failed_workers()
    if failed and failed[0][0] < 0:  # The first to die: the others may have been stopped for it.
        signals = [-failed[0][0], *signals]
    # A worker that died before Beam heard of its error said it only on its stderr.
    last_words = b"".join(failed[0][1]).decode("utf-8", errors="replace") if failed else ""
    short = out_of_memory(error) or _out_of_memory_in(last_words)
    if short is not None:
        return WorkerDiedError(
            f"a worker process ran out of memory ({short}); nothing was committed: "
            f"{rerun_to_finish(resume)}, with --direct_num_workers 1 if memory is short (a smaller "
            "--batch_size needs less too, but --batch_size is part of what a rerun must match: with "
            "another, the rerun starts from zero)."
        )
    if not signals and failed and _ended_for_a_failed_worker(error):
        code, last = failed[0]
        # Its own words, not TensorFlow's or absl's log lines (start-up notices about GPUs).
        said = [
            line
            for line in last_words.splitlines()
            if line.strip() and not local_workers.is_log_line(line.encode("utf-8"))
        ]
        return WorkerDiedError(
            f"a worker process exited with status {code}"
            + (f" ({said[-1].strip()[:200]})" if said else "")
            + f"; nothing was committed: {rerun_to_finish(resume)}."
        )
    if not signals:
        return None
    try:
        name = signal.Signals(signals[0]).name
    except ValueError:  # Not a signal this platform names.
        name = f"signal {signals[0]}"
    why = ", perhaps for want of memory" if name == "SIGKILL" else ""
    return WorkerDiedError(
        f"a worker process was killed ({name}{why}); nothing was committed: "
        f"{rerun_to_finish(resume)}, with --direct_num_workers 1 if memory is short."
    )


def _ended_for_a_failed_worker(error: BaseException) -> bool:
    """Whether the run's wait was ended for a failed worker: the main thread's wake, or (a run on another
    thread) Beam's error from the instructions answered for it (`local_workers.WORKER_FAILED`)."""
    return any(
        isinstance(cause, local_workers.WorkerFailedError) or str(cause) == local_workers.WORKER_FAILED
        for cause in _causes(error)
    )


# How running out of memory reads in a worker's error, Beam's relayed text of it included: Python's
# MemoryError, TensorFlow's ResourceExhaustedError (OOM when allocating a tensor), C++'s bad_alloc,
# the loader's or a system call's ENOMEM, and a thread whose stack cannot be mapped (an
# address-space limit: ulimit -v, prlimit --as, a batch scheduler's).
_OUT_OF_MEMORY_TYPES = ("MemoryError", "ResourceExhaustedError")
_OUT_OF_MEMORY_MARKS = (
    "MemoryError",
    "ResourceExhaustedError",
    "std::bad_alloc",
    "Cannot allocate memory",
    "failed to map segment from shared object",
    "OOM when allocating",
    "can't start new thread",
)


def out_of_memory(error: BaseException) -> str | None:
    """What says that `error` (or a worker's error it wraps) is running out of memory, or None."""
    for cause in _causes(error):
        names = {kind.__name__ for kind in type(cause).__mro__}
        found = next((name for name in _OUT_OF_MEMORY_TYPES if name in names), None)
        if found is None and isinstance(cause, OSError) and cause.errno == errno.ENOMEM:
            found = "Cannot allocate memory"
        found = found or _out_of_memory_in(str(cause))
        if found is not None:
            return found
    return None


def _out_of_memory_in(text: str) -> str | None:
    return next((mark for mark in _OUT_OF_MEMORY_MARKS if mark in text), None)


def _causes(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        yield cause
        cause = cause.__cause__ or cause.__context__


def worker_refusal(error: BaseException) -> str | None:
    """The message of an `ExportConfigError` a worker raised (Beam re-raises it, or its text), or None."""
    for cause in _causes(error):
        if isinstance(cause, ExportConfigError):
            return str(cause)
        text = str(cause)
        if f"{ExportConfigError.__name__}: " in text:
            return text.rsplit(f"{ExportConfigError.__name__}: ", 1)[1].splitlines()[0].strip()
    return None


def is_disk_full(error: BaseException) -> bool:
    """Whether `error` (or what it wraps: Beam re-raises a worker's error as text) is a full disk."""
    for cause in _causes(error):
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(cause) or "Disk quota exceeded" in str(cause):
            return True
    return False


def is_file_too_large(error: BaseException) -> bool:
    """Whether `error` (or what it wraps, Beam's text of a worker's error too) is a file past the largest
    size allowed: EFBIG, from the process's file-size limit (`ulimit -f`) or the filesystem's own."""
    for cause in _causes(error):
        if isinstance(cause, OSError) and cause.errno == errno.EFBIG:
            return True
        if os.strerror(errno.EFBIG) in str(cause):
            return True
    return False


def _free_bytes(path: str) -> int | None:
    if not is_local(path):
        return None
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    return shutil.disk_usage(existing).free


@contextlib.contextmanager
def out_of_space_reported(output: str, run_id: str) -> Iterator[None]:
    """Turns a full disk inside the block into `out_of_space`'s one-line error, and a file past the
    file-size limit into `file_too_large`'s (other errors pass)."""
    try:
        yield
    except Exception as error:
        if is_disk_full(error):
            raise out_of_space(output, run_id) from None
        if is_file_too_large(error):
            raise file_too_large(output, run_id) from None
        raise


@contextlib.contextmanager
def unchangeable_output_reported(output: str) -> Iterator[None]:
    """Turns an OSError of the run's preparation of `output` into one `error:` line (exit 6).

    Before its pipeline, a run removes what dead runs left there and moves an
    interrupted run's rows into its own staging directory. Files it may not change
    (left by a run started as another user, with sudo say, or made immutable) stopped
    it with a traceback. Nothing of an export is changed by then, and a failed hand-over
    gives the interrupted run its rows back: the rerun continues it once the cause is fixed.
    """
    try:
        yield
    except OSError as error:
        if is_disk_full(error) or is_file_too_large(error):
            raise
        where = " -> ".join(str(name) for name in (error.filename, error.filename2) if name)
        advice = {
            errno.EACCES: "give this user the output's files (a run started as another user, with sudo "
            "say, leaves files this one can neither move nor delete)",
            errno.EPERM: "give this user the output's files (a run started as another user, with sudo "
            "say, leaves files this one can neither move nor delete; `lsattr` shows an immutable one)",
            errno.EROFS: "remount its filesystem read-write",
        }.get(error.errno or 0, "fix the cause")
        raise OutputWriteError(
            f"--output {output!r} could not be prepared: {error.strerror or error}"
            f"{f' ({where})' if where else ''}. Nothing was committed and an earlier export there is "
            f"untouched: {advice}, then rerun the same command."
        ) from None


def out_of_space(output: str, run_id: str) -> OutputWriteError:
    """Says how much space the export needed; what the run staged in `output` is kept for its rerun.

    Removing it would free the disk but throw away every row made durable (hours of
    a large export, or a finished run that only lacked room for its commit's
    journal): the rerun resumes from them once there is room.
    """
    staged = staged_bytes(output, run_id)
    free = _free_bytes(output)
    available = f"the {progress_lib.size_text(free + staged)} it had" if free is not None else "what it had"
    return OutputWriteError(
        f"--output {output!r} ran out of space (no space left on device): this export needs more than "
        f"{available} (free space plus the {progress_lib.size_text(staged)} it had staged when the disk "
        f"filled). Nothing was committed and an earlier export there is untouched (it stays until a new "
        f"one is committed, so --overwrite needs room for both). {_what_is_kept(output, run_id)}"
    )


def _what_is_kept(output: str, run_id: str) -> str:
    """What a rerun continues from, told only where the run made a row durable (else there is none)."""
    staging = join(output, STAGING, run_id)
    if not holds_durable_rows(output, run_id):
        return "No row had been made durable yet: free space, then rerun the same command."
    return (
        f"The rows made durable are kept in {staging}: free space, then rerun the same command to continue "
        "from them (--resume off, or deleting that directory, drops them)."
    )


def token_table_too_large(output: str) -> OutputWriteError:
    """Says that a `--token_storage ids` token table reached the largest file size allowed.

    The table is one file per Embedding layer, written whole before the pipeline
    starts, whatever --shard_mb: `file_too_large`'s advice to lower --shard_mb
    would fail the same way on every rerun.
    """
    return OutputWriteError(
        f"--output {output!r}: the token table this run wrote there (--token_storage ids: each Embedding "
        f"layer's table in {TABLES_DIR}/, one whole file whatever --shard_mb) grew past the largest size "
        f"allowed ({os.strerror(errno.EFBIG)}: the process's file-size limit, `ulimit -f`, or the "
        "filesystem's own, such as FAT32's 4 GiB). Nothing was committed and an earlier export there is "
        "untouched. Raise the limit, choose an --output on a filesystem that takes larger files, or pass "
        "--token_storage vectors; a smaller --shard_mb does not help."
    )


def file_too_large(output: str, run_id: str) -> OutputWriteError:
    """Says that a file the run wrote in `output` reached the largest size allowed; its staged rows are kept.

    Like a full disk, this is no fault of the export: a row file grows to about
    --shard_mb, which the file-size limit (`ulimit -f`, a batch scheduler's) or the
    filesystem (FAT32 holds files under 4 GiB) may not allow.  --shard_mb is not part
    of a run's signature, so the rerun with a smaller one continues from the staged rows.
    """
    staging = join(output, STAGING, run_id)
    kept = (
        f"rerun: it continues from the rows made durable in {staging} (--resume off, or deleting that "
        "directory, drops them)."
        if holds_durable_rows(output, run_id)
        else "rerun the same command (no row had been made durable yet)."
    )
    return OutputWriteError(
        f"--output {output!r}: a file this run wrote there grew past the largest size allowed "
        f"({os.strerror(errno.EFBIG)}: the process's file-size limit, `ulimit -f`, or the filesystem's own, "
        "such as FAT32's 4 GiB). Nothing was committed and an earlier export there is untouched. Lower "
        "--shard_mb below that size (row files are closed at about --shard_mb) or raise the limit, then "
        + kept
    )
