"""Beam's portable Job API with workers in other processes: the path Flink and Spark clusters take.

The test starts Beam's local job service and an EXTERNAL worker pool as
subprocesses (the pool with this environment's python first on PATH, since it
starts each worker as `python -c ...`), runs `python -m pipeline.run --runner
PortableRunner` against them, and checks the output bit for bit against the
in-memory run; then what differs on those runners: a pool whose python cannot
import Beam or this package, endpoints where nothing listens, counters that are
only attempted or missing, a kill and rerun, and s3:// input and output.
"""

import contextlib
import glob
import gzip
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import forkserver
import grpc
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.portability.api import beam_job_api_pb2, beam_job_api_pb2_grpc
from apache_beam.runners.portability import portable_runner
from pipeline_fixtures import (
    REPOSITORY,
    manifest_of,
    pipeline_command,
    read_errors,
    read_rows,
    sample_documents,
    wait_for_staged_shard,
    write_jsonl,
)
from test_object_storage import BUCKET, client, s3_endpoint, s3_flags  # noqa: F401 (s3_endpoint: fixture)

from pipeline.errors import (
    EXIT_ACCOUNTING_UNVERIFIED,
    EXIT_CONFIG_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_RECORDS_LOST,
    EXIT_TERMINATED,
    EXIT_UNEXPECTED,
)
from pipeline.run import main
from pipeline.running.export import run_export
from pipeline.running.report import format_summary
from pipeline.writing import layout as layout_lib
from pipeline.writing import state as state_lib

DOCUMENTS = 600
# Lines every run dead-letters, at known places of the second file.
BAD_LINES = (
    '{"id": "broken", "content": ',
    json.dumps({"content": "a record without an id", "title": "no id"}),
)
PYTHON_BIN = os.path.dirname(sys.executable)
TERMINAL_STATES = (
    beam_job_api_pb2.JobState.DONE,
    beam_job_api_pb2.JobState.FAILED,
    beam_job_api_pb2.JobState.CANCELLED,
    beam_job_api_pb2.JobState.UPDATED,
    beam_job_api_pb2.JobState.DRAINED,
)


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _environment(path_first=PYTHON_BIN):
    """This environment with `path_first` first on PATH: the pool starts workers with that `python`."""
    environment = dict(os.environ, PYTHONPATH=REPOSITORY)
    environment["PATH"] = os.pathsep.join([path_first, environment.get("PATH", "")])
    environment["NO_PROXY"] = ",".join(filter(None, [environment.get("NO_PROXY"), "127.0.0.1", "localhost"]))
    return environment


def _stop(process):
    """Stops `process` and everything it started (its own process group)."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


# A command prefix: should pytest itself be killed (no finalizers then), the services go with it
# (prctl's parent death signal). setpriv, not a preexec_fn: that runs Python in a fork of this
# process, whose gRPC threads (an earlier test's pipeline) can abort the child before its exec.
DIE_WITH_PARENT = ["setpriv", "--pdeathsig", "TERM"] if sys.platform.startswith("linux") else []


def _serve(request, command, port, log_path, environment, cwd, started=None):
    """Starts `command` in its own process group, stopped at the end of the test's scope; waits for `port`.

    `started`: a list that receives the process (for a test that signals it).
    """
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [*DIE_WITH_PARENT, *command],
            cwd=cwd,
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    request.addfinalizer(lambda: _stop(process))
    if started is not None:
        started.append(process)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            with open(log_path, encoding="utf-8", errors="replace") as log:
                raise AssertionError(f"{command} exited: {log.read()[-3000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return f"localhost:{port}"
        time.sleep(0.2)
    raise AssertionError(f"{command} did not listen on {port}")


# What the SDK container's `boot` does for a worker before starting it: fetch the job's
# pipeline options from the provision service and start sdk_worker_main with them (which
# hands them to FileSystems: s3:// needs its --s3_* options on the workers).
BOOT = """\
import argparse, os, sys

import grpc
from google.protobuf import json_format, text_format

from apache_beam.portability.api import beam_provision_api_pb2, beam_provision_api_pb2_grpc, endpoints_pb2

parser = argparse.ArgumentParser()
for name in ("id", "logging_endpoint", "artifact_endpoint", "provision_endpoint", "control_endpoint"):
    parser.add_argument("--" + name)
args = parser.parse_args()
with grpc.insecure_channel(args.provision_endpoint) as channel:
    info = beam_provision_api_pb2_grpc.ProvisionServiceStub(channel).GetProvisionInfo(
        beam_provision_api_pb2.GetProvisionInfoRequest(), metadata=[("worker_id", args.id)]
    ).info
def descriptor(url):
    return text_format.MessageToString(endpoints_pb2.ApiServiceDescriptor(url=url))
os.environ.update(
    PIPELINE_OPTIONS=json_format.MessageToJson(info.pipeline_options),
    CONTROL_API_SERVICE_DESCRIPTOR=descriptor(args.control_endpoint),
    LOGGING_API_SERVICE_DESCRIPTOR=descriptor(args.logging_endpoint),
    WORKER_ID=args.id,
)
os.execv(sys.executable, [sys.executable, "-m", "apache_beam.runners.worker.sdk_worker_main"])
"""


def _worker_pool(request, directory, path_first=PYTHON_BIN, boot=False, started=None):
    """`python -m apache_beam.runners.worker.worker_pool_main`, as the issue's user started it.

    With `boot`, each worker starts as in Beam's SDK container (see BOOT) rather
    than as the bare `python -c "SdkHarness(...)"` of a plain pool.
    """
    port = _free_port()
    command = [sys.executable, "-m", "apache_beam.runners.worker.worker_pool_main", f"--service_port={port}"]
    if boot:
        executable = directory / "boot"
        executable.write_text(f"#!{sys.executable}\n{BOOT}")
        executable.chmod(0o755)
        command.append(f"--container_executable={executable}")
    # Started outside the checkout: its workers import this package as installed.
    log = str(directory / f"pool-{port}.log")
    return _serve(request, command, port, log, _environment(path_first), directory, started)


def _job_service(request, directory, started=None):
    """Beam's local job service (`local_job_service_main`), as docs/portable_runners.md starts it."""
    port = _free_port()
    command = [
        sys.executable,
        "-m",
        "apache_beam.runners.portability.local_job_service_main",
        f"--port={port}",
    ]
    log = str(directory / f"job_service-{port}.log")
    return _serve(request, command, port, log, _environment(), directory, started)


@pytest.fixture(scope="module")
def services(request, tmp_path_factory):
    """Beam's local job service, a plain worker pool and a pool whose workers boot as in the container."""
    directory = tmp_path_factory.mktemp("services")
    job_endpoint = _job_service(request, directory)
    return job_endpoint, _worker_pool(request, directory), _worker_pool(request, directory, boot=True)


def _portable_flags(job_endpoint, pool, *flags):
    return [
        "--runner=PortableRunner",
        f"--job_endpoint={job_endpoint}",
        "--environment_type=EXTERNAL",
        f"--environment_config={pool}",
        *flags,
    ]


def _run_cli(command, timeout=180):
    return forkserver.run(
        command, cwd=REPOSITORY, env=_environment(), capture_output=True, text=True, timeout=timeout
    )


def _rows(output):
    return read_rows(output).sort_by("id")


def _errors(output):
    return read_errors(output).sort_by([("source", "ascending"), ("position", "ascending")])


def _assert_same_output(output, reference):
    rows, expected = _rows(output), _rows(reference)
    assert rows.num_rows == expected.num_rows > 0
    assert rows.schema.equals(expected.schema, check_metadata=True)
    for column in rows.column_names:
        assert rows.column(column).equals(expected.column(column)), column
    assert _errors(output).equals(_errors(reference))


def _corpus(directory, documents=DOCUMENTS):
    """Two JSONL files of the sample corpus; the second ends with a duplicate id and BAD_LINES."""
    sample = sample_documents(documents)
    half = documents // 2
    first = write_jsonl(directory / "part-0.jsonl", sample[:half])
    write_jsonl(
        directory / "part-1.jsonl", sample[half:], [json.dumps(sample[0], ensure_ascii=False), *BAD_LINES]
    )
    return str(directory / "*.jsonl"), first


@pytest.fixture(scope="module")
def bundle(shared_bundle):
    return shared_bundle("two_inputs_two_outputs")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    directory = tmp_path_factory.mktemp("corpus")
    pattern, _ = _corpus(directory)
    return pattern


@pytest.fixture(scope="module")
def reference(tmp_path_factory, bundle, corpus):
    """The in-memory (FnApiRunner) export of `corpus`: what every portable run must equal."""
    output = str(tmp_path_factory.mktemp("reference") / "out")
    summary = run_export(["--model", bundle, "--input", corpus, "--output", output, "--batch_size", "64"])
    assert summary.exit_code == EXIT_OK, summary.message
    return output, summary


def _summary_counts(stdout):
    """{"documents read": "603", ...} from the printed summary."""
    counts = {}
    for line in stdout.splitlines():
        for label in ("documents read", "rows written", "dead letters", "truncated"):
            if line.strip().startswith(label):
                counts[label] = line.strip()[len(label) :].split()[0]
    return counts


def _job_states(job_endpoint):
    with grpc.insecure_channel(job_endpoint) as channel:
        stub = beam_job_api_pb2_grpc.JobServiceStub(channel)
        jobs = stub.GetJobs(beam_job_api_pb2.GetJobsRequest()).job_info
        return {job.job_id: job.state for job in jobs}


def _wait_for_jobs_to_end(job_endpoint, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = _job_states(job_endpoint)
        if all(state in TERMINAL_STATES for state in states.values()):
            return states
        time.sleep(0.5)
    raise AssertionError(f"jobs still running: {_job_states(job_endpoint)}")


@pytest.mark.slow
def test_killed_then_rerun_through_the_job_service_equals_the_in_memory_export(
    services, bundle, corpus, reference, tmp_path
):
    """`python -m pipeline.run --runner PortableRunner ...`: SIGKILLed part-way, then run again.

    The killed launcher's job runs on in the job service (as on a cluster, until
    cancelled there) but nothing of it becomes visible; the rerun equals the
    in-memory export bit for bit, with the same summary, exit status and manifest counts.
    """
    job_endpoint, pool, _ = services
    output = str(tmp_path / "out")
    before = set(_job_states(job_endpoint))
    command = pipeline_command(
        corpus,
        output,
        "--model",
        bundle,
        "--batch_size",
        "64",
        "--shard_mb",
        "0.05",
        "--progress_seconds",
        "1",
        *_portable_flags(job_endpoint, pool),
    )
    process = forkserver.popen(
        command,
        cwd=REPOSITORY,
        env=_environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        shards = wait_for_staged_shard(process, output)
        assert process.poll() is None, "the run finished before it could be killed"
        assert shards, "the workers wrote no shard in the run's staging directory"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    states = _wait_for_jobs_to_end(job_endpoint)
    assert set(states) - before, "the killed launcher submitted no job"
    assert state_lib.read_manifest(output) is None
    assert not [name for name in os.listdir(output) if name.endswith(".parquet")]
    assert state_lib.output_state(output) == "unfinished"

    run = _run_cli(command)
    assert run.returncode == EXIT_OK, run.stderr[-4000:]
    reference_output, summary = reference
    _assert_same_output(output, reference_output)
    assert not os.path.exists(os.path.join(output, layout_lib.STAGING))
    assert _summary_counts(run.stdout) == {
        "documents read": str(summary.records_read),
        "rows written": str(summary.rows_written),
        "dead letters": str(summary.dead_letters),
        "truncated": str(summary.truncated),
    }
    assert summary.records_read == DOCUMENTS + 1 + len(BAD_LINES)
    manifest, expected = manifest_of(output), manifest_of(reference_output)
    assert manifest["status"] == "succeeded"
    # The job service commits counters: the accounting is the exact one, as locally.
    assert manifest["counts"] == expected["counts"]
    assert manifest["counts"]["counters"] == "committed"
    assert [s["rows"] for s in manifest["shards"]["rows"]] == [
        pq.read_metadata(os.path.join(output, s["file"])).num_rows for s in manifest["shards"]["rows"]
    ]
    # Workers elsewhere cannot write the launcher's progress files: no made-up counts or ETA.
    assert "live counts are not available on this runner" in run.stderr
    assert "a worker started running the job" in run.stderr
    assert "ETA" not in run.stderr


@pytest.mark.slow
def test_s3_input_and_output_through_the_job_service(services, bundle, corpus, reference, s3_endpoint):  # noqa: F811
    """Workers booted as in the SDK container read the model and corpus from S3 and write the output there."""
    job_endpoint, _, booting_pool = services
    s3 = client(s3_endpoint)
    for name in sorted(os.listdir(bundle)):
        s3.upload_file(os.path.join(bundle, name), BUCKET, f"portable/model/{name}")
    for path in sorted(glob.glob(corpus)):
        s3.upload_file(path, BUCKET, f"portable/corpus/{os.path.basename(path)}")
    argv = [
        "--model",
        f"s3://{BUCKET}/portable/model",
        "--input",
        f"s3://{BUCKET}/portable/corpus/*.jsonl",
        "--output",
        f"s3://{BUCKET}/portable/out",
        "--batch_size",
        "64",
    ]
    summary = run_export(argv + s3_flags(s3_endpoint) + _portable_flags(job_endpoint, booting_pool))
    assert summary.exit_code == EXIT_OK, summary.message

    stored = [item["Key"] for item in s3.list_objects_v2(Bucket=BUCKET, Prefix="portable/out/")["Contents"]]
    assert not [key for key in stored if f"/{layout_lib.STAGING}/" in key]

    def table(prefix):
        keys = sorted(key for key in stored if key.startswith(prefix))
        bodies = [s3.get_object(Bucket=BUCKET, Key=key)["Body"].read() for key in keys]
        return pa.concat_tables([pq.read_table(pa.BufferReader(body)) for body in bodies])

    rows, expected = table("portable/out/part-").sort_by("id"), _rows(reference[0])
    for column in expected.column_names:
        assert rows.column(column).equals(expected.column(column)), column
    # The same dead letters, each naming its file by the URI it was read from.
    errors = table(f"portable/out/{layout_lib.ERRORS_DIR}/").to_pylist()
    local = tuple(sorted(glob.glob(corpus)))
    expected_errors = _errors(reference[0]).to_pylist()
    for error in expected_errors:
        error["source"] = f"s3://{BUCKET}/portable/corpus/" + os.path.basename(error["source"])
        error["message"] = error["message"].replace(
            os.path.dirname(local[0]), f"s3://{BUCKET}/portable/corpus"
        )
    assert sorted(errors, key=str) == sorted(expected_errors, key=str)
    body = s3.get_object(Bucket=BUCKET, Key=f"portable/out/{layout_lib.MANIFEST}")["Body"].read()
    assert json.loads(body)["counts"]["records_read"] == reference[1].records_read


# --- counters the runner does not commit -----------------------------------------------------------


def _reported_as(kind):
    """A PortableMetrics.__init__ seeing what Spark and Flink job servers send ("attempted"), or nothing."""
    original = portable_runner.PortableMetrics.__init__

    def init(self, response):
        committed = list(response.metrics.committed)
        metrics = beam_job_api_pb2.MetricResults(attempted=committed if kind == "attempted" else [])
        original(self, beam_job_api_pb2.GetJobMetricsResponse(metrics=metrics))

    return init


@pytest.mark.slow
def test_ranges_and_attempted_only_counters_on_the_job_service(
    services, bundle, corpus, reference, tmp_path, monkeypatch
):
    """Files cut into ranges for Flink's --parallelism; counters as Spark's and Flink's job servers send them.

    Flink does not split a range while reading it, so --parallelism sizes the
    ranges; the rows must not depend on it. Those job servers report attempted
    counters only (a retried bundle counts twice): exit 7, records read unknown.
    """
    from pipeline.running import runners

    job_endpoint, pool, _ = services
    monkeypatch.setattr(portable_runner.PortableMetrics, "__init__", _reported_as("attempted"))
    # Ranges of a few kB, so each of the two files is read in several.
    monkeypatch.setattr(runners, "MIN_SPLIT_BYTES", 16 << 10)
    output = str(tmp_path / "out")
    argv = ["--model", bundle, "--input", corpus, "--output", output, "--batch_size", "64"]
    summary = run_export(argv + _portable_flags(job_endpoint, pool, "--parallelism=4"))

    assert summary.exit_code == EXIT_ACCOUNTING_UNVERIFIED, summary.message
    assert summary.records_read is None
    assert summary.message.startswith("Accounting unverified: the runner reported no committed counters")
    assert "documents read   unknown (no committed counters)" in format_summary(summary)
    _assert_same_output(output, reference[0])
    manifest, expected = manifest_of(output), manifest_of(reference[0])
    assert manifest["status"] == "completed_with_errors"
    assert manifest["counts"]["records_read"] is None
    assert manifest["counts"]["counters"] == "attempted"
    # Rows, dead letters and their reasons are counted in the written files: exact all the same.
    for name in ("rows_written", "dead_letters", "dead_letters_by_reason", "files_broken"):
        assert manifest["counts"][name] == expected["counts"][name], name
    assert summary.errors_by_reason == reference[1].errors_by_reason
    assert manifest["counts"]["ranges_read"] > 4


@pytest.mark.slow
def test_with_no_counters_at_all_a_broken_file_still_exits_5(services, bundle, tmp_path, monkeypatch):
    """files_broken then comes from the dead letters' reasons in the files, not from a counter."""
    job_endpoint, pool, _ = services
    monkeypatch.setattr(portable_runner.PortableMetrics, "__init__", _reported_as("none"))
    directory = tmp_path / "corpus"
    directory.mkdir()
    write_jsonl(directory / "good.jsonl", sample_documents(20))
    text = "".join(json.dumps(d) + "\n" for d in sample_documents(20, seed=1)).encode()
    with open(directory / "cut.jsonl.gz", "wb") as handle:
        handle.write(gzip.compress(text)[:-40])
    output = str(tmp_path / "out")
    argv = ["--model", bundle, "--input", str(directory / "*"), "--output", output, "--input_format", "jsonl"]
    summary = run_export(argv + _portable_flags(job_endpoint, pool))
    assert summary.exit_code == EXIT_RECORDS_LOST, summary.message
    counts = manifest_of(output)["counts"]
    assert (counts["files_broken"], counts["records_read"], counts["counters"]) == (1, None, "none")
    assert counts["dead_letters_by_reason"]["read_error"] == 1


# --- workers that never come ------------------------------------------------------------------------


def _python_without(directory, *, beam):
    """A directory whose `python` cannot import Beam (`beam=False`) or only this package (`beam=True`)."""
    directory.mkdir()
    if beam:
        blocker = directory / "site"
        blocker.mkdir()
        # A Beam install without this package: the workers' imports of it fail.
        (blocker / "sitecustomize.py").write_text(
            textwrap.dedent(
                """
                import sys

                class _Absent:
                    def find_spec(self, name, path=None, target=None):
                        if name.split(".")[0] in ("pipeline", "models"):
                            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

                sys.meta_path.insert(0, _Absent())
                """
            )
        )
        script = f'#!/bin/sh\nPYTHONPATH={blocker} exec {sys.executable} "$@"\n'
    else:
        # -S: no site-packages, so no Beam; the standard library only.
        script = f'#!/bin/sh\nexec {sys.executable} -S "$@"\n'
    python = directory / "python"
    python.write_text(script)
    python.chmod(0o755)
    return str(directory)


def _last_error(capsys):
    lines = capsys.readouterr().err.strip().splitlines()
    return lines[-1] if lines else ""


@pytest.mark.parametrize(
    ("beam", "timeout", "expected"),
    [
        # No worker ever connects: the watchdog gives up after --worker_start_timeout.
        (False, 3, "No worker started running the job within 3 s"),
        # The worker connects, then cannot unpickle our DoFns: the job fails, and says why.
        (True, 120, "The job's workers cannot import this package"),
    ],
    ids=["python_without_beam", "python_without_this_package"],
)
def test_a_pool_whose_python_cannot_run_the_job_is_reported(
    request, services, bundle, corpus, tmp_path, capsys, beam, timeout, expected
):
    job_endpoint, *_ = services
    pool = _worker_pool(request, tmp_path, path_first=_python_without(tmp_path / "bin", beam=beam))
    output = str(tmp_path / "out")
    argv = ["--model", bundle, "--input", corpus, "--output", output, f"--worker_start_timeout={timeout}"]
    started = time.monotonic()
    assert main(argv + _portable_flags(job_endpoint, pool)) == EXIT_CONFIG_ERROR
    last = _last_error(capsys)
    assert last.startswith("error: ") and expected in last, last
    assert f"--environment_config {pool}" in last and "import apache_beam and this package" in last
    assert time.monotonic() - started < 60
    # Nothing committed, and nothing left behind for readers or the next run.
    assert not os.path.exists(output), os.listdir(output)
    assert all(state in TERMINAL_STATES for state in _wait_for_jobs_to_end(job_endpoint).values())


@pytest.mark.slow
def test_ctrl_c_while_waiting_for_workers_cancels_the_job(request, services, bundle, corpus, tmp_path):
    """--worker_start_timeout 0 waits forever; Ctrl-C then ends the run and cancels its job."""
    job_endpoint, *_ = services
    pool = _worker_pool(request, tmp_path, path_first=_python_without(tmp_path / "bin", beam=False))
    before = set(_job_states(job_endpoint))
    log_path = tmp_path / "launcher.log"
    command = pipeline_command(
        corpus,
        tmp_path / "out",
        "--model",
        bundle,
        "--worker_start_timeout=0",
        "--progress_seconds=1",
        *_portable_flags(job_endpoint, pool),
    )
    with open(log_path, "wb") as log:
        process = forkserver.popen(
            command, cwd=REPOSITORY, env=_environment(), stdout=log, stderr=log, start_new_session=True
        )
    request.addfinalizer(lambda: _stop(process))
    deadline = time.monotonic() + 90
    while b"waiting for a worker to start" not in log_path.read_bytes():
        assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=60) == EXIT_INTERRUPTED, log_path.read_text()[-3000:]
    assert log_path.read_text().strip().splitlines()[-1].startswith("interrupted: nothing was committed")
    jobs = {job: state for job, state in _job_states(job_endpoint).items() if job not in before}
    assert list(jobs.values()) == [beam_job_api_pb2.JobState.CANCELLED]


def test_no_pool_at_the_environment_config_is_reported(services, bundle, corpus, tmp_path, capsys):
    job_endpoint, *_ = services
    nowhere = f"localhost:{_free_port()}"
    argv = ["--model", bundle, "--input", corpus, "--output", str(tmp_path / "out")]
    assert main(argv + _portable_flags(job_endpoint, nowhere)) == EXIT_CONFIG_ERROR
    last = _last_error(capsys)
    assert last.startswith("error: The job service could not start a worker"), last
    assert "Connection refused" in last and f"--environment_config {nowhere}" in last


def test_no_job_service_at_the_job_endpoint_is_a_launch_error(bundle, corpus, tmp_path, capsys):
    nowhere = f"localhost:{_free_port()}"
    output = str(tmp_path / "out")
    argv = ["--model", bundle, "--input", corpus, "--output", output, "--job_server_timeout=2"]
    started = time.monotonic()
    assert main(argv + _portable_flags(nowhere, "localhost:1")) == EXIT_CONFIG_ERROR
    assert _last_error(capsys) == (
        f"error: No Beam job service answered at --job_endpoint {nowhere} within 2 s (--job_server_timeout). "
        "Check that HOST:PORT is right and that the job server runs there: the Flink or Spark job server "
        "(its --job-port), or for a test on this machine `python -m "
        "apache_beam.runners.portability.local_job_service_main --port PORT`. See docs/portable_runners.md."
    )
    assert time.monotonic() - started < 30
    assert not os.path.exists(output)


def test_a_job_endpoint_that_is_no_job_service_is_a_launch_error(services, bundle, corpus, tmp_path, capsys):
    """The worker pool's port given as --job_endpoint (the two ports swapped): it speaks gRPC, so the
    probe passed; Beam then failed once the model was loaded, "the job may still run there", exit 1."""
    _, pool, _ = services
    output = str(tmp_path / "out")
    argv = ["--model", bundle, "--input", corpus, "--output", output, "--job_server_timeout=10"]
    assert main(argv + _portable_flags(pool, "localhost:1")) == EXIT_CONFIG_ERROR
    last = _last_error(capsys)
    assert last.startswith(f"error: --job_endpoint {pool} answers gRPC but is no Beam job service"), last
    assert "local_job_service_main --port PORT" in last, last
    assert not os.path.exists(output)


@pytest.mark.slow
def test_a_job_service_that_stops_answering_as_the_job_is_submitted_is_one_line(
    request, bundle, corpus, tmp_path, capsys, monkeypatch
):
    """A job server that hangs after the launch probe, as the job is submitted: Beam's own connect timed
    out in a grpc.FutureTimeoutError traceback, and the run's staging was left in --output."""
    from pipeline.running import portable

    started = []
    job_endpoint = _job_service(request, tmp_path, started)
    service = started[0]
    request.addfinalizer(lambda: service.poll() is None and os.kill(service.pid, signal.SIGCONT))
    probe = portable.check_job_endpoint

    def probe_then_stop(options):
        probe(options)
        service.send_signal(signal.SIGSTOP)

    monkeypatch.setattr(portable, "check_job_endpoint", probe_then_stop)
    output = tmp_path / "out"
    argv = ["--model", bundle, "--input", corpus, "--output", str(output), "--job_server_timeout=3"]
    assert main(argv + _portable_flags(job_endpoint, "localhost:1")) == EXIT_CONFIG_ERROR
    assert _last_error(capsys) == (
        f"error: the job service at --job_endpoint {job_endpoint} stopped answering as the job was "
        "submitted (no answer within 3 s, --job_server_timeout); no job was started and nothing was "
        "committed. Check the job server, then rerun the same command. See docs/portable_runners.md."
    )
    _nothing_committed(output)
    assert not os.path.exists(output / layout_lib.STAGING) or not os.listdir(output / layout_lib.STAGING)


@pytest.mark.parametrize("value", ["-1", "inf", "nan"])
def test_worker_start_timeout_must_be_finite_and_not_negative(value, tmp_path, capsys):
    assert main(["--output", str(tmp_path / "out"), f"--worker_start_timeout={value}"]) == EXIT_CONFIG_ERROR
    assert capsys.readouterr().err.strip() == (
        "error: --worker_start_timeout must be a number from 0.0 to 86,400.0 (seconds to wait for a "
        f"first worker, 0 = forever), received {float(value)}."
    )
    assert not os.path.exists(tmp_path / "out")


# --- what goes wrong once the job runs, each told in one line ----------------------------------------


def _launch(request, command, log_path):
    """Starts `command` (a `pipeline_command`) in its own process group, its output to `log_path`."""
    with open(log_path, "wb") as log:
        process = forkserver.popen(
            command, cwd=REPOSITORY, env=_environment(), stdout=log, stderr=log, start_new_session=True
        )
    request.addfinalizer(lambda: _stop(process))
    return process


def _wait_for_text(process, log_path, text, timeout=120):
    deadline = time.monotonic() + timeout
    while text not in log_path.read_text(errors="replace"):
        assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
        time.sleep(0.1)


def _one_error_line(log_path):
    """The log's last line, checked to be its only `error:` line, with no traceback above it."""
    log = log_path.read_text(errors="replace")
    assert "Traceback" not in log, log[-3000:]
    assert [line for line in log.splitlines() if line.startswith("error:")] == [log.splitlines()[-1]], log[
        -3000:
    ]
    return log.splitlines()[-1]


def _nothing_committed(output):
    assert state_lib.read_manifest(str(output)) is None
    assert not glob.glob(os.path.join(str(output), "*.parquet"))


@pytest.mark.slow
@pytest.mark.parametrize("event", ["stopped", "stopped_then_sigterm", "killed"])
def test_a_job_service_lost_while_the_job_runs(request, services, bundle, corpus, tmp_path, event):
    """A job service that stops answering (SIGSTOP: a hung job server, a partition) or dies mid-job.

    Each of the launcher's calls to it has a deadline: progress lines go on, the
    run ends with one line after --job_server_timeout, and a SIGTERM meanwhile is
    acted on at once (Beam's own calls have none: the launcher hung, deaf to signals).
    """
    _, pool, _ = services
    started = []
    job_endpoint = _job_service(request, tmp_path, started)
    service = started[0]
    request.addfinalizer(lambda: service.poll() is None and os.kill(service.pid, signal.SIGCONT))
    output, log_path = tmp_path / "out", tmp_path / "launcher.log"
    timeout = 60 if event == "stopped_then_sigterm" else 4
    command = pipeline_command(
        corpus,
        output,
        "--model",
        bundle,
        "--progress_seconds=1",
        f"--job_server_timeout={timeout}",
        *_portable_flags(job_endpoint, pool),
    )
    process = _launch(request, command, log_path)
    _wait_for_text(process, log_path, "live counts are not available")
    service.send_signal(signal.SIGKILL if event == "killed" else signal.SIGSTOP)
    lost = time.monotonic()
    if event == "stopped_then_sigterm":
        _wait_for_text(process, log_path, "progress: the job service has not answered for", timeout=30)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == EXIT_TERMINATED, log_path.read_text()[-3000:]
        *_, interrupted, left = log_path.read_text().strip().splitlines()
        assert interrupted.startswith("interrupted: nothing was committed"), log_path.read_text()[-3000:]
        # The stopped service could not cancel the job: said after, in one line.
        assert left.startswith("warning: the job ") and "its cancel failed" in left, left
        assert left.endswith("cancel it with the cluster's own tools before rerunning."), left
    else:
        assert process.wait(timeout=60) == EXIT_UNEXPECTED, log_path.read_text()[-3000:]
        why = "stopped answering" if event == "stopped" else "went away"
        assert _one_error_line(log_path) == (
            f"error: the job service at --job_endpoint {job_endpoint} {why} (for over {timeout} s, "
            "--job_server_timeout) while the job ran; nothing was committed. The job may still run there "
            "(cancel it with the cluster's own tools). Check the job server, then rerun the same command "
            "to finish the export (it keeps the rows made durable)."
        )
        assert time.monotonic() - lost < timeout + 20
    if event != "killed":
        assert "progress: the job service has not answered for" in log_path.read_text()
    _nothing_committed(output)


@pytest.mark.slow
def test_a_job_running_longer_than_job_server_timeout_is_committed(
    services, bundle, corpus, reference, tmp_path
):
    """Beam opens the job's state and message streams with a deadline of --job_server_timeout: a job
    running longer (300 s by default: any real one) failed at its end, "the job service went away",
    nothing committed, though the job had succeeded and its service answered all along."""
    job_endpoint, pool, _ = services
    output = str(tmp_path / "out")
    timeout = 4
    command = pipeline_command(
        corpus,
        output,
        "--model",
        bundle,
        "--batch_size",
        "64",
        f"--job_server_timeout={timeout}",
        *_portable_flags(job_endpoint, pool),
    )
    result = _run_cli(command)
    assert result.returncode == EXIT_OK, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    # Worker start-up alone (a new process importing TensorFlow) takes longer than the limit.
    assert manifest_of(output)["seconds"] > timeout, "the job ended before the streams' old deadline"
    _assert_same_output(output, reference[0])


@pytest.mark.slow
def test_a_worker_pool_killed_while_the_job_runs_is_one_error_line(request, services, bundle, tmp_path):
    """The pool and its SDK workers SIGKILLed (a TaskManager's sidecar OOM-killed): one line, exit 1."""
    job_endpoint, *_ = services
    started = []
    pool = _worker_pool(request, tmp_path, started=started)
    directory = tmp_path / "corpus"
    directory.mkdir()
    # Long enough that the job still runs when its workers are killed.
    write_jsonl(directory / "big.jsonl", sample_documents(2000))
    output, log_path = tmp_path / "out", tmp_path / "launcher.log"
    command = pipeline_command(
        directory / "big.jsonl",
        output,
        "--model",
        bundle,
        "--batch_size=16",
        *_portable_flags(job_endpoint, pool),
    )
    process = _launch(request, command, log_path)
    _wait_for_text(process, log_path, "a worker started running the job")
    os.killpg(started[0].pid, signal.SIGKILL)
    assert process.wait(timeout=90) == EXIT_UNEXPECTED, log_path.read_text()[-3000:]
    last = _one_error_line(log_path)
    assert last.startswith("error: the job's workers went away while it ran ("), last
    assert last.endswith("then rerun the same command to finish the export (it keeps the rows made durable).")
    _nothing_committed(output)


@pytest.mark.slow
def test_a_workers_refusal_is_its_one_line(request, services, bundle, corpus, tmp_path):
    """The bundle's tokenizer changed after launch: a worker refuses it, and the launcher says just that."""
    import shutil

    from models.bundle import TOKENIZER_FILE

    job_endpoint, pool, _ = services
    model = tmp_path / "bundle"
    shutil.copytree(bundle, model)
    output, log_path = tmp_path / "out", tmp_path / "launcher.log"
    command = pipeline_command(corpus, output, "--model", model, *_portable_flags(job_endpoint, pool))
    process = _launch(request, command, log_path)
    _wait_for_text(process, log_path, "live counts are not available")
    with open(model / TOKENIZER_FILE, "a", encoding="utf-8") as handle:
        handle.write(" ")
    assert process.wait(timeout=120) == EXIT_CONFIG_ERROR, log_path.read_text()[-3000:]
    last = _one_error_line(log_path)
    # The worker's own check of the bundle against its manifest: Beam relays it inside 6 tracebacks.
    assert last.startswith(f"error: Invalid model bundle '{model}': {model / TOKENIZER_FILE} has SHA-256 "), (
        last
    )
    assert last.endswith("Restore the original file or re-export the bundle."), last
    _nothing_committed(output)


def test_an_environment_the_job_service_cannot_start_is_one_error_line(
    services, bundle, corpus, tmp_path, capsys
):
    """PROCESS workers on Beam's local job service (which cannot start them): a KeyError deep in Beam."""
    job_endpoint, *_ = services
    output = tmp_path / "out"
    argv = ["--model", bundle, "--input", corpus, "--output", str(output), "--limit=5"]
    flags = ["--runner=PortableRunner", f"--job_endpoint={job_endpoint}", "--environment_type=PROCESS"]
    config = '--environment_config={"command": "/opt/apache/beam/boot"}'
    assert main([*argv, *flags, config]) == EXIT_CONFIG_ERROR
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert _last_error_line(err) == (
        "error: The job service cannot start workers of --environment_type PROCESS (it knows no "
        "beam:env:process:v1); nothing was committed. Beam's local job service starts EXTERNAL (a worker "
        "pool), LOOPBACK and DOCKER workers; a Flink or Spark job server also PROCESS. See "
        "docs/portable_runners.md."
    )
    assert not os.path.exists(output), os.listdir(output)


def _last_error_line(err):
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


def test_a_job_server_the_runner_cannot_start_is_one_error_line(bundle, corpus, tmp_path, capsys):
    """FlinkRunner with no --job_endpoint fetches and starts Beam's job server jar; here it cannot."""
    output = tmp_path / "out"
    jar = f"http://127.0.0.1:{_free_port()}/beam-runners-flink-job-server.jar"
    argv = ["--model", bundle, "--input", corpus, "--output", str(output), "--limit=5"]
    runner = ["--runner=FlinkRunner", "--flink_master=localhost:8081", f"--flink_job_server_jar={jar}"]
    assert main([*argv, *runner]) == EXIT_CONFIG_ERROR
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = _last_error_line(err)
    assert last.startswith(
        f"error: The FlinkRunner could not submit the job: Unable to fetch remote job server jar at {jar}"
    )
    # Nothing of that run is left: no staging for the next run to resume.
    assert not os.path.exists(output), os.listdir(output)


def test_a_portable_run_without_output_gets_an_absolute_default(tmp_path, monkeypatch, capsys):
    """The default --output was relative (output/embeddings-...), and refused as such."""
    monkeypatch.chdir(tmp_path)
    argv = ["--runner=PortableRunner", f"--job_endpoint=localhost:{_free_port()}", "--job_server_timeout=1"]
    assert main(argv) == EXIT_CONFIG_ERROR
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: No Beam job service answered at --job_endpoint"), err[-3000:]
    assert not os.path.exists(tmp_path / "output")


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (
            ["--environment_type=docker", "--environment_config=localhost:1"],
            "error: --environment_type docker with --environment_config localhost:1 cannot work: Beam says "
            "Unknown environment type: docker. The types are DOCKER, EXTERNAL, PROCESS and LOOPBACK",
        ),
        (
            ["--environment_type=EXTERNAL"],
            "error: --environment_type EXTERNAL with --environment_config (not set) cannot work: Beam says "
            "Option external_service_address is required for environment type EXTERNAL.",
        ),
        (
            ["--environment_type=LOOPBACK", "--environment_config=localhost:1"],
            "error: --environment_type LOOPBACK with --environment_config localhost:1 cannot work: Beam says "
            "Option environment_config is not compatible with environment type LOOPBACK.",
        ),
        (["--job_endpoint="], "error: --runner PortableRunner needs --job_endpoint HOST:PORT"),
        (["--job_server_timeout=0"], "error: --job_server_timeout must be a number of seconds above 0"),
        (["--job_server_timeout=-5"], "error: --job_server_timeout must be a number of seconds above 0"),
        (
            ["--output=out/relative"],
            "error: --output 'out/relative' is a relative path: the workers of a portable runner resolve it "
            "in their own working directory, not this one, so they would read or write elsewhere. Pass an "
            f"absolute path on a filesystem every worker mounts at the same place (here that is "
            f"'{os.path.join(os.getcwd(), 'out', 'relative')}')",
        ),
        (
            ["--input=models/data/sample_corpus.jsonl"],
            "error: --input 'models/data/sample_corpus.jsonl' is a relative path",
        ),
        (
            ["--model=models/data/default_bundle"],
            "error: --model 'models/data/default_bundle' is a relative path",
        ),
    ],
    ids=[
        "lower_case_type",
        "external_without_config",
        "loopback_with_config",
        "no_job_endpoint",
        "timeout_zero",
        "timeout_negative",
        "relative_output",
        "relative_input",
        "relative_model",
    ],
)
def test_portable_flags_that_cannot_work_are_launch_errors(flags, expected, tmp_path, capsys):
    """Refused before the model loads or anything is written (Beam refused them in `run()`, after staging)."""
    given = dict(flag.split("=", 1) for flag in flags)
    defaults = {
        "--output": str(tmp_path / "out"),
        "--runner": "PortableRunner",
        "--job_endpoint": "localhost:1",
    }
    argv = [f"{flag}={value}" for flag, value in {**defaults, **given}.items() if value]
    assert main(argv) == EXIT_CONFIG_ERROR
    err = capsys.readouterr().err.strip()
    assert err.startswith(expected) and len(err.splitlines()) == 1, err[-3000:]
    assert not os.path.exists(tmp_path / "out")
    assert not os.path.exists("out/relative")


def test_a_portable_job_whose_cancel_fails_is_noted_for_the_interrupted_line():
    """The 'Could not cancel the job' warning of a stopped launcher was logged after the stop signal had
    silenced its output: the user read only 'rerun the same command' with the job still running."""
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipeline.running import left_running
    from pipeline.running.portable import _JobWatch

    class Result:
        _job_id = "job-7"

        def __init__(self, error):
            self.error = error

        def cancel(self):
            if self.error:
                raise self.error

    options = PipelineOptions(["--runner=PortableRunner", "--job_endpoint=localhost:8099"])
    left_running.forget()
    _JobWatch(Result(None), options, time.monotonic).cancel()
    assert left_running.notes() == []
    _JobWatch(Result(ConnectionError("refused")), options, time.monotonic).cancel()
    assert left_running.notes() == [
        "the job job-7 may still be running at localhost:8099 (its cancel failed: refused); cancel it with "
        "the cluster's own tools before rerunning."
    ]
    left_running.forget()


def test_a_note_taken_back_leaves_the_later_notes_in_place():
    """Notes were a list: taking the first back shifted the second, whose `replace` then raised
    IndexError (a traceback as the launcher stopped) or rewrote another job's note."""
    from pipeline.running import left_running

    left_running.forget()
    first = left_running.note("job A may still run")
    second = left_running.note("job B may still run")
    third = left_running.note("job C may still run")
    left_running.replace(first, None)
    left_running.replace(third, "job C: its cancel failed")
    left_running.replace(second, None)
    assert left_running.notes() == ["job C: its cancel failed"]
    left_running.forget()
    left_running.replace(third, "job C after a new run began")
    assert left_running.notes() == []
