"""Following a Dataflow job from the launcher: its console URL and its counters until it ends."""

import logging
import threading

from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.runner import PipelineResult, PipelineState

from pipeline.running import left_running
from pipeline.running.counters import NAMESPACE, read_counters
from pipeline.running.report import format_counters

_LOGGER = logging.getLogger(__name__)

# How long a stopped launcher waits for the job's cancel: Beam's own call retries for minutes.
CANCEL_TIMEOUT_SECONDS = 30.0


def dataflow_console_url(options: PipelineOptions, job_id: str) -> str:
    """The Cloud Console page of a Dataflow job."""
    from apache_beam.options.pipeline_options import GoogleCloudOptions

    cloud = options.view_as(GoogleCloudOptions)
    return f"https://console.cloud.google.com/dataflow/jobs/{cloud.region}/{job_id}?project={cloud.project}"


def poll_dataflow(result: PipelineResult, options: PipelineOptions, interval: float) -> None:
    """Prints the job's console URL, then its counters every `interval` seconds until it ends.

    Raises:
        KeyboardInterrupt: a stop signal (Ctrl-C, SIGTERM, SIGHUP), after cancelling the job: left
            running it would bill its workers and write into the staging the rerun takes over.
    """
    # DataflowPipelineResult has job_id(); Beam's base PipelineResult does not declare it.
    job_id_of = getattr(result, "job_id", None)
    job_id = job_id_of() if callable(job_id_of) else None
    if job_id:
        _LOGGER.info("Dataflow job %s: %s", job_id, dataflow_console_url(options, job_id))
    try:
        while True:
            result.wait_until_finish(duration=int(max(1, interval) * 1000))
            if PipelineState.is_terminal(result.state):
                return
            try:
                counters = read_counters(result, NAMESPACE).values
            except Exception as error:  # The service may not have counters yet.
                _LOGGER.info("Dataflow job %s: %s (counters not available: %s)", job_id, result.state, error)
                continue
            _LOGGER.info("Dataflow job %s: %s, %s", job_id, result.state, format_counters(counters))
    except KeyboardInterrupt:
        _cancel(result, options, job_id)
        raise


def _cancel(result: PipelineResult, options: PipelineOptions, job_id: str | None) -> None:
    """Cancels the job, best effort, waiting for it at most CANCEL_TIMEOUT_SECONDS; where that fails, or a
    second stop signal ends the wait, notes (`left_running`) that it may run on and how to cancel it."""
    from apache_beam.options.pipeline_options import GoogleCloudOptions

    failed: list[BaseException] = []

    def cancel() -> None:
        try:
            result.cancel()
        except Exception as error:  # No network, no permission: the user cancels it.
            failed.append(error)

    region = options.view_as(GoogleCloudOptions).region

    def note(why: str) -> str:
        return (
            f"the Dataflow job {job_id} may still be running ({why}); cancel it with "
            f"`gcloud dataflow jobs cancel {job_id} --region {region}` before rerunning."
        )

    # Noted before the wait, so that a second stop signal anywhere in it (a KeyboardInterrupt) leaves it
    # said; taken back once the cancel is confirmed.
    place = left_running.note(note("a second stop signal ended the wait for its cancel"))
    # In a thread: Beam retries a cancel that gets no answer for minutes, and a second Ctrl-C must end
    # the wait, not Beam's call.
    canceller = threading.Thread(target=cancel, name="cancel-dataflow-job", daemon=True)
    canceller.start()
    canceller.join(CANCEL_TIMEOUT_SECONDS)
    if failed:
        why = f"its cancel failed: {failed[0]}"
    elif canceller.is_alive():
        why = f"its cancel got no answer in {CANCEL_TIMEOUT_SECONDS:g} s"
    else:
        left_running.replace(place, None)
        return
    left_running.replace(place, note(why))
    _LOGGER.warning("%s", note(why))
