"""Object storage: model, corpus and output on a real S3-compatible server, through Beam's FileSystems.

moto's S3 server runs on loopback; the export reads the bundled default model and
a small JSONL corpus from it and writes rows, dead letters and the manifest back,
all through Beam's S3 filesystem configured by the `--s3_*` pipeline options.
"""

import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

# boto3, moto[s3] and flask come with the test extra (pip install -e '.[test]'); a
# missing one fails the run instead of skipping these tests.
import boto3
import forkserver
import keras
import moto.server as moto_server
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.io.aws import s3io
from apache_beam.io.aws.clients.s3 import boto3_client
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions
from pipeline_fixtures import REPOSITORY, kill_group_when, pipeline_command

from models.bundle import DEFAULT_BUNDLE, load_bundle
from models.train import SAMPLE_CORPUS
from pipeline.errors import EXIT_TERMINATED, ExportConfigError
from pipeline.running.export import run_export
from pipeline.writing import lock as lock_lib
from pipeline.writing.layout import ERRORS_DIR, MANIFEST
from pipeline.writing.state import read_manifest

BUCKET = "embexport-test"
MODEL = f"s3://{BUCKET}/models/default_bundle"
CORPUS = f"s3://{BUCKET}/corpus/*.jsonl"
OUTPUT = f"s3://{BUCKET}/exports/run1"
GOOD_DOCUMENTS = 24
MALFORMED_LINE = '{"id": "broken", "content": '
# The malformed line ends the second corpus file, after its half of the documents.
MALFORMED_POSITION = GOOD_DOCUMENTS - GOOD_DOCUMENTS // 2 + 1
ACCESS_KEY = "testing-key"
SECRET_KEY = "testing-secret"
REGION = "us-east-1"


@pytest.fixture(scope="module")
def s3_endpoint():
    """An S3 server on 127.0.0.1 at a free port, with an empty bucket; yields its URL."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    previous_no_proxy = os.environ.get("NO_PROXY")
    os.environ["NO_PROXY"] = ",".join(filter(None, [previous_no_proxy, "127.0.0.1"]))
    client(endpoint).create_bucket(Bucket=BUCKET)
    yield endpoint
    # Later tests must not inherit this server's filesystem settings.
    FileSystems.set_options(None)
    if previous_no_proxy is None:
        os.environ.pop("NO_PROXY", None)
    else:
        os.environ["NO_PROXY"] = previous_no_proxy
    server.stop()


def client(endpoint):
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        region_name=REGION,
    )


def set_aws_environment(monkeypatch, endpoint):
    """The standard AWS variables for the moto server: pyarrow's S3 filesystem (what
    pipeline.analyze reads with) takes them, not Beam's --s3_* flags."""
    for name, value in (
        ("AWS_ENDPOINT_URL", endpoint),
        ("AWS_ACCESS_KEY_ID", ACCESS_KEY),
        ("AWS_SECRET_ACCESS_KEY", SECRET_KEY),
        ("AWS_DEFAULT_REGION", REGION),
    ):
        monkeypatch.setenv(name, value)


def s3_flags(endpoint):
    """How a user points Beam's S3 filesystem at a non-AWS endpoint."""
    return [
        f"--s3_endpoint_url={endpoint}",
        f"--s3_access_key_id={ACCESS_KEY}",
        f"--s3_secret_access_key={SECRET_KEY}",
        f"--s3_region_name={REGION}",
    ]


def share_one_s3_client(patch, endpoint):
    """Makes Beam's S3 calls in this process share one client of `endpoint` (patched by `patch`).

    Beam makes a boto3 client for every S3 call (about 0.1 s each); one shared client
    keeps the tests that make hundreds of calls fast and changes none of their S3 requests.
    """
    shared, real = boto3_client.Client(options=PipelineOptions(s3_flags(endpoint))), s3io.S3IO
    patch.setattr(s3io, "S3IO", lambda client=None, options=None: real(client=client or shared))


def keys(endpoint, prefix):
    listing = client(endpoint).list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return sorted(item["Key"] for item in listing.get("Contents", []))


def read_parquet(endpoint, key):
    body = client(endpoint).get_object(Bucket=BUCKET, Key=key)["Body"].read()
    return pq.read_table(pa.BufferReader(body))


@pytest.fixture(scope="module")
def export(s3_endpoint):
    """Uploads the default bundle and a two-file corpus, exports s3:// -> s3://; returns the documents."""
    s3 = client(s3_endpoint)
    # A folder marker, as the S3 console's "Create folder" makes: loading the bundle copied it as a file.
    s3.put_object(Bucket=BUCKET, Key="models/default_bundle/", Body=b"")
    for name in sorted(os.listdir(DEFAULT_BUNDLE)):
        s3.upload_file(os.path.join(DEFAULT_BUNDLE, name), BUCKET, f"models/default_bundle/{name}")
    with open(SAMPLE_CORPUS, encoding="utf-8") as handle:
        documents = [json.loads(handle.readline()) for _ in range(GOOD_DOCUMENTS)]
    half = GOOD_DOCUMENTS // 2
    first = "".join(json.dumps(d) + "\n" for d in documents[:half])
    second = "".join(json.dumps(d) + "\n" for d in documents[half:]) + MALFORMED_LINE + "\n"
    s3.put_object(Bucket=BUCKET, Key="corpus/part-0.jsonl", Body=first.encode("utf-8"))
    s3.put_object(Bucket=BUCKET, Key="corpus/part-1.jsonl", Body=second.encode("utf-8"))
    flags = ["--model", MODEL, "--input", CORPUS, "--output", OUTPUT, "--layer", "lstm_content"]
    with pytest.MonkeyPatch.context() as patch:
        share_one_s3_client(patch, s3_endpoint)
        summary = run_export(flags + s3_flags(s3_endpoint))
    return summary, documents


@pytest.mark.slow
def test_export_reads_and_writes_s3(s3_endpoint, export):
    summary, documents = export
    assert summary.exit_code == 0, summary.message
    counts = (summary.records_read, summary.rows_written, summary.dead_letters)
    assert counts == (GOOD_DOCUMENTS + 1, GOOD_DOCUMENTS, 1)

    stored = keys(s3_endpoint, "exports/run1/")
    row_keys = [k for k in stored if k.startswith("exports/run1/part-")]
    error_keys = [k for k in stored if k.startswith(f"exports/run1/{ERRORS_DIR}/part-")]
    # Committed: shards and the manifest only, no staging area or temporary files left.
    assert sorted(row_keys + error_keys + [f"exports/run1/{MANIFEST}"]) == stored
    assert row_keys and error_keys

    rows = pa.concat_tables([read_parquet(s3_endpoint, k) for k in row_keys])
    assert sorted(rows.column("id").to_pylist()) == sorted(d["id"] for d in documents)
    errors = pa.concat_tables([read_parquet(s3_endpoint, k) for k in error_keys]).to_pylist()
    assert [(e["source"], e["position"], e["reason"], e["raw"]) for e in errors] == [
        (f"s3://{BUCKET}/corpus/part-1.jsonl", MALFORMED_POSITION, "malformed_json", MALFORMED_LINE)
    ]


def test_vectors_from_s3_model_match_keras(s3_endpoint, export):
    """The workers loaded the model from S3: its vectors are the Keras reference's."""
    _, documents = export
    row_keys = keys(s3_endpoint, "exports/run1/part-")
    rows = {r["id"]: r for key in row_keys for r in read_parquet(s3_endpoint, key).to_pylist()}
    bundle = load_bundle(DEFAULT_BUNDLE)
    feed = [
        bundle.tokenizer.encode_batch([d[entry["field"]] for d in documents], entry["length"])[0]
        for entry in bundle.manifest["inputs"]
    ]
    reference = keras.Model(bundle.model.inputs, bundle.model.get_layer("lstm_content").output)
    expected = np.asarray(reference.predict(feed, verbose=0))
    actual = np.array([rows[d["id"]]["lstm_content"] for d in documents], dtype=np.float32)
    np.testing.assert_allclose(actual, expected, atol=1e-5)


def test_manifest_is_read_back_from_s3(s3_endpoint, export):
    summary, _ = export
    manifest = read_manifest(OUTPUT)
    assert manifest is not None, f"no {MANIFEST} in {OUTPUT}"
    assert manifest["status"] == "succeeded"
    assert manifest["model_uri"] == MODEL
    assert manifest["counts"]["rows_written"] == GOOD_DOCUMENTS
    assert manifest["counts"]["dead_letters_by_reason"] == {"malformed_json": 1}
    assert {shard["file"] for shard in manifest["shards"]["errors"]} == {
        k[len("exports/run1/") :] for k in keys(s3_endpoint, f"exports/run1/{ERRORS_DIR}/")
    }
    # The manifest sits next to the data: it records the endpoint, never the credentials.
    assert manifest["options"]["s3_endpoint_url"] == s3_endpoint
    assert manifest["options"]["s3_secret_access_key"] == "<redacted>"
    with FileSystems.open(f"{OUTPUT}/{MANIFEST}") as handle:
        text = handle.read().decode("utf-8")
    assert SECRET_KEY not in text and ACCESS_KEY not in text


def test_an_s3_models_local_copy_is_removed_once_loaded(s3_endpoint, export, monkeypatch):
    """Each load copied the model into a new /tmp/embexport-model-* that stayed (3 GB on a test machine)."""
    import tempfile

    from apache_beam.io.filesystems import FileSystems
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipeline.planning.model_source import load_model_source

    monkeypatch.setattr(tempfile, "tempdir", tempfile.mkdtemp())
    share_one_s3_client(monkeypatch, s3_endpoint)
    FileSystems.set_options(PipelineOptions(s3_flags(s3_endpoint)))
    source = load_model_source(MODEL)
    assert source.model.get_layer("lstm_content") is not None
    assert os.listdir(tempfile.tempdir) == []


def test_an_s3_model_whose_copy_does_not_fit_in_tmpdir_says_so(s3_endpoint, tmp_path, monkeypatch):
    """A full $TMPDIR was "Could not read --model 's3://...': [Errno 28] No space left on device": the
    user looked at the bucket, and a worker's such line was told as the --output disk that filled."""
    import shutil
    import tempfile

    from pipeline.planning.model_source import load_model_source

    small = tmp_path / "tmp"
    small.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)]).returncode:
        pytest.skip("this machine does not let tests mount a tmpfs")
    try:
        s3 = client(s3_endpoint)
        for name in sorted(os.listdir(DEFAULT_BUNDLE)):  # 6 MB: no room in 1 MB.
            s3.upload_file(os.path.join(DEFAULT_BUNDLE, name), BUCKET, f"models/large/{name}")
        monkeypatch.setattr(tempfile, "tempdir", str(small))
        share_one_s3_client(monkeypatch, s3_endpoint)
        FileSystems.set_options(PipelineOptions(s3_flags(s3_endpoint)))
        with pytest.raises(ExportConfigError) as refused:
            load_model_source(f"s3://{BUCKET}/models/large")
        assert os.listdir(small) == []  # Its partial copy removed.
    finally:
        subprocess.run(["umount", str(small)], check=True)
    message = str(refused.value)
    assert f"temporary directory {str(small)!r}, which is full" in message and "TMPDIR=" in message
    assert "No space left on device" not in message, message  # Else told as the --output disk.


def test_an_s3_models_local_copy_is_held_while_it_loads(s3_endpoint, export, monkeypatch):
    """A run killed while it loaded an s3:// model (a Ctrl-C SIGKILLs workers as they start, each loading
    its own copy) left the copy, the model's whole size, in $TMPDIR/embexport-model-* for good: no later
    command removed it. Held like the progress folder, the next command removes it once its process is
    gone (test_output_faults.py::test_a_new_temporary_folder_removes_those_of_killed_commands...)."""
    import fcntl
    import tempfile

    from pipeline.planning import model_source
    from pipeline.scratch import HOLD_FILE, remove_dead_scratch_directories

    monkeypatch.setattr(tempfile, "tempdir", tempfile.mkdtemp())
    share_one_s3_client(monkeypatch, s3_endpoint)
    FileSystems.set_options(PipelineOptions(s3_flags(s3_endpoint)))
    load = model_source._load_staged
    held = []

    def loading(model_uri, local, *args):
        copy = os.path.dirname(local)
        descriptor = os.open(os.path.join(copy, HOLD_FILE), os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):  # Held by this process while it loads.
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(descriptor)
        held.append(remove_dead_scratch_directories() == [] and os.path.isdir(local))
        return load(model_uri, local, *args)

    monkeypatch.setattr(model_source, "_load_staged", loading)
    model_source.load_model_source(MODEL)
    assert held == [True]
    assert os.listdir(tempfile.tempdir) == []


@pytest.mark.parametrize(
    "output, pattern",
    [
        ("s3://no-such-bucket/exports/x", "the bucket 'no-such-bucket' does not exist at http"),
        (f"s3://{BUCKET}", "names a whole bucket"),
        (f"s3://{BUCKET}/", "names a whole bucket"),
    ],
    ids=["missing_bucket", "bucket", "bucket_slash"],
)
def test_an_output_bucket_that_cannot_take_an_export_is_one_error(
    s3_endpoint, export, output, pattern, caplog
):
    """A missing bucket ended in tracebacks and exit 1; a bucket root retried for minutes."""
    from pipeline.errors import ExportConfigError

    flags = ["--model", MODEL, "--input", CORPUS, "--output", output, "--layer", "lstm_content"]
    with pytest.MonkeyPatch.context() as patch:
        share_one_s3_client(patch, s3_endpoint)
        with pytest.raises(ExportConfigError, match=pattern):
            run_export(flags + s3_flags(s3_endpoint))
    # Beam's client logs the failed upload with its traceback: the error line says it all.
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]


def test_missing_s3_model_is_a_launch_error(s3_endpoint, export, tmp_path):
    from pipeline.errors import ExportConfigError

    with pytest.raises(ExportConfigError, match="does not exist"):
        run_export(
            [
                "--model",
                f"s3://{BUCKET}/models/absent",
                "--input",
                CORPUS,
                "--output",
                f"s3://{BUCKET}/exports/run2",
            ]
            + s3_flags(s3_endpoint)
        )
    assert keys(s3_endpoint, "exports/run2/") == []


@pytest.mark.slow
def test_reuse_of_an_s3_export(s3_endpoint, export, tmp_path, monkeypatch):
    """--reuse reads an earlier export on S3: every unchanged document's row is copied, bit for bit."""
    _, documents = export
    share_one_s3_client(monkeypatch, s3_endpoint)
    output = str(tmp_path / "run2")
    flags = ["--model", MODEL, "--input", CORPUS, "--output", output, "--layer", "lstm_content"]
    summary = run_export([*flags, "--reuse", OUTPUT, *s3_flags(s3_endpoint)])
    assert summary.exit_code == 0, summary.message
    assert summary.rows_reused == summary.rows_written == GOOD_DOCUMENTS
    earlier = pa.concat_tables(
        [read_parquet(s3_endpoint, k) for k in keys(s3_endpoint, "exports/run1/part-")]
    )
    reused = pq.read_table(output, ignore_prefixes=["_", ".", ERRORS_DIR])
    assert reused.sort_by("id").equals(earlier.sort_by("id"))


@pytest.mark.slow
def test_a_killed_s3_export_resumes_bit_for_bit(s3_endpoint, export, monkeypatch):
    """A run killed (SIGKILL) after closing two row files on S3 is resumed, equal to an uninterrupted one.

    Its output is a console-made folder (an `exports/resumed/` object): the rerun deleted that
    "leftover", which Beam takes for the whole prefix: the kept rows and the rerun's own lease."""
    s3 = client(s3_endpoint)
    s3.put_object(Bucket=BUCKET, Key="exports/resumed/", Body=b"")
    with open(SAMPLE_CORPUS, encoding="utf-8") as handle:
        first_lines = "".join(handle.readlines()[:800])
    s3.put_object(Bucket=BUCKET, Key="resume-corpus/sample.jsonl", Body=first_lines.encode("utf-8"))
    corpus = f"s3://{BUCKET}/resume-corpus/*.jsonl"
    flags = ["--model", MODEL, "--layer", "lstm_content", "--batch_size", "8", *s3_flags(s3_endpoint)]
    output, reference = f"s3://{BUCKET}/exports/resumed", f"s3://{BUCKET}/exports/uninterrupted"

    def durable():
        # An S3 object exists only once its upload is complete: every listed file has its footer.
        time.sleep(0.1)  # The S3 server shares this process: list it a few times a second.
        return [key for key in keys(s3_endpoint, "exports/resumed/_staging/") if "/part-writing/" in key]

    # Small files for the killed run only: --checkpoint_seconds is not part of the run's signature.
    command = pipeline_command(corpus, output, *flags, "--checkpoint_seconds", "0.2")
    assert kill_group_when(command, lambda: len(durable()) >= 2)
    kept_rows = sum(read_parquet(s3_endpoint, key).num_rows for key in durable())
    assert read_manifest(output) is None and kept_rows > 0

    # The killed run's lease on the output lapses after LEASE_SECONDS; the rerun comes later (by the
    # lock's clock: the store's own time of the lease's write counts too, and cannot be set back).
    class _Later:
        def __getattr__(self, name):
            return getattr(time, name)

        @staticmethod
        def time():
            return time.time() + lock_lib.LEASE_SECONDS + 1

    monkeypatch.setattr(lock_lib, "time", _Later())
    # The store's clock too (a probe file's time against the lease's).
    monkeypatch.setattr(lock_lib.OutputLock, "_store_age", lambda self: lock_lib.LEASE_SECONDS + 1)
    share_one_s3_client(monkeypatch, s3_endpoint)
    summary = run_export(["--input", corpus, "--output", output, *flags])
    assert summary.exit_code == 0, summary.message
    assert summary.rows_kept >= kept_rows and summary.rows_kept < summary.rows_written
    run_export(["--input", corpus, "--output", reference, *flags])

    def rows(prefix):
        return pa.concat_tables([read_parquet(s3_endpoint, k) for k in keys(s3_endpoint, f"{prefix}/part-")])

    assert rows("exports/resumed").sort_by("id").equals(rows("exports/uninterrupted").sort_by("id"))
    assert read_manifest(output)["counts"] == read_manifest(reference)["counts"]
    assert read_manifest(output)["resumed"]["rows_kept"] == summary.rows_kept
    assert keys(s3_endpoint, "exports/resumed/_staging/") == []
    assert "exports/resumed/" in keys(s3_endpoint, "exports/resumed/")


def test_an_object_changed_or_deleted_after_the_listing_is_found_by_the_readers_check(s3_endpoint):
    """On S3 the check is the object's size and last-modified time, as Beam's metadata gives them."""
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipeline.reading.listing import InputChanged, check_unchanged, list_input

    FileSystems.set_options(PipelineOptions(s3_flags(s3_endpoint)))
    s3 = client(s3_endpoint)
    for name in ("a", "b"):
        s3.put_object(Bucket=BUCKET, Key=f"changing/{name}.jsonl", Body=b'{"id": "1", "content": "x"}\n')
    listed, non_regular = list_input(f"s3://{BUCKET}/changing/*.jsonl")
    assert non_regular == [] and [f.size for f in listed] == [28, 28]
    assert all(f.mtime for f in listed)
    for entry in listed:
        check_unchanged(entry)  # as listed: no complaint
    s3.put_object(Bucket=BUCKET, Key="changing/a.jsonl", Body=b'{"id": "1"}\n')  # cut by a rewrite
    s3.delete_object(Bucket=BUCKET, Key="changing/b.jsonl")
    with pytest.raises(InputChanged, match="listed 28 bytes.*now 12 bytes"):
        check_unchanged(listed[0])
    with pytest.raises(InputChanged, match="not found now"):
        check_unchanged(listed[1])


def test_index_of_an_s3_export_is_built_locally_uploaded_and_dropped_by_overwrite(
    s3_endpoint, export, monkeypatch, capsys
):
    """The index of an s3:// export: uploaded next to it, used by neighbors, gone after --overwrite."""
    from pipeline import analyze
    from pipeline.analysis.dataset import open_documents
    from pipeline.analysis.neighbors import find_neighbors, indexed_neighbors, open_index

    set_aws_environment(monkeypatch, s3_endpoint)
    s3 = client(s3_endpoint)
    # A copy of the export: replacing it below must not disturb the module's other tests.
    for key in keys(s3_endpoint, "exports/run1/"):
        target = key.replace("exports/run1/", "exports/indexed/", 1)
        s3.copy_object(Bucket=BUCKET, Key=target, CopySource={"Bucket": BUCKET, "Key": key})
    output = f"s3://{BUCKET}/exports/indexed"
    # 24 rows: links for every row and a search that keeps them all make the index exact.
    flags = ["--connectivity", "32", "--expansion_add", "64", "--expansion_search", "64"]
    assert analyze.main([output, "index", "--column", "lstm_content", *flags]) == 0
    assert (
        f"recall@10 1.0000 against the exact scan on {GOOD_DOCUMENTS} random rows" in capsys.readouterr().out
    )
    stored = [k for k in keys(s3_endpoint, "exports/indexed/_index/") if not k.endswith("/")]
    assert stored == [
        "exports/indexed/_index/lstm_content.json",
        "exports/indexed/_index/lstm_content.usearch",
    ]
    metadata = json.loads(s3.get_object(Bucket=BUCKET, Key=stored[0])["Body"].read())
    body = s3.get_object(Bucket=BUCKET, Key=stored[1])["Body"].read()
    assert metadata["sha256"] == hashlib.sha256(body).hexdigest() and metadata["bytes"] == len(body)
    manifest = s3.get_object(Bucket=BUCKET, Key=f"exports/indexed/{MANIFEST}")["Body"].read()
    assert metadata["source"]["manifest_sha256"] == hashlib.sha256(manifest).hexdigest()

    _, documents = export
    key = documents[0]["id"]
    data = open_documents(output)
    indexed, _ = indexed_neighbors(data, open_index(data, "lstm_content"), key, k=5)
    exact, _ = find_neighbors(data, key, "lstm_content", k=5)
    assert [n.key for n in indexed] == [n.key for n in exact]
    assert analyze.main([output, "neighbors", "--id", key, "--column", "lstm_content"]) == 0
    assert f"Using the index {output}/_index/lstm_content.usearch" in capsys.readouterr().out

    # The index is ours: --overwrite replaces the export and drops it.
    flags = [
        "--model",
        MODEL,
        "--input",
        CORPUS,
        "--output",
        output,
        "--layer",
        "lstm_content",
        "--overwrite",
    ]
    # The index was read and written through the AWS_* variables above; the export's own S3
    # calls take the flags, through one client as in this file's other exports.
    share_one_s3_client(monkeypatch, s3_endpoint)
    summary = run_export(flags + s3_flags(s3_endpoint))
    assert summary.exit_code == 0, summary.message
    assert [k for k in keys(s3_endpoint, "exports/indexed/_index/") if not k.endswith("/")] == []
    assert analyze.main([output, "neighbors", "--id", key, "--column", "lstm_content"]) == 0
    assert "rows compared)" in capsys.readouterr().out


def test_a_first_s3_index_build_killed_before_its_metadata_leaves_the_export_replaceable(
    s3_endpoint, export, monkeypatch
):
    """Killed between the upload of the index file and that of its metadata, the first build of an
    s3:// export must leave nothing that no metadata of ours names: --overwrite would refuse the
    export for it, as a user's file."""
    from pipeline.analysis import index_build
    from pipeline.analysis.dataset import open_documents
    from pipeline.writing.state import check_output_state

    set_aws_environment(monkeypatch, s3_endpoint)
    s3 = client(s3_endpoint)
    for key in keys(s3_endpoint, "exports/run1/"):
        target = key.replace("exports/run1/", "exports/index_killed/", 1)
        s3.copy_object(Bucket=BUCKET, Key=target, CopySource={"Bucket": BUCKET, "Key": key})
    output = f"s3://{BUCKET}/exports/index_killed"
    write = index_build._write_bytes

    def killed_before_the_metadata(filesystem, target, data):
        if target.endswith(".json"):
            raise KeyboardInterrupt
        write(filesystem, target, data)

    monkeypatch.setattr(index_build, "_write_bytes", killed_before_the_metadata)
    settings = index_build.IndexSettings(recall_queries=5)
    with pytest.raises(KeyboardInterrupt):
        index_build.build_index(open_documents(output), "lstm_content", settings)
    monkeypatch.undo()
    set_aws_environment(monkeypatch, s3_endpoint)
    FileSystems.set_options(PipelineOptions(s3_flags(s3_endpoint)))
    assert check_output_state(output, overwrite=True) == "finished"
    # The next build finishes it, leaving the index and its metadata only.
    index_build.build_index(open_documents(output), "lstm_content", settings)
    assert [k for k in keys(s3_endpoint, "exports/index_killed/_index/") if not k.endswith("/")] == [
        "exports/index_killed/_index/lstm_content.json",
        "exports/index_killed/_index/lstm_content.usearch",
    ]


def test_analysis_reads_an_s3_export_at_its_key_as_typed(s3_endpoint, export, monkeypatch, capsys):
    """An --output with "%20", a space or a non-ASCII letter is the key Beam wrote: pyarrow's URI
    parser read `p%20q` as the directory `p q` (another export answered) and refused `é b`."""
    from pipeline import analyze
    from pipeline.analysis.dataset import open_documents

    set_aws_environment(monkeypatch, s3_endpoint)
    s3 = client(s3_endpoint)
    stored = keys(s3_endpoint, "exports/run1/")
    for directory in ("exports/p%20q", "exports/é b+c"):
        for key in stored:
            target = key.replace("exports/run1", directory, 1)
            s3.copy_object(Bucket=BUCKET, Key=target, CopySource={"Bucket": BUCKET, "Key": key})
    # A decoy at the decoded name, with fewer rows: the answer must not come from it.
    decoy = pa.table({"id": ["decoy"], "lstm_content": pa.array([[0.5] * 128], pa.list_(pa.float32(), 128))})
    sink = pa.BufferOutputStream()
    pq.write_table(decoy, sink)
    s3.put_object(
        Bucket=BUCKET, Key="exports/p q/part-00000-of-00001.parquet", Body=sink.getvalue().to_pybytes()
    )
    for directory in ("exports/p%20q", "exports/é b+c"):
        assert open_documents(f"s3://{BUCKET}/{directory}").dataset.count_rows() == GOOD_DOCUMENTS
    _, documents = export
    assert analyze.main([f"s3://{BUCKET}/exports/p%20q", "neighbors", "--id", documents[0]["id"]]) == 0
    assert "decoy" not in capsys.readouterr().out
    # pyarrow cannot address a key with an empty part: one line, not its traceback.
    assert analyze.main([f"s3://{BUCKET}/exports//run1", "neighbors", "--id", documents[0]["id"]]) == 2
    assert 'has an empty part ("//")' in capsys.readouterr().err


@pytest.mark.slow
def test_analysis_tools_in_a_fresh_process_use_s3_through_the_aws_variables(s3_endpoint, tmp_path):
    """analyze, vocabulary and inspect as a user runs them: a new process, only the AWS_* variables set.

    In the test process an export has configured Beam's S3 filesystem; a fresh process has not,
    and must configure it from the same variables pyarrow reads. The processes are forked from the
    fork server, which imported the modules but never configured a filesystem or an S3 client: as
    fresh for S3 as a cold start, without four cold imports of TensorFlow.
    """
    s3 = client(s3_endpoint)
    rows = {"id": ["d0", "d1", "d2"], "v": [[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]]}
    local = tmp_path / "part-00000-of-00001.parquet"
    pq.write_table(pa.table(rows), local)
    manifest = {"shards": {"rows": [{"file": local.name, "rows": 3, "bytes": local.stat().st_size}]}}
    s3.upload_file(str(local), BUCKET, f"exports/fresh/{local.name}")
    s3.put_object(Bucket=BUCKET, Key=f"exports/fresh/{MANIFEST}", Body=json.dumps(manifest).encode())
    s3.upload_file(os.path.join(DEFAULT_BUNDLE, "model.keras"), BUCKET, "models/fresh/m.keras")
    environment = {
        **os.environ,
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": REGION,
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    repository = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def tool(*argv):
        return forkserver.run(
            [sys.executable, "-m", *argv], env=environment, cwd=repository, capture_output=True, text=True
        )

    export = f"s3://{BUCKET}/exports/fresh"
    found = tool("pipeline.analyze", export, "neighbors", "--id", "d0", "--column", "v", "-k", "1")
    assert found.returncode == 0, found.stderr
    assert "d1" in found.stdout and "commit" not in found.stderr
    queries = tmp_path / "ids.txt"
    queries.write_text("d0\nd2\n", encoding="utf-8")
    answers = f"s3://{BUCKET}/answers/fresh.parquet"
    batch = tool(
        "pipeline.analyze", export, "neighbors", "--queries", str(queries), "-k", "1", "--out", answers
    )
    assert batch.returncode == 0, batch.stderr
    assert read_parquet(s3_endpoint, "answers/fresh.parquet")["id"].to_pylist() == ["d1", "d1"]
    written = tool("pipeline.vocabulary", "--layer", "emb", "--output", f"s3://{BUCKET}/vocabularies/fresh")
    assert written.returncode == 0, written.stderr
    table = read_parquet(s3_endpoint, "vocabularies/fresh/vocabulary.parquet")
    assert table.num_rows == load_bundle(DEFAULT_BUNDLE).model.get_layer("emb").input_dim
    inspected = tool("pipeline.inspect", f"s3://{BUCKET}/models/fresh/m.keras", "--tokenizer", "none")
    assert inspected.returncode == 0, inspected.stderr
    assert "lstm_title" in inspected.stdout


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _environment_without_aws(tmp_path, **extra):
    """This process's environment with no AWS credentials anywhere: variables, files, instance metadata."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    environment.update(
        PYTHONPATH=REPOSITORY,
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "absent-credentials"),
        AWS_CONFIG_FILE=str(tmp_path / "absent-config"),
        AWS_EC2_METADATA_DISABLED="true",
        **extra,
    )
    return environment


def _one_error_line(result):
    assert "Traceback" not in result.stderr and "Retry with exponential backoff" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-3000:]
    return errors[0]


def test_an_unreachable_s3_endpoint_is_one_error_in_seconds(s3_endpoint, tmp_path):
    """A typo in --s3_endpoint_url's port: Beam retried the listing for 467 s, a traceback per retry."""
    endpoint = f"http://127.0.0.1:{_free_port()}"
    flags = [f"--s3_endpoint_url={endpoint}", *s3_flags(s3_endpoint)[1:]]
    command = pipeline_command(CORPUS, tmp_path / "out", *flags)
    # Bounded: the bug was minutes of retries; the probe answers before the model is loaded.
    result = forkserver.run(
        command,
        cwd=REPOSITORY,
        env=_environment_without_aws(tmp_path),
        capture_output=True,
        text=True,
        timeout=90,
    )
    error = _one_error_line(result)
    assert f"--input {CORPUS!r}: cannot reach {endpoint}" in error and "--s3_endpoint_url" in error
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("flag", "uri", "hint"),
    [
        ("input", "s3://localhost:9000/b/corpus/*.jsonl", "goes in --s3_endpoint_url"),
        ("output", "s3://my bucket/emb", "Write it as s3://BUCKET/KEY"),
        ("model", "s3:///models/default_bundle", "Write it as s3://BUCKET/KEY"),
    ],
)
def test_an_s3_bucket_name_boto3_refuses_is_one_error(flag, uri, hint, tmp_path):
    """MinIO's host:port written into the path, a space, no bucket: botocore's ParamValidationError
    ended the launch in a traceback (exit 1), from the store probe."""
    flags = {"input": CORPUS, "output": f"s3://{BUCKET}/exports/named", "model": MODEL, flag: uri}
    argv = [f"--{name}={value}" for name, value in flags.items()]
    with pytest.raises(ExportConfigError, match=rf"--{flag} .*is not an S3 bucket name.*{hint}"):
        run_export([*argv, "--s3_endpoint_url=http://127.0.0.1:9", "--s3_access_key_id=k"])


def test_the_tools_refuse_an_unreachable_s3_endpoint_in_seconds(s3_endpoint, monkeypatch, capsys):
    """analyze, vocabulary and inspect sat silent for minutes (Beam's S3 retries) when AWS_ENDPOINT_URL
    did not answer, and vocabulary six minutes for a bucket name boto3 refuses."""
    from pipeline import analyze, inspect, vocabulary

    endpoint = f"http://127.0.0.1:{_free_port()}"
    set_aws_environment(monkeypatch, endpoint)
    try:
        started = time.monotonic()
        assert analyze.main([f"s3://{BUCKET}/exports/run1", "neighbors", "--id", "x"]) == 2
        assert (
            f"error: OUTPUT_DIR 's3://{BUCKET}/exports/run1': cannot reach {endpoint}"
            in capsys.readouterr().err
        )
        assert vocabulary.main(["--output", f"s3://{BUCKET}/vocabularies/x"]) == 2
        assert f"error: --output 's3://{BUCKET}/vocabularies/x': cannot reach" in capsys.readouterr().err
        assert inspect.main([MODEL]) == 2
        assert f"error: MODEL {MODEL!r}: cannot reach" in capsys.readouterr().err
        assert vocabulary.main(["--output", "s3://localhost:9000/x"]) == 2
        assert "goes in --s3_endpoint_url" in capsys.readouterr().err
        assert time.monotonic() - started < 30
    finally:
        # Later tests read the module's server through Beam's options.
        FileSystems.set_options(PipelineOptions(s3_flags(s3_endpoint)))


def test_an_s3_output_with_a_slash_after_its_folder_marker_is_a_directory(s3_endpoint, monkeypatch):
    """The console's "Create folder" makes `exports/marked/`; --output s3://B/exports/marked/ (the URI
    as the console copies it) was refused: "is a file; --output names a directory"."""
    from pipeline.planning.locations import check_output

    share_one_s3_client(monkeypatch, s3_endpoint)
    FileSystems.set_options(PipelineOptions(s3_flags(s3_endpoint)))
    client(s3_endpoint).put_object(Bucket=BUCKET, Key="exports/marked/", Body=b"")
    check_output(f"s3://{BUCKET}/exports/marked/", overwrite=False)
    check_output(f"s3://{BUCKET}/exports/marked", overwrite=False)
    # A real object of that name (no slash) is still a file.
    client(s3_endpoint).put_object(Bucket=BUCKET, Key="exports/a-file", Body=b"x")
    with pytest.raises(ExportConfigError, match="is a file"):
        check_output(f"s3://{BUCKET}/exports/a-file", overwrite=False)


def test_s3_without_credentials_is_one_error_in_seconds(s3_endpoint, tmp_path):
    """No AWS_* variables, ~/.aws or instance metadata: 'Unable to locate credentials' was retried."""
    command = pipeline_command(CORPUS, tmp_path / "out", f"--s3_endpoint_url={s3_endpoint}")
    result = forkserver.run(
        command,
        cwd=REPOSITORY,
        env=_environment_without_aws(tmp_path, HOME=str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=90,
    )
    error = _one_error_line(result)
    assert "no usable AWS credentials" in error and "AWS_ACCESS_KEY_ID" in error


def test_sigterm_during_the_launch_checks_claims_no_kept_rows(s3_endpoint, tmp_path):
    """Stopped while a store was still being asked, the run said 'it keeps the rows this run made durable'."""
    with socket.socket() as silent:  # Takes the connection and never answers: a hung S3 endpoint.
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        silent.settimeout(60)
        flags = [f"--s3_endpoint_url=http://127.0.0.1:{silent.getsockname()[1]}", *s3_flags(s3_endpoint)[1:]]
        process = forkserver.popen(
            pipeline_command(CORPUS, tmp_path / "out", *flags),
            cwd=REPOSITORY,
            env=_environment_without_aws(tmp_path),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            connection, _ = silent.accept()  # The run is now waiting on the store, at launch.
            with connection:
                process.send_signal(signal.SIGTERM)
                _, stderr = process.communicate(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert process.returncode == EXIT_TERMINATED, stderr[-3000:]
    (line,) = [line for line in stderr.splitlines() if line.startswith("interrupted:")]
    assert "launch checks" in line and "before this run wrote anything" in line, line
    assert "made durable" not in line and "keeps the rows" not in line
    assert not (tmp_path / "out").exists()


def test_an_s3_endpoint_that_never_answers_is_one_error(s3_endpoint, monkeypatch):
    """A hung server takes the connection and says nothing: one read timeout, no retries."""
    from pipeline.errors import ExportConfigError
    from pipeline.planning import stores

    monkeypatch.setattr(stores, "READ_TIMEOUT_SECONDS", 0.5)
    with socket.socket() as silent:  # The kernel accepts connections for it; nothing ever answers.
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        flags = ["--input", CORPUS, "--output", f"s3://{BUCKET}/exports/hung", "--s3_endpoint_url", endpoint]
        with pytest.raises(ExportConfigError, match=rf"--input .*: cannot reach {endpoint} \(Read timeout"):
            run_export(flags + s3_flags(s3_endpoint)[1:])


def test_the_input_listing_drops_folder_markers_and_globstar_matches_the_top_level(s3_endpoint):
    """A console "Create folder" marker (key ending in "/") is no corpus file; `**/` may match no folder."""
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipeline.reading.listing import list_input

    FileSystems.set_options(PipelineOptions(s3_flags(s3_endpoint)))
    s3 = client(s3_endpoint)
    for key in ("marked/", "marked/sub/"):
        s3.put_object(Bucket=BUCKET, Key=key, Body=b"")
    for key in ("marked/a.jsonl", "marked/sub/b.jsonl"):
        s3.put_object(Bucket=BUCKET, Key=key, Body=b'{"id": "1", "content": "x"}\n')
    prefix = f"s3://{BUCKET}/marked/"
    listed, _ = list_input(prefix + "*")
    assert [f.path for f in listed] == [prefix + "a.jsonl"]
    listed, _ = list_input(prefix + "**/*.jsonl")
    assert [f.path for f in listed] == [prefix + "a.jsonl", prefix + "sub/b.jsonl"]


def test_an_input_naming_an_object_with_brackets_is_that_object(s3_endpoint):
    """`data[1].jsonl` is a glob class to Beam; locally a pattern matching nothing that names an
    existing file is that file, on S3 it 'matches no files'."""
    from pipeline.reading.listing import AmbiguousPattern, list_input

    FileSystems.set_options(PipelineOptions(s3_flags(s3_endpoint)))
    client(s3_endpoint).put_object(Bucket=BUCKET, Key="literal/data[1].jsonl", Body=b'{"id": "1"}\n')
    named = f"s3://{BUCKET}/literal/data[1].jsonl"
    listed, _ = list_input(named)
    assert [(f.path, f.size) for f in listed] == [(named, 12)]
    assert list_input(f"s3://{BUCKET}/literal/data[2].jsonl") == ([], [])
    # Named, and as a pattern matching another object: which is meant is a guess, as locally.
    client(s3_endpoint).put_object(Bucket=BUCKET, Key="literal/data1.jsonl", Body=b'{"id": "2"}\n')
    with pytest.raises(AmbiguousPattern, match=r"\[\[\]1\]"):
        list_input(named)


def test_analyze_out_on_s3_is_never_inside_an_export_and_a_plot_is_uploaded(
    s3_endpoint, tmp_path, monkeypatch, capsys
):
    """An s3:// --out skipped the "never inside an export" check (an answer landed in the export's
    prefix, even named part-99999-of-99999.parquet), and plot wrote to a local path named 's3:/...'."""
    from pipeline import analyze

    set_aws_environment(monkeypatch, s3_endpoint)
    monkeypatch.chdir(tmp_path)  # where a local 's3:' directory would have appeared
    s3 = client(s3_endpoint)
    rows = {"id": ["d0", "d1", "d2"], "v": [[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]], "topic": ["a", "a", "b"]}
    local = tmp_path / "part-00000-of-00001.parquet"
    pq.write_table(pa.table(rows), local)
    manifest = {"shards": {"rows": [{"file": local.name, "rows": 3, "bytes": local.stat().st_size}]}}
    s3.upload_file(str(local), BUCKET, f"outs/exp/{local.name}")
    s3.put_object(Bucket=BUCKET, Key=f"outs/exp/{MANIFEST}", Body=json.dumps(manifest).encode())
    s3.put_object(Bucket=BUCKET, Key="outs/vocab/vocabulary.parquet", Body=b"a vocabulary")
    s3.put_object(Bucket=BUCKET, Key="outs/running/_staging/0123456789ab/run.json", Body=b"{}")
    export = f"s3://{BUCKET}/outs/exp"
    before = keys(s3_endpoint, "outs/")
    queries = tmp_path / "ids.txt"
    queries.write_text("d0\n", encoding="utf-8")
    for out, marker in (
        (f"{export}/answers.parquet", MANIFEST),
        (f"{export}/part-99999-of-99999.parquet", MANIFEST),
        (f"{export}/sub/dir/answers.parquet", MANIFEST),
        (f"s3://{BUCKET}/outs/vocab/answers.parquet", "vocabulary.parquet"),
        (f"s3://{BUCKET}/outs/running/answers.parquet", "_staging/"),
    ):
        for command in (["neighbors", "--queries", str(queries)], ["plot"]):
            out_file = out if command[0] == "neighbors" else out.replace(".parquet", ".png")
            assert analyze.main([export, *command, "--out", out_file]) == 2
            err = capsys.readouterr().err
            assert err.startswith("error: ") and "Traceback" not in err, err
            assert f"holds {marker})" in err and "choose a path outside it" in err, err
    assert keys(s3_endpoint, "outs/") == before
    assert analyze.main([export, "plot", "--label", "topic", "--out", f"s3://{BUCKET}/plots/p.png"]) == 0
    body = s3.get_object(Bucket=BUCKET, Key="plots/p.png")["Body"].read()
    assert body[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(tmp_path)) == sorted([local.name, "ids.txt"])
    assert analyze.main([export, "plot", "--out", f"s3://{BUCKET}/plots/p.png"]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err


def test_an_s3_out_that_is_a_bucket_a_directory_or_in_no_bucket_is_refused_before_the_scan(
    s3_endpoint, tmp_path, monkeypatch, capsys
):
    """--out s3://BUCKET hung for minutes (Beam's S3 client retried the bucket's root); a missing bucket
    or an empty path part ended in a traceback after the scan; a directory got an object beside it."""
    from pipeline import analyze

    set_aws_environment(monkeypatch, s3_endpoint)
    s3 = client(s3_endpoint)
    local = tmp_path / "part-00000-of-00001.parquet"
    pq.write_table(pa.table({"id": ["d0", "d1"], "v": [[1.0, 0.0], [0.9, 0.1]]}), local)
    manifest = {"shards": {"rows": [{"file": local.name, "rows": 2, "bytes": local.stat().st_size}]}}
    s3.upload_file(str(local), BUCKET, f"refused/exp/{local.name}")
    s3.put_object(Bucket=BUCKET, Key=f"refused/exp/{MANIFEST}", Body=json.dumps(manifest).encode())
    s3.put_object(Bucket=BUCKET, Key="refused/answers/earlier.parquet", Body=b"an earlier answer")
    queries = tmp_path / "ids.txt"
    queries.write_text("d0\n", encoding="utf-8")
    scanned = []
    monkeypatch.setattr(analyze, "batch_neighbors", lambda *args, **kwargs: scanned.append(args))
    before = keys(s3_endpoint, "")
    for out, problem in (
        (f"s3://{BUCKET}", "names a bucket, not a file"),
        (f"s3://{BUCKET}//a.parquet", "has an empty part between two '/'"),
        ("s3://no-such-bucket-here/a.parquet", "the bucket 'no-such-bucket-here' does not exist"),
        (f"s3://{BUCKET}/refused/answers", "is a directory (it holds objects)"),
    ):
        started = time.monotonic()
        argv = [f"s3://{BUCKET}/refused/exp", "neighbors", "--queries", str(queries), "--out", out]
        assert analyze.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and problem in err and err.count("\n") == 1, err
        assert time.monotonic() - started < 20
    assert not scanned and keys(s3_endpoint, "") == before


def _upload_three_row_export(s3, tmp_path, prefix):
    """A finished export of three 2-d rows (d0, d1, d2) at `prefix` in BUCKET."""
    local = tmp_path / "part-00000-of-00001.parquet"
    pq.write_table(pa.table({"id": ["d0", "d1", "d2"], "v": [[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]]}), local)
    manifest = {"shards": {"rows": [{"file": local.name, "rows": 3, "bytes": local.stat().st_size}]}}
    s3.upload_file(str(local), BUCKET, f"{prefix}/{local.name}")
    s3.put_object(Bucket=BUCKET, Key=f"{prefix}/{MANIFEST}", Body=json.dumps(manifest).encode())


def test_a_queries_file_on_s3_is_read_from_s3(s3_endpoint, tmp_path, monkeypatch, capsys):
    """--queries s3://... was "not a file": read_queries looked for it on the local disk."""
    from pipeline import analyze

    set_aws_environment(monkeypatch, s3_endpoint)
    s3 = client(s3_endpoint)
    _upload_three_row_export(s3, tmp_path, "queried/exp")
    s3.put_object(Bucket=BUCKET, Key="queried/ids.txt", Body=b"d0\nd2\n")
    out = tmp_path / "a.parquet"
    export = f"s3://{BUCKET}/queried/exp"
    argv = [export, "neighbors", "--queries", f"s3://{BUCKET}/queried/ids.txt", "-k", "1", "--out", str(out)]
    assert analyze.main(argv) == 0, capsys.readouterr().err
    assert pq.read_table(out).select(["query", "id"]).to_pylist() == [
        {"query": "d0", "id": "d1"},
        {"query": "d2", "id": "d1"},
    ]
    assert analyze.main([*argv[:3], f"s3://{BUCKET}/queried/none.txt", *argv[4:], "--overwrite"]) == 2
    assert "is not a file" in capsys.readouterr().err


def test_an_s3_out_or_queries_key_with_a_percent_sign_or_a_space_is_the_key_as_typed(
    s3_endpoint, tmp_path, monkeypatch, capsys
):
    """The --out check and the --queries reader decoded the key (pyarrow's URI parser) while the answer was
    uploaded at the key as typed: an existing `a%20b.parquet` was replaced without --overwrite (the check
    looked at `a b.parquet`), and a key with a space was refused as 'Cannot parse URI'."""
    from pipeline import analyze

    set_aws_environment(monkeypatch, s3_endpoint)
    s3 = client(s3_endpoint)
    _upload_three_row_export(s3, tmp_path, "typed/exp")
    s3.put_object(Bucket=BUCKET, Key="typed/answers/a%20b.parquet", Body=b"the user's earlier answer")
    for key in ("typed/q%2Bs/ids.txt", "typed/my q/ids.txt"):
        s3.put_object(Bucket=BUCKET, Key=key, Body=b"d0\n")
    export = f"s3://{BUCKET}/typed/exp"
    queries = tmp_path / "ids.txt"
    queries.write_text("d0\n", encoding="utf-8")
    argv = [export, "neighbors", "--queries", str(queries), "-k", "1", "--out"]
    assert analyze.main([*argv, f"s3://{BUCKET}/typed/answers/a%20b.parquet"]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert s3.get_object(Bucket=BUCKET, Key="typed/answers/a%20b.parquet")["Body"].read() == (
        b"the user's earlier answer"
    )
    spaced = f"s3://{BUCKET}/typed/answers/my answers.parquet"
    assert analyze.main([*argv, spaced]) == 0, capsys.readouterr().err
    assert "typed/answers/my answers.parquet" in keys(s3_endpoint, "typed/answers/")
    for key in ("typed/q%2Bs/ids.txt", "typed/my q/ids.txt"):
        out = tmp_path / "a.parquet"
        argv = [export, "neighbors", "--queries", f"s3://{BUCKET}/{key}", "-k", "1", "--out", str(out)]
        assert analyze.main([*argv, "--overwrite"]) == 0, capsys.readouterr().err
        assert pq.read_table(out).select(["query", "id"]).to_pylist() == [{"query": "d0", "id": "d1"}]
