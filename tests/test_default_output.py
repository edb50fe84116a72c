"""Tests for the --output a run picks itself: new for every run, even two started in the same second."""

import datetime
import os

from pipeline.planning import options as options_lib


class _FrozenClock(datetime.datetime):
    @classmethod
    def now(cls, tz=None):
        return cls(2026, 12, 7, 3, 24, 7)


def test_runs_started_in_the_same_second_pick_different_absolute_outputs(monkeypatch):
    monkeypatch.setattr(options_lib.datetime, "datetime", _FrozenClock)
    picked = {options_lib.default_output() for _ in range(50)}
    assert len(picked) == 50
    prefix = os.path.join(os.getcwd(), "output", "embeddings-20261207-032407-")
    assert all(path.startswith(prefix) and os.path.isabs(path) for path in picked)
