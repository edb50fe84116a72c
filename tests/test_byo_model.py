"""Bring your own model: Keras 2 `.h5` files, Keras 2 Tokenizer files, vocabularies, string-input models.

The Keras 2 side is built with `tf_keras` in a subprocess, exactly as the
tutorial wrote it (unnamed LSTMs, a shared Embedding, a `Lambda` add, named
outputs with loss and loss-weight dicts), fitted on real text with Keras 2's
`Tokenizer`, and saved as `.h5` with the tokenizer's `to_json()`.  The same
subprocess records the Keras 2 reference: `Model(inputs=model.input,
outputs=<layer tensor>).predict(pad_sequences(tokenizer.texts_to_sequences(texts),
maxlen=...))`.  The tests export those files with the pipeline and compare.
"""

import json
import logging
import os
import sys

import forkserver
import keras
import numpy as np
import pytest
import tensorflow as tf
from pipeline_fixtures import export_args, read_errors, read_rows, rows_by_id, write_jsonl

from models.keras2_config import SUPPORTED_LAYERS, LegacyModelError
from models.keras2_tokenizer import (
    FORMAT_KERAS2,
    FORMAT_VOCABULARY,
    Keras2Tokenizer,
    VocabularyTokenizer,
    pad_token_ids,
    read_tokenizer,
)
from models.legacy import load_model_file
from models.train import SAMPLE_CORPUS
from models.truncate import LayerSpec, layer_calls, resolve_layer
from pipeline.errors import ExportConfigError
from pipeline.inspect import main as inspect_main
from pipeline.planning.build import build_plan
from pipeline.planning.options import ExportOptions
from pipeline.running.export import run_export
from pipeline.writing.vocabulary_table import token_strings

TOLERANCE = 1e-5
CONTENT_LENGTH = 40
TITLE_LENGTH = 10
VOCABULARY = 300

# Runs under tf_keras (Keras 2) in its own process, so that no Keras 3 object
# shares its interpreter.  argv: output directory, sample corpus, content length,
# title length, vocabulary size.
KERAS2_SCRIPT = r"""
import json, os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
import numpy as np
import tensorflow as tf
import tf_keras
from tf_keras.layers import (Input, Embedding, LSTM, GRU, SimpleRNN, Dense, Lambda, Bidirectional,
    TimeDistributed, Conv1D, MaxPooling1D, GlobalAveragePooling1D, GlobalMaxPooling1D, BatchNormalization,
    LayerNormalization, SpatialDropout1D, Dropout, Activation, Concatenate, Add, Average, Multiply, Masking,
    Flatten, Reshape, Attention, AdditiveAttention, MultiHeadAttention, Softmax, UnitNormalization, Subtract,
    Maximum, Minimum, RNN, GRUCell, LSTMCell, SeparableConv1D, DepthwiseConv1D, Identity, Rescaling,
    Normalization, ThresholdedReLU)
from tf_keras.models import Model, Sequential
from tf_keras.preprocessing.text import Tokenizer
from tf_keras.preprocessing.sequence import pad_sequences

out, corpus_path = sys.argv[1], sys.argv[2]
CONTENT_LENGTH, TITLE_LENGTH, VOCABULARY = map(int, sys.argv[3:6])
tf_keras.utils.set_random_seed(0)
with open(corpus_path, encoding="utf-8") as handle:
    records = [json.loads(line) for line in handle][:240]
fit_records, documents = records[:200], records[190:230]
# Real text with what a tokenizer must get right: case, accents, punctuation, an empty field.
documents += [
    {"id": "odd-1", "content": "Ünïcode CAFÉ naïve—dash…ellipsis\tTab\nNewline ΣΑΣ, Return THE value!",
     "title": "ÉCOLE: the Return value", "kind": "function", "topic": "language"},
    {"id": "odd-2", "content": "", "title": "Return the value", "kind": "class", "topic": "language"},
]
with open(os.path.join(out, "corpus.jsonl"), "w", encoding="utf-8") as handle:
    for record in documents:
        handle.write(json.dumps(record, ensure_ascii=False) + "\n")

tokenizer = Tokenizer(num_words=VOCABULARY, oov_token="<OOV>")
tokenizer.fit_on_texts([r["content"] for r in fit_records] + [r["title"] for r in fit_records])
with open(os.path.join(out, "tokenizer.json"), "w", encoding="utf-8") as handle:
    handle.write(tokenizer.to_json())

def encode(texts, maxlen, padding="pre", truncating="pre"):
    sequences = tokenizer.texts_to_sequences(texts)
    return pad_sequences(sequences, maxlen=maxlen, padding=padding, truncating=truncating)

def features(rows, padding="pre", truncating="pre"):
    return [encode([r["content"] for r in rows], CONTENT_LENGTH, padding, truncating),
            encode([r["title"] for r in rows], TITLE_LENGTH, padding, truncating)]

topics = sorted({r["topic"] for r in fit_records})
labels = {
    "out_content": np.array([[r["kind"] == "function"] for r in fit_records], dtype="float32"),
    "out_title": tf_keras.utils.to_categorical([topics.index(r["topic"]) for r in fit_records], len(topics)),
}

# The tutorial's two-output model: a shared Embedding named 'emb', unnamed LSTMs.
content = Input(shape=(CONTENT_LENGTH,), name="content")
title = Input(shape=(TITLE_LENGTH,), name="title")
emb = Embedding(VOCABULARY, 16, name="emb")
content_vector = LSTM(8)(emb(content))
title_vector = LSTM(8)(emb(title))
out_content = Dense(1, activation="sigmoid", name="out_content")(content_vector)
out_title = Dense(len(topics), activation="softmax", name="out_title")(title_vector)
two_outputs = Model(inputs=[content, title], outputs=[out_content, out_title])
two_outputs.compile(optimizer="adam",
                    loss={"out_content": "binary_crossentropy", "out_title": "categorical_crossentropy"},
                    loss_weights={"out_content": 0.8, "out_title": 0.3})
two_outputs.fit(features(fit_records), labels, epochs=1, batch_size=32, verbose=0)
two_outputs.save(os.path.join(out, "two_outputs.h5"))

# The tutorial's Lambda variant: unnamed inputs, an unnamed shared Embedding, the two
# LSTM vectors added by a Lambda.
content2, title2 = Input(shape=(CONTENT_LENGTH,)), Input(shape=(TITLE_LENGTH,))
shared = Embedding(VOCABULARY, 16)
lstm_content, lstm_title = LSTM(8), LSTM(8)
added = Lambda(lambda x: x[0] + x[1])([lstm_content(shared(content2)), lstm_title(shared(title2))])
lambda_add = Model(inputs=[content2, title2], outputs=[
    Dense(1, activation="sigmoid", name="out_content")(added),
    Dense(len(topics), activation="softmax", name="out_title")(lstm_title.output)])
lambda_add.compile(optimizer="adam",
                   loss={"out_content": "binary_crossentropy", "out_title": "categorical_crossentropy"},
                   loss_weights={"out_content": 0.8, "out_title": 0.3})
lambda_add.fit(features(fit_records), labels, epochs=1, batch_size=32, verbose=0)
lambda_add.save(os.path.join(out, "lambda_add.h5"))

def outputs_of(model, targets, inputs):
    # One forward pass for all targets: Model(inputs=model.input, outputs=[layer tensors]).
    tensors = [model.get_layer(name).get_output_at(call) for name, call in targets]
    values = Model(inputs=model.input, outputs=tensors).predict(inputs, verbose=0)
    return {f"{name}:{call}": value for (name, call), value in zip(targets, values)}


references, info = {}, {"documents": [r["id"] for r in documents]}
for key, model, targets in (
    ("two_outputs", two_outputs, [("emb", 0), ("emb", 1), (content_vector._keras_history.layer.name, 0),
                                  (title_vector._keras_history.layer.name, 0)]),
    ("lambda_add", lambda_add, [(shared.name, 0), (shared.name, 1), (lstm_content.name, 0),
                                (lstm_title.name, 0), (added._keras_history.layer.name, 0)]),
):
    info[key] = {"inputs": [t.name.split(":")[0] for t in model.inputs], "targets": targets}
    for padding in ("pre", "post"):
        inputs = features(documents, padding, padding)
        for target, value in outputs_of(model, targets, inputs).items():
            references[f"{key}|{padding}|{target}"] = value
        references[f"{key}|{padding}|ids_content"], references[f"{key}|{padding}|ids_title"] = inputs
info["sequences"] = {
    "content": tokenizer.texts_to_sequences([r["content"] for r in documents]),
    "title": tokenizer.texts_to_sequences([r["title"] for r in documents]),
}

# Tokenizer settings beyond the tutorial's, against Keras 2's own texts_to_sequences.
probe = [r["content"] for r in documents] + ["Hello, WORLD!! hello-world\tx  y", "", "ÀÉ àé ß Σ"]
variants = {
    "default": Tokenizer(),
    "num_words": Tokenizer(num_words=40),
    "num_words_oov": Tokenizer(num_words=40, oov_token="[?]"),
    "raw": Tokenizer(lower=False, filters="", split=" "),
    "pipes": Tokenizer(filters=".,", split="e"),
    "chars": Tokenizer(char_level=True, num_words=25, oov_token="~"),
}
info["tokenizer_variants"] = {"probe": probe}
for name, variant in variants.items():
    variant.fit_on_texts([r["content"] for r in fit_records[:60]])
    text = variant.to_json()
    # json.dump(tokenizer.to_json(), f) writes the JSON text once more as a JSON string.
    if name == "num_words_oov":
        text = json.dumps(text)
    with open(os.path.join(out, f"tokenizer_{name}.json"), "w", encoding="utf-8") as handle:
        handle.write(text)
    sequences = variant.texts_to_sequences(probe)
    for padding in ("pre", "post"):
        for truncating in ("pre", "post"):
            references[f"tokenizer|{name}|{padding}|{truncating}"] = pad_sequences(
                sequences, maxlen=12, padding=padding, truncating=truncating)

# Every layer type of models.keras2_config.SUPPORTED_LAYERS, in a functional model, a
# Sequential and a model nested in another.
ids = np.random.default_rng(0).integers(0, 50, (6, 12))
ids[0, :5] = 0
inp = Input((12,))
masked = Embedding(50, 6, mask_zero=True)(inp)
bidirectional = Bidirectional(LSTM(4, return_sequences=True))(masked)
gru = GRU(5, return_sequences=True)(bidirectional)
gru_v1 = GRU(5, reset_after=False)(bidirectional)
simple = SimpleRNN(3)(gru)
timed = TimeDistributed(Dense(2))(gru)
conv = Conv1D(4, 3, padding="same")(SpatialDropout1D(0.1)(Embedding(50, 6)(inp)))
normed = LayerNormalization()(BatchNormalization()(conv))
pooled = MaxPooling1D(2)(normed)
flat = Flatten()(Reshape((4, 6))(pooled))
merged = Concatenate()(
    [simple, GlobalAveragePooling1D()(pooled), GlobalMaxPooling1D()(normed), gru_v1, Dense(3)(flat)])
hidden = Dropout(0.2)(Activation("relu")(Dense(7)(merged)))
summed = Add()([Dense(4)(hidden), Dense(4)(hidden)])
averaged = Average()([summed, Multiply()([summed, summed])])
many = Model(inp, Dense(1, activation="sigmoid")(Concatenate()([averaged, Flatten()(timed)])))
# hard_sigmoid: the recurrent activation of TF 1.x LSTMs, and not Keras 3's hard_sigmoid (x / 6 + 0.5).
sequential = Sequential([Embedding(50, 4, input_length=12), Masking(),
                         LSTM(3, recurrent_activation="hard_sigmoid"), Dense(2, activation="hard_sigmoid")])
sequential.build((None, 12))
inner = Sequential([Dense(3), Dense(2)], name="inner")
first, second = Input((12,)), Input((8,))
nested_embedding = Embedding(50, 4)
pair = [LSTM(3)(nested_embedding(first)), LSTM(3)(nested_embedding(second))]
nested = Model([first, second], inner(Concatenate()(pair)))
tf_op = Model(inp, Embedding(50, 4)(inp) + 1.0)
# The attention layers over a masked Embedding (MultiHeadAttention's value given by keyword), and a
# decoder LSTM started from an encoder's states: Keras 3 refused the first ("score_mode=<function
# dot>"), the second (Keras 2's recorded build shapes, then the value passed on as a list) and the
# third (Keras 2 lists initial_state among the layer's inputs).
attended = Embedding(50, 6, mask_zero=True)
query = attended(first)
_, state_h, state_c = LSTM(3, return_state=True)(query)
attentions = [Attention(use_scale=True)([query, query]), AdditiveAttention()([query, query]),
              MultiHeadAttention(num_heads=2, key_dim=3)(query, value=query)]
attention = Model([first, second], Concatenate()([
    GlobalAveragePooling1D()(Add()(attentions)),
    LSTM(3)(Embedding(50, 6)(second), initial_state=[state_h, state_c])]))
# A decoder on a masked sequence: Keras 3 drops the mask of a layer given initial_state.
started_masked = Model([first, second], LSTM(3)(attended(second), initial_state=[state_h, state_c]))
# Layers over several axes: Keras 3's legacy loader kept an axis of one number only (axis=-1 instead).
normed = LayerNormalization(axis=[1, 2], center=False, scale=False)(Embedding(50, 4)(inp))
axes = Model(inp, Flatten()(Softmax(axis=[1, 2])(UnitNormalization(axis=[1, 2])(normed))))
# Merges of masked sequences, each read by a layer that reads the mask or the padding: Keras 2 gives
# a merge the AND of its inputs' masks (an unmasked input counts as all true), Keras 3 the OR (none
# where an input has none) and its Multiply/Maximum/Minimum rewrite masked steps. The first masked
# Concatenate is named as tf_keras names it and as Keras 3 names the operation computing its mask in a
# fresh process. MultiHeadAttention with dropout: Keras 3's softmax then zeroes padding query steps.
masking = Embedding(50, 6, mask_zero=True)(inp)
convolved = Conv1D(6, 3, padding="same")(masking)
masks = Model(inp, Concatenate()([
    GlobalAveragePooling1D()(Add()([masking, convolved])),
    LSTM(2)(Concatenate(name="concatenate")([masking, convolved])),
    GlobalAveragePooling1D()(Average()([masking, Masking()(convolved)])),
    GlobalAveragePooling1D()(Subtract()([masking, convolved])),
    Flatten()(Multiply()([masking, masking])),
    Flatten()(Maximum()([masking, Masking()(convolved)])),
    Flatten()(Minimum()([masking, masking])),
    Flatten()(MultiHeadAttention(num_heads=2, key_dim=3, dropout=0.1)(masking, masking))]))
# Decoders started from states: a Bidirectional from a Bidirectional encoder's four, and the generic RNN
# layer (of one cell, and of stacked cells) from an LSTM's.
encoder_states = Bidirectional(LSTM(3, return_state=True))(query)[1:]
started = Model([first, second], Concatenate()([
    Bidirectional(LSTM(3))(Embedding(50, 6)(second), initial_state=encoder_states),
    RNN(LSTMCell(3))(Embedding(50, 6)(second), initial_state=[state_h, state_c]),
    RNN([GRUCell(3), LSTMCell(2)])(query)]))
# Depthwise and separable convolutions: Keras 3 refused the base convolution's arguments Keras 2 records.
convolutions = Model(inp, GlobalAveragePooling1D()(DepthwiseConv1D(3, padding="same")(
    SeparableConv1D(4, 3, padding="same", depth_multiplier=2)(Embedding(50, 6)(inp)))))
# Layer names with '/' (Keras 2 allows them, Keras 3 does not), in a nested model and a Bidirectional
# too, beside a layer already named as the first '/' one becomes.
enc_input = Input((12,))
encoded = LSTM(3, name="enc/lstm")(Embedding(50, 4, name="enc/emb")(enc_input))
encoder = Model(enc_input, encoded, name="enc/model")
slashed = Model(inp, Dense(2, name="out/dense")(Concatenate(name="cat/all")(
    [encoder(inp), Bidirectional(GRU(2), name="enc/bi")(Embedding(50, 3, name="enc_emb")(inp))])))
rng = np.random.default_rng(1)
# A Bidirectional of a go_backwards=True layer: Keras 2's backward copy then reads forwards.
reading_back = Embedding(50, 4)(inp)
backwards = Model(inp, [Bidirectional(GRU(3, go_backwards=True), name="bi_vector")(reading_back),
                        Bidirectional(LSTM(2, go_backwards=True, return_sequences=True), name="bi_sequence")(
                            reading_back)])
# MultiHeadAttention on a masked sequence: Keras 3's deleted the masks of its inputs for the layers run
# after it (the Attention beside this transformer block read the padding), and gave a padding query
# step no attention weight, where Keras 2 spreads it evenly (its scores there, and a Dense over them).
sequence = Embedding(50, 6, mask_zero=True)(inp)
attended = MultiHeadAttention(num_heads=2, key_dim=3)(sequence, sequence)
block = LayerNormalization()(Add()([sequence, attended]))
scored, scores = MultiHeadAttention(num_heads=2, key_dim=3)(sequence, sequence, return_attention_scores=True)
attention_masks = Model(inp, [
    Concatenate(name="block_and_attention")([GlobalAveragePooling1D()(block),
                                             GlobalAveragePooling1D()(Attention()([sequence, sequence]))]),
    Dense(2, name="from_scores")(Concatenate()([Flatten()(scored), Flatten()(scores)]))])
# Keras 2's Identity, Rescaling and Normalization pass no mask on (the pooling after them reads the
# padding); Keras 3 has no ThresholdedReLU.
sequence = Embedding(50, 6, mask_zero=True)(inp)
kept_off = (Identity(), Rescaling(2.0, 0.5), Normalization(mean=0.1, variance=2.0), ThresholdedReLU(0.1))
unmasked = Model(inp, [GlobalAveragePooling1D(name=f"pooled_{index}")(layer(sequence))
                       for index, layer in enumerate(kept_off)])
# A layer class of the training script: Keras 3 has no such class.
class Doubled(tf_keras.layers.Layer):
    def call(self, inputs):
        return inputs * 2.0
Model(inp, Flatten()(Doubled()(Embedding(50, 4)(inp)))).save(os.path.join(out, "custom_class.h5"))
# A Lambda that keeps the mask on (Keras 2 stores its mask function beside its function).
keeping = Lambda(lambda t: t * 2.0, mask=lambda _, mask: mask)
kept = keeping(Embedding(50, 6, mask_zero=True)(inp))
lambda_mask = Model(inp, GlobalAveragePooling1D(name="pooled")(kept))
for name, model in (("many", many), ("sequential", sequential), ("nested", nested), ("tf_op", tf_op),
                    ("attention", attention), ("started_masked", started_masked), ("axes", axes),
                    ("masks", masks), ("started", started), ("convolutions", convolutions),
                    ("slashed", slashed), ("backwards", backwards), ("attention_masks", attention_masks),
                    ("unmasked", unmasked), ("lambda_mask", lambda_mask)):
    # Random weights, all different from their initial values (variances stay positive).
    model.set_weights([
        np.abs(value) + 0.5 if "moving_variance" in weight.name else value
        for weight, value in ((w, rng.normal(0, 0.5, w.shape)) for w in model.weights)
    ])
    model.save(os.path.join(out, f"zoo_{name}.h5"))
    inputs = ids if len(model.inputs) == 1 else [ids, ids[:, :8]]
    keys, tensors = [], []
    for layer in model.layers:
        # Calls numbered as Keras 3 numbers them: only those in this model's graph (a
        # nested model's own input-to-output node is not a call).
        nodes = range(len(layer._inbound_nodes))
        calls = [i for i in nodes if f"{layer.name}_ib-{i}" in model._network_nodes]
        for call, node in enumerate(calls):
            tensor = layer.get_output_at(node)
            if not isinstance(layer, tf_keras.layers.InputLayer) and not isinstance(tensor, (list, tuple)):
                keys.append(f"zoo|{name}|{layer.name}:{call}")
                tensors.append(tensor)
    values = Model(model.inputs, tensors).predict(inputs, verbose=0)
    references.update(zip(keys, values))
np.save(os.path.join(out, "zoo_ids.npy"), ids)

np.savez(os.path.join(out, "references.npz"), **references)
with open(os.path.join(out, "info.json"), "w", encoding="utf-8") as handle:
    json.dump(info, handle, ensure_ascii=False)
"""


@pytest.fixture(scope="module")
def keras2(tmp_path_factory):
    """Directory with the tf_keras-built files, the references and `info`."""
    directory = tmp_path_factory.mktemp("keras2")
    result = forkserver.run(
        [
            sys.executable,
            "-c",
            KERAS2_SCRIPT,
            str(directory),
            SAMPLE_CORPUS,
            *map(str, (CONTENT_LENGTH, TITLE_LENGTH, VOCABULARY)),
        ],
        capture_output=True,
        text=True,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
    )
    assert result.returncode == 0, result.stderr[-4000:]
    with open(directory / "info.json", encoding="utf-8") as handle:
        info = json.load(handle)
    return directory, dict(np.load(directory / "references.npz")), info


def _export(tmp_path, model, corpus, *flags):
    output = tmp_path / "out"
    summary = run_export(export_args(model, corpus, output, *flags))
    assert summary.exit_code == 0, summary.message
    return output


def _assert_matches(rows, column, reference, ids=None):
    """Checks each document's exported vector(s) against the Keras 2 reference.

    For per-token columns (`ids` given) the export keeps the real tokens (id != 0)
    of each document, in order.
    """
    for row_index, document in enumerate(rows):
        expected = reference[row_index]
        if ids is not None:
            expected = expected[ids[row_index] != 0]
        actual = np.asarray(document[column], dtype=np.float32).reshape(expected.shape)
        np.testing.assert_allclose(
            actual, expected, atol=TOLERANCE, rtol=0, err_msg=f"{column} of {document['id']}"
        )


def _ordered_rows(output, document_ids):
    by_id = rows_by_id(read_rows(output))
    assert sorted(by_id) == sorted(document_ids)
    return [by_id[document_id] for document_id in document_ids]


@pytest.mark.parametrize("padding", ["pre", "post"])
def test_keras2_two_output_model_matches_tf_keras(keras2, tmp_path, padding):
    directory, references, info = keras2
    names = [name for name, _ in info["two_outputs"]["targets"]]
    lstm_content, lstm_title = names[2], names[3]
    flags = ["--tokenizer", directory / "tokenizer.json", "--pooling", "none"]
    flags += [f"--layer={spec}" for spec in ("emb", "emb:1", lstm_content, lstm_title)]
    if padding == "post":
        flags += ["--padding", "post", "--truncating", "post"]
    output = _export(tmp_path, directory / "two_outputs.h5", directory / "corpus.jsonl", *flags)

    rows = _ordered_rows(output, info["documents"])
    prefix = f"two_outputs|{padding}|"
    content_ids, title_ids = references[prefix + "ids_content"], references[prefix + "ids_title"]
    _assert_matches(rows, "emb", references[prefix + "emb:0"], content_ids)
    _assert_matches(rows, "emb_call1", references[prefix + "emb:1"], title_ids)
    _assert_matches(rows, lstm_content, references[f"{prefix}{lstm_content}:0"])
    _assert_matches(rows, lstm_title, references[f"{prefix}{lstm_title}:0"])
    # The document with an empty content keeps its title tokens only.
    assert rows[info["documents"].index("odd-2")]["emb_tokens"] == 0


def test_keras2_model_token_ids_and_table_reproduce_tf_keras(keras2, tmp_path):
    """--token_storage ids on the tutorial's model: float32 inputs, a shared Embedding, Tokenizer ids."""
    import pyarrow.parquet as pq

    from pipeline.writing.token_tables import read_table_vectors

    directory, references, info = keras2
    output = _export(
        tmp_path,
        directory / "two_outputs.h5",
        directory / "corpus.jsonl",
        "--tokenizer",
        directory / "tokenizer.json",
        "--layer=emb",
        "--layer=emb:1",
        "--pooling=none",
        "--token_storage=ids",
    )
    table = read_table_vectors(str(output / "_tables" / "emb.parquet"))
    rows = _ordered_rows(output, info["documents"])
    prefix = "two_outputs|pre|"
    for column, source_input, call in (("emb", "content", 0), ("emb_call1", "title", 1)):
        padded = references[f"{prefix}ids_{source_input}"]
        for row, document in enumerate(rows):
            real = padded[row] != 0
            # The ids are pad_sequences(tokenizer.texts_to_sequences(...))'s real tokens, and
            # the table indexed by them is Keras 2's own predict of the embedding, bit for bit.
            assert document[column] == padded[row][real].astype(int).tolist(), document["id"]
            np.testing.assert_array_equal(
                table[document[column]], references[f"{prefix}emb:{call}"][row][real]
            )
    assert pq.read_schema(output / "_tables" / "emb.parquet").field("vector").type.list_size == 16


def test_keras2_lambda_model_is_refused_without_the_flag(keras2, tmp_path):
    directory, _, info = keras2
    inputs = info["lambda_add"]["inputs"]
    with pytest.raises(ExportConfigError, match="--allow_unsafe_deserialization") as caught:
        run_export(
            export_args(
                directory / "lambda_add.h5",
                directory / "corpus.jsonl",
                tmp_path / "out",
                "--tokenizer",
                directory / "tokenizer.json",
                f"--input_map={inputs[0]}=content",
                f"--input_map={inputs[1]}=title",
            )
        )
    # The message says why Lambda layers are refused, not only how to allow them.
    assert "Lambda layer(s)" in str(caught.value) and "runs that code" in str(caught.value)
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


def test_keras2_lambda_model_matches_tf_keras_with_the_flag(keras2, tmp_path):
    directory, references, info = keras2
    embedding, _, lstm_content, lstm_title, added = [name for name, _ in info["lambda_add"]["targets"]]
    inputs = info["lambda_add"]["inputs"]
    output = _export(
        tmp_path,
        directory / "lambda_add.h5",
        directory / "corpus.jsonl",
        "--tokenizer",
        directory / "tokenizer.json",
        "--allow_unsafe_deserialization",
        f"--input_map={inputs[0]}=content",
        f"--input_map={inputs[1]}=title",
        "--pooling=none",
        *[f"--layer={spec}" for spec in (embedding, f"{embedding}:1", lstm_content, lstm_title, added)],
    )
    rows = _ordered_rows(output, info["documents"])
    prefix = "lambda_add|pre|"
    _assert_matches(rows, embedding, references[f"{prefix}{embedding}:0"], references[prefix + "ids_content"])
    _assert_matches(
        rows, f"{embedding}_call1", references[f"{prefix}{embedding}:1"], references[prefix + "ids_title"]
    )
    for name in (lstm_content, lstm_title, added):
        _assert_matches(rows, name, references[f"{prefix}{name}:0"])


@pytest.mark.parametrize("mixed", [False, True], ids=["id_lists", "id_lists_and_text"])
def test_corpus_of_token_id_lists_skips_the_tokenizer(keras2, tmp_path, mixed):
    directory, references, info = keras2
    with open(directory / "corpus.jsonl", encoding="utf-8") as handle:
        texts = [json.loads(line) for line in handle]
    documents = [
        # Mixed: every other document keeps its text for the tokenizer.
        text if mixed and index % 2 else {"id": document_id, "content": content, "title": title}
        for index, (text, document_id, content, title) in enumerate(
            zip(
                texts,
                info["documents"],
                info["sequences"]["content"],
                info["sequences"]["title"],
                strict=True,
            )
        )
    ]
    corpus = write_jsonl(
        tmp_path / "ids.jsonl", documents, extra_lines=['{"id": "bad", "content": [1, -2], "title": [3]}']
    )
    names = [name for name, _ in info["two_outputs"]["targets"]]
    output = tmp_path / "out"
    summary = run_export(
        export_args(
            directory / "two_outputs.h5",
            corpus,
            output,
            "--tokenizer",
            directory / "tokenizer.json" if mixed else "none",
            *[f"--layer={spec}" for spec in ("emb", "emb:1", names[2], names[3])],
            "--pooling=none",
        )
    )
    assert summary.rows_written == len(documents) and summary.dead_letters == 1
    assert read_errors(output).to_pylist()[0]["reason"] == "bad_token_id"
    rows = _ordered_rows(output, info["documents"])
    prefix = "two_outputs|pre|"
    _assert_matches(rows, "emb", references[prefix + "emb:0"], references[prefix + "ids_content"])
    _assert_matches(rows, "emb_call1", references[prefix + "emb:1"], references[prefix + "ids_title"])
    for name in names[2:]:
        _assert_matches(rows, name, references[f"{prefix}{name}:0"])


def test_inspect_lists_the_keras2_layers_and_their_specs(keras2, capsys):
    directory, _, info = keras2
    embedding, _, lstm_content, lstm_title, added = [name for name, _ in info["lambda_add"]["targets"]]
    first, second = info["lambda_add"]["inputs"]
    assert inspect_main([str(directory / "lambda_add.h5")]) == 2
    assert "--allow_unsafe_deserialization" in capsys.readouterr().err

    model = str(directory / "lambda_add.h5")
    assert (
        inspect_main(
            [model, "--allow_unsafe_deserialization", "--tokenizer", str(directory / "tokenizer.json")]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "Keras2Tokenizer" in printed
    lines = {line.split()[-1]: line.split() for line in printed.splitlines() if line.strip()}
    assert lines[f"{embedding}:1"][:3] == [embedding, "Embedding", "1"]
    assert f"(None, {TITLE_LENGTH}, 16)" in " ".join(lines[f"{embedding}:1"])
    assert lines[f"{embedding}:1"][-3:] == ["sequence", f"({second})", f"{embedding}:1"]
    assert lines[lstm_content][1] == "LSTM" and first in lines[lstm_content]
    assert lines[added][:2] == [added, "Lambda"] and f"{first}," in lines[added] and second in lines[added]

    assert inspect_main([model, "--allow_unsafe_deserialization", "--layer", "lstm"]) == 2
    assert "Did you mean" in capsys.readouterr().err


def test_keras2_tokenizer_reproduces_texts_to_sequences(keras2):
    directory, references, info = keras2
    probe = info["tokenizer_variants"]["probe"]
    for path in sorted(directory.glob("tokenizer_*.json")):
        name = path.stem[len("tokenizer_") :]
        for padding in ("pre", "post"):
            for truncating in ("pre", "post"):
                tokenizer, file_format = read_tokenizer(path.read_bytes(), padding, truncating)
                assert file_format == FORMAT_KERAS2 and isinstance(tokenizer, Keras2Tokenizer)
                ids = tokenizer.encode_batch(probe, 12)[0]
                reference = references[f"tokenizer|{name}|{padding}|{truncating}"]
                np.testing.assert_array_equal(ids, reference, err_msg=f"{name} {padding} {truncating}")
                # What the pipeline runs: one document at a time.
                one_by_one = np.stack([tokenizer.encode_one(text, 12)[0] for text in probe])
                np.testing.assert_array_equal(one_by_one, reference, err_msg=f"{name} {padding} {truncating}")


def test_keras2_tokenizer_vocabulary_and_ids():
    tokenizer = Keras2Tokenizer({"<unk>": 1, "the": 2, "value": 3, "rare": 4}, num_words=4, oov_token="<unk>")
    assert tokenizer.size == 4
    assert tokenizer.vocabulary == ["the", "value"]  # vocabulary[i] is id i + 2
    assert tokenizer.id_to_token() == {1: "<unk>", 2: "the", 3: "value"}
    ids, counts, oov, truncated = tokenizer.encode_batch(["The rare VALUE, unknown.", ""], 3)
    np.testing.assert_array_equal(ids, [[1, 3, 1], [0, 0, 0]])  # "the" cut: truncating "pre"
    assert counts.tolist() == [3, 0] and oov.tolist() == [2, 0] and truncated.tolist() == [True, False]
    # Without an oov_token, unknown words and ids >= num_words are dropped, as in Keras 2.
    no_oov = Keras2Tokenizer({"the": 1, "value": 2, "rare": 3}, num_words=3)
    assert no_oov.encode_batch(["the rare value unknown"], 4)[0].tolist() == [[0, 0, 1, 2]]
    assert no_oov.id_to_token() == {1: "the", 2: "value"}


def test_a_keras2_tokenizers_get_config_saved_as_json_reads_as_its_to_json(keras2):
    # json.dump(tokenizer.get_config(), f) holds every setting, yet was refused as "neither this
    # package's tokenizer nor a Keras 2 Tokenizer.to_json() file".
    directory, _, info = keras2
    saved = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))
    tokenizer, file_format = read_tokenizer(json.dumps(saved["config"]).encode())
    assert file_format == FORMAT_KERAS2
    with open(directory / "corpus.jsonl", encoding="utf-8") as handle:
        texts = [json.loads(line)["content"] for line in handle]
    assert [tokenizer.token_ids(text)[0] for text in texts] == info["sequences"]["content"]


def test_a_keras2_word_index_saved_alone_is_refused_saying_to_save_the_whole_tokenizer():
    # json.dump(tokenizer.word_index, f) is a common way to keep a tokenizer; it lacks the settings
    # that say how a text becomes ids, so it is refused, saying what to save instead.
    with pytest.raises(ValueError, match=r"word_index alone .*num_words.*tokenizer\.to_json\(\)"):
        read_tokenizer(json.dumps({"<OOV>": 1, "the": 2, "école": 3}).encode())
    with pytest.raises(ValueError, match="neither this package's tokenizer"):
        read_tokenizer(json.dumps({"the": "1"}).encode())


def test_legacy_layers_match_tf_keras(keras2):
    directory, references, _ = keras2
    ids = np.load(directory / "zoo_ids.npy")
    checked_types = set()
    # Keras's name counts as in a fresh process, where a model whose masked Concatenate is named
    # "concatenate" was refused: Keras 3 gave the operation computing its mask that name too.
    keras.backend.clear_session()
    for name in (
        "masks",
        "many",
        "sequential",
        "nested",
        "attention",
        "axes",
        "started",
        "convolutions",
        "attention_masks",
        "unmasked",
    ):
        model = load_model_file(str(directory / f"zoo_{name}.h5"))
        calls = layer_calls(model)
        inputs = ids if len(model.inputs) == 1 else [ids, ids[:, :8]]
        keys = [key for key in references if key.startswith(f"zoo|{name}|")]
        assert keys
        targets = [key.split("|")[2].split(":") for key in keys]
        tensors = [calls[layer][int(call)] for layer, call in targets]
        actual = keras.Model(model.inputs, tensors).predict(inputs, verbose=0)
        for key, value in zip(keys, actual, strict=True):
            np.testing.assert_allclose(value, references[key], atol=TOLERANCE, rtol=0, err_msg=key)
        checked_types.update(type(model.get_layer(layer)).__name__ for layer, _ in targets)
    # Lambda is checked by the export tests above; models are the containers here.
    assert set(SUPPORTED_LAYERS) - {"InputLayer", "Lambda", "Functional"} <= checked_types
    with pytest.raises(LegacyModelError, match="TFOpLambda"):
        load_model_file(str(directory / "zoo_tf_op.h5"))
    # Rebuilt, it would read the padding Keras 2 skips.
    with pytest.raises(LegacyModelError, match="starts from initial_state and reads a masked sequence"):
        load_model_file(str(directory / "zoo_started_masked.h5"))


def _zoo_output(directory, name, layer, allow_unsafe=False):
    """Keras 3's forward pass of one layer of a zoo model, as an export of that layer alone runs it."""
    model = load_model_file(str(directory / f"zoo_{name}.h5"), allow_unsafe=allow_unsafe)
    tensor = layer_calls(model)[layer][0]
    return keras.Model(model.inputs, tensor).predict(np.load(directory / "zoo_ids.npy"), verbose=0)


def test_a_multi_head_attention_leaves_its_inputs_masks_to_the_layers_run_after_it(keras2):
    # Keras 3's MultiHeadAttention deleted the mask of its query: the Attention beside the transformer
    # block, which Keras runs after it, attended to the padding (0.07 off).
    directory, references, _ = keras2
    actual = _zoo_output(directory, "attention_masks", "block_and_attention")
    expected = references["zoo|attention_masks|block_and_attention:0"]
    np.testing.assert_allclose(actual, expected, atol=TOLERANCE, rtol=0)


def test_a_multi_head_attention_spreads_a_padding_query_step_over_every_key_as_keras2(keras2):
    # Keras 3's softmax gave a query step that sees no unmasked key no weight at all; Keras 2 the
    # same weight on every key: its scores and output there, and a Dense over them, differed.
    directory, references, _ = keras2
    actual = _zoo_output(directory, "attention_masks", "from_scores")
    np.testing.assert_allclose(
        actual, references["zoo|attention_masks|from_scores:0"], atol=TOLERANCE, rtol=0
    )


@pytest.mark.parametrize("index", [0, 1, 2], ids=["Identity", "Rescaling", "Normalization"])
def test_a_keras2_layer_that_passed_no_mask_on_is_rebuilt_without_one(keras2, index):
    # Keras 3's pass the mask on: the pooling after them averaged the real tokens only, Keras 2's every step.
    directory, references, _ = keras2
    actual = _zoo_output(directory, "unmasked", f"pooled_{index}")
    np.testing.assert_allclose(actual, references[f"zoo|unmasked|pooled_{index}:0"], atol=TOLERANCE, rtol=0)


def test_a_keras2_thresholded_relu_loads_and_a_class_keras3_lacks_is_one_line_saying_to_rebuild(keras2):
    # Keras 3 has no ThresholdedReLU: both were refused with advice about keras.utils.custom_object_scope.
    directory, references, _ = keras2
    actual = _zoo_output(directory, "unmasked", "pooled_3")
    np.testing.assert_allclose(actual, references["zoo|unmasked|pooled_3:0"], atol=TOLERANCE, rtol=0)
    with pytest.raises(LegacyModelError) as refused:
        load_model_file(str(directory / "custom_class.h5"))
    message = str(refused.value)
    assert "uses the layer class 'Doubled', which Keras 3 does not have" in message
    assert "custom_object_scope" not in message and "\n" not in message
    assert message.endswith("copy the weights (new.set_weights(old.get_weights())) and save it as .h5 again.")


def test_a_keras2_lambda_that_keeps_the_mask_on_loads(keras2):
    # Keras 3 refused the keys of its mask function: "Unrecognized keyword arguments passed to Lambda".
    directory, references, _ = keras2
    actual = _zoo_output(directory, "lambda_mask", "pooled", allow_unsafe=True)
    np.testing.assert_allclose(actual, references["zoo|lambda_mask|pooled:0"], atol=TOLERANCE, rtol=0)


def test_keras2_layer_names_with_a_slash_load_with_an_underscore(keras2, caplog):
    # Keras 3 refused the whole model with its config dump: "cannot contain character `/`".
    directory, references, _ = keras2
    with caplog.at_level(logging.WARNING):
        model = load_model_file(str(directory / "zoo_slashed.h5"))
    renamed = {"enc/model": "enc_model", "enc/bi": "enc_bi", "cat/all": "cat_all", "out/dense": "out_dense"}
    renamed["enc_emb"] = "enc_emb"
    assert "Layer 'enc/bi' of" in caplog.text and "is called 'enc_bi' here" in caplog.text
    assert {layer.name for layer in model.get_layer("enc_model").layers} >= {"enc_emb_", "enc_lstm"}
    calls = layer_calls(model)
    keys = [key for key in references if key.startswith("zoo|slashed|")]
    targets = [key.split("|")[2].rsplit(":", 1) for key in keys]
    assert {layer for layer, _ in targets} == set(renamed)
    tensors = [calls[renamed[layer]][int(call)] for layer, call in targets]
    actual = keras.Model(model.inputs, tensors).predict(np.load(directory / "zoo_ids.npy"), verbose=0)
    for key, value in zip(keys, actual, strict=True):
        np.testing.assert_allclose(value, references[key], atol=TOLERANCE, rtol=0, err_msg=key)


def test_a_layer_asked_for_by_its_slashed_name_is_told_its_name_here(keras2):
    # --layer enc/emb said "Did you mean 'enc_emb'?": another layer, the one whose name made this
    # one 'enc_emb_'; following the hint exported the wrong layer.
    directory, _, _ = keras2
    model = load_model_file(str(directory / "zoo_slashed.h5"))
    with pytest.raises(ValueError) as refused:
        resolve_layer(model, LayerSpec("enc_emb", "enc/emb"))
    message = str(refused.value)
    assert "'enc/emb' of the model file is called 'enc_emb_' here" in message
    assert "Did you mean" not in message
    with pytest.raises(ValueError, match=r"pass --layer out_dense:1\.$"):
        resolve_layer(model, LayerSpec("out", "out/dense", 1))


def test_keras2_bidirectional_of_a_backwards_layer_keeps_its_directions(keras2):
    # Keras 3 made both copies read backwards, and refused the model ("Forward layer and backward
    # layer should have different `go_backwards` value").
    directory, references, _ = keras2
    model = load_model_file(str(directory / "zoo_backwards.h5"))
    names = ("bi_vector", "bi_sequence")
    assert [model.get_layer(name).backward_layer.go_backwards for name in names] == [False, False]
    actual = keras.Model(model.inputs, [model.get_layer(name).output for name in names]).predict(
        np.load(directory / "zoo_ids.npy"), verbose=0
    )
    for name, value in zip(names, actual, strict=True):
        expected = references[f"zoo|backwards|{name}:0"]
        np.testing.assert_allclose(value, expected, atol=TOLERANCE, rtol=0, err_msg=name)


def test_a_layer_config_keras3_refuses_is_one_line_naming_its_class(keras2, tmp_path):
    # The message held Keras's config dump of every level of the model, over several lines.
    import h5py

    directory, _, _ = keras2
    path = tmp_path / "extra_argument.h5"
    path.write_bytes((directory / "zoo_many.h5").read_bytes())
    with h5py.File(path, "r+") as handle:
        config = json.loads(handle.attrs["model_config"])
        dense = next(layer for layer in config["config"]["layers"] if layer["class_name"] == "Dense")
        dense["config"]["unknown_argument"] = 1
        handle.attrs["model_config"] = json.dumps(config)
    with pytest.raises(LegacyModelError) as raised:
        load_model_file(str(path))
    message = str(raised.value)
    assert "\n" not in message and "config=" not in message
    assert "building a Dense: Unrecognized keyword arguments passed to Dense: {'unknown_argument'" in message


def test_keras3_h5_file_loads(tmp_path):
    keras.utils.set_random_seed(2)
    inputs = keras.Input((5,), dtype="int32", name="ids")
    outputs = keras.layers.LSTM(3, name="lstm")(keras.layers.Embedding(20, 4, name="emb")(inputs))
    model = keras.Model(inputs, outputs)
    path = str(tmp_path / "model.h5")
    model.save(path)
    ids = np.arange(10).reshape(2, 5)
    np.testing.assert_allclose(
        load_model_file(path).predict(ids, verbose=0), model.predict(ids, verbose=0), atol=1e-6
    )


def test_a_keras3_h5_file_of_a_masked_model_is_refused_saying_to_save_it_as_keras(tmp_path):
    # Keras 3 writes the mask as a keras.ops.not_equal operation that its own .h5 reader cannot
    # rebuild: "Unknown layer: 'NotEqual'. Please ensure you are using a custom_object_scope ...".
    inputs = keras.Input((5,), dtype="int32", name="ids")
    embedded = keras.layers.Embedding(20, 4, mask_zero=True, name="emb")(inputs)
    path = str(tmp_path / "model.h5")
    keras.Model(inputs, keras.layers.LSTM(3, name="lstm")(embedded)).save(path)
    with pytest.raises(LegacyModelError) as refused:
        load_model_file(path)
    message = str(refused.value)
    assert "keras.ops.not_equal" in message and "custom_object_scope" not in message
    assert message.endswith("Save the model as .keras (model.save('model.keras')) and pass that file.")


def test_an_h5_file_that_lost_its_vectorizers_vocabulary_is_refused_in_one_line(tmp_path):
    # Keras 3 writes .h5 without the vocabulary adapt() learnt, and without a word; loaded, the
    # layer fails on every text ("Table not initialized").
    texts = ["alpha beta gamma", "beta gamma delta"]
    adapted = keras.layers.TextVectorization(max_tokens=10, output_sequence_length=4, name="vectorize")
    adapted.adapt(np.array(texts))
    listed = keras.layers.TextVectorization(
        output_sequence_length=4, vocabulary=["alpha", "beta"], name="listed"
    )
    for vectorizer, name in ((adapted, "adapted"), (listed, "listed")):
        text = keras.Input(shape=(1,), dtype="string", name="text")
        pooled = keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(10, 2)(vectorizer(text)))
        keras.Model(text, pooled).save(tmp_path / f"{name}.h5")
    # A vocabulary given as a list is in the layer's config, which .h5 keeps.
    assert load_model_file(str(tmp_path / "listed.h5")).get_layer("listed").vocabulary_size() == 4
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"id": "d", "text": "alpha"}])
    with pytest.raises(ExportConfigError) as refused:
        run_export(export_args(tmp_path / "adapted.h5", corpus, tmp_path / "out", "--layer=vectorize"))
    message = str(refused.value)
    assert "TextVectorization layer 'vectorize' without its vocabulary" in message
    assert "model.save('model.keras')" in message and "\n" not in message
    assert not (tmp_path / "out").exists()


PROBE_TEXTS = [
    "Return the VALUE of x, or None!",
    "ÉCOLE école Straße — it's  a\ttest.\nNew line",
    "",
    "unknownword the the the the the the the the the the the the the the",
]


def test_vocabulary_file_matches_text_vectorization(tmp_path):
    vectorizer = keras.layers.TextVectorization(max_tokens=30, output_sequence_length=8)
    vectorizer.adapt(PROBE_TEXTS[:3] + ["x value return école it's a the"])
    path = tmp_path / "vocabulary.txt"
    path.write_text("\n".join(vectorizer.get_vocabulary()) + "\n", encoding="utf-8")
    # TextVectorization pads and truncates at the end.
    tokenizer, file_format = read_tokenizer(path.read_bytes(), "post", "post")
    assert file_format == FORMAT_VOCABULARY and isinstance(tokenizer, VocabularyTokenizer)
    ids, counts, oov, truncated = tokenizer.encode_batch(PROBE_TEXTS, 8)
    np.testing.assert_array_equal(ids, np.asarray(vectorizer(np.array(PROBE_TEXTS))))
    one_by_one = [tokenizer.encode_one(text, 8) for text in PROBE_TEXTS]
    np.testing.assert_array_equal(np.stack([one[0] for one in one_by_one]), ids)
    assert [one[1:] for one in one_by_one] == list(zip(counts, oov, truncated, strict=True))
    assert truncated.tolist() == [False, True, False, True]  # 9 and 15 words
    assert oov[3] == 1 and counts[2] == 0
    assert tokenizer.vocabulary == vectorizer.get_vocabulary()[2:]
    assert tokenizer.id_to_token()[1] == "[UNK]"
    with pytest.raises(ValueError, match="line 0 must be empty"):
        read_tokenizer(b"the\nvalue\n")
    # The vocabulary's rows: padding named as every tokenizer's is (line 0 is ''), [UNK] kept.
    tokens = token_strings(tokenizer.id_to_token(), len(vectorizer.get_vocabulary()) + 1)
    assert tokens == ["<pad>", "[UNK]", *vectorizer.get_vocabulary()[2:], None]


def test_pad_token_ids_is_pad_sequences():
    sequences = [[1, 2, 3, 4, 5], [6], []]
    ids, counts, truncated = pad_token_ids(sequences, 3, padding="post", truncating="post")
    assert ids.tolist() == [[1, 2, 3], [6, 0, 0], [0, 0, 0]]
    ids, _, _ = pad_token_ids(sequences, 3)
    assert ids.tolist() == [[3, 4, 5], [0, 0, 6], [0, 0, 0]]
    assert counts.tolist() == [3, 1, 0] and truncated.tolist() == [True, False, False]


@pytest.fixture(scope="module")
def string_model(tmp_path_factory):
    """A trained Keras 3 `.keras` model that takes raw strings (TextVectorization inside)."""
    with open(SAMPLE_CORPUS, encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle][300:360]
    keras.utils.set_random_seed(4)
    texts = np.array([record["content"] for record in records])
    vectorizer = keras.layers.TextVectorization(max_tokens=200, output_sequence_length=24, name="vectorize")
    vectorizer.adapt(texts)
    text = keras.Input(shape=(1,), dtype="string", name="text")
    embedded = keras.layers.Embedding(200, 8, name="emb")(vectorizer(text))
    lstm = keras.layers.LSTM(6, name="lstm")(embedded)
    pooled = keras.layers.GlobalAveragePooling1D(name="pool")(embedded)
    output = keras.layers.Dense(1, activation="sigmoid", name="out")(
        keras.layers.Concatenate()([lstm, pooled])
    )
    model = keras.Model(text, output)
    model.compile(optimizer="adam", loss="binary_crossentropy")
    labels = np.array([[record["kind"] == "function"] for record in records], dtype="float32")
    model.fit(tf.data.Dataset.from_tensor_slices((texts[:, None], labels)).batch(16), epochs=2, verbose=0)
    directory = tmp_path_factory.mktemp("string_model")
    path = directory / "model.keras"
    model.save(path)
    documents = [{"id": record["id"], "body": record["content"]} for record in records[:30]]
    return path, write_jsonl(directory / "corpus.jsonl", documents), model, documents


def test_string_input_model_gets_raw_text(string_model, tmp_path):
    path, corpus, model, documents = string_model
    output = _export(
        tmp_path,
        path,
        corpus,
        "--input_map=text=body",
        "--pooling=none",
        "--layer=emb",
        "--layer=lstm",
        "--layer=pool",
    )
    rows = _ordered_rows(output, [d["id"] for d in documents])
    strings = np.array([d["body"] for d in documents])[:, None]
    ids = np.asarray(model.get_layer("vectorize")(strings))
    for name in ("emb", "lstm", "pool"):
        reference = keras.Model(model.inputs, model.get_layer(name).output).predict(
            tf.constant(strings), verbose=0
        )
        _assert_matches(rows, name, reference, ids if name == "emb" else None)


def test_a_tokenizer_and_sides_a_string_model_does_not_use_are_said_so_and_not_compared(
    string_model, tmp_path, caplog
):
    # They changed no byte, yet were recorded: --reuse without them was refused, saying that
    # the earlier vectors "would differ".
    path, corpus, _, _ = string_model
    vocabulary = tmp_path / "vocabulary.txt"
    vocabulary.write_text("\n[UNK]\nthe\n", encoding="utf-8")
    flags = ("--layer=pool", "--input_map=text=body", "--batch_size=64")
    first = tmp_path / "first"
    with caplog.at_level(logging.WARNING):
        summary = run_export(
            export_args(path, corpus, first, *flags, "--tokenizer", vocabulary, "--padding", "post")
        )
    assert summary.exit_code == 0, summary.message
    assert "--tokenizer and --padding not used" in caplog.text
    with open(first / "_MANIFEST.json", encoding="utf-8") as handle:
        assert json.load(handle)["tokenizer_sha256"] == ""
    # The launch's check of --reuse (which refused it) passes: the plan names the earlier rows.
    plan, _ = build_plan(
        ExportOptions(export_args(path, corpus, tmp_path / "second", *flags, "--reuse", first))
    )
    assert plan.reuse == str(first) and len(plan.reuse_files) == 1


def test_vocabulary_of_a_string_model_is_named_by_its_own_vectorizer(string_model, tmp_path):
    import pyarrow.parquet as pq

    from pipeline.vocabulary import export_vocabulary

    path, _, model, _ = string_model
    written, rows = export_vocabulary(str(path), None, "emb", str(tmp_path / "vocabulary"))
    table = pq.read_table(written)
    weights = model.get_layer("emb").get_weights()[0]
    assert rows == table.num_rows == weights.shape[0]
    np.testing.assert_array_equal(np.stack(table["vector"].to_numpy(zero_copy_only=False)), weights)
    vocabulary = model.get_layer("vectorize").get_vocabulary()
    assert table["token"].to_pylist() == ["<pad>", *vocabulary[1:]] + [None] * (rows - len(vocabulary))


def test_string_input_without_fixed_length_exports_vectors_only(tmp_path):
    vectorizer = keras.layers.TextVectorization(max_tokens=20, name="vectorize")
    vectorizer.adapt(PROBE_TEXTS)
    text = keras.Input(shape=(), dtype="string", name="text")
    embedded = keras.layers.Embedding(20, 4, mask_zero=True, name="emb")(vectorizer(text))
    model = keras.Model(text, keras.layers.GlobalAveragePooling1D(name="pool")(embedded))
    path = tmp_path / "model.keras"
    model.save(path)
    corpus = write_jsonl(
        tmp_path / "corpus.jsonl", [{"id": str(i), "text": t} for i, t in enumerate(PROBE_TEXTS)]
    )
    with pytest.raises(ExportConfigError, match="fixed output_sequence_length"):
        run_export(export_args(path, corpus, tmp_path / "refused", "--layer=emb"))
    output = _export(tmp_path, path, corpus, "--layer=pool")
    rows = rows_by_id(read_rows(output))
    # The empty document has no text: dead-lettered as empty, like an empty tokenized one.
    assert sorted(rows) == ["0", "1", "3"]
    reference = model.predict(tf.constant(PROBE_TEXTS), verbose=0)
    for key, row in rows.items():
        np.testing.assert_allclose(row["pool"], reference[int(key)], atol=TOLERANCE, rtol=0)


def test_string_input_without_fixed_length_gives_each_document_its_own_vectors(tmp_path):
    # No output_sequence_length: the vectorizer pads a batch to its longest text, and an
    # unmasked LSTM and pooling read that padding, so a batch-mate would change a document's vector.
    keras.utils.set_random_seed(5)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]
    vectorizer = keras.layers.TextVectorization(max_tokens=20, name="vectorize")
    vectorizer.adapt(np.array([" ".join(words)]))
    text = keras.Input(shape=(1,), dtype="string", name="text")
    embedded = keras.layers.Embedding(20, 4, name="emb")(vectorizer(text))
    lstm = keras.layers.LSTM(3, name="lstm")(embedded)
    pooled = keras.layers.GlobalAveragePooling1D(name="pool")(embedded)
    model = keras.Model(text, keras.layers.Concatenate(name="cat")([lstm, pooled]))
    path = tmp_path / "model.keras"
    model.save(path)
    texts = ["alpha beta", " ".join(words * 5), "gamma", "delta alpha", "unknown words here", "beta"]
    # No token at all (Keras's LSTM fails on it alone): empty, as with a vectorizer of fixed length.
    no_tokens = {"id": "punctuation", "text": "!!! ???"}
    documents = [{"id": str(i), "text": t} for i, t in enumerate(texts)] + [no_tokens]
    corpus = write_jsonl(tmp_path / "corpus.jsonl", documents)
    output = _export(tmp_path, path, corpus, "--layer=lstm", "--layer=pool", "--batch_size=64")
    assert [(e["id"], e["reason"]) for e in read_errors(output).to_pylist()] == [
        ("punctuation", "empty_document")
    ]
    rows = rows_by_id(read_rows(output))
    assert sorted(rows) == sorted(str(i) for i in range(len(texts)))
    reference = keras.Model(text, [lstm, pooled])
    for index, one in enumerate(texts):
        alone = reference.predict(tf.constant([[one]]), verbose=0)
        for column, expected in zip(("lstm", "pool"), alone, strict=True):
            np.testing.assert_allclose(rows[str(index)][column], expected[0], atol=TOLERANCE, rtol=0)


def test_a_ragged_vectorizers_document_of_no_tokens_is_empty_not_a_row_of_nans(tmp_path):
    # A ragged vectorizer marks real tokens as a padded one does: a text of punctuation only has
    # none, and Keras's mean over no tokens is NaN.
    vectorizer = keras.layers.TextVectorization(max_tokens=20, ragged=True, name="vectorize")
    vectorizer.adapt(np.array(PROBE_TEXTS))
    text = keras.Input(shape=(1,), dtype="string", name="text")
    pooled = keras.layers.GlobalAveragePooling1D(name="pool")(keras.layers.Embedding(20, 4)(vectorizer(text)))
    model = keras.Model(text, pooled)
    path = tmp_path / "model.keras"
    model.save(path)
    texts = ["Return the VALUE", "unknownword the", "!!! ???"]
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"id": str(i), "text": t} for i, t in enumerate(texts)])
    output = _export(tmp_path, path, corpus, "--layer=pool")
    assert [(e["id"], e["reason"]) for e in read_errors(output).to_pylist()] == [("2", "empty_document")]
    rows = rows_by_id(read_rows(output))
    assert sorted(rows) == ["0", "1"]
    reference = model.predict(tf.constant([[t] for t in texts[:2]]), verbose=0)
    for index, expected in enumerate(reference):
        np.testing.assert_allclose(rows[str(index)]["pool"], expected, atol=TOLERANCE, rtol=0)


def test_a_multi_hot_vectorizers_model_exports_one_vector_per_document(tmp_path):
    # Keras's own example of n-grams as multi-hot vectors: Keras plans (None, 1, dim) for every
    # layer after the vectorizer of a (None, 1) input, though it computes (None, dim). Those were
    # refused as per-token, and a text of no tokens (all 0) was a row of the bias. In a wide and deep
    # model, whose input also feeds a padding vectorizer, they were still refused with a layer of the
    # deep side ("outputs one vector per token ... through 'vec'"), and inspect listed them as "-".
    from pipeline.inspect import layer_rows

    vectorizer = keras.layers.TextVectorization(max_tokens=20, output_mode="multi_hot", ngrams=2, name="vec")
    vectorizer.adapt(np.array(PROBE_TEXTS))
    padded = keras.layers.TextVectorization(max_tokens=20, output_sequence_length=6, name="padded")
    padded.adapt(np.array(PROBE_TEXTS))
    text = keras.Input(shape=(1,), dtype="string", name="text")
    hidden = keras.layers.Dense(3, activation="relu", name="hidden")(vectorizer(text))
    embedded = keras.layers.Embedding(20, 4, mask_zero=True, name="emb")(padded(text))
    pooled = keras.layers.GlobalAveragePooling1D(name="pool")(embedded)
    model = keras.Model(text, [keras.layers.Dense(1, name="out")(hidden), pooled])
    kinds = {row[0]: row[5] for row in layer_rows(model)}
    assert (kinds["vec"], kinds["hidden"], kinds["out"], kinds["pool"]) == ("vector",) * 4
    path = tmp_path / "model.keras"
    model.save(path)
    texts = ["Return the VALUE", "unknownword the the", "!!! ???"]
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"id": str(i), "text": t} for i, t in enumerate(texts)])
    layers = ("vec", "hidden", "out", "pool")
    output = _export(tmp_path, path, corpus, *(f"--layer={name}" for name in layers))
    assert [(e["id"], e["reason"]) for e in read_errors(output).to_pylist()] == [("2", "empty_document")]
    rows = rows_by_id(read_rows(output))
    assert sorted(rows) == ["0", "1"]
    strings = tf.constant([[t] for t in texts[:2]])
    for name in layers:
        reference = keras.Model(text, model.get_layer(name).output).predict(strings, verbose=0)
        for index, expected in enumerate(reference):
            np.testing.assert_allclose(rows[str(index)][name], expected, atol=TOLERANCE, rtol=0)


def test_a_vectorizers_ids_without_a_fixed_length_are_refused_in_one_line(tmp_path):
    vectorizer = keras.layers.TextVectorization(max_tokens=20, name="vectorize")
    vectorizer.adapt(np.array(["alpha beta gamma"]))
    text = keras.Input(shape=(1,), dtype="string", name="text")
    pooled = keras.layers.GlobalAveragePooling1D(name="pool")(keras.layers.Embedding(20, 4)(vectorizer(text)))
    path = tmp_path / "model.keras"
    keras.Model(text, pooled).save(path)
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"id": "d", "text": "alpha"}])
    with pytest.raises(ExportConfigError, match=r"outputs shape \(None, None\): its width depends"):
        run_export(export_args(path, corpus, tmp_path / "refused", "--layer=vectorize"))


def test_string_input_read_inside_a_nested_model_runs_each_document_alone(tmp_path):
    # The vectorizer inside an encoder is not seen at the top level: each document runs alone.
    keras.utils.set_random_seed(6)
    vectorizer = keras.layers.TextVectorization(max_tokens=20, name="vectorize")
    vectorizer.adapt(np.array(["alpha beta gamma delta epsilon zeta"]))
    encoder = keras.Sequential(
        [keras.Input(shape=(1,), dtype="string"), vectorizer, keras.layers.Embedding(20, 4)], name="encoder"
    )
    text = keras.Input(shape=(1,), dtype="string", name="text")
    lstm = keras.layers.LSTM(3, name="lstm")(encoder(text))
    model = keras.Model(text, keras.layers.Dense(2, name="out")(lstm))
    path = tmp_path / "model.keras"
    model.save(path)
    texts = ["alpha", "beta gamma delta epsilon zeta alpha beta", "gamma delta"]
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"id": str(i), "text": t} for i, t in enumerate(texts)])
    rows = rows_by_id(read_rows(_export(tmp_path, path, corpus, "--layer=lstm")))
    reference = keras.Model(text, lstm)
    for index, one in enumerate(texts):
        alone = reference.predict(tf.constant([[one]]), verbose=0)[0]
        np.testing.assert_allclose(rows[str(index)]["lstm"], alone, atol=TOLERANCE, rtol=0)


@pytest.fixture(scope="module")
def two_vectorizer_model(tmp_path_factory):
    """A string model with a word and a character TextVectorization on one input, each embedded."""
    keras.utils.set_random_seed(5)
    texts = np.array(["the cat sat", "a dog ran far away today", "hi"])
    words = keras.layers.TextVectorization(max_tokens=30, output_sequence_length=8, name="words")
    words.adapt(texts)
    chars = keras.layers.TextVectorization(
        max_tokens=30, output_sequence_length=8, split="character", name="chars"
    )
    chars.adapt(texts)
    text = keras.Input(shape=(1,), dtype="string", name="text")
    by_word = keras.layers.Embedding(30, 4, name="emb_words")(words(text))
    by_char = keras.layers.Embedding(30, 4, name="emb_chars")(chars(text))
    pooled = [keras.layers.GlobalAveragePooling1D()(by_word), keras.layers.GlobalAveragePooling1D()(by_char)]
    model = keras.Model(text, keras.layers.Concatenate(name="cat")(pooled))
    directory = tmp_path_factory.mktemp("two_vectorizers")
    model.save(directory / "model.keras")
    documents = [{"id": f"d{i}", "text": str(t)} for i, t in enumerate(texts)]
    corpus = write_jsonl(directory / "corpus.jsonl", documents)
    return directory / "model.keras", corpus, model, texts


@pytest.mark.parametrize(("column", "vectorizer"), [("emb_words", "words"), ("emb_chars", "chars")])
def test_per_token_column_of_one_of_two_vectorizers_keeps_its_own_tokens(
    two_vectorizer_model, tmp_path, column, vectorizer
):
    path, corpus, model, texts = two_vectorizer_model
    output = _export(tmp_path, path, corpus, f"--layer={column}", "--pooling=none")
    rows = _ordered_rows(output, [f"d{i}" for i in range(len(texts))])
    strings = tf.constant(texts[:, None])
    reference = keras.Model(model.inputs, model.get_layer(column).output).predict(strings, verbose=0)
    _assert_matches(rows, column, reference, np.asarray(model.get_layer(vectorizer)(strings)))


@pytest.mark.parametrize("char_length", [8, 20])
def test_per_token_columns_of_two_vectorizers_in_one_run_are_refused(tmp_path, char_length):
    texts = np.array(["the cat sat", "a dog ran far away today", "hi"])
    words = keras.layers.TextVectorization(max_tokens=30, output_sequence_length=8, name="words")
    words.adapt(texts)
    chars = keras.layers.TextVectorization(
        max_tokens=30, output_sequence_length=char_length, split="character", name="chars"
    )
    chars.adapt(texts)
    text = keras.Input(shape=(1,), dtype="string", name="text")
    by_word = keras.layers.Embedding(30, 4, name="emb_words")(words(text))
    by_char = keras.layers.Embedding(30, 4, name="emb_chars")(chars(text))
    path = tmp_path / "model.keras"
    keras.Model(text, [by_word, by_char]).save(path)
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"id": "d", "text": "the cat sat"}])
    flags = ("--layer=emb_words", "--layer=emb_chars", "--pooling=mean")
    with pytest.raises(ExportConfigError, match="in a run of their own"):
        run_export(export_args(path, corpus, tmp_path / "refused", *flags))


def test_vocabulary_export_of_a_keras2_model_uses_its_tokenizer(keras2, tmp_path):
    import pyarrow.parquet as pq

    from pipeline.planning.model_source import load_model_source
    from pipeline.vocabulary import export_vocabulary

    directory, _, _ = keras2
    model_path, tokenizer_path = str(directory / "two_outputs.h5"), str(directory / "tokenizer.json")
    path, rows = export_vocabulary(model_path, tokenizer_path, "emb", str(tmp_path / "vocabulary"))
    table = pq.read_table(path)
    weights = load_model_source(model_path, tokenizer_path).model.get_layer("emb").get_weights()[0]
    assert rows == table.num_rows == weights.shape[0] == VOCABULARY
    np.testing.assert_array_equal(np.stack(table["vector"].to_numpy(zero_copy_only=False)), weights)
    with open(tokenizer_path, encoding="utf-8") as handle:
        word_index = json.loads(json.load(handle)["config"]["word_index"])
    index_word = {index: word for word, index in word_index.items()}
    tokens = table["token"].to_pylist()
    assert tokens[0] == "<pad>" and tokens[1] == "<OOV>"  # the Keras 2 oov_token, not ours
    assert tokens[2:] == [index_word[i] for i in range(2, VOCABULARY)]


@pytest.mark.parametrize(
    "kind", ["missing", "directory", "empty file", "padding and [UNK] only", "shell <(...) pipe"]
)
def test_a_tokenizer_that_is_no_file_or_holds_no_words_is_refused_in_one_line(
    kind, tiny_bundle, tmp_path, capsys
):
    """A missing file said only "does not exist."; a directory ended run and inspect in an
    IsADirectoryError traceback (vocabulary blamed object-storage credentials); `<(cat FILE)` passed
    the launch, then failed the run's workers ("changed after launch", and so did every rerun); an
    empty file was a vocabulary of no words: vocabulary wrote a table of null tokens (exit 0), and a
    run dead-lettered every record after all its work."""
    from pipeline import vocabulary

    directory, _, _ = tiny_bundle
    tokenizer = tmp_path / "tokenizer"
    if kind == "missing":  # A typo: "does not exist." said nothing of what to pass.
        expected = "does not exist; pass the tokenizer file the model was trained with (this package's"
    elif kind == "directory":
        tokenizer.mkdir()
        expected = "is a directory; pass the tokenizer file in it"
    elif kind == "shell <(...) pipe":
        read_end, write_end = os.pipe()
        os.write(write_end, b"\n[UNK]\nword\n")  # a valid vocabulary, which the pipe gives only once
        os.close(write_end)
        tokenizer = f"/dev/fd/{read_end}"
        expected = "is not a regular file (a named pipe, a device, or a shell's <(...))"
    else:
        tokenizer.write_bytes(b"" if kind == "empty file" else b"\n[UNK]\n")
        expected = "is not a tokenizer file: It holds no words"
    output = tmp_path / "vocabulary"
    flags = ["--model", os.path.join(directory, "model.keras"), "--tokenizer", str(tokenizer)]
    try:
        code = vocabulary.main([*flags, "--output", str(output)])
    finally:
        if kind == "shell <(...) pipe":
            os.close(read_end)
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: --tokenizer "), err
    assert expected in err[0], err
    assert not output.exists()
