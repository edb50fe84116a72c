"""Where this process's commit stands, and the stop signals that wait until it is over.

The signal handlers of `pipeline.run` ask `commit_phase()`: while a commit is
in flight SIGINT, SIGTERM and SIGHUP are deferred (`defer_signal`) rather than cutting
it short.  `pipeline.writing.commit` marks its commits with `committing`.
"""

import contextlib
import signal
from collections.abc import Iterator
from typing import Literal

# "idle" (nothing of the output touched yet), "committing" (stop signals must wait) or "committed".
Phase = Literal["idle", "committing", "committed"]

_commit_phase: Phase = "idle"
# Signals that arrived while a commit was in flight, for `committing` to deliver after it.
_deferred_signals: list[int] = []
# The outputs whose interrupted commit (an earlier run's) this process finished.
_recovered: list[str] = []
# Of each: (the signature in that run's `_RUN.json`, the manifest the commit put in place), where read.
_recovered_runs: dict[str, tuple[object, object]] = {}


def commit_phase() -> Phase:
    """ "idle", "committing" or "committed": whether an interrupt now would cut a commit short."""
    return _commit_phase


def reset_commit_phase() -> None:
    """Marks the start of a new run in this process (tests run several)."""
    global _commit_phase
    _commit_phase = "idle"
    _deferred_signals.clear()
    _recovered.clear()
    _recovered_runs.clear()


def note_recovered(directory: str, signature: object = None, manifest: object = None) -> None:
    """Records that an earlier run's interrupted commit into `directory` was finished here, with that
    run's signature (`pipeline.writing.resume.run_signature`) and the manifest committed, if known."""
    _recovered.append(directory)
    if signature is not None and manifest is not None:
        _recovered_runs[directory] = (signature, manifest)


def recovered_run(directory: str) -> tuple[object, object] | None:
    """(signature, manifest) of the earlier run whose interrupted commit into `directory` this process
    finished, or None (none finished, or its signature unknown)."""
    return _recovered_runs.get(directory)


def recovered() -> list[str]:
    """The outputs whose earlier run's interrupted commit this run finished (a stopped run says so)."""
    return list(_recovered)


def defer_signal(signum: int) -> None:
    """Called by a signal handler that found a commit in flight: the signal is delivered after it."""
    _deferred_signals.append(signum)


@contextlib.contextmanager
def committing(done_phase: Phase | None = None) -> Iterator[None]:
    """Marks a commit in flight; afterwards the phase is `done_phase` on success, else what it was.

    A signal deferred meanwhile is raised again once the phase is back to
    "idle" (a recovery before a run: the run itself stops now); after a commit
    ("committed") the handler that deferred it reports it.
    """
    global _commit_phase
    before = _commit_phase
    _commit_phase = "committing"
    try:
        yield
    except BaseException:
        _commit_phase = before
        raise
    _commit_phase = done_phase or before
    if _commit_phase == "idle" and _deferred_signals:
        signal.raise_signal(_deferred_signals.pop())
