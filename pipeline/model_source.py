"""Loads the model to export, and its tokenizer, from a bundle or a model file at any Beam URI."""

import dataclasses
import hashlib
import os
import tempfile

import keras
from apache_beam.io.filesystems import FileSystems

from models.bundle import BundleError, is_bundle, load_bundle, sha256_file
from models.tokenizer import Tokenizer

MODEL_EXTENSIONS = (".keras", ".h5", ".hdf5")


class ExportConfigError(ValueError):
    """A flag, the model or the output location cannot work; raised before launch."""


@dataclasses.dataclass
class ModelSource:
    """A loaded model with what the export needs to feed it."""

    uri: str
    model: keras.Model
    tokenizer: Tokenizer
    model_sha256: str
    tokenizer_sha256: str
    input_fields: dict  # model input -> corpus field, from the bundle; empty otherwise
    default_layers: list


def _is_local(uri):
    return FileSystems.get_scheme(uri) in (None, "file")


def _copy_to(uri, local_path):
    with FileSystems.open(uri) as source, open(local_path, "wb") as target:
        for chunk in iter(lambda: source.read(1 << 20), b""):
            target.write(chunk)


def stage_locally(uri, directory=None):
    """Returns a local path holding `uri`'s file or bundle directory.

    Keras loads from local files only; remote files (gs://, s3://, ...) are
    copied into `directory` (a new temporary directory by default).
    """
    if _is_local(uri):
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
    for metadata in FileSystems.match([base + "/*"])[0].metadata_list:
        _copy_to(metadata.path, os.path.join(local_dir, metadata.path.rsplit("/", 1)[-1]))
    return local_dir


def _file_sha256(path):
    return sha256_file(path) if os.path.isfile(path) else hashlib.sha256(b"").hexdigest()


def load_model_source(model_uri, tokenizer_uri=None):
    """Loads `--model` (bundle or file) and its tokenizer.

    Raises:
        ExportConfigError: with what is wrong and how to fix it.
    """
    if not FileSystems.exists(model_uri.rstrip("/")):
        raise ExportConfigError(
            f"--model {model_uri!r} does not exist. Pass a bundle directory written by "
            "`python -m models.train`, or a .keras/.h5 file."
        )
    try:
        local = stage_locally(model_uri)
    except Exception as error:
        raise ExportConfigError(f"Could not read --model {model_uri!r}: {error}") from None
    if os.path.isdir(local):
        if not is_bundle(local):
            raise ExportConfigError(
                f"--model {model_uri!r} is a directory without manifest.json, so it is not a "
                "model bundle. Pass a bundle from `python -m models.train` or a .keras/.h5 file."
            )
        try:
            bundle = load_bundle(local)
        except BundleError as error:
            raise ExportConfigError(f"Invalid model bundle {model_uri!r}: {error}") from None
        tokenizer = bundle.tokenizer
        tokenizer_sha256 = bundle.manifest["sha256"][bundle.manifest["tokenizer_file"]]
        if tokenizer_uri:
            tokenizer, tokenizer_sha256 = load_tokenizer(tokenizer_uri)
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
    try:
        model = keras.saving.load_model(local, compile=False)
    except Exception as error:  # Keras raises many types for a corrupt file.
        raise ExportConfigError(
            f"Could not load --model {model_uri!r} ({type(error).__name__}: {error}). Check "
            "that it is a complete Keras .keras/.h5 file."
        ) from None
    if not tokenizer_uri:
        raise ExportConfigError(
            f"--model {model_uri!r} is a bare model file, which carries no tokenizer: pass "
            "--tokenizer with the tokenizer it was trained with, or use a bundle directory."
        )
    tokenizer, tokenizer_sha256 = load_tokenizer(tokenizer_uri)
    return ModelSource(
        uri=model_uri,
        model=model,
        tokenizer=tokenizer,
        model_sha256=_file_sha256(local),
        tokenizer_sha256=tokenizer_sha256,
        input_fields={},
        default_layers=[],
    )


def load_tokenizer(uri):
    """Reads a tokenizer file from any Beam URI; returns `(tokenizer, sha256)`."""
    if not FileSystems.exists(uri):
        raise ExportConfigError(f"--tokenizer {uri!r} does not exist.")
    with FileSystems.open(uri) as handle:
        data = handle.read()
    try:
        tokenizer = Tokenizer.from_json(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise ExportConfigError(f"--tokenizer {uri!r} is not a tokenizer file: {error}") from None
    return tokenizer, hashlib.sha256(data).hexdigest()
