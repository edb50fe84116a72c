"""The commit is crash-safe: killed or failed at every filesystem step, one complete export survives.

The in-process tests inject the fault through `pipeline.writing.files.step_hook` at
each step of `commit()` in turn (each hash, write, rename or copy, delete and
mkdir), on staged outputs that a real pipeline produced once per scenario, for
a fresh output, an `--overwrite` and a `--reuse OUT --output OUT --overwrite`
in place, on local disk and on S3 (moto).  After each fault the directory must
hold the old export untouched (no journal yet) or a journal from which the next
command finishes the new one, every shard matching its manifest's size and
SHA-256.  The subprocess tests kill, pause and fail the real command inside its
commit (tests/hooked_run.py) and send it real signals.
"""

import contextlib
import errno
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
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions
from pipeline_fixtures import REPOSITORY, pipeline_command, run_command, snapshot
from test_object_storage import BUCKET, client, s3_endpoint, s3_flags, share_one_s3_client  # noqa: F401  (fixture)

from pipeline.analysis.dataset import open_documents
from pipeline.errors import (
    EXIT_ACCOUNTING_UNVERIFIED,
    EXIT_CONFIG_ERROR,
    EXIT_OUTPUT_FAILED,
    ExportConfigError,
    LockLostError,
    OutputBusyError,
    OutputWriteError,
)
from pipeline.run import STOP_SIGNALS
from pipeline.running.export import run_export
from pipeline.writing import commit as commit_lib
from pipeline.writing import commit_phase as commit_phase_lib
from pipeline.writing import files as files_lib
from pipeline.writing import layout as layout_lib
from pipeline.writing import staging as staging_lib
from pipeline.writing import state as state_lib
from pipeline.writing.lock import OutputLock

OLD_IDS = [f"old{i}" for i in range(5)] + [f"doc{i}" for i in range(3)]
NEW_IDS = [f"doc{i}" for i in range(6)]
BAD_LINE = '{"id": "broken", "content": '
HOOKED_RUN = os.path.join(REPOSITORY, "tests", "hooked_run.py")


class Killed(BaseException):
    """Stands for SIGKILL in-process: nothing of the commit's own handling runs."""


class Captured(BaseException):
    """Stops a run right where it would commit, leaving its staged files."""


def _corpus(path, ids, bad_line=False):
    with open(path, "w", encoding="utf-8") as handle:
        for index, name in enumerate(ids):
            words = " ".join(f"word{(index * 7 + k) % 40}" for k in range(3 + index % 5))
            handle.write(json.dumps({"id": name, "content": words, "title": f"word{index}"}) + "\n")
        if bad_line:
            handle.write(BAD_LINE + "\n")
    return str(path)


def _staged_run(monkeypatch, argv):
    """Runs the export in `argv` up to its commit; returns (run id, the manifest facts it would commit)."""
    captured = {}

    def capture(directory, run_id, staged, manifest, held=None):
        captured.update(run_id=run_id, manifest=manifest)
        raise Captured

    with monkeypatch.context() as patch:
        patch.setattr(commit_lib, "commit", capture)
        with pytest.raises(Captured):
            run_export(argv)
    return captured["run_id"], captured["manifest"]


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory, tiny_bundle):
    """name -> (template directory, run id, manifest facts, old ids or None); each staged by a real run."""
    root = tmp_path_factory.mktemp("commit_scenarios")
    monkeypatch = pytest.MonkeyPatch()
    old_corpus = _corpus(root / "old.jsonl", OLD_IDS, bad_line=True)
    new_corpus = _corpus(root / "new.jsonl", NEW_IDS)
    new_with_error = _corpus(root / "new_bad.jsonl", NEW_IDS, bad_line=True)
    model = ["--model", tiny_bundle[0]]
    result = {}
    for name, corpus, flags in (
        ("fresh", new_with_error, []),
        ("overwrite", new_corpus, ["--overwrite"]),
        ("reuse_in_place", new_with_error, ["--overwrite", "--reuse", "{output}"]),
    ):
        output = str(root / name)
        if name != "fresh":
            run_export([*model, "--input", old_corpus, "--output", output])
        flags = [flag.format(output=output) for flag in flags]
        run_id, manifest = _staged_run(monkeypatch, [*model, "--input", corpus, "--output", output, *flags])
        result[name] = (output, run_id, manifest, None if name == "fresh" else OLD_IDS)
    monkeypatch.undo()
    # Old and new shards share names: the commit must replace them, not lose them.
    old_names = set(os.listdir(result["overwrite"][0]))
    staged = os.listdir(
        os.path.join(result["overwrite"][0], layout_lib.STAGING, result["overwrite"][1], "data")
    )
    assert old_names & set(staged)
    return result


def _read_ids(path):
    with FileSystems.open(path, compression_type="uncompressed") as handle:
        return pq.read_table(handle, columns=["id"]).column("id").to_pylist()


def _export_files(directory):
    """The files a reader of the export sees: top-level part-*, errors/part-*, _tables/*."""
    try:
        paths = [m.path for m in FileSystems.match([files_lib.join(directory, "**")])[0].metadata_list]
    except Exception:
        return set()
    relatives = {files_lib.relative_to(directory, p) for p in paths}
    return {
        r
        for r in relatives
        if (r.startswith("part-") and "/" not in r)
        or r.startswith(layout_lib.ERRORS_DIR + "/")
        or r.startswith(layout_lib.TABLES_DIR + "/")
    }


def _complete_export(directory):
    """The row ids of the one complete export in `directory` (None if it holds none), checked file by file."""
    manifest = state_lib.read_manifest(directory)
    if manifest is None:
        assert not [f for f in _export_files(directory) if f.startswith("part-")], _export_files(directory)
        return None
    listed = manifest["shards"]["rows"] + manifest["shards"]["errors"] + manifest["tables"]
    ids = []
    for shard in listed:
        path = files_lib.join(directory, shard["file"])
        assert files_lib.file_digest(path) == {"bytes": shard["bytes"], "sha256": shard["sha256"]}, shard
    for shard in manifest["shards"]["rows"]:
        ids += _read_ids(files_lib.join(directory, shard["file"]))
    assert _export_files(directory) == {shard["file"] for shard in listed}
    assert sum(s["rows"] for s in manifest["shards"]["rows"]) == manifest["counts"]["rows_written"]
    return sorted(ids)


def _commit(directory, run_id, facts):
    return commit_lib.commit(directory, run_id, staging_lib.staged_shards(directory, run_id), facts)


def _digests(directory):
    return {f: files_lib.file_digest(files_lib.join(directory, f)) for f in _export_files(directory)}


def _count_steps(commit):
    steps = []
    files_lib.step_hook = lambda action, relative: steps.append((action, relative))
    try:
        commit()
    finally:
        files_lib.step_hook = None
    return steps


@contextlib.contextmanager
def _killed_at_the_first(step):
    """The block is killed (in-process) at the commit's first `step` ("delete", "mkdir", ...)."""

    def hook(action, relative):
        if action == step:
            raise Killed(relative)

    files_lib.step_hook = hook
    try:
        with pytest.raises(Killed):
            yield
    finally:
        files_lib.step_hook = None


def _fault_at(number, fault):
    seen = [0]

    def hook(action, relative):
        seen[0] += 1
        if seen[0] == number:
            raise (
                Killed(f"{action} {relative}") if fault == "kill" else OSError(errno.ENOSPC, "full", relative)
            )

    return hook


def _check_every_step(make_copy, recover, run_id, facts, old_ids):
    """Kills, then fails, a commit at each step; checks what survives and what the next command makes."""
    directory = make_copy("count")
    steps = _count_steps(
        lambda: commit_lib.commit(directory, run_id, staging_lib.staged_shards(directory, run_id), facts)
    )
    actions = {action for action, _ in steps}
    assert {
        "hash",
        "write",
        "rename" if FileSystems.get_scheme(directory) is None else "copy",
        "delete",
    } <= actions
    assert _complete_export(directory) == sorted(NEW_IDS)
    for fault in ("kill", "fail"):
        for number in range(1, len(steps) + 1):
            directory = make_copy(f"{fault}{number}")
            old_files = {
                f: files_lib.file_digest(files_lib.join(directory, f)) for f in _export_files(directory)
            }
            files_lib.step_hook = _fault_at(number, fault)
            try:
                with pytest.raises(Killed if fault == "kill" else OutputWriteError):
                    _commit(directory, run_id, facts)
            finally:
                files_lib.step_hook = None
            where = f"{fault} at step {number} {steps[number - 1]}"
            pending = commit_lib.has_pending_commit(directory)
            if not pending:
                # Before the journal: the old export is exactly as it was, readable now.
                assert _complete_export(directory) == (sorted(old_ids) if old_ids else None), where
                assert _digests(directory) == old_files, where
            assert commit_phase_lib.commit_phase() != "committing", where
            recover(directory)
            assert not commit_lib.has_pending_commit(directory), where
            expected = sorted(NEW_IDS) if pending else (sorted(old_ids) if old_ids else None)
            assert _complete_export(directory) == expected, where
            if pending:
                assert not FileSystems.exists(files_lib.join(directory, layout_lib.STAGING, run_id)), where


@pytest.mark.parametrize("lost_at", ["hash", "replay"])
def test_a_run_that_lost_the_output_during_its_commit_changes_nothing_more(scenarios, tmp_path, lost_at):
    """A run stopped in its commit longer than its lease (object storage) was taken over; continued, it
    went on: wrote its journal and deleted the manifest of the export the other run had committed."""
    template, run_id, facts, old_ids = scenarios["overwrite"]
    directory = str(tmp_path / "out")
    shutil.copytree(template, directory, symlinks=True)
    old_files = _digests(directory)
    lost = []

    def held():
        if lost:
            raise OutputBusyError("--output is in use by run other")

    def hook(action, relative):  # the run stopped here for longer than its lease
        if action == "hash" if lost_at == "hash" else (action, relative) == ("delete", layout_lib.MANIFEST):
            lost.append(relative)

    files_lib.step_hook = hook
    try:
        with pytest.raises(OutputBusyError, match="in use by run other"):
            commit_lib.commit(directory, run_id, staging_lib.staged_shards(directory, run_id), facts, held)
    finally:
        files_lib.step_hook = None
    assert lost
    # Nothing of the export in place was touched: its manifest and every file are as they were.
    assert _complete_export(directory) == sorted(old_ids)
    assert _digests(directory) == old_files
    assert commit_lib.has_pending_commit(directory) == (lost_at == "replay")


def test_a_local_lock_lost_past_the_commit_point_says_where_the_journal_is(scenarios, tmp_path):
    """Its line said "Nothing was committed" while the output held a journal and half the new export."""
    template, run_id, facts, old_ids = scenarios["overwrite"]
    directory = str(tmp_path / "out")
    shutil.copytree(template, directory, symlinks=True)
    renames = []

    def hook(action, relative):  # a "stale lock" cleared by hand as the third file is renamed in
        if action == "rename":
            renames.append(relative)
            if len(renames) == 3:
                os.unlink(os.path.join(directory, layout_lib.LOCK))

    with OutputLock(directory) as lock:
        files_lib.step_hook = hook
        try:
            with pytest.raises(LockLostError) as raised:
                commit_lib.commit(
                    directory, run_id, staging_lib.staged_shards(directory, run_id), facts, lock.check_held
                )
        finally:
            files_lib.step_hook = None
    message = str(raised.value)
    assert renames[0] == layout_lib.JOURNAL and commit_lib.has_pending_commit(directory)
    assert "Nothing was committed" not in message, message
    assert f"{directory!r} holds the commit's journal {layout_lib.JOURNAL}" in message, message
    # As it says: the next command on the directory finishes the commit.
    assert commit_lib.finish_interrupted_commit(directory)
    assert _complete_export(directory) == sorted(NEW_IDS)


@pytest.mark.parametrize("name", ["fresh", "overwrite", "reuse_in_place"])
@pytest.mark.slow
def test_commit_killed_or_failed_at_every_step_on_local_disk(scenarios, name, tmp_path):
    template, run_id, facts, old_ids = scenarios[name]

    def make_copy(label):
        directory = str(tmp_path / label)
        shutil.copytree(template, directory, symlinks=True)
        return directory

    # The next command that opens the output finishes the commit (it takes the lock for the while).
    _check_every_step(make_copy, commit_lib.finish_interrupted_commit, run_id, facts, old_ids)


@pytest.mark.parametrize("name", ["fresh", "overwrite", "reuse_in_place"])
@pytest.mark.slow
def test_commit_killed_or_failed_at_every_step_on_s3(scenarios, name, s3_endpoint, monkeypatch):  # noqa: F811
    template, run_id, facts, old_ids = scenarios[name]
    FileSystems.set_options(PipelineOptions(s3_flags(s3_endpoint)))
    share_one_s3_client(monkeypatch, s3_endpoint)
    s3 = client(s3_endpoint)

    def make_copy(label):
        prefix = f"commit/{name}/{label}"
        for relative in snapshot(template):
            s3.upload_file(os.path.join(template, relative), BUCKET, f"{prefix}/{relative}")
        return f"s3://{BUCKET}/{prefix}"

    # The S3 lease waits a second to settle; the lock itself is tested in test_output_safety.
    _check_every_step(make_copy, commit_lib.recover_interrupted_commit, run_id, facts, old_ids)


def test_a_recovery_killed_at_any_step_is_finished_by_the_next_one(scenarios, tmp_path):
    template, run_id, facts, _ = scenarios["reuse_in_place"]
    committed = str(tmp_path / "steps")
    shutil.copytree(template, committed)
    steps = _count_steps(lambda: _commit(committed, run_id, facts))
    journal_step = steps.index(("rename", layout_lib.JOURNAL)) + 1
    crashed = str(tmp_path / "crashed")
    shutil.copytree(template, crashed)
    files_lib.step_hook = _fault_at(journal_step + 1, "kill")  # the first step after the commit point
    try:
        with pytest.raises(Killed):
            _commit(crashed, run_id, facts)
    finally:
        files_lib.step_hook = None
    recovery = str(tmp_path / "recovery")
    shutil.copytree(crashed, recovery)
    recovery_steps = _count_steps(lambda: commit_lib.recover_interrupted_commit(recovery))
    assert len(recovery_steps) > 3
    for number in range(1, len(recovery_steps) + 1):
        directory = str(tmp_path / f"again{number}")
        shutil.copytree(crashed, directory)
        files_lib.step_hook = _fault_at(number, "kill")
        try:
            with pytest.raises(Killed):
                commit_lib.recover_interrupted_commit(directory)
        finally:
            files_lib.step_hook = None
        commit_lib.finish_interrupted_commit(directory)
        assert _complete_export(directory) == sorted(NEW_IDS), recovery_steps[number - 1]


def test_a_recovery_knows_the_run_whose_staging_removal_a_kill_cut_short(scenarios, tmp_path):
    """Killed as the replay removed its staging (`_RUN.json` gone, the journal still there), the run's
    signature was lost with it: the scheduler's retry of the same command was refused, or embedded again."""
    template, run_id, facts, _ = scenarios["fresh"]
    directory = str(tmp_path / "out")
    shutil.copytree(template, directory)
    run_file = os.path.join(directory, layout_lib.STAGING, run_id, "_RUN.json")
    with open(run_file, encoding="utf-8") as handle:
        signature = json.load(handle)["signature"]

    def hook(action, relative):  # the removal of the staging got as far as its _RUN.json
        if (action, relative) == ("delete", f"{layout_lib.STAGING}/{run_id}/"):
            os.unlink(run_file)
            raise Killed(relative)

    files_lib.step_hook = hook
    try:
        with pytest.raises(Killed):
            _commit(directory, run_id, facts)
    finally:
        files_lib.step_hook = None
    assert commit_lib.has_pending_commit(directory) and not os.path.exists(run_file)
    commit_phase_lib.reset_commit_phase()
    assert commit_lib.finish_interrupted_commit(directory)
    recovered = commit_phase_lib.recovered_run(directory)
    assert recovered is not None and recovered[0] == signature
    assert recovered[1] == state_lib.read_manifest(directory)
    assert _complete_export(directory) == sorted(NEW_IDS)


def test_a_damaged_journal_is_refused_and_nothing_is_deleted(scenarios, tmp_path):
    template, run_id, facts, _ = scenarios["overwrite"]
    directory = str(tmp_path / "out")
    shutil.copytree(template, directory)
    files_lib.step_hook = _fault_at(6, "kill")  # after the journal
    try:
        with pytest.raises(Killed):
            commit_lib.commit(directory, run_id, staging_lib.staged_shards(directory, run_id), facts)
    finally:
        files_lib.step_hook = None
    journal_path = os.path.join(directory, layout_lib.JOURNAL)
    with open(journal_path) as handle:
        journal = json.load(handle)
    outside = tmp_path / "precious.txt"
    outside.write_text("mine")
    journal["delete"].append("../precious.txt")
    with open(journal_path, "w") as handle:
        json.dump(journal, handle)
    before = snapshot(directory)
    with pytest.raises(Exception, match="damaged or names files"):
        commit_lib.finish_interrupted_commit(directory)
    assert snapshot(directory) == before and outside.read_text() == "mine"


# --- real processes, real signals -------------------------------------------------------------


def _hooked(hooks, argv, **kwargs):
    return forkserver.popen(
        [sys.executable, HOOKED_RUN, *hooks, "--", *argv],
        cwd=REPOSITORY,
        env=dict(os.environ, PYTHONPATH=REPOSITORY),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def _wait_for(path, process, timeout=180):
    deadline = time.time() + timeout
    while not os.path.exists(path):
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.02)


@pytest.mark.slow
def test_reuse_in_place_killed_inside_the_commit_is_finished_by_the_rerun(tmp_path, tiny_bundle):
    old = _corpus(tmp_path / "old.jsonl", OLD_IDS, bad_line=True)
    new = _corpus(tmp_path / "new.jsonl", NEW_IDS)
    output = str(tmp_path / "out")
    assert run_export(["--model", tiny_bundle[0], "--input", old, "--output", output]).exit_code == 0
    argv = pipeline_command(new, output, "--model", tiny_bundle[0], "--reuse", output, "--overwrite")[3:]
    # SIGKILL after the journal, the old manifest and the first shard rename: the old export is gone.
    process = _hooked(["kill:rename:2"], argv)
    _, err = process.communicate(timeout=300)
    assert process.returncode == -signal.SIGKILL, err[-3000:]
    assert commit_lib.has_pending_commit(output) and state_lib.read_manifest(output) is None
    rerun = run_command([sys.executable, "-m", "pipeline.run", *argv])
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "Finishing the commit of run" in rerun.stderr
    assert _complete_export(output) == sorted(NEW_IDS)
    assert state_lib.read_manifest(output)["counts"]["rows_reused"] == len(NEW_IDS)


@pytest.mark.slow
def test_analyze_finishes_an_interrupted_commit_before_reading(tmp_path, tiny_bundle):
    old = _corpus(tmp_path / "old.jsonl", OLD_IDS)
    new = _corpus(tmp_path / "new.jsonl", NEW_IDS)
    output = str(tmp_path / "out")
    run_export(["--model", tiny_bundle[0], "--input", old, "--output", output])
    argv = pipeline_command(new, output, "--model", tiny_bundle[0], "--overwrite")[3:]
    process = _hooked(["kill:delete:2"], argv)
    process.communicate(timeout=300)
    assert process.returncode == -signal.SIGKILL
    assert commit_lib.has_pending_commit(output)
    dataset = open_documents(output)
    assert sorted(dataset.dataset.to_table(columns=["id"]).column("id").to_pylist()) == sorted(NEW_IDS)
    assert not commit_lib.has_pending_commit(output)


@pytest.mark.parametrize(
    "signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=["sigterm", "sigint", "sighup"]
)
@pytest.mark.slow
def test_a_signal_during_the_commit_waits_for_it(tmp_path, tiny_bundle, signum):
    old = _corpus(tmp_path / "old.jsonl", OLD_IDS)
    new = _corpus(tmp_path / "new.jsonl", NEW_IDS)
    output = str(tmp_path / "out")
    run_export(["--model", tiny_bundle[0], "--input", old, "--output", output])
    marker = str(tmp_path / "commit")
    argv = pipeline_command(new, output, "--model", tiny_bundle[0], "--overwrite")[3:]
    # Paused right after deleting the old manifest: the worst moment to stop.
    process = _hooked([f"pause:delete:2:{marker}"], argv)
    _wait_for(marker + ".paused", process)
    process.send_signal(signum)
    time.sleep(0.2)  # Let the handler run while the commit is still paused (it must only defer).
    open(marker + ".go", "w").close()
    out, err = process.communicate(timeout=120)
    assert process.returncode == STOP_SIGNALS[signum], err[-3000:]
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("interrupted:")]
    assert lines == [
        f"interrupted: the export was committed to {output} before the run stopped "
        f"({signal.Signals(signum).name}); it is complete, nothing to rerun."
    ], err[-2000:]
    assert "Export finished" not in out
    assert _complete_export(output) == sorted(NEW_IDS)
    assert not commit_lib.has_pending_commit(output)


def _fresh_export_killed_in_its_commit(tmp_path, tiny_bundle):
    """(output, argv) of a first export killed after its commit point, in its second rename."""
    new = _corpus(tmp_path / "new.jsonl", NEW_IDS)
    output = str(tmp_path / "out")
    argv = pipeline_command(new, output, "--model", tiny_bundle[0])[3:]
    process = _hooked(["kill:rename:2"], argv)
    process.communicate(timeout=300)
    assert process.returncode == -signal.SIGKILL
    return output, argv


@pytest.mark.slow
def test_a_signal_while_finishing_an_earlier_commit_says_that_commit_was_finished(tmp_path, tiny_bundle):
    """It said "nothing was committed; rerun the same command", and that rerun was then refused."""
    output, argv = _fresh_export_killed_in_its_commit(tmp_path, tiny_bundle)
    assert commit_lib.has_pending_commit(output)
    marker = str(tmp_path / "recovery")
    # Paused in the recovery's first rename, at launch: the commit of the killed run.
    process = _hooked([f"pause:rename:1:{marker}"], argv)
    _wait_for(marker + ".paused", process)
    process.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    open(marker + ".go", "w").close()
    _, err = process.communicate(timeout=120)
    assert process.returncode == STOP_SIGNALS[signal.SIGTERM], err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("interrupted:")]
    assert len(lines) == 1 and "nothing of this run was committed" in lines[0], err[-3000:]
    assert f"an earlier run's interrupted commit into {output} was finished" in lines[0]
    # It said "Rerun the same command to start the export", which the finished export refuses (exit 2);
    # the killed run was this very command, whose export is done.
    assert "Rerun the same command" not in lines[0]
    assert (
        "If that run was this same command, its export is done; to replace it, rerun with --overwrite"
        in lines[0]
    )
    assert _complete_export(output) == sorted(NEW_IDS)


@pytest.mark.slow
def test_a_signal_that_waited_for_a_commit_which_then_failed_is_said_too(tmp_path, tiny_bundle):
    """The commit's error line was all: the signal was forgotten."""
    new = _corpus(tmp_path / "new.jsonl", NEW_IDS)
    output = str(tmp_path / "out")
    marker = str(tmp_path / "commit")
    argv = pipeline_command(new, output, "--model", tiny_bundle[0])[3:]
    # Paused as the commit hashes its files; its second rename, after the commit point, finds the disk full.
    process = _hooked([f"pause:hash:1:{marker}", "fail:rename:2"], argv)
    _wait_for(marker + ".paused", process)
    process.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    open(marker + ".go", "w").close()
    _, err = process.communicate(timeout=120)
    assert process.returncode == EXIT_OUTPUT_FAILED, err[-3000:]
    said = [line for line in err.splitlines() if line.startswith(("interrupted:", "error:"))]
    assert len(said) == 2 and "SIGTERM arrived during the commit" in said[0], err[-3000:]
    assert said[1].startswith("error: The commit to --output")


@pytest.mark.slow
def test_a_full_disk_during_the_commit_keeps_the_old_export(tmp_path, tiny_bundle):
    old = _corpus(tmp_path / "old.jsonl", OLD_IDS)
    new = _corpus(tmp_path / "new.jsonl", NEW_IDS)
    output = str(tmp_path / "out")
    run_export(["--model", tiny_bundle[0], "--input", old, "--output", output])
    before = snapshot(output)
    argv = pipeline_command(new, output, "--model", tiny_bundle[0], "--overwrite")[3:]
    # The journal write (the second write) hits a full disk.
    process = _hooked(["fail:write:2"], argv)
    _, err = process.communicate(timeout=300)
    assert process.returncode == EXIT_OUTPUT_FAILED, err[-3000:]
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    # Told as a full disk in the pipeline is: how much space the export needed (docs/nothing_lost.md).
    assert len(errors) == 1 and "ran out of space" in errors[0] and output in errors[0], err[-2000:]
    assert "this export needs more than" in errors[0] and "--overwrite needs room for both" in errors[0]
    assert {k: v for k, v in snapshot(output).items() if not k.startswith(layout_lib.STAGING)} == before
    assert _complete_export(output) == sorted(OLD_IDS)
    # The finished run only lacked room for its journal: the rerun commits it without embedding again.
    assert "kept in" in errors[0]
    rerun = run_export(["--model", tiny_bundle[0], "--input", new, "--output", output, "--overwrite"])
    assert rerun.exit_code == 0 and rerun.rows_kept == len(NEW_IDS)
    assert _complete_export(output) == sorted(NEW_IDS)


@pytest.mark.slow
def test_the_rerun_of_a_fresh_export_killed_in_its_commit_says_it_was_finished(tmp_path, tiny_bundle):
    output, argv = _fresh_export_killed_in_its_commit(tmp_path, tiny_bundle)
    rerun = run_command([sys.executable, "-m", "pipeline.run", *argv])
    # The same command: its export is there (another command is refused: the test above).
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "commit was finished just now, so nothing is embedded again" in rerun.stderr
    assert _complete_export(output) == sorted(NEW_IDS)


def test_the_rerun_of_a_failed_export_killed_in_its_commit_says_it_failed(tmp_path, tiny_bundle):
    """It said "the output holds that run's complete export" of a run whose records were mostly dead
    letters (exit 4, which the killed run never got to say): a failed export presented as done."""
    corpus = _corpus(tmp_path / "mostly_broken.jsonl", NEW_IDS[:2])
    with open(corpus, "a", encoding="utf-8") as handle:
        handle.write(f"{BAD_LINE}\n" * 4)
    output = str(tmp_path / "out")
    argv = ["--model", tiny_bundle[0], "--input", corpus, "--output", output]

    with _killed_at_the_first("delete"):  # The first step after the journal is in place.
        run_export(argv)
    with pytest.raises(ExportConfigError) as refused:
        run_export(argv)
    manifest = state_lib.read_manifest(output)
    assert manifest["status"] == "completed_with_errors"
    assert "completed with errors: " + manifest["message"] in str(refused.value)
    assert "complete export" not in str(refused.value)


def test_a_file_where_an_interrupted_commit_makes_a_folder_is_named_not_blamed_on_free_space(
    scenarios, tmp_path, tiny_bundle, capsys
):
    """A file `errors` where the killed commit makes its `errors/` folder: the rerun said "finishing it
    failed: File exists ... fix the cause (free space)", naming neither the file nor the cause."""
    from pipeline.run import main

    template, run_id, facts, _ = scenarios["fresh"]
    output = tmp_path / "out"
    shutil.copytree(template, output)

    with _killed_at_the_first("mkdir"):  # Before its first folder.
        _commit(str(output), run_id, facts)
    (output / layout_lib.ERRORS_DIR).write_text("a file of the user's")
    argv = [
        "--model",
        tiny_bundle[0],
        "--input",
        _corpus(tmp_path / "c.jsonl", NEW_IDS),
        "--output",
        str(output),
    ]
    assert main(argv) == EXIT_OUTPUT_FAILED
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "free space" not in errors[0], errors
    assert f"{output / layout_lib.ERRORS_DIR} is not a folder" in errors[0], errors
    assert "Move it out of the output, then rerun" in errors[0], errors
    (output / layout_lib.ERRORS_DIR).unlink()
    assert main(argv) == EXIT_CONFIG_ERROR
    assert "was finished just now" in capsys.readouterr().err
    assert _complete_export(str(output)) == sorted(NEW_IDS)


def test_an_overwrite_rerun_of_a_run_killed_past_its_commit_point_does_not_embed_again(
    scenarios, tmp_path, tiny_bundle, monkeypatch
):
    """The same command (a scheduler's retry, with --overwrite) finished the commit at launch, then
    embedded the whole corpus again, to replace the export by the same rows."""
    from pipeline.running import export as export_lib

    template, run_id, facts, _ = scenarios["overwrite"]
    output = str(tmp_path / "out")
    shutil.copytree(template, output)

    with _killed_at_the_first("delete"):  # The first step after the journal is in place.
        _commit(output, run_id, facts)
    with open(os.path.join(output, layout_lib.JOURNAL), encoding="utf-8") as handle:
        staged_manifest = os.path.join(output, json.load(handle)["manifest"])
    with open(staged_manifest, "rb") as handle:
        committed = handle.read()

    def embeds(*args, **kwargs):
        raise AssertionError("the corpus was embedded again")

    monkeypatch.setattr(export_lib, "_run_pipeline", embeds)
    corpus = os.path.join(os.path.dirname(template), "new.jsonl")
    summary = run_export(["--model", tiny_bundle[0], "--input", corpus, "--output", output, "--overwrite"])
    assert summary.exit_code == 0 and summary.rows_written == len(NEW_IDS), summary
    with open(os.path.join(output, layout_lib.MANIFEST), "rb") as handle:
        assert handle.read() == committed
    assert _complete_export(output) == sorted(NEW_IDS)


def _fresh_scenario_killed_past_its_commit_point(scenarios, tmp_path):
    """(output, the command's argv, the manifest its commit puts in place) of the "fresh" scenario's run,
    killed at its commit's first step after the journal is in place."""
    template, run_id, facts, _ = scenarios["fresh"]
    output = str(tmp_path / "out")
    shutil.copytree(template, output)
    with _killed_at_the_first("delete"):
        _commit(output, run_id, facts)
    with open(os.path.join(output, layout_lib.JOURNAL), encoding="utf-8") as handle:
        staged_manifest = os.path.join(output, json.load(handle)["manifest"])
    with open(staged_manifest, "rb") as handle:
        committed = handle.read()
    corpus = os.path.join(os.path.dirname(template), "new_bad.jsonl")
    return output, ["--input", corpus, "--output", output], committed


class Embedded(Exception):
    """The run went on to embed the corpus (`_run_pipeline`), past the finished commit."""


def test_a_schedulers_retry_without_overwrite_of_a_run_killed_past_its_commit_point_exits_0(
    scenarios, tmp_path, tiny_bundle, monkeypatch
):
    """The very same command (a scheduler's retry: Airflow, cron) finished the commit at launch, then
    refused with exit 2, "Pass --overwrite", and so did every retry after it: the job failed for good
    though the export it asked for was complete."""
    from pipeline.running import export as export_lib

    output, argv, committed = _fresh_scenario_killed_past_its_commit_point(scenarios, tmp_path)

    def embeds(*args, **kwargs):
        raise Embedded

    monkeypatch.setattr(export_lib, "_run_pipeline", embeds)
    summary = run_export(["--model", tiny_bundle[0], *argv])
    assert summary.exit_code == 0 and summary.rows_written == len(NEW_IDS) and summary.dead_letters == 1
    with open(os.path.join(output, layout_lib.MANIFEST), "rb") as handle:
        assert handle.read() == committed
    assert _complete_export(output) == sorted(NEW_IDS)


def test_a_schedulers_retry_of_a_run_killed_in_its_commits_last_steps_exits_0(
    scenarios, tmp_path, tiny_bundle, monkeypatch
):
    """Killed after its replay removed the staging directory (and its _RUN.json, where the recovery read the
    run's signature), before it deleted the journal: the very same command was refused with exit 2, "Pass
    --overwrite" (with --overwrite it embedded the whole corpus again). The journal holds the signature
    too."""
    from pipeline.running import export as export_lib

    template, run_id, facts, _ = scenarios["fresh"]
    output = str(tmp_path / "out")
    shutil.copytree(template, output)
    staging = os.path.join(output, layout_lib.STAGING, run_id)

    def hook(action, relative):
        if action == "delete" and relative == layout_lib.JOURNAL:
            assert not os.path.exists(staging)  # the run's _RUN.json is gone with it
            raise Killed(relative)

    files_lib.step_hook = hook
    try:
        with pytest.raises(Killed):
            _commit(output, run_id, facts)
    finally:
        files_lib.step_hook = None
    assert commit_lib.has_pending_commit(output)
    with open(os.path.join(output, layout_lib.MANIFEST), "rb") as handle:
        committed = handle.read()

    def embeds(*args, **kwargs):
        raise Embedded

    monkeypatch.setattr(export_lib, "_run_pipeline", embeds)
    corpus = os.path.join(os.path.dirname(template), "new_bad.jsonl")
    summary = run_export(["--model", tiny_bundle[0], "--input", corpus, "--output", output])
    assert summary.exit_code == 0 and summary.rows_written == len(NEW_IDS) and summary.dead_letters == 1
    with open(os.path.join(output, layout_lib.MANIFEST), "rb") as handle:
        assert handle.read() == committed
    assert _complete_export(output) == sorted(NEW_IDS)


@pytest.mark.parametrize("overwrite", [False, True], ids=["without_overwrite", "with_overwrite"])
def test_a_retry_on_a_runner_without_committed_counters_finds_the_export_it_asked_for(
    scenarios, tmp_path, tiny_bundle, monkeypatch, overwrite
):
    """Spark's and Flink's job servers end every run with exit 7, "completed_with_errors" for its unverified
    accounting alone. Only a "succeeded" export was taken as the one the retry asks for: without --overwrite
    the retry was refused with exit 2 ("completed with errors ... Fix that, then pass --overwrite"), at every
    retry, and with it the whole corpus was embedded again, to exit 7 again."""
    from pipeline.running import export as export_lib

    template, run_id, facts, _ = scenarios["fresh"]
    output = str(tmp_path / "out")
    shutil.copytree(template, output)
    unverified = "Accounting unverified: the runner reported no committed counters, so ..."
    counts = {**facts["counts"], "records_read": None, "counters": "attempted"}
    facts = {**facts, "status": "completed_with_errors", "message": unverified, "counts": counts}
    with _killed_at_the_first("delete"):
        _commit(output, run_id, facts)

    def embeds(*args, **kwargs):
        raise Embedded

    monkeypatch.setattr(export_lib, "_run_pipeline", embeds)
    corpus = os.path.join(os.path.dirname(template), "new_bad.jsonl")
    flags = ["--overwrite"] if overwrite else []
    summary = run_export(["--model", tiny_bundle[0], "--input", corpus, "--output", output, *flags])
    assert summary.exit_code == EXIT_ACCOUNTING_UNVERIFIED and summary.message == unverified
    assert summary.rows_written == len(NEW_IDS) and summary.dead_letters == 1
    assert state_lib.read_manifest(output)["status"] == "completed_with_errors"
    assert _complete_export(output) == sorted(NEW_IDS)


@pytest.mark.parametrize("change", ["stricter_max_error_fraction", "model_moved"])
def test_an_overwrite_rerun_unlike_the_killed_run_past_its_commit_point_is_run_not_recovered(
    scenarios, tmp_path, tiny_bundle, monkeypatch, change
):
    """The --overwrite rerun stopped with exit 0 after finishing the killed run's commit whenever the
    signatures matched: with a --max_error_fraction under the export's share of dead letters (1 in 7;
    the same command without the kill exits 4), and with the model moved (same bytes, so the same
    signature), leaving every row file naming the model's old path. The command without --overwrite
    is refused, as a rerun of another command."""
    from pipeline.running import export as export_lib

    output, argv, _ = _fresh_scenario_killed_past_its_commit_point(scenarios, tmp_path)
    model = tiny_bundle[0]
    if change == "model_moved":  # The same files at another path.
        model = str(tmp_path / "moved")
        os.symlink(tiny_bundle[0], model)
    flags = ["--max_error_fraction", "0.1"] if change == "stricter_max_error_fraction" else []

    def embeds(*args, **kwargs):
        raise Embedded

    monkeypatch.setattr(export_lib, "_run_pipeline", embeds)
    with pytest.raises(Embedded):
        run_export(["--model", model, *argv, *flags, "--overwrite"])
    shutil.rmtree(output)
    output, argv, _ = _fresh_scenario_killed_past_its_commit_point(scenarios, tmp_path)
    with pytest.raises(ExportConfigError, match="was finished just now"):
        run_export(["--model", model, *argv, *flags])
    assert _complete_export(output) == sorted(NEW_IDS)


def test_the_renames_into_subdirectories_are_flushed_before_the_manifest(tmp_path, tiny_bundle, monkeypatch):
    """Power loss: errors/ renames not on disk while the manifest listing them is."""
    corpus = _corpus(tmp_path / "c.jsonl", NEW_IDS, bad_line=True)
    output = str(tmp_path / "out")
    flushed = []
    fsync = commit_lib.fsync_directory

    def recording_fsync(directory):
        flushed.append(
            (os.path.relpath(directory, output), os.path.exists(os.path.join(output, "_MANIFEST.json")))
        )
        fsync(directory)

    monkeypatch.setattr(commit_lib, "fsync_directory", recording_fsync)
    run_export(["--model", tiny_bundle[0], "--input", corpus, "--output", output])
    assert (layout_lib.ERRORS_DIR, False) in flushed
