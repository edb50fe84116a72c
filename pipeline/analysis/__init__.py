"""Analysing an export: reading it back, nearest neighbours, label agreement, PCA plots and the vector index."""
