"""Checks a --reuse export at launch: a finished export of the same model and settings, its shards intact.

`reuse_signature` says what must be equal for an earlier export's rows to be
this export's rows; the manifest of every export records it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shlex
from collections.abc import Mapping
from typing import Any, TypedDict

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from pipeline.errors import ExportConfigError, LockUnavailableError, OutputBusyError
from pipeline.planning.locations import check_location
from pipeline.planning.plan import ExportPlan
from pipeline.uris import is_local
from pipeline.writing import schema as schema_lib
from pipeline.writing.layout import JOURNAL

# A manifest (`_MANIFEST.json`) or one of its entries, as JSON gives it: its values are arbitrary.
Manifest = Mapping[str, Any]

# How this code computes a row from a model, its settings and a document's text. Raise it
# with every change that alters some row's values (a fix to a forward pass, a Keras 2
# translation, pooling, float16 storage): --reuse and a resumed run then refuse rows of
# the code before, as they refuse another model's. Exports made before it was recorded
# count as 1; 2 is the first recorded (Keras 2's hard_sigmoid, float32 pooling of
# float16 values, float16 overflow as dead letters); 3: string models without a fixed
# output_sequence_length run each document as if alone, ids behind Hashing/IntegerLookup
# are not limited by the Embedding's input_dim, Parquet binary kept fields are text (or
# base64), not Python reprs; 4: Keras's forward pass runs whole blocks of 8 rows, so a row no longer
# depends on how many documents share its batch (the last row of an odd batch took other sums). Raise it
# too when setup.py moves TensorFlow or Keras to another minor version, unless the rows stay equal bit
# for bit: their versions are not compared (docs/reuse.md).
ROWS_VERSION = 4


class InputSignature(TypedDict):
    """What `reuse_signature` records of one model input."""

    name: str
    length: int
    kind: str


class ReuseSignature(TypedDict):
    """The settings an earlier export's rows were made with (see `reuse_signature`)."""

    model_sha256: str
    tokenizer_sha256: str
    columns: list[dict[str, Any]]
    dtype: str
    padding: str
    truncating: str
    inputs: list[InputSignature]
    fast_path: str
    rows_version: int
    onednn: bool | None


def reuse_signature(plan: ExportPlan) -> ReuseSignature:
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
        "rows_version": ROWS_VERSION,
        # TensorFlow's oneDNN kernels (TF_ENABLE_ONEDNN_OPTS) change the last bits of some rows;
        # chosen with the forward passes, compared by `check_reuse_forward_passes`.
        "onednn": plan.onednn,
    }


def _newer(rows_version: object) -> bool:
    return isinstance(rows_version, int) and rows_version > ROWS_VERSION


def check_reuse(uri: str, plan: ExportPlan) -> tuple[tuple[str, str], ...]:
    """Refuses a --reuse that is not a finished export made with the same model and settings.

    Returns:
        The earlier export's row shards (URIs), from its manifest.

    Raises:
        ExportConfigError: naming what differs and how to proceed.
    """
    from pipeline.writing.commit import finish_failure, finish_interrupted_commit
    from pipeline.writing.state import output_state, read_manifest

    check_location("reuse", uri)
    # An export whose commit a crash cut short is finished before it is read.
    try:
        finish_interrupted_commit(uri)
    except OutputBusyError:
        raise ExportConfigError(
            f"--reuse {uri!r} is being committed by another run (an --overwrite of it): wait for that "
            "run to finish, then rerun this one."
        ) from None
    except LockUnavailableError as error:  # Its own --output's message would name the wrong flag.
        raise ExportConfigError(
            f"--reuse {uri!r} holds an export whose commit was cut short ({JOURNAL}), which must be finished "
            f"before it is read, and finishing it writes there: its lock cannot be written ({error.reason}). "
            "Make it writable (or copy it to a writable place and pass that as --reuse), then rerun."
        ) from None
    except ExportConfigError:
        raise
    except OSError as error:  # A full disk, a read-only filesystem as the commit is finished.
        raise ExportConfigError(
            f"--reuse {uri!r} holds an export whose commit was cut short ({JOURNAL}), and finishing it "
            f"failed: {finish_failure(error, 'it')}, then rerun."
        ) from None
    except Exception as error:  # Unreadable, no credentials, ...
        raise ExportConfigError(f"Cannot read --reuse {uri!r}: {type(error).__name__}: {error}") from None
    try:
        manifest = read_manifest(uri)
    except Exception as error:  # Unreadable, not JSON, no credentials, ...
        raise ExportConfigError(f"Cannot read the manifest of --reuse {uri!r}: {error}") from None
    if manifest is None:
        if is_local(uri) and os.path.isfile(uri):
            raise ExportConfigError(
                f"--reuse {uri!r} is a file; --reuse takes a finished export's directory (the one "
                f"holding _MANIFEST.json and the part-* shards), e.g. {os.path.dirname(uri) or '.'!r}."
            )
        state = "missing" if output_state(uri) == "empty" else "unfinished or not an export"
        raise ExportConfigError(
            f"--reuse {uri!r} is {state}: it has no _MANIFEST.json, which a finished export "
            "writes last. Pass a finished export's directory, or leave --reuse out for a full export."
        )
    if not {"status", "shards"} <= manifest.keys():  # Another tool's manifest (see writing.state).
        raise ExportConfigError(
            f"--reuse {uri!r} is not an export: its _MANIFEST.json was written by another tool. Pass "
            "a finished export's directory, or leave --reuse out for a full export."
        )
    earlier = manifest.get("reuse_signature")
    if earlier is not None and not isinstance(earlier, dict):
        raise ExportConfigError(
            f"--reuse {uri!r} is damaged: the reuse_signature of its _MANIFEST.json is not a JSON "
            "object. Reuse an intact export, or leave --reuse out for a full export."
        )
    if earlier is None:
        raise ExportConfigError(
            f"--reuse {uri!r} was written by a version that did not record input fingerprints, so "
            "its rows cannot be matched to documents. Run one full export (without --reuse) and "
            "reuse that one from then on."
        )
    current: Mapping[str, Any] = reuse_signature(plan)
    rows_version = earlier.get("rows_version", 1)
    if rows_version != ROWS_VERSION:
        raise ExportConfigError(
            f"--reuse {uri!r} was written by {'a later' if _newer(rows_version) else 'an earlier'} "
            f"version of this tool, which computes some rows differently (rows version {rows_version}, "
            f"now {ROWS_VERSION}): its vectors may differ from this export's. Run one full export "
            "(without --reuse) and reuse that one from then on."
        )
    # Where the earlier export recorded each column's forward pass, those are compared once this
    # launch has chosen its own (`check_reuse_forward_passes`), not the --fast_path flags.
    passes_recorded = earlier_forward_passes(manifest) is not None
    differences = [
        key
        for key in current
        if current[key] != earlier.get(key)
        and not (key == "fast_path" and passes_recorded)
        and key != "onednn"  # Not chosen yet: compared by `check_reuse_forward_passes`.
    ]
    if differences == ["columns"] or sorted(differences) == ["columns", "inputs"]:
        # The inputs follow from the columns: say what differs, and the way on.
        raise ExportConfigError(
            _other_columns_message(uri, manifest, earlier.get("columns"), current["columns"])
        )
    if differences:
        details = "; ".join(
            f"{key}: earlier {_setting_text(key, earlier.get(key))}, now {_setting_text(key, current[key])}"
            for key in differences
        )
        raise ExportConfigError(
            f"--reuse {uri!r} cannot be reused: its rows were made with other settings ({details}). "
            "Its vectors would differ from this export's; leave --reuse out for a full export."
        )
    return tuple(check_reuse_shards(uri, manifest, plan))


def earlier_forward_passes(manifest: Manifest) -> dict[str, str] | None:
    """Each column's forward pass (its engine) as an export's manifest records it.

    None for an export made before each column's forward pass was recorded, or whose
    record is damaged: its `--fast_path` flag is compared instead. The engine alone:
    what the fast path runs for a model follows from the model, its settings and the
    code (`rows_version`), and its wording may change.
    """
    columns = manifest.get("columns")
    if not isinstance(columns, list) or not columns:
        return None
    passes = {}
    for column in columns:
        engine = column.get("forward_pass") if isinstance(column, Mapping) else None
        if not isinstance(engine, str) or not engine:
            return None
        passes[str(column.get("column"))] = engine
    return passes


def _forward_pass_text(engine: str | None) -> str:
    from models.fast_path import FAST, KERAS
    from pipeline.inference.forward_pass import NO_FORWARD_PASS

    if engine == KERAS:
        return "Keras's own forward pass"
    if engine == NO_FORWARD_PASS:
        return "no forward pass (stored as token ids)"
    if engine == FAST:
        return "the fast path"
    return f"the fast path ({engine})" if engine else "an unrecorded forward pass"


def check_reuse_forward_passes(plan: ExportPlan) -> None:
    """Refuses a --reuse export some column of which another forward pass computed than this launch chose.

    The fast path equals Keras's forward pass to 1e-5, not bit for bit, so rows of the
    two never share a column. Which one computes a column depends on the --fast_path
    flag and on the launch's check of the fast path against Keras on a sample batch,
    which another machine (other CPU instructions, TensorFlow build) can decide
    otherwise under the same flag. Call it once `plan.forward_passes` are chosen.

    Raises:
        ExportConfigError: naming the column, both forward passes and the way on.
    """
    from models.fast_path import KERAS
    from pipeline.writing.state import read_manifest

    if not plan.reuse:
        return
    try:
        manifest = read_manifest(plan.reuse)
    except Exception as error:  # Replaced or removed since `check_reuse` read it.
        raise ExportConfigError(f"Cannot read the manifest of --reuse {plan.reuse!r}: {error}") from None
    _check_reuse_onednn(plan, manifest or {})
    earlier = earlier_forward_passes(manifest or {})
    if earlier is None:  # Compared by the --fast_path flag in `check_reuse`.
        return
    for column, engine, reason in plan.forward_passes:
        if earlier.get(column) == engine:
            continue
        full = "leave --reuse out for a full export"
        if earlier.get(column) == KERAS:
            way_on = f"Rerun with --fast_path off, as its rows were computed, or {full}."
        elif plan.fast_path == "off":
            way_on = f"Rerun without --fast_path off, as its rows were computed, or {full}."
        else:
            way_on = f"{full.capitalize()} (or run where the earlier export was made)."
        why = f" (this launch: {reason})" if engine == KERAS and reason else ""
        raise ExportConfigError(
            f"--reuse {plan.reuse!r} cannot be reused: its column {column} was computed by "
            f"{_forward_pass_text(earlier.get(column))}, this run computes it by "
            f"{_forward_pass_text(engine)}{why}. The two agree to 1e-5, not bit for bit, so its "
            f"vectors would differ from this export's. {way_on}"
        )


def _check_reuse_onednn(plan: ExportPlan, manifest: Manifest) -> None:
    """Refuses a --reuse export whose rows were computed with the other oneDNN setting than this launch's.

    An export from before the setting was recorded is not refused: TensorFlow's default (on) is
    the likely one, and its rows were reused before.
    """
    from pipeline.inference.forward_pass import onednn_text

    signature = manifest.get("reuse_signature")
    earlier = signature.get("onednn") if isinstance(signature, Mapping) else None
    if not isinstance(earlier, bool) or plan.onednn is None or earlier == plan.onednn:
        return
    raise ExportConfigError(
        f"--reuse {plan.reuse!r} cannot be reused: its rows were computed with TensorFlow's oneDNN kernels "
        f"{onednn_text(earlier)}, this run computes with them {onednn_text(plan.onednn)}, which changes the "
        f"last bits of some rows, so its vectors would differ from this export's. Rerun with "
        f"TF_ENABLE_ONEDNN_OPTS={1 if earlier else 0}, as its rows were computed, or leave --reuse out for a "
        "full export."
    )


def _column_text(column: object) -> str:
    """One column of a reuse signature as `COLUMN=LAYER:CALL` and what sets its rows apart."""
    if not isinstance(column, Mapping):
        return repr(column)
    spec = f"{column.get('layer')}" + (f":{column.get('call')}" if column.get("call") else "")
    text = spec if column.get("column") == spec else f"{column.get('column')}={spec}"
    details = [
        *([f"pooling {column.get('pooling')}"] if column.get("pooling") not in (None, "none") else []),
        *([f"token_storage {column.get('token_storage')}"] if column.get("token_storage") == "ids" else []),
    ]
    return text + (f" ({', '.join(details)})" if details else "")


def _setting_text(key: str, value: object) -> str:
    # The columns by name: their recorded dicts (nine fields each) made a line of hundreds of characters.
    return _columns_text(value) if key == "columns" else repr(value)


def _columns_text(columns: object) -> str:
    if not isinstance(columns, list):
        return repr(columns)
    return ", ".join(_column_text(column) for column in columns) or "none"


def _other_columns_message(uri: str, manifest: Manifest, earlier: object, current: list[Any]) -> str:
    """The refusal of an earlier export whose settings are this one's but for the columns.

    A subset is not reused either: each of its rows was computed together with the other
    columns (one forward pass, one fast-path check for all), so it is not known to equal,
    bit for bit, a row computed for the subset alone.
    """
    earlier_texts = [_column_text(c) for c in earlier] if isinstance(earlier, list) else []
    subset = bool(earlier_texts) and {_column_text(c) for c in current} <= set(earlier_texts)
    options = manifest.get("options")
    options = options if isinstance(options, Mapping) else {}
    layers = options.get("layer")
    others = "".join(f" --{name} {options[name]}" for name in ("pooling", "token_storage") if name in options)
    if isinstance(layers, list) and layers:
        how = "with " + " ".join(f"--layer {shlex.quote(str(layer))}" for layer in layers) + others
    else:
        how = "without --layer (its columns are the bundle's default layers)" + (
            f" and with{others}" if others else ""
        )
    way_on = (
        f"To reuse it, rerun {how}, as it was made, and read only the columns you need; or leave "
        "--reuse out for a full export of these."
        if subset
        else "Leave --reuse out for a full export of these columns (and --reuse that export from then on)."
    )
    return (
        f"--reuse {uri!r} holds the columns {_columns_text(earlier)}; this export asks for "
        f"{_columns_text(current)}. Rows are reused only into an export of the same columns (a row is "
        f"computed for all of its columns together). {way_on}"
    )


def recorded_digest(entry: Manifest) -> str:
    """A shard's digest as its manifest records it: "sha256:HEX" (local), "checksum:VALUE" (object store)."""
    return f"sha256:{entry['sha256']}" if "sha256" in entry else f"checksum:{entry['checksum']}"


def _recorded_digest_matches(path: str, entry: Manifest) -> str | None:
    """None if the shard's bytes match what the manifest records for it, else what differs.

    The manifest records `sha256` (local exports) or the store's `checksum`
    (object storage, see `output.file_digest`); whichever is there is checked.
    """
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


def _shard_problem(path: str, entry: Manifest, plan: ExportPlan) -> str | None:
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


def check_reuse_shards(uri: str, manifest: Manifest, plan: ExportPlan) -> list[tuple[str, str]]:
    """The row shards of a --reuse export and their digests (`recorded_digest`), each checked first.

    Each shard must be a file directly in `uri` (no path leaving it, no link
    out of it), of the recorded size and SHA-256 (or object-store checksum)
    and row count, and its own Parquet metadata must name this export's model,
    tokenizer, dtype and columns.

    Raises:
        ExportConfigError: naming the first damaged shard and what is wrong with it.
    """
    from pipeline.writing.files import join
    from pipeline.writing.layout import SHARD_NAME

    def damaged(name: object, problem: str) -> ExportConfigError:
        return ExportConfigError(
            f"--reuse {uri!r} is damaged: row shard {name!r} {problem}. Its rows cannot be trusted; "
            "reuse an intact export, or leave --reuse out for a full export."
        )

    shards = manifest.get("shards")
    entries = shards.get("rows") if isinstance(shards, dict) else None
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
        paths.append((path, recorded_digest(entry)))
    return paths
