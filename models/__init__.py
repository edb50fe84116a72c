"""Keras models, tokenizer, bundle format and sub-model truncation (no Beam here)."""

__version__ = "0.1.0"
