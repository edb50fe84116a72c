"""Where one `python -m pipeline.run` spends its wall time: start-up, launch check, pipeline, commit, exit.

    python -m benchmarks.phases [--documents 20000] [--baseline REV] [-- FLAGS...]

Runs the command once in a child process on `benchmarks.corpora`'s real-length
text (default flags: `--pooling none`), the child wrapping a few of this code's
functions with timers, and prints each phase's seconds from the child's start
(with `--baseline`, first the same for that revision, extracted with `git archive`;
it must have this code's layout, `pipeline.running.export`):
imports, the plan, the launch's fast path check (Keras's reference, the fast path's
trace and run), the pipeline (graph and start, first batch, the rest), the Parquet
writing thread's busy time and the step's waits on it, the commit, and the exit
(the parent's wall time after the child's last timestamp).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from benchmarks.corpora import write_real_corpus
from benchmarks.scale import ROOT, extract_baseline

# Runs in the child: argv are the command's flags. Prints one JSON line of timestamps and sums.
CHILD = r"""
import atexit, functools, json, sys, time
started = time.perf_counter()
marks = {}
sums = dict.fromkeys(
    ("writing_thread_busy", "step_waits_on_writing", "keras_reference", "fast_path_check_run"), 0.0
)

def mark(name):
    marks.setdefault(name, time.perf_counter() - started)

import pipeline.running.export as export
mark("imported")
import pipeline.inference.forward_pass as forward_pass
import pipeline.inference.transforms as transforms
import pipeline.writing.commit as commit
import pipeline.writing.shards as shards

def phase(owner, name, label):
    function = getattr(owner, name)
    @functools.wraps(function)
    def timed(*args, **kwargs):
        mark(label + " start")
        try:
            return function(*args, **kwargs)
        finally:
            mark(label + " end")
    setattr(owner, name, timed)

def summed(owner, name, key):
    function = getattr(owner, name)
    @functools.wraps(function)
    def timed(*args, **kwargs):
        begun = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            sums[key] += time.perf_counter() - begun
    setattr(owner, name, timed)

phase(export, "build_plan", "plan")
phase(export, "choose_forward_passes", "launch check")
phase(export, "_run_pipeline", "pipeline")
phase(commit, "commit", "commit")
if hasattr(shards, "_WriteBehind"):  # a baseline writes in the step itself
    summed(shards.WriteShardsFn, "_write_table", "writing_thread_busy")
    summed(shards._WriteBehind, "wait", "step_waits_on_writing")
else:
    summed(shards.WriteShardsFn, "_write_group", "writing_thread_busy")
check = forward_pass.max_difference
def max_difference(candidate, reference, features):
    def timed(function, key):
        def run(batch):
            begun = time.perf_counter()
            try:
                return function(batch)
            finally:
                sums[key] += time.perf_counter() - begun
        return run
    return check(timed(candidate, "fast_path_check_run"), timed(reference, "keras_reference"), features)
forward_pass.max_difference = max_difference
run_inference = transforms.EmbeddingModelHandler.run_inference
def first_batch(self, *args, **kwargs):
    result = run_inference(self, *args, **kwargs)
    mark("first batch embedded")
    return result
transforms.EmbeddingModelHandler.run_inference = first_batch
def report():
    phases = {"marks": marks, "sums": sums, "end": time.perf_counter() - started}
    print("PHASES " + json.dumps(phases), flush=True)
atexit.register(report)
from pipeline.run import run_main
run_main(sys.argv[1:])
"""


def measure(root, corpus, output, flags):
    """{"marks": {phase: seconds from start}, "sums": {...}, "wall": seconds} of one command of `root`."""
    command = [sys.executable, "-c", CHILD, "--input", corpus, "--output", output, *flags]
    environment = dict(os.environ, PYTHONPATH=root, TF_CPP_MIN_LOG_LEVEL="2")
    started = time.perf_counter()
    result = subprocess.run(command, cwd=root, env=environment, capture_output=True, text=True)
    wall = time.perf_counter() - started
    lines = [line for line in result.stdout.splitlines() if line.startswith("PHASES ")]
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return dict(json.loads(lines[-1][len("PHASES ") :]), wall=wall)


def phases(measured):
    """[(phase, seconds)] of one `measure`."""
    marks, sums = measured["marks"], measured["sums"]

    def span(start, end):
        return marks[end] - marks[start]

    rows = [
        ("imports (interpreter start to pipeline.running.export)", marks["imported"]),
        ("plan (flags, model load, listing)", span("plan start", "plan end")),
        ("launch check of the fast path", span("launch check start", "launch check end")),
        ("  of which Keras's reference", sums["keras_reference"]),
        ("  of which the fast path's trace and run", sums["fast_path_check_run"]),
        ("pipeline: graph, start, first batch", span("pipeline start", "first batch embedded")),
        ("pipeline: the other batches and the files", span("first batch embedded", "pipeline end")),
        ("  writing Parquet (on its own thread, if any)", sums["writing_thread_busy"]),
        ("  step waiting on the writing thread", sums["step_waits_on_writing"]),
        ("commit", span("commit start", "commit end")),
        ("exit (after the last timestamp)", measured["wall"] - measured["end"]),
        ("whole command", measured["wall"]),
    ]
    return rows


def table(measured):
    """Markdown rows: each phase's seconds, one column per contender ({label: `measure`})."""
    columns = {label: phases(one) for label, one in measured.items()}
    names = [name for name, _ in next(iter(columns.values()))]
    lines = ["| phase | " + " | ".join(f"{label}, s" for label in columns) + " |"]
    lines.append("|---|" + "---|" * len(columns))
    for index, name in enumerate(names):
        lines.append(f"| {name} | " + " | ".join(f"{rows[index][1]:.2f}" for rows in columns.values()) + " |")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--documents", type=int, default=20000, help="documents (default 20,000).")
    parser.add_argument("--baseline", default=None, help="a git revision to measure first (this layout).")
    parser.add_argument("flags", nargs="*", help="the command's flags after --, default --pooling none.")
    args = parser.parse_args(argv)
    flags = args.flags or ["--pooling", "none"]
    with tempfile.TemporaryDirectory() as scratch:
        corpus = write_real_corpus(os.path.join(scratch, "real.jsonl"), args.documents)
        roots = {"this code": ROOT}
        if args.baseline:
            roots = {args.baseline: extract_baseline(args.baseline, scratch), **roots}
        measured = {
            label: measure(root, corpus, os.path.join(scratch, f"out-{index}"), flags)
            for index, (label, root) in enumerate(roots.items())
        }
    print(f"python -m pipeline.run {' '.join(flags)}, {args.documents:,} real-length documents")
    print("\n".join(table(measured)))


if __name__ == "__main__":
    main()
