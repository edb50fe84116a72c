"""Tests of the advice a stopped run gives for its rerun: under --resume off, not the same command."""

import json
import os
import signal

import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from pipeline_fixtures import pipeline_command, run_command
from test_commit import _complete_export, _corpus, _hooked, _wait_for

from pipeline.running.advice import rerun_to_finish, resume_in
from pipeline.running.portable import explain_failure

OFF_ADVICE = (
    "rerun it without --resume off (or with --resume auto) to finish the export and keep the rows "
    "this run made durable; the same command, with --resume off, starts from zero"
)


@pytest.mark.slow
def test_ctrl_c_under_resume_off_says_how_to_keep_the_rows_and_that_rerun_keeps_them(tmp_path, tiny_bundle):
    corpus = _corpus(tmp_path / "c.jsonl", [f"doc{i}" for i in range(3000)])
    output = str(tmp_path / "out")
    marker = str(tmp_path / "inference")
    command = pipeline_command(
        corpus, output, "--model", tiny_bundle[0], "--batch_size", "16", "--shard_mb", "0.02"
    )
    # Paused in the 40th forward pass: row files are durable by then, and the commit is far off.
    process = _hooked([f"inference_pause:40:{marker}"], [*command[3:], "--resume", "off"])
    _wait_for(marker + ".paused", process)
    process.send_signal(signal.SIGINT)
    open(marker + ".go", "w").close()
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-3000:]
    assert [line for line in err.splitlines() if line.startswith("interrupted:")] == [
        f"interrupted: nothing was committed; {OFF_ADVICE}."
    ]
    rerun = run_command(command)  # as told: without --resume off
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    with open(os.path.join(output, "_MANIFEST.json"), encoding="utf-8") as handle:
        assert json.load(handle)["resumed"]["rows_kept"] > 0
    assert len(_complete_export(output)) == 3000


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], "auto"),
        (["--resume", "off"], "off"),
        (["--resume=off"], "off"),
        (["--resume", "off", "--input", "x", "--resume=auto"], "auto"),
        (["--resume"], "auto"),
    ],
)
def test_the_resume_setting_is_read_as_the_run_reads_it(argv, expected):
    assert resume_in(argv) == expected


@pytest.mark.parametrize("resume", ["auto", "off"])
def test_a_portable_job_whose_workers_went_away_advises_by_its_resume(resume):
    options = PipelineOptions(["--resume", resume, "--runner", "PortableRunner"])
    told = str(explain_failure(RuntimeError("Socket closed"), options))
    if resume == "off":
        assert told.endswith(OFF_ADVICE.replace("rows this run", "rows") + ".")
    else:
        assert told.endswith("rerun the same command to finish the export (it keeps the rows made durable).")


@pytest.mark.parametrize(
    "relayed",
    [
        "MemoryError",
        "tensorflow.python.framework.errors_impl.ResourceExhaustedError: OOM when allocating tensor",
        "ImportError: libfoo.so: failed to map segment from shared object",
        "terminate called after throwing an instance of 'std::bad_alloc'",
    ],
)
def test_a_portable_job_whose_worker_ran_out_of_memory_is_told_so(relayed):
    options = PipelineOptions(["--runner", "PortableRunner"])
    error = RuntimeError(
        f"Pipeline failed in state FAILED: Traceback (most recent call last):\n  ...\n{relayed}"
    )
    told = str(explain_failure(error, options))
    assert told.startswith("the job's workers ran out of memory (") and "rerun the same command" in told


@pytest.mark.parametrize("resume", ["auto", "off"])
def test_a_killed_local_worker_advises_by_the_runs_resume(resume, monkeypatch):
    from pipeline.running import failures, local_workers

    monkeypatch.setattr(local_workers, "killed_by", lambda: [signal.SIGKILL])
    told = str(failures._told_in_one_line(RuntimeError("worker gone"), resume))
    kept = OFF_ADVICE.replace("rows this run", "rows") if resume == "off" else "rerun the same command"
    assert kept in told


@pytest.mark.parametrize("resume", ["auto", "off"])
def test_the_advised_output_is_quoted_for_the_shell(resume, tmp_path):
    """A default output under "my exports/" was named bare: the pasted rerun split it in two."""
    import shlex

    output = str(tmp_path / "my exports" / "output" / "embeddings-1")
    advice = rerun_to_finish(resume, output)
    words = shlex.split(advice[advice.index("--output") :])
    assert words[:2] == ["--output", output], advice
