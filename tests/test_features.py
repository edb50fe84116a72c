"""`TokenizeDocuments` (`pipeline.inference.features`) on its own, and the embed steps as one Beam transform.

The pure functions are tested on small inline documents; `EmbedDocuments`
(tokenize -> RunInference -> rows) runs once in a `TestPipeline` and is checked
with `assert_that`, the way Beam tests its own examples.
"""

import types

import numpy as np
import pytest

from models.tokenizer import Tokenizer
from pipeline.inference.features import DocumentTokenizer, Tokenized, stack_features
from pipeline.planning.plan import TEXT_INPUT, InputInfo
from pipeline.reading.documents import Document, TokenIds

TOKENIZER = Tokenizer(["alpha", "beta", "gamma", "delta"], padding="pre", truncating="post")


def _plan(*inputs, padding="pre", truncating="post"):
    return types.SimpleNamespace(inputs=inputs, padding=padding, truncating=truncating)


def _document(*texts, document_id="d", position=7):
    return Document(document_id, texts, (), "corpus.jsonl", position)


def test_text_becomes_the_tokenizers_ids_with_truncation_and_unknown_words_counted():
    plan = _plan(InputInfo("content", "content", 4), InputInfo("title", "title", 3))
    tokenized = DocumentTokenizer(plan, TOKENIZER).tokenize(_document("alpha beta zeta gamma delta", "beta"))
    assert isinstance(tokenized, Tokenized)
    # Ids: 0 padding, 1 unknown, then the vocabulary from 2; cut at the end ("post"), padded before.
    assert tokenized.features[0].tolist() == [2, 3, 1, 4]
    assert tokenized.features[1].tolist() == [0, 0, 3]
    assert tokenized.features[0].dtype == np.int32
    assert tokenized.truncated is True
    assert tokenized.oov_tokens == 1
    expected, _, _, _ = TOKENIZER.encode_batch(["alpha beta zeta gamma delta"], 4)
    assert tokenized.features[0].tolist() == expected[0].tolist()


@pytest.mark.parametrize(
    ("padding", "truncating", "ids", "expected", "cut"),
    [
        ("pre", "pre", (5, 6), [0, 0, 5, 6], False),
        ("post", "pre", (5, 6), [5, 6, 0, 0], False),
        ("pre", "pre", (1, 2, 3, 4, 5), [2, 3, 4, 5], True),
        ("pre", "post", (1, 2, 3, 4, 5), [1, 2, 3, 4], True),
    ],
)
def test_token_id_lists_are_padded_and_cut_with_the_plans_sides(padding, truncating, ids, expected, cut):
    plan = _plan(InputInfo("content", "content", 4), padding=padding, truncating=truncating)
    tokenized = DocumentTokenizer(plan, None).tokenize(_document(TokenIds(ids)))
    assert tokenized.features[0].tolist() == expected
    assert tokenized.truncated is cut and tokenized.oov_tokens == 0


def test_a_document_without_tokens_is_an_empty_document_dead_letter_at_its_place():
    plan = _plan(InputInfo("content", "content", 4), InputInfo("title", "title", 3))
    error = DocumentTokenizer(plan, TOKENIZER).tokenize(_document("  ", "", document_id="blank", position=12))
    assert error["reason"] == "empty_document"
    assert (error["source"], error["position"], error["id"]) == ("corpus.jsonl", 12, "blank")
    # One input with a token is enough.
    assert isinstance(DocumentTokenizer(plan, TOKENIZER).tokenize(_document("", "zeta")), Tokenized)


@pytest.mark.parametrize("ids", [(), (0,), (0, 0), (0, 0, 0, 0, 0, 0)])
def test_a_token_id_list_of_padding_only_is_an_empty_document(ids):
    """[0, 0] holds no token: as [] it is an empty_document, not a row of the padding's vector."""
    plan = _plan(InputInfo("content", "content", 4))
    error = DocumentTokenizer(plan, None).tokenize(_document(TokenIds(ids)))
    assert error["reason"] == "empty_document"
    assert isinstance(DocumentTokenizer(plan, None).tokenize(_document(TokenIds((0, 7)))), Tokenized)


def test_an_id_past_the_embedding_is_a_bad_token_id_dead_letter_before_tokenizing():
    from pipeline.reading import documents

    inputs = (InputInfo("content", "content", 4, id_limit=10),)
    plan = types.SimpleNamespace(**vars(_plan(*inputs)), id_field="id", keep_fields=(), tokenizes=False)
    document = documents.to_document(plan, "c.jsonl", 1, {"id": "a", "content": [9, 3]})
    assert isinstance(DocumentTokenizer(plan, None).tokenize(document), Tokenized)
    error = documents.to_document(plan, "c.jsonl", 2, {"id": "b", "content": [3, 10]})
    assert error["reason"] == "bad_token_id" and "input_dim=10" in error["message"]


def test_a_text_input_reaches_the_model_as_the_string_and_the_model_decides_emptiness():
    plan = _plan(InputInfo("content", "content", 0, takes=TEXT_INPUT, rank=2), InputInfo("title", "title", 3))
    tokenized = DocumentTokenizer(plan, TOKENIZER).tokenize(_document("", ""))
    assert isinstance(tokenized, Tokenized)
    assert tokenized.features[0] == ""
    stacked = stack_features(plan.inputs, [tokenized, tokenized._replace(features=("hello", np.zeros(3)))])
    assert stacked["content"].shape == (2, 1) and stacked["content"][1, 0] == "hello"
    assert stacked["title"].shape == (2, 3)


def test_stack_features_of_token_ids_is_one_int32_matrix_in_batch_order():
    plan = _plan(InputInfo("content", "content", 4))
    tokenizer = DocumentTokenizer(plan, TOKENIZER)
    batch = [tokenizer.tokenize(_document(text)) for text in ("alpha", "beta gamma", "delta delta delta")]
    stacked = stack_features(plan.inputs, batch)
    assert stacked["content"].dtype == np.int32
    assert stacked["content"].tolist() == [[0, 0, 0, 2], [0, 0, 3, 4], [0, 5, 5, 5]]


def test_workers_read_the_bundles_tokenizer_without_the_model_and_check_its_hash(tiny_bundle):
    import hashlib
    import os

    from models.bundle import load_bundle
    from pipeline.errors import ExportConfigError
    from pipeline.planning.model_source import load_plan_tokenizer

    directory, _, _ = tiny_bundle
    with open(os.path.join(directory, "tokenizer.json"), "rb") as handle:
        sha256 = hashlib.sha256(handle.read()).hexdigest()
    plan = types.SimpleNamespace(
        tokenizer_uri="", tokenizer_sha256=sha256, model_uri=directory, padding="post", truncating="pre"
    )
    tokenizer = load_plan_tokenizer(plan)
    bundled = load_bundle(directory).tokenizer
    assert tokenizer.vocabulary == bundled.vocabulary
    assert (tokenizer.padding, tokenizer.truncating) == ("post", "pre")
    assert load_plan_tokenizer(types.SimpleNamespace(**{**vars(plan), "tokenizer_uri": "none"})) is None
    with pytest.raises(ExportConfigError, match="changed after launch"):
        load_plan_tokenizer(types.SimpleNamespace(**{**vars(plan), "tokenizer_sha256": "0" * 64}))


def test_embed_documents_in_a_test_pipeline_gives_keras_vectors_and_dead_letters(tmp_path, tiny_bundle):
    import apache_beam as beam
    import keras
    from apache_beam.testing.test_pipeline import TestPipeline
    from apache_beam.testing.util import assert_that, equal_to

    from pipeline.inference.transforms import EmbedDocuments
    from pipeline.planning.build import build_plan
    from pipeline.planning.options import ExportOptions

    directory, model, _ = tiny_bundle
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"id": "x", "content": "word1", "title": "word2"}\n')
    flags = ["--model", directory, "--input", str(corpus), "--output", str(tmp_path / "o")]
    plan, model_source = build_plan(ExportOptions([*flags, "--layer", "lstm_content", "--batch_size", "4"]))
    texts = {
        "a": ("word1 word2 word3", "word4"),
        "b": ("word5 " * 40, "word6 word7"),
        "c": ("word8", ""),
        "empty": ("", "   "),
        "d": ("unknown words only", "word9"),
    }
    # The sub-model needs only the inputs lstm_content depends on: content.
    assert [info.name for info in plan.inputs] == ["content"]
    documents = [Document(key, value[:1], (), "c.jsonl", n) for n, (key, value) in enumerate(texts.items())]
    tokenizer = DocumentTokenizer(plan, model_source.tokenizer)
    good = [tokenizer.tokenize(d) for d in documents if d.id != "empty"]
    features = stack_features(plan.inputs, good)
    features["title"] = np.zeros((len(good), model.get_layer("title").output.shape[1]), np.int32)
    reference = keras.Model(model.inputs, model.get_layer("lstm_content").output).predict(features, verbose=0)
    expected_vectors = {t.document.id: reference[row] for row, t in enumerate(good)}

    def rows_match_keras(batches):
        rows = [row for batch in batches for row in batch.to_pylist()]
        assert sorted(row["id"] for row in rows) == sorted(expected_vectors)
        for row in rows:
            np.testing.assert_allclose(row["lstm_content"], expected_vectors[row["id"]], atol=1e-5, rtol=0)
            assert len(row["input_sha256"]) == 64

    with TestPipeline() as pipeline:
        rows, errors = pipeline | beam.Create(documents) | EmbedDocuments(plan)
        assert_that(rows, rows_match_keras, label="RowsAreKerasVectors")
        reasons = errors | beam.Map(lambda error: (error["id"], error["reason"], error["position"]))
        assert_that(reasons, equal_to([("empty", "empty_document", 3)]), label="DeadLetters")
