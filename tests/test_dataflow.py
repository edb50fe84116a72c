"""Scale-out: the Dataflow job built offline (`--dry_run=True`) and worker settings.

The Dataflow job is built by Beam's real DataflowRunner from the documented
command line; Beam's `--dry_run` test option stops it before anything is staged
or submitted, and our launcher skips the checks that would need credentials.
"""

import logging
import os
import signal
import sys
import tarfile
import time

import apache_beam
import forkserver
import pytest
from apache_beam.internal import pickler
from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions
from apache_beam.portability.api import beam_runner_api_pb2
from apache_beam.runners.dataflow.internal import apiclient
from apache_beam.runners.runner import PipelineState
from pipeline_fixtures import REPOSITORY, copy_sources, pipeline_command

from models.bundle import DEFAULT_BUNDLE, MODEL_FILE, read_manifest
from models.train import SAMPLE_CORPUS
from pipeline.errors import ExportConfigError
from pipeline.planning.model_source import load_model_source
from pipeline.planning.options import ExportOptions
from pipeline.planning.plan import ExportPlan
from pipeline.planning.stores import check_gcs_bucket_name
from pipeline.running.dataflow import poll_dataflow
from pipeline.running.export import run_export
from pipeline.running.runners import check_dataflow_options, check_worker_paths, worker_tf_threads

BUCKET = "gs://embexport-example"
# docs/dataflow.md's command, with a bucket name Beam accepts and --setup_file added by the fixture.
DATAFLOW_FLAGS = [
    "--runner", "DataflowRunner",
    "--project", "my-project",
    "--region", "us-central1",
    "--temp_location", f"{BUCKET}/tmp",
    "--input", f"{BUCKET}/corpus/*.jsonl",
    "--output", f"{BUCKET}/emb",
]  # fmt: skip
OUR_TRANSFORMS = (
    "ReadCorpus",
    "EmbedDocuments",
    "EmbedDocuments/RunInference",
    "WriteEmbeddings",
    "WriteDeadLetters",
)
RUN_INFERENCE = "EmbedDocuments/RunInference/BeamML_RunInference"


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """(summary, launcher log messages, setup_file) of the documented command with --dry_run=True."""
    setup_file = os.path.join(copy_sources(tmp_path_factory.mktemp("source")), "setup.py")
    records = _Records()
    logger = logging.getLogger("pipeline.running.export")
    logger.addHandler(records)
    try:
        summary = run_export([*DATAFLOW_FLAGS, "--setup_file", setup_file, "--dry_run=True"])
    finally:
        logger.removeHandler(records)
    return summary, records.messages, setup_file


def test_dry_run_builds_the_job_without_google_cloud(dry_run):
    summary, messages, _ = dry_run
    assert summary.dry_run and summary.exit_code == 0
    assert isinstance(summary.job, apiclient.Job)
    skipped = [m for m in messages if m.startswith("--dry_run:")]
    assert len(skipped) == 1, messages
    for check in (
        f"listing --input '{BUCKET}/corpus/*.jsonl'",
        f"checking --output '{BUCKET}/emb'",
        "submitting the job",
        "writing the manifest",
    ):
        assert check in skipped[0]


def test_job_holds_our_transforms(dry_run):
    names = {t.unique_name for t in dry_run[0].job.proto_pipeline.components.transforms.values()}
    missing = [name for name in OUR_TRANSFORMS if name not in names]
    assert not missing, f"{missing} not among {sorted(n for n in names if n.count('/') < 2)}"


def test_job_embeds_no_model(dry_run):
    """The graph carries the plan, small; workers load the weights from --model."""
    job = dry_run[0].job
    model_bytes = os.path.getsize(os.path.join(DEFAULT_BUNDLE, MODEL_FILE))
    assert job.proto_pipeline.ByteSize() < model_bytes / 20
    assert job.proto._pb.ByteSize() < 100_000
    largest = max(t.spec.ByteSize() for t in job.proto_pipeline.components.transforms.values())
    assert largest < 100_000

    (transform,) = [
        t for t in job.proto_pipeline.components.transforms.values() if t.unique_name == RUN_INFERENCE
    ]
    payload = beam_runner_api_pb2.ParDoPayload.FromString(transform.spec.payload).do_fn.payload
    do_fn = pickler.loads(payload)[0]
    assert do_fn._model is None
    plan = do_fn._model_handler._plan
    assert isinstance(plan, ExportPlan)
    assert plan.model_uri == DEFAULT_BUNDLE
    assert plan.model_sha256 == read_manifest(DEFAULT_BUNDLE)["sha256"][MODEL_FILE]
    # One SDK process per vCPU on Dataflow: one TensorFlow thread each.
    assert plan.tf_threads == 1


def test_job_options_carry_what_workers_need(dry_run):
    """What Dataflow hands the workers: our flags, --setup_file and its sdist, and the SDK image."""
    summary, _, setup_file = dry_run
    job = summary.job
    environment = apiclient.Environment([], job.options, "8", f"{BUCKET}/tmp/pipeline.pb", job.proto_pipeline)
    worker_options = environment.proto.sdk_pipeline_options["options"]
    assert worker_options["setup_file"] == setup_file
    assert worker_options["model"] == DEFAULT_BUNDLE
    assert worker_options["input"] == f"{BUCKET}/corpus/*.jsonl"
    assert worker_options["output"] == f"{BUCKET}/emb"
    version = apache_beam.__version__
    image = environment.proto.worker_pools[0].worker_harness_container_image
    python = "{}.{}".format(*sys.version_info[:2])
    assert image.endswith(f"/beam_python{python}_sdk:{version}"), image

    staged = {}
    for environment_proto in job.proto_pipeline.components.environments.values():
        for artifact in environment_proto.dependencies:
            name = beam_runner_api_pb2.ArtifactStagingToRolePayload.FromString(
                artifact.role_payload
            ).staged_name
            staged[name] = beam_runner_api_pb2.ArtifactFilePayload.FromString(artifact.type_payload).path
    assert "workflow.tar.gz" in staged, sorted(staged)
    # The model reaches workers inside the package that --setup_file builds.
    with tarfile.open(staged["workflow.tar.gz"]) as sdist:
        members = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    for name in os.listdir(DEFAULT_BUNDLE):
        assert f"models/data/default_bundle/{name}" in members
    assert "models/data/sample_corpus.jsonl" in members
    assert all(
        os.path.getsize(path) < 1_000_000 for name, path in staged.items() if name != "workflow.tar.gz"
    )


def test_dataflow_refuses_local_paths(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"id": "a", "content": "x", "title": "y"}\n')
    # The documented command with its --input on this machine (a flag is given once).
    flags = [str(corpus) if flag == f"{BUCKET}/corpus/*.jsonl" else flag for flag in DATAFLOW_FLAGS]
    with pytest.raises(
        ExportConfigError, match=r"Dataflow workers cannot read files on this machine.*--input"
    ):
        run_export([*flags, "--dry_run=True"])


def test_dataflow_accepts_the_default_model_and_no_tokenizer():
    options = PipelineOptions([*DATAFLOW_FLAGS, "--tokenizer", "none"]).view_as(ExportOptions)
    check_worker_paths(options)  # --model is the bundled default, which workers have
    options.model = os.path.join(REPOSITORY, "some_bundle")
    with pytest.raises(ExportConfigError, match="--model"):
        check_worker_paths(options)


def test_dry_run_needs_a_local_model():
    flags = [*DATAFLOW_FLAGS, "--model", f"{BUCKET}/model", "--dry_run=True"]
    with pytest.raises(ExportConfigError, match="--dry_run .* --model must be local"):
        run_export(flags)


@pytest.mark.parametrize(
    "flags, requested, expected",
    [
        (["--runner", "DataflowRunner"], 0, 1),
        (["--runner", "DataflowRunner", "--experiments", "no_use_multiple_sdk_containers"], 0, 0),
        (["--runner", "DataflowRunner"], 3, 3),
        ([], 0, 0),
        (
            ["--direct_running_mode", "multi_processing", "--direct_num_workers", "2"],
            0,
            max(1, os.cpu_count() // 2),
        ),
    ],
)
def test_worker_tf_threads(flags, requested, expected):
    assert worker_tf_threads(PipelineOptions(flags), requested) == expected


def test_worker_tf_threads_refuses_negative():
    with pytest.raises(ExportConfigError, match="--tf_threads"):
        worker_tf_threads(PipelineOptions([]), -1)


def test_worker_finds_its_own_default_bundle():
    """A worker's package lives elsewhere than the launcher's; the plan's path still finds the bundle."""
    launcher_path = os.path.join(os.sep, "launcher", "site-packages", "models", "data", "default_bundle")
    source = load_model_source(launcher_path)
    assert source.model_sha256 == read_manifest(DEFAULT_BUNDLE)["sha256"][MODEL_FILE]


def _without(flags, *names):
    """`flags` with each `--name VALUE` pair of `names` left out."""
    kept, skip = [], False
    for flag in flags:
        if skip:
            skip = False
        elif flag in names:
            skip = True
        else:
            kept.append(flag)
    return kept


@pytest.fixture
def no_default_bucket(monkeypatch):
    """Fails a test at once where Beam would go to the network to create a default staging bucket."""

    def refuse(self):
        raise AssertionError("Beam tried to create a default bucket over the network")

    monkeypatch.setattr(GoogleCloudOptions, "_create_default_gcs_bucket", refuse)


@pytest.mark.parametrize(
    "dropped, pattern",
    [("--project", "needs --project"), ("--region", r"needs --region, .*\(e.g. --region us-central1\)")],
    ids=["project", "region"],
)
def test_dataflow_without_project_or_region_is_one_error(dropped, pattern):
    """Beam raised a bare ValueError ('Pipeline has validations errors') with a traceback, exit 1."""
    with pytest.raises(ExportConfigError, match=pattern):
        run_export([*_without(DATAFLOW_FLAGS, dropped), "--dry_run=True"])


@pytest.mark.parametrize(
    "flags, pattern",
    [
        (["--project", "12345"], r"^Beam refuses the pipeline options: Invalid Project ID \(12345\)"),
        (["--project", "My-Project"], r"Invalid Project ID \(My-Project\)"),
        (["--job_name", "My_Job"], r"Invalid job_name \(My_Job\).* Correct or leave out the flags named\.$"),
        (["--num_workers", "0"], r"Invalid value \(0\) for option: num_workers"),
        (
            ["--extra_package", "dist/missing.tar.gz"],
            r"^--extra_package 'dist/missing.tar.gz' does not exist \(relative",
        ),
    ],
    ids=[
        "project_number",
        "project_case",
        "job_name",
        "num_workers",
        "extra",
    ],
)
def test_dataflow_options_beam_would_refuse_later_are_one_error(flags, pattern, tmp_path, monkeypatch):
    """Each was Beam's traceback, exit 1: its option validator's ValueError when the job was built,
    or its stager's RuntimeError (the docs' `--setup_file ./setup.py` run from another directory)."""
    monkeypatch.chdir(tmp_path)
    given = [flag.format(readme=os.path.join(REPOSITORY, "README.md")) for flag in flags]
    with pytest.raises(ExportConfigError, match=pattern):
        run_export([*_without(DATAFLOW_FLAGS, flags[0]), *given, "--dry_run=True"])


@pytest.mark.parametrize(
    "locations, pattern",
    [
        ([], r"needs --temp_location gs://BUCKET/tmp"),
        (["--temp_location", "/tmp/embexport-temp"], r"--temp_location '/tmp/embexport-temp' must be"),
        (
            ["--temp_location", "gs://embexport-example"],
            r"must be a Cloud Storage directory, gs://BUCKET/PATH",
        ),
        # docs/dataflow.md's old placeholder: Beam only warned, then tried to create a bucket for minutes.
        (["--temp_location", "gs://B/tmp"], r"'B' is not a valid Cloud Storage bucket name"),
        (
            ["--temp_location", f"{BUCKET}/tmp", "--staging_location", "gs://my_bucket!/staging"],
            r"--staging_location .* not a valid Cloud Storage bucket name",
        ),
    ],
    ids=["missing", "local", "bucket_only", "invalid_bucket", "invalid_staging"],
)
def test_dataflow_needs_a_cloud_storage_temp_location(no_default_bucket, locations, pattern):
    """Without a valid gs:// temp location even a --dry_run asked Google for credentials for minutes."""
    flags = [*_without(DATAFLOW_FLAGS, "--temp_location"), *locations, "--dry_run=True"]
    with pytest.raises(ExportConfigError, match=pattern):
        run_export(flags)


def test_dataflow_takes_the_staging_location_alone(no_default_bucket):
    """Beam uses a valid --staging_location for temporary files too: nothing to refuse."""
    flags = _without(DATAFLOW_FLAGS, "--temp_location")
    check_dataflow_options(PipelineOptions([*flags, "--staging_location", f"{BUCKET}/staging"]))


@pytest.mark.parametrize(
    "name",
    ["my-bucket", "a1_b.c-d", "abc", "x" * 63, ".".join(["y" * 63] * 3), "embexport-example"],
)
def test_valid_cloud_storage_bucket_names_pass(name):
    check_gcs_bucket_name("output", f"gs://{name}/emb")


@pytest.mark.parametrize(
    "name",
    ["B", "ab", "My-Bucket", "-abc", "abc-", "a b", "x" * 64, "a..b", "192.168.5.4", "goog-x", "my-google-b"],
)
def test_invalid_cloud_storage_bucket_names_are_refused(name):
    with pytest.raises(ExportConfigError, match="not a valid Cloud Storage bucket name"):
        check_gcs_bucket_name("output", f"gs://{name}/emb")


def test_dataflow_refuses_a_local_reuse(tmp_path):
    """Workers read --reuse's shards; a local one passed the launch and failed on the workers."""
    earlier = tmp_path / "earlier"
    # A finished export this job could reuse (same model and layers), but on this machine.
    assert run_export(["--input", SAMPLE_CORPUS, "--output", str(earlier), "--limit", "8"]).exit_code == 0
    with pytest.raises(ExportConfigError, match=r"cannot read files on this machine.*--reuse"):
        run_export([*DATAFLOW_FLAGS, "--reuse", str(earlier), "--dry_run=True"])


def test_dataflow_refuses_s3_unless_the_workers_get_boto3(tmp_path):
    """The workers install only install_requires (no boto3): every S3 access failed minutes in."""
    s3 = ["--input", "s3://embexport-corpus/c/*.jsonl", "--output", "s3://embexport-corpus/emb"]
    flags = [*_without(DATAFLOW_FLAGS, "--input", "--output"), *s3]
    with pytest.raises(ExportConfigError, match=r"--input .*--output .* are on S3.*lack boto3"):
        run_export([*flags, "--dry_run=True"])
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("# the workers' extra packages\nrequests\n")
    with pytest.raises(ExportConfigError, match="lack boto3"):
        check_dataflow_options(PipelineOptions([*flags, "--requirements_file", str(requirements)]))
    for line in ("boto3==1.40.0", "apache-beam[aws]==2.77.0", "Apache_Beam[gcp,aws]"):
        requirements.write_text(f"requests\n{line}  # S3 on the workers\n")
        check_dataflow_options(PipelineOptions([*flags, "--requirements_file", str(requirements)]))
    check_dataflow_options(PipelineOptions([*flags, "--sdk_container_image", "r/p/embexport-aws:1"]))
    # pip's own includes, relative to the file (a loop is read once): boto3 came in through one.
    (tmp_path / "aws").mkdir()
    (tmp_path / "aws" / "extra.txt").write_text("-r ../requirements.txt\nboto3\n")
    requirements.write_text("requests\n--requirement=aws/extra.txt\n")
    check_dataflow_options(PipelineOptions([*flags, "--requirements_file", str(requirements)]))
    (tmp_path / "aws" / "extra.txt").write_text("-r ../requirements.txt\n")
    with pytest.raises(ExportConfigError, match="lack boto3"):
        check_dataflow_options(PipelineOptions([*flags, "--requirements_file", str(requirements)]))
    with pytest.raises(ExportConfigError, match="--requirements_file .* cannot be read"):
        check_dataflow_options(PipelineOptions([*flags, "--requirements_file", str(tmp_path / "absent")]))


@pytest.mark.parametrize(
    ("files", "gives_boto3"),
    [
        # An include's path keeps its case (it was lower-cased: "cannot be read: .../reqs/aws.txt").
        ({"req.txt": "-r Reqs/AWS.txt\n", "Reqs/AWS.txt": "boto3==1.35.0\n"}, True),
        # pip's short option with its value attached.
        ({"req.txt": "-raws.txt\n", "aws.txt": "boto3==1.35.0\n"}, True),
        ({"req.txt": "--requirement = Aws.txt  # the S3 extras\n", "Aws.txt": "BOTO3\n"}, True),
        # boto3 as a whole requirement name: with extras, a marker, a URL, a continued line.
        ({"req.txt": "boto3[crt]>=1.35\n"}, True),
        ({"req.txt": 'boto3; python_version >= "3.9"\n'}, True),
        ({"req.txt": "boto3 @ https://example.com/boto3-1.35.0-py3-none-any.whl\n"}, True),
        ({"req.txt": "requests \\\n  --hash=sha256:00\nboto3\\\n==1.35.0\n"}, True),
        # Type stubs, look-alike names, a comment, and a constraint file (it pins, installs nothing).
        ({"req.txt": "boto3-stubs\n"}, False),
        ({"req.txt": "boto3_type_annotations\nboto3.x\n"}, False),
        ({"req.txt": "# boto3\nrequests  # boto3 later\n"}, False),
        ({"req.txt": "-c pins.txt\n", "pins.txt": "boto3==1.35.0\n"}, False),
        ({"req.txt": "--constraint=pins.txt\n-cpins.txt\n", "pins.txt": "boto3==1.35.0\n"}, False),
    ],
)
def test_the_boto3_check_reads_requirements_files_as_pip_does(files, gives_boto3, tmp_path):
    """A valid include (`-r Reqs/AWS.txt`, `-raws.txt`) was refused, and `boto3-stubs` alone accepted."""
    s3 = ["--input", "s3://embexport-corpus/c/*.jsonl", "--output", "s3://embexport-corpus/emb"]
    flags = [*_without(DATAFLOW_FLAGS, "--input", "--output"), *s3]
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    options = PipelineOptions([*flags, "--requirements_file", str(tmp_path / "req.txt")])
    if gives_boto3:
        check_dataflow_options(options)
    else:
        with pytest.raises(ExportConfigError, match="lack boto3"):
            check_dataflow_options(options)


@pytest.mark.parametrize(
    "output, pattern",
    [
        ("gs://embexport-example", "names a whole bucket"),
        ("gs://embexport-example/a*b", "holds one of"),
        ("gs://embexport-example/emb/_staging/x", "below a directory named _staging"),
        ("gs://Embexport/emb", "not a valid Cloud Storage bucket name"),
    ],
    ids=["bucket", "glob", "staging", "bucket_name"],
)
def test_dry_run_checks_the_output_name(output, pattern):
    """The real launch refuses these without a request; --dry_run said 'the job was built', exit 0."""
    flags = [*_without(DATAFLOW_FLAGS, "--output"), "--output", output, "--dry_run=True"]
    with pytest.raises(ExportConfigError, match=pattern):
        run_export(flags)


def test_cloud_storage_without_credentials_is_one_error_in_seconds(tmp_path):
    """Beam retried the credential lookup for minutes, a traceback per retry, and never said what to do."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("GOOGLE_", "CLOUDSDK_"))}
    environment.update(
        PYTHONPATH=REPOSITORY,
        GOOGLE_APPLICATION_CREDENTIALS=str(tmp_path / "absent-key.json"),
        # No gcloud configuration, and no metadata server to ask.
        CLOUDSDK_CONFIG=str(tmp_path / "gcloud"),
        GCE_METADATA_HOST="127.0.0.1:9",
        GCE_METADATA_IP="127.0.0.1:9",
    )
    command = pipeline_command(f"{BUCKET}/corpus/*.jsonl", tmp_path / "out")
    # A bounded wait: the bug was minutes of retries, the fix answers before the model is even loaded.
    result = forkserver.run(
        command, cwd=REPOSITORY, env=environment, capture_output=True, text=True, timeout=90
    )
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no Google Cloud credentials" in errors[0], result.stderr[-2000:]
    assert "gcloud auth application-default login" in errors[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


class _StoppedJob:
    """A stand-in for Beam's DataflowPipelineResult whose wait is cut by a stop signal."""

    def __init__(self, cancel_error: Exception | None = None) -> None:
        self.state = PipelineState.RUNNING
        self.cancelled = False
        self.cancel_error = cancel_error

    def job_id(self) -> str:
        return "2026-12-07_01_02_03-123"

    def wait_until_finish(self, duration=None):
        raise KeyboardInterrupt  # what models.stopping makes of SIGINT, SIGTERM and SIGHUP

    def cancel(self):
        if self.cancel_error:
            raise self.cancel_error
        self.cancelled = True


def test_a_stopped_launcher_cancels_its_dataflow_job(caplog):
    """Ctrl-C left the job running unannounced (billing, writing into the staging the advised rerun
    takes over); a portable runner's job was cancelled."""
    job = _StoppedJob()
    with pytest.raises(KeyboardInterrupt):
        poll_dataflow(job, PipelineOptions(DATAFLOW_FLAGS), 1)
    assert job.cancelled
    failing = _StoppedJob(cancel_error=OSError("no network"))
    with pytest.raises(KeyboardInterrupt):
        poll_dataflow(failing, PipelineOptions(DATAFLOW_FLAGS), 1)
    assert "gcloud dataflow jobs cancel 2026-12-07_01_02_03-123 --region us-central1" in caplog.text


class _UnansweredCancel(_StoppedJob):
    """A job whose cancel hangs, as Beam's does retrying a service that does not answer, until a second
    stop signal (`second`) or for good."""

    def __init__(self, second: bool) -> None:
        super().__init__()
        self.second = second

    def wait_until_finish(self, duration=None):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: the launcher's own handler takes it
        time.sleep(5)  # not reached: the handler raises

    def cancel(self):
        if self.second:
            os.kill(os.getpid(), signal.SIGINT)
        time.sleep(30)


@pytest.mark.parametrize("how", ["fails", "second_signal", "no_answer"])
def test_a_job_the_stopped_launcher_could_not_cancel_is_said_with_the_interrupted_line(
    how, monkeypatch, capfd, tmp_path
):
    """The cancel's warning was logged after the stop signal had silenced the launcher's output, so the
    user read only 'rerun the same command' (which collides with the job still running); a cancel that got
    no answer kept the launcher silent for minutes, and a second Ctrl-C then left no word of the job."""
    from pipeline import run
    from pipeline.running import dataflow, export, left_running

    job = {
        "fails": _StoppedJob(cancel_error=OSError("no network")),
        "second_signal": _UnansweredCancel(second=True),
        "no_answer": _UnansweredCancel(second=False),
    }[how]
    if how == "fails":
        job.wait_until_finish = lambda duration=None: os.kill(os.getpid(), signal.SIGINT)
    monkeypatch.setattr(dataflow, "CANCEL_TIMEOUT_SECONDS", 1.0)

    def follow(job):  # what run_export does once the job is submitted
        left_running.forget()
        poll_dataflow(job, PipelineOptions(DATAFLOW_FLAGS), 1)

    monkeypatch.setattr(export, "run_export", lambda argv: follow(job))
    started = time.monotonic()
    assert run.main(["--output", str(tmp_path / "out")]) == 130
    assert time.monotonic() - started < 10
    lines = capfd.readouterr().err.splitlines()
    interrupted = next(i for i, line in enumerate(lines) if line.startswith("interrupted: "))
    warning = lines[interrupted + 1]
    assert warning.startswith("warning: the Dataflow job 2026-12-07_01_02_03-123 may still be running ("), (
        lines
    )
    assert (
        "`gcloud dataflow jobs cancel 2026-12-07_01_02_03-123 --region us-central1` before rerunning"
        in warning
    )
    # A job that was cancelled is not said to run on.
    monkeypatch.setattr(export, "run_export", lambda argv: follow(cancelled))
    cancelled = _StoppedJob()
    cancelled.wait_until_finish = lambda duration=None: os.kill(os.getpid(), signal.SIGINT)
    assert run.main(["--output", str(tmp_path / "out")]) == 130
    assert cancelled.cancelled and "may still be running" not in capfd.readouterr().err


@pytest.mark.parametrize(
    ("flag", "value", "pattern"),
    [
        ("--setup_file", "./setup.py", r"--setup_file './setup.py' does not exist .*This project's is"),
        ("--setup_file", REPOSITORY, r"--setup_file .* is a directory"),
        (
            "--setup_file",
            os.path.join(REPOSITORY, "README.md"),
            r"must be a file named setup.py or pyproject",
        ),
        ("--requirements_file", "requirements.txt", r"--requirements_file 'requirements.txt' does not exist"),
    ],
    ids=["missing", "directory", "name", "requirements"],
)
def test_a_staged_file_beam_cannot_stage_is_one_error(flag, value, pattern, tmp_path, monkeypatch):
    """The documented `--setup_file ./setup.py` run from another directory ended in Beam's stager's
    RuntimeError traceback (exit 1), after the model load, under --dry_run too."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ExportConfigError, match=pattern):
        run_export([*DATAFLOW_FLAGS, flag, value, "--dry_run=True"])


def test_a_bare_setup_file_name_is_staged_from_its_directory(tmp_path, monkeypatch):
    """`--setup_file setup.py` passed the launch check, then Beam's stager changed into
    os.path.dirname('setup.py') == '': a FileNotFoundError traceback as the job was submitted."""
    from apache_beam.options.pipeline_options import SetupOptions
    from apache_beam.runners.portability.stager import Stager

    from pipeline.running.runners import check_staged_files

    monkeypatch.chdir(REPOSITORY)
    options = PipelineOptions([*DATAFLOW_FLAGS, "--setup_file", "setup.py"])
    check_staged_files(options)
    setup_file = options.view_as(SetupOptions).setup_file
    assert setup_file == os.path.join(REPOSITORY, "setup.py")
    # The stager's own build step, with a build command that makes nothing: it gets past its chdir.
    with pytest.raises(RuntimeError, match=r"\*\.tar\.gz not found"):
        Stager._build_setup_package(setup_file, str(tmp_path), ["true"])
    assert os.getcwd() == REPOSITORY
