"""Local worker processes: deaf to a terminal's Ctrl-C, and stopped silently when the launcher stops.

A Ctrl-C typed in a terminal goes to its whole foreground process group, so
Beam's SDK worker processes (`--direct_running_mode=multi_processing`) get it
too and print their own KeyboardInterrupt tracebacks on the shared terminal;
and when the launcher leaves, a worker that is still alive prints a gRPC
traceback as its control stream breaks.  Beam starts each worker with
`subprocess.Popen(command, shell=True)` in `local_job_service.SubprocessSdkWorker.run`;
while `ignoring_ctrl_c` is active that call goes through `_Popen`, which starts the
worker with SIGINT and SIGHUP (a closed terminal's) ignored (an ignored signal
stays ignored across `exec`, and Python then installs no KeyboardInterrupt
handler) and remembers it, so that
`kill_workers` can stop it with SIGKILL, which prints nothing.  The workers stay in
the terminal's process group: a background group would be stopped by SIGTTOU when
it writes to a terminal set to `stty tostop`, and a SIGTERM or SIGKILL sent to the
group still reaches them.
"""

import contextlib
import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from typing import Any

# The shell of `shell=True` sets SIGINT and SIGHUP to ignored, then becomes the worker.
_IGNORE_CTRL_C = "trap '' INT HUP; exec "
_started: list[subprocess.Popen[bytes]] = []
# The signals that killed workers of this process's runs (the OOM killer's SIGKILL, ...).
_killed_by: list[int] = []
_lock = threading.Lock()


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
            args = _IGNORE_CTRL_C + args
        process = subprocess.Popen(args, *rest, **kwargs)
        with _lock:
            _started.append(process)
        return process


@contextlib.contextmanager
def ignoring_ctrl_c() -> Iterator[None]:
    """While active, the local worker processes Beam starts ignore SIGINT (see the module docstring)."""
    from apache_beam.runners.portability import local_job_service

    before = local_job_service.subprocess
    # setattr: the module attribute is replaced by a stand-in on purpose, for the duration only.
    setattr(local_job_service, "subprocess", _Subprocess())  # noqa: B010
    try:
        yield
    finally:
        local_job_service.subprocess = before
        # Beam waited for the workers of a run that ended normally; an interrupted run's
        # may still be stopping and stay listed for `kill_workers`.
        with _lock:
            _killed_by.extend(
                -code for process in _started if (code := process.poll()) is not None and code < 0
            )
            _started[:] = [process for process in _started if process.poll() is None]


def killed_by() -> list[int]:
    """The signals that killed worker processes of the run (a dead worker fails it), and forgets them."""
    with _lock:
        signals = _killed_by + [
            -code for process in _started if (code := process.poll()) is not None and code < 0
        ]
        _killed_by.clear()
    return signals


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
