"""A command stopped by Ctrl-C or SIGTERM says so in one `interrupted:` line, exits 130/143, no traceback."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys
import typing
from collections.abc import Callable, Sequence
from types import FrameType

# As shells report a process these signals ended (pipeline.errors.EXIT_INTERRUPTED/TERMINATED).
STOP_SIGNALS: dict[int, int] = {signal.SIGINT: 130, signal.SIGTERM: 143}


def _tell(command: str, signum: int) -> int:
    """Prints the one line; returns the exit status for `signum`."""
    try:
        print(
            f"interrupted: {command} stopped ({signal.Signals(signum).name}) before it finished; what it "
            "writes appears whole or not at all, so rerun it to finish.",
            file=sys.stderr,
            flush=True,
        )
    except (OSError, ValueError):  # a closed terminal or pipe: the status still says it
        pass
    return STOP_SIGNALS[signum]


def open_standard_streams() -> None:
    """Puts /dev/null on a standard stream the process was started without (`2>&-`, `>&-`).

    Python then has `sys.stderr` None, which every write to it breaks on; and the
    first file the process opens (an export's lock, a row file) would take the free
    descriptor, so that what TensorFlow or Beam writes to stderr would land in it.
    """
    for fd, name in ((0, "stdin"), (1, "stdout"), (2, "stderr")):
        try:
            os.fstat(fd)
        except OSError:
            devnull = os.open(os.devnull, os.O_RDWR)  # the lowest free descriptor: `fd` or one below
            if devnull != fd:
                os.dup2(devnull, fd)
                os.close(devnull)
        if getattr(sys, name) is None:
            setattr(sys, name, open(fd, "r" if fd == 0 else "w", closefd=False))  # noqa: SIM115


def stop_at_once(command: str) -> None:
    """Until `run` starts: a stop signal prints the line and ends the process at once.

    For the seconds a command spends importing (Keras, Beam) before its `main`:
    nothing is written yet, and a KeyboardInterrupt there would end in a traceback.
    """

    def handler(signum: int, frame: FrameType | None) -> None:
        os._exit(_tell(command, signum))

    for signum in STOP_SIGNALS:
        signal.signal(signum, handler)


def run(command: str, main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """`main(argv)`, with a stop signal unwinding it (its `finally`s remove what it half wrote).

    Returns:
        `main`'s status, or 130 (SIGINT) / 143 (SIGTERM) after the `interrupted:` line.
    """
    open_standard_streams()
    stopped: list[int] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        stopped.append(signum)
        raise KeyboardInterrupt

    previous = {signum: signal.signal(signum, handler) for signum in STOP_SIGNALS}
    try:
        status = main(argv)
    except OSError as error:
        if error.errno not in (errno.EPIPE, errno.EIO):
            raise
        # Its reader is gone (`| head -1`, a closed terminal): what is left to print has no one to
        # read it, and a shell's `| head` does not make the command fail. Its files are written whole.
        silence(sys.stdout)
        return 0
    except KeyboardInterrupt:
        # Stopping already: a second Ctrl-C (a terminal sends one to the whole group) must not
        # break into the exit with a traceback.
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
        return _tell(command, stopped[0] if stopped else signal.SIGINT)
    for signum, handler_before in previous.items():
        signal.signal(signum, handler_before)
    return status


def silence(stream: typing.TextIO) -> None:
    """Points `stream`'s descriptor at /dev/null, so that the exit's flush does not fail on a closed one."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
