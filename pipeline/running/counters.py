"""The run's Beam counters: their names, which workers count, and reading them back after the run.

Every counter lives in the namespace `NAMESPACE`; `read_counters` reads them
back, and the manifest's accounting (records read = rows written + dead
letters) is made of them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import apache_beam as beam
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.runners.runner import PipelineResult

from pipeline.writing.schema import FILE_REASONS

NAMESPACE = "embexport"

# Reading the corpus.
RECORDS_READ = "records_read"
RANGES_READ = "ranges_read"
# Places where reading a file broke off: one per range of a file read in several ranges.
FILES_BROKEN = "files_broken"
# Tokenizing and embedding.
DOCUMENTS_TRUNCATED = "documents_truncated"
OOV_TOKENS = "oov_tokens"
ROWS_EMBEDDED = "rows_embedded"
# What the tokenizer counts, which each row file's footer also holds for its rows
# (`pipeline.writing.shards.TOKENIZER_COUNTS_KEY`), so that a resumed run adds them back.
TOKENIZER_COUNTS = (DOCUMENTS_TRUNCATED, OOV_TOKENS)
# A resumed run: rows kept from the run it continues.
ROWS_KEPT = "rows_kept"
# --reuse: rows copied from the earlier export, and its rows that were not.
ROWS_REUSED = "rows_reused"
EARLIER_ROWS_CHANGED = "earlier_rows_changed"
EARLIER_ROWS_DROPPED = "earlier_rows_dropped"
# Dead letters, one counter per reason: FAILED_PREFIX + the reason.
FAILED_PREFIX = "failed_"


def failed(reason: str) -> str:
    """The counter of the dead letters of one reason (e.g. "failed_too_large")."""
    return FAILED_PREFIX + reason


def failures_by_reason(counters: Mapping[str, int]) -> dict[str, int]:
    """Dead letters per reason, from the run's counters (name -> value)."""
    return {
        name[len(FAILED_PREFIX) :]: value
        for name, value in counters.items()
        if name.startswith(FAILED_PREFIX)
    }


@dataclasses.dataclass(frozen=True)
class RunCounters:
    """The run's Beam counters (namespace `embexport`), and whether they are exact.

    `exact` is False when the runner reported no committed value for any of them
    (Spark's and Flink's job servers report attempted values only, which count a
    retried bundle twice; some report none): then `values` holds the attempted
    ones, which must not be recorded as the run's counts.
    """

    values: dict[str, int]
    exact: bool


def read_counters(result: PipelineResult, namespace: str = NAMESPACE) -> RunCounters:
    """The counters of `result` in `namespace`: committed values if the runner has them, else attempted."""
    query = result.metrics().query(beam.metrics.MetricsFilter().with_namespace(namespace))["counters"]
    committed: dict[str, int] = {}
    attempted: dict[str, int] = {}
    for counter in query:
        name = counter.key.metric.name
        if counter.committed is not None:
            committed[name] = committed.get(name, 0) + counter.committed
        if counter.attempted is not None:
            attempted[name] = attempted.get(name, 0) + counter.attempted
    if committed:
        return RunCounters(committed, True)
    return RunCounters(attempted, False)


def dead_letters_by_reason(error_shards: list[tuple[str, int]]) -> dict[str, int]:
    """Dead letters per reason, read from the staged dead-letter shards (their `reason` column)."""
    by_reason: dict[str, int] = {}
    for path, rows in error_shards:
        if not rows:
            continue
        with FileSystems.open(path) as handle:
            reasons = pq.read_table(handle, columns=["reason"]).column("reason").to_pylist()
        for reason in reasons:
            by_reason[reason] = by_reason.get(reason, 0) + 1
    return by_reason


def files_broken(by_reason: dict[str, int]) -> int:
    """Places where reading a file broke off (`FILES_BROKEN`), from dead letters per reason."""
    return sum(by_reason.get(reason, 0) for reason in FILE_REASONS)
