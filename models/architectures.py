"""Builders for the three tutorial topologies, with stable layer names."""

import keras

TOPOLOGIES = ("single_input", "two_inputs_one_output", "two_inputs_two_outputs")

# Layer names are part of the product's interface: `--layer` specs and the
# bundle manifest refer to them.
EMBEDDING = "emb"
LSTM_CONTENT = "lstm_content"
LSTM_TITLE = "lstm_title"
ADD = "add"
OUTPUT = "output"
OUT_CONTENT = "out_content"
OUT_TITLE = "out_title"
CONTENT = "content"
TITLE = "title"


def build_model(
    topology: str,
    vocabulary_size: int = 4000,
    embedding_dim: int = 300,
    lstm_units: int = 128,
    content_length: int = 300,
    title_length: int = 20,
    num_title_classes: int = 5,
) -> keras.Model:
    """Builds one of the tutorial's topologies, uncompiled.

    Args:
        topology: one of `TOPOLOGIES`.
        vocabulary_size: rows of the shared embedding table (ids 0 and 1 are
            padding and out-of-vocabulary).
        embedding_dim: width of each embedding vector.
        lstm_units: width of each LSTM's output vector.
        content_length: token ids per `content` input.
        title_length: token ids per `title` input.
        num_title_classes: softmax width of `out_title` (two-output topology).

    Returns:
        A functional `keras.Model` whose layers are named as in this module.
    """
    if topology not in TOPOLOGIES:
        raise ValueError(f"Unknown topology {topology!r}; expected one of {', '.join(TOPOLOGIES)}.")
    content = keras.Input(shape=(content_length,), dtype="int32", name=CONTENT)
    embedding = keras.layers.Embedding(vocabulary_size, embedding_dim, name=EMBEDDING)
    content_vector = keras.layers.LSTM(lstm_units, name=LSTM_CONTENT)(embedding(content))
    if topology == "single_input":
        output = keras.layers.Dense(1, activation="sigmoid", name=OUTPUT)(content_vector)
        return keras.Model(content, output, name=topology)

    title = keras.Input(shape=(title_length,), dtype="int32", name=TITLE)
    title_vector = keras.layers.LSTM(lstm_units, name=LSTM_TITLE)(embedding(title))
    if topology == "two_inputs_one_output":
        added = keras.layers.Add(name=ADD)([content_vector, title_vector])
        output = keras.layers.Dense(1, activation="sigmoid", name=OUTPUT)(added)
        return keras.Model([content, title], output, name=topology)

    out_content = keras.layers.Dense(1, activation="sigmoid", name=OUT_CONTENT)(content_vector)
    out_title = keras.layers.Dense(num_title_classes, activation="softmax", name=OUT_TITLE)(title_vector)
    return keras.Model([content, title], {OUT_CONTENT: out_content, OUT_TITLE: out_title}, name=topology)


def compile_model(model: keras.Model) -> keras.Model:
    """Compiles `model` as the tutorial does: a loss (dict) keyed by output name."""
    if model.name == "two_inputs_two_outputs":
        model.compile(
            optimizer="adam",
            loss={OUT_CONTENT: "binary_crossentropy", OUT_TITLE: "categorical_crossentropy"},
            loss_weights={OUT_CONTENT: 0.8, OUT_TITLE: 0.3},
            metrics={OUT_CONTENT: ["accuracy"], OUT_TITLE: ["accuracy"]},
        )
    else:
        model.compile(optimizer="adam", loss="binary_crossentropy", metrics=["accuracy"])
    return model
