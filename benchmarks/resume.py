"""Side-by-side benchmark of resuming: a run killed at about 80 % of a full run's time, then rerun.

    python -m benchmarks.resume [--documents 200000] [--kill_at 0.8] [--checkpoint_seconds 10] [--json PATH]

The corpus is real English text at realistic lengths (`benchmarks.corpora`,
median 46 words). For each forward pass (Keras's own with `--fast_path off`,
and the default fast path), in this one run, on the bundled default model and
its default layers, with the default local settings (two worker processes on
two cores from 64 MB of input):

1. a full, uninterrupted export (the reference);
2. the same command, killed with SIGKILL (the launcher and its worker
   processes) at `--kill_at` of (1)'s wall time;
3. the same command again, which resumes (2), checked equal to (1): rows bit
   for bit, dead letters and the manifest's counts.

It reports each command's wall time (imports, model load and worker start-up
included), the rerun's share of the full run's time, the rows the rerun kept
and embedded, and the work it redid: rows the killed run had written (its last
progress line) but not yet in a closed file, as a share of all rows.

The default size makes the full Keras run a few minutes long, so that start-up
(imports, two worker processes loading TensorFlow, the id scan) is a small part
of it, as in the long runs a resume is for (about 12 minutes for the full Keras
run on two busy cores). The kill is timed from the full run's wall time, so the
machine's load must stay steady through the benchmark: a run that ends before it
is killed is started again and killed earlier (at most three times).
"""

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from benchmarks.corpora import write_real_corpus
from benchmarks.export import ROOT

_ROWS_WRITTEN = re.compile(rb"progress: .*?, ([0-9,]+) rows written")


def command(corpus, output, flags):
    return [sys.executable, "-m", "pipeline.run", "--input", corpus, "--output", output, *flags]


def full_run(corpus, output, flags):
    """Wall seconds of one uninterrupted `python -m pipeline.run`."""
    started = time.perf_counter()
    result = subprocess.run(command(corpus, output, flags), cwd=ROOT, capture_output=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{output} failed:\n{result.stderr.decode(errors='replace')[-3000:]}")
    return seconds


def killed_run(corpus, output, flags, after, log_path):
    """Starts the export, SIGKILLs it and its worker processes after `after` seconds.

    Returns:
        (wall seconds, rows it had written by its last progress line); None rows when
        it finished before it could be killed.
    """
    with open(log_path, "wb") as log:
        started = time.perf_counter()
        process = subprocess.Popen(
            command(corpus, output, flags), cwd=ROOT, stdout=log, stderr=log, start_new_session=True
        )
        try:
            process.wait(timeout=after)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        seconds = time.perf_counter() - started
    if process.returncode != -signal.SIGKILL:
        return seconds, None
    with open(log_path, "rb") as log:
        written = _ROWS_WRITTEN.findall(log.read())
    return seconds, int(written[-1].replace(b",", b"")) if written else 0


def _rows(directory):
    dataset = ds.dataset(directory, format="parquet", ignore_prefixes=["_", ".", "errors"])
    return dataset.to_table().sort_by("id")


def _dead_letters(directory):
    folder = os.path.join(directory, "errors")
    files = sorted(os.path.join(folder, name) for name in os.listdir(folder)) if os.path.isdir(folder) else []
    if not files:
        return None
    table = pa.concat_tables([pq.read_table(path) for path in files])
    return table.sort_by([("source", "ascending"), ("position", "ascending"), ("id", "ascending")])


def _manifest(directory):
    with open(os.path.join(directory, "_MANIFEST.json"), encoding="utf-8") as handle:
        return json.load(handle)


def same_export(output, reference):
    """Rows bit for bit, dead letters and counts of `output` equal to `reference`'s."""
    dead, expected_dead = _dead_letters(output), _dead_letters(reference)
    return (
        _rows(output).equals(_rows(reference))
        and (dead.equals(expected_dead) if dead is not None else expected_dead is None)
        and _manifest(output)["counts"] == _manifest(reference)["counts"]
    )


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--documents", type=int, default=200_000)
    parser.add_argument("--kill_at", type=float, default=0.8, help="share of the full run's wall time")
    parser.add_argument(
        "--checkpoint_seconds",
        type=float,
        default=10,
        help="the runs' --checkpoint_seconds: the default 60 s is a fraction of an hours-long run, "
        "a large one of these few minutes",
    )
    parser.add_argument("--contenders", default="keras,fast")
    parser.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results", "resume.json"))
    args = parser.parse_args(argv)
    started = time.perf_counter()

    results = {
        "documents": args.documents,
        "kill_at": args.kill_at,
        "checkpoint_seconds": args.checkpoint_seconds,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    }
    passes = {"keras": ["--fast_path", "off"], "fast": []}
    with tempfile.TemporaryDirectory(prefix="embexport-resume-") as work:
        corpus = write_real_corpus(os.path.join(work, "corpus.jsonl"), args.documents)
        results["corpus_mb"] = round(os.path.getsize(corpus) / 1e6, 1)
        # A first run reads Python, TensorFlow and the model from a cold disk: warm them up,
        # so that the full run is not slower than the one killed at a share of its time.
        warm = write_real_corpus(os.path.join(work, "warm.jsonl"), 200)
        full_run(warm, os.path.join(work, "warm"), [])
        for name in args.contenders.split(","):
            flags = [
                *passes[name],
                "--checkpoint_seconds",
                str(args.checkpoint_seconds),
                "--progress_seconds",
                "1",
            ]
            full, resumed = os.path.join(work, f"{name}-full"), os.path.join(work, f"{name}-resumed")
            full_seconds = full_run(corpus, full, flags)
            # A busy machine may make this run faster than the full one: then kill it earlier.
            for share in (args.kill_at, args.kill_at, args.kill_at - 0.1, args.kill_at - 0.2):
                shutil.rmtree(resumed, ignore_errors=True)
                log = os.path.join(work, f"{name}-killed.log")
                killed_seconds, written_at_kill = killed_run(
                    corpus, resumed, flags, share * full_seconds, log
                )
                if written_at_kill is not None:
                    break
            else:
                raise RuntimeError("the run to kill always finished first")
            rerun_seconds = full_run(corpus, resumed, flags)
            manifest = _manifest(resumed)
            rows, kept = manifest["counts"]["rows_written"], (manifest["resumed"] or {}).get("rows_kept", 0)
            results[name] = {
                "full_seconds": round(full_seconds, 2),
                "killed_seconds": round(killed_seconds, 2),
                "killed_share": round(killed_seconds / full_seconds, 3),
                "rerun_seconds": round(rerun_seconds, 2),
                "rerun_share": round(rerun_seconds / full_seconds, 3),
                "rows": rows,
                "rows_written_at_kill": written_at_kill,
                "rows_kept": kept,
                "rows_embedded_by_rerun": rows - kept,
                "redone_share": round(max(0, written_at_kill - kept) / rows, 3),
                "files": len(manifest["shards"]["rows"]),
                "full_files": len(_manifest(full)["shards"]["rows"]),
                "bit_identical": same_export(resumed, full),
            }
            print(json.dumps({name: results[name]}), flush=True)
    results["benchmark_seconds"] = round(time.perf_counter() - started, 1)
    print(format_table(results))
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2)
    return 0


def format_table(results):
    lines = [
        f"{results['documents']:,} documents ({results['corpus_mb']} MB), killed at "
        f"{results['kill_at']:.0%} of the full run's time, --checkpoint_seconds "
        f"{results['checkpoint_seconds']:g} ({results['machine']}; the benchmark took "
        f"{results['benchmark_seconds']:.0f} s)",
        "",
        "| forward pass | full run | killed after | rerun | rerun / full | rows kept / embedded again "
        "| work redone | files (full / resumed) | equal bit for bit |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, label in (("keras", "Keras (`--fast_path off`)"), ("fast", "fast path (default)")):
        if name not in results:
            continue
        r = results[name]
        lines.append(
            f"| {label} | {r['full_seconds']:.1f} s | "
            f"{r['killed_seconds']:.1f} s ({r['killed_share']:.0%}) | "
            f"{r['rerun_seconds']:.1f} s | **{r['rerun_share']:.0%}** | "
            f"{r['rows_kept']:,} / {r['rows_embedded_by_rerun']:,} | {r['redone_share']:.1%} | "
            f"{r['full_files']} / {r['files']} | {'yes' if r['bit_identical'] else 'NO'} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
