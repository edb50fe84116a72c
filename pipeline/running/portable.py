"""Portable runners (PortableRunner, Flink, Spark): endpoint probe, worker watchdog, progress."""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator

import apache_beam as beam
import grpc
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions, PortableOptions, StandardOptions
from apache_beam.runners.runner import PipelineResult, PipelineState

from pipeline.errors import ExportConfigError
from pipeline.running.progress import duration_text

_LOGGER = logging.getLogger(__name__)

# Runners that run the pipeline in this process's Beam (the launcher's progress files work).
LOCAL_RUNNERS = ("", "directrunner", "direct")
DATAFLOW_RUNNERS = ("dataflowrunner", "dataflow")
# Where, in a run's staging directory, a worker that ran the job's first step leaves its mark.
WORKERS_DIR = "_workers"
# Seconds between the launcher's looks at the job's state and at WORKERS_DIR.
POLL_SECONDS = 1.0
# Environments whose workers the job service starts itself, with nothing for a user to fix.
_SELF_STARTED_ENVIRONMENTS = ("LOOPBACK",)
# Error text of a job that never got a worker, or whose workers cannot import this package.
_START_WORKER_MARKS = ("start_worker", "Error starting worker", "StartWorker")
_PACKAGE_MISSING_MARKS = ("No module named 'pipeline'", "No module named 'models'")
DOCS = "docs/portable_runners.md"


class WorkersUnavailableError(ExportConfigError):
    """The job got no worker that could run this package's code; nothing was committed."""


def is_portable(options: PipelineOptions) -> bool:
    """Whether --runner sends the job to a Beam job service (PortableRunner, FlinkRunner, SparkRunner, ...).

    Everything but the local runner and Dataflow: their workers run elsewhere,
    cannot write the launcher's progress files and may report only attempted counters.
    """
    runner = str(options.view_as(StandardOptions).runner or "").lower()
    return runner not in LOCAL_RUNNERS + DATAFLOW_RUNNERS


def check_job_endpoint(options: PipelineOptions) -> None:
    """Refuses a --job_endpoint where no job service answers within Beam's --job_server_timeout.

    Beam's own wait for a missing job service is not bounded by that flag (it
    retries for minutes without a word), so the launcher asks first.

    Raises:
        ExportConfigError: naming the endpoint and what to start there.
    """
    portable = options.view_as(PortableOptions)
    endpoint = portable.job_endpoint
    # FlinkRunner and SparkRunner start their own job server when none is given.
    if not endpoint or endpoint in ("embed", "docker"):
        return
    timeout = portable.job_server_timeout
    channel = grpc.insecure_channel(endpoint)
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout)
    except grpc.FutureTimeoutError:
        raise ExportConfigError(
            f"No Beam job service answered at --job_endpoint {endpoint} within {timeout} s "
            "(--job_server_timeout). Check that HOST:PORT is right and that the job server runs "
            "there: the Flink or Spark job server (its --job-port), or for a test on this machine "
            "`python -m apache_beam.runners.portability.local_job_service_main --port PORT`. "
            f"See {DOCS}."
        ) from None
    finally:
        channel.close()


class AnnounceWorkerFn(beam.DoFn):
    """Leaves a file named after the worker in `directory`: proof that a worker runs our code.

    The launcher cannot see the workers of a portable runner; a file next to the
    run's staged shards (which workers must be able to write anyway) is what it
    can see on any runner and filesystem.
    """

    def __init__(self, directory: str):
        self._directory = directory

    def process(self, element: None) -> Iterator[None]:
        name = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        with FileSystems.create(FileSystems.join(self._directory, name)) as handle:
            # Not empty: Beam's S3 writer cannot create an empty object (a multipart upload of no part).
            handle.write(name.encode("utf-8"))
        yield from ()


class AnnounceWorker(beam.PTransform):
    """One element through `AnnounceWorkerFn`: a root of its own, so it runs while nothing else has."""

    def __init__(self, directory: str):
        super().__init__()
        self._directory = directory

    def expand(self, pipeline: beam.Pipeline) -> beam.PCollection[None]:
        return (
            pipeline
            | "OneElement" >> beam.Create([None])
            | "WriteWorkerMark" >> beam.ParDo(AnnounceWorkerFn(self._directory))
        )


def workers_announced(directory: str) -> bool:
    """Whether any worker has left its mark in `directory` (see `AnnounceWorkerFn`)."""
    try:
        matches = FileSystems.match([FileSystems.join(directory, "*")])[0].metadata_list
    except Exception:  # Nothing there yet: object stores and local paths say so differently.
        return False
    return bool(matches)


def what_to_check(options: PipelineOptions) -> str:
    """The causes to look at when a portable job gets no worker, for its --environment_type."""
    portable = options.view_as(PortableOptions)
    kind = (portable.environment_type or "DOCKER").upper()
    config = portable.environment_config or ""
    if kind == "EXTERNAL":
        return (
            f"that a worker pool runs at --environment_config {config or '(not set)'} as the workers "
            "see that address (python -m apache_beam.runners.worker.worker_pool_main --service_port "
            "PORT), and that the `python` first on the PATH of the shell that started the pool can "
            "import apache_beam and this package (`python -c 'import apache_beam, pipeline.run'`; "
            "the pool's own log shows a ModuleNotFoundError otherwise)"
        )
    if kind == "PROCESS":
        return (
            f"that the command in --environment_config {config or '(not set)'} exists on every worker "
            "machine and starts an SDK harness whose python has apache_beam and this package"
        )
    if kind in _SELF_STARTED_ENVIRONMENTS:
        return "the job service's log: it starts LOOPBACK workers itself"
    image = config or "(--sdk_container_image or Beam's default image)"
    return (
        f"that every worker machine can pull and start the container {image} and that it holds "
        "this package (build it from the project's Dockerfile; Beam's default image lacks it)"
    )


def explain_failure(error: BaseException, options: PipelineOptions) -> WorkersUnavailableError | None:
    """A `WorkersUnavailableError` for a job that failed because it got no usable worker, else None."""
    text = str(error)
    if any(mark in text for mark in _PACKAGE_MISSING_MARKS):
        return WorkersUnavailableError(
            "The job's workers cannot import this package (ModuleNotFoundError: "
            f"{next(m for m in _PACKAGE_MISSING_MARKS if m in text)}); nothing was committed. "
            f"Check {what_to_check(options)}. Install it on the workers with --setup_file ./setup.py, "
            f"or use the container built from the project's Dockerfile; see {DOCS}."
        )
    if any(mark in text for mark in _START_WORKER_MARKS):
        last = [line.strip() for line in text.splitlines() if line.strip()]
        detail = next((line for line in reversed(last) if "details" in line), last[-1] if last else "")
        return WorkersUnavailableError(
            f"The job service could not start a worker ({detail}); nothing was committed. "
            f"Check {what_to_check(options)}. See {DOCS}."
        )
    return None


def wait_for_job(
    result: PipelineResult,
    workers_dir: str,
    options: PipelineOptions,
    worker_start_timeout: float,
    interval: float,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Waits for a portable job: cancels it if no worker starts in time, logs its state meanwhile.

    Its workers run elsewhere and the job service reports counters only once the
    job has ended, so the progress lines give the job's state and elapsed time,
    never counts or an ETA that would be made up.

    Raises:
        WorkersUnavailableError: no worker started within `worker_start_timeout`
            seconds (0: no limit), or the job failed for want of a usable worker.
        KeyboardInterrupt: after cancelling the job, so it does not run on unwatched.
    """
    started = clock()
    connected = False
    last_line = started
    _LOGGER.info(
        "progress: live counts are not available on this runner (its workers run elsewhere and the "
        "job service reports counters when the job ends); the summary has the exact counts."
    )
    try:
        while not PipelineState.is_terminal(result.state):
            now = clock()
            if not connected and workers_announced(workers_dir):
                connected = True
                _LOGGER.info("progress: a worker started running the job after %.0f s.", now - started)
            if not connected and worker_start_timeout and now - started > worker_start_timeout:
                _cancel(result)
                raise WorkersUnavailableError(
                    f"No worker started running the job within {worker_start_timeout:g} s "
                    "(--worker_start_timeout); the job was cancelled and nothing was committed. "
                    f"Check {what_to_check(options)}. See {DOCS}."
                )
            if now - last_line >= interval:
                last_line = now
                waiting = "" if connected else ", waiting for a worker to start"
                _LOGGER.info(
                    "progress: job %s for %s%s (counts come with the summary).",
                    result.state,
                    duration_text(now - started),
                    waiting,
                )
            sleep(POLL_SECONDS)
    except KeyboardInterrupt:
        _cancel(result)
        raise
    try:
        result.wait_until_finish()
    except Exception as error:
        explained = explain_failure(error, options)
        if explained is None:
            raise
        raise explained from error


def _cancel(result: PipelineResult) -> None:
    try:
        result.cancel()
    except Exception as error:  # The job may have ended meanwhile; the launcher is leaving anyway.
        _LOGGER.warning("Could not cancel the job: %s", error)
