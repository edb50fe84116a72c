"""Where the bundled data lives; importable without loading Keras (for fast `--help`)."""

import os

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
DEFAULT_BUNDLE = os.path.join(DATA_DIR, "default_bundle")
SAMPLE_CORPUS = os.path.join(DATA_DIR, "sample_corpus.jsonl")
