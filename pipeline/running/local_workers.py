"""Local worker processes: deaf to a terminal's Ctrl-C, stopped silently, their tracebacks held back.

A Ctrl-C typed in a terminal goes to its whole foreground process group, so
Beam's SDK worker processes (`--direct_running_mode=multi_processing`) get it
too and print their own KeyboardInterrupt tracebacks on the shared terminal;
and when the launcher leaves, a worker that is still alive prints a gRPC
traceback as its control stream breaks.  Beam starts each worker with
`subprocess.Popen(command, shell=True)` in `local_job_service.SubprocessSdkWorker.run`;
while `ignoring_ctrl_c` is active that call goes through `_Popen`, which starts the
worker (as `pipeline.running.sdk_worker_main`: Beam's, ending without the interpreter's
teardown) with SIGINT and SIGHUP (a closed terminal's) ignored (an ignored signal
stays ignored across `exec`, and Python then installs no KeyboardInterrupt
handler) and remembers it, so that
`kill_workers` can stop it with SIGKILL, which prints nothing.  Its stderr
comes through a pipe that `_copy_stderr` copies to ours line by line, holding
back its Python tracebacks: a worker that raises prints one before the launcher
hears of it, and when the failure becomes our one `error:` line
(`pipeline.running.failures`) they are dropped (`drop_held_tracebacks`), else
let through when the run ends (`let_held_tracebacks_through`).  The workers stay in
the terminal's process group: a background group would be stopped by SIGTTOU when
it writes to a terminal set to `stty tostop`, and a SIGTERM or SIGKILL sent to the
group still reaches them.  They get the run's filesystem options (an S3 endpoint and
keys), of which Beam's local runner gives them none.
"""

import collections
import contextlib
import dataclasses
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import IO, Any

from models.start_lines import has_gpu_device, is_start_line
from pipeline.running.progress import ThreadTimes

# The shell of `shell=True` sets SIGINT and SIGHUP to ignored, then becomes the worker.
_IGNORE_CTRL_C = "trap '' INT HUP; exec "
# Beam's worker module in its command, and the one run in its place: the same worker, ended
# without the interpreter's teardown (see `pipeline.running.sdk_worker_main`).
_BEAM_WORKER = " -m apache_beam.runners.worker.sdk_worker_main"
_WORKER = " -m pipeline.running.sdk_worker_main"
# The run's filesystem options (--s3_endpoint_url, --s3_access_key_id, ...) while `ignoring_ctrl_c` is
# active: Beam's FnApiRunner gives its worker processes none (PIPELINE_OPTIONS "{}"), so their S3
# filesystem went to AWS without the flags' endpoint or credentials, retrying for minutes.
_worker_options: list[dict[str, Any]] = [{}]
_started: list[subprocess.Popen[bytes]] = []
# The signals that killed workers of this process's runs (the OOM killer's SIGKILL, ...).
_killed_by: list[int] = []
# The workers the launcher itself SIGKILLed to end the run's wait for a failed one (`_end_the_wait`):
# their deaths are no story of the run's, which is the failed worker's.
_ended_for_another: set[int] = set()
_lock = threading.Lock()
# A worker's stderr: a Python traceback begins here and goes on until a log line.
_TRACEBACK = b"Traceback (most recent call last):"
_LOG_LINE = re.compile(rb"^([IWEF]\d{4} |(DEBUG|INFO|WARNING|ERROR|CRITICAL)[ :])")
# What happens to the workers' tracebacks: held for the run's end, dropped, or let through.
HOLD, DROP, PASS = "hold", "drop", "pass"
_tracebacks = PASS
_held: list[bytes] = []
# Workers that ended with an error (return code, last stderr lines), in the order they ended.
_failed: list[tuple[int, list[bytes]]] = []
# How many of a worker's last stderr lines are kept to tell why it ended.
_LAST_LINES = 40
# Called (from another thread, under `_lock`) once a failed worker's others are stopped: wakes the
# launcher's wait; set while a run waits for its pipeline (`wake_on_failure`).
on_failure: Callable[[], None] | None = None
# How long Beam may take to notice a failed worker itself (it does at once in most states, and a
# worker that fails at its shutdown is told by the run's end) before the run is ended for it.
FAILURE_GRACE_SECONDS = 15.0


# Which run holds the tracebacks (`hold_tracebacks` counts them): a failed worker's timer
# ends only its own run's wait.
_run = [0]
# Whether a stop signal is ending the run (`stop_workers`).
_stopping = [False]
# The run's stall, once `stalled` ended it: what `stall` returns.
_stall: list["Stall"] = []
# While a run's pipeline runs under `failed_workers_answered`: whether it does, the control connections
# Beam pushed its workers' instructions to, and the error they are answered with once a failed or
# stalled worker ended the run off the main thread (`_answer_for_failed_workers`).
_answering = [False]
_connections: list[Any] = []
_answered: list[str] = []
# What the instructions of a run ended for a failed worker are answered with (Beam raises it as a
# RuntimeError in the run's thread; `pipeline.running.failures` tells the failure in one line).
WORKER_FAILED = "a worker process failed"
# What a worker's state letter in /proc/PID/stat says of one that makes no progress.
_STATES = {
    "T": "is stopped (SIGSTOP, SIGTSTP or a debugger)",
    "t": "is stopped by a debugger",
    "D": "is waiting in the kernel (disk I/O, a hung network mount)",
}


class WorkerFailedError(Exception):
    """Raised in the launcher's main thread when a worker failed and Beam went on waiting for it."""


@dataclasses.dataclass(frozen=True)
class Stall:
    """A run that made no progress for `seconds` (over the `limit`, --stall_timeout), ended for it."""

    seconds: float
    limit: float
    # Each worker process that was stopped or blocked in the kernel then: "worker process PID STATE".
    workers: tuple[str, ...]


class _Subprocess:
    """Stands in for the `subprocess` module inside Beam's `local_job_service` (only `Popen` differs)."""

    def __getattr__(self, name: str) -> object:
        return getattr(subprocess, name)

    @staticmethod
    def Popen(
        args: str | list[str], *rest: Any, **kwargs: Any
    ) -> subprocess.Popen[bytes]:  # as Beam calls it
        # Beam's command is one command line (`python -m ...sdk_worker_main`); `trap` is POSIX sh.
        if kwargs.get("shell") and isinstance(args, str) and os.name == "posix":
            args = _IGNORE_CTRL_C + _worker_command(args)
        if kwargs.get("env") is not None and _worker_options[0]:
            kwargs["env"] = _with_options(kwargs["env"], _worker_options[0])
        copied = kwargs.get("stderr") is None
        if copied:
            kwargs["stderr"] = subprocess.PIPE
        process = subprocess.Popen(args, *rest, **kwargs)
        with _lock:
            _started.append(process)
        if copied and process.stderr is not None:
            threading.Thread(target=_copy_stderr, args=(process.stderr, process), daemon=True).start()
        return process


def _worker_command(command: str) -> str:
    """Beam's shell command for a worker, running `_WORKER` in its place, its interpreter's path quoted.

    Beam writes `sys.executable` into the command unquoted: from a Python whose path holds a space
    (a venv in "My Projects") or a shell character, the shell ran another program ("/.../My: not
    found", status 127) and every run with worker processes failed, its rerun too.
    """
    if not command.endswith(_BEAM_WORKER):
        return command
    interpreter = command[: -len(_BEAM_WORKER)]
    return (shlex.quote(interpreter) if interpreter == sys.executable else interpreter) + _WORKER


def _with_options(env: dict[str, str], options: dict[str, Any]) -> dict[str, str]:
    """The worker's environment, its PIPELINE_OPTIONS (what Beam's worker main gives its filesystems)
    holding `options` where Beam gave none."""
    try:
        given = json.loads(env.get("PIPELINE_OPTIONS") or "{}")
    except ValueError:
        given = None
    if given != {}:  # Options of Beam's own (a later FnApiRunner that passes them): left as they are.
        return env
    return dict(env, PIPELINE_OPTIONS=json.dumps({"options": options}))


def _copy_stderr(stream: IO[bytes], process: subprocess.Popen[bytes] | None = None) -> None:
    """Copies one worker's stderr to ours until it closes, its tracebacks as `_tracebacks` says.

    Then, if the worker failed while a run holds tracebacks, stops the others (`_worker_failed`).
    """
    in_traceback = False
    last: collections.deque[bytes] = collections.deque(maxlen=_LAST_LINES)
    gpu_device = has_gpu_device()
    for line in iter(stream.readline, b""):
        if is_start_line(line.rstrip(b"\n"), gpu_device):
            # Each worker's TensorFlow start-up lines (and cuInit's on a machine without a GPU), as
            # the launcher's own are dropped (`models.start_lines`): noise that reads like a failure.
            continue
        last.append(line)
        if line.startswith(_TRACEBACK):
            in_traceback = True
        elif in_traceback and _LOG_LINE.match(line):
            in_traceback = False
        with _lock:
            if in_traceback and _tracebacks != PASS:
                if _tracebacks == HOLD:
                    _held.append(line)
                continue
        _write_stderr([line])
    stream.close()
    if process is not None:
        _worker_failed(process.wait(), list(last))


def _worker_failed(code: int, last: list[bytes]) -> None:
    """Records a worker that ended with an error; during a run, ends Beam's wait if Beam does not.

    Beam notices a dead worker in some states only: one that dies otherwise (out of
    memory as it starts a thread or maps a library) leaves the launcher waiting
    forever for the bundle it held, and the other workers for their next one.  So if
    the run is still waiting FAILURE_GRACE_SECONDS later, the others are SIGKILLed and
    the launcher woken (`on_failure`); the run ends with the first one's story
    (`failed_workers`).  A worker that dies at its own shutdown, its work done, is no
    failure: the run has stopped waiting by then.
    """
    if code == 0:
        return
    with _lock:
        _failed.append((code, last))
        # Stopped by a signal (`stop_workers`): the run says it was interrupted, no more. A run off the
        # main thread has no wake: its wait is ended by answering its workers' instructions.
        running = _tracebacks == HOLD and not _stopping[0] and (on_failure is not None or _answering[0])
    if running:
        timer = threading.Timer(FAILURE_GRACE_SECONDS, _end_the_wait, args=(_run[0],))
        timer.daemon = True  # A run that ended meanwhile does not wait for it.
        timer.start()


def _end_the_wait(run: int) -> None:
    """A worker failed and Beam is still waiting: stops the other workers, then wakes the launcher.

    Not once another run (in the same process: a second `run_export`) holds the tracebacks: a worker
    that failed at its shutdown as its run ended must not kill the next run's workers 15 s later.
    """
    with _lock:
        if (on_failure is None and not _answering[0]) or _stopping[0] or run != _run[0]:
            return
        _ended_for_another.update(process.pid for process in _started if process.poll() is None)
    kill_workers()
    _end_the_wait_now(WORKER_FAILED)


def _end_the_wait_now(error: str) -> None:
    """Ends the run's wait for its (killed) workers: the main thread's by its wake (`on_failure`), a run
    on another thread by answering its workers' instructions with `error` (`_answer_for_failed_workers`)."""
    with _lock:  # `wake_on_failure(None)` takes the lock: no wake once the run stopped waiting.
        if _stopping[0]:
            return
        if on_failure is not None:
            on_failure()
        elif _answering[0]:
            _answer_for_failed_workers(error)


def _error_response(instruction_id: str, error: str) -> Any:
    """Beam's answer to a worker instruction that failed with `error` (what a failing worker sends)."""
    from apache_beam.portability.api import beam_fn_api_pb2

    return beam_fn_api_pb2.InstructionResponse(instruction_id=instruction_id, error=error)


def _answer_for_failed_workers(error: str) -> None:
    """Answers every instruction the run's workers were sent and not answered, and every later one, with
    `error` (under `_lock`).

    Off the main thread there is no wake: a worker that died before it connected left Beam waiting
    forever for the bundle queued to it (killing the other workers ends only their own bundles), the
    run's thread with it, whatever --stall_timeout said. Beam then raises `error` in the run's thread.
    """
    _answered[:] = [error]
    for connection in _connections:
        for instruction_id, future in list(connection._futures_by_id.items()):
            if not future.is_done():
                future.set(_error_response(instruction_id, error))


def wake_on_failure(wake: Callable[[], None] | None) -> None:
    """Sets what ends the launcher's wait for a failed worker; None once the run no longer waits."""
    global on_failure
    with _lock:
        on_failure = wake


def is_log_line(line: bytes) -> bool:
    """Whether a worker's stderr line is a log record (TensorFlow's, absl's, Python logging's)."""
    return bool(_LOG_LINE.match(line)) or line.startswith(b"WARNING: All log messages before absl")


def any_failed() -> bool:
    """Whether a worker of the run ended with an error, or the run stalled; takes no lock, so a signal
    handler may ask."""
    return bool(_failed) or bool(_stall)  # One read of a list each: atomic under the GIL.


def stalled(seconds: float, limit: float) -> None:
    """The run made no progress for `seconds`, over --stall_timeout `limit` (`progress.ProgressMonitor`).

    A worker that is stopped, deadlocked or blocked on a hung mount never answers, and Beam
    waits for it forever. So, during a run with worker processes, the workers are
    SIGKILLed (their closed row files are durable, the rerun continues from them) and the
    launcher's wait is ended as for a failed worker; the run ends with the stall's story (`stall`).
    A run on another thread than the main one (a library user's) has no wake (`on_failure` is None:
    only the main thread takes signals): its workers are killed all the same, and the instructions
    they were sent are answered with an error (`_answer_for_failed_workers`), which ends Beam's wait
    also for a worker that never connected; it waited forever before.
    """
    with _lock:
        running = [process for process in _started if process.poll() is None]
        if _stopping[0] or _tracebacks != HOLD or not running or _stall:
            return
        # Before they are killed: a stopped or blocked worker is what stalled the run.
        states = ((process.pid, _state(process.pid)) for process in running)
        _stall.append(
            Stall(
                seconds,
                limit,
                tuple(f"worker process {pid} {_STATES[s]}" for pid, s in states if s in _STATES),
            )
        )
    kill_workers()
    _end_the_wait_now(WORKER_FAILED)


def scheduler_times() -> dict[tuple[int, str], ThreadTimes]:
    """What the scheduler says of each thread of this process and of each worker process still running:
    {(pid, thread id): (seconds on a CPU, seconds waiting, ready, for one, time slices run)}
    (`_thread_times`; `progress.work_seconds` tells computing from polling with them)."""
    with _lock:
        pids = [process.pid for process in _started if process.poll() is None]
    times = {}
    for pid in [os.getpid(), *pids]:
        # Nothing for a process gone, or without /proc: only the counts tell.
        times.update(_thread_times(pid))
    return times


def _thread_times(pid: int) -> dict[tuple[int, str], ThreadTimes]:
    """{(pid, thread id): (seconds on a CPU, seconds ready on a run queue, time slices)} for each thread of
    the process; where the kernel keeps no schedstat, {(pid, ""): (its CPU seconds, 0, 0)}; {} where the
    process is gone or /proc cannot say.

    /proc/PID/task/TID/schedstat holds the nanoseconds a thread ran, the nanoseconds it waited on a run
    queue (throttled time included), and how many times it was given a CPU.
    """
    times = {}
    for task in _tasks(pid):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat", encoding="ascii") as handle:
                ran, waited, slices = handle.read().split()[:3]
            times[(pid, task)] = (int(ran) / 1e9, int(waited) / 1e9, int(slices))
        except (OSError, ValueError):  # A thread that ended meanwhile.
            continue
    if times:
        return times
    fields = _stat_fields(pid)
    try:
        return {(pid, ""): ((int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), 0.0, 0)}
    except (IndexError, ValueError):
        return {}


def io_bytes() -> dict[int, int]:
    """{pid: the bytes it has read and written} of each running worker process (`progress.IO_WORK_BYTES`).

    /proc/PID/io's rchar and wchar: files, pipes and mounts (FUSE, NFS), not sockets; nothing for a
    process /proc cannot say of.
    """
    with _lock:
        pids = [process.pid for process in _started if process.poll() is None]
    moved = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/io", encoding="ascii") as handle:
                fields = dict(line.split(": ", 1) for line in handle.read().splitlines())
            moved[pid] = int(fields["rchar"]) + int(fields["wchar"])
        except (OSError, ValueError, KeyError):  # Gone meanwhile, or no /proc.
            continue
    return moved


def _tasks(pid: int) -> list[str]:
    """The thread ids of the process (as /proc names them), or [] where it is gone or there is no /proc."""
    try:
        return os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []


def stall() -> Stall | None:
    """The run's stall that ended it (`stalled`), or None."""
    with _lock:
        return _stall[0] if _stall else None


def _state(pid: int) -> str:
    """The state letter that tells why the process makes no progress: T, t or D (`_STATES`, in that
    order) where any of its threads is so, else its main thread's letter (R, S, ...), or "" where /proc
    cannot say.

    Beam's SDK worker runs each bundle on a thread of its pool while its main thread waits on the
    control stream (S): a bundle's thread blocked on a hung mount (D) is not the main thread.
    """
    letters = {fields[0] for task in _tasks(pid) if (fields := _stat_fields(pid, task))}
    stalled = [letter for letter in _STATES if letter in letters]
    if stalled:
        return stalled[0]
    fields = _stat_fields(pid)
    return fields[0] if fields else ""


def _stat_fields(pid: int, task: str | None = None) -> list[str]:
    """The fields of /proc/PID/stat (or of its thread's, /proc/PID/task/TASK/stat) after the command
    name, the state letter first, or [] where the process is gone or there is no /proc."""
    path = f"/proc/{pid}/stat" if task is None else f"/proc/{pid}/task/{task}/stat"
    try:
        with open(path, encoding="ascii", errors="replace") as handle:
            # After the command name, which may hold spaces and parentheses.
            return handle.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def failed_workers() -> list[tuple[int, list[bytes]]]:
    """The workers of the run that ended with an error, first first: (return code, its last stderr lines)."""
    with _lock:
        return list(_failed)


def _write_stderr(lines: list[bytes]) -> None:
    try:
        for line in lines:
            sys.stderr.write(line.decode("utf-8", errors="replace"))
        sys.stderr.flush()
    except (OSError, ValueError):  # Our stderr is gone (a closed terminal or pipe): the lines are dropped.
        pass


def hold_tracebacks() -> None:
    """From now on the workers' tracebacks are held until the run's failure is known."""
    global _tracebacks
    with _lock:
        _tracebacks = HOLD
        _run[0] += 1
        _held.clear()
        _failed.clear()
        _stall.clear()
        _answered.clear()
        _connections.clear()
        _stopping[0] = False
        # An earlier run's workers (one in the same process that a stop signal ended, its workers
        # SIGKILLed): their deaths are no story of this run's, which told a failure of its own as
        # "a worker process was killed (SIGKILL, perhaps for want of memory)".
        _killed_by.clear()
        _ended_for_another.clear()
        _started[:] = [process for process in _started if process.poll() is None]


def drop_held_tracebacks() -> None:
    """The run's failure is told in one line: the workers' tracebacks, held and to come, are dropped."""
    global _tracebacks
    with _lock:
        _tracebacks = DROP
        _held.clear()


def let_held_tracebacks_through() -> None:
    """The run ended: tracebacks still held are printed, and later ones go straight through.

    After `drop_held_tracebacks` they stay dropped: workers still stopping print more.
    """
    global _tracebacks
    with _lock:
        held = _held[:] if _tracebacks == HOLD else []
        _held.clear()
        if _tracebacks == HOLD:
            _tracebacks = PASS
    _write_stderr(held)


@contextlib.contextmanager
def ignoring_ctrl_c(worker_options: dict[str, Any] | None = None) -> Iterator[None]:
    """While active, the local worker processes Beam starts ignore SIGINT (see the module docstring),
    and get `worker_options` (pipeline options: `filesystem_options`) as their own."""
    from apache_beam.runners.portability import local_job_service

    before = local_job_service.subprocess
    # setattr: the module attribute is replaced by a stand-in on purpose, for the duration only.
    setattr(local_job_service, "subprocess", _Subprocess())  # noqa: B010
    _worker_options[0] = dict(worker_options or {})
    try:
        yield
    finally:
        local_job_service.subprocess = before
        _worker_options[0] = {}
        # Beam waited for the workers of a run that ended normally; an interrupted run's
        # may still be stopping and stay listed for `kill_workers`.
        with _lock:
            _killed_by.extend(_signals_of(_started))
            _started[:] = [process for process in _started if process.poll() is None]


@contextlib.contextmanager
def late_workers_stopped() -> Iterator[None]:
    """While active, a worker that connects after the launcher closed its control connection is stopped.

    Beam's `ControlConnection.close` tells a worker there is no more work only once the
    worker has connected; the launcher then waits for the worker process to end.  A run
    that fails before a worker connected (the other one failed the first stage, which
    holds its one element, while this one still started on a busy machine) left the late
    worker waiting for work and the launcher waiting for it, forever, idle: nothing was
    counted yet, so no stall for --stall_timeout to see either.  So the
    "no more work" marker is queued for a connection not yet started too: the late
    worker runs what was queued for it, reads the marker, and ends.
    """
    from apache_beam.runners.portability.fn_api_runner import worker_handlers

    connection = worker_handlers.ControlConnection
    servicer = worker_handlers.BeamFnControlServicer
    close = connection.close

    def close_even_unstarted(self: Any) -> None:
        # Under the lock `set_input` takes: a worker connecting meanwhile gets one marker or two
        # (the second unread), never none.
        with connection._lock:
            if self._state == servicer.UNSTARTED_STATE:
                self._push_queue.put(servicer._DONE_MARKER)
        close(self)

    # setattr: Beam's method is replaced on purpose, for the duration only.
    setattr(connection, "close", close_even_unstarted)  # noqa: B010
    try:
        yield
    finally:
        setattr(connection, "close", close)  # noqa: B010


@contextlib.contextmanager
def failed_workers_answered() -> Iterator[None]:
    """While active (the run's pipeline runs), a run without a wake (on another thread than the main one)
    that a failed or stalled worker ended stops waiting for it (`_answer_for_failed_workers`).

    Records each control connection Beam pushes an instruction to; once the run was ended, a later
    instruction is answered at once with the same error, never sent to a worker that is gone.
    """
    from apache_beam.runners.portability.fn_api_runner import worker_handlers

    connection = worker_handlers.ControlConnection
    push = connection.push

    def push_or_answer(self: Any, request: Any) -> Any:
        if request is worker_handlers.BeamFnControlServicer._DONE_MARKER:
            return push(self, request)
        # Beam's push is called without `_lock`: Beam's close holds its own lock as it pushes.
        with _lock:
            if _answering[0] and self not in _connections:
                _connections.append(self)
            answered = _answered[0] if _answered else None
        if answered is not None:
            return worker_handlers.ControlFuture(
                request.instruction_id, _error_response(request.instruction_id, answered)
            )
        future = push(self, request)
        with _lock:  # Ended while it was pushed, maybe after its future was looked for: answered here.
            answered = _answered[0] if _answered else None
        if answered is not None and not future.is_done():
            future.set(_error_response(request.instruction_id, answered))
        return future

    # setattr: Beam's method is replaced on purpose, for the duration only.
    setattr(connection, "push", push_or_answer)  # noqa: B010
    with _lock:
        _answering[0] = True
    try:
        yield
    finally:
        with _lock:
            _answering[0] = False
            _connections.clear()
        setattr(connection, "push", push)  # noqa: B010


def killed_by() -> list[int]:
    """The signals that killed worker processes of the run (a dead worker fails it), and forgets them."""
    with _lock:
        signals = _killed_by + _signals_of(_started)
        _killed_by.clear()
    return signals


def _signals_of(processes: list[subprocess.Popen[bytes]]) -> list[int]:
    """The signals that killed those of `processes` that a signal ended, but not those the launcher killed
    for a failed worker (`_ended_for_another`)."""
    return [
        -code
        for process in processes
        if (code := process.poll()) is not None and code < 0 and process.pid not in _ended_for_another
    ]


def kill_workers() -> None:
    """SIGKILLs the worker processes started under `ignoring_ctrl_c` that are still running."""
    with _lock:
        processes = list(_started)
    for process in processes:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGKILL)
    for process in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=5)


def stop_workers() -> None:
    """A stop signal ends the run: SIGKILLs the workers, whose deaths then are no failure to tell."""
    with _lock:
        _stopping[0] = True
    kill_workers()


@contextlib.contextmanager
def interrupt_stops_workers() -> Iterator[None]:
    """While active, Python's own Ctrl-C (a library user's, a notebook's interrupt) first stops the workers.

    `python -m pipeline.run` has a stop handler of its own, which does the same. In-process, the
    KeyboardInterrupt alone took 20 to 35 s to return: Beam's unwinding waited for each worker to
    finish starting and its bundle. Only where SIGINT has Python's default handler, in the main thread.
    """
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return

    def interrupt(signum: int, frame: FrameType | None) -> None:
        # From a thread: the handler may have interrupted the holder of the workers' lock.
        threading.Thread(target=stop_workers, name="stop-workers", daemon=True).start()
        signal.default_int_handler(signum, frame)

    signal.signal(signal.SIGINT, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
