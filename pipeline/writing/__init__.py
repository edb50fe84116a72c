"""Writing the output: Arrow schemas, the output directory's crash-safe life cycle, resume, token tables."""
