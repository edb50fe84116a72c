"""Analysing an export: reading it back, nearest neighbours and the approximate-nearest-neighbour index."""
