"""What exact vectors cost a string model whose TextVectorization has no output_sequence_length.

    python -m benchmarks.string_groups [--documents 4000] [--batch_size 256] [--length 200]

Such a vectorizer pads a batch to its longest document, so the export runs each
batch in groups of documents of one token count (`SubModel.keras_predict`) to
give each document the vectors Keras gives it alone. On `benchmarks.corpora`'s
real-length text this times, side by side in one process, the same weights
(Embedding -> LSTM, and a mean over the embeddings) as:

- `grouped`: the vectorizer without a fixed length, as the export runs it now;
- `one_pass`: the same, one forward pass per batch (the old, batch-dependent way);
- `fixed`: the vectorizer with `output_sequence_length=--length`, one pass per batch
  (the fix the docs suggest, at the cost of cutting longer documents).

It prints documents per second of each and their ratios to `grouped`, and the
largest difference of `one_pass` from `grouped` (what the old way got wrong).
"""

import argparse
import json
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=4000)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--length", type=int, default=200)
    args = parser.parse_args(argv)

    import keras
    import numpy as np

    from benchmarks.corpora import write_real_corpus
    from pipeline.inference.sub_model import SubModel
    from pipeline.planning.introspection import cut_model
    from pipeline.planning.model_source import ModelSource
    from pipeline.planning.plan import TEXT_INPUT, ColumnInfo, ExportPlan, InputInfo

    with tempfile.TemporaryDirectory() as directory:
        corpus = write_real_corpus(os.path.join(directory, "corpus.jsonl"), args.documents)
        with open(corpus, encoding="utf-8") as handle:
            texts = np.array([json.loads(line)["content"] for line in handle], dtype=object)[:, None]
    keras.utils.set_random_seed(0)
    models = {}
    for name, length in (("grouped", None), ("fixed", args.length)):
        vectorizer = keras.layers.TextVectorization(
            max_tokens=5000, output_sequence_length=length, name="vectorize"
        )
        vectorizer.adapt(texts[:1000, 0].astype(str))
        text = keras.Input(shape=(1,), dtype="string", name="text")
        embedded = keras.layers.Embedding(5000, 32, name="emb")(vectorizer(text))
        lstm = keras.layers.LSTM(32, name="lstm")(embedded)
        pooled = keras.layers.GlobalAveragePooling1D(name="pool")(embedded)
        models[name] = keras.Model(text, keras.layers.Concatenate(name="cat")([lstm, pooled]))
    models["fixed"].set_weights(models["grouped"].get_weights())

    def sub_model(model: keras.Model) -> SubModel:
        specs, _ = cut_model(model, ["lstm", "pool"])
        columns = tuple(ColumnInfo(s.column, s.layer, s.call, "vector", 32, "", "none") for s in specs)
        plan = ExportPlan(
            model_uri="model",
            tokenizer_uri="",
            model_sha256="sha",
            tokenizer_sha256="",
            layer_specs=tuple(specs),
            inputs=(InputInfo("text", "content", 0, TEXT_INPUT, 2),),
            columns=columns,
            input_pattern="",
            input_format="jsonl",
            id_field="id",
            keep_fields=(),
            output="",
            dtype="float32",
            batch_size=args.batch_size,
            compression="snappy",
            max_record_bytes=0,
            tf_threads=0,
            padding="post",
        )
        source = ModelSource("model", model, None, "sha", "", input_fields={}, default_layers=[])
        return SubModel(plan, source)

    grouped, fixed = sub_model(models["grouped"]), sub_model(models["fixed"])
    contenders = {
        "grouped": grouped.keras_predict,
        "one_pass": lambda features: {k: v.numpy() for k, v in grouped._forward(features).items()},
        "fixed": fixed.keras_predict,
    }
    batches = [texts[start : start + args.batch_size] for start in range(0, len(texts), args.batch_size)]
    results, outputs = {}, {}
    for name, predict in contenders.items():
        predict({"text": batches[0]})  # trace once, outside the timing
        started = time.perf_counter()
        parts = [predict({"text": batch}) for batch in batches]
        results[name] = len(texts) / (time.perf_counter() - started)
        outputs[name] = np.concatenate([part["lstm"] for part in parts])
    for name, rate in results.items():
        print(f"{name:<9} {rate:8.0f} docs/s  ({rate / results['grouped']:.2f}x grouped)")
    wrong = np.abs(outputs["one_pass"] - outputs["grouped"]).max()
    print(f"one_pass differs from grouped (each document as Keras gives it alone) by up to {wrong:.3g}")


if __name__ == "__main__":
    main()
