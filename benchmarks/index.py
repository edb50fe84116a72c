"""Side-by-side benchmark of the nearest-neighbour index against the exact scan on one export.

    python -m benchmarks.index [--documents 20000] [--rows 1000000] [--workdir DIR] [--json PATH]
                               [--connectivity M] [--expansion_search EF]

How the vectors are made: `benchmarks.corpora` writes `--documents` documents
of real English text at realistic lengths; `python -m pipeline.run` exports
the bundled default model's `lstm_content` (128 float32) over them, with
`kind` and `topic` kept.  Those real vectors are replicated to `--rows` rows:
replica 0 is the real export's row as it is, and each further replica
`ID#r` is the real vector plus Gaussian noise whose expected norm equals the
median distance from a real vector to its nearest other real vector, so a
replica is as far from its original as the nearest real document is.  The
rows are written as an export-shaped directory (`part-*.parquet` shards with
the export's schema and Parquet metadata, and a `_MANIFEST.json` saying how
they were made).

Then, in this one run and on that export:

1. `python -m pipeline.analyze OUT index --column lstm_content` (a subprocess,
   as a user runs it): build time, peak RSS, index size against the Parquet,
   recall@10 against the exact scan on 1,000 random rows as queries;
2. one query by id, as `neighbors --id` answers it: today's exact scan
   (`find_neighbors`) against the index (`indexed_neighbors`), p50/p99;
3. a batch of queries: the exact scan of the export once for the whole batch
   (`exact_top_k`) against the index, in queries per second.
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.corpora import write_real_corpus
from models.paths import unexpanded_home
from pipeline.analysis.dataset import open_documents, vectors_to_numpy
from pipeline.analysis.exact import exact_top_k, recall_at_k
from pipeline.analysis.index_store import read_metadata
from pipeline.analysis.neighbors import find_neighbors, indexed_neighbors, open_index
from pipeline.writing.files import file_digest
from pipeline.writing.layout import MANIFEST

COLUMN = "lstm_content"
SHARD_ROWS = 125_000
NEIGHBOR_SAMPLE = 2000
SWEEP = (128, 256, 512, 1024, 2048)
SWEEP_QUERIES = 200
# Written into --workdir when the benchmark takes it: a directory holding anything else is the user's.
WORKDIR_MARKER = ".benchmarks-index-workdir"
EXIT_CONFIG_ERROR = 2


def claim_workdir(workdir: str) -> None:
    """Takes `workdir` for the benchmark's files: a new or empty directory, or one it took before.

    Raises:
        ValueError: `workdir` is a file, or holds files this benchmark did not write (it would
            overwrite a `corpus.jsonl` or an `export_N` of the user's).
    """
    if os.path.lexists(workdir) and not os.path.isdir(workdir):
        raise ValueError(f"--workdir {workdir!r} is not a directory; choose a new or empty directory.")
    os.makedirs(workdir, exist_ok=True)
    names = sorted(os.listdir(workdir))
    if names and WORKDIR_MARKER not in names:
        raise ValueError(
            f"--workdir {workdir!r} holds files that benchmarks.index did not write (e.g. {names[0]!r}), "
            "which it would overwrite; choose a new or empty directory."
        )
    with open(os.path.join(workdir, WORKDIR_MARKER), "a", encoding="utf-8"):
        pass


def export_real(workdir: str, documents: int) -> str:
    """The real export of `documents` real-length documents; returns its directory."""
    corpus = os.path.join(workdir, "corpus.jsonl")
    output = os.path.join(workdir, "real_export")
    if os.path.exists(os.path.join(output, MANIFEST)):
        return output
    write_real_corpus(corpus, documents)
    command = [
        sys.executable,
        "-m",
        "pipeline.run",
        "--input",
        corpus,
        "--output",
        output,
        "--layer",
        COLUMN,
        "--keep_fields",
        "kind,topic",
        "--overwrite",
    ]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return output


def noise_scale(vectors: np.ndarray, rng: np.random.Generator) -> float:
    """The median distance from a real vector to its nearest other real vector (on a sample)."""
    sample = vectors[rng.choice(len(vectors), size=min(NEIGHBOR_SAMPLE, len(vectors)), replace=False)]
    nearest = []
    for start in range(0, len(sample), 256):
        block = sample[start : start + 256]
        distances = (
            (block**2).sum(axis=1)[:, None] - 2 * block @ vectors.T + (vectors**2).sum(axis=1)[None, :]
        )
        distances[distances < 1e-12] = np.inf  # itself (and exact duplicates)
        nearest.append(np.sqrt(distances.min(axis=1)))
    return float(np.median(np.concatenate(nearest)))


def replicate(real: str, target: str, rows: int, seed: int = 0) -> dict:
    """Writes `rows` rows made from the real export's (see the module docstring); returns how."""
    table = pa.concat_tables(
        pq.read_table(os.path.join(real, name))
        for name in sorted(os.listdir(real))
        if name.startswith("part-") and name.endswith(".parquet")
    )
    schema = pq.read_schema(
        os.path.join(real, next(n for n in sorted(os.listdir(real)) if n.startswith("part-")))
    )
    vectors = vectors_to_numpy(table[COLUMN]).astype(np.float32)
    rng = np.random.default_rng(seed)
    scale = noise_scale(vectors, rng)
    sigma = scale / np.sqrt(vectors.shape[1])
    replicas = -(-rows // len(vectors))
    # An earlier run's (the workdir is the benchmark's): its shards must not mix with these.
    shutil.rmtree(target, ignore_errors=True)
    os.makedirs(target)
    shards = -(-rows // SHARD_ROWS)
    written = 0
    listed: list[dict] = []
    ids = np.asarray(table["id"].to_pylist(), dtype=object)
    for shard in range(shards):
        count = min(SHARD_ROWS, rows - written)
        positions = np.arange(written, written + count)
        replica, source = positions // len(vectors), positions % len(vectors)
        noisy = vectors[source] + (replica[:, None] > 0) * rng.normal(0, sigma, (count, vectors.shape[1]))
        columns = {}
        for field in schema:
            if field.name == "id":
                names = [i if r == 0 else f"{i}#{r}" for i, r in zip(ids[source], replica, strict=True)]
                columns[field.name] = pa.array(names, field.type)
            elif field.name == COLUMN:
                flat = pa.array(noisy.astype(np.float32).reshape(-1))
                columns[field.name] = pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])
            else:
                columns[field.name] = table[field.name].take(pa.array(source))
        name = f"part-{shard:05d}-of-{shards:05d}.parquet"
        path = os.path.join(target, name)
        pq.write_table(pa.table(columns, schema=schema), path, compression="snappy")
        # Listed as an export lists its shards: analysis checks the row files against them.
        listed.append({"file": name, "rows": count, **file_digest(path)})
        written += count
    with open(os.path.join(real, MANIFEST), encoding="utf-8") as handle:
        manifest = json.load(handle)
    how = {
        "real_rows": len(vectors),
        "rows": rows,
        "replicas": replicas,
        "noise_norm": scale,
        "noise_sigma_per_dim": float(sigma),
        "seed": seed,
    }
    manifest.update(rows_written=rows, benchmark_replicated=how, shards={"rows": listed, "errors": []})
    with open(os.path.join(target, MANIFEST), "w", encoding="utf-8") as handle:
        json.dump(manifest, handle, indent=2)
    return how


def build(export: str, threads: int, settings: list[str]) -> tuple[dict, float]:
    """Runs the index command as a user does; returns its metadata and wall seconds."""
    started = time.perf_counter()
    command = [sys.executable, "-m", "pipeline.analyze", export, "index", "--column", COLUMN]
    subprocess.run([*command, "--threads", str(threads), *settings], check=True)
    wall = time.perf_counter() - started
    data = open_documents(export)
    return read_metadata(data, COLUMN), wall


def percentiles(seconds: list[float]) -> dict:
    values = np.asarray(seconds) * 1000
    return {
        "p50_ms": float(np.percentile(values, 50)),
        "p99_ms": float(np.percentile(values, 99)),
        "n": len(values),
    }


def measure_queries(export: str, exact_queries: int, index_queries: int, batch: int, seed: int) -> dict:
    """Single-query latency and batch throughput: exact scan against the index, same export, same queries."""
    data = open_documents(export)
    started = time.perf_counter()
    loaded = open_index(data, COLUMN)
    open_seconds = time.perf_counter() - started
    rng = np.random.default_rng(seed)
    rows = loaded.keys.num_rows
    chosen = rng.choice(rows, size=max(exact_queries, index_queries, batch), replace=False)
    keys = loaded.keys.column(0).take(pa.array(chosen)).to_pylist()
    exact, indexed = [], []
    agree = []
    for key in keys[:exact_queries]:
        started = time.perf_counter()
        reference, _ = find_neighbors(data, key, COLUMN, 10)
        exact.append(time.perf_counter() - started)
        started = time.perf_counter()
        found, _ = indexed_neighbors(data, loaded, key, 10)
        indexed.append(time.perf_counter() - started)
        agree.append(len({n.key for n in found} & {n.key for n in reference}) / 10)
    for key in keys[exact_queries:index_queries]:
        started = time.perf_counter()
        indexed_neighbors(data, loaded, key, 10)
        indexed.append(time.perf_counter() - started)
    vectors = loaded.vectors(chosen[:batch])
    excluded = [{int(p)} for p in chosen[:batch]]
    started = time.perf_counter()
    truth, truth_scores = exact_top_k(data, COLUMN, vectors, 10, "cos", exclude=chosen[:batch])
    exact_batch = time.perf_counter() - started
    started = time.perf_counter()
    loaded.search(vectors, 10, exclude=excluded)
    index_batch = time.perf_counter() - started
    # The search-time trade-off on the same graph: recall@10 and latency per expansion_search.
    sweep = []
    built_with = loaded.index.expansion_search
    for expansion in SWEEP:
        loaded.index.expansion_search = expansion
        positions, found = loaded.search(vectors, 10, exclude=excluded)
        timings = []
        for row in range(min(SWEEP_QUERIES, batch)):
            started = time.perf_counter()
            loaded.index.search(vectors[row : row + 1], 11)
            timings.append(time.perf_counter() - started)
        recall = recall_at_k(found, truth_scores, positions, truth)
        sweep.append({"expansion_search": expansion, "recall": recall, **percentiles(timings)})
    loaded.index.expansion_search = built_with
    single_exact, single_index = percentiles(exact), percentiles(indexed)
    return {
        "open_seconds": open_seconds,
        "single_exact": single_exact,
        "single_index": single_index,
        "single_speedup_p50": single_exact["p50_ms"] / single_index["p50_ms"],
        "single_overlap_with_exact": float(np.mean(agree)),
        "batch_queries": batch,
        "batch_exact_qps": batch / exact_batch,
        "batch_index_qps": batch / index_batch,
        "batch_speedup": exact_batch / index_batch,
        "sweep": sweep,
    }


def format_report(how: dict, metadata: dict, build_wall: float, queries: dict) -> str:
    recall = metadata["recall"]
    mib = 2**20
    lines = [
        f"{metadata['indexed']:,} vectors of {COLUMN} ({metadata['dim']} float32), {how['real_rows']:,} real "
        f"(the default bundle over benchmarks.corpora documents) x {how['replicas']} replicas, noise norm "
        f"{how['noise_norm']:.4f}; {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "",
        "| | exact scan (today) | index (usearch HNSW) |",
        "|---|---|---|",
        f"| build | - | {metadata['build_seconds']:.0f} s ({build_wall:.0f} s wall with imports and "
        f"recall), peak RSS {metadata['peak_rss_bytes'] / mib:.0f} MiB "
        f"({metadata['start_rss_bytes'] / mib:.0f} MiB before the build) |",
        f"| size | Parquet {metadata['parquet_bytes'] / mib:.0f} MiB "
        f"| index {metadata['bytes'] / mib:.0f} MiB |",
        f"| recall@{recall['k']} ({recall['queries']} random rows) | 1 | {recall['recall']:.4f} |",
        f"| one query by id, p50 / p99 | {queries['single_exact']['p50_ms']:.0f} / "
        f"{queries['single_exact']['p99_ms']:.0f} ms (n={queries['single_exact']['n']}) | "
        f"{queries['single_index']['p50_ms']:.2f} / {queries['single_index']['p99_ms']:.2f} ms "
        f"(n={queries['single_index']['n']}) |",
        f"| batch of {queries['batch_queries']} queries | {queries['batch_exact_qps']:.0f} queries/s "
        f"(one scan for all) | {queries['batch_index_qps']:.0f} queries/s |",
        "",
        f"single-query speed-up (p50): {queries['single_speedup_p50']:.0f}x; batch: "
        f"{queries['batch_speedup']:.0f}x; index load {queries['open_seconds']:.1f} s; the index's top 10 "
        f"shares {queries['single_overlap_with_exact']:.3f} of the exact top 10 on the timed queries",
        "",
        f"expansion_search (same graph, the {queries['batch_queries']} batch queries; latency of the "
        "bare search, one query, one thread of the caller):",
        *(
            f"  {row['expansion_search']:4d}: recall@10 {row['recall']:.4f}, p50 {row['p50_ms']:.3f} ms, "
            f"p99 {row['p99_ms']:.3f} ms"
            for row in queries["sweep"]
        ),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.index",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--documents", type=int, default=20_000, help="real documents exported (default 20,000)"
    )
    parser.add_argument(
        "--rows", type=int, default=1_000_000, help="rows of the indexed export (default 1,000,000)"
    )
    parser.add_argument(
        "--workdir",
        default=None,
        help="where the corpus and exports go: a new or empty directory, or one an earlier run of this "
        "benchmark used (default: a temp dir)",
    )
    parser.add_argument("--threads", type=int, default=0, help="index build threads (default: all cores)")
    parser.add_argument(
        "--exact_queries", type=int, default=10, help="single queries timed on the exact scan"
    )
    parser.add_argument("--index_queries", type=int, default=1000, help="single queries timed on the index")
    parser.add_argument("--batch", type=int, default=1000, help="queries in the batch (default 1000)")
    parser.add_argument("--connectivity", default=None, help="the index command's --connectivity")
    parser.add_argument("--expansion_search", default=None, help="the index command's --expansion_search")
    parser.add_argument("--json", default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    workdir = args.workdir or tempfile.mkdtemp(prefix="embexport-index-bench-")
    try:
        unexpanded = unexpanded_home({"--workdir": args.workdir, "--json": args.json})
        if unexpanded:
            raise ValueError(unexpanded)
        claim_workdir(workdir)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(EXIT_CONFIG_ERROR)
    real = export_real(workdir, args.documents)
    replicated = os.path.join(workdir, f"export_{args.rows}")
    how = replicate(real, replicated, args.rows)
    settings = []
    for name in ("connectivity", "expansion_search"):
        if getattr(args, name) is not None:
            settings += [f"--{name}", getattr(args, name)]
    metadata, build_wall = build(replicated, args.threads, settings)
    queries = measure_queries(replicated, args.exact_queries, args.index_queries, args.batch, seed=1)
    print(format_report(how, metadata, build_wall, queries))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(
                {"replicated": how, "index": metadata, "build_wall": build_wall, **queries}, handle, indent=2
            )


if __name__ == "__main__":
    main()
