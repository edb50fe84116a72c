"""Benchmarks: side-by-side measurements, never run as tests."""
