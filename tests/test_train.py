"""Tests for models.train: the training CLI end to end on a small real corpus."""

import collections
import json
import os
import re

import numpy as np
import pytest
from pipeline_fixtures import DEFAULT_LAYERS, write_jsonl
from sizes import LENGTHS, SIZES

from models import architectures
from models import train as train_module
from models.bundle import load_bundle
from models.tokenizer import Tokenizer
from models.train import EXIT_CONFIG_ERROR, SAMPLE_CORPUS, is_held_out, main, read_jsonl

DOCUMENTS = 120
HOLDOUT = 0.25
# The tests' one set of model sizes; the number of title classes comes from the corpus.
MODEL_SIZES = ("vocabulary_size", "embedding_dim", "lstm_units", "content_length", "title_length")
TINY_ARGS = [
    *(f"--{name}={SIZES[name]}" for name in MODEL_SIZES),
    "--epochs", "1",
    "--batch_size", "32",
    "--holdout", str(HOLDOUT),
]  # fmt: skip


def _tiny_args_but(flags):
    """TINY_ARGS less the flags that `flags` give: a flag given twice is refused (models/command_line.py)."""
    given = {flag.split("=")[0] for flag in flags if flag.startswith("--")}
    kept, skip = [], False
    for arg in TINY_ARGS:
        if skip:
            skip = False
        elif arg.split("=")[0] in given:
            skip = "=" not in arg  # `--flag value`: its value goes too
        else:
            kept.append(arg)
    return [*kept, *flags]


OUTPUTS = {
    "single_input": {"output": "kind"},
    "two_inputs_one_output": {"output": "kind"},
    "two_inputs_two_outputs": {"out_content": "kind", "out_title": "topic"},
}


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    """`(path, documents)`: every 17th document of the sample corpus, 120 in all."""
    documents = read_jsonl(SAMPLE_CORPUS)[::17][:DOCUMENTS]
    assert len(documents) == DOCUMENTS
    assert {document["kind"] for document in documents} == {"class", "function"}
    path = tmp_path_factory.mktemp("corpus") / "small.jsonl"
    with open(path, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(document, ensure_ascii=False) + "\n" for document in documents)
    return str(path), documents


@pytest.mark.parametrize("topology", architectures.TOPOLOGIES)
def test_train_writes_a_loadable_bundle_with_metrics(topology, small_corpus, tmp_path):
    corpus, documents = small_corpus
    output = str(tmp_path / "bundle")
    main(["--topology", topology, "--corpus", corpus, "--output", output, *TINY_ARGS])

    bundle = load_bundle(output)
    manifest = bundle.manifest
    held_out = [document for document in documents if is_held_out(document["id"], HOLDOUT)]
    assert 0 < len(held_out) < DOCUMENTS

    assert manifest["topology"] == topology
    assert bundle.model.name == topology
    if topology == "single_input":
        assert bundle.input_fields == {"content": "content"}
        assert bundle.sequence_lengths == {"content": LENGTHS["content"]}
    else:
        assert bundle.input_fields == {"content": "content", "title": "title"}
        assert bundle.sequence_lengths == LENGTHS
    assert bundle.tokenizer.size == SIZES["vocabulary_size"] == bundle.model.get_layer("emb").input_dim
    assert manifest["training"]["documents"] == DOCUMENTS - len(held_out)
    assert manifest["training"]["epochs"] == 1
    # The layers exported by default: each topology's LSTMs (and Add), then the embedding.
    assert manifest["default_layers"] == DEFAULT_LAYERS[topology]
    for name in manifest["default_layers"]:
        bundle.model.get_layer(name)  # raises if the model lacks it

    assert set(manifest["labels"]) == set(manifest["metrics"]) == set(OUTPUTS[topology])
    for output_name, field in OUTPUTS[topology].items():
        classes = sorted({document[field] for document in documents})
        assert manifest["labels"][output_name] == {"field": field, "classes": classes}
        truth = collections.Counter(document[field] for document in held_out)
        metrics = manifest["metrics"][output_name]
        assert metrics["held_out_documents"] == len(held_out)
        assert metrics["majority_baseline"] == round(max(truth.values()) / len(held_out), 4)
        assert 0.0 <= metrics["held_out_accuracy"] <= 1.0

    # The bundle alone (its tokenizer, lengths and weights) reproduces the recorded accuracy.
    features = {
        name: bundle.tokenizer.encode_batch(
            [document[field] for document in held_out], bundle.sequence_lengths[name]
        )[0]
        for name, field in bundle.input_fields.items()
    }
    # The batch size `train` predicts with, so the forward pass is computed identically.
    predictions = bundle.model.predict(
        features if len(features) > 1 else features["content"],
        batch_size=256,
        verbose=0,
    )
    if not isinstance(predictions, dict):
        predictions = {"output": predictions}
    for output_name, field in OUTPUTS[topology].items():
        classes = manifest["labels"][output_name]["classes"]
        truth = np.array([classes.index(document[field]) for document in held_out])
        prediction = predictions[output_name]
        predicted = (
            prediction.argmax(axis=1) if output_name == "out_title" else (prediction[:, 0] > 0.5).astype(int)
        )
        accuracy = round(float((predicted == truth).mean()), 4)
        assert accuracy == manifest["metrics"][output_name]["held_out_accuracy"]


def test_train_rejects_a_missing_field(small_corpus, tmp_path, capsys):
    corpus, _ = small_corpus
    argv = ["--corpus", corpus, "--output", str(tmp_path), "--content_field", "summary", *TINY_ARGS]
    assert main(argv) == EXIT_CONFIG_ERROR
    assert "have no field 'summary'" in capsys.readouterr().err
    assert not os.listdir(tmp_path)


def test_train_rejects_a_binary_label_without_two_values(small_corpus, tmp_path, capsys):
    corpus, _ = small_corpus
    argv = ["--corpus", corpus, "--output", str(tmp_path), "--binary_label", "topic", *TINY_ARGS]
    assert main(argv) == EXIT_CONFIG_ERROR
    assert "--binary_label 'topic' must have 2 values" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--holdout", "1"], "--holdout must be a fraction between 0 and 1"),
        (["--holdout", "0"], "--holdout must be a fraction between 0 and 1"),
        (["--holdout", "nan"], "--holdout must be a fraction between 0 and 1"),
        (["--holdout", "0.001"], "both need at least one"),
        (["--id_field", "nope"], "have no field 'nope'"),
    ],
)
def test_train_refuses_a_split_that_leaves_a_side_empty_and_a_missing_id_field(
    small_corpus, tmp_path, capsys, flags, message
):
    corpus, _ = small_corpus
    output = tmp_path / "bundle"
    assert main(["--corpus", corpus, "--output", str(output), *_tiny_args_but(flags)]) == EXIT_CONFIG_ERROR
    err = capsys.readouterr().err
    assert message in err and err.startswith("error: ") and "Traceback" not in err
    assert not output.exists()


def test_train_needs_an_output_and_never_defaults_to_the_shipped_bundle(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--epochs", "1"])
    assert exited.value.code == 2
    assert "--output" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--batch_size", "99999999999999999999", " from 1 to 100,000, received 99,999,999,999,999,999,999"),
        ("--embedding_dim", "1099511627776", " from 1 to 100,000, received 1,099,511,627,776"),
        ("--lstm_units", "100001", " from 1 to 100,000, received 100,001"),
        ("--content_length", str(2**63), " from 1 to 100,000, received 9,223,372,036,854,775,808"),
        ("--title_length", "0", " from 1 to 100,000, received 0"),
        ("--vocabulary_size", "1000001", " from 3 to 1,000,000, received 1,000,001"),
        # Ids 0 and 1 are padding and out-of-vocabulary: "vocabulary_size must be at least 3", without `--`.
        ("--vocabulary_size", "2", " from 3 to 1,000,000, received 2"),
        ("--epochs", "-1", " from 1 to 100,000, received -1"),
        ("--seed", str(2**32), " from 0 to 4,294,967,295, received 4,294,967,296"),
        ("--batch_size", "inf", ", received 'inf'"),
    ],
)
def test_an_integer_flag_out_of_its_range_is_one_error_line(flag, value, message, tmp_path, capsys):
    """Too large a value was an OverflowError or ResourceExhaustedError traceback once training began."""
    with pytest.raises(SystemExit) as exited:
        main(["--output", str(tmp_path / "bundle"), *_tiny_args_but([f"{flag}={value}"])])
    assert exited.value.code == EXIT_CONFIG_ERROR
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: argument {flag}: must be an integer{message}. "), line
    assert not (tmp_path / "bundle").exists()


def test_sizes_within_their_ranges_that_do_not_fit_in_memory_together_are_one_error_line(
    small_corpus, tmp_path, capsys
):
    """A 1,000,000 x 100,000 embedding (400 GB), refused by TensorFlow's allocator: one line, no traceback."""
    corpus, _ = small_corpus
    output = tmp_path / "bundle"
    sizes = ["--vocabulary_size=1000000", "--embedding_dim=100000"]
    assert main(["--corpus", corpus, "--output", str(output), *_tiny_args_but(sizes)]) == EXIT_CONFIG_ERROR
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert line.startswith(
        "error: the model does not fit in memory (--vocabulary_size 1,000,000 x --embedding_dim 100,000"
    )
    assert not output.exists()


@pytest.mark.parametrize(("output", "mine"), [("", True), (" ", True), (".", False)])
def test_an_empty_output_or_the_working_directory_is_refused_and_nothing_in_it_touched(
    output, mine, small_corpus, tmp_path, monkeypatch, capsys
):
    """`--output "$UNSET"`: os.path.abspath("") is the working directory, which the bundle's swap
    replaced after the whole training, deleting every file in it (`.`: an empty one, from under the shell)."""
    corpus, _ = small_corpus
    here = tmp_path / "work"
    here.mkdir()
    if mine:
        (here / "notes.txt").write_text("the user's own notes")
    monkeypatch.chdir(here)
    assert main(["--corpus", corpus, "--output", output, *TINY_ARGS]) == EXIT_CONFIG_ERROR
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: --output is empty" if mine else "error: '.' is the working directory")
    assert sorted(os.listdir(here)) == (["notes.txt"] if mine else [])
    assert os.path.samefile(os.getcwd(), here)


@pytest.mark.parametrize(
    ("corpus", "message"),
    [
        ("", "--corpus is empty (an unset shell variable?); give it a JSONL file"),
        ("folder", "is a directory; give it a JSONL file"),
        ("nosuch.jsonl", "does not exist; give it a JSONL file"),
        ("empty.jsonl", "holds no documents; give it a JSONL file"),
        ("null_content.jsonl", "hold no text in --content_field 'content' (the first, id 'd0', holds null)"),
        (
            "list_title.jsonl",
            """hold no text in --title_field 'title' (the first, id 'd0', holds ["a", "b"])""",
        ),
    ],
)
def test_a_corpus_train_cannot_read_is_one_error_line(corpus, message, tmp_path, monkeypatch, capsys):
    """A null, number or list content was a TypeError traceback; a missing or folder corpus a raw
    errno; an empty one blamed on --binary_label."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "folder").mkdir()
    (tmp_path / "empty.jsonl").write_text("\n")
    for name, field, value in (("null_content", "content", None), ("list_title", "title", ["a", "b"])):
        documents = [
            {"id": f"d{i}", "content": "a b", "title": "t", "kind": i % 2, "topic": "x"} for i in range(4)
        ]
        documents[0][field] = value
        write_jsonl(tmp_path / f"{name}.jsonl", documents)
    assert main(["--corpus", corpus, "--output", "bundle", *TINY_ARGS]) == EXIT_CONFIG_ERROR
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: ") and message in line and "Errno" not in line, line
    assert not (tmp_path / "bundle").exists()


def test_a_corpus_given_as_a_pipe_is_read(small_corpus, tmp_path):
    """`--corpus <(zcat corpus.jsonl.gz)`: the refusal of a corpus that is no file must not refuse a pipe."""
    import threading

    corpus, _ = small_corpus
    pipe = tmp_path / "corpus.fifo"
    os.mkfifo(pipe)

    def feed():
        with open(corpus, "rb") as source, open(pipe, "wb") as sink:
            sink.write(source.read())

    feeder = threading.Thread(target=feed, daemon=True)  # a refusal never opens the pipe: no hang
    feeder.start()
    try:
        assert main(["--corpus", str(pipe), "--output", str(tmp_path / "bundle"), *TINY_ARGS]) == 0
    finally:
        feeder.join(timeout=60)
    assert load_bundle(str(tmp_path / "bundle")).manifest["training"]["corpus"] == "corpus.fifo"


def test_the_help_needs_no_docstring(monkeypatch, capsys):
    """`python -OO` strips docstrings: `__doc__.split` was an AttributeError traceback (Keras imports so)."""
    monkeypatch.setattr(train_module, "__doc__", None)
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    assert "--vocabulary_size" in capsys.readouterr().out


def test_the_help_gives_each_flags_default(capsys):
    """`--help` said `--epochs EPOCHS  passes over the training set.` and no default for 14 of its 18
    flags: what a run without them trains (10 epochs, 4000 ids, 300 x 300) was nowhere to be read."""
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    options = capsys.readouterr().out.split("options:", 1)[1]
    blocks = {block.split()[0]: " ".join(block.split()) for block in re.split(r"\n  (?=--)", options)[1:]}
    assert len(blocks) == 18 and blocks["--epochs"].endswith("(default: 10).")
    without = [flag for flag, text in blocks.items() if "default" not in text and flag != "--overwrite"]
    assert without == ["--output"], without  # Required: it has none.


def test_train_never_replaces_a_users_files(small_corpus, tmp_path, capsys):
    corpus, _ = small_corpus
    mine = tmp_path / "my_models"
    mine.mkdir()
    (mine / "model.keras").write_text("the user's own model")
    for overwrite in ([], ["--overwrite"]):
        argv = ["--corpus", corpus, "--output", str(mine), *TINY_ARGS, *overwrite]
        assert main(argv) == EXIT_CONFIG_ERROR
        assert "not a model bundle's" in capsys.readouterr().err
    assert (mine / "model.keras").read_text() == "the user's own model"
    assert sorted(os.listdir(tmp_path)) == ["my_models"]


def test_a_bundle_is_replaced_only_with_overwrite_and_only_as_a_whole(
    small_corpus, tmp_path, capsys, monkeypatch
):
    corpus, _ = small_corpus
    output = tmp_path / "bundle"
    argv = ["--topology", "single_input", "--corpus", corpus, "--output", str(output), *TINY_ARGS]
    assert main(argv) == 0
    first = (output / "manifest.json").read_text()

    assert main([*argv, "--seed", "7"]) == EXIT_CONFIG_ERROR
    assert "already holds a bundle; pass --overwrite" in capsys.readouterr().err
    assert (output / "manifest.json").read_text() == first

    # A full disk between the bundle's files: the earlier bundle stays whole and loadable.
    def full_disk(self):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patched:
        patched.setattr(Tokenizer, "to_json", full_disk)
        assert main([*argv, "--seed", "7", "--overwrite"]) == EXIT_CONFIG_ERROR
    assert "No space left on device" in capsys.readouterr().err
    assert (output / "manifest.json").read_text() == first
    load_bundle(str(output))
    assert sorted(os.listdir(tmp_path)) == ["bundle"]  # no half-written sibling left behind

    assert main([*argv, "--seed", "7", "--overwrite"]) == 0
    replaced = load_bundle(str(output))
    assert replaced.manifest["training"]["seed"] == 7
    assert sorted(os.listdir(tmp_path)) == ["bundle"]
    assert sorted(os.listdir(output)) == ["manifest.json", "model.keras", "tokenizer.json"]
    assert oct(os.stat(output).st_mode & 0o777) != oct(0o700)  # not mkdtemp's private mode


def test_held_out_split_follows_the_fraction_and_nests():
    ids = [document["id"] for document in read_jsonl(SAMPLE_CORPUS)]
    small = {document_id for document_id in ids if is_held_out(document_id, 0.1)}
    large = {document_id for document_id in ids if is_held_out(document_id, 0.25)}
    assert small < large
    assert 0.05 < len(small) / len(ids) < 0.15
    assert 0.2 < len(large) / len(ids) < 0.3
    assert not any(is_held_out(document_id, 0.0) for document_id in ids)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"id": "1"}\n\nnot json here\n', "line 3 is not JSON (Expecting value: line 1 column 1 (char 0))"),
        ("id,content,title\n1,hello,hi\n", "line 1 is not JSON"),
        ('{"id": "1"}\n[1, 2]\n', "line 2 is JSON but not an object ([1, 2])"),
        ('{"id": "1"}\n7\n', "line 2 is JSON but not an object (7)"),
    ],
    ids=["bad-line", "csv", "array", "number"],
)
def test_a_corpus_line_that_is_not_a_json_object_is_named_in_one_line(tmp_path, capsys, content, expected):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(content, encoding="utf-8")
    assert main(["--corpus", str(corpus), "--output", str(tmp_path / "bundle"), *TINY_ARGS]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: --corpus {corpus} {expected}")
    assert line.endswith("the corpus must be JSONL, one JSON object a line.")
    assert sorted(os.listdir(tmp_path)) == ["corpus.jsonl"]


def test_a_corpus_saved_with_a_byte_order_mark_is_read(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_bytes(b'\xef\xbb\xbf{"id": "1", "content": "x"}\r\n{"id": "2", "content": "y"}\n')
    assert read_jsonl(str(corpus)) == [{"id": "1", "content": "x"}, {"id": "2", "content": "y"}]


def test_the_sample_corpus_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch, capsys):
    """`python -m models.make_sample_corpus` wrote its --output (the shipped corpus by default) in place:
    an error or a kill part-way left it cut short, and `python -m pipeline.run` exported that part."""
    from models import make_sample_corpus

    corpus = tmp_path / "sample_corpus.jsonl"
    corpus.write_text('{"id": "earlier"}\n')
    docs = [{"id": "a", "title": "t", "content": "c", "kind": "class", "topic": "text"}] * 3
    monkeypatch.setattr(make_sample_corpus, "collect_documents", lambda stdlib: docs)
    monkeypatch.setattr(make_sample_corpus, "balance", lambda found, kind, topic: [*found, {"id": object()}])
    with pytest.raises(TypeError, match="not JSON serializable"):  # The fourth line fails.
        make_sample_corpus.main(["--output", str(corpus)])
    assert corpus.read_text() == '{"id": "earlier"}\n' and os.listdir(tmp_path) == [corpus.name]
    monkeypatch.setattr(make_sample_corpus, "balance", lambda found, kind, topic: found)
    make_sample_corpus.main(["--output", str(corpus)])
    assert [json.loads(line) for line in corpus.read_text().splitlines()] == docs
    assert os.listdir(tmp_path) == [corpus.name] and oct(corpus.stat().st_mode & 0o777) != "0o600"
    assert "wrote 3 documents" in capsys.readouterr().out
