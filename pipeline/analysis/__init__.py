"""Analysing an export: reading it back, nearest neighbours, label agreement, PCA plots, the vector index."""
