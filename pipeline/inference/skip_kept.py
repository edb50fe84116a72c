"""A resumed run's skip: drops the documents (or reused rows) whose rows it kept, and counts them."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any

import apache_beam as beam
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.utils import shared

from pipeline.errors import ExportConfigError
from pipeline.inference.features import Tokenized
from pipeline.planning.plan import InputInfo
from pipeline.reading.documents import Document
from pipeline.running import counters
from pipeline.writing import schema as schema_lib

# Column of the kept ids file (`pipeline.writing.resume`): whether the tokenizer's counts
# of the id's row were kept.
KEPT_COUNTED_COLUMN = "counted"
# Which kept ids a `SkipKeptFn` drops.
SKIP_ALL, SKIP_COUNTED, SKIP_UNCOUNTED = "all", "counted", "uncounted"


def _fingerprint_key(fingerprint: str | None) -> int | None:
    # The first 64 bits of the SHA-256: enough to tell a changed document, in a third of the memory.
    return int(fingerprint[:16], 16) if fingerprint else None


class _KeptIds:
    """The ids whose rows a resumed run kept, all and those whose tokenizer counts it kept too.

    With each id, the `input_sha256` of its kept row (`_fingerprint_key`). A class,
    since `shared.Shared` holds weak references.
    """

    def __init__(self, path: str):
        with FileSystems.open(path) as handle:
            table = pq.read_table(handle)
        ids = table.column(schema_lib.ID_COLUMN).to_pylist()
        self.ids: frozenset[Hashable] = frozenset(ids)
        counted = table.filter(table.column(KEPT_COUNTED_COLUMN)).column(schema_lib.ID_COLUMN)
        self.counted: frozenset[Hashable] = frozenset(counted.to_pylist())
        self.fingerprints: dict[Hashable, int | None] = {}
        if schema_lib.FINGERPRINT_COLUMN in table.column_names:
            fingerprints = table.column(schema_lib.FINGERPRINT_COLUMN).to_pylist()
            self.fingerprints = dict(zip(ids, map(_fingerprint_key, fingerprints), strict=True))


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


def document_fingerprint(inputs: Sequence[InputInfo], document: Document) -> str:
    """The `input_sha256` a `Document`'s row has (`functools.partial` it with the plan's inputs)."""
    return schema_lib.input_fingerprint(document.texts, inputs)


def tokenized_fingerprint(inputs: Sequence[InputInfo], tokenized: Tokenized) -> str:
    """The `input_sha256` a `Tokenized` document's row has."""
    return schema_lib.input_fingerprint(tokenized.document.texts, inputs)


def row_fingerprint(row: dict[str, Any]) -> str | None:
    """The `input_sha256` of an output row."""
    return row.get(schema_lib.FINGERPRINT_COLUMN)


class SkipKeptFn(beam.DoFn):
    """Drops the elements whose id a resumed run kept a row of (`pipeline.writing.resume`), counting them.

    The ids are read once per worker process from `kept_ids_path`, the Parquet
    file of ids the launcher wrote, not sent as a side input. `which` says which
    kept ids this step drops: all, only those whose tokenizer counts were kept
    (dropped before tokenization), or only the others (dropped after it, so that
    the tokenizer counts them again).
    """

    # Elements are documents, tokenized documents or reused rows: `element_id` knows which,
    # and `element_fingerprint` what the model sees of them (`input_sha256`).
    def __init__(
        self,
        kept_ids_path: str,
        element_id: Callable[[Any], Hashable],
        element_fingerprint: Callable[[Any], str | None],
        which: str = SKIP_ALL,
    ):
        self._path = kept_ids_path
        self._element_id = element_id
        self._element_fingerprint = element_fingerprint
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
        self._fingerprints = kept.fingerprints

    def process(self, element: Any) -> Iterator[Any]:
        element_id = self._element_id(element)
        if element_id in self._ids:
            kept = self._fingerprints.get(element_id)
            if kept is not None and kept != _fingerprint_key(self._element_fingerprint(element)):
                raise ExportConfigError(
                    f"The corpus changed since the interrupted run this one resumes: the document "
                    f"with id {element_id!r} is not the one whose row it kept (its file was rewritten "
                    "with the same size and modification time). Rerun with --resume off."
                )
            self._kept.inc()
            return
        yield element
