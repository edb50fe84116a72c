"""Portable runners (PortableRunner, Flink, Spark): endpoint probe, worker watchdog, progress."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import apache_beam as beam
import grpc
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions, PortableOptions, StandardOptions
from apache_beam.options.pipeline_options_validator import PipelineOptionsValidator
from apache_beam.portability.api import beam_job_api_pb2, beam_job_api_pb2_grpc
from apache_beam.runners.portability import portable_runner
from apache_beam.runners.runner import PipelineResult, PipelineState, create_runner
from apache_beam.transforms.environments import Environment

from pipeline.errors import ExportConfigError, WorkerDiedError
from pipeline.held_logs import HeldErrorLogs
from pipeline.planning.options import ExportOptions
from pipeline.running import left_running
from pipeline.running.advice import rerun_to_finish
from pipeline.running.failures import out_of_memory, worker_refusal
from pipeline.running.progress import duration_text
from pipeline.uris import is_local

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
# Error text of a job whose job service has no way to start workers of its environment type.
_ENVIRONMENT_UNKNOWN_MARK = "KeyError: 'beam:env:"
# Error text of a job whose running workers went away (killed, OOM-killed, their machine lost).
_WORKER_GONE_MARKS = ("Channel closed prematurely", "Socket closed", "StatusCode.UNAVAILABLE")
# The longest one call to the job service may take: a signal is acted on within it.
CALL_SECONDS = 5.0
# Flags naming local files that the workers open themselves.
_PATH_FLAGS = ("input", "output", "model", "tokenizer", "reuse")
DOCS = "docs/portable_runners.md"


class WorkersUnavailableError(ExportConfigError):
    """The job got no worker that could run this package's code; nothing was committed."""


class JobNotSubmittedError(WorkersUnavailableError):
    """The runner could not submit the job (a job server it cannot start, ...); nothing of it ran."""


class JobServiceLostError(WorkerDiedError):
    """The job service stopped answering while the job ran; nothing was committed, a rerun resumes."""


def is_portable(options: PipelineOptions) -> bool:
    """Whether --runner sends the job to a Beam job service (PortableRunner, FlinkRunner, SparkRunner, ...).

    Everything but the local runner and Dataflow: their workers run elsewhere,
    cannot write the launcher's progress files and may report only attempted counters.
    """
    runner = str(options.view_as(StandardOptions).runner or "").lower()
    return runner not in LOCAL_RUNNERS + DATAFLOW_RUNNERS


def check_portable_flags(options: PipelineOptions) -> None:
    """Refuses, at launch, portable-runner flags that Beam would refuse only once the run had begun.

    Beam checks the environment flags, and the need for a job endpoint, inside
    `Pipeline.run()`: after the run's staging directory exists, and with a traceback.
    A local path that is relative would be resolved by each worker in its own
    working directory, not the launcher's: rows written elsewhere, a corpus not found.

    Raises:
        ExportConfigError: naming the flag and how to fix it.
    """
    portable = options.view_as(PortableOptions)
    timeout = portable.job_server_timeout
    if not isinstance(timeout, int | float) or not math.isfinite(timeout) or timeout <= 0:
        raise ExportConfigError(
            f"--job_server_timeout must be a number of seconds above 0 (how long to wait for the job "
            f"service to answer), received {timeout!r}."
        )
    runner_name = str(options.view_as(StandardOptions).runner)
    runner = create_runner(runner_name)
    if type(runner) is portable_runner.PortableRunner and not portable.job_endpoint:
        raise ExportConfigError(
            f"--runner {runner_name} needs --job_endpoint HOST:PORT, the job server's address (Flink's or "
            "Spark's job server, or Beam's local job service); or pass --runner FlinkRunner or "
            f"SparkRunner to start one. See {DOCS}."
        )
    errors = PipelineOptionsValidator(options, runner).validate()
    if not errors:
        try:
            Environment.from_options(portable)
        except (ValueError, KeyError, TypeError) as error:
            errors.append(str(error).strip("'\""))
    if errors:
        errors = [error.strip() if error.strip().endswith(".") else error.strip() + "." for error in errors]
        raise ExportConfigError(
            f"--environment_type {portable.environment_type or '(not set: DOCKER)'} with "
            f"--environment_config {portable.environment_config or '(not set)'} cannot work: Beam says "
            f"{' '.join(errors)} The types are DOCKER, EXTERNAL, PROCESS and LOOPBACK "
            "(upper case); EXTERNAL needs --environment_config HOST:PORT of a worker pool, PROCESS a "
            f"JSON command, LOOPBACK none. See {DOCS}."
        )
    export_options = options.view_as(ExportOptions)
    for flag in _PATH_FLAGS:
        path = getattr(export_options, flag, None)
        if not path or not is_local(path):
            continue
        bare = path.removeprefix("file://")
        if not os.path.isabs(bare):
            raise ExportConfigError(
                f"--{flag} {path!r} is a relative path: the workers of a portable runner resolve it in "
                "their own working directory, not this one, so they would read or write elsewhere. Pass "
                f"an absolute path on a filesystem every worker mounts at the same place (here that is "
                f"{os.path.abspath(bare)!r}), or an s3:// or gs:// URI. See {DOCS}."
            )


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
    start_one = (
        "the Flink or Spark job server (its --job-port), or for a test on this machine "
        "`python -m apache_beam.runners.portability.local_job_service_main --port PORT`"
    )
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout)
        # The call Beam makes first: any gRPC server (a worker pool's port) is ready, only a job
        # service knows it. Beam would fail once the model is loaded and the run's staging made.
        beam_job_api_pb2_grpc.JobServiceStub(channel).DescribePipelineOptions(
            beam_job_api_pb2.DescribePipelineOptionsRequest(), timeout=timeout
        )
    except grpc.FutureTimeoutError:
        raise ExportConfigError(
            f"No Beam job service answered at --job_endpoint {endpoint} within {timeout} s "
            f"(--job_server_timeout). Check that HOST:PORT is right and that the job server runs "
            f"there: {start_one}. See {DOCS}."
        ) from None
    except grpc.RpcError as error:
        code = error.code() if isinstance(error, grpc.Call) else None
        if code != grpc.StatusCode.UNIMPLEMENTED:
            raise ExportConfigError(
                f"The Beam job service at --job_endpoint {endpoint} did not answer its first call "
                f"({code}); nothing was written. Check the job server there ({start_one}). See {DOCS}."
            ) from None
        raise ExportConfigError(
            f"--job_endpoint {endpoint} answers gRPC but is no Beam job service (it does not know the "
            "Job API; a worker pool's --service_port, or another service?). Pass the job server's "
            f"port: {start_one}. See {DOCS}."
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


def explain_failure(error: BaseException, options: PipelineOptions) -> Exception | None:
    """The one-line error a failed portable job becomes, else None.

    A `WorkersUnavailableError` for a job that got no usable worker (nothing of it
    ran), a worker's own `ExportConfigError`, or a `WorkerDiedError` for workers
    that went away while the job ran (their durable rows are kept for a rerun).
    """
    text = str(error)
    refusal = worker_refusal(error)
    if refusal is not None:  # A worker refused what it found (a file changed since launch, ...).
        # Beam's relayed text ends with the step that raised it, which the message does not need.
        return ExportConfigError(re.sub(r"\s*\[while running '.*'\]$", "", refusal))
    if any(mark in text for mark in _PACKAGE_MISSING_MARKS):
        return WorkersUnavailableError(
            "The job's workers cannot import this package (ModuleNotFoundError: "
            f"{next(m for m in _PACKAGE_MISSING_MARKS if m in text)}); nothing was committed. "
            f"Check {what_to_check(options)}. Install it on the workers with --setup_file ./setup.py, "
            f"or use the container built from the project's Dockerfile; see {DOCS}."
        )
    if _ENVIRONMENT_UNKNOWN_MARK in text:
        kind = options.view_as(PortableOptions).environment_type
        urn = text.split(_ENVIRONMENT_UNKNOWN_MARK, 1)[1].split("'", 1)[0]
        return WorkersUnavailableError(
            f"The job service cannot start workers of --environment_type {kind} (it knows no "
            f"beam:env:{urn}); nothing was committed. Beam's local job service starts EXTERNAL "
            "(a worker pool), LOOPBACK and DOCKER workers; a Flink or Spark job server also PROCESS. "
            f"See {DOCS}."
        )
    if any(mark in text for mark in _START_WORKER_MARKS):
        last = [line.strip() for line in text.splitlines() if line.strip()]
        detail = next((line for line in reversed(last) if "details" in line), last[-1] if last else "")
        return WorkersUnavailableError(
            f"The job service could not start a worker ({detail}); nothing was committed. "
            f"Check {what_to_check(options)}. See {DOCS}."
        )
    short = out_of_memory(error)
    if short is not None:  # A pool's SDK worker under a memory or address-space limit.
        return WorkerDiedError(
            f"the job's workers ran out of memory ({short}); nothing was committed. Give the worker "
            "pool or the TaskManager more memory, or run fewer workers per machine, then "
            f"{rerun_to_finish(_resume(options))} (a smaller --batch_size needs less memory too, but "
            "--batch_size is part of what a rerun must match: with another, the rerun starts from zero)."
        )
    gone = next((mark for mark in _WORKER_GONE_MARKS if mark in text), None)
    if gone is not None:
        return WorkerDiedError(
            f"the job's workers went away while it ran ({gone}: killed, out of memory, or their machine "
            "lost); nothing was committed. Check the worker pool's or the TaskManager's log and memory, "
            f"then {rerun_to_finish(_resume(options))}."
        )
    return None


def _resume(options: PipelineOptions) -> str:
    return str(options.view_as(ExportOptions).resume)


def _job_service_lost(options: PipelineOptions, why: str) -> JobServiceLostError:
    endpoint = options.view_as(PortableOptions).job_endpoint or "(started by the runner)"
    return JobServiceLostError(
        f"the job service at --job_endpoint {endpoint} {why} while the job ran; nothing was committed. "
        "The job may still run there (cancel it with the cluster's own tools). Check the job server, "
        f"then {rerun_to_finish(_resume(options))}."
    )


def _not_submitted(options: PipelineOptions, why: str) -> str:
    portable = options.view_as(PortableOptions)
    return (
        f"the job service at --job_endpoint {portable.job_endpoint or '(started by the runner)'} {why} "
        f"(no answer within {portable.job_server_timeout:g} s, --job_server_timeout); no job was "
        f"started and nothing was committed. Check the job server, then rerun the same command. See {DOCS}."
    )


class _JobWatch:
    """Asks the job service about one job, each call bounded, so a silent service cannot hang us.

    Beam's `PipelineResult.state`, `cancel()` and `metrics()` make their calls
    without a deadline, on the main thread: a job service that stops answering
    would block the launcher, signals included, for as long as it stays silent.
    """

    def __init__(self, result: PipelineResult, options: PipelineOptions, clock: Callable[[], float]):
        self._result = result
        self._options = options
        self._clock = clock
        # The stub Beam's portable result talks through (None: some other result, asked Beam's way).
        self._stub = getattr(result, "_job_service", None)
        self._job_id = getattr(result, "_job_id", None)
        self._limit = float(options.view_as(PortableOptions).job_server_timeout)
        self._silent_since: float | None = None

    def call_deadline(self) -> float:
        # Half the limit at most: a silent service is asked at least twice, and said so, before the end.
        return min(CALL_SECONDS, self._limit / 2)

    def state(self) -> str | None:
        """The job's state; None while the job service has been silent for less than --job_server_timeout.

        Raises:
            JobServiceLostError: it has not answered for longer, or refused the call.
        """
        if self._stub is None:
            return self._result.state
        request = beam_job_api_pb2.GetJobStateRequest(job_id=self._job_id)
        asked = self._clock()
        try:
            response = self._stub.GetState(request, timeout=self.call_deadline())
        except grpc.RpcError as error:
            code = error.code() if isinstance(error, grpc.Call) else None
            if code not in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE):
                raise _job_service_lost(self._options, f"failed ({code}: {error.details()})") from None
            self._silent_since = self._silent_since if self._silent_since is not None else asked
            if self._clock() - self._silent_since > self._limit:
                why = "stopped answering" if code == grpc.StatusCode.DEADLINE_EXCEEDED else "went away"
                raise _job_service_lost(
                    self._options, f"{why} (for over {self._limit:g} s, --job_server_timeout)"
                ) from None
            return None
        self._silent_since = None
        return portable_runner.PipelineResult.runner_api_state_to_pipeline_state(response.state)

    def silent_for(self) -> float:
        return 0.0 if self._silent_since is None else self._clock() - self._silent_since

    def cancel(self) -> None:
        """Asks the job service to cancel the job, waiting for its answer no longer than one call; where
        that fails, notes (`left_running`) that the job may run on."""
        endpoint = self._options.view_as(PortableOptions).job_endpoint or "the runner's job service"

        def note(why: str) -> str:
            return (
                f"the job {self._job_id} may still be running at {endpoint} ({why}); cancel it with the "
                "cluster's own tools before rerunning."
            )

        # Noted before the call: a second stop signal during it leaves it said.
        place = left_running.note(note("a second stop signal ended the wait for its cancel"))
        try:
            if self._stub is None:
                self._result.cancel()
            else:
                self._stub.Cancel(
                    beam_job_api_pb2.CancelJobRequest(job_id=self._job_id), timeout=self.call_deadline()
                )
        except Exception as error:  # The job may have ended meanwhile; the launcher is leaving anyway.
            left_running.replace(place, note(f"its cancel failed: {error}"))
            _LOGGER.warning("Could not cancel the job: %s", error)
            return
        left_running.replace(place, None)

    def fetch_metrics(self) -> None:
        """Reads the ended job's counters within one call, for `result.metrics()` to return."""
        if self._stub is None:
            return
        request = beam_job_api_pb2.GetJobMetricsRequest(job_id=self._job_id)
        try:
            response = self._stub.GetJobMetrics(request, timeout=self._limit)
        except grpc.RpcError:
            raise _job_service_lost(self._options, "stopped answering") from None
        # Beam's result caches what its own metrics() would fetch without a deadline.
        self._result._metrics = portable_runner.PortableMetrics(response)  # type: ignore[attr-defined]


class _StreamsWithoutDeadline:
    """The job service's stub, but the job's state and message streams are opened without a deadline.

    Beam opens both with timeout=--job_server_timeout, counted from submission: any
    job running longer (300 s by default) had them end with DEADLINE_EXCEEDED, and its
    end read from them failed a succeeded job as a job service gone. The launcher's own
    calls (`_JobWatch`) keep their deadlines, so a silent service is still noticed.
    """

    def __init__(self, stub: Any):
        self._stub = stub

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stub, name)

    def GetStateStream(self, request: Any, timeout: float | None = None, **kwargs: Any) -> Any:
        return self._stub.GetStateStream(request, **kwargs)

    def GetMessageStream(self, request: Any, timeout: float | None = None, **kwargs: Any) -> Any:
        return self._stub.GetMessageStream(request, **kwargs)


@contextlib.contextmanager
def _job_streams_without_deadline() -> Iterator[None]:
    """While active, Beam's portable runners open a job's streams through `_StreamsWithoutDeadline`."""
    handle_class = portable_runner.JobServiceHandle
    submit_run = handle_class.run

    def run(handle: Any, preparation_id: str) -> Any:
        stub = handle.job_service
        handle.job_service = _StreamsWithoutDeadline(stub)
        try:
            return submit_run(handle, preparation_id)
        finally:
            handle.job_service = stub  # The result asks the job service through the plain stub.

    # setattr: Beam's method is replaced for the duration of the submission only.
    setattr(handle_class, "run", run)  # noqa: B010
    try:
        yield
    finally:
        handle_class.run = submit_run  # type: ignore[method-assign]


def run_job(
    pipeline: beam.Pipeline,
    workers_dir: str,
    options: PipelineOptions,
    worker_start_timeout: float,
    interval: float,
    fresh: bool = True,
) -> PipelineResult:
    """Submits the portable job, waits for it (`wait_for_job`) and returns its result.

    Beam's error logs of a failure told in one line are held back: the job
    service relays each worker's traceback, which would bury that line.

    Raises:
        JobNotSubmittedError: the runner could not submit the job (a job server jar
            it cannot fetch, ...) into a staging run this run made (`fresh`); its
            staging can go. An `ExportConfigError` when the staging holds rows of an
            interrupted run, kept for the next rerun.
        See also `wait_for_job`.
    """
    with HeldErrorLogs("") as held:
        try:
            try:
                with _job_streams_without_deadline():
                    result = pipeline.run()
            except grpc.RpcError as error:
                code = error.code() if isinstance(error, grpc.Call) else None
                # Beam's Run call has no deadline: a call that timed out came before it, and no job runs.
                if code != grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise _job_service_lost(options, "failed to take the job") from error
                raise (JobNotSubmittedError if fresh else ExportConfigError)(
                    _not_submitted(options, "stopped answering as the job was submitted")
                ) from None
            except grpc.FutureTimeoutError:  # Beam's own connect, once the launch check had passed.
                raise (JobNotSubmittedError if fresh else ExportConfigError)(
                    _not_submitted(options, "stopped answering as the job was submitted")
                ) from None
            except (RuntimeError, ValueError, OSError) as error:  # NotImplementedError is a RuntimeError
                first = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
                refused = JobNotSubmittedError if fresh else ExportConfigError
                raise refused(
                    f"The {options.view_as(StandardOptions).runner} could not submit the job: "
                    f"{first or type(error).__name__}. Nothing was committed. See {DOCS}."
                ) from error
            wait_for_job(result, workers_dir, options, worker_start_timeout, interval)
        except (ExportConfigError, WorkerDiedError, KeyboardInterrupt):
            held.drop()
            raise
    return result


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
    never counts or an ETA that would be made up. Every call to the job service
    has a deadline, so a silent one is reported, and a signal acted on, in time.

    Raises:
        WorkersUnavailableError: no worker started within `worker_start_timeout`
            seconds (0: no limit), or the job failed for want of a usable worker.
        JobServiceLostError: the job service stopped answering for longer than
            --job_server_timeout, or went away.
        WorkerDiedError: the job's workers went away while it ran.
        ExportConfigError: a worker refused to run (see `failures.worker_refusal`).
        KeyboardInterrupt: after cancelling the job, so it does not run on unwatched.
    """
    watch = _JobWatch(result, options, clock)
    started = clock()
    connected = False
    last_line = started
    _LOGGER.info(
        "progress: live counts are not available on this runner (its workers run elsewhere and the "
        "job service reports counters when the job ends); the summary has the exact counts."
    )
    try:
        while True:
            state = watch.state()
            if state is not None and PipelineState.is_terminal(state):
                break
            now = clock()
            if not connected and workers_announced(workers_dir):
                connected = True
                _LOGGER.info("progress: a worker started running the job after %.0f s.", now - started)
            if not connected and worker_start_timeout and now - started > worker_start_timeout:
                watch.cancel()
                raise WorkersUnavailableError(
                    f"No worker started running the job within {worker_start_timeout:g} s "
                    "(--worker_start_timeout); the job was cancelled and nothing was committed. "
                    f"Check {what_to_check(options)}. See {DOCS}."
                )
            if now - last_line >= interval:
                last_line = now
                waiting = "" if connected else ", waiting for a worker to start"
                if state is None:
                    _LOGGER.info(
                        "progress: the job service has not answered for %s (job running for %s%s).",
                        duration_text(watch.silent_for()),
                        duration_text(now - started),
                        waiting,
                    )
                else:
                    _LOGGER.info(
                        "progress: job %s for %s%s (counts come with the summary).",
                        state,
                        duration_text(now - started),
                        waiting,
                    )
            sleep(POLL_SECONDS)
    except KeyboardInterrupt:
        watch.cancel()
        raise
    try:
        # The job has ended: its state stream ends at once, unless the service fell silent just now.
        result.wait_until_finish(duration=int(max(watch.call_deadline(), 1) * 1000))
    except grpc.RpcError:
        raise _job_service_lost(options, "went away") from None
    except Exception as error:
        explained = explain_failure(error, options)
        if explained is None:
            raise
        raise explained from error
    if state != PipelineState.DONE:  # Beam's wait gave up on a state stream that fell silent.
        raise _job_service_lost(options, f"stopped answering after the job ended in state {state}")
    watch.fetch_metrics()
