"""What a finished run reports: its summary, and the command line and options its manifest records."""

import argparse
import dataclasses
import functools
import importlib.util
import json
import logging
import os
import shlex
import shutil
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.planning.options import ExportOptions
from pipeline.running.counters import RECORDS_READ, ROWS_EMBEDDED, failures_by_reason
from pipeline.uris import is_local
from pipeline.writing.files import join


@dataclasses.dataclass
class ExportSummary:
    """What a finished run did; `exit_code` is what `python -m pipeline.run` returns."""

    output: str
    records_read: int | None  # None: the runner reported no committed counters
    rows_written: int
    dead_letters: int
    errors_by_reason: dict[str, int]
    # None: unknown, the runner reported no counters.
    truncated: int | None
    oov_tokens: int | None
    seconds: float
    exit_code: int
    message: str
    # --reuse: rows copied from the earlier export, and its rows whose id is gone.
    reuse: str = ""
    rows_reused: int | None = 0
    earlier_rows_dropped: int | None = 0
    # --limit: the run read only the first records (earlier rows past them count as dropped).
    limited: bool = False
    # --keep_fields that no record held (null in every row): most likely misspelled.
    kept_fields_never_found: list[str] = dataclasses.field(default_factory=list)
    # A resumed run: the run it continued ("" for a run from zero) and the rows it kept of it.
    resumed_run: str = ""
    rows_kept: int = 0
    # False for a failed run set aside in `_failed/RUN/`: the succeeded export in the output was kept.
    committed: bool = True
    # --dry_run: nothing was read or written; `job` is the Dataflow job Beam built, if any.
    dry_run: bool = False
    job: Any = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def docs_per_second(self) -> float:
        """Rows this run wrote per second (a resumed run's kept rows were written by the run it continued)."""
        return (self.rows_written - self.rows_kept) / self.seconds if self.seconds else 0.0


# Options whose values are credentials (--s3_secret_access_key, --azure_connection_string,
# ...): the manifest lives next to the data, so it records that they were set, not their value.
# Matched as whole words of a flag's name; this tool's own flags (--token_storage) hold none.
SECRET_OPTION_WORDS = ("secret", "token", "password", "connection_string", "access_key")


REDACTED = "<redacted>"


@functools.cache
def _own_flags() -> frozenset[str]:
    parser = argparse.ArgumentParser()
    ExportOptions._add_argparse_args(parser)
    return frozenset(action.dest for action in parser._actions)


def _is_secret(name: str) -> bool:
    """Whether a flag holds a credential: a word of its name is one of `SECRET_OPTION_WORDS`, not ours."""
    if name in _own_flags():
        return False
    return any(f"_{word}_" in f"_{name.lower()}_" for word in SECRET_OPTION_WORDS)


def recorded_options(options: PipelineOptions) -> dict[str, Any]:
    """The options given on the command line, as the manifest records them (credentials redacted)."""
    return {
        name: REDACTED if _is_secret(name) and value else value
        for name, value in options.get_all_options(drop_default=True).items()
    }


def recorded_command_line(args: Sequence[str]) -> list[str]:
    """`args` with the values of credential flags (`--name=value` or `--name value`) redacted."""
    recorded: list[str] = []
    hide_next = False
    for arg in args:
        name, equals, _ = arg.partition("=")
        secret = arg.startswith("--") and _is_secret(name)
        if hide_next:
            recorded.append(REDACTED)
        elif secret and equals:
            recorded.append(f"{name}={REDACTED}")
        else:
            recorded.append(arg)
        hide_next = secret and not equals and not hide_next
    return recorded


def format_counters(counters: Mapping[str, int]) -> str:
    """The progress counters of a run as one line (Dataflow polling)."""
    dead = sum(failures_by_reason(counters).values())
    return (
        f"{counters.get(RECORDS_READ, 0):,} records read, {counters.get(ROWS_EMBEDDED, 0):,} rows "
        f"embedded, {dead:,} dead letters"
    )


def _python_string(text: str) -> str:
    """`text` as a double-quoted Python literal (JSON's escapes are Python's too)."""
    return json.dumps(text, ensure_ascii=False)


def _python_command() -> str:
    """How the read lines call Python: `python` where that is this run's interpreter, else its path.

    After the README's `.venv/bin/python -m pipeline.run`, without an activated environment, the
    `python` on PATH is another interpreter (or none), without duckdb and pandas: the read lines,
    pasted, ended in ModuleNotFoundError.
    """
    on_path = shutil.which("python")
    if on_path and os.path.abspath(on_path) == os.path.abspath(sys.executable):
        return "python"
    return shlex.quote(sys.executable) if sys.executable else "python"


def _installed(module: str) -> bool:
    """Whether `module` can be imported by this interpreter (duckdb and pandas come with [test] only)."""
    return importlib.util.find_spec(module) is not None


def read_commands(output: str) -> list[str]:
    """The Python code of the summary's read lines for `output`, one per reader installed here.

    DuckDB and pandas where installed; else pyarrow's dataset reader, which every install has:
    after a plain `pip install .` (no [test] extra) the DuckDB and pandas lines, pasted, ended in
    ModuleNotFoundError.
    """
    # DuckDB reads a NAME=value directory as a hive partition, whose value would replace the column NAME.
    hive = ", hive_partitioning=False" if "=" in output else ""
    ignored = '["_", ".", "errors"]'
    commands = []
    if _installed("duckdb"):
        pattern = _python_string(join(output, "part-*.parquet"))
        commands.append(f"import duckdb; print(duckdb.read_parquet({pattern}{hive}).limit(5))")
    if _installed("pandas"):
        commands.append(
            f"import pandas as pd; print(pd.read_parquet({_python_string(output)}, "
            f"ignore_prefixes={ignored}).head())"
        )
    if not commands:
        commands.append(
            f"import pyarrow.dataset as ds; print(ds.dataset({_python_string(output)}, "
            f'format="parquet", ignore_prefixes={ignored}).head(5))'
        )
    return commands


def _count(value: int | None) -> str:
    return str(value) if value is not None else "unknown (no counters)"


def format_summary(summary: ExportSummary) -> str:
    """The one-screen summary printed at the end of a run."""
    # Absolute: the read lines and the output's path are pasted into other shells, notebooks, directories.
    output = os.path.abspath(summary.output) if is_local(summary.output) else summary.output
    if summary.dry_run:
        return f"\nNothing exported (--dry_run): {summary.message}\n  output           {output}"
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(summary.errors_by_reason.items())) or "none"
    read = summary.records_read if summary.records_read is not None else "unknown (no committed counters)"
    python = _python_command()
    # Single-quoted for the shell: a $, ` or \\ in the path reaches Python as it is.
    read_lines = [f"{python} -c {shlex.quote(code)}" for code in read_commands(output)]
    lines = [
        "",
        "Export finished" if summary.exit_code == 0 else f"Export finished with problems: {summary.message}",
        f"  documents read   {read}",
        f"  rows written     {summary.rows_written}",
        f"  dead letters     {summary.dead_letters} ({reasons})",
        f"  truncated        {_count(summary.truncated)}"
        if summary.truncated is None
        # The tokenizer's counts are of the documents embedded: a reused row is not tokenized again.
        else f"  truncated        {summary.truncated} of the documents this run embedded were longer than "
        "the model input (reused rows are not counted)"
        if summary.reuse
        else f"  truncated        {summary.truncated} documents longer than the model input",
        *(
            [
                (
                    f"  reused           {summary.rows_reused} rows unchanged since {summary.reuse}; "
                    f"{summary.rows_written - summary.rows_reused} embedded; "
                    if summary.records_read is not None
                    # Attempted counters (a retried bundle counts twice): at most that many reused.
                    else f"  reused           at most {summary.rows_reused} rows unchanged since "
                    f"{summary.reuse} (attempted counters); embedded unknown; "
                )
                + f"{summary.earlier_rows_dropped} earlier rows dropped "
                + ("(id gone, or past --limit)" if summary.limited else "(id gone)")
            ]
            if summary.reuse and summary.rows_reused is not None
            else [f"  reused           rows unchanged since {summary.reuse}: {_count(None)}"]
            if summary.reuse
            else []
        ),
        *(
            [
                f"  resumed          run {summary.resumed_run}: kept {summary.rows_kept} rows it had "
                f"finished; wrote the other {summary.rows_written - summary.rows_kept}"
            ]
            if summary.resumed_run
            else []
        ),
        *(
            f"  warning          --keep_fields {field!r} is missing or null in all "
            f"{summary.rows_written} rows: check its name"
            for field in summary.kept_fields_never_found
        ),
        f"  seconds          {summary.seconds:.1f} ({summary.docs_per_second:.0f} docs/s)",
        # A newline or tab in the name, printed raw, split the line or hid what the name is.
        f"  output           {output if output.isprintable() else repr(output)}",
        f"  read it with     {read_lines[0]}",
        *(f"               or {line}" for line in read_lines[1:]),
    ]
    if logging.getLogger().isEnabledFor(logging.DEBUG):
        lines.append(f"  oov tokens       {_count(summary.oov_tokens)}")
    return "\n".join(lines)
