"""Scale benchmark: the old read and de-duplication against the new, at N and 5N documents, in one run.

    python -m benchmarks.scale [--documents 61440] [--baseline REV] [--json PATH]
    python -m benchmarks.scale --tuning [--documents 20480]

The corpus is the sample corpus (CPython docstrings, about 470 bytes of JSON a
document, as the package descriptions of the issue) repeated with new ids: N
documents and 5N documents. Each contender runs `python -m pipeline.run` with
the default model and layers as a child process, on both corpora:

- `old`: the code at `--baseline` (default: the commit before the two-pass
  reader), extracted with `git archive`: whole files read by one worker, a
  GroupByKey of whole documents for the id de-duplication, the in-memory runner;
- `new, in memory`: this code with `--direct_running_mode=in_memory`;
- `new, default`: this code with no runner flags (one worker process per core);
- `new, 2 processes, 2 TF threads each`: the default with `--tf_threads=2`.

For each it prints marginal docs/s (4N documents over the difference of the
pipeline times the summaries report, so start-up is left out), peak RSS of the
whole process tree (sampled from /proc every 0.2 s: the launcher and any worker
processes, summed) at N and 5N, and CPU used (CPU seconds of the tree / wall
seconds, 200 % = both cores of this machine). `--tuning` instead compares local
settings (runner mode, workers, TensorFlow threads, batch size) at N and 2N.
"""

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tarfile
import tempfile
import threading
import time

from benchmarks.export import write_corpus

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The last commit whose reader shuffled whole documents (before the two-pass reader).
DEFAULT_BASELINE = "7ac8168"
_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _children(pid):
    children = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as handle:
                children += [int(child) for child in handle.read().split()]
    except OSError:
        pass
    return children


def _tree(pid):
    pids, pending = [], [pid]
    while pending:
        current = pending.pop()
        pids.append(current)
        pending += _children(current)
    return pids


def _sample(pid):
    """(RSS bytes, CPU seconds) of one process, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/statm") as handle:
            rss = int(handle.read().split()[1]) * _PAGE
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return rss, (int(fields[11]) + int(fields[12])) / _TICKS
    except (OSError, IndexError, ValueError):
        return None


class TreeSampler(threading.Thread):
    """Samples a process tree every 0.2 s: the peak of its summed RSS and each process's CPU time."""

    def __init__(self, pid):
        super().__init__(daemon=True)
        self._pid = pid
        self.peak_rss = 0
        self._cpu = {}
        self._done = threading.Event()

    def run(self):
        while not self._done.wait(0.2):
            total = 0
            for pid in _tree(self._pid):
                sample = _sample(pid)
                if sample:
                    total += sample[0]
                    self._cpu[pid] = max(self._cpu.get(pid, 0.0), sample[1])
            self.peak_rss = max(self.peak_rss, total)

    def stop(self):
        self._done.set()
        self.join()

    @property
    def cpu_seconds(self):
        return sum(self._cpu.values())


def run_export(code_root, corpus, output, flags):
    """Runs `python -m pipeline.run` from `code_root`; returns its measurements."""
    command = [sys.executable, "-m", "pipeline.run", "--input", corpus, "--output", output, *flags]
    environment = dict(os.environ, PYTHONPATH=code_root, TF_CPP_MIN_LOG_LEVEL="2")
    started = time.perf_counter()
    process = subprocess.Popen(
        command, cwd=code_root, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    sampler = TreeSampler(process.pid)
    sampler.start()
    stdout = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    sampler.stop()
    if status != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{stdout.decode(errors='replace')[-3000:]}")
    match = re.search(rb"seconds\s+([0-9.]+) \(", stdout)
    shards = [name for name in os.listdir(output) if name.endswith(".parquet")]
    # wait4 counts the CPU of every descendant that was waited for; the sampler the others.
    cpu = max(sampler.cpu_seconds, usage.ru_utime + usage.ru_stime)
    return {
        "wall_seconds": round(wall, 2),
        "pipeline_seconds": float(match.group(1)) if match else float("nan"),
        "peak_rss_mib": round(sampler.peak_rss / 2**20, 1),
        "cpu_percent": round(100 * cpu / wall, 1),
        "output_files": len(shards),
    }


def extract_baseline(revision, directory):
    """The repository at `revision`, extracted into `directory` with `git archive`."""
    archive = os.path.join(directory, "baseline.tar")
    subprocess.run(["git", "-C", ROOT, "archive", "-o", archive, revision], check=True)
    target = os.path.join(directory, "baseline")
    with tarfile.open(archive) as tar:
        tar.extractall(target, filter="data")
    return target


def measure(contenders, sizes, scratch):
    """Runs every contender on every corpus size; returns {name: {size: measurements}}."""
    corpora = {n: write_corpus(os.path.join(scratch, f"corpus-{n}.jsonl"), n) for n in sizes}
    results = {}
    for name, (code_root, flags) in contenders.items():
        results[name] = {}
        for n in sizes:
            slug = re.sub(r"\W+", "-", name)
            output = os.path.join(scratch, "out", f"{slug}-{n}")
            results[name][n] = run_export(code_root, corpora[n], output, flags)
            print(f"  {name}, {n:,} documents: {results[name][n]}", file=sys.stderr, flush=True)
    return results


def marginal(runs, small, large):
    extra = runs[large]["pipeline_seconds"] - runs[small]["pipeline_seconds"]
    return (large - small) / extra if extra > 0 else float("nan")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--documents", type=int, default=None, help="N (default 61440; 20480 with --tuning).")
    parser.add_argument("--baseline", default=DEFAULT_BASELINE, help="git revision of the old way.")
    parser.add_argument("--tuning", action="store_true", help="compare local settings instead.")
    parser.add_argument(
        "--contenders",
        default="old,memory,default,threads2",
        help="which of old, memory, default, threads2 to run (default: all), in that order.",
    )
    parser.add_argument("--json", default=None, help="where to write results (default benchmarks/results/).")
    args = parser.parse_args(argv)
    name = "scale_tuning" if args.tuning else "scale"
    json_path = args.json or os.path.join(ROOT, "benchmarks", "results", f"{name}.json")
    with tempfile.TemporaryDirectory() as scratch:
        if args.tuning:
            small = args.documents or 20480
            large = 2 * small
            memory = ["--direct_running_mode=in_memory"]
            processes = ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]
            contenders = {
                "in memory": (ROOT, memory),
                "2 processes (default), 1 TF thread each": (ROOT, processes),
                "2 processes, 2 TF threads each": (ROOT, [*processes, "--tf_threads=2"]),
                "3 processes, 1 TF thread each": (
                    ROOT,
                    ["--direct_running_mode=multi_processing", "--direct_num_workers=3"],
                ),
                "2 processes, batch 256": (ROOT, [*processes, "--batch_size=256"]),
                "2 processes, batch 1024": (ROOT, [*processes, "--batch_size=1024"]),
            }
        else:
            small = args.documents or 61440
            large = 5 * small
            wanted = args.contenders.split(",")
            choices = {
                "old": ("old (whole files, documents shuffled by id)", None, []),
                "memory": ("new, in memory", ROOT, ["--direct_running_mode=in_memory"]),
                "default": ("new, default (2 processes)", ROOT, []),
                "threads2": ("new, 2 processes, 2 TF threads each", ROOT, ["--tf_threads=2"]),
            }
            contenders = {}
            for key, (label, code_root, flags) in choices.items():
                if key in wanted:
                    contenders[label] = (code_root or extract_baseline(args.baseline, scratch), flags)
        results = measure(contenders, (small, large), scratch)

    header = (
        f"| contender | marginal docs/s | × first | peak RSS MiB, {small:,} / {large:,} | RSS ratio "
        f"| CPU % | files at {large:,} |"
    )
    lines = [header, "|---|---|---|---|---|---|---|"]
    first = None
    table = {}
    for contender, runs in results.items():
        rate = marginal(runs, small, large)
        first = first or rate
        ratio = runs[large]["peak_rss_mib"] / runs[small]["peak_rss_mib"]
        table[contender] = {"marginal_docs_per_s": rate, "rss_ratio": ratio, "runs": runs}
        lines.append(
            f"| {contender} | {rate:,.0f} | {rate / first:.2f} | {runs[small]['peak_rss_mib']:,.0f} / "
            f"{runs[large]['peak_rss_mib']:,.0f} | {ratio:.2f} | {runs[small]['cpu_percent']:.0f} / "
            f"{runs[large]['cpu_percent']:.0f} | {runs[large]['output_files']} |"
        )
    print("\n".join(lines))
    os.makedirs(os.path.dirname(json_path), exist_ok=True)
    with open(json_path, "w", encoding="utf-8") as handle:
        json.dump(
            {
                "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                "documents": [small, large],
                "results": table,
                "table": lines,
            },
            handle,
            indent=2,
        )


if __name__ == "__main__":
    main()
