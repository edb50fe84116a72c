"""Beam pipeline that exports intermediate-layer vectors of Keras text models to Parquet."""

import importlib.util
import os
import sys


def _refuse_a_foreign_models_package() -> None:
    """Stops in one line when `import models` would load another project's `models` package.

    A folder without __init__.py in its place is no package: embexport's own is imported.

    `python -m` puts the working directory first on `sys.path`, so a project with
    its own `models/` (the usual layout) shadows ours, which sits beside this
    package, and the run would die on an ImportError traceback.
    """
    ours = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models")
    spec = importlib.util.find_spec("models")
    found = list(spec.submodule_search_locations or []) if spec else []
    if any(os.path.realpath(path) == os.path.realpath(ours) for path in found[:1]):
        return
    if spec is not None and spec.origin is None and "models" not in sys.modules:
        # A folder without __init__.py (a project's folder of model files, `models/encoder.keras`)
        # is no package, but Python's path finder takes it for a namespace package and returns it
        # before an editable install's finder (last on sys.meta_path) is asked for ours.
        _import_ours(ours)
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


def _import_ours(ours: str) -> None:
    """Imports embexport's `models` package from `ours`, its folder, whatever else is on the path."""
    spec = importlib.util.spec_from_file_location(
        "models", os.path.join(ours, "__init__.py"), submodule_search_locations=[ours]
    )
    assert spec is not None and spec.loader is not None  # a file location always has both
    module = importlib.util.module_from_spec(spec)
    sys.modules["models"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["models"]
        raise


def _refuse_stripped_docstrings() -> None:
    """Stops in one line under `python -OO` or PYTHONOPTIMIZE=2, where Apache Beam cannot be imported.

    Beam's `textio` builds its docstrings from pandas' while it is imported: with docstrings
    stripped, every command died on an AttributeError traceback ('NoneType' ... 'split').
    """
    if sys.flags.optimize < 2:
        return
    from_environment = os.environ.get("PYTHONOPTIMIZE")
    how = "unset PYTHONOPTIMIZE (or set it to 1)" if from_environment else "run python without -OO"
    sys.stderr.write(
        "error: Python runs with its docstrings stripped (PYTHONOPTIMIZE=2 or python -OO), and Apache Beam "
        f"cannot be imported so (it reads pandas' docstrings as it loads); {how} and run the command again.\n"
    )
    sys.stderr.flush()
    raise SystemExit(2)


_refuse_stripped_docstrings()
_refuse_a_foreign_models_package()

import models  # noqa: E402, F401  Before anything imports Keras: pins its backend, keeps matplotlib out.
