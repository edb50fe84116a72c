"""Launch-time validation: turns flags and the loaded model into a small, picklable `ExportPlan`.

Everything that can be wrong with the model, the layers, the input mapping or
the output location is found here, on the launching machine, before any worker
exists.  Workers receive only the plan and load the model themselves.
"""

import dataclasses
import os

from apache_beam.io.filesystems import FileSystems

from models import __version__
from models.truncate import input_dependencies, parse_layer_spec, truncate
from pipeline.model_source import ExportConfigError, is_local, load_model_source, wants_no_tokenizer
from pipeline.options import INPUT_FORMATS
from pipeline.token_tables import apply_token_storage

TEXT_FIELD = "text"
# Input kinds: token ids the pipeline computes (or reads as id lists), or the raw
# string for a model that tokenizes itself with a TextVectorization layer.
IDS_INPUT = "ids"
TEXT_INPUT = "text"
EXTENSION_FORMATS = {
    ".txt": "text",
    ".text": "text",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".parquet": "parquet",
}


@dataclasses.dataclass(frozen=True)
class InputInfo:
    """A model input the sub-model needs: its name, corpus field and length.

    For `kind` TEXT_INPUT (a string input of `rank` 1 or 2), `length` is the
    output length of the TextVectorization layer it feeds, whose non-zero ids
    mark the real tokens of per-token outputs; 0 when there is none of fixed
    length, so only vector outputs can be exported from it.
    """

    name: str
    field: str
    length: int
    kind: str = IDS_INPUT
    rank: int = 2


@dataclasses.dataclass(frozen=True)
class ColumnInfo:
    """An exported output column.

    `kind` is "vector" (one vector per document) or "sequence" (one vector per
    token of `source_input`, turned into a row by `pooling`).  A sequence column
    with pooling "none" and `token_storage` "ids" holds the real tokens' ids;
    `table` is then its layer's table, relative to the output directory.
    """

    column: str
    layer: str
    call: int
    kind: str
    dim: int
    source_input: str
    pooling: str
    token_storage: str = "vectors"
    table: str = ""


@dataclasses.dataclass(frozen=True)
class ExportPlan:
    """What workers need to run the export; holds no model, only its URI."""

    model_uri: str
    tokenizer_uri: str
    model_sha256: str
    tokenizer_sha256: str
    layer_specs: tuple
    inputs: tuple
    columns: tuple
    input_pattern: str
    input_format: str
    id_field: str
    keep_fields: tuple
    output: str
    dtype: str
    batch_size: int
    compression: str
    max_record_bytes: int
    tf_threads: int
    padding: str
    fast_path: str = "auto"
    package_version: str = __version__
    truncating: str = "pre"
    allow_unsafe_deserialization: bool = False

    @property
    def fields(self):
        """Model input name -> corpus field."""
        return {info.name: info.field for info in self.inputs}

    @property
    def tokenizes(self):
        """Whether text in the fields of token-id inputs is tokenized (False for `--tokenizer none`)."""
        return not wants_no_tokenizer(self.tokenizer_uri)


def text_vectorizer(model, input_tensor):
    """The TextVectorization layer that `model` applies directly to `input_tensor`, or None."""
    import keras

    for layer in model.layers:
        if isinstance(layer, keras.layers.TextVectorization):
            for node in layer._inbound_nodes:
                if any(tensor is input_tensor for tensor in node.input_tensors):
                    return layer
    return None


def text_input_info(tensor, model, field):
    """InputInfo for a string input; see `InputInfo` for what `length` means here."""
    shape = tuple(tensor.shape)
    if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)):
        raise ExportConfigError(
            f"Model input {tensor.name!r} takes strings of shape {shape}; text inputs need the "
            "shape (batch,) or (batch, 1), one document per row."
        )
    length = 0
    vectorizer = text_vectorizer(model, tensor)
    if vectorizer is not None:
        config = vectorizer.get_config()
        if config.get("output_mode") == "int" and config.get("output_sequence_length"):
            length = int(config["output_sequence_length"])
    return InputInfo(tensor.name, field, length, TEXT_INPUT, len(shape))


def detect_format(pattern, input_format):
    """Resolves `--input_format auto` from the pattern's extension."""
    if input_format != "auto":
        return input_format
    stem = pattern[:-3] if pattern.endswith(".gz") else pattern
    extension = os.path.splitext(stem)[1].lower()
    if extension not in EXTENSION_FORMATS:
        raise ExportConfigError(
            f"Cannot tell the format of --input {pattern!r} from its extension; pass "
            f"--input_format ({', '.join(f for f in INPUT_FORMATS if f != 'auto')})."
        )
    return EXTENSION_FORMATS[extension]


def _parse_input_map(entries):
    mapping = {}
    for entry in entries or []:
        name, separator, field = entry.partition("=")
        if not separator or not name.strip() or not field.strip():
            raise ExportConfigError(
                f"Invalid --input_map {entry!r}: expected INPUT=FIELD, e.g. content=body."
            )
        if name.strip() in mapping:
            raise ExportConfigError(f"--input_map names input {name.strip()!r} twice.")
        mapping[name.strip()] = field.strip()
    return mapping


def _default_layer_names(model):
    """The layers whose outputs feed the model's output layers (the penultimate vectors)."""
    output_layers = {t._keras_history.operation.name for t in model.outputs}
    layer_names = {layer.name for layer in model.layers}
    names = []
    for tensor in model.outputs:
        operation = tensor._keras_history.operation
        node = operation._inbound_nodes[tensor._keras_history.node_index]
        for parent in node.input_tensors:
            name = parent._keras_history.operation.name
            # Masks and other plain ops (not_equal, ...) are not layers one can export.
            if name not in names and name not in output_layers and name in layer_names:
                names.append(name)
    return names


def resolve_input_map(needed, explicit, bundle_fields, input_format):
    """Maps each needed model input to a corpus field.

    Explicit `--input_map` entries win, then the bundle's manifest, then a field of
    the input's own name (for text files, the line itself).
    """
    unknown = sorted(set(explicit) - set(needed))
    if unknown:
        raise ExportConfigError(
            f"--input_map names {unknown}, which the exported layers do not need; the "
            f"sub-model's inputs are {needed}. Remove those --input_map entries."
        )
    mapping = {}
    for name in needed:
        if name in explicit:
            mapping[name] = explicit[name]
        elif input_format == "text":
            mapping[name] = TEXT_FIELD
        else:
            mapping[name] = bundle_fields.get(name, name)
    if input_format == "text":
        bad = {name: field for name, field in mapping.items() if field != TEXT_FIELD}
        if bad:
            raise ExportConfigError(
                f"Text input has one field per record, '{TEXT_FIELD}', but --input_map asks "
                f"for {bad}. Use jsonl/csv/parquet input for several fields."
            )
    return mapping


def check_output(output, overwrite):
    """Refuses an output location holding a finished dataset or foreign files."""
    from pipeline.output import output_state

    state = output_state(output)
    if state == "finished" and not overwrite:
        raise ExportConfigError(
            f"--output {output!r} already holds a finished export. Pass --overwrite to "
            "replace it, or choose another --output."
        )
    if state == "foreign" and not overwrite:
        raise ExportConfigError(
            f"--output {output!r} is not empty and does not look like an export of this "
            "tool. Choose an empty or new directory, or pass --overwrite to replace it."
        )


def build_plan(options, check_remote=True):
    """Validates `options` (an `ExportOptions` view) and returns `(plan, model_source)`.

    Args:
        options: the `ExportOptions` view of the pipeline options.
        check_remote: False skips listing --input and --output where they are
            object-store URIs (gs://, s3://), for a --dry_run without credentials.

    Raises:
        ExportConfigError: anything that would make the run fail or write nonsense.
    """
    if options.batch_size < 1:
        raise ExportConfigError(f"--batch_size must be at least 1, received {options.batch_size}.")
    if not 0 <= options.max_error_fraction <= 1:
        raise ExportConfigError(
            f"--max_error_fraction must be between 0 and 1, received {options.max_error_fraction}."
        )
    if options.max_record_bytes < 1:
        raise ExportConfigError(f"--max_record_bytes must be positive, received {options.max_record_bytes}.")
    input_format = detect_format(options.input, options.input_format)
    if check_remote or is_local(options.input):
        check_input(options.input)
    explicit_map = _parse_input_map(options.input_map)
    source = load_model_source(
        options.model,
        options.tokenizer,
        allow_unsafe_deserialization=options.allow_unsafe_deserialization,
        padding=options.padding,
        truncating=options.truncating,
    )
    model = source.model

    layer_texts = options.layer or source.default_layers or _default_layer_names(model)
    try:
        specs = [parse_layer_spec(text) for text in layer_texts]
        sub_model = truncate(model, specs)
    except ValueError as error:
        raise ExportConfigError(str(error)) from None

    needed = [t.name for t in sub_model.inputs]
    mapping = resolve_input_map(needed, explicit_map, source.input_fields, input_format)
    inputs = []
    for tensor in sub_model.inputs:
        if str(tensor.dtype) == "string":
            inputs.append(text_input_info(tensor, sub_model, mapping[tensor.name]))
            continue
        if len(tensor.shape) != 2 or tensor.shape[1] is None:
            raise ExportConfigError(
                f"Model input {tensor.name!r} has shape {tuple(tensor.shape)}; token-id inputs "
                "need the shape (batch, length) with a fixed length."
            )
        inputs.append(InputInfo(tensor.name, mapping[tensor.name], int(tensor.shape[1])))
    inputs = tuple(inputs)
    lengths = {info.name: info.length for info in inputs}
    text_inputs = {info.name for info in inputs if info.kind == TEXT_INPUT}
    if source.tokenizer is None and not wants_no_tokenizer(options.tokenizer):
        ids_inputs = [info.name for info in inputs if info.kind == IDS_INPUT]
        if ids_inputs:
            raise ExportConfigError(
                f"The exported layers read token-id input(s) {ids_inputs}, but there is no "
                "tokenizer: pass --tokenizer, or --tokenizer none if the corpus holds lists of token ids."
            )

    columns = []
    outputs = sub_model.output if isinstance(sub_model.output, dict) else {specs[0].column: sub_model.output}
    for spec in specs:
        tensor = outputs[spec.column]
        shape = tensor.shape
        dependencies = input_dependencies(sub_model, tensor)
        if len(shape) == 2:
            columns.append(
                ColumnInfo(spec.column, spec.layer, spec.call, "vector", int(shape[1]), "", "none")
            )
        elif len(shape) == 3 and len(dependencies) == 1 and shape[1] == lengths[dependencies[0]]:
            columns.append(
                ColumnInfo(
                    spec.column,
                    spec.layer,
                    spec.call,
                    "sequence",
                    int(shape[2]),
                    dependencies[0],
                    options.pooling,
                )
            )
        elif len(shape) == 3 and len(dependencies) == 1 and dependencies[0] in text_inputs:
            raise ExportConfigError(
                f"Layer {spec.layer!r} (call {spec.call}) outputs one vector per token of the string "
                f"input {dependencies[0]!r}, but that input feeds no TextVectorization layer with "
                "output_mode='int' and a fixed output_sequence_length (of "
                f"{shape[1]} tokens), so its real tokens cannot be told from padding. Export a "
                "vector layer (e.g. a pooling or LSTM layer) instead."
            )
        else:
            raise ExportConfigError(
                f"Layer {spec.layer!r} (call {spec.call}) outputs shape {tuple(shape)}; only "
                "vectors (batch, dim) and per-token sequences (batch, tokens, dim) aligned with "
                "one model input can be exported. Pick another --layer."
            )
    columns = apply_token_storage(model, specs, columns, options.token_storage, options.pooling)
    keep_fields = tuple(f.strip() for f in options.keep_fields.split(",") if f.strip())
    reserved = {"id"} | {c.column for c in columns} | {f"{c.column}_tokens" for c in columns}
    clashes = sorted(reserved & set(keep_fields))
    if clashes:
        raise ExportConfigError(
            f"--keep_fields {clashes} clash with output column names; rename the layer columns."
        )

    tokenizer = source.tokenizer
    output = options.output
    if check_remote or is_local(output):
        check_output(output, options.overwrite)
    plan = ExportPlan(
        model_uri=options.model,
        tokenizer_uri=options.tokenizer or "",
        model_sha256=source.model_sha256,
        tokenizer_sha256=source.tokenizer_sha256,
        layer_specs=tuple(specs),
        inputs=inputs,
        columns=tuple(columns),
        input_pattern=options.input,
        input_format=input_format,
        id_field=options.id_field,
        keep_fields=keep_fields,
        output=output,
        dtype=options.dtype,
        batch_size=options.batch_size,
        compression=options.compression,
        max_record_bytes=options.max_record_bytes,
        tf_threads=options.tf_threads,
        padding=tokenizer.padding if tokenizer else options.padding or "pre",
        fast_path=options.fast_path,
        truncating=tokenizer.truncating if tokenizer else options.truncating or "pre",
        allow_unsafe_deserialization=options.allow_unsafe_deserialization,
    )
    return plan, source


def check_input(pattern):
    """Refuses an --input pattern that matches no files."""
    try:
        matched = FileSystems.match([pattern])[0].metadata_list
    except Exception as error:  # Beam raises BeamIOError subclasses per filesystem.
        raise ExportConfigError(f"Cannot list --input {pattern!r}: {error}") from None
    if not matched:
        raise ExportConfigError(f"--input {pattern!r} matches no files; check the path or pattern.")
