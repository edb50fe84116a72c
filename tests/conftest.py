"""Every shared test fixture: tiny models trained with real Keras, and the bundles made from them.

Test files define only the fixtures of their own scenario; helpers that are
plain functions live in `pipeline_fixtures.py`.
"""

import functools
import os

import pytest
from sizes import LENGTHS, SIZES

# Keras, Beam and the fixtures that need them are imported by the fixtures that use
# them, so that tests of pure code (the tokenizer, the corpus parsers) start at once.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# The test files that take longest, first: pytest-xdist hands whole files to its workers in
# collection order (`--dist loadfile --no-loadscope-reorder` in pytest.ini), and a long file
# taken last would end the run on one worker while the others wait.
LONGEST_FILES_FIRST = (
    "test_resume.py",
    "test_portable_runner.py",
    "test_object_storage.py",
    "test_fast_path.py",
    "test_commit.py",
    "test_output_faults.py",
    "test_real_tokens.py",
    "test_reuse.py",
    "test_scale.py",
    "test_output_safety.py",
    "test_byo_model.py",
    "test_nothing_lost.py",
    "test_pipeline_export.py",
    "test_start.py",
)

TINY_EXAMPLES = 32
TINY_BATCH = 8


@functools.cache
def _train_tiny_model(topology, seed=0):
    """Builds, compiles and fits `topology` at SIZES on random ids for 4 steps.

    Cached: tests share each trained model and must not train or alter it further.

    Returns:
        `(model, inputs)`: the trained model and the input it was trained on (a dict
        keyed by input name, or the `content` array for the one-input topology).
    """
    import keras
    import numpy as np
    from pipeline_fixtures import fit_on_random_labels

    from models import architectures

    keras.utils.set_random_seed(seed)
    model = architectures.compile_model(architectures.build_model(topology, **SIZES))
    rng = np.random.default_rng(seed)
    vocabulary = SIZES["vocabulary_size"]
    inputs = {"content": rng.integers(0, vocabulary, (TINY_EXAMPLES, LENGTHS["content"]), dtype=np.int32)}
    if topology != "single_input":
        inputs["title"] = rng.integers(0, vocabulary, (TINY_EXAMPLES, LENGTHS["title"]), dtype=np.int32)
    fit_on_random_labels(model, topology, inputs, rng, SIZES["num_title_classes"], TINY_BATCH)
    return model, inputs["content"] if topology == "single_input" else inputs


@pytest.fixture(scope="session")
def train_tiny_model():
    """The cached `_train_tiny_model(topology, seed=0)` factory."""
    return _train_tiny_model


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    """A trained tiny `two_inputs_two_outputs` bundle: `(directory, model, inputs)`.

    Shared by the session: tests that alter the bundle copy the directory first.
    """
    from models.bundle import save_bundle
    from models.tokenizer import Tokenizer

    model, inputs = _train_tiny_model("two_inputs_two_outputs")
    directory = str(tmp_path_factory.mktemp("tiny_bundle"))
    tokenizer = Tokenizer([f"word{index}" for index in range(SIZES["vocabulary_size"] - 2)])
    save_bundle(
        directory,
        model,
        tokenizer,
        {"content": "content", "title": "title"},
        labels={"out_content": {"field": "kind", "classes": ["a", "b"]}},
    )
    return directory, model, inputs


@pytest.fixture(scope="session")
def shared_bundle(tmp_path_factory):
    """`shared_bundle(topology)`: a bundle of `topology` trained once per session on `sample_documents()`.

    Shared by the session: tests that alter a bundle copy its directory first.
    """
    from pipeline_fixtures import sample_documents, train_bundle

    bundles = {}

    def get(topology):
        if topology not in bundles:
            directory = tmp_path_factory.mktemp(f"bundle_{topology}")
            bundles[topology] = train_bundle(directory, topology, sample_documents())
        return bundles[topology]

    return get


def pytest_collection_modifyitems(items):
    """Orders the test files longest first (`LONGEST_FILES_FIRST`); the order within a file stays."""
    rank = {name: index for index, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
