"""Throughput on real-length English text: the old code against this code, side by side in one run.

    python -m benchmarks.real_text [--documents 20000] [--baseline f1006cf] [--parts all] [--json PATH]

The corpus is `benchmarks.corpora`: real English sentences from the text that
ships with CPython (`pydoc_data.topics` and the standard library's docstrings),
documents of log-normal length (median 46 words, mean about 55) as in Debian's
package descriptions; not the short sample corpus repeated.  `old` is the code
at `--baseline` (default: main before this work), extracted with `git archive`;
`new` is this code.  Each part runs both as child processes, so every ratio
is of two measurements made minutes apart on the same machine:

- `export`: the default export (`lstm_content`, `lstm_title`, mean-pooled `emb`),
  `python -m pipeline.run` with no runner flags, at N and 5N documents: docs/s
  over the whole command (start-up included) and over the pipeline alone (the
  summary's seconds), peak RSS of the process tree at N and 5N; and this code
  with the runner mode forced each way (`new, in memory`, `new, 2 processes`),
  since the default switches to worker processes from 64 MB of input.
- `pooling_none`: the same export with `--pooling none` at N documents, and the
  Parquet encoder's own rate on the rows it wrote (read back, written again to
  an in-memory file with the export's compression, in one process), with the
  export's writer settings (`schema.parquet_writer_options`) and pyarrow's defaults.
- `columns`: each column alone, and the two LSTMs together (what bounds the
  default export's forward pass), in one process with the project's classes
  (`DocumentTokenizer`, `Embedder.run`: the forward pass, "inference alone";
  `Embedder.batch_rows`: the Arrow rows; a Parquet write with the code's own
  writer settings), 8,192 documents,
  batch 512, after one warm-up batch.
- `tutorial`: the tutorial's Keras 2 `.h5` (`Embedding(4000, 300)` -> `LSTM(128)`,
  float32 `Input(shape=(300,))`, see `benchmarks.export.build_keras2_models`),
  `--layer lstm`: wall time of the whole command for 1,000, 20,000 and 60,000
  documents, its marginal rate between 20,000 and 60,000 (from wall times), and
  the model's own `keras.Model(inputs, lstm).predict` on the same ids (2,048
  documents, after a warm-up), measured with this code in a child process.
"""

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time

from benchmarks.corpora import write_real_corpus
from benchmarks.export import build_keras2_models
from benchmarks.scale import ROOT, TreeSampler, extract_baseline

# main before this work: the fast path's padded embedding lookup, a check per worker.
DEFAULT_BASELINE = "f1006cf"
PARTS = ("export", "pooling_none", "columns", "tutorial")
COLUMN_DOCUMENTS = 8192
TUTORIAL_SIZES = (1000, 20000, 60000)
PREDICT_DOCUMENTS = 2048

# Run in a child process under either code root.  argv: corpus, scratch directory,
# documents, JSON list of flag lists.  Prints one JSON line: {label: measurements}.
COLUMNS_SCRIPT = r"""
import io, json, sys, time
import pyarrow as pa
import pyarrow.parquet as pq
try:  # this code's layout
    from pipeline.inference.embedder import Embedder
    from pipeline.inference.features import DocumentTokenizer
    from pipeline.planning.build import build_plan
    from pipeline.planning.options import ExportOptions
    from pipeline.reading.documents import Document
    from pipeline.writing.schema import parquet_writer_options
except ImportError:  # the baseline's flat layout, which wrote pyarrow's defaults
    from pipeline.corpus import Document
    from pipeline.embedder import Embedder
    from pipeline.features import DocumentTokenizer
    from pipeline.options import ExportOptions
    from pipeline.plan import build_plan
    parquet_writer_options = lambda schema: {}

corpus, scratch, count, configurations = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
with open(corpus, encoding="utf-8") as handle:
    records = [json.loads(line) for _, line in zip(range(count), handle)]
results = {}
for label, flags in configurations:
    plan, source = build_plan(ExportOptions(["--input", corpus, "--output", scratch + "/unused", *flags]))
    documents = [
        Document(r["id"], tuple(r[i.field] for i in plan.inputs), (), corpus, n + 1)
        for n, r in enumerate(records)
    ]
    tokenizer = DocumentTokenizer(plan, source.tokenizer)
    started = time.perf_counter()
    tokenized = [tokenizer.tokenize(document) for document in documents]
    tokenize = time.perf_counter() - started
    embedder = Embedder(plan, source)
    batches = [tokenized[i : i + plan.batch_size] for i in range(0, len(tokenized), plan.batch_size)]
    embedder.batch_rows(embedder.run(batches[0]))  # traced once
    forward = rows = parquet = 0.0
    for batch in batches:
        started = time.perf_counter()
        embedded = embedder.run(batch)
        forward += time.perf_counter() - started
        started = time.perf_counter()
        made = embedder.batch_rows(embedded).rows
        rows += time.perf_counter() - started
        started = time.perf_counter()
        pq.write_table(
            pa.Table.from_batches([made]), io.BytesIO(), compression=plan.compression,
            **parquet_writer_options(made.schema),
        )
        parquet += time.perf_counter() - started
    del embedded, made
    results[label] = {
        "tokenize_docs_per_s": count / tokenize,
        "forward_docs_per_s": count / forward,
        "rows_docs_per_s": count / rows,
        "parquet_docs_per_s": count / parquet,
    }
print(json.dumps(results))
"""

# This code only.  argv: model, tokenizer flags as JSON, corpus, documents.  Prints {"docs_per_s": ...}.
PREDICT_SCRIPT = r"""
import json, sys, time
import keras
import numpy as np
from models.truncate import truncate
from pipeline.reading.documents import Document
from pipeline.inference.features import DocumentTokenizer, stack_features
from pipeline.planning.options import ExportOptions
from pipeline.planning.build import build_plan

flags, corpus, count = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])
plan, source = build_plan(ExportOptions(["--input", corpus, "--output", "/nonexistent/unused", *flags]))
with open(corpus, encoding="utf-8") as handle:
    records = [json.loads(line) for _, line in zip(range(count), handle)]
tokenizer = DocumentTokenizer(plan, source.tokenizer)
tokenized = [
    tokenizer.tokenize(Document(r["id"], tuple(r[i.field] for i in plan.inputs), (), corpus, n + 1))
    for n, r in enumerate(records)
]
features = stack_features(plan.inputs, tokenized)
sub_model = truncate(source.model, list(plan.layer_specs))
model = keras.Model(sub_model.inputs, sub_model.outputs)
inputs = {t.name: features[t.name].astype(str(t.dtype)) for t in sub_model.inputs}
model.predict({k: v[:512] for k, v in inputs.items()}, batch_size=512, verbose=0)
started = time.perf_counter()
model.predict(inputs, batch_size=512, verbose=0)
print(json.dumps({"docs_per_s": count / (time.perf_counter() - started)}))
"""


def _child_environment(code_root):
    return dict(os.environ, PYTHONPATH=code_root, TF_CPP_MIN_LOG_LEVEL="2")


def run_command(code_root, corpus, output, flags):
    """Runs `python -m pipeline.run` from `code_root`: wall seconds, pipeline seconds, peak RSS MiB."""
    command = [sys.executable, "-m", "pipeline.run", "--input", corpus, "--output", output, *flags]
    started = time.perf_counter()
    process = subprocess.Popen(
        command,
        cwd=code_root,
        env=_child_environment(code_root),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    sampler = TreeSampler(process.pid)
    sampler.start()
    stdout = process.stdout.read()
    status = process.wait()
    wall = time.perf_counter() - started
    sampler.stop()
    if status != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{stdout.decode(errors='replace')[-3000:]}")
    match = re.search(rb"seconds\s+([0-9.]+) \(", stdout)
    first_row = re.findall(rb"first row after (\d+):(\d+):(\d+)", stdout)
    hours, minutes, seconds = (int(part) for part in first_row[-1]) if first_row else (0, 0, -1)
    return {
        "wall_seconds": wall,
        "pipeline_seconds": float(match.group(1)) if match else float("nan"),
        "peak_rss_mib": sampler.peak_rss / 2**20,
        "first_row_seconds": hours * 3600 + minutes * 60 + seconds if first_row else None,
    }


def _run_child(code_root, script, *args):
    result = subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=code_root,
        env=_child_environment(code_root),
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def _log(message):
    print(message, file=sys.stderr, flush=True)


def export_part(roots, corpora, scratch, sizes, flags, name):
    """{contender: {size: run_command(...)}} for one command line at each size.

    `roots` maps a contender to its code root, or to (code root, extra flags).
    """
    results = {}
    for contender, root in roots.items():
        root, extra = root if isinstance(root, tuple) else (root, [])
        results[contender] = {}
        for size in sizes:
            slug = re.sub(r"\W+", "-", contender)
            output = os.path.join(scratch, f"out-{name}-{slug}-{size}")
            results[contender][size] = run_command(root, corpora[size], output, [*flags, *extra])
            shutil.rmtree(output, ignore_errors=True)
            _log(f"  {name}, {contender}, {size:,} documents: {results[contender][size]}")
    return results


def parquet_rate(corpus, flags, scratch, documents):
    """The Parquet encoder's own docs/s on the rows of one `flags` export (this code's), in this process.

    Returns {"export settings": docs/s, "pyarrow defaults": docs/s}: the rows
    written again to an in-memory file with the export's writer settings
    (`schema.parquet_writer_options`) and with pyarrow's defaults, snappy both.
    """
    import io

    import pyarrow.parquet as pq

    from pipeline.writing.schema import parquet_writer_options

    output = os.path.join(scratch, "out-parquet-source")
    run_command(ROOT, corpus, output, [*flags, "--direct_running_mode=in_memory"])
    table = pq.read_table(output, ignore_prefixes=["_", ".", "errors"])
    shutil.rmtree(output, ignore_errors=True)
    rates = {}
    for label, options in (
        ("export settings", parquet_writer_options(table.schema)),
        ("pyarrow defaults", {}),
    ):
        started = time.perf_counter()
        pq.write_table(table, io.BytesIO(), compression="snappy", **options)
        rates[label] = documents / (time.perf_counter() - started)
    return rates


def _ratio(new, old):
    return new / old if old else float("nan")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--documents", type=int, default=20000, help="N (default 20,000; 5N is run too).")
    parser.add_argument("--baseline", default=DEFAULT_BASELINE, help="git revision of the old code.")
    parser.add_argument(
        "--parts", default=",".join(PARTS), help=f"which of {', '.join(PARTS)} (default all)."
    )
    parser.add_argument("--json", default=None, help="where to write results (default benchmarks/results/).")
    args = parser.parse_args(argv)
    parts = args.parts.split(",")
    json_path = args.json or os.path.join(ROOT, "benchmarks", "results", "real_text.json")
    small, large = args.documents, 5 * args.documents
    lines, results = [], {}
    with tempfile.TemporaryDirectory() as scratch:
        roots = {"old": extract_baseline(args.baseline, scratch), "new": ROOT}
        sizes = sorted({small, large, COLUMN_DOCUMENTS, *TUTORIAL_SIZES})
        corpora = {n: write_real_corpus(os.path.join(scratch, f"real-{n}.jsonl"), n) for n in sizes}

        if "export" in parts:
            contenders = {
                **roots,
                "new, in memory": (ROOT, ["--direct_running_mode=in_memory"]),
                "new, 2 processes": (
                    ROOT,
                    ["--direct_running_mode=multi_processing", "--direct_num_workers=2"],
                ),
            }
            runs = export_part(contenders, corpora, scratch, (small, large), [], "export")
            results["export"] = runs
            lines += [
                f"Default export (lstm_content, lstm_title, mean-pooled emb), {small:,} and {large:,} docs",
                "| contender | docs/s whole command, N / 5N | docs/s pipeline, N / 5N | peak RSS MiB, N / 5N "
                "| RSS 5N / N | first row after, s (N) |",
                "|---|---|---|---|---|---|",
            ]
            for contender, by_size in runs.items():
                whole = [n / by_size[n]["wall_seconds"] for n in (small, large)]
                pipeline = [n / by_size[n]["pipeline_seconds"] for n in (small, large)]
                rss = [by_size[n]["peak_rss_mib"] for n in (small, large)]
                first = by_size[small]["first_row_seconds"]
                first = "-" if first is None else first
                lines.append(
                    f"| {contender} | {whole[0]:,.0f} / {whole[1]:,.0f} "
                    f"| {pipeline[0]:,.0f} / {pipeline[1]:,.0f} "
                    f"| {rss[0]:,.0f} / {rss[1]:,.0f} | {rss[1] / rss[0]:.2f} | {first} |"
                )
            old, new = runs["old"], runs["new"]
            lines.append(
                "| new / old | "
                + " / ".join(
                    f"{_ratio(old[n]['wall_seconds'], new[n]['wall_seconds']):.2f}x" for n in (small, large)
                )
                + " | "
                + " / ".join(
                    f"{_ratio(old[n]['pipeline_seconds'], new[n]['pipeline_seconds']):.2f}x"
                    for n in (small, large)
                )
                + " | | | |"
            )
            lines.append("")

        if "pooling_none" in parts:
            flags = ["--pooling", "none"]
            runs = export_part(roots, corpora, scratch, (small,), flags, "pooling-none")
            encoder = parquet_rate(corpora[COLUMN_DOCUMENTS], flags, scratch, COLUMN_DOCUMENTS)
            results["pooling_none"] = {"runs": runs, "parquet_encoder_docs_per_s": encoder}
            old, new = runs["old"][small], runs["new"][small]
            lines += [
                f"--pooling none (the default layers, per-token emb), {small:,} documents",
                "| contender | docs/s whole command | docs/s pipeline | peak RSS MiB |",
                "|---|---|---|---|",
                *(
                    f"| {c} | {small / r['wall_seconds']:,.0f} | {small / r['pipeline_seconds']:,.0f} "
                    f"| {r['peak_rss_mib']:,.0f} |"
                    for c, r in (("old", old), ("new", new))
                ),
                f"| new / old | {_ratio(old['wall_seconds'], new['wall_seconds']):.2f}x "
                f"| {_ratio(old['pipeline_seconds'], new['pipeline_seconds']):.2f}x | |",
                "Parquet encoder alone on those rows (snappy, one process): "
                + ", ".join(f"{rate:,.0f} docs/s with {label}" for label, rate in encoder.items()),
                "",
            ]

        if "columns" in parts:
            configurations = [
                ("lstm_content", ["--layer=lstm_content"]),
                ("lstm_title", ["--layer=lstm_title"]),
                # The default export's LSTMs without its emb column: what bounds its forward pass.
                ("both LSTMs", ["--layer=lstm_content", "--layer=lstm_title"]),
                ("emb, mean-pooled", ["--layer=emb", "--pooling=mean"]),
                ("emb, --pooling none", ["--layer=emb", "--pooling=none"]),
                ("default export (all three)", []),
            ]
            columns = {
                contender: _run_child(
                    root,
                    COLUMNS_SCRIPT,
                    corpora[COLUMN_DOCUMENTS],
                    scratch,
                    str(COLUMN_DOCUMENTS),
                    json.dumps(configurations),
                )
                for contender, root in roots.items()
            }
            _log(f"  columns: {columns}")
            results["columns"] = columns
            lines += [
                f"Each column alone, one process, {COLUMN_DOCUMENTS:,} documents, batch 512 (docs/s)",
                "| column(s) | forward pass old / new | rows old / new | Parquet write old / new "
                "| tokenize |",
                "|---|---|---|---|---|",
            ]
            for label, _ in configurations:
                old, new = columns["old"][label], columns["new"][label]

                def pair(key, old=old, new=new):
                    return f"{old[key]:,.0f} / {new[key]:,.0f} ({_ratio(new[key], old[key]):.1f}x)"

                lines.append(
                    f"| {label} | {pair('forward_docs_per_s')} | {pair('rows_docs_per_s')} "
                    f"| {pair('parquet_docs_per_s')} | {new['tokenize_docs_per_s']:,.0f} |"
                )
            lines.append("")

        if "tutorial" in parts:
            models = os.path.join(scratch, "keras2")
            os.makedirs(models)
            flags = build_keras2_models(models)["tutorial_single_input"]
            runs = export_part(roots, corpora, scratch, TUTORIAL_SIZES, flags, "tutorial")
            predict = _run_child(
                ROOT, PREDICT_SCRIPT, json.dumps(flags), corpora[COLUMN_DOCUMENTS], str(PREDICT_DOCUMENTS)
            )["docs_per_s"]
            results["tutorial"] = {"runs": runs, "predict_docs_per_s": predict}
            low, high = TUTORIAL_SIZES[1], TUTORIAL_SIZES[2]
            lines += [
                "The tutorial's .h5 model (Embedding(4000, 300) -> LSTM(128)), --layer lstm",
                "| contender | wall s, 1,000 | wall s, 20,000 | wall s, 60,000 | marginal docs/s 20k-60k "
                "| × its own predict |",
                "|---|---|---|---|---|---|",
            ]
            for contender, by_size in runs.items():
                rate = (high - low) / (by_size[high]["wall_seconds"] - by_size[low]["wall_seconds"])
                lines.append(
                    f"| {contender} | {by_size[1000]['wall_seconds']:.1f} "
                    f"| {by_size[low]['wall_seconds']:.1f} "
                    f"| {by_size[high]['wall_seconds']:.1f} | {rate:,.0f} | {rate / predict:.1f} |"
                )
            old, new = runs["old"], runs["new"]
            lines.append(
                f"| new / old wall time | {new[1000]['wall_seconds'] / old[1000]['wall_seconds']:.2f} "
                f"| {new[low]['wall_seconds'] / old[low]['wall_seconds']:.2f} "
                f"| {new[high]['wall_seconds'] / old[high]['wall_seconds']:.2f} | | |"
            )
            lines.append(f"Its own predict on the same ids: {predict:,.0f} docs/s")

    print("\n".join(lines))
    os.makedirs(os.path.dirname(json_path), exist_ok=True)
    with open(json_path, "w", encoding="utf-8") as handle:
        json.dump(
            {
                "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                "baseline": args.baseline,
                "documents": [small, large],
                "results": results,
                "table": lines,
            },
            handle,
            indent=2,
            default=str,
        )


if __name__ == "__main__":
    main()
