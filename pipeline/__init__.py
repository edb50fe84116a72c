"""Beam pipeline that exports intermediate-layer vectors of Keras text models to Parquet."""
