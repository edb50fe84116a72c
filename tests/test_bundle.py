"""Tests for models.bundle: saving, loading and every way a bundle can be broken."""

import json
import os
import shutil

import numpy as np
import pytest
from sizes import LENGTHS, SIZES

from models.bundle import (
    DEFAULT_BUNDLE,
    MANIFEST_FILE,
    MODEL_FILE,
    TOKENIZER_FILE,
    BundleError,
    is_bundle,
    load_bundle,
)
from models.digest import sha256_file
from models.tokenizer import Tokenizer


@pytest.fixture
def bundle_dir(tiny_bundle, tmp_path):
    """A private copy of the tiny bundle that the test may break."""
    directory = str(tmp_path / "bundle")
    shutil.copytree(tiny_bundle[0], directory)
    return directory


def _edit_manifest(directory, edit):
    path = os.path.join(directory, MANIFEST_FILE)
    with open(path, encoding="utf-8") as handle:
        manifest = json.load(handle)
    edit(manifest)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(manifest, handle)


def _replace_file_and_rehash(directory, name, data):
    """Writes `data` as bundle file `name` and records its new hash, so only content checks can object."""
    path = os.path.join(directory, name)
    with open(path, "wb") as handle:
        handle.write(data)
    _edit_manifest(
        directory,
        lambda manifest: manifest["sha256"].__setitem__(name, sha256_file(path)),
    )


def _load_error(directory):
    with pytest.raises(BundleError) as error:
        load_bundle(directory)
    return str(error.value)


def test_load_bundle_round_trip(tiny_bundle):
    directory, model, inputs = tiny_bundle
    assert is_bundle(directory)
    bundle = load_bundle(directory)
    assert bundle.path == directory
    assert bundle.input_fields == {"content": "content", "title": "title"}
    assert bundle.sequence_lengths == LENGTHS
    # The tiny bundle's tokenizer: word0, word1, ... after the padding and [UNK] ids.
    assert bundle.tokenizer.vocabulary == [f"word{index}" for index in range(SIZES["vocabulary_size"] - 2)]
    assert bundle.manifest["vocabulary_size"] == SIZES["vocabulary_size"]
    assert bundle.manifest["labels"] == {"out_content": {"field": "kind", "classes": ["a", "b"]}}
    assert bundle.manifest["sha256"][MODEL_FILE] == sha256_file(os.path.join(directory, MODEL_FILE))
    expected = model.predict(inputs, verbose=0)
    actual = bundle.model.predict(inputs, verbose=0)
    for name in ("out_content", "out_title"):
        np.testing.assert_array_equal(actual[name], expected[name])


def test_bundle_error_is_a_value_error():
    assert issubclass(BundleError, ValueError)


def test_missing_directory(tmp_path):
    message = _load_error(str(tmp_path / "nowhere"))
    assert "does not exist" in message
    assert "nowhere" in message


def test_missing_manifest(bundle_dir):
    os.remove(os.path.join(bundle_dir, MANIFEST_FILE))
    assert not is_bundle(bundle_dir)
    message = _load_error(bundle_dir)
    assert MANIFEST_FILE in message
    assert "not a model bundle" in message


@pytest.mark.parametrize("name, key", [(MODEL_FILE, "model_file"), (TOKENIZER_FILE, "tokenizer_file")])
def test_missing_file(bundle_dir, name, key):
    os.remove(os.path.join(bundle_dir, name))
    message = _load_error(bundle_dir)
    assert f"missing {name}" in message
    assert key in message


@pytest.mark.parametrize("name", [MODEL_FILE, TOKENIZER_FILE])
def test_modified_file_fails_the_hash_check(bundle_dir, name):
    with open(os.path.join(bundle_dir, name), "ab") as handle:
        handle.write(b"\n")
    message = _load_error(bundle_dir)
    assert "SHA-256" in message
    assert "corrupted" in message or "changed" in message
    assert name in message
    # Skipping the hash check loads the (still valid) file.
    load_bundle(bundle_dir, verify_hashes=False)


def test_model_file_that_is_not_a_model(bundle_dir):
    _replace_file_and_rehash(bundle_dir, MODEL_FILE, b"this is not a zip archive")
    message = _load_error(bundle_dir)
    assert "damaged or incomplete" in message
    assert MODEL_FILE in message


@pytest.mark.parametrize(
    "data, expected",
    [
        pytest.param(b'{"hello": 1}', "not an embexport-tokenizer file", id="other_json"),
        pytest.param(b"vocabulary: [a, b]", "not valid JSON", id="not_json"),
        pytest.param(
            b'{"format": "embexport-tokenizer", "vocabulary": 7}',
            "'vocabulary'",
            id="bad_vocabulary",
        ),
    ],
)
def test_tokenizer_file_that_is_not_a_tokenizer(bundle_dir, data, expected):
    _replace_file_and_rehash(bundle_dir, TOKENIZER_FILE, data)
    message = _load_error(bundle_dir)
    assert TOKENIZER_FILE in message
    assert expected in message


def test_manifest_not_json(bundle_dir):
    with open(os.path.join(bundle_dir, MANIFEST_FILE), "w", encoding="utf-8") as handle:
        handle.write('{"format": "embexport-bundle",')
    message = _load_error(bundle_dir)
    assert "not valid JSON" in message
    assert MANIFEST_FILE in message


@pytest.mark.parametrize(
    "edit, expected",
    [
        pytest.param(
            lambda m: m.__setitem__("format", "tf-savedmodel"),
            "not an embexport-bundle manifest",
            id="format",
        ),
        pytest.param(
            lambda m: m.pop("format"),
            "not an embexport-bundle manifest",
            id="no_format",
        ),
        pytest.param(
            lambda m: m.__setitem__("format_version", 2),
            "format_version 2",
            id="version",
        ),
        pytest.param(lambda m: m.pop("sha256"), "lacks 'sha256'", id="no_sha256"),
        pytest.param(
            lambda m: m.__setitem__("inputs", {"content": 12}),
            "lacks 'inputs'",
            id="inputs_not_list",
        ),
        pytest.param(
            lambda m: m["inputs"][0].__setitem__("length", "12"),
            "positive integer 'length'",
            id="length_not_int",
        ),
        pytest.param(
            lambda m: m["inputs"][1].__setitem__("length", 0),
            "positive integer 'length'",
            id="length_zero",
        ),
        pytest.param(
            lambda m: m["inputs"][0].pop("field"),
            "string 'name' and 'field'",
            id="input_without_field",
        ),
    ],
)
def test_malformed_manifest(bundle_dir, edit, expected):
    _edit_manifest(bundle_dir, edit)
    message = _load_error(bundle_dir)
    assert expected in message
    assert MANIFEST_FILE in message


def test_manifest_format_version_error_says_how_to_fix(bundle_dir):
    _edit_manifest(bundle_dir, lambda manifest: manifest.__setitem__("format_version", 2))
    message = _load_error(bundle_dir)
    assert "reads 1" in message
    assert "Re-export" in message


def test_manifest_length_disagrees_with_the_model(bundle_dir):
    _edit_manifest(bundle_dir, lambda manifest: manifest["inputs"][1].__setitem__("length", 20))
    message = _load_error(bundle_dir)
    assert "'title' takes 20 token ids" in message
    assert f"(None, {LENGTHS['title']})" in message
    assert "fix 'length'" in message


def test_manifest_input_name_not_in_the_model(bundle_dir):
    _edit_manifest(
        bundle_dir,
        lambda manifest: manifest["inputs"][1].__setitem__("name", "headline"),
    )
    message = _load_error(bundle_dir)
    assert "'headline'" in message
    assert "['content', 'title']" in message
    assert "fix 'inputs'" in message


def test_manifest_without_an_input_of_the_model(bundle_dir):
    _edit_manifest(bundle_dir, lambda manifest: manifest["inputs"].pop(1))
    message = _load_error(bundle_dir)
    assert "no corpus field" in message
    assert "['title']" in message


def test_default_bundle_loads_and_beats_the_majority_baseline():
    bundle = load_bundle(DEFAULT_BUNDLE)
    manifest = bundle.manifest
    assert manifest["topology"] == "two_inputs_two_outputs"
    assert bundle.input_fields == {"content": "content", "title": "title"}
    assert bundle.sequence_lengths == {"content": 300, "title": 20}
    assert [tuple(tensor.shape) for tensor in bundle.model.inputs] == [
        (None, 300),
        (None, 20),
    ]
    assert bundle.tokenizer.size == manifest["vocabulary_size"] == bundle.model.get_layer("emb").input_dim
    assert (bundle.tokenizer.padding, bundle.tokenizer.truncating) == (
        manifest["padding"],
        manifest["truncating"],
    )
    assert set(manifest["metrics"]) == {"out_content", "out_title"}
    for output, metrics in manifest["metrics"].items():
        assert metrics["held_out_accuracy"] > metrics["majority_baseline"], output
    assert manifest["labels"]["out_content"]["classes"] == ["class", "function"]
    assert len(manifest["labels"]["out_title"]["classes"]) == bundle.model.get_layer("out_title").units


def test_default_bundle_tokenizer_knows_common_corpus_words():
    with open(os.path.join(DEFAULT_BUNDLE, TOKENIZER_FILE), encoding="utf-8") as handle:
        tokenizer = Tokenizer.from_json(handle.read())
    ids, counts, _, _ = tokenizer.encode_batch(["Return the number of items in a sequence."], 20)
    assert counts[0] == 8
    # The common English words of the docstring corpus are all in the vocabulary.
    assert (ids[0, -8:] > 1).all()


def _point_outside(bundle_dir, tmp_path, key, how):
    """Moves the bundle's file named by `key` out of the bundle and points the manifest at it,
    its SHA-256 recorded, as a hand-made manifest would: only the containment rule can object."""
    name = {"model_file": MODEL_FILE, "tokenizer_file": TOKENIZER_FILE}[key]
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.move(os.path.join(bundle_dir, name), outside / name)
    if how == "link":
        os.symlink(outside / name, os.path.join(bundle_dir, name))
        return name
    reference = str(outside / name) if how == "absolute" else f"../outside/{name}"

    def edit(manifest):
        manifest[key] = reference
        manifest["sha256"][reference] = sha256_file(outside / name)

    _edit_manifest(bundle_dir, edit)
    return reference


@pytest.mark.parametrize("how", ["absolute", "dotdot", "link"])
@pytest.mark.parametrize("key", ["tokenizer_file", "model_file"])
def test_a_bundle_file_outside_the_bundle_is_refused(bundle_dir, tmp_path, key, how):
    reference = _point_outside(bundle_dir, tmp_path, key, how)
    message = _load_error(bundle_dir)
    assert reference in message
    assert "outside" in message or "plain name" in message


def test_the_export_refuses_a_bundle_naming_a_file_outside_it(bundle_dir, tmp_path, capsys):
    from pipeline.run import main

    _point_outside(bundle_dir, tmp_path, "tokenizer_file", "absolute")
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"id": "a", "content": "word1", "title": "word2"}) + "\n")
    output = tmp_path / "out"
    code = main(["--model", bundle_dir, "--input", str(corpus), "--output", str(output)])
    err = capsys.readouterr().err
    assert code == 2
    assert [line for line in err.splitlines() if line.strip()][-1].startswith("error: Invalid model bundle")
    assert "Traceback" not in err and "plain name" in err
    assert not output.exists()
