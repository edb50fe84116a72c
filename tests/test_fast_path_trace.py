"""The fast path's traced function is plain TensorFlow: tracing it converts none of its code with AutoGraph.

AutoGraph's conversion of the fast path's Python code (its loops, lanes and
buckets) cost seconds of every process's start; its loops are explicit
`tf.while_loop`s, so the trace needs none, and the outputs stay Keras's.
"""

import keras
import numpy as np
from tensorflow.python.autograph.impl import api as autograph_api

from models.fast_path import build_fast_path

LENGTH = 12


def _model():
    """Per-token and stacked LSTMs (plain loops) beside a final-state LSTM (bucketed loops)."""
    ids = keras.Input(shape=(LENGTH,), dtype="int32", name="ids")
    embedded = keras.layers.Embedding(50, 8, name="emb")(ids)
    tokens = keras.layers.LSTM(6, return_sequences=True, name="tokens")(embedded)
    stacked = keras.layers.LSTM(5, name="stacked")(tokens)
    final = keras.layers.LSTM(4, name="final")(embedded)
    return keras.Model(ids, {"tokens": tokens, "stacked": stacked, "final": final})


def test_tracing_the_fast_path_converts_none_of_its_code_with_autograph(monkeypatch):
    converted = []
    convert = autograph_api._convert_actual

    def recorded(entity, program_ctx):
        converted.append(f"{getattr(entity, '__module__', '')}.{getattr(entity, '__qualname__', entity)}")
        return convert(entity, program_ctx)

    monkeypatch.setattr(autograph_api, "_convert_actual", recorded)
    model = _model()
    choice = build_fast_path(model)
    assert choice.fast_path is not None, choice.reason
    rng = np.random.default_rng(0)
    ids = np.zeros((40, LENGTH), np.int32)
    for row in range(40):
        count = row % (LENGTH + 1)
        ids[row, LENGTH - count :] = rng.integers(1, 50, count)
    fast = choice.fast_path({"ids": ids})
    expected = model.predict({"ids": ids}, verbose=0)
    for column in ("tokens", "stacked", "final"):
        np.testing.assert_allclose(fast[column], expected[column], atol=1e-5, err_msg=column)
    assert not [name for name in converted if name.startswith("models.")], converted
