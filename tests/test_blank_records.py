"""Blank records (every input empty or whitespace) under tokenizers that give whitespace tokens.

A Keras 2 `Tokenizer(oov_token=...)` makes an NBSP-only text one OOV token, and a
string model splitting characters makes spaces tokens; yet a blank record must be an
`empty_document` dead letter and never hold its id, so that an id has one row. Each
model is exported plainly, with `--reuse` of that export, and killed (SIGKILL) then
resumed; the two models are the users' first one (a tf_keras `.h5` with
`Input(shape=(300,))`, default names, `pad_sequences`) and a Keras 3 string model.
"""

import json
import sys
import types

import forkserver
import keras
import numpy as np
import pyarrow.parquet as pq
import pytest
import tensorflow as tf
from pipeline_fixtures import (
    export_args,
    kill_group_when,
    manifest_of,
    pipeline_command,
    read_errors,
    read_rows,
    rows_by_id,
)
from test_resume import dead_letters, durable_files, rows

from pipeline.planning.plan import InputInfo
from pipeline.reading.documents import Document
from pipeline.running.export import run_export
from pipeline.writing import schema as schema_lib
from pipeline.writing.reuse import ERRORS, REUSED, ReuseEarlierRowsFn

TOLERANCE = 1e-5
# Small files, closed often: a run of the large corpus (63 batches of 16) is killed after a few of them.
KILL_FLAGS = ("--batch_size", "16", "--checkpoint_seconds", "0.05")
# Blank texts each tokenizer here gives tokens: OOV words for Keras 2 (which splits on " "
# only, and does not filter "\r" or NBSP), characters for the string model (spaces).
BLANK_FIRST, BLANK_ONLY, BLANK_LAST = "\u00a0 ", "\t\r ", " \u00a0 "
BLANKS = [BLANK_FIRST, BLANK_ONLY, BLANK_LAST]

# tf_keras, as the tutorial writes it, in its own process. argv: output directory, corpus, blank texts.
KERAS2_SCRIPT = r"""
import json, os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
import numpy as np
import tf_keras
from tf_keras.layers import Input, Embedding, LSTM, Dense
from tf_keras.models import Model
from tf_keras.preprocessing.text import Tokenizer
from tf_keras.preprocessing.sequence import pad_sequences

out, corpus, blanks = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
tf_keras.utils.set_random_seed(0)
records = [json.loads(line) for line in open(corpus, encoding="utf-8")]
tokenizer = Tokenizer(num_words=40, oov_token="<OOV>")
tokenizer.fit_on_texts([r["content"] for r in records if r["content"] not in blanks])
with open(os.path.join(out, "tokenizer.json"), "w", encoding="utf-8") as handle:
    handle.write(tokenizer.to_json())
ids = pad_sequences(tokenizer.texts_to_sequences([r["content"] for r in records]), maxlen=300)
content = Input(shape=(300,))
model = Model(content, Dense(1, activation="sigmoid")(LSTM(4)(Embedding(40, 8)(content))))
model.compile(optimizer="adam", loss="binary_crossentropy")
model.fit(ids, np.arange(len(records)) % 2, epochs=1, batch_size=8, verbose=0)
model.save(os.path.join(out, "tutorial.h5"))
np.save(os.path.join(out, "reference.npy"),
        Model(model.input, model.get_layer("lstm").output).predict(ids, verbose=0))
json.dump({"input": model.input.name.split(":")[0],
           "blank_ids": tokenizer.texts_to_sequences(blanks)},
          open(os.path.join(out, "info.json"), "w"))
"""


def write_corpus(path, fillers):
    """A JSONL corpus whose ids x, y and z meet blank records; returns its records in file order.

    x: a real record first, a blank one last (it used to get a second row, and its kill
    could not be resumed); y: a blank record first, then a real one (the real one is
    y's row); z: blank only (no row).
    """
    records = [
        {"id": "x", "content": "word1 word2 word3"},
        {"id": "y", "content": BLANK_FIRST},
        {"id": "y", "content": "word4 word5"},
        {"id": "z", "content": BLANK_ONLY},
    ]
    for index in range(fillers):
        words = " ".join(f"word{(index * 7 + k) % 30}" for k in range(2 + index % 9))
        records.append({"id": f"doc{index}", "content": words})
    records.append({"id": "x", "content": BLANK_LAST})
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    return records


def expected_outcome(records):
    """(the ids with a row: id -> line of its record, the blank records' lines as dead letters)."""
    kept, blank = {}, []
    for line, record in enumerate(records, start=1):
        if not record["content"].strip():
            blank.append((line, record["id"], "empty_document"))
        else:
            kept.setdefault(record["id"], line)
    return kept, blank


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("blank") / "corpus.jsonl"
    return path, write_corpus(path, 20)


@pytest.fixture(scope="module")
def keras2_oov(small_corpus):
    """The tutorial's Keras 2 model and `Tokenizer(oov_token=...)`: (flags, column, line -> Keras vector)."""
    corpus, records = small_corpus
    directory = corpus.parent / "keras2"
    directory.mkdir()
    built = forkserver.run(
        [sys.executable, "-c", KERAS2_SCRIPT, str(directory), str(corpus), json.dumps(BLANKS)],
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    with open(directory / "info.json", encoding="utf-8") as handle:
        info = json.load(handle)
    # The premise: Keras 2 gives each blank text a token (the OOV one).
    assert all(ids == [1] for ids in info["blank_ids"]), info["blank_ids"]
    flags = ["--tokenizer", directory / "tokenizer.json", "--input_map", f"{info['input']}=content"]
    reference = np.load(directory / "reference.npy")
    return [directory / "tutorial.h5", *flags, "--layer", "lstm"], "lstm", dict(enumerate(reference, start=1))


@pytest.fixture(scope="module")
def char_split(small_corpus, tmp_path_factory):
    """A Keras 3 string model whose TextVectorization splits characters: (flags, column, line -> vector)."""
    _, records = small_corpus
    keras.utils.set_random_seed(2)
    vectorizer = keras.layers.TextVectorization(
        max_tokens=60, split="character", standardize=None, output_sequence_length=16, name="vectorize"
    )
    vectorizer.adapt(["abcdefghijklmnopqrstuvwxyz0123456789 \t"])
    # The premise: the model gives each blank text tokens (spaces are in its vocabulary).
    blank_ids = np.asarray(vectorizer(tf.constant(BLANKS)))
    assert (blank_ids != 0).any(axis=1).all(), blank_ids
    text = keras.Input(shape=(1,), dtype="string", name="text")
    pooled = keras.layers.GlobalAveragePooling1D(name="pool")(
        keras.layers.Embedding(60, 4, name="emb")(vectorizer(text))
    )
    model = keras.Model(text, pooled)
    path = tmp_path_factory.mktemp("char_split") / "char.keras"
    model.save(path)
    texts = tf.constant([[record["content"]] for record in records])
    reference = model.predict(texts, verbose=0)
    return (
        [path, "--input_map", "text=content", "--layer", "pool"],
        "pool",
        dict(enumerate(reference, start=1)),
    )


@pytest.fixture
def bundled(tiny_bundle):
    """The bundled model and tokenizer (blank texts give no token): (flags, column, no reference)."""
    return [tiny_bundle[0], "--layer", "lstm_content"], "lstm_content", None


def _export(model, corpus, output, *flags):
    path, *model_flags = model
    return run_export(export_args(path, corpus, output, *model_flags, *flags))


def _dead_letters(output):
    table = read_errors(output)
    found = [] if table is None else table.select(["position", "id", "reason"]).to_pylist()
    return sorted((row["position"], row["id"], row["reason"]) for row in found)


def _assert_one_row_per_id(output, records, column, reference):
    """Rows: one per id, of its first non-blank record, equal to Keras; blanks dead letters; counts add up."""
    kept, blank = expected_outcome(records)
    exported = rows_by_id(read_rows(output))  # asserts the ids are unique
    assert sorted(exported) == sorted(kept)
    assert _dead_letters(output) == blank
    for document_id, line in kept.items() if reference is not None else ():
        np.testing.assert_allclose(
            np.asarray(exported[document_id][column], dtype=np.float32),
            reference[line],
            atol=TOLERANCE,
            rtol=0,
            err_msg=document_id,
        )
    counts = manifest_of(output)["counts"]
    assert counts["records_read"] == len(records) == counts["rows_written"] + counts["dead_letters"]
    assert counts["dead_letters_by_reason"] == {"empty_document": len(blank)}


@pytest.mark.parametrize("model_name", ["keras2_oov", "char_split", "bundled"])
def test_blank_records_never_make_a_second_row_plain_or_reused(model_name, small_corpus, request, tmp_path):
    """An NBSP/space record made a second row for its id (exit 0); --reuse of it then lost a record.

    With the bundled tokenizer too: the blank record and the real one of an id both
    reached the --reuse join, which kept one of them and dropped the other (exit 3).
    """
    corpus, records = small_corpus
    model, column, reference = request.getfixturevalue(model_name)
    full = tmp_path / "full"
    summary = _export(model, corpus, full)
    assert summary.exit_code == 0, summary.message
    _assert_one_row_per_id(full, records, column, reference)

    # --reuse of that export, on the same corpus: every row reused, nothing lost, the same export.
    reused = tmp_path / "reused"
    summary = _export(model, corpus, reused, "--reuse", full)
    assert summary.exit_code == 0, summary.message
    _assert_one_row_per_id(reused, records, column, reference)
    assert manifest_of(reused)["counts"]["rows_reused"] == len(expected_outcome(records)[0])
    assert read_rows(reused).sort_by("id").equals(read_rows(full).sort_by("id"))


@pytest.mark.slow
@pytest.mark.parametrize("model_name", ["keras2_oov", "char_split", "bundled"])
def test_a_killed_run_with_blank_records_resumes_as_an_uninterrupted_one(model_name, request, tmp_path):
    """A kill after x's row was kept: the rerun met x's blank record and refused ("the corpus changed")."""
    model, _, _ = request.getfixturevalue(model_name)
    corpus = tmp_path / "large.jsonl"
    records = write_corpus(corpus, 1000)
    reference = tmp_path / "reference"
    summary = _export(model, corpus, reference, *KILL_FLAGS)
    assert summary.exit_code == 0, summary.message

    output = tmp_path / "out"
    path, *model_flags = model
    command = pipeline_command(corpus, output, *map(str, ["--model", path, *model_flags, *KILL_FLAGS]))
    assert kill_group_when(command, lambda: len(durable_files(output)) >= 2), "finished before the kill"
    kept = {
        i for f in durable_files(output) for i in pq.read_table(f, columns=["id"]).column("id").to_pylist()
    }
    assert "x" in kept  # the kept row whose id the last, blank record repeats

    summary = _export(model, corpus, output, *KILL_FLAGS)
    assert summary.exit_code == 0, summary.message
    assert summary.rows_kept >= 1
    assert rows(output).equals(rows(reference))
    assert dead_letters(output).equals(dead_letters(reference))
    counts = manifest_of(output)["counts"]
    assert counts == manifest_of(reference)["counts"]
    assert counts["records_read"] == len(records) == counts["rows_written"] + counts["dead_letters"]
    assert len(set(rows(output).column("id").to_pylist())) == counts["rows_written"]


def test_the_reuse_join_dead_letters_every_other_document_of_an_id():
    """The join kept `documents[0]` of an id and dropped the others silently (no row, no dead letter)."""
    plan = types.SimpleNamespace(inputs=(InputInfo("content", "content", 8),), keep_fields=())
    later = Document("x", ("word2",), (), "b.jsonl", 1)
    first = Document("x", ("word1",), (), "a.jsonl", 7)
    earlier = {"input_sha256": schema_lib.input_fingerprint(first.texts, plan.inputs), "lstm": [0.5]}
    for documents in ([later, first], [first, later]):  # whatever order the shuffle gives
        out = list(ReuseEarlierRowsFn(plan).process(("x", {"documents": documents, "earlier": [earlier]})))
        tagged = {item.tag: item.value for item in out}
        assert set(tagged) == {REUSED, ERRORS} and len(out) == 2
        assert tagged[REUSED] == dict(earlier, id="x")
        dead = tagged[ERRORS]
        assert (dead["source"], dead["position"], dead["reason"]) == ("b.jsonl", 1, "duplicate_id")
        assert dead["message"] == "Id 'x' was already used by a.jsonl:7."
