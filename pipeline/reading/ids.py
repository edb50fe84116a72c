"""The corpus's first, light pass: each record's id and place, the line index, duplicates, the --limit."""

from __future__ import annotations

import collections
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.runners.sdf_utils import RestrictionTrackerView

from pipeline.planning.plan import ExportPlan
from pipeline.reading import corpus
from pipeline.reading.documents import is_blank
from pipeline.reading.ranges import RANGE_TRACKER, FileRange, RangeReader, RangeReadingFn, path_key

# The outputs of `ScanDocumentIdsFn`: (id, place) per keyed document (main), the
# newline counts of the line index, and with a limit every record's (source, order).
DOCUMENT_IDS = "document_ids"
NEWLINES = "newlines"
ORDERS = "orders"

# Where a record is: (file path as bytes, order), and for a kept record of an id its line
# number when the scan knew it (None: look it up in the `LineIndex`).
Place = tuple[bytes, int]
FirstPlace = tuple[bytes, int, int | None]


class ScanDocumentIdsFn(RangeReadingFn):
    """The first, light pass: each record's id and (file, order), never the document.

    Outputs (id, (source, order)) per document (main; none for text files, whose
    ids FILE:LINE are unique, nor for a blank document, which cannot be a row),
    ((source, block), newlines) for the line index
    (`NEWLINES`) and, with a limit, (source, order) of every record (`ORDERS`).
    With a limit only the first `limit` records of a range are scanned: no
    record after them can be among the first `limit` of the corpus.
    """

    def __init__(
        self, plan: ExportPlan, index_block: int, limit: int | None = None, progress_dir: str | None = None
    ):
        super().__init__(plan, progress_dir)
        self._index_block = index_block
        self._limit = limit

    def process(
        self,
        file_range: FileRange,
        # Beam's marker for an SDF's tracker, which Beam replaces with the tracker's view.
        tracker: RestrictionTrackerView = RANGE_TRACKER,  # type: ignore[assignment]
    ) -> Iterator[tuple[str, FirstPlace] | beam.pvalue.TaggedOutput]:
        reader = RangeReader(self._plan, file_range, tracker, self._progress, "scanned_bytes")
        block_size = self._index_block
        newlines: collections.Counter[int] = collections.Counter()
        line_file = file_range.splittable and self._plan.input_format in corpus.LINE_FORMATS
        on_newline = (lambda offset: newlines.update((offset // block_size,))) if line_file else None
        # Text ids FILE:LINE are unique, unless a file name that is not UTF-8, written with
        # backslash escapes, meets a name spelling those escapes.
        keyed = self._plan.input_format != "text"
        path = path_key(file_range.path)
        # Line numbers are exact from the start of a file; a later range knows only byte offsets.
        numbered = not file_range.splittable or not tracker.current_restriction().start
        for count, (order, item) in enumerate(reader.records(on_newline=on_newline), start=1):
            # The read makes a blank record an empty_document dead letter: it must not hold its id.
            if isinstance(item, corpus.Document) and (keyed or "\\" in item.id) and not is_blank(item):
                yield item.id, (path, order, item.position if numbered else None)
            if self._limit:
                yield beam.pvalue.TaggedOutput(ORDERS, (path, order))
                if count >= self._limit:
                    break
            if count % 1024 == 0:
                reader.report_bytes()
        reader.finish()
        reader.report_bytes(done=True)
        for block, lines in newlines.items():
            yield beam.pvalue.TaggedOutput(NEWLINES, ((path, block), lines))


class LineIndex:
    """Newlines before each block of `block_size` bytes of one file: `lines_before(offset)` for `corpus`."""

    def __init__(self, counts: Mapping[int, int], block_size: int):
        self._block_size = block_size
        blocks = max(counts, default=-1) + 1
        self._before = [0] * (blocks + 1)
        for block in range(blocks):
            self._before[block + 1] = self._before[block] + counts.get(block, 0)

    def lines_before(self, offset: int) -> tuple[int, int]:
        block = min(offset // self._block_size, len(self._before) - 1)
        return block * self._block_size, self._before[block]


def build_line_index(
    element: tuple[bytes, Iterable[tuple[int, int]]], block_size: int
) -> tuple[bytes, LineIndex]:
    """(path, `LineIndex`) from a file's (block, newlines) counts."""
    path, blocks = element
    return path, LineIndex(dict(blocks), block_size)


def line_number(path: str, offset: int, index: LineIndex) -> int:
    """The line number of the line starting at byte `offset` of an uncompressed file, from its `LineIndex`."""
    block_start, before = index.lines_before(offset)
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        handle.seek(block_start)
        return before + handle.read(offset - block_start).count(b"\n") + 1


def find_duplicates(element: tuple[str, Iterable[Sequence[Any]]]) -> Iterator[tuple[Place, FirstPlace]]:
    """(loser's (source, order), winner's (source, order, position)) for each later record of an id."""
    _, places = element
    places = sorted(places, key=lambda place: (place[0], place[1]))
    for place in places[1:]:
        yield (place[0], place[1]), tuple(places[0])


def limit_cutoff(smallest: Sequence[Sequence[Any]], limit: int) -> Place | None:
    """The (source, order) of the limit-th record, or None when the corpus has no more records."""
    return tuple(smallest[-1]) if len(smallest) >= limit else None


def within_cutoff(place: Place, cutoff: Sequence[Any] | None) -> bool:
    """Whether a record at `place` is among the first --limit ones (`cutoff` None: no limit)."""
    return cutoff is None or tuple(place) <= tuple(cutoff)
