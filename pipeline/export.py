"""Launches one export: validate, stage, run the pipeline, check the accounting, commit."""

import contextlib
import dataclasses
import difflib
import errno
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import (
    DebugOptions,
    DirectOptions,
    FlinkRunnerOptions,
    PipelineOptions,
    StandardOptions,
    TestOptions,
)
from apache_beam.runners.runner import PipelineState

from pipeline import local_workers, portable
from pipeline import output as output_lib
from pipeline import progress as progress_lib
from pipeline import resume as resume_lib
from pipeline.embedder import choose_forward_passes, manifest_columns
from pipeline.errors import (
    EXIT_ACCOUNTING_MISMATCH,
    EXIT_ACCOUNTING_UNVERIFIED,
    EXIT_OK,
    EXIT_RECORDS_LOST,
    EXIT_TOO_MANY_ERRORS,
    ExportConfigError,
    OutputWriteError,
)
from pipeline.graph import build_pipeline
from pipeline.model_source import is_default_bundle, is_local, wants_no_tokenizer
from pipeline.options import ExportOptions, default_output
from pipeline.plan import build_plan, reuse_signature
from pipeline.token_tables import write_token_tables
from pipeline.transforms import DEFAULT_SPLIT_BYTES, FILES_BROKEN, NAMESPACE, RANGES_READ, ROWS_KEPT

# A local run of at least this much input uses one worker process per core (see
# `use_local_cores`); below it, starting the processes costs more than they save: each
# imports TensorFlow, loads the model and compiles its forward pass (10-20 s on 2 cores),
# and holds its own ~1 GB. `python -m benchmarks.real_text` measured one process faster
# than two on 100,000 real-length documents (48 MB) in both of its runs, with a third of
# the memory (a machine shared with other work: on idle cores the break-even is lower).
LOCAL_PROCESSES_MIN_BYTES = 64 << 20
# Local ranges: at least this many per worker process, each between these sizes.
RANGES_PER_LOCAL_WORKER = 4
MIN_SPLIT_BYTES = 1 << 20

_LOGGER = logging.getLogger(__name__)


@dataclasses.dataclass
class ExportSummary:
    """What a finished run did; `exit_code` is what `python -m pipeline.run` returns."""

    output: str
    records_read: int | None  # None: the runner reported no committed counters
    rows_written: int
    dead_letters: int
    errors_by_reason: dict
    truncated: int
    oov_tokens: int
    seconds: float
    exit_code: int
    message: str
    # --reuse: rows copied from the earlier export, and its rows whose id is gone.
    reuse: str = ""
    rows_reused: int = 0
    earlier_rows_dropped: int = 0
    # A resumed run: the run it continued ("" for a run from zero) and the rows it kept of it.
    resumed_run: str = ""
    rows_kept: int = 0
    # --dry_run: nothing was read or written; `job` is the Dataflow job Beam built, if any.
    dry_run: bool = False
    job: object = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def docs_per_second(self):
        return self.rows_written / self.seconds if self.seconds else 0.0


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


# Options whose values are credentials (--s3_secret_access_key, --azure_connection_string,
# ...): the manifest lives next to the data, so it records that they were set, not their value.
SECRET_OPTION_WORDS = ("secret", "token", "password", "connection_string", "access_key")
REDACTED = "<redacted>"


def _is_secret(name):
    return any(word in name for word in SECRET_OPTION_WORDS)


def recorded_options(options):
    """The options given on the command line, as the manifest records them (credentials redacted)."""
    return {
        name: REDACTED if _is_secret(name) and value else value
        for name, value in options.get_all_options(drop_default=True).items()
    }


def recorded_command_line(args):
    """`args` with the values of credential flags (`--name=value` or `--name value`) redacted."""
    recorded, hide_next = [], False
    for arg in args:
        name, equals, _ = arg.partition("=")
        secret = arg.startswith("--") and _is_secret(name)
        if hide_next:
            recorded.append(REDACTED)
        elif secret and equals:
            recorded.append(f"{name}={REDACTED}")
        else:
            recorded.append(arg)
        hide_next = secret and not equals and not hide_next
    return recorded


def is_dataflow(options):
    """Whether --runner names Google Cloud Dataflow."""
    return str(options.view_as(StandardOptions).runner or "").lower() in ("dataflowrunner", "dataflow")


def is_dry_run(options):
    """Whether Beam's test option `--dry_run` asks to build the job without running it.

    Beam declares the flag without a type and tests it for truth, so any value
    (even `--dry_run=False`) makes the DataflowRunner stop before submitting;
    this follows the same rule.
    """
    return bool(options.view_as(TestOptions).dry_run)


def check_worker_paths(export_options):
    """Refuses local --model, --input and --output paths, which Dataflow workers cannot see.

    The bundled default model is the exception: the package installed on the
    workers carries it; so is `--tokenizer none`, which names no file.

    Raises:
        ExportConfigError: naming the local paths.
    """
    paths = {
        "model": None if is_default_bundle(export_options.model) else export_options.model,
        "tokenizer": None if wants_no_tokenizer(export_options.tokenizer) else export_options.tokenizer,
        "input": export_options.input,
        "output": export_options.output,
    }
    local = [f"--{name} {value!r}" for name, value in paths.items() if value and is_local(value)]
    if local:
        raise ExportConfigError(
            f"Dataflow workers cannot read files on this machine, but {', '.join(local)} "
            "is local. Copy it to Cloud Storage (gcloud storage cp -r PATH gs://BUCKET/...) "
            "and pass the gs:// URI; only the bundled default --model may stay local."
        )


def worker_tf_threads(options, requested):
    """TensorFlow intra-op threads per SDK worker process; `requested` unless it is 0.

    Each SDK worker process loads its own model, and TensorFlow's default is one
    thread per core in every process, so several processes on one machine would
    run cores x processes threads.  With 0 the answer is cores / processes:
    1 on Dataflow, which starts one SDK process per vCPU (TensorFlow's default
    with --experiments=no_use_multiple_sdk_containers, one process per VM),
    cores / --direct_num_workers for --direct_running_mode=multi_processing,
    and TensorFlow's default where one process has the machine to itself.
    """
    if requested < 0:
        raise ExportConfigError(f"--tf_threads must be 0 (automatic) or positive, received {requested}.")
    if requested:
        return requested
    if is_dataflow(options):
        experiments = options.view_as(DebugOptions).experiments or []
        return 0 if "no_use_multiple_sdk_containers" in experiments else 1
    direct = options.view_as(DirectOptions)
    if local_runner(options) is not None and direct.direct_running_mode == "multi_processing":
        cores = os.cpu_count() or 1
        return max(1, cores // (direct.direct_num_workers or cores))
    return 0


def use_local_cores(options, total_bytes, argv=None):
    """Makes a local run use every core: one SDK worker process per core, unless told otherwise.

    Only when neither --direct_running_mode nor --direct_num_workers is on the
    command line `argv`,
    and the input is at least LOCAL_PROCESSES_MIN_BYTES (a smaller corpus is
    done before the worker processes would have loaded TensorFlow). The worker
    processes import this package from where the launcher did.
    """
    if local_runner(options) is None:
        return
    args = sys.argv[1:] if argv is None else list(argv)
    if any(arg.startswith(("--direct_running_mode", "--direct_num_workers")) for arg in args):
        return
    cores = os.cpu_count() or 1
    if cores < 2 or total_bytes < LOCAL_PROCESSES_MIN_BYTES:
        return
    direct = options.view_as(DirectOptions)
    direct.direct_running_mode = "multi_processing"
    direct.direct_num_workers = cores
    _LOGGER.info("Local run: %d worker processes (one per core).", cores)


@contextlib.contextmanager
def worker_package_path(options):
    """While it is active, local worker processes import this package from where the launcher did.

    They are started with this process's environment; PYTHONPATH is put back
    afterwards so that an export run in-process leaves its caller's environment alone.
    They also ignore a terminal's Ctrl-C, which only the launcher handles (pipeline.local_workers).
    """
    if (
        local_runner(options) is None
        or options.view_as(DirectOptions).direct_running_mode != "multi_processing"
    ):
        yield
        return
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    before = os.environ.get("PYTHONPATH")
    paths = (before or "").split(os.pathsep)
    if root not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [root, *paths]))
    try:
        with local_workers.ignoring_ctrl_c():
            yield
    finally:
        if before is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = before


def split_bytes_for(options, total_bytes):
    """How big a range of a file one reader reads.

    On Dataflow DEFAULT_SPLIT_BYTES (and the service splits further while it
    reads); locally, small enough that each worker process gets several ranges;
    on a portable runner given Flink's --parallelism, small enough that each
    slot gets several (Flink does not split a range while it reads it).
    """
    parallelism = options.view_as(FlinkRunnerOptions).parallelism or 0
    if portable.is_portable(options) and parallelism > 0:
        workers = parallelism
    elif local_runner(options) is None:
        return DEFAULT_SPLIT_BYTES
    else:
        direct = options.view_as(DirectOptions)
        workers = direct.direct_num_workers if direct.direct_running_mode == "multi_processing" else 1
    wanted = total_bytes // (max(1, workers or os.cpu_count() or 1) * RANGES_PER_LOCAL_WORKER)
    return int(min(DEFAULT_SPLIT_BYTES, max(MIN_SPLIT_BYTES, wanted)))


def _dry_run(pipeline, plan, options):
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


def check_known_flags(argv):
    """Refuses arguments that neither our options nor Beam's declare (a typo such as --ouput).

    Beam only warns about them and runs with the defaults, which would export
    the wrong thing to the wrong place.

    Raises:
        ExportConfigError: naming each unknown argument and the closest known flag.
    """
    parsers = []
    # Beam builds one parser from every PipelineOptions subclass; borrow it.
    PipelineOptions([]).get_all_options(add_extra_args_fn=parsers.append)
    parser = parsers[0]
    _, unknown = parser.parse_known_args(sys.argv[1:] if argv is None else list(argv))
    if not unknown:
        return
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


def run_export(argv=None):
    """Runs the export described by command-line `argv`; returns an `ExportSummary`.

    Raises:
        ExportConfigError: a launch-time validation failed; nothing was written.
    """
    check_known_flags(argv)
    output_lib.reset_commit_phase()
    options = PipelineOptions(argv)
    # The launcher reads --model, --input and --output before any Pipeline exists;
    # object stores (s3:// endpoint and keys, ...) take their settings from these options.
    FileSystems.set_options(options)
    export_options = options.view_as(ExportOptions)
    if not export_options.output:
        export_options.output = default_output()
    dry_run = is_dry_run(options)
    if is_dataflow(options):
        check_worker_paths(export_options)
    portable.check_worker_start_timeout(export_options.worker_start_timeout)
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
        pipeline = beam.Pipeline(runner=local_runner(options), options=options)
        build_pipeline(
            pipeline,
            plan,
            *output_lib.staging_prefixes(plan.output, output_lib.new_run_id()),
            **_graph_settings(options, total_bytes),
        )
        return _dry_run(pipeline, plan, options)
    plan = choose_forward_passes(plan, model_source)
    signature = resume_lib.run_signature(plan, export_options.limit)
    find_resumable = None
    if export_options.resume == "auto":

        def find_resumable(directory):
            return resume_lib.find_resumable(directory, signature)

    # The lock is held from before the output is prepared until the manifest is
    # written, so a second run on this --output is refused instead of mixing files.
    with output_lib.OutputLock(plan.output):
        run_id = output_lib.prepare(plan.output, export_options.overwrite, find_resumable)
        resumed = None
        # The run's first write (its _RUN.json) may be the one that finds the disk full.
        with _out_of_space_reported(plan.output, run_id):
            if resume_lib.read_run(plan.output, run_id) is not None:
                resumed = resume_lib.prepare_resume(plan.output, run_id, plan)
            resume_lib.start_run(plan.output, run_id, signature, resumed)
        return _run_and_commit(options, plan, model_source, run_id, argv, total_bytes, resumed)


def _graph_settings(options, total_bytes, progress_dir=None, resumed=None, workers_dir=None):
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


def dataflow_console_url(options, job_id):
    """The Cloud Console page of a Dataflow job."""
    from apache_beam.options.pipeline_options import GoogleCloudOptions

    cloud = options.view_as(GoogleCloudOptions)
    return f"https://console.cloud.google.com/dataflow/jobs/{cloud.region}/{job_id}?project={cloud.project}"


def _poll_dataflow(result, options, interval):
    """Prints the job's console URL, then its counters every `interval` seconds until it ends."""
    job_id = result.job_id() if callable(getattr(result, "job_id", None)) else None
    if job_id:
        _LOGGER.info("Dataflow job %s: %s", job_id, dataflow_console_url(options, job_id))
    while True:
        result.wait_until_finish(duration=int(max(1, interval) * 1000))
        if PipelineState.is_terminal(result.state):
            return
        try:
            counters = portable.read_counters(result, NAMESPACE).values
        except Exception as error:  # The service may not have counters yet.
            _LOGGER.info("Dataflow job %s: %s (counters not available: %s)", job_id, result.state, error)
            continue
        _LOGGER.info("Dataflow job %s: %s, %s", job_id, result.state, format_counters(counters))


def format_counters(counters):
    """The progress counters of a run as one line (Dataflow polling)."""
    dead = sum(value for name, value in counters.items() if name.startswith("failed_"))
    return (
        f"{counters.get('records_read', 0):,} records read, {counters.get('rows_embedded', 0):,} rows "
        f"embedded, {dead:,} dead letters"
    )


def _run_pipeline(options, plan, rows_prefix, errors_prefix, total_bytes, resumed=None, workers_dir=None):
    """Builds and runs the pipeline, reporting progress while it works; returns the result."""
    export_options = options.view_as(ExportOptions)
    if portable.is_portable(options):
        pipeline = beam.Pipeline(options=options)
        settings = _graph_settings(options, total_bytes, resumed=resumed, workers_dir=workers_dir)
        build_pipeline(pipeline, plan, rows_prefix, errors_prefix, **settings)
        result = pipeline.run()
        portable.wait_for_job(
            result,
            workers_dir,
            options,
            export_options.worker_start_timeout,
            export_options.progress_seconds,
        )
        return result
    if local_runner(options) is None:
        pipeline = beam.Pipeline(options=options)
        build_pipeline(
            pipeline, plan, rows_prefix, errors_prefix, **_graph_settings(options, total_bytes, None, resumed)
        )
        result = pipeline.run()
        if is_dataflow(options):
            _poll_dataflow(result, options, export_options.progress_seconds)
        result.wait_until_finish()
        return result
    progress_dir = tempfile.mkdtemp(prefix="embexport-progress-")
    try:
        pipeline = beam.Pipeline(runner=local_runner(options), options=options)
        build_pipeline(
            pipeline,
            plan,
            rows_prefix,
            errors_prefix,
            **_graph_settings(options, total_bytes, progress_dir, resumed),
        )
        monitor = progress_lib.ProgressMonitor(
            progress_dir, total_bytes, export_options.limit, export_options.progress_seconds
        )
        with _beam_errors_held(), monitor, worker_package_path(options):
            result = pipeline.run()
            result.wait_until_finish()
        return result
    finally:
        shutil.rmtree(progress_dir, ignore_errors=True)


class _HeldErrors(logging.Filter):
    """Holds back Beam's ERROR records (each with a long traceback) while a local pipeline runs."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and record.name.startswith("apache_beam"):
            self.records.append(record)
            return False
        return True


@contextlib.contextmanager
def _beam_errors_held():
    """Lets Beam's error logs of a failed local run through only if the failure is not one we explain.

    A full disk is reported as one `error:` line (see `out_of_space`); Beam would
    first log the same OSError with its traceback from inside the transform.
    """
    held = _HeldErrors()
    handlers = list(logging.getLogger().handlers)
    for handler in handlers:
        handler.addFilter(held)
    try:
        yield
    except BaseException as error:
        if is_disk_full(error) or isinstance(error, KeyboardInterrupt):
            held.records.clear()
        raise
    finally:
        for handler in handlers:
            handler.removeFilter(held)
        for record in held.records:
            logging.getLogger(record.name).handle(record)


def _run_and_commit(options, plan, model_source, run_id, argv, total_bytes, resumed=None):
    """Runs the pipeline into the run's staging directory, checks the accounting, commits.

    `resumed` (a `resume.Resumption`): the run continues an interrupted one, whose
    complete row files are already staged.
    """
    export_options = options.view_as(ExportOptions)
    rows_prefix, errors_prefix = output_lib.staging_prefixes(plan.output, run_id)
    started = time.time()
    workers_dir = output_lib.join(plan.output, output_lib.STAGING, run_id, portable.WORKERS_DIR)
    try:
        with _out_of_space_reported(plan.output, run_id):
            write_token_tables(plan, model_source, output_lib.staging_tables_dir(plan.output, run_id))
            result = _run_pipeline(
                options, plan, rows_prefix, errors_prefix, total_bytes, resumed, workers_dir
            )
            staged = output_lib.staged_shards(plan.output, run_id)
    except portable.WorkersUnavailableError:
        output_lib.remove_staging(plan.output, run_id)
        raise
    seconds = time.time() - started

    run_counters = portable.read_counters(result, NAMESPACE)
    counters = dict(run_counters.values)
    if resumed:
        # The kept documents were not tokenized again: their counts come from the kept files.
        for name, value in resumed.tokenizer_counts.items():
            counters[name] = counters.get(name, 0) + value
    rows = sum(count for _, count in staged["rows"])
    dead = sum(count for _, count in staged["errors"])
    read = counters.get("records_read", 0)
    broken = counters.get(FILES_BROKEN, 0)
    by_reason = {
        name[len("failed_") :]: value for name, value in counters.items() if name.startswith("failed_")
    }
    if not run_counters.exact:
        # Attempted values count retried bundles twice: only what the files hold is exact.
        by_reason = portable.dead_letters_by_reason(staged["errors"])
        broken = portable.files_broken(by_reason)
    reuse_counts = {}
    if plan.reuse:
        reused = counters.get("rows_reused", 0)
        reuse_counts = {
            "reused_from": plan.reuse,
            "rows_reused": reused,
            "rows_embedded": rows - reused,
            "earlier_rows_changed": counters.get("earlier_rows_changed", 0),
            "earlier_rows_dropped": counters.get("earlier_rows_dropped", 0),
        }
    # A failed run never replaces a succeeded export (its dead letters go to _failed/RUN/).
    earlier = output_lib.read_manifest(plan.output)
    earlier_succeeded = bool(earlier) and earlier.get("status") == "succeeded"
    failed_dir = output_lib.join(plan.output, output_lib.FAILED_DIR, run_id)
    errors_dir = output_lib.join(failed_dir if earlier_succeeded else plan.output, output_lib.ERRORS_DIR)
    exit_code, message = EXIT_OK, "ok"
    # Without committed counters the records read are unknown; what was written stands in for them.
    counted = read if run_counters.exact else rows + dead
    skipped = counters.get(ROWS_KEPT, 0)
    if resumed and skipped != resumed.rows_kept:
        exit_code = EXIT_ACCOUNTING_MISMATCH
        message = (
            f"Accounting mismatch: the resumed run kept {resumed.rows_kept} rows but met "
            f"{skipped} of their documents in the corpus."
        )
    elif run_counters.exact and read != rows + dead:
        exit_code = EXIT_ACCOUNTING_MISMATCH
        message = f"Accounting mismatch: {read} records read but {rows} rows + {dead} dead letters written."
    elif broken:
        exit_code = EXIT_RECORDS_LOST
        message = (
            f"{broken} input file(s) could not be read to the end (unreadable_file or read_error in "
            f"{errors_dir}): records after the break may be "
            "lost, and how many is unknown."
        )
    elif counted and dead / counted > export_options.max_error_fraction:
        exit_code = EXIT_TOO_MANY_ERRORS
        message = (
            f"{dead} of {counted} records ({dead / counted:.0%}) were dead-lettered, more than "
            f"--max_error_fraction={export_options.max_error_fraction}. Check --input_format and "
            f"--input_map; the reasons are in {errors_dir}."
        )
    elif not run_counters.exact:
        exit_code = EXIT_ACCOUNTING_UNVERIFIED
        message = (
            "Accounting unverified: the runner reported no committed counters, so the records read "
            f"are unknown and `records read = rows + dead letters` could not be checked; {rows} rows "
            f"and {dead} dead letters were written (counted in the files). The output is committed: "
            "compare with your corpus's record count, or run where counters are committed "
            "(DirectRunner, Dataflow, Beam's local job service) for the exact check."
        )
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
        "counts": {
            # None where the runner reported no committed counters: the count is unknown.
            "records_read": read if run_counters.exact else None,
            "rows_written": rows,
            "dead_letters": dead,
            "dead_letters_by_reason": by_reason,
            "files_broken": broken,
            "documents_truncated": counters.get("documents_truncated", 0),
            "oov_tokens": counters.get("oov_tokens", 0),
            # How many byte ranges of the input files were read (more than one per big file).
            "ranges_read": counters.get(RANGES_READ, 0),
            **reuse_counts,
            # The runner's word for the counters above: "committed", or "attempted" (an upper
            # bound: a retried bundle counts twice; the dead letters are then counted from their files).
            "counters": "committed" if run_counters.exact else "attempted",
        },
        "limited": export_options.limit is not None,
        "limit": export_options.limit,
        # A resumed run: which run it continued and what it kept of it; None for a run from zero.
        "resumed": resumed.manifest() if resumed else None,
        "reuse_signature": reuse_signature(plan),
        "seconds": round(seconds, 3),
        "package_version": plan.package_version,
    }
    # From here on the run is never resumed: a kill during the commit is recovered by the commit.
    resume_lib.mark_committing(plan.output, run_id)
    # Unverified accounting (a portable runner without committed counters) is no failure of the run.
    if exit_code not in (EXIT_OK, EXIT_ACCOUNTING_UNVERIFIED) and earlier_succeeded:
        message += (
            f" The succeeded export already in {plan.output} was kept: a failed run does not replace "
            f"it. This run's manifest and dead letters are in {failed_dir} (its rows were dropped)."
        )
        manifest["message"] = message
        output_lib.set_aside_failed_run(plan.output, run_id, staged, manifest)
    else:
        output_lib.commit(plan.output, run_id, staged, manifest)
    return ExportSummary(
        output=plan.output,
        records_read=read if run_counters.exact else None,
        rows_written=rows,
        dead_letters=dead,
        errors_by_reason=by_reason,
        truncated=counters.get("documents_truncated", 0),
        oov_tokens=counters.get("oov_tokens", 0),
        seconds=seconds,
        exit_code=exit_code,
        message=message,
        reuse=plan.reuse,
        rows_reused=reuse_counts.get("rows_reused", 0),
        earlier_rows_dropped=reuse_counts.get("earlier_rows_dropped", 0),
        resumed_run=resumed.run_id if resumed else "",
        rows_kept=resumed.rows_kept if resumed else 0,
    )


def is_disk_full(error: BaseException) -> bool:
    """Whether `error` (or what it wraps: Beam re-raises a worker's error as text) is a full disk."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(error) or "Disk quota exceeded" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def _free_bytes(path: str) -> int | None:
    if not is_local(path):
        return None
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    return shutil.disk_usage(existing).free


@contextlib.contextmanager
def _out_of_space_reported(output: str, run_id: str) -> Iterator[None]:
    """Turns a full disk inside the block into `out_of_space`'s one-line error (other errors pass)."""
    try:
        yield
    except Exception as error:
        if not is_disk_full(error):
            raise
        raise out_of_space(output, run_id) from None


def out_of_space(output: str, run_id: str) -> OutputWriteError:
    """Removes what the run staged in `output` and says how much space the export needed."""
    staged = output_lib.staged_bytes(output, run_id)
    # Measured before the removal: a failed writer may hold its deleted file open until we exit.
    free = _free_bytes(output)
    output_lib.remove_staging(output, run_id)
    available = f"the {progress_lib.size_text(free + staged)} it had" if free is not None else "what it had"
    return OutputWriteError(
        f"--output {output!r} ran out of space (no space left on device): this export needs more than "
        f"{available} (free space plus the {progress_lib.size_text(staged)} it had staged when the disk "
        "filled). Its staged files were removed and an earlier export there is untouched (it stays until "
        "a new one is committed, so --overwrite needs room for both). Free space or choose another "
        "--output, then rerun."
    )


def format_summary(summary):
    """The one-screen summary printed at the end of a run."""
    if summary.dry_run:
        return f"\nNothing exported (--dry_run): {summary.message}\n  output           {summary.output}"
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(summary.errors_by_reason.items())) or "none"
    read = summary.records_read if summary.records_read is not None else "unknown (no committed counters)"
    pattern = output_lib.join(summary.output, "part-*.parquet")
    lines = [
        "",
        "Export finished" if summary.exit_code == 0 else f"Export finished with problems: {summary.message}",
        f"  documents read   {read}",
        f"  rows written     {summary.rows_written}",
        f"  dead letters     {summary.dead_letters} ({reasons})",
        f"  truncated        {summary.truncated} documents longer than the model input",
        *(
            [
                f"  reused           {summary.rows_reused} rows unchanged since {summary.reuse}; "
                f"{summary.rows_written - summary.rows_reused} embedded; "
                f"{summary.earlier_rows_dropped} earlier rows dropped (id gone)"
            ]
            if summary.reuse
            else []
        ),
        *(
            [
                f"  resumed          run {summary.resumed_run}: kept {summary.rows_kept} rows it had "
                f"finished; embedded the other {summary.rows_written - summary.rows_kept}"
            ]
            if summary.resumed_run
            else []
        ),
        f"  seconds          {summary.seconds:.1f} ({summary.docs_per_second:.0f} docs/s)",
        f"  output           {summary.output}",
        "  read it with     "
        f'python -c "import duckdb; print(duckdb.sql(\\"SELECT * FROM \'{pattern}\' LIMIT 5\\"))"',
        f"               or python -c \"import pandas as pd; print(pd.read_parquet('{summary.output}', "
        f"ignore_prefixes=['_', '.', 'errors']).head())\"",
    ]
    if logging.getLogger().isEnabledFor(logging.DEBUG):
        lines.append(f"  oov tokens       {summary.oov_tokens}")
    return "\n".join(lines)
