"""The real tokens of a model's text inputs, as its own TextVectorization sees them, and the unknown words."""

from __future__ import annotations

import typing

import keras
import numpy as np

from models.keras2_tokenizer import UNKNOWN_TOKEN
from pipeline.planning.introspection import text_vectorizer

if typing.TYPE_CHECKING:
    from pipeline.planning.plan import InputInfo


class TextTokens:
    """Marks the real tokens of text inputs with the sub-model's TextVectorization layers.

    Args:
        sub_model: the truncated `keras.Model` whose text inputs these are.
    """

    sub_model: keras.Model
    # Text input name -> (TextVectorization, unknown id), found on first use.
    _vectorizers: dict[str, tuple[keras.layers.TextVectorization | None, int | None]]

    def __init__(self, sub_model: keras.Model) -> None:
        self.sub_model = sub_model
        self._vectorizers = {}

    def real_tokens(self, info: InputInfo, texts: np.ndarray) -> tuple[np.ndarray, int]:
        """The real tokens of a text input and how many are unknown words: `(mask, unknown)`.

        The real tokens are where the model's TextVectorization emits a non-zero
        id. With none of fixed length (only vector outputs), a text is one token
        when its vectorizer emits some id, ragged or padded, or a count or one-hot
        vector that is not all 0 (when it is not blank, without a vectorizer): a
        text of no tokens (only punctuation) is empty, as it is for a vectorizer of
        fixed length.
        """
        vectorizer, unknown_id = self._text_vectorizer(info)
        if vectorizer is None:
            return np.array([bool(text.strip()) for text in texts.reshape(-1)]).reshape(-1, 1), 0
        import tensorflow as tf

        ids = vectorizer(tf.constant(texts, dtype=tf.string))
        if isinstance(ids, tf.RaggedTensor):  # a ragged vectorizer's rows, padded with 0 to the longest
            ids = ids.to_tensor()
        ids = np.asarray(ids).reshape(len(texts), -1)
        unknown = int((ids == unknown_id).sum()) if unknown_id is not None else 0
        if not info.length:
            return (ids != 0).any(axis=1, keepdims=True), unknown
        return ids != 0, unknown

    def _text_vectorizer(self, info: InputInfo) -> tuple[keras.layers.TextVectorization | None, int | None]:
        """The TextVectorization layer whose ids mark `info`'s real tokens, and its unknown-word id."""
        if info.name not in self._vectorizers:
            tensor = next(t for t in self.sub_model.inputs if t.name == info.name)
            vectorizer = text_vectorizer(self.sub_model, tensor)
            config = vectorizer.get_config() if vectorizer is not None else {}
            # Counts or one-hot vectors (multi_hot, tf_idf) mark no positions, but are all 0 for a
            # text of no tokens; their vocabulary starts with "[UNK]", not with a padding "".
            counts = config.get("output_mode") != "int"
            vocabulary = vectorizer.get_vocabulary() if vectorizer is not None and not counts else []
            unknown_id = 1 if len(vocabulary) > 1 and vocabulary[1] == UNKNOWN_TOKEN else None
            self._vectorizers[info.name] = (vectorizer, unknown_id)
        return self._vectorizers[info.name]
