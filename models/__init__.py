"""Keras models, tokenizer, bundle format and sub-model truncation (no Beam here)."""

import importlib.abc
import importlib.machinery
import json
import logging
import os
import sys
import types
from collections.abc import Sequence

# The one place the version is written (setup.py reads it from here).
__version__ = "0.1.0"

# The backend everything here computes with: the fast path, the tokenizer's tensors and
# the Keras oracle it is checked against are TensorFlow code.
BACKEND = "tensorflow"


def _chosen_backend() -> tuple[str, str] | None:
    """The backend the user chose (environment, else keras.json) and where, when it is not ours."""
    chosen = os.environ.get("KERAS_BACKEND")
    if chosen:
        return (chosen, "KERAS_BACKEND") if chosen != BACKEND else None
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    path = os.path.join(home, "keras.json")
    try:
        with open(path, encoding="utf-8") as handle:
            configured = json.load(handle).get("backend")
    except (OSError, ValueError, AttributeError):  # Keras itself ignores an unreadable keras.json.
        return None
    return (str(configured), path) if configured and configured != BACKEND else None


def pin_backend() -> None:
    """Makes Keras use TensorFlow in this process and the ones it starts, whatever the user chose.

    Keras reads `KERAS_BACKEND` (which overrides keras.json) when it is first
    imported; another backend would fail to import (jax not installed) or load
    the model under a backend the fast path does not compute with.  A choice of
    another one is said once, as a warning, since it changes what the user asked for.
    """
    chosen = _chosen_backend()
    os.environ["KERAS_BACKEND"] = BACKEND
    if chosen and "keras" not in sys.modules:
        logging.getLogger(__name__).warning(
            "Keras backend %r (from %s) is ignored: this tool runs Keras on TensorFlow.", *chosen
        )


pin_backend()

# Where Keras is sent to look for its config file when the user has none: a path below a device,
# which no one can create, so Keras reads its defaults (as it would from no file) and writes nothing.
NO_KERAS_HOME = os.path.join(os.devnull, "keras")


def _keras_config_path() -> str:
    """The config file Keras 3 reads (`keras/src/backend/config.py`): in $KERAS_HOME, else in ~/.keras,
    else, where the home directory is not writable, in /tmp/.keras."""
    home = os.environ.get("KERAS_HOME")
    if not home:
        base = os.path.expanduser("~")
        home = os.path.join(base if os.access(base, os.W_OK) else "/tmp", ".keras")
    return os.path.join(os.path.expanduser(home), "keras.json")


def keep_keras_from_writing_its_config() -> None:
    """Keeps Keras from writing `~/.keras/keras.json` (or /tmp's) as it is first imported.

    Keras 3 saves a config file of its defaults wherever none is found: every command
    here, a refused one too, left `~/.keras/` in the user's home, where a run writes
    nothing outside its output (docs/nothing_lost.md). A config file that is there is
    read as before; without one, Keras is pointed at `NO_KERAS_HOME`, which it can
    neither read nor create, so it runs on the defaults it would have written, in this
    process and the worker processes it starts.
    """
    if "keras" in sys.modules or os.path.exists(_keras_config_path()):
        return
    os.environ["KERAS_HOME"] = NO_KERAS_HOME


keep_keras_from_writing_its_config()


class _NoMatplotlibForKeras(importlib.abc.MetaPathFinder):
    """Keeps matplotlib out of Keras's plotting helpers, which `import keras` loads when it is installed.

    Nothing here plots through Keras, and importing pyplot costs every process
    of an export (the launcher and each worker) its import time and, with no
    font cache yet (a fresh container), the building of one.  Only imports made
    from `keras.src.visualization` are refused, which Keras takes as matplotlib
    missing; `pipeline.analyze` imports matplotlib itself, as usual.
    """

    def find_spec(
        self,
        name: str,
        path: Sequence[str] | None = None,
        target: types.ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if name != "matplotlib" and not name.startswith("matplotlib."):
            return None
        frame: types.FrameType | None = sys._getframe(1)
        while frame is not None:
            if frame.f_globals.get("__name__", "").startswith("keras.src.visualization"):
                raise ImportError(
                    f"{name} is not loaded for Keras's plotting helpers (see models/__init__.py)"
                )
            frame = frame.f_back
        return None


if not any(type(finder).__name__ == _NoMatplotlibForKeras.__name__ for finder in sys.meta_path):
    sys.meta_path.insert(0, _NoMatplotlibForKeras())
