"""Beam pipeline that exports intermediate-layer vectors of Keras text models to Parquet."""

import models  # noqa: F401  Before anything imports Keras: keeps matplotlib out of it (see models/__init__.py).
