"""Command line: `python -m pipeline.run [flags]` exports layer vectors to Parquet.

With no flags it exports the bundled model's default layers for the bundled
sample corpus.  `--help` lists our flags; Beam's own (--runner, --project,
--region, --temp_location, ...) pass through to the runner.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
import threading
import typing
from collections.abc import Sequence
from types import FrameType
from typing import TextIO

# Quiet TensorFlow's C++ start-up chatter unless the user asked for it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from pipeline.errors import (
    EXIT_CONFIG_ERROR,
    EXIT_HANGUP,
    EXIT_INTERRUPTED,
    EXIT_OUTPUT_FAILED,
    EXIT_TERMINATED,
    EXIT_UNEXPECTED,
    ExportConfigError,
    OutputWriteError,
    WorkerDiedError,
)
from pipeline.running.advice import rerun_to_finish, resume_in

if typing.TYPE_CHECKING:
    from pipeline.running.report import ExportSummary

# RunInference warns once per batch that it cannot read memory use, and local worker
# processes that they have no semi-persistent directory; neither changes anything.
# Worker processes' warnings arrive wrapped in a "Worker: ..." message, hence `in`.
_NOISE = ("Resource module is not available", "No semi_persistent_directory found")
# The signals that stop a run, and the status each ends it with. A closed terminal's
# SIGHUP stops a run like SIGTERM, unless it was started ignoring it (`nohup`).
STOP_SIGNALS: dict[int, int] = {
    signal.SIGINT: EXIT_INTERRUPTED,
    signal.SIGTERM: EXIT_TERMINATED,
    signal.SIGHUP: EXIT_HANGUP,
}


def _drop_noise(record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return not any(noise in message for noise in _NOISE)


class _Silencer:
    """Once a stop signal arrived, sends all further output of this process to /dev/null.

    Beam logs the KeyboardInterrupt it finds in a transform (with an 80-line
    traceback), the progress bar may still draw, TensorFlow's C++ code may
    print: the `interrupted:` line is to be the only thing the user sees, so
    the file descriptors themselves are redirected, not just `sys.stderr`.
    """

    def __init__(self) -> None:
        self._saved: tuple[int, int] | None = None

    def silence(self) -> None:
        if self._saved is not None:
            return
        logging.disable(logging.CRITICAL)
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        self._saved = (os.dup(1), os.dup(2))
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        os.close(devnull)

    def restore(self) -> None:
        if self._saved is None:
            return
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        for fd, saved in zip((1, 2), self._saved, strict=True):
            os.dup2(saved, fd)
            os.close(saved)
        self._saved = None
        logging.disable(logging.NOTSET)


def _tell(line: str, stream: TextIO | None = None) -> None:
    """Prints `line` on `stream` (stderr), if it still reaches anything.

    A closed terminal (EIO; after SIGHUP, or a run left behind by `&`) or a closed
    pipe (EPIPE: `| head`) must not turn a committed export into a failure: the
    stream is then pointed at /dev/null, so that nothing else (the exit's flush) fails on it.
    """
    from models.stopping import silence

    stream = stream or sys.stderr
    try:
        print(line, file=stream, flush=True)
    except OSError:  # EIO from a closed terminal, EPIPE from a closed pipe.
        silence(stream)


def _interrupted(
    signum: int,
    committed: ExportSummary | None = None,
    defaulted_output: str | None = None,
    resume: str = "auto",
) -> int:
    """Says how the run stopped: committed before the signal (and how it ended), or what to rerun."""
    if committed is not None and not committed.exit_code:
        _tell(
            f"interrupted: the export was committed to {committed.output} before the run stopped "
            f"({signal.Signals(signum).name}); it is complete, nothing to rerun."
        )
    elif committed is not None:
        # A failed run set aside beside a succeeded export committed nothing: its line says where it is.
        done = "the export was committed to" if committed.committed else "the run had finished in"
        _tell(
            f"interrupted: {done} {committed.output} before the run stopped "
            f"({signal.Signals(signum).name}), ending with errors (exit status {committed.exit_code}):"
        )
        _tell(f"error: {committed.message}")
    else:
        # The staged files stay invisible to readers; the rerun resumes from them (pipeline.writing.resume).
        recovered = _recovered_commits()
        nothing = "nothing of this run was committed" if recovered else "nothing was committed"
        earlier = (
            f" Before it, an earlier run's interrupted commit into {recovered[0]} was finished: it "
            "holds that run's complete export (replacing it needs --overwrite)."
            if recovered
            else ""
        )
        if not _past_launch_checks() and recovered:
            # The output now holds a finished export: the same command without --overwrite is refused there,
            # and where the killed run was this very command (a retry stopped again), its export is done.
            _tell(
                f"interrupted: the run stopped during its launch checks ({signal.Signals(signum).name}), "
                f"before this run wrote anything; {nothing}. Before it, an earlier run's interrupted commit "
                f"into {recovered[0]} was finished: it holds that run's complete export. If that run was "
                "this same command, its export is done; to replace it, rerun with --overwrite."
            )
        elif not _past_launch_checks():
            # Stopped while flags, model and locations were being checked: there are no rows to keep.
            _tell(
                f"interrupted: the run stopped during its launch checks ({signal.Signals(signum).name}), "
                f"before this run wrote anything; {nothing}. Rerun the same command to start the export."
            )
        else:
            rerun = rerun_to_finish(resume, defaulted_output, "the rows this run made durable")
            _tell(f"interrupted: {nothing}; {rerun}.{earlier}")
    for job in _jobs_left_running():
        # Logged as the cancel failed, after the signal had silenced the logs: said here.
        _tell(f"warning: {job}")
    return STOP_SIGNALS.get(signum, EXIT_INTERRUPTED)


def _commit_phase() -> str:
    # Not imported yet (the export imports it): no commit can be in flight.
    phase = sys.modules.get("pipeline.writing.commit_phase")
    return phase.commit_phase() if phase else "idle"


def _past_launch_checks() -> bool:
    # Not imported yet: the run was stopped before it began.
    export = sys.modules.get("pipeline.running.export")
    return bool(export and export.past_launch_checks())


def _jobs_left_running() -> list[str]:
    # Not imported yet: no job was followed.
    left = sys.modules.get("pipeline.running.left_running")
    return left.notes() if left else []


def _recovered_commits() -> list[str]:
    # Not imported yet: no earlier run's commit was finished either.
    phase = sys.modules.get("pipeline.writing.commit_phase")
    return phase.recovered() if phase else []


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the export for `argv` (default: the command line) and returns the exit status."""
    from models.stopping import open_standard_streams

    open_standard_streams()
    argv = sys.argv[1:] if argv is None else argv
    from models.paths import removed_working_directory

    removed = removed_working_directory()
    if removed:
        _tell(f"error: {removed}")
        return EXIT_CONFIG_ERROR
    if "-h" in argv or "--help" in argv:
        from pipeline.planning.cli import options_parser
        from pipeline.planning.options import ExportOptions

        options_parser(ExportOptions, prog="python -m pipeline.run", description=__doc__).print_help()
        return 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # Beam logs every bundle and worker message at INFO; keep its warnings only.
    logging.getLogger("apache_beam").setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_drop_noise)
    interrupted: list[int] = []
    silencer = _Silencer()
    defaulted_output = None
    if not any(arg == "--output" or arg.startswith("--output=") for arg in argv):
        from pipeline.planning.options import default_output

        # Chosen here, so that an interrupted run can say where its rerun must write to resume it.
        defaulted_output = default_output()
        # Before a `--`: argparse takes whatever follows it for positional arguments.
        end = list(argv).index("--") if "--" in argv else len(argv)
        argv = [*argv[:end], "--output", defaulted_output, *argv[end:]]

    def on_signal(signum: int, frame: FrameType | None) -> None:
        interrupted.append(signum)
        if _commit_phase() != "idle":
            # A commit is in flight (or done): it finishes, then the run reports the signal.
            sys.modules["pipeline.writing.commit_phase"].defer_signal(signum)
            return
        silencer.silence()
        workers = sys.modules.get("pipeline.running.local_workers")
        if workers is not None:
            # Beam's unwinding waits for each local worker to answer: a stopped or deadlocked one
            # never does. SIGKILL them now (their closed row files are durable, a partial one is
            # ignored by the rerun), from a thread: the handler may have interrupted their lock's holder.
            threading.Thread(target=workers.stop_workers, name="stop-workers", daemon=True).start()
        raise KeyboardInterrupt

    previous = {
        signum: signal.signal(signum, on_signal)
        for signum in STOP_SIGNALS
        # Started under `nohup`: the run is meant to outlive its terminal.
        if not (signum == signal.SIGHUP and signal.getsignal(signum) == signal.SIG_IGN)
    }
    try:
        from models.start_lines import import_tensorflow_quietly

        # Before the export's imports load it: its start-up INFO lines are not to come before
        # a refusal's one `error:` line. After the handlers: a Ctrl-C meanwhile is one line too.
        import_tensorflow_quietly()
        from pipeline.running.export import run_export
        from pipeline.running.report import format_summary

        summary = run_export(argv)
        if interrupted:
            return _interrupted(interrupted[0], committed=summary)
        _tell(format_summary(summary), sys.stdout)
        if summary.exit_code:
            _tell(f"error: {summary.message}")
        return summary.exit_code
    except ExportConfigError as error:
        silencer.restore()
        _tell(f"error: {error}")
        return EXIT_CONFIG_ERROR
    except OutputWriteError as error:
        silencer.restore()
        if interrupted:
            # The signal waited for the commit, which then failed: both are said.
            _tell(
                f"interrupted: {signal.Signals(interrupted[0]).name} arrived during the commit, which "
                "then failed:"
            )
        _tell(f"error: {error}")
        return EXIT_OUTPUT_FAILED
    except WorkerDiedError as error:
        silencer.restore()
        _tell(f"error: {error}")
        return EXIT_UNEXPECTED
    except Exception:
        # Beam re-raises a KeyboardInterrupt from inside a transform as a RuntimeError.
        if not interrupted:
            raise
        silencer.restore()
        return _interrupted(interrupted[0], defaulted_output=defaulted_output, resume=resume_in(argv))
    except KeyboardInterrupt:
        silencer.restore()
        return _interrupted(
            interrupted[0] if interrupted else signal.SIGINT,
            defaulted_output=defaulted_output,
            resume=resume_in(argv),
        )
    finally:
        for signum, previous_handler in previous.items():
            signal.signal(signum, previous_handler)


def run_main(argv: Sequence[str] | None = None) -> None:
    """`main`, then exit the process with its status (what `python -m pipeline.run` does)."""
    status = main(argv)
    if status in STOP_SIGNALS.values():
        # Beam's runner threads are not daemons: a normal exit would wait for them to
        # finish the whole pipeline. Nothing needs them (the lock is a file lock the
        # kernel releases, the next run removes the staging area), so leave now.
        sys.stdout.flush()
        sys.stderr.flush()
        # Local worker processes still alive would print a traceback once the launcher is
        # gone, and Beam's thread that waits on one a RuntimeError once it is killed: the
        # `interrupted:` line printed above stays the last thing on the terminal.
        _Silencer().silence()
        if "pipeline.running.local_workers" in sys.modules:
            sys.modules["pipeline.running.local_workers"].kill_workers()
        os._exit(status)
    # The run is over: its files are committed and durable, its lock released, its worker
    # processes and temporary directories gone. What is left, the interpreter freeing
    # TensorFlow, Keras and Beam module by module, takes about a second and changes nothing.
    _leave(status)


def _leave(status: int) -> None:
    """Ends the process with `status` after its exit functions (TensorFlow's removal of
    its generated files, logging's flush), without the interpreter's teardown.

    Threads are waited for first, as the interpreter itself would."""
    threading._shutdown()  # type: ignore[attr-defined]  # what Python runs first at exit
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # A closed pipe or stream: nothing more can reach it.
            pass
    os._exit(status)


if __name__ == "__main__":
    run_main()
