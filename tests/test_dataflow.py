"""Scale-out: the Dataflow job built offline (`--dry_run=True`) and worker settings.

The Dataflow job is built by Beam's real DataflowRunner from the documented
command line; Beam's `--dry_run` test option stops it before anything is staged
or submitted, and our launcher skips the checks that would need credentials.
"""

import logging
import os
import sys
import tarfile

import apache_beam
import pytest
from apache_beam.internal import pickler
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.portability.api import beam_runner_api_pb2
from apache_beam.runners.dataflow.internal import apiclient
from pipeline_fixtures import REPOSITORY, copy_sources

from models.bundle import DEFAULT_BUNDLE, MODEL_FILE, read_manifest
from pipeline.errors import ExportConfigError
from pipeline.planning.model_source import load_model_source
from pipeline.planning.options import ExportOptions
from pipeline.planning.plan import ExportPlan
from pipeline.running.export import run_export
from pipeline.running.runners import check_worker_paths, worker_tf_threads

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
