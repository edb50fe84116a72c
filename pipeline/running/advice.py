"""The rerun advice of a run that stopped before its commit, which depends on its --resume."""

import argparse
import shlex
from collections.abc import Sequence


def resume_in(argv: Sequence[str]) -> str:
    """The --resume that `argv` gives (the last one, as argparse takes it); "auto" when none is."""
    parser = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    parser.add_argument("--resume", default="auto")
    try:
        known, _ = parser.parse_known_args(list(argv))
    except (argparse.ArgumentError, SystemExit):  # a bare --resume: the run refused it already
        return "auto"
    return str(known.resume)


def rerun_to_finish(resume: str, output: str | None = None, rows: str = "the rows made durable") -> str:
    """What to rerun so that the export finishes from the rows the stopped run made durable.

    Args:
        resume: the stopped run's --resume: under "off" the same command would throw those rows away.
        output: the --output the rerun must name (the run chose it itself), else None.
        rows: what the rerun keeps, as the message names it.
    """
    # Quoted for the shell: the advice is pasted (a default output under "my exports/").
    with_output = f" with --output {shlex.quote(output)}" if output else ""
    if resume == "off":
        return (
            f"rerun it{with_output} without --resume off (or with --resume auto) to finish the export "
            f"and keep {rows}; the same command, with --resume off, starts from zero"
        )
    return f"rerun the same command{with_output} to finish the export (it keeps {rows})"
