"""The benchmark, outside the wheel: ``sessionfsm bench`` from a source checkout.

Run it with ``sessionfsm bench`` (or ``python -m benchmarks``) from the
repository root; see :mod:`benchmarks.bench` for what it measures.
"""
