"""Packaging for the embedding-export pipeline (also what Dataflow workers install via --setup_file)."""

import setuptools

setuptools.setup(
    name="embexport",
    version="0.1.0",
    description="Export intermediate-layer vectors of Keras text models to Parquet with Apache Beam.",
    packages=setuptools.find_packages(include=["models", "models.*", "pipeline", "pipeline.*"]),
    # The sample corpus and the trained default bundle travel with the package so
    # `python -m pipeline.run` works anywhere it is installed, Dataflow workers included.
    package_data={"models": ["data/*.jsonl", "data/default_bundle/*"]},
    include_package_data=True,
    python_requires=">=3.10,<3.13",
    install_requires=[
        # Keras 3 on the TensorFlow backend; 2.21 is the version the bundle was trained with.
        "tensorflow>=2.21,<2.22",
        "keras>=3.10,<4",
        # [gcp] brings the GCS filesystem and the Dataflow runner.
        "apache-beam[gcp]>=2.77,<2.78",
        # Arrow writes the Parquet output; Beam 2.77 caps it below 26.
        "pyarrow>=16,<26",
        "numpy>=1.26,<3",
        # The live progress bar of local runs; Keras 3 already depends on it.
        "rich>=13",
    ],
    extras_require={
        # `python -m pipeline.analyze plot` draws with matplotlib.
        "analysis": ["matplotlib>=3.8"],
        # s3:// for --model, --input and --output: Beam's S3 filesystem runs on boto3.
        "aws": ["apache-beam[aws]>=2.77,<2.78"],
        # `python -m pipeline.analyze OUT index`: usearch's HNSW index (manylinux wheels,
        # numpy its only heavy dependency, save/load of one file, batched adds).
        "index": ["usearch>=2.16,<3"],
        "test": [
            "pytest>=8",
            # pytest.ini runs the suite on the machine's cores (at most 4), one test file per worker.
            "pytest-xdist>=3.6,<4",
            "duckdb>=1.1",
            "pandas>=2.2",
            # Builds Keras 2 (.h5) models exactly as the tutorial wrote them.
            "tf_keras>=2.21,<2.22",
            "ruff",
            # The analysis tests draw a plot and run the README's polars example.
            "matplotlib>=3.8",
            "polars>=1.0",
            # The index tests build and query a real usearch index.
            "usearch>=2.16,<3",
            # The object-storage test: Beam's S3 filesystem against moto's S3 server on
            # loopback.  moto[s3] plus Flask is that server; moto[server] would pull in
            # every AWS service's dependencies (cfn-lint, docker, ...).
            "apache-beam[aws]>=2.77,<2.78",
            "moto[s3]>=5,<6",
            "flask!=2.2.0,!=2.2.1",
            "flask-cors",
        ],
    },
)
