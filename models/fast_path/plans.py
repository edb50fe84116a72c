"""Reading plans: a batch's rows dealt into lanes, how a lane runs one direction, where each output lands."""

from __future__ import annotations

import typing
from collections.abc import Mapping, Sequence

import numpy as np

if typing.TYPE_CHECKING:
    from models.fast_path.cells import Direction, FastRecurrent

# How a recurrent direction treats the padding it reads (see the package docstring).
MASKED = "masked"  # only real tokens run, from the zero state
PREFIX = "prefix"  # leading padding skipped from precomputed states
FULL = "full"  # every step runs

# A reading plan's arrays by name: order, starts, active, reading, ids, flat, every_id.
ReadingPlan = dict[str, np.ndarray]


class Lane(typing.TypedDict):
    """The numpy side of one lane (`FastPath._plans`); the same arrays as tensors in the traced function."""

    plans: dict[str, ReadingPlan]  # plan_key -> the plan's arrays (plus "inverse": the sorted order undone)
    maps: dict[str, np.ndarray]  # per-token outputs: where each (row, position) output lives
    buckets: dict[str, dict[str, np.ndarray]]  # a Bucketed group's plan keys joined -> `bucket_arrays`


class Restore(typing.TypedDict):
    """Puts lanes' outputs back in batch order: rows, and per model input its real tokens."""

    rows: np.ndarray
    tokens: dict[str, np.ndarray]


# What the traced function of a batch takes: its ids by model input, its lanes, and `Restore`.
TracedArguments = tuple[Mapping[str, np.ndarray], Sequence[Lane], Restore]


def plan_key(recurrent: FastRecurrent, direction: Direction) -> str:
    """The key of a direction's reading plan: directions that read the same input the same way share it."""
    return f"{recurrent.input_name}|{int(direction.reverse)}|{direction.mode}"


def reading_plan(ids: np.ndarray, reverse: bool, mode: str) -> ReadingPlan:
    """How one lane's rows run one direction: sorted order, active counts, and step inputs.

    Rows are sorted by the step at which they start, so the rows that have started
    form a prefix; `reading` holds, for each sorted row and step, the position
    read in reading order, `ids` the id read there and `flat` where that is in
    the lane's (row, position) values flattened (valid where the row is active).
    """
    n, length = ids.shape
    read = ids[:, ::-1] if reverse else ids
    real = read != 0
    positions = np.broadcast_to(np.arange(length), (n, length))
    if mode == MASKED:
        starts = length - real.sum(axis=1)
        real_first = np.argsort(~real, axis=1, kind="stable")
        shift = np.arange(length)[None, :] - starts[:, None]
        positions = np.take_along_axis(real_first, np.clip(shift, 0, length - 1), axis=1)
    elif mode == PREFIX:
        starts = np.where(real.any(axis=1), real.argmax(axis=1), length)
    else:
        starts = np.zeros(n, dtype=np.int64)
    order = np.argsort(starts, kind="stable")
    starts = starts[order]
    # At least one step, so that every loop writes an output (of no rows if all are padding).
    first = min(int(starts[0]), length - 1)
    active = np.searchsorted(starts, np.arange(first, length), side="right")
    reading = positions[order, first:]
    original = length - 1 - reading if reverse else reading
    rows = order[:, None]
    every = positions[order]
    return {
        "every_id": ids[rows, length - 1 - every if reverse else every].astype(np.int32),
        "order": order,
        "starts": starts,
        "active": active,
        "reading": reading,
        "ids": ids[rows, original].astype(np.int32),
        "flat": (rows * length + original).astype(np.int32),
    }


def index_map(plan: ReadingPlan, length: int, reverse: bool, mode: str, zero_fill: bool) -> np.ndarray:
    """Where each (row, position) output lives in [outputs written per step; padding outputs; zero].

    Rows and positions are the lane's own (unsorted, original order).
    """
    active, reading, order = plan["active"], plan["reading"], plan["order"]
    n = len(order)
    offsets = np.concatenate([[0], np.cumsum(active)[:-1]])
    written = int(active.sum())
    zero_row = written + length
    by_reading = np.full((n, length), -1, dtype=np.int64)
    rows, steps = np.nonzero(np.arange(n)[:, None] < active[None, :])
    by_reading[rows, reading[rows, steps]] = offsets[steps] + rows
    missing = by_reading < 0
    if mode == PREFIX:
        by_reading = np.where(missing, written + np.arange(length)[None, :], by_reading)
    elif mode == MASKED and zero_fill:
        by_reading = np.where(missing, zero_row, by_reading)
    elif mode == MASKED:
        # A masked step repeats the last output (zeros before the first real token).
        last = np.maximum.accumulate(np.where(missing, -1, np.arange(length)[None, :]), axis=1)
        carried = np.take_along_axis(by_reading, np.maximum(last, 0), axis=1)
        by_reading = np.where(missing, np.where(last >= 0, carried, zero_row), by_reading)
    by_position = by_reading[:, ::-1] if reverse else by_reading
    index = np.empty_like(by_position)
    index[order] = by_position
    return index.astype(np.int32)


def deal_lanes(
    features: Mapping[str, np.ndarray], recurrents: Sequence[FastRecurrent], count: int
) -> list[np.ndarray]:
    """Rows of each lane: runs of similar length, each lane about the same number of tokens.

    A lane's loop runs as many steps as its longest row needs, so grouping
    long rows together saves the steps where a lane would compute a few rows.
    """
    n = len(next(iter(features.values())))
    if count == 1:
        return [np.arange(n)]
    names = sorted({recurrent.input_name for recurrent in recurrents})
    tokens = sum(np.count_nonzero(features[name], axis=1) for name in names) + 1
    order = np.argsort(tokens, kind="stable")
    total = np.cumsum(tokens[order])
    cuts = np.searchsorted(total, total[-1] * np.arange(1, count) / count, side="right")
    cuts = np.unique(np.clip(cuts, 1, n - 1))
    return [np.sort(lane) for lane in np.split(order, cuts)]
