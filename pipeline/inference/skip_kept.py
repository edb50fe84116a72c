"""A resumed run's skip: drops the documents (or reused rows) whose rows it kept, and counts them."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from typing import Any

import apache_beam as beam
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.utils import shared

from pipeline.inference.features import Tokenized
from pipeline.reading.documents import Document
from pipeline.running import counters
from pipeline.writing import schema as schema_lib

# Column of the kept ids file (`pipeline.writing.resume`): whether the tokenizer's counts
# of the id's row were kept.
KEPT_COUNTED_COLUMN = "counted"
# Which kept ids a `SkipKeptFn` drops.
SKIP_ALL, SKIP_COUNTED, SKIP_UNCOUNTED = "all", "counted", "uncounted"


class _KeptIds:
    """The ids whose rows a resumed run kept, all and those whose tokenizer counts it kept too.

    A class, since `shared.Shared` holds weak references.
    """

    def __init__(self, path: str):
        with FileSystems.open(path) as handle:
            table = pq.read_table(handle, columns=[schema_lib.ID_COLUMN, KEPT_COUNTED_COLUMN])
        self.ids: frozenset[Hashable] = frozenset(table.column(0).to_pylist())
        self.counted: frozenset[Hashable] = frozenset(table.filter(table.column(1)).column(0).to_pylist())


# One copy of the kept ids per worker process, however many threads and DoFns use it.
_KEPT_IDS = shared.Shared()


def document_id(document: Document) -> str:
    """The id of a `Document`, for `SkipKeptFn`."""
    return document.id


def tokenized_id(tokenized: Tokenized) -> str:
    """The id of a `Tokenized` document, for `SkipKeptFn`."""
    return tokenized.document.id


def row_id(row: dict[str, Any]) -> Hashable:
    """The id of an output row (a dict of its columns), for `SkipKeptFn`."""
    return row[schema_lib.ID_COLUMN]


class SkipKeptFn(beam.DoFn):
    """Drops the elements whose id a resumed run kept a row of (`pipeline.writing.resume`), counting them.

    The ids are read once per worker process from `kept_ids_path`, the Parquet
    file of ids the launcher wrote, not sent as a side input. `which` says which
    kept ids this step drops: all, only those whose tokenizer counts were kept
    (dropped before tokenization), or only the others (dropped after it, so that
    the tokenizer counts them again).
    """

    # Elements are documents, tokenized documents or reused rows: `element_id` knows which.
    def __init__(self, kept_ids_path: str, element_id: Callable[[Any], Hashable], which: str = SKIP_ALL):
        self._path = kept_ids_path
        self._element_id = element_id
        self._which = which
        self._kept = Metrics.counter(counters.NAMESPACE, counters.ROWS_KEPT)

    def setup(self) -> None:
        kept: _KeptIds = _KEPT_IDS.acquire(lambda: _KeptIds(self._path), tag=self._path)
        if self._which == SKIP_COUNTED:
            self._ids = kept.counted
        elif self._which == SKIP_UNCOUNTED:
            self._ids = kept.ids - kept.counted
        else:
            self._ids = kept.ids

    def process(self, element: Any) -> Iterator[Any]:
        if self._element_id(element) in self._ids:
            self._kept.inc()
            return
        yield element
