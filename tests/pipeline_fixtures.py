"""Helpers for the export tests: training tiny bundles, small real corpora, and readers of the output.

Plain functions only; the fixtures that share trained models and bundles are in `conftest.py`.
"""

import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import forkserver
import keras
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from sizes import LENGTHS, SIZES

from models import architectures
from models.bundle import load_bundle, save_bundle
from models.tokenizer import Tokenizer
from models.train import SAMPLE_CORPUS
from pipeline.writing.layout import ERRORS_DIR, MANIFEST, STAGING
from pipeline.writing.state import read_manifest

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS_DOCUMENTS = 40
# Records every topology dead-letters: not JSON, no id, content null.
BAD_LINES = (
    '{"id": "broken", "content": ',
    json.dumps({"content": "a record without an id", "title": "no id"}),
    json.dumps({"id": "null-content", "content": None, "title": "content is null"}),
)
# What `models.train` records as each topology's default layers (test_train checks it).
DEFAULT_LAYERS = {
    "single_input": ["lstm_content", "emb"],
    "two_inputs_one_output": ["lstm_content", "lstm_title", "add", "emb"],
    "two_inputs_two_outputs": ["lstm_content", "lstm_title", "emb"],
}


def sample_documents(count=CORPUS_DOCUMENTS, seed=0):
    """`count` records of the bundled sample corpus (CPython docstrings), picked at random."""
    with open(SAMPLE_CORPUS, encoding="utf-8") as handle:
        documents = [json.loads(line) for line in handle if line.strip()]
    return random.Random(seed).sample(documents, count)


def write_jsonl(path, documents, extra_lines=()):
    """Writes `documents` (dicts) and then `extra_lines` (raw strings) as a JSONL file."""
    with open(path, "w", encoding="utf-8") as handle:
        for document in documents:
            handle.write(json.dumps(document, ensure_ascii=False) + "\n")
        for line in extra_lines:
            handle.write(line + "\n")
    return str(path)


def input_fields(topology):
    fields = {"content": "content"}
    if topology != "single_input":
        fields["title"] = "title"
    return fields


def fit_on_random_labels(model, topology, features, rng, num_title_classes, batch_size):
    """Fits `model` (of `topology`) for one epoch on `features` (by input name) with random labels."""
    count = len(features["content"])
    binary = rng.integers(0, 2, (count, 1)).astype("float32")
    if topology == "two_inputs_two_outputs":
        classes = rng.integers(0, num_title_classes, count)
        targets = {
            "out_content": binary,
            "out_title": keras.utils.to_categorical(classes, num_title_classes),
        }
    else:
        targets = binary
    if topology == "single_input":
        features = features["content"]
    model.fit(features, targets, epochs=1, batch_size=batch_size, verbose=0)


def train_bundle(directory, topology, documents, seed=0):
    """Fits a tiny `topology` for one epoch on random labels and saves it as a bundle."""
    keras.utils.set_random_seed(seed)
    tokenizer = Tokenizer.fit((d["content"] + " " + d["title"] for d in documents), SIZES["vocabulary_size"])
    model = architectures.compile_model(architectures.build_model(topology, **SIZES))
    fields = input_fields(topology)
    features = {
        name: tokenizer.encode_batch([d[field] for d in documents], LENGTHS[name])[0]
        for name, field in fields.items()
    }
    fit_on_random_labels(
        model, topology, features, np.random.default_rng(seed), SIZES["num_title_classes"], 8
    )
    save_bundle(
        str(directory),
        model,
        tokenizer,
        fields,
        extra={"topology": topology, "default_layers": DEFAULT_LAYERS[topology]},
    )
    return str(directory)


def export_args(model, corpus, output, *flags):
    """argv for `run_export`."""
    return ["--model", str(model), "--input", str(corpus), "--output", str(output), *map(str, flags)]


def row_files(output):
    return sorted(glob.glob(os.path.join(str(output), "part-*.parquet")))


def error_files(output):
    return sorted(glob.glob(os.path.join(str(output), ERRORS_DIR, "part-*.parquet")))


def read_rows(output):
    """The output rows of a finished export as one pyarrow Table (data shards only)."""
    files = row_files(output)
    assert files, f"no part-*.parquet in {output}"
    return pa.concat_tables([pq.read_table(path) for path in files])


def read_errors(output):
    files = error_files(output)
    return pa.concat_tables([pq.read_table(path) for path in files]) if files else None


def rows_by_id(table):
    """id -> row dict, checking that ids are unique."""
    rows = table.to_pylist()
    by_id = {row["id"]: row for row in rows}
    assert len(by_id) == len(rows), "duplicate ids in the output"
    return by_id


def manifest_of(output):
    manifest = read_manifest(str(output))
    assert manifest is not None, f"{output} has no {MANIFEST}"
    return manifest


def snapshot(directory):
    """Every file under `directory` (relative path) with its bytes."""
    files = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as handle:
                files[os.path.relpath(path, directory)] = handle.read()
    return files


def pipeline_command(corpus, output, *flags):
    """argv of `python -m pipeline.run` in a child process (run with cwd=REPOSITORY)."""
    return [sys.executable, "-m", "pipeline.run", "--input", str(corpus), "--output", str(output), *flags]


def run_command(command):
    """Runs `command` (e.g. `pipeline_command(...)`) from the repository to its end; the CompletedProcess."""
    return forkserver.run(
        command, cwd=REPOSITORY, env=dict(os.environ, PYTHONPATH=REPOSITORY), capture_output=True, text=True
    )


def wait_for_staging(process, output, timeout=120):
    """Waits until the child run `process` has created its staging directory under `output`."""
    staging = os.path.join(str(output), STAGING)
    deadline = time.time() + timeout
    while not os.path.isdir(staging) and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    return staging


def wait_for_staged_shard(process, output, timeout=120):
    """Waits until the child run `process` has begun writing a row shard in its staging directory.

    Returns:
        The Parquet files then under the run's staging `data` directory (none if
        the run ended, or `timeout` seconds passed, first).
    """
    pattern = os.path.join(str(output), STAGING, "*", "data", "**", "*.parquet")
    deadline = time.time() + timeout
    while process.poll() is None and time.time() < deadline:
        shards = glob.glob(pattern, recursive=True)
        if shards:
            return shards
        time.sleep(0.02)
    return []


def kill_group_when(command, ready, timeout=180):
    """Runs `command` (from the repository, in its own process group) and SIGKILLs the group once `ready()`.

    The group holds the run's local worker processes too, so nothing of the run
    goes on writing after the kill.

    Returns:
        True if it was killed; False if it ended (or `timeout` seconds passed) first.
    """
    process = forkserver.popen(
        command,
        cwd=REPOSITORY,
        env=dict(os.environ, PYTHONPATH=REPOSITORY),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + timeout
    killed = False
    try:
        while process.poll() is None and time.time() < deadline:
            if ready():
                os.killpg(process.pid, signal.SIGKILL)
                killed = True
                break
            time.sleep(0.02)
    finally:
        if process.poll() is None and not killed:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    return killed


def is_empty_or_absent(directory):
    return not os.path.exists(directory) or os.listdir(directory) == []


class Reference:
    """The Keras oracle: the loaded bundle's model, its tokenizer, and ids encoded here."""

    def __init__(self, bundle_directory, documents):
        bundle = load_bundle(bundle_directory)
        self.model = bundle.model
        self.tokenizer = bundle.tokenizer
        self.documents = documents
        self.ids = [d["id"] for d in documents]
        names = [t.name for t in self.model.inputs]
        self.token_ids = {
            name: self.tokenizer.encode_batch([d.get(name, "") for d in documents], LENGTHS[name])[0]
            for name in names
        }
        self._feed = [self.token_ids[name] for name in names]
        self._predictions = {}

    def tensor(self, layer, call=0):
        """Output tensor of call `call` of `layer`, read off the layer's inbound nodes."""
        return self.model.get_layer(layer)._inbound_nodes[call].output_tensors[0]

    def predict(self, layer, call=0):
        """`keras.Model(model.inputs, tensor).predict(token_ids)` for the chosen call."""
        if (layer, call) not in self._predictions:
            sub_model = keras.Model(self.model.inputs, self.tensor(layer, call))
            prediction = sub_model.predict(self._feed, batch_size=64, verbose=0)
            self._predictions[layer, call] = np.asarray(prediction)
        return self._predictions[layer, call]

    def mask(self, input_name):
        return self.token_ids[input_name] != 0


def pool(values, mask, pooling):
    """Pools one document's (tokens, dim) `values` over its real tokens in numpy."""
    real = values[mask]
    if pooling == "mean":
        return real.mean(axis=0)
    if pooling == "max":
        return real.max(axis=0)
    if pooling == "last":
        return real[-1]
    raise ValueError(pooling)


PACKAGE_SOURCES = ("setup.py", "MANIFEST.in", "README.md", "models", "pipeline")


def copy_sources(target):
    """Copies what `setup.py` packages into `target`, so a build leaves the checkout untouched."""
    os.makedirs(target, exist_ok=True)
    for name in PACKAGE_SOURCES:
        source = os.path.join(REPOSITORY, name)
        if os.path.isdir(source):
            shutil.copytree(source, os.path.join(target, name), ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, target)
    return str(target)


def build_keras2_models(directory, script, *args):
    """Runs a `tf_keras` model-building `script` in its own process, as a user saves `.h5` models.

    The script gets `directory` and `args` as argv and writes its models and an
    `info.json` there; returns `(directory, info)`.
    """
    result = forkserver.run(
        [sys.executable, "-c", script, str(directory), *map(str, args)],
        capture_output=True,
        text=True,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
    )
    assert result.returncode == 0, result.stderr[-4000:]
    with open(os.path.join(directory, "info.json"), encoding="utf-8") as handle:
        return directory, json.load(handle)


# The tutorial's single-input model as its code writes it: tf_keras, Input(shape=(300,))
# (float32), default layer names, a Keras 2 Tokenizer, pad_sequences, saved as .h5.
# argv: output directory, the JSONL it is trained on, the JSONL whose `lstm` vectors Keras 2
# itself gives (reference.npy, in the order of info.json's ids).
TUTORIAL_KERAS2_SCRIPT = r"""
import json, os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
import numpy as np
import tf_keras
from tf_keras.layers import Input, Embedding, LSTM, Dense
from tf_keras.models import Model
from tf_keras.preprocessing.text import Tokenizer
from tf_keras.preprocessing.sequence import pad_sequences

out, first, second = sys.argv[1:4]
tf_keras.utils.set_random_seed(0)
load = lambda path: [json.loads(line) for line in open(path, encoding="utf-8")]
records = load(first)
tokenizer = Tokenizer(num_words=4000)
tokenizer.fit_on_texts([r["content"] for r in records])
with open(os.path.join(out, "tokenizer.json"), "w", encoding="utf-8") as handle:
    handle.write(tokenizer.to_json())
x = pad_sequences(tokenizer.texts_to_sequences([r["content"] for r in records]), maxlen=300)
y = np.array([r["kind"] == "function" for r in records], dtype="float32")
content = Input(shape=(300,))
lstm = LSTM(128)(Embedding(4000, 300)(content))
model = Model(inputs=content, outputs=Dense(1, activation="sigmoid")(lstm))
model.compile(optimizer="adam", loss="binary_crossentropy")
model.fit(x, y, epochs=1, batch_size=64, verbose=0)
model.save(os.path.join(out, "tutorial.h5"))
new = load(second)
ids = pad_sequences(tokenizer.texts_to_sequences([r["content"] for r in new]), maxlen=300)
reference = Model(inputs=model.input, outputs=model.get_layer("lstm").output).predict(ids, verbose=0)
np.save(os.path.join(out, "reference.npy"), reference)
json.dump({"input": model.input.name.split(":")[0], "ids": [r["id"] for r in new]},
          open(os.path.join(out, "info.json"), "w"))
"""
