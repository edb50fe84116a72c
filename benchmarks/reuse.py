"""Side-by-side benchmark of `--reuse`: a re-export after a 1 % change against a full export.

    python -m benchmarks.reuse [--documents 40000] [--json PATH]

The corpus is the sample corpus repeated with fresh ids (realistic lengths:
median about 30 tokens); the next version changes 1 % of the documents, adds
1 % and deletes 1 %.  For each forward pass (Keras's own with `--fast_path
off`, and the default fast path), in this one run and on the same model
(the bundled default, all default layers):

1. a full export of version 1 (the export to reuse);
2. a full export of version 2 (the baseline);
3. `--reuse` of (1) for version 2, checked equal to (2) bit for bit.

It reports the wall time of each command (imports and model load included)
and the pipeline time from its summary, and the ratio reuse / full.
"""

import argparse
import json
import os
import platform
import random
import re
import subprocess
import sys
import tempfile
import time

import pyarrow.dataset as ds

from benchmarks.export import ROOT, write_corpus

SHARE = 0.01


def next_version(source, target, seed=0):
    """Writes `source` with 1 % of documents changed, 1 % added and 1 % deleted; returns the counts."""
    with open(source, encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle]
    count = max(1, int(len(records) * SHARE))
    picked = random.Random(seed).sample(range(len(records)), 2 * count)
    changed, deleted = set(picked[:count]), set(picked[count:])
    with open(target, "w", encoding="utf-8") as handle:
        for index, record in enumerate(records):
            if index in deleted:
                continue
            if index in changed:
                record["content"] += " and one more sentence about sockets"
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        for index in range(count):
            record = {"id": f"new-{index}", "title": "a new title", "content": f"a new document {index}"}
            handle.write(json.dumps(record) + "\n")
    return {"documents": len(records), "changed": count, "added": count, "deleted": count}


def run(corpus, output, flags):
    """(wall seconds, pipeline seconds from the summary) of one `python -m pipeline.run`."""
    command = [sys.executable, "-m", "pipeline.run", "--input", corpus, "--output", output, *flags]
    started = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, capture_output=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr.decode(errors='replace')[-3000:]}")
    match = re.search(rb"seconds\s+([0-9.]+) \(", result.stdout)
    return seconds, float(match.group(1))


def _rows(directory):
    dataset = ds.dataset(directory, format="parquet", ignore_prefixes=["_", ".", "errors"])
    return dataset.to_table().sort_by("id")


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--documents", type=int, default=40000)
    parser.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results", "reuse.json"))
    args = parser.parse_args(argv)

    results = {"documents": args.documents, "machine": f"{platform.machine()}, {os.cpu_count()} cores"}
    with tempfile.TemporaryDirectory(prefix="embexport-reuse-") as work:
        first = write_corpus(os.path.join(work, "v1.jsonl"), args.documents)
        second = os.path.join(work, "v2.jsonl")
        results["change"] = next_version(first, second)
        for name, flags in (("keras", ["--fast_path", "off"]), ("fast", [])):
            v1, full, reused = (os.path.join(work, f"{name}-{run}") for run in ("v1", "full", "reuse"))
            run(first, v1, flags)
            full_seconds = run(second, full, flags)
            reuse_seconds = run(second, reused, [*flags, "--reuse", v1])
            with open(os.path.join(reused, "_MANIFEST.json"), encoding="utf-8") as handle:
                counts = json.load(handle)["counts"]
            results[name] = {
                "full_wall_seconds": round(full_seconds[0], 2),
                "full_pipeline_seconds": full_seconds[1],
                "reuse_wall_seconds": round(reuse_seconds[0], 2),
                "reuse_pipeline_seconds": reuse_seconds[1],
                "wall_ratio": round(reuse_seconds[0] / full_seconds[0], 3),
                "pipeline_ratio": round(reuse_seconds[1] / full_seconds[1], 3),
                "rows_reused": counts["rows_reused"],
                "rows_embedded": counts["rows_embedded"],
                "earlier_rows_dropped": counts["earlier_rows_dropped"],
                "bit_identical": _rows(reused).equals(_rows(full)),
            }
    print(format_table(results))
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2)
    return 0


def format_table(results):
    lines = [
        f"{results['documents']:,} documents; 1 % changed, 1 % added, 1 % deleted ({results['machine']})",
        "",
        "| forward pass | full export s (pipeline s) | --reuse s (pipeline s) | reuse / full, wall "
        "(pipeline) | reused / embedded / dropped | equal bit for bit |",
        "|---|---|---|---|---|---|",
    ]
    for name, label in (("keras", "Keras (`--fast_path off`)"), ("fast", "fast path (default)")):
        r = results[name]
        lines.append(
            f"| {label} | {r['full_wall_seconds']:.1f} ({r['full_pipeline_seconds']:.1f}) | "
            f"{r['reuse_wall_seconds']:.1f} ({r['reuse_pipeline_seconds']:.1f}) | "
            f"{r['wall_ratio']:.0%} ({r['pipeline_ratio']:.0%}) | "
            f"{r['rows_reused']:,} / {r['rows_embedded']:,} / {r['earlier_rows_dropped']:,} | "
            f"{'yes' if r['bit_identical'] else 'NO'} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
