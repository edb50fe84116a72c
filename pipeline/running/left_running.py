"""The jobs a stopped launcher could not cancel, said with its `interrupted:` line.

A stop signal silences the launcher's output at once (`pipeline.run`), so a
warning logged as a cancel fails is never seen; the launcher notes the job here
and `pipeline.run` prints each note once its output is back.
"""

_NOTES: list[str] = []


def forget() -> None:
    """Starts a run with no job left running (a process may launch several: tests, notebooks)."""
    _NOTES.clear()


def note(line: str) -> int:
    """Notes that a job may still run (`line` says which, why and how to cancel it); returns its place."""
    _NOTES.append(_one_line(line))
    return len(_NOTES) - 1


def replace(place: int, line: str | None) -> None:
    """Says the note at `place` otherwise, or (None) takes it back: the job was cancelled."""
    if line is None:
        del _NOTES[place]
    else:
        _NOTES[place] = _one_line(line)


def notes() -> list[str]:
    """What to say of each job this process was stopped from but could not cancel."""
    return list(_NOTES)


def _one_line(line: str) -> str:
    # A gRPC error's text spans lines; the note is one `warning:` line.
    return " ".join(line.split())
