"""Graph analysis: which output tensors the fast path computes, which Keras computes, and why."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import keras

from models import keras_graph
from models.fast_path.cells import (
    FastEmbedding,
    FastRecurrent,
    Unsupported,
    is_numeric_ids,
)
from models.fast_path.plans import FULL, MASKED, PREFIX

FAST = "fast"
HYBRID = "hybrid"
KERAS = "keras"

# What the fast path runs itself: an Embedding of a model input, or a recurrent layer on one.
FastLayer = FastEmbedding | FastRecurrent


@dataclasses.dataclass(frozen=True)
class ForwardPass:
    """Which forward pass computes an output column, and why.

    `engine` is FAST (the fast path alone), HYBRID (Keras layers on fast-path
    outputs) or KERAS (Keras's own forward pass); `reason` says what runs, or
    why the fast path declined.
    """

    engine: str
    reason: str


class Analysis:
    """Classifies the tensors of a model: fast (embedding or recurrent), or computed by Keras."""

    # Keyed by `id(tensor)`: KerasTensors hash by identity only through `id`.
    _fast: dict[int, FastLayer | None]
    reasons: dict[int, str]  # why the tensor is not fast, where a layer declined

    def __init__(self) -> None:
        self._fast = {}
        self.reasons = {}

    def fast(self, tensor: keras.KerasTensor) -> FastLayer | None:
        """The `FastEmbedding`/`FastRecurrent` that computes `tensor`, or None (reason in `reasons`)."""
        key = id(tensor)
        if key not in self._fast:
            try:
                self._fast[key] = self._build(tensor)
            except Unsupported as reason:
                self._fast[key] = None
                self.reasons[key] = str(reason)
        return self._fast[key]

    def _build(self, tensor: keras.KerasTensor) -> FastLayer | None:
        layer, node = keras_graph.producer(tensor)
        if layer is None or isinstance(layer, keras.layers.InputLayer):
            return None
        if isinstance(layer, keras.layers.Embedding):
            return FastEmbedding(layer, node)
        if isinstance(layer, (keras.layers.RNN, keras.layers.Bidirectional)):
            parent = (keras_graph.node_inputs(node) or [None])[0]
            source = self.fast(parent) if parent is not None else None
            if source is None:
                below = self.reasons.get(id(parent)) if parent is not None else None
                raise Unsupported(
                    f"{type(layer).__name__} {layer.name!r} does not read an Embedding of a model input "
                    "or a fast recurrent sequence" + (f" ({below})" if below else "")
                )
            if isinstance(source, FastRecurrent) and not source.return_sequences:
                raise Unsupported(f"{layer.name!r} reads {source.name!r}, which returns no sequence")
            return FastRecurrent(layer, node, source)
        return None

    def describe(self, tensor: keras.KerasTensor) -> tuple[ForwardPass, list[keras.KerasTensor]]:
        """The `ForwardPass` of one tensor, and the fast recurrent tensors it needs."""
        fast = self.fast(tensor)
        if fast is not None:
            return ForwardPass(FAST, _describe_fast(fast)), [tensor] if isinstance(
                fast, FastRecurrent
            ) else []
        keras_layers: list[str] = []
        cuts: list[keras.KerasTensor] = []
        reasons: list[str] = []
        seen: set[int] = set()
        stack = [tensor]
        while stack:
            current = stack.pop()
            if id(current) in seen:
                continue
            seen.add(id(current))
            layer, node = keras_graph.producer(current)
            if layer is None:
                continue
            if isinstance(layer, keras.layers.InputLayer):
                if not is_numeric_ids(current):
                    reasons.append(f"input {current.name!r} is not fixed-length token ids ({current.dtype})")
                continue
            if current is not tensor and isinstance(self.fast(current), FastRecurrent):
                cuts.append(current)
                continue
            self.fast(current)
            if id(current) in self.reasons:
                reasons.append(self.reasons[id(current)])
            if isinstance(layer, keras.layers.Layer):
                keras_layers.append(layer.name)
            stack.extend(keras_graph.node_inputs(node))
        reasons = list(dict.fromkeys(reasons))
        if cuts:
            names = sorted({keras_graph.producing_call(t)[0].name for t in cuts})
            text = f"Keras layers {sorted(set(keras_layers))} on fast-path outputs of {names}"
            return ForwardPass(HYBRID, text + "".join(f"; {reason}" for reason in reasons)), cuts
        layer = keras_graph.producing_call(tensor)[0]
        text = "; ".join(reasons) or (
            f"{type(layer).__name__} {layer.name!r} reads no Embedding -> LSTM/GRU/SimpleRNN chain"
        )
        return ForwardPass(KERAS, text), []


def _describe_fast(fast: FastLayer) -> str:
    if isinstance(fast, FastEmbedding):
        return f"embedding {fast.name!r}: table lookup"
    modes = {
        MASKED: "masked steps skipped",
        PREFIX: "padding it reads first skipped",
        FULL: "every step run (padding read last)",
    }
    directions = "; ".join(
        f"{'backward' if d.reverse else 'forward'} {d.cell}: {modes[d.mode]}"
        + (", inputs folded into the embedding table" if d.projection is not None else "")
        for d in fast.directions
    )
    return f"{type(fast.layer).__name__} {fast.name!r}: {directions}"


def describe_forward_passes(tensors: Mapping[str, keras.KerasTensor]) -> dict[str, ForwardPass]:
    """{key: ForwardPass} for output tensors {key: KerasTensor}, from the layers alone (no check)."""
    analysis = Analysis()
    return {key: analysis.describe(tensor)[0] for key, tensor in tensors.items()}
