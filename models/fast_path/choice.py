"""Whether a sub-model gets a fast path: `build_fast_path` and its typed result."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import keras

from models.fast_path.analysis import ForwardPass
from models.fast_path.cells import Unsupported
from models.fast_path.loops import FastPath


@dataclasses.dataclass(frozen=True)
class FastPathChoice:
    """The fast path of a sub-model, or why there is none.

    `fast_path` is None when no output column qualifies, and `reason` then says
    why; otherwise `forward_passes` says, per column, which forward pass
    computes it and why (as `fast_path.forward_passes`).
    """

    fast_path: FastPath | None
    reason: str = ""
    forward_passes: Mapping[str, ForwardPass] = dataclasses.field(default_factory=dict)


def build_fast_path(sub_model: keras.Model) -> FastPathChoice:
    """The `FastPath` of `sub_model` and each column's `ForwardPass`, or why nothing qualifies."""
    try:
        fast = FastPath(sub_model)
    except Unsupported as reason:
        return FastPathChoice(None, str(reason))
    return FastPathChoice(fast, forward_passes=fast.forward_passes)
