"""Side-by-side benchmark: the export pipeline against plain Keras `predict`, in one run.

    python -m benchmarks.export [--documents 4096] [--batch_size 512] [--contenders all] [--models ...]
        [--json PATH]

Everything uses the same model (the bundled default: Embedding(4000, 300) shared
by two LSTM(128)), the same corpus and the same batch size, measured in this one
process tree so that the ratios are fair on a noisy machine:

- reference: `keras.Model(inputs, layer_tensor).predict` over already tokenized,
  padded arrays (what a user would write by hand);
- inference alone: our Keras forward pass (a traced `tf.function`) and the exact
  fast path, over the same arrays;
- the whole pipeline (read -> tokenize -> infer -> write Parquet) on the local
  DirectRunner engine, generic and fast path, as a subprocess;
- per-token `emb` (`--pooling none`) stored as vectors (float32, float16) and as
  token ids plus the table (`--token_storage ids`): speed, MiB written and bytes
  per document.  `--contenders token_storage` runs only these three;
- Keras 2 `.h5` models (`--models` picks them), inference alone against their own
  `predict`.  `--contenders keras2` runs only these;
- `--contenders arrow_rows`: why the model handler returns one result per batch.
  The rows of the same forward-pass outputs are built into Arrow once per batch
  (what the model handler does) and once per document (what one `PredictionResult` per
  document would lead to), for a vector column and a per-token column.

Throughput is *marginal*: the time for 3N documents minus the time for N, so
start-up (TensorFlow import, model load, tracing) is separated out.  Peak RSS is
the subprocess's.  The corpus is the sample corpus, repeated with fresh ids: its
documents are mostly far shorter than the 300-token input (median about 30
tokens).  Results go to stdout as a table and to a JSON file.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "models", "data", "sample_corpus.jsonl")
LSTM_LAYERS = ("lstm_content",)
TOKENIZER = os.path.join(ROOT, "models", "data", "default_bundle", "tokenizer.json")

# The tutorial's models exactly as its code writes them, and the common variants, at
# the tutorial's sizes, saved by Keras 2 (tf_keras) as .h5; run in a child process so
# no Keras 3 object shares its interpreter.  Weights are random: speed does not
# depend on them, and every comparison is against `predict` on the same weights.
# argv: output directory.  Writes NAME.h5 and info.json: {NAME: {"inputs": [...],
# "layer": the layer to export}}.
KERAS2_MODELS = r"""
import json, os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
import tf_keras
from tf_keras.layers import Input, Embedding, LSTM, GRU, Bidirectional, Dense, Lambda
from tf_keras.models import Model

out = sys.argv[1]
tf_keras.utils.set_random_seed(0)
info = {}

def save(name, model, layer):
    model.save(os.path.join(out, name + ".h5"))
    info[name] = {"inputs": [t.name.split(":")[0] for t in model.inputs], "layer": layer.name}

inputs = Input(shape=(300,))
lstm = LSTM(128)
vector = lstm(Embedding(4000, 300)(inputs))
save("tutorial_single_input", Model(inputs, Dense(1, activation="sigmoid")(vector)), lstm)

content, title = Input(shape=(300,)), Input(shape=(20,))
shared = Embedding(4000, 300)
add = Lambda(lambda x: x[0] + x[1])
added = add([LSTM(128)(shared(content)), LSTM(128)(shared(title))])
save("tutorial_two_inputs_lambda", Model([content, title], Dense(1, activation="sigmoid")(added)), add)

for name, recurrent, mask in (
    ("masked_lstm", LSTM(128), True),
    ("gru", GRU(128), False),
    ("bilstm", Bidirectional(LSTM(128)), False),
    ("masked_bilstm", Bidirectional(LSTM(128)), True),
):
    inputs = Input(shape=(300,))
    vector = recurrent(Embedding(4000, 300, mask_zero=mask)(inputs))
    save(name, Model(inputs, Dense(1, activation="sigmoid")(vector)), recurrent)

with open(os.path.join(out, "info.json"), "w") as handle:
    json.dump(info, handle)
"""
FIELDS = ("content", "title")


def build_keras2_models(directory):
    """Writes the Keras 2 models; returns {name: export flags choosing it and its layer}."""
    subprocess.run([sys.executable, "-c", KERAS2_MODELS, directory], check=True, cwd=ROOT)
    with open(os.path.join(directory, "info.json"), encoding="utf-8") as handle:
        info = json.load(handle)
    flags = {}
    for name, entry in info.items():
        flags[name] = [
            "--model",
            os.path.join(directory, f"{name}.h5"),
            "--tokenizer",
            TOKENIZER,
            f"--layer={entry['layer']}",
            *[f"--input_map={i}={field}" for i, field in zip(entry["inputs"], FIELDS, strict=False)],
        ]
        if "lambda" in name:
            flags[name].append("--allow_unsafe_deserialization")
    return flags


def write_corpus(path, count):
    """Writes `count` documents cycling through the sample corpus, with fresh ids."""
    with open(SAMPLE, encoding="utf-8") as handle:
        documents = [json.loads(line) for line in handle]
    with open(path, "w", encoding="utf-8") as handle:
        for index in range(count):
            document = dict(documents[index % len(documents)], id=f"doc-{index}")
            handle.write(json.dumps(document, ensure_ascii=False) + "\n")
    return path


def _timed(function):
    started = time.perf_counter()
    result = function()
    return time.perf_counter() - started, result


def _marginal(small_seconds, large_seconds, small_count, large_count):
    extra = large_seconds - small_seconds
    return (large_count - small_count) / extra if extra > 0 else float("nan")


def run_pipeline(corpus, output, extra_flags):
    """Runs `python -m pipeline.run` as a child.

    Returns:
        (seconds, peak RSS MiB, output bytes, pipeline seconds): wall time of the
        whole command, and the run time the manifest records to the millisecond
        (from pipeline start to finish, without the imports and launch-time
        validation).
    """
    command = [sys.executable, "-m", "pipeline.run", "--input", corpus, "--output", output, *extra_flags]
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    stdout = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    if status != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{stdout.decode(errors='replace')[-3000:]}")
    # Every Parquet file the export wrote: rows, dead letters and the tables of --token_storage ids.
    size = sum(
        os.path.getsize(os.path.join(root, name))
        for root, _, names in os.walk(output)
        for name in names
        if name.endswith(".parquet")
    )
    with open(os.path.join(output, "_MANIFEST.json"), encoding="utf-8") as handle:
        run_seconds = json.load(handle)["seconds"]
    return seconds, usage.ru_maxrss / 1024, size, run_seconds


def inference_rates(documents_small, documents_large, batch_size, model_flags):
    """Marginal docs/s of Keras predict, our traced forward pass and the fast path.

    `model_flags` are the export flags choosing the model (--model, --tokenizer,
    --layer, --input_map, ...).
    """
    import keras

    from pipeline.inference.embedder import Embedder
    from pipeline.planning.build import build_plan
    from pipeline.planning.options import ExportOptions

    with tempfile.TemporaryDirectory() as scratch:
        corpus = write_corpus(os.path.join(scratch, "c.jsonl"), documents_large)
        flags = ["--input", corpus, "--output", os.path.join(scratch, "o"), *model_flags]
        plan, model_source = build_plan(ExportOptions(flags))
    embedder = Embedder(plan, model_source)
    with open(SAMPLE, encoding="utf-8") as handle:
        texts = [json.loads(line) for line in handle]
    texts = [texts[i % len(texts)] for i in range(documents_large)]
    features = {
        info.name: embedder.tokenizer.encode_batch([t[info.field] for t in texts], info.length)[0]
        for info in plan.inputs
    }
    # What a user feeds `predict`: the model's own input dtype (float32 for Keras 2's Input(shape=(n,))).
    reference_features = {t.name: features[t.name].astype(str(t.dtype)) for t in embedder.sub_model.inputs}
    reference_model = keras.Model(embedder.sub_model.inputs, embedder.sub_model.outputs)

    def batched(function, count):
        outputs = []
        for start in range(0, count, batch_size):
            outputs.append(function({k: v[start : start + batch_size] for k, v in features.items()}))
        return outputs

    def reference(count):
        return reference_model.predict(
            {k: v[:count] for k, v in reference_features.items()}, batch_size=batch_size, verbose=0
        )

    fast = embedder.predictor.fast_path
    rates = {}
    reference(batch_size)  # warm-up: builds predict's function
    batched(embedder.keras_predict, batch_size)
    small_ref, _ = _timed(lambda: reference(documents_small))
    large_ref, expected = _timed(lambda: reference(documents_large))
    rates["reference_predict"] = _marginal(small_ref, large_ref, documents_small, documents_large)
    small, _ = _timed(lambda: batched(embedder.keras_predict, documents_small))
    large, _ = _timed(lambda: batched(embedder.keras_predict, documents_large))
    rates["inference_generic"] = _marginal(small, large, documents_small, documents_large)
    worst = None
    if fast is not None:
        batched(fast, batch_size)
        small, _ = _timed(lambda: batched(fast, documents_small))
        large, outputs = _timed(lambda: batched(fast, documents_large))
        rates["inference_fast"] = _marginal(small, large, documents_small, documents_large)
        expected = expected if isinstance(expected, list) else [expected]
        got = np.concatenate([o[plan.columns[0].column] for o in outputs])
        worst = float(np.abs(got - np.asarray(expected[0])).max())
    passes = {column: (p.engine, p.reason) for column, p in embedder.forward_passes.items()}
    return rates, worst, passes


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--documents", type=int, default=4096, help="N; the large runs use 3N (default %(default)s)."
    )
    parser.add_argument("--batch_size", type=int, default=512, help="batch size for every contender.")
    parser.add_argument(
        "--json",
        default=os.path.join(ROOT, "benchmarks", "results", "export.json"),
        help="where to write results.",
    )
    parser.add_argument(
        "--contenders",
        default="all",
        choices=("all", "token_storage", "keras2", "arrow_rows"),
        help="all; only the per-token emb storages (vectors float32/float16, ids); "
        "only the Keras 2 models' inference against their own predict (--models); "
        "or only Arrow rows built per batch against per document.",
    )
    parser.add_argument(
        "--models",
        nargs="*",
        default=None,
        help="Keras 2 models to measure (default: all): tutorial_single_input, "
        "tutorial_two_inputs_lambda, masked_lstm, gru, bilstm, masked_bilstm.",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    small, large = args.documents, 3 * args.documents
    results = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "documents": [small, large],
        "batch_size": args.batch_size,
    }

    if args.contenders == "arrow_rows":
        results["arrow_rows"] = {
            name: arrow_row_rates(large, args.batch_size, flags)
            for name, flags in (
                ("lstm_content", ["--layer", "lstm_content"]),
                ("emb_per_token", ["--layer", "emb", "--pooling", "none"]),
            )
        }
        for name, row in results["arrow_rows"].items():
            print(
                f"{name}: rows built per batch {row['per_batch_docs_per_s']:.0f} docs/s, per document "
                f"{row['per_document_docs_per_s']:.0f} docs/s: {row['batch_over_document']:.1f}x"
            )
        return

    rates, worst = {}, None
    if args.contenders == "all":
        rates, worst, _ = inference_rates(
            small, large, args.batch_size, [f"--layer={x}" for x in LSTM_LAYERS]
        )
    results["inference_docs_per_s"] = rates
    results["fast_path_max_abs_diff"] = worst

    keras2_flags, keras2_rows = {}, {}
    if args.contenders in ("all", "keras2"):
        keras2_flags = build_keras2_models(tempfile.mkdtemp(prefix="keras2-models-"))
    for name, flags in keras2_flags.items():
        if args.models and name not in args.models:
            continue
        model_rates, model_worst, passes = inference_rates(small, large, args.batch_size, flags)
        keras2_rows[name] = {
            "inference_docs_per_s": model_rates,
            "fast_over_predict": model_rates.get("inference_fast", float("nan"))
            / model_rates["reference_predict"],
            "max_abs_diff": model_worst,
            "forward_passes": passes,
        }
    results["keras2_models"] = keras2_rows

    pipeline_rows = {}
    with tempfile.TemporaryDirectory() as scratch:
        corpora = {n: write_corpus(os.path.join(scratch, f"corpus-{n}.jsonl"), n) for n in (small, large)}
        tutorial = keras2_flags.get("tutorial_single_input")
        variants = {
            "pipeline_generic": ["--layer", "lstm_content", "--fast_path", "off"],
            "pipeline_fast": ["--layer", "lstm_content"],
            **(
                {
                    "pipeline_tutorial_h5_generic": [*tutorial, "--fast_path", "off"],
                    "pipeline_tutorial_h5_fast": tutorial,
                }
                if tutorial
                else {}
            ),
            "pipeline_emb_tokens_f32": ["--layer", "emb", "--pooling", "none"],
            "pipeline_emb_tokens_f16": ["--layer", "emb", "--pooling", "none", "--dtype", "float16"],
            "pipeline_emb_tokens_ids": ["--layer", "emb", "--pooling", "none", "--token_storage", "ids"],
        }
        if args.contenders == "token_storage":
            variants = {name: flags for name, flags in variants.items() if name.startswith("pipeline_emb")}
        if args.contenders == "keras2":
            variants = {}
        for name, flags in variants.items():
            runs = {}
            for n in (small, large):
                output = os.path.join(scratch, f"{name}-{n}")
                runs[n] = run_pipeline(corpora[n], output, [*flags, "--batch_size", str(args.batch_size)])
            # The summary's run time leaves out the imports, whose jitter would swamp
            # the difference between two runs on a shared machine.
            extra_seconds = runs[large][3] - runs[small][3]
            pipeline_rows[name] = {
                "seconds": {str(n): round(runs[n][0], 2) for n in runs},
                "run_seconds": {str(n): runs[n][3] for n in runs},
                "marginal_docs_per_s": _marginal(runs[small][3], runs[large][3], small, large),
                "peak_rss_mib": {str(n): round(runs[n][1], 1) for n in runs},
                "rss_ratio_3x": runs[large][1] / runs[small][1],
                "output_mib": {str(n): round(runs[n][2] / 2**20, 2) for n in runs},
                # What one more document adds (a table written once cancels out), and all bytes / documents.
                "marginal_bytes_per_doc": (runs[large][2] - runs[small][2]) / (large - small),
                "bytes_per_doc": {str(n): runs[n][2] / n for n in runs},
                "marginal_mib_per_s": (runs[large][2] - runs[small][2]) / 2**20 / extra_seconds
                if extra_seconds > 0
                else float("nan"),
            }
        # After all runs: a child's peak RSS includes this process's at the time it was started.
        for name, row in pipeline_rows.items():
            if name.startswith("pipeline_emb"):
                row["parquet_encoder_mib_per_s"] = parquet_encoder_rate(
                    os.path.join(scratch, f"{name}-{large}")
                )
    results["pipeline"] = pipeline_rows
    if rates:
        reference = rates["reference_predict"]
        tutorial_reference = keras2_rows.get("tutorial_single_input", {}).get("inference_docs_per_s", {})
        results["ratios_to_reference"] = {
            "inference_generic": rates["inference_generic"] / reference,
            "inference_fast": rates.get("inference_fast", float("nan")) / reference,
            **{
                name: row["marginal_docs_per_s"]
                / (
                    tutorial_reference.get("reference_predict", float("nan"))
                    if "tutorial_h5" in name
                    else reference
                )
                for name, row in pipeline_rows.items()
            },
        }
    results["token_storage"] = token_storage_ratios(pipeline_rows, large)
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2)
    print(format_table(results))
    print(f"\nJSON: {args.json}")


def arrow_row_rates(count, batch_size, flags):
    """Docs/s of building the output rows of real forward-pass outputs per batch and per document."""
    from pipeline.inference.embedder import Embedded, Embedder
    from pipeline.inference.features import DocumentTokenizer
    from pipeline.planning.build import build_plan
    from pipeline.planning.options import ExportOptions
    from pipeline.reading.documents import Document

    with tempfile.TemporaryDirectory() as scratch:
        corpus = write_corpus(os.path.join(scratch, "c.jsonl"), 1)
        plan, model_source = build_plan(
            ExportOptions(["--input", corpus, "--output", os.path.join(scratch, "o"), *flags])
        )
    with open(SAMPLE, encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle]
    tokenizer = DocumentTokenizer(plan, model_source.tokenizer)
    tokenized = [
        tokenizer.tokenize(
            Document(f"doc-{i}", tuple(records[i % len(records)][f.field] for f in plan.inputs), (), "c", i)
        )
        for i in range(count)
    ]
    tokenized = [t for t in tokenized if hasattr(t, "features")]
    embedder = Embedder(plan, model_source)
    batches = [embedder.run(tokenized[i : i + batch_size]) for i in range(0, len(tokenized), batch_size)]

    def one_row(values, row):
        return {name: value[row : row + 1] for name, value in values.items()}

    # Each document of a batch as an `Embedded` batch of its own.
    singles = [
        Embedded(
            [b.documents[row]],
            one_row(b.features, row),
            one_row(b.masks, row),
            one_row(b.outputs, row),
            [],
            0,
        )
        for b in batches
        for row in range(len(b.documents))
    ]

    def per_batch():
        return [embedder.batch_rows(b) for b in batches]

    def per_document():
        return [embedder.batch_rows(single) for single in singles]

    documents = sum(len(b.documents) for b in batches)
    # Alternating, best of three each, so that neither way pays alone for a cold cache.
    times = {per_batch: [], per_document: []}
    for _ in range(3):
        for way in times:
            times[way].append(_timed(way)[0])
    per_batch, per_document = min(times[per_batch]), min(times[per_document])
    return {
        "documents": documents,
        "per_batch_docs_per_s": documents / per_batch,
        "per_document_docs_per_s": documents / per_document,
        "batch_over_document": per_document / per_batch,
    }


def parquet_encoder_rate(directory):
    """MiB/s at which pyarrow alone re-encodes the dataset the pipeline wrote (same codec)."""
    import pyarrow.parquet as pq

    path = next(os.path.join(directory, n) for n in sorted(os.listdir(directory)) if n.endswith(".parquet"))
    table = pq.read_table(path)
    codec = pq.ParquetFile(path).metadata.row_group(0).column(0).compression.lower()
    target = path + ".rewrite"
    seconds, _ = _timed(lambda: pq.write_table(table, target, compression=codec))
    size = os.path.getsize(target)
    os.remove(target)
    return size / 2**20 / seconds


def token_storage_ratios(pipeline_rows, large):
    """Per-token emb as ids against float32 vectors, measured in this run: how much smaller and faster."""
    vectors, ids = pipeline_rows.get("pipeline_emb_tokens_f32"), pipeline_rows.get("pipeline_emb_tokens_ids")
    if not vectors or not ids:
        return {}
    return {
        "smaller_marginal": vectors["marginal_bytes_per_doc"] / ids["marginal_bytes_per_doc"],
        "smaller_total_3n": vectors["output_mib"][str(large)] / ids["output_mib"][str(large)],
        "faster_marginal": ids["marginal_docs_per_s"] / vectors["marginal_docs_per_s"],
        "faster_end_to_end_3n": vectors["seconds"][str(large)] / ids["seconds"][str(large)],
    }


def format_table(results):
    reference = results["inference_docs_per_s"].get("reference_predict")
    lines = [
        f"documents N={results['documents'][0]} and 3N={results['documents'][1]}, "
        f"batch {results['batch_size']}, "
        f"{results['machine']['cpus']} CPUs",
        "",
        f"{'contender':<28}{'marginal docs/s':>16}{'x reference':>13}{'peak RSS MiB (N/3N)':>22}{'MiB/s':>9}"
        f"{'B/doc':>9}{'MiB at 3N':>11}{'s at 3N':>9}",
    ]
    if reference:
        lines.append(f"{'keras predict (reference)':<28}{reference:>16.0f}{1.0:>13.2f}")
    for name, value in results["inference_docs_per_s"].items():
        if name != "reference_predict":
            lines.append(f"{name:<28}{value:>16.0f}{value / reference:>13.2f}")
    large = str(results["documents"][1])
    for name, row in results["pipeline"].items():
        rss = "/".join(f"{v:.0f}" for v in row["peak_rss_mib"].values())
        ratio = f"{row['marginal_docs_per_s'] / reference:.2f}" if reference else "-"
        lines.append(
            f"{name:<28}{row['marginal_docs_per_s']:>16.0f}{ratio:>13}"
            f"{rss:>22}{row['marginal_mib_per_s']:>9.1f}{row['marginal_bytes_per_doc']:>9.0f}"
            f"{row['output_mib'][large]:>11.1f}{row['seconds'][large]:>9.1f}"
        )
    for name, row in results["pipeline"].items():
        if "parquet_encoder_mib_per_s" in row:
            lines.append(
                f"  {name}: pyarrow alone encodes the same table at "
                f"{row['parquet_encoder_mib_per_s']:.0f} MiB/s"
            )
    ratios = results.get("token_storage")
    if ratios:
        lines.append(
            f"emb per token, ids vs float32 vectors: {ratios['smaller_marginal']:.0f}x smaller per document "
            f"({ratios['smaller_total_3n']:.0f}x with the table, at 3N), {ratios['faster_marginal']:.1f}x "
            f"faster marginal, {ratios['faster_end_to_end_3n']:.1f}x faster end to end at 3N"
        )
    if results["fast_path_max_abs_diff"] is not None:
        lines.append(f"fast path max |diff| vs predict: {results['fast_path_max_abs_diff']}")
    ratios = results.get("ratios_to_reference", {})
    for name in ("pipeline_tutorial_h5_generic", "pipeline_tutorial_h5_fast"):
        if name in ratios:
            lines.append(f"{name}: {ratios[name]:.2f} x the tutorial model's own predict")
    if results.get("keras2_models"):
        lines += [
            "",
            "Keras 2 .h5 models (float32 inputs), inference alone, side by side with their own predict:",
            f"{'model':<28}{'predict docs/s':>16}{'fast docs/s':>13}{'x predict':>11}{'max |diff|':>12}"
            "  forward pass",
        ]
    for name, row in results.get("keras2_models", {}).items():
        rates = row["inference_docs_per_s"]
        engines = ", ".join(sorted({engine for engine, _ in row["forward_passes"].values()}))
        lines.append(
            f"{name:<28}{rates['reference_predict']:>16.0f}{rates.get('inference_fast', float('nan')):>13.0f}"
            f"{row['fast_over_predict']:>11.2f}{row['max_abs_diff'] or float('nan'):>12.2g}  {engines}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
