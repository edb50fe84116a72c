"""The inference step: documents to model features, and the worker-side model with its forward pass."""
