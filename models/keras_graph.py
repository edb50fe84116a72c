"""The one adapter to Keras 3's private functional-graph API (tensor history, nodes, call arguments).

Keras has no public API for walking a functional model's graph: which layer
call produced a tensor, which tensors a call read, with which arguments.
Truncation, the fast path, the plan and the token tables all need it, so they
use these functions and nothing else; `tests/test_keras_graph.py` pins what
they rely on and fails loudly when a Keras upgrade changes it.
"""

from __future__ import annotations

import typing

import keras

if typing.TYPE_CHECKING:
    # Keras's private graph classes: this module is where the rest of the code meets them.
    from keras.src.ops.node import Node
    from keras.src.ops.operation import Operation


def producer(tensor: keras.KerasTensor) -> tuple[Operation, Node] | tuple[None, None]:
    """`(operation, node)` of the call that produced `tensor`; `(None, None)` for a non-Keras tensor."""
    history = getattr(tensor, "_keras_history", None)
    if history is None:
        return None, None
    operation = history.operation
    return operation, operation._inbound_nodes[history.node_index]


def producing_call(tensor: keras.KerasTensor) -> tuple[Operation, Node]:
    """`(operation, node)` of the call that produced `tensor`, a tensor of a functional model.

    Raises:
        ValueError: `tensor` was not produced by a Keras operation (so it belongs to no model graph).
    """
    operation, node = producer(tensor)
    if operation is None or node is None:
        raise ValueError(f"{tensor!r} was not produced by a Keras layer call.")
    return operation, node


def node_inputs(node: Node) -> list[keras.KerasTensor]:
    """The tensors a layer call read, in argument order."""
    return list(node.input_tensors)


def node_outputs(node: Node) -> list[keras.KerasTensor]:
    """The tensors a layer call produced."""
    return list(node.output_tensors)


def call_args(node: Node) -> list[typing.Any]:
    """The positional arguments of a layer call."""
    return list(node.arguments.args)


def call_kwargs(node: Node) -> dict[str, typing.Any]:
    """The keyword arguments of a layer call (e.g. `mask`, `training`)."""
    return dict(node.arguments.kwargs)


def call_arguments(
    node: Node, values: dict[int, typing.Any]
) -> tuple[tuple[typing.Any, ...], dict[str, typing.Any]]:
    """`(args, kwargs)` of a layer call with its input tensors replaced by `values` (id(tensor) -> value)."""
    return node.arguments.fill_in(values)


def takes_training(operation: Operation) -> bool:
    """Whether the layer's `call` accepts a `training` argument."""
    return bool(getattr(operation, "_call_has_training_arg", False))


def tensor_mask(tensor: keras.KerasTensor) -> keras.KerasTensor | None:
    """The Keras mask that travels with a tensor (symbolic, or one a layer computed), or None."""
    from keras.src import backend

    return backend.get_keras_mask(tensor)


def set_tensor_mask(tensor: typing.Any, mask: typing.Any) -> None:
    """Gives a tensor (symbolic, or one a layer computed) the Keras mask `mask` (None: no mask)."""
    from keras.src import backend

    backend.set_keras_mask(tensor, mask)


def same_computation(first: typing.Any, second: typing.Any) -> bool:
    """Whether two symbolic tensors are one, or one stateless operation's output on the same arguments.

    A model loaded from a `.keras` file passes each layer the mask Keras computed when
    the model was built (`not_equal(ids, 0)`) as an operation of the saved graph, a
    tensor other than the mask that travels with the layer's input, which the
    Embedding computed by the same operation from the same ids.
    """
    if first is second:
        return True
    if not isinstance(first, keras.KerasTensor) or not isinstance(second, keras.KerasTensor):
        return False
    (operation, node), (other, other_node) = producer(first), producer(second)
    if operation is None or other is None or node is None or other_node is None:
        return False
    # A layer may hold weights or state; only plain operations (not_equal, cast) are compared.
    if isinstance(operation, keras.layers.Layer) or type(operation) is not type(other):
        return False
    if _output_index(node, first) != _output_index(other_node, second):
        return False
    args, other_args = call_args(node), call_args(other_node)
    kwargs, other_kwargs = call_kwargs(node), call_kwargs(other_node)
    return (
        len(args) == len(other_args)
        and kwargs.keys() == other_kwargs.keys()
        and all(_same_argument(a, b) for a, b in zip(args, other_args, strict=True))
        and all(_same_argument(kwargs[key], other_kwargs[key]) for key in kwargs)
        and _operation_config(operation) == _operation_config(other)
    )


def _output_index(node: Node, tensor: keras.KerasTensor) -> int:
    # By identity: `==` on symbolic tensors builds an operation instead of comparing them.
    return next(index for index, output in enumerate(node_outputs(node)) if output is tensor)


def _same_argument(first: typing.Any, second: typing.Any) -> bool:
    """Whether two call arguments are the same: the same tensor, or equal plain values."""
    if isinstance(first, keras.KerasTensor) or isinstance(second, keras.KerasTensor):
        return first is second
    try:
        return type(first) is type(second) and bool(first == second)
    except (TypeError, ValueError):  # an array of several values: no single truth value
        return False


def _operation_config(operation: Operation) -> typing.Any:
    """An operation's config without its name, or None where it has none to give."""
    try:
        config = dict(operation.get_config())
    except NotImplementedError:
        return None
    config.pop("name", None)  # `not_equal_1` beside `not_equal` computes the same
    return config


def model_nodes(model: keras.Model, layer: keras.layers.Layer) -> list[Node]:
    """The calls of `layer` that belong to `model`'s own graph, in call order.

    A layer shared with another model built in the same process keeps the
    other model's calls in `_inbound_nodes` too; Keras's functional model keys
    its own nodes as `f"{id(layer)}_ib-{index}"` in `model._nodes`.
    """
    # A Sequential model keeps its graph in a functional model of its own; its layers also
    # keep the nodes of the builds before it, which are no calls of the model.
    own = getattr(model, "_nodes", None)
    if own is None:
        own = getattr(getattr(model, "_functional", None), "_nodes", None)
    return [
        node
        for index, node in enumerate(layer._inbound_nodes)
        if own is None or f"{id(layer)}_ib-{index}" in own
    ]


def layer_nodes(layer: keras.layers.Layer) -> list[Node]:
    """Every call of `layer`, whichever model it belongs to."""
    return list(layer._inbound_nodes)


def is_input(tensor: keras.KerasTensor) -> bool:
    """Whether `tensor` is a model input (produced by an `InputLayer`)."""
    return isinstance(producer(tensor)[0], keras.layers.InputLayer)


def through_casts(tensor: keras.KerasTensor) -> keras.KerasTensor:
    """The tensor that `tensor` is a dtype cast of, through any number of `ops.cast`; else `tensor`."""
    while True:
        operation, node = producer(tensor)
        if operation is None or node is None or type(operation).__name__ != "Cast":
            return tensor
        tensor = node_inputs(node)[0]


def input_dependencies(model: keras.Model, tensor: keras.KerasTensor) -> list[str]:
    """Names of `model`'s inputs that `tensor` is computed from, in model order."""
    input_ids = {id(t): t.name for t in model.inputs}
    found: set[int] = set()
    seen: set[int] = set()
    stack = [tensor]
    while stack:
        current = stack.pop()
        if id(current) in input_ids:
            found.add(id(current))
            continue
        _, node = producer(current)
        if node is None:
            continue
        for parent in node_inputs(node):
            if id(parent) not in seen:
                seen.add(id(parent))
                stack.append(parent)
    return [t.name for t in model.inputs if id(t) in found]


def upstream_operations(tensor: keras.KerasTensor) -> list[Operation]:
    """The operations (layers) whose calls `tensor` is computed through, itself's first."""
    operations: dict[int, Operation] = {}
    seen: set[int] = set()
    stack = [tensor]
    while stack:
        operation, node = producer(stack.pop())
        if node is None:
            continue
        operations.setdefault(id(operation), operation)
        for parent in node_inputs(node):
            if id(parent) not in seen:
                seen.add(id(parent))
                stack.append(parent)
    return list(operations.values())
