"""The one tokenizer used by training and export: text to fixed-length token ids.

Standardisation: Unicode NFKC, then `str.casefold()` (lower case that also folds
"ß" to "ss").  Splitting: Han ideographs, Hiragana and Katakana are one token per
character (Chinese and Japanese are not space-separated); emoji and other
pictographs are one token per character; every other run of letters and digits
(`\\w` without "_") is one token.  Zero-width and bidirectional format characters
are deleted; everything else (spaces, punctuation, control characters)
separates tokens and is dropped.

Ids: 0 is padding, 1 is out-of-vocabulary, 2.. are vocabulary entries ordered by
descending training frequency (ties alphabetical).  Each model input has a fixed
length; `padding` says on which side short documents get 0s and `truncating`
which end of a long document is cut.  Both default to the choice recorded in the
bundle: pre-padding (real tokens at the end, as Keras's `pad_sequences`) and
post-truncation (a long document keeps its beginning).
"""

from __future__ import annotations

import collections
import json
import re
import typing
import unicodedata
from collections.abc import Iterable, Sequence

import numpy as np

PADDING_ID = 0
OOV_ID = 1
FORMAT = "embexport-tokenizer"
SIDES = ("pre", "post")

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f"
_PICTOGRAPHS = "\u2300-\u23ff\u2600-\u27bf\u2b00-\u2bff\U0001f000-\U0001faff"
_TOKEN_PATTERN = re.compile(f"[{_CJK}]|[{_PICTOGRAPHS}]|[^\\W_{_CJK}]+")


# Zero-width and other invisible format characters are deleted, not treated as
# separators, so that "wo\u200brd" stays one word.
_INVISIBLE = re.compile("[\u00ad\u061c\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff]")

# `encode_batch`'s result: (ids, token counts, out-of-vocabulary counts, truncated), one row per text.
EncodedBatch = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
# `encode_one`'s result: (ids, token count, out-of-vocabulary count, truncated) of one text.
EncodedText = tuple[np.ndarray, int, int, bool]


class TextTokenizer(typing.Protocol):
    """What export asks of a tokenizer: this module's `Tokenizer` and those of `models.keras2_tokenizer`."""

    padding: str
    truncating: str

    @property
    def size(self) -> int: ...

    @property
    def vocabulary(self) -> list[str]: ...

    def id_to_token(self) -> dict[int, str]: ...

    def encode_batch(self, texts: Sequence[str], length: int) -> EncodedBatch: ...

    def encode_one(self, text: str, length: int) -> EncodedText: ...


def split_text(text: str) -> list[str]:
    """Standardises `text` and splits it into token strings."""
    text = _INVISIBLE.sub("", unicodedata.normalize("NFKC", text))
    return _TOKEN_PATTERN.findall(text.casefold())


def check_sides(padding: str, truncating: str) -> None:
    """Raises ValueError unless both sides are "pre" or "post"."""
    for name, side in (("padding", padding), ("truncating", truncating)):
        if side not in SIDES:
            raise ValueError(f"{name} must be 'pre' or 'post', received {side!r}.")


def pad_one(
    sequence: Sequence[int], length: int, padding: str = "pre", truncating: str = "pre"
) -> tuple[np.ndarray, int, bool]:
    """Keras's `pad_sequences` for one list of ids (sides already checked).

    Returns:
        `(ids, count, truncated)`: an int32 `(length,)` array, the number of ids
        kept, and whether the sequence was cut.
    """
    truncated = len(sequence) > length
    if truncated:
        sequence = sequence[-length:] if truncating == "pre" else sequence[:length]
    ids = np.zeros(length, dtype=np.int32)
    count = len(sequence)
    if count:
        if padding == "pre":
            ids[length - count :] = sequence
        else:
            ids[:count] = sequence
    return ids, count, truncated


def pad_token_ids(
    sequences: Sequence[Sequence[int]], length: int, padding: str = "pre", truncating: str = "pre"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keras's `pad_sequences` for lists of ids, also reporting counts and cuts.

    Args:
        sequences: lists of int ids.
        length: ids per row.
        padding: "pre" puts the 0s before the ids, "post" after.
        truncating: "pre" drops the start of a long sequence, "post" its end.

    Returns:
        `(ids, counts, truncated)`: an int32 `(len(sequences), length)` array, the
        number of ids kept per row, and whether each row was cut.
    """
    check_sides(padding, truncating)
    ids = np.zeros((len(sequences), length), dtype=np.int32)
    counts = np.zeros(len(sequences), dtype=np.int32)
    truncated = np.zeros(len(sequences), dtype=bool)
    for row, sequence in enumerate(sequences):
        ids[row], counts[row], truncated[row] = pad_one(sequence, length, padding, truncating)
    return ids, counts, truncated


class Tokenizer:
    """Maps text to token ids with a fixed vocabulary.

    Args:
        vocabulary: token strings; the first gets id 2.
        padding: "pre" or "post", where padding ids go.
        truncating: "pre" or "post", which end of an over-long document is cut.
    """

    def __init__(self, vocabulary: Iterable[str], padding: str = "pre", truncating: str = "post") -> None:
        check_sides(padding, truncating)
        self.vocabulary = list(vocabulary)
        self.padding = padding
        self.truncating = truncating
        self._ids = {token: index + 2 for index, token in enumerate(self.vocabulary)}
        if len(self._ids) != len(self.vocabulary):
            raise ValueError("The vocabulary has duplicate tokens.")

    @property
    def size(self) -> int:
        """Number of ids, padding and out-of-vocabulary included."""
        return len(self.vocabulary) + 2

    @classmethod
    def fit(cls, texts: Iterable[str], vocabulary_size: int, **kwargs: str) -> Tokenizer:
        """Builds the vocabulary of the `vocabulary_size - 2` most frequent tokens."""
        if vocabulary_size < 3:
            raise ValueError(f"vocabulary_size must be at least 3, received {vocabulary_size}.")
        counts: collections.Counter[str] = collections.Counter()
        for text in texts:
            counts.update(split_text(text))
        ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
        return cls([token for token, _ in ranked[: vocabulary_size - 2]], **kwargs)

    def id_to_token(self) -> dict[int, str]:
        """Id -> token string for every vocabulary id (2..); padding and OOV have no string."""
        return {index + 2: token for index, token in enumerate(self.vocabulary)}

    def token_ids(self, text: str) -> list[int]:
        """All token ids of `text`, unpadded and untruncated."""
        get = self._ids.get
        return [get(token, OOV_ID) for token in split_text(text)]

    def encode_batch(self, texts: Sequence[str], length: int) -> EncodedBatch:
        """Encodes texts into a padded id matrix.

        Args:
            texts: strings.
            length: ids per row.

        Returns:
            `(ids, token_counts, oov_counts, truncated)`: an int32 array of shape
            `(len(texts), length)`, the number of real tokens kept per row, the
            number of those that are out-of-vocabulary, and whether each row was
            cut.
        """
        sequences = [self.token_ids(text) for text in texts]
        ids, counts, truncated = pad_token_ids(sequences, length, self.padding, self.truncating)
        oov = (ids == OOV_ID).sum(axis=1).astype(np.int32)
        return ids, counts, oov, truncated

    def encode_one(self, text: str, length: int) -> EncodedText:
        """`encode_batch` of one text, as one row: the pipeline tokenizes a document at a time."""
        ids, count, truncated = pad_one(self.token_ids(text), length, self.padding, self.truncating)
        return ids, count, int(np.count_nonzero(ids == OOV_ID)), truncated

    def to_json(self) -> str:
        """The tokenizer as this package's tokenizer JSON (what `from_json` reads)."""
        return json.dumps(
            {
                "format": FORMAT,
                "format_version": 1,
                "standardize": "NFKC+casefold",
                "padding": self.padding,
                "truncating": self.truncating,
                "padding_id": PADDING_ID,
                "oov_id": OOV_ID,
                "vocabulary": self.vocabulary,
            },
            ensure_ascii=False,
            indent=0,
        )

    @classmethod
    def from_json(cls, text: str) -> Tokenizer:
        """Loads a tokenizer written by `to_json`; raises ValueError if it is not one."""
        try:
            config = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"The tokenizer file is not valid JSON: {error}.") from None
        if not isinstance(config, dict) or config.get("format") != FORMAT:
            raise ValueError(
                f"The tokenizer file is not an {FORMAT} file (its 'format' is "
                f"{config.get('format') if isinstance(config, dict) else None!r})."
            )
        vocabulary = config.get("vocabulary")
        if not isinstance(vocabulary, list) or not all(isinstance(t, str) for t in vocabulary):
            raise ValueError("The tokenizer file's 'vocabulary' must be a list of strings.")
        return cls(
            vocabulary,
            padding=config.get("padding", "pre"),
            truncating=config.get("truncating", "post"),
        )
