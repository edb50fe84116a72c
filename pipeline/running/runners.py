"""Which runner runs an export, and how a local run uses the machine: processes, threads, ranges."""

import argparse
import contextlib
import copy
import logging
import os
import re
import sys
from collections.abc import Iterator, Sequence

from apache_beam.options.pipeline_options import (
    AzureOptions,
    DebugOptions,
    DirectOptions,
    FlinkRunnerOptions,
    GoogleCloudOptions,
    HadoopFileSystemOptions,
    PipelineOptions,
    S3Options,
    SetupOptions,
    StandardOptions,
    TestOptions,
    WorkerOptions,
)
from apache_beam.runners.runner import PipelineRunner

from pipeline.errors import ExportConfigError
from pipeline.planning.model_source import is_default_bundle
from pipeline.planning.options import ExportOptions
from pipeline.planning.plan import wants_no_tokenizer
from pipeline.planning.stores import check_gcs_bucket_name
from pipeline.reading.ranges import DEFAULT_SPLIT_BYTES
from pipeline.running import local_workers, portable
from pipeline.uris import is_local

_LOGGER = logging.getLogger(__name__)

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


def local_runner(options: PipelineOptions) -> PipelineRunner | None:
    """The runner to use: Beam's FnApiRunner when the DirectRunner is meant.

    For a batch pipeline the DirectRunner first tries the Prism runner, which it
    downloads from GitHub, and then falls back to the FnApiRunner.  Going
    straight to the FnApiRunner keeps local runs offline and makes
    `--direct_running_mode` / `--direct_num_workers` always apply.  Any other
    --runner (DataflowRunner, ...) is used as given.
    """
    runner = options.view_as(StandardOptions).runner
    if str(runner or "").lower() in portable.LOCAL_RUNNERS:  # Spelled as Beam takes it: in any case.
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner

        return FnApiRunner()
    return None


def is_dataflow(options: PipelineOptions) -> bool:
    """Whether --runner names Google Cloud Dataflow."""
    return str(options.view_as(StandardOptions).runner or "").lower() in ("dataflowrunner", "dataflow")


def is_dry_run(options: PipelineOptions) -> bool:
    """Whether Beam's test option `--dry_run` asks to build the job without running it.

    Beam declares the flag without a type and tests it for truth, so any value
    (even `--dry_run=False`) makes the DataflowRunner stop before submitting;
    this follows the same rule.
    """
    return bool(options.view_as(TestOptions).dry_run)


def check_worker_paths(export_options: ExportOptions) -> None:
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
        # Read by the workers too: each copies the unchanged rows of the earlier export's shards.
        "reuse": export_options.reuse,
    }
    local = [f"--{name} {value!r}" for name, value in paths.items() if value and is_local(value)]
    if local:
        raise ExportConfigError(
            f"Dataflow workers cannot read files on this machine, but {', '.join(local)} "
            "is local. Copy it to Cloud Storage (gcloud storage cp -r PATH gs://BUCKET/...) "
            "and pass the gs:// URI; only the bundled default --model may stay local."
        )


def check_dataflow_options(options: PipelineOptions) -> None:
    """Refuses a Dataflow launch that Beam would turn into a traceback, or into minutes of retries.

    Beam raises a bare ValueError for a missing --project or --region; without a
    valid gs:// --temp_location or --staging_location it tries to create a
    default bucket over the network first (even under --dry_run); and workers,
    which install only this package's requirements, have no boto3 for s3://.

    Raises:
        ExportConfigError: naming the flag and a value to pass.
    """
    cloud = options.view_as(GoogleCloudOptions)
    if not cloud.project:
        raise ExportConfigError(
            "--runner DataflowRunner needs --project, the Google Cloud project that runs the job "
            "(e.g. --project my-project)."
        )
    if not cloud.region:
        raise ExportConfigError(
            "--runner DataflowRunner needs --region, where the job's workers run (e.g. --region us-central1)."
        )
    locations = {"temp_location": cloud.temp_location, "staging_location": cloud.staging_location}
    if not any(locations.values()):
        raise ExportConfigError(
            "--runner DataflowRunner needs --temp_location gs://BUCKET/tmp, a Cloud Storage directory "
            "for the job's temporary and staged files (without it Beam tries to create a bucket)."
        )
    for flag, uri in locations.items():
        if uri is None:
            continue
        if not uri.startswith("gs://") or "/" not in uri[len("gs://") :]:
            raise ExportConfigError(
                f"--{flag} {uri!r} must be a Cloud Storage directory, gs://BUCKET/PATH (e.g. "
                f"gs://my-bucket/{'tmp' if flag == 'temp_location' else 'staging'}): Dataflow keeps "
                "the job's files there."
            )
        check_gcs_bucket_name(flag, uri)
    export_options = options.view_as(ExportOptions)
    on_s3 = [
        f"--{name} {value!r}"
        for name, value in (
            ("model", export_options.model),
            ("tokenizer", export_options.tokenizer),
            ("input", export_options.input),
            ("output", export_options.output),
            ("reuse", export_options.reuse),
        )
        if value and value.startswith("s3://")
    ]
    if on_s3 and not _workers_get_boto3(options):
        raise ExportConfigError(
            f"{', '.join(on_s3)} {'is' if len(on_s3) == 1 else 'are'} on S3, but Dataflow workers "
            "install only this package's requirements, which lack boto3 (Beam's S3 filesystem). "
            "Pass --requirements_file FILE whose lines include boto3 (or apache-beam[aws]), or an "
            "--sdk_container_image built with boto3; or copy the data to Cloud Storage (docs/dataflow.md)."
        )


# A clone's root, whose setup.py is the one to stage (an installed package has none).
_REPOSITORY = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The files Beam's stager accepts as --setup_file (it builds the package with them).
_SETUP_FILE_NAMES = ("setup.py", "pyproject.toml")


def check_staged_files(options: PipelineOptions) -> None:
    """Refuses a --setup_file, --requirements_file or local --extra_package that Beam's stager would refuse
    in a traceback.

    The files are staged for the workers when the job is submitted (Dataflow, a
    portable runner), after the model has loaded: a relative `./setup.py` from
    another directory ended the launch in a RuntimeError traceback, `--dry_run` included.

    A valid --setup_file is made absolute in `options`.

    Raises:
        ExportConfigError: naming the flag, the path it resolves to, and this project's setup.py.
    """
    setup = options.view_as(SetupOptions)
    ours = os.path.join(_REPOSITORY, "setup.py")
    hint = f" This project's is {ours!r}." if os.path.isfile(ours) else ""
    named = [("setup_file", setup.setup_file), ("requirements_file", setup.requirements_file)]
    # An extra package may also be a gs:// (or other remote) path, which Beam downloads.
    named += [("extra_package", path) for path in setup.extra_packages or [] if is_local(path)]
    for flag, path in named:
        if path is None or os.path.isfile(path):
            continue
        what = "is a directory" if os.path.isdir(path) else "does not exist"
        raise ExportConfigError(
            f"--{flag} {path!r} {what} (relative paths start from the current directory, "
            f"{os.getcwd()!r}); pass the path of the file.{hint if flag == 'setup_file' else ''}"
        )
    if setup.setup_file is not None and os.path.basename(setup.setup_file) not in _SETUP_FILE_NAMES:
        raise ExportConfigError(
            f"--setup_file {setup.setup_file!r} must be a file named setup.py or pyproject.toml, "
            f"which Beam builds the workers' package with.{hint}"
        )
    if setup.setup_file is not None:
        # Beam's stager changes into the file's directory to build the package: for a bare
        # `setup.py` that is os.chdir(""), a FileNotFoundError traceback at submission.
        setup.setup_file = os.path.abspath(setup.setup_file)


def _workers_get_boto3(options: PipelineOptions) -> bool:
    """Whether the job installs boto3 on workers: a requirements file naming it, or the user's own image."""
    setup = options.view_as(SetupOptions)
    if options.view_as(WorkerOptions).sdk_container_image:
        # The user's image: docs/dataflow.md says it must be built with the aws extra.
        return True
    if not setup.requirements_file:
        return False
    return any(
        _GIVES_BOTO3.match(line.lower())
        for line in _requirement_lines(setup.requirements_file, setup.requirements_file)
    )


# A requirement that installs boto3: the name boto3 as a whole (not boto3-stubs), or Beam with its
# aws extra; then the end, a space, a version specifier, extras, a marker or a direct URL.
_GIVES_BOTO3 = re.compile(r"(?:boto3|apache[-_.]+beam\s*\[[^]]*\baws\b[^]]*\])(?=$|[\s<>=!~;\[@(])")
# pip's options that name another file: -r/--requirement installs its lines, -c/--constraint only pins.
_FILE_OPTION = re.compile(r"(-r|--requirement|-c|--constraint)(?:\s*=\s*|\s+|(?<=^-[rc]))(\S.*)")
# pip's comments: a '#' at the start of a line or after whitespace (a URL's '#egg=' is not one).
_COMMENT = re.compile(r"(?:^|\s)#.*")


def _requirement_lines(path: str, flag: str, seen: frozenset[str] = frozenset()) -> list[str]:
    """The requirement lines of a pip requirements file, without comments, with those of the
    files it includes (`-r FILE`, `-rFILE`, `--requirement[=]FILE`, relative to it); constraint
    files (`-c`) install nothing and are not read. Lines keep their case (paths do)."""
    try:
        with open(path, encoding="utf-8") as requirements:
            # pip joins a line ending in a backslash with the next one.
            text = re.sub(r"\\\r?\n", "", requirements.read())
    except OSError as error:
        raise ExportConfigError(
            f"--requirements_file {flag!r} cannot be read: {path}: {error.strerror or error}."
        ) from None
    found: list[str] = []
    for raw in text.splitlines():
        line = _COMMENT.sub("", raw).strip()
        option = _FILE_OPTION.fullmatch(line)
        if option is None:
            found.append(line)
            continue
        if option[1] in ("-c", "--constraint"):
            continue
        nested = os.path.join(os.path.dirname(path), option[2].strip())
        if os.path.realpath(nested) not in seen:  # An include loop is read once.
            found += _requirement_lines(nested, flag, seen | {os.path.realpath(path)})
    return found


def worker_tf_threads(options: PipelineOptions, requested: int) -> int:
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


# Beam's --direct_num_workers: more would start as many processes, each loading the model.
MAX_DIRECT_WORKERS = 1024


# The runners an export is built and tested for, by Beam's lower-case names without "runner".
SUPPORTED_RUNNERS = ("direct", "dataflow", "portable", "flink", "spark")


def check_runner(options: PipelineOptions) -> None:
    """Refuses a --runner other than those an export supports, before anything is written.

    Beam itself finds an unknown name only when the pipeline is built, after the
    model loaded and the staging area was made, and with a traceback; Beam's other
    runners (Prism, which downloads itself; the bundle-based direct runner;
    the interactive runner) either cannot run offline or cannot run this graph.

    Raises:
        ExportConfigError: naming the runners to use.
    """
    runner = options.view_as(StandardOptions).runner
    if runner is None:
        return
    name = str(runner).lower()
    name = name[: -len("runner")] if name.endswith("runner") else name
    if name not in SUPPORTED_RUNNERS:
        raise ExportConfigError(
            f"--runner {runner!r} is not a runner this export runs on: pass DirectRunner (the default, "
            "this machine), DataflowRunner (docs/dataflow.md), or PortableRunner, FlinkRunner or "
            "SparkRunner (docs/portable_runners.md)."
        )


def check_direct_workers(options: PipelineOptions) -> None:
    """Refuses a --direct_num_workers the local runner cannot use (negative: an IndexError deep in Beam).

    Raises:
        ExportConfigError: naming the range.
    """
    workers = options.view_as(DirectOptions).direct_num_workers
    if not isinstance(workers, int) or not 0 <= workers <= MAX_DIRECT_WORKERS:
        raise ExportConfigError(
            f"--direct_num_workers must be an integer from 0 to {MAX_DIRECT_WORKERS:,} (local worker "
            f"processes or threads, 0 = one per core), received {workers!r}."
        )


def use_local_cores(options: PipelineOptions, total_bytes: int, argv: Sequence[str] | None = None) -> None:
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
def worker_package_path(options: PipelineOptions) -> Iterator[None]:
    """While it is active, local worker processes import this package from where the launcher did.

    They are started with this process's environment; PYTHONPATH is put back
    afterwards so that an export run in-process leaves its caller's environment alone.
    They also ignore a terminal's Ctrl-C, which only the launcher handles (pipeline.running.local_workers),
    stopping them first.
    """
    if (
        local_runner(options) is None
        or options.view_as(DirectOptions).direct_running_mode != "multi_processing"
    ):
        yield
        return
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    before = os.environ.get("PYTHONPATH")
    paths = (before or "").split(os.pathsep)
    if root not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [root, *paths]))
    try:
        with (
            local_workers.ignoring_ctrl_c(filesystem_options(options)),
            local_workers.late_workers_stopped(),
            local_workers.failed_workers_answered(),
            local_workers.interrupt_stops_workers(),
        ):
            yield
    finally:
        if before is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = before


# The options Beam's filesystems take (an S3 endpoint and keys, a Google service account to impersonate,
# an Azure connection string, an HDFS host), which local worker processes need as the launcher does.
_FILESYSTEM_OPTIONS = (S3Options, GoogleCloudOptions, AzureOptions, HadoopFileSystemOptions)
# Dataflow's service options: `enable_google_cloud_profiler` makes Beam's worker main start a profiler
# for a Dataflow job id that a local worker has not (a KeyError as it starts).
_NOT_FOR_WORKERS = frozenset({"dataflow_service_options"})


def filesystem_options(options: PipelineOptions) -> dict[str, object]:
    """The filesystem options of `options` that were given ({name: value}), for local worker processes.

    Only these: the workers' other behaviour (logging, profiling, experiments) stays as it was.
    """
    names: set[str] = set()
    for view in _FILESYSTEM_OPTIONS:
        parser = argparse.ArgumentParser()
        view._add_argparse_args(parser)  # How Beam lists a view's options.
        names.update(action.dest for action in parser._actions)
    given = options.get_all_options(drop_default=True)
    return {
        name: value
        for name, value in given.items()
        if name in names and name not in _NOT_FOR_WORKERS and value is not None
    }


def split_bytes_for(options: PipelineOptions, total_bytes: int) -> int:
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


def check_beam_validation(options: PipelineOptions) -> None:
    """Refuses the options Beam's own checks refuse when the pipeline is built, before anything loads.

    `beam.Pipeline(...)` runs Beam's `PipelineOptionsValidator` (an invalid --project
    or --job_name on Dataflow, an unknown --type_check_additional feature, two
    exclusive flags) and parses --resource_hints, raising a ValueError: a traceback
    after the model load, with the output's staging directory made.

    Raises:
        ExportConfigError: Beam's own words, on one line.
    """
    from apache_beam.options.pipeline_options_validator import PipelineOptionsValidator
    from apache_beam.runners.runner import create_runner
    from apache_beam.transforms.resources import resource_hints_from_options

    runner = local_runner(options) or create_runner(str(options.view_as(StandardOptions).runner))
    # On a copy, as Beam's Pipeline does: the validator fills in defaults as it goes.
    checked = copy.deepcopy(options)
    errors = PipelineOptionsValidator(checked, runner).validate()
    try:
        resource_hints_from_options(checked)
    except ValueError as error:
        errors.append(f"--resource_hints: {error}")
    if errors:
        said = " ".join(_sentence(" ".join(str(error).split())) for error in errors)
        raise ExportConfigError(
            f"Beam refuses the pipeline options: {said} Correct or leave out the flags named."
        )


def _sentence(text: str) -> str:
    return text if text.endswith((".", "?", "!")) else text + "."
