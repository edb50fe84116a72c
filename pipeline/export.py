"""Launches one export: validate, stage, run the pipeline, check the accounting, commit."""

import dataclasses
import logging
import sys
import time

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from pipeline import output as output_lib
from pipeline.graph import build_pipeline
from pipeline.options import ExportOptions, default_output
from pipeline.plan import build_plan
from pipeline.transforms import NAMESPACE


@dataclasses.dataclass
class ExportSummary:
    """What a finished run did; `exit_code` is what `python -m pipeline.run` returns."""

    output: str
    records_read: int
    rows_written: int
    dead_letters: int
    errors_by_reason: dict
    truncated: int
    oov_tokens: int
    seconds: float
    exit_code: int
    message: str

    @property
    def docs_per_second(self):
        return self.rows_written / self.seconds if self.seconds else 0.0


def _counters(result):
    counters = {}
    for counter in result.metrics().query(beam.metrics.MetricsFilter().with_namespace(NAMESPACE))["counters"]:
        name = counter.key.metric.name
        counters[name] = counters.get(name, 0) + (counter.committed if counter.committed is not None else counter.attempted)
    return counters


def local_runner(options):
    """The runner to use: Beam's FnApiRunner when the DirectRunner is meant.

    For a batch pipeline the DirectRunner first tries the Prism runner, which it
    downloads from GitHub, and then falls back to the FnApiRunner.  Going
    straight to the FnApiRunner keeps local runs offline and makes
    `--direct_running_mode` / `--direct_num_workers` always apply.  Any other
    --runner (DataflowRunner, ...) is used as given.
    """
    runner = options.view_as(StandardOptions).runner
    if runner in (None, "DirectRunner", "direct"):
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner

        return FnApiRunner()
    return None


def run_export(argv=None):
    """Runs the export described by command-line `argv`; returns an `ExportSummary`.

    Raises:
        ExportConfigError: a launch-time validation failed; nothing was written.
    """
    options = PipelineOptions(argv)
    export_options = options.view_as(ExportOptions)
    if not export_options.output:
        export_options.output = default_output()
    plan, _ = build_plan(export_options)
    run_id = output_lib.prepare(plan.output, export_options.overwrite)
    rows_prefix, errors_prefix = output_lib.staging_prefixes(plan.output, run_id)

    started = time.time()
    pipeline = beam.Pipeline(runner=local_runner(options), options=options)
    build_pipeline(pipeline, plan, rows_prefix, errors_prefix)
    result = pipeline.run()
    result.wait_until_finish()
    seconds = time.time() - started

    counters = _counters(result)
    rows, dead = output_lib.staged_counts(plan.output, run_id)
    read = counters.get("records_read", 0)
    by_reason = {name[len("failed_"):]: value for name, value in counters.items() if name.startswith("failed_")}
    exit_code, message = 0, "ok"
    if read != rows + dead:
        exit_code = 3
        message = f"Accounting mismatch: {read} records read but {rows} rows + {dead} dead letters written."
    elif read and dead / read > export_options.max_error_fraction:
        exit_code = 4
        message = (
            f"{dead} of {read} records ({dead / read:.0%}) were dead-lettered, more than "
            f"--max_error_fraction={export_options.max_error_fraction}. Check --input_format and "
            f"--input_map; the reasons are in {output_lib.join(plan.output, output_lib.ERRORS_DIR)}."
        )
    manifest = {
        "status": "succeeded" if exit_code == 0 else "completed_with_errors",
        "message": message,
        "command_line": sys.argv if argv is None else ["python", "-m", "pipeline.run", *argv],
        "options": {k: v for k, v in options.get_all_options(drop_default=True).items()},
        "model_uri": plan.model_uri,
        "model_sha256": plan.model_sha256,
        "tokenizer_sha256": plan.tokenizer_sha256,
        "columns": [dataclasses.asdict(c) for c in plan.columns],
        "counts": {
            "records_read": read,
            "rows_written": rows,
            "dead_letters": dead,
            "dead_letters_by_reason": by_reason,
            "documents_truncated": counters.get("documents_truncated", 0),
            "oov_tokens": counters.get("oov_tokens", 0),
        },
        "seconds": round(seconds, 3),
        "package_version": plan.package_version,
    }
    output_lib.commit(plan.output, run_id, manifest)
    return ExportSummary(
        output=plan.output,
        records_read=read,
        rows_written=rows,
        dead_letters=dead,
        errors_by_reason=by_reason,
        truncated=counters.get("documents_truncated", 0),
        oov_tokens=counters.get("oov_tokens", 0),
        seconds=seconds,
        exit_code=exit_code,
        message=message,
    )


def format_summary(summary):
    """The one-screen summary printed at the end of a run."""
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(summary.errors_by_reason.items())) or "none"
    pattern = output_lib.join(summary.output, "*.parquet")
    lines = [
        "",
        "Export finished" if summary.exit_code == 0 else f"Export finished with problems: {summary.message}",
        f"  documents read   {summary.records_read}",
        f"  rows written     {summary.rows_written}",
        f"  dead letters     {summary.dead_letters} ({reasons})",
        f"  truncated        {summary.truncated} documents longer than the model input",
        f"  seconds          {summary.seconds:.1f} ({summary.docs_per_second:.0f} docs/s)",
        f"  output           {summary.output}",
        "  read it with     "
        f"python -c \"import duckdb; print(duckdb.sql(\\\"SELECT * FROM '{pattern}' LIMIT 5\\\"))\"",
        f"               or python -c \"import pandas as pd; print(pd.read_parquet('{summary.output}').head())\"",
    ]
    if logging.getLogger().isEnabledFor(logging.DEBUG):
        lines.append(f"  oov tokens       {summary.oov_tokens}")
    return "\n".join(lines)
