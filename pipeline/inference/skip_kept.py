"""A resumed run's skip: drops the documents (or reused rows) whose rows it kept, and counts them."""

from __future__ import annotations

import hashlib
import json
import posixpath
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
from pipeline.running import progress as progress_lib
from pipeline.writing import schema as schema_lib

# Columns of the kept ids file (`pipeline.writing.resume`): whether the tokenizer's counts
# of the id's row were kept, and what the row was made from (`row_key`).
KEPT_COUNTED_COLUMN = "counted"
ROW_KEY_COLUMN = "row_key"
# Which kept ids a `SkipKeptFn` drops.
SKIP_ALL, SKIP_COUNTED, SKIP_UNCOUNTED = "all", "counted", "uncounted"
# Beside the kept ids file: how many of the corpus's documents have a kept row (`CountKeptDocuments`).
KEPT_MET_FILE = "_KEPT_MET.json"


def row_key(fingerprint: str | None, kept: Sequence[str | None]) -> str | None:
    """What a row was made from, in 16 hex digits: its `input_sha256` and its kept fields' values.

    64 bits of SHA-256: enough to tell a changed document, in a third of the
    memory. None for a row without a fingerprint.
    """
    if not fingerprint:
        return None
    if kept:
        # A kept field rewritten with the same file size and time changes the row too.
        fingerprint = hashlib.sha256(json.dumps([fingerprint, list(kept)]).encode("utf-8")).hexdigest()
    return fingerprint[:16]


def _key(key: str | None) -> int | None:
    return int(key, 16) if key else None


class _KeptIds:
    """The ids whose rows a resumed run kept, all and those whose tokenizer counts it kept too.

    With each id, the `row_key` of its kept row (`ROW_KEY_COLUMN`). A class,
    since `shared.Shared` holds weak references.
    """

    def __init__(self, path: str):
        with FileSystems.open(path) as handle:
            table = pq.read_table(handle)
        ids = table.column(schema_lib.ID_COLUMN).to_pylist()
        self.ids: frozenset[Hashable] = frozenset(ids)
        counted = table.filter(table.column(KEPT_COUNTED_COLUMN)).column(schema_lib.ID_COLUMN)
        self.counted: frozenset[Hashable] = frozenset(counted.to_pylist())
        keys = table.column(ROW_KEY_COLUMN).to_pylist()
        self.keys: dict[Hashable, int | None] = dict(zip(ids, map(_key, keys), strict=True))


# One copy of the kept ids per worker process, however many threads and DoFns use it.
_KEPT_IDS = shared.Shared()


def kept_met_path(kept_ids_path: str) -> str:
    """Where `CountKeptDocuments` records its count: beside the kept ids file, in the staging directory."""
    return posixpath.join(posixpath.dirname(kept_ids_path), KEPT_MET_FILE)


def read_kept_met(kept_ids_path: str) -> int:
    """The count `CountKeptDocuments` recorded.

    Raises:
        ValueError: naming the file and why it gives no count: absent, unreadable, or
            not a count (truncated, damaged). The caller decides what stands in for it.
    """
    path = kept_met_path(kept_ids_path)
    try:
        with FileSystems.open(path) as handle:
            count = json.loads(handle.read().decode("utf-8"))["documents"]
    except Exception as error:  # Absent (a runner that dropped the step), unreadable, not JSON, ...
        raise ValueError(f"{path} cannot be read ({type(error).__name__}: {error})") from None
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"{path} holds no count of documents ({count!r})")
    return count


def document_id(document: Document) -> str:
    """The id of a `Document`, for `SkipKeptFn`."""
    return document.id


def tokenized_id(tokenized: Tokenized) -> str:
    """The id of a `Tokenized` document, for `SkipKeptFn`."""
    return tokenized.document.id


def row_id(row: dict[str, Any]) -> Hashable:
    """The id of an output row (a dict of its columns), for `SkipKeptFn`."""
    return row[schema_lib.ID_COLUMN]


def document_key(inputs: Sequence[InputInfo], document: Document) -> str | None:
    """The `row_key` a `Document`'s row has (`functools.partial` it with the plan's inputs)."""
    return row_key(schema_lib.input_fingerprint(document.texts, inputs), document.kept)


def tokenized_key(inputs: Sequence[InputInfo], tokenized: Tokenized) -> str | None:
    """The `row_key` a `Tokenized` document's row has."""
    return document_key(inputs, tokenized.document)


def output_row_key(keep_fields: Sequence[str], row: dict[str, Any]) -> str | None:
    """The `row_key` of an output row (a dict of its columns) of an export keeping `keep_fields`."""
    return row_key(row.get(schema_lib.FINGERPRINT_COLUMN), [row.get(name) for name in keep_fields])


class SkipKeptFn(beam.DoFn):
    """Drops the elements whose id a resumed run kept a row of (`pipeline.writing.resume`), counting them.

    The ids are read once per worker process from `kept_ids_path`, the Parquet
    file of ids the launcher wrote, not sent as a side input. `which` says which
    kept ids this step drops: all, only those whose tokenizer counts were kept
    (dropped before tokenization), or only the others (dropped after it, so that
    the tokenizer counts them again).
    """

    # Elements are documents, tokenized documents or reused rows: `element_id` knows which,
    # and `element_key` what their row is made from (`row_key`).
    def __init__(
        self,
        kept_ids_path: str,
        element_id: Callable[[Any], Hashable],
        element_key: Callable[[Any], str | None],
        which: str = SKIP_ALL,
        progress_dir: str | None = None,
    ):
        self._path = kept_ids_path
        self._progress_dir = progress_dir
        self._element_id = element_id
        self._element_key = element_key
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
        self._keys = kept.keys
        # A local run's progress counts the kept rows as written, so that its counts add up.
        self._progress = progress_lib.recorder(self._progress_dir)

    def finish_bundle(self) -> None:
        self._progress.flush()

    def process(self, element: Any) -> Iterator[Any]:
        element_id = self._element_id(element)
        if element_id in self._ids:
            kept = self._keys.get(element_id)
            if kept is not None and kept != _key(self._element_key(element)):
                raise ExportConfigError(
                    f"The corpus changed since the interrupted run this one resumes: the document "
                    f"with id {element_id!r} is not the one whose row it kept (its text or a "
                    "--keep_fields value; its file was rewritten with the same size and modification "
                    "time). Rerun with --resume off."
                )
            self._kept.inc()
            self._progress.add(rows_kept=1)
            return
        yield element


class _HasKeptRowFn(beam.DoFn):
    """Passes on a 1 for each document whose id a resumed run kept a row of."""

    def __init__(self, kept_ids_path: str):
        self._path = kept_ids_path

    def setup(self) -> None:
        self._ids = _KEPT_IDS.acquire(lambda: _KeptIds(self._path), tag=self._path).ids

    def process(self, document: Document) -> Iterator[int]:
        if document.id in self._ids:
            yield 1


def _record_kept_met(count: int, kept_ids_path: str) -> None:
    with FileSystems.create(kept_met_path(kept_ids_path)) as handle:
        handle.write(json.dumps({"documents": count}).encode("utf-8"))


class CountKeptDocuments(beam.PTransform):
    """The corpus's documents (unique ids) -> `KEPT_MET_FILE`: how many have a row the resumed run kept.

    Fewer than the rows kept means kept rows of ids the corpus no longer has (a file
    rewritten with the same size and time). The `rows_kept` counter says so only where
    the runner commits its counters: Spark's and Flink's job servers report attempted
    values, which count a retried bundle twice (covering a gone id), some runners none.
    Elements, unlike metrics, are each processed once whatever the retries, so this
    count is exact on every runner.
    """

    def __init__(self, kept_ids_path: str):
        super().__init__()
        self._path = kept_ids_path

    def expand(self, documents: beam.PCollection[Document]) -> beam.PCollection[None]:
        return (
            documents
            | "FindKeptDocuments" >> beam.ParDo(_HasKeptRowFn(self._path))
            | "CountThem" >> beam.combiners.Count.Globally()
            | "RecordCount" >> beam.Map(_record_kept_met, self._path)
        )
