"""The output directory is safe: overwrite touches only export files, one run per directory, no self-reads.

Also the launch-time refusals of a careless command line: misspelled flags,
duplicate column names, a tokenizer too large for the model, unusable outputs,
and Ctrl-C.  Every refusal exits 2 with one `error:` line and writes nothing.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import forkserver
import pyarrow.parquet as pq
import pytest
from pipeline_fixtures import REPOSITORY, pipeline_command, snapshot, wait_for_staging
from sizes import SIZES

from models.bundle import MANIFEST_FILE, MODEL_FILE, sha256_file
from pipeline.errors import (
    EXIT_CONFIG_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OUTPUT_FAILED,
    ExportConfigError,
    OutputBusyError,
    OutputWriteError,
)
from pipeline.run import main
from pipeline.running.export import run_export
from pipeline.writing import commit as commit_lib
from pipeline.writing import files as files_lib
from pipeline.writing import layout as layout_lib
from pipeline.writing import lock as lock_lib
from pipeline.writing import staging as staging_lib
from pipeline.writing import state as state_lib
from pipeline.writing.schema import ERROR_SCHEMA


def _write_corpus(path, count, start=0):
    with open(path, "w", encoding="utf-8") as handle:
        for index in range(start, start + count):
            words = " ".join(f"word{(index * 7 + k) % 40}" for k in range(3 + index % 9))
            handle.write(
                json.dumps({"id": f"doc{index}", "content": words, "title": f"word{index % 30}"}) + "\n"
            )
    return str(path)


def _refused(capsys, argv, pattern):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == EXIT_CONFIG_ERROR, err
    error_lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1 and "Traceback" not in err and "usage:" not in err, err
    assert pattern in error_lines[0], error_lines[0]
    return error_lines[0]


def _assert_complete_export(output, expected_ids):
    manifest = state_lib.read_manifest(output)
    assert manifest is not None and manifest["status"] == "succeeded"
    ids = []
    for shard in manifest["shards"]["rows"]:
        path = os.path.join(output, shard["file"])
        assert sha256_file(path) == shard["sha256"]
        ids += pq.read_table(path, columns=["id"]).column("id").to_pylist()
    assert sorted(ids) == sorted(expected_ids)
    listed = {s["file"] for s in manifest["shards"]["rows"] + manifest["shards"]["errors"]}
    on_disk = {
        os.path.relpath(os.path.join(root, name), output)
        for root, _, names in os.walk(output)
        for name in names
        if name != layout_lib.MANIFEST
    }
    assert on_disk == listed


def _read_lock(directory):
    with open(os.path.join(directory, layout_lib.LOCK)) as handle:
        return json.load(handle)


def _renewed_after(directory, renewed, timeout=30):
    """The lock's `renewed` time once it is later than `renewed`, or `renewed` after `timeout` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            current = _read_lock(directory)["renewed"]
        except ValueError:  # Read between the renewal's truncation of the file and its write.
            current = renewed
        if current > renewed:
            return current
        time.sleep(0.05)
    return renewed


# --- 1. --overwrite removes only what an export wrote ------------------------------------


def test_overwrite_refuses_an_output_that_holds_the_corpus(tmp_path, tiny_bundle, capsys):
    data = tmp_path / "data"
    data.mkdir()
    _write_corpus(data / "a.jsonl", 5)
    before = snapshot(data)
    argv = ["--model", tiny_bundle[0], "--input", str(data / "*.jsonl"), "--output", str(data), "--overwrite"]
    _refused(capsys, argv, "holds files that no export wrote")
    assert snapshot(data) == before


def test_overwrite_of_a_working_directory_touches_nothing(tmp_path, tiny_bundle, capsys, monkeypatch):
    work = tmp_path / "work"
    (work / ".git").mkdir(parents=True)
    (work / ".git" / "config").write_text("[core]\n")
    (work / "notes.txt").write_text("mine")
    corpus = _write_corpus(tmp_path / "c.jsonl", 5)
    before = snapshot(work)
    monkeypatch.chdir(work)
    message = _refused(
        capsys,
        ["--model", tiny_bundle[0], "--input", corpus, "--output", ".", "--overwrite"],
        "no export wrote",
    )
    assert ".git/config" in message and "notes.txt" in message
    assert snapshot(work) == before


def test_overwrite_replaces_a_finished_export_and_nothing_else(tmp_path, tiny_bundle):
    corpus = _write_corpus(tmp_path / "c.jsonl", 6)
    output = str(tmp_path / "out")
    run_export(["--model", tiny_bundle[0], "--input", corpus, "--output", output])
    # A file of the user's beside the export makes the directory foreign: refused, kept.
    with open(os.path.join(output, "part-1.parquet"), "w") as handle:
        handle.write("not ours: not Beam's shard naming")
    before = snapshot(output)
    with pytest.raises(ExportConfigError, match="no export wrote"):
        run_export(["--model", tiny_bundle[0], "--input", corpus, "--output", output, "--overwrite"])
    assert snapshot(output) == before
    os.remove(os.path.join(output, "part-1.parquet"))
    smaller = _write_corpus(tmp_path / "smaller.jsonl", 3)
    run_export(["--model", tiny_bundle[0], "--input", smaller, "--output", output, "--overwrite"])
    _assert_complete_export(output, [f"doc{i}" for i in range(3)])


@pytest.mark.parametrize("damage", [b'{"status": "succ', b"[]"], ids=["truncated", "not_an_object"])
def test_overwrite_replaces_an_export_whose_manifest_is_damaged(damage, tmp_path, tiny_bundle, capsys):
    """It ran the whole pipeline, then died on the manifest, at every rerun; --reuse of it said why."""
    corpus = _write_corpus(tmp_path / "c.jsonl", 6)
    output = str(tmp_path / "out")
    run_export(["--model", tiny_bundle[0], "--input", corpus, "--output", output])
    # The dead letters of a failed --overwrite that kept this export: ours too, by their footer.
    failed = os.path.join(output, layout_lib.FAILED_DIR, "0123456789ab", layout_lib.ERRORS_DIR)
    os.makedirs(failed)
    pq.write_table(ERROR_SCHEMA.empty_table(), os.path.join(failed, "part-00000-of-00001.parquet"))
    with open(os.path.join(output, layout_lib.MANIFEST), "wb") as handle:
        handle.write(damage)
    argv = ["--model", tiny_bundle[0], "--input", corpus]
    message = _refused(capsys, [*argv, "--output", str(tmp_path / "new"), "--reuse", output], "is damaged")
    assert "_MANIFEST.json" in message
    smaller = _write_corpus(tmp_path / "smaller.jsonl", 3)
    run_export(["--model", tiny_bundle[0], "--input", smaller, "--output", output, "--overwrite"])
    _assert_complete_export(output, [f"doc{i}" for i in range(3)])


def test_a_big_foreign_tree_is_refused_without_walking_it_whole(tmp_path, monkeypatch):
    """--output "$OUT/" with OUT unset is --output /: it walked the whole filesystem, then failed
    with a traceback on a file gone since its listing (/proc)."""
    tree = tmp_path / "usr"
    for index in range(40):
        (tree / f"d{index}").mkdir(parents=True)
        (tree / f"d{index}" / "f").write_text("x")
    walked = []
    real_walk = os.walk

    def walk(top, *args, **kwargs):
        for root, directories, names in real_walk(top, *args, **kwargs):
            walked.append(root)
            # A file listed, then gone before its lstat.
            yield root, directories, [*names, "gone-since-the-listing"]

    monkeypatch.setattr(files_lib.os, "walk", walk)
    assert state_lib.output_state(str(tree)) == "foreign"
    assert len(walked) <= state_lib.FOREIGN_EXAMPLES + 1  # of 41 directories
    assert len(state_lib.foreign_files(str(tree))) == state_lib.FOREIGN_EXAMPLES


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]], ids=["plain", "overwrite"])
@pytest.mark.parametrize(
    "names",
    [
        ["part-00000-of-00002.parquet", "part-00001-of-00002.parquet"],
        ["part-00000-of-00001.parquet"],
        ["errors/part-00000-of-00001.parquet", "_tables/emb.parquet"],
    ],
    ids=["beam_job_output", "one_shard", "dead_letters_and_table"],
)
def test_export_named_files_without_a_manifest_are_refused_and_kept(names, overwrite, tmp_path, capsys):
    """Another Beam job's output (its shards are named as ours) is not the leftovers of a dead run."""
    import pyarrow as pa

    output = tmp_path / "beam_job"
    for name in names:
        (output / name).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"user_id": [1, 2], "score": [0.5, 0.25]}), output / name)
    corpus = _write_corpus(tmp_path / "c.jsonl", 3)
    before = snapshot(output)
    message = _refused(capsys, ["--input", corpus, "--output", str(output), *overwrite], "no export wrote")
    assert names[0] in message and "_MANIFEST.json" in message
    assert snapshot(output) == before
    # A dead run's staging area beside them does not make them ours either.
    (output / "_staging" / "0123456789ab").mkdir(parents=True)
    _refused(capsys, ["--input", corpus, "--output", str(output), *overwrite], "no export wrote")
    assert all((output / name).exists() for name in names)


def test_another_tools_manifest_and_shard_named_files_the_manifest_does_not_list_are_not_ours(
    tmp_path, tiny_bundle, capsys
):
    """--overwrite deleted a Spark job's part files beside its own _MANIFEST.json, and a user's
    part-00005-of-00009.parquet inside an export whose manifest does not list it."""
    import pyarrow as pa

    corpus = _write_corpus(tmp_path / "c.jsonl", 3)
    argv = ["--model", tiny_bundle[0], "--input", corpus, "--overwrite"]
    names = ("part-00000-of-00002.parquet", "part-00001-of-00002.parquet")
    names += ("errors/part-00000-of-00001.parquet",)
    # Manifests we would take for a damaged one of ours (it lists nothing): the files' footers are not ours.
    for index, manifest in enumerate(
        [
            '{"generator": "someone-elses-spark-job", "files": 3}',
            json.dumps([{"file": name} for name in names]),
            json.dumps({"status": "complete", "shards": list(names)}),
            "part-00000-of-00002.parquet\npart-00001-of-00002.parquet\n",
        ]
    ):
        spark = tmp_path / f"spark_job{index}"
        (spark / "errors").mkdir(parents=True)
        (spark / layout_lib.MANIFEST).write_text(manifest)
        for name in names:
            pq.write_table(pa.table({"user_id": [1, 2]}), spark / name)
        before = snapshot(spark)
        message = _refused(capsys, [*argv, "--output", str(spark)], "no export wrote")
        assert "part-00000-of-00002.parquet" in message
        assert snapshot(spark) == before

    output = tmp_path / "out"
    run_export(["--model", tiny_bundle[0], "--input", corpus, "--output", str(output)])
    for name in ("part-00005-of-00009.parquet", "errors/part-00003-of-00004.parquet"):
        pq.write_table(pa.table({"mine": [1]}), output / name)
        before = snapshot(output)
        message = _refused(capsys, [*argv, "--output", str(output)], "no export wrote")
        assert name in message
        assert snapshot(output) == before
        os.remove(output / name)
    run_export([*argv, "--output", str(output)])
    _assert_complete_export(str(output), [f"doc{i}" for i in range(3)])


@pytest.mark.parametrize(
    "inner, pattern",
    [
        ("v1/retry", "is inside"),
        ("v1/a/b", "is inside"),
        ("exports/_staging/today", "is below"),
        ("exports/_staging", "is a directory named _staging"),
        ("link/new", "is inside"),
        ("staging_link", "leads to"),
    ],
)
def test_an_output_inside_an_export_or_a_staging_directory_is_refused(inner, pattern, tmp_path, capsys):
    """Nested exports: read as the outer one's rows, or removed whole as a dead run's staging."""
    corpus = _write_corpus(tmp_path / "c.jsonl", 3)
    (tmp_path / "v1" / "sub").mkdir(parents=True)
    (tmp_path / "v1" / layout_lib.MANIFEST).write_text("{}")
    (tmp_path / "link").symlink_to(tmp_path / "v1" / "sub")  # a link into the export
    (tmp_path / "q" / "_staging").mkdir(parents=True)
    (tmp_path / "staging_link").symlink_to(tmp_path / "q" / "_staging")  # a link to a staging directory
    before = snapshot(tmp_path)
    _refused(capsys, ["--input", corpus, "--output", str(tmp_path / inner)], pattern)
    assert snapshot(tmp_path) == before and (inner == "staging_link" or not (tmp_path / inner).exists())


def test_a_nested_table_directory_is_not_an_exports_own(tmp_path):
    """`_tables/` holds the tables themselves, never directories of Parquet files."""
    assert layout_lib.is_ours("_tables/emb.parquet")
    assert not layout_lib.is_ours("_tables/mine/part-00000-of-00001.parquet")


def test_an_output_that_is_a_dangling_link_or_a_file_is_named_as_such(tmp_path, capsys):
    corpus = _write_corpus(tmp_path / "c.jsonl", 3)
    link = tmp_path / "dangling"
    link.symlink_to(tmp_path / "nowhere")
    message = _refused(capsys, ["--input", corpus, "--output", str(link)], "a symbolic link to")
    assert "which does not exist" in message and not (tmp_path / "nowhere").exists()
    _refused(capsys, ["--input", corpus, "--output", corpus], f"--output {corpus!r} is a file")
    message = _refused(capsys, ["--input", corpus, "--output", f"{corpus}/out"], "a file, not a directory")
    assert f"is below {corpus!r}, which is a file" in message


# --- 3. an input pattern that would read the output ----------------------------------------


def test_input_pattern_that_matches_the_output_is_refused(tmp_path, tiny_bundle, capsys):
    directory = tmp_path / "dir"
    directory.mkdir()
    table = {"id": ["a", "b"], "content": ["word1 word2", "word3"], "title": ["word4", "word5"]}
    import pyarrow as pa

    pq.write_table(pa.table(table), directory / "corpus.parquet")
    argv = [
        "--model",
        tiny_bundle[0],
        "--input",
        str(directory / "**.parquet"),
        "--output",
        str(directory / "out"),
    ]
    _refused(capsys, argv, "would also match the files this export writes")
    assert sorted(os.listdir(directory)) == ["corpus.parquet"]
    # A pattern that cannot reach into --output is fine.
    argv[3] = str(directory / "*.parquet")
    assert main(argv) == 0


@pytest.mark.parametrize(
    "inner",
    [
        "_failed/0123456789ab/errors/part-00000-of-00001.parquet",
        "_tables/emb.parquet",
        "_staging/0123456789ab/_KEPT_IDS.parquet",
        "_index/emb.json",
    ],
)
def test_input_pattern_reaching_into_an_exports_own_files_is_refused(tmp_path, tiny_bundle, capsys, inner):
    """`exports/*/_failed/*/errors/*` (an earlier export's set-aside dead letters, its tables, its staging,
    its index) with --output exports/new was run: a later run would read the new export's own files."""
    import pyarrow as pa

    found = tmp_path / "exports" / "old" / inner
    found.parent.mkdir(parents=True)
    table = {"id": ["a"], "content": ["word1 word2"], "title": ["word4"]}
    if inner.endswith(".json"):
        found.write_text('{"id": "a", "content": "word1 word2", "title": "word4"}\n')
    else:
        pq.write_table(pa.table(table), found)
    pattern = str(tmp_path / "exports" / "*" / inner.replace("0123456789ab", "*").replace("emb", "*"))
    argv = ["--model", tiny_bundle[0], "--input", pattern, "--output", str(tmp_path / "exports" / "new")]
    if inner.endswith(".json"):
        argv += ["--input_format", "jsonl"]
    _refused(capsys, argv, "would also match the files this export writes")
    assert sorted(os.listdir(tmp_path / "exports")) == ["old"]


def test_output_inside_the_matched_input_is_refused(tmp_path, tiny_bundle, capsys):
    _write_corpus(tmp_path / "c.jsonl", 3)
    _refused(
        capsys,
        ["--model", tiny_bundle[0], "--input", str(tmp_path / "*"), "--output", str(tmp_path)],
        "holds files that",
    )


# --- 2. two runs, one output ----------------------------------------------------------------


def _command(bundle, corpus, output, *flags):
    return pipeline_command(corpus, output, "--model", bundle, *flags)


@pytest.mark.parametrize("flags", [(), ("--overwrite",)], ids=["plain", "overwrite"])
@pytest.mark.slow
def test_two_runs_at_once_leave_one_complete_export(tmp_path, tiny_bundle, flags):
    corpus = _write_corpus(tmp_path / "c.jsonl", 1000)
    output = str(tmp_path / "out")
    environment = dict(os.environ, PYTHONPATH=REPOSITORY)
    processes = [
        forkserver.popen(
            _command(tiny_bundle[0], corpus, output, "--batch_size", "64", *flags),
            cwd=REPOSITORY,
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in processes]
    for process in processes:
        process.stdout.close()
        process.stderr.close()
    codes = sorted(code for code, _ in results)
    # Either both ran one after the other (the second replaced the first with
    # --overwrite), or one was refused at launch: never a mix.
    assert codes in ([0, 0], [0, EXIT_CONFIG_ERROR]) if flags else codes == [0, EXIT_CONFIG_ERROR], results
    for code, err in results:
        assert "Traceback" not in err, err
        if code == EXIT_CONFIG_ERROR:
            assert "is in use by run" in err or "already holds a finished export" in err, err
    _assert_complete_export(output, [f"doc{i}" for i in range(1000)])


def test_a_held_output_is_refused_and_released_after(tmp_path, tiny_bundle):
    corpus = _write_corpus(tmp_path / "c.jsonl", 4)
    output = str(tmp_path / "out")
    with lock_lib.OutputLock(output):
        with pytest.raises(OutputBusyError, match="is in use by run"), lock_lib.OutputLock(output):
            pass
        with pytest.raises(OutputBusyError, match=f"pid {os.getpid()}"):
            run_export(["--model", tiny_bundle[0], "--input", corpus, "--output", output])
        assert os.listdir(output) == [layout_lib.LOCK]
    assert not os.path.exists(output)
    run_export(["--model", tiny_bundle[0], "--input", corpus, "--output", output])
    _assert_complete_export(output, [f"doc{i}" for i in range(4)])


def test_a_killed_holder_does_not_keep_the_lock(tmp_path):
    output = str(tmp_path / "out")
    holder = forkserver.popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pipeline.writing.lock import OutputLock;"
            "lock = OutputLock(sys.argv[1]).__enter__(); print('held', flush=True); time.sleep(600)",
            output,
        ],
        cwd=REPOSITORY,
        env=dict(os.environ, PYTHONPATH=REPOSITORY),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(OutputBusyError):
        lock_lib.OutputLock(output).__enter__()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    holder.stdout.close()
    with lock_lib.OutputLock(output):
        pass


def test_a_run_started_at_once_that_makes_the_new_output_first_is_no_unwritable_output(tmp_path, monkeypatch):
    """Two runs into one new --output: the other makes the directory between this run's look and its
    own `makedirs`, which then finds it there (refused as "cannot be written: File exists")."""
    output = str(tmp_path / "new" / "out")
    makedirs = os.makedirs

    def made_first_by_the_other_run(path, *args, **kwargs):
        makedirs(path)
        makedirs(path, *args, **kwargs)

    monkeypatch.setattr(os, "makedirs", made_first_by_the_other_run)
    with lock_lib.OutputLock(output):
        assert os.listdir(output) == [layout_lib.LOCK]
    assert os.path.isdir(output)  # the other run's directory: not this run's to remove


def _lock_as_a_user(*outputs):
    """Takes each of `outputs`' locks in turn, in one child process, as an ordinary user would (root
    without its power to write any file); returns what it said of each: "held" or the error."""
    as_user = os.geteuid() == 0
    if as_user and not forkserver.ENABLED and not shutil.which("setpriv"):
        pytest.skip("needs setpriv to drop root's DAC capabilities")
    code = (
        "import sys\nfrom pipeline.writing.lock import OutputLock\nfor output in sys.argv[1:]:\n"
        "    try:\n        with OutputLock(output):\n            print('held')\n"
        "    except Exception as error:\n        print(type(error).__name__, error)\n"
    )
    result = forkserver.run(
        [sys.executable, "-c", code, *outputs],
        cwd=REPOSITORY,
        env=dict(os.environ, PYTHONPATH=REPOSITORY),
        capture_output=True,
        text=True,
        timeout=120,
        without_file_override=as_user,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.splitlines()


def test_a_dead_runs_read_only_lock_file_is_replaced_and_a_live_ones_is_busy(tmp_path):
    """A stale `_LOCK` left read-only (copied from a read-only place; or a sudo run's) refused the
    output as "cannot be written ... Choose a writable --output", though no run held it."""
    outputs = [tmp_path / name for name in ("stale", "live", "unreadable")]
    for output, mode in zip(outputs, (0o444, 0o444, 0o000), strict=True):
        output.mkdir()
        (output / layout_lib.LOCK).write_text("{}")
        os.chmod(output / layout_lib.LOCK, mode)
    with lock_lib.OutputLock(str(outputs[1])):  # a live run's, read-only: busy, never replaced
        os.chmod(outputs[1] / layout_lib.LOCK, 0o444)
        stale, live, unreadable = _lock_as_a_user(*map(str, outputs))
    assert stale == "held"
    assert live.startswith("OutputBusyError") and f"pid {os.getpid()}" in live, live
    # One this user may not even open: it says which file to remove, not to choose another --output.
    assert "may not open or replace" in unreadable and "remove that file" in unreadable, unreadable


def _leased_bucket(tmp_path, monkeypatch, renew_seconds):
    """(a local directory standing in for a bucket, a lock holding its lease): the lease protocol
    runs on Beam's FileSystems API."""
    output = str(tmp_path / "bucket")
    os.makedirs(output)
    monkeypatch.setattr(lock_lib, "is_local", lambda path: False)
    monkeypatch.setattr(files_lib, "is_local", lambda path: False)
    monkeypatch.setattr(lock_lib, "LEASE_RENEW_SECONDS", renew_seconds)
    holder = lock_lib.OutputLock(output)
    holder._acquire_lease(settle_seconds=0)
    return output, holder


def test_lease_on_object_storage_refuses_a_live_holder_and_takes_over_a_stale_one(tmp_path, monkeypatch):
    output, first = _leased_bucket(tmp_path, monkeypatch, 0.2)
    with pytest.raises(OutputBusyError, match="is in use by run"):
        lock_lib.OutputLock(output)._acquire_lease(settle_seconds=0)
    renewed = _read_lock(output)["renewed"]
    assert _renewed_after(output, renewed) > renewed
    first.release()
    assert not os.path.exists(os.path.join(output, layout_lib.LOCK))
    # A lease nobody renewed for LEASE_SECONDS is a dead run's.
    with open(os.path.join(output, layout_lib.LOCK), "w") as handle:
        json.dump({"run": "dead", "renewed": time.time() - lock_lib.LEASE_SECONDS - 1}, handle)
    dead = time.time() - lock_lib.LEASE_SECONDS - 1
    os.utime(os.path.join(output, layout_lib.LOCK), (dead, dead))  # The store's time of the write too.
    taker = lock_lib.OutputLock(output)
    taker._acquire_lease(settle_seconds=0)
    assert _read_lock(output)["run"] == taker.holder["run"]
    taker.release()


def test_a_signal_while_the_lease_is_taken_takes_it_back(tmp_path, monkeypatch):
    """Ctrl-C in the second after the lease was written left it: the rerun the interrupted line
    advises was refused as busy for five minutes."""
    output = str(tmp_path / "bucket")
    os.makedirs(output)
    monkeypatch.setattr(lock_lib, "is_local", lambda path: False)
    monkeypatch.setattr(files_lib, "is_local", lambda path: False)

    def interrupted(seconds):
        assert os.path.exists(os.path.join(output, layout_lib.LOCK))  # written, not yet read back
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(lock_lib.time, "sleep", interrupted)
        with pytest.raises(KeyboardInterrupt):
            lock_lib.OutputLock(output).__enter__()
    assert os.listdir(output) == []
    with lock_lib.OutputLock(output):  # the rerun takes it at once
        assert _read_lock(output)["run"]
    assert os.listdir(output) == []


def test_a_lease_taken_over_is_not_written_back_and_the_run_does_not_commit(tmp_path, monkeypatch):
    """After a stall longer than the lease, the renewer wrote ours back over the run that took it over."""
    output, first = _leased_bucket(tmp_path, monkeypatch, 0.05)
    first.check_held()
    # Another run takes the lease over (ours looked stale to it), as after a sleeping laptop.
    with open(os.path.join(output, layout_lib.LOCK), "w") as handle:
        json.dump({"run": "other", "renewed": time.time()}, handle)
    deadline = time.time() + 10
    while first.lost is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    assert _read_lock(output)["run"] == "other"
    with pytest.raises(OutputBusyError, match="lost its lock .*: run other took it over"):
        first.check_held()
    first.release()
    assert _read_lock(output)["run"] == "other"  # Its lease is not ours to remove.


@pytest.mark.parametrize("stalled", [True, False], ids=["stalled", "deleted_by_hand"])
def test_a_lease_not_renewed_for_a_whole_lease_is_lost_even_if_its_taker_is_gone(
    stalled, tmp_path, monkeypatch
):
    """The run that took it over finished and removed its lease: the stalled run wrote its own back.
    Not stalled, a lease deleted by hand (a second run came, committed and went) was written back too."""
    output, first = _leased_bucket(tmp_path, monkeypatch, 0.05)
    if stalled:  # a sleeping laptop, past a whole lease
        first._renewed -= lock_lib.LEASE_SECONDS + 1
    os.remove(os.path.join(output, layout_lib.LOCK))  # the taker's run came and went
    deadline = time.time() + 10
    while first.lost is None and time.time() < deadline:
        time.sleep(0.05)
    with pytest.raises(OutputBusyError, match="lost its lock .*: its lease is gone"):
        first.check_held()
    assert not os.path.exists(os.path.join(output, layout_lib.LOCK))
    first.release()


def test_a_lease_lapses_on_a_clock_that_goes_on_while_the_machine_sleeps(tmp_path, monkeypatch):
    """time.monotonic stops in a suspend: a laptop asleep for 10 minutes still held its lease."""
    import time as time_module

    output, first = _leased_bucket(tmp_path, monkeypatch, 600)
    assert not first._lapsed()
    if hasattr(time_module, "CLOCK_BOOTTIME"):
        awake = time_module.clock_gettime

        def after_a_suspend(clock):
            return awake(clock) + (lock_lib.LEASE_SECONDS + 1 if clock == time_module.CLOCK_BOOTTIME else 0)

        monkeypatch.setattr(time_module, "clock_gettime", after_a_suspend)
        assert first._lapsed()
    first.release()


def test_a_live_lease_written_by_a_slow_clock_is_not_taken_over(tmp_path, monkeypatch):
    """A holder 7 minutes slow wrote old times into its live lease: another host took it over."""
    output, first = _leased_bucket(tmp_path, monkeypatch, 600)
    with open(os.path.join(output, layout_lib.LOCK), "w") as handle:  # written now, by a slow clock
        json.dump(dict(first.holder, renewed=time.time() - 420), handle)
    with pytest.raises(OutputBusyError, match="is in use by run"):
        lock_lib.OutputLock(output)._acquire_lease(settle_seconds=0)
    first.release()


def test_a_host_whose_clock_runs_fast_does_not_take_a_live_lease_over(tmp_path, monkeypatch):
    """Its clock 7 minutes ahead, it judged a lease written a second ago 7 minutes old."""
    output, first = _leased_bucket(tmp_path, monkeypatch, 600)
    fast = time.time() + 420
    monkeypatch.setattr(lock_lib.time, "time", lambda: fast)
    with pytest.raises(OutputBusyError, match="is in use by run"):
        lock_lib.OutputLock(output)._acquire_lease(settle_seconds=0)
    monkeypatch.undo()
    assert _read_lock(output)["run"] == first.holder["run"]
    assert os.listdir(output) == [layout_lib.LOCK]  # the clock probe is gone
    first.release()


def test_a_lease_taken_over_is_found_before_the_commit_whatever_the_renewer_saw(tmp_path, monkeypatch):
    output, first = _leased_bucket(tmp_path, monkeypatch, 600)  # the renewer would look in 10 minutes
    with open(os.path.join(output, layout_lib.LOCK), "w") as handle:
        json.dump({"run": "other", "renewed": time.time()}, handle)
    with pytest.raises(OutputBusyError, match="lost its lock .*: run other took it over"):
        first.check_held()
    first.release()


@pytest.mark.parametrize("change", ["lock_deleted", "directory_moved", "link_switched"])
def test_a_local_lock_that_is_no_longer_this_runs_is_found_before_the_commit(change, tmp_path):
    """A `_LOCK` cleared by hand let a second run in; a moved output or a switched link had the run
    commit into a directory it never locked, over a finished export, without --overwrite."""
    (tmp_path / "v1").mkdir()
    (tmp_path / "v2").mkdir()
    (tmp_path / "current").symlink_to(tmp_path / "v1")
    lock = lock_lib.OutputLock(str(tmp_path / "current"))
    with lock:
        lock.check_held()
        if change == "lock_deleted":
            os.remove(tmp_path / "v1" / layout_lib.LOCK)
        elif change == "directory_moved":
            (tmp_path / "current").unlink()
            os.rename(tmp_path / "v1", tmp_path / "moved")
            os.makedirs(tmp_path / "v1")
            (tmp_path / "current").symlink_to(tmp_path / "v1")
        else:
            (tmp_path / "current").unlink()
            (tmp_path / "current").symlink_to(tmp_path / "v2")
            with lock_lib.OutputLock(str(tmp_path / "v2")):
                pass
        with pytest.raises(ExportConfigError, match="changed while this run worked"):
            lock.check_held()


@pytest.mark.slow
def test_a_run_whose_lock_was_deleted_commits_nothing(tmp_path, tiny_bundle):
    from test_commit import _hooked, _wait_for

    corpus = _write_corpus(tmp_path / "c.jsonl", 300)
    output = str(tmp_path / "out")
    marker = str(tmp_path / "inference")
    argv = ["--model", tiny_bundle[0], "--input", corpus, "--output", output, "--batch_size", "16"]
    process = _hooked([f"inference_pause:3:{marker}"], argv)
    _wait_for(marker + ".paused", process)
    os.remove(os.path.join(output, layout_lib.LOCK))  # "a stale lock", cleared by hand
    # A second run starts meanwhile and locks the output anew.
    with lock_lib.OutputLock(output) as second:
        locked = os.stat(os.path.join(output, layout_lib.LOCK)).st_ino
        open(marker + ".go", "w").close()
        _, err = process.communicate(timeout=180)
        assert process.returncode == EXIT_CONFIG_ERROR, err[-3000:]
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "changed while this run worked" in errors[0], err[-3000:]
        assert state_lib.read_manifest(output) is None
        # The first run's release unlinked the second run's _LOCK by its path.
        assert os.stat(os.path.join(output, layout_lib.LOCK)).st_ino == locked
        second.check_held()


def test_a_full_disk_as_the_lock_is_written_is_the_out_of_space_error(tmp_path, monkeypatch):
    """It said "an export never writes through a symbolic link" (exit 2) and left an empty _LOCK."""
    import errno

    class _FullDisk:
        def __getattr__(self, name):
            return getattr(os, name)

        @staticmethod
        def write(fd, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    output = tmp_path / "out"
    monkeypatch.setattr(lock_lib, "os", _FullDisk())
    with pytest.raises(OutputWriteError, match="ran out of space") as caught:
        lock_lib.OutputLock(str(output)).__enter__()
    assert "symbolic link" not in str(caught.value)
    assert not output.exists()


def test_a_full_disk_while_finishing_an_interrupted_commit_at_launch_is_one_error(
    tmp_path, tiny_bundle, monkeypatch, capsys
):
    import errno

    from pipeline.writing import commit as commit_lib

    def disk_full(directory):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), directory)

    corpus = _write_corpus(tmp_path / "c.jsonl", 3)
    monkeypatch.setattr(commit_lib, "finish_interrupted_commit", disk_full)
    code = main(["--model", tiny_bundle[0], "--input", corpus, "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == EXIT_OUTPUT_FAILED and "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "finishing it failed: the disk is full" in errors[0], err[-3000:]


def test_a_run_removes_only_its_own_staging_directory(tmp_path, tiny_bundle):
    corpus = _write_corpus(tmp_path / "c.jsonl", 4)
    output = str(tmp_path / "out")
    run_export(["--model", tiny_bundle[0], "--input", corpus, "--output", output])
    staged = staging_lib.staged_shards(output, "nothing")
    assert staged == {"rows": [], "errors": [], "tables": []}
    other = os.path.join(output, layout_lib.STAGING, "otherrun")
    os.makedirs(other)
    open(os.path.join(other, "x"), "w").close()
    manifest = state_lib.read_manifest(output)
    run_id = "mine00000000"
    os.makedirs(os.path.join(output, layout_lib.STAGING, run_id, "data"))
    commit_lib.commit(
        output, run_id, {"rows": [], "errors": [], "tables": []}, {"counts": manifest["counts"]}
    )
    assert os.listdir(os.path.join(output, layout_lib.STAGING)) == ["otherrun"]


# --- 8. duplicate output column names -------------------------------------------------------


@pytest.mark.parametrize(
    "flags, name",
    [
        (["--keep_fields", "kind,kind"], "'kind'"),
        (["--layer", "id=lstm_content"], "'id'"),
        (["--layer", "emb", "--layer", "emb_tokens=emb:1", "--pooling", "none"], "'emb_tokens'"),
        (["--keep_fields", "ID"], "'ID'"),
        (["--layer", "lstm_content", "--layer", "LSTM_Content=lstm_content"], "'LSTM_Content'"),
    ],
    ids=["keep_fields_twice", "layer_named_id", "tokens_column_clash", "id_in_capitals", "other_case"],
)
def test_duplicate_output_column_names_are_refused(flags, name, tmp_path, tiny_bundle, capsys):
    corpus = _write_corpus(tmp_path / "c.jsonl", 3)
    output = tmp_path / "out"
    message = _refused(
        capsys,
        ["--model", tiny_bundle[0], "--input", corpus, "--output", str(output), *flags],
        "several columns",
    )
    assert name in message
    assert not output.exists()


# --- 10. misspelled flags -------------------------------------------------------------------


@pytest.mark.parametrize("typo, suggestion", [("--ouput", "--output"), ("--layr", "--layer")])
def test_misspelled_flags_are_errors_with_a_suggestion(typo, suggestion, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    message = _refused(capsys, [typo, "x"], "Unknown argument")
    assert f"did you mean {suggestion}" in message
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "flags, pattern",
    [
        (["--pooling", "NONE"], "argument --pooling: invalid choice: 'NONE' (choose from"),
        (["--dtype=fp16"], "argument --dtype: invalid choice"),
        # argparse's "argument --overwrite: ignored explicit argument 'false'" read as if the run went on.
        (
            ["--overwrite=false"],
            "--overwrite=false: --overwrite is a switch and takes no value; give --overwrite",
        ),
        (["--output", "out", "--limit"], "argument --limit: expected one argument"),
    ],
)
def test_a_bad_flag_value_is_one_error_line_not_the_usage(flags, pattern, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _refused(capsys, flags, pattern)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "flags, pattern",
    [
        (["--input", "c/a.jsonl", "c/b.jsonl", "c/c.jsonl"], "quote it, --input 'data/*.jsonl'"),
        (["--layer", "lstm_content", "lstm_title"], "give it before each (--layer lstm_content --layer"),
        (["--keep_fields", "kind", "topic"], "one comma-separated list"),
    ],
)
def test_values_after_a_one_value_flags_value_are_told_how_to_pass(
    flags, pattern, tmp_path, capsys, monkeypatch
):
    """An unquoted `--input c/*.jsonl`, expanded by the shell, was "Unknown argument(s): 'c/b.jsonl',
    'c/c.jsonl'", without a word of the quotes; `--layer a b` "Unknown argument(s): 'b'"."""
    monkeypatch.chdir(tmp_path)
    _refused(capsys, flags, pattern)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "flags, pattern",
    [
        (
            ["--direct_num_workers", "1e309"],
            "--direct_num_workers is one of Beam's own flags, explained in Beam's",
        ),
        (["--direct_running_mode", "foo"], "pipeline_options.html), not in `python -m pipeline.run --help`."),
        (["--pooling", "NONE"], "'last'). `python -m pipeline.run --help` explains each flag."),
    ],
)
def test_a_bad_value_of_a_beam_flag_points_at_beams_reference(flags, pattern, tmp_path, capsys, monkeypatch):
    """It pointed at `python -m pipeline.run --help`, which lists only this tool's flags."""
    monkeypatch.chdir(tmp_path)
    _refused(capsys, flags, pattern)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--input", "{a}", "--input", "{b}"], "--input"),
        (["--input", "{a}", "--batch_size", "8", "--batch_size=16"], "--batch_size"),
        (["--input", "{a}", "--runner", "DirectRunner", "--runner=DataflowRunner"], "--runner"),
    ],
    ids=["input", "ours", "beams"],
)
def test_a_one_value_flag_given_twice_with_different_values_is_refused(flags, named, tmp_path, capsys):
    """Beam keeps the last value without a word: a second --input would drop the first corpus."""
    first, second = _write_corpus(tmp_path / "a.jsonl", 3), _write_corpus(tmp_path / "b.jsonl", 2)
    output = tmp_path / "out"
    argv = [flag.format(a=first, b=second) for flag in flags] + ["--output", str(output)]
    message = _refused(capsys, argv, "given more than once, with different values")
    assert message.startswith(f"error: {named} given") and not output.exists()
    assert ("glob pattern" in message) == (named == "--input")


@pytest.mark.parametrize("model", ["", " "])
def test_an_empty_model_is_named_empty_as_the_other_commands_do(model, tmp_path, capsys):
    """`--model "$MODEL"` with $MODEL unset said "--model '' does not exist"."""
    message = "error: --model is empty (an unset shell variable?); give it a model bundle or file, or leave"
    _refused(capsys, [f"--model={model}", "--output", str(tmp_path / "out")], message)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--limit", "2", "--"], "error: '--' ends the flags, and this command takes no other arguments. "),
        (["--", "--output", "out"], "arguments: what follows it (--output out) would not be read. Put every"),
    ],
)
def test_a_double_dash_is_named_alone(flags, message, tmp_path, capsys, monkeypatch):
    """A wrapper's trailing `--` was refused as "'--', '--output' (did you mean --output?),
    '/.../output/embeddings-...'": an --output the user never typed, appended after the `--`."""
    monkeypatch.chdir(tmp_path)
    assert "did you mean" not in _refused(capsys, flags, message)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "command, flags, message",
    [
        ("pipeline.vocabulary", ["--output", "{a}", "--output", "{b}"], "--output given more than once"),
        ("pipeline.vocabulary", ["--out", "{a}"], "required: --output"),
        ("pipeline.vocabulary", ["--output", "{a}", "--over"], "unrecognized arguments: --over"),
        ("pipeline.inspect", ["{a}", "--tok", "none"], "unrecognized arguments: --tok"),
        ("pipeline.analyze", ["{a}", "neighbors", "--id", "x", "--id", "y"], "--id given more than once"),
        (
            "pipeline.analyze",
            ["{a}", "neighbors", "--id", "x", "--col", "c"],
            "unrecognized arguments: --col",
        ),
        ("models.train", ["--output", "{a}", "--output", "{b}"], "--output given more than once"),
        ("models.train", ["--output", "{a}", "--over"], "unrecognized arguments: --over"),
        ("pipeline.inspect", ["{a}", "--layers", "emb"], "--layers (did you mean --layer?)"),
        ("pipeline.analyze", ["{a}", "neighbors", "--id", "x", "-k", "inf"], "argument -k: invalid int"),
        # argparse said "argument --overwrite: ignored explicit argument 'False'", as if the run went on.
        (
            "pipeline.vocabulary",
            ["--output", "{a}", "--overwrite=no"],
            "error: --overwrite=no: --overwrite is a switch and takes no value; give --overwrite alone",
        ),
        (
            "models.train",
            ["--output", "{a}", "--overwrite=False"],
            "error: --overwrite=False: --overwrite is",
        ),
    ],
)
def test_the_other_commands_refuse_abbreviated_and_repeated_flags(command, flags, message, tmp_path, capsys):
    """As pipeline.run does: `vocabulary --output A --output B` wrote B, and `--out A --over`
    replaced A/vocabulary.parquet (argparse took the abbreviations and kept the last value).
    And in one `error:` line, as pipeline.run refuses: argparse printed its usage block (up to 16
    lines) above `PROG: error: ...`."""
    import importlib

    main = importlib.import_module(command).main
    argv = [flag.format(a=tmp_path / "a", b=tmp_path / "b") for flag in flags]
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: ") and message in line and line.endswith(" --help` explains each flag."), (
        line
    )
    assert os.listdir(tmp_path) == []


def test_a_flag_repeated_with_the_same_value_and_repeatable_flags_pass(tmp_path, tiny_bundle):
    corpus = _write_corpus(tmp_path / "c.jsonl", 3)
    summary = run_export(
        ["--model", tiny_bundle[0], "--input", corpus, f"--input={corpus}", "--output", str(tmp_path / "o")]
        + ["--layer", "lstm_content", "--layer", "lstm_title", "--overwrite", "--overwrite"]
    )
    assert summary.exit_code == 0 and summary.rows_written == 3


def test_beam_flags_still_pass(tmp_path, tiny_bundle):
    corpus = _write_corpus(tmp_path / "c.jsonl", 3)
    summary = run_export(
        [
            "--model",
            tiny_bundle[0],
            "--input",
            corpus,
            "--output",
            str(tmp_path / "o"),
            "--runner=DirectRunner",
        ]
    )
    assert summary.rows_written == 3


# --- 11. a tokenizer larger than the embedding ----------------------------------------------


def test_tokenizer_with_ids_beyond_the_embedding_is_refused(tmp_path, tiny_bundle, capsys):
    vocabulary = tmp_path / "vocabulary.txt"
    # A vocabulary file: id = line number; one more line than the Embedding's input_dim.
    vocabulary.write_text(
        "\n".join(["", "[UNK]"] + [f"word{i}" for i in range(SIZES["vocabulary_size"] - 1)])
    )
    corpus = _write_corpus(tmp_path / "c.jsonl", 3)
    message = _refused(
        capsys,
        [
            "--model",
            os.path.join(tiny_bundle[0], MODEL_FILE),
            "--tokenizer",
            str(vocabulary),
            "--input",
            corpus,
            "--output",
            str(tmp_path / "out"),
        ],
        "The tokenizer produces ids up to",
    )
    assert f"input_dim={SIZES['vocabulary_size']}" in message
    assert not (tmp_path / "out").exists()


# --- 12. outputs that cannot work -------------------------------------------------------------


@pytest.mark.parametrize(
    "output, pattern",
    [
        ("file", "is a file"),
        # The system reaches it only once `gone` exists: the run made it, outside the output, and left it.
        ("gone/../out", "goes up ('..') out of"),
        ("out[1]", "which Beam's file matching takes as a pattern"),
        ("foo://bucket/out", "no filesystem serves the scheme 'foo://'"),
    ],
)
def test_unusable_outputs_are_errors(output, pattern, tmp_path, tiny_bundle, capsys):
    corpus = _write_corpus(tmp_path / "c.jsonl", 3)
    (tmp_path / "file").write_text("a file of the user's")
    if "://" not in output:
        output = str(tmp_path / output)
    before = sorted(os.listdir(tmp_path))
    _refused(capsys, ["--model", tiny_bundle[0], "--input", corpus, "--output", output], pattern)
    assert sorted(os.listdir(tmp_path)) == before
    assert (tmp_path / "file").read_text() == "a file of the user's"


def test_a_relative_output_in_a_working_directory_with_a_glob_character_is_refused(
    tmp_path, tiny_bundle, capsys, monkeypatch
):
    """From /data/run[1], --output out passed the check (the flag holds no '['), and Beam's matching
    of the absolute path failed the run at its end with a traceback."""
    corpus = _write_corpus(tmp_path / "c.jsonl", 3)
    (tmp_path / "run[1]").mkdir()
    monkeypatch.chdir(tmp_path / "run[1]")
    _refused(
        capsys,
        ["--model", tiny_bundle[0], "--input", corpus, "--output", "out"],
        "the working directory holds one of '*?[', which Beam's file matching takes as a pattern",
    )
    assert os.listdir(tmp_path / "run[1]") == []


def test_s3_without_boto3_says_which_extra_to_install(tmp_path, tiny_bundle, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "boto3", None)  # `import boto3` now raises ImportError
    corpus = _write_corpus(tmp_path / "c.jsonl", 3)
    _refused(
        capsys,
        ["--model", tiny_bundle[0], "--input", corpus, "--output", "s3://bucket/out"],
        "pip install 'embexport[aws]'",
    )


def test_a_directory_as_input_asks_for_a_pattern(tmp_path, tiny_bundle, capsys):
    (tmp_path / "data").mkdir()
    _write_corpus(tmp_path / "data" / "c.jsonl", 3)
    _refused(
        capsys,
        ["--model", tiny_bundle[0], "--input", str(tmp_path / "data"), "--output", str(tmp_path / "out")],
        f"is a directory; --input takes a file or a file pattern, e.g. '{tmp_path / 'data' / '*.jsonl'}'",
    )


def test_a_truncated_bundle_model_with_a_matching_hash_says_it_is_damaged(tmp_path, tiny_bundle, capsys):
    bundle = str(tmp_path / "bundle")
    shutil.copytree(tiny_bundle[0], bundle)
    model_path = os.path.join(bundle, MODEL_FILE)
    with open(model_path, "rb") as handle:
        data = handle.read()
    with open(model_path, "wb") as handle:
        handle.write(data[: len(data) // 2])
    manifest_path = os.path.join(bundle, MANIFEST_FILE)
    with open(manifest_path) as handle:
        manifest = json.load(handle)
    manifest["sha256"][MODEL_FILE] = sha256_file(model_path)
    with open(manifest_path, "w") as handle:
        json.dump(manifest, handle)
    corpus = _write_corpus(tmp_path / "c.jsonl", 3)
    message = _refused(
        capsys,
        ["--model", bundle, "--input", corpus, "--output", str(tmp_path / "out")],
        "Invalid model bundle",
    )
    assert "not found" not in message.lower()
    assert "damaged or incomplete" in message


# --- Ctrl-C ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigint_exits_130_with_one_line_and_the_rerun_completes(tmp_path, tiny_bundle):
    corpus = _write_corpus(tmp_path / "c.jsonl", 6000)
    output = str(tmp_path / "out")
    environment = dict(os.environ, PYTHONPATH=REPOSITORY)
    process = forkserver.popen(
        _command(tiny_bundle[0], corpus, output, "--batch_size", "16"),
        cwd=REPOSITORY,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_staging(process, output)
    assert process.poll() is None, "the run finished before it could be interrupted"
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == EXIT_INTERRUPTED, err[-2000:]
    assert "Traceback" not in err, err[-3000:]
    assert [line for line in err.splitlines() if line.startswith("interrupted:")] == [
        "interrupted: nothing was committed; rerun the same command to finish the export "
        "(it keeps the rows this run made durable)."
    ]
    assert state_lib.read_manifest(output) is None
    rerun = forkserver.run(
        _command(tiny_bundle[0], corpus, output),
        cwd=REPOSITORY,
        env=environment,
        capture_output=True,
        text=True,
    )
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    _assert_complete_export(output, [f"doc{i}" for i in range(6000)])


def test_token_ids_beyond_the_embedding_are_dead_letters_not_inference_failures(tmp_path, tiny_bundle):
    limit = SIZES["vocabulary_size"]
    corpus = tmp_path / "ids.jsonl"
    records = [
        {"id": "ok", "content": [2, 3, limit - 1], "title": [4]},
        {"id": "too_big", "content": [2, limit], "title": [4]},
        {"id": "title_too_big", "content": [2], "title": [limit + 7]},
    ]
    corpus.write_text("".join(json.dumps(r) + "\n" for r in records))
    output = str(tmp_path / "out")
    summary = run_export(
        ["--model", tiny_bundle[0], "--tokenizer", "none", "--input", str(corpus), "--output", output]
    )
    assert summary.rows_written == 1 and summary.errors_by_reason == {"bad_token_id": 2}
    errors = pq.read_table(os.path.join(output, "errors")).to_pylist()
    assert {e["id"] for e in errors} == {"too_big", "title_too_big"}
    assert all(f"input_dim={limit}" in e["message"] for e in errors)


def test_an_interrupted_run_names_the_output_to_resume_and_how_a_committed_one_ended(monkeypatch, capsys):
    """Without --output each command picks a new directory: "rerun the same command" resumed nothing."""
    from pipeline import run as run_module
    from pipeline.running import export as export_lib
    from pipeline.running.report import ExportSummary

    seen = []

    def interrupted_run(argv):
        seen.append(list(argv))
        # Stopped after the launch checks, with rows to keep (not left over from an earlier test's run).
        monkeypatch.setattr(export_lib, "_past_launch_checks", True)
        raise KeyboardInterrupt

    monkeypatch.setattr(export_lib, "run_export", interrupted_run)
    assert run_module.main(["--limit", "5"]) == 130
    output = seen[0][seen[0].index("--output") + 1]
    assert output.startswith(os.path.join(os.getcwd(), "output", "embeddings-"))
    assert f"rerun the same command with --output {output} to finish" in capsys.readouterr().err
    # A run committed before the signal, but with errors (exit 5): the error line is not lost.
    failed = ExportSummary("out", 3, 2, 1, {"read_error": 1}, 0, 0, 1.0, 5, "Reading broke off.")
    assert run_module._interrupted(signal.SIGTERM, committed=failed) == 143
    lines = capsys.readouterr().err.splitlines()
    assert "ending with errors (exit status 5)" in lines[0] and lines[1] == "error: Reading broke off."


def test_an_output_with_a_tilde_the_shell_left_is_refused(tmp_path, capsys, monkeypatch):
    """`--output=~/x`: bash leaves the ~, and the export went to ./~/x while the summary pointed at $HOME."""
    monkeypatch.chdir(tmp_path)
    corpus = _write_corpus(tmp_path / "c.jsonl", 3)
    message = _refused(capsys, ["--input", corpus, "--output=~/embexport-tilde-x"], "starts with '~'")
    assert "with a space" in message
    assert os.listdir(tmp_path) == ["c.jsonl"]
