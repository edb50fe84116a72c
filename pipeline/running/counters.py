"""The names of the run's Beam counters: what workers count and the launcher reads back after the run.

Every counter lives in the namespace `NAMESPACE`; `portable.read_counters`
reads them back, and the manifest's accounting (records read = rows written +
dead letters) is made of them.
"""

from collections.abc import Mapping

NAMESPACE = "embexport"

# Reading the corpus.
RECORDS_READ = "records_read"
RANGES_READ = "ranges_read"
FILES_BROKEN = "files_broken"  # files that could not be read to the end
# Tokenizing and embedding.
DOCUMENTS_TRUNCATED = "documents_truncated"
OOV_TOKENS = "oov_tokens"
ROWS_EMBEDDED = "rows_embedded"
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
