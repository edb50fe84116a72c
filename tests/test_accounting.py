"""The verdict on a finished run's counts, as pure logic: no pipeline, no model."""

import dataclasses

import pytest

from pipeline.errors import (
    EXIT_ACCOUNTING_MISMATCH,
    EXIT_ACCOUNTING_UNVERIFIED,
    EXIT_OK,
    EXIT_RECORDS_LOST,
    EXIT_TOO_MANY_ERRORS,
)
from pipeline.running.accounting import Accounting, account, manifest_counts, verdict
from pipeline.running.counters import RunCounters
from pipeline.running.report import ExportSummary, format_summary


def accounting(read=10, rows=8, dead=2, broken=0, exact=True, kept=0):
    return Accounting(
        counters={"records_read": read, "rows_kept": kept, "oov_tokens": 3},
        exact=exact,
        rows=rows,
        dead=dead,
        read=read,
        broken=broken,
        by_reason={"malformed_json": dead},
        reuse_counts={},
    )


class _Resumed:
    rows_kept = 4


@pytest.mark.parametrize(
    ("counts", "resumed", "fraction", "status", "words"),
    [
        ({}, None, 0.5, EXIT_OK, "ok"),
        ({"read": 11}, None, 0.5, EXIT_ACCOUNTING_MISMATCH, "11 records read but 8 rows + 2 dead letters"),
        ({"kept": 3}, _Resumed(), 0.5, EXIT_ACCOUNTING_MISMATCH, "kept 4 rows but met 3"),
        ({"broken": 1}, None, 0.5, EXIT_RECORDS_LOST, "Reading broke off at 1 place(s) in the input files"),
        ({}, None, 0.1, EXIT_TOO_MANY_ERRORS, "2 of 10 records (20%)"),
        # Without committed counters, rows + dead letters stand in for the records read.
        ({"read": 0, "exact": False}, None, 0.5, EXIT_ACCOUNTING_UNVERIFIED, "8 rows and 2 dead letters"),
        ({"read": 0, "exact": False}, None, 0.1, EXIT_TOO_MANY_ERRORS, "2 of 10 records"),
    ],
)
def test_the_verdict_on_a_runs_counts(counts, resumed, fraction, status, words):
    code, message = verdict(accounting(**counts), resumed, fraction, "OUT/errors")
    assert code == status
    assert words in message


def test_too_many_dead_letters_name_their_reasons_and_what_to_check():
    """All float16_overflow dead letters said "Check --input_format and --input_map"."""
    counts = accounting()
    code, message = verdict(counts, None, 0.1, "OUT/errors")
    assert code == EXIT_TOO_MANY_ERRORS and "(malformed_json: 2)" in message and "--input_format" in message
    _, message = verdict(
        dataclasses.replace(counts, by_reason={"float16_overflow": 2}), None, 0.1, "OUT/errors"
    )
    assert "(float16_overflow: 2)" in message and "export with --dtype float32" in message
    # A Latin-1 corpus was told to "Check --input_format and --input_map", which are right.
    _, message = verdict(dataclasses.replace(counts, by_reason={"invalid_utf8": 2}), None, 0.1, "OUT/errors")
    assert "not UTF-8 text" in message and "iconv -f WINDOWS-1252 -t UTF-8" in message
    assert "--input_format" not in message
    _, message = verdict(
        dataclasses.replace(counts, by_reason={"repeated_header": 2}), None, 0.1, "OUT/errors"
    )
    assert "repeat the CSV header" in message and "tail -n +2" in message
    # Float ids (pandas' integers holding a null) were told to check --id_field alone, which was right.
    _, message = verdict(dataclasses.replace(counts, by_reason={"bad_id": 2}), None, 0.1, "OUT/errors")
    assert "Check --id_field" in message and "float64" in message and "Int64" in message


def test_a_runner_without_counters_states_no_count_that_comes_from_counters():
    """Such a job server's run recorded 0 truncated, 0 reused and every row embedded as facts.

    A --reuse of 60 documents, 50 of them unchanged: `rows_reused: 0, rows_embedded: 60`, the summary
    "truncated 0 documents" and "reused 0 rows", under "counters": "attempted" (an upper bound).
    """
    from test_schema import VECTOR, make_plan

    plan = dataclasses.replace(make_plan([VECTOR]), reuse="out/v1")
    staged = {"rows": [("out/part", 60)], "errors": [], "tables": []}
    counts = account(RunCounters({}, False), staged, plan, None)
    recorded = manifest_counts(counts)
    assert recorded["counters"] == "none" and recorded["rows_written"] == 60
    for name in ("records_read", "documents_truncated", "oov_tokens", "ranges_read", "rows_reused"):
        assert recorded[name] is None, name
    assert recorded["rows_embedded"] is None and recorded["earlier_rows_dropped"] is None
    summary = ExportSummary("out", None, 60, 0, {}, None, None, 1.0, 7, "m", reuse="out/v1", rows_reused=None)
    text = format_summary(summary)
    assert "  truncated        unknown (no counters)" in text
    assert "  reused           rows unchanged since out/v1: unknown (no counters)" in text
    # Attempted counters are still stated, as attempted.
    attempted = manifest_counts(account(RunCounters({"rows_reused": 50}, False), staged, plan, None))
    assert (attempted["counters"], attempted["rows_reused"], attempted["oov_tokens"]) == ("attempted", 50, 0)


def test_unknown_records_read_are_recorded_as_none():
    counts = manifest_counts(accounting(read=0, exact=False))
    assert counts["records_read"] is None and counts["counters"] == "attempted"
    assert counts["rows_written"] == 8 and counts["dead_letters"] == 2 and counts["oov_tokens"] == 3


def _read_lines(text):
    """The commands of a summary's `read it with` and `or` lines."""
    return [
        line.split("read it with", 1)[1].strip() if "read it with" in line else line.strip()[len("or ") :]
        for line in text.splitlines()
        if "read it with" in line or line.strip().startswith("or ")
    ]


def test_the_read_lines_name_only_readers_that_are_installed(tmp_path, monkeypatch):
    """A plain `pip install .` has neither duckdb nor pandas (the [test] extra brings them): both
    read lines of the summary, pasted, ended in ModuleNotFoundError. pyarrow's reader is in every install."""
    import shlex
    import subprocess
    import sys

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.running import report

    output = tmp_path / "export"
    (output / "errors").mkdir(parents=True)
    pq.write_table(pa.table({"id": ["doc-a", "doc-b"]}), output / "part-00000-of-00001.parquet")
    pq.write_table(pa.table({"source": ["dead-letter"]}), output / "errors" / "part-00000-of-00001.parquet")
    (output / "_MANIFEST.json").write_text("{}")
    summary = ExportSummary(str(output), 2, 2, 0, {}, 0, 0, 1.0, 0, "")
    installed = _read_lines(format_summary(summary))
    assert [line.count("import duckdb") + line.count("import pandas") for line in installed] == [1, 1]
    monkeypatch.setattr(report, "_installed", lambda module: module not in ("duckdb", "pandas"))
    (line,) = _read_lines(format_summary(summary))
    argv = shlex.split(line)
    assert argv[0] in ("python", sys.executable) and "pyarrow" in argv[2]
    result = subprocess.run([sys.executable, *argv[1:]], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert '["doc-a","doc-b"]' in result.stdout and "dead-letter" not in result.stdout


def test_attempted_reuse_counters_never_make_the_rows_embedded_negative():
    """A job server's attempted counters count a retried bundle twice: 60 rows written, a bundle of 30
    reused rows run twice (attempted rows_reused 80) was recorded as `rows_reused: 80, rows_embedded: -20`,
    and the summary said "80 rows unchanged ...; -20 embedded"."""
    from test_schema import VECTOR, make_plan

    plan = dataclasses.replace(make_plan([VECTOR]), reuse="out/v1")
    staged = {"rows": [("out/part", 60)], "errors": [], "tables": []}
    attempted = manifest_counts(account(RunCounters({"rows_reused": 80}, False), staged, plan, None))
    assert (attempted["rows_reused"], attempted["rows_embedded"]) == (60, None)
    summary = ExportSummary("out", None, 60, 0, {}, 0, 0, 1.0, 7, "m", reuse="out/v1", rows_reused=60)
    assert (
        "  reused           at most 60 rows unchanged since out/v1 (attempted counters); embedded unknown; "
        "0 earlier rows dropped (id gone)"
    ) in format_summary(summary)
    # Committed counters are exact: both stated.
    committed = manifest_counts(account(RunCounters({"rows_reused": 50}, True), staged, plan, None))
    assert (committed["rows_reused"], committed["rows_embedded"]) == (50, 10)
    summary = dataclasses.replace(summary, records_read=60, rows_reused=50, exit_code=0)
    assert (
        "  reused           50 rows unchanged since out/v1; 10 embedded; 0 earlier rows dropped (id gone)"
    ) in format_summary(summary)
