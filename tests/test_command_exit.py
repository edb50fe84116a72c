"""`python -m pipeline.run` ends when its run is over: exit functions run, the teardown does not."""

import sys

import pytest
from pipeline_fixtures import manifest_of, read_rows, run_command, write_jsonl

# Registers an exit function and an object whose finalizer only the interpreter's teardown
# (freeing the modules' globals) would call, then runs the command as `python -m` does.
CHILD = """
import atexit, os, sys
import pipeline.run

class TornDown:
    def __del__(self, write=os.write):
        write(1, b"torn down")

keep = TornDown()
atexit.register(lambda: print("exit functions ran", flush=True))
pipeline.run.run_main(sys.argv[1:])
"""


def test_a_finished_run_exits_with_its_status_after_the_exit_functions_without_teardown(
    tiny_bundle, tmp_path
):
    corpus = write_jsonl(
        tmp_path / "c.jsonl", [{"id": f"d{i}", "content": f"word{i}", "title": "word1"} for i in range(5)]
    )
    output = tmp_path / "out"
    flags = ["--model", tiny_bundle[0], "--input", str(corpus), "--output", str(output)]
    result = run_command([sys.executable, "-c", CHILD, *flags])
    assert result.returncode == 0, result.stderr[-3000:]
    # The summary is flushed whole before the process ends, then the exit functions run.
    assert "Export finished" in result.stdout and "rows written     5" in result.stdout, result.stdout
    assert result.stdout.rstrip().endswith("exit functions ran"), result.stdout
    assert "torn down" not in result.stdout
    assert manifest_of(output)["status"] == "succeeded"
    assert sorted(read_rows(output).column("id").to_pylist()) == [f"d{i}" for i in range(5)]


def test_a_refused_run_still_exits_with_status_2(tiny_bundle, tmp_path):
    flags = ["--model", tiny_bundle[0], "--input", str(tmp_path / "none.jsonl")]
    result = run_command([sys.executable, "-m", "pipeline.run", *flags])
    assert result.returncode == 2, result.stderr[-3000:]
    assert [line for line in result.stderr.splitlines() if line.startswith("error: ")], result.stderr[-3000:]


@pytest.mark.parametrize(
    ("fd", "flags"),
    [(1, []), (2, ["--direct_running_mode=multi_processing", "--direct_num_workers=2"])],
    ids=["stdout", "stderr_with_worker_processes"],
)
def test_a_committed_run_whose_stdout_is_gone_exits_0(fd, flags, tiny_bundle, tmp_path):
    """`pipeline.run ... | head -1`, or a terminal closed under a run left behind with `&`: the
    summary's print failed (BrokenPipeError, EIO) after the commit, so the export "failed" (exit 1).
    With worker processes, the thread copying their stderr to a closed one died and the run lost."""
    corpus = write_jsonl(
        tmp_path / "c.jsonl", [{"id": f"d{i}", "content": f"word{i}", "title": "word1"} for i in range(5)]
    )
    output = tmp_path / "out"
    # The child's stdout is a pipe whose reader is gone before the summary is printed.
    child = f"import os, sys, pipeline.run; r, w = os.pipe(); os.close(r); os.dup2(w, {fd}); " + (
        "pipeline.run.run_main(sys.argv[1:])"
    )
    flags = ["--model", tiny_bundle[0], "--input", str(corpus), "--output", str(output), *flags]
    # Unbuffered, as a terminal's line buffering writes the summary at once.
    result = run_command([sys.executable, "-u", "-c", child, *flags])
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert manifest_of(output)["status"] == "succeeded"


@pytest.mark.parametrize("fd", [1, 2], ids=["stdout", "stderr"])
def test_a_run_started_without_stdout_or_stderr_commits_and_exits_0(fd, tiny_bundle, tmp_path):
    """`2>&-` (a supervisor, a cron wrapper): Python's sys.stderr is None, and the run did all its work,
    then failed before its commit (exit 1); `>&-` committed but exited 1 with a traceback."""
    import os
    import subprocess

    from pipeline_fixtures import REPOSITORY, pipeline_command

    corpus = write_jsonl(
        tmp_path / "c.jsonl", [{"id": f"d{i}", "content": f"word{i}", "title": "word1"} for i in range(5)]
    )
    output = tmp_path / "out"
    command = pipeline_command(corpus, output, "--model", tiny_bundle[0])
    # The shell closes the descriptor and execs the command: no preexec_fn, which would run Python in
    # a fork of this process, whose gRPC threads (an earlier test's pipeline) can abort it before its exec.
    result = subprocess.run(
        ["sh", "-c", f'exec "$@" {fd}>&-', "sh", *command],
        cwd=REPOSITORY,
        env=dict(os.environ, PYTHONPATH=REPOSITORY),
        stdout=subprocess.DEVNULL if fd == 2 else None,
        timeout=600,
    )
    assert result.returncode == 0
    assert manifest_of(output)["status"] == "succeeded"
    # Nothing TensorFlow or Beam wrote to the closed descriptor landed in a file of the export.
    assert sorted(read_rows(output).column("id").to_pylist()) == [f"d{i}" for i in range(5)]
