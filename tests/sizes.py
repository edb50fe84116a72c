"""The sizes of every tiny model the tests train: one set, importable without Keras."""

SIZES = {
    "vocabulary_size": 50,
    "embedding_dim": 8,
    "lstm_units": 4,
    "content_length": 12,
    "title_length": 6,
    "num_title_classes": 3,
}
# The sequence length of each model input.
LENGTHS = {"content": SIZES["content_length"], "title": SIZES["title_length"]}
