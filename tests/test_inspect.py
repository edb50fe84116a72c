"""`python -m pipeline.inspect`: every layer call with its shape, input dependencies and `--layer` spec."""

import keras
import pytest
from pipeline_fixtures import build_keras2_models, export_args, write_jsonl

from models.bundle import DEFAULT_BUNDLE
from models.legacy import load_model_file
from models.truncate import layer_calls, parse_layer_spec, resolve_layer
from pipeline.errors import ExportConfigError
from pipeline.inspect import layer_rows, main
from pipeline.running.export import run_export

TEXTS = ["Return the value of x.", "Open a file and return a stream.", "the the value"]


@pytest.fixture(scope="module")
def models_directory(tmp_path_factory):
    """Three small `.keras` files: shared embedding with a Lambda add, and a string-input model."""
    directory = tmp_path_factory.mktemp("inspect_models")
    keras.utils.set_random_seed(0)
    content = keras.Input((7,), dtype="int32", name="content")
    title = keras.Input((3,), dtype="int32", name="title")
    embedding = keras.layers.Embedding(30, 4, name="emb")
    content_vector = keras.layers.LSTM(5, name="lstm_content")(embedding(content))
    title_vector = keras.layers.LSTM(5, name="lstm_title")(embedding(title))
    added = keras.layers.Lambda(lambda x: x[0] + x[1], name="added")([content_vector, title_vector])
    keras.Model([content, title], keras.layers.Dense(1, name="out")(added)).save(directory / "lambda.keras")

    vectorizer = keras.layers.TextVectorization(max_tokens=20, output_sequence_length=6, name="vectorize")
    vectorizer.adapt(TEXTS)
    text = keras.Input((1,), dtype="string", name="text")
    embedded = keras.layers.Embedding(20, 4, name="emb")(vectorizer(text))
    pooled = keras.layers.GlobalAveragePooling1D(name="pool")(embedded)
    keras.Model(text, keras.layers.Dense(2, name="out")(pooled)).save(directory / "strings.keras")
    return directory


def _rows_by_spec(model):
    return {row[-1]: row for row in layer_rows(model)}


def test_rows_name_each_call_its_inputs_and_spec(models_directory):
    model = load_model_file(str(models_directory / "lambda.keras"), allow_unsafe=True)
    rows = _rows_by_spec(model)
    assert rows["emb"][:5] == ("emb", "Embedding", "0", "(None, 7, 4)", "content")
    assert rows["emb:1"][:5] == ("emb", "Embedding", "1", "(None, 3, 4)", "title")
    assert rows["emb:1"][5] == "sequence (title)"
    assert rows["lstm_title"][4:6] == ("title", "vector")
    assert rows["added"][1] == "Lambda" and rows["added"][4] == "content, title"
    assert [row[0] for row in layer_rows(model) if row[-1] == "(model input)"] == ["content", "title"]


def test_string_input_rows(models_directory, capsys):
    assert main([str(models_directory / "strings.keras")]) == 0
    printed = capsys.readouterr().out
    assert "Tokenizer: none" in printed
    lines = {line.split()[-1]: line for line in printed.splitlines() if line.strip()}
    # The embedding's tokens line up with the TextVectorization output: a per-token column.
    assert "sequence (text)" in lines["emb"] and "(None, 6, 4)" in lines["emb"]
    assert "TextVectorization" in lines["vectorize"]
    assert "string input" in printed


def test_lambda_model_needs_the_flag(models_directory, capsys):
    path = str(models_directory / "lambda.keras")
    assert main([path]) == 2
    error = capsys.readouterr().err
    assert "Lambda layer(s) ['added']" in error and "--allow_unsafe_deserialization" in error
    assert main([path, "--allow_unsafe_deserialization"]) == 0
    assert "added" in capsys.readouterr().out


def test_unknown_layer_suggests_close_names(capsys):
    assert main([DEFAULT_BUNDLE, "--layer", "lstm_contnet"]) == 2
    error = capsys.readouterr().err
    assert "Did you mean 'lstm_content'" in error and "pipeline.inspect" in error
    assert main([DEFAULT_BUNDLE, "--layer", "emb:1"]) == 0
    printed = capsys.readouterr().out
    assert "Default --layer (bundle manifest)" in printed
    table = [line for line in printed.splitlines() if line.startswith("emb")]
    assert len(table) == 1 and table[0].split()[-1] == "emb:1"


def test_the_model_is_taken_as_the_other_commands_flag_too(capsys):
    """`inspect --model X`, as run and vocabulary take it (and as inspect's own errors name it), printed
    argparse's usage and "unrecognized arguments: --model"."""
    assert main(["--model", DEFAULT_BUNDLE, "--layer", "emb:1"]) == 0
    assert capsys.readouterr().out.startswith(f"Model: {DEFAULT_BUNDLE} ")
    for argv, message in [
        (["--model", DEFAULT_BUNDLE, "other.keras"], "MODEL 'other.keras' and --model"),
        ([], "required: MODEL"),
    ]:
        with pytest.raises(SystemExit) as stopped:
            main(argv)
        assert stopped.value.code == 2
        (line,) = capsys.readouterr().err.splitlines()
        assert line.startswith("error: ") and message in line, line


def test_each_printed_spec_selects_its_layer_call_even_with_colons_and_equals_signs(capsys):
    content = keras.Input((6,), dtype="int32", name="content")
    embedding = keras.layers.Embedding(30, 4, name="pool")
    first = keras.layers.GlobalAveragePooling1D(name="pool:1")(embedding(content))
    # "pool:1" names a layer, so no spec can name the second call of "pool".
    second = keras.layers.GlobalAveragePooling1D(name="avg")(embedding(content))
    joined = keras.layers.Concatenate(name="a=b")([first, second])
    model = keras.Model(content, keras.layers.Dense(1, name="out")(joined))
    names = {layer.name for layer in model.layers}
    calls = layer_calls(model)
    printed = {}
    for row in layer_rows(model)[1:]:
        name, call, spec = row[0], int(row[2]), row[-1]
        printed[(name, call)] = spec
        if spec.startswith("-"):
            continue
        parsed = parse_layer_spec(spec, names)
        assert (parsed.layer, parsed.call) == (name, call)
        assert resolve_layer(model, parsed) is calls[name][call]
    assert printed[("pool:1", 0)] == "pool:1" and printed[("a=b", 0)] == "a=b"
    assert printed[("pool", 1)].startswith("- ")


# The commonest Keras 2 tutorial shape: Sequential([Embedding, GRU, Dense]) with no input_length,
# trained with fit on padded ids; its input has shape (None, None). argv: output directory.
UNSHAPED_KERAS2_SCRIPT = r"""
import json, sys
import numpy as np
import tf_keras as K

rng = np.random.default_rng(0)
model = K.Sequential([K.layers.Embedding(40, 8), K.layers.GRU(4), K.layers.Dense(1, activation="sigmoid")])
model.compile("adam", "binary_crossentropy")
model.fit(rng.integers(0, 40, (16, 10)), rng.integers(0, 2, (16, 1)), epochs=1, verbose=0)
model.save(sys.argv[1] + "/model.h5")
json.dump({}, open(sys.argv[1] + "/info.json", "w"))
"""


def test_an_input_without_a_fixed_length_is_refused_alike_by_inspect_and_run(tmp_path, capsys):
    directory, _ = build_keras2_models(tmp_path, UNSHAPED_KERAS2_SCRIPT)
    model = str(directory / "model.h5")
    assert main([model, "--tokenizer", "none"]) == 0
    printed = capsys.readouterr().out
    rows = {row[-1]: row for row in layer_rows(load_model_file(model))}
    assert rows["gru"][5] == rows["dense"][5] == "- (input embedding_input refused)"
    assert "Forward pass per --layer" not in printed
    corpus = write_jsonl(tmp_path / "ids.jsonl", [{"id": "d", "x": [1, 2, 3]}])
    flags = ("--tokenizer", "none", "--input_map", "embedding_input=x", "--layer", "gru")
    with pytest.raises(ExportConfigError) as refusal:
        run_export(export_args(model, corpus, tmp_path / "out", *flags))
    message = str(refusal.value)
    assert "\n" not in message and "Input(shape=(N,))" in message and "set_weights" in message
    assert f"Input 'embedding_input' refused: {message}" in printed


def test_a_layer_keras_cannot_run_on_a_sample_batch_is_said_refused(tmp_path, capsys):
    """`pipeline.run` refuses such a layer at launch (its sample batch fails in Keras), but inspect
    listed it as exportable, without a word: the layer name `a:b` that TensorFlow cannot run."""
    inputs = keras.Input((10,), dtype="int32", name="content")
    embedded = keras.layers.Embedding(30, 4, name="emb")(inputs)
    vector = keras.layers.LSTM(3, name="a:b")(embedded)
    keras.Model(inputs, keras.layers.Dense(1, name="dense")(vector)).save(tmp_path / "model.keras")
    assert main([str(tmp_path / "model.keras"), "--tokenizer", "none"]) == 0
    printed = capsys.readouterr().out
    refused = [line for line in printed.splitlines() if " refused: " in line]
    assert [line.split(" refused: ")[0] for line in refused] == ["--layer a:b", "--layer dense"], printed
    assert all("not a valid scope name" in line and "rename the layer" in line for line in refused)
    # The layer alone is checked alone: the embedding before it runs.
    assert main([str(tmp_path / "model.keras"), "--tokenizer", "none", "--layer", "emb"]) == 0
    assert " refused: " not in capsys.readouterr().out


@pytest.mark.parametrize(("argv", "flag"), [([""], "MODEL"), ([" "], "MODEL"), (["--model", ""], "--model")])
def test_an_empty_model_is_said_to_be_empty_under_the_name_it_was_given(argv, flag, capsys):
    """`inspect "$MODEL"` with the variable unset said "--model '' does not exist": a flag not typed,
    and not the reason, where the other commands say the value is empty."""
    assert main(argv) == 2
    (line,) = capsys.readouterr().err.splitlines()
    expected = f"error: {flag} is empty (an unset shell variable?); give it a model bundle directory or file."
    assert line == expected
