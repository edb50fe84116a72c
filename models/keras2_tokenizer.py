"""Tokenizers for models trained elsewhere: Keras 2's `Tokenizer` reproduced exactly, and vocabulary files.

Both offer the interface of `models.tokenizer.Tokenizer` that export uses:
`encode_batch(texts, length)`, `padding`, `truncating`, `size`, `vocabulary`
(the tokens of ids 2, 3, ..., so that `vocabulary[i]` is id `i + 2`) and
`id_to_token()` (every id that can occur, ids 0 and 1 included where they are
tokens).  Padding and truncation follow Keras's `pad_sequences`: both default to
"pre" (real tokens at the end; a long document keeps its end).

`read_tokenizer` tells the three file kinds apart: this package's tokenizer
JSON, a Keras 2 `Tokenizer.to_json()` file, and a vocabulary file with one token
per line.
"""

from __future__ import annotations

import json
import re
import typing
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from models.tokenizer import FORMAT as EMBEXPORT_FORMAT
from models.tokenizer import (
    EncodedBatch,
    EncodedText,
    TextTokenizer,
    Tokenizer,
    check_sides,
    pad_one,
    pad_token_ids,
)

KERAS2_DEFAULT_FILTERS = '!"#$%&()*+,-./:;<=>?@[\\]^_`{|}~\t\n'
# `TextVectorization(standardize="lower_and_strip_punctuation", split="whitespace")`:
# tf.strings.lower without an encoding lowercases ASCII only, the punctuation
# regex is ASCII, and tf.strings.split splits on ASCII whitespace.
TEXT_VECTORIZATION_STRIP = re.compile(r'[!"#$%&()\*\+,-\./:;<=>?@\[\\\]^_`{|}~\']')
_ASCII_WHITESPACE = re.compile("[ \t\n\v\f\r]+")
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
PADDING_TOKEN = ""
UNKNOWN_TOKEN = "[UNK]"

FORMAT_EMBEXPORT = "embexport"
FORMAT_KERAS2 = "keras2_tokenizer"
FORMAT_VOCABULARY = "vocabulary_file"


def look_up(
    words: Iterable[str], index_of: Mapping[str, int], oov_id: int | None, num_words: int | None = None
) -> tuple[list[int], int]:
    """`(ids, unknown_count)`: unknown words and ids >= `num_words` become `oov_id` (dropped if None)."""
    ids: list[int] = []
    unknown = 0
    for word in words:
        index = index_of.get(word)
        if index is None or (num_words and index >= num_words):
            unknown += 1
            if oov_id is not None:
                ids.append(oov_id)
        else:
            ids.append(index)
    return ids, unknown


class _ListTokenizer:
    """Shared `encode_batch` for tokenizers whose `token_ids(text)` gives `(ids, unknown_count)`."""

    padding: str
    truncating: str
    _oov_id: int | None

    @property
    def size(self) -> int:
        """Number of ids, padding included."""
        raise NotImplementedError

    @property
    def oov_id(self) -> int | None:
        """The id an unknown word gets; None where unknown words are dropped (a Keras 2 Tokenizer
        without `oov_token`, a vocabulary file without "[UNK]"), whose id 1 is a word."""
        return self._oov_id

    def id_to_token(self) -> dict[int, str]:
        """Id -> token for every id the tokenizer can emit."""
        raise NotImplementedError

    def token_ids(self, text: str) -> tuple[list[int], int]:
        """`(ids, unknown_count)` for one text, unpadded."""
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str], length: int) -> EncodedBatch:
        """Encodes texts into a padded id matrix.

        Returns:
            `(ids, token_counts, oov_counts, truncated)`: int32 `(len(texts),
            length)` ids, real tokens kept per row, words of each document that are
            not in the vocabulary (mapped to the unknown id or dropped), and
            whether each row was cut.
        """
        sequences: list[list[int]] = []
        unknown = np.zeros(len(texts), dtype=np.int32)
        for row, text in enumerate(texts):
            sequence, unknown[row] = self.token_ids(text)
            sequences.append(sequence)
        ids, counts, truncated = pad_token_ids(sequences, length, self.padding, self.truncating)
        return ids, counts, unknown, truncated

    def encode_one(self, text: str, length: int) -> EncodedText:
        """`encode_batch` of one text, as one row: the pipeline tokenizes a document at a time."""
        sequence, unknown = self.token_ids(text)
        ids, count, truncated = pad_one(sequence, length, self.padding, self.truncating)
        return ids, count, unknown, truncated

    @property
    def vocabulary(self) -> list[str]:
        """Tokens of ids 2 .. size - 1 (`vocabulary[i]` is id `i + 2`); see `id_to_token` for 0 and 1."""
        tokens = self.id_to_token()
        return [tokens.get(index, "") for index in range(2, self.size)]


class Keras2Tokenizer(_ListTokenizer):
    """Keras 2's `keras.preprocessing.text.Tokenizer.texts_to_sequences`, exactly.

    Lower-cases (`str.lower`), replaces each character of `filters` by `split`,
    splits on `split` and drops empty words; with `char_level` every character
    is a word and `filters` does not apply.  Ids come from `word_index` (1 is the
    most frequent word, or `oov_token` when set).  With `num_words`, only ids
    below it are kept: a word with a larger id becomes `oov_token`'s id when
    there is one and is dropped otherwise; an unknown word likewise.

    Args:
        word_index: word -> id, from the fitted tokenizer.
        num_words, filters, lower, split, char_level, oov_token: as in Keras 2.
        padding, truncating: "pre" or "post", as in `pad_sequences`.
    """

    def __init__(
        self,
        word_index: dict[str, int],
        num_words: int | None = None,
        filters: str | None = KERAS2_DEFAULT_FILTERS,
        lower: bool = True,
        split: str = " ",
        char_level: bool = False,
        oov_token: str | None = None,
        padding: str = "pre",
        truncating: str = "pre",
    ) -> None:
        check_sides(padding, truncating)
        if not isinstance(word_index, dict) or not all(
            isinstance(word, str) and isinstance(index, int) and index > 0
            for word, index in word_index.items()
        ):
            raise ValueError("word_index must map words (strings) to positive integer ids.")
        self.word_index = dict(word_index)
        self.num_words = num_words
        self.filters = filters or ""
        self.lower = lower
        self.split = split
        self.char_level = char_level
        self.oov_token = oov_token
        self.padding = padding
        self.truncating = truncating
        self._oov_id = self.word_index.get(oov_token) if oov_token is not None else None
        self._translate = str.maketrans({character: split for character in self.filters})

    @property
    def size(self) -> int:
        """Number of ids, padding included: every id the tokenizer can emit is below it."""
        top = max(self.word_index.values(), default=0) + 1
        return min(top, self.num_words) if self.num_words else top

    def id_to_token(self) -> dict[int, str]:
        """Id -> word for every id the tokenizer can emit (id 1 is `oov_token` or the top word)."""
        size = self.size
        return {index: word for word, index in self.word_index.items() if index < size}

    def words(self, text: str) -> list[str]:
        """`text` split into words as Keras 2 splits it."""
        if self.char_level:
            return list(text.lower() if self.lower else text)
        if self.lower:
            text = text.lower()
        return [word for word in text.translate(self._translate).split(self.split) if word]

    def token_ids(self, text: str) -> tuple[list[int], int]:
        """`(ids, unknown_count)` for one text, unpadded."""
        return look_up(self.words(text), self.word_index, self._oov_id, self.num_words)

    @classmethod
    def from_json(
        cls, text: str | dict[str, typing.Any], padding: str = "pre", truncating: str = "pre"
    ) -> Keras2Tokenizer:
        """Loads the output of Keras 2's `Tokenizer.to_json()`.

        Also accepts that JSON string saved once more as a JSON string (what
        `json.dump(tokenizer.to_json(), f)` writes).

        Raises:
            ValueError: the text is not a Keras 2 Tokenizer's JSON.
        """
        config = json.loads(text) if isinstance(text, str) else text
        if isinstance(config, str):
            config = json.loads(config)
        if not is_keras2_tokenizer_config(config):
            raise ValueError(
                "Not a Keras 2 Tokenizer.to_json() file: expected an object with "
                '"class_name": "Tokenizer" and a "config" holding "word_index".'
            )
        inner = config["config"]
        word_index = inner["word_index"]
        if isinstance(word_index, str):  # to_json() stores it as a JSON string.
            word_index = json.loads(word_index)
        if inner.get("analyzer"):
            raise ValueError("The tokenizer used a custom `analyzer` function, which its JSON does not hold.")
        return cls(
            word_index,
            num_words=inner.get("num_words"),
            filters=inner.get("filters", KERAS2_DEFAULT_FILTERS),
            lower=inner.get("lower", True),
            split=inner.get("split", " "),
            char_level=inner.get("char_level", False),
            oov_token=inner.get("oov_token"),
            padding=padding,
            truncating=truncating,
        )


def is_keras2_tokenizer_config(config: object) -> typing.TypeGuard[dict[str, typing.Any]]:
    """Whether a decoded JSON value is a Keras 2 `Tokenizer.to_json()` object."""
    return (
        isinstance(config, dict)
        and config.get("class_name") == "Tokenizer"
        and isinstance(config.get("config"), dict)
        and "word_index" in config["config"]
    )


def _is_word_index(config: object) -> bool:
    """Whether a decoded JSON value is a non-empty {word: positive integer id} object."""
    return (
        isinstance(config, dict)
        and bool(config)
        and all(type(index) is int and index > 0 for index in config.values())
    )


class VocabularyTokenizer(_ListTokenizer):
    """A vocabulary file, one token per line, id = line number.

    This is `TextVectorization.get_vocabulary()` written one token per line:
    line 0 is "" (padding) and the line "[UNK]" (line 1) is the id of unknown
    words; without such a line unknown words are dropped.  Text is standardised
    as `TextVectorization`'s defaults do (`lower_and_strip_punctuation`,
    `whitespace`): ASCII letters lower-cased, ASCII punctuation removed, split on
    ASCII whitespace.

    Args:
        tokens: the lines, in order.
        padding, truncating: "pre" or "post", as in `pad_sequences` (note that
            `TextVectorization` itself pads and truncates "post").
    """

    def __init__(self, tokens: Iterable[str], padding: str = "pre", truncating: str = "pre") -> None:
        check_sides(padding, truncating)
        tokens = list(tokens)
        if not tokens or tokens[0] != PADDING_TOKEN:
            raise ValueError(
                "A vocabulary file's line 0 must be empty: it is the padding id 0, as in "
                "TextVectorization.get_vocabulary() (line 0 '', line 1 '[UNK]'). Received "
                f"{tokens[0] if tokens else 'an empty file'!r} on line 0."
            )
        index: dict[str, int] = {}
        for number, token in enumerate(tokens):
            if number and token in index:
                raise ValueError(
                    f"The vocabulary file lists {token!r} twice (lines {index[token]} and {number})."
                )
            index.setdefault(token, number)
        index.pop(PADDING_TOKEN, None)
        self.tokens = tokens
        self.padding = padding
        self.truncating = truncating
        self._ids = index
        self._oov_id = index.get(UNKNOWN_TOKEN)

    @property
    def size(self) -> int:
        """Number of ids: the lines of the file, padding included."""
        return len(self.tokens)

    def id_to_token(self) -> dict[int, str]:
        """Id (line number) -> token, ids 0 and 1 included."""
        return dict(enumerate(self.tokens))

    @staticmethod
    def words(text: str) -> list[str]:
        """`text` standardised and split as `TextVectorization`'s defaults do."""
        text = TEXT_VECTORIZATION_STRIP.sub("", text.translate(_ASCII_LOWER))
        return [word for word in _ASCII_WHITESPACE.split(text) if word]

    def token_ids(self, text: str) -> tuple[list[int], int]:
        """`(ids, unknown_count)` for one text, unpadded."""
        return look_up(self.words(text), self._ids, self._oov_id)

    @classmethod
    def from_text(cls, text: str, padding: str = "pre", truncating: str = "pre") -> VocabularyTokenizer:
        """Reads a vocabulary file's text, one token per line."""
        lines = text.split("\n")
        if lines and lines[-1] == "" and len(lines) > 1:
            lines.pop()  # The newline that ends the last line.
        return cls([line.rstrip("\r") for line in lines], padding=padding, truncating=truncating)


def read_tokenizer(
    data: bytes, padding: str | None = None, truncating: str | None = None
) -> tuple[TextTokenizer, str]:
    """Builds the tokenizer a file holds.

    Args:
        data: the file's bytes.
        padding, truncating: "pre"/"post", or None for the file's own choice
            (this package's tokenizer records one; the others default to "pre").

    Returns:
        `(tokenizer, file_format)` with file_format one of FORMAT_EMBEXPORT, FORMAT_KERAS2, FORMAT_VOCABULARY.

    Raises:
        ValueError: what the file is and why it cannot be used.
    """
    tokenizer, file_format = _read_tokenizer(data, padding, truncating)
    if not _words(tokenizer):
        # Every text would become padding or unknown ids: a run would embed nothing, and a
        # vocabulary table would name no row, yet both would finish as if all were well.
        raise ValueError(
            "It holds no words (an empty file, or a vocabulary of only the padding and unknown "
            "lines), so every text would be empty or unknown. Pass the tokenizer the model was "
            "trained with."
        )
    return tokenizer, file_format


def _words(tokenizer: TextTokenizer) -> list[str]:
    """The tokens a tokenizer maps text to, other than padding and its unknown-word token."""
    unknown = {PADDING_TOKEN, UNKNOWN_TOKEN, getattr(tokenizer, "oov_token", None)}
    return [token for token in tokenizer.id_to_token().values() if token not in unknown]


def _read_tokenizer(data: bytes, padding: str | None, truncating: str | None) -> tuple[TextTokenizer, str]:
    """`read_tokenizer` before its check that the tokenizer knows a word."""
    if data[:1] == b"\x80":
        raise ValueError(
            "This is a pickle (e.g. a pickled Keras Tokenizer). Unpickling runs arbitrary code, "
            "so it is not read; save the tokenizer with `open(path, 'w').write(tokenizer.to_json())`."
        )
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(f"The file is not UTF-8 text ({error}).") from None
    stripped = text.lstrip()
    if stripped[:1] in ("{", '"'):
        try:
            config = json.loads(text)
            if isinstance(config, str):
                config = json.loads(config)
        except json.JSONDecodeError as error:
            raise ValueError(f"The file looks like JSON but is not valid JSON: {error}.") from None
        if isinstance(config, dict) and config.get("format") == EMBEXPORT_FORMAT:
            tokenizer = Tokenizer.from_json(json.dumps(config))
            if padding or truncating:
                tokenizer = Tokenizer(
                    tokenizer.vocabulary,
                    padding=padding or tokenizer.padding,
                    truncating=truncating or tokenizer.truncating,
                )
            return tokenizer, FORMAT_EMBEXPORT
        if isinstance(config, dict) and {"word_index", "num_words", "filters"} <= config.keys():
            # `json.dump(tokenizer.get_config(), f)`: what to_json() holds as its "config", settings and all.
            config = {"class_name": "Tokenizer", "config": config}
        if is_keras2_tokenizer_config(config):
            return Keras2Tokenizer.from_json(config, padding or "pre", truncating or "pre"), FORMAT_KERAS2
        if _is_word_index(config):
            raise ValueError(
                "The JSON file maps words to ids: a Keras 2 Tokenizer's word_index alone (json.dump("
                "tokenizer.word_index, f)), without the filters, lower, split, num_words and oov_token "
                "that say which words a text holds and which ids are kept. Save the whole tokenizer, "
                "open(path, 'w').write(tokenizer.to_json()), and pass that file."
            )
        raise ValueError(
            'The JSON file is neither this package\'s tokenizer ("format": '
            f'"{EMBEXPORT_FORMAT}") nor a Keras 2 Tokenizer.to_json() file ("class_name": '
            '"Tokenizer").'
        )
    return VocabularyTokenizer.from_text(text, padding or "pre", truncating or "pre"), FORMAT_VOCABULARY
