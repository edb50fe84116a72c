"""Tests for models.tokenizer: standardisation, splitting, encoding and the JSON format."""

import json

import numpy as np
import pytest

from models.tokenizer import OOV_ID, PADDING_ID, Tokenizer, split_text


@pytest.mark.parametrize(
    "text, expected",
    [
        pytest.param(
            "Hello, World! It's 2024.",
            ["hello", "world", "it", "s", "2024"],
            id="english_punctuation",
        ),
        pytest.param(
            "snake_case foo-bar\tbaz\n(qux)",
            ["snake", "case", "foo", "bar", "baz", "qux"],
            id="separators",
        ),
        pytest.param(
            "Straße STRASSE strasse",
            ["strasse", "strasse", "strasse"],
            id="casefold_eszett",
        ),
        pytest.param("ÉCOLE École", ["école", "école"], id="casefold_accents"),
        pytest.param(
            "ｆｕｌｌ\u3000ｗｉｄｔｈ \ufb01le",
            ["full", "width", "file"],
            id="nfkc_compatibility",
        ),
        pytest.param("e\u0301te\u0301", ["été"], id="nfkc_composes_accents"),
        pytest.param("你好世界", ["你", "好", "世", "界"], id="chinese_per_ideograph"),
        pytest.param("我爱Python", ["我", "爱", "python"], id="chinese_mixed_latin"),
        pytest.param("こんにちは", ["こ", "ん", "に", "ち", "は"], id="hiragana"),
        pytest.param("カタカナ", ["カ", "タ", "カ", "ナ"], id="katakana"),
        pytest.param("ｶﾀｶﾅ", ["カ", "タ", "カ", "ナ"], id="halfwidth_katakana"),
        pytest.param("안녕하세요 세계", ["안녕하세요", "세계"], id="korean_words_whole"),
        pytest.param("I ❤️ 🍕🍕!", ["i", "❤", "🍕", "🍕"], id="emoji_each_one_token"),
        pytest.param("good👍bad", ["good", "👍", "bad"], id="emoji_between_words"),
        pytest.param("👨\u200d👩\u200d👧", ["👨", "👩", "👧"], id="emoji_zwj_sequence"),
        pytest.param("⭐ ⌛ ⏰ ⬛", ["⭐", "⌛", "⏰", "⬛"], id="emoji_outside_main_blocks"),
        pytest.param("wo\u200brd", ["word"], id="zero_width_space"),
        pytest.param(
            "zero\u200cwidth\u200djoin",
            ["zerowidthjoin"],
            id="zero_width_non_joiner_and_joiner",
        ),
        pytest.param(
            "in\u00advisible \ufeffbom wo\u2060rd",
            ["invisible", "bom", "word"],
            id="soft_hyphen_bom_word_joiner",
        ),
        pytest.param("שלום עולם", ["שלום", "עולם"], id="hebrew"),
        pytest.param("مرحبا بالعالم", ["مرحبا", "بالعالم"], id="arabic"),
        pytest.param(
            "\u202bשלום\u202c \u200fعالم\u200f",
            ["שלום", "عالم"],
            id="rtl_embedding_and_marks",
        ),
        pytest.param(
            "ab\u2067cd\u2069 مر\u061cحبا",
            ["abcd", "مرحبا"],
            id="bidi_isolates_and_arabic_letter_mark",
        ),
        pytest.param("", [], id="empty"),
        pytest.param(" \t\n\u3000 ", [], id="whitespace_only"),
        pytest.param("... !!! ---", [], id="punctuation_only"),
    ],
)
def test_split_text(text, expected):
    assert split_text(text) == expected


def test_fit_orders_vocabulary_by_frequency_then_alphabet():
    texts = ["b a c b", "c b d", "a e"]  # b: 3; a, c: 2; d, e: 1
    tokenizer = Tokenizer.fit(texts, vocabulary_size=7)
    assert tokenizer.vocabulary == ["b", "a", "c", "d", "e"]
    assert tokenizer.size == 7
    assert tokenizer.token_ids("b a c d e") == [2, 3, 4, 5, 6]


def test_fit_keeps_the_most_frequent_tokens_within_vocabulary_size():
    tokenizer = Tokenizer.fit(["z z z y y x w"], vocabulary_size=4)
    assert tokenizer.vocabulary == ["z", "y"]
    ids, _, oov, _ = tokenizer.encode_batch(["z y x w"], length=4)
    assert ids.max() < 4
    np.testing.assert_array_equal(ids, [[2, 3, OOV_ID, OOV_ID]])
    np.testing.assert_array_equal(oov, [2])


def test_fit_rejects_a_too_small_vocabulary():
    with pytest.raises(ValueError, match="at least 3, received 2"):
        Tokenizer.fit(["a b"], vocabulary_size=2)


def test_special_ids():
    assert (PADDING_ID, OOV_ID) == (0, 1)
    tokenizer = Tokenizer(["known"])
    assert tokenizer.token_ids("known unknown KNOWN") == [2, OOV_ID, 2]


@pytest.mark.parametrize(
    "padding, expected",
    [("pre", [[0, 0, 0, 2, 1, 3]]), ("post", [[2, 1, 3, 0, 0, 0]])],
)
def test_encode_batch_padding_side(padding, expected):
    tokenizer = Tokenizer(["alpha", "beta"], padding=padding)
    ids, counts, oov, truncated = tokenizer.encode_batch(["alpha gamma beta"], length=6)
    assert ids.dtype == np.int32
    np.testing.assert_array_equal(ids, expected)
    np.testing.assert_array_equal(counts, [3])
    np.testing.assert_array_equal(oov, [1])
    np.testing.assert_array_equal(truncated, [False])


@pytest.mark.parametrize("padding", ["pre", "post"])
@pytest.mark.parametrize(
    "truncating, kept",
    [("post", ["t0", "t1", "t2", "t3"]), ("pre", ["t6", "t7", "t8", "t9"])],
)
def test_encode_batch_truncation_side(padding, truncating, kept):
    vocabulary = [f"t{index}" for index in range(10)]
    tokenizer = Tokenizer(vocabulary, padding=padding, truncating=truncating)
    ids, counts, oov, truncated = tokenizer.encode_batch([" ".join(vocabulary)], length=4)
    np.testing.assert_array_equal(ids, [[vocabulary.index(token) + 2 for token in kept]])
    np.testing.assert_array_equal(counts, [4])
    np.testing.assert_array_equal(oov, [0])
    np.testing.assert_array_equal(truncated, [True])


def test_encode_batch_exact_length_is_not_truncated():
    tokenizer = Tokenizer(["a", "b", "c"])
    ids, counts, _, truncated = tokenizer.encode_batch(["a b c"], length=3)
    np.testing.assert_array_equal(ids, [[2, 3, 4]])
    np.testing.assert_array_equal(counts, [3])
    np.testing.assert_array_equal(truncated, [False])


@pytest.mark.parametrize("padding", ["pre", "post"])
@pytest.mark.parametrize("text", ["", "   \n\t ", "?!"])
def test_encode_batch_text_without_tokens_is_all_padding(padding, text):
    tokenizer = Tokenizer(["a"], padding=padding)
    ids, counts, oov, truncated = tokenizer.encode_batch([text, "a"], length=5)
    np.testing.assert_array_equal(ids[0], np.full(5, PADDING_ID))
    np.testing.assert_array_equal(counts, [0, 1])
    np.testing.assert_array_equal(oov, [0, 0])
    np.testing.assert_array_equal(truncated, [False, False])


@pytest.mark.parametrize("padding", ["pre", "post"])
@pytest.mark.parametrize("truncating", ["pre", "post"])
def test_encode_one_is_a_row_of_encode_batch(padding, truncating):
    """The pipeline tokenizes a document at a time (`encode_one`): the same ids, counts and cuts."""
    vocabulary = [f"t{index}" for index in range(10)]
    tokenizer = Tokenizer(vocabulary, padding=padding, truncating=truncating)
    texts = ["", "?!", "t3", "t1 unknown t2", "t0 t1 t2 t3", "t9 x t8 y t7 z", " ".join(vocabulary) + " q"]
    ids, counts, oov, truncated = tokenizer.encode_batch(texts, length=4)
    for row, text in enumerate(texts):
        one_ids, one_count, one_oov, one_truncated = tokenizer.encode_one(text, length=4)
        assert one_ids.dtype == np.int32 and one_ids.shape == (4,)
        np.testing.assert_array_equal(one_ids, ids[row], err_msg=text)
        assert (one_count, one_oov, one_truncated) == (counts[row], oov[row], truncated[row]), text
        assert type(one_count) is int and type(one_oov) is int and type(one_truncated) is bool


def test_encode_batch_of_no_texts():
    ids, counts, oov, truncated = Tokenizer(["a"]).encode_batch([], length=5)
    assert ids.shape == (0, 5)
    assert counts.shape == oov.shape == truncated.shape == (0,)


@pytest.mark.parametrize("argument", ["padding", "truncating"])
@pytest.mark.parametrize("side", ["left", "PRE", None])
def test_invalid_side_is_a_value_error(argument, side):
    with pytest.raises(ValueError, match=f"{argument} must be 'pre' or 'post', received {side!r}"):
        Tokenizer(["a"], **{argument: side})


def test_duplicate_vocabulary_is_a_value_error():
    with pytest.raises(ValueError, match="duplicate"):
        Tokenizer(["a", "b", "a"])


def test_json_roundtrip_gives_equal_encodings():
    texts = [
        "Straße und Brücke über den Fluss",
        "你好世界 🍕 안녕하세요",
        "the the the quick brown fox jumps over the lazy dog " * 3,
        "",
    ]
    tokenizer = Tokenizer.fit(texts, vocabulary_size=12, padding="post", truncating="pre")
    restored = Tokenizer.from_json(tokenizer.to_json())
    assert restored.vocabulary == tokenizer.vocabulary
    assert (restored.padding, restored.truncating) == ("post", "pre")
    for expected, actual in zip(
        tokenizer.encode_batch(texts, 8), restored.encode_batch(texts, 8), strict=True
    ):
        np.testing.assert_array_equal(actual, expected)


def test_to_json_records_the_format_and_special_ids():
    config = json.loads(Tokenizer(["ß", "你"]).to_json())
    assert config["format"] == "embexport-tokenizer"
    assert config["padding_id"] == PADDING_ID
    assert config["oov_id"] == OOV_ID
    assert config["vocabulary"] == ["ß", "你"]


@pytest.mark.parametrize(
    "text, message",
    [
        pytest.param("not json at all", "not valid JSON", id="not_json"),
        pytest.param("", "not valid JSON", id="empty_file"),
        pytest.param(
            '{"format": "something-else", "vocabulary": []}',
            "'format' is 'something-else'",
            id="wrong_format",
        ),
        pytest.param('{"vocabulary": ["a"]}', "not an embexport-tokenizer file", id="no_format"),
        pytest.param('["a", "b"]', "not an embexport-tokenizer file", id="not_an_object"),
        pytest.param(
            '{"format": "embexport-tokenizer"}',
            "'vocabulary' must be a list of strings",
            id="no_vocabulary",
        ),
        pytest.param(
            '{"format": "embexport-tokenizer", "vocabulary": "abc"}',
            "'vocabulary' must be a list of strings",
            id="vocabulary_not_list",
        ),
        pytest.param(
            '{"format": "embexport-tokenizer", "vocabulary": ["a", 3]}',
            "'vocabulary' must be a list of strings",
            id="vocabulary_not_strings",
        ),
        pytest.param(
            '{"format": "embexport-tokenizer", "vocabulary": ["a", "a"]}',
            "duplicate",
            id="vocabulary_duplicates",
        ),
        pytest.param(
            '{"format": "embexport-tokenizer", "vocabulary": ["a"], "padding": "left"}',
            "padding must be 'pre' or 'post'",
            id="bad_padding",
        ),
    ],
)
def test_from_json_errors_are_value_errors(text, message):
    with pytest.raises(ValueError, match=message):
        Tokenizer.from_json(text)
