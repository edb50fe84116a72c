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
import tempfile
import textwrap
import threading
import time
import types
from collections.abc import Callable

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
    WorkerDiedError,
)
from pipeline.run import STOP_SIGNALS, main
from pipeline.running.export import run_export
from pipeline.scratch import held_scratch_directory
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


def _has_footer(path: str) -> bool:
    try:
        pq.ParquetFile(path)
    except Exception:  # Cut before its footer.
        return False
    return True


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
    # The earlier export is untouched; the rows made durable are kept (the line names them only if a
    # row file was closed), and the rerun (once there is room) continues from them.
    assert {k: v for k, v in snapshot(output).items() if not k.startswith(layout_lib.STAGING)} == before
    staged = [
        os.path.join(folder, name)
        for folder, _, names in os.walk(os.path.join(output, layout_lib.STAGING))
        for name in names
        if name.endswith(".parquet") and f"{os.sep}data" in folder
    ]
    closed = [path for path in staged if _has_footer(path)]
    if closed:
        assert os.path.join(output, layout_lib.STAGING) in error, error
    else:
        assert "No row had been made durable yet" in error and layout_lib.STAGING not in error, error
    rerun = run_command(
        pipeline_command(new, output, "--model", tiny_bundle[0], "--overwrite", "--batch_size", "16")
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert _complete_export(output) == sorted(f"new{i}" for i in range(400))


def test_a_full_disk_before_any_row_was_durable_promises_no_kept_rows(tmp_path):
    """A disk full as the run wrote its lock or _RUN.json said "The rows made durable are kept in
    OUT/_staging/RUN: ... rerun ... to continue from them", naming a directory of no rows (0 kB)."""
    from pathlib import Path

    import pyarrow as pa

    from pipeline.running.failures import file_too_large, out_of_space
    from pipeline.writing.staging import staging_prefixes

    output, run_id = str(tmp_path / "out"), "0123456789ab"
    for error in (out_of_space(output, run_id), file_too_large(output, run_id)):
        assert "made durable yet" in str(error) and layout_lib.STAGING not in str(error), error
    # A row file cut by the full disk (no footer) is no durable row either.
    rows_prefix = staging_prefixes(output, run_id)[0]
    os.makedirs(os.path.dirname(rows_prefix))
    table = pa.table({"id": ["a"]})
    pq.write_table(table, rows_prefix + "-00000-of-00001.parquet")
    whole = Path(rows_prefix + "-00000-of-00001.parquet").read_bytes()
    with open(rows_prefix + "-writing.parquet", "wb") as cut:
        cut.write(whole[: len(whole) // 2])
    os.remove(rows_prefix + "-00000-of-00001.parquet")
    assert "made durable yet" in str(out_of_space(output, run_id))
    # A closed row file is kept for the rerun, and the line says where.
    pq.write_table(table, rows_prefix + "-00000-of-00001.parquet")
    for error in (out_of_space(output, run_id), file_too_large(output, run_id)):
        assert os.path.join(output, layout_lib.STAGING, run_id) in str(error), error
        assert "made durable yet" not in str(error) and "--resume off" in str(error), error


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
    # One LSTM state per token: about 175 kB of Parquet, nearly three times the disk. Row files of
    # about 10 kB: some are closed (durable) before the disk fills, whatever the machine's speed.
    new = _corpus(tmp_path / "new.jsonl", [f"new{i}" for i in range(20000)])
    command = pipeline_command(
        new,
        output,
        "--model",
        tiny_bundle[0],
        "--overwrite",
        "--layer",
        "lstm_content",
        "--pooling",
        "none",
        "--shard_mb",
        "0.01",
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
    # The one row file never closed: nothing durable to continue from, and the line says so.
    assert "no row had been made durable yet" in error and layout_lib.STAGING not in error, error
    assert {k: v for k, v in snapshot(output).items() if not k.startswith(layout_lib.STAGING)} == before
    # Files of 10 kB fit under the limit; --shard_mb is no part of the run's signature.
    process = _hooked(["fsize:20000"], [*argv, "--shard_mb", "0.01"])
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    assert _complete_export(output) == sorted(new_ids)


@pytest.mark.slow
def test_a_token_table_past_the_file_size_limit_does_not_say_to_lower_shard_mb(tmp_path):
    """--token_storage ids writes each Embedding's table whole, one file whatever --shard_mb: past the
    file-size limit, the line told to lower --shard_mb, and every rerun that did failed the same way."""
    output = str(tmp_path / "out")
    flags = ["--layer", "emb:0", "--pooling", "none", "--token_storage", "ids", "--limit", "20"]
    argv = [*pipeline_command(_corpus(tmp_path / "c.jsonl", IDS), output)[3:], *flags]
    # The bundled model's table is some megabytes; the run's own bookkeeping is far below 1 MB.
    error = _output_failed_in_one_line(_hooked(["fsize:1000000"], argv))
    assert "the token table" in error and "--token_storage vectors" in error, error
    assert "Lower --shard_mb" not in error, error


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
    # 1,000 documents: 63 batches, the pause in the 40th holds the run; the rerun embeds the rest.
    corpus = _corpus(tmp_path / "c.jsonl", [f"doc{i}" for i in range(1000)])
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
    assert len(_complete_export(output)) == 1000


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
    # What `nohup` does: SIGHUP ignored from the start.
    process = _hooked([f"inference_pause:3:{marker}"], argv[3:], ignored_signals=[signal.SIGHUP])
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


def _two_worker_command(tmp_path, tiny_bundle, documents, *flags):
    """(command, output) of a run with two local worker processes, small batches and row files."""
    corpus = _corpus(tmp_path / "c.jsonl", [f"doc{i}" for i in range(documents)])
    output = str(tmp_path / "out")
    return _two_worker_flags(corpus, output, tiny_bundle, *flags), output


def _two_worker_flags(corpus, output, tiny_bundle, *flags):
    """The command of `_two_worker_command` over an existing corpus file (a rerun over it as it was)."""
    return pipeline_command(
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
        *flags,
    )


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


def _start_with_two_workers(tmp_path, tiny_bundle, documents=20000, *flags):
    """A run with two local worker processes, started in its own session; (process, output, workers).

    Returned once the run has begun writing a row file: both workers are at work.
    """
    command, output = _two_worker_command(tmp_path, tiny_bundle, documents, *flags)
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


def test_a_library_callers_sigusr1_handler_still_runs_during_an_export():
    """In-process on the main thread, the run's wake for a failed worker replaced the caller's SIGUSR1
    handler and dropped every SIGUSR1 that was no wake: a host's own (gunicorn and uwsgi reopen their
    logs on it) never ran for one that arrived while an export ran."""
    from pipeline.running import failures as failures_lib

    calls = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: calls.append(signum))
    try:
        with failures_lib.beam_errors_held():  # What a local run does around its pipeline.
            signal.raise_signal(signal.SIGUSR1)  # From elsewhere: no worker failed.
        assert calls == [signal.SIGUSR1]
        signal.raise_signal(signal.SIGUSR1)  # The caller's handler is back after the run.
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert calls == [signal.SIGUSR1] * 2


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


def test_a_worker_that_connects_after_its_connection_was_closed_is_told_there_is_no_more_work():
    """A run that failed before a worker had connected (the other failed its first stage while this one
    still started) closed that worker's control connection unstarted: Beam told the worker nothing,
    it waited for work and the launcher for its end, forever, idle (no count moved: no stall either)."""
    from apache_beam.runners.portability.fn_api_runner import worker_handlers

    from pipeline.running import local_workers

    class Worker:  # What Beam's gRPC server hands `Control`: who connects.
        def invocation_metadata(self):
            return [("worker_id", "late")]

    servicer = worker_handlers.BeamFnControlServicer(worker_manager=None)
    connection = servicer.get_conn_by_worker_id("late")
    with local_workers.late_workers_stopped():
        connection.close()  # The launcher's `close_all`, before the worker connected.
    ended = threading.Event()

    def connect():
        for _ in servicer.Control(iter(()), Worker()):
            pass
        ended.set()

    threading.Thread(target=connect, daemon=True).start()
    assert ended.wait(10), "the late worker's control stream never ended: the run would hang"
    assert worker_handlers.ControlConnection.close.__name__ == "close"  # Beam's own, put back.


def test_local_worker_processes_get_the_runs_filesystem_flags():
    """docs/dataflow.md's MinIO command: Beam's FnApiRunner gives its worker processes no pipeline options,
    so each worker's S3 filesystem had neither --s3_endpoint_url nor the keys; the launch checks passed,
    then the workers retried "Unable to locate credentials" for minutes and the run failed without a row."""
    from apache_beam.options.pipeline_options import PipelineOptions, S3Options
    from apache_beam.runners.portability import local_job_service
    from apache_beam.runners.worker import sdk_worker_main

    from pipeline.running import local_workers
    from pipeline.running.runners import filesystem_options

    options = PipelineOptions(
        ["--s3_endpoint_url=http://127.0.0.1:9", "--s3_access_key_id=KEY", "--s3_secret_access_key=SECRET"]
    )
    # What Beam's SubprocessSdkWorker gives a worker: no options. The worker says what it got.
    environment = dict(os.environ, PIPELINE_OPTIONS="{}")
    with local_workers.ignoring_ctrl_c(filesystem_options(options)):
        worker = local_job_service.subprocess.Popen(
            'printf %s "$PIPELINE_OPTIONS"', shell=True, env=environment, stdout=subprocess.PIPE
        )
        got = worker.stdout.read()  # Its stderr is the launcher's to copy (`_copy_stderr`).
        worker.wait(timeout=60)
    # As Beam's worker main reads them, for its filesystems (`create_harness`).
    s3 = sdk_worker_main._parse_pipeline_options(got.decode()).view_as(S3Options)
    assert (s3.s3_endpoint_url, s3.s3_access_key_id, s3.s3_secret_access_key) == (
        "http://127.0.0.1:9",
        "KEY",
        "SECRET",
    )


def test_a_worker_is_started_from_a_python_whose_path_holds_a_space(tmp_path, monkeypatch):
    """Beam writes `sys.executable` into the worker's shell command unquoted: from a venv in "My Projects"
    the shell ran "/.../My" (status 127), and every run with worker processes failed, its rerun too."""
    from apache_beam.runners.portability import local_job_service

    from pipeline.running import local_workers

    folder = tmp_path / "My Projects $HOME"
    folder.mkdir()
    python = folder / "python"  # Stands in for the interpreter: says how it was started.
    python.write_text('#!/bin/sh\nprintf "%s|" "$@"\n', encoding="utf-8")
    python.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(python))
    monkeypatch.setattr(local_workers, "_started", [])
    with local_workers.ignoring_ctrl_c():
        # Beam's FnApiRunner's command for a worker, as it builds it.
        worker = local_job_service.subprocess.Popen(
            f"{sys.executable} -m apache_beam.runners.worker.sdk_worker_main",
            shell=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        said = worker.stdout.read()
        worker.wait(timeout=60)
    assert (worker.returncode, said) == (0, b"-m|pipeline.running.sdk_worker_main|")


def test_a_library_users_ctrl_c_stops_the_workers_at_once(monkeypatch):
    """In-process (a notebook's interrupt, a service's Ctrl-C) there is no stop handler of pipeline.run's:
    the KeyboardInterrupt took 20 to 35 s to return, Beam's unwinding waiting for each worker to finish
    starting and its bundle. Its workers are SIGKILLed at once now, as the command's are."""
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipeline.running import local_workers
    from pipeline.running.runners import worker_package_path

    monkeypatch.setattr(local_workers, "_started", [])
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own, as in a notebook.
    worker = subprocess.Popen([sys.executable, "-S", "-c", "import time; time.sleep(60)"])
    options = PipelineOptions(["--direct_running_mode=multi_processing", "--direct_num_workers=2"])
    try:
        with pytest.raises(KeyboardInterrupt), worker_package_path(options):
            local_workers._started.append(worker)  # As Beam starts one.
            signal.raise_signal(signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Put back.
        worker.wait(timeout=10)
    finally:
        signal.signal(signal.SIGINT, previous)
        worker.kill()
        worker.wait()
        local_workers.hold_tracebacks()  # The next run starts with no stop remembered.
        local_workers.let_held_tracebacks_through()
    assert worker.returncode == -signal.SIGKILL


def test_a_run_on_another_thread_than_the_main_one_ends_at_its_stall(monkeypatch):
    """A service running its exports on a thread: the wake needs the main thread's signal handler, so it
    is not set, and the watchdog did nothing: a stopped worker held the run forever, whatever
    --stall_timeout said. Its workers are killed now, which ends Beam's wait (the run tells the stall)."""
    from pipeline.running import local_workers

    worker = subprocess.Popen([sys.executable, "-S", "-c", "import time; time.sleep(60)"])
    monkeypatch.setattr(local_workers, "_started", [worker])
    local_workers.hold_tracebacks()  # The run holds its tracebacks; no wake: it is not the main thread's.
    try:
        local_workers.stalled(12.0, 10.0)
        stall = local_workers.stall()
        worker.wait(timeout=10)
    finally:
        worker.kill()
        worker.wait()
        local_workers.let_held_tracebacks_through()
        local_workers.hold_tracebacks()  # The next run starts with no stall remembered.
        local_workers.let_held_tracebacks_through()
    assert worker.returncode == -signal.SIGKILL
    assert stall is not None and (stall.seconds, stall.limit) == (12.0, 10.0)


@pytest.mark.parametrize("ended_by", ["failure", "stall"])
def test_a_run_on_another_thread_ends_for_a_worker_that_died_before_it_connected(monkeypatch, ended_by):
    """A service's run on a thread, whose worker died as it started (killed, out of memory): Beam waited
    forever for the bundle queued to it. No failure timer was set without the main thread's wake, and the
    stall's kills ended only the other workers' bundles: the run hung whatever --stall_timeout said.
    The instructions its workers were sent, and any later one, are answered with the failure now."""
    from apache_beam.portability.api import beam_fn_api_pb2
    from apache_beam.runners.portability.fn_api_runner import worker_handlers

    from pipeline.running import failures as failures_lib
    from pipeline.running import local_workers

    monkeypatch.setattr(local_workers, "FAILURE_GRACE_SECONDS", 0.1)
    other = subprocess.Popen([sys.executable, "-S", "-c", "import time; time.sleep(60)"])
    monkeypatch.setattr(local_workers, "_started", [other])  # The run's other worker, which is killed.
    answers = []

    def run():  # What Beam's bundle thread waits for: the dead worker's answer.
        with local_workers.failed_workers_answered():
            connection = worker_handlers.ControlConnection()  # The worker never connected to it.
            queued = connection.push(beam_fn_api_pb2.InstructionRequest(instruction_id="bundle_1"))
            if ended_by == "failure":
                local_workers._worker_failed(-signal.SIGKILL, [])  # As its stderr's end reports it.
            else:
                local_workers.stalled(12.0, 10.0)
            answers.append(queued.get(timeout=10).error)
            later = connection.push(beam_fn_api_pb2.InstructionRequest(instruction_id="bundle_2"))
            answers.append(later.get(timeout=10).error)

    local_workers.hold_tracebacks()
    try:
        thread = threading.Thread(target=run)
        thread.start()
        thread.join(30)
        told = failures_lib._told_in_one_line(RuntimeError(local_workers.WORKER_FAILED))
    finally:
        other.kill()
        other.wait()
        local_workers.let_held_tracebacks_through()
        local_workers.hold_tracebacks()  # The next run starts with nothing remembered.
        local_workers.let_held_tracebacks_through()
    assert answers == [local_workers.WORKER_FAILED] * 2
    assert worker_handlers.ControlConnection.push.__name__ == "push"  # Beam's own, put back.
    said = "made no progress" if ended_by == "stall" else "was killed (SIGKILL"
    assert isinstance(told, WorkerDiedError) and said in str(told), told


def test_a_worker_that_failed_as_its_run_ended_does_not_stop_the_next_runs_workers(monkeypatch):
    """A worker of one in-process run exited with an error at its shutdown; 15 s later its timer
    SIGKILLed the next run's workers: that run failed "a worker process was killed (SIGKILL)"."""
    from pipeline.running import local_workers

    monkeypatch.setattr(local_workers, "FAILURE_GRACE_SECONDS", 0.2)
    killed, woken = [], []
    monkeypatch.setattr(local_workers, "kill_workers", lambda: killed.append(True))
    local_workers.hold_tracebacks()
    local_workers.wake_on_failure(lambda: woken.append("first"))
    local_workers._worker_failed(1, [b"at its shutdown\n"])
    local_workers.let_held_tracebacks_through()  # The first run ends, the next begins.
    local_workers.hold_tracebacks()
    local_workers.wake_on_failure(lambda: woken.append("next"))
    try:
        time.sleep(1)
    finally:
        local_workers.wake_on_failure(None)
        local_workers.let_held_tracebacks_through()
    assert not killed and not woken


def test_the_workers_an_interrupted_run_killed_are_no_story_of_the_next_runs_failure(monkeypatch):
    """In one process (a notebook, a service), the workers a stop signal SIGKILLed stayed remembered: the
    next run's own failure was told as "a worker process was killed (SIGKILL, perhaps for want of memory)"."""
    from pipeline.running import failures as failures_lib
    from pipeline.running import local_workers

    monkeypatch.setattr(local_workers, "_started", [])
    monkeypatch.setattr(local_workers, "_killed_by", [])
    local_workers.hold_tracebacks()
    with local_workers.ignoring_ctrl_c():  # The first run: a stop signal ends it.
        worker = subprocess.Popen([sys.executable, "-S", "-c", "import time; time.sleep(60)"])
        local_workers._started.append(worker)
        local_workers.stop_workers()
    local_workers.let_held_tracebacks_through()
    local_workers.hold_tracebacks()  # The next run, which fails on an error of its own.
    try:
        told = failures_lib._told_in_one_line(RuntimeError("a worker's ValueError"))
    finally:
        local_workers.let_held_tracebacks_through()
    assert told is None, told  # Its own error, as in a fresh process.
    assert worker.returncode == -signal.SIGKILL


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


def test_a_failed_worker_is_told_by_its_own_status_not_by_the_kill_of_the_others(monkeypatch):
    """A worker exited with status 1 (its own words on stderr) without Beam noticing; 15 s later the
    launcher SIGKILLed the other to end the wait, and the line told that kill: "a worker process was
    killed (SIGKILL, perhaps for want of memory) ... --direct_num_workers 1 if memory is short"."""
    from pipeline.running import failures as failures_lib
    from pipeline.running import local_workers

    monkeypatch.setattr(local_workers, "FAILURE_GRACE_SECONDS", 0.1)
    other = subprocess.Popen([sys.executable, "-S", "-c", "import time; time.sleep(60)"])
    monkeypatch.setattr(local_workers, "_started", [other])
    woken = threading.Event()
    local_workers.hold_tracebacks()
    local_workers.wake_on_failure(woken.set)  # The main thread's wake.
    try:
        local_workers._worker_failed(1, [b"ValueError: the worker's own reason\n"])
        assert woken.wait(10)
        local_workers.wake_on_failure(None)
        told = failures_lib._told_in_one_line(local_workers.WorkerFailedError(local_workers.WORKER_FAILED))
    finally:
        local_workers.wake_on_failure(None)
        local_workers.let_held_tracebacks_through()
        other.kill()
        other.wait()
    assert other.returncode == -signal.SIGKILL  # Killed to end the wait ...
    assert "exited with status 1 (ValueError: the worker's own reason)" in str(told), told  # ... not told.


def test_out_of_memory_advice_says_a_smaller_batch_size_starts_from_zero(monkeypatch):
    """It said to "rerun the same command to finish the export (it keeps the rows made durable), with
    --direct_num_workers 1 (or a smaller --batch_size)": --batch_size is part of the run's signature, so
    that rerun dropped every staged row and embedded the whole corpus again."""
    from pipeline.running import failures as failures_lib
    from pipeline.running import local_workers

    monkeypatch.setattr(local_workers, "_failed", [])
    monkeypatch.setattr(local_workers, "killed_by", lambda: [])
    told = str(failures_lib._told_in_one_line(MemoryError("Unable to allocate 3.1 GiB")))
    assert told.startswith("a worker process ran out of memory") and "--direct_num_workers 1" in told, told
    assert "--batch_size is part of what a rerun must match: with another, the rerun starts from zero" in told
    assert "(or a smaller --batch_size)" not in told


def test_a_stall_is_told_in_one_line_naming_the_stopped_worker_not_the_kills_it_caused(monkeypatch):
    """The workers SIGKILLed for a stall are no story of their own ("killed (SIGKILL, perhaps for want of
    memory)" would send the user after memory)."""
    from pipeline.running import failures as failures_lib
    from pipeline.running import local_workers

    stall = local_workers.Stall(
        1805.0, 1800.0, ("worker process 42 is stopped (SIGSTOP, SIGTSTP or a debugger)",)
    )
    monkeypatch.setattr(local_workers, "_stall", [stall])
    monkeypatch.setattr(local_workers, "_failed", [(-9, [b"\n"])])
    told = failures_lib._told_in_one_line(local_workers.WorkerFailedError("a worker process failed"))
    assert str(told) == (
        "the run made no progress for 0:30:05 (--stall_timeout 1800 s): worker process 42 is stopped "
        "(SIGSTOP, SIGTSTP or a debugger). Its worker processes were killed and nothing was committed: free "
        "what held them, then rerun the same command to finish the export (it keeps the rows made durable); "
        "raise --stall_timeout (0 waits forever) if the run may rightly stand still that long."
    )


@pytest.mark.slow
def test_a_stopped_worker_does_not_keep_the_first_signal_from_ending_the_run(tmp_path, tiny_bundle):
    """A worker SIGSTOPped (as a deadlocked one, or one on a hung mount) never answers Beam's unwinding.

    SIGTERM stands for SIGINT too: `pipeline.run` installs one handler (`on_signal`) for every stop
    signal, which SIGKILLs the workers whatever the signal; only the exit status differs, and
    `STOP_SIGNALS` maps it (test_a_signal_in_the_forward_pass_prints_only_the_interrupted_line
    checks each signal's status, the Ctrl-C tests SIGINT with workers). Each case is two cold workers.
    """
    signum = signal.SIGTERM
    process, output, workers = _start_with_two_workers(tmp_path, tiny_bundle)

    def stop_the_run() -> None:
        time.sleep(1)  # Beam now waits for the stopped worker.
        process.send_signal(signum)

    code, err = _with_a_stopped_worker(process, workers, 20, stop_the_run)
    assert code == STOP_SIGNALS[signum], err[-3000:]
    assert err.rstrip().splitlines()[-1].startswith("interrupted: nothing was committed;"), err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    _assert_workers_gone(workers)
    assert state_lib.read_manifest(output) is None


def _with_a_stopped_worker(process, workers, timeout, then=lambda: None):
    """(exit status, stderr) of the run `process` with its first worker SIGSTOPped, then `then()`; every
    process it leaves is killed or continued afterwards, whatever the test finds."""
    try:
        os.kill(workers[0], signal.SIGSTOP)
        then()
        return _finish(process, timeout)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def _assert_workers_gone(workers):
    """Within 10 s of the launcher's end, no worker process of the run is left."""
    deadline = time.time() + 10
    while any(_alive(pid) for pid in workers) and time.time() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in workers if _alive(pid)], "worker processes outlived the run"


@pytest.mark.slow
def test_a_stopped_worker_ends_the_run_after_stall_timeout_and_the_rerun_finishes(tmp_path, tiny_bundle):
    """A worker that makes no progress (stopped, deadlocked, on a hung mount) hung the run forever: the
    progress line repeated the same counts, and only a signal ended it."""
    # The product's least: a process that computes is at work however little of a core it gets (the
    # workers' imports and model load, the launcher's id scan), so a loaded machine stalls no start-up.
    flags = ("--stall_timeout=10", "--progress_seconds=1")
    process, output, workers = _start_with_two_workers(tmp_path, tiny_bundle, 3000, *flags)
    code, err = _with_a_stopped_worker(process, workers, 90)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == EXIT_UNEXPECTED and len(lines) == 1, err[-3000:]
    assert lines[0].startswith("error: the run made no progress for 0:00:"), lines[0]
    assert f"(--stall_timeout 10 s): worker process {workers[0]} is stopped (SIGSTOP" in lines[0], lines[0]
    assert "rerun the same command to finish the export" in lines[0], lines[0]
    assert "Traceback" not in err, err[-3000:]
    _assert_workers_gone(workers)
    assert state_lib.read_manifest(output) is None
    # The same command without the stall flags (which the rerun need not match); the corpus as it was.
    rerun = run_command(_two_worker_flags(tmp_path / "c.jsonl", output, tiny_bundle))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert _complete_export(output) == sorted(f"doc{i}" for i in range(3000))
    assert state_lib.read_manifest(output)["resumed"] is not None


def _monitor_clock(monkeypatch: pytest.MonkeyPatch) -> Callable[[float], None]:
    """The progress module's monotonic clock, moved by the test (`sleep`): the looks come at the times
    the test names, not later where a loaded machine leaves this process waiting for a core."""
    from pipeline.running import progress as progress_lib

    now = [time.monotonic()]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    clock = types.SimpleNamespace(monotonic=lambda: now[0], time=time.time)
    monkeypatch.setattr(progress_lib, "time", clock)
    return sleep


def test_the_progress_monitor_calls_a_stall_once_and_not_for_its_own_process_stopped(tmp_path, monkeypatch):
    """The watchdog's clock: no count moved for --stall_timeout seconds is a stall, said once; a look far
    later than due (the launcher itself stopped, Ctrl-Z) restarts it, since the run stood still with it."""
    from pipeline.running import progress as progress_lib

    sleep = _monitor_clock(monkeypatch)
    calls = []
    monitor = progress_lib.ProgressMonitor(
        str(tmp_path), 1000, interval=0.05, stall_seconds=0.5, on_stall=lambda *args: calls.append(args)
    )
    totals = progress_lib.read_totals(str(tmp_path))
    monitor._watch_for_stall(totals, look=0.05)
    sleep(0.3)
    monitor._watch_for_stall({**totals, "records": 5}, look=0.05)  # A count moved: the clock restarts.
    sleep(0.3)
    monitor._watch_for_stall({**totals, "records": 5}, look=0.05)
    assert calls == []
    sleep(0.3)
    monitor._watch_for_stall({**totals, "records": 5}, look=1.0)  # 0.3 s late for a 1 s look: in time.
    assert len(calls) == 1 and calls[0][0] > 0.5 and calls[0][1] == 0.5, calls
    monitor._watch_for_stall({**totals, "records": 5}, look=0.05)
    assert len(calls) == 1  # Once.
    cpu = [0.0, 0.0, 0]  # A thread's seconds on a CPU, seconds waiting for one, time slices.
    busy = progress_lib.ProgressMonitor(
        str(tmp_path),
        1000,
        stall_seconds=0.5,
        on_stall=lambda *args: calls.append(args),
        scheduler_times=lambda: {(1, "1"): (cpu[0], cpu[1], cpu[2])},
    )
    for _ in range(8):  # No count moves, but a process computes (a long batch): no stall.
        busy._watch_for_stall({**totals, "records": 5}, look=0.05)
        sleep(0.1)
        cpu[0] += 0.05
        cpu[2] += 10
    assert len(calls) == 1
    for _ in range(8):  # It idles, polling at 5 % of a core: a stall.
        busy._watch_for_stall({**totals, "records": 5}, look=0.05)
        sleep(0.1)
        cpu[0] += 0.005
        cpu[2] += 10
    assert len(calls) == 2
    stopped = progress_lib.ProgressMonitor(
        str(tmp_path), 1000, stall_seconds=0.5, on_stall=lambda *args: calls.append(args)
    )
    stopped._watch_for_stall({**totals, "records": 5}, look=0.05)
    stopped._looked_at -= 60  # The launcher was stopped for a minute between two looks.
    stopped._moved_at -= 60
    stopped._watch_for_stall({**totals, "records": 5}, look=0.05)
    assert len(calls) == 2


def test_a_run_that_stands_still_before_its_first_count_stalls_but_its_start_up_does_not(
    tmp_path, monkeypatch
):
    """The stall clock restarted at every look until something was counted: a worker stopped, deadlocked
    or on a hung mount as it started hung the run forever ("checking ids, 0% scanned" repeated). Its
    start-up counts nothing but computes (TensorFlow's import, the model's load), which is no stall."""
    from pipeline.running import progress as progress_lib

    sleep = _monitor_clock(monkeypatch)
    calls = []
    thread = [0.0, 0.0, 0]  # Seconds on a CPU, seconds waiting for one, time slices.
    monitor = progress_lib.ProgressMonitor(
        str(tmp_path),
        1000,
        stall_seconds=0.5,
        on_stall=lambda *args: calls.append(args),
        scheduler_times=lambda: {(1, "1"): (thread[0], thread[1], thread[2])},
    )
    nothing = progress_lib.read_totals(str(tmp_path))
    assert not any(nothing.values())
    for _ in range(8):  # Starting: importing, loading the model, on a tenth of a core.
        monitor._watch_for_stall(nothing, look=0.05)
        sleep(0.1)
        thread[0] += 0.01
        thread[1] += 0.09
        thread[2] += 10
    assert calls == []
    for _ in range(8):  # Stopped as it started: it neither runs nor waits.
        monitor._watch_for_stall(nothing, look=0.05)
        sleep(0.1)
    assert len(calls) == 1 and calls[0][1] == 0.5, calls


# A worker waiting on slow writes: 128 kB every 50 ms (a mount at 2.5 MB/s), asleep in between.
_SLOW_WRITER = """
import os, time
out = os.open(os.devnull, os.O_WRONLY)
while True:
    os.write(out, bytes(128 << 10))
    time.sleep(0.05)
"""


def test_a_worker_reading_or_writing_slowly_is_at_work_and_a_stopped_one_is_not(tmp_path, monkeypatch):
    """A worker copying its model from object storage (16 MB a read), reading a slow mount or writing a row
    group to NFS counts nothing and hardly computes: a healthy run was ended as a stall, and so was each
    rerun, at the same download."""
    from pipeline.running import local_workers
    from pipeline.running import progress as progress_lib

    calls = []
    monitor = progress_lib.ProgressMonitor(
        str(tmp_path),
        1000,
        stall_seconds=0.5,
        on_stall=lambda *args: calls.append(args),
        io_bytes=local_workers.io_bytes,
    )
    nothing = progress_lib.read_totals(str(tmp_path))
    writing = subprocess.Popen([sys.executable, "-S", "-c", _SLOW_WRITER])
    stopped = subprocess.Popen([sys.executable, "-S", "-c", _SLOW_WRITER])
    try:
        monkeypatch.setattr(local_workers, "_started", [writing])
        for _ in range(8):
            monitor._watch_for_stall(nothing, look=0.1)
            time.sleep(0.15)
        assert calls == []
        stopped.send_signal(signal.SIGSTOP)
        monkeypatch.setattr(local_workers, "_started", [stopped])
        for _ in range(8):
            monitor._watch_for_stall(nothing, look=0.1)
            time.sleep(0.15)
    finally:
        for process in (writing, stopped):
            process.kill()
            process.wait()
    assert len(calls) == 1, calls


def test_a_library_callers_own_busy_thread_is_not_the_runs_work(tmp_path, monkeypatch):
    """Every thread of the launcher's process counted as the run's work: a library caller's own thread
    that computes (a service's other work) made a run whose worker is stopped look busy, so
    --stall_timeout never ended it. The thread that runs the export and those started for it count."""
    from pipeline.running import local_workers
    from pipeline.running import progress as progress_lib

    done = threading.Event()

    def compute():  # The caller's, started before the export.
        while not done.is_set():
            sum(range(1000))

    threading.Thread(target=compute, daemon=True).start()
    stopped = subprocess.Popen([sys.executable, "-S", "-c", "import time; time.sleep(60)"])
    calls = []
    try:
        stopped.send_signal(signal.SIGSTOP)  # The run's one worker: the run makes no progress.
        monkeypatch.setattr(local_workers, "_started", [stopped])
        monitor = progress_lib.ProgressMonitor(
            str(tmp_path),
            1000,
            stall_seconds=0.5,
            on_stall=lambda *args: calls.append(args),
            scheduler_times=local_workers.scheduler_times,
        )
        nothing = progress_lib.read_totals(str(tmp_path))
        for _ in range(8):
            monitor._watch_for_stall(nothing, look=0.1)
            time.sleep(0.15)
    finally:
        done.set()
        stopped.kill()
        stopped.wait()
    assert len(calls) == 1, calls


def _spinners(count, cpu):
    """`count` processes spinning on the one core `cpu`: each runs 1/count of the time and waits the rest."""
    code = f"import os\nos.sched_setaffinity(0, {{{cpu}}})\nwhile True: pass"
    return [subprocess.Popen([sys.executable, "-S", "-c", code]) for _ in range(count)]


def _poller(cpu):
    """A process on the one core `cpu` whose 16 threads wake every 2 ms to find nothing to do, as an idle
    worker's and the launcher's gRPC and Beam threads do; returned once its threads run. (With 8 threads
    at 5 ms their wakes waited 0.18 to 0.3 s a second for the busy core on a quiet machine: too near the
    quarter a second the test needs to see; 16 at 2 ms wait about half a second.)"""
    code = (
        f"import os, threading, time\nos.sched_setaffinity(0, {{{cpu}}})\n"
        "def poll():\n    while True: time.sleep(0.002)\n"
        "for _ in range(15): threading.Thread(target=poll, daemon=True).start()\npoll()"
    )
    process = subprocess.Popen([sys.executable, "-S", "-c", code])
    deadline = time.monotonic() + 10
    while len(os.listdir(f"/proc/{process.pid}/task")) < 16 and time.monotonic() < deadline:
        time.sleep(0.01)
    return process


def test_a_worker_computing_on_a_small_share_of_a_core_is_at_work_and_a_stopped_or_idle_one_is_not(
    monkeypatch,
):
    """The watchdog took a worker for idle unless it used a quarter of a core: one computing a long batch
    (no count moves) under a CPU limit (a container's quota), or among more processes than cores, was
    killed as stalled, and so was every rerun, at the same batch. Its wait for a CPU counts now; an idle
    process's does not: each wake of its pollers waited milliseconds for the busy core, so the idle
    launcher and worker looked busy and a run with a stopped worker never stalled on a busy machine."""
    from pipeline.running import local_workers, progress

    cpu = min(os.sched_getaffinity(0))
    polling = _poller(cpu)
    spinning = _spinners(8, cpu)
    stopped = subprocess.Popen([sys.executable, "-S", "-c", "while True: pass"])
    try:
        stopped.send_signal(signal.SIGSTOP)
        monkeypatch.setattr(local_workers, "_started", [*spinning, stopped, polling])
        time.sleep(0.3)  # Their start-up, which ran on any core.
        before, started = local_workers.scheduler_times(), time.monotonic()
        time.sleep(1.0)
        after, window = local_workers.scheduler_times(), time.monotonic() - started
    finally:
        for process in [*spinning, stopped, polling]:
            process.kill()
            process.wait()
    work = progress.work_seconds(before, after)
    shares = [work[p.pid] / window for p in spinning]
    assert min(shares) >= progress.BUSY_SHARE, shares
    assert work.get(stopped.pid, 0.0) < 0.05 * window
    polled = [key for key in after if key[0] == polling.pid and key in before]
    waited = sum(after[key][1] - before[key][1] for key in polled)
    assert waited >= progress.BUSY_SHARE * window, waited  # Its wakes did wait for the busy core...
    assert work[polling.pid] < progress.BUSY_SHARE * window, work[polling.pid]  # ... and it is idle.


def _seize(tid):
    """Holds the thread `tid` alone in a tracing stop (`t`), as a debugger does; False where ptrace(2)
    is not allowed here."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    ptrace_seize, ptrace_interrupt = 0x4206, 0x4207
    if libc.ptrace(ptrace_seize, tid, None, None) != 0:
        return False
    return libc.ptrace(ptrace_interrupt, tid, None, None) == 0


def test_a_stall_names_the_worker_whose_bundle_thread_is_stopped(monkeypatch):
    """Beam runs a worker's bundles on threads of its pool while its main thread waits (S): the state of
    the main thread alone never showed a worker whose bundle thread was blocked on a hung mount (D) or
    held by a debugger, and the stall line named no worker."""
    from pipeline.running import local_workers

    code = (
        "import threading, time\nthread = threading.Thread(target=time.sleep, args=(60,))\n"
        "thread.start()\nprint(thread.native_id, flush=True)\nthread.join()"
    )
    worker = subprocess.Popen([sys.executable, "-S", "-c", code], stdout=subprocess.PIPE, text=True)
    tid = int(worker.stdout.readline())
    try:
        if not _seize(tid):
            pytest.skip("ptrace(2) is not allowed here")
        deadline = time.monotonic() + 10  # The stop takes effect once the thread is next scheduled.
        while local_workers._state(worker.pid) != "t" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert local_workers._stat_fields(worker.pid)[0] == "S"  # The main thread, waiting.
        monkeypatch.setattr(local_workers, "_started", [worker])
        monkeypatch.setattr(local_workers, "_stall", [])
        monkeypatch.setattr(local_workers, "_tracebacks", local_workers.HOLD)
        monkeypatch.setattr(local_workers, "_stopping", [False])
        woken = []
        monkeypatch.setattr(local_workers, "on_failure", lambda: woken.append(True))
        # Killed as the watchdog kills; its traced thread is then this process's to reap (ptrace).
        monkeypatch.setattr(local_workers, "kill_workers", lambda: _kill_traced(worker, tid))
        local_workers.stalled(1805.0, 1800.0)
        stall = local_workers.stall()
        assert stall is not None and woken == [True]
        assert stall.workers == (f"worker process {worker.pid} is stopped by a debugger",)
    finally:
        _kill_traced(worker, tid)


def _kill_traced(process, tid):
    """SIGKILLs `process`, whose thread `tid` this process traces, and reaps them both."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        with contextlib.suppress(ChildProcessError):
            os.waitpid(tid, 0x40000000)  # __WALL: a traced thread is reaped by its tracer first.
    process.wait()


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


def test_a_set_aside_killed_before_its_first_dead_letter_moved_is_removed_by_the_next_run(tmp_path):
    """SIGKILLed just after it made `_failed/RUN/errors/` (`pytest -k set_aside` of hooked_run's
    `kill:any:2` on a failed --overwrite), the set-aside left an empty folder that no later run removed:
    `_failed/` listed a run with no manifest and no dead letters, beside the rerun's own, for good."""
    from pipeline.writing.lock import OutputLock

    output = tmp_path / "out"
    output.mkdir()
    (output / layout_lib.MANIFEST).write_text(json.dumps({"status": "succeeded", "shards": {}}))
    kept = output / layout_lib.FAILED_DIR / "0123456789ab"
    (kept / layout_lib.ERRORS_DIR).mkdir(parents=True)
    (kept / layout_lib.ERRORS_DIR / "part-00000-of-00001.parquet").write_bytes(b"PAR1 dead letters")
    (kept / layout_lib.MANIFEST).write_text(json.dumps({"committed": False}))
    (output / layout_lib.FAILED_DIR / "ba9876543210" / layout_lib.ERRORS_DIR).mkdir(parents=True)
    (output / layout_lib.FAILED_DIR / "cd0123456789").mkdir()
    with OutputLock(str(output)):
        state_lib.prepare(str(output), overwrite=True)
    assert sorted(os.listdir(output / layout_lib.FAILED_DIR)) == [kept.name]


# --- nothing outside the output is left: the temporary folders of killed runs --------------------


@contextlib.contextmanager
def _scratch_folders(tmp_path, monkeypatch):
    """$TMPDIR holding a killed command's folder, a live one's, one of a version that held none and a
    link; yields (the killed one, the live one, the temporary directory)."""
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))
    hold = textwrap.dedent(
        """
        import time
        from pipeline.scratch import held_scratch_directory
        with held_scratch_directory("embexport-progress-") as directory:
            print(directory, flush=True)
            time.sleep(120)
        """
    )
    environment = dict(os.environ, TMPDIR=str(temporary), PYTHONPATH=REPOSITORY)
    children = [
        subprocess.Popen([sys.executable, "-c", hold], env=environment, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    try:
        killed, live = (child.stdout.readline().strip() for child in children)
        children[0].kill()
        children[0].wait()
        older = temporary / "embexport-progress-older"
        older.mkdir()
        (older / "1-2.json").write_text("{}")
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        (elsewhere / ".held").write_text("a user's file")
        os.symlink(elsewhere, temporary / "embexport-progress-link")
        yield killed, live, temporary
        assert not os.path.exists(killed)
        # (TensorFlow leaves files of its own there.)
        assert sorted(name for name in os.listdir(temporary) if name.startswith("embexport-")) == sorted(
            ["embexport-progress-link", "embexport-progress-older", os.path.basename(live)]
        )
        assert os.path.isfile(os.path.join(live, ".held")) and (elsewhere / ".held").is_file()
    finally:
        for child in children:
            child.kill()
            child.wait()


def test_a_new_temporary_folder_removes_those_of_killed_commands_never_a_live_ones(tmp_path, monkeypatch):
    """Each SIGKILLed run left its `embexport-progress-*` folder in $TMPDIR for good (thousands of killed
    jobs fill /tmp): the next one made removes them, and leaves alone a live command's folder, one of
    a version that held none, and a link (never followed)."""
    with _scratch_folders(tmp_path, monkeypatch):
        with held_scratch_directory("embexport-index-") as scratch:
            assert os.path.isfile(os.path.join(scratch, ".held"))
        assert not os.path.exists(scratch)


def test_a_temporary_directory_without_locks_is_used_unheld_not_a_traceback(tmp_path, monkeypatch):
    """A $TMPDIR whose filesystem refuses locks (NFS whose lock daemon does not answer) crashed every
    local export, index build and search with `OSError: [Errno 37] No locks available`, a traceback."""
    import errno
    import fcntl

    from pipeline.scratch import remove_dead_scratch_directories

    temporary = tmp_path / "nfs"
    temporary.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))
    real_flock = fcntl.flock

    def flock(descriptor, operation):  # As NFS without its lock daemon: only files there refuse.
        if os.readlink(f"/proc/self/fd/{descriptor}").startswith(str(temporary)):
            raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
        return real_flock(descriptor, operation)

    monkeypatch.setattr(fcntl, "flock", flock)
    with held_scratch_directory("embexport-progress-") as scratch:
        assert os.listdir(scratch) == []  # No hold file: no command ever takes it for a dead one's.
        monkeypatch.setattr(fcntl, "flock", real_flock)
        assert remove_dead_scratch_directories() == [] and os.path.isdir(scratch)
    assert not os.path.exists(scratch)


def test_a_full_temporary_directory_still_gives_a_held_folder(small_tmpfs, monkeypatch):
    """The hold file names its machine: on a full $TMPDIR that write must not end the command (its
    folder holds only the progress counts, which a full disk merely leaves unwritten)."""
    from pipeline.scratch import HOLD_FILE

    monkeypatch.setattr(tempfile, "tempdir", str(small_tmpfs))
    with open(small_tmpfs / "filler", "wb") as filler, contextlib.suppress(OSError):
        filler.write(b"\0" * (1 << 20))
    with held_scratch_directory("embexport-progress-") as scratch:
        assert os.path.isfile(os.path.join(scratch, HOLD_FILE))
    assert not os.path.exists(scratch)


def test_a_temporary_folder_another_machine_made_is_left_to_it(tmp_path, monkeypatch):
    """A $TMPDIR two machines share over NFS, whose flocks may hold on the taker's machine alone (`nolock`
    or `local_lock` mounts): a live command's folder on one looked dead from the other, which removed it
    (a run's progress counts, an index being built, a model as it loads)."""
    import pathlib

    from pipeline.scratch import HOLD_FILE, remove_dead_scratch_directories

    temporary = tmp_path / "shared"
    temporary.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))
    # What a live command on the other machine looks like from here: its flock does not reach this one.
    elsewhere = temporary / "embexport-index-elsewhere"
    elsewhere.mkdir()
    (elsewhere / HOLD_FILE).write_text("another machine's")
    dead = temporary / "embexport-index-dead"  # A dead one of this machine's, as the version before made it.
    dead.mkdir()
    (dead / HOLD_FILE).write_text("")
    assert remove_dead_scratch_directories() == [str(dead)]
    assert (elsewhere / HOLD_FILE).is_file()
    with held_scratch_directory("embexport-progress-") as scratch:
        this_machine = pathlib.Path(scratch, HOLD_FILE).read_text(encoding="utf-8")
        assert this_machine and this_machine != (elsewhere / HOLD_FILE).read_text()
    assert sorted(os.listdir(temporary)) == [elsewhere.name]


def test_beams_own_temporary_folder_is_in_a_held_one_and_a_dry_run_leaves_none(
    tmp_path, tiny_bundle, monkeypatch
):
    """Beam's Pipeline makes $TMPDIR/beam-pipeline-temp* when built and removes it at the end of its run()
    only: each --dry_run, and each run a SIGKILL ended, left one for good."""
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipeline.running import export as export_lib
    from pipeline.scratch import HOLD_FILE

    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))
    corpus = _corpus(tmp_path / "c.jsonl", IDS)
    flags = [
        "--model",
        tiny_bundle[0],
        "--input",
        corpus,
        "--output",
        str(tmp_path / "out"),
        "--dry_run=True",
    ]
    assert run_export(flags).dry_run
    assert os.listdir(temporary) == []
    with export_lib._beam_pipeline(PipelineOptions([])) as pipeline:  # A kill now leaves it in a held folder.
        held = os.path.dirname(pipeline.local_tempdir)
        assert os.path.isdir(pipeline.local_tempdir) and os.path.isfile(os.path.join(held, HOLD_FILE))
        assert os.listdir(temporary) == [os.path.basename(held)]
    assert os.listdir(temporary) == []


def test_keras_forward_pass_writes_nothing_to_the_temporary_directory(tmp_path, monkeypatch):
    """TensorFlow's autograph wrote the forward function's converted source to $TMPDIR, removed by an exit
    function: each worker a stop signal SIGKILLs (a Ctrl-C) left its `__autograph_generated_file*.py`."""
    from tensorflow.python.autograph.impl import api as autograph_api
    from tensorflow.python.autograph.pyct import cache as autograph_cache

    from pipeline.inference.embedder import Embedder
    from pipeline.inference.features import DocumentTokenizer
    from pipeline.planning.build import build_plan
    from pipeline.planning.options import ExportOptions
    from pipeline.reading.documents import Document

    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))
    # Conversions are cached per function for the process: an earlier test's would write nothing here.
    monkeypatch.setattr(autograph_api._TRANSPILER, "_cache", autograph_cache.CodeObjectCache())
    options = ExportOptions(
        ["--output", str(tmp_path / "o"), "--layer", "lstm_content", "--fast_path", "off"]
    )
    plan, model_source = build_plan(options)
    embedder = Embedder(plan, model_source)
    tokenized = DocumentTokenizer(plan, model_source.tokenizer).tokenize(
        Document("a", ("words of a document",), (), "c.jsonl", 1)
    )
    assert not embedder.run([tokenized]).failed
    assert os.listdir(temporary) == []


@pytest.mark.slow
def test_the_next_run_removes_the_temporary_folder_a_killed_run_left(
    tmp_path, tiny_bundle, monkeypatch, capsys
):
    with _scratch_folders(tmp_path, monkeypatch):
        corpus = _corpus(tmp_path / "c.jsonl", IDS)
        assert main(["--model", tiny_bundle[0], "--input", corpus, "--output", str(tmp_path / "out")]) == 0
        capsys.readouterr()
