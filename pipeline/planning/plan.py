"""Launch-time validation: turns flags and the loaded model into a small, picklable `ExportPlan`.

Everything that can be wrong with the model, the layers, the input mapping or
the output location is found here, on the launching machine, before any worker
exists.  Workers receive only the plan and load the model themselves.
"""

import dataclasses
import hashlib
import json
import math
import os
import re
import sys

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from models import __version__, keras_graph
from models.truncate import parse_layer_spec, truncate
from pipeline.errors import ExportConfigError
from pipeline.planning.model_source import is_local, load_model_source, wants_no_tokenizer
from pipeline.planning.options import INPUT_FORMATS
from pipeline.reading.listing import list_input
from pipeline.writing import schema as schema_lib
from pipeline.writing.token_tables import apply_token_storage

TEXT_FIELD = "text"
# What an input takes (`InputInfo.takes`): token ids the pipeline computes (or reads
# as id lists), or the raw string for a model that tokenizes itself (TextVectorization).
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

    For `takes` TEXT_INPUT (a string input of `rank` 1 or 2), `length` is the
    output length of the TextVectorization layer it feeds, whose non-zero ids
    mark the real tokens of per-token outputs; 0 when there is none of fixed
    length, so only vector outputs can be exported from it.
    """

    name: str
    field: str
    length: int
    takes: str = IDS_INPUT  # what the input takes: token ids or text
    rank: int = 2
    # Token ids must be below this: the smallest input_dim of the Embeddings the
    # input feeds (0: no Embedding found, any int32 id).
    id_limit: int = 0


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
    # --reuse: the earlier export and its row shards (from its manifest).
    reuse: str = ""
    reuse_files: tuple = ()
    # Total size of the input files as listed at launch (0: not listed), for the ETA and split size.
    input_bytes: int = 0
    # SHA-256 of the input listing (path, size, modification time of each file; "" if not listed):
    # a resume continues only a run that read the same files (`pipeline.writing.resume`).
    input_listing_sha256: str = ""
    # The launch listing (`listing.InputFile`s): the files the run reads, each checked unchanged
    # before and after it is read. Empty: not listed (a --dry_run of an object-store pattern).
    # `graph.build_pipeline` hands it to ReadCorpus only, so no DoFn carries it.
    input_files: tuple = ()
    # (column, forward pass, reason) as chosen at launch (`pipeline.inference.embedder.forward_pass_records`);
    # workers refuse to use another, so the manifest's record holds.  Empty: workers choose.
    forward_passes: tuple = ()
    # Where the launch checked the fast path against Keras (`embedder.fast_path_environment`):
    # a worker in the same environment trusts `forward_passes` instead of checking again.
    fast_path_checked_on: str = ""

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
            for node in keras_graph.layer_nodes(layer):
                if any(tensor is input_tensor for tensor in keras_graph.node_inputs(node)):
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
    output_layers = {keras_graph.producer(t)[0].name for t in model.outputs}
    layer_names = {layer.name for layer in model.layers}
    names = []
    for tensor in model.outputs:
        _, node = keras_graph.producer(tensor)
        for parent in keras_graph.node_inputs(node):
            name = keras_graph.producer(parent)[0].name
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


# Characters Beam's FileSystems.match takes as a glob.
GLOB_CHARACTERS = "*?["
# Names an export writes, to test an --input pattern against (see `check_input_output`).
_EXPORT_FILE_EXAMPLES = (
    "part-00000-of-00001.parquet",
    "errors/part-00000-of-00001.parquet",
    "_staging/0123456789ab/data/part-00000-of-00001.parquet",
    "_MANIFEST.json",
)


def check_location(flag, uri):
    """Refuses a URI whose scheme no installed Beam filesystem serves.

    Raises:
        ExportConfigError: naming the scheme and the package that serves it.
    """
    scheme = FileSystems.get_scheme(uri)
    try:
        FileSystems.get_filesystem(uri)
    except ValueError:
        raise ExportConfigError(
            f"--{flag} {uri!r}: no filesystem serves the scheme {scheme + '://'!r}. Use a local "
            "path, gs://BUCKET/... or s3://BUCKET/... (s3 needs `pip install 'embexport[aws]'`)."
        ) from None
    if scheme == "s3":
        try:
            import boto3  # noqa: F401  Beam's S3 filesystem needs it only when it first connects.
        except ImportError:
            raise ExportConfigError(
                f"--{flag} {uri!r} is on S3, which needs boto3: install the aws extra "
                "(`pip install 'embexport[aws]'`, or 'apache-beam[aws]')."
            ) from None


def _absolute(path):
    return os.path.realpath(path) if is_local(path) else path.rstrip("/")


def _absolute_pattern(pattern):
    """A local pattern with its fixed directory part made absolute (symlinks resolved)."""
    first_glob = re.search(r"[*?\[]", pattern)
    if not is_local(pattern) or not first_glob:
        return _absolute(pattern)
    cut = pattern.rfind("/", 0, first_glob.start())
    head, tail = (pattern[:cut] or "/", pattern[cut + 1 :]) if cut >= 0 else (".", pattern)
    return os.path.join(os.path.realpath(head), tail)


def _inside(path, directory):
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def glob_regex(pattern):
    """A regex with the meaning of a Beam glob: `**` spans directories, `*` and `?` do not."""
    parts, index = [], 0
    while index < len(pattern):
        char = pattern[index]
        if pattern.startswith("**", index):
            parts.append(".*")
            index += 2
            continue
        if char == "*":
            parts.append("[^/]*")
        elif char == "?":
            parts.append("[^/]")
        elif char == "[" and "]" in pattern[index + 1 :]:
            close = pattern.index("]", index + 1)
            body = pattern[index + 1 : close]
            parts.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            index = close + 1
            continue
        else:
            parts.append(re.escape(char))
        index += 1
    return re.compile("".join(parts))


def check_input_output(input_pattern, matched, output):
    """Refuses an --output that overlaps the corpus, so no run can read or replace its own input.

    Args:
        input_pattern: --input as given.
        matched: the paths --input matches now.
        output: --output.

    Raises:
        ExportConfigError: the output holds, is, or would be read as, corpus files.
    """
    directory = _absolute(output)
    inside = [path for path in matched if _inside(_absolute(path), directory)]
    if inside:
        raise ExportConfigError(
            f"--output {output!r} holds files that --input {input_pattern!r} reads (e.g. "
            f"{inside[0]!r}). Write the export to a directory outside the corpus."
        )
    pattern = _absolute_pattern(input_pattern)
    regex = glob_regex(pattern)
    written = [name for name in _EXPORT_FILE_EXAMPLES if regex.fullmatch(directory + "/" + name)]
    if written:
        raise ExportConfigError(
            f"--input {input_pattern!r} would also match the files this export writes into "
            f"--output {output!r} (such as {written[0]!r}), so a later run would read its own "
            "output as corpus. Narrow the --input pattern or move --output elsewhere."
        )


def check_output(output, overwrite):
    """Refuses an output that cannot be written, or that holds files no export wrote.

    Raises:
        ExportConfigError: saying what is wrong and what to do instead.
    """
    from pipeline.writing.output import check_output_state, check_writable, is_regular_file

    check_location("output", output)
    if any(ch in output for ch in GLOB_CHARACTERS):
        raise ExportConfigError(
            f"--output {output!r} holds one of {GLOB_CHARACTERS!r}, which Beam's file matching "
            "takes as a pattern; choose a directory name without them."
        )
    if is_regular_file(output):
        raise ExportConfigError(
            f"--output {output!r} is a file; --output names a directory for the export's files."
        )
    check_writable(output)
    check_output_state(output, overwrite)


def listing_sha256(files):
    """SHA-256 of the launch listing (`listing.InputFile`s): each file's path, size and modification time."""
    entries = sorted((f.path, f.size, f.mtime) for f in files)
    return hashlib.sha256(json.dumps(entries).encode("utf-8")).hexdigest()


def check_locations(options, check_remote):
    """Checks --input, --output and how they relate, before the (slow) model load.

    Returns:
        The files --input matches (`listing.InputFile`s); empty when it was not
        listed (an object-store pattern without `check_remote`).

    Raises:
        ExportConfigError: see `check_input`, `check_output` and `check_input_output`.
    """
    matched, files = None, ()
    if check_remote or is_local(options.input):
        files = tuple(check_input(options.input))
        matched = [f.path for f in files]
    else:
        check_location("input", options.input)
    if check_remote or is_local(options.output):
        if check_remote:
            # A commit a crash cut short is finished before the output is judged (not by --dry_run).
            from pipeline.writing.output import finish_interrupted_commit

            check_location("output", options.output)
            if finish_interrupted_commit(options.output) and not options.overwrite:
                raise ExportConfigError(
                    f"--output {options.output!r} held an export whose commit was cut short; it was "
                    "finished just now, so the output holds that run's complete export. Pass "
                    "--overwrite to replace it, or choose another --output."
                )
        check_output(options.output, options.overwrite)
        if matched is not None:
            check_input_output(options.input, matched, options.output)
    else:
        check_location("output", options.output)
    return files


def output_column_names(keep_fields, columns):
    """The output's column names in schema order (see `schema.output_schema`)."""
    names = [schema_lib.ID_COLUMN, *keep_fields]
    for column in columns:
        names.append(column.column)
        if column.kind == "sequence" and column.pooling == "none":
            names.append(column.column + schema_lib.TOKENS_SUFFIX)
    return [*names, schema_lib.FINGERPRINT_COLUMN]


def check_column_names(keep_fields, columns):
    """Refuses two output columns of one name, which Parquet readers cannot read back."""
    names = output_column_names(keep_fields, columns)
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ExportConfigError(
            f"The output would have several columns named {', '.join(map(repr, repeated))} (its "
            f"columns: {names}); pandas and pyarrow cannot read such a file. Give --layer a "
            "different COLUMN= name, or list each --keep_fields field once and not as 'id' "
            "or a layer column."
        )


def embedding_limits(sub_model, inputs):
    """{token-id input name: (smallest input_dim of the Embeddings it feeds, that layer's name)}."""
    import keras

    token_inputs = {info.name for info in inputs if info.takes == IDS_INPUT}
    limits = {}
    for layer in sub_model.layers:
        if not isinstance(layer, keras.layers.Embedding):
            continue
        for node in keras_graph.layer_nodes(layer):
            outputs = keras_graph.node_outputs(node)
            for name in set(keras_graph.input_dependencies(sub_model, outputs[0])) & token_inputs:
                if name not in limits or layer.input_dim < limits[name][0]:
                    limits[name] = (layer.input_dim, layer.name)
    return limits


def check_vocabulary_fits(limits, tokenizer):
    """Refuses a tokenizer whose ids do not all fit the Embedding layers they feed.

    Keras raises on an id >= `input_dim` at inference, which would fail
    documents one by one; a tokenizer of `size` ids produces ids up to `size - 1`.
    """
    if tokenizer is None:
        return
    for name, (input_dim, layer) in sorted(limits.items()):
        if tokenizer.size > input_dim:
            raise ExportConfigError(
                f"The tokenizer produces ids up to {tokenizer.size - 1}, but Embedding layer "
                f"{layer!r} (fed by input {name!r}) has input_dim={input_dim}, so ids >= "
                f"{input_dim} would fail every document that has one. Pass the --tokenizer the "
                "model was trained with (for a Keras 2 Tokenizer, the one fitted with "
                "num_words <= input_dim)."
            )


# Each numeric flag's valid range, inclusive, and what it counts: a value outside it (inf, nan,
# negative, or so large that a C call overflows) is refused at launch.
NUMERIC_FLAGS = (
    ("batch_size", 1, 100_000, "documents per forward pass"),
    ("max_error_fraction", 0.0, 1.0, "the share of dead-lettered records that fails a run"),
    ("max_record_bytes", 1, 1 << 30, "bytes of the largest record read (1 GiB at most)"),
    ("limit", 1, sys.maxsize, "records to read"),
    ("shard_mb", 0.001, 1_000_000.0, "MB per output file"),
    ("progress_seconds", 0.1, 86_400.0, "seconds between progress lines"),
    ("checkpoint_seconds", 0.01, 604_800.0, "seconds a row file stays open before it is made durable"),
    ("tf_threads", 0, 1024, "TensorFlow threads per worker process, 0 = automatic"),
    ("worker_start_timeout", 0.0, 86_400.0, "seconds to wait for a first worker, 0 = forever"),
)


def check_numeric_flags(options):
    """Refuses a numeric flag outside its range (`NUMERIC_FLAGS`), naming the range.

    Raises:
        ExportConfigError: e.g. `--shard_mb inf`, `--progress_seconds 0`, `--limit -1`.
    """
    for name, low, high, meaning in NUMERIC_FLAGS:
        value = getattr(options, name)
        if value is None and name == "limit":  # --limit is optional.
            continue
        if not (isinstance(value, (int, float)) and math.isfinite(value) and low <= value <= high):
            kind = "an integer" if isinstance(low, int) else "a number"
            raise ExportConfigError(
                f"--{name} must be {kind} from {low:,} to {high:,} ({meaning}), received {value!r}."
            )


def cut_model(model, layer_texts):
    """`(specs, sub_model)`: the parsed --layer specs and the model cut down to them."""
    try:
        specs = [parse_layer_spec(text) for text in layer_texts]
        return specs, truncate(model, specs)
    except ValueError as error:
        raise ExportConfigError(str(error)) from None


def describe_inputs(sub_model, mapping):
    """An `InputInfo` per input of the sub-model: token ids of a fixed length, or strings."""
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
    return tuple(inputs)


def check_tokenizer_present(inputs, tokenizer, tokenizer_flag):
    """Refuses token-id inputs without a tokenizer, unless `--tokenizer none` says the corpus holds ids."""
    if tokenizer is None and not wants_no_tokenizer(tokenizer_flag):
        ids_inputs = [info.name for info in inputs if info.takes == IDS_INPUT]
        if ids_inputs:
            raise ExportConfigError(
                f"The exported layers read token-id input(s) {ids_inputs}, but there is no "
                "tokenizer: pass --tokenizer, or --tokenizer none if the corpus holds lists of token ids."
            )


VECTOR = "vector"
SEQUENCE = "sequence"


def column_kind(shape, dependencies, lengths):
    """VECTOR for (batch, dim); SEQUENCE for (batch, tokens, dim) aligned with its one input; else None.

    Args:
        shape: the layer output's shape.
        dependencies: the model inputs it is computed from.
        lengths: model input name -> its length (tokens).
    """
    if len(shape) == 2:
        return VECTOR
    if len(shape) == 3 and len(dependencies) == 1 and shape[1] == lengths.get(dependencies[0]):
        return SEQUENCE
    return None


def describe_columns(sub_model, specs, inputs, pooling):
    """A `ColumnInfo` per --layer; refuses outputs that are neither vectors nor per-token sequences."""
    lengths = {info.name: info.length for info in inputs}
    text_inputs = {info.name for info in inputs if info.takes == TEXT_INPUT}
    outputs = sub_model.output if isinstance(sub_model.output, dict) else {specs[0].column: sub_model.output}
    columns = []
    for spec in specs:
        tensor = outputs[spec.column]
        shape = tensor.shape
        dependencies = keras_graph.input_dependencies(sub_model, tensor)
        kind = column_kind(shape, dependencies, lengths)
        if kind == VECTOR:
            columns.append(ColumnInfo(spec.column, spec.layer, spec.call, VECTOR, int(shape[1]), "", "none"))
        elif kind == SEQUENCE:
            columns.append(
                ColumnInfo(
                    spec.column, spec.layer, spec.call, SEQUENCE, int(shape[2]), dependencies[0], pooling
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
    return columns


def build_plan(options, check_remote=True):
    """Validates `options` (an `ExportOptions` view) and returns `(plan, model_source)`.

    Args:
        options: the `ExportOptions` view of the pipeline options.
        check_remote: False skips listing --input and --output where they are
            object-store URIs (gs://, s3://), for a --dry_run without credentials.

    Raises:
        ExportConfigError: anything that would make the run fail or write nonsense.
    """
    check_numeric_flags(options)
    input_files = check_locations(options, check_remote)
    input_format = detect_format(options.input, options.input_format)
    explicit_map = _parse_input_map(options.input_map)
    model_source = load_model_source(
        options.model,
        options.tokenizer,
        allow_unsafe_deserialization=options.allow_unsafe_deserialization,
        padding=options.padding,
        truncating=options.truncating,
    )
    model = model_source.model
    specs, sub_model = cut_model(
        model, options.layer or model_source.default_layers or _default_layer_names(model)
    )
    mapping = resolve_input_map(
        [t.name for t in sub_model.inputs], explicit_map, model_source.input_fields, input_format
    )
    inputs = describe_inputs(sub_model, mapping)
    check_tokenizer_present(inputs, model_source.tokenizer, options.tokenizer)
    columns = describe_columns(sub_model, specs, inputs, options.pooling)
    columns = apply_token_storage(model, specs, columns, options.token_storage, options.pooling)
    keep_fields = tuple(f.strip() for f in options.keep_fields.split(",") if f.strip())
    check_column_names(keep_fields, columns)
    limits = embedding_limits(sub_model, inputs)
    check_vocabulary_fits(limits, model_source.tokenizer)
    inputs = tuple(
        dataclasses.replace(info, id_limit=limits[info.name][0]) if info.name in limits else info
        for info in inputs
    )

    tokenizer = model_source.tokenizer
    output = options.output
    plan = ExportPlan(
        model_uri=options.model,
        tokenizer_uri=options.tokenizer or "",
        model_sha256=model_source.model_sha256,
        tokenizer_sha256=model_source.tokenizer_sha256,
        layer_specs=tuple(specs),
        inputs=inputs,
        columns=tuple(columns),
        input_pattern=options.input,
        input_bytes=sum(f.size for f in input_files),
        input_files=input_files,
        input_listing_sha256=listing_sha256(input_files) if input_files else "",
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
    if options.reuse:
        plan = dataclasses.replace(plan, reuse=options.reuse, reuse_files=check_reuse(options.reuse, plan))
    return plan, model_source


def reuse_signature(plan):
    """What must be equal for an earlier export's rows to be this export's rows.

    With these equal, a row depends only on what the model sees of the
    document, which `schema.input_fingerprint` covers; the manifest records it.
    """
    return {
        "model_sha256": plan.model_sha256,
        "tokenizer_sha256": plan.tokenizer_sha256,
        "columns": [dataclasses.asdict(c) for c in plan.columns],
        "dtype": plan.dtype,
        "padding": plan.padding,
        "truncating": plan.truncating,
        "inputs": [{"name": i.name, "length": i.length, "kind": i.takes} for i in plan.inputs],
        # The fast path equals Keras's forward pass to 1e-5, not bit for bit.
        "fast_path": plan.fast_path,
    }


def _describe_setting(key, value):
    """A short form of a `reuse_signature` value for messages."""
    if key == "columns" and isinstance(value, list):
        return ", ".join(
            f"{c.get('column')}={c.get('layer')}:{c.get('call')} ({c.get('kind')}, pooling "
            f"{c.get('pooling')}, {c.get('token_storage', 'vectors')})"
            for c in value
        )
    if key == "inputs" and isinstance(value, list):
        return ", ".join(f"{i['name']}[{i['length']}]" for i in value)
    return repr(value)


def check_reuse(uri, plan):
    """Refuses a --reuse that is not a finished export made with the same model and settings.

    Returns:
        The earlier export's row shards (URIs), from its manifest.

    Raises:
        ExportConfigError: naming what differs and how to proceed.
    """
    from pipeline.writing.output import finish_interrupted_commit, output_state, read_manifest

    check_location("reuse", uri)
    # An export whose commit a crash cut short is finished before it is read.
    finish_interrupted_commit(uri)
    try:
        manifest = read_manifest(uri)
    except Exception as error:  # Unreadable, not JSON, no credentials, ...
        raise ExportConfigError(f"Cannot read the manifest of --reuse {uri!r}: {error}") from None
    if manifest is None:
        state = "missing" if output_state(uri) == "empty" else "unfinished or not an export"
        raise ExportConfigError(
            f"--reuse {uri!r} is {state}: it has no _MANIFEST.json, which a finished export "
            "writes last. Pass a finished export's directory, or leave --reuse out for a full export."
        )
    earlier = manifest.get("reuse_signature")
    if earlier is None:
        raise ExportConfigError(
            f"--reuse {uri!r} was written by a version that did not record input fingerprints, so "
            "its rows cannot be matched to documents. Run one full export (without --reuse) and "
            "reuse that one from then on."
        )
    current = reuse_signature(plan)
    differences = [key for key in current if current[key] != earlier.get(key)]
    if differences:
        details = "; ".join(
            f"{key}: earlier {earlier.get(key)!r}, now {current[key]!r}" for key in differences
        )
        raise ExportConfigError(
            f"--reuse {uri!r} cannot be reused: its rows were made with other settings ({details}). "
            "Its vectors would differ from this export's; leave --reuse out for a full export."
        )
    return tuple(check_reuse_shards(uri, manifest, plan))


# The only row shard names an export's manifest holds: files directly in the export directory.


def _recorded_digest_matches(path, entry):
    """None if the shard's bytes match what the manifest records for it, else what differs.

    The manifest records `sha256` (local exports) or the store's `checksum`
    (object storage, see `output.file_digest`); whichever is there is checked.
    """
    import hashlib

    if "sha256" in entry:
        digest = hashlib.sha256()
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        if digest.hexdigest() != entry["sha256"]:
            return f"has SHA-256 {digest.hexdigest()}, but the manifest records {entry['sha256']}"
        return None
    if "checksum" in entry:
        checksum = FileSystems.checksum(path)
        if checksum != entry["checksum"]:
            return f"has checksum {checksum}, but the manifest records {entry['checksum']}"
        return None
    return "has no SHA-256 or checksum in the manifest to check it against"


def _shard_problem(path, entry, plan):
    """What is wrong with one row shard of a --reuse export, or None: bytes, size, rows, model."""
    import pyarrow.parquet as pq

    if not FileSystems.exists(path):
        return "is missing"
    size = FileSystems.get_filesystem(path).size(path)
    if "bytes" in entry and entry["bytes"] != size:
        return f"is {size} bytes, but the manifest records {entry['bytes']}"
    problem = _recorded_digest_matches(path, entry)
    if problem:
        return problem
    try:
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            footer = pq.ParquetFile(handle)
            rows, metadata = footer.metadata.num_rows, schema_lib.read_export_metadata(footer.schema_arrow)
    except Exception as error:  # pyarrow raises ArrowInvalid, OSError, KeyError (no metadata), ...
        return f"is not a readable export shard ({type(error).__name__}: {error})"
    if "rows" in entry and entry["rows"] != rows:
        return f"holds {rows} rows, but the manifest records {entry['rows']}"
    for key in ("model_sha256", "tokenizer_sha256", "dtype"):
        if metadata.get(key) != getattr(plan, key):
            return (
                f"was written with {key} {metadata.get(key)!r}, not this export's {getattr(plan, key)!r} "
                "(its own metadata disagrees with the manifest)"
            )
    columns = [
        (c.get("column"), c.get("layer"), c.get("call"), c.get("dim")) for c in metadata.get("columns", [])
    ]
    expected = [(c.column, c.layer, c.call, c.dim) for c in plan.columns]
    if columns != expected:
        return f"holds columns {columns}, not this export's {expected}"
    return None


def check_reuse_shards(uri, manifest, plan):
    """The row shards of a --reuse export, each checked against its manifest before any is read.

    Each shard must be a file directly in `uri` (no path leaving it, no link
    out of it), of the recorded size and SHA-256 (or object-store checksum)
    and row count, and its own Parquet metadata must name this export's model,
    tokenizer, dtype and columns.

    Raises:
        ExportConfigError: naming the first damaged shard and what is wrong with it.
    """
    from pipeline.writing.output import SHARD_NAME, join

    def damaged(name, problem):
        return ExportConfigError(
            f"--reuse {uri!r} is damaged: row shard {name!r} {problem}. Its rows cannot be trusted; "
            "reuse an intact export, or leave --reuse out for a full export."
        )

    entries = (manifest.get("shards") or {}).get("rows")
    if not isinstance(entries, list):
        raise damaged("(none)", "is not listed: the manifest has no list of row shards")
    paths = []
    for entry in entries:
        name = entry.get("file") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not SHARD_NAME.fullmatch(name):
            raise damaged(
                name,
                "is not a shard name of the export directory (part-NNNNN-of-NNNNN.parquet, directly "
                "in it); a manifest naming files elsewhere is not followed",
            )
        path = join(uri, name)
        if is_local(path) and os.path.dirname(os.path.realpath(path)) != os.path.realpath(uri):
            raise damaged(name, f"is a link to {os.path.realpath(path)!r}, outside the export directory")
        problem = _shard_problem(path, entry, plan)
        if problem:
            raise damaged(name, problem)
        paths.append(path)
    return paths


def check_input(pattern):
    """Lists --input once; refuses a pattern that matches no files, a directory, or a non-regular file.

    Returns:
        The `listing.InputFile` (path, size, modification time) of each matched
        file: the run reads these and checks each is unchanged before reading it.

    Raises:
        ExportConfigError: saying what is wrong with the pattern.
    """
    check_location("input", pattern)
    try:
        matched, non_regular = list_input(pattern)
    except Exception as error:  # Beam raises BeamIOError subclasses per filesystem.
        raise ExportConfigError(f"Cannot list --input {pattern!r}: {error}") from None
    if is_local(pattern) and os.path.isdir(pattern):
        raise ExportConfigError(
            f"--input {pattern!r} is a directory; --input takes a file or a file pattern, "
            f"e.g. {os.path.join(pattern, '*.jsonl')!r}."
        )
    if non_regular:
        names = ", ".join(f"{entry.path!r} ({entry.kind})" for entry in non_regular[:3])
        raise ExportConfigError(
            f"--input {pattern!r} matches {len(non_regular)} path(s) that are not regular files: {names}"
            f"{', ...' if len(non_regular) > 3 else ''}. Reading a named pipe or device can block "
            "forever; remove them or narrow the --input pattern."
        )
    if not matched:
        raise ExportConfigError(f"--input {pattern!r} matches no files; check the path or pattern.")
    if all(entry.link_target is not None for entry in matched):
        raise ExportConfigError(
            f"--input {pattern!r} matches only symbolic links to nothing (e.g. {matched[0].path!r} -> "
            f"{matched[0].link_target!r}); check the links or the pattern."
        )
    return matched
