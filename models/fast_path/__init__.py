"""An exact fast forward pass for the Embedding -> recurrent parts of a Keras text model.

The parts it runs itself are chains that start at an `Embedding` of a model
input (int ids, or float ids as Keras 2's `Input(shape=(n,))` gives, below 2^24
where float32 is exact) and go through `LSTM`, `GRU`, `SimpleRNN` or
`Bidirectional` layers (stacked through `return_sequences=True`; masked or not).
Everything downstream of them (`Dense`, `Add`, `Lambda`, ...) is called as the
model's own Keras layers on their outputs, in the same traced function: the
hybrid pass.  Each recurrent direction is computed with these exact rewrites:

1. Folding: an input projection `E[id] @ W + b` is a row of the table
   `E @ W + b`, computed once per model load; a step is a row lookup plus the
   recurrent matmul.
2. Skipping padding: without a mask, padding that a direction reads *first*
   (pre-padding read forwards, post-padding read backwards) is the same for
   every document, so the state after k padding steps is computed once per k
   and each document starts there.  Padding read *last* depends on the state
   the document left, so it is run (with folded inputs).  With a mask
   (`mask_zero=True`) masked steps carry the state, so each document runs only
   its real tokens, in either direction, wherever the padding is.
3. Length sorting: documents are sorted by where they start and run together;
   at each step only the documents that have started move (a prefix of the
   batch), so the work is the sum of the steps each document needs.
4. Lanes: a batch is dealt into a few lanes (runs of similar length, about the
   same tokens each) run as independent loops in one traced function, so
   TensorFlow runs them on several cores at once.
5. Buckets: a layer returning only its final state from folded inputs runs in
   XLA-compiled loops of fixed shape over buckets of `BUCKET_ROWS` sorted rows
   (see `buckets.Bucketed`).

Per-token outputs (`return_sequences=True`) are rebuilt at every position as
Keras gives them: at skipped padding the padding outputs, at masked steps the
carried output (zeros inside `Bidirectional`, which forces it).

`build_fast_path` says, per output column, which forward pass computes it and
why the fast one does not where it declines (a `FastPathChoice`).  The caller
checks the result against Keras on a sample batch before trusting it.

Modules: `analysis` (which tensors are fast, and why), `cells` (the Embedding
and recurrent layers taken apart), `plans` (reading plans of a lane), `buckets`
(final-state loops compiled by XLA), `loops` (`FastPath`: lanes and loops),
`choice` (`build_fast_path`).
"""

from models.fast_path.analysis import FAST, HYBRID, KERAS, ForwardPass, describe_forward_passes
from models.fast_path.choice import FastPathChoice, build_fast_path
from models.fast_path.loops import MAX_LANES, FastPath

__all__ = [
    "FAST",
    "HYBRID",
    "KERAS",
    "MAX_LANES",
    "FastPath",
    "FastPathChoice",
    "ForwardPass",
    "build_fast_path",
    "describe_forward_passes",
]
