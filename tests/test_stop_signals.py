"""Ctrl-C or SIGTERM in inspect, vocabulary, analyze and models.train: one line, 130/143, no traceback."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import forkserver
import pytest

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs `python -m MODULE ARGS` as it is, but the import of BLOCKED waits (MARKER made) for a signal.
_BLOCKED_RUN = textwrap.dedent("""
    import runpy, sys, time
    module, blocked, marker, *args = sys.argv[1:]

    class Blocked:
        def find_spec(self, name, path=None, target=None):
            if name == blocked:
                open(marker, "w").close()
                time.sleep(60)
            return None

    sys.meta_path.insert(0, Blocked())
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
""")


@pytest.mark.parametrize(
    ("module", "args", "blocked", "signum"),
    [
        # In the imports at the top of the module (stopping.stop_at_once).
        ("models.train", ["--output", "{tmp}/bundle"], "keras", signal.SIGINT),
        ("pipeline.analyze", ["{tmp}", "knn-score", "--column", "x"], "apache_beam", signal.SIGTERM),
        ("pipeline.vocabulary", ["--output", "{tmp}/vocabulary"], "pyarrow", signal.SIGINT),
        # Inside main (stopping.run), in imports it makes once the flags are read.
        ("pipeline.inspect", ["models/data/default_bundle"], "keras", signal.SIGINT),
        ("pipeline.vocabulary", ["--output", "{tmp}/vocabulary"], "keras", signal.SIGTERM),
    ],
    ids=["train-top", "analyze-top", "vocabulary-top", "inspect-main", "vocabulary-main"],
)
def test_a_stop_signal_is_one_interrupted_line_and_its_status(tmp_path, module, args, blocked, signum):
    marker = str(tmp_path / "blocked")
    argv = [arg.format(tmp=tmp_path) for arg in args]
    process = subprocess.Popen(
        [sys.executable, "-c", _BLOCKED_RUN, module, blocked, marker, *argv],
        cwd=REPOSITORY,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 60
    while not os.path.exists(marker):
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline
        time.sleep(0.02)
    process.send_signal(signum)
    _, err = process.communicate(timeout=60)
    name = signal.Signals(signum).name
    assert err.splitlines() == [
        f"interrupted: python -m {module} stopped ({name}) before it finished; what it writes appears "
        "whole or not at all, so rerun it to finish."
    ]
    assert process.returncode == {signal.SIGINT: 130, signal.SIGTERM: 143}[signum]
    assert sorted(os.listdir(tmp_path)) == ["blocked"]


def test_a_tool_whose_stdout_reader_is_gone_ends_quietly(tmp_path):
    """`python -m pipeline.inspect BUNDLE | head -1`: a BrokenPipeError traceback and exit 1."""
    child = textwrap.dedent("""
        import os, runpy, sys
        read, write = os.pipe()
        os.close(read)
        os.dup2(write, 1)
        sys.argv = ["pipeline.inspect", "models/data/default_bundle"]
        runpy.run_module("pipeline.inspect", run_name="__main__", alter_sys=True)
    """)
    result = forkserver.run(
        [sys.executable, "-u", "-c", child], cwd=REPOSITORY, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
