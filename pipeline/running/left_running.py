"""The jobs a stopped launcher could not cancel, said with its `interrupted:` line.

A stop signal silences the launcher's output at once (`pipeline.run`), so a
warning logged as a cancel fails is never seen; the launcher notes the job here
and `pipeline.run` prints each note once its output is back.
"""

import itertools

# Keyed by a number never reused: taking one note back leaves every other note's key as it was
# (a list index would shift, and a later `replace` would say another job's note otherwise).
_NOTES: dict[int, str] = {}
_KEYS = itertools.count()


def forget() -> None:
    """Starts a run with no job left running (a process may launch several: tests, notebooks)."""
    _NOTES.clear()


def note(line: str) -> int:
    """Notes that a job may still run (`line` says which, why and how to cancel it); returns its key."""
    key = next(_KEYS)
    _NOTES[key] = _one_line(line)
    return key


def replace(key: int, line: str | None) -> None:
    """Says the note of `key` otherwise, or (None) takes it back: the job was cancelled.

    A note already taken back, or forgotten by a later run, stays gone.
    """
    if line is None:
        _NOTES.pop(key, None)
    elif key in _NOTES:
        _NOTES[key] = _one_line(line)


def notes() -> list[str]:
    """What to say of each job this process was stopped from but could not cancel, in the order noted."""
    return list(_NOTES.values())


def _one_line(line: str) -> str:
    # A gRPC error's text spans lines; the note is one `warning:` line.
    return " ".join(line.split())
