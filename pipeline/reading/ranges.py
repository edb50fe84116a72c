"""Split ranges: corpus files cut into byte ranges, and reading one range under an SDF restriction tracker."""

from __future__ import annotations

import typing
from collections.abc import Callable, Iterator

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.restriction_trackers import OffsetRange, OffsetRestrictionTracker
from apache_beam.runners.sdf_utils import RestrictionTrackerView
from apache_beam.transforms.core import RestrictionProvider

from pipeline.planning.plan import ExportPlan
from pipeline.reading import corpus, listing
from pipeline.reading.documents import Record
from pipeline.reading.text_lines import LinesBefore
from pipeline.running import progress as progress_lib

# Ranges of a file read by one worker; Dataflow splits them further while they are read.
DEFAULT_SPLIT_BYTES = 64 << 20


class ProgressCounts(typing.Protocol):
    """Where a reader adds what it read (`pipeline.running.progress.recorder`)."""

    def add(self, **counts: int) -> None: ...


class FileRange(typing.NamedTuple):
    """A byte range [start, stop) of one corpus file: what one reader reads."""

    path: str
    size: int
    start: int
    stop: int
    # False for files read whole by one reader (CSV, .gz): then the range is [0, 1).
    splittable: bool
    # The launch listing's modification time and, for a link to nothing, its target.
    mtime: float | None = None
    link_target: str | None = None
    problem: str = ""
    # The listing's status change time of a local file (`listing.InputFile.changed_ns`).
    changed_ns: int | None = None

    @property
    def listed(self) -> listing.InputFile:
        """The file as the launch listed it, which the reader checks it still is."""
        if self.link_target is None:
            return listing.InputFile(self.path, self.size, self.mtime, changed_ns=self.changed_ns)
        return listing.InputFile(self.path, self.size, self.mtime, self.link_target, self.problem)


class SplitFilesFn(beam.DoFn):
    """Cuts each matched file into `FileRange`s of about `split_bytes`, so many workers read one file."""

    def __init__(self, plan: ExportPlan, split_bytes: int):
        self._plan = plan
        self._split_bytes = split_bytes

    def process(self, listed: listing.InputFile) -> Iterator[FileRange]:
        path, size = listed.path, listed.size
        # A link to nothing is read whole, so that reading it makes its dead letter.
        if listed.link_target is not None or not corpus.is_splittable(self._plan.input_format, path):
            yield FileRange(
                path, size, 0, 1, False, listed.mtime, listed.link_target, listed.problem, listed.changed_ns
            )
            return
        pieces = max(1, -(-size // self._split_bytes))
        bounds = [size * piece // pieces for piece in range(pieces + 1)]
        for start, stop in zip(bounds, bounds[1:], strict=False):
            yield FileRange(path, size, start, stop, True, listed.mtime, changed_ns=listed.changed_ns)


class FileRangeRestrictions(RestrictionProvider):
    """Offset restrictions over a `FileRange`: Dataflow may split them further while they are read."""

    def initial_restriction(self, file_range: FileRange) -> OffsetRange:
        return OffsetRange(file_range.start, file_range.stop)

    def create_tracker(self, restriction: OffsetRange) -> OffsetRestrictionTracker:
        return OffsetRestrictionTracker(restriction)

    def split(self, file_range: FileRange, restriction: OffsetRange) -> Iterator[OffsetRange]:
        yield restriction  # SplitFilesFn has split already; a Reshuffle spreads the ranges.

    def restriction_size(self, file_range: FileRange, restriction: OffsetRange) -> int:
        return restriction.size() if file_range.splittable else file_range.size


# The SDF restriction parameter both passes declare (Beam reads it from the default).
RANGE_TRACKER = beam.DoFn.RestrictionParam(FileRangeRestrictions())


class RangeReader:
    """Reads the records of one `FileRange` under an SDF restriction tracker.

    A splittable range claims the byte offset of each line (or row group)
    before reading it, so the tracker knows where to split it; a whole-file
    range claims offset 0 and reads everything.
    """

    def __init__(
        self,
        plan: ExportPlan,
        file_range: FileRange,
        tracker: RestrictionTrackerView,
        progress: ProgressCounts | None = None,
        progress_key: str = "read_bytes",
    ):
        self._plan = plan
        self._progress_key = progress_key
        self._range = file_range
        self._tracker = tracker
        self._refused = False
        self._progress = progress
        self._handle: typing.BinaryIO | None = None
        self._reported = 0

    def _claim(self, offset: int) -> bool:
        if self._tracker.try_claim(offset):
            return True
        self._refused = True
        return False

    def _open(self) -> typing.BinaryIO:
        self._handle = FileSystems.open(self._range.path, compression_type=CompressionTypes.UNCOMPRESSED)
        return self._handle

    def records(
        self,
        lines_before: LinesBefore | None = None,
        on_newline: Callable[[int], None] | None = None,
    ) -> Iterator[tuple[int, Record]]:
        """Yields `(order, item)` as `corpus.read_records` does, for this range only."""
        claim: Callable[[int], bool] | None
        if self._range.splittable:
            start, claim = self._tracker.current_restriction().start, self._claim
        else:
            if not self._claim(0):
                return
            start, claim = 0, None
        # Compressed files are decompressed by `corpus`, with Python's gzip,
        # which (unlike Beam's reader) raises on a truncated file.
        yield from corpus.read_records(
            self._plan,
            self._range.path,
            self._open,
            start,
            claim,
            lines_before,
            on_newline,
            verify=self._verify,
            size=self._range.size,
        )

    def _verify(self) -> None:
        """Raises `listing.InputChanged` unless the file is still as the launch listed it."""
        listing.check_unchanged(self._range.listed)

    def report_bytes(self, done: bool = False) -> None:
        """Adds the bytes read since the last report to the progress counts."""
        if self._progress is None:
            return
        restriction = self._tracker.current_restriction()
        total = restriction.size() if self._range.splittable else self._range.size
        if done:
            consumed = total
        else:
            try:
                position = self._handle.tell() if self._handle is not None else 0
            except Exception:  # A stream without tell(): report at the end only.
                return
            start = restriction.start if self._range.splittable else 0
            consumed = min(total, max(0, position - start))
        if consumed > self._reported:
            self._progress.add(**{self._progress_key: consumed - self._reported})
            self._reported = consumed

    def finish(self) -> None:
        """Marks the rest of the range as done: its last record was read, or it was cut short (--limit)."""
        if not self._refused:
            # Claiming the end fails, and so tells the tracker that nothing is left.
            self._tracker.try_claim(self._tracker.current_restriction().stop)


class RangeReadingFn(beam.DoFn):
    """A DoFn that reads `FileRange`s of the corpus (both passes): holds the plan, and counts its progress."""

    def __init__(self, plan: ExportPlan, progress_dir: str | None = None):
        self._plan = plan
        self._progress_dir = progress_dir

    def setup(self) -> None:
        self._progress = progress_lib.recorder(self._progress_dir)

    def finish_bundle(self) -> None:
        self._progress.flush()


def path_key(path: str) -> bytes:
    """A path as bytes for keys and places: Beam encodes strings as UTF-8, which a file name
    that is not UTF-8 (held with surrogate escapes) cannot be; bytes sort as the code points do."""
    return path.encode("utf-8", "surrogateescape")
