"""Launches one export: validate, stage, run the pipeline, check the accounting, commit."""

import argparse
import contextlib
import dataclasses
import difflib
import functools
import json
import logging
import os
import sys
import tempfile
import time
import typing
from collections.abc import Iterator, Sequence
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import (
    DirectOptions,
    PipelineOptions,
)
from apache_beam.runners.runner import PipelineResult, PipelineRunner

from models.command_line import (
    join_negative_numbers,
    parse_recording_repeats,
    repeated_message,
    without_switch_values,
)
from pipeline.errors import (
    EXIT_ACCOUNTING_UNVERIFIED,
    EXIT_OK,
    ExportConfigError,
    OutputWriteError,
)
from pipeline.inference.embedder import choose_forward_passes, manifest_columns
from pipeline.inference.skip_kept import read_kept_met
from pipeline.planning.build import build_plan
from pipeline.planning.checks import (
    check_beam_flags,
    check_not_empty,
    check_numeric_flags,
    check_text_arguments,
)
from pipeline.planning.locations import finished_commit_message
from pipeline.planning.model_source import ModelSource
from pipeline.planning.options import ExportOptions, default_output
from pipeline.planning.plan import ExportPlan
from pipeline.planning.reuse import check_reuse_forward_passes, reuse_signature
from pipeline.running import left_running, local_workers, portable
from pipeline.running import progress as progress_lib
from pipeline.running.accounting import account, counted, manifest_counts, verdict
from pipeline.running.counters import (
    DOCUMENTS_TRUNCATED,
    NAMESPACE,
    OOV_TOKENS,
    ROWS_KEPT,
    RunCounters,
    read_counters,
)
from pipeline.running.dataflow import poll_dataflow
from pipeline.running.failures import (
    beam_errors_held,
    is_disk_full,
    is_file_too_large,
    out_of_space,
    out_of_space_reported,
    token_table_too_large,
    unchangeable_output_reported,
)
from pipeline.running.graph import build_pipeline
from pipeline.running.report import ExportSummary, recorded_command_line, recorded_options
from pipeline.running.runners import (
    check_beam_validation,
    check_dataflow_options,
    check_direct_workers,
    check_runner,
    check_staged_files,
    check_worker_paths,
    is_dataflow,
    is_dry_run,
    local_runner,
    split_bytes_for,
    use_local_cores,
    worker_package_path,
    worker_tf_threads,
)
from pipeline.scratch import held_scratch_directory
from pipeline.uris import is_local
from pipeline.writing import commit as commit_lib
from pipeline.writing import resume as resume_lib
from pipeline.writing.commit import has_pending_commit
from pipeline.writing.commit_phase import recovered, recovered_run, reset_commit_phase
from pipeline.writing.files import join
from pipeline.writing.layout import ERRORS_DIR, FAILED_DIR, STAGING, new_run_id
from pipeline.writing.lock import OutputLock
from pipeline.writing.resume import Resumption
from pipeline.writing.staging import (
    null_counts,
    remove_staging,
    staged_shards,
    staging_prefixes,
    staging_tables_dir,
)
from pipeline.writing.state import prepare, read_manifest
from pipeline.writing.token_tables import write_token_tables

_LOGGER = logging.getLogger(__name__)

# Whether this process's run got past its launch checks and took its output's lock: a run
# stopped before that wrote nothing, so a rerun has nothing of it to keep (pipeline.run says so).
_past_launch_checks = False


def past_launch_checks() -> bool:
    """Whether the current run has taken its output's lock, after every launch check passed."""
    return _past_launch_checks


def _dry_run(pipeline: beam.Pipeline, plan: ExportPlan, options: PipelineOptions) -> ExportSummary:
    """Builds the job (Dataflow) or just the graph (other runners) without running anything."""
    skipped = [f"listing --input {plan.input_pattern!r}"] if not is_local(plan.input_pattern) else []
    if not is_local(plan.output):
        skipped.append(f"checking --output {plan.output!r} for earlier runs")
    skipped.append("removing leftovers of earlier runs")
    job = None
    if is_dataflow(options):
        # Beam's DataflowRunner stops after building the job: no staging, no submission.
        job = getattr(pipeline.run(), "job", None)
        skipped.append("uploading packages to the staging location and submitting the job")
    else:
        skipped.append("running the pipeline")
    skipped.append("waiting for the job, counting rows and writing the manifest")
    message = "the job was built, not run; skipped " + "; ".join(skipped) + "."
    _LOGGER.warning("--dry_run: %s", message)
    return ExportSummary(
        output=plan.output,
        records_read=0,
        rows_written=0,
        dead_letters=0,
        errors_by_reason={},
        truncated=0,
        oov_tokens=0,
        seconds=0.0,
        exit_code=0,
        message=message,
        dry_run=True,
        job=job,
    )


def beam_parser() -> argparse.ArgumentParser:
    """The parser Beam builds from every PipelineOptions subclass, ours included."""
    parsers: list[argparse.ArgumentParser] = []
    PipelineOptions([]).get_all_options(add_extra_args_fn=parsers.append)
    return parsers[0]


# Where Beam's own flags are explained: `python -m pipeline.run --help` lists only ours.
BEAM_OPTIONS_REFERENCE = (
    "https://beam.apache.org/releases/pydoc/current/apache_beam.options.pipeline_options.html"
)
# Flags whose one value is often followed by more: a shell-expanded pattern, or several layers.
_ONE_VALUE_HINTS = {
    "--input": "the shell expanded an unquoted pattern into file names; quote it, --input 'data/*.jsonl', "
    "so that the command matches it",
    "--layer": "--layer takes one layer: give it before each (--layer lstm_content --layer lstm_title)",
    "--input_map": "--input_map takes one INPUT=FIELD: give it before each",
    "--keep_fields": "--keep_fields takes one comma-separated list (--keep_fields kind,topic)",
}


def _our_flags() -> set[str]:
    """The flags `python -m pipeline.run --help` lists (ours), as against Beam's."""
    parsers: list[argparse.ArgumentParser] = []
    ExportOptions([]).get_all_options(current_only=True, add_extra_args_fn=parsers.append)
    return {flag for action in parsers[0]._actions for flag in action.option_strings}


def _help_for(message: str) -> str:
    """Where the flag an argparse `message` is about ("argument --flag: ...") is explained."""
    flag = message.removeprefix("argument ").split(":", 1)[0].split("/", 1)[0]
    if message.startswith("argument --") and flag not in _our_flags():
        return (
            f"{flag} is one of Beam's own flags, explained in Beam's pipeline options reference "
            f"({BEAM_OPTIONS_REFERENCE}), not in `python -m pipeline.run --help`"
        )
    return "`python -m pipeline.run --help` explains each flag"


def _stray_values(argv: Sequence[str], unknown: Sequence[str]) -> list[str]:
    """Hints for the unknown arguments that follow a one-value flag's value (`_ONE_VALUE_HINTS`)."""
    hints = []
    args = list(argv)
    for index, arg in enumerate(args[:-2]):
        hint = _ONE_VALUE_HINTS.get(arg)
        if hint is None or args[index + 1].startswith("-"):
            continue
        extra = []
        for value in args[index + 2 :]:
            if value.startswith("-"):
                break
            extra.append(value)
        if extra and all(value in unknown for value in extra):
            hints.append(f"{arg} {args[index + 1]!r} is followed by {', '.join(map(repr, extra))}: {hint}")
    return hints


def check_known_flags(argv: Sequence[str] | None) -> None:
    """Refuses arguments that neither our options nor Beam's declare (a typo such as --ouput), and
    a one-value flag given twice with different values (`--input a.jsonl --input b.jsonl`).

    Beam only warns about unknown arguments and runs with the defaults, and keeps
    the last of two values without a word: either would export the wrong thing, or
    to the wrong place.

    Raises:
        ExportConfigError: naming each unknown argument and the closest known flag,
            or each flag given twice.
    """
    parser = beam_parser()

    def refuse(message: str) -> typing.NoReturn:
        # argparse's own error() prints Beam's whole usage (some 140 lines) above its one line.
        raise ExportConfigError(f"{without_switch_values(message)}. {_help_for(message)}.")

    parser.error = refuse  # type: ignore[method-assign]  # argparse's documented way to change it is a subclass
    argv = sys.argv[1:] if argv is None else list(argv)
    _, unknown, repeated = parse_recording_repeats(parser, argv)
    if "--" in unknown:
        after = unknown[unknown.index("--") + 1 :]
        raise ExportConfigError(
            "'--' ends the flags, and this command takes no other arguments"
            + (f": what follows it ({' '.join(after)}) would not be read" if after else "")
            + ". Put every flag before it, or leave the '--' out."
        )
    stray = _stray_values(argv, unknown)
    if stray:
        raise ExportConfigError("; ".join(stray) + ".")
    if unknown:
        known = [flag for action in parser._actions for flag in action.option_strings]
        problems = []
        for arg in unknown:
            name = arg.split("=", 1)[0]
            close = difflib.get_close_matches(name, known, n=1) if name.startswith("-") else []
            problems.append(f"{arg!r}" + (f" (did you mean {close[0]}?)" if close else ""))
        raise ExportConfigError(
            f"Unknown argument(s): {', '.join(problems)}. `python -m pipeline.run --help` lists this "
            "tool's flags; Beam's own (--runner, --project, ...) are also accepted."
        )
    if repeated:
        several_inputs = " (several input files: one glob pattern, --input 'data/*.jsonl')"
        raise ExportConfigError(
            repeated_message(repeated) + (several_inputs if "--input" in repeated else "") + "."
        )


def run_export(argv: Sequence[str] | None = None) -> ExportSummary:
    """Runs the export described by command-line `argv`; returns an `ExportSummary`.

    Raises:
        ExportConfigError: a launch-time validation failed; nothing was written.
    """
    global _past_launch_checks
    _past_launch_checks = False
    check_text_arguments(sys.argv[1:] if argv is None else argv)
    # `--shard_mb -inf` reaches the flag's own range check, as `--shard_mb=-inf` does.
    argv = join_negative_numbers(beam_parser(), sys.argv[1:] if argv is None else argv)
    check_known_flags(argv)
    reset_commit_phase()
    left_running.forget()
    options = PipelineOptions(argv)
    # The launcher reads --model, --input and --output before any Pipeline exists;
    # object stores (s3:// endpoint and keys, ...) take their settings from these options.
    FileSystems.set_options(options)
    export_options = options.view_as(ExportOptions)
    check_not_empty(export_options)
    if export_options.output is None:
        export_options.output = default_output()
    # A relative path in a folder whose name is not UTF-8 is recorded absolute.
    check_text_arguments(
        [],
        {
            f"--{flag}": os.path.abspath(value)
            for flag in ("output", "model", "reuse")
            if (value := getattr(export_options, flag)) and is_local(value)
        },
    )
    dry_run = is_dry_run(options)
    # Before anything reads a numeric flag: a value that is not a number is kept as text.
    check_numeric_flags(export_options)
    check_runner(options)
    check_beam_flags(options)
    check_direct_workers(options)
    if is_dataflow(options):
        check_worker_paths(export_options)
        check_dataflow_options(options)
    if portable.is_portable(options):
        portable.check_portable_flags(options)
    if is_dataflow(options) or portable.is_portable(options):
        check_staged_files(options)
    check_beam_validation(options)
    if portable.is_portable(options) and not dry_run:
        portable.check_job_endpoint(options)
    if dry_run and not is_local(export_options.model):
        raise ExportConfigError(
            f"--dry_run builds the plan from the model without cloud credentials, so --model "
            f"must be local; received {export_options.model!r}. Leave --model out (the "
            "bundled default) or pass a local copy of the bundle."
        )
    plan, model_source = build_plan(export_options, check_remote=not dry_run)
    total_bytes = plan.input_bytes
    use_local_cores(options, total_bytes, argv)
    plan = dataclasses.replace(plan, tf_threads=worker_tf_threads(options, export_options.tf_threads))
    if dry_run:
        with _beam_pipeline(options, local_runner(options)) as pipeline:
            build_pipeline(
                pipeline,
                plan,
                *staging_prefixes(plan.output, new_run_id()),
                **_graph_settings(options, total_bytes),
            )
            return _dry_run(pipeline, plan, options)
    plan = choose_forward_passes(plan, model_source)
    # Rows of the fast path and of Keras's forward pass never share a column, whatever the flags say.
    check_reuse_forward_passes(plan)
    signature = resume_lib.run_signature(plan, export_options.limit)
    # The launch finished a killed run's commit: a scheduler's retry of that same command (with
    # --overwrite or not) finds the export it asked for there.
    finished_here = export_options.output in recovered()
    if export_options.resume == "auto" and (export_options.overwrite or finished_here):
        done = _recovered_export(export_options.output, plan, signature, export_options.max_error_fraction)
        if done is not None:
            return done
    if finished_here and not export_options.overwrite:
        raise ExportConfigError(finished_commit_message(export_options.output))
    # With --resume auto, `prepare` keeps the staging of an interrupted run of this same export.
    find_resumable = (
        functools.partial(resume_lib.find_resumable, signature=signature)
        if export_options.resume == "auto"
        else None
    )

    # The lock is held from before the output is prepared until the manifest is
    # written, so a second run on this --output is refused instead of mixing files.
    with OutputLock(plan.output) as lock:
        _past_launch_checks = True
        # Removing dead runs' leftovers and taking over an interrupted run's rows move and delete
        # files another user's run (sudo) may have left: one line, not a traceback.
        with unchangeable_output_reported(plan.output):
            run_id, resumable = prepare(plan.output, export_options.overwrite, find_resumable)
            resumed = None
            # The run's first write (its _RUN.json) may be the one that finds the disk full. A failed
            # hand-over gives the interrupted run its files back: the line names where they are.
            with out_of_space_reported(plan.output, resumable or run_id):
                try:
                    if resumable is not None:
                        # Under its own run id: the interrupted run's job may still write under the old one.
                        resumed = resume_lib.prepare_resume(plan.output, resumable, run_id, plan)
                    resume_lib.start_run(plan.output, run_id, signature, resumed)
                except BaseException:
                    if resumable is not None:
                        resume_lib.hand_back(plan.output, resumable, run_id)
                    raise
        if resumed is not None:
            resume_lib.remove_old_run(plan.output, resumed.run_id)
        return _run_and_commit(options, plan, model_source, run_id, argv, total_bytes, resumed, lock)


def _recovered_export(
    output: str, plan: ExportPlan, signature: dict[str, Any], max_error_fraction: float
) -> ExportSummary | None:
    """The summary of the export this command makes, where the launch just finished its commit: that of a
    run killed past its commit point with this run's signature, which succeeded (or, on a runner without
    committed counters, ended with only its accounting unverified: exit 7 again); else None.

    A rerun that is to replace it (`--overwrite`) would embed the whole corpus again into the same rows,
    as a resumed run does not (with `--resume off` it does, as asked); one without `--overwrite` would be
    refused, though the export it asks for is there.
    """
    recovered = recovered_run(output)
    if recovered is None or recovered[0] != json.loads(json.dumps(signature)):
        return None
    _, manifest = recovered
    with OutputLock(plan.output):  # Still that export: no other run replaced it since.
        if has_pending_commit(plan.output) or read_manifest(plan.output) != manifest:
            return None
    if not isinstance(manifest, dict):
        return None
    counts = manifest.get("counts") or {}
    # A runner without committed counters (Spark's, Flink's job servers) ends every run so (exit 7): the
    # same command would again, over the same rows. Otherwise a failed export is made again: what failed
    # may be fixed (a file given back).
    unverified = (
        manifest.get("status") == "completed_with_errors"
        and counts.get("counters") in ("attempted", "none")
        and not counts.get("files_broken")
    )
    if manifest.get("status") != "succeeded" and not unverified:
        return None
    # The signature holds what the rows depend on, not the model's path (every row file names it, as
    # this command would) nor the share of dead letters this command calls a failure.
    if manifest.get("model_uri") != plan.model_uri:
        return None
    dead = counts.get("dead_letters", 0)
    records = counts.get("records_read") or counts.get("rows_written", 0) + dead
    if records and dead / records > max_error_fraction:
        return None
    resumed = manifest.get("resumed") or {}
    _LOGGER.warning(
        "%s now holds the export of this same command (model, flags and input files): its interrupted "
        "run's commit was finished just now, so nothing is embedded again (--resume off would).",
        output,
    )
    return ExportSummary(
        output=plan.output,
        records_read=counts.get("records_read"),
        rows_written=counts.get("rows_written", 0),
        dead_letters=dead,
        errors_by_reason=counts.get("dead_letters_by_reason", {}),
        truncated=counts.get("documents_truncated", 0),
        oov_tokens=counts.get("oov_tokens", 0),
        seconds=float(manifest.get("seconds", 0.0)),
        exit_code=EXIT_ACCOUNTING_UNVERIFIED if unverified else EXIT_OK,
        message=manifest.get("message", ""),
        reuse=plan.reuse,
        rows_reused=counts.get("rows_reused", 0),
        earlier_rows_dropped=counts.get("earlier_rows_dropped", 0),
        limited=bool(manifest.get("limited")),
        resumed_run=resumed.get("run", ""),
        rows_kept=resumed.get("rows_kept", 0),
    )


def _kept_documents_met(resumed: Resumption, run_counters: RunCounters) -> int:
    """How many of the corpus's documents have a row the resumed run kept.

    Counted as the pipeline's data (`CountKeptDocuments`): exact on every runner, where attempted
    counters (Spark's and Flink's job servers) count a retried bundle twice, which would cover a
    kept row whose id is gone, and some runners report none.

    Raises:
        ExportConfigError: the count cannot be read and no committed counter can stand in for it.
    """
    try:
        return read_kept_met(resumed.kept_ids_path)
    except ValueError as error:
        if run_counters.exact:
            _LOGGER.warning("%s: the committed rows_kept counter counts the kept documents instead.", error)
            return run_counters.values.get(ROWS_KEPT, 0)
        raise ExportConfigError(
            f"This resumed run cannot tell whether the documents of the {resumed.rows_kept:,} rows it kept "
            f"are still in the corpus: its count of them, {error}, and the runner reports no committed "
            "counters to count them instead. Nothing was committed; rerun the same command (it keeps those "
            "rows again and counts anew), or rerun with --resume off to start from zero."
        ) from None


def _graph_settings(
    options: PipelineOptions,
    total_bytes: int,
    progress_dir: str | None = None,
    resumed: Resumption | None = None,
    workers_dir: str | None = None,
) -> dict[str, Any]:
    export_options = options.view_as(ExportOptions)
    return {
        "split_bytes": split_bytes_for(options, total_bytes),
        "shard_bytes": max(1, int(export_options.shard_mb * 1e6)),
        "limit": export_options.limit,
        "progress_dir": progress_dir,
        "checkpoint_seconds": export_options.checkpoint_seconds,
        "kept_ids_path": resumed.kept_ids_path if resumed else None,
        "kept_files": resumed.kept_files if resumed else (),
        "workers_dir": workers_dir,
    }


@contextlib.contextmanager
def _beam_pipeline(
    options: PipelineOptions, runner: PipelineRunner | None = None, folder: str | None = None
) -> Iterator[beam.Pipeline]:
    """A Beam pipeline whose own temporary folder lies in `folder` (a held one of ours; None: a new one).

    Beam's Pipeline makes `$TMPDIR/beam-pipeline-temp*` when it is built and removes it only at the end
    of its run(): each --dry_run (never run), and each run a SIGKILL or the OOM killer ended, left one for
    good. In a held folder it goes with it, and the next command removes one a dead process left
    (`pipeline.scratch`).
    """
    with contextlib.ExitStack() as stack:
        held = folder or stack.enter_context(held_scratch_directory("embexport-pipeline-"))
        pipeline = beam.Pipeline(runner=runner, options=options)
        with contextlib.suppress(OSError):
            os.rmdir(pipeline.local_tempdir)
        pipeline.local_tempdir = tempfile.mkdtemp(prefix="beam-pipeline-temp", dir=held)
        yield pipeline


def _run_pipeline(
    options: PipelineOptions,
    plan: ExportPlan,
    rows_prefix: str,
    errors_prefix: str,
    total_bytes: int,
    resumed: Resumption | None,
    workers_dir: str,
) -> PipelineResult:
    """Builds and runs the pipeline, reporting progress while it works; returns the result."""
    export_options = options.view_as(ExportOptions)
    if portable.is_portable(options):
        with _beam_pipeline(options) as pipeline:
            settings = _graph_settings(options, total_bytes, resumed=resumed, workers_dir=workers_dir)
            build_pipeline(pipeline, plan, rows_prefix, errors_prefix, **settings)
            return portable.run_job(
                pipeline,
                workers_dir,
                options,
                export_options.worker_start_timeout,
                export_options.progress_seconds,
                fresh=resumed is None,
            )
    if local_runner(options) is None:
        with _beam_pipeline(options) as pipeline:
            build_pipeline(
                pipeline,
                plan,
                rows_prefix,
                errors_prefix,
                **_graph_settings(options, total_bytes, None, resumed),
            )
            result = pipeline.run()
            if is_dataflow(options):
                poll_dataflow(result, options, export_options.progress_seconds)
            result.wait_until_finish()
            return result
    # Held while the run lives; the next run removes it if a SIGKILL left it behind.
    with (
        held_scratch_directory("embexport-progress-") as progress_dir,
        _beam_pipeline(options, local_runner(options), progress_dir) as pipeline,
    ):
        build_pipeline(
            pipeline,
            plan,
            rows_prefix,
            errors_prefix,
            **_graph_settings(options, total_bytes, progress_dir, resumed),
        )
        # Only worker processes can be stopped and their run ended for it (`local_workers.stalled`).
        processes = options.view_as(DirectOptions).direct_running_mode == "multi_processing"
        monitor = progress_lib.ProgressMonitor(
            progress_dir,
            total_bytes,
            export_options.limit,
            export_options.progress_seconds,
            stall_seconds=export_options.stall_timeout if processes else 0.0,
            on_stall=local_workers.stalled,
            scheduler_times=local_workers.scheduler_times,
            io_bytes=local_workers.io_bytes,
        )
        with beam_errors_held(export_options.resume), monitor, worker_package_path(options):
            result = pipeline.run()
            result.wait_until_finish()
        return result


def _run_and_commit(
    options: PipelineOptions,
    plan: ExportPlan,
    model_source: ModelSource,
    run_id: str,
    argv: Sequence[str] | None,
    total_bytes: int,
    resumed: Resumption | None = None,
    lock: OutputLock | None = None,
) -> ExportSummary:
    """Runs the pipeline into the run's staging directory, checks the accounting, commits.

    `resumed` (a `resume.Resumption`): the run continues an interrupted one, whose
    complete row files are already staged. `lock`: the output's, checked still
    held (a lease on object storage can be taken over) before anything is committed.
    """
    export_options = options.view_as(ExportOptions)
    rows_prefix, errors_prefix = staging_prefixes(plan.output, run_id)
    started = time.time()
    workers_dir = join(plan.output, STAGING, run_id, portable.WORKERS_DIR)
    try:
        try:
            with out_of_space_reported(plan.output, run_id):
                write_token_tables(plan, model_source, staging_tables_dir(plan.output, run_id))
        except OutputWriteError as error:
            if is_file_too_large(error):  # One whole file: a smaller --shard_mb would not help.
                raise token_table_too_large(plan.output) from None
            raise
        with out_of_space_reported(plan.output, run_id):
            result = _run_pipeline(
                options, plan, rows_prefix, errors_prefix, total_bytes, resumed, workers_dir
            )
            staged = staged_shards(plan.output, run_id)
    except portable.WorkersUnavailableError:
        if resumed is None:  # A resumed run's staging holds the rows it kept: the rerun keeps them.
            remove_staging(plan.output, run_id)
        raise
    seconds = time.time() - started
    if lock is not None:
        # The staged files are only this run's if the output is still the directory it locked.
        lock.check_held()

    run_counters = read_counters(result, NAMESPACE)
    accounting = account(run_counters, staged, plan, resumed)
    kept_met = _kept_documents_met(resumed, run_counters) if resumed else 0
    if resumed and kept_met < resumed.rows_kept:
        # A kept row whose id the corpus no longer has: rewritten with the same size and time.
        raise ExportConfigError(
            f"The corpus changed since the interrupted run this one resumes: of the {resumed.rows_kept:,} "
            f"rows it kept, only {kept_met:,} have their document in the "
            "corpus now (a file was rewritten with the same size and modification time). Nothing was "
            "committed; rerun with --resume off."
        )
    # A kept field null in every row was in no record: a misspelled --keep_fields, said loudly.
    kept_nulls = null_counts([path for path, _ in staged["rows"]], plan.keep_fields)
    never_found = [
        field for field, nulls in kept_nulls.items() if accounting.rows and nulls == accounting.rows
    ]
    for field in never_found:
        logging.warning("--keep_fields %r is missing or null in all %d rows.", field, accounting.rows)
    # A failed run never replaces a succeeded export (its dead letters go to _failed/RUN/).
    try:
        earlier = read_manifest(plan.output)
    except ExportConfigError as error:  # --overwrite of a damaged export: nothing says it succeeded.
        logging.warning("%s It is replaced as an export that did not succeed.", error)
        earlier = None
    earlier_succeeded = earlier is not None and earlier.get("status") == "succeeded"
    failed_dir = join(plan.output, FAILED_DIR, run_id)
    errors_dir = join(failed_dir if earlier_succeeded else plan.output, ERRORS_DIR)
    exit_code, message = verdict(accounting, resumed, export_options.max_error_fraction, errors_dir)
    manifest = {
        "status": "succeeded" if exit_code == 0 else "completed_with_errors",
        "message": message,
        "command_line": recorded_command_line(
            sys.argv if argv is None else ["python", "-m", "pipeline.run", *argv]
        ),
        "options": recorded_options(options),
        "model_uri": plan.model_uri,
        "model_sha256": plan.model_sha256,
        "tokenizer_sha256": plan.tokenizer_sha256,
        "columns": manifest_columns(plan.columns, plan.forward_passes),
        "counts": {**manifest_counts(accounting), "kept_fields_null": kept_nulls},
        "limited": export_options.limit is not None,
        "limit": export_options.limit,
        # A resumed run: which run it continued and what it kept of it; None for a run from zero.
        "resumed": resumed.manifest() if resumed else None,
        "reuse_signature": reuse_signature(plan),
        "seconds": round(seconds, 3),
        "package_version": plan.package_version,
    }
    if lock is not None:
        lock.check_held()
    # A kill from here to the commit point is resumed; one after it is recovered by the commit.
    with out_of_space_reported(plan.output, run_id):
        resume_lib.mark_committing(plan.output, run_id)
    # Unverified accounting (a portable runner without committed counters) is no failure of the run.
    set_aside = exit_code not in (EXIT_OK, EXIT_ACCOUNTING_UNVERIFIED) and earlier_succeeded
    if set_aside:
        message += (
            f" The succeeded export already in {plan.output} was kept: a failed run does not replace "
            f"it. This run's manifest and dead letters are in {failed_dir} (its rows were dropped)."
        )
        manifest["message"] = message
        with out_of_space_reported(plan.output, run_id):
            commit_lib.set_aside_failed_run(plan.output, run_id, staged, manifest)
    else:
        held = lock.check_held if lock is not None else commit_lib.unguarded
        try:
            commit_lib.commit(plan.output, run_id, staged, manifest, held)
        except OutputWriteError as error:
            # A disk that filled before the commit point (the staged manifest, the journal) is told as one
            # in the pipeline is: how much space the export needed, and what of it the rerun continues from.
            if is_disk_full(error) and not commit_lib.journal_written(plan.output):
                raise out_of_space(plan.output, run_id) from None
            raise
    return ExportSummary(
        output=plan.output,
        records_read=accounting.read if accounting.exact else None,
        rows_written=accounting.rows,
        dead_letters=accounting.dead,
        errors_by_reason=accounting.by_reason,
        truncated=counted(accounting, DOCUMENTS_TRUNCATED),
        oov_tokens=counted(accounting, OOV_TOKENS),
        seconds=seconds,
        exit_code=exit_code,
        message=message,
        reuse=plan.reuse,
        rows_reused=accounting.reuse_counts.get("rows_reused", 0),
        earlier_rows_dropped=accounting.reuse_counts.get("earlier_rows_dropped", 0),
        limited=export_options.limit is not None,
        kept_fields_never_found=never_found,
        resumed_run=resumed.run_id if resumed else "",
        rows_kept=resumed.rows_kept if resumed else 0,
        committed=not set_aside,
    )
