"""Checks the flags, alone and against the model: numeric ranges, input format and map, tokenizer, columns.

Each check raises `ExportConfigError` saying what was received and how to fix
it; none reads a file or the network.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
import typing
from collections.abc import Mapping, Sequence

from apache_beam.options.pipeline_options import (
    PipelineOptions,
    PortableOptions,
    SetupOptions,
    StandardOptions,
    TestOptions,
    TypeOptions,
)

from pipeline.errors import ExportConfigError
from pipeline.planning.introspection import EmbeddingLimits
from pipeline.planning.model_source import AnyTokenizer
from pipeline.planning.options import DEFAULT_ID_FIELD, INPUT_FORMATS, ExportOptions
from pipeline.planning.plan import IDS_INPUT, SEQUENCE, TEXT_FIELD, ColumnInfo, InputInfo, wants_no_tokenizer
from pipeline.reading.corpus import OTHER_COMPRESSIONS, TAR_SUFFIXES
from pipeline.running.portable import LOCAL_RUNNERS
from pipeline.running.progress import STALL_LOOK_SECONDS
from pipeline.writing import schema as schema_lib

EXTENSION_FORMATS = {
    ".txt": "text",
    ".text": "text",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".parquet": "parquet",
}
# Each numeric flag's valid range, inclusive, and what it counts: a value outside it (inf, nan,
# negative, or so large that a C call overflows) is refused at launch.
NUMERIC_FLAGS: tuple[tuple[str, int | float, int | float, str], ...] = (
    ("batch_size", 1, 100_000, "documents per forward pass"),
    ("max_error_fraction", 0.0, 1.0, "the share of dead-lettered records that fails a run"),
    ("max_record_bytes", 1, 1 << 30, "bytes of the largest record read (1 GiB at most)"),
    ("limit", 1, sys.maxsize, "records to read"),
    ("shard_mb", 0.001, 1_000_000.0, "MB per output file"),
    ("progress_seconds", 0.1, 86_400.0, "seconds between progress lines"),
    ("checkpoint_seconds", 0.01, 604_800.0, "seconds a row file stays open before it is made durable"),
    ("tf_threads", 0, 1024, "TensorFlow threads per worker process, 0 = automatic"),
    ("worker_start_timeout", 0.0, 86_400.0, "seconds to wait for a first worker, 0 = forever"),
    ("stall_timeout", 0.0, 604_800.0, "seconds without progress that end a run, 0 = never"),
)


# The shortest --stall_timeout other than 0 (never): the watchdog looks every STALL_LOOK_SECONDS at
# most and workers write their counts once a second, so a shorter one ended healthy runs as stalled
# ("no progress for 0:00:00") in the seconds a run rightly stands still between its phases.
MIN_STALL_SECONDS = 2 * STALL_LOOK_SECONDS


def check_numeric_flags(options: ExportOptions) -> None:
    """Refuses a numeric flag outside its range (`NUMERIC_FLAGS`), naming the range.

    Raises:
        ExportConfigError: e.g. `--shard_mb inf`, `--progress_seconds 0`, `--limit -1`,
            `--stall_timeout 0.5`.
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
    if 0 < options.stall_timeout < MIN_STALL_SECONDS:
        raise ExportConfigError(
            f"--stall_timeout must be 0 (never) or at least {MIN_STALL_SECONDS:g} seconds, received "
            f"{options.stall_timeout!r}: a shorter one would end healthy runs, which stand still for "
            "seconds between their phases."
        )


def check_not_empty(options: ExportOptions) -> None:
    """Refuses an empty --model, --output, --reuse or --tokenizer (an unset shell variable).

    Raises:
        ExportConfigError: naming the flag.
    """
    # --model '' was "--model '' does not exist", where pipeline.vocabulary says it is empty.
    check_flag_not_empty("--model", options.model, what="a model bundle or file")
    for flag in ("output", "reuse"):
        check_flag_not_empty(f"--{flag}", getattr(options, flag))
    check_flag_not_empty("--tokenizer", options.tokenizer, what=TOKENIZER_VALUE)


# What an empty --tokenizer is to be given instead.
TOKENIZER_VALUE = "a tokenizer file (or 'none' for a corpus of token ids)"


def check_flag_not_empty(
    flag: str, value: str | None, optional: bool = True, what: str = "a directory"
) -> None:
    """Refuses a path flag given as empty or blank (an unset shell variable); None is not given.

    Taken as not given, it would silently mean the default: the bundled model, the bundle's own
    tokenizer, a fresh output directory.
    """
    if value is not None and not value.strip():
        leave_out = ", or leave the flag out" if optional else ""
        raise ExportConfigError(f"{flag} is empty (an unset shell variable?); give it {what}{leave_out}.")


def escaped(text: str) -> str:
    """`text` with the bytes of a name that is not UTF-8 (held as surrogate escapes) shown as `\\xNN`."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _is_text(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_text_arguments(argv: Sequence[str], paths: Mapping[str, str] = {}) -> None:
    """Refuses a flag value that is not UTF-8 text: a file or folder name in another encoding.

    The OS hands Python such a name (Latin-1 `caf\\xe9.jsonl`, say) as a string
    with surrogate escapes, which the manifest, the Parquet metadata and Beam's
    graph (all UTF-8) cannot hold: the run would fail after its work, at its commit.
    Files that a glob pattern lists are different: their names are recorded escaped
    (`pipeline.reading`).  `paths`: flag -> the absolute local path a relative value
    (or the default --output) stands for, whose folders the command line does not show.

    Raises:
        ExportConfigError: naming the flag, its value escaped, and how to fix it.
    """
    arguments = list(argv)
    for index, argument in enumerate(arguments):
        if _is_text(argument):
            continue
        if argument.startswith("--") and "=" in argument:
            flag, _, value = argument.partition("=")
        elif index and arguments[index - 1].startswith("-"):
            flag, value = arguments[index - 1], argument
        else:
            flag, value = "an argument", argument
        _refuse_name(flag, value)
    for flag, path in paths.items():
        if not _is_text(path):
            _refuse_name(flag, path)


def _utf8_read_as_ascii(value: str) -> str | None:
    """The name `value` is, where it is UTF-8 that Python decoded as ASCII (the C locale with
    PYTHONUTF8=0); else None."""
    if sys.getfilesystemencoding().lower().replace("-", "") == "utf8":
        return None
    try:
        return value.encode(sys.getfilesystemencoding(), "surrogateescape").decode("utf-8")
    except (UnicodeDecodeError, UnicodeEncodeError):
        return None


def _refuse_name(flag: str, value: str) -> typing.NoReturn:
    shown = _utf8_read_as_ascii(value)
    if shown is not None:
        # The name is right; Python's reading of it is not (PEP 538/540 turned off).
        raise ExportConfigError(
            f"{flag} {ascii(shown)} is UTF-8, but Python reads names as {sys.getfilesystemencoding()} here "
            "(the C or POSIX locale with PYTHONUTF8=0), so the manifest and Parquet metadata could not "
            "record it; run the command with PYTHONUTF8=1 (or LC_ALL=C.UTF-8)."
        )
    glob = (
        ", or match the file with a glob pattern such as 'DIR/*.jsonl' (the names of the files a "
        "pattern lists are recorded escaped)"
        if flag == "--input"
        else ""
    )
    raise ExportConfigError(
        f"{flag} '{escaped(value)}' is not UTF-8 text (a file or folder name in another encoding, "
        "such as Latin-1), which the manifest and Parquet metadata cannot record; rename it to UTF-8 "
        f"(e.g. `convmv -f latin1 -t utf-8 --notest NAME`){glob}."
    )


# Values of a flag that read as "no", which Beam's untyped --dry_run takes as true.
FALSE_WORDS = ("false", "f", "no", "n", "off", "0")


def check_beam_flags(options: PipelineOptions) -> None:
    """Refuses Beam flags that pass Beam's parser but would fail the run once it started.

    Raises:
        ExportConfigError: `--runtime_type_check`, which Beam's own file writer fails
            (its WriteImpl declares `str` and emits TimestampedValue: apache/beam PR
            #38155); `--pickle_library dill` without dill installed; `--dry_run=False`,
            which Beam takes as a dry run; on the local runner, `--streaming` and
            `--sdk_worker_parallelism`, which it ignores (a batch run, its own worker processes).
    """
    if options.view_as(TypeOptions).runtime_type_check:
        raise ExportConfigError(
            "--runtime_type_check fails on Beam's own Parquet writer (its declared output type is "
            "wrong: apache/beam pull request 38155); pass --performance_runtime_type_check instead, "
            "which checks the types between steps."
        )
    dry_run = options.view_as(TestOptions).dry_run
    if isinstance(dry_run, str) and dry_run.strip().lower() in FALSE_WORDS:
        # Beam declares --dry_run without a type and tests it for truth: any word makes a dry run.
        raise ExportConfigError(
            f"--dry_run={dry_run} would still make a dry run (Beam takes any value of --dry_run as "
            "true): nothing would be exported. Leave --dry_run out for a real run, or pass --dry_run=True."
        )
    if str(options.view_as(StandardOptions).runner or "").lower() in LOCAL_RUNNERS:
        _check_local_runner_flags(options)
    library = options.view_as(SetupOptions).pickle_library
    if library in ("dill", "dill_unsafe") and importlib.util.find_spec("dill") is None:
        raise ExportConfigError(
            f"--pickle_library {library} needs the dill package, which is not installed; leave the "
            "flag out (Beam's default, cloudpickle) or install apache-beam[dill]."
        )


def _check_local_runner_flags(options: PipelineOptions) -> None:
    """Refuses the Beam flags the local runner ignores: they were accepted, and silently did nothing."""
    if options.view_as(StandardOptions).streaming:
        raise ExportConfigError(
            "--streaming does nothing on the local runner, which reads the corpus (a bounded input) in "
            "one batch run; leave it out."
        )
    if "sdk_worker_parallelism" in options.get_all_options(drop_default=True):
        parallelism = options.view_as(PortableOptions).sdk_worker_parallelism
        raise ExportConfigError(
            f"--sdk_worker_parallelism {parallelism} does nothing on the local runner; for worker "
            "processes pass --direct_running_mode multi_processing --direct_num_workers N (a corpus of "
            "64 MB or more gets one per core by itself)."
        )


def check_id_field(id_field: str) -> None:
    """Refuses an empty `--id_field`: every record would be a dead letter without an id."""
    if not id_field.strip():
        raise ExportConfigError(
            f"--id_field must name the record field that holds each document's id, received {id_field!r}. "
            "Leave it out for the default, 'id'."
        )


def parse_keep_fields(keep_fields: str | None) -> tuple[str, ...]:
    """The fields of `--keep_fields` (None: not given, no field), each stripped of blanks.

    Raises:
        ExportConfigError: the flag given but naming no field (`''`, `' '`, `','`: an unset shell
            variable in `--keep_fields "$FIELDS"`), which exported without any kept field, exit 0.
    """
    fields = tuple(field.strip() for field in (keep_fields or "").split(",") if field.strip())
    if keep_fields is not None and not fields:
        raise ExportConfigError(
            f"--keep_fields {keep_fields!r} names no field (an unset shell variable?); give it the "
            "comma-separated record fields to copy, e.g. --keep_fields kind,topic, or leave the flag out."
        )
    return fields


def check_text_fields(input_format: str, id_field: str, keep_fields: Sequence[str]) -> None:
    """Refuses an --id_field or --keep_fields field that a text corpus (one document per line) cannot have.

    Its records have one field, 'text', and ids FILE:LINE: `--id_field doc` was silently
    ignored, and `--keep_fields topic` a null column said only after the whole run.

    Raises:
        ExportConfigError: naming the flag and what text input gives instead.
    """
    if input_format != "text":
        return
    if id_field != DEFAULT_ID_FIELD:
        raise ExportConfigError(
            f"--id_field {id_field!r} has no field to read in text input, whose ids are FILE:LINE (one "
            "document per line); leave --id_field out, or give a JSONL, CSV or Parquet corpus with an "
            "id field."
        )
    others = [field for field in keep_fields if field != TEXT_FIELD]
    if others:
        raise ExportConfigError(
            f"--keep_fields {','.join(others)!r} is no field of text input, whose records have one "
            f"field, '{TEXT_FIELD}' (one document per line); keep '{TEXT_FIELD}' or nothing, or give a "
            "JSONL, CSV or Parquet corpus with those fields."
        )


def detect_format(pattern: str, input_format: str) -> str:
    """Resolves `--input_format auto` from the pattern's extension.

    Raises:
        ExportConfigError: an extension that tells no format, or a compression or archive the
            reader does not take (each file would be an unreadable_file dead letter, whatever
            --input_format says, and the run fail after its work).
    """
    name = pattern.lower()
    if name.endswith(OTHER_COMPRESSIONS) or name.endswith(TAR_SUFFIXES):
        kind = "a tar archive" if name.endswith(TAR_SUFFIXES) else f"{os.path.splitext(name)[1]}-compressed"
        raise ExportConfigError(
            f"--input {pattern!r} names files that are {kind}, which the reader does not take (it reads "
            "plain and gzip files); "
            + (
                "extract them (tar -xf FILE) and pass a pattern of their files."
                if name.endswith(TAR_SUFFIXES)
                else "recompress them with gzip (.gz) or decompress them, and pass that pattern."
            )
        )
    if input_format != "auto":
        return input_format
    stem = pattern[:-3] if pattern.lower().endswith(".gz") else pattern  # The reader takes .GZ too.
    extension = os.path.splitext(stem)[1].lower()
    if extension not in EXTENSION_FORMATS:
        raise ExportConfigError(
            f"Cannot tell the format of --input {pattern!r} from its extension; pass "
            f"--input_format ({', '.join(f for f in INPUT_FORMATS if f != 'auto')})."
        )
    return EXTENSION_FORMATS[extension]


def parse_input_map(entries: Sequence[str] | None) -> dict[str, str]:
    """`--input_map INPUT=FIELD` entries as {model input: corpus field}."""
    mapping: dict[str, str] = {}
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


def resolve_input_map(
    needed: Sequence[str],
    explicit: Mapping[str, str],
    bundle_fields: Mapping[str, str],
    input_format: str,
    model_inputs: Sequence[str] = (),
) -> dict[str, str]:
    """Maps each needed model input to a corpus field.

    Explicit `--input_map` entries win, then the bundle's manifest, then a field of
    the input's own name (for text files, the line itself). `model_inputs`: all the
    model's inputs, to tell a name the model lacks from one the layers do not need.
    """
    absent = sorted(set(explicit) - set(model_inputs or needed))
    if absent:
        # Keras 2 numbers default input names per process (input_1, input_3, ...): a guess often misses.
        example = f", e.g. {needed[0]}={explicit[absent[0]]}" if needed else ""
        raise ExportConfigError(
            f"--input_map names {absent}, which the model has no input of; its inputs are "
            f"{list(model_inputs or needed)}, and the exported layers need {list(needed)}. Rename "
            f"those --input_map entries to the model's input names{example} "
            "(`python -m pipeline.inspect MODEL` lists them)."
        )
    unknown = sorted(set(explicit) - set(needed))
    if unknown:
        raise ExportConfigError(
            f"--input_map names {unknown}, which the exported layers do not need; the "
            f"sub-model's inputs are {list(needed)}. Remove those --input_map entries."
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


def check_tokenizer_present(
    inputs: Sequence[InputInfo], tokenizer: AnyTokenizer | None, tokenizer_flag: str | None
) -> None:
    """Refuses token-id inputs without a tokenizer, unless `--tokenizer none` says the corpus holds ids."""
    if tokenizer is None and not wants_no_tokenizer(tokenizer_flag):
        ids_inputs = [info.name for info in inputs if info.takes == IDS_INPUT]
        if ids_inputs:
            raise ExportConfigError(
                f"The exported layers read token-id input(s) {ids_inputs}, but there is no "
                "tokenizer: pass --tokenizer, or --tokenizer none if the corpus holds lists of token ids."
            )


def check_vocabulary_fits(limits: EmbeddingLimits, tokenizer: AnyTokenizer | None) -> None:
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


def output_column_names(keep_fields: Sequence[str], columns: Sequence[ColumnInfo]) -> list[str]:
    """The output's column names in schema order (see `schema.output_schema`)."""
    names = [schema_lib.ID_COLUMN, *keep_fields]
    for column in columns:
        names.append(column.column)
        if column.kind == SEQUENCE and column.pooling == "none":
            names.append(column.column + schema_lib.TOKENS_SUFFIX)
    return [*names, schema_lib.FINGERPRINT_COLUMN]


def check_column_names(keep_fields: Sequence[str], columns: Sequence[ColumnInfo]) -> None:
    """Refuses two output columns of one name, also in another case, which readers cannot tell apart.

    DuckDB and BigQuery take column names case-insensitively (`ID` beside `id`
    is read as `ID_1`, or refused); pandas and pyarrow cannot read two of one name.
    """
    names = output_column_names(keep_fields, columns)
    folded = [name.casefold() for name in names]
    repeated = sorted({name for name in names if folded.count(name.casefold()) > 1})
    if repeated:
        raise ExportConfigError(
            f"The output would have several columns named {', '.join(map(repr, repeated))} (its "
            f"columns: {names}); pandas and pyarrow cannot read such a file, nor DuckDB and "
            "BigQuery one whose names differ only in case. Give --layer a "
            "different COLUMN= name, or list each --keep_fields field once and not as 'id' "
            "or a layer column."
        )
