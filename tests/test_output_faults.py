"""Faults around the output: symbolic links in it, unusable paths, a full disk, SIGTERM, a failed overwrite.

Each test runs the real command (in-process through `main`, or as a child
process where the point is a signal or a crash) and checks for one `error:` or
`interrupted:` line, the right exit status, no traceback, and that no file
outside the export, nor the earlier export, was touched.
"""

import contextlib
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
from pipeline_fixtures import REPOSITORY, pipeline_command, run_command, snapshot, wait_for_staged_shard
from test_commit import HOOKED_RUN, _complete_export, _corpus, _hooked, _wait_for

from pipeline.errors import (
    EXIT_CONFIG_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OUTPUT_FAILED,
    EXIT_TERMINATED,
    EXIT_TOO_MANY_ERRORS,
    EXIT_UNEXPECTED,
)
from pipeline.run import STOP_SIGNALS, main
from pipeline.running.export import run_export
from pipeline.writing import layout as layout_lib
from pipeline.writing import resume as resume_lib
from pipeline.writing import state as state_lib

IDS = [f"doc{i}" for i in range(6)]


def _refused(capsys, argv, *patterns):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == EXIT_CONFIG_ERROR, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    for pattern in patterns:
        assert pattern in errors[0], errors[0]
    return errors[0]


# --- point 2: nothing is deleted through a symbolic link -------------------------------------


def test_a_staging_directory_that_is_a_link_is_refused_and_its_target_kept(tmp_path, tiny_bundle, capsys):
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "thesis.tex").write_text("years of work")
    (thesis / "run1").mkdir()
    (thesis / "run1" / "notes.txt").write_text("more work")
    output = tmp_path / "out"
    output.mkdir()
    os.symlink(thesis, output / layout_lib.STAGING)
    corpus = _corpus(tmp_path / "c.jsonl", IDS)
    before = snapshot(thesis)
    for flags in ([], ["--overwrite"]):
        _refused(
            capsys,
            ["--model", tiny_bundle[0], "--input", corpus, "--output", str(output), *flags],
            "_staging (a symbolic link)",
        )
    assert snapshot(thesis) == before
    assert os.path.islink(output / layout_lib.STAGING)


@pytest.mark.parametrize("entry", ["errors", "part-00000-of-00001.parquet", "_LOCK"])
def test_a_link_inside_a_finished_export_is_refused_by_overwrite(tmp_path, tiny_bundle, capsys, entry):
    corpus = _corpus(tmp_path / "c.jsonl", IDS, bad_line=True)
    output = tmp_path / "out"
    run_export(["--model", tiny_bundle[0], "--input", corpus, "--output", str(output)])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "part-00000-of-00001.parquet").write_text("not the export's")
    target = elsewhere if entry == "errors" else elsewhere / "part-00000-of-00001.parquet"
    path = output / entry
    if path.is_dir():
        for child in path.iterdir():
            child.unlink()
        path.rmdir()
    elif path.exists():
        path.unlink()
    os.symlink(target, path)
    before = snapshot(elsewhere)
    _refused(
        capsys,
        ["--model", tiny_bundle[0], "--input", corpus, "--output", str(output), "--overwrite"],
        f"{entry} (a symbolic link)",
    )
    assert snapshot(elsewhere) == before


def test_an_unknown_empty_directory_makes_the_output_foreign(tmp_path, tiny_bundle, capsys):
    output = tmp_path / "out"
    (output / "my_results").mkdir(parents=True)
    corpus = _corpus(tmp_path / "c.jsonl", IDS)
    _refused(
        capsys,
        ["--model", tiny_bundle[0], "--input", corpus, "--output", str(output)],
        "my_results/ (an empty directory)",
    )
    assert os.listdir(output) == ["my_results"]


# --- point 10: an --output that cannot be made ------------------------------------------------


def test_an_output_below_a_file_is_refused_at_launch(tmp_path, tiny_bundle, capsys):
    (tmp_path / "report.txt").write_text("a file")
    corpus = _corpus(tmp_path / "c.jsonl", IDS)
    output = str(tmp_path / "report.txt" / "out")
    _refused(capsys, ["--model", tiny_bundle[0], "--input", corpus, "--output", output], "which is a file")
    assert (tmp_path / "report.txt").read_text() == "a file"


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_an_output_on_a_path_that_cannot_be_written_is_refused(tmp_path, tiny_bundle, capsys):
    corpus = _corpus(tmp_path / "c.jsonl", IDS)
    # /proc takes no new directories, not even from root.
    _refused(
        capsys,
        ["--model", tiny_bundle[0], "--input", corpus, "--output", "/proc/embexport-out"],
        "cannot be written",
    )


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_an_output_in_a_read_only_directory_is_refused(tmp_path, tiny_bundle, capsys):
    corpus = _corpus(tmp_path / "c.jsonl", IDS)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        _refused(
            capsys,
            ["--model", tiny_bundle[0], "--input", corpus, "--output", str(locked / "out")],
            "not writable",
        )
    finally:
        locked.chmod(0o755)


# --- point 9: a full disk while the pipeline writes ---------------------------------------------


def _output_failed_in_one_line(process: subprocess.Popen) -> str:
    """The one `error:` line of a hooked run that must fail writing its output (exit 6, no traceback)."""
    _, err = process.communicate(timeout=300)
    assert process.returncode == EXIT_OUTPUT_FAILED, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err[-3000:]
    return errors[0]


@pytest.mark.slow
def test_a_full_disk_during_the_pipeline_is_one_error_and_keeps_the_old_export(tmp_path, tiny_bundle):
    old = _corpus(tmp_path / "old.jsonl", IDS)
    output = str(tmp_path / "out")
    run_export(["--model", tiny_bundle[0], "--input", old, "--output", output])
    before = snapshot(output)
    new = _corpus(tmp_path / "new.jsonl", [f"new{i}" for i in range(400)])
    argv = pipeline_command(new, output, "--model", tiny_bundle[0], "--overwrite", "--batch_size", "16")[3:]
    # The staged files may hold 2 kB in all: the first shard fills the "disk".
    error = _output_failed_in_one_line(_hooked(["enospc:2000"], argv))
    assert f"--output {output!r} ran out of space" in error and "this export needs more than the " in error
    # The earlier export is untouched; the rows made durable are kept, and the rerun (once there
    # is room) continues from them.
    assert {k: v for k, v in snapshot(output).items() if not k.startswith(layout_lib.STAGING)} == before
    assert os.path.join(output, layout_lib.STAGING) in error
    rerun = run_command(
        pipeline_command(new, output, "--model", tiny_bundle[0], "--overwrite", "--batch_size", "16")
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert _complete_export(output) == sorted(f"new{i}" for i in range(400))


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 64 kB tmpfs (needs root and mount rights; skipped elsewhere, where the shim above still runs)."""
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount_point)])
    if mounted.returncode != 0:
        pytest.skip("this machine does not let tests mount a tmpfs")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


@pytest.mark.slow
def test_a_full_tmpfs_during_the_pipeline_is_one_error_and_keeps_the_old_export(
    small_tmpfs, tmp_path, tiny_bundle
):
    output = str(small_tmpfs / "out")
    run_export(
        ["--model", tiny_bundle[0], "--input", _corpus(tmp_path / "old.jsonl", IDS), "--output", output]
    )
    before = snapshot(output)
    # One LSTM state per token: about 175 kB of Parquet, nearly three times the disk.
    new = _corpus(tmp_path / "new.jsonl", [f"new{i}" for i in range(20000)])
    command = pipeline_command(
        new, output, "--model", tiny_bundle[0], "--overwrite", "--layer", "lstm_content", "--pooling", "none"
    )
    result = run_command(command)
    assert result.returncode == EXIT_OUTPUT_FAILED, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "ran out of space" in errors[0], result.stderr[-3000:]
    assert {k: v for k, v in snapshot(output).items() if not k.startswith(layout_lib.STAGING)} == before
    assert _complete_export(output) == sorted(IDS)
    # The rows made durable are kept for the rerun; the message says where, and how to drop them.
    staging = os.path.join(output, layout_lib.STAGING)
    assert staging in errors[0] and "--resume off" in errors[0]
    assert resume_lib.read_run(output, os.listdir(staging)[0]) is not None


@pytest.mark.slow
def test_a_file_past_the_file_size_limit_is_one_error_and_a_rerun_with_smaller_shards_continues(
    tmp_path, tiny_bundle
):
    """`ulimit -f` (or FAT32's 4 GiB under a large --shard_mb): a row file's write fails with EFBIG,
    which ended the run in Beam's traceback, exit 1."""
    output = str(tmp_path / "out")
    run_export(
        ["--model", tiny_bundle[0], "--input", _corpus(tmp_path / "old.jsonl", IDS), "--output", output]
    )
    before = snapshot(output)
    new_ids = [f"new{i}" for i in range(400)]
    new = _corpus(tmp_path / "new.jsonl", new_ids)
    argv = pipeline_command(new, output, "--model", tiny_bundle[0], "--overwrite", "--batch_size", "16")[3:]
    # About 60 kB of rows in one file (a checkpoint closes it only after 60 s): past a 20 kB limit.
    error = _output_failed_in_one_line(_hooked(["fsize:20000"], argv))
    assert "File too large" in error and "--shard_mb" in error, error
    staging = os.path.join(output, layout_lib.STAGING)
    assert staging in error
    assert {k: v for k, v in snapshot(output).items() if not k.startswith(layout_lib.STAGING)} == before
    # Files of 10 kB fit under the limit; --shard_mb is no part of the run's signature.
    process = _hooked(["fsize:20000"], [*argv, "--shard_mb", "0.01"])
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    assert _complete_export(output) == sorted(new_ids)


# --- point 13: SIGTERM, and Ctrl-C in the forward pass ------------------------------------------


def _quiet_after(err):
    """The lines Beam, Keras or Python would print after an interrupt: none may appear."""
    return [
        line
        for line in err.splitlines()
        if "Traceback" in line or "KeyboardInterrupt" in line or line.startswith(("ERROR", "error:"))
    ]


@pytest.mark.slow
def test_sigterm_is_one_interrupted_line_exit_143_and_the_rerun_completes(tmp_path, tiny_bundle):
    corpus = _corpus(tmp_path / "c.jsonl", [f"doc{i}" for i in range(3000)])
    output = str(tmp_path / "out")
    marker = str(tmp_path / "inference")
    command = pipeline_command(
        corpus, output, "--model", tiny_bundle[0], "--batch_size", "16", "--shard_mb", "0.02"
    )
    # Paused in the 40th forward pass, well before the commit (a signal there would wait for it).
    process = _hooked([f"inference_pause:40:{marker}"], command[3:])
    _wait_for(marker + ".paused", process)
    process.send_signal(signal.SIGTERM)
    open(marker + ".go", "w").close()
    _, err = process.communicate(timeout=120)
    assert process.returncode == EXIT_TERMINATED, err[-3000:]
    assert _quiet_after(err) == [], err[-3000:]
    assert [line for line in err.splitlines() if line.startswith("interrupted:")] == [
        "interrupted: nothing was committed; rerun the same command to finish the export "
        "(it keeps the rows this run made durable)."
    ]
    assert state_lib.read_manifest(output) is None
    rerun = run_command(command)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert len(_complete_export(output)) == 3000


@pytest.mark.parametrize(
    "signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=["sigint", "sigterm", "sighup"]
)
@pytest.mark.slow
def test_a_signal_in_the_forward_pass_prints_only_the_interrupted_line(tmp_path, tiny_bundle, signum):
    corpus = _corpus(tmp_path / "c.jsonl", [f"doc{i}" for i in range(400)])
    output = str(tmp_path / "out")
    marker = str(tmp_path / "inference")
    argv = pipeline_command(
        corpus, output, "--model", tiny_bundle[0], "--batch_size", "16", "--fast_path", "off"
    )
    # Paused inside the third batch's forward pass (RunInference), where Beam logs what interrupts it.
    process = _hooked([f"inference_pause:3:{marker}"], argv[3:])
    _wait_for(marker + ".paused", process)
    process.send_signal(signum)
    open(marker + ".go", "w").close()
    _, err = process.communicate(timeout=120)
    assert process.returncode == STOP_SIGNALS[signum], err[-3000:]
    assert _quiet_after(err) == [], err[-3000:]
    tail = err[err.index(marker) :] if marker in err else err
    assert [line for line in err.splitlines() if line.startswith("interrupted:")] == [
        "interrupted: nothing was committed; rerun the same command to finish the export "
        "(it keeps the rows this run made durable)."
    ], tail[-3000:]
    assert err.rstrip().splitlines()[-1].startswith("interrupted:")


@pytest.mark.slow
def test_a_run_started_under_nohup_goes_on_after_sighup(tmp_path, tiny_bundle):
    corpus = _corpus(tmp_path / "c.jsonl", [f"doc{i}" for i in range(400)])
    output = str(tmp_path / "out")
    marker = str(tmp_path / "inference")
    argv = pipeline_command(corpus, output, "--model", tiny_bundle[0], "--batch_size", "16")
    # What `nohup` does: SIGHUP ignored from the start (preexec_fn starts it cold, not forked).
    process = _hooked(
        [f"inference_pause:3:{marker}"],
        argv[3:],
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN),
    )
    _wait_for(marker + ".paused", process)
    process.send_signal(signal.SIGHUP)
    open(marker + ".go", "w").close()
    _, err = process.communicate(timeout=180)
    assert process.returncode == 0, err[-3000:]
    assert "interrupted:" not in err
    assert len(_complete_export(output)) == 400


# --- point 14: a failed --overwrite keeps the succeeded export ---------------------------------


@pytest.mark.slow
def test_a_failed_overwrite_keeps_the_succeeded_export_and_says_where_its_dead_letters_are(
    tmp_path, tiny_bundle, capsys
):
    good = _corpus(tmp_path / "good.jsonl", IDS)
    output = str(tmp_path / "out")
    assert main(["--model", tiny_bundle[0], "--input", good, "--output", output]) == 0
    capsys.readouterr()
    before = snapshot(output)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "only", "content": "word1", "title": "word2"}) + "\n" + "{broken\n" * 5)
    code = main(["--model", tiny_bundle[0], "--input", str(bad), "--output", output, "--overwrite"])
    err = capsys.readouterr().err
    assert code == EXIT_TOO_MANY_ERRORS, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "was kept" in errors[0], err
    assert snapshot(output) == {k: v for k, v in snapshot(output).items() if k in before} | {
        k: v for k, v in snapshot(output).items() if k.startswith(layout_lib.FAILED_DIR + "/")
    }
    assert {
        k: v for k, v in snapshot(output).items() if not k.startswith(layout_lib.FAILED_DIR + "/")
    } == before
    assert _complete_export(output) == sorted(IDS)
    (failed,) = os.listdir(os.path.join(output, layout_lib.FAILED_DIR))
    failed_dir = os.path.join(output, layout_lib.FAILED_DIR, failed)
    assert os.path.join(failed_dir, "errors") in errors[0]
    dead = pq.read_table(os.path.join(failed_dir, "errors")).to_pylist()
    assert sorted(d["reason"] for d in dead) == ["malformed_json"] * 5
    failed_manifest = state_lib.read_manifest(failed_dir)
    assert failed_manifest["committed"] is False and failed_manifest["counts"]["dead_letters"] == 5
    # The failed run's files are the export's own: a later --overwrite replaces them with the rest.
    assert main(["--model", tiny_bundle[0], "--input", good, "--output", output, "--overwrite"]) == 0
    assert not os.path.exists(os.path.join(output, layout_lib.FAILED_DIR))
    assert _complete_export(output) == sorted(IDS)


@pytest.mark.slow
def test_a_failed_overwrite_stopped_as_it_sets_its_dead_letters_aside_leaves_one_record_of_each_run(
    tmp_path, tiny_bundle
):
    """A SIGTERM there did not wait for it (`_failed/RUN/` was left with dead letters and no manifest),
    and the rerun after a SIGKILL there kept such a folder forever beside its own."""
    good = _corpus(tmp_path / "good.jsonl", IDS)
    output = str(tmp_path / "out")
    assert main(["--model", tiny_bundle[0], "--input", good, "--output", output]) == 0
    before = snapshot(output)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "only", "content": "word1", "title": "word2"}) + "\n" + "{broken\n" * 5)
    argv = pipeline_command(bad, output, "--model", tiny_bundle[0], "--overwrite")[3:]
    failed_root = os.path.join(output, layout_lib.FAILED_DIR)
    marker = str(tmp_path / "aside")
    # Paused before the failed run's manifest is written, its dead letters moved into _failed/RUN/.
    process = _hooked([f"pause:write:1:{marker}"], argv)
    _wait_for(marker + ".paused", process)
    process.send_signal(signal.SIGTERM)
    time.sleep(0.2)  # The handler runs while the set-aside is paused: it must only defer.
    open(marker + ".go", "w").close()
    _, err = process.communicate(timeout=120)
    assert process.returncode == EXIT_TERMINATED, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith(("interrupted:", "error:"))]
    assert len(lines) == 2, err[-3000:]
    assert lines[0].startswith(f"interrupted: the run had finished in {output} "), lines
    assert "was kept" in lines[1], lines
    (first,) = os.listdir(failed_root)
    assert state_lib.read_manifest(os.path.join(failed_root, first)) is not None
    assert not os.path.exists(os.path.join(output, layout_lib.STAGING))
    # SIGKILLed at the same place, then rerun: the folder no manifest explains goes.
    process = _hooked(["kill:write:1"], argv)
    process.communicate(timeout=120)
    assert process.returncode == -signal.SIGKILL
    assert len(os.listdir(failed_root)) == 2
    rerun = run_command(pipeline_command(bad, output, "--model", tiny_bundle[0], "--overwrite"))
    assert rerun.returncode == EXIT_TOO_MANY_ERRORS, rerun.stderr[-3000:]
    runs = sorted(os.listdir(failed_root))
    assert len(runs) == 2 and first in runs, runs
    for run in runs:
        assert state_lib.read_manifest(os.path.join(failed_root, run))["counts"]["dead_letters"] == 5
    kept = {k: v for k, v in snapshot(output).items() if not k.startswith(layout_lib.FAILED_DIR + "/")}
    assert kept == before


@pytest.mark.slow
def test_hooked_run_is_the_real_command(tmp_path, tiny_bundle):
    # The hooks of the other tests are the only difference from `python -m pipeline.run`.
    corpus = _corpus(tmp_path / "c.jsonl", IDS)
    output = str(tmp_path / "out")
    result = run_command(
        [sys.executable, HOOKED_RUN, "--", "--model", tiny_bundle[0], "--input", corpus, "--output", output]
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert _complete_export(output) == sorted(IDS)


def _descendants(pid: int) -> set[int]:
    """The processes below `pid` (read from /proc: a Linux test machine)."""
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as handle:
                parent = int(handle.read().rsplit(")", 1)[1].split()[1])
        except (ValueError, OSError):
            continue
        children.setdefault(parent, []).append(int(entry))
    found: set[int] = set()
    pending = [pid]
    while pending:
        for child in children.get(pending.pop(), []):
            found.add(child)
            pending.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _two_worker_command(tmp_path, tiny_bundle, documents):
    """(command, output) of a run with two local worker processes, small batches and row files."""
    corpus = _corpus(tmp_path / "c.jsonl", [f"doc{i}" for i in range(documents)])
    output = str(tmp_path / "out")
    command = pipeline_command(
        corpus,
        output,
        "--model",
        tiny_bundle[0],
        "--batch_size",
        "16",
        "--shard_mb",
        "0.02",
        "--direct_running_mode=multi_processing",
        "--direct_num_workers=2",
    )
    return command, output


@pytest.mark.parametrize("presses", [1, 2], ids=["once", "twice"])
@pytest.mark.slow
def test_a_terminal_ctrl_c_on_a_run_with_worker_processes_prints_only_the_interrupted_line(
    tmp_path, tiny_bundle, presses
):
    command, output = _two_worker_command(tmp_path, tiny_bundle, 3000)
    environment = dict(os.environ, PYTHONPATH=REPOSITORY)
    process = forkserver.popen(
        command,
        cwd=REPOSITORY,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert wait_for_staged_shard(process, output), "the run wrote no shard before it ended"
        workers = _descendants(process.pid)
        assert workers, "the run started no worker process"
        # A terminal sends Ctrl-C to its whole foreground process group: the workers get it too.
        os.killpg(process.pid, signal.SIGINT)
        if presses == 2:
            # The second press lands while Beam stops its workers, which it then no longer waits for;
            # the first SIGKILLs them at once, so the run may be gone already.
            time.sleep(0.3)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGINT)
        _, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == EXIT_INTERRUPTED, err[-3000:]
    assert "Traceback" not in err and _quiet_after(err) == [], err[-3000:]
    assert err.rstrip().splitlines()[-1] == (
        "interrupted: nothing was committed; rerun the same command to finish the export "
        "(it keeps the rows this run made durable)."
    ), err[-3000:]
    deadline = time.time() + 20
    while any(_alive(pid) for pid in workers) and time.time() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in workers if _alive(pid)], "worker processes outlived the run"
    assert state_lib.read_manifest(output) is None
    if presses == 2:
        return
    rerun = forkserver.run(command, cwd=REPOSITORY, env=environment, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert len(_complete_export(output)) == 3000


def _start_with_two_workers(tmp_path, tiny_bundle, documents=20000):
    """A run with two local worker processes, started in its own session; (process, output, workers).

    Returned once the run has begun writing a row file: both workers are at work.
    """
    command, output = _two_worker_command(tmp_path, tiny_bundle, documents)
    process = forkserver.popen(
        command,
        cwd=REPOSITORY,
        env=dict(os.environ, PYTHONPATH=REPOSITORY),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    if not wait_for_staged_shard(process, output):
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail(f"the run wrote no shard before it ended: {process.communicate()[1][-3000:]}")
    # The workers are the launcher's descendants that run Beam's SDK worker.
    workers = [pid for pid in _descendants(process.pid) if b"sdk_worker_main" in _command_line(pid)]
    assert len(workers) == 2, workers
    return process, output, workers


def _command_line(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read()
    except OSError:
        return b""


def _finish(process, timeout):
    """The run's (exit status, stderr), or a failure if it has not ended within `timeout` seconds."""
    try:
        _, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        _, err = process.communicate()
        pytest.fail(f"the run had not ended {timeout} s later: {err[-3000:]}")
    return process.returncode, err


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc and prlimit")
@pytest.mark.slow
def test_a_worker_out_of_memory_is_one_error_line(tmp_path, tiny_bundle):
    """A worker under an address-space limit (ulimit -v, a batch scheduler's) that it reaches.

    It fails with a MemoryError, TensorFlow's ResourceExhaustedError or a library it
    can no longer map: Beam relays that as hundreds of lines of tracebacks.
    """
    import resource

    process, output, workers = _start_with_two_workers(tmp_path, tiny_bundle)
    try:
        for pid in workers:
            with open(f"/proc/{pid}/statm") as handle:
                mapped = int(handle.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
            # A little above what it holds now: its next large allocation fails.
            resource.prlimit(pid, resource.RLIMIT_AS, (mapped + (8 << 20), resource.RLIM_INFINITY))
        code, err = _finish(process, 120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == EXIT_UNEXPECTED and len(lines) == 1, err[-3000:]
    # Where the allocation fails decides the story: an error naming the want of memory, or an
    # abort (SIGABRT) from a library that could not allocate and left no words saying so.
    told = ("a worker process ran out of memory", "a worker process was killed (SIGABRT)")
    assert lines[0].startswith(tuple(f"error: {each}" for each in told)), lines[0]
    assert "--direct_num_workers 1" in lines[0] and "rerun the same command" in lines[0]
    assert "Traceback" not in err, err[-3000:]
    assert state_lib.read_manifest(output) is None


_DIE_AT_SHUTDOWN = """
import atexit, os
if os.environ.get("CONTROL_API_SERVICE_DESCRIPTOR"):  # Beam's SDK worker processes only
    atexit.register(lambda: os.kill(os.getpid(), 6))
"""


@pytest.mark.slow
def test_workers_that_die_at_their_shutdown_after_their_work_do_not_fail_the_run(tmp_path, tiny_bundle):
    """A teardown abort in each worker (as TensorFlow's or gRPC's can be): the launcher was killed by
    its own wake signal (exit 138, no line, once mid-commit) or failed a run whose rows were all written."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(_DIE_AT_SHUTDOWN, encoding="utf-8")
    corpus = _corpus(tmp_path / "c.jsonl", [f"doc{i}" for i in range(2000)])
    output = str(tmp_path / "out")
    command = pipeline_command(
        corpus,
        output,
        "--model",
        tiny_bundle[0],
        "--direct_running_mode=multi_processing",
        "--direct_num_workers=3",
    )
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "site"), REPOSITORY]))
    result = forkserver.run(
        command, cwd=REPOSITORY, env=environment, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert state_lib.read_manifest(output)["counts"]["rows_written"] == 2000


@pytest.mark.slow
def test_a_sigusr1_from_elsewhere_does_not_end_a_run_with_workers(tmp_path, tiny_bundle):
    """The launcher's wake signal for a failed worker: one from a host process (gunicorn, uwsgi use it)
    failed the run in a traceback, or hung it."""
    process, output, _ = _start_with_two_workers(tmp_path, tiny_bundle, documents=3000)
    try:
        process.send_signal(signal.SIGUSR1)
        code, err = _finish(process, 300)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert code == 0, err[-3000:]
    assert state_lib.read_manifest(output)["counts"]["rows_written"] == 3000


_WAKE_WHILE_HOLDING_THE_LOCK = """
import signal, threading
from pipeline.errors import WorkerDiedError
from pipeline.running import failures, local_workers
try:
    with failures.beam_errors_held():
        local_workers._failed.append((1, [b"boom\\n"]))
        with local_workers._lock:  # The main thread holds the lock as the wake signal lands.
            signal.pthread_kill(threading.main_thread().ident, failures.WAKE_SIGNAL)
            for _ in range(1000):
                pass
except WorkerDiedError as told:  # The wake, told in one line.
    print(told)
"""


def test_the_wake_signal_landing_while_the_main_thread_holds_the_workers_lock_does_not_deadlock():
    """The wake handler runs in the main thread; it took `local_workers`' lock, which the main thread
    may hold itself (recording a started worker, the run's end) as the signal lands: a hang forever."""
    result = forkserver.run(
        [sys.executable, "-c", _WAKE_WHILE_HOLDING_THE_LOCK],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("a worker process exited with status 1 (boom)"), result.stdout


def test_a_failed_workers_line_quotes_its_own_words_not_tensorflows_log(monkeypatch):
    """It quoted "Could not find cuda drivers on your machine" as the reason a worker exited."""
    from pipeline.running import failures as failures_lib
    from pipeline.running import local_workers

    last = [
        b"ValueError: the worker's own reason\n",
        b"I0000 00:00:1796628440.026061   16469 cudart_stub.cc:31] Could not find cuda drivers on "
        b"your machine, GPU will not be used.\n",
    ]
    monkeypatch.setattr(local_workers, "_failed", [(1, last)])
    monkeypatch.setattr(local_workers, "killed_by", lambda: [])
    told = failures_lib._told_in_one_line(local_workers.WorkerFailedError("a worker process failed"))
    assert "exited with status 1 (ValueError: the worker's own reason)" in str(told), told


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.slow
def test_a_stopped_worker_does_not_keep_the_first_signal_from_ending_the_run(tmp_path, tiny_bundle, signum):
    """A worker SIGSTOPped (as a deadlocked one, or one on a hung mount) never answers Beam's unwinding."""
    process, output, workers = _start_with_two_workers(tmp_path, tiny_bundle)
    try:
        os.kill(workers[0], signal.SIGSTOP)
        time.sleep(1)  # Beam now waits for the stopped worker.
        process.send_signal(signum)
        code, err = _finish(process, 20)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    assert code == STOP_SIGNALS[signum], err[-3000:]
    assert err.rstrip().splitlines()[-1].startswith("interrupted: nothing was committed;"), err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    deadline = time.time() + 10
    while any(_alive(pid) for pid in workers) and time.time() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in workers if _alive(pid)], "worker processes outlived the run"
    assert state_lib.read_manifest(output) is None


def test_a_set_aside_whose_manifest_the_full_disk_left_empty_is_removed_by_the_next_run(tmp_path):
    """A disk that filled as a failed --overwrite run wrote `_failed/RUN/_MANIFEST.json` left it empty (open
    made it, the write failed): every later run kept that folder, its dead letters of no record, forever."""
    from pipeline.writing.lock import OutputLock

    output = tmp_path / "out"
    output.mkdir()
    (output / layout_lib.MANIFEST).write_text(json.dumps({"status": "succeeded", "shards": {}}))
    kept, cut = (output / layout_lib.FAILED_DIR / run for run in ("0123456789ab", "ba9876543210"))
    for folder, manifest in ((kept, json.dumps({"committed": False})), (cut, "")):
        (folder / layout_lib.ERRORS_DIR).mkdir(parents=True)
        (folder / layout_lib.ERRORS_DIR / "part-00000-of-00001.parquet").write_bytes(b"PAR1 dead letters")
        (folder / layout_lib.MANIFEST).write_text(manifest)
    with OutputLock(str(output)):
        state_lib.prepare(str(output), overwrite=True)
    assert sorted(os.listdir(output / layout_lib.FAILED_DIR)) == [kept.name]
    assert sorted(os.listdir(kept)) == [layout_lib.MANIFEST, layout_lib.ERRORS_DIR]
