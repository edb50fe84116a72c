"""The exact fast path equals Keras, and steps aside (with a reason) for everything it does not reproduce.

The recurrent variants are Keras 2 `.h5` models built with `tf_keras` in a
subprocess as a user would write them (float `Input(shape=(n,))`, default layer
names), loaded through `models.legacy`; each exported tensor is compared with
`keras.Model(inputs, layer.output).predict` on pre- and post-padded documents of
every length, including all-padding rows, full rows, and a padding id among the
tokens.  The pipeline tests export them end to end, with documents longer than
the input (truncated) and empty ones (dead-lettered).
"""

import logging

import keras
import numpy as np
import pytest
from pipeline_fixtures import (
    build_keras2_models,
    export_args,
    manifest_of,
    read_errors,
    read_rows,
    rows_by_id,
    write_jsonl,
)

from models.fast_path import FAST, HYBRID, KERAS, MAX_LANES, build_fast_path, describe_forward_passes
from models.legacy import load_model_file
from models.tokenizer import pad_token_ids
from models.truncate import layer_calls, parse_layer_spec, truncate
from pipeline.inference.forward_pass import FAST_PATH_TOLERANCE, max_difference, verification_batch
from pipeline.inspect import main as inspect_main
from pipeline.planning.plan import InputInfo
from pipeline.running.export import run_export

VOCABULARY = 50
LENGTH = 24
TOLERANCE = 1e-5
MERGE_MODES = ("concat", "sum", "ave", "mul")

# Runs under tf_keras (Keras 2) in its own process.  argv: output directory, input
# length, vocabulary.  Writes one .h5 per model and info.json naming, for each
# model, the layers to export (Keras 2's default names) and whether it has a Lambda.
KERAS2_MODELS = r"""
import json, os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
import numpy as np
import tf_keras
from tf_keras.layers import (Input, Embedding, LSTM, GRU, Bidirectional, Dense, Lambda,
    GlobalAveragePooling1D, Concatenate)
from tf_keras.models import Model

out = sys.argv[1]
LENGTH, VOCABULARY = int(sys.argv[2]), int(sys.argv[3])
tf_keras.utils.set_random_seed(0)
rng = np.random.default_rng(0)
info = {}

def save(name, model, targets, has_lambda=False):
    # Weights away from their initial values (biases included), as after training.
    model.set_weights([rng.normal(0, 0.4, w.shape) for w in model.get_weights()])
    model.save(os.path.join(out, name + ".h5"))
    info[name] = {"targets": [t._keras_history.layer.name for t in targets], "lambda": has_lambda,
                  "inputs": [t.name.split(":")[0] for t in model.inputs]}

# The tutorial's single-input model, exactly as its code writes it.
inputs = Input(shape=(LENGTH,))
vector = LSTM(16)(Embedding(VOCABULARY, 12)(inputs))
save("tutorial", Model(inputs, Dense(1, activation="sigmoid")(vector)), [vector])

# The tutorial's two-input model, whose Lambda adds the two LSTMs.
content, title = Input(shape=(LENGTH,)), Input(shape=(LENGTH // 3,))
shared = Embedding(VOCABULARY, 12)
content_vector, title_vector = LSTM(8)(shared(content)), LSTM(8)(shared(title))
added = Lambda(lambda x: x[0] + x[1])([content_vector, title_vector])
output = Dense(1, activation="sigmoid")(added)
save("two_inputs_lambda", Model([content, title], output), [content_vector, title_vector, added, output],
     has_lambda=True)

for masked in (False, True):
    suffix = "_masked" if masked else ""
    inputs = Input(shape=(LENGTH,))
    embedded = Embedding(VOCABULARY, 12, mask_zero=masked)(inputs)
    sequence = LSTM(10, return_sequences=True)(embedded)
    top = LSTM(6)(sequence)
    save("stacked_lstm" + suffix, Model(inputs, Dense(1)(top)), [sequence, top])

    for reset_after in (True, False):
        inputs = Input(shape=(LENGTH,))
        embedded = Embedding(VOCABULARY, 12, mask_zero=masked)(inputs)
        vector = GRU(10, reset_after=reset_after)(embedded)
        sequence = GRU(7, reset_after=reset_after, return_sequences=True)(embedded)
        save(f"gru_reset_after_{reset_after}" + suffix, Model(inputs, [Dense(1)(vector), Dense(1)(sequence)]),
             [vector, sequence])

    for mode in ("concat", "sum", "ave", "mul"):
        inputs = Input(shape=(LENGTH,))
        embedded = Embedding(VOCABULARY, 12, mask_zero=masked)(inputs)
        vector = Bidirectional(LSTM(8), merge_mode=mode)(embedded)
        sequence = Bidirectional(LSTM(5, return_sequences=True), merge_mode=mode)(embedded)
        save(f"bilstm_{mode}" + suffix, Model(inputs, [Dense(1)(vector), Dense(1)(sequence)]),
             [vector, sequence])

    # A stacked layer on a Bidirectional sequence, and a pooling (a Keras layer) on a masked sequence.
    inputs = Input(shape=(LENGTH,))
    embedded = Embedding(VOCABULARY, 12, mask_zero=masked)(inputs)
    bisequence = Bidirectional(GRU(6, return_sequences=True))(embedded)
    top = LSTM(5)(bisequence)
    pooled = GlobalAveragePooling1D()(bisequence)
    merged = Concatenate()([top, pooled])
    save("bigru_stacked" + suffix, Model(inputs, Dense(1)(merged)), [bisequence, top, pooled, merged])

with open(os.path.join(out, "info.json"), "w") as handle:
    json.dump(info, handle)
"""


@pytest.fixture(scope="module")
def keras2_models(tmp_path_factory):
    """Directory of tf_keras `.h5` models and their info."""
    return build_keras2_models(tmp_path_factory.mktemp("keras2_fast"), KERAS2_MODELS, LENGTH, VOCABULARY)


def _ids(rows, length, seed=0):
    """Documents of every real length from 0 to `length`, pre- and post-padded, some with a 0 among them."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((rows, length), dtype=np.int32)
    for row, count in enumerate(np.linspace(0, length, rows).astype(int)):
        tokens = rng.integers(1, VOCABULARY, count)
        if row % 7 == 3 and count > 2:
            tokens[1] = 0
        if row % 2:
            ids[row, :count] = tokens
        else:
            ids[row, length - count :] = tokens
    rng.shuffle(ids)
    return ids


def _features(model, rows=60):
    return {t.name: _ids(rows, t.shape[1], seed=index) for index, t in enumerate(model.inputs)}


def _predict(sub_model, features):
    """`sub_model.predict` (the truncated `keras.Model(inputs, layer outputs)`) as {column: array}."""
    expected = sub_model.predict(features, verbose=0)
    return expected if isinstance(expected, dict) else {next(iter(sub_model.output)): expected}


def _assert_fast_equals_predict(sub_model, features, fast=None):
    if fast is None:
        choice = build_fast_path(sub_model)
        fast = choice.fast_path
        assert fast is not None, choice.reason
    actual = fast(features)
    expected = _predict(sub_model, features)
    assert set(actual) == set(expected)
    for column, value in expected.items():
        np.testing.assert_allclose(actual[column], value, rtol=0, atol=TOLERANCE, err_msg=column)
    return fast.forward_passes


def _load(directory, info, name):
    return load_model_file(str(directory / f"{name}.h5"), allow_unsafe=info[name]["lambda"])


KERAS2_VARIANTS = [
    "tutorial",
    "stacked_lstm",
    "stacked_lstm_masked",
    *[f"gru_reset_after_{r}{m}" for r in (True, False) for m in ("", "_masked")],
    *[f"bilstm_{mode}{m}" for mode in MERGE_MODES for m in ("", "_masked")],
    "bigru_stacked",
    "bigru_stacked_masked",
]


@pytest.mark.parametrize("name", KERAS2_VARIANTS)
def test_keras2_variant_equals_keras_predict(keras2_models, name):
    directory, info = keras2_models
    model = _load(directory, info, name)
    assert "float" in str(model.inputs[0].dtype)  # Keras 2's Input(shape=(n,)) takes floats
    targets = info[name]["targets"]
    sub_model = truncate(model, [parse_layer_spec(target) for target in targets])
    passes = _assert_fast_equals_predict(sub_model, _features(sub_model))
    assert set(passes) == set(targets)
    # Every recurrent layer runs on the fast path; Keras layers on their outputs are hybrid.
    for target in targets:
        layer = model.get_layer(target)
        expected = FAST if isinstance(layer, (keras.layers.RNN, keras.layers.Bidirectional)) else HYBRID
        assert passes[target].engine == expected, passes[target]


def test_keras2_two_input_lambda_model_runs_its_lambda_on_fast_outputs(keras2_models):
    directory, info = keras2_models
    model = _load(directory, info, "two_inputs_lambda")
    targets = info["two_inputs_lambda"]["targets"]
    sub_model = truncate(model, [parse_layer_spec(target) for target in targets])
    passes = _assert_fast_equals_predict(sub_model, _features(sub_model))
    lstm_content, lstm_title, added, output = targets
    assert passes[lstm_content].engine == passes[lstm_title].engine == FAST
    assert passes[added].engine == HYBRID and "Keras layers" in passes[added].reason
    assert passes[output].engine == HYBRID


def test_all_padding_full_and_single_rows(keras2_models):
    directory, info = keras2_models
    for name in ("tutorial", "bilstm_concat", "bilstm_concat_masked", "stacked_lstm_masked"):
        model = _load(directory, info, name)
        sub_model = truncate(model, [parse_layer_spec(t) for t in info[name]["targets"]])
        fast = build_fast_path(sub_model).fast_path
        input_name = sub_model.inputs[0].name
        for ids in (
            np.zeros((3, LENGTH), np.int32),
            np.ones((3, LENGTH), np.int32),
            _ids(1, LENGTH),
            _ids(300, LENGTH, seed=5),  # several lanes
        ):
            _assert_fast_equals_predict(sub_model, {input_name: ids}, fast)


@pytest.mark.parametrize(
    "name", ["tutorial", *[f"bilstm_{mode}{m}" for mode in MERGE_MODES for m in ("", "_masked")]]
)
def test_a_final_state_does_not_depend_on_the_rest_of_its_batch(keras2_models, name):
    """Bit for bit, whatever rows share its batch, lane or bucket (multi-process exports rely on it).

    The layers here return only their final state, read from an Embedding: the
    bucketed XLA loops.
    """
    directory, info = keras2_models
    model = _load(directory, info, name)
    target = info[name]["targets"][0]
    assert not model.get_layer(target).return_sequences
    sub_model = truncate(model, [parse_layer_spec(target)])
    fast = build_fast_path(sub_model).fast_path
    input_name = sub_model.inputs[0].name
    ids = _ids(600, LENGTH, seed=3)
    whole = fast({input_name: ids})[target]
    rng = np.random.default_rng(0)
    for size in (1, 5, 17, 260, 600):
        rows = rng.permutation(len(ids))[:size]
        part = fast({input_name: ids[rows]})[target]
        np.testing.assert_array_equal(part, whole[rows], err_msg=f"batch of {size}")


@pytest.mark.parametrize("name", ["tutorial", "stacked_lstm_masked"])
def test_every_batch_size_runs_one_trace_and_the_same_bits_as_its_own_lanes(keras2_models, name):
    """A batch that fills fewer lanes is padded to `MAX_LANES` with spare lanes, not traced again.

    Its rows are bit for bit what its own lanes give without the padding (one
    trace per lane count, as before), per-token and final outputs alike.
    """
    directory, info = keras2_models
    model = _load(directory, info, name)
    sub_model = truncate(model, [parse_layer_spec(t) for t in info[name]["targets"]])
    fast = build_fast_path(sub_model).fast_path
    input_name = sub_model.inputs[0].name
    # 1, 1, 2 and 4 dealt lanes (MIN_LANE_ROWS 128), and a batch of padding only.
    batches = [_ids(size, LENGTH, seed=size) for size in (1, 48, 272, 512)]
    batches.append(np.zeros((3, LENGTH), np.int32))
    cases = [(ids, real_tokens) for real_tokens in (False, True) for ids in batches]
    padded = [fast({input_name: ids}, real_tokens=real_tokens) for ids, real_tokens in cases]
    # One trace each for real_tokens False and True.
    assert [key[0] for key in fast._runs] == [MAX_LANES, MAX_LANES], fast._runs.keys()
    for (ids, real_tokens), outputs in zip(cases, padded, strict=True):
        alone = fast._call({input_name: ids}, None, real_tokens, traced_lanes=None)
        assert set(outputs) == set(alone)
        for column, value in alone.items():
            np.testing.assert_array_equal(outputs[column], value, err_msg=f"{column}, {len(ids)} rows")


def test_fast_path_equals_keras_predict_on_the_bundled_topologies(train_tiny_model):
    for topology, layers in (
        ("single_input", ["lstm_content", "emb", "output"]),
        ("two_inputs_one_output", ["lstm_content", "lstm_title", "add", "emb", "emb:1"]),
        ("two_inputs_two_outputs", ["lstm_title", "lstm_content", "out_title"]),
    ):
        model, _ = train_tiny_model(topology)
        sub_model = truncate(model, [parse_layer_spec(layer) for layer in layers])
        passes = _assert_fast_equals_predict(sub_model, _features(sub_model))
        assert passes["lstm_content"].engine == FAST


def _keras3_model(build, length=10, masked=False):
    keras.utils.set_random_seed(1)
    content = keras.Input((length,), dtype="int32", name="content")
    embedded = keras.layers.Embedding(VOCABULARY, 8, mask_zero=masked, name="emb")(content)
    return keras.Model(content, build(embedded))


@pytest.mark.parametrize(
    "build, reason",
    [
        (
            lambda x: keras.layers.LSTM(6, go_backwards=True, return_sequences=True, name="target")(x),
            "go_backwards",
        ),
        (
            lambda x: keras.layers.LSTM(6, name="target")(keras.layers.Conv1D(4, 3, padding="same")(x)),
            "does not read an Embedding",
        ),
        (lambda x: keras.layers.LSTM(6, name="target", dtype="mixed_float16")(x), "float16"),
        (lambda x: keras.layers.Dense(3, name="target")(keras.layers.Flatten()(x)), "reads no Embedding"),
    ],
)
def test_fast_path_declines_what_it_cannot_reproduce_with_a_reason(build, reason):
    sub_model = truncate(_keras3_model(build), [parse_layer_spec("target")])
    choice = build_fast_path(sub_model)
    assert choice.fast_path is None and reason in choice.reason
    assert describe_forward_passes({"target": sub_model.output["target"]})["target"].engine == KERAS


def test_declined_layers_run_as_keras_layers_next_to_fast_ones_with_the_reason():
    def build(embedded):
        backwards = keras.layers.LSTM(3, go_backwards=True, name="backwards")(embedded)
        declined = keras.layers.LSTM(3, go_backwards=True, return_sequences=True, name="declined")(embedded)
        pooled = keras.layers.GlobalAveragePooling1D(name="pooled")(declined)
        simple = keras.layers.SimpleRNN(4, name="simple")(embedded)
        return keras.layers.Concatenate(name="target")([backwards, pooled, simple])

    sub_model = truncate(
        _keras3_model(build, masked=True), [parse_layer_spec(n) for n in ("target", "backwards", "pooled")]
    )
    passes = _assert_fast_equals_predict(sub_model, _features(sub_model))
    assert passes["backwards"].engine == FAST  # go_backwards without return_sequences is exact
    assert (
        passes["target"].engine == HYBRID and "go_backwards with return_sequences" in passes["target"].reason
    )
    assert (
        passes["pooled"].engine == KERAS and "go_backwards with return_sequences" in passes["pooled"].reason
    )


def test_keras_layers_on_fast_sequences_get_their_static_length():
    # TimeDistributed reads the time axis from the static shape: given none, Keras 3 loops over
    # the batch size instead (a wrong shape, or a crash on every batch not of the input length);
    # LSTM(unroll=True) cannot be built without it.
    def build(embedded):
        sequence = keras.layers.LSTM(4, return_sequences=True, name="sequence")(embedded)
        timed = keras.layers.TimeDistributed(keras.layers.Dense(3), name="timed")(sequence)
        pooled = keras.layers.GlobalAveragePooling1D(name="pooled")(timed)
        unrolled = keras.layers.LSTM(2, unroll=True, name="unrolled")(sequence)
        return keras.layers.Concatenate(name="target")([pooled, unrolled])

    sub_model = truncate(
        _keras3_model(build, masked=True), [parse_layer_spec(n) for n in ("timed", "pooled", "target")]
    )
    for rows in (7, 60):
        passes = _assert_fast_equals_predict(sub_model, _features(sub_model, rows=rows))
    assert {column: p.engine for column, p in passes.items()} == dict.fromkeys(passes, HYBRID)


def test_a_masked_keras3_model_loaded_from_its_file_keeps_the_fast_path(tmp_path):
    # Keras 3 saves the mask it passed each layer as a not_equal(ids, 0) of its own, so a loaded
    # model's LSTM got another mask tensor than its input's: every masked chain was declined as
    # "called with initial states or a mask", and the whole run took Keras's pass.
    def build(embedded):
        sequence = keras.layers.Bidirectional(keras.layers.LSTM(4, return_sequences=True), name="sequence")(
            embedded
        )
        return keras.layers.GlobalAveragePooling1D(name="target")(sequence)

    _keras3_model(build, masked=True).save(tmp_path / "masked.keras")
    loaded = keras.saving.load_model(tmp_path / "masked.keras")
    sub_model = truncate(loaded, [parse_layer_spec(n) for n in ("sequence", "target")])
    passes = _assert_fast_equals_predict(sub_model, _features(sub_model, rows=20))
    assert {column: p.engine for column, p in passes.items()} == {"sequence": FAST, "target": HYBRID}
    # A mask of another computation than the Embedding's (id 1 as padding) is still declined.
    content = keras.Input((10,), dtype="int32", name="content")
    embedded = keras.layers.Embedding(VOCABULARY, 8, mask_zero=True)(content)
    other = keras.layers.LSTM(3, name="target")(embedded, mask=keras.ops.not_equal(content, 1))
    choice = build_fast_path(truncate(keras.Model(content, other), [parse_layer_spec("target")]))
    assert choice.fast_path is None and "initial states or a mask" in choice.reason


def test_the_launch_checks_batch_never_has_as_many_rows_as_an_input_has_tokens():
    # A model of 48 tokens checked on 48 rows passed with a layer that took the batch axis for
    # the time axis (TimeDistributed, before the fix above), then failed every other batch.
    inputs = (InputInfo("content", "content", 48), InputInfo("title", "title", 49))
    batch = verification_batch(inputs, "pre", VOCABULARY)
    rows = len(batch["content"])
    assert rows not in (48, 49)
    assert batch["content"].shape == (rows, 48) and batch["title"].shape == (rows, 49)


def test_verification_catches_a_fast_path_that_disagrees(train_tiny_model):
    model, _ = train_tiny_model("single_input")
    sub_model = truncate(model, [parse_layer_spec("lstm_content")])
    fast = build_fast_path(sub_model).fast_path
    features = _features(sub_model)

    def keras_forward(batch):
        return {"lstm_content": sub_model.predict(batch, verbose=0)["lstm_content"]}

    assert max_difference(fast, keras_forward, features) <= FAST_PATH_TOLERANCE

    def off_by_a_little(batch):
        return {"lstm_content": keras_forward(batch)["lstm_content"] + 1e-3}

    assert max_difference(off_by_a_little, keras_forward, features) > FAST_PATH_TOLERANCE


def test_pipeline_embedder_falls_back_with_a_log_line(tmp_path, caplog):
    from models.bundle import save_bundle
    from models.tokenizer import Tokenizer
    from pipeline.inference.embedder import Embedder
    from pipeline.inference.features import DocumentTokenizer
    from pipeline.planning.build import build_plan
    from pipeline.planning.options import ExportOptions
    from pipeline.reading.documents import Document

    model = _keras3_model(lambda x: keras.layers.LSTM(6, name="lstm_content", dtype="mixed_float16")(x))
    bundle = str(tmp_path / "bundle")
    save_bundle(bundle, model, Tokenizer([f"w{i}" for i in range(VOCABULARY - 2)]), {"content": "content"})
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"id": "a", "content": "w1 w2"}\n')
    plan, model_source = build_plan(
        ExportOptions(
            [
                "--model",
                bundle,
                "--input",
                str(corpus),
                "--output",
                str(tmp_path / "o"),
                "--layer=lstm_content",
            ]
        )
    )
    with caplog.at_level(logging.INFO):
        embedder = Embedder(plan, model_source)
    assert not embedder.uses_fast_path
    assert "Fast path off (LSTM 'lstm_content' uses dtype float16" in caplog.text
    assert embedder.forward_passes["lstm_content"].engine == KERAS
    tokenized = DocumentTokenizer(plan, model_source.tokenizer).tokenize(
        Document("a", ("w1 w2 w3",), (), "c.jsonl", 1)
    )
    embedded = embedder.run([tokenized])
    assert [document.id for document in embedded.documents] == ["a"] and not embedded.failed
    expected = embedder.sub_model.predict({"content": tokenized.features[0][None, :]}, verbose=0)
    expected = expected["lstm_content"] if isinstance(expected, dict) else expected
    np.testing.assert_allclose(embedded.outputs["lstm_content"], expected, atol=1e-5)


def test_pipeline_embedder_uses_the_fast_path_for_the_default_bundle(tmp_path, caplog):
    from pipeline.inference.embedder import Embedder
    from pipeline.planning.build import build_plan
    from pipeline.planning.options import ExportOptions

    plan, model_source = build_plan(ExportOptions(["--output", str(tmp_path / "o")]))
    with caplog.at_level(logging.INFO):
        embedder = Embedder(plan, model_source)
    assert embedder.uses_fast_path
    assert "Fast path on" in caplog.text


def _id_corpus(tmp_path, inputs, count=40, seed=3):
    """Documents of id lists: empty, short, and longer than the input (truncated)."""
    rng = np.random.default_rng(seed)
    documents = []
    for index in range(count):
        document = {"id": f"d{index}"}
        for name, length in inputs.items():
            size = 0 if index == 0 else int(rng.integers(1, 2 * length))
            document[name] = [int(i) for i in rng.integers(1, VOCABULARY, size)]
        documents.append(document)
    return write_jsonl(tmp_path / "ids.jsonl", documents), documents


@pytest.mark.parametrize(
    "name, padding, pooling",
    [
        ("tutorial", "pre", "none"),
        ("stacked_lstm_masked", "post", "none"),
        ("gru_reset_after_True", "pre", "mean"),
        ("bilstm_concat", "pre", "none"),
        ("two_inputs_lambda", "pre", "none"),
    ],
)
def test_pipeline_exports_keras2_models_on_the_fast_path(keras2_models, tmp_path, name, padding, pooling):
    directory, info = keras2_models
    model = _load(directory, info, name)
    inputs = {t.name: int(t.shape[1]) for t in model.inputs}
    corpus, documents = _id_corpus(tmp_path, inputs)
    targets = info[name]["targets"]
    output = tmp_path / "out"
    flags = ["--tokenizer", "none", "--padding", padding, "--truncating", padding, "--pooling", pooling]
    if info[name]["lambda"]:
        flags.append("--allow_unsafe_deserialization")
    summary = run_export(
        export_args(directory / f"{name}.h5", corpus, output, *flags, *[f"--layer={t}" for t in targets])
    )
    assert summary.exit_code == 0, summary.message
    # The empty document is dead-lettered; every other one is exported.
    assert [row["id"] for row in read_errors(output).to_pylist()] == ["d0"]
    rows = rows_by_id(read_rows(output))
    kept = [d for d in documents if d["id"] != "d0"]
    features = {
        input_name: pad_token_ids([d[input_name] for d in kept], length, padding, padding)[0]
        for input_name, length in inputs.items()
    }
    calls = layer_calls(model)
    expected = keras.Model(model.inputs, [calls[t][0] for t in targets]).predict(features, verbose=0)
    expected = expected if isinstance(expected, list) else [expected]
    manifest = {column["column"]: column for column in manifest_of(output)["columns"]}
    for target, value in zip(targets, expected, strict=True):
        assert manifest[target]["forward_pass"] in (FAST, HYBRID), manifest[target]
        for index, document in enumerate(kept):
            actual = np.asarray(rows[document["id"]][target], np.float32)
            reference = value[index]
            if value.ndim == 3:
                real = features[next(iter(inputs))][index] != 0
                reference = reference[real]
                reference = reference.mean(axis=0) if pooling == "mean" else reference
            np.testing.assert_allclose(
                actual.reshape(reference.shape),
                reference,
                atol=TOLERANCE,
                rtol=0,
                err_msg=f"{target} {document['id']}",
            )


def test_manifest_records_keras_and_its_reason_with_fast_path_off(keras2_models, tmp_path):
    directory, info = keras2_models
    corpus, _ = _id_corpus(tmp_path, {info["tutorial"]["inputs"][0]: LENGTH}, count=5)
    output = tmp_path / "out"
    target = info["tutorial"]["targets"][0]
    summary = run_export(
        export_args(
            directory / "tutorial.h5",
            corpus,
            output,
            "--tokenizer",
            "none",
            f"--layer={target}",
            "--fast_path",
            "off",
        )
    )
    assert summary.exit_code == 0, summary.message
    column = manifest_of(output)["columns"][0]
    assert column["forward_pass"] == KERAS and column["forward_pass_reason"] == "--fast_path off"


def test_inspect_says_which_forward_pass_each_layer_gets(keras2_models, capsys):
    directory, info = keras2_models
    assert inspect_main([str(directory / "two_inputs_lambda.h5"), "--allow_unsafe_deserialization"]) == 0
    printed = capsys.readouterr().out
    section = printed.split("Forward pass per --layer")[1]
    lines = {line.split()[0]: line for line in section.splitlines()[1:] if line.strip()}
    lstm_content, lstm_title, added, output = info["two_inputs_lambda"]["targets"]
    assert lines[lstm_content].split()[1] == FAST
    assert lines[added].split()[1] == HYBRID and "Keras layers" in lines[added]
