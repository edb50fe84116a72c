"""Builds the `ExportPlan` from the flags and the loaded model, refusing at launch what cannot work.

Everything that can be wrong with the model, the layers, the input mapping or
the output location is found here, on the launching machine, before any worker
exists.  Workers receive only the plan and load the model themselves.
"""

from __future__ import annotations

import dataclasses
import logging

from pipeline.planning.checks import (
    check_column_names,
    check_id_field,
    check_numeric_flags,
    check_text_fields,
    check_tokenizer_present,
    check_vocabulary_fits,
    detect_format,
    parse_input_map,
    parse_keep_fields,
    resolve_input_map,
)
from pipeline.planning.introspection import (
    check_float_inputs_feed_an_embedding,
    cut_model,
    default_layer_names,
    describe_columns,
    describe_inputs,
    embedding_limits,
)
from pipeline.planning.locations import check_locations, listing_sha256
from pipeline.planning.model_source import ModelSource, load_model_source
from pipeline.planning.options import ExportOptions
from pipeline.planning.plan import IDS_INPUT, ExportPlan, wants_no_tokenizer
from pipeline.planning.reuse import check_reuse
from pipeline.writing.token_tables import apply_token_storage


def build_plan(options: ExportOptions, check_remote: bool = True) -> tuple[ExportPlan, ModelSource]:
    """Validates `options` (an `ExportOptions` view) and returns `(plan, model_source)`.

    Args:
        options: the `ExportOptions` view of the pipeline options.
        check_remote: False skips listing --input and --output where they are
            object-store URIs (gs://, s3://), for a --dry_run without credentials.

    Raises:
        ExportConfigError: anything that would make the run fail or write nonsense.
    """
    check_numeric_flags(options)
    check_id_field(options.id_field)
    input_files = check_locations(options, check_remote)
    input_format = detect_format(options.input, options.input_format)
    keep_fields = parse_keep_fields(options.keep_fields)
    check_text_fields(input_format, options.id_field, keep_fields)
    explicit_map = parse_input_map(options.input_map)
    model_source = load_model_source(
        options.model,
        options.tokenizer,
        allow_unsafe_deserialization=options.allow_unsafe_deserialization,
        padding=options.padding,
        truncating=options.truncating,
    )
    model = model_source.model
    specs, sub_model = cut_model(
        model, options.layer or model_source.default_layers or default_layer_names(model)
    )
    mapping = resolve_input_map(
        [t.name for t in sub_model.inputs],
        explicit_map,
        model_source.input_fields,
        input_format,
        model_inputs=[t.name for t in model.inputs],
    )
    inputs = describe_inputs(sub_model, mapping)
    check_tokenizer_present(inputs, model_source.tokenizer, options.tokenizer)
    columns = describe_columns(sub_model, specs, inputs, options.pooling)
    columns = apply_token_storage(model, specs, columns, options.token_storage, options.pooling)
    check_column_names(keep_fields, columns)
    limits = embedding_limits(sub_model, inputs)
    check_float_inputs_feed_an_embedding(sub_model, inputs, limits)
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
        input_listing_sha256=listing_sha256(input_files, input_format) if input_files else "",
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
    if not any(info.takes == IDS_INPUT for info in inputs):
        plan = _without_tokenizer(plan, options)
    if options.reuse:
        shards = check_reuse(options.reuse, plan)
        plan = dataclasses.replace(
            plan,
            reuse=options.reuse,
            reuse_files=tuple(path for path, _ in shards),
            reuse_digests=tuple(digest for _, digest in shards),
        )
    return plan, model_source


def _without_tokenizer(plan: ExportPlan, options: ExportOptions) -> ExportPlan:
    """`plan` of layers that read text only: no tokenizer, and the default sides, whatever the flags.

    The model's own layers tokenize, pad and cut every input these layers read, so
    a --tokenizer, --padding or --truncating changes no byte: they are no part of
    the plan, nor of what --reuse and a resumed run compare. Given, they are said
    to be unused.
    """
    unused = [
        flag
        for flag, value in (
            ("--tokenizer", None if wants_no_tokenizer(options.tokenizer) else options.tokenizer),
            ("--padding", options.padding),
            ("--truncating", options.truncating),
        )
        if value
    ]
    if unused:
        logging.warning(
            "%s not used: every input the exported layers read takes text, which the model's own "
            "layers tokenize, pad and cut.",
            " and ".join(unused),
        )
    return dataclasses.replace(plan, tokenizer_uri="", tokenizer_sha256="", padding="pre", truncating="pre")
