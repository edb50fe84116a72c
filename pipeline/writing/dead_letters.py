"""Dead letters: counted by reason as Beam metrics, and written as Parquet with the error schema."""

from __future__ import annotations

from collections.abc import Iterator

import apache_beam as beam
from apache_beam.io.parquetio import WriteToParquet
from apache_beam.metrics import Metrics

from pipeline.planning.plan import ExportPlan
from pipeline.reading.documents import DeadLetter
from pipeline.running import counters
from pipeline.running import progress as progress_lib
from pipeline.writing import schema as schema_lib


class CountErrorsFn(beam.DoFn):
    """Counts dead letters by reason as Beam metrics (and in the run's progress)."""

    def __init__(self, progress_dir: str | None = None):
        self._progress_dir = progress_dir

    def setup(self) -> None:
        self._progress = progress_lib.recorder(self._progress_dir)

    def finish_bundle(self) -> None:
        self._progress.flush()

    def process(self, row: DeadLetter) -> Iterator[DeadLetter]:
        Metrics.counter(counters.NAMESPACE, counters.failed(row["reason"])).inc()
        self._progress.add(dead_letters=1)
        yield row


def count_errors(
    errors: beam.PCollection[DeadLetter], progress_dir: str | None = None
) -> beam.PCollection[DeadLetter]:
    """Counts dead letters by reason as Beam metrics."""
    return errors | "CountErrors" >> beam.ParDo(CountErrorsFn(progress_dir))


class WriteDeadLetters(beam.PTransform):
    """Writes dead-letter rows as Parquet with `schema.ERROR_SCHEMA`; outputs the paths of its files."""

    def __init__(self, plan: ExportPlan, prefix: str):
        super().__init__()
        self._plan = plan
        self._prefix = prefix

    def expand(self, errors: beam.PCollection[DeadLetter]) -> beam.PCollection[str]:
        return errors | "WriteParquet" >> WriteToParquet(
            self._prefix,
            schema=schema_lib.ERROR_SCHEMA,
            codec=self._plan.compression,
            file_name_suffix=".parquet",
        )
