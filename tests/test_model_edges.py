"""Models whose outputs a plain export would get silently wrong: values float16 cannot hold.

Each case is a small Keras model saved as a user would, exported through the
real pipeline and compared with what Keras itself gives.
"""

import keras
import numpy as np
import pytest
from pipeline_fixtures import export_args, manifest_of, read_errors, read_rows, rows_by_id, write_jsonl

from pipeline.running.export import run_export

# Token 1's embedding is beyond float16's range (65,504) on its own, and still is averaged over 3 tokens.
BIG = 3e5


@pytest.fixture(scope="module")
def big_values_model(tmp_path_factory):
    directory = tmp_path_factory.mktemp("big")
    inputs = keras.Input(shape=(4,), dtype="int32", name="content")
    embedded = keras.layers.Embedding(10, 3, name="emb")(inputs)
    outputs = keras.layers.Dense(1, name="out")(keras.layers.GlobalAveragePooling1D(name="pool")(embedded))
    model = keras.Model(inputs, outputs)
    table = np.tile(np.array([[0.5, -0.25, 2.0]], np.float32), (10, 1)) * np.arange(10)[:, None]
    table[1] = [BIG, 1.0, -BIG]
    model.get_layer("emb").set_weights([table])
    path = directory / "big.keras"
    model.save(path)
    return path, table


@pytest.mark.parametrize("pooling", ["mean", "none"])
def test_values_beyond_float16_are_dead_letters_not_infinities(big_values_model, tmp_path, pooling):
    path, table = big_values_model
    documents = [{"id": f"d{index}", "content": [2 + index, 3]} for index in range(6)]
    documents += [{"id": "big_mean", "content": [1, 2, 3]}, {"id": "big_one", "content": [4, 1]}]
    corpus = write_jsonl(tmp_path / "ids.jsonl", documents)
    output = tmp_path / "out"
    flags = ["--tokenizer", "none", "--layer", "emb", "--pooling", pooling, "--dtype", "float16"]
    summary = run_export(export_args(path, corpus, output, *flags))
    assert summary.exit_code == 0, summary.message
    errors = read_errors(output).to_pylist()
    assert sorted(e["id"] for e in errors) == ["big_mean", "big_one"]
    assert {e["reason"] for e in errors} == {"float16_overflow"}
    assert "--dtype float32" in errors[0]["message"]
    rows = rows_by_id(read_rows(output))
    assert sorted(rows) == [f"d{index}" for index in range(6)]
    for index in range(6):
        tokens = table[[2 + index, 3]]
        expected = tokens.mean(axis=0) if pooling == "mean" else tokens
        actual = np.asarray(rows[f"d{index}"]["emb"], np.float32).reshape(expected.shape)
        assert np.isfinite(actual).all()
        np.testing.assert_allclose(actual, expected.astype(np.float16), rtol=0, atol=0)
    counts = manifest_of(output)["counts"]
    assert counts["records_read"] == counts["rows_written"] + counts["dead_letters"] == 8
