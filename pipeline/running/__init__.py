"""Running one export: the Beam graph, the runners (in-memory, local processes, portable), progress."""
