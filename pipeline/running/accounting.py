"""A finished run's accounting: its counts from the counters and the staged files, and the verdict on them.

Every record read must end as a row or a dead letter; the verdict says whether
that held, whether input was lost, and whether too many records failed, as an exit
status and a message (`pipeline.errors`).
"""

from __future__ import annotations

import dataclasses

from pipeline.errors import (
    EXIT_ACCOUNTING_MISMATCH,
    EXIT_ACCOUNTING_UNVERIFIED,
    EXIT_OK,
    EXIT_RECORDS_LOST,
    EXIT_TOO_MANY_ERRORS,
)
from pipeline.planning.plan import ExportPlan
from pipeline.running.counters import (
    DOCUMENTS_TRUNCATED,
    EARLIER_ROWS_CHANGED,
    EARLIER_ROWS_DROPPED,
    FILES_BROKEN,
    OOV_TOKENS,
    RANGES_READ,
    RECORDS_READ,
    ROWS_KEPT,
    ROWS_REUSED,
    RunCounters,
    dead_letters_by_reason,
    failures_by_reason,
    files_broken,
)
from pipeline.writing.files import JsonObject
from pipeline.writing.resume import Resumption
from pipeline.writing.staging import StagedShards


@dataclasses.dataclass(frozen=True)
class Accounting:
    """What a finished run counted: rows and dead letters from its files, the rest from its counters."""

    counters: dict[str, int]
    # False when the runner reported only attempted counters (a retried bundle counts twice).
    exact: bool
    rows: int
    dead: int
    read: int
    broken: int
    by_reason: dict[str, int]
    # --reuse: rows copied from the earlier export and what changed there; empty otherwise.
    reuse_counts: JsonObject
    # False when the runner reported no counters at all: the counts that come from counters are unknown.
    reported: bool = True

    @property
    def counted(self) -> int:
        """The records read; without committed counters, what was written stands in for them."""
        return self.read if self.exact else self.rows + self.dead


def account(
    run_counters: RunCounters, staged: StagedShards, plan: ExportPlan, resumed: Resumption | None
) -> Accounting:
    """The run's counts from the runner's counters and the files it staged."""
    counters = dict(run_counters.values)
    if resumed:
        # The kept documents were not tokenized again: their counts come from the kept files.
        for name, value in resumed.tokenizer_counts.items():
            counters[name] = counters.get(name, 0) + value
    rows = sum(count for _, count in staged["rows"])
    broken = counters.get(FILES_BROKEN, 0)
    by_reason = failures_by_reason(counters)
    if not run_counters.exact:
        # Attempted values count retried bundles twice: only what the files hold is exact.
        by_reason = dead_letters_by_reason(staged["errors"])
        broken = files_broken(by_reason)
    reported = run_counters.exact or bool(run_counters.values)
    reuse_counts: JsonObject = {}
    if plan.reuse:
        reused = counters.get(ROWS_REUSED, 0)
        if not run_counters.exact:
            # Attempted: a retried bundle of reused rows counts twice. An upper bound, never past the
            # rows written; what is left of those rows for the embedded ones is then no count at all.
            reused = min(reused, rows)
        reuse_counts = {
            "reused_from": plan.reuse,
            # Unknown without counters: 0 reused and every row embedded would be stated as facts.
            "rows_reused": reused if reported else None,
            "rows_embedded": rows - reused if run_counters.exact else None,
            "earlier_rows_changed": counters.get(EARLIER_ROWS_CHANGED, 0) if reported else None,
            "earlier_rows_dropped": counters.get(EARLIER_ROWS_DROPPED, 0) if reported else None,
        }
    return Accounting(
        counters=counters,
        exact=run_counters.exact,
        reported=reported,
        rows=rows,
        dead=sum(count for _, count in staged["errors"]),
        read=counters.get(RECORDS_READ, 0),
        broken=broken,
        by_reason=by_reason,
        reuse_counts=reuse_counts,
    )


# What to check when most records were dead-lettered, by the most frequent reason.
_HINTS = {
    "": "Check --input_format and --input_map",
    "float16_overflow": "The model's values exceed float16's range: export with --dtype float32",
    "malformed_json": (
        "Check --input_format: JSON Lines holds one JSON object per line (a file that is one JSON "
        "array, or pretty-printed JSON, is not; the first dead letter of such a file says how to convert it)"
    ),
    "inference_failed": "The model failed on the documents: the dead letters' messages say how",
    "duplicate_id": "Check --id_field: most ids repeat",
    "missing_id": (
        "Check --id_field: most records have no such field, or a null or empty one "
        "(name the field that holds each record's id; a CSV file must be comma-separated)"
    ),
    "bad_id": (
        "Check --id_field: most records' values of it are not strings or integers, as ids must be (floats: "
        "pandas turns an integer column holding a null into float64; write it as Int64 or strings)"
    ),
    "too_large": "Raise --max_record_bytes, or check --input_format",
    "empty_document": "No text gave a token: check --input_map and the tokenizer",
    "invalid_utf8": (
        "Most records are not UTF-8 text: convert the files to UTF-8 (one from Windows or Excel is often "
        "Windows-1252: iconv -f WINDOWS-1252 -t UTF-8 FILE > FILE.utf8; UTF-16: iconv -f UTF-16LE)"
    ),
    "repeated_header": (
        "Most rows repeat the CSV header (files joined with their headers): join them without the later "
        "headers (e.g. csvstack, or tail -n +2)"
    ),
}


def verdict(
    accounting: Accounting, resumed: Resumption | None, max_error_fraction: float, errors_dir: str
) -> tuple[int, str]:
    """`(exit status, message)` of a run with these counts; `errors_dir` is where its dead letters go."""
    rows, dead, read, counted = accounting.rows, accounting.dead, accounting.read, accounting.counted
    skipped = accounting.counters.get(ROWS_KEPT, 0)
    # Only committed counters count each kept document once (attempted ones count a retried bundle
    # twice; a runner may report none): the launcher compared the others already.
    if resumed and accounting.exact and skipped != resumed.rows_kept:
        return EXIT_ACCOUNTING_MISMATCH, (
            f"Accounting mismatch: the resumed run kept {resumed.rows_kept} rows but met "
            f"{skipped} of their documents in the corpus."
        )
    if accounting.exact and read != rows + dead:
        return EXIT_ACCOUNTING_MISMATCH, (
            f"Accounting mismatch: {read} records read but {rows} rows + {dead} dead letters written."
        )
    if accounting.broken:
        return EXIT_RECORDS_LOST, (
            f"Reading broke off at {accounting.broken} place(s) in the input files (each an unreadable_file "
            f"or read_error dead letter in {errors_dir}, naming its file): records after a break may be "
            "lost, and how many is unknown."
        )
    if counted and dead / counted > max_error_fraction:
        reasons = sorted(accounting.by_reason.items(), key=lambda item: -item[1])
        most = ", ".join(f"{reason}: {count}" for reason, count in reasons[:3])
        hint = _HINTS.get(reasons[0][0], _HINTS[""]) if reasons else _HINTS[""]
        return EXIT_TOO_MANY_ERRORS, (
            f"{dead} of {counted} records ({dead / counted:.0%}) were dead-lettered ({most}), more "
            f"than --max_error_fraction={max_error_fraction}. {hint}; the reasons are in {errors_dir}."
        )
    if not accounting.exact:
        return EXIT_ACCOUNTING_UNVERIFIED, (
            "Accounting unverified: the runner reported no committed counters, so the records read "
            f"are unknown and `records read = rows + dead letters` could not be checked; {rows} rows "
            f"and {dead} dead letters were written (counted in the files). The output is committed: "
            "compare with your corpus's record count, or run where counters are committed "
            "(DirectRunner, Dataflow, Beam's local job service) for the exact check."
        )
    return EXIT_OK, "ok"


def counted(accounting: Accounting, name: str) -> int | None:
    """A count that comes from the counters (`oov_tokens`, ...): None where the runner reported none."""
    return accounting.counters.get(name, 0) if accounting.reported else None


def manifest_counts(accounting: Accounting) -> JsonObject:
    """The manifest's `counts`."""
    return {
        # None where the runner reported no committed counters: the count is unknown.
        "records_read": accounting.read if accounting.exact else None,
        "rows_written": accounting.rows,
        "dead_letters": accounting.dead,
        "dead_letters_by_reason": accounting.by_reason,
        "files_broken": accounting.broken,
        "documents_truncated": counted(accounting, DOCUMENTS_TRUNCATED),
        "oov_tokens": counted(accounting, OOV_TOKENS),
        # How many byte ranges of the input files were read (more than one per big file).
        "ranges_read": counted(accounting, RANGES_READ),
        **accounting.reuse_counts,
        # The runner's word for the counters above: "committed", "attempted" (an upper bound: a
        # retried bundle counts twice; the dead letters are then counted from their files), or
        # "none" (those counts are null).
        "counters": "committed" if accounting.exact else "attempted" if accounting.reported else "none",
    }
