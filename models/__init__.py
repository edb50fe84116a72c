"""Keras models, tokenizer, bundle format and sub-model truncation (no Beam here)."""

import importlib.abc
import importlib.machinery
import sys
import types
from collections.abc import Sequence

# The one place the version is written (setup.py reads it from here).
__version__ = "0.1.0"


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
