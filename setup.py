"""Packaging for the embedding-export pipeline (also what Dataflow workers install via --setup_file)."""

import pathlib
import re

import setuptools

# The version is written once, in models/__init__.py; read as text, since importing
# the package here would need its dependencies installed before they are.
_INIT = (pathlib.Path(__file__).parent / "models" / "__init__.py").read_text(encoding="utf-8")
VERSION = re.search(r'^__version__ = "([^"]+)"$', _INIT, re.MULTILINE).group(1)

setuptools.setup(
    name="embexport",
    version=VERSION,
    description="Export intermediate-layer vectors of Keras text models to Parquet with Apache Beam.",
    packages=setuptools.find_packages(include=["models", "models.*", "pipeline", "pipeline.*"]),
    # The sample corpus and the trained default bundle travel with the package so
    # `python -m pipeline.run` works anywhere it is installed, Dataflow workers included.
    package_data={"models": ["data/*.jsonl", "data/default_bundle/*"]},
    include_package_data=True,
    python_requires=">=3.10,<3.13",
    install_requires=[
        # Keras 3 on the TensorFlow backend; 2.21 is the version the bundle was trained with.
        # Keras to the tested minor: models/keras_graph.py adapts to its private graph API.
        "tensorflow>=2.21,<2.22",
        "keras>=3.15,<3.16",
        # [gcp] brings the GCS filesystem and the Dataflow runner.
        "apache-beam[gcp]>=2.77,<2.78",
        # Arrow writes the Parquet output; 25 is the major tested (Beam 2.77 caps it below 26).
        "pyarrow>=25,<26",
        "numpy>=1.26,<3",
        # The live progress bar of local runs; Keras 3 already depends on it.
        "rich>=13,<16",
    ],
    extras_require={
        # `python -m pipeline.analyze plot` draws with matplotlib.
        "analysis": ["matplotlib>=3.8,<4"],
        # s3:// for --model, --input and --output: Beam's S3 filesystem runs on boto3.
        "aws": ["apache-beam[aws]>=2.77,<2.78"],
        # `python -m pipeline.analyze OUT index`: usearch's HNSW index (manylinux wheels,
        # numpy its only heavy dependency, save/load of one file, batched adds).
        "index": ["usearch>=2.16,<3"],
        "test": [
            "pytest>=8,<10",
            # pytest.ini runs the suite on the machine's cores (at most 4), one test file per worker.
            "pytest-xdist>=3.6,<4",
            "duckdb>=1.1,<3",
            "pandas>=2.2,<4",
            # Builds Keras 2 (.h5) models exactly as the tutorial wrote them.
            "tf_keras>=2.21,<2.22",
            # The lint and type check .ci/run runs before the tests, pinned so they agree everywhere.
            "ruff==0.17.6",
            "mypy==2.4.1",
            # The analysis tests draw a plot and run docs/analysis.md's polars example.
            "matplotlib>=3.8,<4",
            "polars>=1.0,<3",
            # The index tests build and query a real usearch index.
            "usearch>=2.16,<3",
            # The object-storage test: Beam's S3 filesystem against moto's S3 server on
            # loopback.  moto[s3] plus Flask is that server; moto[server] would pull in
            # every AWS service's dependencies (cfn-lint, docker, ...).
            "apache-beam[aws]>=2.77,<2.78",
            "moto[s3]>=5,<6",
            "flask!=2.2.0,!=2.2.1,<4",
            "flask-cors<7",
        ],
    },
)
