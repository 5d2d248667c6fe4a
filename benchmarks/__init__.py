"""Benchmarks, outside the package: run each module with ``python -m benchmarks.NAME``."""
