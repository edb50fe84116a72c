"""Trains one of the tutorial topologies on a JSONL corpus and writes a model bundle.

    python -m models.train --topology two_inputs_two_outputs --output my_bundle

An existing bundle is replaced only with --overwrite, and then as a whole (the
shipped one: `--output models/data/default_bundle --overwrite`).

Documents are split into training and held-out sets by a hash of their id, so
the split is the same on every run.  At the end it prints held-out accuracy per
output next to the majority-class baseline.
"""

from __future__ import annotations

from models import stopping

# Before the imports below, which take seconds (Keras): a Ctrl-C during them is one line too.
if __name__ == "__main__":
    stopping.stop_at_once("python -m models.train")
    from models.start_lines import import_tensorflow_quietly

    import_tensorflow_quietly()

import argparse
import hashlib
import json
import os
import sys
import typing
from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf

from models import architectures, swap
from models.bundle import BundleError, LabelInfo, Manifest, check_replaceable, save_bundle
from models.command_line import CommandParser
from models.paths import SAMPLE_CORPUS, removed_working_directory, unexpanded_home
from models.tokenizer import Tokenizer

# A flag, the corpus or the output cannot work (as pipeline.errors.EXIT_CONFIG_ERROR; models/ knows no Beam).
EXIT_CONFIG_ERROR = 2
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
    """Reads a JSONL file into a list of dicts.

    Raises:
        ValueError: a line is not a JSON object, or the file is not UTF-8; naming the file and line.
    """
    documents: list[Record] = []
    # A pipe (`--corpus <(zcat corpus.jsonl.gz)`) is read as a file.
    if os.path.isdir(path) or not os.path.exists(path):
        what = "is a directory" if os.path.isdir(path) else "does not exist"
        raise ValueError(f"--corpus {path!r} {what}; give it a JSONL file, one JSON object a line.")
    # utf-8-sig: a byte-order mark at the start is dropped, as the export's corpus reader drops it.
    with open(path, encoding="utf-8-sig") as handle:
        try:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    document = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(
                        f"--corpus {path} line {number} is not JSON ({error}): the corpus must be JSONL, "
                        "one JSON object a line."
                    ) from None
                if not isinstance(document, dict):
                    raise ValueError(
                        f"--corpus {path} line {number} is JSON but not an object ({line.strip()[:40]}): "
                        "the corpus must be JSONL, one JSON object a line."
                    )
                documents.append(document)
        except UnicodeDecodeError as error:
            raise ValueError(f"--corpus {path} is not UTF-8 text ({error}); save it as UTF-8.") from None
    if not documents:
        raise ValueError(
            f"--corpus {path!r} holds no documents; give it a JSONL file, one JSON object a line."
        )
    return documents


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


def check_output(output: str, overwrite: bool) -> None:
    """Refuses an --output that holds anything but an earlier bundle, and that one without --overwrite.

    Raises:
        BundleError: saying what is there and what to do.
    """
    for done in swap.repair(output):
        print(f"note: {done}", file=sys.stderr)
    check_replaceable(output)
    if os.path.isdir(output) and os.listdir(output) and not overwrite:
        raise BundleError(
            f"--output {output!r} already holds a bundle; pass --overwrite to replace it (as a whole), "
            "or choose another --output."
        )


def train(args: argparse.Namespace) -> Manifest:
    """Trains per `args` (see `parse_args`) and writes the bundle; returns the manifest.

    Raises:
        ValueError: a flag, the corpus or the output cannot work (BundleError for the output).
    """
    if not 0 < args.holdout < 1:
        raise ValueError(
            f"--holdout must be a fraction between 0 and 1 (exclusive), received {args.holdout}: "
            "training needs documents, and the accuracy report held-out ones."
        )
    check_output(args.output, args.overwrite)
    keras.utils.set_random_seed(args.seed)
    documents = read_jsonl(args.corpus)
    fields = (args.id_field, args.content_field, args.title_field, args.binary_label, args.class_label)
    for field in fields:
        missing = sum(1 for document in documents if field not in document)
        if missing:
            raise ValueError(f"{missing} documents of {args.corpus} have no field {field!r}.")
    for flag, field in (("--content_field", args.content_field), ("--title_field", args.title_field)):
        # The tokenizer reads text: a null, a number or a list was a TypeError traceback.
        not_text = [document for document in documents if not isinstance(document[field], str)]
        if not_text:
            raise ValueError(
                f"{len(not_text)} documents of {args.corpus} hold no text in {flag} {field!r} (the first, "
                f"id {not_text[0].get(args.id_field)!r}, holds {json.dumps(not_text[0][field])[:40]}); "
                "give each document a string there, or drop those documents."
            )
    binary_classes = _labels(documents, args.binary_label)
    if len(binary_classes) != 2:
        raise ValueError(f"--binary_label {args.binary_label!r} must have 2 values; it has {binary_classes}.")
    title_classes = _labels(documents, args.class_label)
    train_docs = [d for d in documents if not is_held_out(d[args.id_field], args.holdout)]
    test_docs = [d for d in documents if is_held_out(d[args.id_field], args.holdout)]
    if not train_docs or not test_docs:
        raise ValueError(
            f"--holdout {args.holdout} splits the {len(documents)} documents of {args.corpus} into "
            f"{len(train_docs)} for training and {len(test_docs)} held out; both need at least one. "
            "Choose a fraction nearer 0.2, or a larger corpus."
        )

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
    check_output(args.output, args.overwrite)  # again: something may have appeared while it trained
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


# Each integer flag's valid range, inclusive: beyond it a value overflows a C long (a traceback)
# or asks for more memory than any machine has. The model's sizes stay within what fits;
# the ones that fit alone but not together are caught when the model is built (`main`).
INTEGER_FLAGS: dict[str, tuple[int, int]] = {
    # Ids 0 and 1 are padding and out-of-vocabulary: a vocabulary needs one token more.
    "vocabulary_size": (3, 1_000_000),
    "embedding_dim": (1, 100_000),
    "lstm_units": (1, 100_000),
    "content_length": (1, 100_000),
    "title_length": (1, 100_000),
    "epochs": (1, 100_000),
    "batch_size": (1, 100_000),
    # numpy's seed, which Keras sets too, is a 32-bit unsigned integer.
    "seed": (0, 2**32 - 1),
}


def _integer_in(flag: str) -> typing.Callable[[str], int]:
    """argparse type: an integer in `INTEGER_FLAGS[flag]`'s range."""
    low, high = INTEGER_FLAGS[flag]

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, received {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(
                f"must be an integer from {low:,} to {high:,}, received {value:,}"
            )
        return value

    return parse


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The training flags (`--help` lists them)."""
    parser = CommandParser(prog="python -m models.train", description=(__doc__ or "").split("\n")[0])
    parser.add_argument(
        "--topology",
        choices=architectures.TOPOLOGIES,
        default="two_inputs_two_outputs",
        help="which tutorial model to build (default: %(default)s).",
    )
    parser.add_argument(
        "--corpus", default=SAMPLE_CORPUS, help="JSONL corpus (default: the bundled sample corpus)."
    )
    parser.add_argument(
        "--output",
        required=True,
        help="bundle directory to write: new or empty, or an earlier bundle with --overwrite.",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the bundle already at --output, as a whole (never a directory of other files).",
    )
    parser.add_argument(
        "--id_field", default="id", help="field used for the train/held-out split (default: %(default)s)."
    )
    parser.add_argument(
        "--content_field", default="content", help="field read by the `content` input (default: %(default)s)."
    )
    parser.add_argument(
        "--title_field", default="title", help="field read by the `title` input (default: %(default)s)."
    )
    parser.add_argument(
        "--binary_label",
        default="kind",
        help="two-valued label field (out_content / output) (default: %(default)s).",
    )
    parser.add_argument(
        "--class_label", default="topic", help="multi-class label field (out_title) (default: %(default)s)."
    )
    parser.add_argument(
        "--vocabulary_size",
        type=_integer_in("vocabulary_size"),
        default=4000,
        help="embedding rows, ids 0 and 1 included (default: %(default)s).",
    )
    parser.add_argument(
        "--embedding_dim",
        type=_integer_in("embedding_dim"),
        default=300,
        help="values per embedding vector (default: %(default)s).",
    )
    parser.add_argument(
        "--lstm_units",
        type=_integer_in("lstm_units"),
        default=128,
        help="units of each LSTM (default: %(default)s).",
    )
    parser.add_argument(
        "--content_length",
        type=_integer_in("content_length"),
        default=300,
        help="token ids per content input (default: %(default)s).",
    )
    parser.add_argument(
        "--title_length",
        type=_integer_in("title_length"),
        default=20,
        help="token ids per title input (default: %(default)s).",
    )
    parser.add_argument(
        "--epochs",
        type=_integer_in("epochs"),
        default=10,
        help="passes over the training set (default: %(default)s).",
    )
    parser.add_argument(
        "--batch_size",
        type=_integer_in("batch_size"),
        default=64,
        help="documents per training step (default: %(default)s).",
    )
    parser.add_argument(
        "--holdout",
        type=float,
        default=0.2,
        help="fraction of documents held out, between 0 and 1 (default: %(default)s).",
    )
    parser.add_argument(
        "--seed",
        type=_integer_in("seed"),
        default=1337,
        help="seed of the weights and the shuffling (default: %(default)s).",
    )
    return parser.parse_args(argv)


def _empty_flag(paths: dict[str, str]) -> str | None:
    """Why the first of `paths` (flag -> value) given empty or blank cannot be used, else None.

    An unset shell variable (`--output "$BUNDLE"`): os.path.abspath("") is the working
    directory, which the bundle's swap would have replaced after the whole training.
    """
    for flag, value in paths.items():
        if not value.strip():
            what = "a new bundle directory" if flag == "--output" else "a JSONL file, or leave the flag out"
            return f"{flag} is empty (an unset shell variable?); give it {what}."
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m models.train`: trains and writes the bundle; returns the exit status.

    A flag, corpus or output that cannot work is one `error:` line and status 2.
    """
    args = parse_args(argv)
    refused = (
        removed_working_directory()
        or _empty_flag({"--output": args.output, "--corpus": args.corpus})
        or unexpanded_home({"--corpus": args.corpus, "--output": args.output})
    )
    if refused:
        print(f"error: {refused}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    try:
        train(args)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except (tf.errors.ResourceExhaustedError, MemoryError):
        # Sizes within their ranges alone can still multiply past this machine's memory.
        print(
            f"error: the model does not fit in memory (--vocabulary_size {args.vocabulary_size:,} x "
            f"--embedding_dim {args.embedding_dim:,}, --lstm_units {args.lstm_units:,}, --batch_size "
            f"{args.batch_size:,}, --content_length {args.content_length:,}); lower them.",
            file=sys.stderr,
        )
        return EXIT_CONFIG_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(stopping.run("python -m models.train", main))
