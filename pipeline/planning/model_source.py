"""Loads the model to export, and its tokenizer, from a bundle or a model file at any Beam URI."""

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import tempfile

import keras
from apache_beam.io.filesystems import FileSystems

from models import swap
from models.bundle import (
    DEFAULT_BUNDLE,
    MANIFEST_FILE,
    BundleError,
    check_file_name,
    is_bundle,
    load_bundle,
)
from models.digest import sha256_file
from models.keras2_config import LegacyModelError
from models.keras2_tokenizer import read_tokenizer
from models.legacy import load_model_file
from models.tokenizer import TextTokenizer, Tokenizer
from pipeline.errors import ExportConfigError
from pipeline.planning.plan import NO_TOKENIZER, ExportPlan, wants_no_tokenizer
from pipeline.scratch import held_scratch_directory
from pipeline.uris import file_uri_problem, is_local

MODEL_EXTENSIONS = (".keras", ".h5", ".hdf5")
# The tokenizers a model can come with: this package's, or one read from a Keras 2
# `Tokenizer.to_json()` file or a vocabulary file (`models.keras2_tokenizer.read_tokenizer`).
# Any tokenizer the export can use: this package's, Keras 2's, or a vocabulary file's.
AnyTokenizer = TextTokenizer


@dataclasses.dataclass
class ModelSource:
    """A loaded model with what the export needs to feed it."""

    uri: str
    model: keras.Model
    # None when no input needs one (a model that takes strings, or `--tokenizer none`).
    tokenizer: AnyTokenizer | None
    model_sha256: str
    tokenizer_sha256: str
    # Model input -> corpus field, from the bundle; empty otherwise.
    input_fields: dict[str, str]
    default_layers: list[str]


def is_default_bundle(uri: str) -> bool:
    """Whether `uri` is this installation's copy of the bundled default model."""
    return is_local(uri) and os.path.realpath(uri) == os.path.realpath(DEFAULT_BUNDLE)


def _installed_default_bundle(uri: str) -> str:
    """This installation's default bundle where `uri` is another installation's path to it.

    The launcher records the absolute path of its copy of the default bundle; a
    Dataflow worker has the package installed elsewhere (its site-packages), so it
    finds the same bundle at its own `DEFAULT_BUNDLE`.  The SHA-256 recorded in the
    plan still checks that both are the same model.
    """
    tail = os.sep + os.path.join("models", "data", "default_bundle")
    if is_local(uri) and not os.path.exists(uri) and os.path.normpath(uri).endswith(tail):
        return DEFAULT_BUNDLE
    return uri


def _exists(uri: str) -> bool:
    """Whether `uri` is a file or a directory holding files.

    Object stores have no directories: there a bundle "directory" exists when
    objects are stored under its prefix, which `FileSystems.exists` does not see.
    """
    if FileSystems.exists(uri):
        return True
    return not is_local(uri) and bool(_bundle_objects(uri))


def _bundle_objects(uri: str) -> list[str]:
    """The files of a bundle "directory" on object storage, not its folder marker (a console's `DIR/`)."""
    matched = FileSystems.match([uri.rstrip("/") + "/*"])[0].metadata_list
    return [metadata.path for metadata in matched if not metadata.path.endswith("/")]


def _copy_to(uri: str, local_path: str) -> None:
    with FileSystems.open(uri) as source, open(local_path, "wb") as target:
        for chunk in iter(lambda: source.read(1 << 20), b""):
            target.write(chunk)


def stage_locally(uri: str, directory: str | None = None) -> str:
    """Returns a local path holding `uri`'s file or bundle directory.

    Keras loads from local files only; remote files (gs://, s3://, ...) are
    copied into `directory` (a new temporary directory by default).
    """
    if is_local(uri):
        return uri
    directory = directory or tempfile.mkdtemp(prefix="embexport-model-")
    base = uri.rstrip("/")
    name = base.rsplit("/", 1)[-1]
    if name.endswith(MODEL_EXTENSIONS):
        local = os.path.join(directory, name)
        _copy_to(uri, local)
        return local
    local_dir = os.path.join(directory, name or "bundle")
    os.makedirs(local_dir, exist_ok=True)
    for path in _bundle_objects(base):
        _copy_to(path, os.path.join(local_dir, path.rsplit("/", 1)[-1]))
    return local_dir


def _takes_text(model: keras.Model) -> bool:
    """Whether every input of `model` is a string (a model with TextVectorization inside)."""
    return all(str(getattr(t, "dtype", "")) == "string" for t in model.inputs)


def load_model_source(
    model_uri: str,
    tokenizer_uri: str | None = None,
    allow_unsafe_deserialization: bool = False,
    padding: str | None = None,
    truncating: str | None = None,
    require_tokenizer: bool = True,
) -> ModelSource:
    """Loads `--model` (bundle or file) and its tokenizer.

    Args:
        model_uri: bundle directory or .keras/.h5/.hdf5 file, at any Beam URI.
        tokenizer_uri: tokenizer file (see `models.keras2_tokenizer.read_tokenizer`),
            `NO_TOKENIZER`, or None for the bundle's own.
        allow_unsafe_deserialization: load `Lambda` layers (runs code from the file).
        padding, truncating: "pre"/"post" overrides of the tokenizer's own sides.
        require_tokenizer: False lets a bare model that takes token ids load
            without a tokenizer (for inspection).

    Raises:
        ExportConfigError: with what is wrong and how to fix it.
    """
    problem = file_uri_problem("--model", model_uri)
    if problem:
        raise ExportConfigError(problem)
    location = _installed_default_bundle(model_uri.rstrip("/"))
    with contextlib.ExitStack() as stack:
        try:
            # A remote model's local copy is needed only while it loads (each worker makes its own): in a
            # held folder, which the next command removes if this process is killed meanwhile.
            copy = (
                None
                if is_local(location)
                else stack.enter_context(held_scratch_directory("embexport-model-"))
            )
            local = stage_locally(location, copy) if _exists(location) else None
        except Exception as error:  # No credentials, no such bucket, a failed copy, ...
            if not is_local(location) and isinstance(error, OSError) and error.errno in _FULL:
                raise ExportConfigError(_no_room_for_copy(model_uri)) from None
            raise ExportConfigError(f"Could not read --model {model_uri!r}: {error}") from None
        return _load_staged(
            model_uri,
            local,
            tokenizer_uri,
            allow_unsafe_deserialization,
            padding,
            truncating,
            require_tokenizer,
        )


# A full disk, or this user's quota there reached.
_FULL = (errno.ENOSPC, errno.EDQUOT)


def _no_room_for_copy(model_uri: str) -> str:
    """Says that a remote model's local copy did not fit in the temporary directory.

    "Could not read --model 's3://...': No space left on device" sent users to the bucket; from a
    worker, whose words the launcher reads, it was told as the --output disk that filled. So the
    words of a full disk are not used here.
    """
    return (
        f"--model {model_uri!r} must be copied to this machine to load (Keras loads local files only), "
        f"and the copy does not fit in the temporary directory {tempfile.gettempdir()!r}, which is full. "
        "Point TMPDIR at a folder with room for the model (TMPDIR=/path/with/room python -m pipeline.run "
        "...), or free space there; each worker process copies it too while it loads."
    )


def _check_unchanged(model_uri: str, path: str, sha256: str) -> None:
    """Refuses a model file rewritten while it loaded (a checkpoint callback saving over it).

    Raises:
        ExportConfigError: the file's SHA-256 is no longer the one its rows would be recorded with.
    """
    if sha256_file(path) != sha256:
        raise ExportConfigError(
            f"--model {model_uri!r} changed while it was loaded (its SHA-256 is not the one read "
            "before), so the vectors and the manifest would name different models. Rerun once "
            "nothing writes to it."
        )


def _load_staged(
    model_uri: str,
    local: str | None,
    tokenizer_uri: str | None,
    allow_unsafe_deserialization: bool,
    padding: str | None,
    truncating: str | None,
    require_tokenizer: bool,
) -> ModelSource:
    """`load_model_source` once the model is a local file or directory (`local`; None: it does not exist)."""
    if local is None:
        stopped = swap.stopped_swap_note(model_uri) if is_local(model_uri) else None
        if stopped:
            raise ExportConfigError(f"--model {model_uri!r} does not exist: {stopped}")
        raise ExportConfigError(
            f"--model {model_uri!r} does not exist. Pass a bundle directory written by "
            "`python -m models.train`, or a .keras/.h5 file."
        )
    if os.path.isdir(local):
        saved_model = not is_bundle(local) and os.path.exists(os.path.join(local, "saved_model.pb"))
        # Keras 2 writes its layers beside the graph; Keras 3's model.export() and tf.saved_model.save
        # write traced functions only, which tf_keras loads as an object without layers or save().
        if saved_model and not os.path.exists(os.path.join(local, "keras_metadata.pb")):
            raise ExportConfigError(
                f"--model {model_uri!r} is a TensorFlow SavedModel for serving (Keras 3's model.export() "
                "or tf.saved_model.save), which holds traced functions but no Keras layers to cut. Save "
                "the model itself where it was built, with model.save('model.keras') (Keras 3) or "
                "model.save('model.h5') (Keras 2), and pass that file."
            )
        if saved_model:
            raise ExportConfigError(
                f"--model {model_uri!r} is a TensorFlow SavedModel directory (Keras 2's "
                "model.save('dir')), whose layers Keras 3 cannot load. Load it in tf_keras "
                "(tf_keras.models.load_model(dir)), save it as .h5 (model.save('model.h5')) and pass "
                "that file."
            )
        if not is_bundle(local):
            raise ExportConfigError(
                f"--model {model_uri!r} is a directory without manifest.json, so it is not a "
                "model bundle. Pass a bundle from `python -m models.train` or a .keras/.h5 file."
            )
        try:
            bundle = load_bundle(local)
        except BundleError as error:
            raise ExportConfigError(f"Invalid model bundle {model_uri!r}: {error}") from None
        model_file = bundle.manifest["model_file"]
        _check_unchanged(model_uri, os.path.join(local, model_file), bundle.manifest["sha256"][model_file])
        tokenizer: AnyTokenizer = bundle.tokenizer
        tokenizer_sha256 = bundle.manifest["sha256"][bundle.manifest["tokenizer_file"]]
        if padding or truncating:
            tokenizer = Tokenizer(
                tokenizer.vocabulary,
                padding=padding or tokenizer.padding,
                truncating=truncating or tokenizer.truncating,
            )
        # With `--tokenizer none` the bundle's tokenizer still says how ids are padded.
        if tokenizer_uri and not wants_no_tokenizer(tokenizer_uri):
            tokenizer, tokenizer_sha256 = load_tokenizer(tokenizer_uri, padding, truncating)
        return ModelSource(
            uri=model_uri,
            model=bundle.model,
            tokenizer=tokenizer,
            model_sha256=bundle.manifest["sha256"][bundle.manifest["model_file"]],
            tokenizer_sha256=tokenizer_sha256,
            input_fields=bundle.input_fields,
            default_layers=list(bundle.manifest.get("default_layers", [])),
        )
    if not local.endswith(MODEL_EXTENSIONS):
        raise ExportConfigError(
            f"--model {model_uri!r} has an unknown format: expected a bundle directory or "
            f"a file ending in {', '.join(MODEL_EXTENSIONS)}."
        )
    model_sha256 = sha256_file(local)
    try:
        model = load_model_file(local, allow_unsafe=allow_unsafe_deserialization)
    except LegacyModelError as error:
        raise ExportConfigError(f"Could not load --model {model_uri!r}: {error}") from None
    except Exception as error:  # Keras raises many types for a corrupt file.
        # Keras's messages hold config dumps over several lines: the error is one line.
        raise ExportConfigError(
            f"Could not load --model {model_uri!r} ({type(error).__name__}: {' '.join(str(error).split())}). "
            "Check that it is a complete Keras .keras/.h5 file."
        ) from None
    _check_unchanged(model_uri, local, model_sha256)
    if require_tokenizer:
        _check_reads_text(model_uri, model)
    bare_tokenizer: AnyTokenizer | None = None
    tokenizer_sha256 = ""
    if tokenizer_uri and not wants_no_tokenizer(tokenizer_uri):
        bare_tokenizer, tokenizer_sha256 = load_tokenizer(tokenizer_uri, padding, truncating)
    elif not tokenizer_uri and require_tokenizer and not _takes_text(model):
        raise ExportConfigError(
            f"--model {model_uri!r} is a bare model file, which carries no tokenizer: pass "
            "--tokenizer with the tokenizer it was trained with (this package's tokenizer.json, "
            "a Keras 2 Tokenizer.to_json() file, or a vocabulary file with one token per line), "
            f"or use a bundle directory. If the corpus already holds lists of token ids, pass "
            f"--tokenizer {NO_TOKENIZER}."
        )
    return ModelSource(
        uri=model_uri,
        model=model,
        tokenizer=bare_tokenizer,
        model_sha256=model_sha256,
        tokenizer_sha256=tokenizer_sha256,
        input_fields={},
        default_layers=[],
    )


def _check_reads_text(model_uri: str, model: keras.Model) -> None:
    """Refuses a model none of whose inputs an export can feed: it takes no text (images, numeric features).

    Otherwise the first refusal asked for a --tokenizer, and with one came a second, about an input.
    """
    from pipeline.planning.introspection import embedding_fed_inputs, input_refusals

    # A text model whose inputs are refused (token ids of no fixed length) is told how to fix them.
    text = any(str(tensor.dtype) == "string" for tensor in model.inputs) or embedding_fed_inputs(model)
    if not text and len(input_refusals(model)) == len(model.inputs):
        inputs = ", ".join(f"{t.name!r} {t.dtype} {tuple(t.shape)}" for t in model.inputs)
        raise ExportConfigError(
            f"--model {model_uri!r} reads no text: its input(s) {inputs} are neither strings nor token "
            "ids of a fixed length (an int input of shape (batch, length), or a float one that feeds an "
            "Embedding), so no layer of it can be fed a document. This tool exports text models' layers."
        )


def load_tokenizer(
    uri: str, padding: str | None = None, truncating: str | None = None
) -> tuple[AnyTokenizer, str]:
    """Reads a tokenizer file from any Beam URI; returns `(tokenizer, sha256)`.

    The file is this package's tokenizer JSON, a Keras 2 `Tokenizer.to_json()`
    file or a vocabulary file (`models.keras2_tokenizer.read_tokenizer`).
    """
    problem = file_uri_problem("--tokenizer", uri)
    if problem:
        raise ExportConfigError(problem)
    if not FileSystems.exists(uri):
        raise ExportConfigError(
            f"--tokenizer {uri!r} does not exist; pass the tokenizer file the model was trained with (this "
            "package's tokenizer.json, a Keras 2 Tokenizer.to_json() file, or a vocabulary file with one "
            f"token per line), or --tokenizer {NO_TOKENIZER} if the corpus holds lists of token ids."
        )
    if is_local(uri) and os.path.isdir(uri):
        raise ExportConfigError(
            f"--tokenizer {uri!r} is a directory; pass the tokenizer file in it, such as "
            f"{os.path.join(uri, 'tokenizer.json')!r} (a bundle given as --model carries its own)."
        )
    if is_local(uri) and not os.path.isfile(uri):
        # A named pipe blocks the launch until something writes to it; a shell's `<(cat FILE)` is
        # read once here, and the workers, which read the file again, would find it drained.
        raise ExportConfigError(
            f"--tokenizer {uri!r} is not a regular file (a named pipe, a device, or a shell's "
            "<(...)), which cannot be read again by each worker; pass the tokenizer file itself."
        )
    with FileSystems.open(uri) as handle:
        data = handle.read()
    try:
        tokenizer, _ = read_tokenizer(data, padding, truncating)
    except ValueError as error:
        raise ExportConfigError(f"--tokenizer {uri!r} is not a tokenizer file: {error}") from None
    return tokenizer, hashlib.sha256(data).hexdigest()


def load_plan_tokenizer(plan: ExportPlan) -> AnyTokenizer | None:
    """The tokenizer a worker tokenizes with, read without the model; None when no input needs one.

    Reads `plan.tokenizer_uri`, or else the tokenizer file of the `plan.model_uri`
    bundle, sides set to the plan's `padding` and `truncating`, and checks that it
    is the file the launcher saw (`plan.tokenizer_sha256`).
    """
    if wants_no_tokenizer(plan.tokenizer_uri) or not plan.tokenizer_sha256:
        return None
    if plan.tokenizer_uri:
        tokenizer, sha256 = load_tokenizer(plan.tokenizer_uri, plan.padding, plan.truncating)
    else:
        bundle = _installed_default_bundle(plan.model_uri.rstrip("/"))
        with FileSystems.open(FileSystems.join(bundle, MANIFEST_FILE)) as handle:
            name = json.load(handle)["tokenizer_file"]
        check_file_name(name, "tokenizer_file", FileSystems.join(bundle, MANIFEST_FILE))
        with FileSystems.open(FileSystems.join(bundle, name)) as handle:
            data = handle.read()
        bundled = Tokenizer.from_json(data.decode("utf-8"))
        tokenizer = Tokenizer(bundled.vocabulary, padding=plan.padding, truncating=plan.truncating)
        sha256 = hashlib.sha256(data).hexdigest()
    if sha256 != plan.tokenizer_sha256:
        raise ExportConfigError(
            f"The tokenizer of {plan.tokenizer_uri or plan.model_uri} changed after launch (SHA-256 "
            f"{sha256}, launch saw {plan.tokenizer_sha256}); rerun the export."
        )
    return tokenizer
