"""Beam pipeline that exports intermediate-layer vectors of Keras text models to Parquet."""

import importlib.util
import os
import sys


def _refuse_a_foreign_models_package() -> None:
    """Stops in one line when `import models` would load another project's `models` package.

    `python -m` puts the working directory first on `sys.path`, so a project with
    its own `models/` (the usual layout) shadows ours, which sits beside this
    package, and the run would die on an ImportError traceback.
    """
    ours = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models")
    spec = importlib.util.find_spec("models")
    found = list(spec.submodule_search_locations or []) if spec else []
    if any(os.path.realpath(path) == os.path.realpath(ours) for path in found[:1]):
        return
    where = found[0] if found else (spec.origin if spec else "nowhere")
    sys.stderr.write(
        f"error: Python imports the package 'models' from {where}, not embexport's ({ours}): the "
        "current directory (first on Python's path with `python -m`) or PYTHONPATH holds another "
        "'models' package. Run the command from another directory, or rename that package (or take "
        "its folder off PYTHONPATH).\n"
    )
    sys.stderr.flush()
    raise SystemExit(2)


_refuse_a_foreign_models_package()

import models  # noqa: E402, F401  Before anything imports Keras: pins its backend, keeps matplotlib out.
