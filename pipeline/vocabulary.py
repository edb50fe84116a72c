"""Command line: `python -m pipeline.vocabulary` writes an Embedding layer's token table as Parquet.

The table is read straight from the layer's weights, so no corpus is needed.
Row `i` is token id `i`: id 0 is padding ("<pad>"), id 1 out-of-vocabulary
("<oov>"), id `i >= 2` the tokenizer's vocabulary entry `i - 2`; rows of a
table larger than the vocabulary get a null token.  The file is
`OUTPUT/vocabulary.parquet`; `python -m pipeline.analyze OUTPUT neighbors
--word WORD` queries it.
"""

from __future__ import annotations

from models import stopping

# Before the imports below (pyarrow's alone can take a second): a Ctrl-C during them is one line too.
if __name__ == "__main__":
    stopping.stop_at_once("python -m pipeline.vocabulary")

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from models import stopping
from models.command_line import CommandParser
from models.paths import removed_working_directory, unexpanded_home
from models.tokenizer import OOV_ID
from pipeline import object_storage
from pipeline.errors import EXIT_CONFIG_ERROR
from pipeline.planning.cli import add_model_flags
from pipeline.writing.layout import LOCK, MANIFEST, STAGING
from pipeline.writing.schema import VOCABULARY_FILE
from pipeline.writing.vocabulary_table import vocabulary_metadata, vocabulary_table

if TYPE_CHECKING:
    import keras

    from models.keras2_tokenizer import VocabularyTokenizer


def iterate_layers(model: keras.Model) -> Iterator[keras.layers.Layer]:
    """`model`'s layers, descending into nested models, in order."""
    for layer in model.layers:
        yield layer
        if hasattr(layer, "layers"):
            yield from iterate_layers(layer)


def embedding_layer_names(model: keras.Model) -> list[str]:
    """Names of the `keras.layers.Embedding` layers of `model`, nested ones included."""
    import keras

    return [layer.name for layer in iterate_layers(model) if isinstance(layer, keras.layers.Embedding)]


def vectorizer_vocabulary(model: keras.Model, layer_name: str) -> VocabularyTokenizer | None:
    """The vocabulary of the TextVectorization that feeds Embedding `layer_name` its ids, or None.

    Its ids are the Embedding's rows: `get_vocabulary()` names them as a
    vocabulary file of it would (line 0 padding, line 1 "[UNK]").
    """
    import keras

    from models import keras_graph
    from models.keras2_tokenizer import VocabularyTokenizer

    layer = model.get_layer(layer_name) if layer_name in {item.name for item in model.layers} else None
    if layer is None:
        return None
    for node in keras_graph.model_nodes(model, layer):
        source, _ = keras_graph.producer(keras_graph.through_casts(keras_graph.node_inputs(node)[0]))
        if (
            isinstance(source, keras.layers.TextVectorization)
            and source.get_config().get("output_mode") == "int"
        ):
            try:
                return VocabularyTokenizer(source.get_vocabulary())
            except ValueError:  # no padding token first (mask_token=None): ids are not rows named so
                return None
    return None


def embedding_table(model: keras.Model, layer_name: str) -> np.ndarray:
    """The (table size, dim) float32 weight matrix of the Embedding layer `layer_name`.

    Raises:
        ValueError: the model has no such layer, or it is not an Embedding.
    """
    import keras

    embeddings = embedding_layer_names(model)
    listed = ", ".join(repr(name) for name in embeddings) or "none"
    layers = {layer.name: layer for layer in iterate_layers(model)}
    if layer_name not in layers:
        named, _, call = layer_name.rpartition(":")
        if named in layers and call.isdigit():
            # An export's --layer emb:1 names a call; a table is the layer's, the same for each call.
            raise ValueError(
                f"--layer {layer_name} names call {call} of the layer {named!r}, but its token table "
                f"is the same for every call: pass --layer {named}."
            )
        raise ValueError(
            f"The model has no layer named {layer_name!r}. Its Embedding layers are: {listed}; "
            "pass one of them as --layer."
        )
    layer = layers[layer_name]
    if not isinstance(layer, keras.layers.Embedding):
        raise ValueError(
            f"Layer {layer_name!r} is a {type(layer).__name__}, not an Embedding, so it has no "
            f"token table. The model's Embedding layers are: {listed}; pass one of them as --layer."
        )
    weights = layer.get_weights()
    if not weights or np.ndim(weights[0]) != 2:
        raise ValueError(
            f"Embedding layer {layer_name!r} has no (table size, dim) weight matrix (quantized or "
            "unbuilt layers are not supported); export it from the float model."
        )
    return np.asarray(weights[0], dtype=np.float32)


def _self_and_parents(output: str) -> list[str]:
    """`output` and, for a local path, every directory above it (links resolved): where an export may be."""
    from pipeline.uris import is_local

    if not is_local(output):
        return [output]
    directory = os.path.realpath(output)
    found = [directory]
    while os.path.dirname(directory) != directory:
        directory = os.path.dirname(directory)
        found.append(directory)
    return found


def export_vocabulary(
    model_uri: str,
    tokenizer_uri: str | None,
    layer_name: str | None,
    output: str,
    overwrite: bool = False,
    allow_unsafe_deserialization: bool = False,
) -> tuple[str, int]:
    """Writes `OUTPUT/vocabulary.parquet` for Embedding layer `layer_name` of `model_uri`.

    `layer_name` None picks the model's only Embedding layer.

    Returns:
        `(path, rows)`: the file written and its number of rows.

    Raises:
        ExportConfigError: the model, tokenizer, layer or output cannot work.
    """
    from apache_beam.io.filesystems import FileSystems

    from pipeline.errors import ExportConfigError
    from pipeline.planning.checks import check_flag_not_empty
    from pipeline.planning.model_source import load_model_source
    from pipeline.uris import is_local
    from pipeline.writing.state import check_writable

    check_flag_not_empty("--output", output, optional=False)
    path = FileSystems.join(output, VOCABULARY_FILE)
    _check_not_in_an_export(output)
    if is_local(output):
        # As pipeline.run judges its --output: a link to a missing directory is named as one.
        check_writable(output)
        # --overwrite replaces the file this command wrote, never a directory or link of that name.
        if os.path.islink(path) or (os.path.lexists(path) and not os.path.isfile(path)):
            raise ExportConfigError(
                f"{path} is a directory or a link, not a file this command wrote; move it away "
                "or choose another --output."
            )
    if FileSystems.exists(path) and not overwrite:
        raise ExportConfigError(
            f"{path} already exists; pass --overwrite to replace it, or another --output."
        )
    model_source = load_model_source(
        model_uri, tokenizer_uri, allow_unsafe_deserialization=allow_unsafe_deserialization
    )
    if layer_name is None:
        names = embedding_layer_names(model_source.model)
        if len(names) != 1:
            raise ExportConfigError(
                f"The model has {len(names)} Embedding layers ({', '.join(map(repr, names)) or 'none'}); "
                "pass --layer with the one to export."
            )
        layer_name = names[0]
    try:
        table = embedding_table(model_source.model, layer_name)
    except ValueError as error:
        raise ExportConfigError(str(error)) from None
    if model_source.tokenizer is None:
        # A string model's vocabulary is inside it: the TextVectorization feeding the Embedding.
        own = vectorizer_vocabulary(model_source.model, layer_name)
        if own is not None:
            model_source = dataclasses.replace(model_source, tokenizer=own)
    if model_source.tokenizer is None:
        raise ExportConfigError(
            "The model reads raw strings or --tokenizer none was given, so there is no tokenizer "
            "to name the table's rows; pass --tokenizer with the model's tokenizer file."
        )
    id_to_token = model_source.tokenizer.id_to_token()
    vocabulary_size = max([OOV_ID, *id_to_token]) + 1
    if vocabulary_size > len(table):
        logging.warning(
            "The tokenizer has %d ids but layer %r has only %d rows: ids from %d up cannot be "
            "embedded and are left out. Check that --tokenizer belongs to this model.",
            vocabulary_size,
            layer_name,
            len(table),
            len(table),
        )
    metadata = vocabulary_metadata(model_uri, model_source, layer_name, table)
    arrow_table = vocabulary_table(table, id_to_token, metadata)
    # Again: an export may have started in --output while the model loaded.
    _check_not_in_an_export(output)
    _write_whole(arrow_table, path, overwrite)
    return path, arrow_table.num_rows


def _check_not_in_an_export(output: str) -> None:
    """Refuses an --output in an export's directory: it holds only what its runs write, and a
    file more makes its next --overwrite refuse it."""
    from apache_beam.io.filesystems import FileSystems

    from pipeline.errors import ExportConfigError
    from pipeline.uris import is_local
    from pipeline.writing.lock import is_stale_local_lock

    for directory in _self_and_parents(output):
        for marker in (MANIFEST, STAGING, LOCK):
            # A _LOCK alone that nothing holds was left by a killed `pipeline.analyze VOCABULARY index`
            # (it locks the vocabulary's directory too), not by an export.
            stale = marker == LOCK and is_local(directory) and is_stale_local_lock(directory)
            if FileSystems.exists(FileSystems.join(directory, marker)) and not stale:
                raise ExportConfigError(
                    f"--output {output} is inside the export {directory} (it holds {marker}), whose files "
                    "only `python -m pipeline.run` writes; choose a directory outside it for the vocabulary."
                )


def _write_whole(table: pa.Table, path: str, overwrite: bool) -> None:
    """Writes `table` to `path` so that a reader never sees half a file, and nothing else is touched.

    Locally through a new temporary file beside it (a name no other file has,
    so no file of the user's is replaced), then renamed over it; on object
    storage directly, since an object appears only once its upload is whole.
    """
    from apache_beam.io.filesystems import FileSystems

    from pipeline.uris import is_local
    from pipeline.writing.files import write_whole_local

    if not is_local(path):
        with FileSystems.create(path) as handle:
            pq.write_table(table, handle)
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    write_whole_local(path, lambda handle: pq.write_table(table, handle), replace=overwrite)


def build_parser() -> argparse.ArgumentParser:
    """The command's flags: the model flags shared with `pipeline.run`, --layer, --output, --overwrite."""
    parser = CommandParser(
        prog="python -m pipeline.vocabulary",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_flags(parser)
    parser.add_argument(
        "--layer",
        default=None,
        help="Name of the Embedding layer to export. Default: the model's only Embedding layer.",
    )
    parser.add_argument(
        "--output",
        required=True,
        help=f"Output directory (local or gs://, s3://); the file is OUTPUT/{VOCABULARY_FILE}.",
    )
    parser.add_argument(
        "--overwrite", action="store_true", default=False, help=f"Replace an existing {VOCABULARY_FILE}."
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status (EXIT_CONFIG_ERROR for an ExportConfigError)."""
    # Quiet TensorFlow's C++ start-up chatter unless the user asked for it.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = build_parser().parse_args(argv)
    from models.start_lines import import_tensorflow_quietly

    import_tensorflow_quietly()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # Imported here, not at the top: they load Keras, which `--help` does not need.
    from models.bundle import DEFAULT_BUNDLE
    from pipeline.errors import ExportConfigError
    from pipeline.planning.checks import TOKENIZER_VALUE, check_flag_not_empty, check_text_arguments

    try:
        check_text_arguments(sys.argv[1:] if argv is None else argv)
    except ExportConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    try:
        # An unset shell variable (`--model "$MODEL"`) would silently mean the bundled model.
        check_flag_not_empty("--model", args.model, what="a model bundle or file")
        check_flag_not_empty("--tokenizer", args.tokenizer, what=TOKENIZER_VALUE)
    except ExportConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    model = args.model or DEFAULT_BUNDLE
    paths = {"--model": args.model, "--tokenizer": args.tokenizer, "--output": args.output}
    refused = removed_working_directory() or unexpanded_home(paths)
    if refused:
        print(f"error: {refused}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    try:
        object_storage.configure_for(
            {"--model": model, "--tokenizer": args.tokenizer, "--output": args.output}
        )
        path, rows = export_vocabulary(
            model, args.tokenizer, args.layer, args.output, args.overwrite, args.allow_unsafe_deserialization
        )
    except ExportConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except OSError as error:
        # Beam's BeamIOError (an OSError): object storage unreachable, no credentials, a full disk.
        print(
            f"error: could not read or write {args.output}: {error} On object storage, check the "
            "credentials (for s3://: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION and, "
            "for another endpoint, AWS_ENDPOINT_URL).",
            file=sys.stderr,
        )
        return EXIT_CONFIG_ERROR
    print(f"Wrote {rows} token vectors to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(stopping.run("python -m pipeline.vocabulary", main))
