"""The model bundle: a directory with the `.keras` model, its tokenizer and a manifest.

Layout::

    BUNDLE/
      model.keras      the trained Keras 3 model (no Lambda layers: loads in safe mode)
      tokenizer.json   the `models.tokenizer.Tokenizer` used in training
      manifest.json    which input reads which corpus field, sequence lengths,
                       padding side, label names, SHA-256 of both files,
                       training metrics and library versions

`load_bundle` checks all of it and raises `BundleError` saying what is wrong
and how to fix it.  Paths here are local: callers that read bundles from object
storage copy them to a local directory first.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import tempfile
import typing
import zipfile
from collections.abc import Mapping

import keras

from models import __version__, swap
from models.digest import sha256_file
from models.legacy import custom_class_error, read_model_config
from models.paths import DEFAULT_BUNDLE  # noqa: F401  (re-exported)
from models.tokenizer import Tokenizer

FORMAT = "embexport-bundle"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.keras"
TOKENIZER_FILE = "tokenizer.json"


# The manifest.json object: the keys `save_bundle` writes, `read_manifest` checks the
# ones loading needs, and the trainer adds its own (topology, sizes, ...).
Manifest = dict[str, typing.Any]


class InputEntry(typing.TypedDict):
    """One entry of the manifest's `inputs`: a model input, the corpus field it reads, its token ids."""

    name: str
    field: str
    length: int


class LabelInfo(typing.TypedDict):
    """One entry of the manifest's `labels`: the corpus field an output was trained on, its class names."""

    field: str
    classes: list[str]


class BundleError(ValueError):
    """A bundle directory is missing, incomplete, corrupt or inconsistent."""


@dataclasses.dataclass
class Bundle:
    """A loaded bundle: the model, its tokenizer and its manifest dict."""

    path: str
    model: keras.Model
    tokenizer: Tokenizer
    manifest: Manifest

    @property
    def input_fields(self) -> dict[str, str]:
        """Model input name -> corpus field it reads."""
        return {entry["name"]: entry["field"] for entry in self.manifest["inputs"]}

    @property
    def sequence_lengths(self) -> dict[str, int]:
        """Model input name -> number of token ids it takes."""
        return {entry["name"]: entry["length"] for entry in self.manifest["inputs"]}


def library_versions() -> dict[str, str]:
    """The versions of this package, Keras, TensorFlow and Python, as a bundle records them."""
    import tensorflow as tf

    return {
        "package": __version__,
        "keras": keras.__version__,
        "tensorflow": tf.__version__,
        "python": platform.python_version(),
    }


def save_bundle(
    directory: str,
    model: keras.Model,
    tokenizer: Tokenizer,
    input_fields: Mapping[str, str],
    labels: Mapping[str, LabelInfo] | None = None,
    metrics: Mapping[str, Mapping[str, float]] | None = None,
    extra: Mapping[str, typing.Any] | None = None,
) -> Manifest:
    """Writes a bundle.

    Args:
        directory: target directory: created, or an empty directory, or an earlier bundle
            (holding only a bundle's files), which is replaced as a whole.
        model: a Keras model whose inputs are named.
        tokenizer: the `Tokenizer` that produced its training ids.
        input_fields: model input name -> corpus field it reads.
        labels: output name -> {"field": corpus field, "classes": [names]}.
        metrics: held-out metrics to record.
        extra: other JSON-serialisable facts to record (topology, sizes, ...).

    Returns:
        The manifest dict that was written.

    Raises:
        BundleError: `directory` is a file or a link, or holds files that are not a bundle's.
    """
    check_replaceable(directory)
    absolute = os.path.abspath(directory)
    parent = os.path.dirname(absolute)
    os.makedirs(parent, exist_ok=True)
    # Written whole in a sibling directory (same filesystem, so renames are atomic), then
    # swapped in: a failure part-way leaves the earlier bundle as it was, still loadable.
    staging = tempfile.mkdtemp(dir=parent, prefix=swap.staging_prefix(absolute))
    try:
        # Locked while written, so that another run's `swap.recover` sees it is not stale.
        with swap.held(staging):
            # mkdtemp makes it private (0700); a bundle directory gets the usual permissions.
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(staging, 0o777 & ~umask)
            manifest = _write_bundle_files(staging, model, tokenizer, input_fields, labels, metrics, extra)
            swap.swap_in(staging, absolute)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _write_bundle_files(
    directory: str,
    model: keras.Model,
    tokenizer: Tokenizer,
    input_fields: Mapping[str, str],
    labels: Mapping[str, LabelInfo] | None,
    metrics: Mapping[str, Mapping[str, float]] | None,
    extra: Mapping[str, typing.Any] | None,
) -> Manifest:
    """Writes the bundle's three files into the (empty) `directory`; returns the manifest."""
    model_path = os.path.join(directory, MODEL_FILE)
    tokenizer_path = os.path.join(directory, TOKENIZER_FILE)
    model.save(model_path)
    with open(tokenizer_path, "w", encoding="utf-8") as handle:
        handle.write(tokenizer.to_json())
    inputs: list[InputEntry] = []
    for tensor in model.inputs:
        if tensor.name not in input_fields:
            raise BundleError(f"input_fields has no corpus field for model input {tensor.name!r}.")
        inputs.append(
            {"name": tensor.name, "field": input_fields[tensor.name], "length": int(tensor.shape[1])}
        )
    manifest: Manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_file": MODEL_FILE,
        "tokenizer_file": TOKENIZER_FILE,
        "inputs": inputs,
        "padding": tokenizer.padding,
        "truncating": tokenizer.truncating,
        "vocabulary_size": tokenizer.size,
        "labels": labels or {},
        "metrics": metrics or {},
        "sha256": {MODEL_FILE: sha256_file(model_path), TOKENIZER_FILE: sha256_file(tokenizer_path)},
        "versions": library_versions(),
        **(extra or {}),
    }
    with open(os.path.join(directory, MANIFEST_FILE), "w", encoding="utf-8") as handle:
        json.dump(manifest, handle, indent=2, ensure_ascii=False)
        handle.write("\n")
    return manifest


def check_replaceable(directory: str) -> None:
    """Refuses a bundle target whose replacement would destroy something that is not a bundle.

    Raises:
        BundleError: `directory` is empty (it would stand for the working directory), holds the
            working directory, is a file or a link, or holds files other than a bundle's.
    """
    if not directory.strip():
        # os.path.abspath("") is the working directory: the swap would put the bundle in its place.
        raise BundleError("the bundle directory is empty (an unset shell variable?); give a new directory.")
    if os.path.isdir(directory) and _holds_working_directory(directory):
        raise BundleError(
            f"{directory!r} is the working directory or holds it, which replacing by a bundle would remove "
            "from under the shell; choose a new directory, e.g. a subdirectory of it."
        )
    if os.path.islink(directory) or (os.path.lexists(directory) and not os.path.isdir(directory)):
        raise BundleError(
            f"{directory!r} is a file or a link, not a bundle directory; choose a new directory to write."
        )
    if not os.path.isdir(directory):
        return
    foreign = sorted(set(os.listdir(directory)) - {MODEL_FILE, TOKENIZER_FILE, MANIFEST_FILE})
    if foreign or (os.listdir(directory) and not is_bundle(directory)):
        named = f" (e.g. {foreign[0]})" if foreign else f" (no {MANIFEST_FILE})"
        raise BundleError(
            f"{directory!r} holds files that are not a model bundle's{named}, which writing a bundle "
            "there would destroy; choose a new or empty directory."
        )


def _holds_working_directory(directory: str) -> bool:
    try:
        here = os.path.realpath(os.getcwd())
    except FileNotFoundError:  # A removed working directory is held by nothing.
        return False
    there = os.path.realpath(directory)
    return here == there or here.startswith(there.rstrip(os.sep) + os.sep)


def is_bundle(path: str) -> bool:
    """Whether `path` is a directory holding a bundle manifest."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, MANIFEST_FILE))


def read_manifest(directory: str) -> Manifest:
    """Reads and validates `manifest.json`; returns it as a dict."""
    path = os.path.join(directory, MANIFEST_FILE)
    if not os.path.isdir(directory):
        stopped = swap.stopped_swap_note(directory)
        if stopped:
            raise BundleError(f"Bundle directory {directory!r} does not exist: {stopped}")
        raise BundleError(
            f"Bundle directory {directory!r} does not exist; pass --model with a bundle directory "
            "or a .keras/.h5 file."
        )
    if not os.path.isfile(path):
        raise BundleError(
            f"{directory!r} has no {MANIFEST_FILE}, so it is not a model bundle. "
            "Write bundles with `python -m models.train`, or pass a .keras/.h5 file."
        )
    try:
        with open(path, encoding="utf-8") as handle:
            manifest = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BundleError(
            f"{path} is not valid JSON ({error}); restore it from the bundle's source."
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{path} is not an {FORMAT} manifest (its 'format' field must be {FORMAT!r}).")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(
            f"{path} has format_version {manifest.get('format_version')!r}; this version "
            f"reads {FORMAT_VERSION}. Re-export the bundle with this package's `models.train`."
        )
    required: dict[str, type] = {"model_file": str, "tokenizer_file": str, "inputs": list, "sha256": dict}
    for key, expected_type in required.items():
        if not isinstance(manifest.get(key), expected_type):
            raise BundleError(f"{path} lacks {key!r} (expected a {expected_type.__name__}).")
    for key in ("model_file", "tokenizer_file"):
        check_file_name(manifest[key], key, path)
    for entry in manifest["inputs"]:
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("name"), str)
            and isinstance(entry.get("field"), str)
            and isinstance(entry.get("length"), int)
            and entry["length"] > 0
        ):
            raise BundleError(
                f"{path}: each entry of 'inputs' needs a string 'name' and 'field' and a "
                f"positive integer 'length'; received {entry!r}."
            )
    return manifest


def check_file_name(name: object, key: str, manifest_path: str = "manifest.json") -> None:
    """Refuses a file name in a manifest that is not a plain name in the bundle directory.

    A bundle's files stay inside the bundle: an absolute path, a `..` or any
    directory part would make loading open (and hash) a file elsewhere.

    Raises:
        BundleError: naming the field and the name.
    """
    plain = (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and "/" not in name
        and "\\" not in name
        and not os.path.isabs(name)
    )
    if not plain:
        raise BundleError(
            f"{manifest_path}: {key} is {name!r}, but a bundle names its files by their plain name "
            "in the bundle directory (no directories, no '..', not absolute), so that loading it "
            f"reads nothing outside it. Put the file in the bundle and set {key} to its name."
        )


def check_keras_archive(path: str) -> None:
    """Raises BundleError if a .keras file is not a complete zip archive.

    Keras reports a truncated archive as "File not found", which sends users
    looking for a missing file instead of a damaged one.
    """
    damaged: str | None
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        damaged = str(error)
    if damaged:
        raise BundleError(
            f"{path} is damaged or incomplete: it is not a complete .keras (zip) archive "
            f"({damaged}). Copy or re-export the model again."
        )


def load_bundle(directory: str, verify_hashes: bool = True) -> Bundle:
    """Loads and validates a bundle directory.

    Raises:
        BundleError: the bundle is missing a file, a hash does not match, the
            manifest is malformed, or the manifest disagrees with the model.
    """
    manifest = read_manifest(directory)
    paths: dict[str, str] = {}
    for key in ("model_file", "tokenizer_file"):
        name = manifest[key]
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            raise BundleError(f"Bundle {directory!r} is missing {name} (named by {key} in its manifest).")
        real, inside = os.path.realpath(path), os.path.realpath(directory)
        if os.path.dirname(real) != inside:
            raise BundleError(
                f"{path} is a link to {real}, outside the bundle {directory!r}; a bundle's files "
                "stay inside it. Copy the file into the bundle in place of the link."
            )
        if verify_hashes:
            expected = manifest["sha256"].get(name)
            actual = sha256_file(path)
            if expected != actual:
                raise BundleError(
                    f"{path} has SHA-256 {actual}, but the manifest records {expected}: the "
                    "file was changed or corrupted after the bundle was written. Restore the "
                    "original file or re-export the bundle."
                )
        paths[key] = path
    check_keras_archive(paths["model_file"])
    try:
        model = keras.saving.load_model(paths["model_file"], compile=False)
    except Exception as error:  # Keras raises many types for a corrupt archive.
        custom = custom_class_error(paths["model_file"], read_model_config(paths["model_file"])[0], error)
        reason = str(custom) if custom else f"{type(error).__name__}: {' '.join(str(error).split())}"
        raise BundleError(f"Could not load {paths['model_file']}: {reason}") from None
    with open(paths["tokenizer_file"], encoding="utf-8") as handle:
        try:
            tokenizer = Tokenizer.from_json(handle.read())
        except ValueError as error:
            raise BundleError(f"{paths['tokenizer_file']}: {error}") from None
    model_inputs = {t.name: t.shape for t in model.inputs}
    for entry in manifest["inputs"]:
        shape = model_inputs.get(entry["name"])
        if shape is None:
            raise BundleError(
                f"The manifest maps input {entry['name']!r}, but the model's inputs are "
                f"{sorted(model_inputs)}; fix 'inputs' in {MANIFEST_FILE}."
            )
        if len(shape) != 2 or shape[1] != entry["length"]:
            raise BundleError(
                f"The manifest says input {entry['name']!r} takes {entry['length']} token ids, "
                f"but the model's input shape is {tuple(shape)}; fix 'length' in {MANIFEST_FILE}."
            )
    missing = sorted(set(model_inputs) - {entry["name"] for entry in manifest["inputs"]})
    if missing:
        raise BundleError(
            f"The manifest gives no corpus field for model input(s) {missing}; add them to 'inputs'."
        )
    return Bundle(path=directory, model=model, tokenizer=tokenizer, manifest=manifest)
