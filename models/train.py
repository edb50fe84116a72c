"""Trains one of the tutorial topologies on a JSONL corpus and writes a model bundle.

    python -m models.train --topology two_inputs_two_outputs --output models/data/default_bundle

Documents are split into training and held-out sets by a hash of their id, so
the split is the same on every run.  At the end it prints held-out accuracy per
output next to the majority-class baseline.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import typing
from collections.abc import Sequence

import keras
import numpy as np

from models import architectures
from models.bundle import LabelInfo, Manifest, save_bundle
from models.paths import DEFAULT_BUNDLE, SAMPLE_CORPUS
from models.tokenizer import Tokenizer

# A corpus record as JSON decodes it.
Record = dict[str, typing.Any]

DEFAULT_LAYERS = {
    "single_input": [architectures.LSTM_CONTENT, architectures.EMBEDDING],
    "two_inputs_one_output": [
        architectures.LSTM_CONTENT,
        architectures.LSTM_TITLE,
        architectures.ADD,
        architectures.EMBEDDING,
    ],
    "two_inputs_two_outputs": [
        architectures.LSTM_CONTENT,
        architectures.LSTM_TITLE,
        architectures.EMBEDDING,
    ],
}


def read_jsonl(path: str) -> list[Record]:
    """Reads a JSONL file into a list of dicts."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def is_held_out(document_id: object, fraction: float) -> bool:
    """Deterministic split: a document is held out if its id hashes below `fraction`."""
    digest = hashlib.sha256(str(document_id).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def _labels(documents: Sequence[Record], field: str) -> list[str]:
    values = [document[field] for document in documents]
    return sorted({str(value) for value in values})


def _targets(documents: Sequence[Record], field: str, classes: Sequence[str], one_hot: bool) -> np.ndarray:
    index = {name: position for position, name in enumerate(classes)}
    ids = np.array([index[str(document[field])] for document in documents])
    if one_hot:
        return keras.utils.to_categorical(ids, num_classes=len(classes)).astype("float32")
    return ids.astype("float32").reshape(-1, 1)


def train(args: argparse.Namespace) -> Manifest:
    """Trains per `args` (see `parse_args`) and writes the bundle; returns the manifest."""
    keras.utils.set_random_seed(args.seed)
    documents = read_jsonl(args.corpus)
    for field in (args.content_field, args.title_field, args.binary_label, args.class_label):
        missing = sum(1 for document in documents if field not in document)
        if missing:
            raise ValueError(f"{missing} documents of {args.corpus} have no field {field!r}.")
    binary_classes = _labels(documents, args.binary_label)
    if len(binary_classes) != 2:
        raise ValueError(f"--binary_label {args.binary_label!r} must have 2 values; it has {binary_classes}.")
    title_classes = _labels(documents, args.class_label)
    train_docs = [d for d in documents if not is_held_out(d[args.id_field], args.holdout)]
    test_docs = [d for d in documents if is_held_out(d[args.id_field], args.holdout)]

    tokenizer = Tokenizer.fit(
        (d[args.content_field] + " " + d[args.title_field] for d in train_docs), args.vocabulary_size
    )
    sizes = dict(
        vocabulary_size=args.vocabulary_size,
        embedding_dim=args.embedding_dim,
        lstm_units=args.lstm_units,
        content_length=args.content_length,
        title_length=args.title_length,
        num_title_classes=len(title_classes),
    )
    model = architectures.compile_model(architectures.build_model(args.topology, **sizes))
    input_fields = {architectures.CONTENT: args.content_field}
    if args.topology != "single_input":
        input_fields[architectures.TITLE] = args.title_field

    def features(docs: Sequence[Record]) -> dict[str, np.ndarray]:
        lengths = {architectures.CONTENT: args.content_length, architectures.TITLE: args.title_length}
        return {
            name: tokenizer.encode_batch([d[field] for d in docs], lengths[name])[0]
            for name, field in input_fields.items()
        }

    def targets(docs: Sequence[Record]) -> np.ndarray | dict[str, np.ndarray]:
        binary = _targets(docs, args.binary_label, binary_classes, one_hot=False)
        if args.topology != "two_inputs_two_outputs":
            return binary
        return {
            architectures.OUT_CONTENT: binary,
            architectures.OUT_TITLE: _targets(docs, args.class_label, title_classes, one_hot=True),
        }

    print(f"Training {args.topology} on {len(train_docs)} documents, holding out {len(test_docs)}.")
    model.fit(
        features(train_docs),
        targets(train_docs),
        epochs=args.epochs,
        batch_size=args.batch_size,
        verbose=1 if sys.stdout.isatty() else 2,
    )
    predictions = model.predict(features(test_docs), batch_size=256, verbose=0)
    if not isinstance(predictions, dict):
        predictions = {architectures.OUTPUT: predictions}
    metrics: dict[str, dict[str, float]] = {}
    labels: dict[str, LabelInfo] = {}
    for output, prediction in predictions.items():
        if output == architectures.OUT_TITLE:
            field, classes = args.class_label, title_classes
            predicted = prediction.argmax(axis=1)
        else:
            field, classes = args.binary_label, binary_classes
            predicted = (prediction[:, 0] > 0.5).astype(int)
        truth = np.array([classes.index(str(d[field])) for d in test_docs])
        majority = np.bincount(truth, minlength=len(classes)).max() / len(truth)
        metrics[output] = {
            "held_out_accuracy": round(float((predicted == truth).mean()), 4),
            "majority_baseline": round(float(majority), 4),
            "held_out_documents": len(test_docs),
        }
        labels[output] = {"field": field, "classes": classes}
    # The bundle is for inference: an uncompiled twin carries the weights without
    # the optimizer's state, which would triple the file's size.
    inference_model = architectures.build_model(args.topology, **sizes)
    inference_model.set_weights(model.get_weights())
    manifest = save_bundle(
        args.output,
        inference_model,
        tokenizer,
        input_fields,
        labels=labels,
        metrics=metrics,
        extra={
            "topology": args.topology,
            "sizes": sizes,
            # What `python -m pipeline.run` exports when given no --layer.
            "default_layers": DEFAULT_LAYERS[args.topology],
            "training": {
                "corpus": os.path.basename(args.corpus),
                "documents": len(train_docs),
                "epochs": args.epochs,
                "batch_size": args.batch_size,
                "seed": args.seed,
            },
        },
    )
    print(f"\nBundle written to {args.output}")
    print(f"{'output':<14}{'held-out accuracy':>20}{'majority baseline':>20}")
    for output, values in metrics.items():
        print(f"{output:<14}{values['held_out_accuracy']:>20.4f}{values['majority_baseline']:>20.4f}")
    return manifest


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The training flags (`--help` lists them)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--topology", choices=architectures.TOPOLOGIES, default="two_inputs_two_outputs")
    parser.add_argument(
        "--corpus", default=SAMPLE_CORPUS, help="JSONL corpus (default: the bundled sample corpus)."
    )
    parser.add_argument(
        "--output", default=DEFAULT_BUNDLE, help="bundle directory to write (default: %(default)s)."
    )
    parser.add_argument("--id_field", default="id", help="field used for the train/held-out split.")
    parser.add_argument("--content_field", default="content", help="field read by the `content` input.")
    parser.add_argument("--title_field", default="title", help="field read by the `title` input.")
    parser.add_argument(
        "--binary_label", default="kind", help="two-valued label field (out_content / output)."
    )
    parser.add_argument("--class_label", default="topic", help="multi-class label field (out_title).")
    parser.add_argument(
        "--vocabulary_size", type=int, default=4000, help="embedding rows, ids 0 and 1 included."
    )
    parser.add_argument("--embedding_dim", type=int, default=300)
    parser.add_argument("--lstm_units", type=int, default=128)
    parser.add_argument("--content_length", type=int, default=300, help="token ids per content input.")
    parser.add_argument("--title_length", type=int, default=20, help="token ids per title input.")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--holdout", type=float, default=0.2, help="fraction of documents held out.")
    parser.add_argument("--seed", type=int, default=1337)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m models.train`: trains and writes the bundle."""
    train(parse_args(argv))


if __name__ == "__main__":
    main()
