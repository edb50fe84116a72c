"""Command line: `python -m pipeline.inspect MODEL` lists its inputs and layers and the `--layer` of each.

For every call of every layer it prints the output shape, the model inputs the
call's output is computed from (so which corpus fields an export of it needs),
whether it can be exported (one vector per document, or one vector per token
that `--pooling` turns into a row) and the `--layer` value that selects it; then,
for each exportable call, the forward pass an export would compute it with
(the exact fast path, Keras layers on fast outputs, or Keras alone) and why.
"""

from __future__ import annotations

from models import stopping

# Before the imports below (pyarrow's alone can take a second): a Ctrl-C during them is one line too.
if __name__ == "__main__":
    stopping.stop_at_once("python -m pipeline.inspect")

import os
import sys
from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol, TypeAlias

# Quiet TensorFlow's C++ start-up chatter unless the user asked for it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from models.command_line import CommandParser
from models.paths import removed_working_directory, unexpanded_home
from pipeline import object_storage
from pipeline.errors import EXIT_CONFIG_ERROR
from pipeline.planning.cli import add_model_flags

if TYPE_CHECKING:
    import keras

    from pipeline.planning.model_source import ModelSource

MODEL_INPUT = "(model input)"
HEADER = ("LAYER", "TYPE", "CALL", "OUTPUT SHAPE", "DEPENDS ON INPUTS", "EXPORTS AS", "--layer")
# One line of the table, in the columns of HEADER.
LayerRow = tuple[str, str, str, str, str, str, str]
# A layer call's output: one tensor, or a list or tuple of them for a layer with several.
LayerOutput: TypeAlias = "keras.KerasTensor | list[keras.KerasTensor] | tuple[keras.KerasTensor, ...]"


class _TokenizerFacts(Protocol):
    """What the report says of a tokenizer (ours, or one read from a Keras 2 file)."""

    @property
    def size(self) -> int: ...

    @property
    def padding(self) -> str: ...

    @property
    def truncating(self) -> str: ...


def _shape(tensor: LayerOutput) -> str:
    """The static shape of a tensor (of each of several tensors) as text."""
    if isinstance(tensor, (list, tuple)):
        return "[" + ", ".join(_shape(t) for t in tensor) + "]"
    return str(tuple(tensor.shape))


def input_lengths(model: keras.Model) -> tuple[dict[str, int], dict[str, str]]:
    """`(lengths, problems)`: input name -> tokens per document as the export would feed it (0 where
    unknown), and input name -> why the export refuses that input (as `pipeline.run` says it)."""
    from pipeline.planning.introspection import describe_input, input_refusals

    # A float input that feeds no Embedding too: inspect listed its layers as exportable, which run refused.
    problems = input_refusals(model)
    lengths = {
        tensor.name: 0 if tensor.name in problems else describe_input(tensor, model, tensor.name).length
        for tensor in model.inputs
    }
    return lengths, problems


def export_kind(
    tensor: LayerOutput,
    dependencies: Sequence[str],
    lengths: Mapping[str, int],
    text_inputs: Collection[str] = (),
) -> str:
    """ "vector", "sequence (INPUT)" or "-" (cannot be exported), by the plan's own rule."""
    from pipeline.planning.introspection import column_kind
    from pipeline.planning.plan import SEQUENCE

    if isinstance(tensor, (list, tuple)):
        return "- (several tensors)"
    kind = column_kind(tuple(tensor.shape), dependencies, lengths, text_inputs)
    if kind == SEQUENCE:
        return f"sequence ({dependencies[0]})"
    return kind or "-"


def layer_rows(model: keras.Model) -> list[LayerRow]:
    """One tuple per layer call, in the columns of `HEADER`; model inputs first."""
    from models.keras_graph import input_dependencies
    from models.truncate import layer_calls, spec_text

    lengths, problems = input_lengths(model)
    rows: list[LayerRow] = [
        (tensor.name, "InputLayer", "-", _shape(tensor), tensor.name, f"{tensor.dtype} input", MODEL_INPUT)
        for tensor in model.inputs
    ]
    types = {layer.name: type(layer).__name__ for layer in model.layers}
    text_inputs = {tensor.name for tensor in model.inputs if str(tensor.dtype) == "string"}
    calls = layer_calls(model)
    for name, tensors in calls.items():
        for call, tensor in enumerate(tensors):
            first = tensor[0] if isinstance(tensor, (list, tuple)) else tensor
            dependencies = input_dependencies(model, first)
            spec = spec_text(name, call, calls) or f"- (layer {name}:{call} has that name)"
            refused = [name for name in dependencies if name in problems]
            kind = (
                f"- (input {refused[0]} refused)"
                if refused
                else export_kind(tensor, dependencies, lengths, text_inputs)
            )
            rows.append(
                (name, types[name], str(call), _shape(tensor), ", ".join(dependencies) or "-", kind, spec)
            )
    return rows


def format_table(rows: Sequence[Sequence[str]], header: Sequence[str] = HEADER) -> str:
    """Left-aligned columns separated by two spaces."""
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(str(value).ljust(width) for value, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
    return "\n".join(lines)


def describe_tokenizer(tokenizer: _TokenizerFacts | None, sha256: str) -> str:
    """The report's tokenizer line: its kind, size, padding and truncation, and SHA-256."""
    if tokenizer is None:
        return "Tokenizer: none (string inputs are tokenized by the model; token-id inputs need --tokenizer)"
    return (
        f"Tokenizer: {type(tokenizer).__name__}, {tokenizer.size} ids, padding {tokenizer.padding}, "
        f"truncating {tokenizer.truncating}, sha256 {sha256}"
    )


def report(model_source: ModelSource, layer_specs: Sequence[str] = ()) -> str:
    """The text `python -m pipeline.inspect` prints for a loaded `ModelSource`.

    Args:
        model_source: a `pipeline.planning.model_source.ModelSource`.
        layer_specs: `--layer` values to check and show alone (all layers when empty).

    Raises:
        ValueError: a spec names no layer or call of the model (with the closest names).
    """
    from models.truncate import parse_layer_spec, resolve_layer, spec_text

    model = model_source.model
    rows = layer_rows(model)
    if layer_specs:
        wanted: set[str] = set()
        names = {layer.name for layer in model.layers}
        for text in layer_specs:
            spec = parse_layer_spec(text, names)
            resolve_layer(model, spec)
            wanted.add(spec_text(spec.layer, spec.call, names) or "")
        rows = [row for row in rows if row[-1] in wanted]
    lines = [
        f"Model: {model_source.uri} ({model.name}, {len(model.inputs)} input(s), {len(model.layers)} layers)",
        describe_tokenizer(model_source.tokenizer, model_source.tokenizer_sha256),
    ]
    if model_source.input_fields:
        fields = ", ".join(f"{name} <- {field}" for name, field in model_source.input_fields.items())
        lines.append(f"Corpus fields (bundle manifest): {fields}")
    if model_source.default_layers:
        lines.append(f"Default --layer (bundle manifest): {', '.join(model_source.default_layers)}")
    lines += ["", format_table(rows), ""]
    lines += [f"Input {name!r} refused: {problem}" for name, problem in input_lengths(model)[1].items()]
    lines += sample_batch_lines(model, rows)
    lines += forward_pass_lines(model, rows)
    return "\n".join(lines)


def sample_batch_lines(model: keras.Model, rows: Sequence[LayerRow]) -> list[str]:
    """A line per exportable layer call that Keras's forward pass fails on a sample batch of token ids.

    `pipeline.run` runs the same check at launch and refuses such a layer there; without it
    here, a model that fails on every real batch looked exportable. One pass for all the
    calls, as an export of them all runs; only where it fails, one per call, to name each.
    """
    import tensorflow as tf

    from models.truncate import parse_layer_spec, truncate
    from pipeline.errors import ExportConfigError
    from pipeline.inference.forward_pass import on_sample_batch, verification_batch
    from pipeline.planning.introspection import describe_input

    specs = [row[-1] for row in rows if row[-1] != MODEL_INPUT and not row[5].startswith("-")]
    problems = input_lengths(model)[1]
    inputs = {t.name: describe_input(t, model, t.name) for t in model.inputs if t.name not in problems}
    names = {layer.name for layer in model.layers}

    def failure(texts: Sequence[str]) -> str | None:
        sub_model = truncate(model, [parse_layer_spec(text, names) for text in texts])
        if any(tensor.name not in inputs for tensor in sub_model.inputs):
            return None  # An input the export refuses, said above.
        # Id 1 only: below every input's Embedding size, as the launch's own check.
        batch = verification_batch([inputs[t.name] for t in sub_model.inputs], "post", 2)
        forward = tf.function(lambda features: sub_model(features, training=False))
        try:
            on_sample_batch(forward, batch)
        except ExportConfigError as error:
            return str(error)
        return None

    together = failure(specs) if specs else None
    if together is None:
        return []
    failed = {spec: failure([spec]) for spec in specs} if len(specs) > 1 else {specs[0]: together}
    lines = [f"--layer {spec} refused: {problem}" for spec, problem in failed.items() if problem]
    return lines or [f"--layer {', '.join(specs)} refused together: {together}"]


def forward_pass_lines(model: keras.Model, rows: Sequence[LayerRow]) -> list[str]:
    """Which forward pass an export of each exportable layer call would use (`--fast_path auto`).

    From the layers alone; the export also checks the fast path against Keras when
    it loads the model, and records the pass of each column in its manifest.
    """
    from models.fast_path import describe_forward_passes
    from models.truncate import layer_calls

    calls = layer_calls(model)
    tensors: dict[str, LayerOutput] = {}
    for row in rows:
        name, call, kind, spec = row[0], row[2], row[5], row[-1]
        if spec != MODEL_INPUT and not kind.startswith("-"):
            tensors[spec] = calls[name][int(call)]
    if not tensors:
        return []
    passes = describe_forward_passes(tensors)
    width = max(len(spec) for spec in passes)
    lines = [
        "Forward pass per --layer (fast: exact fast path; hybrid: Keras layers on fast outputs; "
        "the run checks either against Keras on a sample batch and records keras if it differs):"
    ]
    lines += [f"  {spec:<{width}}  {p.engine} ({p.reason})" for spec, p in passes.items()]
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status (EXIT_CONFIG_ERROR for a model that cannot load)."""
    parser = CommandParser(prog="python -m pipeline.inspect", description=__doc__)
    add_model_flags(parser, positional_model=True)
    parser.add_argument(
        "--layer",
        action="append",
        default=[],
        metavar="[COLUMN=]LAYER[:CALL]",
        help="Show only these layers; an unknown name is reported with the closest existing names.",
    )
    args = parser.parse_args(argv)
    if args.model is not None and args.model_option is not None and args.model != args.model_option:
        parser.error(f"MODEL {args.model!r} and --model {args.model_option!r} differ: give the model once")
    # The spelling the user gave, for a refusal of its value: `inspect ''` never typed --model.
    model_flag = "MODEL" if args.model is not None else "--model"
    args.model = args.model if args.model is not None else args.model_option
    if args.model is None:
        parser.error("the following arguments are required: MODEL (a bundle directory or .keras/.h5 file)")
    from models.start_lines import import_tensorflow_quietly

    import_tensorflow_quietly()
    refused = removed_working_directory() or unexpanded_home(
        {"MODEL": args.model, "--tokenizer": args.tokenizer}
    )
    if refused:
        print(f"error: {refused}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    from pipeline.errors import ExportConfigError
    from pipeline.planning.checks import TOKENIZER_VALUE, check_flag_not_empty
    from pipeline.planning.model_source import load_model_source

    try:
        # An unset shell variable (`inspect "$MODEL"`) was "--model '' does not exist".
        check_flag_not_empty(model_flag, args.model, optional=False, what="a model bundle directory or file")
        # An unset shell variable (`--tokenizer "$TOKENIZER"`) would silently mean the bundle's own.
        check_flag_not_empty("--tokenizer", args.tokenizer, what=TOKENIZER_VALUE)
        object_storage.configure_for({"MODEL": args.model, "--tokenizer": args.tokenizer})
        model_source = load_model_source(
            args.model,
            args.tokenizer,
            allow_unsafe_deserialization=args.allow_unsafe_deserialization,
            require_tokenizer=False,
        )
        print(report(model_source, args.layer))
    except (ExportConfigError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(stopping.run("python -m pipeline.inspect", main))
