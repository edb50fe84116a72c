"""Directions that return only their final state, run in XLA-compiled loops over buckets of rows."""

from __future__ import annotations

import typing
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from models.fast_path.plans import PREFIX, ReadingPlan

if typing.TYPE_CHECKING:
    from models.fast_path.cells import Direction, FastRecurrent

# Directions returning only their final state run in XLA-compiled loops over buckets of this many
# rows of similar length (fixed shapes: one compilation per model).
BUCKET_ROWS = 16


class Bucketed:
    """Directions returning only their final state, run in XLA-compiled loops over buckets of rows.

    A bucket is `BUCKET_ROWS` rows of similar length (the lane's sorted rows,
    cut in runs), so each compiled loop has fixed shapes and runs from the
    bucket's earliest start to the end; a row's state stays as it is until its
    own start step (`tf.where`), so a row's result does not depend on the other
    rows of its bucket.  Both directions of a masked Bidirectional have the same
    sorted rows, so they share one loop.
    """

    directions: Sequence[Direction]
    units: int
    # The XLA-compiled `_run`.
    run: typing.Callable[[tf.Tensor, tf.Tensor], tf.Tensor]

    def __init__(self, directions: Sequence[Direction]) -> None:
        self.directions = directions
        self.units = directions[0].units
        self.run = tf.function(self._run, jit_compile=True, autograph=False)

    def _run(self, ids: tf.Tensor, starts: tf.Tensor) -> tf.Tensor:
        """ids (directions, rows, length), starts (directions, rows) -> final h (directions, rows, units)."""
        states = []
        for index, direction in enumerate(self.directions):
            if direction.mode == PREFIX:
                states.append(
                    (tf.gather(direction.pad_h, starts[index]), tf.gather(direction.pad_c, starts[index]))
                )
            else:
                rows = tf.shape(ids)[1]
                states.append((tf.zeros((rows, direction.units)), tf.zeros((rows, direction.carry_width()))))
        length = tf.shape(ids)[2]

        def body(
            step: tf.Tensor, states: list[tuple[tf.Tensor, tf.Tensor]]
        ) -> tuple[tf.Tensor, list[tuple[tf.Tensor, tf.Tensor]]]:
            moved = []
            for index, (direction, (h, c)) in enumerate(zip(self.directions, states, strict=True)):
                h_new, c_new = direction.step(tf.gather(direction.projection, ids[index, :, step]), h, c)
                running = (starts[index] <= step)[:, None]
                moved.append((tf.where(running, h_new, h), tf.where(running, c_new, c)))
            return step + 1, moved

        _, states = tf.while_loop(lambda step, _: step < length, body, (tf.reduce_min(starts), states))
        return tf.stack([h for h, _ in states])


def bucketed_groups(recurrent: FastRecurrent) -> list[Bucketed]:
    """The `Bucketed` groups of a layer, or [] if it runs as plain loops."""
    directions = recurrent.directions
    if recurrent.return_sequences or any(d.projection is None for d in directions):
        return []
    if len(directions) == 2 and directions[0].mode == directions[1].mode and directions[0].mode != PREFIX:
        return [Bucketed(directions)]
    return [Bucketed([direction]) for direction in directions]


def bucket_arrays(plans: Sequence[ReadingPlan], length: int) -> dict[str, np.ndarray]:
    """Bucket arrays of a `Bucketed` group: ids (buckets, directions, rows, length), starts (.., rows).

    Rows are in the plans' (shared) sorted order; the last bucket is filled with
    rows that never start.
    """
    count = len(plans[0]["order"])
    fill = (-count) % BUCKET_ROWS
    ids = np.stack([np.pad(plan["every_id"], ((0, fill), (0, 0))) for plan in plans])
    starts = np.stack([np.pad(plan["starts"], (0, fill), constant_values=length) for plan in plans])
    width = len(plans)
    ids = ids.reshape(width, -1, BUCKET_ROWS, length).transpose(1, 0, 2, 3)
    starts = starts.reshape(width, -1, BUCKET_ROWS).transpose(1, 0, 2)
    return {"ids": ids.astype(np.int32), "starts": starts.astype(np.int32)}
